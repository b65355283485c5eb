"""leanloss inside torch's own distributed engines, in real gloo worlds on CPU.

DDP, FSDP2 (``fully_shard``), tensor parallel (``parallelize_module`` with ``ColwiseParallel``:
DTensor weights and logits) and FSDP2 + TP on a 2-D mesh, each against ONE process: the
unpatched transformers model (torch's own cross entropy) on the whole batch. Ignored targets are
spread unevenly over the data-parallel ranks (one micro-batch has none left), and every
data-parallel run accumulates gradients over micro-batches with the global
``num_items_in_batch``, so the gradients must equal those of one big batch.

Spawning a world (and importing transformers in it) is the slow part: each world size is
spawned once and runs every scenario; the ranks save their results and the parent compares.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import leanloss  # noqa: E402
from leanloss._checks import LeanlossValueError, TargetOutOfRangeError  # noqa: E402
from leanloss.integrations.transformers import apply_leanloss  # noqa: E402
from leanloss.parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy  # noqa: E402
from _oracle import linear_log_probs_reference, log_probs_objective  # noqa: E402
from _spawn import free_port, run_ranks  # noqa: E402
from _torch_versions import needs_fsdp2_on_cpu, needs_uneven_fsdp2_tp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

# A tiny Llama; vocab 37 splits unevenly (19 + 18 over 2 ranks, 10 + 10 + 10 + 7 over 4).
CONFIG = dict(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
BATCH, TOKENS, MICRO_STEPS = 2, 7, 2
# Fraction of ignored labels in each data-parallel rank's micro-batches (rank 0's second
# micro-batch ignores everything).
IGNORED = [[0.5, 1.0], [0.1, 0.0], [0.3, 0.6], [0.0, 0.2]]

# name -> (options, prefix of the inputs: "small_" is 9 classes, an empty shard on 4 ranks)
DISTILL_CASES = {"jsd": (dict(kind="jsd", beta=0.3, temperature=2.0, hard_weight=0.3), ""),
                 "forward": (dict(kind="forward", reduction="none"), ""),
                 "reverse": (dict(kind="reverse", reduction="sum", hard_weight=0.5, temperature=0.5), ""),
                 "jsd_9_classes": (dict(kind="jsd", hard_weight=0.2), "small_")}

# (world size, engines) -> {scenario name -> (data-parallel size, tensor-parallel size)}; the
# FSDP2 scenarios are worlds of their own, as older torch cannot run them on CPU (ENGINE_NEEDS).
WORLD_SCENARIOS = {
    (2, "ddp-tp"): {"ddp": (2, 1), "tp": (1, 2)},
    (4, "ddp-tp"): {"ddp": (4, 1), "tp": (1, 4)},
    (2, "fsdp"): {"fsdp": (2, 1)},
    (4, "fsdp"): {"fsdp": (4, 1)},
    (4, "fsdp-tp"): {"fsdp_tp": (2, 2)},
}
ENGINE_NEEDS = {"ddp-tp": [], "fsdp": [needs_fsdp2_on_cpu], "fsdp-tp": [needs_fsdp2_on_cpu, needs_uneven_fsdp2_tp]}


# ----------------------------------------------------------------------------------------------
# inputs, built once by the parent


def _model(state=None):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).double()
    if state is not None:
        model.load_state_dict(state)
    return model


def _micro_batches(dp: int, gen: torch.Generator) -> list:
    """``[dp rank][micro step] -> (input_ids, labels)``."""
    out = []
    for rank in range(dp):
        steps = []
        for fraction in IGNORED[rank][:MICRO_STEPS]:
            ids = torch.randint(CONFIG["vocab_size"], (BATCH, TOKENS), generator=gen)
            labels = ids.clone()
            labels[torch.rand(BATCH, TOKENS, generator=gen) < fraction] = -100
            steps.append((ids, labels))
        out.append(steps)
    return out


def _global_count(micro: list) -> int:
    """The number of targets that count over every rank and micro-step: the labels shifted as
    the causal loss shifts them (position i predicts labels[i + 1])."""
    return sum(int((labels[:, 1:] != -100).sum()) for steps in micro for _, labels in steps)


def _functional_inputs(gen: torch.Generator) -> dict:
    n, d, v = 9, 6, CONFIG["vocab_size"]
    target = torch.randint(v, (n,), generator=gen)
    target[[1, 4, 5]] = -100
    return {
        "logits": 3 * torch.randn(n, v, generator=gen, dtype=torch.float64),
        "small_logits": torch.randn(n, 9, generator=gen, dtype=torch.float64),
        "small_target": torch.randint(9, (n,), generator=gen),
        "small_weight": torch.randn(9, d, generator=gen, dtype=torch.float64),
        "small_bias": torch.randn(9, generator=gen, dtype=torch.float64),
        "small_teacher_weight": torch.randn(9, 4, generator=gen, dtype=torch.float64),
        "hidden": torch.randn(n, d, generator=gen, dtype=torch.float64),
        "weight": torch.randn(v, d, generator=gen, dtype=torch.float64),
        "bias": torch.randn(v, generator=gen, dtype=torch.float64),
        "class_weight": torch.rand(v, generator=gen, dtype=torch.float64) + 0.5,
        "upstream": torch.randn(n, generator=gen, dtype=torch.float64),
        "teacher_hidden": torch.randn(n, 4, generator=gen, dtype=torch.float64),
        "teacher_weight": torch.randn(v, 4, generator=gen, dtype=torch.float64),
        "target": target,
    }


def _inputs(world: int, engines: str) -> dict:
    """The scenarios of ``WORLD_SCENARIOS[world, engines]``; the DTensor functional inputs with
    the DDP and TP worlds only (they need no engine)."""
    gen = torch.Generator().manual_seed(100 + world)
    functional = _functional_inputs(gen)
    scenarios = {}
    for name, (dp, tp) in WORLD_SCENARIOS[world, engines].items():
        micro = _micro_batches(dp, gen)
        scenarios[name] = {"dp": dp, "tp": tp, "micro": micro, "num_items": _global_count(micro)}
    return {"state": _model().state_dict(), "scenarios": scenarios,
            "functional": functional if engines == "ddp-tp" else None}


# ----------------------------------------------------------------------------------------------
# the ranks


def _full(t):
    """A DTensor gathered whole (for the comparison only), a plain tensor as is."""
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def _placements(t) -> str:
    return str(tuple(t.placements)) if isinstance(t, torch.distributed.tensor.DTensor) else "plain"


def _tp_plan(model) -> dict:
    """Megatron-style: attention and MLP column- then row-parallel, the head column-parallel
    with its logits left sharded on the vocabulary (``use_local_output=False``)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    plan = {"lm_head": ColwiseParallel(use_local_output=False)}
    for i in range(len(model.model.layers)):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    return plan


