"""leanloss behind TRL's trainers vs TRL's own fused head: the kernels, then whole loss steps.

Kernel rows (inputs drawn like the ``log_probs`` and ``distill`` suites; none ignored):

* ``leanloss_logp`` / ``trl_logp``: per-token log-probabilities and entropy at temperature 0.9,
  objective ``sum(a * logp) + sum(b * entropy)`` (fixed random ``a``, ``b``), fwd+bwd, N=2048
  D=1024 V=131072: :func:`leanloss.linear_log_probs` vs TRL's ``ChunkedLogProbFunction``
  (the kernel behind its ``add_fused_lm_head``; torch tiles on CPU);
* ``leanloss_jsd`` / ``trl_jsd``: the generalized JSD with ``beta=0.5`` of a student head and a
  frozen teacher head, mean over the tokens, fwd+bwd, N=2048 D=1024 V=32000:
  :func:`leanloss.linear_distill_loss` vs TRL's ``ChunkedDivergenceFunction`` (the kernel of
  its ``DistillationTrainer``).

Their roofline is the four matmuls each needs (see the ``log_probs`` and ``distill`` suites),
timed interleaved in the same process.

Step rows ``<trainer>_leanloss`` / ``<trainer>_trl``, trainer in ``sft``, ``grpo``,
``distill``: a random 2-layer Llama (hidden ``D``, vocab ``V``, the teacher of distillation the
same shape), a TRL trainer built around it (no downloads: a word-level tokenizer built in
memory), the batch prepared once (for GRPO and distillation: its completions generated once),
then the timed step ``trainer.compute_loss(model, batch).backward()`` with and without
:func:`leanloss.integrations.trl.apply_leanloss`. ``N`` is the number of tokens per step; the
model is cast to the case's dtype. Generation and the optimizer are left out (the same work
with and without leanloss). Their "roofline" is the head's four matmuls at the step's
``(N, D, V)``, only a common yardstick so that the two rows compare in one unit.

``extra_mb``: one warmed-up step's peak RSS above the inputs and the gradients (``harness``).
Without TRL (``pip install 'leanloss[trl]'``) every case is reported as skipped.
"""
from __future__ import annotations

import importlib
import importlib.util
import tempfile
from typing import Any, Dict, List

import torch

from leanloss.cli.bench import harness

SUITE = "trl"
KERNELS = {"logp": dict(N=2048, D=1024, V=131072), "jsd": dict(N=2048, D=1024, V=32000)}
TRAINERS = ("sft", "grpo", "distill")
STEP_SHAPE = dict(N=512, D=512, V=128256)
IMPLS = tuple(f"{side}_{k}" for k in KERNELS for side in ("leanloss", "trl")) + tuple(
    f"{t}_{side}" for t in TRAINERS for side in ("leanloss", "trl"))
QUICK_IMPLS = ("leanloss_logp", "trl_logp")
DTYPES = ("float32", "bfloat16")
TEMPERATURE = 0.9
BETA = 0.5


def cases(*, quick: bool, vocab=None, tokens=None, hidden=None, dtype=None, only=None) -> List[Dict[str, Any]]:
    """Full: every row above in float32 and bfloat16, 3 rounds. Quick: the log-prob kernel rows
    at V=32000, bfloat16, 2 rounds."""
    impls = [i for i in IMPLS if (only is None or i == only) and (only or not quick or i in QUICK_IMPLS)]
    dtypes = [dtype] if dtype else (["bfloat16"] if quick else list(DTYPES))
    out = []
    for dt in dtypes:
        for impl in impls:
            kernel = impl.rsplit("_", 1)[-1]
            shape = dict(KERNELS[kernel]) if kernel in KERNELS else dict(STEP_SHAPE)
            if quick:
                shape["V"] = 32000
            shape.update({k: int(v) for k, v in (("N", tokens), ("D", hidden), ("V", vocab)) if v})
            out.append(dict(suite=SUITE, impl=impl, dtype=dt, repeats=2 if quick else 3, **shape))
    if importlib.util.find_spec("trl") is None:
        for case in out:
            case["skipped"] = "TRL is not installed (pip install 'leanloss[trl]')"
    return out


# ------------------------------------------------------------------------------------------------
# kernel rows


def _four_matmuls(h, w, ht=None, wt=None):
    """The matmuls of a fused step, without autograd: ``h @ W.T``, then the student's logits
    again (recomputed in backward) or the teacher's ``ht @ Wt.T``, then ``g @ W`` and ``g.T @ h``."""
    def step() -> None:
        with torch.no_grad():
            z = h @ w.T
            if ht is None:
                h @ w.T
            else:
                ht @ wt.T
            z @ w
            z.T @ h
    return step


