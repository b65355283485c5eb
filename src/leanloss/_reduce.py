"""The one reduction helper every loss in leanloss goes through.

A loss is ``reduce_loss(per_element_loss, reduction, ...)``:

* ``'none'``      -> the per-element tensor unchanged,
* ``'sum'``       -> ``sum(l)``,
* ``'mean'``      -> ``sum(l) / divisor`` where the divisor is, in order of precedence,
  ``num_items`` (gradient accumulation across micro-batches), ``weight_sum`` (the weighted
  mean of ``nll_loss``/``cross_entropy``: the sum of ``weight[target]`` over the elements
  that are not ignored) or the element count (plain ``l.mean()``),
* ``'batchmean'`` -> ``sum(l) / batch_size`` (``kl_div``'s mathematically correct mean).

It also translates torch's legacy ``size_average``/``reduce`` pair into a reduction string,
exactly as ``torch.nn._reduction.legacy_get_string`` does (including its deprecation warning).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["REDUCTIONS", "legacy_reduction", "resolve_reduction", "reduce_loss", "reduce_kept_rows"]

#: The reductions every loss accepts; ``kl_div`` (and the distillation losses) add ``'batchmean'``.
REDUCTIONS = ("none", "mean", "sum")


def legacy_reduction(size_average: Optional[bool], reduce: Optional[bool]) -> str:
    """Map torch's deprecated ``size_average``/``reduce`` arguments to a reduction string.

    Mirrors ``torch.nn._reduction.legacy_get_string(size_average, reduce)``: both default to
    ``True``; ``reduce=False`` wins (``'none'``), otherwise ``size_average`` picks ``'mean'``
    or ``'sum'``. Emits the same ``UserWarning`` torch emits.
    """
    if size_average is None:
        size_average = True
    if reduce is None:
        reduce = True
    if size_average and reduce:
        ret = "mean"
    elif reduce:
        ret = "sum"
    else:
        ret = "none"
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{ret}' instead.",
        stacklevel=3,
    )
    return ret


def resolve_reduction(
    reduction: str,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    *,
    allowed: Sequence[str] = REDUCTIONS,
    argument: str = "reduction",
) -> str:
    """Return the effective reduction string, validating it.

    The legacy pair (``size_average``, ``reduce``) overrides ``reduction`` when either is not
    ``None``, as in torch. ``'elementwise_mean'`` is accepted as torch's deprecated alias of
    ``'mean'``. An unknown value raises ``ValueError`` naming the argument and the valid values
    (torch raises ``ValueError("<x> is not a valid value for reduction")``).
    """
    if size_average is not None or reduce is not None:
        return legacy_reduction(size_average, reduce)
    if reduction == "elementwise_mean":
        warnings.warn(
            "reduction='elementwise_mean' is deprecated, please use reduction='mean' instead.",
            stacklevel=3,
        )
        return "mean"
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(
            f"{reduction!r} is not a valid value for reduction: argument '{argument}' must be one "
            f"of {', '.join(repr(a) for a in allowed)}, got {reduction!r}"
        )
    return reduction


def reduce_loss(
    loss: Tensor,
    reduction: str,
    *,
    weight_sum: Optional[Tensor] = None,
    num_items: Optional[Union[int, float, Tensor]] = None,
    batch_size: Optional[int] = None,
) -> Tensor:
    """Reduce a per-element loss tensor.

    Args:
        loss: per-element losses, any shape.
        reduction: ``'none'`` | ``'sum'`` | ``'mean'`` | ``'batchmean'`` (already validated).
        weight_sum: divisor of ``'mean'`` for weighted losses (``sum_i weight[target_i]`` over
            non-ignored elements). ``0`` gives ``nan``, like torch.
        num_items: divisor of ``'mean'`` that overrides everything else (global token count
            when accumulating gradients over micro-batches).
        batch_size: divisor of ``'batchmean'``.
    """
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        if num_items is not None:
            return total / num_items
        if weight_sum is not None:
            return total / weight_sum
        return loss.mean()
    if reduction == "batchmean":
        if batch_size is None:
            raise ValueError("reduce_loss: 'batchmean' needs batch_size")
        return total / batch_size
    raise ValueError(f"reduce_loss: unknown reduction {reduction!r}")


def reduce_kept_rows(loss: Tensor, keep: Optional[Tensor], reduction: str) -> Tensor:
    """Per-row losses (0 at ignored rows) -> ``reduction``; ``'mean'`` divides by the kept rows
    (``nan`` when none is kept, like torch's cross entropy)."""
    if reduction == "mean" and keep is not None:
        return reduce_loss(loss, "mean", weight_sum=keep.sum().to(loss.dtype))
    return reduce_loss(loss, reduction)


def mix_hard_and_reduce(soft: Tensor, s: Tensor, log_q: Tensor, target: Optional[Tensor], *,
                         temperature: float, ignore_index: int, hard_weight: float,
                         reduction: str) -> Tensor:
    """``a CE(s, y) + (1 - a) T^2 soft`` per row (``s``: the untempered student logits,
    ``log_q``: ``log_softmax(s / T)``), rows with ``y == ignore_index`` zeroed, then reduced over
    the kept rows (:func:`reduce_kept_rows`)."""
    loss = soft * ((1.0 - hard_weight) * temperature**2)
    keep = None
    if target is not None:
        keep = target != ignore_index
        if hard_weight > 0:
            log_q1 = log_q if temperature == 1.0 else torch.log_softmax(s, dim=-1)
            safe = torch.where(keep, target, torch.zeros((), dtype=target.dtype, device=target.device))
            ce = -log_q1.gather(-1, safe.long().unsqueeze(-1)).squeeze(-1)
            loss = loss + hard_weight * ce
        loss = torch.where(keep, loss, loss.new_zeros(()))
    return reduce_kept_rows(loss, keep, reduction)
