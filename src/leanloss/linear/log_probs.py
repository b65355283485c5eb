"""Per-token log-probabilities and statistics of an LM head without the ``(tokens, vocab)`` logits
(the input of policy-gradient losses), on one device and vocab-parallel; the formulas are those
of :mod:`leanloss._fused.logp_rows`."""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._compile import graph_break
from .. import _checks, _docs
from .._dtypes import compute_dtype
from .._fused.ce_rows import transform
from .._fused.engine import PointGradient, ScoreResult, at_cols
from .._fused.logp_rows import (LOGP_GRAD_KERNEL, LOGP_STATS_KERNEL, STAT_NAMES, LogProbStats,
                                finish_stats, is_top1, max_before_target, row_sums)
from .._fused.reduce_hook import LocalVocab, VocabSlice, global_row_max_with, owned_only
from .._dtensor import routes_dtensor
from ._pipeline import Head, run_fused

__all__ = ["linear_log_probs", "LogProbScorer", "TokenStats"]


class TokenStats(NamedTuple):
    """Per-token outputs of :func:`linear_log_probs` with ``return_stats``: each shaped like
    ``target`` (``None`` for a statistic not asked for); see
    :mod:`leanloss._fused.logp_rows` for the formulas."""

    logp: Tensor
    entropy: Optional[Tensor] = None
    log_sum_sq_probs: Optional[Tensor] = None
    mean_logit: Optional[Tensor] = None
    is_top1: Optional[Tensor] = None


class LogProbScorer:
    """Scorer of ``logp`` and the ``stats`` asked for, per row of the ``(M,)`` global classes
    ``target``, over the reduce hook ``vocab``; ``scale``, ``softcap``: the transform of
    :mod:`leanloss._fused.logp_rows` (temperature folded in). One output per differentiable
    statistic (``logp`` first); ``is_top1`` goes to :attr:`top1`. The first scoring of a block
    saves the outputs and ``lse``; backward's writes the gradient from them (no collective).
    """

    def __init__(self, target: Tensor, scale: float, dtype: torch.dtype, vocab: VocabSlice, *,
                 softcap: Optional[float] = None, stats: Optional[LogProbStats] = None) -> None:
        self.vocab = vocab
        self.target = target
        self.local_target, self.owned = vocab.local_target(target)
        self.options = dict(scale=float(scale), softcap=None if softcap is None else float(softcap),
                            num_classes=vocab.vocab)
        self.dtype = dtype
        self.stats = stats = stats or LogProbStats()
        self.names = stats.outputs
        self.outputs = len(self.names)
        self.top1 = torch.zeros(target.shape, dtype=torch.bool, device=target.device) if stats.top1 else None
        self.low_precision_blocks = vocab.identity

    def _column(self, t: Optional[Tensor], name: str) -> Optional[Tensor]:
        return t[:, self.names.index(name)].contiguous() if t is not None and name in self.names else None

    def score(self, z: Tensor, rows: slice, saved: Optional[Tensor],
              upstream: Optional[Tensor]) -> ScoreResult:
        t = self.local_target[rows]
        if saved is None:
            saved = self._statistics(z, t, rows)
        k = self.outputs
        values = saved[:, :k] if k > 1 else saved[:, 0]
        if upstream is None or self.vocab.size == 0:
            return ScoreResult(values, saved=saved)
        dense_t, coef = LOGP_GRAD_KERNEL(
            z, at_cols(z, t, self.dtype), saved[:, k].contiguous(),
            self._column(saved, "entropy"), self._column(saved, "log_sum_sq_probs"),
            upstream[:, 0].contiguous(), self._column(upstream, "entropy"),
            self._column(upstream, "log_sum_sq_probs"), self._column(upstream, "mean_logit"),
            **self.options)
        return ScoreResult(values, PointGradient(t, owned_only(coef, self.owned, rows), dense_t), saved)

    def _statistics(self, z: Tensor, t: Tensor, rows: slice) -> Tensor:
        """``(n, outputs + 1)``: the outputs and ``lse`` of the block's rows over the whole
        vocabulary; ``is_top1`` into :attr:`top1`."""
        stats, vocab = self.stats, self.vocab
        if vocab.identity:
            out = list(LOGP_STATS_KERNEL(z, at_cols(z, t, self.dtype), t if stats.top1 else None,
                                         **self.options, **stats._asdict()))
        else:  # a vocabulary slice: per-slice maxima and sums, reduced
            y = transform(z, self.options["scale"], self.options["softcap"])
            n = y.shape[0]
            partial_before: Tuple[Tensor, ...] = ()
            if stats.top1:
                partial_before = ((max_before_target(y, self.target[rows], vocab.start) if vocab.size > 0
                                   else y.new_full((n,), float("-inf"))),)
            m, *before = global_row_max_with(y, vocab, *partial_before)
            sums = y.new_zeros(n, 1 + self.outputs)
            if vocab.size > 0:
                for i, partial in enumerate(row_sums(y, m, stats)):
                    sums[:, i] = partial
                sums[:, -1] = owned_only(at_cols(y, t, y.dtype), self.owned, rows)
            vocab.sum_(sums)
            out = finish_stats(m, list(sums[:, :-1].unbind(1)), sums[:, -1], stats, vocab.vocab)
            if stats.top1:
                out.append(is_top1(sums[:, -1], m, before[0]))
        if self.top1 is not None:
            self.top1[rows] = out.pop()
        return torch.stack(out, 1)


