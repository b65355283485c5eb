"""One training step of a small Hugging Face Llama, patched with leanloss vs unpatched.

Case: a random ``LlamaForCausalLM`` (2 layers, hidden ``D``, vocab ``V``, untied LM head, SDPA
attention) and one batch of ``N`` tokens (batch 1, sequence ``N``) with ``labels``; the timed
step is ``model(input_ids, labels=labels).loss.backward()`` then ``zero_grad``. Impls:

* ``torch_eager``: the unpatched model (transformers' own ``lm_head`` + ``ForCausalLMLoss``,
  which holds the ``(N, V)`` logits, their fp32 copy and their gradient);
* ``leanloss``: the same model after ``apply_leanloss(model)`` (fused linear cross entropy).

``extra_mb`` is one warmed-up step's peak RSS over the model, its inputs and its parameter
gradients (see ``harness``). Run one case:
``python -m leanloss.cli.bench.hf_step --case '{"impl": "leanloss", ...}'``.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Dict, List

import torch

from leanloss.cli.bench import harness

SUITE = "hf_step"
IMPLS = ("torch_eager", "leanloss")
QUICK_IMPLS = ("leanloss",)
DTYPES = ("float32", "bfloat16")
LAYERS = 2


def cases(*, quick: bool, vocab=None, tokens=None, hidden=None, dtype=None, only=None) -> List[Dict[str, Any]]:
    """Full: V=128256 (Llama 3's vocab), D=256, N=512 tokens, float32 and bfloat16, both impls.
    Quick: V=32000, leanloss alone, float32. Without transformers: one skipped case."""
    V = vocab or (32000 if quick else 128256)
    D = hidden or 256
    N = tokens or 512
    impls = [i for i in IMPLS if (only is None or i == only) and (only or not quick or i in QUICK_IMPLS)]
    dtypes = [dtype] if dtype else (["float32"] if quick else list(DTYPES))
    out = [dict(suite=SUITE, impl=impl, N=N, D=D, V=V, dtype=dt, repeats=2 if quick else 3, layers=LAYERS)
           for dt in dtypes for impl in impls]
    if importlib.util.find_spec("transformers") is None:
        for case in out:
            case["skipped"] = "transformers is not installed (pip install 'leanloss[transformers]')"
    return out


def _model(case: Dict[str, Any]):
    from transformers import LlamaConfig, LlamaForCausalLM

    D = case["D"]
    heads = max(1, D // 64)
    # a PretrainedConfig keyword that LlamaConfig's typed signature does not list
    common: Dict[str, Any] = {"attn_implementation": "sdpa"}
    config = LlamaConfig(
        vocab_size=case["V"], hidden_size=D, intermediate_size=4 * D,
        num_hidden_layers=case.get("layers", LAYERS), num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=max(case["N"], 128),
        tie_word_embeddings=False, **common,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(getattr(torch, case["dtype"])).train()


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    model = _model(case)
    if case["impl"] == "leanloss":
        from leanloss.integrations.transformers import apply_leanloss

        apply_leanloss(model)
    elif case["impl"] != "torch_eager":
        raise ValueError(f"hf_step: unknown impl {case['impl']!r}; expected one of {IMPLS}")
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, case["V"], (1, case["N"]), generator=g)
    labels = input_ids.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    losses: List[float] = []

    def step() -> None:
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        losses.append(float(loss))

    result = harness.measure(case, step, leaves=params)
    result["loss"] = losses[-1]
    return result


if __name__ == "__main__":
    harness.main(run_case)
