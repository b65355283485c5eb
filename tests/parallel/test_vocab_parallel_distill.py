"""vocab_parallel_linear_distill_loss against linear_distill_loss on the unsharded heads (itself
checked against dense torch in tests/linear/test_distill.py), in float64: in a real gloo world
of two ranks with uneven slices, in a world of one rank, and its argument errors. Needs no
transformers."""
from __future__ import annotations

import pytest
import torch

import leanloss
from _spawn import run_ranks
from leanloss.errors import LeanlossValueError, TargetOutOfRangeError
from leanloss.parallel import vocab_parallel_linear_distill_loss

SIZES = (7, 6)  # vocabulary rows per rank: uneven
N, D_STUDENT, D_TEACHER = 11, 5, 4

# name -> options; every case runs in the one spawned world
CASES = {
    "forward": dict(kind="forward"),
    "reverse_sum_hard": dict(kind="reverse", reduction="sum", hard_weight=0.4, temperature=2.0),
    "jsd_none_biases": dict(kind="jsd", beta=0.3, reduction="none", hard_weight=0.3, temperature=0.5,
                            biases=True),
    "jsd_beta_one": dict(kind="jsd", beta=1.0, hard_weight=1.0),
    "forward_rank_0_holds_the_last_slice": dict(kind="forward", hard_weight=0.2, swapped=True),
    "jsd_softcaps_and_scales": dict(kind="jsd", beta=0.4, reduction="none", hard_weight=0.3, temperature=1.5,
                                    student_softcap=1.5, teacher_softcap=2.0, student_logit_scale=0.8,
                                    teacher_logit_scale=1.3, biases=True),
}


def _inputs(gen: torch.Generator) -> dict:
    vocab = sum(SIZES)
    target = torch.randint(vocab, (N,), generator=gen)
    target[[2, 7]] = -100
    return {"student_hidden": torch.randn(N, D_STUDENT, generator=gen, dtype=torch.float64),
            "student_weight": torch.randn(vocab, D_STUDENT, generator=gen, dtype=torch.float64),
            "student_bias": torch.randn(vocab, generator=gen, dtype=torch.float64),
            "teacher_hidden": torch.randn(N, D_TEACHER, generator=gen, dtype=torch.float64),
            "teacher_weight": torch.randn(vocab, D_TEACHER, generator=gen, dtype=torch.float64),
            "teacher_bias": torch.randn(vocab, generator=gen, dtype=torch.float64),
            "target": target,
            "upstream": torch.linspace(0.5, 1.5, N, dtype=torch.float64)}


def _slices(swapped: bool) -> list:
    """This layout's vocabulary slice of each rank (``swapped``: rank 0 holds the last one)."""
    first, second = slice(0, SIZES[0]), slice(SIZES[0], sum(SIZES))
    return [second, first] if swapped else [first, second]


def _split(opts: dict) -> tuple:
    """(the loss's keywords, whether the heads have biases, whether the slices are swapped)."""
    opts = dict(opts)
    return opts, opts.pop("biases", False), opts.pop("swapped", False)