def _train(rank: int, world: int, name: str, scenario: dict, state: dict) -> dict:
    """Accumulate gradients over the micro-steps with the global token count, as a user would."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    dp, tp = scenario["dp"], scenario["tp"]
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    model = _model(state)
    if tp > 1:
        parallelize_module(model, mesh["tp"], _tp_plan(model))
        apply_leanloss(model)  # the probe runs on the tensor-parallel model
    if name.startswith("fsdp"):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    if tp == 1:
        apply_leanloss(model)  # after fully_shard: the probe runs through FSDP's hooks
    wrapped = DistributedDataParallel(model) if name == "ddp" else model
    losses = []
    steps = scenario["micro"][rank // tp]
    for k, (ids, labels) in enumerate(steps):
        sync = contextlib.nullcontext() if name != "ddp" or k == len(steps) - 1 else wrapped.no_sync()
        with sync:
            out = wrapped(input_ids=ids, labels=labels, num_items_in_batch=scenario["num_items"])
            # DDP and FSDP average the ranks' gradients; the loss is already over the global
            # count, so undo the average.
            (out.loss * dp).backward()
        losses.append(out.loss.detach())
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    return {"losses": torch.stack(losses), "grads": grads,
            "head_grad": _placements(model.lm_head.weight.grad), "logits": out.logits}


def _errors(call) -> dict:
    try:
        call()
    except Exception as exc:  # recorded for the parent
        return {"error": type(exc), "message": str(exc)}
    return {"error": None}


def _functional(rank: int, world: int, inp: dict) -> dict:
    """The DTensor forms of the losses, called directly."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}

    def leaf(t, placements):
        return distribute_tensor(t.clone(), mesh, placements).requires_grad_()

    # logits sharded on the last dim, uneven (37 classes) and with an empty shard (9 over 4)
    for key, target_key, opts in (("logits", "target", dict(label_smoothing=0.2, class_weight=inp["class_weight"])),
                                  ("small_logits", "small_target", dict(reduction="sum"))):
        z = leaf(inp[key], [Shard(-1)])
        loss = vocab_parallel_cross_entropy(z, inp[target_key], **opts)
        loss.backward()
        # the placement torch's own to_local() gives the gradient of such a leaf (Shard(1) since
        # torch 2.7; Replicate on torch 2.6, which redistributes an uneven Shard(1) gradient)
        own = leaf(inp[key], [Shard(-1)])
        own.to_local().sum().backward()
        out[key] = {"loss": loss.detach(), "grad": _full(z.grad), "placement": _placements(z.grad),
                    "torch_placement": _placements(own.grad), "local": z.to_local().shape[-1]}

    # the plain fused loss routed to the vocab-parallel path by a Shard(0) weight; hidden plain,
    # then a DTensor (Replicate) with a non-uniform upstream gradient
    for variant in ("plain_hidden", "dtensor_hidden"):
        w, b = leaf(inp["weight"], [Shard(0)]), leaf(inp["bias"], [Shard(0)])
        if variant == "plain_hidden":
            h = inp["hidden"].clone().requires_grad_()
            loss = leanloss.linear_cross_entropy(h, w, inp["target"], b, label_smoothing=0.1,
                                                 logit_scale=0.5, chunk_size=4)
            loss.backward()
        else:
            h = leaf(inp["hidden"], [Replicate()])
            loss = leanloss.linear_cross_entropy(h, w, inp["target"], b, reduction="none")
            loss.backward(inp["upstream"])
        out[variant] = {"loss": loss.detach(), "hidden": _full(h.grad), "weight": _full(w.grad),
                        "bias": _full(b.grad),
                        "placements": [_placements(t.grad) for t in (h, w, b)]}

    # a replicated weight: the single-device path on the local tensors
    w = leaf(inp["weight"], [Replicate()])
    loss = leanloss.linear_cross_entropy(inp["hidden"], w, inp["target"])
    loss.backward()
    out["replicated"] = {"loss": loss.detach(), "weight": _full(w.grad), "placement": _placements(w.grad)}

    # the plain fused distillation routed to the vocab-parallel path by Shard(0) heads
    for name, (opts, pre) in DISTILL_CASES.items():
        w, b = leaf(inp[pre + "weight"], [Shard(0)]), leaf(inp[pre + "bias"], [Shard(0)])
        h = inp["hidden"].clone().requires_grad_()
        teacher = distribute_tensor(inp[pre + "teacher_weight"], mesh, [Shard(0)])
        loss = leanloss.linear_distill_loss(h, w, inp["teacher_hidden"], teacher, inp[pre + "target"],
                                            student_bias=b, chunk_size=4, **opts)
        loss.backward(inp["upstream"] if opts.get("reduction") == "none" else None)
        out[f"distill_{name}"] = {"loss": loss.detach(), "hidden": _full(h.grad), "weight": _full(w.grad),
                                  "bias": _full(b.grad), "placements": [_placements(t.grad) for t in (h, w, b)]}

    # per-token log-probs and entropy routed the same way (RL), any upstream gradients
    w, b = leaf(inp["weight"], [Shard(0)]), leaf(inp["bias"], [Shard(0)])
    h = inp["hidden"].clone().requires_grad_()
    logp, ent = leanloss.linear_log_probs(h, w, inp["target"], b, temperature=0.7, return_entropy=True)
    ((logp * inp["upstream"]).sum() + (ent * inp["upstream"].flip(0)).sum()).backward()
    out["log_probs"] = {"logp": logp.detach(), "entropy": ent.detach(), "hidden": _full(h.grad),
                        "weight": _full(w.grad), "bias": _full(b.grad),
                        "placements": [_placements(t.grad) for t in (h, w, b)]}

    # failures: every rank raises, none hangs
    w = distribute_tensor(inp["weight"], mesh, [Shard(0)])
    h, t = inp["hidden"], inp["target"]
    out["softcap_error"] = _errors(lambda: leanloss.linear_cross_entropy(h, w, t, softcap=30.0))
    bad = t.clone()
    if rank == world - 1:
        bad[2] = CONFIG["vocab_size"] + 5
    out["out_of_range"] = _errors(lambda: vocab_parallel_linear_cross_entropy(h, w, bad))
    shuffled = t if rank == 0 else t.roll(1)
    out["different_targets"] = _errors(lambda: vocab_parallel_linear_cross_entropy(h, w, shuffled))
    with leanloss.checks("shapes"):  # not checked: no collective, no value read
        out["different_targets_unchecked"] = _errors(
            lambda: vocab_parallel_linear_cross_entropy(h, w, shuffled))
    out["after_errors"] = {"loss": vocab_parallel_linear_cross_entropy(h, w, t).detach()}
    return out


