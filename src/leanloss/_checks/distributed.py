"""Checks of a vocab-parallel group's targets (and other tensors every rank must hold alike):
each rank summarizes them in a few numbers, the ranks gather the summaries, and every rank runs
the same check on them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LeanlossValueError, TargetOutOfRangeError

#: Length of :func:`fingerprint`.
FINGERPRINT_SIZE = 3
#: Length of :func:`target_summary`: the lowest and highest id, then the :func:`fingerprint`.
TARGET_SUMMARY_SIZE = 2 + FINGERPRINT_SIZE


def fingerprint(t: Tensor) -> Tensor:
    """Three int64 numbers that tell apart tensors that differ in a value, an order or a size:
    the number of elements ``n``, ``sum_i t_i`` and ``sum_i (i mod 8191 + 1) t_i`` (wrapping in
    int64) of an integer tensor, or of the bytes of a floating one. Reads values."""
    n = t.numel()
    if t.is_floating_point():
        t = t.detach().contiguous().view(torch.uint8)
    t = t.reshape(-1).long()
    position = torch.arange(t.numel(), device=t.device) % 8191 + 1
    return torch.stack([t.new_tensor(n), t.sum(), (t * position).sum()])


def target_summary(target: Tensor, ignore_index: int) -> Tensor:
    """Five int64 numbers that let the ranks of a vocab-parallel group check their targets
    together: ``[lowest, highest]`` non-ignored class id (``[0, 0]`` when none counts) and the
    target's :func:`fingerprint`. Reads values."""
    t = target.reshape(-1).long()
    kept = t[t != ignore_index]
    lo, hi = (kept.min(), kept.max()) if kept.numel() else (t.new_zeros(()), t.new_zeros(()))
    return torch.cat([torch.stack([lo, hi]), fingerprint(t)])


def check_identical_across_ranks(fn: str, name: str, fingerprints: Tensor) -> None:
    """Every rank's :func:`fingerprint` of argument ``name`` (one row per rank, gathered):
    raises on EVERY rank when they differ (a vocab-parallel loss needs it the same on every
    rank of its group)."""
    rows = [[int(v) for v in row] for row in fingerprints.tolist()]
    for rank, row in enumerate(rows[1:], start=1):
        if row != rows[0]:
            raise LeanlossValueError(
                f"{fn}: argument '{name}' must be identical on every rank of the vocab-parallel "
                f"group, but rank {rank}'s differs from rank 0's ({row[0]} vs {rows[0][0]} "
                f"elements, or other values); pass each tensor-parallel rank the batch of its "
                f"data-parallel rank"
            )


def check_targets_across_ranks(fn: str, summaries: Tensor, num_classes: int, ignore_index: int) -> None:
    """Every rank's :func:`target_summary` (one row per rank, gathered): raises on EVERY rank
    when any rank's target is out of ``[0, C)``, or when the ranks' targets differ (a
    vocab-parallel loss needs the same targets on every rank of its group)."""
    rows = [[int(v) for v in row] for row in summaries.tolist()]
    for rank, (lo, hi, *_rest) in enumerate(rows):
        if lo < 0 or hi >= num_classes:
            value = lo if lo < 0 else hi
            raise TargetOutOfRangeError(
                f"{fn}: Target {value} is out of bounds: argument 'target' on rank {rank} of the "
                f"group must hold class indices in [0, {num_classes - 1}] (or "
                f"ignore_index={ignore_index}), got {value}"
            )
    check_identical_across_ranks(fn, "target", summaries[:, TARGET_SUMMARY_SIZE - FINGERPRINT_SIZE:])
