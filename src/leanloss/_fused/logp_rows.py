r"""Per-token log-probability and statistics of a softmax, from row sums, and their gradient: the
formulas of :func:`leanloss.linear_log_probs` and its vocab-parallel form.

The logits. From the raw ``z = hidden @ weight.T + bias`` over ``V`` classes, temperature
``T``, logit scale ``l`` and softcap ``c``::

    y = c tanh(l z / c) / T        (without softcap: y = l z / T)

which is :func:`~leanloss._fused.ce_rows.transform` with ``scale = l / T`` and softcap
``c / T`` (``(c / T) tanh((l / T) z / (c / T))``), so ``dy/dz = (l / T) (1 - (y T / c)^2)``.

The statistics. With ``m`` any shift (the row maximum), ``e_c = exp(y_c - m)``, the row sums
``S = sum_c e_c``, ``U = sum_c e_c (y_c - m)``, ``Q = sum_c e_c^2``, ``Y = sum_c y_c`` and
``p = softmax(y)``::

    lse  = m + log S
    logp = y_t - lse
    H    = -sum_c p_c log p_c            = log S - U / S          ("entropy")
    L    = log sum_c p_c^2               = log Q - 2 log S        ("log_sum_sq_probs")
    mean = sum_c y_c / V                 = Y / V                  ("mean_logit")
    top1 = y_t >= max_c y_c  and  y_t > max_{c < t} y_c           ("is_top1")

``top1`` is ``argmax_c y_c == t`` with argmax's first-index rule for ties. Each statistic is
computed only when asked for (its sum is a separate term of the kernel's code path).

The gradient. ``logp``, ``H``, ``L`` and ``mean`` are differentiable. For upstream gradients
``a``, ``b``, ``g``, ``k`` (of ``logp``, ``H``, ``L``, ``mean``; ``0`` for the ones not asked
for)::

    dlogp/dy_c = [c == t] - p_c
    dH/dy_c    = -p_c (log p_c + H)
    dL/dy_c    = 2 p_c (p_c / sum_j p_j^2 - 1) = 2 p_c (p_c exp(-L) - 1)
    dmean/dy_c = 1 / V

    d(a logp + b H + g L + k mean)/dy_c
        = a [c == t] + p_c (2 g exp(-L) p_c - b log p_c - (a + b H + 2 g)) + k / V
        = a [c == t] + p_c (B log p_c + G p_c + A) + K

with the per-row coefficients ``A = -(a + b H + 2 g)``, ``B = -b``, ``G = 2 g exp(-L)``,
``K = k / V`` (:func:`_coefficients`; the native form computes the last line from them),
times ``dy/dz`` above. Terms with ``p_c = 0`` are ``0`` (``0 log 0 = 0``), so classes masked
with a ``-inf`` logit are exact. ``top1`` has no gradient.

Vocab-parallel, ``m`` and ``max_{c < t} y_c`` (:func:`max_before_target`) are all-reduced with
MAX, ``S``, ``U``, ``Q``, ``Y`` and ``y_t`` (from its owner) with SUM; the gradient is local.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import native
from .ce_rows import softcap_slope, transform
from .kernels import RowKernel

__all__ = ["STAT_NAMES", "LogProbStats", "row_sums", "finish_stats", "max_before_target",
           "is_top1", "logp_stats_block", "logp_grad_block", "LOGP_STATS_KERNEL", "LOGP_GRAD_KERNEL"]

#: The per-token statistics besides ``logp``, by their public names (in the module docstring:
#: ``H``, ``L``, ``mean``, ``top1``).
STAT_NAMES = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")


class LogProbStats(NamedTuple):
    """Which statistics a scorer computes besides ``logp`` (each one costs nothing when off)."""

    entropy: bool = False
    log_sum_sq: bool = False
    mean: bool = False
    top1: bool = False

    @property
    def outputs(self) -> Tuple[str, ...]:
        """The differentiable per-row outputs, in the order of the scorer's output columns."""
        names = ("logp", "entropy", "log_sum_sq_probs", "mean_logit")
        return tuple(n for n, on in zip(names, (True, *self[:3])) if on)


