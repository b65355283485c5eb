"""One path from a public fused loss to the engine, on one device or vocab-parallel: a loss states
only what is its own (checks, scorer, divisor); :func:`run_fused` does the rest."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

from torch import Tensor

from .. import _heuristics
from .._dtypes import autocast_matmul_operands
from .._fused.engine import Scorer, fused_linear_loss
from .._fused.reduce_hook import VocabSlice
from .._fused.rows import scatter_rows, select_kept

__all__ = ["Head", "Batch", "run_fused"]


class Head(NamedTuple):
    """The operands of a linear head: ``hidden`` ``(..., D)``, ``weight`` ``(V, D)`` (this
    rank's rows, vocab-parallel), ``bias`` ``(V,)`` or ``None``."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]


class Batch(NamedTuple):
    """Where the kept rows sit in the batch: ``idx`` (``None``: all rows), ``n`` rows in all,
    batch shape ``lead``."""

    idx: Optional[Tensor]
    n: int
    lead: Tuple[int, ...]

    def scatter(self, values: Tensor) -> Tensor:
        """Per-kept-row ``values`` ``(M,)`` or ``(M, k)`` -> ``(*lead)`` or ``(*lead, k)``,
        ``0`` at dropped rows."""
        return scatter_rows(values, self.idx, self.n).reshape((*self.lead, *values.shape[1:]))


Setup = Callable[[Head, Optional[Head]], Tuple[VocabSlice, Callable[..., Scorer], object]]


def run_fused(fn: str, head: Head, target: Optional[Tensor], setup: Setup, *,
              teacher: Optional[Head] = None, rows: Sequence[Tensor] = (), ignore_index: int = -100,
              reduction: str = "mean", chunk_size: Optional[int] = None, input_scale: float = 1.0,
              names: Sequence[str] = ("hidden", "weight", "bias")) -> Tuple[Tensor, Batch]:
    """A fused loss from its public arguments to ``(result, Batch)``, in the steps of
    ``docs/internals.md`` (a scorer of ``k`` outputs adds a last dimension to ``'none'``'s result).

    ``setup(head, teacher)`` checks the autocast operands and returns ``(vocab, make_scorer,
    divisor)``: the reduce hook, ``make_scorer(kept_target, *kept_rows)`` and the ``'mean'``
    divisor (a number, a tensor, ``None`` for the kept-row count, or a callable of the scorer).
    ``teacher``: a second, detached head; ``rows``: more row-aligned ``(..., k)`` tensors (kept
    rows after the teacher's hidden states in ``make_scorer``); ``input_scale`` multiplies
    ``hidden`` and ``bias``; ``names``: the head's argument names for the finite check.
    """
    cast = autocast_matmul_operands(*head, *(teacher or ()))
    head = Head(*cast[:3])
    teacher = None if teacher is None else Head(*cast[3:])
    vocab, make_scorer, divisor = setup(head, teacher)
    lead = tuple(head.hidden.shape[:-1])
    h = head.hidden.reshape(-1, head.hidden.shape[-1])
    n = h.shape[0]
    kept = ([teacher.hidden.reshape(n, -1).detach()] if teacher is not None else []) + [
        r.reshape(n, -1) for r in rows]
    idx, t = None, None
    if target is not None:
        idx, t, h, *kept = select_kept(target.reshape(-1), ignore_index, h, *kept)
        t = t.long()
    h = vocab.replicated(h)
    bias = head.bias
    if input_scale != 1.0:
        h = h * input_scale
        bias = None if bias is None else bias * input_scale
    scorer = make_scorer(t, *kept)
    if callable(divisor):
        divisor = divisor(scorer)
    out = fused_linear_loss(h, head.weight, bias, scorer, reduction=reduction, divisor=divisor,
                            chunk_size=chunk_size, policy_vocab=vocab.max_size)
    batch = Batch(idx, n, lead)
    if reduction == "none":
        out = batch.scatter(out)
    _heuristics.finite_or_warn(fn, out if scorer.outputs == 1 else out[..., 0],
                               **dict(zip(names, head)))
    return out, batch
