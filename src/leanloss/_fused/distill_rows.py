r"""The distillation row math, stated once: the divergence of each kind, its gradient, the hard term.

With :math:`a = z_s / T` (student), :math:`b = z_t / T` (teacher), :math:`q = \mathrm{softmax}(a)`,
:math:`p = \mathrm{softmax}(b)`, :math:`A = \mathrm{lse}(a)`, :math:`B = \mathrm{lse}(b)`, each
divergence is finished from one or two row sums (:func:`divergence_sums`):

* forward: :math:`D = \langle p, b - a\rangle + A - B`, :math:`\partial D/\partial a = q - p`;
* reverse: :math:`D = \langle q, e\rangle - A + B`,
  :math:`\partial D/\partial a = q \odot (e - \langle q, e\rangle)` with :math:`e = a - b`;
* jsd: :math:`\lambda = \log(q + \tfrac{\beta}{1-\beta} p)` (so :math:`\log m = \lambda + \log(1-\beta)`)
  and :math:`s = \lambda - \log q = \log(1 + \tfrac{\beta}{1-\beta} p / q)`:
  :math:`D = \beta\langle p, \log p - \lambda\rangle - (1-\beta)\langle q, s\rangle - \log(1-\beta)`,
  :math:`\partial D/\partial a = (1-\beta)\, q \odot (\langle q, s\rangle - s)`. Written with
  :math:`s`, a row's common offset (its log-sum-exp, and its rounding) cancels before any
  product, so float32 gradients are as accurate as the log-softmax form's. The mixture is
  formed in probability space and floored at the smallest normal float before its log; the
  terms this can affect weigh less than ``1e-35``;
* hard term: :math:`\mathrm{CE} = \mathrm{lse}(z_s) - z_{s,y}` on the untempered student
  logits :math:`z_s = T a`, gradient with respect to :math:`a`:
  :math:`T(\mathrm{softmax}(z_s) - \mathrm{onehot}(y))`;

and the row loss is :math:`a_h \mathrm{CE} + (1-a_h) T^2 D`. ``jsd`` with :math:`\beta = 0`
is the forward KL and with :math:`\beta = 1` the reverse KL (:func:`resolve_kind`; see
:mod:`leanloss.losses.distill` for that convention).

On one device :func:`distill_block` composes all of it in one row kernel; vocab-parallel, the
scorer all-reduces the row maxima, then the sums of exponentials (:func:`exp_sums_block`),
then the divergence's row sums, and writes the gradient of its slice locally
(:func:`distill_grad_block`).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import native
from .kernels import RowKernel, row_logsumexp, row_softmax

__all__ = ["resolve_kind", "divergence_sums", "divergence_finish", "divergence_grad", "hard_loss",
           "distill_block", "exp_sums_block", "distill_grad_block", "DISTILL_KERNEL",
           "EXP_SUMS_KERNEL", "DISTILL_GRAD_KERNEL"]


def resolve_kind(kind: str, beta: float) -> str:
    """``kind`` with the jsd endpoints named: ``beta = 0`` is ``'forward'``, ``beta = 1``
    ``'reverse'``."""
    if kind == "jsd" and beta in (0.0, 1.0):
        return "forward" if beta == 0.0 else "reverse"
    return kind


def divergence_sums(a: Tensor, b: Tensor, q: Tensor, p: Tensor, lse_a: Tensor, lse_b: Tensor, *,
                    kind: str, beta: float) -> Tuple[List[Tensor], Optional[Tensor]]:
    """The divergence's row sums over the block's classes (``lse_a``, ``lse_b`` ``(n, 1)``),
    and the elementwise term its gradient reuses (``e`` for reverse, ``s`` for jsd)."""
    if kind == "forward":
        return [(p * (b - a)).sum(1)], None
    if kind == "reverse":
        e = a - b
        return [(q * e).sum(1)], e
    lam = _jsd_lambda(q, p, beta)
    s = lam - (a - lse_a)
    return [(p * (b - lse_b - lam)).sum(1), (q * s).sum(1)], s


def _jsd_lambda(q: Tensor, p: Tensor, beta: float) -> Tensor:
    """``lambda = log(q + beta / (1 - beta) p)``, the mixture floored at the smallest normal."""
    return (q + p * (beta / (1.0 - beta))).clamp_min(torch.finfo(q.dtype).tiny).log()


def divergence_finish(sums: List[Tensor], lse_a: Tensor, lse_b: Tensor, *, kind: str,
                      beta: float) -> Tensor:
    """``D`` per row from the (reduced) row sums and the ``(n,)`` log-sum-exps."""
    if kind == "forward":
        return sums[0] + (lse_a - lse_b)
    if kind == "reverse":
        return sums[0] - lse_a + lse_b
    return beta * sums[0] - (1.0 - beta) * sums[1] - math.log1p(-beta)


def divergence_grad(q: Tensor, p: Tensor, sums: List[Tensor], term: Optional[Tensor], *, kind: str,
                    beta: float) -> Tensor:
    """``dD/da`` of the block from the (reduced) row sums and :func:`divergence_sums`' term."""
    if kind == "forward":
        return q - p
    if kind == "reverse":
        return q * (term - sums[0].unsqueeze(1))
    return q * (sums[1].unsqueeze(1) - term) * (1.0 - beta)


