"""Fused linear-head losses: loss(hidden @ weight.T + bias) without the (tokens, vocab) logits,
each a per-block scorer on one chunked engine (:mod:`leanloss._fused.engine`), for one device
(:class:`LocalVocab`) and vocab-parallel alike."""
from .._fused.engine import PointGradient, Scorer, ScoreResult, default_chunk_size, fused_linear_loss
from .._fused.reduce_hook import LocalVocab
from .cross_entropy import CrossEntropyScorer, linear_cross_entropy
from .log_probs import LogProbScorer, TokenStats, linear_log_probs
from .topk_distill import TopKDistillScorer, linear_topk_distill_loss

__all__ = ["Scorer", "ScoreResult", "PointGradient", "LocalVocab", "fused_linear_loss", "default_chunk_size",
           "CrossEntropyScorer", "linear_cross_entropy", "LogProbScorer", "TokenStats", "linear_log_probs",
           "TopKDistillScorer", "linear_topk_distill_loss"]
