"""The first call of each fused loss in a fresh process against a warm call: the compile stall.

Case: one fused loss and option set (``impl``: ``ce``, ``ce_smoothing``, ``ce_z_loss``,
``log_probs``, ``jsd``, ``topk``; see ``LOSSES``) at ``hidden (N, D)``, ``weight (V, D)``,
forward + backward. The case's child runs two probes, each a fresh Python process
(``--case`` with ``probe`` set) with ``TORCHINDUCTOR_CACHE_DIR`` and ``LEANLOSS_CACHE_DIR`` (the
native kernels' cache) pointing at one new temporary directory:

* ``cold``: the directory is empty (a machine that never compiled or built these kernels);
* ``warm_cache``: the same directory again, now holding what the cold probe compiled (every
  later process on that machine).

Each probe builds its inputs, then times the first step (``first_s``: imports of compilers,
tracing and compiling included, whatever the kernel mode does on the critical path), the
second step (``second_s``), waits for any compile still running in the background
(``leanloss._fused.kernels.wait_for_compiles``, where it exists), and times ``repeats`` more
steps (``warm_s``: their median). ``stall_s = first_s - warm_s`` is what the first call costs
beyond a warm one. The row reports both probes (``cold_*``, ``warm_cache_*``); its ``time_s``
is the cold probe's warm call. ``LEANLOSS_KERNELS`` passes through to the probes, so the same
suite measures a forced mode. One case: ``python -m leanloss.cli.bench.first_call --case JSON``.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List

from leanloss.cli.bench import harness

SUITE = "first_call"
SHAPE = (2048, 1024, 32000)
DTYPES = ("float32", "bfloat16")
QUICK_DTYPES = ("bfloat16",)
# loss name -> (public function, its keyword options)
LOSSES: Dict[str, Any] = {
    "ce": ("linear_cross_entropy", {}),
    "ce_smoothing": ("linear_cross_entropy", {"label_smoothing": 0.1}),
    "ce_z_loss": ("linear_cross_entropy", {"z_loss": 1e-4}),
    "log_probs": ("linear_log_probs", {"temperature": 0.9, "return_entropy": True}),
    "jsd": ("linear_distill_loss", {"kind": "jsd", "beta": 0.5, "hard_weight": 0.5}),
    "topk": ("linear_topk_distill_loss", {"hard_weight": 0.5}),
}
QUICK_LOSSES = ("ce", "jsd")
TOP_K = 32
PROBES = ("cold", "warm_cache")


def cases(*, quick: bool, vocab=None, tokens=None, hidden=None, dtype=None, only=None) -> List[Dict[str, Any]]:
    """N=2048, D=1024, V=32000. Full: every loss of ``LOSSES``, float32 and bfloat16, 3 warm
    steps. Quick: cross entropy and JSD in bfloat16, 2 warm steps."""
    n, d, v = SHAPE
    losses = [name for name in LOSSES if (only is None or name == only) and (only or not quick or name in QUICK_LOSSES)]
    dtypes = [dtype] if dtype else (QUICK_DTYPES if quick else DTYPES)
    return [dict(suite=SUITE, impl=name, N=int(tokens or n), D=int(hidden or d), V=int(vocab or v), dtype=dt,
                 repeats=2 if quick else 3)
            for dt in dtypes for name in losses]


def _step(case: Dict[str, Any]) -> Callable[[], None]:
    """Forward + backward of the case's loss on fixed random inputs."""
    import torch

    import leanloss

    if case["impl"] not in LOSSES:
        raise ValueError(f"{SUITE}: unknown impl {case['impl']!r}; expected one of {tuple(LOSSES)}")
    fn_name, options = LOSSES[case["impl"]]
    fn = getattr(leanloss, fn_name)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    n, d, v = case["N"], case["D"], case["V"]
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g)
    if fn_name == "linear_distill_loss":
        teacher = (torch.randn(n, d, generator=g).to(dtype), (torch.randn(v, d, generator=g) * d**-0.5).to(dtype))
        args: tuple = (h, w, *teacher, target)
    elif fn_name == "linear_topk_distill_loss":
        k = min(TOP_K, v)
        ids = torch.rand(n, v, generator=g).topk(k, dim=1).indices
        args = (h, w, ids, torch.randn(n, k, generator=g).log_softmax(1), target)
    else:
        args = (h, w, target)

    def step() -> None:
        h.grad = w.grad = None
        out = fn(*args, **options)
        loss = out[0].mean() + out[1].mean() if isinstance(out, tuple) else out
        loss.backward()

    return step


def _timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def probe(case: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process: the first, the second and (after any background compile) the warm
    steps of the case's loss."""
    step = _step(case)
    first = _timed(step)
    second = _timed(step)
    from leanloss._fused import kernels

    wait = getattr(kernels, "wait_for_compiles", None)  # absent before background compiling
    start = time.perf_counter()
    if wait is not None:
        wait()
    waited = time.perf_counter() - start
    warm = statistics.median(_timed(step) for _ in range(max(1, int(case.get("repeats", 3)))))
    return {"first_s": first, "second_s": second, "waited_s": waited, "warm_s": warm,
            "stall_s": first - warm, "kernel_mode": kernels.get_kernel_mode()}


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    if case.get("probe"):
        return {**case, **probe(case)}
    result = dict(case)
    module = __spec__.name if __spec__ is not None else f"leanloss.cli.bench.{SUITE}"
    with tempfile.TemporaryDirectory(prefix="leanloss-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ["LEANLOSS_CACHE_DIR"] = cache
        for name in PROBES:
            got = harness.run_in_subprocess(module, {**case, "probe": name}, timeout=1200.0)
            if "error" in got:
                raise RuntimeError(f"{name} probe failed: {got['error']}")
            result.update({f"{name}_{k}": got[k] for k in ("first_s", "second_s", "waited_s", "warm_s", "stall_s")})
            result["kernel_mode"] = got["kernel_mode"]
    result["time_s"] = result["cold_warm_s"]
    return result


if __name__ == "__main__":
    harness.main(run_case)
