"""leanloss.integrations.trl against TRL itself (the oracle).

Every TRL trainer runs one optimizer step on a tiny random Llama (no downloads; a word-level
tokenizer built in memory) twice from the same seed, with and without ``apply_leanloss``:
the logged loss and metrics and the gradient of every parameter must agree (float32: 1e-5
relative; under TRL's default bf16 autocast: leanloss's error against the float32 step within
twice TRL's own). The patched forward is compared field by field with TRL's on the same model.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import math
import tempfile
import types

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration tests need the 'trl' extra")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl.trainer import utils as trl_utils  # noqa: E402

import leanloss.integrations.trl as lt  # noqa: E402
from leanloss.integrations.trl import (  # noqa: E402
    UnsupportedTrainerError,
    add_fused_lm_head,
    apply_leanloss,
    head_transform,
)

WORDS = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(93)]
FIELDS = lt.OUTPUT_FIELDS


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over :data:`WORDS`, built in memory."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>")


def tiny_llama(seed: int = 0, hidden: int = 32, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2, **kw)
    return LlamaForCausalLM(config)


@functools.lru_cache(maxsize=None)
def tiny_llama_path() -> str:
    """:func:`tiny_llama` saved to a temporary folder (GRPO and RLOO load their reference model
    from the policy's path)."""
    path = tempfile.mkdtemp()
    tiny_llama().save_pretrained(path)
    return path


def _sentences(n: int, lo: int, hi: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        out.append(" ".join(f"w{int(i)}" for i in torch.randint(0, 93, (k,), generator=g)))
    return out


class _Grads(TrainerCallback):
    """Keeps a copy of every parameter's gradient just before the optimizer step."""

    def __init__(self):
        self.grads = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _common(config_cls, bf16: bool, **kw):
    return config_cls(output_dir=tempfile.mkdtemp(), max_steps=1, logging_steps=1, report_to=[],
                      use_cpu=True, save_strategy="no", seed=0, learning_rate=1e-3, bf16=bf16,
                      max_grad_norm=0.0, disable_tqdm=True, **kw)


def _reward(completions, **kwargs):
    """A toy reward: the number of distinct words, minus the length."""
    return [len(set(c.split())) - 0.1 * len(c.split()) for c in completions]


def _sft(bf16):
    ds = Dataset.from_dict({"text": _sentences(8, 4, 14, 1)})
    args = _common(trl.SFTConfig, bf16, per_device_train_batch_size=4)
    return trl.SFTTrainer(model=tiny_llama(), args=args, train_dataset=ds, processing_class=tiny_tokenizer())


def _grpo(bf16, trainer_cls=None, config_cls=None, **extra):
    trainer_cls, config_cls = trainer_cls or trl.GRPOTrainer, config_cls or trl.GRPOConfig
    ds = Dataset.from_dict({"prompt": _sentences(8, 3, 6, 2)})
    args = _common(config_cls, bf16, per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=6, temperature=0.8, beta=0.04, **extra)
    return trainer_cls(model=tiny_llama_path(), reward_funcs=_reward, args=args, train_dataset=ds,
                       processing_class=tiny_tokenizer())


def _rloo(bf16):
    return _grpo(bf16, trl.RLOOTrainer, trl.RLOOConfig)


def _dpo(bf16):
    n = 8
    ds = Dataset.from_dict({"prompt": _sentences(n, 2, 5, 3), "chosen": _sentences(n, 2, 6, 4),
                            "rejected": _sentences(n, 2, 6, 5)})
    args = _common(trl.DPOConfig, bf16, per_device_train_batch_size=4)
    return trl.DPOTrainer(model=tiny_llama(), ref_model=tiny_llama(seed=1), args=args, train_dataset=ds,
                          processing_class=tiny_tokenizer())


def _kto(bf16):
    n = 8
    ds = Dataset.from_dict({"prompt": _sentences(n, 2, 5, 3), "completion": _sentences(n, 2, 6, 4),
                            "label": [bool(i % 2) for i in range(n)]})
    args = _common(trl.KTOConfig, bf16, per_device_train_batch_size=4)
    return trl.KTOTrainer(model=tiny_llama(), ref_model=tiny_llama(seed=1), args=args, train_dataset=ds,
                          processing_class=tiny_tokenizer())


def _distill(bf16, beta=0.5, temperature=0.9):
    ds = Dataset.from_dict({"prompt": _sentences(8, 3, 6, 2)})
    args = _common(trl.DistillationConfig, bf16, per_device_train_batch_size=4, max_completion_length=6,
                   beta=beta, temperature=temperature)
    return trl.DistillationTrainer(model=tiny_llama(), teacher_model=tiny_llama(seed=1, hidden=48), args=args,
                                   train_dataset=ds, processing_class=tiny_tokenizer())


def _sft_lora(bf16):
    """SFT of a LoRA adapter: TRL patches the PEFT model's base model."""
    peft = pytest.importorskip("peft")
    ds = Dataset.from_dict({"text": _sentences(8, 4, 14, 1)})
    args = _common(trl.SFTConfig, bf16, per_device_train_batch_size=4)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return trl.SFTTrainer(model=tiny_llama(), args=args, train_dataset=ds, processing_class=tiny_tokenizer(),
                          peft_config=lora)


TRAINERS = {"sft": _sft, "sft_lora": _sft_lora, "grpo": _grpo, "rloo": _rloo, "dpo": _dpo, "kto": _kto, "distill": _distill}


@contextlib.contextmanager
def _counting_calls():
    """Counts the calls of leanloss's scorers and of TRL's kernels while the block runs."""
    from trl.trainer import distillation_trainer
    counts = collections.Counter()
    targets = [(lt, "token_stats", "leanloss"), (lt, "divergence_loss", "leanloss"),
               (trl_utils, "_ChunkedLogProbFunction", "trl"), (distillation_trainer, "ChunkedDivergenceFunction", "trl")]
    saved = [(module, name, getattr(module, name)) for module, name, _ in targets]

    def counted(key, fn):
        def call(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return call

    for (module, name, key), (_, _, fn) in zip(targets, saved):
        wrapped = counted(key, fn) if key == "leanloss" else types.SimpleNamespace(apply=counted(key, fn.apply))
        setattr(module, name, wrapped)
    try:
        yield counts
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _step(build, leanloss: bool, bf16: bool = False):
    """One optimizer step: (logged values, {parameter name: gradient}); checks that the step ran
    leanloss's scorers and never TRL's kernels (or the other way round)."""
    trainer = build(bf16)
    grads = _Grads()
    trainer.add_callback(grads)
    if leanloss:
        assert apply_leanloss(trainer) is trainer
    torch.manual_seed(0)
    with _counting_calls() as counts:
        trainer.train()
    assert counts["leanloss" if leanloss else "trl"] > 0 and counts["trl" if leanloss else "leanloss"] == 0, counts
    logs = {k: v for k, v in trainer.state.log_history[0].items() if isinstance(v, (int, float))}
    assert grads.grads, "no gradient reached the optimizer"
    return logs, grads.grads


def _assert_close_dicts(got: dict, want: dict, rtol: float, atol: float, what: str):
    assert got.keys() == want.keys(), what
    for k in want:
        g, w = got[k], want[k]
        if torch.is_tensor(w):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{what} {k}: {m}")
        elif not (isinstance(w, float) and math.isnan(w)):
            assert g == pytest.approx(w, rel=rtol, abs=atol), f"{what} {k}: {g} != {w}"


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_one_step_equals_trl_in_float32(name):
    want_logs, want_grads = _step(TRAINERS[name], leanloss=False)
    got_logs, got_grads = _step(TRAINERS[name], leanloss=True)
    want_logs.pop("train_runtime", None)
    for d in (want_logs, got_logs):
        for k in [k for k in d if "runtime" in k or "per_second" in k or k.endswith("step_time")]:
            d.pop(k)
    _assert_close_dicts(got_logs, want_logs, 1e-5, 1e-7, f"{name} logs")
    scale = max(g.abs().max().item() for g in want_grads.values())
    _assert_close_dicts(got_grads, want_grads, 1e-5, 1e-6 * scale, f"{name} gradient")


@pytest.mark.parametrize("name", ["sft", "grpo", "distill"])
def test_one_step_in_bf16_autocast_is_as_close_to_float32_as_trl(name):
    """Under TRL's default bf16 autocast both heads round; leanloss's gradients stay within twice
    TRL's distance from the float32 step."""
    _, exact = _step(TRAINERS[name], leanloss=False, bf16=False)
    _, trl_bf16 = _step(TRAINERS[name], leanloss=False, bf16=True)
    _, ours_bf16 = _step(TRAINERS[name], leanloss=True, bf16=True)
    for k, ref in exact.items():
        trl_err = (trl_bf16[k].double() - ref.double()).norm().item()
        our_err = (ours_bf16[k].double() - ref.double()).norm().item()
        assert our_err <= 2 * trl_err + 1e-5 * ref.double().norm().item(), (name, k, our_err, trl_err)


# ------------------------------------------------------------------------------------------------
# the patched forward, field by field


def _gemma2(bias: bool = False):
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0,
                          initializer_range=0.4, attn_implementation="eager")
    return Gemma2ForCausalLM(config)


def _with_head_bias(model):
    head = model.get_output_embeddings()
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.bias.normal_(0, 0.5)
    model.set_output_embeddings(new)
    model.config.tie_word_embeddings = False
    return model


def _scaled(model, scale):
    model.config.logit_scale = scale
    return model


MODELS = {
    "llama": lambda: tiny_llama(),
    "llama+bias": lambda: _with_head_bias(tiny_llama()),
    "gemma2-softcap": _gemma2,
    "llama-logit-scale": lambda: _scaled(tiny_llama(), 1.7),
    "llama-negative-scale": lambda: _scaled(tiny_llama(), -0.6),
}


def _inputs(shift: bool, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(WORDS), (3, 10), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7:] = -100
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if shift:
        out["shift_labels"] = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)
    else:
        out["labels"] = labels
    return out


def _compare_forward(make, temperature, shift, outputs=FIELDS, cast=False):
    reference = make()
    ours = copy.deepcopy(reference)
    trl_utils.add_fused_lm_head(reference, temperature=temperature, cast_lm_head_to_fp32=cast, outputs=outputs)
    add_fused_lm_head(ours, temperature=temperature, cast_lm_head_to_fp32=cast, outputs=outputs)
    inputs = _inputs(shift)
    want = reference(**inputs, fused_lm_head=True)
    got = ours(**inputs, fused_lm_head=True)
    assert type(got) is type(want)
    for field in want.keys() | got.keys():
        w, g = want.get(field), got.get(field)
        assert (w is None) == (g is None), field
        if w is None:
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, field
        if w.dtype == torch.bool:
            assert torch.equal(g, w), field
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{field}: {m}")
    # gradients through log_probs and entropy, each with its own upstream weights
    for model, out in ((reference, want), (ours, got)):
        gen = torch.Generator().manual_seed(7)
        total = (out.log_probs * torch.rand(out.log_probs.shape, generator=gen)).sum() + out.loss
        if out.entropy is not None:
            total = total + (out.entropy * torch.rand(out.entropy.shape, generator=gen)).sum()
        total.backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_fields_and_gradients_equal_trl(model, shift, temperature):
    _compare_forward(MODELS[model], temperature, shift)


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy"), ("log_probs", "mean_logits"),
                                     ("log_probs", "entropy", "is_top1")])
