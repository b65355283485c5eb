"""The chunked engine behind every fused linear-head loss.

A fused loss is ``loss(z)`` with ``z = hidden @ weight.T + bias`` of shape ``(M, V)``; at
vocabulary sizes of 32k-256k ``z`` and its gradient dominate memory. The engine walks the rows
of ``hidden`` in chunks of ``chunk_size``, so at most one ``(chunk_size, V)`` float32 block of
logits exists at a time, and hands each block to a :class:`Scorer` that knows the loss.

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

Precision: the matmuls run in the inputs' dtype; each logits block is upcast to float32 (float64
stays float64) for the scorer; gradients of low-precision inputs are accumulated in float32 and
cast back once at the end.

A scorer is any object with ``score(logits, rows, grad_scale) -> per_row_loss``; see
:class:`Scorer`. Scorers must run the same sequence of collective calls on every rank when used
by the vocab-parallel losses, so those pass a ``chunk_size`` computed from a size every rank
shares (the largest shard), never from a rank's own ``V``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dtypes import compute_dtype

__all__ = ["Scorer", "fused_linear_loss", "default_chunk_size"]

# Rows per block. Every block's matmuls re-read (and BLAS re-packs) the whole (V, D) weight, a
# cost that grows with the number of blocks and not with their size, so a block has at least
# _MIN_CHUNK rows (measured on a 2-core CPU at D=1024: 256-row blocks cost ~4% over the
# unchunked matmuls, 512-row ~2-3%, 1024-row ~1%; with 2 threads the gap per block is larger).
# Above that, about _BLOCK_BYTES of float32 logits per block (at N=2048, V=32k: 3 blocks of 683
# rows, 87 MB, vs the 260 MB of full logits). The block is the engine's only (rows, V) buffer.
_BLOCK_BYTES = 96 * 2**20
_MIN_CHUNK = 512


class Scorer:
    """Per-chunk loss math plugged into :func:`fused_linear_loss`.

    ``score(logits, rows, grad_scale)``:

    * ``logits``: ``(n, V)`` block of ``hidden[rows] @ weight.T + bias`` in the compute dtype
      (float32, or float64 for float64 inputs). The engine owns it: the scorer may overwrite it,
      and must not keep a reference past the call (the next block reuses its memory).
    * ``rows``: the ``slice`` of rows of ``hidden`` this block covers (index per-row state such
      as targets or teacher hidden states with it).
    * ``grad_scale``: ``None`` when no gradient is wanted; otherwise an ``(n, 1)`` tensor
      ``c``, and the scorer must overwrite ``logits`` in place with ``c * d loss_r / d z_r``
      (the gradient with respect to the raw logits, before any transform the scorer applies).

    Returns the ``(n,)`` per-row losses in the compute dtype, already weighted so that the
    ``'sum'`` reduction is their plain sum. Scorers may also record per-row by-products (a
    log-sum-exp, say) in buffers of their own, indexed by ``rows``.

    Optional row-scaled gradient: when ``grad_scale`` is given a scorer may instead return
    ``(per_row_loss, row_scale)`` with ``row_scale`` of shape ``(n,)``, meaning the gradient
    is ``row_scale[:, None] * logits`` (for a softmax loss ``logits`` then holds the
    probabilities and ``row_scale`` the per-row coefficient). The engine applies the scale to the
    ``(n, D)`` operands of the backward matmuls instead of the ``(n, V)`` block, which saves
    one full pass over the block.
    """

    def score(self, logits: Tensor, rows: slice, grad_scale: Optional[Tensor]) -> Tensor:
        raise NotImplementedError


def default_chunk_size(num_rows: int, vocab: int, *, block_bytes: int = _BLOCK_BYTES,
                       min_rows: int = _MIN_CHUNK) -> int:
    """Rows per block: about ``block_bytes`` of float32 logits, at least ``min_rows`` rows,
    evened out so that the last block is not a sliver (same block count, smaller blocks)."""
    rows = max(min_rows, block_bytes // (4 * max(vocab, 1)), 1)
    if num_rows <= rows:
        return max(1, num_rows)
    blocks = -(-num_rows // rows)
    return -(-num_rows // blocks)


def _chunks(num_rows: int, chunk: int):
    for start in range(0, num_rows, chunk):
        yield slice(start, min(start + chunk, num_rows))


class _Blocks:
    """The logits block, allocated once per pass and reused by every chunk.

    A fresh ``(chunk, V)`` tensor per chunk would be a fresh ``mmap`` (page faults and kernel
    zeroing of the whole block each time); one buffer keeps the block's pages warm.
    """

    def __init__(self, chunk: int, weight: Tensor, dtype: torch.dtype) -> None:
        shape = (chunk, weight.shape[0])
        self.mm = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        self.z = self.mm if weight.dtype == dtype else torch.empty(shape, dtype=dtype, device=weight.device)

    def logits(self, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        n = h.shape[0]
        out = self.mm[:n]
        if bias is None:
            torch.mm(h, weight.T, out=out)
        else:
            torch.addmm(bias, h, weight.T, out=out)
        if self.z is self.mm:
            return out
        return self.z[:n].copy_(out)

    def scratch(self, n: int) -> Optional[Tensor]:
        """The low-precision matmul buffer, free once the block was upcast (else ``None``)."""
        return None if self.z is self.mm else self.mm[:n]


class _Grads:
    """Gradient buffers of the three inputs; low-precision ones accumulate in float32.

    ``grad_weight`` is written by the first block's matmul (no zero fill, no read of zeros) and
    accumulated by ``addmm_`` afterwards.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], needs, acc_dtype):
        self.need_h, self.need_w, self.need_b = needs
        self.h = torch.empty_like(hidden) if self.need_h else None
        self.w = torch.empty(weight.shape, dtype=acc_dtype, device=weight.device) if self.need_w else None
        self.w_started = False
        self.b = (
            torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device)
            if (self.need_b and bias is not None) else None
        )

    def add_block(self, dz: Tensor, h: Tensor, weight: Tensor, rows: slice,
                  row_scale: Optional[Tensor] = None, scratch: Optional[Tensor] = None) -> None:
        """Add one block's gradient ``dz`` (times ``row_scale[:, None]`` when given).

        ``scratch``: a free buffer of ``dz``'s shape in the weight's dtype, for the cast of a
        float32 ``dz`` to a low-precision weight dtype.
        """
        if self.b is not None:
            self.b += dz.sum(0) if row_scale is None else row_scale @ dz
        if dz.dtype == weight.dtype:
            dz_in = dz
        else:  # the low-precision cast is a full pass anyway: fold the row scale into it
            dz_in = scratch if scratch is not None else torch.empty(
                dz.shape, dtype=weight.dtype, device=dz.device)
            if row_scale is None:
                dz_in.copy_(dz)
            else:
                torch.mul(dz, row_scale.unsqueeze(1), out=dz_in)
            row_scale = None
        col = None if row_scale is None else row_scale.unsqueeze(1).to(weight.dtype)
        if self.h is not None:
            out = self.h[rows]
            torch.mm(dz_in, weight, out=out)
            if col is not None:
                out.mul_(col)
        if self.w is not None:
            hs = h if col is None else h * col
            if self.w.dtype != weight.dtype:
                part = (dz_in.T @ hs).to(self.w.dtype)
                if self.w_started:
                    self.w += part
                else:
                    self.w.copy_(part)
            elif self.w_started:
                self.w.addmm_(dz_in.T, hs)
            else:
                torch.mm(dz_in.T, hs, out=self.w)
            self.w_started = True

    def finish(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
        if self.w is not None and not self.w_started:
            self.w.zero_()
        gw = None if self.w is None else self.w.to(weight.dtype)
        gb = None if self.b is None else self.b.to(bias.dtype)
        return self.h, gw, gb


def _run(hidden, weight, bias, scorer, chunk, grad_scale_of, needs):
    """One pass over the blocks: per-row losses, and gradients when ``grad_scale_of`` is set."""
    dtype = compute_dtype(hidden.dtype)
    m = hidden.shape[0]
    losses = torch.empty(m, dtype=dtype, device=hidden.device)
    grads = _Grads(hidden, weight, bias, needs, dtype) if grad_scale_of is not None else None
    blocks = _Blocks(min(chunk, m), weight, dtype) if m else None
    for rows in _chunks(m, chunk):
        h = hidden[rows]
        z = blocks.logits(h, weight, bias)
        scale = None if grads is None else grad_scale_of(rows, z.shape[0], dtype)
        out = scorer.score(z, rows, scale)
        row_scale = None
        if isinstance(out, tuple):
            out, row_scale = out
        losses[rows] = out
        if grads is not None:
            grads.add_block(z, h, weight, rows, row_scale, blocks.scratch(z.shape[0]))
    return losses, grads


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, scorer, reduction, divisor, chunk, needs):
        ctx.reduction = reduction
        ctx.needs = needs
        want_grad = any(needs)
        if want_grad:
            # References only (no copies): 'none' recomputes from them in backward, and so does
            # a second backward through a retained graph after the stored gradients were handed out.
            ctx.save_for_backward(hidden, weight, bias)
            ctx.scorer, ctx.chunk = scorer, chunk
        if reduction == "none" or not want_grad:
            losses, _ = _run(hidden, weight, bias, scorer, chunk, None, needs)
            return losses if reduction == "none" else _reduce_rows(losses, reduction, divisor)

        ctx.scale = scale = 1.0 if reduction == "sum" else 1.0 / divisor
        losses, grads = _run(hidden, weight, bias, scorer, chunk,
                             _constant_scale(scale, hidden.device), needs)
        ctx.grads = grads.finish(hidden, weight, bias)
        return _reduce_rows(losses, reduction, divisor)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias = ctx.saved_tensors
        if ctx.reduction != "none":
            grads = getattr(ctx, "grads", None)
            if grads is None:  # second backward of a retained graph: recompute the same way
                _, acc = _run(hidden, weight, bias, ctx.scorer, ctx.chunk,
                              _constant_scale(ctx.scale, hidden.device), ctx.needs)
                grads = acc.finish(hidden, weight, bias)
            else:
                # Hand the buffers to autograd without another reference (so it need not copy).
                del ctx.grads
            gh, gw, gb = grads
            del grads
            if not (isinstance(grad_out, Tensor) and grad_out.numel() == 1 and bool(grad_out == 1)):
                gh = None if gh is None else gh.mul_(grad_out.to(gh.dtype))
                gw = None if gw is None else gw.mul_(grad_out.to(gw.dtype))
                gb = None if gb is None else gb.mul_(grad_out.to(gb.dtype))
            return gh, gw, gb, None, None, None, None, None
        go = grad_out.contiguous()

        def grad_scale_of(rows, n, dtype):
            return go[rows].to(dtype).unsqueeze(1)

        _, grads = _run(hidden, weight, bias, ctx.scorer, ctx.chunk, grad_scale_of, ctx.needs)
        gh, gw, gb = grads.finish(hidden, weight, bias)
        return gh, gw, gb, None, None, None, None, None


