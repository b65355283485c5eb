"""Cross entropy and negative log-likelihood on materialized logits / log-probabilities.

Both mirror ``torch.nn.functional.cross_entropy`` / ``nll_loss`` in value, gradient, double
gradient, dtype and error behaviour; they are written from ``log_softmax``, ``gather`` and
``where`` so that autograd (and double backward) comes for free.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from .._dtypes import autocast_loss_inputs, upcast
from .._reduce import reduce_loss, resolve_reduction
from ._ce_rows_dense import block_cross_entropy, block_path_applies

__all__ = ["cross_entropy", "nll_loss"]


def _class_dim(input: Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def _classes_last(x: Tensor) -> Tensor:
    """(N, C, d1, ..., dK) -> (N, d1, ..., dK, C); (C) -> (1, C); (N, C) unchanged."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    return x.movedim(1, -1) if x.dim() > 2 else x


def _index_loss(
    fn: str,
    log_probs: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Tensor:
    """Weighted NLL of class-index targets on log-probabilities, with optional smoothing.

    ``log_probs`` has its classes last, shape (M..., C), in the accumulation dtype; ``target``
    has shape (M...). With ``w = weight`` (ones when None), ``v = [target != ignore_index]``:

        nll_i    = -w[t_i] * log_probs[i, t_i] * v_i
        smooth_i = -sum_c w_c * log_probs[i, c] * v_i
        loss_i   = (1 - e) * nll_i + (e / C) * smooth_i

    ``'mean'`` divides both sums by ``sum_i w[t_i] v_i`` (nan when every target is ignored,
    as in torch).
    """
    num_classes = log_probs.shape[-1]
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device))
    safe_target = safe_target.long()
    picked = log_probs.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    if weight is not None:
        w = weight.to(log_probs.dtype)
        w_target = torch.where(valid, w[safe_target], torch.zeros((), dtype=w.dtype, device=w.device))
        nll = torch.where(valid, -(w_target * picked), torch.zeros((), dtype=picked.dtype, device=picked.device))
        denominator = w_target.sum() if reduction == "mean" else None
    else:
        nll = torch.where(valid, -picked, torch.zeros((), dtype=picked.dtype, device=picked.device))
        denominator = valid.sum().to(log_probs.dtype) if reduction == "mean" else None
    loss = reduce_loss(nll, reduction, weight_sum=denominator)
    if label_smoothing > 0.0:
        if weight is not None:
            smooth = -(log_probs * weight.to(log_probs.dtype)).sum(-1)
        else:
            smooth = -log_probs.sum(-1)
        smooth = torch.where(valid, smooth, torch.zeros((), dtype=smooth.dtype, device=smooth.device))
        smooth = reduce_loss(smooth, reduction, weight_sum=denominator)
        loss = (1.0 - label_smoothing) * loss + smooth * (label_smoothing / num_classes)
    return loss


def _check_index_inputs(fn: str, input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int) -> int:
    """Shape, dtype and range checks for class-index targets; returns C."""
    if _checks.shapes_enabled():
        _checks.check_index_target_dtype(fn, target)
        _checks.check_index_target_shape(fn, input, target)
    num_classes = input.shape[_class_dim(input)]
    if _checks.shapes_enabled():
        # with class-index targets torch needs weight.dtype == input.dtype (RuntimeError)
        _checks.check_class_weight(fn, "weight", weight, num_classes, dtype=input.dtype)
    _checks.check_index_target_range(fn, target, num_classes, ignore_index)
    return num_classes


