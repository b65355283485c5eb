"""The exceptions and the warning leanloss raises for bad inputs.

Every class derives from the class torch raises for the same input, so code written to catch
torch's errors keeps working, and from ``ValueError`` / ``TypeError`` so it reads naturally.
Every message names the function, the argument, what was expected and what came.

All five are exported from the top level (``leanloss.LeanlossValueError``, ...).
"""
from __future__ import annotations

__all__ = [
    "InputWarning",
    "LeanlossValueError",
    "LeanlossTypeError",
    "TargetOutOfRangeError",
    "UnsupportedDtypeError",
]


class InputWarning(UserWarning):
    """The input is valid but almost certainly a mistake.

    Emitted when an argument looks like another kind of value: probabilities passed as logits,
    logits or probabilities passed as log-probabilities, a target in the other space than
    ``log_target`` says, sigmoid outputs passed to a loss on logits, or a loss that is NaN/Inf
    (the warning says which input holds the NaN/Inf and where); also for ``kl_div`` with
    ``reduction='mean'``, as torch warns. The checks that read values run only in ``'full'``
    check mode and never while ``torch.compile`` traces.

    What to do: fix the input the message describes; to turn the warnings into errors, use
    ``warnings.simplefilter("error", leanloss.InputWarning)``; to skip the checks that read
    values, ``leanloss.set_checks('shapes')``.
    """


class LeanlossValueError(ValueError, RuntimeError):
    """An argument has an invalid value or shape.

    Raised for a shape that does not match (``target`` vs ``input``, ``weight`` vs ``hidden``),
    a number outside its range (``label_smoothing``, ``beta``, ``temperature``), tensors on
    different devices, a value outside its domain (BCE inputs outside [0, 1]), or vocab-parallel
    ranks whose targets differ. Also a ``RuntimeError``, as torch raises for the same inputs.

    What to do: pass the argument the message names in the shape or range it states.
    """


class LeanlossTypeError(TypeError, RuntimeError):
    """An argument has the wrong dtype or type.

    Raised for a tensor whose dtype differs from the one it must match (``weight`` vs ``input``,
    an LM head vs its hidden states) or class indices that are not int64. Also a
    ``RuntimeError``, as torch raises for the same inputs.

    What to do: cast the argument the message names to the dtype it states (e.g. ``.long()``
    for class indices, ``.to(input.dtype)`` for a class weight).
    """


class TargetOutOfRangeError(IndexError, ValueError):
    """A class-index target lies outside ``[0, C)``.

    Raised (in ``'full'`` check mode) for a target that is negative (and not ``ignore_index``) or
    at least the number of classes, or a teacher's top-k id at least the number of classes; in a
    vocab-parallel group every rank raises when any rank's target is out of range. An
    ``IndexError``, as torch raises.

    What to do: check the target against the vocabulary size, or mark padding with
    ``ignore_index`` (-100 by default).
    """


class UnsupportedDtypeError(LeanlossTypeError, NotImplementedError):
    """Integer, boolean or complex values where floats belong.

    Raised when logits, probabilities, hidden states or an LM head come as an integer, bool or
    complex tensor. A ``NotImplementedError`` too, as torch's kernels raise ("... not implemented
    for 'Long'").

    What to do: pass a floating-point tensor (float32, float64, bfloat16 or float16).
    """
