"""leanloss.integrations.trl against TRL itself (the oracle).

Every TRL trainer runs one optimizer step on a tiny random Llama (no downloads; a word-level
tokenizer built in memory) twice from the same seed, with and without ``apply_leanloss``:
the logged loss and metrics and the gradient of every parameter must agree. In float32: to 1e-5
relative. With the models in bf16: leanloss's error against the same step in float64 (same
parameters, same completions) within twice TRL's own bf16 error. The patched forward is compared
field by field with TRL's on the same model.
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


# Each builder takes ``bf16`` (TRL's bf16 autocast) and ``dtype``, the dtype of every model it builds.


def _sft(bf16, dtype=torch.float32):
    ds = Dataset.from_dict({"text": _sentences(8, 4, 14, 1)})
    args = _common(trl.SFTConfig, bf16, per_device_train_batch_size=4)
    return trl.SFTTrainer(model=tiny_llama().to(dtype), args=args, train_dataset=ds, processing_class=tiny_tokenizer())


def _grpo(bf16, dtype=torch.float32, trainer_cls=None, config_cls=None, **extra):
    trainer_cls, config_cls = trainer_cls or trl.GRPOTrainer, config_cls or trl.GRPOConfig
    ds = Dataset.from_dict({"prompt": _sentences(8, 3, 6, 2)})
    args = _common(config_cls, bf16, per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=6, temperature=0.8, beta=0.04, **extra)
    # an instance loaded from the path: TRL loads the reference model from the same path in its dtype
    model = tiny_llama_path() if dtype == torch.float32 else LlamaForCausalLM.from_pretrained(tiny_llama_path(), dtype=dtype)
    return trainer_cls(model=model, reward_funcs=_reward, args=args, train_dataset=ds, processing_class=tiny_tokenizer())


def _rloo(bf16, dtype=torch.float32):
    return _grpo(bf16, dtype, trl.RLOOTrainer, trl.RLOOConfig)


def _dpo(bf16, dtype=torch.float32):
    n = 8
    ds = Dataset.from_dict({"prompt": _sentences(n, 2, 5, 3), "chosen": _sentences(n, 2, 6, 4),
                            "rejected": _sentences(n, 2, 6, 5)})
    args = _common(trl.DPOConfig, bf16, per_device_train_batch_size=4)
    return trl.DPOTrainer(model=tiny_llama().to(dtype), ref_model=tiny_llama(seed=1).to(dtype), args=args,
                          train_dataset=ds, processing_class=tiny_tokenizer())


def _kto(bf16, dtype=torch.float32):
    n = 8
    ds = Dataset.from_dict({"prompt": _sentences(n, 2, 5, 3), "completion": _sentences(n, 2, 6, 4),
                            "label": [bool(i % 2) for i in range(n)]})
    args = _common(trl.KTOConfig, bf16, per_device_train_batch_size=4)
    return trl.KTOTrainer(model=tiny_llama().to(dtype), ref_model=tiny_llama(seed=1).to(dtype), args=args,
                          train_dataset=ds, processing_class=tiny_tokenizer())


def _distill(bf16, dtype=torch.float32, beta=0.5, temperature=0.9):
    ds = Dataset.from_dict({"prompt": _sentences(8, 3, 6, 2)})
    args = _common(trl.DistillationConfig, bf16, per_device_train_batch_size=4, max_completion_length=6,
                   beta=beta, temperature=temperature)
    return trl.DistillationTrainer(model=tiny_llama().to(dtype), teacher_model=tiny_llama(seed=1, hidden=48).to(dtype),
                                   args=args, train_dataset=ds, processing_class=tiny_tokenizer())


def _distill_softcap(bf16, dtype=torch.float32):
    """Distillation of heads with ``final_logit_softcapping``, which TRL reads from the configs and
    applies to both sides' logits in the divergence. Llamas whose configs carry it: the models'
    own forward (here only generation) ignores it; Gemma 2 itself gives NaN at padded positions
    in float64 (its eager attention), which the bf16 test's reference needs."""
    ds = Dataset.from_dict({"prompt": _sentences(8, 3, 6, 2)})
    args = _common(trl.DistillationConfig, bf16, per_device_train_batch_size=4, max_completion_length=6,
                   beta=0.3, temperature=0.9)
    # initializer_range: logits of std about 2, which the caps bend
    student = tiny_llama(final_logit_softcapping=3.0, initializer_range=0.3).to(dtype)
    teacher = tiny_llama(seed=1, hidden=48, final_logit_softcapping=2.0, initializer_range=0.3).to(dtype)
    return trl.DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                   processing_class=tiny_tokenizer())


