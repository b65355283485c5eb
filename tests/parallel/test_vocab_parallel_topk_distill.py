"""vocab_parallel_linear_topk_distill_loss against linear_topk_distill_loss on the whole head and
the dense topk_distill_loss: in a gloo world of two ranks (even, uneven and empty slices, fp64,
fp32 and bf16, every reduction, the hard term, a temperature, duplicate and padding ids,
ignored rows, and a Shard(0) DTensor head given to linear_topk_distill_loss), in a world of one
rank, and its argument errors. Needs no transformers."""
from __future__ import annotations

import pytest
import torch

import leanloss
from _spawn import run_cases, run_ranks
from leanloss.errors import LeanlossTypeError, LeanlossValueError, TargetOutOfRangeError
from leanloss.parallel import vocab_parallel_linear_topk_distill_loss

N, D, K = 13, 5, 4


def _case(seed: int, sizes, dtype, *, dtensor: bool = False, **opts) -> dict:
    """Inputs of one case: a head of ``sum(sizes)`` classes, GLOBAL teacher ids with duplicates
    and padding (one row of padding only), ignored rows, a non-uniform upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    v = sum(sizes)
    ids = torch.stack([torch.randperm(v, generator=g)[:K] for _ in range(N)])
    ids[1, 1] = ids[1, 0]
    ids[6, 2:] = ids[6, 0]
    ids[2, 2:] = -1
    ids[4] = -1
    target = torch.randint(v, (N,), generator=g)
    target[[0, 9]] = -100
    target[3] = ids[3, 1]  # the hard term's point at a teacher id
    return {"sizes": sizes, "dtensor": dtensor, "opts": {"chunk_size": 4, **opts},
            "hidden": torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype),
            "weight": torch.randn(v, D, generator=g, dtype=torch.float64).to(dtype),
            "bias": torch.randn(v, generator=g, dtype=torch.float64).to(dtype),
            "ids": ids, "logprobs": torch.log_softmax(torch.randn(N, K, generator=g), -1) - 1.0,
            "target": target, "upstream": torch.linspace(0.5, 1.5, N, dtype=torch.float64)}


CASES = {
    "fp64_uneven_mean": _case(1, (9, 7), torch.float64),
    "fp64_uneven_none_hard_temperature": _case(2, (9, 7), torch.float64, reduction="none", hard_weight=0.3,
                                               temperature=2.0),
    "fp64_empty_slice_sum_hard": _case(3, (16, 0), torch.float64, reduction="sum", hard_weight=0.4,
                                       temperature=0.7),
    "fp64_hard_only": _case(4, (8, 8), torch.float64, hard_weight=1.0),
    "fp32_even_none_temperature": _case(5, (8, 8), torch.float32, reduction="none", temperature=1.5),
    "fp32_uneven_mean_hard": _case(6, (9, 7), torch.float32, hard_weight=0.5),
    "bf16_uneven_sum_hard": _case(7, (9, 7), torch.bfloat16, reduction="sum", hard_weight=0.2, temperature=1.3),
    "bf16_even_none_one_block": _case(8, (8, 8), torch.bfloat16, reduction="none", chunk_size=None),
    "dtensor_route_none_hard": _case(9, (8, 7), torch.float64, dtensor=True, reduction="none", hard_weight=0.3,
                                     temperature=1.7),
}


def _loss_and_grads(fn, case: dict, weight, bias, *args, **kwargs) -> dict:
    h = case["hidden"].clone().requires_grad_()
    loss = fn(h, weight, case["ids"], case["logprobs"], case["target"], *args, student_bias=bias,
              **case["opts"], **kwargs)
    loss.backward(case["upstream"].to(loss.dtype) if case["opts"].get("reduction") == "none" else None)
    return {"loss": loss.detach(), "hidden": h.grad}


def _run_rank(case: dict, rank: int) -> dict:
    if case["dtensor"]:  # the plain fused loss, routed by a Shard(0) head
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (len(case["sizes"]),))
        w, b = (distribute_tensor(case[k].clone(), mesh, [Shard(0)]).requires_grad_() for k in ("weight", "bias"))
        out = _loss_and_grads(leanloss.linear_topk_distill_loss, case, w, b)
        return {**out, "weight": w.grad.full_tensor(), "bias": b.grad.full_tensor(),
                "placements": [str(tuple(x.grad.placements)) for x in (w, b)]}
    start = sum(case["sizes"][:rank])
    local = slice(start, start + case["sizes"][rank])
    w, b = (case[k][local].clone().requires_grad_() for k in ("weight", "bias"))
    out = _loss_and_grads(vocab_parallel_linear_topk_distill_loss, case, w, b)
    return {**out, "weight": w.grad, "bias": b.grad}


def _whole(case: dict) -> dict:
    """The one-process fused loss on the whole head, and the dense oracle in float64."""
    w, b = (case[k].clone().requires_grad_() for k in ("weight", "bias"))
    fused = {**_loss_and_grads(leanloss.linear_topk_distill_loss, case, w, b), "weight": w.grad, "bias": b.grad}
    leaves = {k: case[k].double().requires_grad_() for k in ("hidden", "weight", "bias")}
    opts = {k: v for k, v in case["opts"].items() if k != "chunk_size"}
    loss = leanloss.topk_distill_loss(leaves["hidden"] @ leaves["weight"].T + leaves["bias"], case["ids"],
                                      case["logprobs"], case["target"], **opts)
    loss.backward(case["upstream"] if opts.get("reduction") == "none" else None)
    return fused, {"loss": loss.detach(), **{k: x.grad for k, x in leaves.items()}}


def _mismatch(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``got`` is off ``want`` by more than ``dtype``'s rounding allows."""
    if dtype == torch.bfloat16:
        return float((got.double() - want.double()).norm()) > 2e-2 * float(want.double().norm()) + 1e-6
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    return not torch.allclose(got.double(), want.double(), **tol)


