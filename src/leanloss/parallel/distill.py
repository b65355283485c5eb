r"""Fused distillation with both LM heads' rows (the vocabulary) split across ranks.

The scorer is :class:`leanloss.linear.distill.DistillScorer` with this rank's
:class:`~leanloss.parallel._comm.VocabShard` as its reduce hook: per piece of rows it
all-reduces the row maxima of the student and teacher logits, then their sums of exponentials
(with the hard term's and the target's logit from its owner), then the divergence's one or two
row sums (:mod:`leanloss._fused.distill_rows`); the gradient with respect to this rank's slice
is then local. At most 6 numbers per row travel per rank, never a logit.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._compile import graph_break
from .. import _checks
from .._reduce import resolve_reduction
from ..linear._pipeline import Head, run_fused
from ..linear.distill import distill_scorer, head_transforms
from .._dtensor import has_dtensor, unwrap
from ._setup import shard_of

__all__ = ["vocab_parallel_linear_distill_loss"]


def _check_heads(fn: str, student_hidden, student_weight, student_bias, teacher_hidden,
                 teacher_weight, teacher_bias) -> None:
    for side, h, w, bias in (("student", student_hidden, student_weight, student_bias),
                             ("teacher", teacher_hidden, teacher_weight, teacher_bias)):
        _checks.check_linear_shapes(fn, h, w, bias, None, hidden_name=f"{side}_hidden",
                                    weight_name=f"{side}_local_weight", bias_name=f"{side}_bias")
    if _checks.shapes_enabled() and (teacher_weight.shape[0] != student_weight.shape[0]
                                     or teacher_hidden.shape[:-1] != student_hidden.shape[:-1]):
        raise _checks.LeanlossValueError(
            f"{fn}: arguments 'teacher_local_weight' and 'teacher_hidden' must pair with the "
            f"student's: the same vocabulary rows ({student_weight.shape[0]}) and one row per "
            f"student row {tuple(student_hidden.shape[:-1])}; got {_checks.fmt_shape(teacher_weight)} "
            f"and {_checks.fmt_shape(teacher_hidden)}"
        )


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
    r""":func:`leanloss.linear_distill_loss` with both heads' rows split across ``group``.

    Equals ``linear_distill_loss`` on the heads concatenated over the ranks (same ``kind``,
    ``beta``, ``temperature``, ``hard_weight``, ``ignore_index``, ``reduction``, soft-caps and
    logit scales), in value and in
    the gradients of ``student_hidden`` (the full gradient on every rank, summed over the ranks
    in backward), ``student_local_weight`` and ``student_bias`` (this rank's slice). The
    teacher gets no gradient. No rank holds its ``(tokens, V_local)`` logits: the fused engine
    walks blocks of ``chunk_size`` rows and only per-row statistics cross ranks (see
    :mod:`leanloss.parallel.distill`).

    Args:
        student_hidden, teacher_hidden: ``(..., D)`` / ``(..., Dt)``, the same on every rank.
        student_local_weight, teacher_local_weight: this rank's rows of each head, the same
            slice of the vocabulary for both; or DTensors sharded ``Shard(0)`` alike (group and
            offsets then come from the mesh, as in :func:`vocab_parallel_linear_cross_entropy`).
        target: ``(...)`` global class ids or ``None``; required when ``hard_weight > 0``;
            rows with ``ignore_index`` are dropped. Identical on every rank.
        group, vocab_start: as in :func:`vocab_parallel_cross_entropy`.
        chunk_size: rows per block, the same on every rank (default: from the largest slice).

    Every rank of ``group`` must call this function (and its backward) together.
    """
    fn = "vocab_parallel_linear_distill_loss"
    reduction = resolve_reduction(reduction)
    beta, temperature, hard_weight = _checks.check_distill_options(fn, kind, beta, temperature, hard_weight)
    input_scale, transforms = head_transforms(fn, temperature, student_softcap, teacher_softcap,
                                              student_logit_scale, teacher_logit_scale)
    sizes = None
    if has_dtensor(student_hidden, student_local_weight, student_bias, teacher_hidden,
                   teacher_local_weight, teacher_bias, target):
        sharded, whole, group, sizes = unwrap(
            fn, {"student_local_weight": student_local_weight, "student_bias": student_bias,
                 "teacher_local_weight": teacher_local_weight, "teacher_bias": teacher_bias},
            {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden, "target": target},
            group, vocab_start, dim=0)
        student_local_weight, student_bias = sharded["student_local_weight"], sharded["student_bias"]
        teacher_local_weight, teacher_bias = sharded["teacher_local_weight"], sharded["teacher_bias"]
        student_hidden, teacher_hidden, target = whole["student_hidden"], whole["teacher_hidden"], whole["target"]

    def setup(student: Head, teacher: Head):
        _check_heads(fn, *student, *teacher)
        if target is None and hard_weight > 0:
            raise _checks.LeanlossValueError(
                f"{fn}: argument 'target' is required when hard_weight > 0 (got hard_weight={hard_weight})")
        shard = shard_of(fn, student.hidden, student.weight.shape[0], target, group, vocab_start,
                         ignore_index, sizes=sizes)
        return shard, distill_scorer(teacher, shard, kind=kind, beta=beta, temperature=temperature,
                                     hard_weight=hard_weight, **transforms), None

    loss, _ = run_fused(fn, Head(student_hidden, student_local_weight, student_bias), target, setup,
                        teacher=Head(teacher_hidden, teacher_local_weight, teacher_bias),
                        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
                        input_scale=input_scale,
                        names=("student_hidden", "student_local_weight", "student_bias"))
    return loss
