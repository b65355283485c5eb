"""The fused linear-head losses with the head's rows (the vocabulary) split across ranks.

Each runs the one-device loss's scorer with this rank's
:class:`~leanloss.parallel._setup.VocabShard` as its reduce hook (``docs/internals.md``).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from .. import _checks, _docs
from .._compile import graph_break
from .._reduce import resolve_reduction
from ..linear._pipeline import Head, run_fused
from ..linear.cross_entropy import run_ce
from ..linear.distill import check_head_pair, distill_scorer, head_transforms
from ..linear.log_probs import run_log_probs
from ..linear.topk_distill import run_topk
from ._setup import ce_shard, local_args, shard_finder

__all__ = ["vocab_parallel_linear_cross_entropy", "vocab_parallel_linear_log_probs",
           "vocab_parallel_linear_distill_loss", "vocab_parallel_linear_topk_distill_loss"]

_HEAD = ("hidden", "local_weight", "bias")
_STUDENT = ("student_hidden", "student_local_weight", "student_bias")


@_docs.fill
@graph_break  # collectives and a data-dependent row selection: run eagerly
def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    local_weight: Tensor,
    target: Tensor,
    group=None,
    *,
    bias: Optional[Tensor] = None,
    vocab_start: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    class_weight: Optional[Tensor] = None,
    z_loss: float = 0.0,
    num_items=None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    r""":func:`leanloss.linear_cross_entropy` (without softcap or logit scale) with each rank
    holding rows of the LM head, the formula of :func:`vocab_parallel_cross_entropy`:

    @doc ce_row_loss

    @doc ce_reduction

    Args:
        @doc vp_head
        class_weight: the FULL ``(V,)`` per-class weights, the same on every rank.
        @doc ignore_index
        @doc label_smoothing
        @doc z_loss
        @doc num_items
        @doc vp_args

    @doc vp_notes
    """
    fn = "vocab_parallel_linear_cross_entropy"
    reduction = resolve_reduction(reduction)
    args, group, sizes = local_args(fn, dict(local_weight=local_weight, bias=bias),
                                    dict(hidden=hidden, target=target, class_weight=class_weight), group,
                                    vocab_start)
    target, class_weight = args["target"], args["class_weight"]

    def vocab_of(head: Head):
        _checks.check_linear_shapes(fn, *head, target, weight_name="local_weight")
        return ce_shard(fn, head.hidden, head.weight.shape[0], target, group, vocab_start, ignore_index,
                        label_smoothing, class_weight, z_loss, sizes)[0]

    return run_ce(fn, Head(*(args[name] for name in _HEAD)), target, vocab_of, class_weight=class_weight,
                  label_smoothing=label_smoothing, z_loss=z_loss, softcap=None, logit_scale=1.0,
                  reduction=reduction, num_items=num_items, ignore_index=ignore_index, chunk_size=chunk_size,
                  names=_HEAD)


@_docs.fill
@graph_break  # collectives and a data-dependent row selection: run eagerly
def vocab_parallel_linear_log_probs(
    hidden: Tensor,
    local_weight: Tensor,
    target: Tensor,
    group=None,
    *,
    bias: Optional[Tensor] = None,
    vocab_start: Optional[int] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    return_stats: Sequence[str] = (),
):
    r""":func:`leanloss.linear_log_probs` with each rank holding rows of the LM head: the same
    outputs, shaped like ``target``.

    Args:
        @doc vp_head
        temperature, return_entropy, ignore_index, softcap, logit_scale, return_stats: as in
            :func:`leanloss.linear_log_probs`.
        @doc vp_args

    @doc vp_notes
    """
    fn = "vocab_parallel_linear_log_probs"
    args, group, sizes = local_args(fn, dict(local_weight=local_weight, bias=bias),
                                    dict(hidden=hidden, target=target), group, vocab_start)
    return run_log_probs(fn, Head(*(args[name] for name in _HEAD)), args["target"],
                         shard_finder(fn, args["target"], group, vocab_start, ignore_index, sizes),
                         temperature=temperature, return_entropy=return_entropy,
                         return_stats=return_stats, softcap=softcap, logit_scale=logit_scale,
                         ignore_index=ignore_index, chunk_size=chunk_size, check_range=False, names=_HEAD)


@_docs.fill
@graph_break  # collectives and a data-dependent row selection: run eagerly
def vocab_parallel_linear_distill_loss(
    student_hidden: Tensor,
    student_local_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_local_weight: Tensor,
    target: Optional[Tensor] = None,
    group=None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    vocab_start: Optional[int] = None,
    kind: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
) -> Tensor:
    r""":func:`leanloss.linear_distill_loss` with both heads' rows split across ``group``, the
    same slice of the vocabulary on each rank for both (the teacher gets no gradient).

    Args:
        @doc vp_student
        teacher_hidden, teacher_local_weight, teacher_bias: the teacher's, alike (``(..., Dt)``,
            the same rows of its head; DTensors sharded like the student's).
        @doc vp_hard_target
        kind, beta, temperature, hard_weight: as in :func:`leanloss.linear_distill_loss`.
        student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale: as there.
        @doc row_reduction
        @doc vp_args

    @doc vp_notes
    """
    fn = "vocab_parallel_linear_distill_loss"
    reduction = resolve_reduction(reduction)
    beta, temperature, hard_weight = _checks.check_distill_options(fn, kind, beta, temperature, hard_weight)
    input_scale, transforms = head_transforms(fn, temperature, student_softcap, teacher_softcap,
                                              student_logit_scale, teacher_logit_scale)
    args, group, sizes = local_args(
        fn, dict(student_local_weight=student_local_weight, student_bias=student_bias,
                 teacher_local_weight=teacher_local_weight, teacher_bias=teacher_bias),
        dict(student_hidden=student_hidden, teacher_hidden=teacher_hidden, target=target), group, vocab_start)
    target = args["target"]

    def setup(student: Head, teacher: Head):
        check_head_pair(fn, student, teacher, "local_weight")
        if target is None and hard_weight > 0:  # a given target: shard_of checks it on every rank at once
            raise _checks.LeanlossValueError(
                f"{fn}: argument 'target' is required when hard_weight > 0 (got hard_weight={hard_weight})")
        shard = shard_finder(fn, target, group, vocab_start, ignore_index, sizes)(student)
        return shard, distill_scorer(teacher, shard, kind=kind, beta=beta, temperature=temperature,
                                     hard_weight=hard_weight, **transforms), None

    loss, _ = run_fused(fn, Head(*(args[name] for name in _STUDENT)), target, setup,
                        teacher=Head(args["teacher_hidden"], args["teacher_local_weight"], args["teacher_bias"]),
                        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
                        input_scale=input_scale, names=_STUDENT)
    return loss


@_docs.fill
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
    r""":func:`leanloss.linear_topk_distill_loss` with the student head's rows split across
    ``group`` (the teacher is stored data and gets no gradient).

    Args:
        @doc vp_student
        topk_ids, topk_logprobs: ``(..., k)``, the teacher's top-k GLOBAL ids (``< 0``:
            padding) and log-probabilities, identical on every rank.
        @doc vp_hard_target
        temperature, hard_weight: as in :func:`leanloss.linear_topk_distill_loss`.
        @doc row_reduction
        @doc vp_args

    @doc vp_notes
    """
    fn = "vocab_parallel_linear_topk_distill_loss"
    args, group, sizes = local_args(
        fn, dict(student_local_weight=student_local_weight, student_bias=student_bias),
        dict(student_hidden=student_hidden, topk_ids=topk_ids, topk_logprobs=topk_logprobs, target=target),
        group, vocab_start)
    return run_topk(fn, Head(*(args[name] for name in _STUDENT)), args["topk_ids"], args["topk_logprobs"],
                    args["target"], shard_finder(fn, args["target"], group, vocab_start, ignore_index, sizes,
                                                 same=(("topk_ids", args["topk_ids"]),
                                                       ("topk_logprobs", args["topk_logprobs"]))),
                    temperature=temperature, ignore_index=ignore_index, hard_weight=hard_weight,
                    reduction=reduction, chunk_size=chunk_size, check_range=False, names=_STUDENT)
