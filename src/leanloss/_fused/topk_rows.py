r"""The row math of top-k distillation, stated once.

Per row of student logits ``z``, with ``y = z / T``, ``q = softmax(y)``, the teacher's tempered
distribution ``p`` over its GLOBAL ids ``id_1 .. id_k`` (``P = sum_i p_i``: 1, or 0 for a row of
padding only), ``a`` = ``hard_weight`` and any per-row shift ``m``::

    lse   = log sum_c exp(y_c)                lse_z = log sum_c exp(z_c)
    cross = sum_i p_i (y_{id_i} - m)          (terms with p_i = 0 left out)
    soft  = T^2 (sum_i p_i log p_i - cross + P (lse - m))
    loss  = a (lse_z - z_t) + (1 - a) soft
    dloss/dz_c = (1 - a) T (P q_c - sum_i p_i [c == id_i]) + a (softmax(z)_c - [c == t])

On one device :func:`topk_block` composes it all in one row kernel with ``m = lse``. Over a
vocabulary slice, :func:`slice_sums` gives the sums to all-reduce (``m`` the global row maximum
of ``y``: ``lse = m + log S``, ``lse_z = T m + log S_z``; ``cross`` over the ids it owns, ``z_t``
from the target's owner). The gradient's dense part (:func:`dense_grad`) needs only ``lse``,
``lse_z`` and ``P``, so it is local; the point terms at the ``k`` ids (repeated ids add up) and
at the target go to the engine. (``lse_z - z_t`` is the hard term of :mod:`.distill_rows`.)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ce_rows import transform
from .distill_rows import hard_loss
from .kernels import RowKernel, row_logsumexp

__all__ = ["topk_block", "topk_grad_block", "topk_loss", "shifted_cross", "slice_sums", "dense_grad",
           "TOPK_KERNEL", "TOPK_GRAD_KERNEL"]


def topk_loss(cross: Tensor, lse_over_m: Optional[Tensor], p_sum: Tensor, p_logp: Tensor,
              lse_z: Optional[Tensor], z_t: Optional[Tensor], *, temperature: float,
              hard_weight: float) -> Tensor:
    """The row loss of the module docstring from its statistics (``lse_over_m``: ``lse - m``,
    ``None`` for ``0``; ``lse_z``, ``z_t``: ``None`` without the hard term)."""
    a = hard_weight
    soft = p_logp - cross
    if lse_over_m is not None:
        soft = soft + p_sum * lse_over_m
    loss = soft * ((1.0 - a) * temperature * temperature)
    return loss + hard_loss(lse_z, z_t, a) if a > 0.0 else loss


def shifted_cross(y_ids: Tensor, p: Tensor, m: Tensor) -> Tensor:
    """``cross``: ``sum_i p_i (y_{id_i} - m)`` over the entries with ``p_i > 0``."""
    return torch.where(p > 0, p * (y_ids - m.unsqueeze(1)), torch.zeros_like(p)).sum(1)


def dense_grad(z: Tensor, y: Tensor, lse: Tensor, lse_z: Optional[Tensor], p_sum: Tensor, g: Tensor, *,
               temperature: float, hard_weight: float) -> None:
    """Writes the dense part of ``g * dloss/dz`` over ``z`` (``y = z / T`` in the compute dtype)."""
    a = hard_weight
    grad = (y - lse.unsqueeze(1)).exp() * (p_sum * g * ((1.0 - a) * temperature)).unsqueeze(1)
    if a > 0.0:
        grad = grad + (z.to(y.dtype) - lse_z.unsqueeze(1)).exp() * (g * a).unsqueeze(1)
    z.copy_(grad)


def topk_block(z: Tensor, x_ids: Tensor, p: Tensor, p_sum: Tensor, p_logp: Tensor,
               x_t: Optional[Tensor], g: Optional[Tensor], *, scale: float, temperature: float,
               hard_weight: float):
    """The composed row kernel on a block of raw logits ``z`` holding the whole vocabulary:
    ``(loss,)`` from ``x_ids`` ``(n, k)``, the raw logits at the teacher's ids (compute dtype),
    its probabilities ``p`` (0 at padding), ``p_sum = sum_i p_i``, ``p_logp = sum_i p_i log p_i``
    and the raw target logit ``x_t`` (``None`` without the hard term); with the upstream
    gradients ``g`` it also overwrites ``z`` with the dense part of ``g * dloss/dz``."""
    y = transform(z.to(p.dtype), scale, None)
    lse = row_logsumexp(y)
    lse_z = None
    if hard_weight > 0.0:
        lse_z = lse if scale == 1.0 else row_logsumexp(z.to(p.dtype))
    loss = topk_loss(shifted_cross(x_ids * scale, p, lse), None, p_sum, p_logp, lse_z, x_t,
                     temperature=temperature, hard_weight=hard_weight)
    if g is not None:
        dense_grad(z, y, lse, lse_z, p_sum, g, temperature=temperature, hard_weight=hard_weight)
    return (loss,)


def slice_sums(y: Tensor, m: Tensor, y_ids: Tensor, p: Tensor, *, temperature: float, hard: bool):
    """A vocabulary slice's partial sums of ``y = z / T`` (compute dtype), given the global row
    maxima ``m``: ``S = sum exp(y - m)``, ``cross`` over the ids it owns (``y_ids``, with
    ``p = 0`` at the others) and, with the hard term, ``S_z = sum exp(T (y - m))``."""
    d = y - m.unsqueeze(1)
    out = (d.exp().sum(1), shifted_cross(y_ids, p, m))
    return out + ((d * temperature).exp().sum(1),) if hard else out


def topk_grad_block(z: Tensor, lse: Tensor, lse_z: Optional[Tensor], p_sum: Tensor, g: Tensor, *,
                    scale: float, temperature: float, hard_weight: float):
    """:func:`dense_grad` over a vocabulary slice from the global ``lse``, ``lse_z``. Returns ``()``."""
    dense_grad(z, transform(z.to(lse.dtype), scale, None), lse, lse_z, p_sum, g, temperature=temperature,
               hard_weight=hard_weight)
    return ()


TOPK_KERNEL = RowKernel(topk_block, "top-k distillation")
TOPK_GRAD_KERNEL = RowKernel(topk_grad_block, "top-k distillation gradient")
