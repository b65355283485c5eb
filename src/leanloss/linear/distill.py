r"""Fused distillation on the linear engine: a student and a teacher LM head, no (N, V) logits.

:func:`linear_distill_loss` is :func:`leanloss.distill_loss` of the two heads' logits, block by
block with a :class:`DistillScorer`, which computes the teacher's logits of each block's rows.
The row math is in :mod:`leanloss._fused.distill_rows`. :math:`1/T` is folded into the student's
hidden states and bias (an ``(N, D)`` operation), so the engine's block is :math:`a = z_s / T`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks, _docs
from .._compile import graph_break
from .._reduce import resolve_reduction
from .._dtypes import compute_dtype
from .._fused.ce_rows import softcap_slope, transform
from .._fused.distill_rows import (DISTILL_GRAD_KERNEL, DISTILL_KERNEL, EXP_SUMS_KERNEL, divergence_finish,
                                   divergence_sums, hard_loss, resolve_kind)
from .._fused.engine import MIN_CHUNK, PointGradient, ScoreResult, at_cols
from .._fused.reduce_hook import LocalVocab, VocabSlice, local_row_max, owned_only, row_max_shift
from .._dtensor import routes_dtensor
from ._pipeline import Head, run_fused

__all__ = ["DistillScorer", "linear_distill_loss"]

# Bytes of teacher logits computed per matmul: the teacher block is the scorer's only (rows, V)
# buffer, so it is sized apart from the engine's student block; but it has at least the engine's
# minimum block rows, since each teacher matmul re-reads (and BLAS re-packs) the whole teacher
# weight (float32 V=32000, interleaved A/B: 262-row pieces 1.12x the four matmuls, 512-row
# 1.10x, 1024-row 1.04x; bf16 within noise of each other from 524 rows up). 16-bit teachers take
# pieces a quarter that size: their matmuls are cheap next to faulting in a fresh buffer and
# reading it back from memory (JSD N=2048 D=1024 V=32000, 2-core AMX Xeon, x its four matmuls by
# piece size 128/64/48/32/24 MiB: bf16 1.14-1.16/1.12/1.08/1.03-1.08/1.03; float32 1.03-1.06/
# 1.04-1.06/1.10/1.05-1.12/1.09).
_TEACHER_BYTES, _TEACHER_BYTES_16BIT = 128 * 2**20, 32 * 2**20
_TEACHER_MIN_ROWS = MIN_CHUNK


class DistillScorer:
    """The per-block distillation math of :mod:`leanloss._fused.distill_rows` over the reduce hook
    ``vocab`` (one composed row kernel on one device; over a vocab shard, all-reduced statistics
    saved for the ``'none'`` recompute).

    The engine's blocks are the student logits times ``s / T``; ``teacher_hidden`` ``(M, Dt)``
    and ``target`` ``(M,)`` global ids (or ``None``) are aligned with the engine's rows; the
    teacher's logits (no autograd, this rank's slice of its head) are scaled by
    ``teacher_scale`` (default ``1 / T``) in pieces of about ``_TEACHER_BYTES``, sized from the
    largest slice so every rank walks the same pieces. ``softcap``, ``teacher_softcap`` (over
    ``T``) cap each block before the row kernels, and the gradient is chained through the cap.
    The hard term's ``-1`` at the target is a point term.
    """

    outputs = 1

    def __init__(self, teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                 target: Optional[Tensor], *, kind: str, beta: float, temperature: float,
                 hard_weight: float, vocab: VocabSlice, softcap: Optional[float] = None,
                 teacher_softcap: Optional[float] = None, teacher_scale: Optional[float] = None) -> None:
        self.teacher_hidden, self.teacher_weight, self.teacher_bias = teacher_hidden, teacher_weight, teacher_bias
        self.vocab = vocab
        self.low_precision_blocks = vocab.identity
        self.local_target = self.owned = None
        if target is not None and hard_weight > 0.0:
            self.local_target, self.owned = vocab.local_target(target)
        self.kind = resolve_kind(kind, beta)
        self.beta, self.temperature, self.hard_weight = float(beta), float(temperature), float(hard_weight)
        self.options = dict(kind=self.kind, beta=self.beta, temperature=self.temperature,
                            hard_weight=self.hard_weight)
        self.softcap, self.teacher_softcap = softcap, teacher_softcap
        self.teacher_scale = 1.0 / self.temperature if teacher_scale is None else float(teacher_scale)
        self._teacher_buf: Optional[Tensor] = None

    def teacher_logits(self, rows: slice) -> Tensor:
        """``(teacher_hidden[rows] @ teacher_weight.T + teacher_bias) * teacher_scale`` in the
        teacher's dtype, soft-capped (in the compute dtype) with ``teacher_softcap``."""
        h, w, bias = self.teacher_hidden[rows], self.teacher_weight, self.teacher_bias
        n = h.shape[0]
        if self._teacher_buf is None or self._teacher_buf.shape[0] < n:
            self._teacher_buf = torch.empty((n, w.shape[0]), dtype=h.dtype, device=h.device)
        out = self._teacher_buf[:n]
        inv_t = self.teacher_scale
        with torch.no_grad():
            if bias is None and inv_t == 1.0:
                torch.mm(h, w.T, out=out)
            else:
                base = h.new_zeros(()) if bias is None else bias
                torch.addmm(base, h, w.T, beta=0.0 if bias is None else inv_t, alpha=inv_t, out=out)
        if self.teacher_softcap is not None:
            return transform(out.to(compute_dtype(out.dtype)), 1.0, self.teacher_softcap)
        return out

    def score(self, a: Tensor, rows: slice, saved: Optional[Tensor],
              upstream: Optional[Tensor]) -> ScoreResult:
        """Per-row losses of block ``a`` (student logits / T); with ``upstream`` the dense part
        of the gradient with respect to ``a`` is written over it and the hard term's target
        reported as a :class:`~leanloss._fused.engine.PointGradient`."""
        dtype = compute_dtype(a.dtype)
        soft = self.hard_weight < 1.0
        g = None if upstream is None else upstream.reshape(-1)
        n = a.shape[0]
        size = self.teacher_hidden.element_size()
        budget = _TEACHER_BYTES_16BIT if size <= 2 else _TEACHER_BYTES
        step = n if not soft else max(_TEACHER_MIN_ROWS, budget // (size * max(self.vocab.max_size, 1)))
        losses, saveds, slopes = [], [], []
        for start in range(0, n, step):
            sub = slice(start, min(start + step, n))
            part = slice(rows.start + sub.start, rows.start + sub.stop)
            b = self.teacher_logits(part) if soft else None
            y, slope = a[sub], None
            if self.softcap is not None:
                y = transform(y.to(dtype), 1.0, self.softcap)
                slope = None if g is None else softcap_slope(y, self.softcap)
            if self.vocab.identity:
                t = None if self.local_target is None else self.local_target[part]
                a_y = None if t is None else at_cols(y, t, dtype)
                losses.append(DISTILL_KERNEL(y, b, a_y, None if g is None else g[sub], dtype=dtype,
                                             **self.options)[0])
            else:  # a vocabulary slice: the statistics' collectives on a block's first scoring only
                keep = self._statistics(y, b, part) if saved is None else saved[sub]
                if g is not None and self.vocab.size > 0:  # keep: loss, lse_a, lse_b, lse_z, div sums
                    lse_a = keep[:, 1].contiguous()
                    lse_b = keep[:, 2].contiguous() if b is not None else None
                    lse_z = keep[:, 3].contiguous() if self.local_target is not None else None
                    div_sums = keep[:, 4:].contiguous() if b is not None else None
                    DISTILL_GRAD_KERNEL(y, b, lse_a, lse_b, lse_z, div_sums, g[sub], **self.options)
                losses.append(keep[:, 0])
                saveds.append(keep)
            if slope is not None:  # the gradient with respect to y, chained through the cap
                if self.local_target is not None and self.vocab.size > 0:
                    slopes.append(at_cols(slope, self.local_target[part], dtype))
                a[sub].copy_(y.mul_(slope))
        if rows.stop >= self.teacher_hidden.shape[0]:
            self._teacher_buf = None  # last block of this pass
        loss = losses[0] if len(losses) == 1 else torch.cat(losses)
        keep = None if not saveds else saveds[0] if len(saveds) == 1 else torch.cat(saveds)
        if g is None or self.local_target is None or self.vocab.size == 0:
            return ScoreResult(loss, None, keep)
        t = self.local_target[rows]
        coef = g * (-self.hard_weight * self.temperature)
        if slopes:
            coef = coef * (slopes[0] if len(slopes) == 1 else torch.cat(slopes))
        coef = owned_only(coef, self.owned, rows)
        return ScoreResult(loss, PointGradient(t, coef, at_cols(a, t, dtype)), keep)

    def _statistics(self, x: Tensor, b: Optional[Tensor], rows: slice) -> Tensor:
        """A slice's saved statistics, over every rank's slice: ``loss, lse_a, lse_b, lse_z`` and
        the divergence's row sums."""
        vocab, temp, hw = self.vocab, self.temperature, self.hard_weight
        y = None if b is None else b.to(x.dtype)
        hard = self.local_target is not None
        maxes = [local_row_max(x, vocab)] + ([local_row_max(y, vocab)] if y is not None else [])
        m = row_max_shift(torch.stack(maxes, 1), vocab)
        m_a, m_b = m[:, 0], (m[:, 1] if y is not None else None)
        width = 1 + (y is not None) + 2 * hard
        sums = x.new_zeros(x.shape[0], width)
        if vocab.size > 0:
            for j, column in enumerate(EXP_SUMS_KERNEL(x, y, m_a, m_b, temperature=temp, hard=hard)):
                sums[:, j] = column
            if hard:
                sums[:, -1] = owned_only(at_cols(x, self.local_target[rows], x.dtype) * temp, self.owned, rows)
        vocab.sum_(sums)
        saved = x.new_zeros(x.shape[0], 6)
        saved[:, 1] = lse_a = m_a + sums[:, 0].log()
        loss = saved[:, 0]
        if y is not None:
            saved[:, 2] = lse_b = m_b + sums[:, 1].log()
            div_sums = x.new_zeros(x.shape[0], 2)
            if vocab.size > 0:
                q = (x - lse_a.unsqueeze(1)).exp()
                p = (y - lse_b.unsqueeze(1)).exp()
                columns, _ = divergence_sums(x, y, q, p, lse_a.unsqueeze(1), lse_b.unsqueeze(1),
                                             kind=self.kind, beta=self.beta)
                for j, column in enumerate(columns):
                    div_sums[:, j] = column
            saved[:, 4:] = vocab.sum_(div_sums)
            loss += divergence_finish(list(div_sums.unbind(1)), lse_a, lse_b, kind=self.kind,
                                      beta=self.beta) * ((1.0 - hw) * temp * temp)
        if hard:
            saved[:, 3] = lse_z = temp * m_a + sums[:, -2].log()
            loss += hard_loss(lse_z, sums[:, -1], hw)
        return saved


def check_head_pair(fn: str, student: Head, teacher: Head, weight: str = "weight") -> None:
    """Each head's shapes (``check_linear_shapes``), then the pairing of the two heads: the same
    vocabulary rows, one teacher row per student row, one device. ``weight``: the weight
    arguments' name after ``student_``/``teacher_`` (``'local_weight'`` vocab-parallel)."""
    for side, (h, w, bias) in (("student", student), ("teacher", teacher)):
        _checks.check_linear_shapes(fn, h, w, bias, None, hidden_name=f"{side}_hidden",
                                    weight_name=f"{side}_{weight}", bias_name=f"{side}_bias")
    if not _checks.shapes_enabled():
        return
    _checks.check_same_device(fn, student_hidden=student.hidden, teacher_hidden=teacher.hidden)
    if teacher.weight.shape[0] != student.weight.shape[0]:
        raise _checks.LeanlossValueError(
            f"{fn}: argument 'teacher_{weight}' must have the student's vocabulary size "
            f"{student.weight.shape[0]} rows, got {_checks.fmt_shape(teacher.weight)}"
        )
    if teacher.hidden.shape[:-1] != student.hidden.shape[:-1]:
        raise _checks.LeanlossValueError(
            f"{fn}: argument 'teacher_hidden' must have the leading shape of 'student_hidden' "
            f"{tuple(student.hidden.shape[:-1])} (one teacher row per student row), got "
            f"{tuple(teacher.hidden.shape[:-1])}"
        )


@_docs.fill
@graph_break  # a data-dependent row selection and the engine's in-place blocks: run eagerly
@routes_dtensor  # DTensor arguments: local, or a clear refusal
def linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
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
    r"""Distillation loss of two linear heads without the (tokens, vocab) logits.

    Equals :func:`leanloss.distill_loss` (same ``kind``, ``beta``, ``temperature``,
    ``ignore_index``, ``hard_weight``, ``reduction``; see there for the formula) on
    ``student_logits = softcap(s * (student_hidden @ student_weight.T + student_bias))`` and
    ``teacher_logits = softcap(s * (teacher_hidden @ teacher_weight.T + teacher_bias))``, in
    value and in the gradients of ``student_hidden``, ``student_weight`` and ``student_bias``;
    ``softcap(x) = c * tanh(x / c)`` with ``c`` = ``student_softcap`` / ``teacher_softcap``
    (none when ``None``), ``s`` = ``student_logit_scale`` / ``teacher_logit_scale``, as in
    :func:`leanloss.linear_log_probs` (Gemma's ``final_logit_softcapping``).

    Args:
        student_hidden: ``(..., D)``; student_weight: ``(V, D)``; student_bias: ``(V,)``.
        teacher_hidden: ``(..., Dt)`` with the student's leading shape; teacher_weight:
            ``(V, Dt)``; teacher_bias: ``(V,)``. The teacher side is computed without autograd
            and never gets a gradient.
        target: optional class indices ``(...)``; rows with ``ignore_index`` are dropped from
            both hidden tensors before any matmul. Required when ``hard_weight > 0``.
        @doc row_reduction
        @doc chunk_size
        student_softcap, teacher_softcap: positive soft-caps of each head's logits, or ``None``.
        student_logit_scale, teacher_logit_scale: positive multipliers of each head's logits,
            applied before the soft-cap.

    Cost: the engine's three student matmuls plus the teacher's forward matmul; at most a few
    ``(chunk_size, V)`` blocks in the matmul dtype plus a teacher block of at most 128 MiB (or
    512 rows) are alive.

    @doc fused_dtypes
    """
    fn = "linear_distill_loss"
    reduction = resolve_reduction(reduction)
    beta, temperature, hard_weight = _checks.check_distill_options(fn, kind, beta, temperature, hard_weight)
    input_scale, transforms = head_transforms(fn, temperature, student_softcap, teacher_softcap,
                                              student_logit_scale, teacher_logit_scale)

    def setup(student: Head, teacher: Head):
        check_head_pair(fn, student, teacher)
        _checks.check_distill_target(fn, target, tuple(student.hidden.shape[:-1]), student.weight.shape[0],
                                     ignore_index, hard_weight)
        if target is not None:
            _checks.check_same_device(fn, student_hidden=student.hidden, target=target)
        vocab = LocalVocab(student.weight.shape[0])
        return vocab, distill_scorer(teacher, vocab, kind=kind, beta=beta, temperature=temperature,
                                     hard_weight=hard_weight, **transforms), None

    loss, _ = run_fused(fn, Head(student_hidden, student_weight, student_bias), target, setup,
                        teacher=Head(teacher_hidden, teacher_weight, teacher_bias), ignore_index=ignore_index,
                        reduction=reduction, chunk_size=chunk_size, input_scale=input_scale,
                        names=("student_hidden", "student_weight", "student_bias"))
    return loss


def head_transforms(fn: str, temperature: float, student_softcap, teacher_softcap, student_logit_scale,
                    teacher_logit_scale) -> tuple:
    """Checks the heads' soft-caps and logit scales; returns the engine's ``input_scale``
    (``s / T``: the student's blocks are ``s z / T``) and the :class:`DistillScorer` options
    (the teacher's scale ``s_t / T``, the caps over ``T``)."""
    scales = [_checks.check_positive(fn, name, value) / temperature for name, value in
              (("student_logit_scale", student_logit_scale), ("teacher_logit_scale", teacher_logit_scale))]
    caps = [None if value is None else _checks.check_positive(fn, name, value) / temperature for name, value in
            (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap))]
    return scales[0], dict(softcap=caps[0], teacher_softcap=caps[1], teacher_scale=scales[1])


def distill_scorer(teacher: Head, vocab: VocabSlice, **options):
    """``make_scorer(kept_target, kept_teacher_hidden)`` of :func:`run_fused` for a
    :class:`DistillScorer` of ``teacher``'s head (detached) over ``vocab``."""
    weight, bias = teacher.weight.detach(), None if teacher.bias is None else teacher.bias.detach()
    return lambda t, ht: DistillScorer(ht, weight, bias, t, vocab=vocab, **options)
