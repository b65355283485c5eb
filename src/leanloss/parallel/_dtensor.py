"""DTensor inputs: read the vocabulary sharding off the placement, hand local tensors onward.

torch's tensor parallelism (``parallelize_module`` with ``ColwiseParallel``) leaves an LM head
whose weight is a DTensor sharded on the vocabulary (``Shard(0)``) and, with
``use_local_output=False``, logits sharded on their last dimension (``Shard(-1)``). Such a
tensor says everything the vocab-parallel losses need:

* the group: the device mesh's group along the one mesh dimension that shards the vocabulary
  (every other mesh dimension must be ``Replicate``);
* every rank's slice, by ``torch.chunk`` semantics (what ``Shard`` uses): with ``V`` classes
  over ``n`` ranks and ``c = ceil(V / n)``, rank ``r`` holds ``[min(r c, V), min((r + 1) c, V))``,
  so the last ranks may hold fewer classes, or none;
* hence ``vocab_start`` and the global ``V``, with no communication.

The losses then run on ``to_local()`` views, whose backward wraps each local gradient back into
a DTensor of the input's placement. Nothing is gathered: a DTensor ``hidden`` is redistributed
to ``Replicate`` (what ``ColwiseParallel`` does to its input), the weight and the logits stay
sharded.

:func:`routes_dtensor` is the one hook the single-device fused losses carry: given a
vocab-sharded DTensor weight they run the vocab-parallel path; given only replicated DTensors
they run on the local tensors.
"""
from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional


from .. import _checks

__all__ = ["VocabLayout", "has_dtensor", "vocab_layout", "replicated_local", "unwrap", "routes_dtensor",
           "route_linear_cross_entropy", "route_linear_distill_loss"]