def row_sums(y: Tensor, m: Tensor, stats: LogProbStats) -> List[Tensor]:
    """``[S, U?, Q?, Y?]`` of the module docstring over the columns of ``y`` (transformed rows)
    for shifts ``m`` ``(n,)``; the optional ones only where ``stats`` asks for them."""
    d = y - m.unsqueeze(1)
    e = d.exp()
    sums = [e.sum(1)]
    if stats.entropy:
        sums.append(torch.where(e > 0, e * d, torch.zeros_like(d)).sum(1))
    if stats.log_sum_sq:
        sums.append((e * e).sum(1))
    if stats.mean:
        sums.append(y.sum(1))
    return sums


def finish_stats(m: Tensor, sums: List[Tensor], y_t: Tensor, stats: LogProbStats,
                 num_classes: int) -> List[Tensor]:
    """``[logp, H?, L?, mean?, lse]`` per row from the shift ``m``, :func:`row_sums` over the
    whole vocabulary and the transformed target logit ``y_t``."""
    s, rest = sums[0], iter(sums[1:])
    log_s = s.log()
    lse = m + log_s
    out = [y_t - lse]
    if stats.entropy:
        out.append(log_s - next(rest) / s)
    if stats.log_sum_sq:
        out.append(next(rest).log() - 2.0 * log_s)
    if stats.mean:
        out.append(next(rest) / num_classes)
    return out + [lse]


def max_before_target(y: Tensor, target: Tensor, start: int) -> Tensor:
    """``max_{c < t} y_c`` over this slice's columns (global classes ``start + j``) for global
    targets ``target`` ``(n,)``: the row maximum where the whole slice lies before the target,
    ``-inf`` where it lies after."""
    cols = torch.arange(y.shape[1], device=y.device)
    before = cols.unsqueeze(0) < (target - start).unsqueeze(1)
    return torch.where(before, y, torch.full_like(y, float("-inf"))).amax(1)


def is_top1(y_t: Tensor, row_max: Tensor, before_max: Tensor) -> Tensor:
    """``top1`` of the module docstring from the target's logit, the row maximum and the
    maximum over the classes before the target."""
    return (y_t >= row_max) & (y_t > before_max)


def logp_stats_block(z: Tensor, x_t: Tensor, t: Optional[Tensor], *, scale: float,
                     softcap: Optional[float], num_classes: int, entropy: bool, log_sum_sq: bool,
                     mean: bool, top1: bool):
    """Row kernel: ``(logp, H?, L?, mean?, lse, top1?)`` of each row of the raw logits block
    ``z`` over the whole vocabulary; ``x_t``: each row's raw target logit in the compute dtype,
    ``t``: the targets (read for ``top1`` only)."""
    stats = LogProbStats(entropy, log_sum_sq, mean, top1)
    y = transform(z.to(x_t.dtype), scale, softcap)
    m = y.amax(1)
    out = finish_stats(m, row_sums(y, m, stats), transform(x_t, scale, softcap), stats, num_classes)
    if top1:
        assert t is not None
        out.append(y.argmax(1) == t)  # the first index among ties, as the docstring's rule
    return tuple(out)


def _stats_natively(z: Tensor, x_t: Tensor, t: Optional[Tensor], *, scale: float, softcap: Optional[float],
                    num_classes: int, entropy: bool, log_sum_sq: bool, mean: bool, top1: bool):
    """:func:`logp_stats_block` with the row sums from :func:`leanloss._fused.native.logp_sums`
    (in float32); ``None`` where that does not apply. ``top1`` compares the target's logit that
    the native code computes with its maxima: under a softcap its ``tanh`` is not torch's to the
    last bit, and a comparison must not mix the two."""
    if x_t.dtype != torch.float32:
        return None
    stats = LogProbStats(entropy, log_sum_sq, mean, top1)
    got = native.logp_sums(z, scale, t if top1 else None, entropy=entropy, log_sum_sq=log_sum_sq, mean=mean,
                           softcap=softcap)
    if got is None:
        return None
    m, sums, top = got
    out = finish_stats(m, sums, transform(x_t, scale, softcap), stats, num_classes)
    if top1:
        assert top is not None
        before, native_y_t = top
        out.append(is_top1(native_y_t, m, before))
    return tuple(out)


