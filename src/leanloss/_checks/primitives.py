"""Generic checks: tensor, dtype, device, shape, number and value-range checks, the message
formatters, and :func:`warn` for :class:`~leanloss.errors.InputWarning`.

Every error names the function and the argument, what was expected and what came. Checks that
read tensor values return at once unless :func:`~leanloss._checks.mode.values_enabled`.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import InputWarning, LeanlossTypeError, LeanlossValueError, UnsupportedDtypeError
from .mode import values_enabled

# frames in these directories are not the user's code
_LIBRARY_DIRS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # leanloss itself
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,  # torch, e.g. Module.__call__
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


def fmt_value(t: Tensor) -> str:
    """One element for a message: ints as they are, floats with 6 significant digits."""
    value = t.item()
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def fmt_shape(t: Tensor) -> str:
    """A tensor's shape written as a Python tuple: ``(3,)``, ``(2, 5)``, ``()``."""
    return str(tuple(t.shape))


def dtype_name(dtype: torch.dtype) -> str:
    """torch's C++ scalar-type name (Float, Double, Long, BFloat16, ...), as in its messages."""
    return torch.empty((), dtype=dtype, device="meta").type().split(".")[-1].replace("Tensor", "")


def first_position(mask: Tensor) -> tuple:
    """Index tuple of the first True element of ``mask`` (``()`` for a 0-dim mask); for error
    messages only, so it runs on the failure path."""
    return tuple(int(i) for i in mask.nonzero()[0].tolist()) if mask.dim() else ()


def check_tensor(fn: str, name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")


def check_floating(fn: str, name: str, t: Tensor, what: str = "floating-point values") -> None:
    """Integer, boolean or complex tensors where floats belong (torch raises
    NotImplementedError or RuntimeError; :class:`UnsupportedDtypeError` is both)."""
    if not t.is_floating_point():
        raise UnsupportedDtypeError(
            f"{fn}: argument '{name}' must be a floating-point tensor of {what}, got dtype "
            f"{t.dtype} (not implemented for {dtype_name(t.dtype)!r})"
        )


def check_same_dtype(fn: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` must have ``ref``'s dtype (torch raises RuntimeError "Found dtype X but expected Y")."""
    if t.dtype != ref.dtype:
        raise LeanlossTypeError(
            f"{fn}: Found dtype {dtype_name(t.dtype)} but expected {dtype_name(ref.dtype)}: "
            f"argument '{name}' must have the dtype of '{ref_name}' ({ref.dtype}), got {t.dtype}"
        )


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


def choices(fn: str, name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(
            f"{fn}: argument '{name}' must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
        )


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
