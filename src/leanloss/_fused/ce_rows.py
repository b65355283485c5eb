"""The cross entropy of one row (:data:`ROW_LOSS`, in the public docstrings), stated once for the
fused loss on one device (:func:`ce_block`: statistics, loss and gradient in one row kernel),
the vocab-parallel ones (:func:`ce_partials_block` per slice, the all-reduce, :func:`ce_finish`,
:func:`ce_grad_block`) and the dense :func:`leanloss.cross_entropy` (:func:`ce_row_loss`,
:func:`ce_grad_coefficients`). The block functions take the raw logits ``z`` and the transform
``y = softcap(scale * z)`` (:func:`transform`); ``class_weight`` holds the block's classes'
weights, ``w_total`` and ``num_classes`` are over the whole vocabulary.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import native
from .kernels import RowKernel, row_logsumexp

__all__ = ["ROW_LOSS", "ce_row_loss", "ce_grad_coefficients", "transform", "softcap_slope",
           "ce_block", "ce_partials_block", "ce_finish", "ce_grad_block", "CE_KERNEL", "CE_PARTIALS_KERNEL",
           "CE_GRAD_KERNEL"]

ROW_LOSS = """\
Per kept row ``r`` (``target_r != ignore_index``) with target ``t``, logits ``z`` over ``C``
classes, ``lse = logsumexp_c z_c``, ``q = z - lse``, ``p = softmax(z)``, class weights ``w``
(ones when ``class_weight`` is ``None``), ``W = sum_c w_c``, ``S = sum_c w_c z_c`` and label
smoothing ``e``::

    loss_r = (1-e) w_t (-q_t) + (e/C) sum_c w_c (-q_c) + z_loss w_t lse^2
           = (1-e) w_t (lse - z_t) + (e/C) (W lse - S) + z_loss w_t lse^2
    dloss_r/dz_c = a p_c - b [c == t] - s w_c,
    a = (1-e) w_t + e W / C + 2 z_loss w_t lse,   b = (1-e) w_t,   s = e / C

(with one class, ``C = 1``, the cross-entropy terms of the gradient cancel exactly:
``a = 2 z_loss w_t lse``, ``b = s = 0``)."""


def ce_row_loss(nll: Tensor, lse: Tensor, w_t: Optional[Tensor], smooth_sum: Optional[Tensor], *,
                smoothing: float, w_total: Union[float, Tensor], num_classes: int, z_loss: float) -> Tensor:
    """Per-row loss; ``w_t`` ``None`` means unit weights; ``smooth_sum`` (``S``) is read only
    when ``smoothing > 0``."""
    loss = nll if w_t is None else nll * w_t
    if smoothing != 0.0:
        loss = loss * (1.0 - smoothing)
    if smoothing > 0.0:
        assert smooth_sum is not None, "ce_row_loss: label smoothing needs smooth_sum"
        loss = loss + (smoothing / num_classes) * (w_total * lse - smooth_sum)
    if z_loss != 0.0:
        zl = lse.square() * z_loss
        loss = loss + (zl if w_t is None else zl * w_t)
    return loss


def ce_grad_coefficients(g: Tensor, lse: Tensor, w_t: Optional[Tensor], *, smoothing: float,
                         w_total: Union[float, Tensor], num_classes: int,
                         z_loss: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(a, b, s)`` of the gradient above, each multiplied by the upstream gradient ``g``.
    With one class the softmax is 1 and the cross-entropy terms cancel: only the z-loss's
    ``a`` remains (written so, its gradient is exactly 0 without z-loss)."""
    wt = 1.0 if w_t is None else w_t
    if num_classes == 1:
        zero = g * 0.0
        return (2.0 * z_loss) * lse * wt * g, zero, zero
    a = ((1.0 - smoothing) * wt + smoothing * w_total / num_classes) * g
    if z_loss != 0.0:
        a = a + (2.0 * z_loss) * lse * wt * g
    b = (1.0 - smoothing) * wt * g
    s = (smoothing / num_classes) * g
    return a, b, s


