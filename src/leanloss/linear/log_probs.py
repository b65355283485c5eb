"""Per-token log-probabilities and entropies of an LM head without the ``(tokens, vocab)`` logits.

The input of every policy-gradient loss (GRPO, PPO, DPO): ``log p(target)`` under
``softmax(z / T)`` and the entropy of that distribution, per token, with gradients through both.
:func:`linear_log_probs` drops ignored tokens and hands the rest to the chunked engine
(:mod:`leanloss._fused.engine`) with :class:`LogProbScorer`, a scorer of two outputs per row
(``logp`` and ``H``) whose upstream gradients arrive in backward, so backward recomputes each
block (four matmuls in all). Forward records each row's ``lse`` and ``H``; backward writes the
gradient from them in one pass over the block. The formulas are those of
:mod:`leanloss._fused.logp_rows`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._compile import graph_break
from .. import _checks
from .._dtypes import compute_dtype
from .._fused.engine import PointGradient, ScoreResult, at_cols
from .._fused.logp_rows import LOGP_GRAD_KERNEL, LOGP_STATS_KERNEL, logp_entropy, shifted_sums
from .._fused.reduce_hook import LocalVocab, VocabSlice, global_row_max, owned_only
from .._dtensor import routes_dtensor
from ._pipeline import Head, run_fused

__all__ = ["linear_log_probs", "LogProbScorer"]

_FN = "linear_log_probs"


class LogProbScorer:
    """Scorer of ``(logp, H)`` per row (``outputs = 2``), on one device or vocab-parallel.

    ``target``: the ``(M,)`` global class of each row the engine walks; ``scale = 1 /
    temperature``; ``vocab``: the reduce hook (:class:`~leanloss._fused.reduce_hook.LocalVocab`
    on one device: one compiled statistics kernel reads the 16-bit block; a vocab shard:
    per-slice sums all-reduced, on compute-dtype blocks). A block's first ``score`` returns
    ``logp``, ``H`` and ``lse`` as its saved statistics; a ``score`` with the upstream
    gradients ``(n, 2)`` = ``(a, b)`` writes ``d(a logp + b H)/dz`` over the block from them
    (no collective), the ``s a`` at the target as a point term.
    """

    outputs = 2

    def __init__(self, target: Tensor, scale: float, dtype: torch.dtype, vocab: VocabSlice) -> None:
        self.vocab = vocab
        self.local_target, self.owned = vocab.local_target(target)
        self.scale = float(scale)
        self.dtype = dtype
        self.low_precision_blocks = vocab.identity

    def score(self, z: Tensor, rows: slice, saved: Optional[Tensor],
              upstream: Optional[Tensor]) -> ScoreResult:
        t = self.local_target[rows]
        owned = None if self.owned is None else self.owned[rows]
        if saved is None:
            saved = self._statistics(z, t, owned)
        if upstream is None or self.vocab.size == 0 or z.shape[0] == 0:
            return ScoreResult(saved[:, :2], saved=saved)
        a, b = upstream[:, 0].contiguous(), upstream[:, 1].contiguous()
        (dense_t,) = LOGP_GRAD_KERNEL(z, at_cols(z, t, self.dtype), saved[:, 2].contiguous(),
                                      saved[:, 1].contiguous(), a, b, scale=self.scale)
        coef = owned_only(a * self.scale, owned)
        return ScoreResult(saved[:, :2], PointGradient(t, coef, dense_t), saved)

    def _statistics(self, z: Tensor, t: Tensor, owned: Optional[Tensor]) -> Tensor:
        """``(n, 3)``: ``(logp, H, lse)`` of the block's rows over the whole vocabulary."""
        if self.vocab.identity:
            return torch.stack(LOGP_STATS_KERNEL(z, at_cols(z, t, self.dtype), scale=self.scale), 1)
        n = z.shape[0]
        if n == 0:  # the same on every rank: no rank skips a collective the others run
            return z.new_zeros(0, 3)
        y = z * self.scale if self.scale != 1.0 else z
        m = global_row_max(y, self.vocab)
        sums = y.new_zeros(n, 3)
        if self.vocab.size > 0:
            sums[:, 0], sums[:, 1] = shifted_sums(y, m)
            sums[:, 2] = owned_only(at_cols(y, t, y.dtype), owned)
        self.vocab.sum_(sums)
        return torch.stack(logp_entropy(m, sums[:, 0], sums[:, 1], sums[:, 2]), 1)


def check_log_prob_inputs(fn: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                          target: Tensor, temperature, ignore_index: int, *,
                          check_range: bool = True, weight_name: str = "weight") -> float:
    """Shapes, dtypes, temperature and (with ``check_range``) target range of the log-prob
    functions; returns the temperature as a float. A vocab-parallel caller checks the range
    against the global vocabulary itself (``check_range=False``)."""
    local = _checks.check_linear_shapes(fn, hidden, weight, bias, target, weight_name=weight_name)
    temperature = _checks.check_positive(fn, "temperature", temperature)
    if _checks.shapes_enabled() and bias is not None:
        _checks.check_same_dtype(fn, "bias", bias, weight_name, weight)
    if check_range:
        _checks.check_index_target_range(fn, target, local, ignore_index)
    return temperature


@graph_break
@routes_dtensor  # a vocab-sharded DTensor weight: vocab-parallel path
def linear_log_probs(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
):
    r"""Per-token ``log p(target)`` (and entropy) of ``softmax((hidden @ weight.T + bias) / T)``.

    Same values and gradients as the dense reference::

        z = (hidden @ weight.T + bias) / temperature
        logp    = torch.log_softmax(z, -1).gather(-1, target[..., None])[..., 0]
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)

    without materializing ``z``: per token, with ``p = softmax(z)``,
    ``logp = z_t - logsumexp(z)`` and ``entropy = -sum_c p_c log p_c``.

    Args:
        hidden: ``(..., D)`` floating; weight: ``(V, D)`` (same dtype); target: ``(...)`` int64
            class indices; bias: ``(V,)`` or ``None``.
        temperature: ``T > 0`` (a Python number; sampling temperature of the rollout).
        return_entropy: also return the entropy per token.
        ignore_index: tokens with this target are dropped before any matmul; both outputs are
            ``0`` there (and get no gradient).
        chunk_size: rows per block (default: the engine's plan).

    Returns ``logp``, or ``(logp, entropy)``, each shaped like ``target``, in float32 for
    bfloat16/float16/float32 inputs (float64 for float64). Differentiable with respect to
    ``hidden``, ``weight`` and ``bias`` for any upstream gradients of both outputs together
    (the exact entropy gradient ``-p_c (log p_c + H) / T``). The upstream gradients arrive in
    backward, so backward recomputes each block of logits: four matmuls for forward and
    backward. Under ``torch.no_grad()`` (rollout scoring) only the forward matmul runs.
    """
    def setup(head: Head, _):
        inv_t = 1.0 / check_log_prob_inputs(_FN, *head, target, temperature, ignore_index)
        vocab = LocalVocab(head.weight.shape[0])
        return vocab, lambda t: LogProbScorer(t, inv_t, compute_dtype(head.hidden.dtype), vocab), None

    out, _ = run_fused(_FN, Head(hidden, weight, bias), target, setup, ignore_index=ignore_index,
                       reduction="none", chunk_size=chunk_size)
    return (out[..., 0], out[..., 1]) if return_entropy else out[..., 0]