def _sft_lora(bf16, dtype=torch.float32):
    """SFT of a LoRA adapter: TRL patches the PEFT model's base model."""
    peft = pytest.importorskip("peft")
    ds = Dataset.from_dict({"text": _sentences(8, 4, 14, 1)})
    args = _common(trl.SFTConfig, bf16, per_device_train_batch_size=4)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return trl.SFTTrainer(model=tiny_llama().to(dtype), args=args, train_dataset=ds, processing_class=tiny_tokenizer(),
                          peft_config=lora)


TRAINERS = {"sft": _sft, "sft_lora": _sft_lora, "grpo": _grpo, "rloo": _rloo, "dpo": _dpo, "kto": _kto, "distill": _distill,
            "distill_softcap": _distill_softcap}


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


def _step(build, leanloss: bool, bf16: bool = False, dtype=torch.float32, prepare=None):
    """One optimizer step: (logged values without timings, {parameter name: gradient}); checks
    that the step ran leanloss's scorers and never TRL's kernels (or the other way round).
    ``prepare(trainer)`` runs on the built trainer before the step."""
    trainer = build(bf16, dtype)
    if prepare is not None:
        prepare(trainer)
    grads = _Grads()
    trainer.add_callback(grads)
    if leanloss:
        assert apply_leanloss(trainer) is trainer
    torch.manual_seed(0)
    with _counting_calls() as counts:
        trainer.train()
    assert counts["leanloss" if leanloss else "trl"] > 0 and counts["trl" if leanloss else "leanloss"] == 0, counts
    logs = {k: v for k, v in trainer.state.log_history[0].items() if isinstance(v, (int, float))
            and not ("runtime" in k or "per_second" in k or k.endswith("step_time"))}
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
    _assert_close_dicts(got_logs, want_logs, 1e-5, 1e-7, f"{name} logs")
    # Two float32 computations of the same gradient in a different order (TRL's chunks; leanloss's
    # native or compiled kernels) differ by a few roundings of the largest terms where entries
    # cancel toward 0: measured up to 1.7e-6 of the largest entry (the JSD through a native
    # kernel); a wrong term would be off by orders of magnitude more.
    scale = max(g.abs().max().item() for g in want_grads.values())
    _assert_close_dicts(got_grads, want_grads, 1e-5, 4e-6 * scale, f"{name} gradient")


# ------------------------------------------------------------------------------------------------
# bf16 against float64
#
# Each trainer's step runs three times from the same parameters, rounded to bf16 once: the
# reference in float64 (models in float64, TRL's fused head and divergence replaced by the dense
# float64 computations below: TRL's chunked kernels keep their statistics in float32 whatever the
# input dtype, so they would cap the reference at float32), then TRL's own head and leanloss's with
# the models in bf16 (eager: no autocast). Completions are generated once, by the float64 step,
# and replayed in the bf16 steps, so that all three score the same tokens.


def _dense_logits(hidden, weight, bias, temperature, softcap, logit_scale):
    """``softcap(s * (hidden @ weight.T + b)) / T`` in ``hidden``'s dtype, the whole vocabulary at once."""
    z = torch.nn.functional.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _dense_log_probs(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                     logit_scale=1.0, outputs=FIELDS):
    """TRL's ``ChunkedLogProbFunction.apply`` (same arguments and outputs), dense, in the input's dtype."""
    z = _dense_logits(hidden, weight, bias, temperature, final_logit_softcapping, logit_scale)
    logp = z.log_softmax(-1)
    log_probs = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
    with torch.no_grad():
        log_sum_sq = torch.logsumexp(2 * logp, -1) if "log_sum_sq_probs" in outputs else None
        mean_logits = z.mean(-1) if "mean_logits" in outputs else None
        is_top1 = z.argmax(-1) == targets if "is_top1" in outputs else None
    return log_probs, entropy, log_sum_sq, mean_logits, is_top1