def transform(x: Tensor, scale: float, softcap: Optional[float]) -> Tensor:
    """``softcap * tanh(scale * x / softcap)``, or ``scale * x`` without softcap."""
    if softcap is not None:
        return (x * (scale / softcap)).tanh() * softcap
    return x * scale if scale != 1.0 else x


def softcap_slope(y: Tensor, softcap: float) -> Tensor:
    """``1 - (y / softcap)^2``: the derivative of ``softcap * tanh(u / softcap)`` in ``u``,
    written from its value ``y`` (so :func:`transform`'s derivative is ``scale`` times it)."""
    return 1.0 - (y * (1.0 / softcap)).square()


def _smooth_sum(y: Tensor, class_weight: Optional[Tensor]) -> Tensor:
    """``S = sum_c w_c y_c`` of each row (over the block's classes)."""
    return y.sum(1) if class_weight is None else (y * class_weight).sum(1)


def _target_terms(y_t: Tensor, lse: Tensor, w_t: Optional[Tensor], a: Tensor, b: Tensor, s: Tensor, *,
                  smoothing: float, softcap: Optional[float]) -> Tuple[Tensor, Tensor]:
    """The point term at each row's target (``-b`` times the chain rule) and the dense part's
    value there, from the coefficients ``(a, b, s)`` (the upstream gradient and ``scale`` in them)."""
    dense_t = (y_t - lse).exp() * a
    if smoothing > 0.0:
        dense_t = dense_t - s * (1.0 if w_t is None else w_t)
    coef = -b
    if softcap is not None:
        chain_t = softcap_slope(y_t, softcap)
        dense_t = dense_t * chain_t
        coef = coef * chain_t
    return coef, dense_t


def _grad_(z: Tensor, y: Tensor, y_t: Tensor, lse: Tensor, w_t: Optional[Tensor], g: Tensor, *,
           class_weight: Optional[Tensor], scale: float, softcap: Optional[float], smoothing: float,
           num_classes: int, w_total: Union[float, Tensor], z_loss: float) -> Tuple[Tensor, Tensor]:
    """Overwrite ``z`` with the dense part of ``g * dloss/dz`` (``a p - s w``, chain rule of
    the transform included); returns :func:`_target_terms`."""
    a, b, s = ce_grad_coefficients(g * scale, lse, w_t, smoothing=smoothing, w_total=w_total,
                                   num_classes=num_classes, z_loss=z_loss)
    grad = (y - lse.unsqueeze(1)).exp() * a.unsqueeze(1)
    if smoothing > 0.0:
        grad = grad - s.unsqueeze(1) * (1.0 if class_weight is None else class_weight)
    if softcap is not None:
        grad = grad * softcap_slope(y, softcap)
    z.copy_(grad)
    return _target_terms(y_t, lse, w_t, a, b, s, smoothing=smoothing, softcap=softcap)


def ce_block(z: Tensor, x_t: Tensor, w_t: Optional[Tensor], g: Optional[Tensor], *,
             class_weight: Optional[Tensor], scale: float, softcap: Optional[float], smoothing: float,
             num_classes: int, w_total: Union[float, Tensor], z_loss: float):
    """Cross entropy of a block of raw logits ``z`` over the whole vocabulary, composed:
    ``(loss, lse)`` from each row's raw target logit ``x_t`` (compute dtype) and class weight
    ``w_t`` (``None``: ones); with the upstream gradients ``g`` it also overwrites ``z`` with the
    gradient's dense part and returns ``(loss, lse, coef, dense_t)`` (see :func:`_grad_`)."""
    y = transform(z.to(x_t.dtype), scale, softcap)
    lse = row_logsumexp(y)
    y_t = transform(x_t, scale, softcap)
    smooth_sum = _smooth_sum(y, class_weight) if smoothing > 0.0 else None
    loss = ce_row_loss(lse - y_t, lse, w_t, smooth_sum, smoothing=smoothing, w_total=w_total,
                       num_classes=num_classes, z_loss=z_loss)
    if g is None:
        return loss, lse
    coef, dense_t = _grad_(z, y, y_t, lse, w_t, g, class_weight=class_weight, scale=scale,
                           softcap=softcap, smoothing=smoothing, num_classes=num_classes,
                           w_total=w_total, z_loss=z_loss)
    return loss, lse, coef, dense_t


