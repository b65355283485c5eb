r"""Fused distillation on the linear engine: a student and a teacher LM head, no (N, V) logits.

:func:`linear_distill_loss` is :func:`leanloss.distill_loss` on
``student_logits = student_hidden @ student_weight.T + student_bias`` and
``teacher_logits = teacher_hidden @ teacher_weight.T + teacher_bias``, computed block by block
by :func:`leanloss.linear._engine.fused_linear_loss` with a :class:`DistillScorer`: for each
block of student logits the scorer computes the teacher logits of the same rows (without
autograd), the per-row loss and, in place, the gradient with respect to the student logits.

Per-block math, with :math:`a = z_s / T`, :math:`b = z_t / T`, :math:`q = \mathrm{softmax}(a)`,
:math:`p = \mathrm{softmax}(b)`, :math:`A = \mathrm{lse}(a)`, :math:`B = \mathrm{lse}(b)`:

* forward: :math:`D = \langle p, b - a\rangle + A - B`, :math:`\partial D/\partial a = q - p`;
* reverse: :math:`D = \langle q, a - b\rangle - A + B`,
  :math:`\partial D/\partial a = q \odot (e - \langle q, e\rangle)` with :math:`e = a - b`;
* jsd: :math:`\lambda = \log(q + \tfrac{\beta}{1-\beta} p)` (so :math:`\log m = \lambda + \log(1-\beta)`),
  :math:`D = \beta(\langle p, b - \lambda\rangle - B) + (1-\beta)(\langle q, a - \lambda\rangle - A)
  - \log(1-\beta)`, :math:`\partial D/\partial a = (1-\beta)\, q \odot (r - \langle q, r\rangle)`
  with :math:`r = a - \lambda`;
* hard term: :math:`\mathrm{CE} = \mathrm{lse}(z_s) - z_{s,y}`, gradient
  :math:`\mathrm{softmax}(z_s) - \mathrm{onehot}(y)`;

and the row loss is :math:`a_h \mathrm{CE} + (1-a_h) T^2 D`. :func:`linear_distill_loss` folds
:math:`1/T` into the student's hidden states and bias (an ``(N, D)`` operation), so the engine's
block is :math:`a` itself, and the scorer hands the engine the gradient with respect to
:math:`a` in row-scaled form (a block times a per-row scale that the engine applies on the
``(n, D)`` side of the backward matmuls, one block pass less):
:math:`a_h T(\mathrm{softmax}(z_s) - \mathrm{onehot}(y)) + (1-a_h) T^2 \partial D/\partial a`.
The log-sum-exps come from the softmax itself (:math:`\mathrm{lse}(x) = \max x - \log
\max \mathrm{softmax}(x)`), so each side costs one softmax and two read-only max passes. The
jsd mixture is formed in probability space and floored at the smallest normal float before its
log; the terms this can affect weigh less than ``1e-35``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from .._dtypes import autocast_matmul_operands
from .._reduce import resolve_reduction
from ..losses.distill import check_distill_options, check_distill_target
from ._engine import Scorer, fused_linear_loss
from ._rows import kept_rows, scatter_rows

__all__ = ["DistillScorer", "linear_distill_loss"]

# Bytes per float32 array of one elementwise sub-block: the several passes over the rows' logits,
# teacher logits and probabilities then run from cache rather than from memory.
_SUB_BYTES = 4 * 2**20


def _softmax_lse(x: Tensor, out: Tensor):
    """``softmax(x)`` along dim 1 into ``out``, and each row's log-sum-exp
    ``max(x) - log(max(softmax(x)))``: one softmax and two read-only max passes (cheaper than
    ``logsumexp``, which materializes ``exp(x - max)``, or than a max with indices)."""
    torch.ops.aten._softmax.out(x, 1, False, out=out)
    return out, x.amax(1) - out.amax(1).log()


def _rowdot(x: Tensor, y: Tensor, scratch: Tensor) -> Tensor:
    """``(x * y).sum(1)``, the product written to ``scratch`` (which may be ``y``); pairwise
    summation (a batched matmul is slower here and less accurate)."""
    return torch.mul(x, y, out=scratch).sum(1)


class _Workspace:
    """``(n, V)`` buffers reused by every block of one pass over the rows.

    A fresh block-sized tensor per block is a fresh ``mmap`` (page faults and kernel zeroing of
    every page); the buffers are allocated at the first (largest) block and dropped after the
    last one, so nothing outlives the pass.
    """

    def __init__(self) -> None:
        self.buffers: dict = {}

    def get(self, name: str, n: int, vocab: int, dtype: torch.dtype, device) -> Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < n or buf.dtype != dtype:
            buf = self.buffers[name] = torch.empty((n, vocab), dtype=dtype, device=device)
        return buf[:n]

    def clear(self) -> None:
        self.buffers.clear()


class DistillScorer(Scorer):
    """The per-block distillation math of :func:`linear_distill_loss` (see the module docstring).

    The engine's blocks must be the student logits divided by ``temperature``;
    ``teacher_hidden`` ``(M, Dt)`` and ``target`` ``(M,)`` (or ``None``) are aligned with the
    rows the engine walks; the teacher tensors must not require grad.
    """

    def __init__(self, teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                 target: Optional[Tensor], *, kind: str, beta: float, temperature: float,
                 hard_weight: float) -> None:
        self.teacher_hidden, self.teacher_weight, self.teacher_bias = teacher_hidden, teacher_weight, teacher_bias
        self.target = target
        self.kind = {0.0: "forward", 1.0: "reverse"}.get(beta, kind) if kind == "jsd" else kind
        self.beta, self.temperature, self.hard_weight = float(beta), float(temperature), float(hard_weight)
        self.ws = _Workspace()

    def buffer(self, name: str, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        return self.ws.get(name, like.shape[0], like.shape[1], dtype or like.dtype, like.device)

    def teacher_logits(self, rows: slice, like: Tensor) -> Tensor:
        """``(teacher_hidden[rows] @ teacher_weight.T + teacher_bias) / T`` in ``like``'s dtype."""
        h, w, bias = self.teacher_hidden[rows], self.teacher_weight, self.teacher_bias
        inv_t = 1.0 / self.temperature
        out = self.buffer("teacher", like, h.dtype)
        if bias is None and inv_t == 1.0:
            torch.mm(h, w.T, out=out)
        else:
            base = h.new_zeros(()) if bias is None else bias
            torch.addmm(base, h, w.T, beta=0.0 if bias is None else inv_t, alpha=inv_t, out=out)
        return out if out.dtype == like.dtype else self.buffer("b", like).copy_(out)

    def score(self, logits: Tensor, rows: slice, grad_scale: Optional[Tensor]):
        """Per-row losses; with ``grad_scale`` also ``row_scale`` (the engine's row-scaled form:
        the gradient is ``row_scale[:, None] * logits``, the scale applied on the (n, D) side).

        The teacher block is one matmul for the whole block; the elementwise work then walks it
        in sub-blocks of about ``_SUB_BYTES`` per array, so its several passes stay in cache."""
        # ``logits`` is a = z_s / T: the caller folded 1/T into the student's hidden and bias.
        a = logits
        want = grad_scale is not None
        b = None
        if self.hard_weight < 1.0:
            with torch.no_grad():
                b = self.teacher_logits(rows, a)
        y = None if self.hard_weight == 0.0 else self.target[rows].unsqueeze(1)
        loss = a.new_empty(a.shape[0])
        step = max(1, _SUB_BYTES // (a.element_size() * max(a.shape[1], 1)))
        scale = 1.0
        for sub in range(0, a.shape[0], step):
            r = slice(sub, sub + step)
            loss[r], scale = self._score_rows(a[r], None if b is None else b[r], None if y is None else y[r], want)
        if rows.stop >= self.teacher_hidden.shape[0]:
            self.ws.clear()  # last block of this pass
        return (loss, grad_scale.view(-1) * scale) if want else loss

    def _score_rows(self, a: Tensor, b: Optional[Tensor], y: Optional[Tensor], want: bool):
        """Loss of rows ``a`` (teacher rows ``b``, targets ``y``); with ``want``, overwrites ``a``
        with the gradient divided by the returned ``scale`` (a Python float)."""
        hw, temp = self.hard_weight, self.temperature
        soft, hard = b is not None, y is not None
        if hard:
            z_y = a.gather(1, y).squeeze(1) * temp
            hard_probs = hard_lse = None
            if not soft or temp != 1.0:
                z = a if temp == 1.0 else torch.mul(a, temp, out=self.buffer("z", a))
                hard_probs, hard_lse = _softmax_lse(z, self.buffer("hard", a))
        loss = a.new_zeros(a.shape[0])
        scale = hw * temp  # d/da of the hard term is T * d/dz
        if soft:
            div, q, lse_a, factor = getattr(self, "_" + self.kind)(a, b, want)
            loss += ((1.0 - hw) * temp * temp) * div
            if hard and hard_probs is None:
                hard_probs, hard_lse = q, lse_a
            scale = (1.0 - hw) * temp * temp * factor  # a holds (T^2 (1 - hw) dD/da) / scale
        if hard:
            loss += hw * (hard_lse - z_y)
            if want:
                c = hw * temp / scale
                if soft:
                    a.add_(hard_probs, alpha=c)
                else:
                    a.copy_(hard_probs)
                a.scatter_add_(1, y, torch.full_like(z_y, -c).unsqueeze(1))
        return loss, scale

    # Each kind: (a, b, want) -> (divergence per row, q, lse(a), factor); with ``want``,
    # overwrites a with dD/da / factor. ``b`` (the teacher block) and the workspace are the
    # scorer's own.

    def _forward(self, a: Tensor, b: Tensor, want: bool):
        p, lse_b = _softmax_lse(b, self.buffer("p", a))
        q, lse_a = _softmax_lse(a, self.buffer("q", a))
        div = _rowdot(p, b.sub_(a), b) + (lse_a - lse_b)
        if want:
            torch.sub(q, p, out=a)
        return div, q, lse_a, 1.0

    def _reverse(self, a: Tensor, b: Tensor, want: bool):
        q = self.buffer("q", a)
        _, lse_b = _softmax_lse(b, q)  # the teacher's probabilities are not needed
        q, lse_a = _softmax_lse(a, q)
        e = b.sub_(a)  # b - a
        r = _rowdot(q, e, self.buffer("p", a)).unsqueeze(1)
        div = (lse_b - lse_a) - r.squeeze(1)
        if want:
            torch.sub(r, e, out=e)  # (a - b) - <q, a - b>
            torch.mul(q, e, out=a)
        return div, q, lse_a, 1.0

    def _jsd(self, a: Tensor, b: Tensor, want: bool):
        beta = self.beta
        log_rest = math.log1p(-beta)
        p, lse_b = _softmax_lse(b, self.buffer("p", a))
        q, lse_a = _softmax_lse(a, self.buffer("q", a))
        lam = torch.add(q, p, alpha=beta / (1.0 - beta), out=self.buffer("lam", a))
        lam.clamp_min_(torch.finfo(a.dtype).tiny).log_()
        b.sub_(lam)
        a.sub_(lam)
        kl_pm = _rowdot(p, b, lam) - lse_b - log_rest
        r = _rowdot(q, a, b).unsqueeze(1)
        kl_qm = r.squeeze(1) - lse_a - log_rest
        div = beta * kl_pm + (1.0 - beta) * kl_qm
        if want:
            a.sub_(r).mul_(q)  # q * (r_j - <q, r>), r = a - lambda
        return div, q, lse_a, 1.0 - beta


def _rows(t: Tensor) -> Tensor:
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
        chunk_size: rows per block (default: the engine's, about 32 MiB of float32 logits).

    Cost: the engine's three student matmuls plus the teacher's forward matmul; at most a few
    ``(chunk_size, V)`` float32 blocks are alive at a time. Matmuls run in the inputs' dtypes,
    the softmaxes and accumulation in float32 (float64 stays float64); the loss is returned in
    that compute dtype.
    """
    fn = "linear_distill_loss"
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias) = \
        autocast_matmul_operands(student_hidden, student_weight, student_bias,
                                 teacher_hidden, teacher_weight, teacher_bias)
    reduction = resolve_reduction(reduction)
    beta, temperature, hard_weight = check_distill_options(fn, kind, beta, temperature, hard_weight)
    _check_fused_inputs(fn, student_hidden, student_weight, student_bias, teacher_hidden,
                        teacher_weight, teacher_bias)
    lead = tuple(student_hidden.shape[:-1])
    check_distill_target(fn, target, lead, student_weight.shape[0], ignore_index, hard_weight)
    if target is not None:
        _checks.check_same_device(fn, student_hidden=student_hidden, target=target)
    hs = _rows(student_hidden)
    ht = _rows(teacher_hidden).detach()
    kept = None
    tgt = None
    if target is not None:
        tgt = target.reshape(-1)
        kept = kept_rows(tgt, ignore_index)
        if kept is not None:
            hs, ht, tgt = hs.index_select(0, kept), ht.index_select(0, kept), tgt.index_select(0, kept)
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