def test_two_ranks_equal_the_one_process_loss_and_the_dense_oracle(tmp_path):
    results = run_cases(_run_rank, 2, CASES, tmp_path, timeout_s=120.0)
    failures = []
    for name, case in CASES.items():
        fused, dense = _whole(case)
        dtype = case["hidden"].dtype
        for rank, res in enumerate(results):
            got = res[name]
            start = sum(case["sizes"][:rank])
            local = slice(start, start + case["sizes"][rank]) if not case["dtensor"] else slice(None)
            for key in ("loss", "hidden", "weight", "bias"):
                for ref_name, ref in (("one process", fused), ("dense", dense)):
                    want = ref[key][local] if key in ("weight", "bias") else ref[key]
                    # fp32 against the fp64 oracle: float32 statistics
                    dt = torch.bfloat16 if dtype == torch.float32 and ref_name == "dense" else dtype
                    if got[key].shape != want.shape or _mismatch(got[key], want, dt):
                        failures.append(f"{name} rank {rank}: {key} differs from the {ref_name} loss: "
                                        f"{got[key]} vs {want}")
            if case["dtensor"] and got["placements"] != ["(Shard(dim=0),)"] * 2:
                failures.append(f"{name} rank {rank}: gradient placements {got['placements']}")
    assert not failures, "\n".join(failures)


def _differing_teacher(rank: int, world: int, case: dict) -> dict:
    """Each rank's error (class, message) when rank 1's teacher ids, or its log-probabilities,
    differ from rank 0's in one entry; and the loss when they agree."""
    start = sum(case["sizes"][:rank])
    w = case["weight"][start:start + case["sizes"][rank]]
    out = {}
    for name in ("same", "topk_ids", "topk_logprobs"):
        ids, lps = case["ids"].clone(), case["logprobs"].clone()
        if rank == 1 and name == "topk_ids":
            ids[5, 0] = (ids[5, 0] + 1) % sum(case["sizes"])
        if rank == 1 and name == "topk_logprobs":
            lps[5, 0] -= 0.25
        try:
            loss = vocab_parallel_linear_topk_distill_loss(case["hidden"], w, ids, lps, case["target"])
            out[name] = (None, float(loss))
        except Exception as exc:  # noqa: BLE001 -- reported to the test
            out[name] = (type(exc), str(exc))
    return out