def _dtensor_class():
    """``DTensor``, or ``None`` while ``torch.distributed.tensor`` was never imported (then no
    DTensor can exist, and leanloss does not pay for the import)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def has_dtensor(*values) -> bool:
    """Whether any of ``values`` is a DTensor (``None`` and non-tensors are not)."""
    cls = _dtensor_class()
    return cls is not None and any(isinstance(v, cls) for v in values)


@dataclass(frozen=True)
class VocabLayout:
    """Where a DTensor keeps the vocabulary: the group, this rank's slice and every rank's size."""

    group: object
    mesh_dim: int
    start: int
    sizes: List[int]

    @property
    def vocab(self) -> int:
        return sum(self.sizes)


def chunk_sizes(total: int, parts: int) -> List[int]:
    """``torch.chunk`` split of ``total`` into ``parts``: ``c = ceil(total / parts)`` each, the
    remainder on the last non-empty part, empty parts after it."""
    c = -(-total // parts) if parts else 0
    return [max(0, min(total, (r + 1) * c) - min(total, r * c)) for r in range(parts)]


def _placement_types():
    from torch.distributed.tensor import Replicate, Shard
    return Replicate, Shard


def _describe(t) -> str:
    return f"placements {tuple(t.placements)} on {t.device_mesh}"


def vocab_layout(fn: str, name: str, t, dim: int) -> Optional[VocabLayout]:
    """The vocabulary layout of DTensor ``t`` whose dimension ``dim`` holds the classes; ``None``
    when every placement is ``Replicate`` (nothing is sharded)."""
    Replicate, Shard = _placement_types()
    dim = dim % t.dim()
    sharding = []
    for mesh_dim, p in enumerate(t.placements):
        if type(p) is Shard and p.dim % t.dim() == dim:
            sharding.append(mesh_dim)
        elif not isinstance(p, Replicate):
            raise _checks.LeanlossValueError(
                f"{fn}: argument '{name}' is a DTensor with {_describe(t)}; the vocab-parallel "
                f"path takes its dimension {dim} (the vocabulary) sharded with Shard({dim}) on "
                f"one mesh dimension and Replicate on the others (as ColwiseParallel leaves an "
                f"LM head); redistribute it, or pass its local shard with a process group"
            )
    if not sharding:
        return None
    if len(sharding) > 1:
        raise _checks.LeanlossValueError(
            f"{fn}: argument '{name}' is a DTensor with {_describe(t)}: its vocabulary dimension "
            f"is sharded on several mesh dimensions; shard it on one"
        )
    mesh_dim, mesh = sharding[0], t.device_mesh
    sizes = chunk_sizes(t.shape[dim], mesh.size(mesh_dim))
    rank = mesh.get_local_rank(mesh_dim)
    local = t.to_local().shape[dim]
    if local != sizes[rank]:
        raise _checks.LeanlossValueError(
            f"{fn}: argument '{name}' is a DTensor whose local shard holds {local} classes, but "
            f"torch.chunk semantics of Shard({dim}) give rank {rank} {sizes[rank]} of "
            f"{t.shape[dim]}; build it with distribute_tensor or parallelize_module"
        )
    return VocabLayout(mesh.get_group(mesh_dim), mesh_dim, sum(sizes[:rank]), sizes)


def replicated_local(fn: str, name: str, t, mesh=None):
    """A DTensor made ``Replicate`` on its mesh and turned local (differentiably: its gradient
    comes back as a DTensor of the original placement); a plain tensor or ``None`` as is.
    ``mesh``: the mesh ``t`` must live on, when one is required."""
    if not has_dtensor(t):
        return t
    Replicate, _ = _placement_types()
    if mesh is not None and t.device_mesh != mesh:
        raise _checks.LeanlossValueError(
            f"{fn}: argument '{name}' is a DTensor on {t.device_mesh}, but the vocabulary is "
            f"sharded on {mesh}; pass it on the same mesh, or as a plain tensor"
        )
    if any(not isinstance(p, Replicate) for p in t.placements):
        t = t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim)
    return t.to_local()


def unwrap(fn: str, sharded: dict, replicated: dict, group, vocab_start, dim: int):
    """The arguments of a vocab-parallel loss with their DTensors made local.

    ``sharded``: name -> tensor whose dimension ``dim`` is the vocabulary (the first one is the
    logits or the head's weight; the others, the bias, must share its layout or be ``None``).
    ``replicated``: name -> tensor that every rank holds whole (hidden states, targets, class
    weights): a DTensor there is made ``Replicate`` on the vocabulary's mesh and turned local.
    Returns ``(sharded, replicated, group, sizes)``; ``sizes`` is every rank's slice size
    (``None`` when the vocabulary is a plain tensor: the loss then gathers them).
    """
    (main_name, main), *others = sharded.items()
    layout = mesh = None
    if has_dtensor(main):
        layout = vocab_layout(fn, main_name, main, dim)
        if layout is None:
            raise _checks.LeanlossValueError(
                f"{fn}: argument '{main_name}' is a DTensor with {_describe(main)}: every rank "
                f"holds the whole vocabulary; use the single-device loss on its to_local()"
            )
        for arg, value in (("group", group), ("vocab_start", vocab_start)):
            if value is not None:
                raise _checks.LeanlossValueError(
                    f"{fn}: argument '{arg}' must be None when '{main_name}' is a sharded "
                    f"DTensor (its device mesh and placement give it), got {value!r}"
                )
        mesh, group = main.device_mesh, layout.group
    local = {main_name: main.to_local() if layout is not None else main}
    for name, value in others:
        if value is None or (layout is None and not has_dtensor(value)):
            local[name] = value
            continue
        if not (has_dtensor(value) and layout is not None and value.device_mesh == mesh
                and vocab_layout(fn, name, value, dim) == layout):
            raise _checks.LeanlossValueError(
                f"{fn}: argument '{name}' must be sharded like '{main_name}' (both DTensors "
                f"with the same placement on the same mesh, or both plain local shards)"
            )
        local[name] = value.to_local()
    whole = {name: replicated_local(fn, name, value, mesh) for name, value in replicated.items()}
    return local, whole, group, None if layout is None else layout.sizes


# ------------------------------------------------------------------------------------------------
# the routing of the single-device fused losses


def routes_dtensor(router: Callable) -> Callable:
    """Decorator: calls with any DTensor argument go to ``router(fn, **arguments)`` (every
    argument bound by name, defaults applied); all others run ``fn`` untouched."""

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if has_dtensor(*args, *kwargs.values()):
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                return router(fn, **bound.arguments)
            return fn(*args, **kwargs)

        return wrapper

    return wrap


def _all_local(fn_name: str, arguments: dict, weights: tuple) -> dict:
    """Every DTensor argument as its local tensor, replicated first; the LM-head tensors named
    in ``weights`` must already be ``Replicate`` (making them so would gather a weight)."""
    Replicate, _ = _placement_types()
    out = {}
    for name, value in arguments.items():
        if (name in weights and has_dtensor(value)
                and any(not isinstance(p, Replicate) for p in value.placements)):
            raise _checks.LeanlossValueError(
                f"{fn_name}: argument '{name}' is a DTensor with {_describe(value)}; a head "
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
    from .linear import vocab_parallel_linear_cross_entropy
    return vocab_parallel_linear_cross_entropy(hidden, weight, target, bias=bias, **options)


def route_linear_log_probs(fn: Callable, hidden, weight, target, bias=None, **options):
    """``linear_log_probs`` with DTensor arguments: a vocab-sharded ``weight`` (and ``bias``)
    runs :func:`~leanloss.parallel.vocab_parallel_linear_log_probs` over the mesh's group;
    replicated DTensors run ``fn`` on their local tensors."""
    name = "linear_log_probs"
    if _vocab_sharded(name, "weight", weight):
        from .log_probs import vocab_parallel_linear_log_probs
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
        from .distill import vocab_parallel_linear_distill_loss
        return vocab_parallel_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias, **options)
    args = _all_local(name, dict(student_hidden=student_hidden, student_weight=student_weight,
                                 teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                 target=target, student_bias=student_bias, teacher_bias=teacher_bias),
                      ("student_weight", "teacher_weight", "student_bias", "teacher_bias"))
    return fn(args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_hidden"),
              args.pop("teacher_weight"), args.pop("target"), **args, **options)