def _constant_scale(scale: float, device: torch.device):
    """``grad_scale_of`` for the scalar reductions: every row's gradient is scaled by ``scale``."""
    def grad_scale_of(rows, n, dtype):
        return torch.full((n, 1), scale, dtype=dtype, device=device)
    return grad_scale_of


def _reduce_rows(losses: Tensor, reduction: str, divisor) -> Tensor:
    total = losses.sum()
    return total if reduction == "sum" else total / divisor


def fused_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    scorer: Scorer,
    *,
    reduction: str = "mean",
    divisor=None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Reduce ``scorer``'s per-row losses over ``z = hidden @ weight.T + bias`` without holding ``z``.

    Args:
        hidden: ``(M, D)`` rows that count (callers drop ignored rows before calling).
        weight: ``(V, D)``; bias: ``(V,)`` or ``None``.
        scorer: the per-block loss math (:class:`Scorer`).
        reduction: ``'none'`` -> ``(M,)`` per-row losses; ``'sum'`` -> their sum;
            ``'mean'`` -> their sum divided by ``divisor`` (a Python number or 0-dim tensor,
            ``M`` when ``None``; ``0`` gives ``nan`` like torch's mean over nothing).
        chunk_size: rows per block (default: :func:`default_chunk_size`, at least 512 rows,
            about 96 MiB of float32 logits).

    Returns the loss in the compute dtype (float32 for 16-bit inputs). Differentiable with
    respect to ``hidden``, ``weight`` and ``bias`` (first order only).
    """
    m = hidden.shape[0]
    if divisor is None:
        divisor = m
    if isinstance(divisor, Tensor):
        divisor = float(divisor)  # one host value per call; keeps the engine free of graph state
    chunk = chunk_size or default_chunk_size(m, weight.shape[0])
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if divisor == 0 and reduction == "mean":
        divisor = float("nan")
    return _FusedLinearLoss.apply(hidden, weight, bias, scorer, reduction, divisor, chunk, needs)