def _run_rank(inp: dict, opts: dict, rank: int) -> dict:
    opts, biases, swapped = _split(opts)
    local = _slices(swapped)[rank]
    h = inp["student_hidden"].clone().requires_grad_()
    w = inp["student_weight"][local].clone().requires_grad_()
    b = inp["student_bias"][local].clone().requires_grad_() if biases else None
    loss = vocab_parallel_linear_distill_loss(
        h, w, inp["teacher_hidden"], inp["teacher_weight"][local], inp["target"], student_bias=b,
        teacher_bias=inp["teacher_bias"][local] if biases else None, vocab_start=local.start,
        chunk_size=4, **opts)
    loss.backward(inp["upstream"] if opts.get("reduction") == "none" else None)
    return {"loss": loss.detach(), "hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}


def _work(rank: int, world: int, inp: dict) -> dict:
    return {name: _run_rank(inp, opts, rank) for name, opts in CASES.items()}


def _unsharded(inp: dict, opts: dict) -> dict:
    opts, biases, _ = _split(opts)
    h = inp["student_hidden"].clone().requires_grad_()
    w = inp["student_weight"].clone().requires_grad_()
    b = inp["student_bias"].clone().requires_grad_() if biases else None
    loss = leanloss.linear_distill_loss(h, w, inp["teacher_hidden"], inp["teacher_weight"], inp["target"],
                                        student_bias=b, teacher_bias=inp["teacher_bias"] if biases else None,
                                        **opts)
    loss.backward(inp["upstream"] if opts.get("reduction") == "none" else None)
    return {"loss": loss.detach(), "hidden": h.grad, "weight": w.grad, "bias": None if b is None else b.grad}


def test_two_ranks_equal_linear_distill_loss_on_the_whole_heads(tmp_path):
    inp = _inputs(torch.Generator().manual_seed(21))
    results = run_ranks(_work, len(SIZES), inp, tmp_path)
    failures = []
    for name, opts in CASES.items():
        want = _unsharded(inp, opts)
        for rank, res in enumerate(results):
            local = _slices(_split(opts)[2])[rank]
            for key, expected in want.items():
                expected = expected[local] if key in ("weight", "bias") and expected is not None else expected
                got = res[name][key]
                if (got is None) != (expected is None) or (
                        got is not None and not torch.allclose(got, expected, rtol=1e-10, atol=1e-12)):
                    failures.append(f"{name} rank {rank}: {key} {got} vs unsharded {expected}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("kind, temperature, hard_weight, reduction", [
    ("forward", 1.0, 0.0, "mean"), ("reverse", 2.0, 0.4, "sum"), ("jsd", 0.5, 0.3, "none"),
    ("jsd", 1.0, 1.0, "mean"), ("forward", 2.0, 0.5, "none"),
])
def test_world_of_one_equals_linear_distill_loss(kind, temperature, hard_weight, reduction):
    """No torch.distributed at all: a world of one rank holding the whole heads."""
    gen = torch.Generator().manual_seed(5)
    hs, ws, bs = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((11, 5), (13, 5), (13,)))
    ht, wt = torch.randn(11, 4, generator=gen, dtype=torch.float64), torch.randn(13, 4, generator=gen, dtype=torch.float64)
    target = torch.randint(13, (11,), generator=gen)
    target[[2, 7]] = -100
    upstream = torch.linspace(0.5, 1.5, 11, dtype=torch.float64) if reduction == "none" else None
    results = []
    for fn in (leanloss.linear_distill_loss, vocab_parallel_linear_distill_loss):
        leaves = [t.clone().requires_grad_() for t in (hs, ws, bs)]
        loss = fn(leaves[0], leaves[1], ht, wt, target, student_bias=leaves[2], kind=kind, beta=0.3,
                  temperature=temperature, hard_weight=hard_weight, reduction=reduction, chunk_size=4)
        loss.backward(upstream)
        results.append([loss.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change, error, words", [
    ({"target": None, "hard_weight": 0.5}, LeanlossValueError, ["'target'", "hard_weight"]),
    ({"teacher_local_weight": torch.randn(6, 3)}, LeanlossValueError, ["'teacher_local_weight'", "(6, 3)"]),
    ({"kind": "kl"}, ValueError, ["'kind'"]),
    ({"target": torch.tensor([0, 7, 1])}, TargetOutOfRangeError, ["'target'", "7"]),
    ({"group": object()}, LeanlossValueError, ["'group'", "init_process_group"]),
    ({"temperature": 0.0}, LeanlossValueError, ["'temperature'"]),
])
def test_errors_name_the_argument(change, error, words):
    args = {"student_hidden": torch.randn(3, 4), "student_local_weight": torch.randn(7, 4),
            "teacher_hidden": torch.randn(3, 3), "teacher_local_weight": torch.randn(7, 3),
            "target": torch.tensor([0, 6, 1]), **change}
    with pytest.raises(error) as info:
        vocab_parallel_linear_distill_loss(**args)
    assert all(word in str(info.value) for word in words), str(info.value)