def test_teacher_entries_must_agree_across_ranks(tmp_path):
    """Different top-k ids or log-probabilities on one rank raise on EVERY rank, naming the
    argument (no rank is left waiting in a collective, no loss is silently wrong)."""
    results = run_ranks(_differing_teacher, 2, CASES["fp64_uneven_mean"], tmp_path, timeout_s=60)
    for rank, res in enumerate(results):
        assert res["same"][0] is None, res["same"]
        for name in ("topk_ids", "topk_logprobs"):
            error, message = res[name]
            assert error is LeanlossValueError and f"'{name}'" in message and "identical" in message, (rank, res)


@pytest.mark.parametrize("reduction, temperature, hard_weight", [
    ("mean", 1.0, 0.0), ("none", 2.0, 0.4), ("sum", 0.5, 1.0),
])
def test_world_of_one_equals_linear_topk_distill_loss(reduction, temperature, hard_weight):
    """No torch.distributed at all: a world of one rank holding the whole head (the shard path)."""
    case = _case(11, (15,), torch.float64, reduction=reduction, temperature=temperature, hard_weight=hard_weight)
    results = []
    for fn in (leanloss.linear_topk_distill_loss, vocab_parallel_linear_topk_distill_loss):
        w, b = (case[k].clone().requires_grad_() for k in ("weight", "bias"))
        results.append({**_loss_and_grads(fn, case, w, b), "weight": w.grad, "bias": b.grad})
    for key, want in results[0].items():
        torch.testing.assert_close(results[1][key], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change, error, words", [
    ({"target": None, "hard_weight": 0.5}, LeanlossValueError, ["'target'", "hard_weight"]),
    ({"student_local_weight": torch.randn(7, 3)}, LeanlossValueError, ["'student_local_weight'"]),
    ({"student_bias": torch.randn(7, dtype=torch.float64)}, TypeError, ["'student_bias'"]),
    ({"topk_ids": torch.tensor([[0, 7], [1, 2], [3, -1]])}, TargetOutOfRangeError, ["'topk_ids'", "7"]),
    ({"topk_ids": torch.tensor([[0, 1], [1, 2]])}, LeanlossValueError, ["'topk_ids'", "(3, 'k')"]),
    ({"topk_ids": torch.tensor([[0.0, 1.0], [1.0, 2.0], [3.0, 4.0]])}, LeanlossTypeError, ["'topk_ids'", "int64"]),
    ({"topk_logprobs": torch.zeros(3, 3)}, LeanlossValueError, ["'topk_logprobs'"]),
    ({"target": torch.tensor([0, 7, 1])}, TargetOutOfRangeError, ["'target'", "7"]),
    ({"group": object()}, LeanlossValueError, ["'group'", "init_process_group"]),
    ({"temperature": 0.0}, LeanlossValueError, ["'temperature'"]),
    ({"hard_weight": 1.5}, LeanlossValueError, ["'hard_weight'"]),
    ({"vocab_start": 3}, LeanlossValueError, ["'vocab_start'"]),
])
def test_errors_name_the_argument(change, error, words):
    args = {"student_hidden": torch.randn(3, 4), "student_local_weight": torch.randn(7, 4),
            "topk_ids": torch.tensor([[0, 1], [1, 2], [3, -1]]), "topk_logprobs": torch.full((3, 2), -1.0),
            "target": torch.tensor([0, 6, 1]), **change}
    with pytest.raises(error) as info:
        vocab_parallel_linear_topk_distill_loss(**args)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_world_of_one_dtensor_heads_route_like_plain_ones():
    """A Shard(0) head runs the vocab-parallel path, a Replicate one the local loss; both equal
    the plain call, with gradients of the weight's placement."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    case = _case(12, (15,), torch.float64, reduction="none", temperature=1.4, hard_weight=0.3)
    w, b = (case[k].clone().requires_grad_() for k in ("weight", "bias"))
    want = {**_loss_and_grads(leanloss.linear_topk_distill_loss, case, w, b), "weight": w.grad}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for placement in (Shard(0), Replicate()):
            w, b = (distribute_tensor(case[k].clone(), mesh, [placement]).requires_grad_() for k in ("weight", "bias"))
            got = _loss_and_grads(leanloss.linear_topk_distill_loss, case, w, b)
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got["hidden"], want["hidden"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(w.grad.full_tensor(), want["weight"], rtol=1e-10, atol=1e-12)
            assert tuple(w.grad.placements) == (placement,)
    finally:
        dist.destroy_process_group()