def _dense_divergence(h_s, w_s, b_s, h_t, w_t, b_t, beta, temperature=1.0, s_scale=1.0, s_softcap=None,
                      t_scale=1.0, t_softcap=None):
    """TRL's ``ChunkedDivergenceFunction.apply`` (same arguments and outputs), dense, in the input's dtype:
    ``beta KL(p_t||m) + (1 - beta) KL(p_s||m)``, ``m = beta p_t + (1 - beta) p_s``, and the student's entropy."""
    ls = _dense_logits(h_s, w_s, b_s, temperature, s_softcap, s_scale).log_softmax(-1)
    lt = _dense_logits(h_t, w_t, b_t, temperature, t_softcap, t_scale).detach().log_softmax(-1)
    if beta == 0.0:
        divergence = (lt.exp() * (lt - ls)).sum(-1)
    elif beta == 1.0:
        divergence = (ls.exp() * (ls - lt)).sum(-1)
    else:
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))
        divergence = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    return divergence, -(ls.exp() * ls).sum(-1).detach()


@contextlib.contextmanager
def _dense_trl_head():
    """TRL's fused head and divergence computed by the dense functions above while the block runs."""
    from trl.trainer import distillation_trainer
    patches = [(trl_utils, "_ChunkedLogProbFunction", _dense_log_probs),
               (distillation_trainer, "ChunkedDivergenceFunction", _dense_divergence)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, fn in patches:
        setattr(module, name, types.SimpleNamespace(apply=fn))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_the_dense_float64_reference_is_trls_head(beta):
    """The float64 reference computes what TRL's kernels compute (checked in float64, where TRL's
    kernels are float32-accurate): log-probabilities, every statistic, the divergence, the
    entropy and the gradients, with a scale, a soft-cap, a bias and a temperature."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    g = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    h = torch.randn(6, 16, generator=g, **f64).requires_grad_()
    ht = torch.randn(6, 24, generator=g, **f64)
    w = (torch.randn(40, 16, generator=g, **f64) * 0.5).requires_grad_()
    wt = torch.randn(40, 24, generator=g, **f64) * 0.5
    b, bt = torch.randn(40, generator=g, **f64).requires_grad_(), torch.randn(40, generator=g, **f64)
    y = torch.randint(0, 40, (6,), generator=g)
    for (ours, trls), args in (
        ((_dense_log_probs, ChunkedLogProbFunction.apply), (h, w, b, y, 0.7, 16, 3.0, 1.3, FIELDS)),
        ((_dense_divergence, ChunkedDivergenceFunction.apply), (h, w, b, ht, wt, bt, beta, 0.8, 1.2, 2.5, 0.9, 4.0)),
    ):
        want, got = trls(*args), ours(*args)
        total = [sum((x.float() * (k + 1)).sum() for k, x in enumerate(out) if x is not None and x.requires_grad)
                 for out in (want, got)]
        want_grads, got_grads = (torch.autograd.grad(t, (h, w, b)) for t in total)
        for x, ref in zip((*got, *got_grads), (*want, *want_grads)):
            assert (x is None) == (ref is None)
            if ref is not None:
                torch.testing.assert_close(x.to(ref.dtype), ref, rtol=1e-5, atol=1e-6)


def _models(trainer) -> dict:
    return {attr: getattr(trainer, attr) for attr in ("model", "ref_model", "teacher_model")
            if getattr(trainer, attr, None) is not None}


#: the LM heads are multiplied by it: logits of a trained model's spread (std about 2) rather
#: than the near-uniform softmax of a random initialization, which would hide the head's rounding
HEAD_GAIN = 16.0


def _pin(trainer, recorded: dict) -> None:
    """The first call multiplies the trainer's LM heads by HEAD_GAIN, rounds every parameter of its
    models to bf16 and records them, with the completions its generation returns; later calls
    load the recorded parameters and replay the recorded completions (checking the prompts)."""
    first = not recorded
    with torch.no_grad():
        for attr, model in _models(trainer).items():
            if first:
                model.get_output_embeddings().weight.mul_(HEAD_GAIN)
            for name, p in model.named_parameters():
                if first:
                    p.copy_(p.to(torch.bfloat16))
                    recorded[attr, name] = p.detach().clone()
                else:
                    p.copy_(recorded[attr, name])
    original = trainer.model.generate
    calls = recorded.setdefault("generations", [])
    count = iter(range(1 << 30))

    def generate(*args, **kwargs):
        if first:
            out = original(*args, **kwargs)
            calls.append((kwargs["input_ids"].clone(), out.clone()))
            return out
        prompt, out = calls[next(count)]
        assert torch.equal(kwargs["input_ids"], prompt), "the bf16 step generates from other prompts"
        return out.clone()

    trainer.model.generate = generate


#: leanloss's error against float64 may be BF16_FACTOR times TRL's, or BF16_FLOOR. The two bf16
#: steps share the backbone bit for bit and round differently only in the head, so where the
#: backbone's rounding dominates their errors agree to a few percent (measured: within 1.3x for
#: every gradient and metric of every trainer); 2x leaves room for another rounding order of the
#: head, while an error one bf16 ulp large (the temperature check below) puts the loss or the
#: entropy 10x to 50x above TRL's.
#: BF16_FLOOR, 1/16 of bf16's unit roundoff 2^-8, is under every gradient's error (about 1e-2
#: here), so the factor decides those, and over the chance agreement of a scalar averaged over
#: the batch (TRL's loss or entropy error can come out near zero by luck).
BF16_FACTOR, BF16_FLOOR = 2.0, 2.0 ** -12


def _bf16_errors(run, reference) -> dict:
    """Relative errors of a step against the float64 step: ``log:<key>`` for every logged value
    (the loss among them; absolute below 1e-6, where RLOO's loss, a sum of advantages, cancels),
    ``grad:<name>`` for every gradient as a relative norm error."""
    (logs, grads), (ref_logs, ref_grads) = run, reference
    assert logs.keys() == ref_logs.keys() and grads.keys() == ref_grads.keys()
    out = {}
    for k, r in ref_logs.items():
        if not (isinstance(r, float) and math.isnan(r)):
            out[f"log:{k}"] = abs(logs[k] - r) / max(abs(r), 1e-6)
    for k, r in ref_grads.items():
        r = r.double()
        out[f"grad:{k}"] = ((grads[k].double() - r).norm() / r.norm().clamp(min=1e-30)).item()
    return out


def _check_bf16_errors(ours: dict, trls: dict, what: str) -> None:
    worse = {k: (ours[k], trls[k]) for k in trls if ours[k] > max(BF16_FACTOR * trls[k], BF16_FLOOR)}
    assert not worse, f"{what}: leanloss's bf16 error against float64 above max({BF16_FACTOR} x TRL's, {BF16_FLOOR}) " \
                      f"(leanloss, TRL): {worse}"


@contextlib.contextmanager
def _temperature_off_by(factor: float):
    """leanloss's scorers see ``temperature * factor`` while the block runs."""
    saved = {name: getattr(lt, name) for name in ("linear_log_probs", "linear_distill_loss")}

    def off(fn):
        return lambda *args, temperature=1.0, **kwargs: fn(*args, temperature=temperature * factor, **kwargs)

    for name, fn in saved.items():
        setattr(lt, name, off(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(lt, name, fn)


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_one_step_in_bf16_is_as_close_to_float64_as_trl(name):
    """Models in bf16: leanloss's loss, gradients and logged metrics are within BF16_FACTOR times
    TRL's own error against the float64 step (or BF16_FLOOR). The check can fail: leanloss's step
    with its temperature off by one bf16 ulp (x (1 + 2^-7), as if rounded through bf16) is rejected."""
    build, pin = TRAINERS[name], functools.partial(_pin, recorded={})
    with _dense_trl_head():
        reference = _step(build, leanloss=False, dtype=torch.float64, prepare=pin)
    trl_err = _bf16_errors(_step(build, leanloss=False, dtype=torch.bfloat16, prepare=pin), reference)
    our_err = _bf16_errors(_step(build, leanloss=True, dtype=torch.bfloat16, prepare=pin), reference)
    _check_bf16_errors(our_err, trl_err, name)
    with _temperature_off_by(1 + 2.0 ** -7):
        bad_err = _bf16_errors(_step(build, leanloss=True, dtype=torch.bfloat16, prepare=pin), reference)
    with pytest.raises(AssertionError, match="above max"):
        _check_bf16_errors(bad_err, trl_err, name)


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


def test_add_fused_lm_head_names_a_bad_argument():
    with pytest.raises(ValueError, match="'outputs'"):
        add_fused_lm_head(tiny_llama(), outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="'temperature'"):
        add_fused_lm_head(tiny_llama(), temperature=0.0)


# ------------------------------------------------------------------------------------------------
# the distillation divergence against TRL's own function


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("softcaps", [(None, None), (1.5, None), (2.0, 0.9)])
def test_divergence_equals_trl(beta, temperature, softcaps):
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
                student_logit_scale=1.3, teacher_logit_scale=0.9, temperature=temperature,
                student_final_logit_softcapping=softcaps[0], teacher_final_logit_softcapping=softcaps[1])
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
