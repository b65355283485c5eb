"""Rows that count: drop ignored targets before any matmul, put per-row results back after."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

__all__ = ["select_kept", "scatter_rows"]


def select_kept(flat_target: Tensor, ignore_index: int, *rows: Tensor) -> Tuple[Optional[Tensor], ...]:
    """``(idx, target, *rows)``: the indices of the rows of ``flat_target`` (1-D) that are not
    ``ignore_index``, and ``flat_target`` and each row-aligned tensor of ``rows`` restricted to
    them; ``idx`` is ``None`` and nothing is copied when every row counts."""
    keep = flat_target != ignore_index
    if bool(keep.all()):
        return (None, flat_target, *rows)
    idx = keep.nonzero().squeeze(1)
    return (idx, *(x.index_select(0, idx) for x in (flat_target, *rows)))


def scatter_rows(values: Tensor, idx: Optional[Tensor], n: int) -> Tensor:
    """Per-kept-row values ``(M, ...)`` back to all ``n`` rows, ``0`` at the dropped ones
    (differentiable)."""
    if idx is None:
        return values
    return values.new_zeros((n, *values.shape[1:])).index_copy(0, idx, values)