def _ce_natively(z: Tensor, x_t: Tensor, w_t: Optional[Tensor], g: Optional[Tensor], *,
                 class_weight: Optional[Tensor], scale: float, softcap: Optional[float], smoothing: float,
                 num_classes: int, w_total: Union[float, Tensor], z_loss: float):
    """:func:`ce_block` with the row sums and the gradient's dense part from the native kernels
    (:func:`leanloss._fused.native.logp_sums`, :func:`~leanloss._fused.native.logp_grad`:
    ``a p - s`` is their ``A p + K``); without class weights, in float32, over more than one
    class; ``None`` where that does not apply."""
    if class_weight is not None or x_t.dtype != torch.float32 or num_classes == 1:
        return None
    got = native.logp_sums(z, scale, None, entropy=False, log_sum_sq=False, mean=smoothing > 0.0, softcap=softcap)
    if got is None:
        return None
    m, sums, _ = got
    lse = m + sums[0].log()
    y_t = transform(x_t, scale, softcap)
    loss = ce_row_loss(lse - y_t, lse, w_t, sums[1] if smoothing > 0.0 else None, smoothing=smoothing,
                       w_total=w_total, num_classes=num_classes, z_loss=z_loss)
    if g is None:
        return loss, lse
    a, b, s = ce_grad_coefficients(g * scale, lse, w_t, smoothing=smoothing, w_total=w_total,
                                   num_classes=num_classes, z_loss=z_loss)
    if not native.logp_grad(z, scale, lse, a, None, None, -s if smoothing > 0.0 else None, out_scale=1.0,
                            softcap=softcap):
        return None
    return (loss, lse, *_target_terms(y_t, lse, w_t, a, b, s, smoothing=smoothing, softcap=softcap))


def ce_partials_block(y: Tensor, m: Tensor, *, class_weight: Optional[Tensor], smoothing: float):
    """The partial sums of the transformed logits ``y`` over one vocabulary slice, to be summed
    over the slices: ``sum_c exp(y_c - m)`` (``m``: the row maximum over every slice) and,
    with smoothing, ``S``. (The target's ``y_t`` is the third partial, from its owner.)"""
    sum_exp = (y.to(m.dtype) - m.unsqueeze(1)).exp().sum(1)
    if smoothing > 0.0:
        return sum_exp, _smooth_sum(y.to(m.dtype), class_weight)
    return (sum_exp,)


def ce_finish(m: Tensor, sum_exp: Tensor, y_t: Tensor, smooth_sum: Optional[Tensor],
              w_t: Optional[Tensor], **stats) -> Tuple[Tensor, Tensor]:
    """``(loss, lse)`` per row from the shift ``m`` and the summed partials."""
    lse = m + sum_exp.log()
    return ce_row_loss(lse - y_t, lse, w_t, smooth_sum, **stats), lse


def ce_grad_block(z: Tensor, x_t: Tensor, lse: Tensor, w_t: Optional[Tensor], g: Tensor, **options):
    """The gradient of :func:`ce_block` from a known ``lse`` (summed over the slices):
    overwrites ``z`` with its dense part; returns ``(coef, dense_t)``."""
    y = transform(z.to(lse.dtype), options["scale"], options["softcap"])
    y_t = transform(x_t, options["scale"], options["softcap"])
    return _grad_(z, y, y_t, lse, w_t, g, **options)


CE_KERNEL = RowKernel(ce_block, "cross-entropy", native=_ce_natively)
CE_PARTIALS_KERNEL = RowKernel(ce_partials_block, "cross-entropy statistics")
CE_GRAD_KERNEL = RowKernel(ce_grad_block, "cross-entropy gradient")
