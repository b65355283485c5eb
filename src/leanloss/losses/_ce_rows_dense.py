r"""Cross entropy of class-index targets on a ``(N, C)`` logits matrix, one row block at a time.

The per-row statistics and the gradient of :func:`leanloss.cross_entropy` (the formula and its
gradient coefficients are those of :mod:`leanloss._fused.ce_rows`) computed from row blocks of
at most :data:`BLOCK_BYTES` that stay in the last-level cache: a float32/float64 block's softmax
is written straight into a scratch buffer, a bfloat16/float16 block is copied into a float32 one
first, so a 16-bit input is never upcast as a whole, and the gradient is written in the input's
dtype in one pass. Per row:

* ``p = softmax(x)`` in the scratch block and ``nll = -log p_t``, which carries about one ulp
  of ``p_t``. Where that is not enough -- ``p_t > 1/2`` (a loss below ``log 2``, whose relative
  precision ``-log p_t`` would lose) or ``p_t`` near float32's underflow (a loss above ~69) --
  the row's ``nll`` is taken from torch's ``log_softmax`` of that row, ``(x_t - m) - log s``,
  which is torch's own value for float32 input;
* with smoothing (16-bit inputs only: see :func:`block_path_applies`), ``S = sum_c w_c x_c``
  from the float32 block before its softmax and ``lse = x_t + nll``;
* gradient ``a p - b [c = t] - s w`` (coefficients times the upstream gradient); the target
  entry is written separately from the float32 values, rounded once.

With ``reduction`` ``'mean'``/``'sum'`` and an input that needs a gradient, the gradient is
computed in the same sweep as the loss (the softmax block is already in cache) and handed to
autograd in backward (scaled there when the upstream gradient is not 1). ``'none'`` recomputes
in backward with the per-row upstream gradient. A double backward (``create_graph=True``)
differentiates the reference formula of :mod:`leanloss.losses.cross_entropy` instead.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .._dtypes import compute_dtype
from .._fused.ce_rows import ce_grad_coefficients, ce_row_loss

__all__ = ["block_path_applies", "block_cross_entropy"]

#: bytes of one scratch block (float32 rows): fits a last-level cache, and few enough blocks that
#: each op's thread start/join is negligible even on a loaded machine
BLOCK_BYTES = 16 * 2**20
_softmax_out = torch.ops.aten._softmax.out


def block_path_applies(input: Tensor, weight: Optional[Tensor], label_smoothing: float) -> bool:
    """The blocked kernel serves eager CPU calls on (C) / (N, C) logits (no gradient to ``weight``);
    everything else (more dims, CUDA, ``torch.compile`` tracing) takes the reference formula.

    With label smoothing, float32/float64 inputs take the reference formula too: torch's
    gradient there is ``G - p sum_c G_c`` with the sum of the ``C`` smoothing terms rounded in
    the input dtype, and leanloss equals torch's value to that rounding; the closed-form
    coefficient here is the exact sum (about ``C`` ulps apart at a 128k vocabulary). For 16-bit
    inputs the float32 accumulation is the point, and the block path is far more accurate than
    torch's own 16-bit result."""
    if label_smoothing > 0.0 and input.dtype in (torch.float32, torch.float64):
        return False
    return (input.dim() in (1, 2) and input.device.type == "cpu" and input.numel() > 0
            and not (weight is not None and weight.requires_grad)
            and not torch.compiler.is_compiling())


