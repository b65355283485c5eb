"""Rows that count: drop ignored targets before any matmul, put per-row results back after.

Every fused loss (linear cross entropy, distillation, vocab-parallel) works on the flattened
rows whose target is not ``ignore_index`` and returns ``'none'`` results in the full batch
shape with ``0`` at the dropped rows; these two helpers are that step, once.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

__all__ = ["kept_rows", "select_kept", "scatter_rows"]


def kept_rows(flat_target: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Indices of the rows of ``flat_target`` (1-D) that are not ``ignore_index``; ``None``
    when every row counts (so callers skip the ``index_select`` copies)."""
    keep = flat_target != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def select_kept(flat_target: Tensor, ignore_index: int, *rows: Tensor) -> Tuple[Optional[Tensor], ...]:
    """``(idx, target, *rows)``: :func:`kept_rows` of ``flat_target`` and ``flat_target`` and
    each row-aligned tensor of ``rows`` restricted to those rows (unchanged when all count)."""
    idx = kept_rows(flat_target, ignore_index)
    if idx is None:
        return (None, flat_target, *rows)
    return (idx, *(x.index_select(0, idx) for x in (flat_target, *rows)))


def scatter_rows(values: Tensor, idx: Optional[Tensor], n: int) -> Tensor:
    """Per-kept-row values ``(M, ...)`` back to all ``n`` rows, ``0`` at the dropped ones
    (differentiable)."""
    if idx is None:
        return values
    return values.new_zeros((n, *values.shape[1:])).index_copy(0, idx, values)
