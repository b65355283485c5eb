"""Cross entropy on vocab-sharded logits: each rank holds a slice of the vocabulary dimension."""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from .. import _checks, _docs, _heuristics
from .._compile import graph_break
from .._dtypes import autocast_loss_inputs, compute_dtype
from .._fused.engine import fused_logits_loss
from .._fused.rows import select_kept
from .._reduce import reduce_loss, resolve_reduction
from ..linear._pipeline import Batch
from ..linear.cross_entropy import CrossEntropyScorer, ce_divisor
from ._setup import ce_shard, local_args

__all__ = ["vocab_parallel_cross_entropy"]


@_docs.fill
@graph_break  # collectives and a data-dependent row selection: run eagerly
def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    group=None,
    *,
    vocab_start: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    class_weight: Optional[Tensor] = None,
    z_loss: float = 0.0,
    num_items=None,
) -> Tensor:
    r"""Cross entropy of logits whose vocabulary dimension is split across the ranks of ``group``.

    Equals ``leanloss.cross_entropy`` (``torch.nn.functional.cross_entropy``) plus the z-loss on
    the logits concatenated over the ranks along the last dimension, in value and in gradient,
    on every rank. With ``C = V`` the global number of classes:

    @doc ce_row_loss

    @doc ce_reduction

    Only per-row numbers cross ranks (a max and one stacked sum of the sum-exp, target logit
    and, with smoothing, :math:`\sum_c w_c z_c`); label smoothing is exact for any number of
    ranks (the sum runs over every slice, divided by the global ``V``). The gradient with respect
    to ``local_logits`` is this rank's slice of the full gradient, computed without any
    communication in backward.

    Args:
        local_logits: ``(..., V_local)``, this rank's slice of the logits (classes LAST).
            Slices may be uneven. Or a DTensor sharded ``Shard(-1)`` on one mesh dimension
            (``Replicate`` on any other), e.g. the output of an LM head parallelized with
            ``ColwiseParallel(use_local_output=False)``: then the group, ``vocab_start`` and
            ``V`` come from its mesh and placement (``group`` and ``vocab_start`` must be
            ``None``) and its gradient is a DTensor of the same placement.
        target: ``(...)`` int64 GLOBAL class ids in ``[0, V)`` or ``ignore_index``; identical on
            every rank.
        @doc group
        @doc vocab_start
        class_weight: the FULL ``(V,)`` per-class weights, the same on every rank (each rank
            uses its slice, and ``w_t`` for targets owned by other ranks).
        reduction: ``'mean'`` | ``'sum'`` | ``'none'`` (shape of ``target``).
        label_smoothing, z_loss, num_items, ignore_index: as in ``linear_cross_entropy``.

    Returns the loss, a plain tensor, in ``local_logits``' dtype, as ``cross_entropy`` does; bfloat16/float16
    logits are reduced in float32. Every rank returns the same value. Collective calls happen in
    forward only, so every rank of ``group`` must call this function together.
    """
    fn = "vocab_parallel_cross_entropy"
    local_logits, class_weight = autocast_loss_inputs("cross_entropy", local_logits, class_weight)
    reduction = resolve_reduction(reduction)
    args, group, sizes = local_args(fn, {"local_logits": local_logits}, {"target": target, "class_weight": class_weight},
                                    group, vocab_start, dim=-1)
    local_logits, target, class_weight = args["local_logits"], args["target"], args["class_weight"]
    _checks.check_tensor(fn, "local_logits", local_logits)
    if _checks.shapes_enabled():
        _checks.check_floating(fn, "local_logits", local_logits, "logits")
        if local_logits.dim() < 1:
            raise _checks.LeanlossValueError(
                f"{fn}: argument 'local_logits' must have a last (vocabulary) dimension, got a "
                f"0-dim tensor"
            )
        _checks.check_same_device(fn, local_logits=local_logits, target=target)
    local_vocab = local_logits.shape[-1]
    shard, smoothing, zl = ce_shard(fn, local_logits, local_vocab, target, group, vocab_start, ignore_index,
                                    label_smoothing, class_weight, z_loss, sizes)
    keep, kept_target = select_kept(target.reshape(-1), ignore_index)
    scorer = CrossEntropyScorer(kept_target.long(), class_weight, smoothing, zl, None, 1.0,
                                compute_dtype(local_logits.dtype), shard)
    lead = tuple(local_logits.shape[:-1])
    batch = Batch(keep, math.prod(lead), lead)
    # per-row losses; backward recomputes from the saved lse, with no collective
    losses = fused_logits_loss(local_logits.reshape(batch.n, local_vocab), scorer, reduction="none",
                               keep=keep, policy_vocab=shard.max_size)
    if reduction == "none":
        out = batch.scatter(losses)
    else:
        out = reduce_loss(losses, reduction, weight_sum=num_items if num_items is not None else ce_divisor(scorer))
    return _heuristics.finite_or_warn("vocab_parallel_cross_entropy", out.to(local_logits.dtype),
                                      local_logits=local_logits)