class _Rows:
    """Per-row constants of one call: targets, validity, class weights, smoothing."""

    def __init__(self, x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                 smoothing: float) -> None:
        self.dtype = compute_dtype(x.dtype)
        self.num_classes = x.shape[1]
        self.valid = target != ignore_index
        self.target = torch.where(self.valid, target, torch.zeros((), dtype=target.dtype)).long().unsqueeze(1)
        self.w = None if weight is None else weight.to(self.dtype)
        self.w_t = None if self.w is None else torch.where(self.valid, self.w[self.target.squeeze(1)],
                                                           torch.zeros((), dtype=self.dtype))
        self.smoothing = float(smoothing)
        # below this a float32/float64 target probability loses digits in log(p_t)
        self.tiny = torch.finfo(self.dtype).tiny * 1e8
        w_total = float(self.num_classes) if self.w is None else self.w.sum()
        self.stats = dict(smoothing=self.smoothing, w_total=w_total, num_classes=self.num_classes, z_loss=0.0)

    def rows_per_block(self) -> int:
        size = torch.finfo(self.dtype).bits // 8
        return max(1, BLOCK_BYTES // (size * self.num_classes))

    def divisor(self) -> Tensor:
        """``'mean'``'s divisor: the summed weights of the kept rows (their count without weights)."""
        return self.valid.sum().to(self.dtype) if self.w_t is None else self.w_t.sum()


def _sweep(x: Tensor, rows: _Rows, g: Optional[Tensor], want_loss: bool):
    """One pass over the row blocks: per-row losses (``want_loss``) and, when ``g`` (the per-row
    upstream gradient, 0 at ignored rows) is given, the gradient in ``x``'s dtype."""
    n, c = x.shape
    step = rows.rows_per_block()
    z = torch.empty(min(step, n), c, dtype=rows.dtype)
    losses = torch.empty(n, dtype=rows.dtype) if want_loss else None
    grad = torch.empty((n, c), dtype=x.dtype) if g is not None else None
    smoothing = rows.smoothing
    for start in range(0, n, step):
        end = min(start + step, n)
        zb, xb, t = z[: end - start], x[start:end], rows.target[start:end]
        w_t = None if rows.w_t is None else rows.w_t[start:end]
        lse = w_sum = None
        src = xb if x.dtype == rows.dtype else zb.copy_(xb)  # softmax from float32 values
        if smoothing > 0.0:
            # S = sum_c w_c x_c; torch.mv, unlike @, is not lowered by CPU autocast
            w_sum = src.sum(1) if rows.w is None else torch.mv(src, rows.w)
        _softmax_out(src, 1, False, out=zb)
        p_t = zb.gather(1, t).squeeze(1)
        nll = p_t.log().neg_()
        redo = (p_t > 0.5) | (p_t < rows.tiny)
        if bool(redo.any()):  # -log(p_t) would lose digits: torch's log_softmax of those rows
            idx = redo.nonzero().squeeze(1)
            log_p = torch.log_softmax(xb.index_select(0, idx).to(rows.dtype), 1)
            nll[idx] = log_p.gather(1, t[idx]).squeeze(1).neg_()
        if smoothing > 0.0:
            lse = xb.gather(1, t).squeeze(1).to(rows.dtype) + nll
        if want_loss:
            loss = ce_row_loss(nll, lse, w_t, w_sum, **rows.stats)
            losses[start:end] = torch.where(rows.valid[start:end], loss, torch.zeros((), dtype=loss.dtype))
        if g is None:
            continue
        a, b, s = ce_grad_coefficients(g[start:end], lse, w_t, **rows.stats)
        # the target entry from the float32 values, rounded once: a p_t - b - s w_t
        g_t = a * p_t - b
        if smoothing > 0.0:
            g_t = g_t - (s if rows.w is None else s * rows.w[t.squeeze(1)])
        out = grad[start:end]
        if smoothing > 0.0 and rows.w is not None:
            zb.mul_(a.unsqueeze(1)).sub_(s.unsqueeze(1) * rows.w)
        elif smoothing > 0.0:
            zb.mul_(a.unsqueeze(1)).sub_(s.unsqueeze(1))
        elif out.dtype == zb.dtype:
            torch.mul(zb, a.unsqueeze(1), out=out)
        else:
            zb.mul_(a.unsqueeze(1))
        if out.dtype != zb.dtype or smoothing > 0.0:
            out.copy_(zb)
        out.scatter_(1, t, g_t.unsqueeze(1).to(out.dtype))
    return losses, grad


class _BlockCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rows: _Rows, reduction: str, want_grad: bool, reference: Callable):
        ctx.rows, ctx.reduction, ctx.reference = rows, reduction, reference
        ctx.save_for_backward(x)
        if reduction == "none":
            losses, _ = _sweep(x, rows, None, True)
            return losses
        divisor = rows.divisor() if reduction == "mean" else None
        g = None
        if want_grad:  # the gradient of the reduced loss, computed while each block is in cache
            scale = 1.0 if divisor is None else 1.0 / divisor
            g = torch.where(rows.valid, scale, 0.0).to(rows.dtype)
        ctx.g = g
        losses, grad = _sweep(x, rows, g, True)
        ctx.grad = grad
        total = losses.sum()
        if divisor is None:
            return total
        # a zero divisor (every kept target has weight 0, or none is kept) gives nan, as torch's
        # 0/0 of the nll term does, whatever the smoothing term's sum
        return torch.where(divisor != 0, total / divisor, torch.full((), float("nan"), dtype=total.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the reference formula
            with torch.enable_grad():
                loss = ctx.reference(x)
                (gx,) = torch.autograd.grad(loss, x, grad_out, create_graph=True)
            return gx, None, None, None, None
        rows = ctx.rows
        if ctx.reduction == "none":
            g = torch.where(rows.valid, grad_out.to(rows.dtype), 0.0)
            return _sweep(x, rows, g, False)[1], None, None, None, None
        grad = getattr(ctx, "grad", None)
        if grad is None:  # a second backward through a retained graph: recompute
            if ctx.g is None:
                divisor = rows.divisor() if ctx.reduction == "mean" else None
                scale = 1.0 if divisor is None else 1.0 / divisor
                ctx.g = torch.where(rows.valid, scale, 0.0).to(rows.dtype)
            grad = _sweep(x, rows, ctx.g, False)[1]
        else:
            del ctx.grad  # hand the buffer to autograd without another reference
        if not bool(grad_out == 1):
            grad.mul_(grad_out.to(grad.dtype))
        return grad, None, None, None, None


def block_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                        reduction: str, label_smoothing: float,
                        reference: Callable[[Tensor], Tensor]) -> Tensor:
    """The loss of :func:`leanloss.cross_entropy` for (C)/(N, C) ``input`` with class indices, in
    the compute dtype (float32 for 16-bit input); ``reference(input)`` is the differentiable
    formula used for double backward. ``'none'`` has ``target``'s shape (``()`` for a (C)
    input)."""
    x = input.unsqueeze(0) if input.dim() == 1 else input
    t = target.reshape(x.shape[0])
    rows = _Rows(x.detach(), t, weight, ignore_index, label_smoothing)
    want_grad = torch.is_grad_enabled() and input.requires_grad
    loss = _BlockCrossEntropy.apply(x, rows, reduction, want_grad, reference)
    if reduction != "none":
        return loss
    return loss.reshape(()) if input.dim() == 1 else loss.reshape(target.shape)
