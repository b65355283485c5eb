"""leanloss.parallel against the unsharded float64 reference, in real gloo worlds.

Spawning a world is the slow part, so each world size is spawned ONCE and runs every case;
the parent builds the inputs and the float64 references, the ranks write their losses and
gradients to files, and the parent compares (one assertion listing every failing case).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import leanloss
from _oracle import cross_entropy_reference, linear_cross_entropy_reference
from _spawn import run_ranks
from leanloss._checks import TARGET_SUMMARY_SIZE, LeanlossValueError, TargetOutOfRangeError
from leanloss.parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy


# ------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------

# Uneven slices everywhere; V=10 over 4 ranks.
DEFAULT_SIZES = {1: [7], 2: [4, 3], 4: [3, 3, 2, 2]}

OPTIONS = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "class_weight": {"class_weight": True},
    "smoothing": {"label_smoothing": 0.2},
    "smoothing_one": {"label_smoothing": 1.0, "class_weight": True},
    "z_loss": {"z_loss": 0.1},
    "num_items": {"num_items": 13},
    "ignore": {"ignore": True},
    "ignore_index_in_vocab": {"ignore_index": 2, "ignore": True},
    "combined": {"class_weight": True, "label_smoothing": 0.1, "z_loss": 0.05, "ignore": True, "num_items": 11},
    "combined_sum": {"reduction": "sum", "class_weight": True, "label_smoothing": 0.3, "z_loss": 0.2, "ignore": True},
    "combined_none": {"reduction": "none", "class_weight": True, "label_smoothing": 0.1, "z_loss": 0.05, "ignore": True},
}


def _cases(world: int) -> dict:
    """name -> spec; the specs are the same for both forms unless a form is named."""
    cases = {}
    for form in ("logits", "linear"):
        for opt_name, opts in OPTIONS.items():
            cases[f"{form}/{opt_name}"] = {"form": form, "opts": opts}
        specials = {
            "all_ignored_mean": {"opts": {"ignore_all": True}},
            "all_ignored_sum": {"opts": {"ignore_all": True, "reduction": "sum"}},
            "targets_on_last_rank": {"opts": {"class_weight": True, "label_smoothing": 0.1}, "targets": "last_rank"},
            "leading_shape": {"shape": (2, 3, 4), "opts": {"ignore": True, "z_loss": 0.1}},
            "explicit_vocab_start": {"explicit_start": True, "opts": {"class_weight": True, "label_smoothing": 0.2}},
            "bf16": {"dtype": torch.bfloat16, "opts": {"class_weight": True, "label_smoothing": 0.1, "z_loss": 0.05, "ignore": True}},
            "bf16_none": {"dtype": torch.bfloat16, "opts": {"reduction": "none", "ignore": True}},
            "out_of_vocab": {"targets": "out_of_vocab", "opts": {}},
            # only the last rank's target is bad: every rank must raise, none may wait
            "out_of_vocab_on_last_rank": {"targets": "out_of_vocab", "last_rank_only": True, "opts": {}},
        }
        if world == 4:
            specials["empty_slice"] = {"sizes": [4, 0, 3, 3], "opts": {"label_smoothing": 0.2, "class_weight": True}}
        for name, spec in specials.items():
            cases[f"{form}/{name}"] = {"form": form, **spec}
    cases["linear/no_bias_chunked"] = {"form": "linear", "bias": False, "chunk": 2, "opts": {"z_loss": 0.1}}
    cases["linear/one_chunk"] = {"form": "linear", "chunk": 64, "opts": {"label_smoothing": 0.1}}
    return cases


def _layout(spec: dict, world: int):
    """(vocab, sizes per rank, start per rank)."""
    sizes = spec.get("sizes", DEFAULT_SIZES[world])
    order = list(range(world))[::-1] if spec.get("explicit_start") else list(range(world))
    starts, offset = [0] * world, 0
    for r in order:  # explicit_start: rank 0 holds the LAST slice of the vocabulary
        starts[r], offset = offset, offset + sizes[r]
    return sum(sizes), sizes, starts


def _build(spec: dict, world: int, gen: torch.Generator) -> dict:
    vocab, sizes, starts = _layout(spec, world)
    shape = spec.get("shape", (9,))
    opts = dict(spec["opts"])
    dtype = spec.get("dtype", torch.float64)
    ignore_index = opts.get("ignore_index", -100)
    n = torch.Size(shape).numel()
    target = torch.randint(vocab, (n,), generator=gen)
    if spec.get("targets") == "last_rank":
        last = max(range(world), key=lambda r: starts[r])
        target = starts[last] + torch.randint(sizes[last], (n,), generator=gen)
    if opts.pop("ignore", False):
        target[torch.randperm(n, generator=gen)[: n // 3]] = ignore_index
    if opts.pop("ignore_all", False):
        target[:] = ignore_index
    if spec.get("targets") == "out_of_vocab" and not spec.get("last_rank_only"):
        target[n // 2] = vocab
    target = target.reshape(shape)
    if opts.pop("class_weight", False):
        opts["class_weight"] = torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.2
    case = {"spec": spec, "opts": opts, "target": target, "vocab": vocab, "sizes": sizes, "starts": starts}
    if spec["form"] == "logits":
        case["logits"] = (3 * torch.randn(*shape, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    else:
        d = 5
        case["hidden"] = torch.randn(*shape, d, generator=gen, dtype=torch.float64).to(dtype)
        case["weight"] = torch.randn(vocab, d, generator=gen, dtype=torch.float64).to(dtype)
        if spec.get("bias", True):
            case["bias"] = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype)
    if opts.get("reduction") == "none":
        case["upstream"] = torch.randn(shape, generator=gen, dtype=torch.float64)
    return case


# ------------------------------------------------------------------------------------------
# one rank's work
# ------------------------------------------------------------------------------------------


def _run_case(case: dict, rank: int) -> dict:
    spec, opts = case["spec"], dict(case["opts"])
    start, size = case["starts"][rank], case["sizes"][rank]
    if spec.get("explicit_start"):
        opts["vocab_start"] = start
    local = slice(start, start + size)
    target = case["target"]
    if spec.get("last_rank_only") and rank == len(case["sizes"]) - 1:
        target = target.clone()
        target.view(-1)[target.numel() // 2] = case["vocab"]
    leaves = {}
    if spec["form"] == "logits":
        leaves["logits"] = case["logits"][..., local].detach().clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(leaves["logits"], target, **opts)
    else:
        leaves["hidden"] = case["hidden"].detach().clone().requires_grad_()
        leaves["weight"] = case["weight"][local].detach().clone().requires_grad_()
        if "bias" in case:
            leaves["bias"] = case["bias"][local].detach().clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(
            leaves["hidden"], leaves["weight"], target, bias=leaves.get("bias"),
            chunk_size=spec.get("chunk", 4), **opts,
        )
    upstream = case.get("upstream")
    loss.backward(None if upstream is None else upstream.to(loss.dtype))
    return {"loss": loss.detach(), "grads": {k: v.grad for k, v in leaves.items()}}


class _CommLog:
    """Records the number of elements of every collective call (to prove logits never travel)."""

    def __init__(self):
        self.sizes = []
        self._originals = {op: getattr(dist, op) for op in ("all_reduce", "all_gather")}

    def __enter__(self):
        for op, original in self._originals.items():
            def logged(tensor_or_list, *args, _original=original, **kwargs):
                t = tensor_or_list[0] if isinstance(tensor_or_list, list) else tensor_or_list
                self.sizes.append(t.numel())
                return _original(tensor_or_list, *args, **kwargs)
            setattr(dist, op, logged)
        return self

    def __exit__(self, *exc):
        for op, original in self._originals.items():
            setattr(dist, op, original)


def _run_all(cases: dict, rank: int) -> dict:
    """Every case in order; after an unexpected error the ranks may be out of step, so stop."""
    results, broken = {}, None
    for name, case in cases.items():
        if broken is not None:
            results[name] = {"error": RuntimeError, "message": f"not run: {broken} failed before"}
            continue
        try:
            with _CommLog() as log:
                results[name] = _run_case(case, rank)
            results[name]["comm_sizes"] = log.sizes
        except Exception as exc:  # recorded; the parent decides whether it was expected
            results[name] = {"error": exc.__class__, "message": str(exc)}
            if not isinstance(exc, TargetOutOfRangeError):
                broken = name
    return results


def _work(rank: int, world: int, cases: dict) -> dict:
    return _run_all(cases, rank)


# ------------------------------------------------------------------------------------------
# the float64 reference and the comparison
# ------------------------------------------------------------------------------------------


def _reference(case: dict) -> dict:
    """Unsharded loss and gradients in float64 (the shared CE + z-loss oracle)."""
    opts, target = case["opts"], case["target"]
    form = case["spec"]["form"]
    leaves = {k: case[k].to(torch.float64, copy=True).requires_grad_() for k in ("logits", "hidden", "weight", "bias") if k in case}
    if form == "logits":
        loss = cross_entropy_reference(leaves["logits"], target, **opts)
    else:
        loss = linear_cross_entropy_reference(leaves["hidden"], leaves["weight"], target, leaves.get("bias"), **opts)
    grads = torch.autograd.grad(loss, list(leaves.values()), case.get("upstream"), allow_unused=True)
    return {"loss": loss.detach(), "grads": dict(zip(leaves, grads))}


def _close(got, want, low_precision: bool) -> bool:
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        return False
    scale = max(1.0, float(want.abs().nan_to_num().max())) if want.numel() else 1.0
    atol, rtol = (3e-2 * scale, 3e-2) if low_precision else (1e-10 * scale, 1e-9)
    return torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)


def _check(name: str, case: dict, results_by_rank: list) -> list:
    """Failure messages for one case over all ranks (empty when every rank matches)."""
    spec = case["spec"]
    if spec.get("targets") == "out_of_vocab":
        failures = []
        for rank, res in enumerate(results_by_rank):
            if not (res.get("error") is TargetOutOfRangeError and issubclass(res["error"], IndexError)
                    and "'target'" in res["message"] and str(case["vocab"]) in res["message"]):
                failures.append(f"{name} rank {rank}: expected TargetOutOfRangeError naming 'target', got {res}")
        return failures
    ref = _reference(case)
    low = spec.get("dtype", torch.float64) != torch.float64
    failures = []
    for rank, res in enumerate(results_by_rank):
        if "error" in res:
            failures.append(f"{name} rank {rank}: raised {res['error'].__name__}: {res['message']}")
            continue
        local = slice(case["starts"][rank], case["starts"][rank] + case["sizes"][rank])
        if len(results_by_rank) > 1 and not _only_row_statistics_travel(case, res["comm_sizes"]):
            failures.append(f"{name} rank {rank}: a collective moved more than per-row statistics: "
                            f"{res['comm_sizes']}")
        if not _close(res["loss"], ref["loss"], low):
            failures.append(f"{name} rank {rank}: loss {res['loss']} != reference {ref['loss']}")
        for key, want in ref["grads"].items():
            if key == "logits":
                want = want[..., local]
            elif key in ("weight", "bias"):
                want = want[local]
            got = res["grads"][key]
            if got is None or got.dtype != case[key].dtype or not _close(got, want, low):
                failures.append(f"{name} rank {rank}: grad of {key} differs: {got} vs {want}")
    return failures


def _only_row_statistics_travel(case: dict, sizes: list) -> bool:
    """Collectives carry at most 3 numbers per row of a block (plus, for the linear form, the
    (rows, D) gradient of the replicated hidden states), besides the one setup all-gather of a
    slice size and the checks' target summary; some communication must have happened."""
    setup = 1 + TARGET_SUMMARY_SIZE
    rows = int((case["target"] != case["opts"].get("ignore_index", -100)).sum())
    if case["spec"]["form"] == "logits":
        return bool(sizes) and max(sizes) <= max(3 * rows, setup)
    chunk = min(rows, case["spec"].get("chunk", 4))
    block_sizes = [s for s in sizes if s != rows * case["hidden"].shape[-1]]
    return bool(block_sizes) and max(block_sizes) <= max(3 * chunk, setup)


