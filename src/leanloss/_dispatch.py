"""DTensor dispatch of the single-device fused losses: the one layer above ``linear/`` and
``parallel/``.

``linear_cross_entropy``, ``linear_log_probs``, ``linear_distill_loss`` and
``linear_topk_distill_loss`` carry the
:func:`leanloss._dtensor.routes_dtensor` hook; the routes registered here send a call whose
head weight is a vocab-sharded DTensor to the vocab-parallel function over the mesh's group,
and a call with only replicated DTensors to the function on their local tensors. Imported by
:mod:`leanloss` itself, so the routes are in place whichever module a caller imports.
"""
from __future__ import annotations

from typing import Callable

from . import _checks
from ._dtensor import describe_placement, placement_types, has_dtensor, register_router, replicated_local, vocab_layout
from .parallel import (vocab_parallel_linear_cross_entropy, vocab_parallel_linear_distill_loss,
                       vocab_parallel_linear_log_probs, vocab_parallel_linear_topk_distill_loss)

__all__ = ["route_linear_cross_entropy", "route_linear_log_probs", "route_linear_distill_loss",
           "route_linear_topk_distill_loss"]


def _all_local(fn_name: str, arguments: dict, weights: tuple) -> dict:
    """Every DTensor argument as its local tensor, replicated first; the LM-head tensors named
    in ``weights`` must already be ``Replicate`` (making them so would gather a weight)."""
    Replicate, _ = placement_types()
    out = {}
    for name, value in arguments.items():
        if (name in weights and has_dtensor(value)
                and any(not isinstance(p, Replicate) for p in value.placements)):
            raise _checks.LeanlossValueError(
                f"{fn_name}: argument '{name}' is a DTensor with {describe_placement(value)}; a head "
                f"weight must be Replicate or sharded on the vocabulary (Shard(0), with its "
                f"bias sharded alike)"
            )
        out[name] = replicated_local(fn_name, name, value)
    return out


def _vocab_sharded(fn_name: str, name: str, weight) -> bool:
    return has_dtensor(weight) and weight.dim() == 2 and vocab_layout(fn_name, name, weight, 0) is not None


def route_linear_cross_entropy(fn: Callable, hidden, weight, target, bias=None, *, softcap=None,
                               logit_scale=1.0, return_lse=False, **options):
    """``linear_cross_entropy`` with DTensor arguments: a vocab-sharded ``weight`` (and
    ``bias``) runs :func:`~leanloss.parallel.vocab_parallel_linear_cross_entropy` over the
    mesh's group; replicated DTensors run ``fn`` on their local tensors."""
    name = "linear_cross_entropy"
    if not _vocab_sharded(name, "weight", weight):
        args = _all_local(name, dict(hidden=hidden, weight=weight, target=target, bias=bias,
                                     class_weight=options.pop("class_weight")), ("weight", "bias"))
        return fn(args.pop("hidden"), args.pop("weight"), args.pop("target"), args.pop("bias"),
                  softcap=softcap, logit_scale=logit_scale, return_lse=return_lse, **args, **options)
    for arg, value, default in (("softcap", softcap, None), ("return_lse", return_lse, False)):
        if value != default:
            raise _checks.LeanlossValueError(
                f"{name}: argument '{arg}' is not supported with a vocab-sharded DTensor "
                f"'weight' (the vocab-parallel path); got {arg}={value!r}"
            )
    logit_scale = _checks.check_positive(name, "logit_scale", logit_scale)
    if logit_scale != 1.0:  # s * (h @ W.T + b) = (s h) @ W.T + s b
        hidden = hidden * logit_scale
        bias = None if bias is None else bias * logit_scale
    return vocab_parallel_linear_cross_entropy(hidden, weight, target, bias=bias, **options)


def route_linear_log_probs(fn: Callable, hidden, weight, target, bias=None, **options):
    """``linear_log_probs`` with DTensor arguments: a vocab-sharded ``weight`` (and ``bias``)
    runs :func:`~leanloss.parallel.vocab_parallel_linear_log_probs` over the mesh's group;
    replicated DTensors run ``fn`` on their local tensors."""
    name = "linear_log_probs"
    if _vocab_sharded(name, "weight", weight):
        return vocab_parallel_linear_log_probs(hidden, weight, target, bias=bias, **options)
    args = _all_local(name, dict(hidden=hidden, weight=weight, target=target, bias=bias), ("weight", "bias"))
    return fn(args.pop("hidden"), args.pop("weight"), args.pop("target"), args.pop("bias"), **options)


def route_linear_distill_loss(fn: Callable, student_hidden, student_weight, teacher_hidden,
                              teacher_weight, target=None, *, student_bias=None, teacher_bias=None,
                              **options):
    """``linear_distill_loss`` with DTensor arguments: vocab-sharded heads (both, sharded alike)
    run :func:`~leanloss.parallel.vocab_parallel_linear_distill_loss` over the mesh's group;
    replicated DTensors run ``fn`` on their local tensors."""
    name = "linear_distill_loss"
    if _vocab_sharded(name, "student_weight", student_weight) or _vocab_sharded(name, "teacher_weight", teacher_weight):
        return vocab_parallel_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias, **options)
    args = _all_local(name, dict(student_hidden=student_hidden, student_weight=student_weight,
                                 teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                 target=target, student_bias=student_bias, teacher_bias=teacher_bias),
                      ("student_weight", "teacher_weight", "student_bias", "teacher_bias"))
    return fn(args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_hidden"),
              args.pop("teacher_weight"), args.pop("target"), **args, **options)


def route_linear_topk_distill_loss(fn: Callable, student_hidden, student_weight, topk_ids, topk_logprobs,
                                   target=None, *, student_bias=None, **options):
    """``linear_topk_distill_loss`` with DTensor arguments: a vocab-sharded ``student_weight``
    (and ``student_bias``) runs :func:`~leanloss.parallel.vocab_parallel_linear_topk_distill_loss`
    over the mesh's group; replicated DTensors run ``fn`` on their local tensors."""
    name = "linear_topk_distill_loss"
    if _vocab_sharded(name, "student_weight", student_weight):
        return vocab_parallel_linear_topk_distill_loss(student_hidden, student_weight, topk_ids, topk_logprobs,
                                                       target, student_bias=student_bias, **options)
    args = _all_local(name, dict(student_hidden=student_hidden, student_weight=student_weight, topk_ids=topk_ids,
                                 topk_logprobs=topk_logprobs, target=target, student_bias=student_bias),
                      ("student_weight", "student_bias"))
    return fn(**args, **options)


register_router("linear_cross_entropy", route_linear_cross_entropy)
register_router("linear_log_probs", route_linear_log_probs)
register_router("linear_distill_loss", route_linear_distill_loss)
register_router("linear_topk_distill_loss", route_linear_topk_distill_loss)
