"""Per-token log-probabilities and entropies with the LM head's rows split across ranks.

The scorer is :class:`leanloss.linear.log_probs.LogProbScorer` with this rank's
:class:`~leanloss.parallel._comm.VocabShard` as its reduce hook. The statistics of
:mod:`leanloss._fused.logp_rows` are sums over the vocabulary, so each rank
sums over its slice with a shift every rank shares: per block one all-reduce MAX of the row
maxima ``m``, then one stacked all-reduce SUM of ``(S, U, y_t)`` (the target logit is counted by
the rank that owns the target); the statistics of ``return_stats`` add their sums to the SUM
and ``is_top1`` its "maximum before the target" to the MAX. ``logp``, ``H`` and ``lse`` follow
on every rank, and the gradient with respect to this rank's logits is local (the formula needs
only ``lse``, ``H`` and the upstream gradients), so backward communicates nothing but the
all-reduce of the hidden states' gradient.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from .._compile import graph_break
from ..linear._pipeline import Head
from ..linear.log_probs import run_log_probs
from .._dtensor import has_dtensor, unwrap
from ._setup import shard_of

__all__ = ["vocab_parallel_linear_log_probs"]


@graph_break  # collectives and a data-dependent row selection: run eagerly
def vocab_parallel_linear_log_probs(
    hidden: Tensor,
    local_weight: Tensor,
    target: Tensor,
    group=None,
    *,
    bias: Optional[Tensor] = None,
    vocab_start: Optional[int] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    return_stats: Sequence[str] = (),
):
    r""":func:`leanloss.linear_log_probs` with each rank holding rows of the LM head.

    Equals ``linear_log_probs(hidden, W, target, b, ...)`` with ``W``/``b`` the concatenation of
    every rank's ``local_weight``/``bias``, in value (on every rank) and gradient: ``local_weight``
    and ``bias`` get this rank's slice of the full gradient, ``hidden`` the FULL gradient on
    every rank (one all-reduce in backward). Only per-token statistics cross ranks (O(tokens)
    per block: one MAX and one SUM, each of a few numbers per row stacked, in forward; the
    statistics of ``return_stats`` add a column to one of them each).

    Args:
        hidden: ``(..., D)``, the same on every rank of ``group``.
        local_weight: ``(V_local, D)``, this rank's rows of the head; slices may be uneven.
        target: ``(...)`` GLOBAL class ids, identical on every rank.
        group, vocab_start: as in :func:`vocab_parallel_linear_cross_entropy`.
        bias: this rank's ``(V_local,)`` slice of the bias, or ``None``.
        temperature, return_entropy, ignore_index, softcap, logit_scale, return_stats: as in
            :func:`leanloss.linear_log_probs`.
        chunk_size: rows per block, the same on every rank (default: planned from the largest
            slice).

    Returns what :func:`leanloss.linear_log_probs` returns, shaped like ``target`` (float32 for
    16-bit inputs). Every rank of ``group`` must call this function (and its backward) together.
    """
    fn = "vocab_parallel_linear_log_probs"
    sizes = None
    if has_dtensor(hidden, local_weight, bias, target):
        sharded, whole, group, sizes = unwrap(fn, {"local_weight": local_weight, "bias": bias},
                                              {"hidden": hidden, "target": target}, group, vocab_start, dim=0)
        local_weight, bias = sharded["local_weight"], sharded["bias"]
        hidden, target = whole["hidden"], whole["target"]

    def vocab_of(head: Head):
        return shard_of(fn, head.hidden, head.weight.shape[0], target, group, vocab_start,
                        ignore_index, sizes=sizes)

    return run_log_probs(fn, Head(hidden, local_weight, bias), target, vocab_of,
                         temperature=temperature, return_entropy=return_entropy,
                         return_stats=return_stats, softcap=softcap, logit_scale=logit_scale,
                         ignore_index=ignore_index, chunk_size=chunk_size, check_range=False,
                         names=("hidden", "local_weight", "bias"))
