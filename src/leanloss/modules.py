"""Every ``nn.Module`` of leanloss, in one place: they hold the arguments and call the functions.

The twins of torch's loss modules keep torch's constructor arguments, attribute names, buffers
(``weight``, ``pos_weight``) and therefore ``state_dict`` keys, so a state dict saved from one
loads into the other. The losses torch has no module for (distillation, the fused linear-head
losses) follow the same pattern: options at construction, tensors in ``forward``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from . import functional as F
from ._reduce import resolve_reduction

__all__ = [
    "CrossEntropyLoss",
    "NLLLoss",
    "KLDivLoss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "CosineEmbeddingLoss",
    "DistillLoss",
    "LinearDistillLoss",
    "LinearCrossEntropyLoss",
    "LinearLogProbs",
    "TopKDistillLoss",
    "LinearTopKDistillLoss",
]


class _Loss(nn.Module):
    """Holds ``reduction`` (torch's legacy ``size_average``/``reduce`` resolved at construction)."""

    _allowed = ("none", "mean", "sum")

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean") -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            self.reduction = resolve_reduction(reduction, size_average, reduce)
        else:
            self.reduction = reduction

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class _WeightedLoss(_Loss):
    """Registers ``weight`` as a buffer, as ``torch.nn.modules.loss._WeightedLoss`` does."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None, reduction: str = "mean") -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
        self.weight: Optional[Tensor]


class CrossEntropyLoss(_WeightedLoss):
    """Module form of :func:`leanloss.cross_entropy` (mirrors ``torch.nn.CrossEntropyLoss``)."""

    def __init__(self, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


class NLLLoss(_WeightedLoss):
    """Module form of :func:`leanloss.nll_loss` (mirrors ``torch.nn.NLLLoss``)."""

    def __init__(self, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean") -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class KLDivLoss(_Loss):
    """Module form of :func:`leanloss.kl_div` (mirrors ``torch.nn.KLDivLoss``)."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", log_target: bool = False) -> None:
        super().__init__(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.kl_div(input, target, reduction=self.reduction, log_target=self.log_target)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, log_target={self.log_target}"


class BCELoss(_WeightedLoss):
    """Module form of :func:`leanloss.binary_cross_entropy` (mirrors ``torch.nn.BCELoss``)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    """Module form of :func:`leanloss.binary_cross_entropy_with_logits` (mirrors ``torch.nn.BCEWithLogitsLoss``)."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight=None) -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.weight: Optional[Tensor]
        self.pos_weight: Optional[Tensor]

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(input, target, self.weight, pos_weight=self.pos_weight,
                                                  reduction=self.reduction)


class CosineEmbeddingLoss(_Loss):
    """Module form of :func:`leanloss.cosine_embedding_loss` (mirrors ``torch.nn.CosineEmbeddingLoss``)."""

    def __init__(self, margin: float = 0.0, size_average=None, reduce=None, reduction: str = "mean") -> None:
        super().__init__(size_average, reduce, reduction)
        self.margin = margin

    def forward(self, input1: Tensor, input2: Tensor, target: Tensor) -> Tensor:
        return F.cosine_embedding_loss(input1, input2, target, margin=self.margin, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


# -- losses without a torch module ---------------------------------------------------------

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
        return F.distill_loss(student_logits, teacher_logits, target, **self.options())


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
        return F.linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                                   student_bias=student_bias, teacher_bias=teacher_bias,
                                   chunk_size=self.chunk_size, **self.options())


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`leanloss.linear_cross_entropy`.

    ``forward(hidden, weight, target, bias=None)`` returns
    ``F.linear_cross_entropy(hidden, weight, target, bias, **options)``: the cross entropy of
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
        return F.linear_cross_entropy(
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
    under ``softmax(softcap(logit_scale * (hidden @ weight.T + bias)) / temperature)`` (and the
    entropy with ``return_entropy=True``, the statistics of ``return_stats``) without
    materializing the logits.
    """

    def __init__(self, *, temperature: float = 1.0, return_entropy: bool = False,
                 ignore_index: int = -100, chunk_size: Optional[int] = None,
                 softcap: Optional[float] = None, logit_scale: float = 1.0,
                 return_stats: Sequence[str] = ()) -> None:
        super().__init__()
        self.temperature = temperature
        self.return_entropy = return_entropy
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.return_stats = tuple(return_stats) if isinstance(return_stats, list) else return_stats

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None):
        return F.linear_log_probs(hidden, weight, target, bias, temperature=self.temperature,
                                return_entropy=self.return_entropy, ignore_index=self.ignore_index,
                                chunk_size=self.chunk_size, softcap=self.softcap,
                                logit_scale=self.logit_scale, return_stats=self.return_stats)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, return_entropy={self.return_entropy}, "
                f"ignore_index={self.ignore_index}, softcap={self.softcap}, "
                f"logit_scale={self.logit_scale}, return_stats={self.return_stats}")


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
        return F.topk_distill_loss(student_logits, topk_ids, topk_logprobs, target, **self.options())


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
        return F.linear_topk_distill_loss(student_hidden, student_weight, topk_ids, topk_logprobs, target,
                                        student_bias=student_bias, chunk_size=self.chunk_size,
                                        **self.options())
