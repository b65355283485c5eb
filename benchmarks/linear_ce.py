"""Fused linear cross entropy: fwd+bwd time and peak memory against the three-matmul roofline.

Implementations (each case runs in a fresh child process, see ``_harness``):

* ``roofline``: the three matmuls of the unfused loss alone, ``z = h @ W.T``, ``g @ W`` and
  ``g.T @ h`` (``g`` = ``z`` standing in for the logits' gradient): the time no exact
  implementation can beat on this machine.
* ``leanloss``: :func:`leanloss.linear_cross_entropy`.
* ``torch_eager``: ``F.cross_entropy(h @ W.T, target)``.
* ``torch_compile``: ``torch.compile`` of that function (compile time excluded by the warmup).
* ``cut_cross_entropy``: cut-cross-entropy's ``torch_compile`` impl, when the package is
  installed (its Triton kernels are skipped on machines without Triton; see
  :func:`_cce_torch_compile`).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _harness  # noqa: E402

SUITE = "linear_ce"
DEFAULT = dict(N=2048, D=1024, V=(32000, 131072), dtype="float32", repeats=3)
QUICK = dict(N=64, D=64, V=(1000, 4000), dtype="float32", repeats=5)
IMPLS = ("roofline", "leanloss", "torch_eager", "torch_compile", "cut_cross_entropy")


def _cce_torch_compile():
    """cut-cross-entropy's ``torch_compile`` implementation, or ``None`` when not installed.

    ``import cut_cross_entropy`` imports its Triton kernels, which do not exist on a CPU-only
    machine; the ``torch_compile`` impl needs none of them, so when the package import fails it
    is loaded from the installed package directory without running the package ``__init__``.
    """
    try:
        from cut_cross_entropy import linear_cross_entropy

        return lambda e, c, t: linear_cross_entropy(e, c, t, impl="torch_compile")
    except ImportError:
        pass
    spec = importlib.util.find_spec("cut_cross_entropy")
    if spec is None or not spec.submodule_search_locations:
        return None
    for name in [m for m in sys.modules if m == "cut_cross_entropy" or m.startswith("cut_cross_entropy.")]:
        del sys.modules[name]
    package = types.ModuleType("cut_cross_entropy")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["cut_cross_entropy"] = package
    try:
        module = importlib.import_module("cut_cross_entropy.torch_compile")
    except ImportError:
        return None
    return module.torch_compile_linear_cross_entropy


def _available(impl: str) -> bool:
    if impl == "cut_cross_entropy":
        return importlib.util.find_spec("cut_cross_entropy") is not None
    return True


def cases(*, quick: bool, vocab=None, tokens=None, hidden=None, dtype=None, only=None) -> list:
    base = QUICK if quick else DEFAULT
    vocabs = base["V"] if vocab is None else ((vocab,) if isinstance(vocab, int) else tuple(vocab))
    impls = [i for i in IMPLS if (only is None or i in only) and _available(i)]
    out = []
    for v in vocabs:
        for impl in impls:
            out.append(dict(suite=SUITE, impl=impl, N=int(tokens or base["N"]),
                            D=int(hidden or base["D"]), V=int(v), dtype=dtype or base["dtype"],
                            repeats=base["repeats"]))
    return out


def _step_fn(impl: str, h, w, t):
    import torch
    import torch.nn.functional as F

    leaves = (h, w)

    def clear():
        for x in leaves:
            x.grad = None

    if impl == "roofline":
        def step():
            with torch.no_grad():
                z = h @ w.T
                z @ w
                z.T @ h
        return step
    if impl == "leanloss":
        from leanloss import linear_cross_entropy

        loss_fn = linear_cross_entropy
    elif impl == "torch_eager":
        def loss_fn(h_, w_, t_):
            return F.cross_entropy((h_ @ w_.T).float(), t_)
    elif impl == "torch_compile":
        loss_fn = torch.compile(lambda h_, w_, t_: F.cross_entropy((h_ @ w_.T).float(), t_))
    elif impl == "cut_cross_entropy":
        loss_fn = _cce_torch_compile()
        if loss_fn is None:
            raise RuntimeError("cut_cross_entropy is not importable")
    else:
        raise ValueError(f"unknown impl {impl!r}")

    def step():
        loss_fn(h, w, t).backward()
        clear()
    return step


def run_case(case: dict) -> dict:
    import torch

    dtype = getattr(torch, case["dtype"])
    n, d, v = case["N"], case["D"], case["V"]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d ** -0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    step = _step_fn(case["impl"], h, w, t)
    grad_bytes = 0 if case["impl"] == "roofline" else (h.numel() + w.numel()) * h.element_size()
    base_rss = _harness.rss_bytes()
    timing = _harness.time_fwd_bwd(step, repeats=case.get("repeats", 3), warmup=1)
    result = _harness.case_result(case, time=timing, base_rss=base_rss, grad_bytes=grad_bytes)
    if case["impl"] != "roofline":  # the ratio that counts: interleaved with the matmuls, same process
        result.update(_harness.paired_ratio(step, _step_fn("roofline", h, w, t), case.get("repeats", 3)))
    return result


if __name__ == "__main__":
    _harness.main(run_case)