def test_only_the_requested_fields_are_computed(outputs):
    _compare_forward(MODELS["llama"], 0.9, False, outputs=outputs)


def test_cast_lm_head_to_fp32_under_bf16_autocast():
    make = MODELS["llama+bias"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _compare_forward(make, 1.0, False, cast=True)


def test_num_items_in_batch_divides_the_loss():
    model = tiny_llama()
    add_fused_lm_head(model)
    inputs = _inputs(False)
    out = model(**inputs, fused_lm_head=True, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(out.loss, -out.log_probs.sum() / 40)
    out = model(**inputs, fused_lm_head=True)
    torch.testing.assert_close(out.loss, -out.log_probs.sum() / out.label_mask.sum())


def test_all_ignored_labels_give_a_differentiable_zero():
    model = tiny_llama()
    add_fused_lm_head(model, outputs=FIELDS)
    inputs = _inputs(False)
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    out = model(**inputs, fused_lm_head=True)
    assert out.loss.item() == 0 and not out.log_probs.any() and not out.is_top1.any()
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_without_fused_lm_head_the_original_forward_runs():
    reference = tiny_llama()
    ours = copy.deepcopy(reference)
    add_fused_lm_head(ours)
    inputs = _inputs(False)
    torch.testing.assert_close(ours(**inputs).loss, reference(**inputs).loss)
    torch.testing.assert_close(ours(input_ids=inputs["input_ids"]).logits, reference(input_ids=inputs["input_ids"]).logits)


def test_moe_router_loss_is_added_like_trl():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.3)
    _compare_forward(lambda: MixtralForCausalLM(config), 1.0, False)


@pytest.mark.parametrize("key,value,want", [
    ("logit_scale", 0.5, 0.5), ("output_multiplier", 3.0, 3.0), ("lm_head_multiplier", 2.0, 2.0),
    ("logits_scaling", 4.0, 0.25),
])
def test_head_transform_reads_the_multipliers_trl_reads(key, value, want):
    config = LlamaConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
    setattr(config, key, value)
    assert head_transform(config) == (None, want)
    config.model_type = "hyperclovax"
    if key == "logits_scaling":
        assert head_transform(config) == (None, 4.0)


# ------------------------------------------------------------------------------------------------
# apply_leanloss: what it patches and what it refuses


def test_apply_keeps_trl_settings_and_is_idempotent():
    trainer = _grpo(False)
    apply_leanloss(trainer)
    apply_leanloss(trainer)
    for model in (trainer.model, trainer.ref_model):
        settings = model.__dict__[lt._STATE_ATTR]
        assert settings.temperature == 0.8
    assert trainer.model.__dict__[lt._STATE_ATTR].outputs == ("log_probs", "entropy")
    assert trainer.ref_model.__dict__[lt._STATE_ATTR].outputs == ("log_probs",)


def test_refuses_other_trainers_naming_class_and_version():
    from transformers import Trainer, TrainingArguments
    trainer = Trainer(model=tiny_llama(), args=TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[],
                                                                 use_cpu=True))
    with pytest.raises(UnsupportedTrainerError, match=rf"Trainer \(TRL {trl.__version__}\) is not supported"):
        apply_leanloss(trainer)


