"""``nn.Module`` forms of the distillation losses: they hold the options and call the functions."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .linear.distill import linear_distill_loss
from .linear.topk_distill import linear_topk_distill_loss
from .losses.distill import distill_loss, topk_distill_loss

__all__ = ["DistillLoss", "LinearDistillLoss", "TopKDistillLoss", "LinearTopKDistillLoss"]


class _DistillOptions(nn.Module):
    """The options shared by both modules (see :func:`leanloss.distill_loss` for their meaning)."""

    def __init__(self, kind: str = "forward", beta: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, hard_weight: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        self.kind, self.beta, self.temperature = kind, beta, temperature
        self.ignore_index, self.hard_weight, self.reduction = ignore_index, hard_weight, reduction

    def options(self) -> dict:
        return dict(kind=self.kind, beta=self.beta, temperature=self.temperature,
                    ignore_index=self.ignore_index, hard_weight=self.hard_weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())


class DistillLoss(_DistillOptions):
    """Module form of :func:`leanloss.distill_loss`:
    ``forward(student_logits, teacher_logits, target=None)``."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return distill_loss(student_logits, teacher_logits, target, **self.options())


class LinearDistillLoss(_DistillOptions):
    """Module form of :func:`leanloss.linear_distill_loss` (extra option: ``chunk_size``):
    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, target=None,
    student_bias=None, teacher_bias=None)``."""

    def __init__(self, kind: str = "forward", beta: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, hard_weight: float = 0.0, reduction: str = "mean",
                 chunk_size: Optional[int] = None) -> None:
        super().__init__(kind, beta, temperature, ignore_index, hard_weight, reduction)
        self.chunk_size = chunk_size

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, target: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None) -> Tensor:
        return linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                                   student_bias=student_bias, teacher_bias=teacher_bias,
                                   chunk_size=self.chunk_size, **self.options())


class _TopKOptions(nn.Module):
    """The options of the top-k losses (see :func:`leanloss.topk_distill_loss`)."""

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100, hard_weight: float = 0.0,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.temperature, self.ignore_index = temperature, ignore_index
        self.hard_weight, self.reduction = hard_weight, reduction

    def options(self) -> dict:
        return dict(temperature=self.temperature, ignore_index=self.ignore_index,
                    hard_weight=self.hard_weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())


class TopKDistillLoss(_TopKOptions):
    """Module form of :func:`leanloss.topk_distill_loss`:
    ``forward(student_logits, topk_ids, topk_logprobs, target=None)``."""

    def forward(self, student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
                target: Optional[Tensor] = None) -> Tensor:
        return topk_distill_loss(student_logits, topk_ids, topk_logprobs, target, **self.options())


class LinearTopKDistillLoss(_TopKOptions):
    """Module form of :func:`leanloss.linear_topk_distill_loss` (extra option: ``chunk_size``):
    ``forward(student_hidden, student_weight, topk_ids, topk_logprobs, target=None,
    student_bias=None)``."""

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100, hard_weight: float = 0.0,
                 reduction: str = "mean", chunk_size: Optional[int] = None) -> None:
        super().__init__(temperature, ignore_index, hard_weight, reduction)
        self.chunk_size = chunk_size

    def forward(self, student_hidden: Tensor, student_weight: Tensor, topk_ids: Tensor,
                topk_logprobs: Tensor, target: Optional[Tensor] = None,
                student_bias: Optional[Tensor] = None) -> Tensor:
        return linear_topk_distill_loss(student_hidden, student_weight, topk_ids, topk_logprobs, target,
                                        student_bias=student_bias, chunk_size=self.chunk_size,
                                        **self.options())
