"""Fused linear cross entropy: the LM-head loss without the ``(tokens, vocab)`` logits, on one
device and vocab-parallel (how the engine works: ``docs/internals.md``)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _checks, _docs
from .._compile import graph_break
from .._dtypes import compute_dtype
from .._reduce import resolve_reduction
from .._fused.ce_rows import CE_GRAD_KERNEL, CE_KERNEL, CE_PARTIALS_KERNEL, ce_finish, transform
from .._fused.engine import PointGradient, ScoreResult, at_cols
from .._fused.reduce_hook import LocalVocab, VocabSlice, global_row_max, owned_only
from .._dtensor import routes_dtensor
from ._pipeline import Head, run_fused

__all__ = ["linear_cross_entropy", "CrossEntropyScorer", "run_ce", "ce_divisor"]

_FN = "linear_cross_entropy"


class CrossEntropyScorer:
    """Per-block cross entropy (the row math of :mod:`leanloss._fused.ce_rows`) of the rows whose
    ``(M,)`` global classes are ``target``, over the reduce hook ``vocab``: one composed row
    kernel on one device; over a vocab shard, all-reduced partials, with ``(loss, lse)`` saved
    so that the ``'none'`` recompute communicates nothing. ``lse_out``: an ``(M,)`` buffer
    that receives each row's ``lse``.
    """

    outputs = 1

    def __init__(self, target: Tensor, class_weight: Optional[Tensor], label_smoothing: float,
                 z_loss: float, softcap: Optional[float], logit_scale: float, dtype: torch.dtype,
                 vocab: VocabSlice, lse_out: Optional[Tensor] = None) -> None:
        self.vocab = vocab
        self.local_target, self.owned = vocab.local_target(target)
        self.dtype = dtype
        self.low_precision_blocks = vocab.identity
        cw = None if class_weight is None else class_weight.to(dtype)
        self.w_target = None if cw is None else cw[target]
        self.stats = dict(smoothing=float(label_smoothing), num_classes=vocab.vocab,
                          w_total=float(vocab.vocab) if cw is None else float(cw.sum()),
                          z_loss=float(z_loss))
        self.options = dict(
            self.stats, scale=float(logit_scale), softcap=None if softcap is None else float(softcap),
            class_weight=cw if cw is None or vocab.size == cw.shape[0] else cw[vocab.start: vocab.start + vocab.size])
        self.lse_out = lse_out

    def score(self, z: Tensor, rows: slice, saved: Optional[Tensor],
              upstream: Optional[Tensor]) -> ScoreResult:
        t = self.local_target[rows]
        w_t = None if self.w_target is None else self.w_target[rows]
        g = None if upstream is None else upstream.reshape(-1)
        point = keep = None
        if self.vocab.identity:
            out = CE_KERNEL(z, at_cols(z, t, self.dtype), w_t, g, **self.options)
            loss, lse = out[0], out[1]
            if g is not None:
                point = PointGradient(t, out[2], out[3])
        else:
            keep = torch.stack(self._statistics(z, t, rows, w_t), 1) if saved is None else saved
            loss, lse = keep[:, 0].contiguous(), keep[:, 1].contiguous()
            if g is not None and self.vocab.size > 0:
                coef, _ = CE_GRAD_KERNEL(z, at_cols(z, t, self.dtype), lse, w_t, g, **self.options)
                point = PointGradient(t, owned_only(coef, self.owned, rows), at_cols(z, t, self.dtype))
        if self.lse_out is not None:
            self.lse_out[rows] = lse
        return ScoreResult(loss, point, keep)

    def _statistics(self, z: Tensor, t: Tensor, rows: slice, w_t: Optional[Tensor]):
        """``(loss, lse)`` of the block's rows over every slice of the vocabulary."""
        smoothing = self.stats["smoothing"]
        y = transform(z.to(self.dtype), self.options["scale"], self.options["softcap"])
        m = global_row_max(y, self.vocab)
        sums = y.new_zeros(y.shape[0], 3 if smoothing > 0.0 else 2)
        if self.vocab.size > 0:
            parts = CE_PARTIALS_KERNEL(y, m, class_weight=self.options["class_weight"],
                                       smoothing=smoothing)
            sums[:, 0] = parts[0]
            sums[:, 1] = owned_only(at_cols(y, t, self.dtype), self.owned, rows)
            if smoothing > 0.0:
                sums[:, 2] = parts[1]
        self.vocab.sum_(sums)
        return ce_finish(m, sums[:, 0], sums[:, 1], sums[:, 2] if smoothing > 0.0 else None, w_t,
                         **self.stats)


