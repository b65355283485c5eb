"""apply_leanloss / LeanlossTrainer against the unpatched transformers model (the oracle).

Tiny random configs built locally (no downloads), fp32, eager attention. Every comparison is
patched vs an exact deepcopy of the unpatched model on the same inputs.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainingArguments,
)

import leanloss.integrations.transformers as lt  # noqa: E402
from leanloss.integrations.transformers import (  # noqa: E402
    LeanlossTrainer,
    UnsupportedModelError,
    apply_leanloss,
    is_leanloss_applied,
    remove_leanloss,
)

COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
)


def _llama(vocab=1000, **kw):
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **COMMON, **kw))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=2000, **COMMON))


def _gemma2():
    # A cap well inside the logits' range (large init) so that soft-capping changes the loss.
    cfg = Gemma2Config(vocab_size=1500, head_dim=8, final_logit_softcapping=1.5,
                       initializer_range=0.5, **COMMON)
    return Gemma2ForCausalLM(cfg)


def _cohere():
    return CohereForCausalLM(CohereConfig(vocab_size=1200, logit_scale=0.25, **COMMON))


def _granite():
    return GraniteForCausalLM(GraniteConfig(vocab_size=1300, logits_scaling=4.0, **COMMON))


def _mixtral(**kw):  # MoE: keeps its MoeCausalLMOutputWithPast (router logits) class
    return MixtralForCausalLM(MixtralConfig(vocab_size=1000, num_local_experts=2, **COMMON, **kw))


def _llama_with_head_bias():
    model = _llama(vocab=1100, tie_word_embeddings=False)
    head = torch.nn.Linear(32, 1100, bias=True)
    torch.nn.init.normal_(head.bias, std=0.5)
    model.lm_head = head
    return model


BUILDERS = {
    "llama": _llama, "qwen2": _qwen2, "gemma2": _gemma2, "cohere": _cohere,
    "granite": _granite, "mixtral": _mixtral,
    "llama_head_bias": _llama_with_head_bias,
}


def _pair(name, seed=0):
    torch.manual_seed(seed)
    ref = BUILDERS[name]().train()
    return apply_leanloss(copy.deepcopy(ref)), ref


def _batch(vocab, batch=3, seq=9, seed=1):
    """Right- and left-padded rows (attention_mask 0, labels -100) plus scattered -100 labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -3:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 4] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _assert_same_loss_and_grads(patched, ref, **inputs):
    out = patched(**inputs)
    expected = ref(**inputs)
    assert out.logits is None
    assert type(out) is type(expected)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    expected.loss.backward()
    names = [n for n, _ in ref.named_parameters()]
    assert names == [n for n, _ in patched.named_parameters()]
    for (name, p), q in zip(patched.named_parameters(), ref.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    return out, expected


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_loss_and_all_gradients_match_unpatched(name):
    patched, ref = _pair(name)
    vocab = ref.get_output_embeddings().weight.shape[0]
    _assert_same_loss_and_grads(patched, ref, **_batch(vocab))


def test_gemma2_softcap_and_cohere_scale_are_applied():
    # The oracle would not notice a missing transform if it did not change the loss.
    for name, attr in (("gemma2", "softcap"), ("cohere", "logit_scale"), ("granite", "logit_scale")):
        patched, ref = _pair(name)
        state = patched.__dict__[lt._STATE_ATTR]
        inputs = _batch(ref.config.vocab_size)
        with_transform = patched(**inputs).loss
        setattr(state, attr, None if attr == "softcap" else 1.0)
        without = patched(**inputs).loss
        assert (with_transform - without).abs() > 1e-3, name
        torch.testing.assert_close(with_transform, ref(**inputs).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_num_items_in_batch_is_the_divisor(name, monkeypatch):
    patched, ref = _pair(name)
    seen = []
    real = lt.linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs["num_items"])
        return real(*args, **kwargs)

    monkeypatch.setattr(lt, "linear_cross_entropy", spy)
    inputs = _batch(ref.config.vocab_size)
    num_items = torch.tensor(41)
    out, expected = _assert_same_loss_and_grads(
        patched, ref, **inputs, num_items_in_batch=num_items
    )
    assert seen and int(seen[0]) == 41
    # and it really changes the value: the plain mean divides by the valid shifted targets
    valid = (inputs["labels"][:, 1:] != -100).sum()
    plain = ref(**inputs).loss
    assert valid != 41
    torch.testing.assert_close(out.loss * 41, plain * valid, rtol=1e-5, atol=1e-5)


def test_shift_labels_keyword_is_honoured():
    patched, ref = _pair("llama")
    inputs = _batch(1000)
    shift = torch.roll(inputs["labels"], -2, dims=1)  # not the default shift
    _assert_same_loss_and_grads(patched, ref, **inputs, shift_labels=shift)


@pytest.mark.parametrize("keep", [4, "index"])
def test_logits_to_keep(keep):
    patched, ref = _pair("qwen2")
    inputs = _batch(2000)
    if keep == "index":
        keep = torch.tensor([0, 3, 5, 6])
        inputs["labels"] = inputs["labels"][:, keep]
    else:
        inputs["labels"] = inputs["labels"][:, -keep:]
    _assert_same_loss_and_grads(patched, ref, **inputs, logits_to_keep=keep)


def test_logits_to_keep_label_mismatch_is_a_clear_error():
    patched, _ = _pair("llama")
    with pytest.raises(ValueError, match="logits_to_keep"):
        patched(**_batch(1000), logits_to_keep=2)


def test_without_labels_or_in_eval_logits_are_unchanged():
    patched, ref = _pair("gemma2")
    inputs = _batch(1500)
    labels = inputs.pop("labels")
    torch.testing.assert_close(patched(**inputs).logits, ref(**inputs).logits, rtol=0, atol=0)
    patched.eval(), ref.eval()
    out, expected = patched(**inputs, labels=labels), ref(**inputs, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    # eval_logits=False: fused in eval too; return_logits overrides either way
    apply_leanloss(patched, eval_logits=False)
    fused = patched(**inputs, labels=labels)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert patched(**inputs, labels=labels, return_logits=True).logits is not None
    patched.train()
    assert patched(**inputs, labels=labels, return_logits=True).logits is not None


def test_return_dict_false_gives_a_tuple_led_by_the_loss():
    patched, ref = _pair("llama")
    inputs = _batch(1000)
    out = patched(**inputs, return_dict=False, use_cache=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], ref(**inputs).loss, rtol=1e-5, atol=1e-6)


def test_positional_arguments_bind_like_the_original():
    patched, ref = _pair("llama")
    b = _batch(1000)
    out = patched(b["input_ids"], b["attention_mask"], labels=b["labels"])
    torch.testing.assert_close(out.loss, ref(**b).loss, rtol=1e-5, atol=1e-6)


def test_remove_restores_the_original_forward_exactly():
    torch.manual_seed(0)
    model = _llama()
    untouched = copy.deepcopy(model)
    class_forward = type(model).forward
    original_sig = inspect.signature(model.forward)
    apply_leanloss(model)
    assert is_leanloss_applied(model)
    assert inspect.signature(model.forward) == original_sig  # what Trainer inspects
    copied = copy.deepcopy(model)  # the patch follows deepcopy to the copy
    assert copied.forward.__self__ is copied and is_leanloss_applied(copied)
    remove_leanloss(model)
    assert not is_leanloss_applied(model) and "forward" not in model.__dict__
    assert model.forward.__func__ is class_forward
    inputs = _batch(1000)
    out, expected = model(**inputs), untouched(**inputs)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not patched"):
        remove_leanloss(model)


def test_remove_restores_an_instance_level_forward():
    torch.manual_seed(0)
    model = _llama()
    wrapped = model.forward
    model.forward = wrapped  # e.g. what accelerate installs
    apply_leanloss(model)
    apply_leanloss(model)  # patching twice replaces, never stacks
    remove_leanloss(model)
    assert model.__dict__["forward"] is wrapped


class _TripledLogits(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        # an architecture-specific logit transform the config does not announce
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out.logits = out.logits * 3
        return out


class _StarArgs(LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_refuses_what_it_cannot_reproduce():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, **COMMON)
    with pytest.raises(UnsupportedModelError, match="output embeddings"):
        apply_leanloss(LlamaModel(cfg))
    with pytest.raises(UnsupportedModelError, match="takes \\*args"):
        apply_leanloss(_StarArgs(cfg))
    with pytest.raises(UnsupportedModelError, match="max deviation"):
        apply_leanloss(_TripledLogits(cfg))
    model = LlamaForCausalLM(cfg)
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(UnsupportedModelError, match="loss function"):
        apply_leanloss(model)
    model = LlamaForCausalLM(cfg)
    model.config.logits_scaling = 2.0  # read as a Granite-style scale Llama does not apply
    with pytest.raises(UnsupportedModelError, match="max deviation"):
        apply_leanloss(model)
    assert not is_leanloss_applied(model)
    with pytest.raises(UnsupportedModelError, match="router auxiliary loss"):
        apply_leanloss(_mixtral(output_router_logits=True))
    patched = apply_leanloss(_mixtral())
    with pytest.raises(UnsupportedModelError, match="router auxiliary loss"):
        patched(**_batch(1000), output_router_logits=True)


def test_verify_false_skips_the_probe():
    torch.manual_seed(0)
    model = _TripledLogits(LlamaConfig(vocab_size=1000, **COMMON))
    assert is_leanloss_applied(apply_leanloss(model, verify=False))  # the user's responsibility


def test_bfloat16_model_matches_within_bf16_rounding():
    patched, ref = _pair("gemma2")
    patched.to(torch.bfloat16), ref.to(torch.bfloat16)
    apply_leanloss(patched)  # the probe accepts bf16 rounding
    inputs = _batch(1500)
    out, expected = patched(**inputs), ref(**inputs)
    assert out.loss.dtype == torch.float32 and out.logits is None
    torch.testing.assert_close(out.loss, expected.loss.float(), rtol=2e-2, atol=0)


def test_refuses_a_head_that_is_not_a_plain_linear():
    torch.manual_seed(0)
    model = _llama()

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model.lm_head = Scaled(32, 1000, bias=False)
    with pytest.raises(UnsupportedModelError, match="plain nn.Linear"):
        apply_leanloss(model)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, vocab, n=12, seq=10):
        g = torch.Generator().manual_seed(3)
        self.rows = []
        for i in range(n):
            ids = torch.randint(0, vocab, (seq,), generator=g)
            mask = torch.ones(seq, dtype=torch.long)
            mask[seq - (i % 5) * 2:] = 0  # different valid counts per row
            self.rows.append(dict(input_ids=ids, attention_mask=mask,
                                  labels=ids.masked_fill(mask == 0, -100)))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(trainer_cls, model, tmp_path, **extra):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=0.5, optim="sgd", logging_steps=1, report_to=[],
        use_cpu=True, seed=7, data_seed=7, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, **extra,
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=_Rows(model.config.vocab_size))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_trainer_with_gradient_accumulation_matches_unpatched(tmp_path, monkeypatch, smoothing):
    from transformers.trainer_pt_utils import LabelSmoother

    if smoothing and "num_items_in_batch" not in inspect.signature(LabelSmoother.__call__).parameters:
        pytest.skip(f"transformers {transformers.__version__}: its LabelSmoother averages each micro-batch on its "
                    "own (no num_items_in_batch; transformers 5 adds it), so the unpatched Trainer is no "
                    "reference for label smoothing under gradient accumulation")
    seen = []
    real = lt.linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append((kwargs["num_items"], kwargs["label_smoothing"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(lt, "linear_cross_entropy", spy)
    torch.manual_seed(0)
    model = _llama(vocab=1000)
    ref, initial = copy.deepcopy(model), copy.deepcopy(model)
    extra = dict(label_smoothing_factor=smoothing) if smoothing else {}
    losses, trainer = _train(LeanlossTrainer, model, tmp_path / "lean", **extra)
    ref_losses, _ = _train(Trainer, ref, tmp_path / "ref", **extra)
    assert len(losses) == 3 and len(seen) == 6  # 3 optimizer steps x 2 micro-batches
    assert all(n is not None and s == smoothing for n, s in seen)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    # SGD (not Adam, which would amplify fp32 rounding in near-zero gradients)
    moved = max((p - p0).abs().max() for p, p0 in zip(ref.parameters(), initial.parameters()))
    assert moved > 1e-3
    for (name, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
