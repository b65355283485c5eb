"""nn.Module forms of the fused linear-head losses: they hold the options, the math lives in
the functional form."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from .cross_entropy import linear_cross_entropy
from .log_probs import linear_log_probs

__all__ = ["LinearCrossEntropyLoss", "LinearLogProbs"]


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`leanloss.linear_cross_entropy`.

    ``forward(hidden, weight, target, bias=None)`` returns
    ``linear_cross_entropy(hidden, weight, target, bias, **options)``: the cross entropy of
    ``softcap(logit_scale * (hidden @ weight.T + bias))`` (torch's ``nn.CrossEntropyLoss`` on
    those logits, plus ``z_loss``) without materializing the logits. ``class_weight`` is a
    registered buffer (it follows ``.to()``); ``num_items`` is a forward argument because it
    changes per batch.
    """

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, class_weight: Optional[Tensor] = None,
                 z_loss: float = 0.0, softcap: Optional[float] = None, logit_scale: float = 1.0,
                 return_lse: bool = False, chunk_size: Optional[int] = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weight", class_weight)
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.return_lse = return_lse
        self.chunk_size = chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                num_items: Optional[Union[int, float, Tensor]] = None):
        return linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            class_weight=self.class_weight, z_loss=self.z_loss, softcap=self.softcap,
            logit_scale=self.logit_scale, num_items=num_items, return_lse=self.return_lse,
            chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, logit_scale={self.logit_scale}")


class LinearLogProbs(nn.Module):
    """Module form of :func:`leanloss.linear_log_probs`.

    ``forward(hidden, weight, target, bias=None)`` returns
    ``linear_log_probs(hidden, weight, target, bias, **options)``: per-token ``log p(target)``
    under ``softmax((hidden @ weight.T + bias) / temperature)`` (and the entropy with
    ``return_entropy=True``) without materializing the logits.
    """

    def __init__(self, *, temperature: float = 1.0, return_entropy: bool = False,
                 ignore_index: int = -100, chunk_size: Optional[int] = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.return_entropy = return_entropy
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None):
        return linear_log_probs(hidden, weight, target, bias, temperature=self.temperature,
                                return_entropy=self.return_entropy, ignore_index=self.ignore_index,
                                chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, return_entropy={self.return_entropy}, "
                f"ignore_index={self.ignore_index}")
