r"""Fused distillation on the linear engine: a student and a teacher LM head, no (N, V) logits.

:func:`linear_distill_loss` is :func:`leanloss.distill_loss` on
``student_logits = student_hidden @ student_weight.T + student_bias`` and
``teacher_logits = teacher_hidden @ teacher_weight.T + teacher_bias``, computed block by block
by :func:`leanloss._fused.engine.fused_linear_loss` with a :class:`DistillScorer`: for each
block of student logits the scorer computes the teacher logits of the same rows (without
autograd), the per-row loss and, in place, the gradient with respect to the student logits.

Per-block math, with :math:`a = z_s / T`, :math:`b = z_t / T`, :math:`q = \mathrm{softmax}(a)`,
:math:`p = \mathrm{softmax}(b)`, :math:`A = \mathrm{lse}(a)`, :math:`B = \mathrm{lse}(b)`:

* forward: :math:`D = \langle p, b - a\rangle + A - B`, :math:`\partial D/\partial a = q - p`;
* reverse: :math:`D = \langle q, a - b\rangle - A + B`,
  :math:`\partial D/\partial a = q \odot (e - \langle q, e\rangle)` with :math:`e = a - b`;
* jsd: :math:`\lambda = \log(q + \tfrac{\beta}{1-\beta} p)` (so :math:`\log m = \lambda + \log(1-\beta)`)
  and :math:`s = \lambda - \log q = \log(1 + \tfrac{\beta}{1-\beta} p / q)`:
  :math:`D = \beta\langle p, \log p - \lambda\rangle - (1-\beta)\langle q, s\rangle - \log(1-\beta)`,
  :math:`\partial D/\partial a = (1-\beta)\, q \odot (\langle q, s\rangle - s)`. Written with
  :math:`s`, a row's common offset (its log-sum-exp, and its rounding) cancels before any
  product, so float32 gradients are as accurate as the log-softmax form's (the form
  :math:`q \odot (r - \langle q, r\rangle)`, :math:`r = a - \lambda`, loses the digits of
  :math:`|a|`);
* hard term: :math:`\mathrm{CE} = \mathrm{lse}(z_s) - z_{s,y}`, gradient
  :math:`\mathrm{softmax}(z_s) - \mathrm{onehot}(y)`;

and the row loss is :math:`a_h \mathrm{CE} + (1-a_h) T^2 D`. :func:`linear_distill_loss` folds
:math:`1/T` into the student's hidden states and bias (an ``(N, D)`` operation), so the engine's
block is :math:`a` itself, and the scorer writes the gradient with respect to :math:`a` over
the block: :math:`a_h T(\mathrm{softmax}(z_s) - \mathrm{onehot}(y)) + (1-a_h) T^2
\partial D/\partial a`, the per-block math being the row kernel :func:`distill_block`
(compiled or eager, :mod:`leanloss._fused.kernels`). The jsd mixture is formed in probability
space and floored at the smallest normal float before its log; the terms this can affect weigh
less than ``1e-35``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from .._compile import graph_break
from .._dtypes import autocast_matmul_operands
from .._reduce import resolve_reduction
from .._dtypes import compute_dtype
from .._fused.engine import MIN_CHUNK, PointGradient, ScoreResult, fused_linear_loss
from .._fused.kernels import RowKernel, row_logsumexp
from .._fused.rows import scatter_rows, select_kept
from .._dtensor import routes_dtensor

__all__ = ["DistillScorer", "linear_distill_loss"]

# Bytes of teacher logits computed per matmul: the teacher block is the scorer's only (rows, V)
# buffer, so it is sized apart from the engine's student block; but it has at least the engine's
# minimum block rows, since each teacher matmul re-reads (and BLAS re-packs) the whole teacher
# weight (float32 V=32000, interleaved A/B: 262-row pieces 1.12x the four matmuls, 512-row
# 1.10x, 1024-row 1.04x; bf16 within noise of each other from 524 rows up).
_TEACHER_BYTES = 128 * 2**20
_TEACHER_MIN_ROWS = MIN_CHUNK


def distill_block(a: Tensor, b: Optional[Tensor], a_y: Optional[Tensor], g: Optional[Tensor], *,
                  kind: str, beta: float, temperature: float, hard_weight: float,
                  dtype: torch.dtype):
    """Distillation loss of one block, row-wise (the math of the module docstring).

    ``a``: student logits divided by ``T`` (overwritten with the dense part of ``g * dloss/da``
    when ``g`` is given); ``b``: teacher logits divided by ``T`` (``None`` when
    ``hard_weight == 1``); ``a_y``: the student's ``a`` at each row's target (``None`` without
    a hard term). Returns ``(loss,)``; the hard term's point term (``-g * hard_weight * T`` at
    the target) is left to the caller.
    """
    hw, temp = hard_weight, temperature
    x = a.to(dtype)
    loss = None
    grad = None
    lse_a = q = None
    if b is not None or temp == 1.0:  # the student's softmax q (also the hard term's at T = 1)
        lse_a = row_logsumexp(x).unsqueeze(1)
        q = (x - lse_a).exp()
    if b is not None:
        y = b.to(dtype)
        lse_b = row_logsumexp(y).unsqueeze(1)
        p = (y - lse_b).exp()
        if kind == "forward":
            div = (p * (y - x)).sum(1) + (lse_a - lse_b).squeeze(1)
            d_div = q - p
        elif kind == "reverse":
            e = x - y
            r = (q * e).sum(1, keepdim=True)
            div = (r - lse_a + lse_b).squeeze(1)
            d_div = q * (e - r)
        else:
            lam = (q + p * (beta / (1.0 - beta))).clamp_min(torch.finfo(dtype).tiny).log()
            s = lam - (x - lse_a)
            qs = (q * s).sum(1, keepdim=True)
            div = (beta * (p * (y - lse_b - lam)).sum(1) - (1.0 - beta) * qs.squeeze(1)
                   - math.log1p(-beta))
            d_div = q * (qs - s) * (1.0 - beta)
        soft = (1.0 - hw) * temp * temp
        loss = div * soft
        grad = d_div * soft
    if a_y is not None:
        if temp == 1.0:  # softmax(z) is q
            lse_z, probs = lse_a, q * hw
        else:
            z = x * temp
            lse_z = row_logsumexp(z).unsqueeze(1)
            probs = (z - lse_z).exp() * (hw * temp)
        hard = hw * (lse_z.squeeze(1) - a_y * temp)
        loss = hard if loss is None else loss + hard
        grad = probs if grad is None else grad + probs
    if g is not None:
        a.copy_(grad * g.unsqueeze(1))
    return (loss,)


_DISTILL_KERNEL = RowKernel(distill_block, "distillation", tiled=True)


class DistillScorer:
    """The per-block distillation math of :func:`linear_distill_loss` (see the module docstring).

    The engine's blocks must be the student logits divided by ``temperature``;
    ``teacher_hidden`` ``(M, Dt)`` and ``target`` ``(M,)`` (or ``None``) are aligned with the
    rows the engine walks; the teacher tensors must not require grad. Blocks are scored in the
    matmul dtype by the row kernel :func:`distill_block`; the teacher logits of the same rows
    are computed (without autograd) in pieces of about ``_TEACHER_BYTES`` (at least
    ``_TEACHER_MIN_ROWS`` rows).
    """

    low_precision_blocks = True
    outputs = 1

    def __init__(self, teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                 target: Optional[Tensor], *, kind: str, beta: float, temperature: float,
                 hard_weight: float) -> None:
        self.teacher_hidden, self.teacher_weight, self.teacher_bias = teacher_hidden, teacher_weight, teacher_bias
        self.target = target
        self.kind = {0.0: "forward", 1.0: "reverse"}.get(beta, kind) if kind == "jsd" else kind
        self.beta, self.temperature, self.hard_weight = float(beta), float(temperature), float(hard_weight)
        self._teacher_buf: Optional[Tensor] = None

    def teacher_logits(self, rows: slice) -> Tensor:
        """``(teacher_hidden[rows] @ teacher_weight.T + teacher_bias) / T`` in the teacher's dtype."""
        h, w, bias = self.teacher_hidden[rows], self.teacher_weight, self.teacher_bias
        n = h.shape[0]
        if self._teacher_buf is None or self._teacher_buf.shape[0] < n:
            self._teacher_buf = torch.empty((n, w.shape[0]), dtype=h.dtype, device=h.device)
        out = self._teacher_buf[:n]
        inv_t = 1.0 / self.temperature
        with torch.no_grad():
            if bias is None and inv_t == 1.0:
                torch.mm(h, w.T, out=out)
            else:
                base = h.new_zeros(()) if bias is None else bias
                torch.addmm(base, h, w.T, beta=0.0 if bias is None else inv_t, alpha=inv_t, out=out)
        return out

    def score(self, a: Tensor, rows: slice, saved: Optional[Tensor],
              grad_scale: Optional[Tensor]) -> ScoreResult:
        """Per-row losses of block ``a`` (student logits / T); with ``grad_scale`` the gradient
        with respect to ``a`` is written over it and the hard term's target reported as a
        :class:`~leanloss._fused.engine.PointGradient`."""
        dtype = compute_dtype(a.dtype)
        soft = self.hard_weight < 1.0
        y = None if self.hard_weight == 0.0 else self.target[rows]
        g = None if grad_scale is None else grad_scale.reshape(-1)
        n = a.shape[0]
        step = n if not soft else max(_TEACHER_MIN_ROWS, _TEACHER_BYTES // (
            self.teacher_hidden.element_size() * max(a.shape[1], 1)))
        losses = []
        for start in range(0, n, step):
            sub = slice(start, min(start + step, n))
            b = None if not soft else self.teacher_logits(slice(rows.start + sub.start, rows.start + sub.stop))
            a_y = None if y is None else a[sub].gather(1, y[sub].unsqueeze(1)).squeeze(1).to(dtype)
            losses.append(_DISTILL_KERNEL(a[sub], b, a_y, None if g is None else g[sub],
                                          kind=self.kind, beta=self.beta, temperature=self.temperature,
                                          hard_weight=self.hard_weight, dtype=dtype)[0])
        if rows.stop >= self.teacher_hidden.shape[0]:
            self._teacher_buf = None  # last block of this pass
        loss = losses[0] if len(losses) == 1 else torch.cat(losses)
        if g is None or y is None:
            return ScoreResult(loss)
        coef = g * (-self.hard_weight * self.temperature)
        dense = a.gather(1, y.unsqueeze(1)).squeeze(1).to(dtype)
        return ScoreResult(loss, PointGradient(y, coef, dense))


