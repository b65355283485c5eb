"""Distillation of a student LM head from a teacher head: fused vs dense, fwd+bwd.

Case: student ``hidden (N, D)`` and ``weight (V, D)`` (both require grad), teacher
``hidden (N, D)`` and ``weight (V, D)`` (frozen), targets with none ignored, ``kind``
(default ``'forward'``), ``temperature`` 2. Impls:

* ``roofline``: the matmuls alone, as the issue counts them: two forward projections
  (``h_s @ W_s.T``, ``h_t @ W_t.T``) and three student backward matmuls (``g @ W_s``,
  ``g.T @ h_s`` and a third of the same shape, timed as a second ``g @ W_s``). The fused loss
  needs only the first four; their time is recorded as ``matmuls4_s`` in the roofline row, so
  the stricter ratio ``leanloss / matmuls4_s`` can be read off the JSON as well;
* ``leanloss``: :func:`leanloss.linear_distill_loss` (the fused scorer on the linear engine);
* ``torch_eager``: the dense form, :func:`leanloss.distill_loss` on materialized logits
  (``h_s @ W_s.T`` and, under ``no_grad``, ``h_t @ W_t.T``), eager;
* ``torch_compile``: the same dense step under ``torch.compile`` (omitted in quick mode: its
  compilation alone takes longer than the whole quick suite).

``extra_mb`` is the peak RSS above the inputs and the student's gradients.
Run one case: ``python -m benchmarks.distill --case '{"impl": "leanloss", ...}'``.
"""
from __future__ import annotations

import torch

import leanloss  # imported before the baseline RSS is taken, for every impl alike
from benchmarks import _harness

SUITE = "distill"
IMPLS = ("roofline", "leanloss", "torch_eager", "torch_compile")


def cases(*, quick: bool, vocab=None, tokens=None, hidden=None, dtype=None, only=None) -> list[dict]:
    """Full: N=2048, D=1024, V=32000, float32. Quick: N=128, D=64, V=2000."""
    V = vocab or (2000 if quick else 32000)
    D = hidden or (64 if quick else 1024)
    N = tokens or (128 if quick else 2048)
    impls = [i for i in IMPLS if (only is None or i in only) and not (quick and i == "torch_compile")]
    return [
        dict(suite=SUITE, impl=impl, N=N, D=D, V=V, dtype=dtype or "float32",
             repeats=3 if quick else 5, kind="forward", temperature=2.0)
        for impl in impls
    ]


def _inputs(case: dict):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    N, D, V = case["N"], case["D"], case["V"]

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    hs = randn(N, D, scale=1.0).requires_grad_()
    ws = randn(V, D, scale=D**-0.5).requires_grad_()
    ht = randn(N, D, scale=1.0)
    wt = randn(V, D, scale=D**-0.5)
    target = torch.randint(0, V, (N,), generator=g)
    return hs, ws, ht, wt, target


def _roofline(hs, ws, ht, wt, timings: dict):
    import time

    def step():
        start = time.perf_counter()
        with torch.no_grad():
            z = hs @ ws.T
            zt = ht @ wt.T
            gh = z @ ws
            gw = z.T @ hs
        timings.setdefault("four", []).append(time.perf_counter() - start)
        with torch.no_grad():
            gh2 = z @ ws
        del z, zt, gh, gw, gh2

    return step


def _dense_loss(hs, ws, ht, wt, target, kind, temperature):
    with torch.no_grad():
        teacher = ht @ wt.T
    return leanloss.distill_loss(hs @ ws.T, teacher, target, kind=kind, temperature=temperature)


def run_case(case: dict) -> dict:
    hs, ws, ht, wt, target = _inputs(case)
    base_rss = _harness.rss_bytes()
    # the student's gradients (the roofline allocates none: as in benchmarks/linear_ce.py)
    grad_bytes = 0 if case["impl"] == "roofline" else (hs.numel() + ws.numel()) * hs.element_size()
    kind, temperature = case.get("kind", "forward"), case.get("temperature", 1.0)
    extra = {}
    impl = case["impl"]
    if impl == "roofline":
        timings: dict = {}
        step = _roofline(hs, ws, ht, wt, timings)
    else:
        if impl == "leanloss":
            def loss_fn(hs, ws, ht, wt, target):
                return leanloss.linear_distill_loss(hs, ws, ht, wt, target, kind=kind, temperature=temperature)
        elif impl == "torch_eager":
            def loss_fn(hs, ws, ht, wt, target):
                return _dense_loss(hs, ws, ht, wt, target, kind, temperature)
        elif impl == "torch_compile":
            loss_fn = torch.compile(lambda hs, ws, ht, wt, target: _dense_loss(hs, ws, ht, wt, target, kind,
                                                                              temperature))
        else:
            raise ValueError(f"unknown impl {impl!r}")

        def step():
            loss_fn(hs, ws, ht, wt, target).backward()
            hs.grad = ws.grad = None

    result = _harness.time_fwd_bwd(step, repeats=case["repeats"])
    if impl == "roofline":
        four = timings["four"][1:]  # drop the warmup call
        extra["matmuls4_s"] = sorted(four)[len(four) // 2]
    record = _harness.case_result(case, time=result, base_rss=base_rss, grad_bytes=grad_bytes, **extra)
    if impl != "roofline":  # the ratio that counts: interleaved with the five matmuls, same process
        record.update(_harness.paired_ratio(step, _roofline(hs, ws, ht, wt, {}), case["repeats"]))
    return record


if __name__ == "__main__":
    _harness.main(run_case)
