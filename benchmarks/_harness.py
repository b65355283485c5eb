"""What every benchmark suite shares: memory probes, a timer, the result record, and the
child-process protocol (``python -m benchmarks.<suite> --case JSON`` prints one JSON object
as the last line of stdout).

Memory is measured per process: each case runs in a fresh child, so the peak RSS of the child
is the peak of that case alone. ``extra_mb`` is what the case needed beyond its inputs and
their gradients: ``(peak_rss - base_rss - grad_bytes) / 2**20``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

__all__ = [
    "rss_bytes",
    "peak_rss_bytes",
    "time_fwd_bwd",
    "case_result",
    "run_in_subprocess",
    "main",
    "REPO_ROOT",
]

# The directory that holds the ``benchmarks`` package: children run with it as cwd.
REPO_ROOT = Path(__file__).resolve().parent.parent
_MB = 2**20


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (``/proc/self/statm``; falls back to
    the peak from ``getrusage`` where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_fwd_bwd(step: Callable[[], None], repeats: int, warmup: int = 1) -> dict:
    """Time ``step`` (one forward + backward; it clears its own ``.grad``s) ``repeats`` times
    after ``warmup`` untimed calls. Returns ``{"time_s": median, "times": [...]}`` in seconds."""
    if repeats < 1:
        raise ValueError(f"time_fwd_bwd: argument 'repeats' must be >= 1, got {repeats}")
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "times": times}


def paired_ratio(step: Callable[[], None], reference: Callable[[], None], rounds: int) -> dict:
    """Time ``step`` and ``reference`` alternately, ``rounds`` times each, in this process.

    Absolute times drift between processes (and minutes apart) on a shared machine; the ratio
    of two steps interleaved in one process does not. Returns ``x_roof_paired`` (the median of
    the per-round ratios step / reference) and ``roofline_paired_s`` (the reference's median).
    Run it after :func:`case_result` so the reference's allocations stay out of the peak RSS.
    """
    ratios, refs = [], []
    for _ in range(max(1, rounds)):
        start = time.perf_counter()
        step()
        mid = time.perf_counter()
        reference()
        end = time.perf_counter()
        ratios.append((mid - start) / (end - mid))
        refs.append(end - mid)
    return {"x_roof_paired": statistics.median(ratios), "roofline_paired_s": statistics.median(refs)}


def case_result(case: dict, *, time: dict, base_rss: int, grad_bytes: int, **extra) -> dict:
    """One result record: the case, its timing, ``peak_rss_mb`` and ``extra_mb`` (peak RSS beyond
    the inputs, measured as ``base_rss`` right after creating them, and their ``grad_bytes``),
    plus any suite-specific ``extra`` fields."""
    peak = peak_rss_bytes()
    result = dict(case)
    result.update(time)
    result["peak_rss_mb"] = peak / _MB
    result["extra_mb"] = (peak - base_rss - grad_bytes) / _MB
    result.update(extra)
    return result


def _tail(text: str, limit: int = 2000) -> str:
    return text[-limit:].strip()


def run_in_subprocess(suite: str, case: dict, timeout: float) -> dict:
    """Run one case of ``benchmarks.<suite>`` in a fresh Python process and return its result
    dict (the JSON object on the last line of the child's stdout). Never raises: on a crash,
    timeout or unreadable output it returns the case with ``error`` set to a short reason."""
    cmd = [sys.executable, "-m", f"benchmarks.{suite}", "--case", json.dumps(case)]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
        )
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout:g} s"}
    except OSError as exc:
        return {**case, "error": f"could not start the child: {exc}"}
    if proc.returncode != 0:
        return {**case, "error": f"exit code {proc.returncode}: {_tail(proc.stderr) or _tail(proc.stdout)}"}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {**case, "error": f"no JSON on the last line of stdout: {_tail(proc.stdout, 500)!r}"}
    if not isinstance(result, dict):
        return {**case, "error": f"last line of stdout is not a JSON object: {lines[-1][:200]!r}"}
    return result


def main(run_case: Callable[[dict], dict], argv=None) -> None:
    """Entry point of a suite module run as ``python -m benchmarks.<suite> --case JSON``: run the
    case and print its result as JSON on the last line of stdout."""
    parser = argparse.ArgumentParser(description="Run one benchmark case (used by `leanloss bench`).")
    parser.add_argument("--case", required=True, help="the case dict as JSON")
    args = parser.parse_args(argv)
    result = run_case(json.loads(args.case))
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