def _work(rank: int, world: int, inputs: dict) -> dict:
    results = {}
    if inputs["functional"] is not None:
        results["functional"] = _functional(rank, world, inputs["functional"])
    for name, scenario in inputs["scenarios"].items():
        results[name] = _train(rank, world, name, scenario, inputs["state"])
    return results


# ----------------------------------------------------------------------------------------------
# the one-process references and the comparison


def _reference_training(state: dict, scenario: dict) -> dict:
    """The unpatched model on every micro-batch of every rank at once, with torch's cross entropy
    of the causal shift in float64 (transformers' own loss would upcast only to float32)."""
    model = _model(state)
    steps = [step for rank_steps in scenario["micro"] for step in rank_steps]
    ids = torch.cat([i for i, _ in steps])
    labels = torch.cat([lab for _, lab in steps])
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, CONFIG["vocab_size"]), labels[:, 1:].reshape(-1))
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


def _close(got, want) -> bool:
    return got.shape == want.shape and torch.allclose(got.double(), want.double(), rtol=1e-9, atol=1e-11)


def _compare_training(name: str, scenario: dict, ref: dict, results: list) -> list:
    failures, dp, tp = [], scenario["dp"], scenario["tp"]
    total = sum(results[r * tp][name]["losses"].sum() for r in range(dp))
    if not _close(total, ref["loss"]):
        failures.append(f"{name}: sum of the ranks' losses {float(total)} != one batch {float(ref['loss'])}")
    for rank, res in enumerate(results):
        mine = res[name]
        if not torch.equal(mine["losses"], results[(rank // tp) * tp][name]["losses"]):
            failures.append(f"{name} rank {rank}: loss differs from its tensor-parallel peers")
        if mine["logits"] is not None:
            failures.append(f"{name} rank {rank}: the fused loss returned logits")
        for key, want in ref["grads"].items():
            if not _close(mine["grads"][key], want):
                err = (mine["grads"][key] - want).abs().max()
                failures.append(f"{name} rank {rank}: grad of {key} differs (max {float(err):.3g})")
        if tp > 1 and "Shard(dim=0)" not in mine["head_grad"]:
            failures.append(f"{name} rank {rank}: lm_head grad placement {mine['head_grad']}")
    return failures


def _compare_functional(world: int, inp: dict, results: list) -> list:
    failures = []

    def dense_ce(logits, target, **opts):
        z = logits.clone().requires_grad_()
        loss = F.cross_entropy(z, target, **opts)
        return loss.detach(), torch.autograd.grad(loss, z)[0]

    want = {"logits": dense_ce(inp["logits"], inp["target"], label_smoothing=0.2, weight=inp["class_weight"]),
            "small_logits": dense_ce(inp["small_logits"], inp["small_target"], reduction="sum")}
    leaves = {k: inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    z = 0.5 * (leaves["hidden"] @ leaves["weight"].T + leaves["bias"])
    plain = F.cross_entropy(z, inp["target"], label_smoothing=0.1)
    plain_grads = torch.autograd.grad(plain, list(leaves.values()))
    z = leaves["hidden"] @ leaves["weight"].T + leaves["bias"]
    rows = F.cross_entropy(z, inp["target"], reduction="none")
    rows_grads = torch.autograd.grad(rows, list(leaves.values()), inp["upstream"])
    w_only = inp["weight"].clone().requires_grad_()
    replicated = F.cross_entropy(inp["hidden"] @ w_only.T, inp["target"])
    replicated_grad = torch.autograd.grad(replicated, w_only)[0]
    lp_leaves = {k: inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    lp_want, ent_want = linear_log_probs_reference(lp_leaves["hidden"], lp_leaves["weight"], inp["target"],
                                                   lp_leaves["bias"], temperature=0.7)
    lp_grads = torch.autograd.grad(log_probs_objective(lp_want, ent_want, inp["upstream"], inp["upstream"].flip(0)),
                                   list(lp_leaves.values()))
    for rank, res in enumerate(results):
        fr = res["functional"]
        got = fr["log_probs"]
        if not (_close(got["logp"], lp_want.detach()) and _close(got["entropy"], ent_want.detach())
                and all(_close(got[k], g) for k, g in zip(("hidden", "weight", "bias"), lp_grads))):
            failures.append(f"rank {rank}: linear_log_probs with a Shard(0) weight differs from dense")
        if got["placements"] != ["plain", "(Shard(dim=0),)", "(Shard(dim=0),)"]:
            failures.append(f"rank {rank}: log-probs grad placements {got['placements']}")
        for key, (loss, grad) in want.items():
            got = fr[key]
            if not (_close(got["loss"], loss) and _close(got["grad"], grad)):
                failures.append(f"rank {rank}: DTensor logits {key} differ")
            if got["placement"] != got["torch_placement"]:
                failures.append(f"rank {rank}: {key} grad placement {got['placement']}, torch's own "
                                f"to_local() gives {got['torch_placement']}")
        if world == 4 and [results[r]["functional"]["small_logits"]["local"] for r in range(4)] != [3, 3, 3, 0]:
            failures.append("the 9-class logits were not split 3, 3, 3, 0")
        for variant, loss, grads, placements in (
                ("plain_hidden", plain, plain_grads, ["plain", "(Shard(dim=0),)", "(Shard(dim=0),)"]),
                ("dtensor_hidden", rows, rows_grads, ["(Replicate(),)", "(Shard(dim=0),)", "(Shard(dim=0),)"])):
            got = fr[variant]
            ok = _close(got["loss"], loss.detach()) and all(
                _close(got[k], g) for k, g in zip(("hidden", "weight", "bias"), grads))
            if not ok or got["placements"] != placements:
                failures.append(f"rank {rank}: routed linear_cross_entropy ({variant}) differs: {got}")
        for name, (opts, pre) in DISTILL_CASES.items():
            leaves = {k: inp[pre + k if k != "hidden" else k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
            loss = leanloss.linear_distill_loss(leaves["hidden"], leaves["weight"], inp["teacher_hidden"],
                                                inp[pre + "teacher_weight"], inp[pre + "target"],
                                                student_bias=leaves["bias"], **opts)
            loss.backward(inp["upstream"] if opts.get("reduction") == "none" else None)
            got = fr[f"distill_{name}"]
            ok = _close(got["loss"], loss.detach()) and all(_close(got[k], v.grad) for k, v in leaves.items())
            if not ok or got["placements"] != ["plain", "(Shard(dim=0),)", "(Shard(dim=0),)"]:
                failures.append(f"rank {rank}: routed linear_distill_loss ({name}) differs: {got} vs {loss}")
        got = fr["replicated"]
        if not (_close(got["loss"], replicated.detach()) and _close(got["weight"], replicated_grad)
                and got["placement"] == "(Replicate(),)"):
            failures.append(f"rank {rank}: replicated weight differs: {got}")
        expected_errors = {
            "softcap_error": (LeanlossValueError, ["'softcap'"]),
            "out_of_range": (TargetOutOfRangeError, ["'target'", str(CONFIG["vocab_size"] + 5)]),
            "different_targets": (LeanlossValueError, ["'target'", "identical on every rank"]),
        }
        for key, (error, words) in expected_errors.items():
            got = fr[key]
            if got["error"] is not error or not all(w in got["message"] for w in words):
                failures.append(f"rank {rank}: {key}: expected {error.__name__} naming {words}, got {got}")
        if fr["different_targets_unchecked"]["error"] is not None:
            failures.append(f"rank {rank}: 'shapes' checks compared targets: {fr['different_targets_unchecked']}")
        if not _close(fr["after_errors"]["loss"], plain_after := F.cross_entropy(
                inp["hidden"] @ inp["weight"].T, inp["target"])):
            failures.append(f"rank {rank}: after the errors the loss is {fr['after_errors']} != {plain_after}")
    if "on rank" not in results[0]["functional"]["out_of_range"]["message"]:
        failures.append("rank 0 did not name the rank holding the bad target")
    return failures


# ----------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("world, engines", [
    pytest.param(world, engines, marks=ENGINE_NEEDS[engines], id=f"{world}-{engines}")
    for world, engines in WORLD_SCENARIOS])
def test_engines_equal_one_process(world, engines, tmp_path):
    inputs = _inputs(world, engines)
    results = run_ranks(_work, world, inputs, tmp_path, timeout_s=60)
    failures = []
    if inputs["functional"] is not None:
        failures += _compare_functional(world, inputs["functional"], results)
    for name, scenario in inputs["scenarios"].items():
        failures += _compare_training(name, scenario, _reference_training(inputs["state"], scenario), results)
    assert not failures, "\n".join(failures)


@needs_fsdp2_on_cpu
@needs_uneven_fsdp2_tp
def test_example_trains_under_torchrun(tmp_path):
    """examples/train_distributed.py as CI runs it: 2 gloo ranks, 2 steps, every mode (DDP,
    FSDP2, TP inside FSDP2)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(ROOT, "examples", "train_distributed.py"),
           "--mode", "all", "--steps", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # "[mode rank r] step s loss x peak ..." (the two ranks' lines may interleave)
    steps = re.findall(r"\[([\w-]+) rank (\d)\] step (\d+) loss ([\d.]+) peak [\d.]+ MiB", done.stdout)
    assert sorted((m, r, s) for m, r, s, _ in steps) == sorted(
        (m, r, s) for m in ("ddp", "fsdp", "tp-fsdp") for r in "01" for s in "12"), done.stdout
    # the same initial weights and data in every mode: the same global loss at the first step
    first = {loss for _, _, step, loss in steps if step == "1"}
    assert len(first) == 1 and float(first.pop()) > 1.0, done.stdout


# ----------------------------------------------------------------------------------------------
# one process: a world of one rank, for the argument errors and the degenerate layouts


@pytest.fixture
def mesh_of_one():
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _dt(t, mesh, placement):
    from torch.distributed.tensor import DTensor, distribute_tensor
    if type(placement).__name__ == "Partial":
        return DTensor.from_local(t, mesh, [placement])
    return distribute_tensor(t, mesh, [placement])


def _misuse_cases():
    from torch.distributed.tensor import Partial, Replicate, Shard
    h, w, b = torch.randn(5, 4), torch.randn(7, 4), torch.randn(7)
    z, t = torch.randn(5, 7), torch.tensor([0, 6, -100, 3, 2])
    return {
        "replicated logits": (lambda m: vocab_parallel_cross_entropy(_dt(z, m, Replicate()), t),
                              ["'local_logits'", "whole vocabulary"]),
        "partial logits": (lambda m: vocab_parallel_cross_entropy(_dt(z, m, Partial()), t),
                           ["'local_logits'", "Partial"]),
        "group with a DTensor": (lambda m: vocab_parallel_cross_entropy(_dt(z, m, Shard(1)), t, dist.group.WORLD),
                                 ["'group'", "must be None"]),
        "vocab_start with a DTensor": (
            lambda m: vocab_parallel_linear_cross_entropy(h, _dt(w, m, Shard(0)), t, vocab_start=0),
            ["'vocab_start'", "must be None"]),
        "plain bias, sharded weight": (
            lambda m: leanloss.linear_cross_entropy(h, _dt(w, m, Shard(0)), t, b),
            ["'bias'", "sharded like 'local_weight'"]),
        "weight sharded on D": (lambda m: leanloss.linear_cross_entropy(h, _dt(w, m, Shard(1)), t),
                                ["'weight'", "Shard(dim=1)"]),
        "return_lse": (lambda m: leanloss.linear_cross_entropy(h, _dt(w, m, Shard(0)), t, return_lse=True),
                       ["'return_lse'", "vocab-sharded"]),
        "only the teacher sharded": (lambda m: leanloss.linear_distill_loss(h, w, h, _dt(w, m, Shard(0)), t),
                                     ["'teacher_local_weight'", "sharded like 'student_local_weight'"]),
    }


@pytest.mark.parametrize("case", list(_misuse_cases()))
def test_dtensor_misuse_names_the_argument(mesh_of_one, case):
    call, words = _misuse_cases()[case]
    with pytest.raises(LeanlossValueError) as info:
        call(mesh_of_one)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_world_of_one_dtensors_equal_the_plain_losses(mesh_of_one):
    from torch.distributed.tensor import Replicate, Shard
    gen = torch.Generator().manual_seed(3)
    h, w = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(7, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 6, -100, 3, 2, 6])
    opts = dict(label_smoothing=0.1, z_loss=0.01)
    for placement in (Shard(0), Replicate()):
        wd = _dt(w.clone(), mesh_of_one, placement).requires_grad_()
        wp = w.clone().requires_grad_()
        got, want = leanloss.linear_cross_entropy(h, wd, t, **opts), leanloss.linear_cross_entropy(h, wp, t, **opts)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(wd.grad.full_tensor(), wp.grad)
        assert tuple(wd.grad.placements) == (placement,)
    for placement in (Shard(0), Replicate()):  # per-token log-probs and entropy, routed alike
        wd = _dt(w.clone(), mesh_of_one, placement).requires_grad_()
        wp = w.clone().requires_grad_()
        got = leanloss.linear_log_probs(h, wd, t, temperature=0.8, return_entropy=True)
        want = leanloss.linear_log_probs(h, wp, t, temperature=0.8, return_entropy=True)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y)
        (got[0].sum() + got[1].square().sum()).backward()
        (want[0].sum() + want[1].square().sum()).backward()
        torch.testing.assert_close(wd.grad.full_tensor(), wp.grad)
    wd = _dt(w.clone(), mesh_of_one, Replicate()).requires_grad_()
    got = leanloss.linear_distill_loss(h, wd, h.flip(0), w, t, kind="jsd", hard_weight=0.3)
    got.backward()
    wp = w.clone().requires_grad_()
    want = leanloss.linear_distill_loss(h, wp, h.flip(0), w, t, kind="jsd", hard_weight=0.3)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(wd.grad.full_tensor(), wp.grad)


def test_head_sharded_on_its_own_by_fsdp_is_refused(mesh_of_one):
    from torch.distributed.fsdp import fully_shard
    from leanloss.integrations.transformers import UnsupportedModelError
    model = _model()
    fully_shard(model.lm_head, mesh=mesh_of_one)
    fully_shard(model, mesh=mesh_of_one)
    with pytest.raises(UnsupportedModelError, match="fully_shard"):
        apply_leanloss(model)
