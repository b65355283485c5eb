"""The TRL integration with a vocab-sharded LM head, in a 2-rank gloo world on CPU.

``parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})`` leaves
a head whose weight and bias are DTensors sharded on the vocabulary (37 classes: 19 + 18). The
fused head of :func:`leanloss.integrations.trl.add_fused_lm_head` and the distillation
divergence must then run the vocab-parallel scorers, never gathering the head for the
log-probabilities and entropies, and equal one process (float64, same inputs).
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration tests need the 'trl' extra")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import leanloss.integrations.trl as lt  # noqa: E402
from _spawn import close_gloo, init_gloo, spawn  # noqa: E402

CONFIG = dict(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=32)
# name -> the fields asked for: GRPO's, and every field (none of them gathers the head)
CASES = {"grpo": ("log_probs", "entropy"), "all": lt.OUTPUT_FIELDS}
TEMPERATURE = 0.7


def _model(state=None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).double()
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=torch.float64)
    if state is not None:
        model.load_state_dict(state)
    return model


def _inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (3, 8), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, 6:] = -100
    model = _model()
    with torch.no_grad():
        model.lm_head.bias.normal_(0, 0.3, generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return {
        "state": model.state_dict(),
        "batch": {"input_ids": ids, "labels": labels},
        "upstream": torch.rand(3, 7, generator=g, dtype=torch.float64),
        "distill": {"hs": torch.randn(3, 6, 16, generator=g, dtype=torch.float64),
                    "ht": torch.randn(3, 6, 20, generator=g, dtype=torch.float64),
                    "ws": torch.randn(37, 16, generator=g, dtype=torch.float64),
                    "wt": torch.randn(37, 20, generator=g, dtype=torch.float64),
                    "bs": torch.randn(37, generator=g, dtype=torch.float64),
                    "mask": mask},
    }


def _fused_step(model, inp: dict, outputs) -> dict:
    """A no-grad scoring call (as for a reference model), then a training call whose fields all
    get upstream gradients; returns the training call's fields."""
    lt.add_fused_lm_head(model, temperature=TEMPERATURE, outputs=outputs)
    with torch.no_grad():
        model(**inp["batch"], fused_lm_head=True)
    out = model(**inp["batch"], fused_lm_head=True)
    total = out.loss + (out.log_probs * inp["upstream"]).sum()
    if out.entropy is not None:
        total = total + (out.entropy * inp["upstream"].flip(0)).sum()
    total.backward()
    return {k: v.detach() for k, v in out.items() if torch.is_tensor(v)}


def _grads(model) -> dict:
    return {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()}


def _divergence(d: dict, shard=None) -> dict:
    shard = shard or (lambda t: t.clone())
    hs = d["hs"].clone().requires_grad_()
    ws, bs, wt = shard(d["ws"]).requires_grad_(), shard(d["bs"]).requires_grad_(), shard(d["wt"])
    loss, entropy_sum, n = lt.divergence_loss(hs, d["ht"], ws, wt, d["mask"], 0.4, student_lm_head_bias=bs,
                                              temperature=0.8, student_logit_scale=1.2)
    loss.backward()
    return {"values": (loss.detach(), entropy_sum, n),
            "grads": tuple(g.full_tensor() if hasattr(g, "full_tensor") else g for g in (hs.grad, ws.grad, bs.grad))}


def _child(rank: int, world: int, port: int, inputs_path: str, out_dir: str) -> None:
    init_gloo(rank, world, port, timeout_s=60)
    completed = False
    try:
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        inp = torch.load(inputs_path, weights_only=False)
        mesh = init_device_mesh("cpu", (world,))
        gathers = {"n": 0}
        full_tensor = DTensor.full_tensor

        def counting(self, *args, **kwargs):
            gathers["n"] += 1
            return full_tensor(self, *args, **kwargs)

        results = {}
        for name, outputs in CASES.items():
            model = _model(inp["state"])
            parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
            assert isinstance(model.lm_head.weight, DTensor)
            gathers["n"] = 0
            DTensor.full_tensor = counting
            try:
                fields = _fused_step(model, inp, outputs)
            finally:
                DTensor.full_tensor = full_tensor
            results[name] = {"fields": fields, "grads": _grads(model), "gathers": gathers["n"]}

        def shard(t):
            return distribute_tensor(t, mesh, [Shard(0)])

        results["divergence"] = _divergence(inp["distill"], shard)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        completed = True
    finally:
        close_gloo(completed)


def _assert_close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")


def test_vocab_sharded_head_equals_one_process(tmp_path):
    inp = _inputs()
    path = str(tmp_path / "inputs.pt")
    torch.save(inp, path)
    spawn(_child, 2, path, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, outputs in CASES.items():
        model = _model(inp["state"])
        want = {"fields": _fused_step(model, inp, outputs), "grads": _grads(model)}
        for rank, res in enumerate(results):
            got = res[name]
            # no field gathers the head: every statistic is reduced over the vocabulary group
            assert got["gathers"] == 0, (name, rank, got["gathers"])
            assert got["fields"].keys() == want["fields"].keys()
            for field, value in want["fields"].items():
                if value.dtype == torch.bool:
                    assert torch.equal(got["fields"][field], value), (name, field)
                else:
                    _assert_close(got["fields"][field], value, f"{name} rank {rank} {field}")
            for param, grad in want["grads"].items():
                _assert_close(got["grads"][param], grad, f"{name} rank {rank} grad {param}")
    want = _divergence(inp["distill"])
    for rank, res in enumerate(results):
        got = res["divergence"]
        for a, b in zip((*got["values"], *got["grads"]), (*want["values"], *want["grads"])):
            _assert_close(a.to(b.dtype), b, f"divergence rank {rank}")
