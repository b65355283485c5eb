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
from typing import Callable, Dict, List, Optional


from . import _checks

__all__ = ["VocabLayout", "has_dtensor", "vocab_layout", "replicated_local", "unwrap", "routes_dtensor",
           "register_router"]


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


def placement_types():
    from torch.distributed.tensor import Replicate, Shard
    return Replicate, Shard


def describe_placement(t) -> str:
    return f"placements {tuple(t.placements)} on {t.device_mesh}"


def vocab_layout(fn: str, name: str, t, dim: int) -> Optional[VocabLayout]:
    """The vocabulary layout of DTensor ``t`` whose dimension ``dim`` holds the classes; ``None``
    when every placement is ``Replicate`` (nothing is sharded)."""
    Replicate, Shard = placement_types()
    dim = dim % t.dim()
    sharding = []
    for mesh_dim, p in enumerate(t.placements):
        if type(p) is Shard and p.dim % t.dim() == dim:
            sharding.append(mesh_dim)
        elif not isinstance(p, Replicate):
            raise _checks.LeanlossValueError(
                f"{fn}: argument '{name}' is a DTensor with {describe_placement(t)}; the vocab-parallel "
                f"path takes its dimension {dim} (the vocabulary) sharded with Shard({dim}) on "
                f"one mesh dimension and Replicate on the others (as ColwiseParallel leaves an "
                f"LM head); redistribute it, or pass its local shard with a process group"
            )
    if not sharding:
        return None
    if len(sharding) > 1:
        raise _checks.LeanlossValueError(
            f"{fn}: argument '{name}' is a DTensor with {describe_placement(t)}: its vocabulary dimension "
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
    Replicate, _ = placement_types()
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
                f"{fn}: argument '{main_name}' is a DTensor with {describe_placement(main)}: every rank "
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


_ROUTERS: Dict[str, Callable] = {}


def routes_dtensor(fn: Callable) -> Callable:
    """Decorator of a single-device fused loss: calls with any DTensor argument go to the
    router registered under ``fn``'s name (:func:`register_router`), as
    ``router(fn, **arguments)`` (every argument bound by name, defaults applied); all others
    run ``fn`` untouched."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if has_dtensor(*args, *kwargs.values()):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return _ROUTERS[fn.__name__](fn, **bound.arguments)
        return fn(*args, **kwargs)

    return wrapper


def register_router(name: str, router: Callable) -> None:
    """``router(fn, **arguments)`` runs the DTensor calls of the fused loss ``name``
    (:mod:`leanloss._dispatch` registers the vocab-parallel routes)."""
    _ROUTERS[name] = router
