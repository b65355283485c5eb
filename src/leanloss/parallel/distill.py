r"""Fused distillation with both LM heads' rows (the vocabulary) split across ranks.

The row loss and its gradient are :func:`leanloss.linear_distill_loss`'s (stated in
:mod:`leanloss.linear.distill`): with :math:`a = z_s / T`, :math:`b = z_t / T`,
:math:`q = \mathrm{softmax}(a)`, :math:`p = \mathrm{softmax}(b)`, :math:`A = \mathrm{lse}(a)`,
:math:`B = \mathrm{lse}(b)`, the row loss is :math:`a_h \mathrm{CE}(z_s, y) + (1-a_h) T^2 D`.
Here every rank holds a slice of ``a`` and ``b``; the softmaxes, log-sum-exps and the row dot
products of ``D`` are global, so per block of rows they are reduced from per-row, per-rank
numbers, and the gradient with respect to this rank's slice is then local:

* all-reduce MAX of :math:`(\max a, \max b)`, giving shifts :math:`m_a, m_b`;
* all-reduce SUM of :math:`s_a = \sum e^{a - m_a}`, :math:`s_b = \sum e^{b - m_b}` and
  the kind's dot product (forward: :math:`\sum e^{b - m_b}(b - a)`, so
  :math:`\langle p, b - a\rangle = \cdot / s_b`; reverse: :math:`\sum e^{a - m_a}(a - b)`), and
  with the hard term :math:`\sum e^{T(a - m_a)}` and the target's :math:`z_{s,y}` (from its
  owner);
* jsd only: one more all-reduce SUM of :math:`\langle p, \log p - \lambda\rangle` and
  :math:`\langle q, s\rangle`, :math:`\lambda = \log(q + \tfrac{\beta}{1-\beta} p)`,
  :math:`s = \lambda - \log q` (it needs the global :math:`A, B` first).

So at most 3 (forward/reverse) or 5 (jsd) numbers per row travel per rank, never a logit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._compile import graph_break
from .. import _checks
from .._reduce import resolve_reduction
from .._fused.engine import ScoreResult, fused_linear_loss
from .._fused.rows import scatter_rows, select_kept
from ._comm import VocabShard, all_reduce_, copy_to_vocab_parallel
from .._dtensor import has_dtensor, unwrap
from ._setup import find_shard

__all__ = ["VocabParallelDistillScorer", "vocab_parallel_linear_distill_loss"]


class VocabParallelDistillScorer:
    """Per-block distillation over a vocabulary split across ranks (see the module docstring).

    The engine's blocks are this rank's ``a = z_s / T``; ``teacher_hidden`` ``(M, Dt)`` and
    ``target`` ``(M,)`` global ids (or ``None``) are aligned with the rows the engine walks.
    Every call communicates, so every rank must walk the same blocks (a shared chunk size).
    """

    def __init__(self, shard: VocabShard, teacher_hidden: Tensor, teacher_weight: Tensor,
                 teacher_bias: Optional[Tensor], target: Optional[Tensor], *, kind: str,
                 beta: float, temperature: float, hard_weight: float) -> None:
        self.shard = shard
        self.teacher_hidden, self.teacher_weight, self.teacher_bias = teacher_hidden, teacher_weight, teacher_bias
        self.kind = {0.0: "forward", 1.0: "reverse"}.get(beta, kind) if kind == "jsd" else kind
        self.beta, self.temperature, self.hard_weight = float(beta), float(temperature), float(hard_weight)
        self.owned = self.local_target = None
        if target is not None and self.hard_weight > 0.0:
            local = target - shard.start
            self.owned = (local >= 0) & (local < shard.size)
            self.local_target = torch.where(self.owned, local, torch.zeros_like(local))

    def _all_reduce(self, t: Tensor, op) -> Tensor:
        return all_reduce_(t, op, self.shard.group, self.shard.world_size)

    low_precision_blocks = False
    outputs = 1

    def score(self, a: Tensor, rows: slice, saved: Optional[Tensor],
              grad_scale: Optional[Tensor]) -> ScoreResult:
        n, temp, hw = a.shape[0], self.temperature, self.hard_weight
        if n == 0:  # the same on every rank: no collective is skipped by only some of them
            return ScoreResult(a.new_empty(0))
        soft, hard = hw < 1.0, hw > 0.0
        has_local = self.shard.size > 0
        with torch.no_grad():
            b = None
            if soft:
                h = self.teacher_hidden[rows]
                bias = self.teacher_bias
                b = h @ self.teacher_weight.T if bias is None else torch.addmm(bias, h, self.teacher_weight.T)
                b = b.to(a.dtype).mul_(1.0 / temp)

        def local_max(x: Tensor) -> Tensor:
            return x.amax(1) if has_local else x.new_full((n,), float("-inf"))

        shifts = torch.stack([local_max(a)] + ([local_max(b)] if soft else []), 1)
        self._all_reduce(shifts, dist.ReduceOp.MAX)
        m_a = shifts[:, 0]
        ea = torch.exp(a - m_a[:, None])
        sums = [ea.sum(1)]
        if soft:
            m_b = shifts[:, 1]
            eb = torch.exp(b - m_b[:, None])
            sums.append(eb.sum(1))
            if self.kind == "forward":
                sums.append((eb * (b - a)).sum(1))
            elif self.kind == "reverse":
                sums.append((ea * (a - b)).sum(1))
        if hard:
            ez = ea if temp == 1.0 else torch.exp((a - m_a[:, None]) * temp)
            picked = a.gather(1, self.local_target[rows, None]).squeeze(1) if has_local else a.new_zeros(n)
            sums += [ez.sum(1), torch.where(self.owned[rows], picked * temp, torch.zeros_like(picked))]
        stats = self._all_reduce(torch.stack(sums, 1), dist.ReduceOp.SUM)
        s_a = stats[:, 0]
        q = ea.div_(s_a[:, None])
        lse_a = m_a + s_a.log()
        loss = a.new_zeros(n)
        grad = a.new_zeros(a.shape) if grad_scale is not None else None
        if soft:
            s_b = stats[:, 1]
            p = eb.div_(s_b[:, None])
            lse_b = m_b + s_b.log()
            div, d_div = self._divergence(a, b, q, p, lse_a, lse_b, stats, grad is not None)
            loss += ((1.0 - hw) * temp * temp) * div
            if grad is not None:
                grad += ((1.0 - hw) * temp * temp) * d_div
        if hard:
            s_z, z_y = stats[:, -2], stats[:, -1]
            loss += hw * (temp * m_a + s_z.log() - z_y)
            if grad is not None:  # d/da of the hard term: T (softmax(T a) - onehot(y))
                softmax_z = q if temp == 1.0 else ez.div_(s_z[:, None])  # ez is ea (now q) at T = 1
                grad.add_(softmax_z, alpha=hw * temp)
                hit = torch.where(self.owned[rows], torch.full_like(z_y, -hw * temp), torch.zeros_like(z_y))
                if has_local:
                    grad.scatter_add_(1, self.local_target[rows, None], hit[:, None])
        if grad is not None:
            a.copy_(grad.mul_(grad_scale.reshape(-1, 1)))
        return ScoreResult(loss)

    def _divergence(self, a, b, q, p, lse_a, lse_b, sums, want):
        """``(D, dD/da)`` per row from the reduced statistics (``dD/da`` only when ``want``)."""
        if self.kind == "forward":  # <p, b - a> + A - B;  q - p
            return sums[:, 2] / sums[:, 1] + lse_a - lse_b, (q - p if want else None)
        if self.kind == "reverse":  # <q, a - b> - A + B;  q (a - b - <q, a - b>)
            dot = sums[:, 2] / sums[:, 0]
            return dot - lse_a + lse_b, (q * ((a - b) - dot[:, None]) if want else None)
        beta = self.beta
        lam = torch.add(q, p, alpha=beta / (1.0 - beta)).clamp_min_(torch.finfo(a.dtype).tiny).log_()
        s = lam - (a - lse_a[:, None])  # lambda - log q
        dots = torch.stack([(p * ((b - lse_b[:, None]) - lam)).sum(1), (q * s).sum(1)], 1)
        self._all_reduce(dots, dist.ReduceOp.SUM)
        div = beta * dots[:, 0] - (1.0 - beta) * dots[:, 1] - math.log1p(-beta)
        return div, ((1.0 - beta) * q * (dots[:, 1:2] - s) if want else None)


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
) -> Tensor:
    r""":func:`leanloss.linear_distill_loss` with both heads' rows split across ``group``.

    Equals ``linear_distill_loss`` on the heads concatenated over the ranks (same ``kind``,
    ``beta``, ``temperature``, ``hard_weight``, ``ignore_index``, ``reduction``), in value and in
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
    _check_heads(fn, student_hidden, student_local_weight, student_bias, teacher_hidden,
                 teacher_local_weight, teacher_bias)
    lead = student_hidden.shape[:-1]
    if target is None and hard_weight > 0:
        raise _checks.LeanlossValueError(
            f"{fn}: argument 'target' is required when hard_weight > 0 (got hard_weight={hard_weight})")
    if target is not None:
        _checks.check_tensor(fn, "target", target)
        if _checks.shapes_enabled():
            _checks.check_row_targets(fn, target, lead, "the student")
    shard = find_shard(fn, student_hidden.device, student_local_weight.shape[0], target, group,
                       vocab_start, ignore_index, sizes)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    keep, tgt = None, None
    if target is not None:
        keep, tgt, hs, ht = select_kept(target.reshape(-1), ignore_index, hs, ht)
        tgt = tgt.long()
    hs = copy_to_vocab_parallel(hs, shard)
    if temperature != 1.0:  # the engine's blocks become z_s / T
        hs = hs * (1.0 / temperature)
        student_bias = None if student_bias is None else student_bias * (1.0 / temperature)
    scorer = VocabParallelDistillScorer(
        shard, ht, teacher_local_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
        tgt, kind=kind, beta=beta, temperature=temperature, hard_weight=hard_weight)
    rows = hs.shape[0]
    loss = fused_linear_loss(hs, student_local_weight, student_bias, scorer, reduction=reduction,
                             divisor=rows, chunk_size=chunk_size, policy_vocab=shard.max_size)
    if reduction != "none":
        return loss
    return scatter_rows(loss, keep, lead.numel()).reshape(lead)
