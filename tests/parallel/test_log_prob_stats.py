"""The per-token statistics of linear_log_probs, vocab-parallel on 2 gloo ranks, equal one process.

Every statistic (entropy, log-sum-sq, mean logit, is_top1) with softcap, logit scale,
temperature, a bias and ignored targets, on uneven and empty slices, with ties for the maximum
across the ranks, in float64 and bfloat16; through the explicit vocab-parallel function and
through a vocab-sharded DTensor head. Values, the gradients of every differentiable output
together (random upstream gradients), and the communication: per-row statistics only.
"""
from __future__ import annotations

import torch

from leanloss import linear_log_probs
from leanloss.parallel import vocab_parallel_linear_log_probs
from _spawn import logged_all_reduce, run_cases

ALL_STATS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
DIFFERENTIABLE = ("logp", "entropy", "log_sum_sq_probs", "mean_logit")

CASES = {
    "every_stat": dict(opts=dict(softcap=3.0, logit_scale=0.7, temperature=0.8), bias=True, ignore=True),
    "ties_across_ranks": dict(ties=True, opts=dict(temperature=0.5)),
    "uneven_and_empty_slice": dict(sizes=(17, 0), bias=True, opts=dict(logit_scale=1.3)),
    "top1_alone": dict(stats=("is_top1",), sizes=(4, 13), ignore=True, opts=dict(softcap=2.0)),
    "log_sum_sq_alone": dict(stats=("log_sum_sq_probs",), chunk=64, opts=dict(temperature=1.4)),
    "bf16": dict(dtype=torch.bfloat16, bias=True, ignore=True, opts=dict(softcap=5.0, temperature=0.9)),
    "dtensor": dict(dtensor=True, bias=True, ignore=True, sizes=(9, 8),
                    opts=dict(softcap=3.0, logit_scale=0.8, temperature=0.7)),
}


def _build(spec: dict, gen: torch.Generator) -> dict:
    sizes = spec.get("sizes", (10, 7))
    vocab, d, shape = sum(sizes), 5, (3, 4)
    dtype = spec.get("dtype", torch.float64)
    hidden = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=gen, dtype=torch.float64)
    target = torch.randint(vocab, shape, generator=gen)
    if spec.get("ties"):  # integer logits; classes 3 (rank 0), 12 and 15 (rank 1) tie for the max
        hidden = torch.randint(1, 4, (*shape, d), generator=gen).double()
        weight = torch.randint(-2, 3, (vocab, d), generator=gen).double()
        weight[[3, 12, 15]] = 6.0
        target = torch.tensor([3, 12, 15, 0] * 3).view(shape)
    if spec.get("ignore"):
        target[torch.rand(shape, generator=gen) < 0.3] = -100
    case = dict(spec=spec, sizes=sizes, target=target, hidden=hidden.to(dtype), weight=weight.to(dtype),
                up={name: torch.randn(shape, generator=gen, dtype=torch.float64) for name in DIFFERENTIABLE})
    if spec.get("bias"):
        case["bias"] = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype)
    return case


def _outputs(case: dict, h, w, b, fn, **kwargs) -> dict:
    """``fn``'s statistics and the gradients of every differentiable output together."""
    spec = case["spec"]
    out = fn(h, w, case["target"], return_stats=spec.get("stats", ALL_STATS),
             chunk_size=spec.get("chunk", 4), **kwargs, **spec["opts"])._asdict()
    total = sum((out[name].double() * case["up"][name]).sum()
                for name in DIFFERENTIABLE if out[name] is not None)
    total.backward()
    return {name: None if value is None else value.detach() for name, value in out.items()}


def _rank(case: dict, rank: int) -> dict:
    spec, sizes = case["spec"], case["sizes"]
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    h = case["hidden"].clone().requires_grad_()
    with logged_all_reduce() as comm:
        if spec.get("dtensor"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor
            mesh = init_device_mesh("cpu", (2,))
            w = distribute_tensor(case["weight"].clone(), mesh, [Shard(0)]).requires_grad_()
            b = (distribute_tensor(case["bias"].clone(), mesh, [Shard(0)]).requires_grad_()
                 if "bias" in case else None)
            out = _outputs(case, h, w, b, linear_log_probs, bias=b)
            grads = dict(w=w.grad.to_local(), b=None if b is None else b.grad.to_local())
        else:
            w = case["weight"][local].clone().requires_grad_()
            b = case["bias"][local].clone().requires_grad_() if "bias" in case else None
            out = _outputs(case, h, w, b, vocab_parallel_linear_log_probs, bias=b)
            grads = dict(w=w.grad, b=None if b is None else b.grad)
    return dict(out=out, h=h.grad, **grads, comm=comm)


def _one_process(case: dict) -> dict:
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    b = case["bias"].clone().requires_grad_() if "bias" in case else None
    out = _outputs(case, h, w, b, linear_log_probs, bias=b)
    return dict(out=out, h=h.grad, w=w.grad, b=None if b is None else b.grad)


def _differences(name: str, case: dict, rank: int, got: dict, want: dict) -> list:
    spec, sizes = case["spec"], case["sizes"]
    low = spec.get("dtype", torch.float64) != torch.float64
    tol = dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-10, atol=1e-11)
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    failures = []
    for field, value in want["out"].items():
        mine = got["out"][field]
        if value is None or mine is None:
            if (value is None) != (mine is None):
                failures.append(f"{name} rank {rank}: {field} is {mine} vs {value}")
        elif field == "is_top1":
            if not torch.equal(mine, value):
                failures.append(f"{name} rank {rank}: is_top1 {mine} vs {value}")
        elif mine.dtype != value.dtype or not torch.allclose(mine.double(), value.double(), **tol):
            failures.append(f"{name} rank {rank}: {field} {mine} vs {value}")
    pairs = [("h", got["h"], want["h"]), ("w", got["w"], want["w"][local])]
    if want["b"] is not None:
        pairs.append(("b", got["b"], want["b"][local]))
    for what, mine, ref in pairs:
        if mine is None or mine.shape != ref.shape or not torch.allclose(mine.double(), ref.double(), **tol):
            failures.append(f"{name} rank {rank}: gradient of {what} differs: {mine} vs {ref}")
    # O(tokens): per block one MAX and one SUM of a few numbers per row (at most 5: S, U, Q, Y
    # and the target's logit), and the hidden states' gradient
    rows = int((case["target"] != -100).sum())
    chunk = min(rows, spec.get("chunk", 4))
    blocks = [s for s in got["comm"] if s != rows * case["hidden"].shape[-1]]
    if spec.get("dtensor"):
        blocks = [s for s in blocks if s > 1]  # the DTensor route's setup exchanges
    if not blocks or max(blocks) > 5 * chunk:
        failures.append(f"{name} rank {rank}: collectives moved more than row statistics: {got['comm']}")
    return failures


def test_statistics_on_two_ranks_equal_one_process(tmp_path):
    gen = torch.Generator().manual_seed(20)
    cases = {name: _build(spec, gen) for name, spec in CASES.items()}
    results = run_cases(_rank, 2, cases, tmp_path)
    failures = []
    for name, case in cases.items():
        want = _one_process(case)
        for rank, res in enumerate(results):
            failures += _differences(name, case, rank, res[name], want)
    ties = cases["ties_across_ranks"]
    assert _one_process(ties)["out"]["is_top1"].view(-1)[:3].tolist() == [True, False, False]
    assert not failures, "\n".join(failures)
