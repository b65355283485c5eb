"""Fused linear cross entropy, forward + backward, against the three-matmul roofline.

The roofline of a case is the three matmuls of the unfused loss alone in the input dtype,
``z = h @ W.T``, ``g @ W`` and ``g.T @ h`` (``g`` = ``z`` standing in for the logits' gradient),
timed interleaved with the implementation in the same process (see ``harness``).

Implementations (peers that are not installed or not in this torch are reported as skipped):

* ``leanloss``: :func:`leanloss.linear_cross_entropy`;
* ``torch_eager``: ``F.cross_entropy((h @ W.T).float(), target)`` (logits upcast to float32,
  as transformers does);
* ``torch_compile``: ``torch.compile`` of that function;
* ``cut_cross_entropy``: cut-cross-entropy's ``linear_cross_entropy(..., impl="torch_compile")``
  (``pip install --no-deps cut-cross-entropy``);
* ``torch_chunked``: torch's own chunked ``F.linear_cross_entropy(..., options=
  torch.nn.LinearCrossEntropyOptions())``, where this torch has it.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any, Callable, Dict, List, Optional

from leanloss.cli.bench import harness

SUITE = "linear_ce"
IMPLS = ("leanloss", "torch_eager", "torch_compile", "cut_cross_entropy", "torch_chunked")
# (N, D, V): a Llama-3-8B head, many tokens per weight row, a small vocabulary.
FULL_SHAPES = ((4096, 4096, 128256), (8192, 1024, 131072), (2048, 1024, 32000))
QUICK_SHAPES = ((2048, 1024, 32000),)
DTYPES = ("float32", "bfloat16")
QUICK_IMPLS = ("leanloss",)
# N*D*V above which a case times 2 rounds instead of 3 (one fp32 step of the 8B head is ~2 min here)
LARGE = 5 * 10**11


def _shapes(quick: bool, vocab, tokens, hidden) -> List[tuple]:
    if vocab is None and tokens is None and hidden is None:
        return list(QUICK_SHAPES if quick else FULL_SHAPES)
    n, d, v = (QUICK_SHAPES if quick else FULL_SHAPES)[-1]
    return [(int(tokens or n), int(hidden or d), int(vocab or v))]


def cases(*, quick: bool, vocab=None, tokens=None, hidden=None, dtype=None, only=None) -> List[Dict[str, Any]]:
    """Full: every shape of ``FULL_SHAPES`` in float32 and bfloat16, every implementation, 3
    rounds (2 above ``LARGE``). Quick: N=2048, D=1024, V=32000, float32 and bfloat16, leanloss
    alone, 2 rounds."""
    impls = [i for i in IMPLS if (only is None or i == only) and (only or not quick or i in QUICK_IMPLS)]
    out = []
    for n, d, v in _shapes(quick, vocab, tokens, hidden):
        for dt in ([dtype] if dtype else DTYPES):
            for impl in impls:
                out.append(dict(suite=SUITE, impl=impl, N=n, D=d, V=v, dtype=dt,
                                repeats=2 if quick or n * d * v > LARGE else 3))
    return out


def cce_torch_compile() -> Callable:
    """cut-cross-entropy's ``torch_compile`` implementation; raises :class:`harness.Unavailable`
    when the package is not installed.

    ``import cut_cross_entropy`` imports its Triton kernels, which need Triton (and fail on a
    machine without it); the ``torch_compile`` impl needs none of them, so when the package import
    fails it is loaded from the installed package directory without running the package
    ``__init__``."""
    spec = importlib.util.find_spec("cut_cross_entropy")
    if spec is None or not spec.submodule_search_locations:
        raise harness.Unavailable("cut-cross-entropy is not installed (pip install --no-deps cut-cross-entropy)")
    try:
        from cut_cross_entropy import linear_cross_entropy

        return lambda e, c, t: linear_cross_entropy(e, c, t, impl="torch_compile")
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "cut_cross_entropy" or m.startswith("cut_cross_entropy.")]:
        del sys.modules[name]
    package = types.ModuleType("cut_cross_entropy")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["cut_cross_entropy"] = package
    try:
        module = importlib.import_module("cut_cross_entropy.torch_compile")
    except ImportError as exc:
        raise harness.Unavailable(f"cut-cross-entropy's torch_compile impl does not import: {exc}") from exc
    return module.torch_compile_linear_cross_entropy


def _loss_fn(impl: str) -> Callable:
    import torch
    import torch.nn.functional as F

    def dense(h, w, t):
        return F.cross_entropy((h @ w.T).float(), t)

    if impl == "leanloss":
        from leanloss import linear_cross_entropy

        return linear_cross_entropy
    if impl == "torch_eager":
        return dense
    if impl == "torch_compile":
        return torch.compile(dense)
    if impl == "cut_cross_entropy":
        return cce_torch_compile()
    if impl == "torch_chunked":
        options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if options is None or not hasattr(F, "linear_cross_entropy"):
            raise harness.Unavailable(f"torch {torch.__version__} has no chunked F.linear_cross_entropy "
                                      "(torch.nn.LinearCrossEntropyOptions)")
        return lambda h, w, t: F.linear_cross_entropy(h, w, t, options=options())
    raise ValueError(f"{SUITE}: unknown impl {impl!r}; expected one of {IMPLS}")


def roofline(h, w) -> Callable[[], None]:
    """The three matmuls of the unfused loss, without autograd, in the inputs' dtype."""
    import torch

    def step() -> None:
        with torch.no_grad():
            z = h @ w.T
            z @ w
            z.T @ h

    return step


def run_case(case: Dict[str, Any], loss_fn: Optional[Callable] = None) -> Dict[str, Any]:
    import torch

    loss_fn = _loss_fn(case["impl"]) if loss_fn is None else loss_fn
    dtype = getattr(torch, case["dtype"])
    n, d, v = case["N"], case["D"], case["V"]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    losses: List[float] = []

    def step() -> None:
        loss = loss_fn(h, w, t)
        loss.backward()
        losses.append(float(loss))

    result = harness.measure(case, step, leaves=(h, w), reference=roofline(h, w))
    result["loss"] = losses[-1]
    return result


if __name__ == "__main__":
    harness.main(run_case)
