r"""Top-k distillation of a linear LM head: :func:`leanloss.topk_distill_loss` without the logits.

The teacher is stored data (its top-k ids and log-probabilities per token), so the only
``(tokens, vocab)`` array is the student's, and the engine walks it in blocks. The row math
(loss and gradient) is stated in :mod:`leanloss._fused.topk_rows`; its row kernel
:func:`~leanloss._fused.topk_rows.topk_block` computes the loss and writes the dense part of
the gradient over the block; the point terms at the ``k`` ids are added after it, and the hard
term's at the target is reported to the engine as a
:class:`~leanloss._fused.engine.PointGradient`.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._compile import graph_break
from .. import _checks, _heuristics
from .._dtypes import compute_dtype
from .._fused.engine import PointGradient, ScoreResult, add_at_cols, at_cols
from .._fused.reduce_hook import LocalVocab
from .._fused.topk_rows import TOPK_KERNEL
from .._reduce import resolve_reduction
from ..losses.distill import topk_teacher
from ._pipeline import Head, run_fused

__all__ = ["linear_topk_distill_loss", "TopKDistillScorer"]


class TopKDistillScorer:
    """Per-block top-k distillation (see the module docstring); 16-bit blocks read in place.

    ``ids``, ``p`` ``(M, k)`` and ``target`` ``(M,)`` (or ``None``) are aligned with the rows the
    engine walks; ``p`` is the teacher's tempered distribution (:func:`topk_teacher`).
    """

    low_precision_blocks = True
    outputs = 1

    def __init__(self, ids: Tensor, p: Tensor, log_p: Tensor, target: Optional[Tensor], *,
                 temperature: float, hard_weight: float) -> None:
        self.ids, self.p, self.target = ids, p, target
        self.p_sum = p.sum(1)
        self.p_logp = (p * log_p).sum(1)  # log_p is 0 where p is
        self.options = dict(scale=1.0 / temperature, temperature=temperature, hard_weight=hard_weight)

    def score(self, z: Tensor, rows: slice, saved: Optional[Tensor],
              upstream: Optional[Tensor]) -> ScoreResult:
        dtype = self.p.dtype
        ids = self.ids[rows]
        hard = self.options["hard_weight"] > 0.0
        t = self.target[rows] if hard else None
        x_ids = z.gather(1, ids).to(dtype)
        x_t = at_cols(z, t, dtype) if hard else None
        g = None if upstream is None else upstream.reshape(-1)
        (loss,) = TOPK_KERNEL(z, x_ids, self.p[rows], self.p_sum[rows], self.p_logp[rows], x_t, g,
                               **self.options)
        if g is None:
            return ScoreResult(loss)
        a, temp = self.options["hard_weight"], self.options["temperature"]
        if a < 1.0:
            add_at_cols(z, ids, self.p[rows] * (g * (-(1.0 - a) * temp)).unsqueeze(1))
        if not hard:
            return ScoreResult(loss)
        return ScoreResult(loss, PointGradient(t, g * (-a), at_cols(z, t, dtype)))


@graph_break
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
        reduction: ``'none'`` (shape ``(...)``, 0 at ignored rows; backward recomputes the
            blocks) | ``'sum'`` | ``'mean'`` (over the kept rows).
        chunk_size: rows per block (default: the engine's plan).

    Matmuls run in the inputs' dtype; softmax statistics and accumulation in float32 (float64
    stays float64); the loss is returned in that compute dtype.
    """
    fn = "linear_topk_distill_loss"
    reduction = resolve_reduction(reduction)

    def setup(student: Head, _):
        vocab = _checks.check_linear_shapes(fn, *student, None, hidden_name="student_hidden",
                                            weight_name="student_weight", bias_name="student_bias")
        if _checks.shapes_enabled() and student.bias is not None:
            _checks.check_same_dtype(fn, "student_bias", student.bias, "student_weight", student.weight)
        temp, hard = _checks.check_topk_options(fn, topk_ids, topk_logprobs, tuple(student.hidden.shape[:-1]),
                                                vocab, target, ignore_index, temperature, hard_weight)
        _heuristics.warn_if_topk_probabilities(fn, "topk_logprobs", topk_logprobs, topk_ids)
        if _checks.shapes_enabled():
            _checks.check_same_device(fn, student_hidden=student.hidden, topk_ids=topk_ids, target=target)
        dtype = compute_dtype(student.hidden.dtype)

        def make_scorer(t, ids, lps):
            ids, p, log_p = topk_teacher(ids, lps, temp, dtype)
            return TopKDistillScorer(ids, p, log_p, t, temperature=temp, hard_weight=hard)

        return LocalVocab(vocab), make_scorer, None

    loss, _ = run_fused(fn, Head(student_hidden, student_weight, student_bias), target, setup,
                        rows=(topk_ids, topk_logprobs), ignore_index=ignore_index, reduction=reduction,
                        chunk_size=chunk_size, names=("student_hidden", "student_weight", "student_bias"))
    return loss
