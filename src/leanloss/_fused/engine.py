"""The chunked engine behind every fused loss: row blocks of logits, scored, with one autograd scheme.

The engine walks the rows of ``z`` ``(M, V)`` in blocks, so one ``(rows, V)`` block exists at a
time, and hands each block to a :class:`Scorer` that knows the loss. A block source makes the
block and takes its gradient ``dz``: a linear head (:func:`fused_linear_loss`; its backward
matmuls run while the block is in memory, three matmuls in all) or materialized logits
(:func:`fused_logits_loss`; ``dz`` goes to an ``(N, V)`` buffer in the logits' dtype).

``'sum'``/``'mean'``: each row's upstream gradient is a known scalar, so the scorer writes the
gradient in forward and ``backward`` scales it in place (a retained graph's second backward
recomputes it). ``'none'``: backward recomputes each block with the upstream vector, handing the
scorer the ``saved`` statistics of its first scoring. First order only, except a logits loss's
``reference`` formula under ``create_graph=True``. Statistics run in the compute dtype; how
blocks are sized and the 16-bit weight gradient planned (:func:`plan_chunk`):
``docs/fused-losses.md``. Vocab-parallel losses pass ``policy_vocab`` (the largest shard), so all
ranks walk the same blocks and run the same collectives.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, NamedTuple, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .._dtypes import compute_dtype
from .._reduce import reduce_loss
from .kernels import RowKernel, new_loss_call

__all__ = ["Scorer", "ScoreResult", "PointGradient", "fused_linear_loss", "fused_logits_loss",
           "default_chunk_size", "plan_chunk", "at_cols", "set_at_cols", "add_at_cols", "write_points"]

# Rows per block. Every block's matmuls re-read (and BLAS re-packs) the whole (V, D) weight, a
# cost that grows with the number of blocks and not with their size, so a block has at least
# MIN_CHUNK rows (measured on a 2-core CPU at D=1024: 256-row blocks cost ~4% over the
# unchunked matmuls, 512-row ~2-3%, 1024-row ~1%). Above that, about _BLOCK_BYTES per block.
# With few rows that floor would make the block most or all of the logits (at 512 tokens and
# V=128256 all of them, 262 MB in float32), so it is lowered to 1/_MIN_BLOCKS of the rows: a
# block then holds at most max(_BLOCK_BYTES, 1/_MIN_BLOCKS of the logits). Only M < 2048 changes.
_BLOCK_BYTES = 96 * 2**20
MIN_CHUNK = 512
_MIN_BLOCKS = 4
# float32 bytes per upcast sub-block (16-bit blocks scored by a float32-only scorer).
_WORK_BYTES = 16 * 2**20
# 16-bit bytes of one vocabulary slice of a block's weight-gradient product (stays in cache
# while it is added to the float32 accumulator).
_SLICE_BYTES = 8 * 2**20


class PointGradient(NamedTuple):
    """The point terms of a block's gradient, which the engine writes over the dense part: per
    row ``dense + coef`` at column ``cols`` (``(n,)`` each, rounded once; ``dense``: the dense
    part there, in the compute dtype; a softmax loss's ``-1`` at the target), then ``add_coef``
    added at ``add_cols`` (``(n, k)``; repeated columns add up, columns ``< 0`` add nothing; top-k
    distillation's ``-p_i``). ``None``: no terms of a kind. A float32 accumulator adds them exactly.
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
    """What :meth:`Scorer.score` returns for one block: ``values``, the ``(n,)`` per-row losses in
    the compute dtype whose plain sum is ``'sum'`` (``(n, k)`` for ``outputs = k > 1``); ``point``,
    its :class:`PointGradient` or ``None``; ``saved``, ``None`` or ``(n, s)`` statistics handed back
    when ``'none'``'s backward scores the block again (so a scorer can skip its collectives).
    """

    values: Tensor
    point: Optional[PointGradient] = None
    saved: Optional[Tensor] = None


class Scorer(Protocol):
    """Per-block loss math plugged into :func:`fused_linear_loss` or :func:`fused_logits_loss`.

    ``score(block, rows, saved, upstream)``: ``block`` is the ``(n, V)`` logits of the engine's
    ``rows`` (a ``slice``, never empty: index per-row state with it), in the compute dtype, or in
    the 16-bit matmul dtype for a scorer with ``low_precision_blocks``; the scorer may overwrite it
    and must not keep it (the next block reuses its memory). ``saved``: ``None`` on a block's first
    scoring, else the statistics that scoring saved. ``upstream``: ``None``, or the ``(n, outputs)``
    upstream gradients in the compute dtype; then the scorer overwrites ``block`` with the dense
    part of ``sum_j upstream_j d out_j / d z`` (``z`` the raw logits) and reports its point terms.

    ``outputs``: per-row outputs (``k > 1`` allows only ``reduction='none'``: the loss is
    ``(M, k)``). Over materialized logits a scorer may have ``load(block, x)``, which writes the
    rows ``x`` into ``block`` in place of ``block.copy_(x)`` (its first pass, e.g. a softmax).
    """

    low_precision_blocks: bool
    outputs: int

    def score(self, block: Tensor, rows: slice, saved: Optional[Tensor],
              upstream: Optional[Tensor]) -> ScoreResult:
        ...


def default_chunk_size(num_rows: int, vocab: int, *, block_bytes: int = _BLOCK_BYTES,
                       min_rows: int = MIN_CHUNK, element_size: int = 4) -> int:
    """Rows per block: about ``block_bytes`` of ``element_size``-byte logits, at least
    ``min(min_rows, ceil(num_rows / 4))`` rows (so a block holds at most ``max(block_bytes,
    1/4 of the logits)``), evened out so that the last block is not a sliver (same block count,
    smaller blocks)."""
    floor = min(min_rows, -(-num_rows // _MIN_BLOCKS))
    rows = max(floor, block_bytes // (element_size * max(vocab, 1)), 1)
    if num_rows <= rows:
        return max(1, num_rows)
    blocks = -(-num_rows // rows)
    return -(-num_rows // blocks)


def plan_chunk(num_rows: int, vocab: int, dim: int, dtype: torch.dtype, weight_grad: bool) -> int:
    """The engine's default rows per block for ``num_rows`` rows of ``dim`` features against
    ``vocab`` classes in ``dtype``. 16-bit with a weight gradient: one block over all rows when
    ``M <= 2 D`` (the 16-bit block is no larger than a float32 ``(V, D)`` accumulator) or it
    fits ``_BLOCK_BYTES`` (``grad_weight`` is then one matmul, rounded once); otherwise blocks of
    ``max(MIN_CHUNK, D)`` rows into a float32 accumulator."""
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
        for part in _chunks(z.shape[0], self.step):
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
    """Gradient buffers of the three inputs. ``grad_weight`` is written by the first block's
    matmul (no zero fill), then accumulated with ``addmm_`` in its own dtype; a 16-bit weight
    over several blocks has a float32 accumulator (``acc``) instead, with products added per
    vocabulary slice and the point terms added exactly."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], needs,
                 acc_dtype: torch.dtype, single_block: bool) -> None:
        need_h, need_w, need_b = needs
        self.h = torch.empty_like(hidden) if need_h else None
        self.acc = weight.dtype != acc_dtype and not single_block
        w_dtype = acc_dtype if self.acc else weight.dtype
        self.w = torch.empty(weight.shape, dtype=w_dtype, device=weight.device) if need_w else None
        self.w_started = False
        self.b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b and bias is not None else None
        self.acc_dtype = acc_dtype
        self._slice_buf: Optional[Tensor] = None

    def add_block(self, dz: Tensor, h: Tensor, weight: Tensor, rows: slice,
                  point: Optional[PointGradient]) -> None:
        """Add one block's gradient: ``dz`` (its dense part) plus the ``point`` terms."""
        if self.w is not None and self.acc:
            self._accumulate(dz, h, point)  # dense part, then the point terms exactly
        write_points(dz, point)
        if self.w is not None and not self.acc:
            if self.w_started:  # several blocks: the weight's own dtype
                self.w.addmm_(dz.T, h)
            else:
                torch.mm(dz.T, h, out=self.w)
        if self.w is not None:
            self.w_started = True
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


class _LinearBlocks:
    """Block source of a linear head: ``z = hidden[rows] @ weight.T + bias`` in the matmul
    dtype (one buffer, reused), its gradient through the backward matmuls (:class:`_Grads`)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.m, self.width, self.dtype = hidden.shape[0], weight.shape[0], hidden.dtype
        self.block_dtype, self.device = weight.dtype, weight.device

    def start(self, chunk: int, needs, with_grad: bool, dtype: torch.dtype) -> None:
        if with_grad:
            self.grads = _Grads(self.hidden, self.weight, self.bias, needs, dtype, single_block=chunk >= self.m)
        self.buf = torch.empty((min(chunk, self.m), self.width), dtype=self.block_dtype, device=self.device)

    def block(self, rows: slice) -> Tensor:
        h = self.hidden[rows]
        return _logits_(self.buf[: h.shape[0]], h, self.weight, self.bias)

    def add_grad(self, z: Tensor, rows: slice, point: Optional[PointGradient]) -> None:
        self.grads.add_block(z, self.hidden[rows], self.weight, rows, point)

    def finish(self):
        return self.grads.finish(self.weight, self.bias)


class _LogitsBlocks:
    """Block source of logits ``(N, V)``: a block is ``load(buffer, logits[keep[rows]])`` (a
    copy by default) in the compute dtype; the gradient is ``(N, V)``, ``0`` at rows not kept.
    With all rows kept in the compute dtype, the blocks are the gradient's rows (no copy back)."""

    def __init__(self, logits: Tensor, keep: Optional[Tensor] = None,
                 load: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> None:
        self.logits, self.keep, self.load = logits, keep, load or Tensor.copy_
        self.m = logits.shape[0] if keep is None else keep.shape[0]
        self.width, self.dtype, self.device = logits.shape[1], logits.dtype, logits.device
        self.block_dtype = compute_dtype(logits.dtype)

    def start(self, chunk: int, needs, with_grad: bool, dtype: torch.dtype) -> None:
        alloc = torch.empty if self.keep is None else torch.zeros
        self.grad = alloc(self.logits.shape, dtype=self.dtype, device=self.device) if with_grad else None
        rows_fit = self.keep is None and self.dtype == dtype  # the gradient's rows can be the blocks
        self.buf = (self.grad if self.grad is not None and rows_fit else
                    torch.empty((min(chunk, self.m), self.width), dtype=dtype, device=self.device))
        self.in_place = self.buf is self.grad

    def block(self, rows: slice) -> Tensor:
        src = self.logits[rows] if self.keep is None else self.logits.index_select(0, self.keep[rows])
        return self.load(self.buf[rows] if self.in_place else self.buf[: src.shape[0]], src)

    def add_grad(self, z: Tensor, rows: slice, point: Optional[PointGradient]) -> None:
        assert self.grad is not None
        write_points(z, point)
        if self.keep is not None:
            self.grad.index_copy_(0, self.keep[rows], z.to(self.dtype))
        elif not self.in_place:
            self.grad[rows].copy_(z)

    def finish(self):
        return (self.grad,)


def _run(source, plan: "_Plan", upstream_of, memo: Optional[Dict[int, Tensor]] = None) -> Tensor:
    """One pass over the blocks of ``source``: the per-row outputs, and with ``upstream_of`` the
    gradients (``source.finish()`` hands them out). ``memo``: ``None``, or a dict that keeps each
    block's ``saved`` statistics of a first pass (by its first row) for the ``'none'`` recompute."""
    dtype = compute_dtype(source.dtype)
    m, scorer, chunk = source.m, plan.scorer, plan.chunk
    outputs = scorer.outputs
    values = torch.empty((m, outputs) if outputs > 1 else m, dtype=dtype, device=source.device)
    source.start(chunk, plan.needs, upstream_of is not None, dtype)
    if m == 0:
        return values
    upcast = None
    if source.block_dtype != dtype and not scorer.low_precision_blocks:
        upcast = _Upcast(source.width, plan.policy_vocab, dtype, source.device)
    for rows in _chunks(m, chunk):
        z = source.block(rows)
        upstream = None if upstream_of is None else upstream_of(rows, z.shape[0], dtype)
        saved = None if memo is None else memo.get(rows.start)
        res = (scorer.score(z, rows, saved, upstream) if upcast is None
               else upcast.score(scorer, z, rows, saved, upstream))
        values[rows] = res.values
        if memo is not None and res.saved is not None:
            memo.setdefault(rows.start, res.saved)
        if upstream is not None:
            source.add_grad(z, rows, res.point)
    return values


class _Plan(NamedTuple):
    """One fused loss call, all but its tensors: ``source(*inputs)`` makes its block source,
    the scorer, the reduction and its divisor, rows per block, which inputs need a gradient,
    the block-size vocabulary, and ``reference`` (see :func:`fused_logits_loss`) or ``None``."""

    source: Callable
    scorer: Scorer
    reduction: str
    divisor: float
    chunk: int
    needs: Tuple[bool, ...]
    policy_vocab: int
    reference: Optional[Callable[..., Tensor]] = None


class _FusedLoss(torch.autograd.Function):
    """The autograd scheme of the module docstring, for any block source."""

    @staticmethod
    def forward(ctx, plan: _Plan, *inputs):
        ctx.plan = plan
        want_grad = any(plan.needs)
        if want_grad:
            # References only (no copies): 'none' recomputes from them in backward, and so does
            # a second backward through a retained graph after the stored gradients were handed out.
            ctx.save_for_backward(*inputs)
        if plan.reduction == "none" or not want_grad:
            ctx.memo = {} if want_grad else None
            losses = _run(plan.source(*inputs), plan, None, ctx.memo)
            return losses if plan.reduction == "none" else reduce_loss(losses, plan.reduction,
                                                                       num_items=plan.divisor)
        ctx.scale = 1.0 if plan.reduction == "sum" else 1.0 / plan.divisor
        source = plan.source(*inputs)
        losses = _run(source, plan, _constant_scale(ctx.scale, source.device))
        ctx.grads = source.finish()
        return reduce_loss(losses, plan.reduction, num_items=plan.divisor)

    @staticmethod
    def backward(ctx, grad_out):
        plan, inputs = ctx.plan, ctx.saved_tensors
        if plan.reference is not None and torch.is_grad_enabled():  # create_graph: the formula
            with torch.enable_grad():
                return (None, *torch.autograd.grad(plan.reference(*inputs), inputs, grad_out,
                                                   create_graph=True))
        source = plan.source(*inputs)
        if plan.reduction != "none":
            grads = getattr(ctx, "grads", None)
            if grads is None:  # second backward of a retained graph: recompute the same way
                _run(source, plan, _constant_scale(ctx.scale, source.device))
                grads = source.finish()
            else:
                # Hand the buffers to autograd without another reference (so it need not copy).
                del ctx.grads
            if not (isinstance(grad_out, Tensor) and grad_out.numel() == 1 and bool(grad_out == 1)):
                grads = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)
            return (None, *grads)
        go = grad_out.contiguous()

        def upstream_of(rows, n, dtype):
            upstream = go[rows].to(dtype)
            return upstream.unsqueeze(1) if upstream.dim() == 1 else upstream  # (n, 1), or (n, k)

        _run(source, plan, upstream_of, ctx.memo)
        return (None, *source.finish())


def _constant_scale(scale: float, device: torch.device) -> Callable[[slice, int, torch.dtype], Tensor]:
    """``upstream_of`` for the scalar reductions: every row's upstream gradient is ``scale``."""
    return lambda rows, n, dtype: torch.full((n, 1), scale, dtype=dtype, device=device)


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

    ``hidden`` ``(M, D)``: the rows that count (callers drop ignored rows); ``weight`` ``(V, D)``;
    ``bias`` ``(V,)`` or ``None``. ``reduction``: ``'none'`` -> ``(M,)`` per-row losses (``(M, k)``
    for a scorer of ``outputs = k``, which allows no other reduction); ``'sum'``; ``'mean'``: the
    sum over ``divisor`` (a number or 0-dim tensor, ``M`` when ``None``; ``0`` gives ``nan`` like
    torch). ``chunk_size``: rows per block (default: :func:`plan_chunk`); ``policy_vocab``: the
    vocabulary block sizes are computed from (default ``V``; vocab-parallel: the largest shard).
    Returns the loss in the compute dtype, differentiable in ``hidden``, ``weight`` and ``bias``
    (first order only).
    """
    new_loss_call()
    m = hidden.shape[0]
    divisor = _divisor("fused_linear_loss", scorer, reduction, divisor, m)
    vocab = policy_vocab or weight.shape[0]
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias))
    chunk = chunk_size or plan_chunk(m, vocab, hidden.shape[1], weight.dtype, weight_grad=needs[1])
    plan = _Plan(_LinearBlocks, scorer, reduction, divisor, chunk, needs, vocab)
    return _FusedLoss.apply(plan, hidden, weight, bias)


def fused_logits_loss(
    logits: Tensor,
    scorer: Scorer,
    *,
    reduction: str = "mean",
    divisor=None,
    keep: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    policy_vocab: Optional[int] = None,
    reference: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """:func:`fused_linear_loss` over the rows of materialized ``logits`` ``(N, V)`` (only read).

    ``keep``: the indices of the ``M`` rows that count, walked in this order (``None``: all
    ``N``); the gradient is ``0`` at the others. ``chunk_size`` defaults to
    :func:`default_chunk_size` rows of at least one. ``reference(logits)``: the same loss in
    differentiable torch ops, for a ``create_graph=True`` backward (else first order only).
    """
    m = logits.shape[0] if keep is None else keep.shape[0]
    divisor = _divisor("fused_logits_loss", scorer, reduction, divisor, m)
    vocab = policy_vocab or logits.shape[1]
    chunk = chunk_size or default_chunk_size(m, vocab, min_rows=1,
                                             element_size=compute_dtype(logits.dtype).itemsize)
    source = functools.partial(_LogitsBlocks, keep=keep, load=getattr(scorer, "load", None))
    plan = _Plan(source, scorer, reduction, divisor, chunk, (torch.is_grad_enabled() and logits.requires_grad,),
                 vocab, reference)
    return _FusedLoss.apply(plan, logits)


def _divisor(fn: str, scorer: Scorer, reduction: str, divisor, m: int) -> float:
    """``'mean'``'s divisor as one host number (``M`` when ``None``, ``nan`` for ``0``, like
    torch's mean over nothing); checks that a scorer with several outputs gets ``'none'``."""
    if scorer.outputs > 1 and reduction != "none":
        raise ValueError(f"{fn}: a scorer with several outputs per row needs "
                         f"reduction='none', got {reduction!r}")
    if divisor is None:
        divisor = m
    if isinstance(divisor, Tensor):
        divisor = float(divisor)  # one host value per call; keeps the engine free of graph state
    return float("nan") if divisor == 0 and reduction == "mean" else divisor
