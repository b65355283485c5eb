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
    the target terms (``-1`` at each row's class) would lose digits there: scorers report those
    point terms (:class:`PointGradient`) and the engine adds them to the accumulator exactly
    (``index_add_`` of float32 rows), so the result is as accurate as one rounded matmul.
    Extra memory ``4 V D + 2 D V`` bytes.

A scorer is any object with ``score(logits, rows, grad_scale) -> ScoreResult``; see
:class:`Scorer`. Scorers must run the same sequence of collective calls on every rank when used
by the vocab-parallel losses, so those pass ``policy_vocab`` (the largest shard), and every
block and sub-block size is computed from it, never from a rank's own ``V``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .._dtypes import compute_dtype
from .._reduce import reduce_loss
from .kernels import RowKernel

__all__ = ["Scorer", "ScoreResult", "PointGradient", "fused_linear_loss", "default_chunk_size",
           "plan_chunk", "set_at_cols", "add_at_cols"]

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
    """One point term per row of a block's gradient: ``coef[r]`` at column ``cols[r]``.

    The gradient the scorer wrote over the block is ``dense + coef * onehot(cols)``, and
    ``dense[r]`` is the value of the dense part at ``(r, cols[r])`` (compute dtype). For a
    softmax loss the point term is the ``-1`` at the target class.
    """

    cols: Tensor
    coef: Tensor
    dense: Tensor


class ScoreResult(NamedTuple):
    """What :meth:`Scorer.score` returns for one block.

    ``loss``: ``(n,)`` per-row losses in the compute dtype, weighted so that the ``'sum'``
    reduction is their plain sum; ``(n, k)`` for a scorer with ``outputs = k > 1`` (see
    :class:`Scorer`). ``row_scale``: ``None``, or ``(n,)`` when the gradient
    written over the block still has to be multiplied by ``row_scale[:, None]`` (the engine
    applies it on the ``(n, D)`` side of the backward matmuls: one pass over the block less).
    ``point``: optional :class:`PointGradient` (with or without ``row_scale``, it describes
    the block as written, before the row scale).
    """

    loss: Tensor
    row_scale: Optional[Tensor] = None
    point: Optional[PointGradient] = None


class Scorer(Protocol):
    """Per-block loss math plugged into :func:`fused_linear_loss`.

    ``score(logits, rows, grad_scale)``:

    * ``logits``: ``(n, V)`` block of ``hidden[rows] @ weight.T + bias``; in the compute dtype
      (float32, float64), or in the 16-bit matmul dtype when the scorer sets
      ``low_precision_blocks = True``. The engine owns it: the scorer may overwrite it and must
      not keep a reference past the call (the next block reuses its memory).
    * ``rows``: the ``slice`` of rows of ``hidden`` this block covers (index per-row state such
      as targets or teacher hidden states with it).
    * ``grad_scale``: ``None`` when no gradient is wanted; otherwise an ``(n, 1)`` tensor ``c``
      (compute dtype), and the scorer must overwrite ``logits`` in place with
      ``c * d loss_r / d z_r`` (the gradient with respect to the raw logits, before any
      transform the scorer applies), or with that divided by a returned ``row_scale``.

    A scorer may return ``k > 1`` outputs per row (say a log-probability and an entropy) by
    setting the optional attribute ``outputs = k``: its losses are ``(n, k)``, only
    ``reduction='none'`` applies (the loss is ``(M, k)``), and ``grad_scale`` is ``(n, k)``,
    the upstream gradient of each output, so the scorer writes ``sum_j c_j d out_j / d z``.

    Returns a :class:`ScoreResult`. The same block may be scored twice in one call of the loss
    (``reduction='none'`` recomputes blocks in backward); scorers may keep per-row by-products
    (a log-sum-exp, say) in buffers of their own, indexed by ``rows``.
    """

    low_precision_blocks: bool

    def score(self, logits: Tensor, rows: slice, grad_scale: Optional[Tensor]) -> ScoreResult:
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
    float32 work buffer, scored, and (with gradients) cast back over the block with the row
    scale folded in."""

    def __init__(self, vocab: int, policy_vocab: int, dtype: torch.dtype, device) -> None:
        self.step = max(1, _WORK_BYTES // (4 * max(policy_vocab, 1)))
        self.work = torch.empty((self.step, vocab), dtype=dtype, device=device)

    def score(self, scorer, z: Tensor, rows: slice, grad_scale: Optional[Tensor]) -> ScoreResult:
        n = z.shape[0]
        losses = []
        points = []
        for start in range(0, n, self.step):
            stop = min(start + self.step, n)
            sub = z[start:stop]
            w = self.work[: stop - start].copy_(sub)
            res = scorer.score(w, slice(rows.start + start, rows.start + stop),
                               None if grad_scale is None else grad_scale[start:stop])
            losses.append(res.loss)
            if grad_scale is None:
                continue
            point = res.point
            if res.row_scale is None:
                sub.copy_(w)
            else:
                col = res.row_scale.unsqueeze(1)
                torch.mul(w, col, out=sub)
                if point is not None:
                    point = PointGradient(point.cols, point.coef * res.row_scale,
                                          point.dense * res.row_scale)
            points.append(point)
        loss = losses[0] if len(losses) == 1 else torch.cat(losses)
        point = None
        if points and all(p is not None for p in points):
            point = PointGradient(*(torch.cat(parts) for parts in zip(*points)))
        return ScoreResult(loss, None, point)


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

    def add_block(self, dz: Tensor, h: Tensor, weight: Tensor, rows: slice, res: ScoreResult) -> None:
        """Add one block's gradient ``dz`` (times ``res.row_scale[:, None]`` when given)."""
        row_scale = res.row_scale
        if self.b is not None:
            self.b += (dz.sum(0, dtype=self.acc_dtype) if row_scale is None
                       else row_scale.to(self.acc_dtype) @ dz.to(self.acc_dtype))
        col = None if row_scale is None else row_scale.unsqueeze(1).to(weight.dtype)
        if self.h is not None:
            out = self.h[rows]
            torch.mm(dz, weight, out=out)
            if col is not None:
                out.mul_(col)
        if self.w is None:
            return
        hs = h if col is None else h * col
        if not self.low:
            if self.w_started:
                self.w.addmm_(dz.T, hs)
            else:
                torch.mm(dz.T, hs, out=self.w)
        elif self.single:
            torch.mm(dz.T, hs, out=self.w)
        else:
            self._accumulate(dz, hs, res.point)
        self.w_started = True

    def _accumulate(self, dz: Tensor, h: Tensor, point: Optional[PointGradient]) -> None:
        """``acc += dz.T @ h`` (``h`` already row-scaled) with the point terms added exactly."""
        acc = self.w
        assert acc is not None
        if point is not None:  # take the point terms out of the 16-bit block
            set_at_cols(dz, point.cols, point.dense)
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
        if point is not None:  # ... and add them in float32
            rows = h.to(self.acc_dtype) * point.coef.to(self.acc_dtype).unsqueeze(1)
            acc.index_put_((point.cols,), rows, accumulate=True)

    def finish(self, weight: Tensor, bias: Optional[Tensor]):
        if self.w is not None and not self.w_started:
            self.w.zero_()
        gw = None if self.w is None else self.w.to(weight.dtype)
        gb = None if self.b is None or bias is None else self.b.to(bias.dtype)
        self._slice_buf = None
        return self.h, gw, gb


def add_upcast(acc: Tensor, part: Tensor):
    """``acc += part`` with ``part`` upcast on the fly (one pass; eager ``add_`` of a 16-bit
    tensor into float32 first makes a float32 copy of it)."""
    acc.add_(part.to(acc.dtype))
    return ()


_ADD_KERNEL = RowKernel(add_upcast, "weight-gradient accumulation")


def _run(hidden, weight, bias, scorer, chunk, grad_scale_of, needs, policy_vocab):
    """One pass over the blocks: per-row losses, and gradients when ``grad_scale_of`` is set."""
    dtype = compute_dtype(hidden.dtype)
    m = hidden.shape[0]
    outputs = getattr(scorer, "outputs", 1)
    losses = torch.empty((m, outputs) if outputs > 1 else m, dtype=dtype, device=hidden.device)
    grads = (_Grads(hidden, weight, bias, needs, dtype, single_block=chunk >= m)
             if grad_scale_of is not None else None)
    if m == 0:
        return losses, grads
    block = torch.empty((min(chunk, m), weight.shape[0]), dtype=weight.dtype, device=weight.device)
    upcast = None
    if weight.dtype != dtype and not getattr(scorer, "low_precision_blocks", False):
        upcast = _Upcast(weight.shape[0], policy_vocab, dtype, weight.device)
    for rows in _chunks(m, chunk):
        h = hidden[rows]
        z = _logits_(block[: h.shape[0]], h, weight, bias)
        scale = None if grads is None else grad_scale_of(rows, h.shape[0], dtype)
        res = scorer.score(z, rows, scale) if upcast is None else upcast.score(scorer, z, rows, scale)
        losses[rows] = res.loss
        if grads is not None:
            grads.add_block(z, h, weight, rows, res)
    return losses, grads


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
            losses, _ = _run(hidden, weight, bias, scorer, chunk, None, needs, policy_vocab)
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

        def grad_scale_of(rows, n, dtype):
            scale = go[rows].to(dtype)
            return scale.unsqueeze(1) if scale.dim() == 1 else scale  # (n, 1), or (n, k)

        _, grads = _run(hidden, weight, bias, ctx.scorer, ctx.chunk, grad_scale_of, ctx.needs,
                        ctx.policy_vocab)
        gh, gw, gb = grads.finish(weight, bias)
        return gh, gw, gb, None, None, None, None, None, None


def _constant_scale(scale: float, device: torch.device) -> Callable[[slice, int, torch.dtype], Tensor]:
    """``grad_scale_of`` for the scalar reductions: every row's gradient is scaled by ``scale``."""
    def grad_scale_of(rows, n, dtype):
        return torch.full((n, 1), scale, dtype=dtype, device=device)
    return grad_scale_of


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
    m = hidden.shape[0]
    if getattr(scorer, "outputs", 1) > 1 and reduction != "none":
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
