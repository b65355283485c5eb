"""The GPU check: on a CUDA machine, the CUDA tests and the bf16 suite against its peers, as JSON.

    make device-check      (python -m leanloss.cli.bench.device_check --out device_check.json,
                            from a clone of the repository: step 1 runs its tests/)

1. ``pytest -k cuda`` over the suite (every fused loss has CUDA parametrizations that skip
   without a GPU).
2. bf16 fwd+bwd at the shapes of the CPU benchmark, each as a ratio to the matmul roofline timed
   in the same process (CUDA events, medians of interleaved rounds) and the extra peak memory of
   one warmed-up step (``torch.cuda.max_memory_allocated`` over the memory holding inputs and
   gradients). Peers where importable: ``torch.compile`` of the dense loss, cut-cross-entropy
   (its Triton ``cce`` implementation), Liger-Kernel's fused linear cross entropy and JSD.
   A peer that is missing is recorded as skipped with the reason.
3. Gradient accuracy: relative (Frobenius) error of grad_hidden / grad_weight against float64 on
   the same bf16-rounded inputs, next to eager bf16 with float32 logits.

Runs in well under 8 minutes on one H200; nothing here needs the network.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from typing import Any, Callable, Dict, List, Union

import torch
import torch.nn.functional as F

CE_SHAPES = [(4096, 4096, 128256), (8192, 1024, 131072), (2048, 1024, 32000)]
JSD_SHAPE = (2048, 1024, 32000)


def _time(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def _paired(step, roof, rounds=5):
    step(), roof()
    ratios, roofs = [], []
    for _ in range(rounds):
        a, b = _time(step), _time(roof)
        ratios.append(a / b)
        roofs.append(b)
    return statistics.median(ratios), statistics.median(roofs)


def _extra_mb(step):
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure_impls(results, row: Dict[str, Any], impls: Dict[str, Union[str, Callable]],
                   step_of: Callable[[Callable], Callable[[], None]], roof: Callable[[], None]) -> None:
    """One result per implementation: skipped (``impls[name]`` is the reason), or its ratio to
    ``roof`` and extra memory, or the error it raised (out of memory for eager at 8B, say)."""
    for name, fn in impls.items():
        out = {**row, "impl": name}
        if isinstance(fn, str):
            results.append({**out, "skipped": fn})
            continue
        step = step_of(fn)
        try:
            out["x_roof"], out["roofline_s"] = _paired(step, roof)
            out["extra_mb"] = _extra_mb(step)
        except Exception as exc:  # noqa: BLE001 -- reported in the JSON, the run goes on
            out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        results.append(out)
        torch.cuda.empty_cache()


def ce_impls():
    """name -> (h, w, t) -> loss, or the reason it is unavailable."""
    import leanloss

    impls: Dict[str, Union[str, Callable]] = {"leanloss": lambda h, w, t: leanloss.linear_cross_entropy(h, w, t)}
    dense = lambda h, w, t: F.cross_entropy((h @ w.T).float(), t)  # noqa: E731
    impls["eager"] = dense
    impls["torch.compile"] = torch.compile(dense)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["cut-cross-entropy (cce)"] = lambda h, w, t: cce(h, w, t, impl="cce")
    except Exception as exc:  # noqa: BLE001
        impls["cut-cross-entropy (cce)"] = f"unavailable: {type(exc).__name__}: {exc}"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        impls["liger"] = lambda h, w, t: liger(w, h, t)
    except Exception as exc:  # noqa: BLE001
        impls["liger"] = f"unavailable: {type(exc).__name__}: {exc}"
    return impls


def bench_ce(results):
    impls = ce_impls()
    for n, d, v in CE_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_()
        w = (torch.randn(v, d, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
        t = torch.randint(0, v, (n,), device="cuda", generator=g)

        def roof(h=h, w=w):
            z = h.detach() @ w.detach().T
            z @ w.detach()
            z.T @ h.detach()

        def step_of(fn, h=h, w=w, t=t):
            def step():
                h.grad = w.grad = None
                fn(h, w, t).backward()
            return step

        _measure_impls(results, dict(suite="ce_bf16", n=n, d=d, v=v), impls, step_of, roof)
        h.grad = w.grad = None


def bench_jsd(results):
    import leanloss

    n, d, v = JSD_SHAPE
    g = torch.Generator(device="cuda").manual_seed(1)
    hs = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_()
    ws = (torch.randn(v, d, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    ht = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    wt = (torch.randn(v, d, device="cuda", generator=g) * 0.02).bfloat16()
    impls: Dict[str, Union[str, Callable]] = {
        "leanloss": lambda: leanloss.linear_distill_loss(hs, ws, ht, wt, kind="jsd", beta=0.5)}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)
        impls["liger"] = lambda: liger(hs, ws, ht, wt, None)
    except Exception as exc:  # noqa: BLE001
        impls["liger"] = f"unavailable: {type(exc).__name__}: {exc}"

    def roof():
        z = hs.detach() @ ws.detach().T
        ht @ wt.T
        z @ ws.detach()
        z.T @ hs.detach()

    def step_of(fn):
        def step():
            hs.grad = ws.grad = None
            fn().backward()
        return step

    _measure_impls(results, dict(suite="jsd_bf16", n=n, d=d, v=v), impls, step_of, roof)


def accuracy(results):
    import leanloss

    n, d, v = 8192, 256, 32000
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    w = (torch.randn(v, d, device="cuda", generator=g) * 0.05).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    F.cross_entropy(h64 @ w64.T, t).backward()

    def rel(a, ref):
        return float((a.double() - ref).norm() / ref.norm())

    he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
    F.cross_entropy((he @ we.T).float(), t).backward()
    row = dict(suite="grad_accuracy_bf16", n=n, d=d, v=v,
               eager=dict(grad_hidden=rel(he.grad, h64.grad), grad_weight=rel(we.grad, w64.grad)))
    for chunk in (None, 64):
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
        leanloss.linear_cross_entropy(hl, wl, t, chunk_size=chunk).backward()
        row[f"leanloss_chunk_{chunk}"] = dict(grad_hidden=rel(hl.grad, h64.grad), grad_weight=rel(wl.grad, w64.grad))
    results.append(row)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="device_check.json")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("device_check: no CUDA device; this check is for a GPU machine")
    results: List[Dict[str, Any]] = []
    report: Dict[str, Any] = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=results)
    started = time.time()
    if not args.skip_tests and Path("tests").is_dir():
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda or CUDA", "-p", "no:cacheprovider"],
                              capture_output=True, text=True, timeout=240)
        report["cuda_tests"] = dict(returncode=proc.returncode, tail=proc.stdout[-3000:] + proc.stderr[-1000:])
    for part in (bench_ce, bench_jsd, accuracy):
        try:
            part(report["results"])
        except Exception as exc:  # noqa: BLE001 -- record and go on to the next part
            report["results"].append(dict(suite=part.__name__, error=f"{type(exc).__name__}: {exc}"))
    report["wall_s"] = time.time() - started
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