def stat_options(fn: str, return_entropy: bool, return_stats: Sequence[str]) -> LogProbStats:
    """The statistics asked for by ``return_entropy`` and ``return_stats`` (checked)."""
    if isinstance(return_stats, str) or not isinstance(return_stats, (tuple, list)):
        raise _checks.LeanlossTypeError(
            f"{fn}: argument 'return_stats' must be a tuple or list of names from {STAT_NAMES}, "
            f"got {return_stats!r}")
    unknown = [name for name in return_stats if name not in STAT_NAMES]
    if unknown:
        raise _checks.LeanlossValueError(
            f"{fn}: argument 'return_stats' has unknown names {unknown}; valid names: {STAT_NAMES}")
    entropy, log_sum_sq, mean, top1 = (name in return_stats for name in STAT_NAMES)
    return LogProbStats(entropy or bool(return_entropy), log_sum_sq, mean, top1)


@_docs.fill
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
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    return_stats: Sequence[str] = (),
):
    r"""Per-token ``log p(target)`` (and statistics) of ``softmax(y)``, ``y`` the LM head's
    logits ``z = hidden @ weight.T + bias`` scaled, softcapped and divided by the temperature.

    Same values and gradients as the dense reference::

        z = logit_scale * (hidden @ weight.T + bias)
        y = (softcap * torch.tanh(z / softcap) if softcap else z) / temperature
        logp    = torch.log_softmax(y, -1).gather(-1, target[..., None])[..., 0]
        entropy = -(y.softmax(-1) * y.log_softmax(-1)).sum(-1)

    without materializing ``y``: per token, with ``p = softmax(y)``,
    ``logp = y_t - logsumexp(y)`` and ``entropy = -sum_c p_c log p_c``. The statistics of
    ``return_stats`` and their gradients are stated in :mod:`leanloss._fused.logp_rows`.

    Args:
        @doc head
        temperature: ``T > 0`` (a Python number; sampling temperature of the rollout).
        return_entropy: also return the entropy per token.
        ignore_index: tokens with this target are dropped before any matmul; every output is
            ``0`` there (``False`` for ``is_top1``) and gets no gradient.
        @doc chunk_size
        softcap: ``c > 0`` or ``None``: the logits become ``c * tanh(z / c)`` before the
            temperature (Gemma-style final logit softcapping).
        logit_scale: a positive factor on the logits before the softcap.
        return_stats: a tuple of names from ``("entropy", "log_sum_sq_probs", "mean_logit",
            "is_top1")``: per token, the entropy, ``log sum_c p_c^2``, the mean of ``y`` over
            the ``V`` classes, and whether the target is ``y``'s argmax (the first index among
            ties, as ``torch.argmax``). Each costs nothing when not asked for.

    Returns ``logp``, or ``(logp, entropy)`` with ``return_entropy=True``; with ``return_stats``
    a :class:`TokenStats` ``(logp, entropy, log_sum_sq_probs, mean_logit, is_top1)`` whose
    fields not asked for are ``None`` (``entropy`` is there when asked for either way). Each is
    shaped like ``target``; ``is_top1`` is bool. ``logp``, ``entropy``, ``log_sum_sq_probs`` and
    ``mean_logit`` are differentiable with respect to ``hidden``, ``weight`` and ``bias`` for
    any upstream gradients of all of them together (``is_top1`` is not). Backward recomputes
    each block of logits (four matmuls in all); under ``torch.no_grad()`` (rollout scoring) only
    the forward matmul runs.

    @doc fused_dtypes
    """
    return run_log_probs("linear_log_probs", Head(hidden, weight, bias), target,
                         lambda head: LocalVocab(head.weight.shape[0]), temperature=temperature,
                         return_entropy=return_entropy, return_stats=return_stats,
                         softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index,
                         chunk_size=chunk_size)


