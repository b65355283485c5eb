"""Fused linear cross entropy: the LM-head loss without the ``(tokens, vocab)`` logits.

``linear_cross_entropy`` drops ignored tokens, then hands the kept rows to the chunked engine
(:mod:`leanloss._fused.engine`) with :class:`CrossEntropyScorer`, whose per-block math is the
row kernel :func:`ce_block` (compiled or eager, :mod:`leanloss._fused.kernels`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _checks, _docs, _heuristics
from .._compile import graph_break
from .._dtypes import autocast_matmul_operands, compute_dtype
from .._reduce import resolve_reduction
from .._fused.ce_rows import ce_grad_coefficients, ce_row_loss
from .._fused.engine import PointGradient, ScoreResult, fused_linear_loss, set_at_cols
from .._fused.kernels import RowKernel, row_logsumexp
from .._fused.rows import scatter_rows, select_kept
from ..parallel._dtensor import route_linear_cross_entropy, routes_dtensor

__all__ = ["linear_cross_entropy", "CrossEntropyScorer", "ce_block"]

_FN = "linear_cross_entropy"


def _transform(x: Tensor, scale: float, softcap: Optional[float]) -> Tensor:
    """``softcap * tanh(scale * x / softcap)``, or ``scale * x`` without softcap."""
    if softcap is not None:
        return (x * (scale / softcap)).tanh() * softcap
    return x * scale if scale != 1.0 else x


def ce_block(z: Tensor, x_t: Tensor, w_t: Optional[Tensor], g: Optional[Tensor], *,
             class_weight: Optional[Tensor], scale: float, softcap: Optional[float], smoothing: float,
             num_classes: int, w_total: float, z_loss: float):
    """Cross entropy of one block of raw logits ``z`` (rows: tokens), row-wise.

    ``x_t``: each row's raw target logit (compute dtype); ``w_t``: its class weight (``None``:
    ones); ``g``: the per-row gradient scale, or ``None`` for the loss alone. With
    ``y = softcap(scale * z)`` (:func:`_transform`) the row loss and its gradient are those of
    :mod:`leanloss._fused.ce_rows`. Returns ``(loss, lse)``; with ``g``, also overwrites ``z``
    with the dense part of ``g * dloss/dz`` (the softmax and smoothing terms, chain rule of
    the transform included) and returns ``(loss, lse, coef, dense_t)``: the point term at the
    target (``-b`` times the chain rule) and the dense part's value there.
    """
    y = _transform(z.to(x_t.dtype), scale, softcap)
    lse = row_logsumexp(y)
    y_t = _transform(x_t, scale, softcap)
    smooth_sum = None
    if smoothing > 0.0:
        smooth_sum = y.sum(1) if class_weight is None else (y * class_weight).sum(1)
    stats = dict(smoothing=smoothing, w_total=w_total, num_classes=num_classes, z_loss=z_loss)
    loss = ce_row_loss(lse - y_t, lse, w_t, smooth_sum, **stats)
    if g is None:
        return loss, lse
    a, b, s = ce_grad_coefficients(g * scale, lse, w_t, **stats)
    grad = (y - lse.unsqueeze(1)).exp() * a.unsqueeze(1)
    dense_t = (y_t - lse).exp() * a
    if smoothing > 0.0:
        grad = grad - s.unsqueeze(1) * (1.0 if class_weight is None else class_weight)
        dense_t = dense_t - s * (1.0 if w_t is None else w_t)
    coef = -b
    if softcap is not None:
        grad = grad * (1.0 - (y * (1.0 / softcap)).square())
        chain_t = 1.0 - (y_t * (1.0 / softcap)).square()
        dense_t = dense_t * chain_t
        coef = coef * chain_t
    z.copy_(grad)
    return loss, lse, coef, dense_t


_CE_KERNEL = RowKernel(ce_block, "cross-entropy")


class CrossEntropyScorer:
    """Per-block cross entropy (class weights, smoothing, z-loss, softcap, logit scale).

    Scores blocks in the matmul dtype (``low_precision_blocks``): the row kernel
    :func:`ce_block` reads the raw logits, accumulates in the compute dtype and writes the
    gradient over the block; the target's point term is set by a scatter and reported to the
    engine (:class:`~leanloss._fused.engine.PointGradient`).
    """

    low_precision_blocks = True

    def __init__(self, target: Tensor, class_weight: Optional[Tensor], label_smoothing: float,
                 z_loss: float, softcap: Optional[float], logit_scale: float, num_classes: int,
                 dtype: torch.dtype, lse_out: Optional[Tensor] = None) -> None:
        self.target = target
        self.dtype = dtype
        self.cw = None if class_weight is None else class_weight.to(dtype)
        self.w_target = None if self.cw is None else self.cw[target]
        self.options = dict(
            class_weight=self.cw, scale=float(logit_scale),
            softcap=None if softcap is None else float(softcap), smoothing=float(label_smoothing),
            num_classes=num_classes,
            w_total=float(num_classes) if self.cw is None else float(self.cw.sum()),
            z_loss=float(z_loss))
        self.lse_out = lse_out

    def score(self, z: Tensor, rows: slice, grad_scale: Optional[Tensor]) -> ScoreResult:
        t_col = self.target[rows].unsqueeze(1)
        x_t = z.gather(1, t_col).squeeze(1).to(self.dtype)
        w_t = None if self.w_target is None else self.w_target[rows]
        g = None if grad_scale is None else grad_scale.reshape(-1)
        out = _CE_KERNEL(z, x_t, w_t, g, **self.options)
        if self.lse_out is not None:
            self.lse_out[rows] = out[1]
        if g is None:
            return ScoreResult(out[0])
        loss, _, coef, dense_t = out
        set_at_cols(z, t_col.squeeze(1), dense_t + coef)
        return ScoreResult(loss, None, PointGradient(t_col.squeeze(1), coef, dense_t))


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


@_docs.fill
@graph_break
@routes_dtensor(route_linear_cross_entropy)  # a vocab-sharded DTensor weight: vocab-parallel path
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

    Exactly, with ``C = V``:

    @doc ce_row_loss

    @doc ce_reduction

    Args:
        hidden: ``(..., D)`` floating; weight: ``(V, D)``; target: ``(...)`` int64 class indices;
            bias: ``(V,)`` or ``None``.
        @doc ignore_index
        @doc label_smoothing
        @doc z_loss
        softcap, logit_scale: the transform above; like label_smoothing and z_loss, Python
            numbers (a one-element tensor is read as its value; no gradient flows to it).
        @doc num_items
        return_lse: also return ``lse_r`` (shape of ``target``, float32/float64, ``0`` at
            ignored tokens, not differentiable).
        chunk_size: rows per block (default: the engine's plan,
            :func:`leanloss._fused.engine.plan_chunk`: ~96 MiB blocks of at least 512 rows; in
            bf16/fp16 with a weight gradient one block over all rows when ``N <= 2 D``).

    Dtypes: matmuls run in the input dtype; softmax, log-sum-exp and gradient accumulation in
    float32 (float64 for float64 inputs); the loss is float32 for bf16/fp16 inputs. The
    per-block math is a compiled kernel on CPU/CUDA (its first call compiles it, once per
    process and option set; see :mod:`leanloss._fused.kernels`), or the same function run eagerly.
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
    idx, t, h = select_kept(t_all, ignore_index, h_all)
    lse_out = torch.zeros(t.shape[0], dtype=dtype, device=hidden.device) if return_lse else None
    scorer = CrossEntropyScorer(t, class_weight, label_smoothing, z_loss, softcap, logit_scale,
                                weight.shape[0], dtype, lse_out)
    if reduction == "mean" and num_items is None:
        divisor = t.shape[0] if scorer.w_target is None else scorer.w_target.sum()
    else:
        divisor = num_items
    loss = fused_linear_loss(h, weight, bias, scorer, reduction=reduction, divisor=divisor,
                             chunk_size=chunk_size)
    if reduction == "none":
        loss = scatter_rows(loss, idx, n).reshape(lead_shape)
    loss = _heuristics.finite_or_warn("linear_cross_entropy", loss, hidden=hidden, weight=weight, bias=bias)
    if not return_lse:
        return loss
    return loss, scatter_rows(lse_out, idx, n).reshape(lead_shape)