def _kernel_case(case: Dict[str, Any]) -> Dict[str, Any]:
    import leanloss

    impl, dtype = case["impl"], getattr(torch, case["dtype"])
    n, d, v = case["N"], case["D"], case["V"]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=dtype).mul_(d ** -0.5).requires_grad_()
    if impl.endswith("_logp"):
        t = torch.randint(0, v, (n,), generator=g)
        a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
        if impl == "leanloss_logp":
            def outputs():
                return leanloss.linear_log_probs(h, w, t, temperature=TEMPERATURE, return_entropy=True)
        else:
            from trl.kernels import ChunkedLogProbFunction

            def outputs():
                logp, ent, *_ = ChunkedLogProbFunction.apply(h, w, None, t, TEMPERATURE, 32768, None, 1.0,
                                                              ("log_probs", "entropy"))
                return logp, ent

        def step() -> None:
            logp, ent = outputs()
            ((logp * a).sum() + (ent * b).sum()).backward()

        return harness.measure(case, step, leaves=(h, w), reference=_four_matmuls(h, w))
    ht = torch.randn(n, d, generator=g, dtype=dtype)
    wt = torch.randn(v, d, generator=g, dtype=dtype).mul_(d ** -0.5)
    if impl == "leanloss_jsd":
        def loss():
            return leanloss.linear_distill_loss(h, w, ht, wt, kind="jsd", beta=BETA)
    else:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def loss():
            div, _ = ChunkedDivergenceFunction.apply(h, w, None, ht, wt, None, BETA, 1.0, 1.0, None, 1.0, None)
            return div.mean()

    losses: List[float] = []

    def jsd_step() -> None:
        value = loss()
        value.backward()
        losses.append(float(value))

    result = harness.measure(case, jsd_step, leaves=(h, w), reference=_four_matmuls(h, w, ht, wt))
    result["loss"] = losses[-1]
    return result


# ------------------------------------------------------------------------------------------------
# step rows


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def _model(case: Dict[str, Any], seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = case["D"]
    heads = max(1, d // 64)
    config = LlamaConfig(vocab_size=case["V"], hidden_size=d, intermediate_size=4 * d, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(2 * case["N"], 128), tie_word_embeddings=False,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(getattr(torch, case["dtype"]))


def _trainer(case: Dict[str, Any]):
    """The TRL trainer of the case and one prepared batch of about ``N`` trained tokens."""
    trl = importlib.import_module("trl")
    from datasets import Dataset

    name, v, n = case["impl"].rsplit("_", 1)[0], case["V"], case["N"]
    g = torch.Generator().manual_seed(1)
    batch = 4

    def words(k):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, v - 3, (k,), generator=g))

    common = dict(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                  gradient_checkpointing=False, disable_tqdm=True, per_device_train_batch_size=batch)
    tokenizer = _tokenizer(v)
    if name == "sft":
        ds = Dataset.from_dict({"text": [words(n // batch - 1) for _ in range(batch)]})
        trainer = trl.SFTTrainer(model=_model(case, 0), args=trl.SFTConfig(max_length=n, **common),
                                 train_dataset=ds, processing_class=tokenizer)
    elif name == "grpo":
        ds = Dataset.from_dict({"prompt": [words(4) for _ in range(batch)]})
        args = trl.GRPOConfig(num_generations=batch, max_completion_length=n // batch, **common)
        trainer = trl.GRPOTrainer(model=_model(case, 0), reward_funcs=_reward, args=args, train_dataset=ds,
                                  processing_class=tokenizer)
    elif name == "distill":
        ds = Dataset.from_dict({"prompt": [words(4) for _ in range(batch)]})
        args = trl.DistillationConfig(max_completion_length=n // batch, beta=BETA, **common)
        trainer = trl.DistillationTrainer(model=_model(case, 0), teacher_model=_model(case, 1), args=args,
                                          train_dataset=ds, processing_class=tokenizer)
    else:
        raise ValueError(f"{SUITE}: unknown impl {case['impl']!r}; expected one of {IMPLS}")
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by GRPO's loss
    inputs = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._prepare_inputs(inputs)
    return trainer, inputs


def _reward(completions, **kwargs):
    return [float(len(set(c.split()))) for c in completions]


def _step_case(case: Dict[str, Any]) -> Dict[str, Any]:
    from leanloss.integrations.trl import apply_leanloss

    trainer, inputs = _trainer(case)
    if case["impl"].endswith("_leanloss"):
        apply_leanloss(trainer)
    model = trainer.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    losses: List[float] = []

    def step() -> None:
        loss = trainer.compute_loss(model, dict(inputs))
        loss.backward()
        losses.append(float(loss))

    head = model.get_output_embeddings().weight
    h = torch.randn(case["N"], case["D"], dtype=head.dtype)
    result = harness.measure(case, step, leaves=params, reference=_four_matmuls(h, head.detach()))
    result["loss"] = losses[-1]
    return result


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    if importlib.util.find_spec("trl") is None:
        raise harness.Unavailable("TRL is not installed (pip install 'leanloss[trl]')")
    kernel = case["impl"].rsplit("_", 1)[-1]
    return _kernel_case(case) if kernel in KERNELS else _step_case(case)


if __name__ == "__main__":
    harness.main(run_case)