def test_refuses_gkd_which_reads_full_logits():
    from trl.experimental.gkd import GKDTrainer
    trainer = GKDTrainer.__new__(GKDTrainer)  # the class decides; no model needed
    with pytest.raises(UnsupportedTrainerError, match="GKDTrainer .*is not supported"):
        apply_leanloss(trainer)


def test_refuses_deepspeed_zero3(monkeypatch):
    import transformers.integrations.deepspeed as ds
    trainer = _sft(False)
    monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(UnsupportedTrainerError, match="SFTTrainer .*ZeRO-3"):
        apply_leanloss(trainer)


def test_refuses_an_unsupported_trl_version(monkeypatch):
    trainer = _sft(False)
    monkeypatch.setattr(trl, "__version__", "1.15.0")
    with pytest.raises(UnsupportedTrainerError, match=r"SFTTrainer.*TRL 1\.15\.0 is not supported"):
        apply_leanloss(trainer)


def test_distillation_refuses_softcapping():
    ds = Dataset.from_dict({"prompt": _sentences(4, 3, 6, 2)})
    args = _common(trl.DistillationConfig, False, per_device_train_batch_size=4, max_completion_length=4)
    trainer = trl.DistillationTrainer(model=tiny_llama(), teacher_model=_gemma2(), args=args, train_dataset=ds,
                                      processing_class=tiny_tokenizer())
    with pytest.raises(UnsupportedTrainerError, match="teacher model has final_logit_softcapping"):
        apply_leanloss(trainer)


