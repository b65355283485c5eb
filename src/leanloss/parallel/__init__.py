"""Vocab-parallel cross entropy over ``torch.distributed``: sharded logits and sharded LM heads.

* :func:`vocab_parallel_cross_entropy`: each rank holds ``(..., V_local)`` logits.
* :func:`vocab_parallel_linear_cross_entropy`: each rank holds ``(V_local, D)`` rows of the LM
  head; the fused engine never materializes the logits.
* :func:`vocab_parallel_linear_distill_loss`: the same for a student and a teacher head.
* :func:`vocab_parallel_linear_topk_distill_loss`: top-k distillation from a teacher's stored
  top-k log-probabilities, the student's head split the same way.
* :func:`vocab_parallel_linear_log_probs`: per-token log-probabilities and entropies from such
  a sharded head (the input of RL losses).

DTensor inputs (torch's tensor parallelism) give the group and the slices themselves.

All equal the unsharded function on every rank, in value and gradient; only per-token statistics
cross ranks.
"""
from .cross_entropy import vocab_parallel_cross_entropy
from .linear import (vocab_parallel_linear_cross_entropy, vocab_parallel_linear_distill_loss,
                     vocab_parallel_linear_log_probs, vocab_parallel_linear_topk_distill_loss)

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_distill_loss",
    "vocab_parallel_linear_log_probs",
    "vocab_parallel_linear_topk_distill_loss",
]