def _coefficients(ent: Optional[Tensor], log_sum_sq: Optional[Tensor], a: Tensor, b: Optional[Tensor],
                  g: Optional[Tensor], k: Optional[Tensor], num_classes: int):
    """``(A, B, G, K)`` per row, with which the module docstring's gradient (without
    ``a [c == t]`` and ``dy/dz``) is ``p_c (B log p_c + G p_c + A) + K``; ``None`` for a term
    not asked for."""
    shift, B, G = a, None, None
    if b is not None:
        assert ent is not None
        shift, B = shift + b * ent, -b
    if g is not None:
        assert log_sum_sq is not None
        shift, G = shift + 2.0 * g, 2.0 * g * (-log_sum_sq).exp()
    return -shift, B, G, None if k is None else k * (1.0 / num_classes)


def _dense_grad(y: Tensor, lse: Tensor, coefficients, *, scale: float, softcap: Optional[float]) -> Tensor:
    """:func:`_coefficients`' gradient times ``dy/dz`` at the transformed logits ``y`` (``(n, V)``
    with ``(n, 1)`` row terms, or ``(n,)`` with ``(n,)``)."""
    A, B, G, K = coefficients
    log_p = y - lse
    p = log_p.exp()
    inner = A
    if B is not None:
        inner = inner + B * log_p
    if G is not None:
        inner = inner + G * p
    grad = torch.where(p > 0, p * inner, torch.zeros_like(p))
    if K is not None:
        grad = grad + K
    grad = grad * scale
    return grad if softcap is None else grad * softcap_slope(y, softcap)


def _target_terms(x_t: Tensor, lse: Tensor, coefficients, a: Tensor, *, scale: float, softcap: Optional[float]):
    """``(dense_t, coef)``: the dense gradient at each row's target and the point term ``a dy/dz`` there."""
    y_t = transform(x_t, scale, softcap)
    dense_t = _dense_grad(y_t, lse, coefficients, scale=scale, softcap=softcap)
    coef = a * scale if softcap is None else a * scale * softcap_slope(y_t, softcap)
    return dense_t, coef


def logp_grad_block(z: Tensor, x_t: Tensor, lse: Tensor, ent: Optional[Tensor],
                    log_sum_sq: Optional[Tensor], a: Tensor, b: Optional[Tensor],
                    g: Optional[Tensor], k: Optional[Tensor], *, scale: float,
                    softcap: Optional[float], num_classes: int):
    """Row kernel: overwrite the raw logits ``z`` with the dense part of the gradient of
    ``a logp + b H + g L + k mean`` (the module docstring's, without ``a [c == t]``) from the
    recorded ``lse``, ``H`` and ``L``. Returns ``(dense_t, coef)``: that dense part at the
    target and the point term ``a dy/dz`` there."""
    coefficients = _coefficients(ent, log_sum_sq, a, b, g, k, num_classes)
    column = tuple(None if c is None else c.unsqueeze(1) for c in coefficients)
    y = transform(z.to(lse.dtype), scale, softcap)
    z.copy_(_dense_grad(y, lse.unsqueeze(1), column, scale=scale, softcap=softcap))
    return _target_terms(x_t, lse, coefficients, a, scale=scale, softcap=softcap)


def _grad_natively(z: Tensor, x_t: Tensor, lse: Tensor, ent: Optional[Tensor], log_sum_sq: Optional[Tensor],
                   a: Tensor, b: Optional[Tensor], g: Optional[Tensor], k: Optional[Tensor], *, scale: float,
                   softcap: Optional[float], num_classes: int):
    """:func:`logp_grad_block` with the block written by :func:`leanloss._fused.native.logp_grad`
    (in float32); ``None`` where that does not apply."""
    if lse.dtype != torch.float32:
        return None
    coefficients = _coefficients(ent, log_sum_sq, a, b, g, k, num_classes)
    if not native.logp_grad(z, scale, lse, *coefficients, softcap=softcap):
        return None
    return _target_terms(x_t, lse, coefficients, a, scale=scale, softcap=softcap)


LOGP_STATS_KERNEL = RowKernel(logp_stats_block, "log-prob statistics", cpu="compiled", native=_stats_natively)
LOGP_GRAD_KERNEL = RowKernel(logp_grad_block, "log-prob gradient", cpu="compiled", native=_grad_natively)
