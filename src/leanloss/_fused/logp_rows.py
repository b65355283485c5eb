r"""Per-token log-probability and entropy of a softmax, from row statistics, and their gradient.

Shared by the fused :func:`leanloss.linear_log_probs` (statistics of a whole-vocabulary block)
and its vocab-parallel form (statistics all-reduced over the ranks' slices), so the formulas
live once. With ``y = s * z`` (``s = 1 / temperature``), ``m`` any shift (the row maximum),
``S = sum_c exp(y_c - m)``, ``U = sum_c exp(y_c - m) (y_c - m)`` and ``p = softmax(y)``::

    lse  = m + log S
    logp = y_t - lse
    H    = -sum_c p_c log p_c = log S - U / S

and, for upstream gradients ``a`` (of ``logp``) and ``b`` (of ``H``)::

    d(a logp + b H)/dz_c = s * (a [c == t] - p_c (a + b (log p_c + H)))

(``dH/dy_c = -p_c (log p_c + H)``). Terms with ``p_c = 0`` are ``0`` in ``U`` and in the
gradient (``0 log 0 = 0``), so classes masked with a ``-inf`` logit are exact.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .kernels import RowKernel

__all__ = ["shifted_sums", "logp_entropy", "logp_stats_block", "logp_grad_block",
           "LOGP_STATS_KERNEL", "LOGP_GRAD_KERNEL"]


def _scaled(z: Tensor, dtype: torch.dtype, scale: float) -> Tensor:
    y = z.to(dtype)
    return y * scale if scale != 1.0 else y


def shifted_sums(y: Tensor, m: Tensor) -> Tuple[Tensor, Tensor]:
    """``(S, U)`` of the module docstring for rows ``y`` (already scaled) and shifts ``m`` (n,)."""
    d = y - m.unsqueeze(1)
    e = d.exp()
    return e.sum(1), torch.where(e > 0, e * d, torch.zeros_like(d)).sum(1)


def logp_entropy(m: Tensor, s: Tensor, u: Tensor, y_t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp, H, lse)`` per row from the shift ``m``, the sums ``S``, ``U`` and the scaled
    target logit ``y_t``."""
    log_s = s.log()
    lse = m + log_s
    return y_t - lse, log_s - u / s, lse


def logp_stats_block(z: Tensor, x_t: Tensor, *, scale: float):
    """Row kernel: ``(logp, H, lse)`` of each row of the raw logits block ``z``; ``x_t`` is each
    row's raw target logit in the compute dtype."""
    y = _scaled(z, x_t.dtype, scale)
    m = y.amax(1)
    s, u = shifted_sums(y, m)
    return logp_entropy(m, s, u, x_t * scale)


def logp_grad_block(z: Tensor, x_t: Tensor, lse: Tensor, ent: Tensor, a: Tensor, b: Tensor, *,
                    scale: float):
    """Row kernel: overwrite the raw logits ``z`` with the dense part of the gradient of
    ``a * logp + b * H`` (the module docstring's formula without ``s a [c == t]``), from the
    recorded ``lse`` and ``H``. Returns ``(dense_t,)``: that dense part at the target."""
    y = _scaled(z, lse.dtype, scale)
    log_p = y - lse.unsqueeze(1)
    p = log_p.exp()
    c = (a + b * ent).unsqueeze(1)
    grad = torch.where(p > 0, p * (c + b.unsqueeze(1) * log_p), torch.zeros_like(p)) * (-scale)
    z.copy_(grad)
    log_p_t = x_t * scale - lse
    p_t = log_p_t.exp()
    dense_t = torch.where(p_t > 0, p_t * (a + b * (ent + log_p_t)), torch.zeros_like(p_t)) * (-scale)
    return (dense_t,)


LOGP_STATS_KERNEL = RowKernel(logp_stats_block, "log-prob statistics")
LOGP_GRAD_KERNEL = RowKernel(logp_grad_block, "log-prob gradient")
