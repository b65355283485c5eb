"""The chunked engine behind every fused linear-head loss.

A fused loss is ``loss(z)`` with ``z = hidden @ weight.T + bias`` of shape ``(M, V)``; at
vocabulary sizes of 32k-256k ``z`` and its gradient dominate memory. The engine walks the rows
of ``hidden`` in blocks, so one ``(rows, V)`` block of logits exists at a time, in the matmul
dtype, and hands each block to a :class:`Scorer` that knows the loss.

Gradients. For ``reduction='sum'|'mean'`` the gradient of the total with respect to each row's
loss is a known scalar ``s`` (``1`` or ``1/divisor``), so the engine asks the scorer for
``s * dloss/dz`` while the block is still in memory and does the backward matmuls right away::

    grad_hidden[rows] = dz @ weight            grad_weight += dz.T @ hidden[rows]
    grad_bias         += dz.sum(0)

That is three matmuls in total (``h @ W.T``, ``dz @ W``, ``dz.T @ h``), the roofline of the
unfused loss, and ``backward`` only scales the stored gradients by the upstream scalar (in
place, no copy). For ``reduction='none'`` the upstream gradient is a vector known only in
backward, so the forward pass keeps the per-row losses and the backward pass recomputes each
block (four matmuls). Under ``torch.no_grad()``, or when nothing requires grad, only the
forward matmul runs.

Precision and memory. Matmuls run in the inputs' dtype; statistics, losses and gradient
accumulation in the compute dtype (float32 for bfloat16/float16, else the input dtype).

* float32/float64: blocks of about ``_BLOCK_BYTES`` (>= ``MIN_CHUNK`` rows); ``grad_weight``
  accumulates in its own dtype with ``addmm_``.
* bfloat16/float16: the block stays 16-bit. A scorer with ``low_precision_blocks`` reads it
  directly (a compiled row kernel, :mod:`leanloss._fused.kernels`) and writes the 16-bit
  gradient over it; for other scorers the engine upcasts row sub-blocks of about
  ``_WORK_BYTES`` and casts the gradient back. The weight gradient is the one place where
  16-bit blocks cost accuracy if summed naively, so it is planned by size:

  - ``M <= 2 D`` (the 16-bit ``(M, V)`` block is no larger than a float32 ``(V, D)``
    accumulator) or the whole block fits ``_BLOCK_BYTES``: one block over all rows, and
    ``grad_weight = dz.T @ hidden`` is ONE matmul written in the weight's dtype (rounded once,
    as eager autograd rounds it). Extra memory ``2 M V`` bytes.
  - otherwise: blocks of ``max(MIN_CHUNK, D)`` rows into a float32 ``(V, D)`` accumulator;
    each block's product is taken in vocabulary slices of about ``_SLICE_BYTES`` and added in
    float32. A block's product is rounded to 16 bits before it is added, and a partial sum of
    the target terms (``-1`` at each row's class; top-k distillation's ``-p_i`` at the
    teacher's ids) would lose digits there: scorers report those point terms
    (:class:`PointGradient`) and the engine adds them to the accumulator exactly (``index_add``
    of float32 rows, one per point term of a row), so the result is as accurate as one rounded
    matmul.
    Extra memory ``4 V D + 2 D V`` bytes.

A scorer is any object with ``score(block, rows, saved, upstream) -> ScoreResult``; see
:class:`Scorer`. Point terms are reported by the scorer and written by the engine; the
``saved`` per-row statistics of a block's first scoring are kept by the engine for its
``'none'`` recompute. Scorers must run the same sequence of collective calls on every rank when used
by the vocab-parallel losses, so those pass ``policy_vocab`` (the largest shard), and every
block and sub-block size is computed from it, never from a rank's own ``V``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .._dtypes import compute_dtype
from .._reduce import reduce_loss
from .kernels import RowKernel, new_loss_call

__all__ = ["Scorer", "ScoreResult", "PointGradient", "fused_linear_loss", "default_chunk_size",
           "plan_chunk", "at_cols", "set_at_cols", "add_at_cols", "write_points"]

# Rows per block. Every block's matmuls re-read (and BLAS re-packs) the whole (V, D) weight, a
# cost that grows with the number of blocks and not with their size, so a block has at least
# MIN_CHUNK rows (measured on a 2-core CPU at D=1024: 256-row blocks cost ~4% over the
# unchunked matmuls, 512-row ~2-3%, 1024-row ~1%). Above that, about _BLOCK_BYTES per block.
_BLOCK_BYTES = 96 * 2**20
MIN_CHUNK = 512
# float32 bytes per upcast sub-block (16-bit blocks scored by a float32-only scorer).
_WORK_BYTES = 16 * 2**20
# 16-bit bytes of one vocabulary slice of a block's weight-gradient product (stays in cache
# while it is added to the float32 accumulator).
_SLICE_BYTES = 8 * 2**20


class PointGradient(NamedTuple):
    """The point terms of a block's gradient, which the engine writes.

    A scorer writes the dense part of its gradient over the block and reports its point terms:

    * one per row, ``coef[r]`` at column ``cols[r]`` (``(n,)`` each; ``None``: none): the
      engine writes ``dense + coef`` there, rounded once to the block's dtype; ``dense[r]`` is
      the dense part's value at ``(r, cols[r])`` in the compute dtype. For a softmax loss the
      ``-1`` at the target class.
    * ``k`` per row, ``add_coef[r, i]`` added at column ``add_cols[r, i]`` (``(n, k)`` each;
      ``None``: none), after the first kind: repeated columns add up and columns ``< 0``
      contribute nothing. Top-k distillation's ``-p_i`` at the teacher's ids.

    In a 16-bit float32 weight-gradient accumulator the engine adds them exactly (see the module
    docstring).
    """

    cols: Optional[Tensor]
    coef: Optional[Tensor]
    dense: Optional[Tensor]
    add_cols: Optional[Tensor] = None
    add_coef: Optional[Tensor] = None

    def added(self) -> Optional[Tuple[Tensor, Tensor]]:
        """``(add_cols, add_coef)`` with each column ``< 0`` made a ``0`` at column ``0``, or ``None``."""
        if self.add_cols is None or self.add_coef is None:
            return None
        keep = self.add_cols >= 0
        return torch.where(keep, self.add_cols, 0), torch.where(keep, self.add_coef, 0)


class ScoreResult(NamedTuple):
    """What :meth:`Scorer.score` returns for one block.

    ``values``: ``(n,)`` per-row losses in the compute dtype, weighted so that the ``'sum'``
    reduction is their plain sum; ``(n, k)`` per-row outputs for a scorer with
    ``outputs = k > 1``. ``point``: the block's :class:`PointGradient`, or ``None``.
    ``saved``: ``None``, or ``(n, s)`` per-row statistics that the engine keeps from the first
    scoring of the block and hands back when it scores the block again (``reduction='none'``
    recomputes blocks in backward), so a scorer can skip work (its collectives) there.
    """

    values: Tensor
    point: Optional[PointGradient] = None
    saved: Optional[Tensor] = None


class Scorer(Protocol):
    """Per-block loss math plugged into :func:`fused_linear_loss`.

    ``score(block, rows, saved, upstream)``:

    * ``block``: ``(n, V)`` of ``hidden[rows] @ weight.T + bias``; in the compute dtype
      (float32, float64), or in the 16-bit matmul dtype when the scorer sets
      ``low_precision_blocks = True``. The engine owns it: the scorer may overwrite it and must
      not keep a reference past the call (the next block reuses its memory).
    * ``rows``: the ``slice`` of rows of ``hidden`` this block covers (index per-row state such
      as targets or teacher hidden states with it).
    * ``saved``: ``None`` on a block's first scoring; else the ``(n, s)`` ``saved`` statistics
      that scoring returned.
    * ``upstream``: ``None`` when no gradient is wanted; otherwise the upstream gradient of each
      row's output, ``(n, outputs)`` in the compute dtype, and the scorer must overwrite
      ``block`` in place with the dense part of ``sum_j upstream_j d out_j / d z`` (the gradient
      with respect to the raw logits, before any transform the scorer applies) and report its
      point terms, if any, in the result.

    ``outputs``: per-row outputs (``k > 1``, say a log-probability and an entropy, allows only
    ``reduction='none'``: the loss is ``(M, k)``). Returns a :class:`ScoreResult`.
    """

    low_precision_blocks: bool
    outputs: int

    def score(self, block: Tensor, rows: slice, saved: Optional[Tensor],
              upstream: Optional[Tensor]) -> ScoreResult:
        ...


def default_chunk_size(num_rows: int, vocab: int, *, block_bytes: int = _BLOCK_BYTES,
                       min_rows: int = MIN_CHUNK, element_size: int = 4) -> int:
    """Rows per block: about ``block_bytes`` of ``element_size``-byte logits, at least
    ``min_rows`` rows, evened out so that the last block is not a sliver (same block count,
    smaller blocks)."""
    rows = max(min_rows, block_bytes // (element_size * max(vocab, 1)), 1)
    if num_rows <= rows:
        return max(1, num_rows)
    blocks = -(-num_rows // rows)
    return -(-num_rows // blocks)


def plan_chunk(num_rows: int, vocab: int, dim: int, dtype: torch.dtype, weight_grad: bool) -> int:
    """The engine's default rows per block for ``num_rows`` rows of ``dim`` features against
    ``vocab`` classes in ``dtype`` (see the module docstring for the 16-bit weight-gradient
    plan)."""
    size = dtype.itemsize
    if compute_dtype(dtype) == dtype:
        return default_chunk_size(num_rows, vocab, element_size=size)
    if weight_grad:
        if num_rows <= 2 * dim or num_rows * vocab * size <= _BLOCK_BYTES:
            return max(1, num_rows)
        return default_chunk_size(num_rows, vocab, element_size=size,
                                  block_bytes=max(MIN_CHUNK, dim) * vocab * size)
    return default_chunk_size(num_rows, vocab, element_size=size)


def _flat_at_cols(block: Tensor, cols: Tensor) -> Tuple[Tensor, Tensor]:
    """A row-contiguous ``(n, V)`` block as a 1-D view, and the flat positions of
    ``block[r, cols[r]]`` (``cols`` ``(n,)``) or ``block[r, cols[r, i]]`` (``cols`` ``(n, k)``),
    flattened. Writing through them avoids ``scatter_``/``scatter_add_`` along dim 1, which
    make a float32 copy of a 16-bit block on CPU."""
    n, width = block.shape
    starts = torch.arange(n, device=block.device) * block.stride(0)
    flat = starts.view(n, *([1] * (cols.dim() - 1))) + cols
    return block.as_strided((block.stride(0) * (n - 1) + width,), (1,)), flat.reshape(-1)


def at_cols(block: Tensor, cols: Tensor, dtype: torch.dtype) -> Tensor:
    """``block[r, cols[r]]`` per row, in ``dtype``."""
    return block.gather(1, cols.unsqueeze(1)).squeeze(1).to(dtype)


def set_at_cols(block: Tensor, cols: Tensor, values: Tensor) -> None:
    """``block[r, cols[r]] = values[r]`` for a row-contiguous block, in place."""
    if block.shape[0] == 0:
        return
    view, flat = _flat_at_cols(block, cols)
    view.index_copy_(0, flat, values.to(block.dtype))


def add_at_cols(block: Tensor, cols: Tensor, values: Tensor) -> None:
    """``block[r, cols[r, i]] += values[r, i]`` for a row-contiguous block, in place (repeated
    columns add up)."""
    if block.shape[0] == 0:
        return
    view, flat = _flat_at_cols(block, cols)
    view.index_add_(0, flat, values.reshape(-1).to(block.dtype))


def _chunks(num_rows: int, chunk: int):
    for start in range(0, num_rows, chunk):
        yield slice(start, min(start + chunk, num_rows))


def _logits_(out: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if bias is None:
        return torch.mm(h, weight.T, out=out)
    return torch.addmm(bias, h, weight.T, out=out)


class _Upcast:
    """Scores a 16-bit block with a compute-dtype scorer: row sub-blocks are copied into one
    float32 work buffer, scored, and (with gradients) cast back over the block."""

    def __init__(self, vocab: int, policy_vocab: int, dtype: torch.dtype, device) -> None:
        self.step = max(1, _WORK_BYTES // (4 * max(policy_vocab, 1)))
        self.work = torch.empty((self.step, vocab), dtype=dtype, device=device)

    def score(self, scorer, z: Tensor, rows: slice, saved: Optional[Tensor],
              upstream: Optional[Tensor]) -> ScoreResult:
        results = []
        for start in range(0, z.shape[0], self.step):
            part = slice(start, min(start + self.step, z.shape[0]))
            sub = z[part]
            w = self.work[: sub.shape[0]].copy_(sub)
            results.append(scorer.score(w, slice(rows.start + part.start, rows.start + part.stop),
                                        None if saved is None else saved[part],
                                        None if upstream is None else upstream[part]))
            if upstream is not None:
                sub.copy_(w)
        if len(results) == 1:
            return results[0]
        values, points, saveds = zip(*results)
        point = None
        if points[0] is not None:  # a scorer reports point terms for every sub-block or none
            point = PointGradient(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*points)))
        return ScoreResult(torch.cat(values), point,
                           None if saveds[0] is None else torch.cat(saveds))


class _Grads:
    """Gradient buffers of the three inputs and the weight-gradient plan.

    * same dtype (float32/float64 weight): ``grad_weight`` is written by the first block's
      matmul (no zero fill) and accumulated with ``addmm_``;
    * 16-bit weight, one block: ``dz.T @ h`` straight into a weight-dtype buffer;
    * 16-bit weight, several blocks: a float32 accumulator, products added per vocabulary
      slice, point terms added exactly.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], needs,
                 acc_dtype: torch.dtype, single_block: bool) -> None:
        self.need_h, self.need_w, self.need_b = needs
        self.h = torch.empty_like(hidden) if self.need_h else None
        self.low = weight.dtype != acc_dtype
        self.single = self.low and single_block
        w_dtype = weight.dtype if (self.single or not self.low) else acc_dtype
        self.w = torch.empty(weight.shape, dtype=w_dtype, device=weight.device) if self.need_w else None
        self.w_started = False
        self.b = (torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device)
                  if (self.need_b and bias is not None) else None)
        self.acc_dtype = acc_dtype
        self._slice_buf: Optional[Tensor] = None

    def add_block(self, dz: Tensor, h: Tensor, weight: Tensor, rows: slice,
                  point: Optional[PointGradient]) -> None:
        """Add one block's gradient: ``dz`` (its dense part) plus the ``point`` terms."""
        if self.w is not None and self.low and not self.single:
            self._accumulate(dz, h, point)  # dense part, then the point terms exactly
        elif self.w is not None:
            write_points(dz, point)
            if self.w_started and not self.low:
                self.w.addmm_(dz.T, h)
            else:
                torch.mm(dz.T, h, out=self.w)
            point = None
        if self.w is not None:
            self.w_started = True
        write_points(dz, point)
        if self.b is not None:
            self.b += dz.sum(0, dtype=self.acc_dtype)
        if self.h is not None:
            torch.mm(dz, weight, out=self.h[rows])

    def _accumulate(self, dz: Tensor, h: Tensor, point: Optional[PointGradient]) -> None:
        """``acc += dz.T @ h`` for the dense part ``dz``, the point terms added in float32."""
        acc = self.w
        assert acc is not None
        vocab, dim = acc.shape
        step = max(1, min(vocab, _SLICE_BYTES // (dz.element_size() * max(dim, 1))))
        if self._slice_buf is None:
            self._slice_buf = torch.empty((step, dim), dtype=dz.dtype, device=dz.device)
        dzt = dz.T
        for start in range(0, vocab, step):
            stop = min(start + step, vocab)
            part = torch.mm(dzt[start:stop], h, out=self._slice_buf[: stop - start])
            if self.w_started:
                _ADD_KERNEL(acc[start:stop], part)
            else:  # the first block writes the accumulator: no zero fill
                acc[start:stop].copy_(part)
        if point is None:
            return
        h_acc = h.to(self.acc_dtype)
        columns = [] if point.cols is None or point.coef is None else [(point.cols, point.coef)]
        added = point.added()
        if added is not None:  # one (n, D) product per column of the (n, k) terms
            columns += zip(added[0].unbind(1), added[1].unbind(1))
        for cols, coef in columns:
            acc.index_put_((cols,), h_acc * coef.to(self.acc_dtype).unsqueeze(1), accumulate=True)

    def finish(self, weight: Tensor, bias: Optional[Tensor]):
        if self.w is not None and not self.w_started:
            self.w.zero_()
        gw = None if self.w is None else self.w.to(weight.dtype)
        gb = None if self.b is None or bias is None else self.b.to(bias.dtype)
        self._slice_buf = None
        return self.h, gw, gb


def write_points(dz: Tensor, point: Optional[PointGradient]) -> None:
    """The point terms into the block of dense gradients: ``dense + coef`` at ``cols``, then
    ``add_coef`` added at ``add_cols``."""
    if point is None:
        return
    if point.cols is not None and point.coef is not None and point.dense is not None:
        set_at_cols(dz, point.cols, point.dense + point.coef)
    added = point.added()
    if added is not None:
        add_at_cols(dz, *added)


def add_upcast(acc: Tensor, part: Tensor):
    """``acc += part`` with ``part`` upcast on the fly (one pass; eager ``add_`` of a 16-bit
    tensor into float32 first makes a float32 copy of it)."""
    acc.add_(part.to(acc.dtype))
    return ()


_ADD_KERNEL = RowKernel(add_upcast, "weight-gradient accumulation")


def _run(hidden, weight, bias, scorer, chunk, upstream_of, needs, policy_vocab, memo=None):
    """One pass over the blocks: per-row outputs, and gradients when ``upstream_of`` is set.

    ``memo``: a :class:`_Memo` that keeps the scorer's ``saved`` statistics of a first pass
    and hands them back on the next (the ``'none'`` recompute), or ``None``."""
    dtype = compute_dtype(hidden.dtype)
    m = hidden.shape[0]
    outputs = scorer.outputs
    values = torch.empty((m, outputs) if outputs > 1 else m, dtype=dtype, device=hidden.device)
    grads = (_Grads(hidden, weight, bias, needs, dtype, single_block=chunk >= m)
             if upstream_of is not None else None)
    if m == 0:
        return values, grads
    block = torch.empty((min(chunk, m), weight.shape[0]), dtype=weight.dtype, device=weight.device)
    upcast = None
    if weight.dtype != dtype and not scorer.low_precision_blocks:
        upcast = _Upcast(weight.shape[0], policy_vocab, dtype, weight.device)
    for rows in _chunks(m, chunk):
        h = hidden[rows]
        z = _logits_(block[: h.shape[0]], h, weight, bias)
        upstream = None if grads is None else upstream_of(rows, h.shape[0], dtype)
        saved = None if memo is None else memo.get(rows)
        res = (scorer.score(z, rows, saved, upstream) if upcast is None
               else upcast.score(scorer, z, rows, saved, upstream))
        values[rows] = res.values
        if memo is not None and saved is None:
            memo.put(rows, res.saved, m)
        if grads is not None:
            grads.add_block(z, h, weight, rows, res.point)
    return values, grads


class _Memo:
    """The ``saved`` row statistics of every block of a first pass, for the next pass."""

    def __init__(self) -> None:
        self.buf: Optional[Tensor] = None
        self.filled = False

    def get(self, rows: slice) -> Optional[Tensor]:
        return self.buf[rows] if self.filled and self.buf is not None else None

    def put(self, rows: slice, saved: Optional[Tensor], m: int) -> None:
        if saved is None:
            return
        if self.buf is None:
            self.buf = saved.new_empty((m, saved.shape[1]))
        self.buf[rows] = saved


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, scorer, reduction, divisor, chunk, needs, policy_vocab):
        ctx.reduction = reduction
        ctx.needs = needs
        want_grad = any(needs)
        if want_grad:
            # References only (no copies): 'none' recomputes from them in backward, and so does
            # a second backward through a retained graph after the stored gradients were handed out.
            ctx.save_for_backward(hidden, weight, bias)
            ctx.scorer, ctx.chunk, ctx.policy_vocab = scorer, chunk, policy_vocab
        if reduction == "none" or not want_grad:
            ctx.memo = memo = _Memo() if want_grad else None
            losses, _ = _run(hidden, weight, bias, scorer, chunk, None, needs, policy_vocab, memo)
            if memo is not None:
                memo.filled = True
            return losses if reduction == "none" else reduce_loss(losses, reduction, num_items=divisor)

        ctx.scale = scale = 1.0 if reduction == "sum" else 1.0 / divisor
        losses, grads = _run(hidden, weight, bias, scorer, chunk,
                             _constant_scale(scale, hidden.device), needs, policy_vocab)
        ctx.grads = grads.finish(weight, bias)
        return reduce_loss(losses, reduction, num_items=divisor)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias = ctx.saved_tensors
        if ctx.reduction != "none":
            grads = getattr(ctx, "grads", None)
            if grads is None:  # second backward of a retained graph: recompute the same way
                _, acc = _run(hidden, weight, bias, ctx.scorer, ctx.chunk,
                              _constant_scale(ctx.scale, hidden.device), ctx.needs, ctx.policy_vocab)
                grads = acc.finish(weight, bias)
            else:
                # Hand the buffers to autograd without another reference (so it need not copy).
                del ctx.grads
            gh, gw, gb = grads
            del grads
            if not (isinstance(grad_out, Tensor) and grad_out.numel() == 1 and bool(grad_out == 1)):
                gh = None if gh is None else gh.mul_(grad_out.to(gh.dtype))
                gw = None if gw is None else gw.mul_(grad_out.to(gw.dtype))
                gb = None if gb is None else gb.mul_(grad_out.to(gb.dtype))
            return gh, gw, gb, None, None, None, None, None, None
        go = grad_out.contiguous()

        def upstream_of(rows, n, dtype):
            upstream = go[rows].to(dtype)
            return upstream.unsqueeze(1) if upstream.dim() == 1 else upstream  # (n, 1), or (n, k)

        _, grads = _run(hidden, weight, bias, ctx.scorer, ctx.chunk, upstream_of, ctx.needs,
                        ctx.policy_vocab, ctx.memo)
        gh, gw, gb = grads.finish(weight, bias)
        return gh, gw, gb, None, None, None, None, None, None


def _constant_scale(scale: float, device: torch.device) -> Callable[[slice, int, torch.dtype], Tensor]:
    """``upstream_of`` for the scalar reductions: every row's upstream gradient is ``scale``."""
    def upstream_of(rows, n, dtype):
        return torch.full((n, 1), scale, dtype=dtype, device=device)
    return upstream_of


def fused_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    scorer: Scorer,
    *,
    reduction: str = "mean",
    divisor=None,
    chunk_size: Optional[int] = None,
    policy_vocab: Optional[int] = None,
) -> Tensor:
    """Reduce ``scorer``'s per-row losses over ``z = hidden @ weight.T + bias`` without holding ``z``.

    Args:
        hidden: ``(M, D)`` rows that count (callers drop ignored rows before calling).
        weight: ``(V, D)``; bias: ``(V,)`` or ``None``.
        scorer: the per-block loss math (:class:`Scorer`).
        reduction: ``'none'`` -> ``(M,)`` per-row losses (``(M, k)`` for a scorer with
            ``outputs = k``, which allows no other reduction); ``'sum'`` -> their sum;
            ``'mean'`` -> their sum divided by ``divisor`` (a Python number or 0-dim tensor,
            ``M`` when ``None``; ``0`` gives ``nan`` like torch's mean over nothing).
        chunk_size: rows per block (default: :func:`plan_chunk`).
        policy_vocab: the vocabulary size that block sizes are computed from (default
            ``V``; the vocab-parallel losses pass the largest shard so every rank walks the same
            blocks).

    Returns the loss in the compute dtype (float32 for 16-bit inputs). Differentiable with
    respect to ``hidden``, ``weight`` and ``bias`` (first order only).
    """
    new_loss_call()
    m = hidden.shape[0]
    if scorer.outputs > 1 and reduction != "none":
        raise ValueError(f"fused_linear_loss: a scorer with several outputs per row needs "
                         f"reduction='none', got {reduction!r}")
    if divisor is None:
        divisor = m
    if isinstance(divisor, Tensor):
        divisor = float(divisor)  # one host value per call; keeps the engine free of graph state
    vocab = policy_vocab or weight.shape[0]
    grad_on = torch.is_grad_enabled()
    needs: Tuple[bool, bool, bool] = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    chunk = chunk_size or plan_chunk(m, vocab, hidden.shape[1], weight.dtype,
                                     weight_grad=needs[1])
    if divisor == 0 and reduction == "mean":
        divisor = float("nan")
    return _FusedLinearLoss.apply(hidden, weight, bias, scorer, reduction, divisor, chunk, needs,
                                  vocab)
