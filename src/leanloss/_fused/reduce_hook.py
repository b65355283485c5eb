"""The reduce hook of a scorer: where its per-row partial reductions over the classes are reduced
over the whole vocabulary. The identity on one device (:class:`LocalVocab`); an all-reduce over
a vocab-sharded head's ranks (:class:`leanloss.parallel._setup.VocabShard`). A scorer states its
math once for both."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["VocabSlice", "LocalVocab", "global_row_max", "global_row_max_with", "local_row_max",
           "row_max_shift", "owned_only"]


class VocabSlice:
    """The classes ``[start, start + size)`` of a vocabulary of ``vocab`` classes. ``max_(t)`` /
    ``sum_(t)``: per-row partials over this slice reduced over every slice, in place: a
    collective every rank calls in the same order or, when ``identity`` (one device), nothing,
    so that a scorer may compose its row math in one kernel."""

    start: int
    size: int
    vocab: int
    max_size: int  # the largest slice: every size that decides a collective's count uses it
    identity: bool = False

    def max_(self, t: Tensor) -> Tensor:
        return t

    def sum_(self, t: Tensor) -> Tensor:
        return t

    def replicated(self, x: Tensor) -> Tensor:
        """``x``, an input every slice uses (the hidden states): its gradient is the sum of
        every slice's partial gradient (an all-reduce in backward over a group)."""
        return x

    def local_target(self, target: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """``(local, owned)``: each global class id as an index into this slice (``0`` where it
        lies outside) and whether this slice owns it (``None``: the slice owns every class)."""
        if self.start == 0 and self.size == self.vocab:
            return target, None
        local = target - self.start
        owned = (local >= 0) & (local < self.size)
        return torch.where(owned, local, torch.zeros_like(local)), owned


class LocalVocab(VocabSlice):
    """The whole vocabulary on one device: the reductions are the identity."""

    identity = True

    def __init__(self, vocab: int) -> None:
        self.start, self.size, self.vocab = 0, int(vocab), int(vocab)
        self.max_size = self.size


def global_row_max(y: Tensor, vocab: VocabSlice) -> Tensor:
    """Each row's maximum over every slice of ``y`` ``(n, size)``, as a softmax's shift: ``0``
    for a row that is ``-inf`` everywhere (so it stays ``nan``, as in torch's softmax). One ``max_``."""
    return row_max_shift(local_row_max(y, vocab), vocab)


def global_row_max_with(y: Tensor, vocab: VocabSlice, *also: Tensor) -> Tuple[Tensor, ...]:
    """:func:`global_row_max`, and each per-row partial maximum of ``also`` (``(n,)`` each)
    reduced in the same ``max_`` (not made a shift)."""
    if not also:
        return (global_row_max(y, vocab),)
    maxes = vocab.max_(torch.stack((local_row_max(y, vocab), *also), 1))
    return (finite_or_zero(maxes[:, 0]), *maxes[:, 1:].unbind(1))


def local_row_max(y: Tensor, vocab: VocabSlice) -> Tensor:
    """Each row's maximum over this slice of ``y`` (``-inf`` for an empty slice)."""
    return y.amax(1) if vocab.size > 0 else y.new_full((y.shape[0],), float("-inf"))


def row_max_shift(local_max: Tensor, vocab: VocabSlice) -> Tensor:
    """:func:`global_row_max` from this slice's row maxima (any shape)."""
    return finite_or_zero(vocab.max_(local_max))


def finite_or_zero(m: Tensor) -> Tensor:
    """The reduced row maxima as a shift: ``0`` where a maximum is not finite."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def owned_only(values: Tensor, owned: Optional[Tensor], rows: slice) -> Tensor:
    """``values`` where this slice owns the target of each of the ``rows`` (``owned[rows]``;
    ``owned`` ``None``: all), else ``0``."""
    return values if owned is None else torch.where(owned[rows], values, torch.zeros_like(values))