def _local_vocab(head: Head, target, class_weight, label_smoothing, z_loss, softcap, logit_scale,
                 ignore_index) -> LocalVocab:
    """:func:`linear_cross_entropy`'s checks of the autocast head; the whole vocabulary."""
    vocab = _checks.check_linear_shapes(_FN, *head, target)
    if _checks.shapes_enabled():
        if head.bias is not None:
            _checks.check_same_dtype(_FN, "bias", head.bias, "weight", head.weight)
        _checks.check_same_device(_FN, hidden=head.hidden, class_weight=class_weight)
        _checks.check_class_weight(_FN, "class_weight", class_weight, vocab)
        _checks.check_label_smoothing(_FN, label_smoothing)
        _checks.check_in_closed_interval(_FN, "z_loss", z_loss, 0.0, float("inf"))
        if softcap is not None:
            _checks.check_positive(_FN, "softcap", softcap)
        _checks.check_positive(_FN, "logit_scale", logit_scale)
        _checks.check_index_target_range(_FN, target, vocab, ignore_index)
    return LocalVocab(head.weight.shape[0])


@_docs.fill
@graph_break
@routes_dtensor  # a vocab-sharded DTensor weight: vocab-parallel path
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
        @doc head
        @doc ignore_index
        @doc label_smoothing
        @doc z_loss
        softcap, logit_scale: the transform above; like label_smoothing and z_loss, Python
            numbers (a one-element tensor is read as its value; no gradient flows to it).
        @doc num_items
        return_lse: also return ``lse_r`` (shape of ``target``, float32/float64, ``0`` at
            ignored tokens, not differentiable).
        @doc chunk_size

    @doc fused_dtypes
    """
    options = dict(class_weight=class_weight, label_smoothing=label_smoothing, z_loss=z_loss,
                   softcap=softcap, logit_scale=logit_scale)
    return run_ce(_FN, Head(hidden, weight, bias), target,
                  lambda head: _local_vocab(head, target, ignore_index=ignore_index, **options),
                  reduction=resolve_reduction(reduction), num_items=num_items, ignore_index=ignore_index,
                  chunk_size=chunk_size, return_lse=return_lse, **options)


def run_ce(fn: str, head: Head, target: Tensor, vocab_of: Callable[[Head], VocabSlice], *, class_weight,
           label_smoothing, z_loss, softcap, logit_scale, reduction: str, num_items, ignore_index: int,
           chunk_size: Optional[int], return_lse: bool = False,
           names: Sequence[str] = ("hidden", "weight", "bias")):
    """The linear cross entropies on the fused pipeline (:func:`~leanloss.linear._pipeline.run_fused`)
    with :class:`CrossEntropyScorer` over the reduce hook ``vocab_of(head)``, which also checks
    the autocast head."""
    lse = []

    def setup(head: Head, _):
        vocab, dtype = vocab_of(head), compute_dtype(head.hidden.dtype)

        def make_scorer(t):
            lse.append(torch.zeros(t.shape[0], dtype=dtype, device=t.device) if return_lse else None)
            return CrossEntropyScorer(t, class_weight, label_smoothing, z_loss, softcap, logit_scale,
                                      dtype, vocab, lse[0])

        return vocab, make_scorer, ce_divisor if reduction == "mean" and num_items is None else num_items

    loss, batch = run_fused(fn, head, target, setup, ignore_index=ignore_index, reduction=reduction,
                            chunk_size=chunk_size, names=names)
    return (loss, batch.scatter(lse[0])) if return_lse else loss


def ce_divisor(scorer: CrossEntropyScorer):
    """``'mean'``'s divisor: the summed class weights of the kept rows (their count without
    weights)."""
    return scorer.local_target.shape[0] if scorer.w_target is None else scorer.w_target.sum()
