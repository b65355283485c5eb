"""What every benchmark suite shares: the measurement of one step, the result record, and the
child-process protocol.

Protocol: each case runs in a fresh child, ``python -m <package>.<suite> --case JSON``, which
prints one JSON object as the last line of its stdout (:func:`main`, :func:`run_in_subprocess`).
The child needs no working directory or repository: the suites are modules of the installed
package.

Method (:func:`measure`), inside the child, after the imports, the inputs, any compilation and
``warmup`` untimed steps:

* memory: ``extra_mb`` is the peak resident set size of ONE warmed-up step (an untimed step
  after the warm-up) minus the resident set size holding the inputs and the warm-up step's
  gradients. On Linux the peak is reset right before the step (``5`` written to
  ``/proc/self/clear_refs``) and read from ``VmHWM`` in ``/proc/self/status`` after it
  (``mem_method='VmHWM'``); where that is not possible the process's lifetime peak is used
  (``mem_method='ru_maxrss'``, which also counts the imports and the warm-up). Under glibc the
  C heap's free memory is handed back to the system (``malloc_trim(0)``) right before the
  baseline is read and again right before the peak is reset: the baseline is then the live
  memory, and every page the step touches counts, whatever an earlier step left resident in
  the heap (without it the baseline of one case varied by 280-670 MB between processes; the
  step's own peak still varies by a few hundred MB with how glibc places it). Memory that the
  step frees and glibc keeps resident while the step runs still counts: the step holds it.
  Trimming makes the step fault its pages in afresh, so it is not one of the timed rounds;
  the allocator's settings are left alone, so the timed rounds run as any program would.
* time: ``rounds`` rounds of the step and the ``reference`` (the matmuls alone: the roofline)
  timed alternately in the same process. ``time_s`` is the step's median, ``x_roof`` the median
  of the per-round ratios step / reference. Absolute times drift between processes on a shared
  machine; a ratio taken in one process does not, so ratios are what compare implementations.

In-process, on any device, :class:`PeakTensorMemory` measures the peak bytes of tensor storage
that a block creates and holds at once (exact, but blind to allocator caches and workspaces:
the tour uses it; the suites report RSS).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import weakref
from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import Tensor

__all__ = [
    "Unavailable",
    "PeakTensorMemory",
    "rss_bytes",
    "reset_peak_rss",
    "trim_heap",
    "peak_rss_bytes",
    "step_memory",
    "paired_times",
    "measure",
    "run_in_subprocess",
    "main",
]

MB = 2**20
Step = Callable[[], Any]


class Unavailable(RuntimeError):
    """A peer implementation that cannot run here (not installed, not supported by this torch):
    the case is reported as skipped with this message, not as a failure."""


class PeakTensorMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storage created inside the block and alive at the same time: the
    memory a computation needs beyond its inputs, measured exactly, on any device, in-process
    (views share their base's storage and are counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict = {}
        self.current = 0
        self.peak = 0

    def _free(self, key) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if key in self._live or storage.nbytes() == 0:
                continue
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (``/proc/self/statm``; where ``/proc``
    is missing, the lifetime peak from ``getrusage``)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _ru_maxrss_bytes()


def _ru_maxrss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux: ``/proc/self/clear_refs``).
    Returns False where that is not possible; :func:`peak_rss_bytes` then reads the lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vmhwm_bytes() is not None
    except OSError:
        return False


def _vmhwm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            found = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def peak_rss_bytes() -> int:
    """Peak resident set size in bytes since the last :func:`reset_peak_rss` (``VmHWM``), or the
    lifetime peak where ``/proc`` is missing."""
    hwm = _vmhwm_bytes()
    return hwm if hwm is not None else _ru_maxrss_bytes()


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return None


def trim_heap() -> bool:
    """Hand the C heap's free memory back to the system (glibc ``malloc_trim(0)``), so that the
    resident set is the memory in use. Returns False where there is no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _clearer(leaves: Iterable[Any]) -> Callable[[], None]:
    leaves = list(leaves)

    def clear() -> None:
        for x in leaves:
            x.grad = None

    return clear


