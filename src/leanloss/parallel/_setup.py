"""The setup of the vocab-parallel losses: their DTensor arguments made local, and this rank's
slice of the vocabulary with the targets checked on every rank."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor

from .. import _checks
from .._dtensor import has_dtensor, unwrap
from ._comm import VocabShard, resolve_group, vocab_shard

__all__ = ["local_args", "shard_of", "shard_finder", "ce_shard"]


def local_args(fn: str, sharded: dict, whole: dict, group, vocab_start):
    """``(arguments, group, sizes)``: the ``sharded`` (vocabulary on dimension 0) and ``whole``
    arguments by name, their DTensors made local (:func:`leanloss._dtensor.unwrap`), the group,
    and every rank's slice size when a DTensor placement gives them (else ``None``)."""
    sizes = None
    if has_dtensor(*sharded.values(), *whole.values()):
        sharded, whole, group, sizes = unwrap(fn, sharded, whole, group, vocab_start, dim=0)
    return {**sharded, **whole}, group, sizes


def shard_of(fn: str, like: Tensor, local_vocab: int, target: Optional[Tensor], group, vocab_start,
             ignore_index: int, check_vocab=None, sizes: Optional[Sequence[int]] = None) -> VocabShard:
    """This rank's shard (at most one all-gather; ``sizes``: every rank's slice size when known),
    with ``target`` (``None``: none) checked against the batch ``like.shape[:-1]`` and the global
    vocabulary. When checks are ``'full'`` every rank's target summary travels in the same
    all-gather, so that a bad target raises on every rank (not only on its own, leaving the
    others waiting in the next collective). ``check_vocab(V)``: metadata checks that need the
    global vocabulary."""
    payload = None
    if target is not None:
        _checks.check_tensor(fn, "target", target)
        if _checks.shapes_enabled():
            _checks.check_row_targets(fn, target, like.shape[:-1], "the input (all but its last dimension)")
        if _checks.values_enabled() and resolve_group(fn, group)[1] > 1:
            payload = _checks.target_summary(target, ignore_index)
    shard, summaries = vocab_shard(fn, group, local_vocab, vocab_start, like.device, sizes=sizes, payload=payload)
    if target is not None:
        _checks.check_index_target_range(fn, target, shard.vocab, ignore_index)
    if summaries is not None:
        _checks.check_targets_across_ranks(fn, summaries, shard.vocab, ignore_index)
    if _checks.shapes_enabled() and check_vocab is not None:
        check_vocab(shard.vocab)
    return shard


def shard_finder(fn: str, target: Optional[Tensor], group, vocab_start, ignore_index: int,
                 sizes: Optional[Sequence[int]]) -> Callable:
    """``vocab_of(head)``: :func:`shard_of` the (autocast) head's hidden states and rows."""
    return lambda head: shard_of(fn, head.hidden, head.weight.shape[0], target, group, vocab_start,
                                 ignore_index, sizes=sizes)


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