def hard_loss(lse_z: Tensor, z_y: Tensor, hard_weight: float) -> Tensor:
    """``a_h CE``: ``lse_z`` and ``z_y`` are the untempered student's log-sum-exp and target
    logit."""
    return hard_weight * (lse_z - z_y)


def distill_block(a: Tensor, b: Optional[Tensor], a_y: Optional[Tensor], g: Optional[Tensor], *,
                  kind: str, beta: float, temperature: float, hard_weight: float,
                  dtype: torch.dtype):
    """Distillation loss of one block over the whole vocabulary, row-wise (composed).

    ``a``: student logits divided by ``T`` (overwritten with the dense part of ``g * dloss/da``
    when ``g`` is given); ``b``: teacher logits divided by ``T`` (``None`` when
    ``hard_weight == 1``); ``a_y``: the student's ``a`` at each row's target (``None`` without
    a hard term). ``kind`` is resolved (:func:`resolve_kind`). Returns ``(loss,)``; the hard
    term's point term (``-g * hard_weight * T`` at the target) is left to the caller.
    """
    hw, temp = hard_weight, temperature
    x = a.to(dtype)
    loss = None
    grad = None
    lse_a = q = None
    # The student's softmax from one exponential per element (row_softmax: inductor keeps
    # exp(a - m) in float32 from the sum pass to the loss pass), the teacher's from two: 4
    # transcendentals per element instead of 5 (three calls on a bf16 32 x 32000 block, AVX2
    # build under callgrind: 185M -> 168M instructions). Keeping the teacher's exponentials too
    # (3 per element, 158M) adds a third tile-sized float32 buffer per call, and glibc's heap
    # then kept 125-250 MB more resident between steps (bench extra MB 187 -> 312).
    if b is not None or temp == 1.0:  # the student's softmax q (also the hard term's at T = 1)
        q, lse_a = row_softmax(x)
    if b is not None:
        y = b.to(dtype)
        lse_b = row_logsumexp(y).unsqueeze(1)
        p = (y - lse_b).exp()
        sums, term = divergence_sums(x, y, q, p, lse_a, lse_b, kind=kind, beta=beta)
        div = divergence_finish(sums, lse_a.squeeze(1), lse_b.squeeze(1), kind=kind, beta=beta)
        soft = (1.0 - hw) * temp * temp
        loss = div * soft
        grad = divergence_grad(q, p, sums, term, kind=kind, beta=beta) * soft
    if a_y is not None:
        if temp == 1.0:  # softmax(z) is q
            lse_z, probs = lse_a, q * hw
        else:
            z = x * temp
            lse_z = row_logsumexp(z).unsqueeze(1)
            probs = (z - lse_z).exp() * (hw * temp)
        hard = hard_loss(lse_z.squeeze(1), a_y * temp, hw)
        loss = hard if loss is None else loss + hard
        grad = probs if grad is None else grad + probs
    if g is not None:
        a.copy_(grad * g.unsqueeze(1))
    return (loss,)


def exp_sums_block(a: Tensor, b: Optional[Tensor], m_a: Tensor, m_b: Optional[Tensor], *,
                   temperature: float, hard: bool):
    """A vocabulary slice's partial sums for the log-sum-exps, given the global row maxima:
    ``sum exp(a - m_a)``, ``sum exp(b - m_b)`` (with a teacher) and ``sum exp(T (a - m_a))``
    (with a hard term; ``lse(z_s) = T m_a + log`` of it)."""
    x = a.to(m_a.dtype)
    d = x - m_a.unsqueeze(1)
    out = [d.exp().sum(1)]
    if b is not None:
        out.append((b.to(m_a.dtype) - m_b.unsqueeze(1)).exp().sum(1))
    if hard:
        out.append((d * temperature).exp().sum(1))
    return tuple(out)


def distill_grad_block(a: Tensor, b: Optional[Tensor], lse_a: Tensor, lse_b: Optional[Tensor],
                       lse_z: Optional[Tensor], sums: Optional[Tensor], g: Tensor, *, kind: str,
                       beta: float, temperature: float, hard_weight: float):
    """The dense part of ``g * dloss/da`` over a vocabulary slice, from the global statistics
    (``sums``: the divergence's reduced row sums as columns); overwrites ``a``. Returns ``()``."""
    hw, temp = hard_weight, temperature
    x = a.to(lse_a.dtype)
    q = (x - lse_a.unsqueeze(1)).exp()
    grad = None
    if b is not None:
        y = b.to(lse_a.dtype)
        p = (y - lse_b.unsqueeze(1)).exp()
        term = None
        if kind == "reverse":
            term = x - y
        elif kind == "jsd":
            term = _jsd_lambda(q, p, beta) - (x - lse_a.unsqueeze(1))
        grad = divergence_grad(q, p, list(sums.unbind(1)), term, kind=kind, beta=beta) * (
            (1.0 - hw) * temp * temp)
    if lse_z is not None:
        probs = q if temp == 1.0 else (x * temp - lse_z.unsqueeze(1)).exp()
        probs = probs * (hw * temp)
        grad = probs if grad is None else grad + probs
    a.copy_(grad * g.unsqueeze(1))
    return ()


DISTILL_KERNEL = RowKernel(distill_block, "distillation", cpu="tiled", native=native.distill)
EXP_SUMS_KERNEL = RowKernel(exp_sums_block, "distillation statistics")
DISTILL_GRAD_KERNEL = RowKernel(distill_grad_block, "distillation gradient")
