"""The cross entropy of one row from its statistics, and the coefficients of its gradient.

Shared by the fused cross entropy's scorer (statistics from a whole-vocabulary block) and the
vocab-parallel scorer (statistics all-reduced over the ranks' slices), so the formula lives once.
With ``w`` the class weights (ones when ``None``), ``W = sum_c w_c``, ``e`` the label smoothing,
``C`` classes, ``lse = logsumexp_c z_c``, ``nll = lse - z_t`` and ``S = sum_c w_c z_c``::

    loss  = (1-e) w_t nll + (e/C) (W lse - S) + z_loss w_t lse^2
    dloss/dz_c = a p_c - b [c == t] - s w_c,   p = softmax(z)
    a = (1-e) w_t + e W / C + 2 z_loss w_t lse,   b = (1-e) w_t,   s = e / C
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor

__all__ = ["ce_row_loss", "ce_grad_coefficients"]


def ce_row_loss(nll: Tensor, lse: Tensor, w_t: Optional[Tensor], smooth_sum: Optional[Tensor], *,
                eps: float, w_total: Union[float, Tensor], num_classes: int, z_loss: float) -> Tensor:
    """Per-row loss; ``w_t`` ``None`` means unit weights; ``smooth_sum`` (``S``) is read only
    when ``eps > 0``."""
    loss = nll if w_t is None else nll * w_t
    if eps != 0.0:
        loss = loss * (1.0 - eps)
    if eps > 0.0:
        loss = loss + (eps / num_classes) * (w_total * lse - smooth_sum)
    if z_loss != 0.0:
        zl = lse.square() * z_loss
        loss = loss + (zl if w_t is None else zl * w_t)
    return loss


def ce_grad_coefficients(g: Tensor, lse: Tensor, w_t: Optional[Tensor], *, eps: float,
                         w_total: Union[float, Tensor], num_classes: int,
                         z_loss: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(a, b, s)`` of the gradient above, each multiplied by the upstream gradient ``g``."""
    wt = 1.0 if w_t is None else w_t
    a = ((1.0 - eps) * wt + eps * w_total / num_classes) * g
    if z_loss != 0.0:
        a = a + (2.0 * z_loss) * lse * wt * g
    b = (1.0 - eps) * wt * g
    s = (eps / num_classes) * g
    return a, b, s
