"""What leanloss's safety checks cost: ``cross_entropy`` forward + backward per check mode.

Case: logits ``(N, C)`` (requiring grad) and class-index targets, none ignored, ``reduction=
'mean'``. Impls:

* ``leanloss``: ``leanloss.cross_entropy`` with ``set_checks('full')`` (the default: shape,
  dtype and value checks, the confusion heuristics);
* ``leanloss_shapes``: the same with ``set_checks('shapes')`` (metadata checks only, no sync);
* ``leanloss_off``: the same with ``set_checks('off')``;
* ``torch_eager``: ``torch.nn.functional.cross_entropy``, for scale.

Two runs in different processes differ by more than the few percent being measured, so every
leanloss case times its own mode and ``'off'`` in the same process, alternating
(off, mode, mode, off, ...), and reports ``overhead_pct``: the median over those pairs of
``100 * (t_mode / t_off - 1)``, next to ``off_time_s`` (median time with checks off) and
``overhead_min_pct`` (fastest run against fastest run). ``leanloss_off`` pairs 'off' with
itself: its ``overhead_pct`` is the noise floor of the measurement. Because that floor is
several percent on a shared machine, the ``leanloss`` case also times the value checks alone,
as ``cross_entropy`` calls them on these inputs (``value_checks_s``, fastest of 50 runs), and
reports their share of the forward + backward time with checks off (``value_checks_pct``).
The goal: ``overhead_pct`` < 5 for ``leanloss`` at N=2048, C=32000, float32.
``extra_mb`` is one warmed-up step's peak RSS over the inputs and their gradient (see ``harness``).
Run one case: ``python -m leanloss.cli.bench.checks_cost --case '{"impl": "leanloss", "N": 2048, ...}'``.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

import leanloss
from leanloss.cli.bench import harness

SUITE = "checks_cost"
MODES = {"leanloss": "full", "leanloss_shapes": "shapes", "leanloss_off": "off"}
IMPLS = ("torch_eager", "leanloss_off", "leanloss_shapes", "leanloss")


def cases(*, quick: bool, vocab=None, tokens=None, hidden=None, dtype=None, only=None) -> List[Dict[str, Any]]:
    """N=2048, C=32000, float32. Full: every mode, 9 timed pairs. Quick: ``leanloss`` (checks
    'full') alone, 3 pairs. ``hidden`` does not apply (no projection): ``D`` is 0."""
    impls = [i for i in IMPLS if (only is None or i == only) and (only or not quick or i == "leanloss")]
    return [
        dict(suite=SUITE, impl=impl, N=int(tokens or 2048), D=0, V=int(vocab or 32000), dtype=dtype or "float32",
             repeats=3 if quick else 9)
        for impl in impls
    ]


def _inputs(case: dict):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(case["N"], case["V"], generator=g) * 2).to(getattr(torch, case["dtype"]))
    target = torch.randint(0, case["V"], (case["N"],), generator=g)
    return x.requires_grad_(), target


def _step(loss_fn, x, target):
    def step():
        x.grad = None  # the previous step's gradient; this step's stays set (see harness.step_memory)
        loss_fn(x, target).backward()

    return step


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _paired(mode: str, step, repeats: int) -> dict:
    """Time ``step`` under ``mode`` and under ``'off'``, alternating so drift cancels."""
    t_mode: List[float] = []
    t_off: List[float] = []
    for i in range(repeats):
        measured_first = i % 2 == 1
        for is_measured in (measured_first, not measured_first):
            with leanloss.checks(mode if is_measured else "off"):
                (t_mode if is_measured else t_off).append(_timed(step))
    ratios = [100.0 * (a / b - 1.0) for a, b in zip(t_mode, t_off)]
    return {
        "time_s": statistics.median(t_mode),
        "times": t_mode,
        "off_time_s": statistics.median(t_off),
        "overhead_pct": statistics.median(ratios),
        # the fastest runs are the least disturbed by other processes: a second estimate
        "overhead_min_pct": 100.0 * (min(t_mode) / min(t_off) - 1.0),
        "check_mode": mode,
    }


def _value_checks_alone(x, target, repeats: int = 50) -> float:
    """The value checks ``cross_entropy`` runs in 'full' mode on class-index targets: the
    target range, the probabilities heuristic, the finiteness of the loss (fastest run, s)."""
    from leanloss import _checks, _heuristics

    loss = F.cross_entropy(x.detach(), target)

    def checks():
        _checks.check_index_target_range("cross_entropy", target, x.shape[1], -100)
        _heuristics.warn_if_probabilities("cross_entropy", x, 1)
        _heuristics.finite_or_warn("cross_entropy", loss, input=x)

    with leanloss.checks("full"):
        return min(_timed(checks) for _ in range(repeats))


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    x, target = _inputs(case)
    impl = case["impl"]
    if impl == "torch_eager":
        return harness.measure(case, _step(F.cross_entropy, x, target), leaves=(x,))
    if impl not in MODES:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    step = _step(leanloss.cross_entropy, x, target)
    with leanloss.checks(MODES[impl]):
        result = dict(case)
        result.update(harness.step_memory(step, (x,)))  # includes the warm-up in the measured mode
    with leanloss.checks("off"):
        step()
    result.update(_paired(MODES[impl], step, case["repeats"]))
    if MODES[impl] == "full":
        result["value_checks_s"] = _value_checks_alone(x, target)
        result["value_checks_pct"] = 100.0 * result["value_checks_s"] / result["off_time_s"]
    return result


if __name__ == "__main__":
    harness.main(run_case)
