"""Fused linear cross entropy: the LM-head loss without the ``(tokens, vocab)`` logits.

``linear_cross_entropy`` drops ignored tokens, then hands the kept rows to the chunked engine
(:mod:`leanloss.linear._engine`) with :class:`CrossEntropyScorer`, the per-block math below.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _checks, _heuristics
from .._dtypes import autocast_matmul_operands, compute_dtype
from .._reduce import resolve_reduction
from ._engine import _BLOCK_BYTES, Scorer, default_chunk_size, fused_linear_loss
from ._ce_rows import ce_grad_coefficients, ce_row_loss
from ._rows import kept_rows, scatter_rows

__all__ = ["linear_cross_entropy", "CrossEntropyScorer"]

_FN = "linear_cross_entropy"
# A target probability below this is recomputed exactly from the row's logits (float32's
# normal range ends at 1.2e-38; below it ``log(p_t)`` would lose digits or be -inf).
_TINY_PROB = 1e-30


def _softmax_(z: Tensor) -> Tensor:
    """Row softmax written over ``z`` itself (one pass, each row stays in cache on CPU)."""
    if z.device.type == "cpu":
        return torch.ops.aten._softmax.out(z, 1, False, out=z)
    return z.copy_(torch.softmax(z, 1))


class CrossEntropyScorer(Scorer):
    """Per-block cross entropy with class weights, smoothing, z-loss, softcap and logit scale.

    For a block of raw logits ``x`` (rows ``r`` with targets ``t``), with ``s = logit_scale``,
    ``k = softcap``, ``w`` the class weights (ones when ``None``), ``e = label_smoothing``,
    ``C`` classes and ``W = sum_c w_c``::

        z      = k * tanh(s * x / k)          (z = s * x without softcap)
        lse    = logsumexp_c z_c,   q = z - lse,   p = softmax(z)
        loss_r = (1-e) w_t (-q_t) + (e/C) sum_c w_c (-q_c) + z_loss w_t lse^2
        dloss_r/dz_c = a_r p_c - (1-e) w_t [c = t] - (e/C) w_c,
                       a_r = (1-e) w_t + e W / C + 2 z_loss w_t lse
        dloss/dx = dloss/dz * s * (1 - tanh^2)           (dloss/dz * s without softcap)

    ``recompute(idx)`` returns the transformed logits of the given kept rows; it is used only
    for rows whose target probability underflows (a loss above ~69), to keep the loss exact.
    """

    def __init__(self, target: Tensor, class_weight: Optional[Tensor], label_smoothing: float,
                 z_loss: float, softcap: Optional[float], logit_scale: float,
                 hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                 lse_out: Optional[Tensor] = None) -> None:
        dtype = compute_dtype(hidden.dtype)
        self.target = target
        self.cw = None if class_weight is None else class_weight.to(dtype)
        self.w_target = None if self.cw is None else self.cw[target]
        self.w_total = float(weight.shape[0]) if self.cw is None else float(self.cw.sum())
        self.eps = float(label_smoothing)
        self.z_loss = float(z_loss)
        self.softcap = None if softcap is None else float(softcap)
        self.scale = float(logit_scale)
        self.num_classes = weight.shape[0]
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.lse_out = lse_out
        # Row-scaled gradients need a_r >= 0 with a_r == 0 only where the whole row gradient is
        # zero: true without z-loss for non-negative class weights.
        self.row_scaled = (self.softcap is None and self.z_loss == 0.0
                           and (self.cw is None or bool((self.cw >= 0).all())))

    # -- the transform z = softcap(scale * x) ------------------------------------------------
    def _transform_(self, z: Tensor, keep_tanh: bool) -> Optional[Tensor]:
        if self.softcap is not None:
            z.mul_(self.scale / self.softcap).tanh_()
            tanh = z.clone() if keep_tanh else None
            z.mul_(self.softcap)
            return tanh
        if self.scale != 1.0:
            z.mul_(self.scale)
        return None

    def recompute_lse(self, idx: Tensor) -> Tensor:
        h = self.hidden.index_select(0, idx)
        z = h @ self.weight.T if self.bias is None else torch.addmm(self.bias, h, self.weight.T)
        z = z.to(compute_dtype(h.dtype))
        self._transform_(z, keep_tanh=False)
        return torch.logsumexp(z, 1)

    def score(self, z: Tensor, rows: slice, grad_scale: Optional[Tensor]):
        t = self.target[rows]
        tanh = self._transform_(z, keep_tanh=grad_scale is not None)
        t_col = t.unsqueeze(1)
        z_t = z.gather(1, t_col).squeeze(1)
        eps = self.eps
        z_wsum = None
        if eps > 0.0:
            z_wsum = z.sum(1) if self.cw is None else z @ self.cw
        p = _softmax_(z)
        p_t = p.gather(1, t_col).squeeze(1)
        log_p_t = p_t.log()
        tiny = p_t < _TINY_PROB
        if bool(tiny.any()):
            local = tiny.nonzero().squeeze(1)
            lse_tiny = self.recompute_lse(local + rows.start)
            log_p_t[local] = z_t[local] - lse_tiny
        lse = z_t - log_p_t
        if self.lse_out is not None:
            self.lse_out[rows] = lse
        w_t = None if self.w_target is None else self.w_target[rows]
        stats = dict(eps=eps, w_total=self.w_total, num_classes=self.num_classes, z_loss=self.z_loss)
        loss = ce_row_loss(-log_p_t, lse, w_t, z_wsum, **stats)
        if grad_scale is None:
            return loss

        g = grad_scale.squeeze(1) * self.scale  # chain rule of the logit scale
        # a: softmax coefficient, c: subtracted at the target, smooth: times w_c everywhere
        a, c, smooth = ce_grad_coefficients(g, lse, w_t, **stats)
        if self.row_scaled:
            inv = torch.where(a != 0, a.reciprocal(), torch.zeros_like(a))
            p.scatter_add_(1, t_col, (-(c * inv)).unsqueeze(1))
            if eps > 0.0:
                self._sub_smooth(p, smooth * inv)
            return loss, a
        p.mul_(a.unsqueeze(1))
        p.scatter_add_(1, t_col, (-c).unsqueeze(1))
        if eps > 0.0:
            self._sub_smooth(p, smooth)
        if tanh is not None:
            p.mul_(tanh.square_().neg_().add_(1.0))
        return loss

    def _sub_smooth(self, p: Tensor, coef: Tensor) -> None:
        """``p[r, c] -= coef[r] * w_c``."""
        if self.cw is None:
            p.sub_(coef.unsqueeze(1))
        else:
            p.addcmul_(coef.unsqueeze(1), self.cw.unsqueeze(0), value=-1.0)


def _check(hidden, weight, target, bias, class_weight, label_smoothing, z_loss, softcap,
           logit_scale, ignore_index) -> None:
    vocab = _checks.check_linear_shapes(_FN, hidden, weight, bias, target)
    if not _checks.shapes_enabled():
        return
    if bias is not None and bias.dtype != weight.dtype:
        raise _checks.LeanlossTypeError(
            f"{_FN}: argument 'bias' must have the dtype of 'weight' ({weight.dtype}), got "
            f"{bias.dtype}")
    _checks.check_same_device(_FN, hidden=hidden, class_weight=class_weight)
    _checks.check_class_weight(_FN, "class_weight", class_weight, vocab)
    _checks.check_label_smoothing(_FN, label_smoothing)
    _checks.check_in_closed_interval(_FN, "z_loss", z_loss, 0.0, float("inf"))
    if softcap is not None:
        _checks.check_positive(_FN, "softcap", softcap)
    _checks.check_positive(_FN, "logit_scale", logit_scale)
    _checks.check_index_target_range(_FN, target, vocab, ignore_index)


@torch.compiler.disable
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    class_weight: Optional[Tensor] = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    num_items: Optional[Union[int, float, Tensor]] = None,
    return_lse: bool = False,
    chunk_size: Optional[int] = None,
):
    """Cross entropy of ``hidden @ weight.T + bias`` without materializing the logits.

    Same value and gradients as the dense reference::

        z = softcap(logit_scale * (hidden @ weight.T + bias)),   softcap(x) = c * tanh(x / c)
        torch.nn.functional.cross_entropy(z, target, weight=class_weight,
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
        + z_loss * (mean of lse**2 over kept tokens)

    Exactly, per kept token ``r`` (``target_r != ignore_index``) with target ``t``,
    ``lse_r = logsumexp_c z_rc``, ``q = z - lse``, ``w`` = ``class_weight`` (ones when
    ``None``), ``e = label_smoothing`` and ``C = V``::

        loss_r = (1-e) * w_t * (-q_t) + e * sum_c w_c * (-q_c) / C + z_loss * w_t * lse_r**2

    ``'sum'`` is ``sum_r loss_r``; ``'mean'`` is that sum divided by ``num_items`` when given,
    else by ``sum_r w_t`` (the number of kept tokens without class weights) -- torch's
    convention, so smoothing and z-loss are weighted and normalized like the CE term; all
    ignored gives ``nan`` (``'mean'``) or ``0`` (``'sum'``) like torch. ``'none'`` returns
    ``loss_r`` with the shape of ``target`` and ``0`` at ignored tokens.

    Args:
        hidden: ``(..., D)`` floating; weight: ``(V, D)``; target: ``(...)`` int64 class indices;
            bias: ``(V,)`` or ``None``.
        ignore_index: tokens with this target are dropped before any matmul.
        label_smoothing, z_loss, softcap, logit_scale: Python numbers (a one-element tensor is
            read as its value; no gradient flows to it).
        num_items: divisor of ``'mean'`` (e.g. the global token count with gradient
            accumulation, as transformers' ``num_items_in_batch``).
        return_lse: also return ``lse_r`` (shape of ``target``, float32/float64, ``0`` at
            ignored tokens, not differentiable).
        chunk_size: rows per block (default: at least 512 rows, about 96 MiB of float32
            logits; see :func:`leanloss.linear.default_chunk_size`).

    Dtypes: matmuls run in the input dtype; softmax, log-sum-exp and gradient accumulation in
    float32 (float64 for float64 inputs); the loss is float32 for bf16/fp16 inputs.
    Gradients flow to ``hidden``, ``weight`` and ``bias`` (first order). Under
    ``torch.compile`` this function is a graph break (``torch.compiler.disable``).
    """
    hidden, weight, bias = autocast_matmul_operands(hidden, weight, bias)
    reduction = resolve_reduction(reduction)
    _check(hidden, weight, target, bias, class_weight, label_smoothing, z_loss, softcap,
           logit_scale, ignore_index)
    lead_shape = target.shape
    d = hidden.shape[-1]
    dtype = compute_dtype(hidden.dtype)
    h_all = hidden.reshape(-1, d)
    t_all = target.reshape(-1).long()
    n = t_all.shape[0]
    idx = kept_rows(t_all, ignore_index)
    h, t = (h_all, t_all) if idx is None else (h_all.index_select(0, idx), t_all.index_select(0, idx))
    lse_out = torch.zeros(t.shape[0], dtype=dtype, device=hidden.device) if return_lse else None
    scorer = CrossEntropyScorer(t, class_weight, label_smoothing, z_loss, softcap, logit_scale,
                                h.detach(), weight.detach(),
                                None if bias is None else bias.detach(), lse_out)
    if reduction == "mean" and num_items is None:
        divisor = t.shape[0] if scorer.w_target is None else scorer.w_target.sum()
    else:
        divisor = num_items
    if chunk_size is None and softcap is not None:
        # The softcap's chain rule keeps tanh beside the block: half-size blocks, same memory.
        chunk_size = default_chunk_size(t.shape[0], weight.shape[0], block_bytes=_BLOCK_BYTES // 2)
    loss = fused_linear_loss(h, weight, bias, scorer, reduction=reduction, divisor=divisor,
                             chunk_size=chunk_size)
    if reduction == "none":
        loss = scatter_rows(loss, idx, n).reshape(lead_shape)
    loss = _heuristics.finite_or_warn("linear_cross_entropy", loss, hidden=hidden, weight=weight, bias=bias)
    if not return_lse:
        return loss
    return loss, scatter_rows(lse_out, idx, n).reshape(lead_shape)