def test_add_fused_lm_head_names_a_bad_argument():
    with pytest.raises(ValueError, match="'outputs'"):
        add_fused_lm_head(tiny_llama(), outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="'temperature'"):
        add_fused_lm_head(tiny_llama(), temperature=0.0)


# ------------------------------------------------------------------------------------------------
# the distillation divergence against TRL's own function


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_divergence_equals_trl(beta, temperature):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    ht = torch.randn(3, 5, 24, generator=g)
    ws = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_()
    wt = torch.randn(50, 24, generator=g) * 0.5
    bs = torch.randn(50, generator=g).requires_grad_()
    bt = torch.randn(50, generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    opts = dict(num_items_in_batch=torch.tensor(20.0), student_lm_head_bias=bs, teacher_lm_head_bias=bt,
                student_logit_scale=1.3, teacher_logit_scale=0.9, temperature=temperature)
    want = _chunked_divergence_loss(hs, ht, ws, wt, mask, beta, **opts)
    want_grads = torch.autograd.grad(want[0], (hs, ws, bs))
    got = lt.divergence_loss(hs, ht, ws, wt, mask, beta, **opts)
    got_grads = torch.autograd.grad(got[0], (hs, ws, bs))
    for w, o in zip((*want, *want_grads), (*got, *got_grads)):
        torch.testing.assert_close(o.to(w.dtype), w, rtol=1e-5, atol=1e-6)


def test_a_head_inside_accelerate_wrappers_is_replaced():
    """accelerate wraps a prepared model's forward (autocast, float32 outputs) around TRL's fused
    forward; the replacement happens inside the wrappers, which stay."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    reference = tiny_llama()
    trl_utils.add_fused_lm_head(reference, outputs=FIELDS)
    model = copy.deepcopy(reference)
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    try:
        model = accelerator.prepare_model(model, evaluation_mode=True)
        wrapper = model.forward
        assert lt._repatch(model) and model.forward is wrapper  # the wrappers stay
        inputs = _inputs(False)
        with _counting_calls() as counts:
            got = model(**inputs, fused_lm_head=True)
        assert counts == {"leanloss": 1}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = reference(**inputs, fused_lm_head=True)
        torch.testing.assert_close(got.log_probs, want.log_probs, rtol=0.02, atol=0.02)
    finally:
        AcceleratorState._reset_state(True)


def test_grpo_example_runs():
    """examples/trl_grpo.py, one step on a smaller model: it trains and logs a reward in [0, 1]."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "trl_grpo.py")
    spec = importlib.util.spec_from_file_location("trl_grpo_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with _counting_calls() as counts:
        rewards = example.main(["--steps", "1", "--vocab", "64", "--hidden", "32"])
    assert len(rewards) == 1 and 0.0 <= rewards[0] <= 1.0
    assert counts["leanloss"] > 0 and counts["trl"] == 0


def test_without_trl_the_import_error_names_the_extra(monkeypatch):
    import importlib
    import sys
    monkeypatch.setitem(sys.modules, "trl", None)  # what an environment without TRL gives
    monkeypatch.delitem(sys.modules, "leanloss.integrations.trl")
    with pytest.raises(ImportError, match=r"pip install 'leanloss\[trl\]'"):
        importlib.import_module("leanloss.integrations.trl")