def _warm(step: Step, reference: Optional[Step], clear: Callable[[], None], warmup: int) -> int:
    """Untimed calls: the reference once (one-time kernel setup), then ``warmup`` steps, whose
    gradients stay set. Returns the RSS then, the heap trimmed (:func:`trim_heap`): the inputs
    and one step's gradients.

    leanloss serves a row kernel's first calls eagerly and compiles it in a background thread
    from its second loss call on (:mod:`leanloss._fused.kernels`): where a kernel waits for
    that second call, the warm-up runs one more step; where compiles were submitted, it waits
    for them and runs one more step, so that the timed and measured steps are the steady state
    (the first calls' cost is the ``first_call`` suite's)."""
    if reference is not None:
        reference()
    for _ in range(max(1, warmup)):
        clear()
        step()
    kernels = sys.modules.get("leanloss._fused.kernels")
    if kernels is not None and kernels.compiles_deferred():
        clear()
        step()
    if kernels is not None and kernels.background_compiles_submitted():
        kernels.wait_for_compiles()
        clear()
        step()
    trim_heap()
    return rss_bytes()


def _step_peak(step: Step, clear: Callable[[], None], base_rss: int) -> Dict[str, Any]:
    """One step's peak RSS over ``base_rss`` (the module docstring's method): ``peak_rss_mb``,
    ``base_rss_mb``, ``extra_mb``, ``mem_method``. The step's gradients stay set."""
    clear()
    trim_heap()
    exact = reset_peak_rss()
    step()
    peak = peak_rss_bytes()
    return dict(peak_rss_mb=peak / MB, base_rss_mb=base_rss / MB, extra_mb=(peak - base_rss) / MB,
                mem_method="VmHWM" if exact else "ru_maxrss")


def paired_times(step: Step, reference: Optional[Step], rounds: int, leaves: Iterable[Any] = ()) -> Dict[str, Any]:
    """Time ``step`` and ``reference`` alternately, ``rounds`` times each, in this process.

    Returns ``time_s`` (the step's median) and ``times``, and with a reference ``x_roof`` (the
    median of the per-round ratios step / reference) and ``roofline_s`` (the reference's median).
    The gradients of ``leaves`` are cleared before each step and after the last."""
    clear = _clearer(leaves)
    out: Dict[str, Any] = {}
    times, refs, ratios = [], [], []
    for _ in range(max(1, rounds)):
        clear()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if reference is not None:
            ref_start = time.perf_counter()
            reference()
            refs.append(time.perf_counter() - ref_start)
            ratios.append(times[-1] / refs[-1])
    clear()
    out.update(time_s=statistics.median(times), times=times)
    if reference is not None:
        out.update(x_roof=statistics.median(ratios), roofline_s=statistics.median(refs))
    return out


def step_memory(step: Step, leaves: Iterable[Any] = (), *, warmup: int = 1) -> Dict[str, Any]:
    """``warmup`` steps, then one step's peak RSS over the RSS that holds the inputs and the
    gradients of ``leaves`` (``step`` leaves them set; they are cleared before each step).
    Returns ``peak_rss_mb``, ``base_rss_mb``, ``extra_mb`` and ``mem_method``."""
    clear = _clearer(leaves)
    got = _step_peak(step, clear, _warm(step, None, clear, warmup))
    clear()
    return got


def measure(case: Dict[str, Any], step: Step, *, leaves: Iterable[Any] = (), reference: Optional[Step] = None,
            warmup: int = 1, **extra: Any) -> Dict[str, Any]:
    """The result record of one case: the case, then (after the untimed warm-up) one untimed
    step's memory and ``case['repeats']`` rounds of :func:`paired_times`, and any
    suite-specific ``extra`` fields."""
    leaves = list(leaves)
    clear = _clearer(leaves)
    result = dict(case)
    result.update(_step_peak(step, clear, _warm(step, reference, clear, warmup)))
    result.update(paired_times(step, reference, int(case.get("repeats", 3)), leaves))
    result.update(extra)
    return result


def _tail(text: str, limit: int = 2000) -> str:
    return text[-limit:].strip()


def run_in_subprocess(module: str, case: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """Run one case of the suite ``module`` (a dotted module name) in a fresh Python process and
    return its result dict (the JSON object on the last line of the child's stdout). Never raises:
    on a crash, timeout or unreadable output it returns the case with ``error`` set to a reason."""
    cmd = [sys.executable, "-m", module, "--case", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
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


def main(run_case: Callable[[Dict[str, Any]], Dict[str, Any]], argv: Optional[list] = None) -> None:
    """Entry point of a suite module run as ``python -m <package>.<suite> --case JSON``: run the
    case and print its result (or ``skipped`` with the reason :class:`Unavailable` gave) as JSON
    on the last line of stdout."""
    parser = argparse.ArgumentParser(description="Run one benchmark case (used by `leanloss bench`).")
    parser.add_argument("--case", required=True, help="the case dict as JSON")
    args = parser.parse_args(argv)
    case = json.loads(args.case)
    try:
        result = run_case(case)
    except Unavailable as exc:
        result = {**case, "skipped": str(exc)}
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
