"""Documentation shared by several public functions, written once.

A docstring line of the form ``@doc NAME`` (alone on its line, at any indent) is replaced by
the entry ``NAME`` below, re-indented to that line's indent, when the function is decorated
with :func:`fill`. Argument entries are written as ``Args:`` items.
"""
from __future__ import annotations

import re
import textwrap
from typing import Callable, Dict, Optional, TypeVar

from ._fused import ce_rows

__all__ = ["fill", "DOCS"]

F = TypeVar("F", bound=Callable)

DOCS: Dict[str, str] = {
    # The cross-entropy row loss, stated where its code lives (leanloss._fused.ce_rows).
    "ce_row_loss": ce_rows.ROW_LOSS,
    "ce_reduction": """\
``'sum'`` is ``sum_r loss_r`` over the kept rows; ``'mean'`` divides that sum by ``num_items``
when given, else by ``sum_r w_t`` (the number of kept rows without class weights): torch's
convention, so smoothing and z-loss are weighted and normalized like the cross-entropy term.
All rows ignored gives ``nan`` (``'mean'``) or ``0`` (``'sum'``), like torch. ``'none'``
returns ``loss_r`` in the shape of ``target``, ``0`` at ignored rows.""",
    "ignore_index": """\
ignore_index: rows whose target is this value do not count (the fused losses drop them before
    any matmul); they get ``0`` under ``'none'`` and are left out of ``'mean'``'s divisor.""",
    "label_smoothing": """\
label_smoothing: ``e`` in ``[0, 1]``: the target distribution is ``(1-e) onehot(t) + e/V``,
    weighted by ``class_weight`` as torch weights it (see the row loss).""",
    "z_loss": """\
z_loss: weight of the ``lse_r**2`` penalty (PaLM's z-loss) added to each kept row, times ``w_t``;
    ``0`` turns it off.""",
    "num_items": """\
num_items: divisor of ``'mean'`` instead of the kept-row count, e.g. the global token count
    over data-parallel ranks and gradient-accumulation steps (transformers'
    ``num_items_in_batch``).""",
    # The fused linear-head losses (leanloss.linear) and their vocab-parallel forms.
    "head": """\
hidden: ``(..., D)`` floating.
weight: ``(V, D)``, in ``hidden``'s dtype.
target: ``(...)`` int64 class indices.
bias: ``(V,)`` or ``None``.""",
    "chunk_size": """\
chunk_size: rows per block (default: the engine's plan, :func:`leanloss._fused.engine.plan_chunk`:
    ~96 MiB blocks of at least 512 rows, or a quarter of the rows below 2048; in bf16/fp16
    with a weight gradient one block over all rows when ``N <= 2 D``).""",
    "row_reduction": """\
reduction: ``'none'`` (shape ``(...)``, ``0`` at ignored rows; backward recomputes the blocks) |
    ``'sum'`` | ``'mean'`` (over the kept rows).""",
    "fused_dtypes": """\
Matmuls run in the input dtype; softmax statistics and gradient accumulation in float32 (float64
for float64 inputs), and the result is in that compute dtype (float32 for bfloat16/float16
inputs). The per-block math is a compiled kernel on CPU/CUDA (see :mod:`leanloss._fused.kernels`
for when it compiles) or the same function run eagerly. Gradients are first order. Under
``torch.compile`` this function is a graph break (``torch.compiler.disable``).""",
    "vp_head": """\
hidden: ``(..., D)``, the same on every rank of ``group``.
local_weight: ``(V_local, D)``, this rank's rows of the head (or a DTensor, see below).
target: ``(...)`` GLOBAL class ids, identical on every rank.
bias: this rank's ``(V_local,)`` slice of the head's bias, or ``None``.""",
    "vp_student": """\
student_hidden: ``(..., D)``, the same on every rank of ``group``.
student_local_weight: ``(V_local, D)``, this rank's rows of the student's head (or a DTensor,
    see below).
student_bias: this rank's ``(V_local,)`` slice of the student's bias, or ``None``.""",
    "vp_hard_target": """\
target: ``(...)`` GLOBAL class ids or ``None``, identical on every rank; required when
    ``hard_weight > 0``; rows with ``ignore_index`` are dropped before any matmul.""",
    "group": """\
group: the ``torch.distributed`` process group sharding the vocabulary; ``None`` is the default
    group, or a single process when ``torch.distributed`` is not initialized.""",
    "vocab_start": """\
vocab_start: first global class id of this rank's slice; default: the sum of the slice sizes of
    the lower ranks of ``group`` (found with one all-gather of one number).""",
    "vp_chunk_size": """\
chunk_size: rows per block, the same on every rank (default: planned from the largest slice, so
    that every rank walks the same blocks and issues the same collectives).""",
    "vp_head_contract": """\
Each rank holds rows ``[vocab_start, vocab_start + V_local)`` of the head (weight and bias;
slices may be uneven), and the result equals the single-device function on the head
concatenated over the ranks: in value, on every rank, and in gradient: this rank's head tensors
get their slice of the full gradient, the hidden states the FULL gradient on every rank (the
ranks' partial gradients are summed by one all-reduce in backward, as for an input replicated
over the tensor-parallel group). No rank holds its ``(tokens, V_local)`` logits: per block only
a few numbers per row cross ranks (the docs' vocab-parallel page says which). Every rank of
``group`` must call this function (and its backward) together.

The head weight may be a DTensor sharded ``Shard(0)`` on one mesh dimension (``Replicate`` on
any other), as ``ColwiseParallel`` leaves ``lm_head.weight``: the group, ``vocab_start`` and
``V`` then come from its mesh and placement (``torch.chunk`` slices; ``group`` and
``vocab_start`` must be ``None``), its bias must be sharded alike, DTensor inputs held whole
(hidden states, targets) are made ``Replicate`` on that mesh, and every gradient is a DTensor of
its input's placement.""",
}

# What every vocab-parallel fused loss says alike: its arguments of the sharding, last in Args,
# and the contract of a vocab-sharded head with the dtypes after them.
DOCS["vp_args"] = "\n".join(DOCS[name] for name in ("group", "vocab_start", "vp_chunk_size"))
DOCS["vp_notes"] = DOCS["vp_head_contract"] + "\n\n" + DOCS["fused_dtypes"]

_MARK = re.compile(r"^(?P<indent>[ \t]*)@doc (?P<name>\w+)[ \t]*$", re.M)


def fill(fn: F) -> F:
    """Replace the ``@doc NAME`` lines of ``fn.__doc__`` with the shared entries.

    The functions ``fn`` wraps (its ``__wrapped__`` chain, from ``functools.wraps``) get the
    same text: ``inspect.unwrap``, which documentation generators call, reads theirs.
    """
    target: Optional[Callable] = fn
    while target is not None:
        if target.__doc__:
            target.__doc__ = _MARK.sub(lambda m: textwrap.indent(DOCS[m["name"]], m["indent"]), target.__doc__)
        target = getattr(target, "__wrapped__", None)
    return fn
