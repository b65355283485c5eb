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
from .. import _checks, _heuristics
from .._dtypes import autocast_matmul_operands, compute_dtype
from .._fused.engine import PointGradient, ScoreResult, fused_linear_loss, set_at_cols
from .._fused.logp_rows import LOGP_GRAD_KERNEL, LOGP_STATS_KERNEL, target_coef
from .._fused.rows import scatter_rows, select_kept
from ..parallel._dtensor import route_linear_log_probs, routes_dtensor

__all__ = ["linear_log_probs", "LogProbScorer"]

_FN = "linear_log_probs"


class LogProbScorer:
    """Scorer of ``(logp, H)`` per row (``outputs = 2``) on 16-bit or float blocks.

    ``target``: the ``(M,)`` class of each row the engine walks; ``scale = 1 / temperature``.
    The first ``score`` of a block records ``logp``, ``H`` and ``lse``; a ``score`` with a
    ``grad_scale`` ``(n, 2)`` = ``(a, b)`` (the upstream gradients of ``logp`` and ``H``) writes
    ``d(a logp + b H)/dz`` over the block from the recorded statistics, the ``s a`` at the target
    as a :class:`~leanloss._fused.engine.PointGradient`.
    """

    low_precision_blocks = True
    outputs = 2

    def __init__(self, target: Tensor, scale: float, dtype: torch.dtype) -> None:
        self.target = target
        self.scale = float(scale)
        self.dtype = dtype
        self.stats = torch.empty((target.shape[0], 3), dtype=dtype, device=target.device)
        self._scored = set()

    def score(self, z: Tensor, rows: slice, grad_scale: Optional[Tensor]) -> ScoreResult:
        t = self.target[rows]
        x_t = z.gather(1, t.unsqueeze(1)).squeeze(1).to(self.dtype)
        stats = self.stats[rows]
        key = (rows.start, rows.stop)
        if key not in self._scored:
            for j, column in enumerate(LOGP_STATS_KERNEL(z, x_t, scale=self.scale)):
                stats[:, j] = column
            self._scored.add(key)
        out = stats[:, :2]
        if grad_scale is None:
            return ScoreResult(out)
        a, b = grad_scale[:, 0].contiguous(), grad_scale[:, 1].contiguous()
        (dense_t,) = LOGP_GRAD_KERNEL(z, x_t, stats[:, 2].contiguous(), stats[:, 1].contiguous(), a, b,
                                      scale=self.scale)
        coef = target_coef(a, self.scale)
        set_at_cols(z, t, dense_t + coef)
        return ScoreResult(out, None, PointGradient(t, coef, dense_t))


def check_log_prob_inputs(fn: str, hidden: Tensor, weight: Tensor, target: Tensor,
                          bias: Optional[Tensor], temperature, ignore_index: int, *,
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
@routes_dtensor(route_linear_log_probs)  # a vocab-sharded DTensor weight: vocab-parallel path
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
    hidden, weight, bias = autocast_matmul_operands(hidden, weight, bias)
    temperature = check_log_prob_inputs(_FN, hidden, weight, target, bias, temperature, ignore_index)
    lead_shape = target.shape
    h_all = hidden.reshape(-1, hidden.shape[-1])
    t_all = target.reshape(-1)
    n = t_all.shape[0]
    idx, t, h = select_kept(t_all, ignore_index, h_all)
    scorer = LogProbScorer(t, 1.0 / temperature, compute_dtype(hidden.dtype))
    out = fused_linear_loss(h, weight, bias, scorer, reduction="none", chunk_size=chunk_size)
    return finish_log_probs(_FN, out, idx, n, lead_shape, return_entropy, hidden=hidden,
                            weight=weight, bias=bias)


def finish_log_probs(fn: str, out: Tensor, idx: Optional[Tensor], n: int, lead_shape,
                     return_entropy: bool, **inputs):
    """The engine's ``(M, 2)`` output -> ``logp`` (and ``entropy``) in the batch shape, ``0`` at
    the dropped rows; warns when a value is not finite."""
    logp = scatter_rows(out[:, 0], idx, n).reshape(lead_shape)
    logp = _heuristics.finite_or_warn(fn, logp, **inputs)
    if not return_entropy:
        return logp
    return logp, scatter_rows(out[:, 1], idx, n).reshape(lead_shape)