def _check_common(fn: str, input: Tensor, target: Tensor, weight: Optional[Tensor], what: str) -> None:
    """Checks shared by ``nll_loss`` and ``cross_entropy``: tensors, floating input, one device."""
    _checks.check_tensor(fn, "input", input)
    _checks.check_tensor(fn, "target", target)
    if _checks.shapes_enabled():
        _checks.check_floating(fn, "input", input, what)
        _checks.check_same_device(fn, input=input, target=target, weight=weight)


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log-likelihood of class-index targets; mirrors ``torch.nn.functional.nll_loss``.

    .. math::
        \ell_i = -w_{y_i}\, x_{i, y_i}\, [y_i \ne \text{ignore\_index}], \qquad
        \text{mean} = \frac{\sum_i \ell_i}{\sum_i w_{y_i} [y_i \ne \text{ignore\_index}]}

    Args:
        input: log-probabilities, shape (C), (N, C) or (N, C, d1, ..., dK).
        target: class indices (int64), shape (), (N) or (N, d1, ..., dK), in [0, C) or equal to
            ``ignore_index``.
        weight: optional per-class weights, shape (C).
        ignore_index: target value that contributes neither to the loss nor to the mean's divisor.
        reduction: ``'none'`` (shape of ``target``) | ``'mean'`` | ``'sum'``.
        size_average, reduce: torch's deprecated pair, honoured as torch honours it.

    Returns the loss in ``input``'s dtype (float16/bfloat16 are accumulated in float32).
    """
    fn = "nll_loss"
    reduction = resolve_reduction(reduction, size_average, reduce)
    input, target, weight = autocast_loss_inputs(fn, input, target, weight)
    _check_common(fn, input, target, weight, "log-probabilities")
    _check_index_inputs(fn, input, target, weight, ignore_index)
    from .. import _heuristics  # local import: heuristics import this module's neighbours

    _heuristics.warn_if_not_log_probs(fn, input, _class_dim(input))
    log_probs = _classes_last(upcast(input))
    tgt = target.reshape(1) if input.dim() == 1 else target  # () or (1,), as torch accepts
    loss = _index_loss(fn, log_probs, tgt, weight, ignore_index, reduction, 0.0)
    if input.dim() == 1 and reduction == "none":
        loss = loss.squeeze(0)
    return _heuristics.finite_or_warn(fn, loss.to(input.dtype), input=input)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""Cross entropy between logits and targets; mirrors ``torch.nn.functional.cross_entropy``.

    With :math:`q = \mathrm{log\_softmax}(x)` over the class dimension (dim 1, or dim 0 for a
    (C) input) and smoothing :math:`\varepsilon`:

    * class-index targets :math:`y`:
      :math:`\ell_i = (1-\varepsilon)(-w_{y_i} q_{i,y_i}) + \frac{\varepsilon}{C}\sum_c -w_c q_{i,c}`,
      zero where :math:`y_i` = ``ignore_index``; ``'mean'`` divides by
      :math:`\sum_i w_{y_i}` over non-ignored elements (nan when all are ignored).
    * probability targets :math:`p` (floating, same shape as ``input``):
      :math:`\tilde p = (1-\varepsilon) p + \varepsilon / C`,
      :math:`\ell_i = -\sum_c w_c \tilde p_{i,c} q_{i,c}`; ``'mean'`` divides by the number of
      elements ``N * d1 * ... * dK`` (weights do not enter the divisor); ``ignore_index`` does
      not apply.

    Args:
        input: unnormalized logits, shape (C), (N, C) or (N, C, d1, ..., dK).
        target: class indices (int64) of shape (), (N) or (N, d1, ..., dK), or class
            probabilities of the same shape as ``input``.
        weight: optional per-class weights, shape (C).
        ignore_index: class-index target value to skip.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        label_smoothing: :math:`\varepsilon \in [0, 1]`.
        size_average, reduce: torch's deprecated pair, honoured as torch honours it.

    Returns the loss in ``input``'s dtype (float16/bfloat16 are accumulated in float32).
    """
    fn = "cross_entropy"
    reduction = resolve_reduction(reduction, size_average, reduce)
    input, target, weight = autocast_loss_inputs(fn, input, target, weight)
    _check_common(fn, input, target, weight, "logits")
    label_smoothing = _checks.check_label_smoothing(fn, label_smoothing)
    from .. import _heuristics

    if input.dim() >= 1 and input.shape == target.shape:
        return _probability_target_loss(fn, input, target, weight, ignore_index, reduction, label_smoothing)
    _check_index_inputs(fn, input, target, weight, ignore_index)
    class_dim = _class_dim(input)
    _heuristics.warn_if_probabilities(fn, input, class_dim)
    tgt = target.reshape(1) if input.dim() == 1 else target  # () or (1,), as torch accepts

    def reference(x: Tensor) -> Tensor:
        """The formula above in differentiable torch ops (any shape; double backward)."""
        log_probs = _classes_last(torch.log_softmax(upcast(x), dim=_class_dim(x)))
        loss = _index_loss(fn, log_probs, tgt, weight, ignore_index, reduction, label_smoothing)
        return loss.squeeze(0) if x.dim() == 1 and reduction == "none" else loss

    if block_path_applies(input, weight, label_smoothing):
        loss = block_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                   reference)
    else:
        loss = reference(input)
    return _heuristics.finite_or_warn(fn, loss.to(input.dtype), input=input)


def _probability_target_loss(
    fn: str,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Tensor:
    """Cross entropy against class probabilities of the same shape as ``input``."""
    from .. import _heuristics

    if _checks.shapes_enabled():
        if not target.is_floating_point():
            raise _checks.LeanlossTypeError(
                f"{fn}: Expected floating point type for target with class probabilities: argument "
                f"'target' has the shape of 'input' {_checks.fmt_shape(input)}, so it is read as "
                f"class probabilities and must be floating, got dtype {target.dtype}"
            )
        if ignore_index >= 0:
            raise _checks.LeanlossValueError(
                f"{fn}: ignore_index is not supported for floating point target: argument "
                f"'ignore_index' must keep its default with probability targets, got {ignore_index}"
            )
    class_dim = _class_dim(input)
    num_classes = input.shape[class_dim]
    if _checks.shapes_enabled():
        _checks.check_class_weight(fn, "weight", weight, num_classes)
    _heuristics.warn_if_probabilities(fn, input, class_dim)
    _heuristics.warn_if_not_distribution(fn, "target", target, class_dim)
    # torch computes (log_softmax(input) * target * weight): the result takes all three dtypes
    out_dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
    log_probs = torch.log_softmax(upcast(input), dim=class_dim)
    p = upcast(target)
    if label_smoothing > 0.0:
        p = p * (1.0 - label_smoothing) + label_smoothing / num_classes
    terms = log_probs * p
    if weight is not None:
        shape = [1] * input.dim()
        shape[class_dim] = num_classes
        terms = terms * upcast(weight).view(shape)
    # 'mean' divides by the element count N * d1 * ... * dK (nan when empty), as torch does
    loss = reduce_loss(-terms.sum(class_dim), reduction).to(out_dtype)
    return _heuristics.finite_or_warn(fn, loss, input=input, target=target)
