"""Warnings for inputs that are valid but almost certainly a mistake.

Each heuristic reads tensor values, so it runs only when value checks are enabled
(``leanloss.set_checks('full')``, eager mode). The cost is bounded and independent of the batch
size: a heuristic looks at the first rows (class dimension last) of its argument, at most
``_SAMPLE_ROWS`` rows and, when rows are short, at most ``_SAMPLE_ELEMENTS`` values in all,
never at the whole tensor. That budget is torch's CPU grain size, so the sample's reductions
run on one thread: no parallel region (on a busy machine, waking the worker threads can cost
far more than the sample itself). NaN and Inf are found from the loss instead of the
inputs: :func:`finite_or_warn` tests the (small) result, and only when it is not finite does it
scan the inputs to say which argument holds the NaN/Inf and where.

What "ordinary" inputs look like, and never trigger a warning: random normal logits,
``log_softmax`` outputs, one-hot or label-smoothed probability targets, sigmoid outputs given
to ``binary_cross_entropy``, ``-inf`` logits that mask classes (as long as the loss is finite).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _checks

_SAMPLE_ROWS = 16  # rows read by a row-wise heuristic, at most
_SAMPLE_ELEMENTS = 32768  # values read, at most, unless one row is longer (torch's GRAIN_SIZE)
_SAMPLE_COLS = 4096  # elements per row read by an elementwise heuristic
_MIN_ELEMENTS = 16  # an elementwise heuristic needs this many values to say anything
_POSITIVE_TOL = 1e-3  # log-probabilities may exceed 0 by rounding, not by more


def _sample_rows(t: Tensor, class_dim: int, max_cols: Optional[int] = None) -> Tensor:
    """The first rows of ``t`` with the class dimension last (at most ``_SAMPLE_ROWS``, and at
    most ``_SAMPLE_ELEMENTS`` values unless a single row is longer), as a 2-D tensor in float32
    (float64 stays float64). Only the sampled rows are ever copied."""
    x = t.detach()
    if x.dim() == 0:
        x = x.reshape(1)
    x = x.movedim(class_dim, -1)
    if max_cols is not None:
        x = x.narrow(-1, 0, min(x.shape[-1], max_cols))
    budget = max(1, min(_SAMPLE_ROWS, _SAMPLE_ELEMENTS // max(x.shape[-1], 1)))
    kept = 1
    for d in range(x.dim() - 2, -1, -1):  # narrow the leading dims, innermost first
        n = min(x.shape[d], max(1, -(-budget // kept)))
        x = x.narrow(d, 0, n)
        kept *= n
    x = x.reshape(-1, x.shape[-1])[:budget]
    return x if x.dtype == torch.float64 else x.float()


def _sum_tol(t: Tensor, num_classes: int) -> float:
    """How far from 1 a row of probabilities of ``t``'s dtype may sum after rounding."""
    eps = torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0
    return max(1e-3, 4.0 * math.sqrt(max(num_classes, 1)) * eps)


def _lse_tol(t: Tensor) -> float:
    """How far from 0 the logsumexp of a row of log-probabilities may be after rounding."""
    return 1e-2 if t.dtype in (torch.float32, torch.float64) else 0.1


def _range(x: Tensor):
    """``(min, max, finite)`` of ``x`` (NaN propagates into both). ``min``/``max`` rather than
    ``torch.isfinite`` (an order of magnitude slower on CPU) or ``torch.aminmax`` (whose
    multi-threaded CPU path is ~50x slower than ``max`` on a (16, 32000) sample)."""
    lo, hi = float(x.min()), float(x.max())
    return lo, hi, math.isfinite(lo) and math.isfinite(hi)


def _sums_to_one(rows: Tensor, tol: float) -> bool:
    """Every sampled row sums to 1 within ``tol``."""
    return bool(((rows.sum(-1) - 1).abs() <= tol).all())


def warn_if_probabilities(fn: str, input: Tensor, class_dim: int) -> None:
    """``cross_entropy`` expects logits; rows in [0, 1] summing to 1 are probabilities."""
    if not _checks.values_enabled() or input.numel() == 0 or input.shape[class_dim] < 2:
        return
    rows = _sample_rows(input, class_dim)
    lo, hi, finite = _range(rows)
    if finite and lo >= 0.0 and hi <= 1.0 and _sums_to_one(rows, _sum_tol(input, input.shape[class_dim])):
        _checks.warn(
            f"{fn}: argument 'input' looks like probabilities (every row lies in [0, 1] and "
            f"sums to 1), but {fn} expects unnormalized logits and applies log_softmax itself. "
            f"Pass the logits (before softmax), or use nll_loss(torch.log(probs), target)."
        )


def warn_if_not_log_probs(fn: str, input: Tensor, class_dim: int) -> None:
    """``nll_loss`` expects log-probabilities: rows with logsumexp 0, all values <= 0."""
    if not _checks.values_enabled() or input.numel() == 0 or input.shape[class_dim] < 2:
        return
    rows = _sample_rows(input, class_dim)
    lo, hi, _ = _range(rows)
    if hi != hi or hi == math.inf:
        return  # NaN or +inf: finite_or_warn reports it from the loss (-inf is log 0, fine)
    lse = torch.logsumexp(rows, dim=-1)
    off = (lse.abs() > _lse_tol(input)).nonzero()
    if hi <= _POSITIVE_TOL and off.numel() == 0:
        return
    row = int(off[0, 0]) if off.numel() else 0
    what = (
        "probabilities (rows in [0, 1] summing to 1)"
        if lo >= 0.0 and hi <= 1.0
        else "raw scores (logits)"
    )
    _checks.warn(
        f"{fn}: argument 'input' does not look like log-probabilities: expected rows with "
        f"values <= 0 and logsumexp 0, got max {hi:.4g} and logsumexp {float(lse[row]):.4g} in "
        f"row {row}; it looks like {what}. Apply log_softmax first, or call cross_entropy on "
        f"the logits."
    )


