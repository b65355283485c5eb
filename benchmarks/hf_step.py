"""One training step of a small Hugging Face Llama, patched with leanloss vs unpatched.

Case: a random ``LlamaForCausalLM`` (2 layers, hidden ``D``, vocab ``V``, untied LM head, SDPA
attention) and one batch of ``N`` tokens (batch 1, sequence ``N``) with ``labels``; the timed
step is ``model(input_ids, labels=labels).loss.backward()`` then ``zero_grad``. Impls:

* ``torch_eager``: the unpatched model (transformers' own ``lm_head`` + ``ForCausalLMLoss``,
  which holds the ``(N, V)`` logits, their fp32 copy and their gradient);
* ``leanloss``: the same model after ``apply_leanloss(model)`` (fused linear cross entropy).

``extra_mb`` is the peak RSS above the model, its inputs and its parameter gradients.
Run one case: ``python -m benchmarks.hf_step --case '{"impl": "leanloss", ...}'``.
"""
from __future__ import annotations

import importlib.util

import torch

from benchmarks import _harness

SUITE = "hf_step"
IMPLS = ("torch_eager", "leanloss")
LAYERS = 2


def cases(*, quick: bool, vocab=None, tokens=None, hidden=None, dtype=None, only=None) -> list[dict]:
    """Full: V=128256 (Llama 3's vocab), D=256, N=512 tokens. Quick: V=8000, D=64, N=128."""
    if importlib.util.find_spec("transformers") is None:
        return []
    V = vocab or (8000 if quick else 128256)
    D = hidden or (64 if quick else 256)
    N = tokens or (128 if quick else 512)
    impls = [i for i in IMPLS if only is None or i in only]
    return [
        dict(suite=SUITE, impl=impl, N=N, D=D, V=V, dtype=dtype or "float32",
             repeats=2 if quick else 5, layers=LAYERS)
        for impl in impls
    ]


def _model(case: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    D = case["D"]
    heads = max(1, D // 64)
    config = LlamaConfig(
        vocab_size=case["V"], hidden_size=D, intermediate_size=4 * D,
        num_hidden_layers=case.get("layers", LAYERS), num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=max(case["N"], 128),
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(getattr(torch, case["dtype"])).train()


def run_case(case: dict) -> dict:
    model = _model(case)
    if case["impl"] == "leanloss":
        from leanloss.integrations.transformers import apply_leanloss

        apply_leanloss(model)
    elif case["impl"] != "torch_eager":
        raise ValueError(f"hf_step: unknown impl {case['impl']!r}; expected one of {IMPLS}")
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, case["V"], (1, case["N"]), generator=g)
    labels = input_ids.clone()
    params = list(model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    base_rss = _harness.rss_bytes()
    losses = []

    def step():
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        losses.append(float(loss))
        for p in params:
            p.grad = None

    timing = _harness.time_fwd_bwd(step, case["repeats"])
    return _harness.case_result(case, time=timing, base_rss=base_rss, grad_bytes=grad_bytes,
                                loss=losses[-1])


if __name__ == "__main__":
    _harness.main(run_case)
