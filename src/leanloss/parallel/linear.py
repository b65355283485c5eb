"""Fused LM-head cross entropy with the head's rows (the vocabulary) split across ranks."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _checks, _docs
from .._compile import graph_break
from .._dtypes import compute_dtype
from .._reduce import resolve_reduction
from ..linear._pipeline import Head, run_fused
from ..linear.cross_entropy import CrossEntropyScorer, ce_divisor
from .._dtensor import has_dtensor, unwrap
from ._setup import ce_shard

__all__ = ["vocab_parallel_linear_cross_entropy"]


@_docs.fill
@graph_break  # collectives and a data-dependent row selection: run eagerly
def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    local_weight: Tensor,
    target: Tensor,
    group=None,
    *,
    bias: Optional[Tensor] = None,
    vocab_start: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    class_weight: Optional[Tensor] = None,
    z_loss: float = 0.0,
    num_items=None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    r"""Cross entropy of ``hidden @ W.T + b`` where each rank holds rows of the LM head ``W``.

    Equals ``linear_cross_entropy(hidden, W, target, b, ...)`` with ``W``/``b`` the
    concatenation of every rank's ``local_weight``/``bias`` (dense reference:
    ``leanloss.cross_entropy`` plus the z-loss on ``hidden @ W.T + b``), with the formula of
    :func:`vocab_parallel_cross_entropy`:

    @doc ce_row_loss

    No rank ever holds its ``(tokens, V_local)`` logits: the fused engine walks blocks of
    ``chunk_size`` rows, and per block only per-row statistics cross ranks (one all-reduce MAX
    and one stacked all-reduce SUM). Gradients: ``local_weight`` and ``bias`` get this rank's
    slice of the full gradient; ``hidden`` gets the FULL gradient on every rank (the partial
    gradients ``dz_local @ W_local`` are summed with one all-reduce in backward), as for an
    input replicated over the tensor-parallel group.

    Args:
        hidden: ``(..., D)``, the same on every rank of ``group``.
        local_weight: ``(V_local, D)``, this rank's rows of the head; slices may be uneven.
            Or a DTensor sharded ``Shard(0)`` on one mesh dimension (``Replicate`` on any
            other), as ``ColwiseParallel`` leaves ``lm_head.weight``: then the group,
            ``vocab_start`` and ``V`` come from its mesh and placement (``torch.chunk``
            slices; ``group`` and ``vocab_start`` must be ``None``), ``bias`` must be sharded
            alike, a DTensor ``hidden`` is made ``Replicate`` on that mesh, and every gradient
            is a DTensor of its input's placement.
        target: ``(...)`` GLOBAL class ids, identical on every rank.
        group, vocab_start, class_weight, ignore_index, reduction: as in
            :func:`vocab_parallel_cross_entropy` (``class_weight`` is the FULL ``(V,)`` vector).
        label_smoothing, z_loss, num_items: as in :func:`vocab_parallel_cross_entropy`.
        bias: this rank's ``(V_local,)`` slice of the head's bias, or ``None``.
        chunk_size: rows per block, the same on every rank (default: from the largest slice,
            so that every rank walks the same blocks and issues the same collectives).

    Returns the loss in float32 for bfloat16/float16 inputs (matmuls in the input dtype,
    statistics in float32), as ``linear_cross_entropy`` does; ``'none'`` has ``target``'s
    shape. Every rank of ``group`` must call this function together (and its backward).
    """
    fn = "vocab_parallel_linear_cross_entropy"
    reduction = resolve_reduction(reduction)
    sizes = None
    if has_dtensor(hidden, local_weight, bias, target, class_weight):
        sharded, whole, group, sizes = unwrap(
            fn, {"local_weight": local_weight, "bias": bias},
            {"hidden": hidden, "target": target, "class_weight": class_weight},
            group, vocab_start, dim=0)
        local_weight, bias = sharded["local_weight"], sharded["bias"]
        hidden, target, class_weight = whole["hidden"], whole["target"], whole["class_weight"]

    def setup(head: Head, _):
        _checks.check_linear_shapes(fn, *head, target, weight_name="local_weight")
        shard, smoothing, zl = ce_shard(fn, head.hidden, head.weight.shape[0], target, group, vocab_start,
                                        ignore_index, label_smoothing, class_weight, z_loss, sizes)

        def make_scorer(t):
            return CrossEntropyScorer(t, class_weight, smoothing, zl, None, 1.0,
                                      compute_dtype(head.hidden.dtype), shard)

        return shard, make_scorer, ce_divisor if num_items is None else num_items

    out, _ = run_fused(fn, Head(hidden, local_weight, bias), target, setup, ignore_index=ignore_index,
                       reduction=reduction, chunk_size=chunk_size, names=("hidden", "local_weight", "bias"))
    return out
