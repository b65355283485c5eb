"""One place for argument and input validation.

Every error names the argument, what was expected and what came. Where torch raises for the
same input, the exception is (a subclass of) the class torch raises, so code written to catch
torch's errors keeps working; leanloss's own classes also derive from ``ValueError`` /
``TypeError`` so they read naturally.

Checks come in two kinds:

* shape/dtype/argument checks: cheap, metadata only, always on unless checks are ``'off'``;
* value checks (a target out of range, an input outside [0, 1], probabilities passed as
  logits, ...): they read tensor values (a device sync), so they run only in ``'full'`` mode
  and never while ``torch.compile`` traces.

The mode is set with :func:`set_checks`, the :func:`checks` context manager, or the
``LEANLOSS_CHECKS`` environment variable (``full`` | ``shapes`` | ``off``; default ``full``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "InputWarning",
    "LeanlossValueError",
    "LeanlossTypeError",
    "TargetOutOfRangeError",
    "UnsupportedDtypeError",
    "set_checks",
    "get_checks",
    "checks",
]

CHECK_MODES = ("full", "shapes", "off")


class InputWarning(UserWarning):
    """The input is valid but almost certainly a mistake (e.g. probabilities passed as logits)."""


class LeanlossValueError(ValueError, RuntimeError):
    """An argument has an invalid value or shape (also a ``RuntimeError``, as torch raises)."""


class LeanlossTypeError(TypeError, RuntimeError):
    """An argument has the wrong dtype or type (also a ``RuntimeError``, as torch raises)."""


class TargetOutOfRangeError(IndexError, ValueError):
    """A class-index target lies outside ``[0, C)`` (an ``IndexError``, as torch raises)."""


class UnsupportedDtypeError(LeanlossTypeError, NotImplementedError):
    """Integer, boolean or complex values where floats belong (torch's kernels raise
    ``NotImplementedError``: "... not implemented for 'Long'")."""


def _mode_from_env() -> str:
    mode = os.environ.get("LEANLOSS_CHECKS", "full").strip().lower() or "full"
    if mode not in CHECK_MODES:
        raise ValueError(
            f"environment variable LEANLOSS_CHECKS must be one of {CHECK_MODES}, got {mode!r}"
        )
    return mode


_MODE = _mode_from_env()


def set_checks(mode: str) -> str:
    """Set the check mode (``'full'`` | ``'shapes'`` | ``'off'``); return the previous one."""
    global _MODE
    if mode not in CHECK_MODES:
        raise ValueError(f"set_checks: argument 'mode' must be one of {CHECK_MODES}, got {mode!r}")
    previous, _MODE = _MODE, mode
    return previous


def get_checks() -> str:
    """The current check mode."""
    return _MODE


@contextlib.contextmanager
def checks(mode: str) -> Iterator[None]:
    """Context manager: run the block with the given check mode, then restore the previous one."""
    previous = set_checks(mode)
    try:
        yield
    finally:
        set_checks(previous)


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


def shapes_enabled() -> bool:
    """Whether metadata checks run (every mode but ``'off'``)."""
    return _MODE != "off"


def values_enabled() -> bool:
    """Whether checks that read tensor values run (``'full'`` mode, eager only)."""
    return _MODE == "full" and not _compiling()


# frames in these directories are not the user's code (leanloss itself, torch's Module.__call__)
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__)
)


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside leanloss and torch (the user's call)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str) -> None:
    """Emit an :class:`InputWarning` pointing at the first line of the caller's code."""
    warnings.warn(message, InputWarning, stacklevel=_user_stacklevel())


# --------------------------------------------------------------------------------------------
# metadata checks
# --------------------------------------------------------------------------------------------


