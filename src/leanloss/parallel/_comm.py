"""The communication the vocab-parallel losses need, and nothing more: the group, this rank's
slice of the vocabulary, the all-reduces of per-row statistics, and the hidden states' gradient
summed over the ranks (``docs/internals.md``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks
from .._fused.reduce_hook import VocabSlice

__all__ = ["VocabShard", "resolve_group", "vocab_shard", "all_reduce_", "copy_to_vocab_parallel"]


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
    """This rank's :class:`VocabShard` and every rank's ``payload`` (a 1-D int64 tensor of one
    length on every rank, returned as ``(world, k)``, or ``None``), from at most one all-gather
    that also carries the slice sizes unless ``sizes`` gives them (nothing is communicated
    without ``payload`` when it does). ``vocab_start``: default the lower ranks' sizes summed.
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