def warn_if_not_distribution(fn: str, name: str, target: Tensor, class_dim: int) -> None:
    """Probability targets should be non-negative and sum to 1 along the class dimension."""
    if not _checks.values_enabled() or target.numel() == 0:
        return
    rows = _sample_rows(target, class_dim)
    lo, _, finite = _range(rows)
    if finite and (lo < 0.0 or not _sums_to_one(rows, _sum_tol(target, target.shape[class_dim]))):
        sums = rows.sum(-1)
        row = int((sums - 1).abs().argmax())
        _checks.warn(
            f"{fn}: argument '{name}' is read as class probabilities (it has the shape of "
            f"'input'), so its rows should be non-negative and sum to 1; got min "
            f"{lo:.4g} and a row (row {row}) summing to {float(sums[row]):.4g}. "
            f"Apply softmax to target logits, or pass class indices."
        )


def warn_kl_inputs(fn: str, input: Tensor, target: Tensor, log_target: bool) -> None:
    """``kl_div(input, target)``: input must be log-probabilities; target probabilities unless
    ``log_target`` (then log-probabilities)."""
    if not _checks.values_enabled():
        return
    if input.numel():
        _, hi, _ = _range(_sample_rows(input, -1, _SAMPLE_COLS))
        if math.isfinite(hi) and hi > _POSITIVE_TOL:
            _checks.warn(
                f"{fn}: argument 'input' is not in log space: expected log-probabilities "
                f"(values <= 0), got a value of {hi:.4g}. {fn}(input, target) "
                f"takes input = log_softmax(logits) (and target as probabilities)."
            )
    if target.numel():
        lo, hi, _ = _range(_sample_rows(target, -1, _SAMPLE_COLS))
        if not log_target and lo < 0.0 and math.isfinite(lo):
            _checks.warn(
                f"{fn}: argument 'target' has negative values (min {lo:.4g}): it "
                f"looks like log-probabilities, but log_target=False reads it as probabilities. "
                f"Pass log_target=True, or target.exp()."
            )
        elif log_target and hi > _POSITIVE_TOL and math.isfinite(hi):
            _checks.warn(
                f"{fn}: argument 'target' has positive values (max {hi:.4g}): it "
                f"looks like probabilities, but log_target=True reads it as log-probabilities. "
                f"Pass log_target=False, or target.log()."
            )


def warn_if_topk_probabilities(fn: str, name: str, logprobs: Tensor, ids: Tensor) -> None:
    """Top-k log-probabilities must be <= 0; non-padding values in [0, 1], some of them
    positive, are probabilities (the softmax of probabilities is not the teacher)."""
    if not _checks.values_enabled() or logprobs.numel() == 0:
        return
    sample = _sample_rows(logprobs, -1, _SAMPLE_COLS)
    kept = _sample_rows(ids, -1, _SAMPLE_COLS) >= 0
    if not bool(kept.any()):
        return
    values = sample[kept]
    lo, hi, finite = _range(values)
    if finite and lo >= 0.0 and _POSITIVE_TOL < hi <= 1.0:
        _checks.warn(
            f"{fn}: argument '{name}' looks like probabilities (its entries lie in [0, 1], max "
            f"{hi:.4g}), but {fn} expects the teacher's log-probabilities (values <= 0). Pass "
            f"{name}.log() (or the teacher's log_softmax values)."
        )


def warn_if_sigmoid_outputs(fn: str, input: Tensor) -> None:
    """BCE-with-logits given values that all lie in [0, 1] (looks like sigmoid outputs)."""
    if not _checks.values_enabled() or input.numel() < _MIN_ELEMENTS:
        return
    sample = _sample_rows(input, -1, _SAMPLE_COLS)
    if sample.numel() < _MIN_ELEMENTS:
        return
    lo, hi, _ = _range(sample)
    if 0.0 <= lo < hi <= 1.0:  # False for NaN
        _checks.warn(
            f"{fn}: every value of argument 'input' lies in [0, 1]; it looks like sigmoid "
            f"outputs, but {fn} expects logits and applies the sigmoid itself. Pass the logits, "
            f"or use binary_cross_entropy on probabilities."
        )


def finite_or_warn(fn: str, loss: Tensor, **inputs: Optional[Tensor]) -> Tensor:
    """Return ``loss``; if it holds NaN/Inf, warn about each input that holds NaN/Inf.

    The inputs are read only when the loss is not finite, so the normal path costs one pass
    over the (reduced) loss. A non-finite loss from finite inputs (every target ignored with
    ``reduction='mean'``, as in torch) gives no warning.
    """
    if not _checks.values_enabled() or loss.numel() == 0:
        return loss
    if math.isfinite(float(loss.detach().sum())) or bool(torch.isfinite(loss.detach()).all()):
        return loss  # (the second test only runs when the sum overflows or is NaN)
    for name, t in inputs.items():
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            position = _checks.first_position(bad)
            _checks.warn(
                f"{fn}: argument '{name}' contains NaN or Inf (expected finite values, got "
                f"{t[position].item()} at position {position}), so the loss is not finite. "
                f"Check the model's outputs (learning rate, fp16 overflow) before the loss."
            )
    return loss
