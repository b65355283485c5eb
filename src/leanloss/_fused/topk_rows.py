r"""The row math of top-k distillation, stated once.

Per row of student logits ``z``, with
``y = z / T``, ``q = softmax(y)``, the teacher's tempered distribution ``p`` over its ids
(``P = sum_i p_i``: 1, or 0 for a row of padding only) and ``a`` = ``hard_weight``::

    soft = T^2 (sum_i p_i log p_i - sum_i p_i (y_{id_i} - lse(y)))
    loss = a (lse(z) - z_t) + (1 - a) soft
    dloss/dz_c = (1 - a) T (P q_c - sum_i p_i [c == id_i]) + a (softmax(z)_c - [c == t])

The row kernel :func:`topk_block` computes the loss and writes the dense part of the gradient
(the two softmax terms) over the block; the point terms at the ``k`` ids and at the target are
added after it (the target's reported to the engine as a
:class:`~leanloss._fused.engine.PointGradient`).

(``lse(z) - z_t`` is the hard term of :mod:`leanloss._fused.distill_rows`.)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .distill_rows import hard_loss
from .kernels import RowKernel, row_logsumexp

__all__ = ["topk_block", "TOPK_KERNEL"]


def topk_block(z: Tensor, x_ids: Tensor, p: Tensor, p_sum: Tensor, p_logp: Tensor,
               x_t: Optional[Tensor], g: Optional[Tensor], *, scale: float, temperature: float,
               hard_weight: float):
    """Row kernel of the module docstring on a block of raw logits ``z``.

    ``x_ids``: ``(n, k)`` raw student logits at the teacher's ids (compute dtype); ``p``: the
    teacher's probabilities (0 at padding); ``p_sum``, ``p_logp``: ``sum_i p_i`` and
    ``sum_i p_i log p_i``; ``x_t``: the raw target logit (``None`` without the hard term);
    ``g``: the per-row gradient scale, or ``None``. Returns ``(loss,)``; with ``g`` it also
    overwrites ``z`` with the dense part of ``g * dloss/dz``.
    """
    a = hard_weight
    y = z.to(p.dtype)
    if scale != 1.0:
        y = y * scale
    lse = row_logsumexp(y)
    log_q = x_ids * scale - lse.unsqueeze(1)
    cross = torch.where(p > 0, p * log_q, torch.zeros_like(p)).sum(1)
    loss = (p_logp - cross) * ((1.0 - a) * temperature * temperature)
    lse1 = None
    if a > 0.0:
        lse1 = lse if scale == 1.0 else row_logsumexp(z.to(p.dtype))
        loss = loss + hard_loss(lse1, x_t, a)
    if g is None:
        return (loss,)
    grad = (y - lse.unsqueeze(1)).exp() * (p_sum * g * ((1.0 - a) * temperature)).unsqueeze(1)
    if a > 0.0:
        grad = grad + (z.to(p.dtype) - lse1.unsqueeze(1)).exp() * (g * a).unsqueeze(1)
    z.copy_(grad)
    return (loss,)


TOPK_KERNEL = RowKernel(topk_block, "top-k distillation")
