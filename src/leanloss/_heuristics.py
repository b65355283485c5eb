"""Warnings for inputs that are valid but almost certainly a mistake.

Each heuristic reads tensor values, so it runs only when value checks are enabled
(``leanloss.set_checks('full')``, eager mode). Cost is bounded: one ``aminmax`` pass over the
input (which also catches NaN/Inf), and row-wise tests on at most ``_SAMPLE_ROWS`` rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks

_SAMPLE_ROWS = 64
_SUM_TOL = 1e-3


def _rows(t: Tensor, class_dim: int) -> Tensor:
    """A bounded sample of rows, classes last, in float32 or wider."""
    x = t.movedim(class_dim, -1).reshape(-1, t.shape[class_dim])
    x = x[:_SAMPLE_ROWS]
    return x if x.dtype == torch.float64 else x.float()


def _range(t: Tensor):
    lo, hi = torch.aminmax(t.detach())
    return float(lo), float(hi)


def _nonfinite(fn: str, name: str, lo: float, hi: float) -> bool:
    if lo != lo or hi != hi or lo in (float("inf"), float("-inf")) or hi in (float("inf"), float("-inf")):
        _checks.warn(
            f"{fn}: argument '{name}' contains NaN or Inf values; the loss will not be finite. "
            f"Check the model's outputs (learning rate, fp16 overflow) before the loss."
        )
        return True
    return False


def warn_if_probabilities(fn: str, input: Tensor, class_dim: int) -> None:
    """``cross_entropy`` expects logits; rows in [0, 1] summing to 1 are probabilities."""
    if not _checks.values_enabled() or input.numel() == 0:
        return
    lo, hi = _range(input)
    if _nonfinite(fn, "input", lo, hi) or input.shape[class_dim] < 2:
        return
    if lo >= 0.0 and hi <= 1.0:
        sums = _rows(input, class_dim).sum(-1)
        if bool(((sums - 1).abs() <= _SUM_TOL).all()):
            _checks.warn(
                f"{fn}: argument 'input' looks like probabilities (every row lies in [0, 1] and "
                f"sums to 1), but {fn} expects unnormalized logits and applies log_softmax itself. "
                f"Pass the logits (before softmax), or use nll_loss(torch.log(probs), target)."
            )


def warn_if_not_log_probs(fn: str, input: Tensor, class_dim: int) -> None:
    """``nll_loss`` expects log-probabilities: rows with logsumexp 0, all values <= 0."""
    if not _checks.values_enabled() or input.numel() == 0:
        return
    lo, hi = _range(input)
    if _nonfinite(fn, "input", lo, hi) or input.shape[class_dim] < 2:
        return
    rows = _rows(input, class_dim)
    lse = torch.logsumexp(rows, dim=-1)
    if hi > _SUM_TOL or not bool((lse.abs() <= 1e-2).all()):
        what = "probabilities (rows in [0, 1] summing to 1)" if (lo >= 0 and hi <= 1) else "raw scores (logits)"
        _checks.warn(
            f"{fn}: argument 'input' does not look like log-probabilities (logsumexp of a row "
            f"is {float(lse[0]):.4g}, expected 0); it looks like {what}. Apply log_softmax first, "
            f"or call cross_entropy on the logits."
        )


def warn_if_not_distribution(fn: str, name: str, target: Tensor, class_dim: int) -> None:
    """Probability targets should be non-negative and sum to 1 along the class dimension."""
    if not _checks.values_enabled() or target.numel() == 0:
        return
    lo, hi = _range(target)
    if _nonfinite(fn, name, lo, hi):
        return
    sums = _rows(target, class_dim).sum(-1)
    if lo < 0.0 or not bool(((sums - 1).abs() <= _SUM_TOL).all()):
        _checks.warn(
            f"{fn}: argument '{name}' is read as class probabilities (it has the shape of 'input') "
            f"but its rows do not form distributions (min {lo:.4g}, first row sums to "
            f"{float(sums[0]):.4g}, expected non-negative rows summing to 1). Apply softmax to "
            f"target logits, or pass class indices."
        )


def warn_kl_inputs(fn: str, input: Tensor, target: Tensor, log_target: bool) -> None:
    """``kl_div(input, target)``: input must be log-probabilities; target probabilities unless
    ``log_target``."""
    if not _checks.values_enabled():
        return
    if input.numel():
        lo, hi = _range(input)
        if not _nonfinite(fn, "input", lo, hi) and hi > _SUM_TOL:
            _checks.warn(
                f"{fn}: argument 'input' has positive values (max {hi:.4g}), so it is not in log "
                f"space; kl_div expects log-probabilities as input. Pass log_softmax(logits)."
            )
    if target.numel():
        lo, hi = _range(target)
        if not _nonfinite(fn, "target", lo, hi) and not log_target and lo < 0.0:
            _checks.warn(
                f"{fn}: argument 'target' has negative values (min {lo:.4g}): it looks like "
                f"log-probabilities, but log_target=False reads it as probabilities. Pass "
                f"log_target=True, or target.exp()."
            )


def warn_if_sigmoid_outputs(fn: str, input: Tensor) -> None:
    """BCE-with-logits given values that all lie in [0, 1] (looks like sigmoid outputs)."""
    if not _checks.values_enabled() or input.numel() == 0:
        return
    lo, hi = _range(input)
    if _nonfinite(fn, "input", lo, hi):
        return
    if input.numel() >= 8 and lo >= 0.0 and hi <= 1.0:
        _checks.warn(
            f"{fn}: every value of argument 'input' lies in [0, 1]; it looks like sigmoid "
            f"outputs, but {fn} expects logits and applies the sigmoid itself. Pass the logits, "
            f"or use binary_cross_entropy on probabilities."
        )


def warn_if_nonfinite(fn: str, name: str, t: Tensor) -> None:
    if not _checks.values_enabled() or t.numel() == 0 or not t.is_floating_point():
        return
    lo, hi = _range(t)
    _nonfinite(fn, name, lo, hi)
