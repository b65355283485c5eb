r"""Cross entropy of class-index targets on a ``(N, C)`` logits matrix, one row block at a time.

:func:`leanloss.cross_entropy` on eager CPU logits is :class:`DenseCrossEntropyScorer` run by the
engine over the logits (:func:`leanloss._fused.engine.fused_logits_loss`: blocks, gradient
buffer, autograd scheme) in cache-sized blocks of :data:`BLOCK_BYTES` (a 16-bit input is never
upcast as a whole), with the row loss and gradient coefficients of :mod:`leanloss._fused.ce_rows`.
Its own is the precision with which it equals torch's float32 result:

* ``p = softmax(x)`` by torch's kernel (loaded as the block) and ``nll = -log p_t``, which
  carries about one ulp of ``p_t``. Where that is not enough -- ``p_t > 1/2`` (a loss below
  ``log 2``, whose relative precision ``-log p_t`` would lose) or ``p_t`` near float32's
  underflow (a loss above ~69) -- the row's ``nll`` is taken from torch's ``log_softmax`` of
  that row of the input, ``(x_t - m) - log s``, which is torch's own value for float32 input;
* with smoothing (16-bit inputs only: see :func:`block_path_applies`), ``S = sum_c w_c x_c``
  from the float32 block before its softmax and ``lse = x_t + nll``;
* the target entry of the gradient is written from the float32 values, rounded once; ignored
  rows stay in the blocks with weight and upstream gradient ``0`` (so their gradient is
  ``0 * p``, as torch's).

A double backward (``create_graph=True``) differentiates the reference formula of
:mod:`leanloss.losses.cross_entropy` instead.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .._dtypes import compute_dtype
from .._fused.ce_rows import ce_grad_coefficients, ce_row_loss
from .._fused.engine import ScoreResult, default_chunk_size, fused_logits_loss, set_at_cols

__all__ = ["block_path_applies", "block_cross_entropy", "DenseCrossEntropyScorer"]

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


class DenseCrossEntropyScorer:
    """The engine's scorer of :func:`leanloss.cross_entropy` on logits ``x`` ``(N, C)`` (the
    rules above; not :class:`~leanloss.linear.cross_entropy.CrossEntropyScorer`, whose compiled
    ``lse - z_t`` is ulps from torch's value). Every row is walked, ignored ones with weight 0."""

    outputs = 1
    low_precision_blocks = False

    def __init__(self, x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                 smoothing: float) -> None:
        self.x, self.dtype = x, compute_dtype(x.dtype)
        self.valid = target != ignore_index
        self.target = torch.where(self.valid, target, torch.zeros((), dtype=target.dtype)).long().unsqueeze(1)
        self.w = None if weight is None else weight.to(self.dtype)
        self.w_t = None if self.w is None else torch.where(self.valid, self.w[self.target.squeeze(1)],
                                                           torch.zeros((), dtype=self.dtype))
        # below this a float32/float64 target probability loses digits in log(p_t)
        self.tiny = torch.finfo(self.dtype).tiny * 1e8
        # float32/float64 input without smoothing: the block is loaded as its softmax (one pass)
        self.softmax_on_load = x.dtype == self.dtype and smoothing == 0.0
        num_classes = x.shape[1]
        w_total = float(num_classes) if self.w is None else self.w.sum()
        self.stats = dict(smoothing=float(smoothing), w_total=w_total, num_classes=num_classes, z_loss=0.0)

    def divisor(self) -> Tensor:
        """``'mean'``'s divisor: the summed weights of the kept rows (their count without weights)."""
        return self.valid.sum().to(self.dtype) if self.w_t is None else self.w_t.sum()

    def load(self, block: Tensor, x: Tensor) -> Tensor:
        """The engine's block of the input rows ``x``: their softmax, or a compute-dtype copy."""
        return _softmax_out(x, 1, False, out=block) if self.softmax_on_load else block.copy_(x)

    def score(self, z: Tensor, rows: slice, saved: Optional[Tensor],
              upstream: Optional[Tensor]) -> ScoreResult:
        t, valid, smoothing = self.target[rows], self.valid[rows], self.stats["smoothing"]
        w_t = None if self.w_t is None else self.w_t[rows]
        lse = w_sum = x_t = None
        if smoothing > 0.0:  # S and x_t from the float32 values; torch.mv is not lowered by autocast
            w_sum = z.sum(1) if self.w is None else torch.mv(z, self.w)
            x_t = z.gather(1, t).squeeze(1)
        if not self.softmax_on_load:
            _softmax_out(z, 1, False, out=z)
        p_t = z.gather(1, t).squeeze(1)
        nll = p_t.log().neg_()
        redo = (p_t > 0.5) | (p_t < self.tiny)
        if bool(redo.any()):  # -log(p_t) would lose digits: torch's log_softmax of those rows
            idx = redo.nonzero().squeeze(1)
            log_p = torch.log_softmax(self.x[rows].index_select(0, idx).to(self.dtype), 1)
            nll[idx] = log_p.gather(1, t[idx]).squeeze(1).neg_()
        if x_t is not None:
            lse = x_t + nll
        loss = ce_row_loss(nll, lse, w_t, w_sum, **self.stats)
        loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype))
        if upstream is None:
            return ScoreResult(loss)
        a, b, s = ce_grad_coefficients(torch.where(valid, upstream.reshape(-1), 0.0), lse, w_t,
                                       **self.stats)
        g_t = a * p_t - b  # the target entry from the float32 values, rounded once: a p_t - b - s w_t
        z.mul_(a.unsqueeze(1))
        if smoothing > 0.0:
            g_t = g_t - (s if self.w is None else s * self.w[t.squeeze(1)])
            z.sub_(s.unsqueeze(1) if self.w is None else s.unsqueeze(1) * self.w)
        set_at_cols(z, t.squeeze(1), g_t)
        return ScoreResult(loss)


def block_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                        reduction: str, label_smoothing: float,
                        reference: Callable[[Tensor], Tensor]) -> Tensor:
    """The loss of :func:`leanloss.cross_entropy` for (C)/(N, C) ``input`` with class indices, in
    the compute dtype (float32 for 16-bit input); ``reference(input)`` is the differentiable
    formula used for double backward. ``'none'`` has ``target``'s shape (``()`` for a (C)
    input)."""
    x = input.unsqueeze(0) if input.dim() == 1 else input
    scorer = DenseCrossEntropyScorer(x.detach(), target.reshape(x.shape[0]), weight, ignore_index,
                                     label_smoothing)
    chunk = default_chunk_size(x.shape[0], x.shape[1], block_bytes=BLOCK_BYTES, min_rows=1,
                               element_size=scorer.dtype.itemsize)
    loss = fused_logits_loss(x, scorer, reduction=reduction, chunk_size=chunk, reference=reference,
                             divisor=scorer.divisor() if reduction == "mean" else None)
    if reduction != "none":
        return loss
    return loss.reshape(()) if input.dim() == 1 else loss.reshape(target.shape)
