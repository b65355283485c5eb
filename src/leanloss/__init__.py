"""leanloss: entropy-family losses for PyTorch.

Exact to ``torch.nn.functional`` in value, gradient and errors; lean fused linear-head losses
that never hold the (tokens, vocab) logits; safe by default (clear errors, warnings for the
classic loss-input confusions).
"""
from ._checks import checks, get_checks, set_checks
from .errors import (
    InputWarning,
    LeanlossTypeError,
    LeanlossValueError,
    TargetOutOfRangeError,
    UnsupportedDtypeError,
)
from .functional import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cosine_embedding_loss,
    cross_entropy,
    distill_loss,
    entropy,
    jsd,
    kl_div,
    linear_cross_entropy,
    linear_distill_loss,
    linear_log_probs,
    linear_topk_distill_loss,
    nll_loss,
    topk_distill_loss,
)
from .linear import TokenStats
from . import parallel  # noqa: F401 - leanloss.parallel.vocab_parallel_*
from . import _dispatch  # noqa: F401 - DTensor routes of the fused losses
from .modules import (
    BCELoss,
    BCEWithLogitsLoss,
    CosineEmbeddingLoss,
    CrossEntropyLoss,
    DistillLoss,
    KLDivLoss,
    LinearCrossEntropyLoss,
    LinearDistillLoss,
    LinearLogProbs,
    LinearTopKDistillLoss,
    NLLLoss,
    TopKDistillLoss,
)

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "nll_loss",
    "kl_div",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cosine_embedding_loss",
    "entropy",
    "CrossEntropyLoss",
    "NLLLoss",
    "KLDivLoss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "CosineEmbeddingLoss",
    "distill_loss",
    "jsd",
    "linear_distill_loss",
    "DistillLoss",
    "LinearDistillLoss",
    "topk_distill_loss",
    "linear_topk_distill_loss",
    "TopKDistillLoss",
    "LinearTopKDistillLoss",
    "linear_log_probs",
    "TokenStats",
    "LinearLogProbs",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "InputWarning",
    "LeanlossValueError",
    "LeanlossTypeError",
    "TargetOutOfRangeError",
    "UnsupportedDtypeError",
    "set_checks",
    "get_checks",
    "checks",
]
