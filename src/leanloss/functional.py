"""leanloss's functions under ``torch.nn.functional``'s names: ``import leanloss.functional as LF``."""
from .losses.binary import binary_cross_entropy, binary_cross_entropy_with_logits
from .losses.cosine import cosine_embedding_loss
from .losses.cross_entropy import cross_entropy, nll_loss
from .losses.distill import distill_loss, jsd, topk_distill_loss
from .losses.kl import entropy, kl_div
from .linear.cross_entropy import linear_cross_entropy
from .linear.distill import linear_distill_loss
from .linear.log_probs import linear_log_probs
from .linear.topk_distill import linear_topk_distill_loss

__all__ = [
    "cross_entropy",
    "nll_loss",
    "kl_div",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cosine_embedding_loss",
    "entropy",
    "distill_loss",
    "jsd",
    "linear_cross_entropy",
    "linear_distill_loss",
    "topk_distill_loss",
    "linear_topk_distill_loss",
    "linear_log_probs",
]
