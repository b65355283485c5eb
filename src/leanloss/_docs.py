"""Documentation shared by several public functions, written once.

A docstring line of the form ``@doc NAME`` (alone on its line, at any indent) is replaced by
the entry ``NAME`` below, re-indented to that line's indent, when the function is decorated
with :func:`fill`. Argument entries are written as ``Args:`` items.
"""
from __future__ import annotations

import re
import textwrap
from typing import Callable, Dict, Optional, TypeVar

from ._fused import ce_rows

__all__ = ["fill", "DOCS"]

F = TypeVar("F", bound=Callable)

DOCS: Dict[str, str] = {
    # The cross-entropy row loss, stated where its code lives (leanloss._fused.ce_rows).
    "ce_row_loss": ce_rows.ROW_LOSS,
    "ce_reduction": """\
``'sum'`` is ``sum_r loss_r`` over the kept rows; ``'mean'`` divides that sum by ``num_items``
when given, else by ``sum_r w_t`` (the number of kept rows without class weights): torch's
convention, so smoothing and z-loss are weighted and normalized like the cross-entropy term.
All rows ignored gives ``nan`` (``'mean'``) or ``0`` (``'sum'``), like torch. ``'none'``
returns ``loss_r`` in the shape of ``target``, ``0`` at ignored rows.""",
    "ignore_index": """\
ignore_index: rows whose target is this value do not count (the fused losses drop them before
    any matmul); they get ``0`` under ``'none'`` and are left out of ``'mean'``'s divisor.""",
    "label_smoothing": """\
label_smoothing: ``e`` in ``[0, 1]``: the target distribution is ``(1-e) onehot(t) + e/V``,
    weighted by ``class_weight`` as torch weights it (see the row loss).""",
    "z_loss": """\
z_loss: weight of the ``lse_r**2`` penalty (PaLM's z-loss) added to each kept row, times ``w_t``;
    ``0`` turns it off.""",
    "num_items": """\
num_items: divisor of ``'mean'`` instead of the kept-row count, e.g. the global token count
    over data-parallel ranks and gradient-accumulation steps (transformers'
    ``num_items_in_batch``).""",
}

_MARK = re.compile(r"^(?P<indent>[ \t]*)@doc (?P<name>\w+)[ \t]*$", re.M)


def fill(fn: F) -> F:
    """Replace the ``@doc NAME`` lines of ``fn.__doc__`` with the shared entries.

    The functions ``fn`` wraps (its ``__wrapped__`` chain, from ``functools.wraps``) get the
    same text: ``inspect.unwrap``, which documentation generators call, reads theirs.
    """
    target: Optional[Callable] = fn
    while target is not None:
        if target.__doc__:
            target.__doc__ = _MARK.sub(lambda m: textwrap.indent(DOCS[m["name"]], m["indent"]), target.__doc__)
        target = getattr(target, "__wrapped__", None)
    return fn
