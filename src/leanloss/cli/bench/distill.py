"""Distillation of a student LM head from a frozen teacher head, forward + backward, against the
four-matmul roofline.

Case: student ``hidden (N, D)`` and ``weight (V, D)`` (both require grad), teacher ``hidden (N, D)``
and ``weight (V, D)`` (frozen), targets with none ignored; the loss is the generalized JSD with
``beta=0.5`` at ``temperature=1``, mixed half and half with the hard-label cross entropy
(``hard_weight=0.5``: Liger's default weighting, so every implementation computes the same loss).

The roofline is the four matmuls a fused loss cannot avoid, in the input dtype: the two forward
projections ``h_s @ W_s.T`` and ``h_t @ W_t.T`` and the student's backward ``g @ W_s`` and
``g.T @ h_s``, timed interleaved with the implementation in the same process (see ``harness``).

Implementations (a peer that is not installed is reported as skipped):

* ``leanloss``: :func:`leanloss.linear_distill_loss`;
* ``torch_eager``: the dense form, :func:`leanloss.distill_loss` on materialized logits
  (``h_s @ W_s.T`` and, without autograd, ``h_t @ W_t.T``), eager;
* ``torch_compile``: the same dense step under ``torch.compile``;
* ``liger``: Liger-Kernel's chunked ``LigerFusedLinearJSDLoss`` (pure torch, runs on CPU;
  ``pip install liger-kernel``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from leanloss.cli.bench import harness

SUITE = "distill"
IMPLS = ("leanloss", "torch_eager", "torch_compile", "liger")
FULL_SHAPES = ((2048, 1024, 32000),)
DTYPES = ("float32", "bfloat16")
QUICK_DTYPES = ("bfloat16",)
QUICK_IMPLS = ("leanloss",)
LOSS = dict(kind="jsd", beta=0.5, temperature=1.0, hard_weight=0.5)


def cases(*, quick: bool, vocab=None, tokens=None, hidden=None, dtype=None, only=None) -> List[Dict[str, Any]]:
    """N=2048, D=1024, V=32000. Full: float32 and bfloat16, every implementation, 3 rounds.
    Quick: bfloat16 (float32 takes twice as long), leanloss alone, 2 rounds."""
    n, d, v = FULL_SHAPES[0]
    impls = [i for i in IMPLS if (only is None or i == only) and (only or not quick or i in QUICK_IMPLS)]
    dtypes = [dtype] if dtype else (QUICK_DTYPES if quick else DTYPES)
    return [dict(suite=SUITE, impl=impl, N=int(tokens or n), D=int(hidden or d), V=int(vocab or v), dtype=dt,
                 repeats=2 if quick else 3, **LOSS)
            for dt in dtypes for impl in impls]


def _loss_fn(case: Dict[str, Any]) -> Callable:
    import torch

    import leanloss

    kw = {k: case[k] for k in LOSS}

    def dense(hs, ws, ht, wt, target):
        with torch.no_grad():
            teacher = ht @ wt.T
        return leanloss.distill_loss(hs @ ws.T, teacher, target, **kw)

    impl = case["impl"]
    if impl == "leanloss":
        return lambda hs, ws, ht, wt, target: leanloss.linear_distill_loss(hs, ws, ht, wt, target, **kw)
    if impl == "torch_eager":
        return dense
    if impl == "torch_compile":
        return torch.compile(dense)
    if impl == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except ImportError as exc:
            raise harness.Unavailable(f"liger-kernel is not importable ({exc}); pip install liger-kernel") from exc
        a = case["hard_weight"]
        return LigerFusedLinearJSDLoss(weight_hard_loss=a, weight_soft_loss=1 - a, beta=case["beta"],
                                       temperature=case["temperature"])
    raise ValueError(f"{SUITE}: unknown impl {impl!r}; expected one of {IMPLS}")


def roofline(hs, ws, ht, wt) -> Callable[[], None]:
    """The four matmuls of a fused distillation step, without autograd, in the inputs' dtype."""
    import torch

    def step() -> None:
        with torch.no_grad():
            z = hs @ ws.T
            ht @ wt.T
            z @ ws
            z.T @ hs

    return step


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    loss_fn = _loss_fn(case)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    n, d, v = case["N"], case["D"], case["V"]

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    hs = randn(n, d, scale=1.0).requires_grad_()
    ws = randn(v, d, scale=d**-0.5).requires_grad_()
    ht = randn(n, d, scale=1.0)
    wt = randn(v, d, scale=d**-0.5)
    target = torch.randint(0, v, (n,), generator=g)
    losses: List[float] = []

    def step() -> None:
        loss = loss_fn(hs, ws, ht, wt, target)
        loss.backward()
        losses.append(float(loss))

    result = harness.measure(case, step, leaves=(hs, ws), reference=roofline(hs, ws, ht, wt))
    result["loss"] = losses[-1]
    return result


if __name__ == "__main__":
    harness.main(run_case)