def run_log_probs(fn: str, head: Head, target: Tensor, vocab_of: Callable[[Head], VocabSlice], *,
                  temperature, return_entropy: bool, return_stats: Sequence[str], softcap,
                  logit_scale, ignore_index: int, chunk_size: Optional[int],
                  check_range: bool = True, names: Sequence[str] = ("hidden", "weight", "bias")):
    """The log-prob functions on the fused pipeline (:func:`~leanloss.linear._pipeline.run_fused`):
    their checks and :class:`LogProbScorer` over the reduce hook ``vocab_of(head)`` (the autocast
    head), whose ``scale`` and ``softcap`` have the temperature folded in."""
    stats = stat_options(fn, return_entropy, return_stats)
    scorers: List[LogProbScorer] = []

    def setup(head: Head, _):
        local = _checks.check_linear_shapes(fn, *head, target, weight_name=names[1])
        temp = _checks.check_positive(fn, "temperature", temperature)
        scale = _checks.check_positive(fn, "logit_scale", logit_scale) / temp
        cap = None if softcap is None else _checks.check_positive(fn, "softcap", softcap) / temp
        if _checks.shapes_enabled() and head.bias is not None:
            _checks.check_same_dtype(fn, "bias", head.bias, names[1], head.weight)
        if check_range:  # a vocab shard checks the range itself
            _checks.check_index_target_range(fn, target, local, ignore_index)
        vocab = vocab_of(head)

        def make_scorer(t: Tensor) -> LogProbScorer:
            scorers.append(LogProbScorer(t, scale, compute_dtype(head.hidden.dtype), vocab,
                                         softcap=cap, stats=stats))
            return scorers[-1]
        return vocab, make_scorer, None

    out, batch = run_fused(fn, head, target, setup, ignore_index=ignore_index, reduction="none",
                           chunk_size=chunk_size, names=names)
    (scorer,) = scorers
    columns = [out] if scorer.outputs == 1 else list(out.unbind(-1))
    by_name = dict(zip(scorer.names, columns))
    logp, entropy = by_name["logp"], by_name.get("entropy")
    if not return_stats:
        return (logp, entropy) if return_entropy else logp
    return TokenStats(logp, entropy, by_name.get("log_sum_sq_probs"), by_name.get("mean_logit"),
                      None if scorer.top1 is None else batch.scatter(scorer.top1))
