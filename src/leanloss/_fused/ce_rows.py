"""The cross entropy of one row from its statistics, and the coefficients of its gradient.

This is the one statement of the row loss of the fused and vocab-parallel cross entropies
(the dense :func:`leanloss.cross_entropy` is its special case ``z_loss = 0``); their
docstrings include :data:`ROW_LOSS` and their scorers call :func:`ce_row_loss` and
:func:`ce_grad_coefficients`. The gradient's three coefficients are ``(a, b, s)`` everywhere.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor

__all__ = ["ROW_LOSS", "ce_row_loss", "ce_grad_coefficients"]

ROW_LOSS = """\
Per kept row ``r`` (``target_r != ignore_index``) with target ``t``, logits ``z`` over ``C``
classes, ``lse = logsumexp_c z_c``, ``q = z - lse``, ``p = softmax(z)``, class weights ``w``
(ones when ``class_weight`` is ``None``), ``W = sum_c w_c``, ``S = sum_c w_c z_c`` and label
smoothing ``e``::

    loss_r = (1-e) w_t (-q_t) + (e/C) sum_c w_c (-q_c) + z_loss w_t lse^2
           = (1-e) w_t (lse - z_t) + (e/C) (W lse - S) + z_loss w_t lse^2
    dloss_r/dz_c = a p_c - b [c == t] - s w_c,
    a = (1-e) w_t + e W / C + 2 z_loss w_t lse,   b = (1-e) w_t,   s = e / C"""


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
    """``(a, b, s)`` of the gradient above, each multiplied by the upstream gradient ``g``."""
    wt = 1.0 if w_t is None else w_t
    a = ((1.0 - smoothing) * wt + smoothing * w_total / num_classes) * g
    if z_loss != 0.0:
        a = a + (2.0 * z_loss) * lse * wt * g
    b = (1.0 - smoothing) * wt * g
    s = (smoothing / num_classes) * g
    return a, b, s
