r"""Top-k distillation from stored teacher log-probabilities with the student's LM head rows
(the vocabulary) split across ranks.

The scorer is :class:`leanloss.linear.topk_distill.TopKDistillScorer` with this rank's
:class:`~leanloss.parallel._comm.VocabShard` as its reduce hook: per block one all-reduce MAX of
the row maxima of ``z / T``, then one SUM of the slice's sums of exponentials, of
``sum_i p_i (y_{id_i} - m)`` over the teacher ids the rank owns (the ids are GLOBAL) and, with
the hard term, of the sum for ``lse(z)`` and the target's logit from its owner
(:mod:`leanloss._fused.topk_rows`). The gradient with respect to this rank's slice, and the
point terms at the ids it owns, are then local: at most 4 numbers per row travel, never a logit.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._compile import graph_break
from .._dtensor import has_dtensor, unwrap
from ..linear._pipeline import Head
from ..linear.topk_distill import run_topk
from ._setup import shard_of

__all__ = ["vocab_parallel_linear_topk_distill_loss"]


@graph_break  # collectives and a data-dependent row selection: run eagerly
def vocab_parallel_linear_topk_distill_loss(
    student_hidden: Tensor,
    student_local_weight: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    target: Optional[Tensor] = None,
    group=None,
    *,
    vocab_start: Optional[int] = None,
    student_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
) -> Tensor:
    r""":func:`leanloss.linear_topk_distill_loss` with the student head's rows split across ``group``.

    Equals ``linear_topk_distill_loss`` on the head concatenated over the ranks (same
    ``temperature``, ``hard_weight``, ``ignore_index``, ``reduction``), in value and in the
    gradients of ``student_hidden`` (the full gradient on every rank, summed over the ranks in
    backward), ``student_local_weight`` and ``student_bias`` (this rank's slice). The teacher is
    stored data and gets no gradient. No rank holds its ``(tokens, V_local)`` logits: the fused
    engine walks blocks of ``chunk_size`` rows and only per-row statistics cross ranks (see
    :mod:`leanloss.parallel.topk_distill`).

    Args:
        student_hidden: ``(..., D)``, the same on every rank.
        student_local_weight: ``(V_local, D)``, this rank's rows of the head; slices may be
            uneven. Or a DTensor sharded ``Shard(0)`` (group and offsets then come from the
            mesh, as in :func:`vocab_parallel_linear_cross_entropy`).
        topk_ids, topk_logprobs: ``(..., k)``, the teacher's top-k GLOBAL ids (``< 0``:
            padding) and log-probabilities, identical on every rank.
        target: ``(...)`` global class ids or ``None``; required when ``hard_weight > 0``;
            rows with ``ignore_index`` are dropped. Identical on every rank.
        group, vocab_start: as in :func:`vocab_parallel_cross_entropy`.
        student_bias: this rank's ``(V_local,)`` slice of the bias, or ``None``.
        chunk_size: rows per block, the same on every rank (default: from the largest slice).

    Every rank of ``group`` must call this function (and its backward) together.
    """
    fn = "vocab_parallel_linear_topk_distill_loss"
    sizes = None
    if has_dtensor(student_hidden, student_local_weight, student_bias, topk_ids, topk_logprobs, target):
        sharded, whole, group, sizes = unwrap(
            fn, {"student_local_weight": student_local_weight, "student_bias": student_bias},
            {"student_hidden": student_hidden, "topk_ids": topk_ids, "topk_logprobs": topk_logprobs,
             "target": target}, group, vocab_start, dim=0)
        student_local_weight, student_bias = sharded["student_local_weight"], sharded["student_bias"]
        student_hidden, topk_ids, topk_logprobs, target = (
            whole["student_hidden"], whole["topk_ids"], whole["topk_logprobs"], whole["target"])

    def vocab_of(head: Head):
        return shard_of(fn, head.hidden, head.weight.shape[0], target, group, vocab_start, ignore_index,
                        sizes=sizes)

    return run_topk(fn, Head(student_hidden, student_local_weight, student_bias), topk_ids, topk_logprobs,
                    target, vocab_of, temperature=temperature, ignore_index=ignore_index,
                    hard_weight=hard_weight, reduction=reduction, chunk_size=chunk_size, check_range=False,
                    names=("student_hidden", "student_local_weight", "student_bias"))