def fmt_value(t: Tensor) -> str:
    """One element for a message: ints as they are, floats with 6 significant digits."""
    value = t.item()
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def check_same_shape(fn: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` must have exactly ``ref``'s shape (no broadcasting)."""
    if t.shape != ref.shape:
        raise LeanlossValueError(
            f"{fn}: argument '{name}' must have the shape of '{ref_name}' {fmt_shape(ref)}, got "
            f"{fmt_shape(t)}"
        )


def check_broadcastable(fn: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` and ``ref`` broadcast together (elementwise losses: kl_div, jsd)."""
    if t.shape == ref.shape:
        return
    try:
        torch.broadcast_shapes(ref.shape, t.shape)
    except RuntimeError:
        raise LeanlossValueError(
            f"{fn}: argument '{name}' of shape {fmt_shape(t)} does not broadcast with "
            f"'{ref_name}' of shape {fmt_shape(ref)}"
        ) from None


def check_row_targets(fn: str, target: Tensor, rows_shape, rows_what: str, name: str = "target") -> None:
    """Class indices (int64, or uint8 as torch allows) with one entry per row: shape
    ``rows_shape``, e.g. ``hidden.shape[:-1]`` (``rows_what`` says whose rows, for the message)."""
    check_index_target_dtype(fn, target, name)
    if tuple(target.shape) != tuple(rows_shape):
        raise LeanlossValueError(
            f"{fn}: argument '{name}' must have shape {tuple(rows_shape)} (one class index per "
            f"row of {rows_what}), got {tuple(target.shape)}"
        )


def fmt_shape(t: Tensor) -> str:
    """A tensor's shape written as a Python tuple: ``(3,)``, ``(2, 5)``, ``()``."""
    return str(tuple(t.shape))


def check_tensor(fn: str, name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")


def check_floating(fn: str, name: str, t: Tensor, what: str = "floating-point values") -> None:
    """Integer, boolean or complex tensors where floats belong (torch raises
    NotImplementedError or RuntimeError; :class:`UnsupportedDtypeError` is both)."""
    if not t.is_floating_point():
        raise UnsupportedDtypeError(
            f"{fn}: argument '{name}' must be a floating-point tensor of {what}, got dtype "
            f"{t.dtype} (not implemented for {_dtype_name(t.dtype)!r})"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    """torch's C++ scalar-type name (Float, Double, Long, BFloat16, ...), as in its messages."""
    return torch.empty((), dtype=dtype, device="meta").type().split(".")[-1].replace("Tensor", "")


def check_same_dtype(fn: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` must have ``ref``'s dtype (torch raises RuntimeError "Found dtype X but expected Y")."""
    if t.dtype != ref.dtype:
        raise LeanlossTypeError(
            f"{fn}: Found dtype {_dtype_name(t.dtype)} but expected {_dtype_name(ref.dtype)}: "
            f"argument '{name}' must have the dtype of '{ref_name}' ({ref.dtype}), got {t.dtype}"
        )


def check_same_device(fn: str, **tensors: Optional[Tensor]) -> None:
    present = [(k, v) for k, v in tensors.items() if isinstance(v, Tensor)]
    if len(present) < 2:
        return
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise LeanlossValueError(
                f"{fn}: argument '{name}' is on {t.device} but '{first_name}' is on "
                f"{first.device}; expected all tensors on the same device"
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
            f"{fn}: expected scalar type {_dtype_name(dtype)} but found {_dtype_name(weight.dtype)}: "
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
            f"{fn}: expected target dtype to be Long or Byte, but got {_dtype_name(target.dtype)}: "
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


# --------------------------------------------------------------------------------------------
# value checks
# --------------------------------------------------------------------------------------------


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


#: Length of :func:`target_summary`.
TARGET_SUMMARY_SIZE = 5


def target_summary(target: Tensor, ignore_index: int) -> Tensor:
    """Five int64 numbers that let the ranks of a vocab-parallel group check their targets
    together: ``[lowest, highest]`` non-ignored class id (``[0, 0]`` when none counts), the
    number of elements and two sums, ``sum_i t_i`` and ``sum_i (i mod 8191 + 1) t_i`` (wrapping
    in int64), that tell apart targets that differ in a value or an order. Reads values."""
    t = target.reshape(-1).long()
    kept = t[t != ignore_index]
    lo, hi = (kept.min(), kept.max()) if kept.numel() else (t.new_zeros(()), t.new_zeros(()))
    position = torch.arange(t.numel(), device=t.device) % 8191 + 1
    return torch.stack([lo, hi, t.new_tensor(t.numel()), t.sum(), (t * position).sum()])


def check_targets_across_ranks(fn: str, summaries: Tensor, num_classes: int, ignore_index: int) -> None:
    """Every rank's :func:`target_summary` (one row per rank, gathered): raises on EVERY rank
    when any rank's target is out of ``[0, C)``, or when the ranks' targets differ (a
    vocab-parallel loss needs the same targets on every rank of its group)."""
    rows = [[int(v) for v in row] for row in summaries.tolist()]
    for rank, (lo, hi, *_rest) in enumerate(rows):
        if lo < 0 or hi >= num_classes:
            value = lo if lo < 0 else hi
            raise TargetOutOfRangeError(
                f"{fn}: Target {value} is out of bounds: argument 'target' on rank {rank} of the "
                f"group must hold class indices in [0, {num_classes - 1}] (or "
                f"ignore_index={ignore_index}), got {value}"
            )
    for rank, row in enumerate(rows[1:], start=1):
        if row[2:] != rows[0][2:]:
            raise LeanlossValueError(
                f"{fn}: argument 'target' must be identical on every rank of the vocab-parallel "
                f"group, but rank {rank}'s differs from rank 0's ({row[2]} vs {rows[0][2]} "
                f"elements, or other values); pass each tensor-parallel rank the batch of its "
                f"data-parallel rank"
            )


def check_unit_interval(fn: str, name: str, t: Tensor, hint: str = "") -> None:
    """All values in [0, 1], NaN excluded (torch's BCE raises RuntimeError). A ``min`` and a
    ``max`` pass (``aminmax`` is slower on CPU); the offending value and its position are
    computed only on the failure path."""
    if not values_enabled() or t.numel() == 0:
        return
    if not (float(t.detach().min()) >= 0.0 and float(t.detach().max()) <= 1.0):  # False for NaN
        bad = ~((t >= 0) & (t <= 1))
        position = first_position(bad)
        raise LeanlossValueError(
            f"{fn}: all elements of input should be between 0 and 1: argument '{name}' must hold "
            f"probabilities in [0, 1], got {fmt_value(t[position])} at position {position}{hint}"
        )


def check_nonnegative(fn: str, name: str, t: Tensor) -> None:
    """All values >= 0 (e.g. unnormalized probabilities); NaN fails too."""
    if not values_enabled() or t.numel() == 0:
        return
    if not float(t.detach().min()) >= 0.0:
        position = first_position(~(t >= 0))
        raise LeanlossValueError(
            f"{fn}: argument '{name}' must be non-negative, got {fmt_value(t[position])} at "
            f"position {position}"
        )


def first_position(mask: Tensor) -> tuple:
    """Index tuple of the first True element of ``mask`` (``()`` for a 0-dim mask); for error
    messages only, so it runs on the failure path."""
    return tuple(int(i) for i in mask.nonzero()[0].tolist()) if mask.dim() else ()


def check_plus_minus_one(fn: str, name: str, target: Tensor, hint: str = "") -> None:
    """Every value is 1 or -1 (cosine embedding targets; torch does not check)."""
    if not values_enabled() or target.numel() == 0:
        return
    bad = (target != 1) & (target != -1)
    if bool(bad.any()):
        position = first_position(bad)
        raise LeanlossValueError(
            f"{fn}: argument '{name}' must hold only 1 (similar) or -1 (dissimilar), got "
            f"{fmt_value(target[position])} at position {position}{hint}"
        )


def choices(fn: str, name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(
            f"{fn}: argument '{name}' must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
        )


# --------------------------------------------------------------------------------------------
# generic checks for the fused, distillation and parallel losses
# --------------------------------------------------------------------------------------------


def _as_number(fn: str, name: str, value) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise LeanlossTypeError(
                f"{fn}: argument '{name}' must be a number, got a tensor of shape {fmt_shape(value)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: argument '{name}' must be a number, got {type(value).__name__}")
    return float(value)


def check_positive(fn: str, name: str, value) -> float:
    """A finite number > 0 (e.g. a temperature); returns it as a float."""
    number = _as_number(fn, name, value)
    if not (0.0 < number < float("inf")):
        raise LeanlossValueError(f"{fn}: argument '{name}' must be a positive finite number, got {value}")
    return number


def check_in_closed_interval(fn: str, name: str, value, lo: float, hi: float) -> float:
    """A number in ``[lo, hi]`` (e.g. beta in [0, 1]); returns it as a float."""
    number = _as_number(fn, name, value)
    if not (lo <= number <= hi):
        raise LeanlossValueError(f"{fn}: argument '{name}' must lie in [{lo}, {hi}], got {value}")
    return number


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


# -- distillation -------------------------------------------------------------------------
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
                         ignore_index: int, hard_weight: float) -> None:
    """``target`` holds one class index per row (or ``ignore_index``); required when hard_weight > 0."""
    if target is None:
        if hard_weight > 0:
            raise LeanlossValueError(
                f"{fn}: argument 'target' is required when hard_weight > 0 (got hard_weight={hard_weight})"
            )
        return
    check_tensor(fn, "target", target)
    if shapes_enabled():
        check_row_targets(fn, target, rows_shape, "the student")
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
                       ignore_index: int, temperature, hard_weight):
    """Argument checks shared by the dense and fused top-k losses; returns
    ``(temperature, hard_weight)`` as floats (the callers then run the value heuristic
    ``_heuristics.warn_if_topk_probabilities``)."""
    temperature = check_positive(fn, "temperature", temperature)
    hard_weight = check_in_closed_interval(fn, "hard_weight", hard_weight, 0.0, 1.0)
    check_topk(fn, topk_ids, topk_logprobs, rows_shape, num_classes)
    check_distill_target(fn, target, rows_shape, num_classes, ignore_index, hard_weight)
    return temperature, hard_weight
