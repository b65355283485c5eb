"""Validators of one loss's arguments: class weights, label smoothing, class-index targets,
the fused LM-head inputs, the distillation options and a teacher's top-k entries.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import LeanlossTypeError, LeanlossValueError, TargetOutOfRangeError
from .mode import shapes_enabled, values_enabled
from .primitives import (
    dtype_name,
    check_floating,
    check_in_closed_interval,
    check_positive,
    check_same_device,
    check_tensor,
    choices,
    first_position,
    fmt_shape,
)

def check_class_weight(
    fn: str, name: str, weight: Optional[Tensor], num_classes: int, dtype: Optional[torch.dtype] = None
) -> None:
    """``weight`` must be a 1-D floating tensor with one entry per class and, when ``dtype`` is
    given, that dtype (torch's nll_loss: "expected scalar type Float but found Double")."""
    if weight is None:
        return
    check_tensor(fn, name, weight)
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise LeanlossValueError(
            f"{fn}: weight tensor should be defined either for all {num_classes} classes or no "
            f"classes: argument '{name}' must be a 1-D tensor of shape ({num_classes},), but got "
            f"weight tensor of shape: {fmt_shape(weight)}"
        )
    if dtype is not None and weight.dtype != dtype:
        raise LeanlossTypeError(
            f"{fn}: expected scalar type {dtype_name(dtype)} but found {dtype_name(weight.dtype)}: "
            f"argument '{name}' must have the dtype of 'input' ({dtype}), got {weight.dtype}"
        )
    check_floating(fn, name, weight, "per-class weights")


def check_label_smoothing(fn: str, label_smoothing: float) -> float:
    value = float(label_smoothing)
    if not (0.0 <= value <= 1.0):
        raise LeanlossValueError(
            f"{fn}: label_smoothing must be between 0.0 and 1.0: argument 'label_smoothing' "
            f"must lie in [0, 1], got {label_smoothing}"
        )
    return value


def check_index_target_dtype(fn: str, target: Tensor, name: str = "target") -> None:
    if target.dtype not in (torch.int64, torch.uint8):
        raise LeanlossTypeError(
            f"{fn}: expected target dtype to be Long or Byte, but got {dtype_name(target.dtype)}: "
            f"argument '{name}' must hold class indices as an int64 (Long) tensor, got "
            f"dtype {target.dtype}"
            + (
                "; for class probabilities pass a floating tensor of the same shape as 'input'"
                if target.is_floating_point()
                else ""
            )
        )


def check_index_target_shape(fn: str, input: Tensor, target: Tensor) -> None:
    """Shapes of class-index targets against ``input`` of shape (C), (N, C) or (N, C, d1, ...)."""
    if input.dim() < 1:
        raise LeanlossValueError(
            f"{fn}: argument 'input' expected 1 or more dimensions (got {input.dim()})"
        )
    if target.dim() > 1 and input.dim() <= 2:
        raise LeanlossValueError(
            f"{fn}: 0D or 1D target tensor expected, multi-target not supported: argument "
            f"'target' for 'input' of shape {fmt_shape(input)} must be {'()' if input.dim() == 1 else '(N,)'}"
            f" class indices, got shape {fmt_shape(target)}"
        )
    if input.dim() == 1:
        if target.dim() == 1 and target.shape[0] != 1:
            raise LeanlossValueError(
                f"{fn}: For 1D input, 1D target must have size 1, but got target size: "
                f"{target.shape[0]}: argument 'target' for 'input' of shape (C,) = "
                f"{fmt_shape(input)} must be a 0-dim class index (or shape (1,)), got shape "
                f"{fmt_shape(target)}"
            )
        return
    if target.dim() == 0 or input.shape[0] != target.shape[0]:
        got = target.shape[0] if target.dim() else "a 0-dim target"
        raise LeanlossValueError(
            f"{fn}: Expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({got}): argument 'target' of shape {fmt_shape(target)} vs 'input' of shape "
            f"{fmt_shape(input)}"
        )
    if tuple(target.shape[1:]) != tuple(input.shape[2:]):
        expected = (input.shape[0],) + tuple(input.shape[2:])
        raise LeanlossValueError(
            f"{fn}: Expected target size {expected}, got {tuple(target.shape)}: argument 'target' "
            f"must have the shape of 'input' {fmt_shape(input)} without its class dimension 1"
        )


def check_row_targets(fn: str, target: Tensor, rows_shape, rows_what: str, name: str = "target") -> None:
    """Class indices (int64, or uint8 as torch allows) with one entry per row: shape
    ``rows_shape``, e.g. ``hidden.shape[:-1]`` (``rows_what`` says whose rows, for the message)."""
    check_index_target_dtype(fn, target, name)
    if tuple(target.shape) != tuple(rows_shape):
        raise LeanlossValueError(
            f"{fn}: argument '{name}' must have shape {tuple(rows_shape)} (one class index per "
            f"row of {rows_what}), got {tuple(target.shape)}"
        )


def check_index_target_range(fn: str, target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Every non-ignored class index lies in [0, C) (torch raises IndexError)."""
    if not values_enabled() or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        position = first_position(bad)
        value = int(target[position].item())
        raise TargetOutOfRangeError(
            f"{fn}: Target {value} is out of bounds: argument 'target' must hold class indices "
            f"in [0, {num_classes - 1}] (or ignore_index={ignore_index}), got {value} at "
            f"position {position}"
        )


def check_linear_shapes(
    fn: str,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Optional[Tensor],
    *,
    hidden_name: str = "hidden",
    weight_name: str = "weight",
    bias_name: str = "bias",
    target_name: str = "target",
) -> int:
    """Inputs of a fused LM-head loss on ``hidden @ weight.T + bias``; returns V (weight rows).

    ``hidden`` (..., D) floating, ``weight`` (V, D) of the same dtype, ``bias`` (V,),
    ``target`` int64 of shape ``hidden.shape[:-1]``, all on one device. Metadata only (no sync);
    skipped, except for the tensor type checks, when checks are ``'off'``.
    """
    check_tensor(fn, hidden_name, hidden)
    check_tensor(fn, weight_name, weight)
    if bias is not None:
        check_tensor(fn, bias_name, bias)
    if target is not None:
        check_tensor(fn, target_name, target)
    vocab = weight.shape[0] if weight.dim() else 0
    if not shapes_enabled():
        return vocab
    check_floating(fn, hidden_name, hidden, "hidden states")
    check_floating(fn, weight_name, weight, "LM-head weights")
    if hidden.dim() < 1:
        raise LeanlossValueError(
            f"{fn}: argument '{hidden_name}' must have shape (..., D) with at least one dimension, "
            f"got a 0-dim tensor"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise LeanlossValueError(
            f"{fn}: argument '{weight_name}' must have shape (V, D) with D = {hidden_name}.shape[-1] "
            f"= {hidden.shape[-1]}, got '{weight_name}' of shape {fmt_shape(weight)} and "
            f"'{hidden_name}' of shape {fmt_shape(hidden)}"
        )
    if weight.dtype != hidden.dtype:
        raise LeanlossTypeError(
            f"{fn}: argument '{weight_name}' must have the dtype of '{hidden_name}' "
            f"({hidden.dtype}), got {weight.dtype}"
        )
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise LeanlossValueError(
            f"{fn}: argument '{bias_name}' must have shape ({vocab},), one entry per row of "
            f"'{weight_name}', got shape {fmt_shape(bias)}"
        )
    if target is not None:
        if target.dtype != torch.int64:
            raise LeanlossTypeError(
                f"{fn}: argument '{target_name}' must hold class indices as an int64 (Long) "
                f"tensor, got dtype {target.dtype}"
            )
        if tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise LeanlossValueError(
                f"{fn}: argument '{target_name}' must have shape {tuple(hidden.shape[:-1])} "
                f"({hidden_name}.shape[:-1]), got {tuple(target.shape)}"
            )
    check_same_device(
        fn, **{hidden_name: hidden, weight_name: weight, bias_name: bias, target_name: target}
    )
    return vocab


DISTILL_KINDS = ("forward", "reverse", "jsd")


def check_distill_options(fn: str, kind: str, beta, temperature, hard_weight):
    """Argument checks shared by the dense and fused distillation losses; returns
    ``(beta, temperature, hard_weight)`` as floats."""
    choices(fn, "kind", kind, DISTILL_KINDS)
    return (
        check_in_closed_interval(fn, "beta", beta, 0.0, 1.0),
        check_positive(fn, "temperature", temperature),
        check_in_closed_interval(fn, "hard_weight", hard_weight, 0.0, 1.0),
    )


def check_distill_target(fn: str, target: Optional[Tensor], rows_shape, num_classes: int,
                         ignore_index: int, hard_weight: float, check_range: bool = True) -> None:
    """``target`` holds one class index per row (or ``ignore_index``; in range unless a
    vocab-parallel caller checked that itself, ``check_range=False``); required when hard_weight > 0."""
    if target is None:
        if hard_weight > 0:
            raise LeanlossValueError(
                f"{fn}: argument 'target' is required when hard_weight > 0 (got hard_weight={hard_weight})"
            )
        return
    check_tensor(fn, "target", target)
    if shapes_enabled():
        check_row_targets(fn, target, rows_shape, "the student")
    if check_range:
        check_index_target_range(fn, target, num_classes, ignore_index)


def check_topk(fn: str, ids: Tensor, logprobs: Tensor, rows_shape, num_classes: int) -> None:
    """A teacher's top-k entries: ``ids`` int64 and ``logprobs`` floating, both of shape
    ``rows_shape + (k,)`` with ``k >= 1``; every id ``< num_classes`` (ids ``< 0`` are padding)."""
    check_tensor(fn, "topk_ids", ids)
    check_tensor(fn, "topk_logprobs", logprobs)
    if shapes_enabled():
        if ids.dtype != torch.int64:
            raise LeanlossTypeError(
                f"{fn}: argument 'topk_ids' must hold class ids as an int64 (Long) tensor, got "
                f"dtype {ids.dtype}")
        check_floating(fn, "topk_logprobs", logprobs, "log-probabilities")
        expected = tuple(rows_shape)
        if ids.dim() != len(expected) + 1 or tuple(ids.shape[:-1]) != expected or ids.shape[-1] < 1:
            raise LeanlossValueError(
                f"{fn}: argument 'topk_ids' must have shape {expected + ('k',)} (k >= 1 entries "
                f"per row of the student), got {fmt_shape(ids)}")
        if logprobs.shape != ids.shape:
            raise LeanlossValueError(
                f"{fn}: arguments 'topk_ids' and 'topk_logprobs' must have the same shape (one "
                f"log-probability per id), got {fmt_shape(ids)} and {fmt_shape(logprobs)}")
        check_same_device(fn, topk_ids=ids, topk_logprobs=logprobs)
    if not values_enabled() or ids.numel() == 0:
        return
    bad = ids >= num_classes
    if bool(bad.any()):
        position = first_position(bad)
        raise TargetOutOfRangeError(
            f"{fn}: argument 'topk_ids' must hold class ids in [0, {num_classes - 1}] (or a "
            f"negative id for padding), got {int(ids[position])} at position {position}")


def check_topk_options(fn: str, topk_ids, topk_logprobs, rows_shape, num_classes: int, target,
                       ignore_index: int, temperature, hard_weight, check_range: bool = True):
    """Argument checks shared by the dense and fused top-k losses; returns
    ``(temperature, hard_weight)`` as floats (the callers then run the value heuristic
    ``_heuristics.warn_if_topk_probabilities``). ``check_range``: as in :func:`check_distill_target`."""
    temperature = check_positive(fn, "temperature", temperature)
    hard_weight = check_in_closed_interval(fn, "hard_weight", hard_weight, 0.0, 1.0)
    check_topk(fn, topk_ids, topk_logprobs, rows_shape, num_classes)
    check_distill_target(fn, target, rows_shape, num_classes, ignore_index, hard_weight, check_range)
    return temperature, hard_weight
