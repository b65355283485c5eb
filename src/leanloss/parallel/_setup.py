"""What the vocab-parallel losses need besides their scorers, and nothing more: the group, this
rank's slice of the vocabulary (with the targets checked on every rank), the all-reduces of
per-row statistics, the hidden states' gradient summed over the ranks, and their DTensor
arguments made local (``docs/internals.md``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks
from .._dtensor import has_dtensor, unwrap
from .._fused.reduce_hook import VocabSlice

__all__ = ["VocabShard", "resolve_group", "vocab_shard", "all_reduce_", "local_args", "shard_of", "shard_finder",
           "ce_shard"]


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
        if self.world_size == 1 or not (torch.is_grad_enabled() and x.requires_grad):
            return x
        return _CopyToVocabParallel.apply(x, self.group, self.world_size)


def vocab_shard(fn: str, group, local_size: int, vocab_start: Optional[int], device, *,
                sizes: Optional[Sequence[int]] = None, payload: Optional[Tensor] = None):
    """This rank's :class:`VocabShard` and every rank's ``payload`` (1-D int64, one length on
    every rank; returned ``(world, k)``, or ``None``) from at most one all-gather, which carries
    the slice sizes too unless ``sizes`` gives them. ``vocab_start``: default the lower ranks' sizes summed."""
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


def local_args(fn: str, sharded: dict, whole: dict, group, vocab_start, dim: int = 0):
    """``(arguments, group, sizes)``: the ``sharded`` (vocabulary on dimension ``dim``) and
    ``whole`` arguments by name, their DTensors made local (:func:`leanloss._dtensor.unwrap`), the
    group, and every rank's slice size when a DTensor placement gives them (else ``None``)."""
    sizes = None
    if has_dtensor(*sharded.values(), *whole.values()):
        sharded, whole, group, sizes = unwrap(fn, sharded, whole, group, vocab_start, dim=dim)
    return {**sharded, **whole}, group, sizes


def shard_of(fn: str, like: Tensor, local_vocab: int, target: Optional[Tensor], group, vocab_start,
             ignore_index: int, check_vocab=None, sizes: Optional[Sequence[int]] = None,
             same: Sequence[Tuple[str, Tensor]] = ()) -> VocabShard:
    """This rank's shard (``sizes``: every rank's slice size when known), with ``target``
    (``None``: none) checked against the batch ``like.shape[:-1]`` and the global vocabulary, and
    the named tensors ``same`` checked to be identical, on every rank at once
    (``docs/internals.md``, setting up a shard); ``check_vocab(V)``: metadata checks that need
    the global vocabulary."""
    parts = []
    checking = _checks.values_enabled() and resolve_group(fn, group)[1] > 1
    if target is not None:
        _checks.check_tensor(fn, "target", target)
        if _checks.shapes_enabled():
            _checks.check_row_targets(fn, target, like.shape[:-1], "the input (all but its last dimension)")
        if checking:
            parts.append(_checks.target_summary(target, ignore_index))
    if checking:
        parts += [_checks.fingerprint(t) for _, t in same]
    shard, summaries = vocab_shard(fn, group, local_vocab, vocab_start, like.device, sizes=sizes,
                                   payload=torch.cat(parts) if parts else None)
    if target is not None:
        _checks.check_index_target_range(fn, target, shard.vocab, ignore_index)
    if summaries is not None:
        if target is not None:
            _checks.check_targets_across_ranks(fn, summaries[:, :_checks.TARGET_SUMMARY_SIZE], shard.vocab,
                                               ignore_index)
            summaries = summaries[:, _checks.TARGET_SUMMARY_SIZE:]
        size = _checks.FINGERPRINT_SIZE
        for i, (name, _) in enumerate(same):
            _checks.check_identical_across_ranks(fn, name, summaries[:, size * i:size * (i + 1)])
    if _checks.shapes_enabled() and check_vocab is not None:
        check_vocab(shard.vocab)
    return shard


def shard_finder(fn: str, target: Optional[Tensor], group, vocab_start, ignore_index: int,
                 sizes: Optional[Sequence[int]], same: Sequence[Tuple[str, Tensor]] = ()) -> Callable:
    """``vocab_of(head)``: :func:`shard_of` the (autocast) head's hidden states and rows."""
    return lambda head: shard_of(fn, head.hidden, head.weight.shape[0], target, group, vocab_start,
                                 ignore_index, sizes=sizes, same=same)


def ce_shard(fn: str, like: Tensor, local_vocab: int, target: Tensor, group, vocab_start: Optional[int],
             ignore_index: int, label_smoothing: float, class_weight: Optional[Tensor], z_loss: float,
             sizes: Optional[Sequence[int]] = None):
    """The vocab-parallel cross entropies' checks and shard: ``(shard, label_smoothing, z_loss)``
    (``like`` is ``(..., X)`` whose leading shape is the batch: the logits or the hidden states)."""
    if _checks.shapes_enabled():
        _checks.check_same_device(fn, target=target, class_weight=class_weight)
    label_smoothing = _checks.check_label_smoothing(fn, label_smoothing)
    z_loss = _checks.check_in_closed_interval(fn, "z_loss", z_loss, 0.0, float("inf"))
    shard = shard_of(fn, like, local_vocab, target, group, vocab_start, ignore_index,
                     lambda vocab: _checks.check_class_weight(fn, "class_weight", class_weight, vocab), sizes)
    return shard, label_smoothing, z_loss
