"""What both vocab-parallel losses do around the scorer: checks, ignored rows, the divisor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from .._dtypes import compute_dtype
from ._comm import VocabShard, vocab_shard
from ._scorer import VocabParallelScorer

__all__ = ["RowSetup", "prepare_rows", "scatter_rows"]


@dataclass
class RowSetup:
    shard: VocabShard
    scorer: VocabParallelScorer
    keep: Optional[Tensor]  # indices of the rows that count in the flattened batch; None: all
    batch_shape: torch.Size
    divisor: object  # the 'mean' divisor: num_items, else sum of w[target] over kept rows


def prepare_rows(
    fn: str,
    like: Tensor,
    local_vocab: int,
    target: Tensor,
    group,
    vocab_start: Optional[int],
    ignore_index: int,
    label_smoothing: float,
    class_weight: Optional[Tensor],
    z_loss: float,
    num_items,
) -> RowSetup:
    """Validate the shared arguments, find the shard (one all-gather), drop ignored rows.

    ``like`` is ``(..., X)`` whose leading shape is the batch (the logits or the hidden states);
    it gives the batch shape, the compute dtype and the device.
    """
    batch_shape = like.shape[:-1]
    _checks.check_tensor(fn, "target", target)
    if _checks.shapes_enabled():
        _checks.check_index_target_dtype(fn, target)
        if tuple(target.shape) != tuple(batch_shape):
            raise _checks.LeanlossValueError(
                f"{fn}: argument 'target' must have the shape of the logits without their last "
                f"(vocabulary) dimension, {tuple(batch_shape)}, got {tuple(target.shape)}"
            )
        _checks.check_same_device(fn, target=target, class_weight=class_weight)
    label_smoothing = _checks.check_label_smoothing(fn, label_smoothing)
    z_loss = _checks.check_in_closed_interval(fn, "z_loss", z_loss, 0.0, float("inf"))
    shard = vocab_shard(fn, group, local_vocab, vocab_start, like.device)
    if _checks.shapes_enabled():
        _checks.check_class_weight(fn, "class_weight", class_weight, shard.vocab)
    _checks.check_index_target_range(fn, target, shard.vocab, ignore_index)
    flat = target.reshape(-1)
    keep = (flat != ignore_index).nonzero().squeeze(1)
    if keep.numel() == flat.numel():
        keep = None
    kept_target = (flat if keep is None else flat[keep]).long()
    scorer = VocabParallelScorer(
        shard, kept_target, class_weight, label_smoothing, z_loss, compute_dtype(like.dtype)
    )
    divisor = num_items if num_items is not None else scorer.w_target.sum()
    return RowSetup(shard, scorer, keep, torch.Size(batch_shape), divisor)


def scatter_rows(losses: Tensor, setup: RowSetup) -> Tensor:
    """Per-row losses of the kept rows -> the batch shape, zeros at ignored positions."""
    if setup.keep is not None:
        full = losses.new_zeros(setup.batch_shape.numel())
        losses = full.index_copy(0, setup.keep, losses)
    return losses.reshape(setup.batch_shape)
