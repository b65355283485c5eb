"""Per-row cross-entropy statistics over a vocabulary split across ranks.

Every rank holds a block ``z`` of shape ``(n, V_local)``: the logits of ``n`` tokens over its
slice ``[start, start + V_local)`` of the global vocabulary of ``V`` classes. The loss of a row
needs four global quantities, each reduced from one number per row and rank:

* ``m   = max_c z_c``                      (all-reduce MAX)
* ``s   = sum_c exp(z_c - m)``             (all-reduce SUM; ``lse = m + log s``)
* ``z_t``: the target's logit, 0 on ranks that do not own the target (all-reduce SUM)
* ``S   = sum_c w_c z_c``                  (all-reduce SUM; only with label smoothing)

The three sums travel in one ``(n, k)`` all-reduce. The row loss and its gradient are the
fused cross entropy's (:data:`leanloss._fused.ce_rows.ROW_LOSS`, with ``C`` the global ``V``
and ``W`` the sum over all ``V`` classes); the gradient with respect to this rank's logits is
local, so no logits (nor their gradient) ever cross ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._fused.ce_rows import ce_grad_coefficients, ce_row_loss
from .._fused.engine import ScoreResult
from ._comm import VocabShard, all_reduce_, global_row_max

__all__ = ["VocabParallelScorer"]


class VocabParallelScorer:
    """:class:`~leanloss._fused.engine.Scorer` of the vocab-parallel cross entropy.

    ``target`` holds the global class ids of the ``M`` rows that count (ignored rows already
    dropped, identical on every rank). The first ``score`` of a block runs the collectives and
    records each row's ``lse`` and loss; a later ``score`` of the same block with a
    ``grad_scale`` (the engine's ``reduction='none'`` backward, or the backward of the
    local-logits loss) reuses them and communicates nothing.
    """

    def __init__(
        self,
        shard: VocabShard,
        target: Tensor,
        class_weight: Optional[Tensor],
        label_smoothing: float,
        z_loss: float,
        dtype: torch.dtype,
    ):
        self.shard = shard
        self.smoothing = float(label_smoothing)
        self.z_loss = float(z_loss)
        local = target - shard.start
        self.owned = (local >= 0) & (local < shard.size)
        self.local_target = torch.where(self.owned, local, torch.zeros_like(local))
        if class_weight is not None:
            w = class_weight.to(dtype)
            self.w_target = w[target]
            self.w_local = w[shard.start: shard.start + shard.size]
            self.weight_total = w.sum()
        else:
            self.w_target = torch.ones(target.shape, dtype=dtype, device=target.device)
            self.w_local = None
            self.weight_total = float(shard.vocab)
        self.lse = torch.empty(target.shape, dtype=dtype, device=target.device)
        self.loss = torch.empty_like(self.lse)
        self._scored = set()

    # ---------------------------------------------------------------------------------------
    low_precision_blocks = False

    def score(self, logits: Tensor, rows: slice, grad_scale: Optional[Tensor]) -> ScoreResult:
        key = (rows.start, rows.stop)
        if key in self._scored:
            if grad_scale is not None:  # p = exp(z - lse), from the recorded lse
                logits.sub_(self.lse[rows].unsqueeze(1)).exp_()
                self._gradient_(logits, rows, grad_scale, None)
            return ScoreResult(self.loss[rows])
        inv_sum = self._statistics_(logits, rows)
        self._scored.add(key)
        if grad_scale is not None:  # logits now hold exp(z - m); p = that / s
            self._gradient_(logits, rows, grad_scale, inv_sum)
        return ScoreResult(self.loss[rows])

    def _statistics_(self, z: Tensor, rows: slice) -> Tensor:
        """Global row statistics; records ``lse`` and loss; leaves ``exp(z - m)`` in ``z``.

        Returns ``1 / s`` per row, so that ``softmax = z * (1 / s)`` afterwards.
        """
        shard, n = self.shard, z.shape[0]
        if n == 0:  # same on every rank: no collective is skipped by only some of them
            return z.new_empty(0)
        m = global_row_max(z, shard)
        sums = z.new_zeros(n, 3 if self.smoothing > 0 else 2)
        if shard.size > 0:
            owned = self.owned[rows]
            picked = z.gather(1, self.local_target[rows].unsqueeze(1)).squeeze(1)
            sums[:, 1] = torch.where(owned, picked, torch.zeros_like(picked))
            if self.smoothing > 0:
                sums[:, 2] = z.sum(1) if self.w_local is None else z @ self.w_local
            z.sub_(m.unsqueeze(1)).exp_()
            sums[:, 0] = z.sum(1)
        all_reduce_(sums, dist.ReduceOp.SUM, shard.group, shard.world_size)
        lse = m + sums[:, 0].log()
        loss = ce_row_loss(lse - sums[:, 1], lse, self.w_target[rows],
                           sums[:, 2] if self.smoothing > 0 else None, **self._stats())
        self.lse[rows] = lse
        self.loss[rows] = loss
        return sums[:, 0].reciprocal()

    def _gradient_(self, p: Tensor, rows: slice, grad_scale: Tensor, inv_sum: Optional[Tensor]) -> None:
        """Overwrite ``p`` (the unnormalized softmax ``exp(z - shift)``) with ``g * dloss/dz``."""
        g = grad_scale.reshape(-1)
        a, b, s = ce_grad_coefficients(g, self.lse[rows], self.w_target[rows], **self._stats())
        if inv_sum is not None:
            a = a * inv_sum
        p.mul_(a.unsqueeze(1))
        if self.shard.size == 0:
            return
        if self.smoothing < 1.0:
            b = torch.where(self.owned[rows], -b, torch.zeros_like(b))
            p.scatter_add_(1, self.local_target[rows].unsqueeze(1), b.unsqueeze(1))
        if self.smoothing > 0:
            if self.w_local is None:
                p.sub_(s.unsqueeze(1))
            else:
                p.addcmul_(s.unsqueeze(1), self.w_local.unsqueeze(0), value=-1.0)

    def _stats(self) -> dict:
        return dict(smoothing=self.smoothing, w_total=self.weight_total, num_classes=self.shard.vocab,
                    z_loss=self.z_loss)
