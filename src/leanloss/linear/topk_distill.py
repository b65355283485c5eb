r"""Top-k distillation of a linear LM head: :func:`leanloss.topk_distill_loss` without the logits,
on one device and vocab-parallel. The teacher is stored data, so the only ``(tokens, vocab)``
array is the student's; the row math is :mod:`leanloss._fused.topk_rows`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .._compile import graph_break
from .. import _checks, _docs, _heuristics
from .._dtensor import routes_dtensor
from .._dtypes import compute_dtype
from .._fused.ce_rows import transform
from .._fused.engine import PointGradient, ScoreResult, at_cols
from .._fused.reduce_hook import LocalVocab, VocabSlice, global_row_max, owned_only
from .._fused.topk_rows import TOPK_GRAD_KERNEL, TOPK_KERNEL, slice_sums, topk_loss
from .._reduce import resolve_reduction
from ..losses.distill import topk_teacher
from ._pipeline import Head, run_fused

__all__ = ["linear_topk_distill_loss", "TopKDistillScorer", "run_topk"]


class TopKDistillScorer:
    """Per-block top-k distillation over the reduce hook ``vocab``: ``ids`` (global; ``< 0``:
    padding), the teacher's tempered distribution ``p`` ``(M, k)`` (:func:`topk_teacher`) and
    ``target`` ``(M,)`` (or ``None``) are aligned with the rows the engine walks. Over a vocab
    shard a block saves ``(loss, lse, lse_z)``, so the ``'none'`` recompute communicates nothing.
    """

    outputs = 1

    def __init__(self, ids: Tensor, p: Tensor, log_p: Tensor, target: Optional[Tensor], *,
                 temperature: float, hard_weight: float, vocab: VocabSlice) -> None:
        self.vocab = vocab
        self.low_precision_blocks = vocab.identity
        self.p_sum = p.sum(1)
        self.p_logp = (p * log_p).sum(1)  # log_p is 0 where p is
        local, owned = vocab.local_target(ids)
        self.cols = local if owned is None else torch.where(owned, local, -1)  # -1: not this slice's
        self.p = p if owned is None else torch.where(owned, p, 0.0)
        self.local_target = self.owned = None
        if hard_weight > 0.0:
            self.local_target, self.owned = vocab.local_target(target)
        self.options = dict(scale=1.0 / temperature, temperature=temperature, hard_weight=hard_weight)

    def score(self, z: Tensor, rows: slice, saved: Optional[Tensor],
              upstream: Optional[Tensor]) -> ScoreResult:
        dtype = self.p.dtype
        g = None if upstream is None else upstream.reshape(-1)
        p, cols = self.p[rows], self.cols[rows]
        t = None if self.local_target is None else self.local_target[rows]
        if self.vocab.identity:
            x_t = None if t is None else at_cols(z, t, dtype)
            (loss,) = TOPK_KERNEL(z, z.gather(1, cols.clamp_min(0)).to(dtype), p, self.p_sum[rows],
                                  self.p_logp[rows], x_t, g, **self.options)
        else:
            if saved is None:
                saved = self._statistics(z, rows)
            loss = saved[:, 0]
            if g is not None and self.vocab.size > 0:
                TOPK_GRAD_KERNEL(z, saved[:, 1].contiguous(), saved[:, 2].contiguous() if t is not None else None,
                                 self.p_sum[rows], g, **self.options)
        if g is None or self.vocab.size == 0:
            return ScoreResult(loss, saved=saved)
        a, temp = self.options["hard_weight"], self.options["temperature"]
        point = [None] * 5
        if t is not None:
            point[:3] = t, owned_only(g * (-a), self.owned, rows), at_cols(z, t, dtype)
        if a < 1.0:
            point[3:] = cols, p * (g * (-(1.0 - a) * temp)).unsqueeze(1)
        return ScoreResult(loss, PointGradient(*point), saved)

    def _statistics(self, z: Tensor, rows: slice) -> Tensor:
        """``(n, 3)``: ``loss, lse, lse_z`` of the block's rows over every slice (``lse_z``: 0
        without the hard term)."""
        vocab, options = self.vocab, self.options
        hard = self.local_target is not None
        y = transform(z, options["scale"], None)
        m = global_row_max(y, vocab)
        sums = z.new_zeros(z.shape[0], 2 + 2 * hard)
        if vocab.size > 0:
            y_ids = y.gather(1, self.cols[rows].clamp_min(0))
            for j, column in enumerate(slice_sums(y, m, y_ids, self.p[rows], temperature=options["temperature"],
                                                  hard=hard)):
                sums[:, j] = column
            if hard:
                sums[:, 3] = owned_only(at_cols(z, self.local_target[rows], z.dtype), self.owned, rows)
        vocab.sum_(sums)
        saved = z.new_zeros(z.shape[0], 3)
        log_s = sums[:, 0].log()
        saved[:, 1] = m + log_s
        if hard:
            saved[:, 2] = options["temperature"] * m + sums[:, 2].log()
        saved[:, 0] = topk_loss(sums[:, 1], log_s, self.p_sum[rows], self.p_logp[rows], saved[:, 2],
                                sums[:, 3] if hard else None, temperature=options["temperature"],
                                hard_weight=options["hard_weight"])
        return saved


@_docs.fill
@graph_break  # a data-dependent row selection and the engine's in-place blocks: run eagerly
@routes_dtensor  # a vocab-sharded DTensor weight: vocab-parallel path
def linear_topk_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    target: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
) -> Tensor:
    r""":func:`leanloss.topk_distill_loss` of ``student_hidden @ student_weight.T + student_bias``
    without materializing the student's logits.

    Same value and student gradients as
    ``topk_distill_loss(student_hidden @ student_weight.T + student_bias, topk_ids,
    topk_logprobs, target, ...)`` (see there for the formula and the padding convention).

    Args:
        student_hidden: ``(..., D)``; student_weight: ``(V, D)``; student_bias: ``(V,)`` or None.
        topk_ids, topk_logprobs: ``(..., k)``, the teacher's top-k ids (``< 0``: padding) and
            log-probabilities, stored data (no gradient).
        target: optional ``(...)`` class indices; rows with ``ignore_index`` are dropped before
            any matmul. Required when ``hard_weight > 0``.
        @doc row_reduction
        @doc chunk_size

    @doc fused_dtypes
    A ``student_weight`` that is a DTensor sharded on the vocabulary runs
    :func:`leanloss.parallel.vocab_parallel_linear_topk_distill_loss`.
    """
    return run_topk("linear_topk_distill_loss", Head(student_hidden, student_weight, student_bias), topk_ids,
                    topk_logprobs, target, lambda head: LocalVocab(head.weight.shape[0]), temperature=temperature,
                    ignore_index=ignore_index, hard_weight=hard_weight, reduction=reduction, chunk_size=chunk_size)


def run_topk(fn: str, head: Head, topk_ids: Tensor, topk_logprobs: Tensor, target: Optional[Tensor],
             vocab_of: Callable[[Head], VocabSlice], *, temperature, ignore_index: int, hard_weight,
             reduction: str, chunk_size: Optional[int], check_range: bool = True,
             names: Sequence[str] = ("student_hidden", "student_weight", "student_bias")) -> Tensor:
    """The top-k losses on the fused pipeline (:func:`~leanloss.linear._pipeline.run_fused`): their
    checks and :class:`TopKDistillScorer` over the reduce hook ``vocab_of(head)`` (the autocast
    head; a vocab shard checks the target's range itself: ``check_range=False``)."""
    reduction = resolve_reduction(reduction)

    def setup(student: Head, _):
        _checks.check_linear_shapes(fn, *student, None, hidden_name=names[0], weight_name=names[1],
                                    bias_name=names[2])
        if _checks.shapes_enabled() and student.bias is not None:
            _checks.check_same_dtype(fn, names[2], student.bias, names[1], student.weight)
        vocab = vocab_of(student)
        temp, hard = _checks.check_topk_options(fn, topk_ids, topk_logprobs, tuple(student.hidden.shape[:-1]),
                                                vocab.vocab, target, ignore_index, temperature, hard_weight,
                                                check_range)
        _heuristics.warn_if_topk_probabilities(fn, "topk_logprobs", topk_logprobs, topk_ids)
        if _checks.shapes_enabled():
            _checks.check_same_device(fn, **{names[0]: student.hidden}, topk_ids=topk_ids, target=target)
        dtype = compute_dtype(student.hidden.dtype)

        def make_scorer(t, ids, lps):
            _, p, log_p = topk_teacher(ids, lps, temp, dtype)
            return TopKDistillScorer(ids, p, log_p, t, temperature=temp, hard_weight=hard, vocab=vocab)

        return vocab, make_scorer, None

    loss, _ = run_fused(fn, head, target, setup, rows=(topk_ids, topk_logprobs), ignore_index=ignore_index,
                        reduction=reduction, chunk_size=chunk_size, names=names)
    return loss
