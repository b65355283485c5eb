r"""Distillation divergences on materialized logits / log-probabilities.

Notation: :math:`p` is the teacher's distribution (``target`` of :func:`jsd`), :math:`q` the
student's (``input``). With :math:`\beta \in [0, 1]` and the mixture
:math:`m = \beta p + (1 - \beta) q`, the **generalized Jensen-Shannon divergence** is

.. math::
    \mathrm{JSD}_\beta(p, q) = \beta\,\mathrm{KL}(p \,\|\, m) + (1 - \beta)\,\mathrm{KL}(q \,\|\, m),
    \qquad 0 < \beta < 1,

with :math:`\log m = \mathrm{logaddexp}(\log\beta + \log p, \log(1-\beta) + \log q)` (log
space; :math:`\beta = 1/2` is the ordinary JS divergence, at most :math:`\log 2`).

**Endpoints.** :math:`\mathrm{JSD}_\beta \to 0` at both ends (the mixture collapses onto one
distribution), but its normalization :math:`\mathrm{JSD}_\beta / (\beta(1-\beta))` tends to
:math:`\mathrm{KL}(p\|q)` as :math:`\beta \to 0` and to :math:`\mathrm{KL}(q\|p)` as
:math:`\beta \to 1` (expand :math:`m` to first order in :math:`\beta` resp. :math:`1-\beta`).
leanloss implements the interior without that normalization and, at the endpoints, those limits:

.. math::
    \mathrm{JSD}_0 := \mathrm{KL}(p \,\|\, q) \;(\text{forward}), \qquad
    \mathrm{JSD}_1 := \mathrm{KL}(q \,\|\, p) \;(\text{reverse}).

This is the convention of the GKD paper's ``beta`` as implemented by TRL's ``GKDTrainer`` and
Liger-Kernel's JSD, so values match theirs for every ``beta``. Note the jump at the endpoints:
``beta=1e-6`` gives about ``1e-6 * KL(p||q)``, ``beta=0`` gives ``KL(p||q)``.

Every term :math:`x \log(x / y)` is taken as 0 where :math:`x = 0` (xlogy convention), also
when :math:`\log x = -\infty`, so the divergences are finite when a probability underflows to 0
(or a logit is ``-inf``) on the side that weights the term.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _checks, _heuristics
from .._dtypes import autocast_loss_inputs, compute_dtype, upcast
from .._fused.distill_rows import resolve_kind
from .._reduce import mix_hard_and_reduce, reduce_loss, resolve_reduction

__all__ = ["distill_loss", "jsd", "topk_distill_loss", "divergence_terms", "topk_teacher", "KINDS"]

#: ``kind`` values of the distillation losses
KINDS = _checks.DISTILL_KINDS


def _xlogratio(x: Tensor, log_x: Tensor, log_y: Tensor) -> Tensor:
    """Elementwise ``x * (log_x - log_y)``, exactly 0 where ``x == 0`` (gradients stay finite)."""
    pos = x > 0
    zero = x.new_zeros(())
    return torch.where(pos, x * (torch.where(pos, log_x, zero) - torch.where(pos, log_y, zero)), zero)


def divergence_terms(log_p: Tensor, log_q: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    r"""Elementwise terms whose sum over the classes is the divergence of the module docstring.

    ``log_p``: teacher log-probabilities, ``log_q``: student log-probabilities (broadcastable).
    ``kind='forward'``: :math:`p(\log p - \log q)`; ``'reverse'``: :math:`q(\log q - \log p)`;
    ``'jsd'``: :math:`\beta p(\log p - \log m) + (1-\beta) q(\log q - \log m)` for
    :math:`0<\beta<1`, the forward terms at :math:`\beta=0` and the reverse terms at
    :math:`\beta=1` (:func:`leanloss._fused.distill_rows.resolve_kind`).

    This log-space form, differentiated by autograd, is the reference statement of the
    divergences; the fused losses state the same divergences once, from row sums, in
    :mod:`leanloss._fused.distill_rows`, and are tested against this one.
    """
    kind = resolve_kind(kind, beta)
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward":
        return _xlogratio(p, log_p, log_q)
    if kind == "reverse":
        return _xlogratio(q, log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _xlogratio(p, log_p, log_m) + (1.0 - beta) * _xlogratio(q, log_q, log_m)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    kind: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    r"""Knowledge-distillation loss between student and teacher logits (no torch twin).

    With :math:`T` = ``temperature``, :math:`q = \mathrm{softmax}(s / T)`,
    :math:`p = \mathrm{softmax}(t / T)` along the last dimension and :math:`a` = ``hard_weight``,
    the loss of row :math:`i` is

    .. math::
        \ell_i = a\,\mathrm{CE}(s_i, y_i) + (1 - a)\,T^2\,D(p_i, q_i)

    where :math:`\mathrm{CE}(s_i, y_i) = \mathrm{logsumexp}(s_i) - s_{i, y_i}` is the cross
    entropy of the **untempered** student logits and :math:`D` is, by ``kind``:
    ``'forward'`` :math:`\mathrm{KL}(p\|q)`, ``'reverse'`` :math:`\mathrm{KL}(q\|p)`,
    ``'jsd'`` :math:`\mathrm{JSD}_\beta(p, q)` with :math:`m = \beta p + (1-\beta) q` (see the
    module docstring for the endpoints :math:`\beta \in \{0, 1\}`: forward resp. reverse KL).
    The factor :math:`T^2` (Hinton et al., 2015) keeps the soft gradients' scale independent
    of :math:`T`.

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(..., V)``, the same shape (gradients flow to it too when it
            requires grad; detach it for the usual frozen teacher).
        target: optional class indices ``(...)``; rows whose target is ``ignore_index`` are
            excluded from **both** terms (loss 0, no gradient, not counted by ``'mean'``).
            Required when ``hard_weight > 0``.
        kind: ``'forward'`` | ``'reverse'`` | ``'jsd'``; beta: :math:`\beta \in [0, 1]`.
        temperature: :math:`T > 0`; hard_weight: :math:`a \in [0, 1]`.
        reduction: ``'none'`` (shape ``(...)``, 0 at ignored rows) | ``'sum'`` | ``'mean'``
            (sum over the kept rows divided by their number; ``nan`` when all are ignored).

    All of it is computed from ``log_softmax`` in log space, in float32 for 16-bit inputs
    (float64 stays float64); the loss is returned in that compute dtype. Finite when a teacher
    probability underflows to 0. The fused form is :func:`leanloss.linear_distill_loss`.
    """
    fn = "distill_loss"
    reduction = resolve_reduction(reduction)
    student_logits, teacher_logits = autocast_loss_inputs(fn, student_logits, teacher_logits)
    beta, temperature, hard_weight = _checks.check_distill_options(fn, kind, beta, temperature, hard_weight)
    _checks.check_tensor(fn, "student_logits", student_logits)
    _checks.check_tensor(fn, "teacher_logits", teacher_logits)
    if _checks.shapes_enabled():
        _checks.check_floating(fn, "student_logits", student_logits, "logits")
        _checks.check_floating(fn, "teacher_logits", teacher_logits, "logits")
        _checks.check_same_device(fn, student_logits=student_logits, teacher_logits=teacher_logits,
                                  target=target)
        if student_logits.dim() < 1 or student_logits.shape != teacher_logits.shape:
            raise _checks.LeanlossValueError(
                f"{fn}: arguments 'student_logits' and 'teacher_logits' must have the same shape "
                f"(..., V), got {_checks.fmt_shape(student_logits)} and {_checks.fmt_shape(teacher_logits)}"
            )
    _checks.check_distill_target(fn, target, student_logits.shape[:-1], student_logits.shape[-1],
                                 ignore_index, hard_weight)
    dtype = compute_dtype(torch.promote_types(student_logits.dtype, teacher_logits.dtype))
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    inv_t = 1.0 / temperature
    log_q = torch.log_softmax(s / temperature if inv_t != 1.0 else s, dim=-1)
    log_p = torch.log_softmax(t / temperature if inv_t != 1.0 else t, dim=-1)
    loss = divergence_terms(log_p, log_q, kind, beta).sum(-1)
    loss = mix_hard_and_reduce(loss, s, log_q, target, temperature=temperature,
                                ignore_index=ignore_index, hard_weight=hard_weight, reduction=reduction)
    return _heuristics.finite_or_warn(fn, loss, student_logits=student_logits, teacher_logits=teacher_logits)


def topk_teacher(topk_ids: Tensor, topk_logprobs: Tensor, temperature: float,
                 dtype: torch.dtype):
    """The teacher's tempered distribution over its top-k entries: ``(ids, p, log_p)``.

    ``p = softmax(topk_logprobs / T)`` over the entries whose id is ``>= 0`` (padding entries,
    id ``< 0``, get ``p = 0``, ``log_p = 0`` and id ``0``); a row of padding only has ``p = 0``
    everywhere. Computed without autograd (the teacher gets no gradient), in ``dtype``.
    """
    pad = topk_ids < 0
    lp = topk_logprobs.detach().to(dtype)
    if temperature != 1.0:
        lp = lp / temperature
    lp = torch.log_softmax(lp.masked_fill(pad, float("-inf")), dim=-1)
    lp = torch.where(pad, torch.zeros((), dtype=dtype, device=lp.device), lp)  # all-padding rows: nan -> 0
    p = torch.where(pad, torch.zeros((), dtype=dtype, device=lp.device), lp.exp())
    return topk_ids.clamp_min(0), p, lp


def topk_distill_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    target: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    r"""Distillation from a teacher's stored top-k log-probabilities (offline distillation).

    With :math:`T` = ``temperature``, the teacher's distribution over its ``k`` entries
    :math:`p = \mathrm{softmax}(\ell / T)` (:math:`\ell` = ``topk_logprobs``, renormalized over
    the entries that are not padding), the student's :math:`\log q = \mathrm{log\_softmax}(s / T)`
    over the WHOLE vocabulary, read at the teacher's ids, and :math:`a` = ``hard_weight``:

    .. math::
        \ell_r = a\,\mathrm{CE}(s_r, y_r) + (1 - a)\,T^2 \sum_i p_i (\log p_i - \log q_{\mathrm{id}_i})

    (the forward KL of the renormalized top-k teacher to the student; :math:`\mathrm{CE}` on
    the untempered logits, as in :func:`distill_loss`). Terms with :math:`p_i = 0` are 0; a row
    whose entries are all padding has no soft term.

    Args:
        student_logits: ``(..., V)``.
        topk_ids: ``(..., k)`` int64 class ids of the teacher's top-k entries per row; ids
            ``< 0`` are padding (rows with fewer than ``k`` entries).
        topk_logprobs: ``(..., k)`` the teacher's log-probabilities at those ids (at ``T = 1``;
            only their differences matter, so top-k logits give the same loss). No gradient
            flows to them.
        target: optional class indices ``(...)``; rows whose target is ``ignore_index`` are
            excluded (loss 0, no gradient, not counted by ``'mean'``). Required when
            ``hard_weight > 0``; all rows count when ``None``.
        temperature: :math:`T > 0`; hard_weight: :math:`a \in [0, 1]`.
        reduction: ``'none'`` (shape ``(...)``, 0 at excluded rows) | ``'sum'`` | ``'mean'``
            (over the counted rows; ``nan`` when none is).

    Computed in float32 for 16-bit inputs (float64 stays float64); the loss is returned in that
    dtype. The fused form is :func:`leanloss.linear_topk_distill_loss`.
    """
    fn = "topk_distill_loss"
    reduction = resolve_reduction(reduction)
    _checks.check_tensor(fn, "student_logits", student_logits)
    if _checks.shapes_enabled():
        _checks.check_floating(fn, "student_logits", student_logits, "logits")
        if student_logits.dim() < 1:
            raise _checks.LeanlossValueError(
                f"{fn}: argument 'student_logits' must have shape (..., V), got a 0-dim tensor")
    rows_shape = student_logits.shape[:-1]
    temperature, hard_weight = _checks.check_topk_options(
        fn, topk_ids, topk_logprobs, rows_shape, student_logits.shape[-1], target, ignore_index,
        temperature, hard_weight)
    _heuristics.warn_if_topk_probabilities(fn, "topk_logprobs", topk_logprobs, topk_ids)
    dtype = compute_dtype(student_logits.dtype)
    s = student_logits.to(dtype)
    log_q = torch.log_softmax(s / temperature if temperature != 1.0 else s, dim=-1)
    ids, p, log_p = topk_teacher(topk_ids, topk_logprobs, temperature, dtype)
    soft = _xlogratio(p, log_p, log_q.gather(-1, ids)).sum(-1)
    loss = mix_hard_and_reduce(soft, s, log_q, target, temperature=temperature,
                                ignore_index=ignore_index, hard_weight=hard_weight, reduction=reduction)
    return _heuristics.finite_or_warn(fn, loss, student_logits=student_logits)


def jsd(
    input: Tensor,
    target: Tensor,
    beta: float = 0.5,
    log_target: bool = False,
    reduction: str = "mean",
) -> Tensor:
    r"""Generalized Jensen-Shannon divergence, elementwise; the conventions of ``kl_div``.

    ``input`` holds the student's log-probabilities :math:`\log q`; ``target`` the teacher's
    probabilities :math:`p` (or :math:`\log p` when ``log_target=True``); they broadcast as in
    ``torch.nn.functional.kl_div``. Elementwise, with :math:`\log m =
    \mathrm{logaddexp}(\log\beta + \log p, \log(1-\beta) + \log q)`:

    .. math::
        \ell = \beta\, p(\log p - \log m) + (1 - \beta)\, q(\log q - \log m), \quad 0 < \beta < 1;
        \qquad \ell = p(\log p - \log q) \;(\beta = 0); \qquad \ell = q(\log q - \log p) \;(\beta = 1)

    (summed over the classes: :math:`\mathrm{JSD}_\beta(p, q)`; the endpoints are the
    forward/reverse KL, the limits of :math:`\mathrm{JSD}_\beta/(\beta(1-\beta))`; see
    :mod:`leanloss.losses.distill`). Terms with a zero weight (:math:`p = 0` resp. :math:`q = 0`)
    are 0. Note ``beta=0`` gives ``kl_div(input, target)``, the forward KL.

    Reductions as ``kl_div``: ``'none'`` (elementwise), ``'sum'``, ``'mean'`` (over every element,
    i.e. divided by batch size *and* number of classes) and ``'batchmean'`` (sum divided by
    ``input.size(0)``: the divergence per sample). Returns ``promote_types(input, target)``;
    16-bit inputs are computed in float32.
    """
    fn = "jsd"
    reduction = resolve_reduction(reduction, allowed=("none", "mean", "sum", "batchmean"))
    input, target = autocast_loss_inputs(fn, input, target)
    beta = _checks.check_in_closed_interval(fn, "beta", beta, 0.0, 1.0)
    _checks.check_tensor(fn, "input", input)
    _checks.check_tensor(fn, "target", target)
    if _checks.shapes_enabled():
        _checks.check_floating(fn, "input", input, "log-probabilities")
        _checks.check_floating(fn, "target", target, "log-probabilities" if log_target else "probabilities")
        _checks.check_same_device(fn, input=input, target=target)
        _checks.check_broadcastable(fn, "target", target, "input", input)
    _heuristics.warn_kl_inputs(fn, input, target, log_target)  # same conventions as kl_div
    out_dtype = torch.promote_types(input.dtype, target.dtype)
    log_q = upcast(input)
    log_p = upcast(target) if log_target else torch.log(upcast(target))
    pointwise = divergence_terms(log_p, log_q, "jsd", beta)
    batch = input.shape[0] if (reduction == "batchmean" and input.dim() > 0) else 1
    loss = reduce_loss(pointwise, reduction, batch_size=batch).to(out_dtype)
    return _heuristics.finite_or_warn(fn, loss, input=input, target=target)
