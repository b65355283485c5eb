"""leanloss's dense losses against their torch twins: forward + backward, time ratio.

Run: ``python -m leanloss.cli.bench.dense_vs_torch [--repeats 7] [--only NAME]
[--threads N]``.
Each case times leanloss and torch alternately in this one process (the same tensors, the same
upstream gradient, steps interleaved so that load changes hit both sides alike) and prints the
ratio of the median times, leanloss / torch (below 1: leanloss is faster). Absolute times are
printed for orientation only; on a shared machine the ratio is the figure to read.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import leanloss


def _ce_case(n, c, dtype, **kw):
    def make():
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, c, generator=g) * 2).to(dtype).requires_grad_()
        t = torch.randint(c, (n,), generator=g)
        if kw.pop("_ignore", False):
            t[::7] = -100
        if kw.pop("_weight", False):
            kw["weight"] = (torch.rand(c, generator=g) + 0.5).to(dtype)
        return (x, t), kw
    return make, leanloss.cross_entropy, F.cross_entropy


def _bcel_case(n, c, dtype, **kw):
    def make():
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, c, generator=g) * 2).to(dtype).requires_grad_()
        y = torch.rand(n, c, generator=g).to(dtype)
        if kw.pop("_pos_weight", False):
            kw["pos_weight"] = (torch.rand(c, generator=g) + 0.5).to(dtype)
        if kw.pop("_weight", False):
            kw["weight"] = (torch.rand(c, generator=g) + 0.5).to(dtype)
        return (x, y), kw
    return make, leanloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits


BF16, FP32 = torch.bfloat16, torch.float32
CASES = {
    "ce fp32 (8192, 32000)": lambda: _ce_case(8192, 32000, FP32),
    "ce bf16 (8192, 32000)": lambda: _ce_case(8192, 32000, BF16),
    "ce bf16 ls=0.1": lambda: _ce_case(8192, 32000, BF16, label_smoothing=0.1),
    "ce fp32 ls=0.1": lambda: _ce_case(8192, 32000, FP32, label_smoothing=0.1),
    "ce bf16 sum": lambda: _ce_case(8192, 32000, BF16, reduction="sum"),
    "ce bf16 none": lambda: _ce_case(8192, 32000, BF16, reduction="none"),
    "ce fp32 none": lambda: _ce_case(8192, 32000, FP32, reduction="none"),
    "ce bf16 ignore": lambda: _ce_case(8192, 32000, BF16, _ignore=True),
    "ce bf16 weight": lambda: _ce_case(8192, 32000, BF16, _weight=True),
    "ce fp32 weight": lambda: _ce_case(8192, 32000, FP32, _weight=True),
    "ce bf16 weight ls=0.1": lambda: _ce_case(8192, 32000, BF16, _weight=True, label_smoothing=0.1),
    "bcel fp32 (4096, 4096)": lambda: _bcel_case(4096, 4096, FP32),
    "bcel fp32 sum": lambda: _bcel_case(4096, 4096, FP32, reduction="sum"),
    "bcel fp32 none": lambda: _bcel_case(4096, 4096, FP32, reduction="none"),
    "bcel fp32 pos_weight": lambda: _bcel_case(4096, 4096, FP32, _pos_weight=True),
    "bcel fp32 weight": lambda: _bcel_case(4096, 4096, FP32, _weight=True),
    "bcel bf16": lambda: _bcel_case(4096, 4096, BF16),
}


def _step(fn, args, kw):
    def run():
        x = args[0]
        x.grad = None
        out = fn(*args, **kw)
        grad = torch.ones_like(out) if out.dim() == 0 else torch.full_like(out, 1.0 / out.numel())
        out.backward(grad)
    return run


def time_case(name: str, repeats: int) -> float:
    make, ours, theirs = CASES[name]()
    args, kw = make()
    steps = {"leanloss": _step(ours, args, kw), "torch": _step(theirs, args, kw)}
    for step in steps.values():  # warm-up: allocator, first-call costs
        step()
    times: dict = {k: [] for k in steps}
    for i in range(repeats):
        order = list(steps) if i % 2 == 0 else list(steps)[::-1]
        for k in order:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["leanloss"] / med["torch"]
    print(f"{name:28s} leanloss {med['leanloss'] * 1e3:8.1f} ms   torch {med['torch'] * 1e3:8.1f} ms"
          f"   ratio {ratio:5.2f}x", flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", action="append", help="case name substring (repeatable)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    names = [n for n in CASES if not opts.only or any(s in n for s in opts.only)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {opts.repeats} interleaved "
          f"repeats, ratio = median leanloss / median torch (fwd+bwd)")
    for name in names:
        time_case(name, opts.repeats)


if __name__ == "__main__":
    main()