def _cases_with_inputs(world: int) -> dict:
    gen = torch.Generator().manual_seed(1234 + world)
    return {name: _build(spec, world, gen) for name, spec in _cases(world).items()}


def _spawn_world(world: int, tmp_path) -> tuple:
    cases = _cases_with_inputs(world)
    return cases, run_ranks(_work, world, cases, tmp_path, timeout_s=20)


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_every_case_equals_unsharded_reference(world, tmp_path):
    cases, results = _spawn_world(world, tmp_path)
    failures = []
    for name, case in cases.items():
        failures += _check(name, case, [res[name] for res in results])
    assert len(cases) > 40 and not failures, "\n".join(failures)


def test_world_of_one_equals_unsharded_with_and_without_process_group():
    cases = _cases_with_inputs(1)
    failures = [f for name, case in cases.items() for f in _check(name, case, [_run_all({name: case}, 0)[name]])]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        failures += [f for name, case in cases.items() for f in _check(name, case, [_run_all({name: case}, 0)[name]])]
    finally:
        dist.destroy_process_group()
    assert not failures, "\n".join(failures)


def test_world_of_one_equals_leanloss_cross_entropy_and_linear_cross_entropy():
    """The single-process functions are the unsharded ones (dense CE, and the fused CE's engine)."""
    checked = 0
    for name, case in _cases_with_inputs(1).items():
        opts, spec = dict(case["opts"]), case["spec"]
        if spec.get("targets") == "out_of_vocab":
            continue
        got = _run_case(case, 0)
        low = spec.get("dtype", torch.float64) != torch.float64
        if spec["form"] == "linear":
            leaves = {k: case[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias") if k in case}
            want = leanloss.linear_cross_entropy(leaves["hidden"], leaves["weight"], case["target"],
                                                 leaves.get("bias"), **opts)
        elif opts.pop("z_loss", 0.0) or opts.pop("num_items", None) is not None:
            continue
        else:
            leaves = {"logits": case["logits"].detach().clone().requires_grad_()}
            z = leaves["logits"].movedim(-1, 1) if leaves["logits"].dim() > 2 else leaves["logits"]
            want = leanloss.cross_entropy(z, case["target"], weight=opts.pop("class_weight", None), **opts)
        want.backward(None if case.get("upstream") is None else case["upstream"].to(want.dtype))
        assert want.dtype == got["loss"].dtype, name
        assert _close(got["loss"], want.detach(), low), name
        for key, leaf in leaves.items():
            assert _close(got["grads"][key], leaf.grad, low), (name, key)
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"target": torch.tensor([0, 7, 1])}, TargetOutOfRangeError, ["'target'", "7"]),
        ({"target": torch.tensor([0, -3, 1])}, IndexError, ["'target'", "-3"]),
        ({"target": torch.tensor([0, 1])}, LeanlossValueError, ["'target'", "(3,)"]),
        ({"target": torch.tensor([0.0, 1.0, 2.0])}, TypeError, ["'target'", "int64"]),
        ({"class_weight": torch.ones(3)}, LeanlossValueError, ["'class_weight'", "7"]),
        ({"vocab_start": 2}, LeanlossValueError, ["'vocab_start'", "[0, 0]"]),
        ({"group": object()}, LeanlossValueError, ["'group'", "init_process_group"]),
        ({"z_loss": -1.0}, LeanlossValueError, ["'z_loss'"]),
        ({"label_smoothing": 1.5}, LeanlossValueError, ["'label_smoothing'"]),
        ({"reduction": "avg"}, ValueError, ["'reduction'"]),
    ],
)
@pytest.mark.parametrize("form", ["logits", "linear"])
def test_errors_name_the_argument(form, kwargs, error, words):
    kwargs = dict(kwargs)
    target = kwargs.pop("target", torch.tensor([0, 6, 1]))
    if form == "logits":
        call = lambda: vocab_parallel_cross_entropy(torch.randn(3, 7), target, **kwargs)  # noqa: E731
    else:
        call = lambda: vocab_parallel_linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 4), target, **kwargs)  # noqa: E731
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_single_row_logits_and_zero_dim_target_follow_torch():
    logits = torch.randn(7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor(4)
    for reduction in ("mean", "sum", "none"):
        got = vocab_parallel_cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
        want = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
        assert got.shape == want.shape
        grads = [torch.autograd.grad(x, logits)[0] for x in (got, want)]
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(*grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_single_process_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen).to(dtype)
    weight = torch.randn(300, 16, generator=gen).to(dtype)
    target = torch.randint(300, (37,), generator=gen)
    target[::5] = -100
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2, "class_weight": torch.rand(300, generator=gen) + 0.5}
    results = []
    for device in ("cpu", "cuda"):
        h = hidden.to(device, copy=True).requires_grad_()
        w = weight.to(device, copy=True).requires_grad_()
        kw = {**opts, "class_weight": opts["class_weight"].to(device)}
        lin = vocab_parallel_linear_cross_entropy(h, w, target.to(device), chunk_size=8, **kw)
        z = (h.detach() @ w.detach().T).requires_grad_()
        dense = vocab_parallel_cross_entropy(z, target.to(device), **kw)
        (lin + dense).backward()
        results.append([t.detach().double().cpu() for t in (lin, dense, h.grad, w.grad, z.grad)])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=tol, atol=tol)
