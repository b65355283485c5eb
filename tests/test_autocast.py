"""leanloss under ``torch.autocast`` against torch under the same autocast (the oracle).

Every dense loss must give its torch twin's output dtype, value, gradient dtype/value and
error-or-not under ``torch.autocast`` (autocast's own cast policy for the op, CPU and CUDA); the
fused losses run their head matmuls in the autocast dtype as ``F.linear`` would and return a
float32 loss with gradients in the parameters' dtypes. CUDA cases skip without a GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _oracle import (TOL, _assert_near_low_precision, gen, index_target, log_probs, logits, positive, probs,
                     raises_like, unit, upstream)

import leanloss
import leanloss.functional as LF

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_CUDA)]
INPUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
DT_IDS = ["bf16", "fp16", "fp32", "fp64"]


def _autocast_dtypes(device):
    return [torch.bfloat16] if device == "cpu" else [torch.bfloat16, torch.float16]


def _under(device, amp_dtype, fn):
    def call(*args, **kwargs):
        with torch.autocast(device, dtype=amp_dtype):
            return fn(*args, **kwargs)
    return call


def _to(device, args):
    return [a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in args]


def _run(fn, args, kwargs):
    args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in args]
    out = fn(*args, **kwargs)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(out, leaves, upstream(out)) if leaves and out.requires_grad else []
    return out, grads


def _tol(dtype, inputs):
    """Both sides compute in the same dtype from the same (cast) inputs: the kernels' order of
    summation is the only difference, a few ulps -- of float32 when any input is not float64."""
    if dtype == torch.float64 and any(a.dtype != torch.float64 for a in inputs if a.is_floating_point()):
        dtype = torch.float32
    rtol, atol = TOL[dtype]
    return dict(rtol=rtol * 20, atol=atol * 20)


def _assert_same(out, ref, inputs, ref64):
    if out.dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(out, ref, **_tol(out.dtype, inputs), equal_nan=True)
    else:  # a 16-bit result (autocast left the op alone): leanloss rounds once from float32
        _assert_near_low_precision(out, ref, ref64.to(out.dtype), out.dtype, "16-bit result")


def _double(a):
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().double().requires_grad_(a.requires_grad)
    return a


def autocast_compare(ours, theirs, args, kwargs=None, device="cpu", amp_dtype=torch.bfloat16):
    """``ours`` and ``theirs`` under the same autocast: both raise (ours an instance of torch's
    class), or both give the same dtype, shape, value and gradients. Returns ours' output (or
    ``None`` when torch raised)."""
    kwargs = kwargs or {}
    args = _to(device, args)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    ours_ac, theirs_ac = _under(device, amp_dtype, ours), _under(device, amp_dtype, theirs)
    try:
        ref, ref_grads = _run(theirs_ac, args, kwargs)
    except Exception:  # noqa: BLE001 - torch's error is the oracle
        raises_like(lambda: _run(ours_ac, args, kwargs), lambda: _run(theirs_ac, args, kwargs))
        return None
    out, grads = _run(ours_ac, args, kwargs)
    ref64, ref64_grads = ref, ref_grads  # read only for 16-bit results: torch in float64 then
    if out.dtype in (torch.float16, torch.bfloat16):
        ref64, ref64_grads = _run(theirs_ac, [_double(a) for a in args],
                                  {k: _double(v) for k, v in kwargs.items()})
    inputs = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
    assert out.dtype == ref.dtype, f"dtype: leanloss {out.dtype} vs torch {ref.dtype}"
    assert out.shape == ref.shape
    _assert_same(out, ref, inputs, ref64)
    assert len(grads) == len(ref_grads)
    for g, r, r64 in zip(grads, ref_grads, ref64_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        _assert_same(g, r, inputs, r64)
    return out


def _cast(t, dtype):
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def _fp32(t):
    return t if t.dtype == torch.float64 else t.float()


def _cases(dt):
    """name -> (ours, theirs, args, kwargs); ``dt`` is the dtype of the main (first) input."""
    x = _cast(logits((6, 5)), dt)
    x3 = _cast(logits((3, 5, 2)), dt)
    t = index_target((6, 5), ignore_index=-100)
    t3 = index_target((3, 5, 2))
    w32 = positive((5,), torch.float32)
    lp = _cast(log_probs((6, 5)), dt)
    p32 = probs((6, 5), torch.float32, grad=False)
    u = _cast(unit((6, 5)), dt)
    soft32 = unit((6, 5), torch.float32, seed=4, grad=False)
    a, b = _cast(logits((6, 5), seed=5), dt), logits((6, 5), torch.float32, seed=6)
    pm = torch.tensor([1, -1, 1, 1, -1, -1])
    return {
        "ce": (LF.cross_entropy, F.cross_entropy, [x, t], {}),
        "ce_weight_fp32": (LF.cross_entropy, F.cross_entropy, [x, t], {"weight": w32}),
        "ce_weight_same": (LF.cross_entropy, F.cross_entropy, [x, t], {"weight": w32.to(dt)}),
        "ce_smoothing_sum": (LF.cross_entropy, F.cross_entropy, [x, t],
                             {"label_smoothing": 0.1, "reduction": "sum"}),
        "ce_weight_smoothing_none": (LF.cross_entropy, F.cross_entropy, [x, t],
                                     {"weight": w32, "label_smoothing": 0.2, "reduction": "none"}),
        "ce_none_3d": (LF.cross_entropy, F.cross_entropy, [x3, t3], {"reduction": "none"}),
        "ce_probs_fp32": (LF.cross_entropy, F.cross_entropy, [x, p32], {"label_smoothing": 0.2}),
        "nll": (LF.nll_loss, F.nll_loss, [lp, t], {}),
        "nll_weight_fp32": (LF.nll_loss, F.nll_loss, [lp, t], {"weight": w32}),
        "kl_fp32_target": (LF.kl_div, F.kl_div, [lp, p32], {"reduction": "batchmean"}),
        "kl_log_target_same": (LF.kl_div, F.kl_div, [lp, _cast(log_probs((6, 5), seed=8), dt)],
                               {"reduction": "sum", "log_target": True}),
        "bce_fp32_target": (LF.binary_cross_entropy, F.binary_cross_entropy, [u, soft32], {}),
        "bce_weight": (LF.binary_cross_entropy, F.binary_cross_entropy, [u, soft32.to(dt)],
                       {"weight": positive((5,), torch.float32)}),
        "bcel_fp32_target": (LF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
                             [x, soft32], {}),
        "bcel_pos_weight": (LF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
                            [x, soft32.to(dt)], {"pos_weight": w32, "reduction": "none"}),
        "cosine": (LF.cosine_embedding_loss, F.cosine_embedding_loss, [a, b, pm], {"margin": 0.1}),
        "entropy_logits": (lambda z: LF.entropy(logits=z),
                           lambda z: torch.distributions.Categorical(logits=z).entropy(), [x], {}),
        "jsd_beta0_is_kl": (lambda i, tg: LF.jsd(i, tg, beta=0.0, reduction="batchmean"),
                            lambda i, tg: F.kl_div(i, tg, reduction="batchmean"), [lp, p32], {}),
        "distill_forward_is_kl": (
            lambda s, te: LF.distill_loss(s, te, kind="forward", reduction="sum"),
            # computed as kl_div's fp32 policy computes it (log_softmax itself would stay
            # bf16 on CPU: leanloss takes the whole divergence in float32)
            lambda s, te: F.kl_div(F.log_softmax(_fp32(s), -1), F.log_softmax(_fp32(te), -1),
                                   log_target=True, reduction="sum"),
            [a, b], {}),
    }


CASE_NAMES = sorted(_cases(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dt", INPUT_DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_dense_loss_follows_torch_under_autocast(name, dt, device):
    ours, theirs, args, kwargs = _cases(dt)[name]
    for amp_dtype in _autocast_dtypes(device):
        autocast_compare(ours, theirs, args, kwargs, device=device, amp_dtype=amp_dtype)


def test_the_reported_cases_give_torch_float32_results():
    """The user's view: bf16 logits under CPU autocast give torch's float32 loss, not bfloat16."""
    x = logits((8, 11), torch.bfloat16)
    t = index_target((8, 11))
    w = positive((11,), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for ours, theirs in ((leanloss.cross_entropy(x, t), F.cross_entropy(x, t)),
                             (leanloss.nll_loss(x, t), F.nll_loss(x, t)),
                             (leanloss.cross_entropy(x, t, weight=w), F.cross_entropy(x, t, weight=w))):
            assert ours.dtype == theirs.dtype == torch.float32
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        p = torch.sigmoid(x.detach())
        got = leanloss.binary_cross_entropy(p, torch.rand(8, 11))
    assert got.dtype == torch.float32
    # without autocast the bf16 loss is bf16, as in torch
    assert leanloss.cross_entropy(x, t).dtype == torch.bfloat16


def test_autocast_for_another_device_type_changes_nothing():
    x = logits((4, 5), torch.bfloat16)
    t = index_target((4, 5))
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert leanloss.cross_entropy(x, t).dtype == F.cross_entropy(x, t).dtype == torch.bfloat16


def test_entropy_on_cpu_keeps_the_input_dtype_like_categorical():
    x = logits((4, 5), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = leanloss.entropy(logits=x)
        want = torch.distributions.Categorical(logits=x).entropy()
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, **TOL_BF16)


TOL_BF16 = dict(rtol=TOL[torch.bfloat16][0], atol=TOL[torch.bfloat16][1])


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_jsd_and_distill_are_float32_under_autocast(dt):
    lq, p = log_probs((4, 6)).to(dt), probs((4, 6), grad=False).to(dt)
    s, te = logits((4, 6), dt, seed=1), logits((4, 6), dt, seed=2)
    t = index_target((4, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_jsd = leanloss.jsd(lq, p, beta=0.3)
        got_distill = leanloss.distill_loss(s, te, t, kind="jsd", hard_weight=0.3, temperature=2.0)
    assert got_jsd.dtype == got_distill.dtype == torch.float32
    torch.testing.assert_close(got_jsd, leanloss.jsd(lq.float(), p.float(), beta=0.3), rtol=1e-6, atol=1e-7)
    want = leanloss.distill_loss(s.float(), te.float(), t, kind="jsd", hard_weight=0.3, temperature=2.0)
    torch.testing.assert_close(got_distill, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [
    lambda m: m.CrossEntropyLoss(weight=positive((5,), torch.float32), label_smoothing=0.1),
    lambda m: m.NLLLoss(weight=positive((5,), torch.float32)),
    lambda m: m.BCEWithLogitsLoss(pos_weight=positive((5,), torch.float32)),
], ids=["CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss"])
def test_modules_follow_torch_modules_under_autocast(make, device):
    ours, theirs = make(leanloss).to(device), make(torch.nn).to(device)
    x = logits((6, 5), torch.bfloat16)
    target = (index_target((6, 5)) if not isinstance(theirs, torch.nn.BCEWithLogitsLoss)
              else unit((6, 5), torch.float32, grad=False))
    out = autocast_compare(ours, theirs, [x, target], device=device)
    assert out is not None and out.dtype == torch.float32


def test_bce_banned_on_cuda_autocast_is_torchs_error():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    u, y = unit((4, 5)).float().cuda(), unit((4, 5), seed=2, grad=False).float().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        raises_like(LF.binary_cross_entropy, F.binary_cross_entropy, u, y)


# -- fused losses -------------------------------------------------------------------------------


def _head(n=24, d=16, v=300, dtype=torch.float32, seed=0, bias=True, device="cpu"):
    g = gen(seed)
    h = (torch.randn(n, d, generator=g) * 1.5).to(device, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.5 * 3).to(device, dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(device, dtype).requires_grad_() if bias else None
    t = torch.randint(v, (n,), generator=g)
    t[::5] = -100
    return h, w, b, t.to(device)


def _grads(loss, leaves):
    return torch.autograd.grad(loss, [x for x in leaves if x is not None])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "reduction": "sum"}], ids=["mean", "smooth_sum"])
def test_linear_cross_entropy_runs_the_head_in_the_autocast_dtype(kw, device):
    h, w, b, t = _head(device=device)
    amp = torch.bfloat16
    with torch.autocast(device, dtype=amp):
        got = leanloss.linear_cross_entropy(h, w, t, b, chunk_size=7, **kw)
        want = F.cross_entropy(F.linear(h, w, b), t, **kw)  # autocast: bf16 matmul, fp32 loss
    fp32 = F.cross_entropy(F.linear(h, w, b), t, **kw)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # the tolerance above resolves the bf16 head: the float32 head's loss lies outside it
    assert (fp32 - want).abs() > 20 * (2e-5 + 2e-5 * want.abs())
    g_got, g_want = _grads(got, (h, w, b)), _grads(want, (h, w, b))
    for x, gg, gw in zip((h, w, b), g_got, g_want):
        assert gg.dtype == gw.dtype == x.dtype == torch.float32
        torch.testing.assert_close(gg, gw, rtol=2e-2, atol=2e-3 * float(gw.abs().max()))


def test_linear_cross_entropy_keeps_bf16_parameters_bf16_and_ignores_autocast_off():
    h, w, b, t = _head(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = leanloss.linear_cross_entropy(h, w, t, b)
    torch.testing.assert_close(got, leanloss.linear_cross_entropy(h, w, t, b), rtol=0, atol=0)
    gh, gw, gb = _grads(got, (h, w, b))
    assert gh.dtype == gw.dtype == gb.dtype == torch.bfloat16
    # float64 stays float64 under autocast (autocast never casts float64), like F.linear
    h64, w64, b64, t64 = _head(dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert leanloss.linear_cross_entropy(h64, w64, t64, b64).dtype == torch.float64


@pytest.mark.parametrize("fused", ["linear_distill_loss", "vocab_parallel_linear_distill_loss"])
def test_linear_distill_loss_runs_both_heads_in_the_autocast_dtype(fused):
    fn = getattr(leanloss, fused, None) or getattr(leanloss.parallel, fused)
    hs, ws, bs, t = _head(seed=1)
    ht, wt, bt, _ = _head(seed=2, d=12)
    ht, wt, bt = ht.detach(), wt.detach(), bt.detach()
    opts = dict(kind="jsd", beta=0.3, temperature=2.0, hard_weight=0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(hs, ws, ht, wt, t, student_bias=bs, teacher_bias=bt, chunk_size=5, **opts)
        want = leanloss.distill_loss(F.linear(hs, ws, bs), F.linear(ht, wt, bt), t, **opts)
    fp32 = leanloss.distill_loss(F.linear(hs, ws, bs), F.linear(ht, wt, bt), t, **opts)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert (fp32 - want).abs() > 5 * (2e-5 + 2e-5 * want.abs())
    for x, gg, gw in zip((hs, ws, bs), _grads(got, (hs, ws, bs)), _grads(want, (hs, ws, bs))):
        assert gg.dtype == gw.dtype == x.dtype
        torch.testing.assert_close(gg, gw, rtol=2e-2, atol=2e-3 * float(gw.abs().max()))


@pytest.mark.parametrize("fused", ["linear_topk_distill_loss", "vocab_parallel_linear_topk_distill_loss"])
def test_linear_topk_distill_loss_runs_the_head_in_the_autocast_dtype(fused):
    fn = getattr(leanloss, fused, None) or getattr(leanloss.parallel, fused)
    h, w, b, t = _head(seed=4)
    g = gen(5)
    ids = torch.stack([torch.randperm(300, generator=g)[:6] for _ in range(24)])
    lps = torch.log_softmax(torch.randn(24, 6, generator=g), -1)
    opts = dict(temperature=1.5, hard_weight=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(h, w, ids, lps, t, student_bias=b, chunk_size=5, **opts)
        want = leanloss.topk_distill_loss(F.linear(h, w, b), ids, lps, t, **opts)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    for x, gg, gw in zip((h, w, b), _grads(got, (h, w, b)), _grads(want, (h, w, b))):
        assert gg.dtype == gw.dtype == x.dtype
        torch.testing.assert_close(gg, gw, rtol=2e-2, atol=2e-3 * float(gw.abs().max()))


def test_vocab_parallel_linear_cross_entropy_follows_autocast_single_process():
    from leanloss.parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    h, w, b, t = _head(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vocab_parallel_linear_cross_entropy(h, w, t, bias=b, label_smoothing=0.1, chunk_size=6)
        want = F.cross_entropy(F.linear(h, w, b), t, label_smoothing=0.1)
        z = F.linear(h, w, b)
        dense = vocab_parallel_cross_entropy(z, t, label_smoothing=0.1)
    assert got.dtype == want.dtype == dense.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(dense, want, rtol=2e-6, atol=2e-6)
    for gg, gw in zip(_grads(got, (h, w, b)), _grads(want, (h, w, b))):
        assert gg.dtype == torch.float32
        torch.testing.assert_close(gg, gw, rtol=2e-2, atol=2e-3 * float(gw.abs().max()))


# -- transformers Trainer with bf16=True (CPU autocast) -------------------------------------------


def test_trainer_bf16_autocast_matches_the_unpatched_trainer(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import leanloss.integrations.transformers as lt
    from leanloss.integrations.transformers import LeanlossTrainer

    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ref = copy.deepcopy(model)
    heads, calls = [], []

    def head_dtype(module, inputs, output):  # the unpatched head runs in bf16 under autocast
        heads.append(output.dtype)

    ref.lm_head.register_forward_hook(head_dtype)
    real = lt.linear_cross_entropy

    def spy(hidden, weight, target, bias=None, **kw):
        loss = real(hidden, weight, target, bias, **kw)
        with torch.no_grad():  # the dense loss on the head autocast gives, summed / num_items
            z = F.linear(hidden, weight, bias)
            dense = F.cross_entropy(z.float(), target, reduction="sum") / kw["num_items"]
        calls.append((z.dtype, loss.dtype, loss.item(), dense.item()))
        return loss

    monkeypatch.setattr(lt, "linear_cross_entropy", spy)

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(3)
            self.rows = [torch.randint(0, 1000, (10,), generator=g) for _ in range(8)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            ids = self.rows[i]
            return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())

    def train(cls, m, out):
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=0.5,
            optim="sgd", logging_steps=1, report_to=[], use_cpu=True, bf16=True, seed=7,
            data_seed=7, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = cls(model=m, args=args, train_dataset=Rows())
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e], trainer

    losses, trainer = train(LeanlossTrainer, model, tmp_path / "lean")
    ref_losses, _ = train(transformers.Trainer, ref, tmp_path / "ref")
    assert heads and set(heads) == {torch.bfloat16}
    assert len(losses) == 2 and len(calls) == 2
    for head, loss_dtype, fused, dense in calls:  # leanloss under the Trainer's autocast
        assert head == torch.bfloat16 and loss_dtype == torch.float32
        assert abs(fused - dense) <= 1e-6 * abs(dense)  # the fp32 head is ~4e-6 off here
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-3, atol=0)
    for (name, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3, msg=name)
