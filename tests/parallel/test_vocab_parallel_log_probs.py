"""vocab_parallel_linear_log_probs against the unsharded float64 reference: in a real gloo world
of two ranks (spawned once for every case; uneven and empty slices, bf16), where only per-row
statistics may travel, and in one process."""
from __future__ import annotations

import pytest
import torch

from leanloss import linear_log_probs
from leanloss.errors import LeanlossValueError, TargetOutOfRangeError
from leanloss.parallel import vocab_parallel_linear_log_probs

from _oracle import linear_log_probs_reference as reference
from _oracle import log_probs_objective as objective
from _spawn import logged_all_reduce, run_cases

PARALLEL_CASES = {
    "plain": dict(),
    "temperature_bias_ignore": dict(temperature=0.7, bias=True, ignore=True),
    "one_block": dict(chunk=64, temperature=1.3),
    "leading_shape": dict(shape=(2, 3, 4), ignore=True, bias=True),
    "targets_on_rank_1": dict(targets="last_rank", temperature=0.8),
    "uneven_and_empty_slice": dict(sizes=(17, 0), bias=True),
    "bf16": dict(dtype=torch.bfloat16, bias=True, ignore=True, temperature=0.9),
}


def _parallel_case(spec: dict, gen: torch.Generator) -> dict:
    sizes = spec.get("sizes", (10, 7))
    shape = spec.get("shape", (9,))
    vocab, d = sum(sizes), 5
    dtype = spec.get("dtype", torch.float64)
    target = torch.randint(vocab, shape, generator=gen)
    if spec.get("targets") == "last_rank":
        target = sizes[0] + torch.randint(sizes[1], shape, generator=gen)
    if spec.get("ignore"):
        target[torch.rand(shape, generator=gen) < 0.3] = -100
    case = dict(spec=spec, sizes=sizes, target=target,
                hidden=torch.randn(*shape, d, generator=gen, dtype=torch.float64).to(dtype),
                weight=torch.randn(vocab, d, generator=gen, dtype=torch.float64).to(dtype),
                up=[torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)])
    if spec.get("bias"):
        case["bias"] = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype)
    return case


def _parallel_rank(case: dict, rank: int) -> dict:
    spec, sizes = case["spec"], case["sizes"]
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"][local].clone().requires_grad_()
    b = case["bias"][local].clone().requires_grad_() if "bias" in case else None
    with logged_all_reduce() as comm:
        logp, ent = vocab_parallel_linear_log_probs(
            h, w, case["target"], bias=b, temperature=spec.get("temperature", 1.0),
            return_entropy=True, chunk_size=spec.get("chunk", 4))
        objective(logp, ent, *case["up"]).backward()
    return dict(logp=logp.detach(), ent=ent.detach(), h=h.grad, w=w.grad,
                b=None if b is None else b.grad, comm=comm)


def test_vocab_parallel_two_ranks_equal_unsharded_reference(tmp_path):
    gen = torch.Generator().manual_seed(11)
    cases = {name: _parallel_case(spec, gen) for name, spec in PARALLEL_CASES.items()}
    results = run_cases(_parallel_rank, 2, cases, tmp_path)
    failures = []
    for name, case in cases.items():
        spec = case["spec"]
        low = spec.get("dtype", torch.float64) != torch.float64
        h = case["hidden"].double().requires_grad_()
        w = case["weight"].double().requires_grad_()
        b = case["bias"].double().requires_grad_() if "bias" in case else None
        rl, re = reference(h, w, case["target"], b, temperature=spec.get("temperature", 1.0))
        grads = torch.autograd.grad(objective(rl, re, *case["up"]), [x for x in (h, w, b) if x is not None])
        want = dict(zip(["h", "w", "b"], grads))
        tol = dict(rtol=3e-2, atol=3e-2) if low else dict(rtol=1e-9, atol=1e-10)
        rows = int((case["target"] != -100).sum())
        for rank, res in enumerate(results):
            res = res[name]
            start = sum(case["sizes"][:rank])
            local = slice(start, start + case["sizes"][rank])
            pairs = [("logp", res["logp"], rl), ("entropy", res["ent"], re), ("h", res["h"], want["h"]),
                     ("w", res["w"], want["w"][local])]
            if b is not None:
                pairs.append(("b", res["b"], want["b"][local]))
            for what, got, ref in pairs:
                if got is None or not torch.allclose(got.double(), ref, **tol):
                    failures.append(f"{name} rank {rank}: {what} differs: {got} vs {ref}")
            # O(tokens): per-row statistics (at most 3 per row of a block) and the hidden gradient
            blocks = [s for s in res["comm"] if s != rows * case["hidden"].shape[-1]]
            if not blocks or max(blocks) > 3 * min(rows, spec.get("chunk", 4)):
                failures.append(f"{name} rank {rank}: collectives moved more than row statistics: {res['comm']}")
    assert not failures, "\n".join(failures)


def test_vocab_parallel_single_process_is_linear_log_probs():
    case = _parallel_case(dict(shape=(3, 4), bias=True, ignore=True), torch.Generator().manual_seed(3))
    h, w, b, t = case["hidden"], case["weight"], case["bias"], case["target"]
    got = vocab_parallel_linear_log_probs(h, w, t, bias=b, temperature=0.8, return_entropy=True)
    want = linear_log_probs(h, w, t, b, temperature=0.8, return_entropy=True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    with pytest.raises(TargetOutOfRangeError, match="'target'"):
        vocab_parallel_linear_log_probs(h, w, torch.full_like(t, sum(case["sizes"])))
    with pytest.raises(LeanlossValueError, match="'temperature'"):
        vocab_parallel_linear_log_probs(h, w, t, temperature=0)
