"""The communication the vocab-parallel losses need, and nothing more.

Three pieces, all O(tokens) or O(1) in size:

* :func:`resolve_group`: ``group=None`` means the default group; without an initialized
  ``torch.distributed`` it means a world of one rank (no communication at all).
* :func:`vocab_shard`: one all-gather of a few numbers gives every rank's slice size, hence
  the global vocabulary, this rank's offset (the exclusive prefix sum) and the largest slice
  (so that chunking never depends on the local slice size), plus, when checks are ``'full'``,
  every rank's target summary (so that a bad target raises on every rank, not just its own).
  A DTensor's placement already says the sizes: then only the checks communicate.
* :func:`all_reduce_` and :func:`copy_to_vocab_parallel` (identity forward, all-reduce of the
  gradient backward: the gradient of a tensor every rank uses, such as the hidden states fed to
  a vocab-parallel LM head, is the sum of the ranks' partial gradients).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks
from .._fused.reduce_hook import VocabSlice, global_row_max

__all__ = ["VocabShard", "resolve_group", "vocab_shard", "all_reduce_", "global_row_max",
           "copy_to_vocab_parallel"]


def resolve_group(fn: str, group):
    """``(group, world_size)``: the default group for ``None``; ``(None, 1)`` without distributed."""
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized:
        if group is not None:
            raise _checks.LeanlossValueError(
                f"{fn}: argument 'group' was given but torch.distributed is not initialized; "
                f"call torch.distributed.init_process_group first, or pass group=None for a "
                f"single process"
            )
        return None, 1
    group = dist.group.WORLD if group is None else group
    return group, dist.get_world_size(group)


def all_reduce_(t: Tensor, op, group, world_size: int) -> Tensor:
    """In-place all-reduce over ``group`` (a no-op in a world of one rank)."""
    if world_size > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


@dataclass(frozen=True)
class VocabShard(VocabSlice):
    """This rank's slice ``[start, start + size)`` of a vocabulary of ``vocab`` classes: the
    reduce hook of a scorer over a vocab-sharded head (its ``max_``/``sum_`` all-reduce over
    ``group``)."""

    group: object
    world_size: int
    start: int
    size: int
    vocab: int
    max_size: int

    def max_(self, t: Tensor) -> Tensor:
        return all_reduce_(t, dist.ReduceOp.MAX, self.group, self.world_size)

    def sum_(self, t: Tensor) -> Tensor:
        return all_reduce_(t, dist.ReduceOp.SUM, self.group, self.world_size)

    def replicated(self, x: Tensor) -> Tensor:
        return copy_to_vocab_parallel(x, self)


def vocab_shard(fn: str, group, local_size: int, vocab_start: Optional[int], device, *,
                sizes: Optional[Sequence[int]] = None, payload: Optional[Tensor] = None):
    """This rank's :class:`VocabShard` and every rank's ``payload``, from at most one all-gather.

    ``sizes``: every rank's slice size when already known (a DTensor placement says them);
    otherwise they travel in the all-gather. ``payload``: a 1-D int64 tensor of the same length
    on every rank, gathered alongside (the checks' target summaries), returned as ``(world, k)``
    or ``None``. Without ``payload`` and with known ``sizes`` nothing is communicated.
    ``vocab_start`` defaults to the sum of the lower ranks' sizes.
    """
    group, world_size = resolve_group(fn, group)
    rank = dist.get_rank(group) if world_size > 1 else 0
    gathered = None
    if world_size > 1 and (sizes is None or payload is not None):
        mine = torch.tensor([local_size], dtype=torch.int64, device=device)
        if payload is not None:
            mine = torch.cat([mine, payload.to(device=device, dtype=torch.int64)])
        parts = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(parts, mine, group=group)
        gathered = torch.stack(parts).cpu()
        if sizes is None:
            sizes = [int(s) for s in gathered[:, 0].tolist()]
        gathered = gathered[:, 1:] if payload is not None else None
    elif payload is not None:
        gathered = payload.reshape(1, -1).cpu()
    sizes = [local_size] if world_size == 1 else list(sizes)
    vocab = sum(sizes)
    start = sum(sizes[:rank]) if vocab_start is None else int(vocab_start)
    if not 0 <= start <= vocab - local_size:
        raise _checks.LeanlossValueError(
            f"{fn}: argument 'vocab_start' must place this rank's {local_size} classes inside the "
            f"global vocabulary of {vocab} (the sum of all ranks' slices), i.e. lie in "
            f"[0, {vocab - local_size}], got {start}"
        )
    return VocabShard(group, world_size, start, local_size, vocab, max(sizes)), gathered


class _CopyToVocabParallel(torch.autograd.Function):
    """Identity forward; backward sums the ranks' partial gradients (all-reduce SUM)."""

    @staticmethod
    def forward(ctx, x, group, world_size):
        ctx.group, ctx.world_size = group, world_size
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        return all_reduce_(grad, dist.ReduceOp.SUM, ctx.group, ctx.world_size), None, None


def copy_to_vocab_parallel(x: Tensor, shard: VocabShard) -> Tensor:
    """``x`` unchanged; its gradient becomes the sum over the ranks of ``shard.group``."""
    if shard.world_size == 1 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _CopyToVocabParallel.apply(x, shard.group, shard.world_size)
