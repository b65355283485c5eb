"""Vocab-parallel losses over ``torch.distributed``: each rank holds a slice of the vocabulary,
of the logits (:func:`vocab_parallel_cross_entropy`) or of an LM head's rows (the
``vocab_parallel_linear_*`` forms of the fused losses, which never materialize the logits).
DTensor inputs give the group and the slices themselves. Each equals its unsharded function on
every rank, in value and gradient; only per-token statistics cross ranks.
"""
from .cross_entropy import vocab_parallel_cross_entropy
from .linear import (vocab_parallel_linear_cross_entropy, vocab_parallel_linear_distill_loss,
                     vocab_parallel_linear_log_probs, vocab_parallel_linear_topk_distill_loss)

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
           "vocab_parallel_linear_distill_loss", "vocab_parallel_linear_log_probs",
           "vocab_parallel_linear_topk_distill_loss"]
