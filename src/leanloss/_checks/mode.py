"""The check mode: which checks run.

* ``'full'`` (default): metadata checks (shape, dtype, argument) and value checks (a target out
  of range, an input outside [0, 1], probabilities passed as logits, ...); value checks read
  tensor values (a device sync), so they never run while ``torch.compile`` traces;
* ``'shapes'``: metadata checks only (no sync);
* ``'off'``: neither (the argument type checks still run).

Set with :func:`set_checks`, the :func:`checks` context manager, or the ``LEANLOSS_CHECKS``
environment variable (``full`` | ``shapes`` | ``off``), read once at import.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

CHECK_MODES = ("full", "shapes", "off")


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