def _as_matrix(t: Tensor) -> Tensor:
    """``(..., D)`` -> ``(N, D)``."""
    return t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t


def _check_fused_inputs(fn, student_hidden, student_weight, student_bias, teacher_hidden,
                        teacher_weight, teacher_bias) -> None:
    """Each head's shapes (``check_linear_shapes``), then the pairing of the two heads."""
    for side, h, w, bias in (("student", student_hidden, student_weight, student_bias),
                             ("teacher", teacher_hidden, teacher_weight, teacher_bias)):
        _checks.check_linear_shapes(fn, h, w, bias, None, hidden_name=f"{side}_hidden",
                                    weight_name=f"{side}_weight", bias_name=f"{side}_bias")
    if not _checks.shapes_enabled():
        return
    _checks.check_same_device(fn, student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise _checks.LeanlossValueError(
            f"{fn}: argument 'teacher_weight' must have the student's vocabulary size "
            f"{student_weight.shape[0]} rows, got {_checks.fmt_shape(teacher_weight)}"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise _checks.LeanlossValueError(
            f"{fn}: argument 'teacher_hidden' must have the leading shape of 'student_hidden' "
            f"{tuple(student_hidden.shape[:-1])} (one teacher row per student row), got "
            f"{tuple(teacher_hidden.shape[:-1])}"
        )


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
) -> Tensor:
    r"""Distillation loss of two linear heads without the (tokens, vocab) logits.

    Equals :func:`leanloss.distill_loss` (same ``kind``, ``beta``, ``temperature``,
    ``ignore_index``, ``hard_weight``, ``reduction``; see there for the formula) on
    ``student_logits = student_hidden @ student_weight.T + student_bias`` and
    ``teacher_logits = teacher_hidden @ teacher_weight.T + teacher_bias``, in value and in the
    gradients of ``student_hidden``, ``student_weight`` and ``student_bias``.

    Args:
        student_hidden: ``(..., D)``; student_weight: ``(V, D)``; student_bias: ``(V,)``.
        teacher_hidden: ``(..., Dt)`` with the student's leading shape; teacher_weight:
            ``(V, Dt)``; teacher_bias: ``(V,)``. The teacher side is computed without autograd
            and never gets a gradient.
        target: optional class indices ``(...)``; rows with ``ignore_index`` are dropped from
            both hidden tensors before any matmul. Required when ``hard_weight > 0``.
        reduction: ``'none'`` (shape ``(...)``, 0 at ignored rows; backward recomputes the
            blocks) | ``'sum'`` | ``'mean'`` (over the kept rows).
        chunk_size: rows per block (default: the engine's plan, :func:`leanloss._fused.engine.plan_chunk`).

    Cost: the engine's three student matmuls plus the teacher's forward matmul; at most a few
    ``(chunk_size, V)`` blocks in the matmul dtype plus a teacher block of at most 128 MiB (or
    512 rows) are alive. Matmuls run in the inputs' dtypes,
    the softmaxes and accumulation in float32 (float64 stays float64); the loss is returned in
    that compute dtype.
    """
    fn = "linear_distill_loss"
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias) = \
        autocast_matmul_operands(student_hidden, student_weight, student_bias,
                                 teacher_hidden, teacher_weight, teacher_bias)
    reduction = resolve_reduction(reduction)
    beta, temperature, hard_weight = _checks.check_distill_options(fn, kind, beta, temperature, hard_weight)
    _check_fused_inputs(fn, student_hidden, student_weight, student_bias, teacher_hidden,
                        teacher_weight, teacher_bias)
    lead = tuple(student_hidden.shape[:-1])
    _checks.check_distill_target(fn, target, lead, student_weight.shape[0], ignore_index, hard_weight)
    if target is not None:
        _checks.check_same_device(fn, student_hidden=student_hidden, target=target)
    hs = _as_matrix(student_hidden)
    ht = _as_matrix(teacher_hidden).detach()
    kept = tgt = None
    if target is not None:
        kept, tgt, hs, ht = select_kept(target.reshape(-1), ignore_index, hs, ht)
        tgt = tgt.long()
    if temperature != 1.0:  # the engine's blocks become z_s / T: no (N, V) scaling pass
        hs = hs * (1.0 / temperature)
        student_bias = None if student_bias is None else student_bias * (1.0 / temperature)
    scorer = DistillScorer(
        ht, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(), tgt,
        kind=kind, beta=beta, temperature=temperature, hard_weight=hard_weight,
    )
    loss = fused_linear_loss(hs, student_weight, student_bias, scorer, reduction=reduction,
                             divisor=hs.shape[0], chunk_size=chunk_size)
    if reduction != "none":
        return loss
    if kept is not None:
        loss = scatter_rows(loss, kept, target.numel())
    return loss.reshape(lead)
