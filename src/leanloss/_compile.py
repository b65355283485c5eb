"""``graph_break``: run a function eagerly under ``torch.compile`` without importing the compiler
when leanloss is imported.

``@torch.compiler.disable`` imports ``torch._dynamo`` (and with it sympy and most of inductor,
about a second and 70 MB) at decoration time, that is at ``import leanloss``. ``graph_break``
defers that to the first call made while ``torch.compile`` traces: an eager call (the common
case, and every call of a program that never compiles) goes straight to the function;
a call being traced goes through ``torch.compiler.disable(fn)``, created once, so the compiled
graph breaks there and the function runs eagerly with the same result.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, TypeVar

import torch

__all__ = ["graph_break"]

F = TypeVar("F", bound=Callable[..., Any])

# fn -> torch.compiler.disable(fn), filled on the first traced call of each fn
_DISABLED: Dict[Callable[..., Any], Callable[..., Any]] = {}


def _disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    found = _DISABLED.get(fn)
    if found is None:
        found = _DISABLED[fn] = torch.compiler.disable(fn)
    return found


def graph_break(fn: F) -> F:
    """Decorator: ``fn`` runs eagerly under ``torch.compile`` (a graph break, as with
    ``torch.compiler.disable``), and importing the decorated module does not import the compiler."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return _disabled(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
