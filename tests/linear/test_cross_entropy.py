"""linear_cross_entropy against the dense torch reference (values and all three gradients)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import leanloss
from leanloss import LinearCrossEntropyLoss, linear_cross_entropy
from leanloss._checks import LeanlossValueError, TargetOutOfRangeError
from leanloss._fused import engine as _engine

from _oracle import linear_cross_entropy_reference as reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


def make(n=29, d=12, v=41, *, dtype=torch.float64, bias=False, ignore_frac=0.25, seed=0,
         lead=None, device="cpu", ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (n,)
    h = torch.randn(*shape, d, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
         if bias else None)
    t = torch.randint(0, v, shape, generator=g)
    t[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    return h, w, b, t.to(device)


def grads(loss, leaves, upstream=None):
    out = loss if upstream is None else (loss * upstream).sum()
    present = [x for x in leaves if x is not None]
    return torch.autograd.grad(out, present)


def assert_matches(kw, *, dtype=torch.float64, bias=False, chunk_size=7, lead=None, seed=0,
                   atol=1e-10, rtol=1e-9, device="cpu", v=41):
    h, w, b, t = make(dtype=dtype, bias=bias, lead=lead, seed=seed, device=device, v=v,
                      ignore_index=kw.get("ignore_index", -100))
    out = linear_cross_entropy(h, w, t, b, chunk_size=chunk_size, **kw)
    ref = reference(h, w, t, b, **kw)
    up = None
    if kw.get("reduction") == "none":
        up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64).to(device)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    got = grads(out.double(), (h, w, b), up)
    want = grads(ref, (h, w, b), up)
    for name, a, e in zip(("hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def _cw(v=41, seed=3):
    return torch.rand(v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1


SINGLE_ARGS = [
    {},
    {"label_smoothing": 0.1},
    {"class_weight": _cw()},
    {"z_loss": 1e-2},
    {"softcap": 2.5},
    {"logit_scale": 0.6},
    {"num_items": 13},
    {"num_items": torch.tensor(9)},
    {"ignore_index": 5},
    {"reduction": "sum"},
    {"reduction": "none"},
]
COMBINED = {"label_smoothing": 0.15, "class_weight": _cw(), "z_loss": 0.05, "softcap": 3.0,
            "logit_scale": 1.7, "num_items": 17}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kw", SINGLE_ARGS, ids=lambda k: "-".join(k) or "default")
def test_each_argument_float64(kw, bias):
    assert_matches(kw, bias=bias)


FEATURES = [{"label_smoothing": 0.2}, {"class_weight": _cw()}, {"z_loss": 0.03},
            {"softcap": 1.5}, {"logit_scale": 2.0}, {"ignore_index": 3}]
PAIRS = [dict(a, **b) for a, b in itertools.combinations(FEATURES, 2)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kw", PAIRS, ids=lambda k: "+".join(k))
def test_argument_pairs_float64(kw, reduction):
    assert_matches(dict(kw, reduction=reduction), bias=reduction != "sum", chunk_size=6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_arguments_combined_float64(reduction):
    kw = dict(COMBINED, reduction=reduction)
    if reduction != "mean":
        kw.pop("num_items")
    assert_matches(kw, bias=True)


@pytest.mark.parametrize("kw", [{}, dict(COMBINED), {"label_smoothing": 0.2, "reduction": "none"}],
                         ids=["default", "combined", "smooth-none"])
def test_float32(kw):
    assert_matches(kw, dtype=torch.float32, bias=True, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("reduction, ignore_index, eps, ignore_frac", [
    ("mean", -100, 0.1, 0.25), ("sum", -100, 0.3, 0.25), ("none", 2, 0.1, 0.25), ("mean", 2, 1.0, 0.25),
    ("mean", -100, 0.0, 1.0),
])
def test_reference_is_torch_cross_entropy(reduction, ignore_index, eps, ignore_frac):
    """The test oracle itself: without z-loss it is exactly torch's cross entropy (all ignored:
    nan for 'mean', like torch)."""
    h, w, b, t = make(bias=True, ignore_index=ignore_index, ignore_frac=ignore_frac)
    opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
    cw = _cw()
    dense = F.cross_entropy(h @ w.T + b, t, weight=cw, **opts)
    torch.testing.assert_close(reference(h, w, t, b, class_weight=cw, **opts), dense, equal_nan=True)


def test_z_loss_unweighted_is_mean_lse_squared():
    h, w, _, t = make(ignore_frac=0.3)
    keep = t != -100
    z = h[keep] @ w.T
    want = F.cross_entropy(z, t[keep]) + 0.1 * torch.logsumexp(z, 1).pow(2).mean()
    torch.testing.assert_close(linear_cross_entropy(h, w, t, z_loss=0.1), want)


@pytest.mark.parametrize("lead", [(30,), (3, 10), (2, 3, 5)], ids=str)
def test_leading_shapes(lead):
    assert_matches({"reduction": "none"}, lead=lead, bias=True)
    assert_matches({}, lead=lead)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 29, 64, None])
def test_chunk_sizes(chunk_size):
    # N=29 kept ~22 rows: chunks that divide, that don't, and one larger than N.
    assert_matches({"label_smoothing": 0.1, "z_loss": 0.01}, chunk_size=chunk_size, bias=True)


def test_negative_class_weights_take_the_general_path():
    cw = _cw() - 0.5
    assert (cw < 0).any() and (cw > 0).any()
    assert_matches({"class_weight": cw, "label_smoothing": 0.1, "reduction": "sum"}, bias=True)


def test_vocab_smaller_than_chunk():
    assert_matches({"class_weight": _cw(3), "label_smoothing": 0.3}, v=3, chunk_size=1000)


def test_one_class_head_has_exactly_zero_gradient():
    """A softmax over one class is exactly 1: without z-loss every gradient is exactly 0, with
    smoothing, class weights, softcap and logit scale, 'none' and several blocks."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(20, 6, generator=g).requires_grad_()
    weight = torch.randn(1, 6, generator=g).requires_grad_()
    bias = torch.randn(1, generator=g).requires_grad_()
    target = torch.zeros(20, dtype=torch.long)
    target[3] = -100
    out = linear_cross_entropy(hidden, weight, target, bias, label_smoothing=0.3,
                               class_weight=torch.tensor([1.7]), softcap=5.0, logit_scale=1.3,
                               reduction="none", chunk_size=7)
    assert torch.equal(out, torch.zeros(20))  # -log 1 = 0
    (out * torch.linspace(-2.0, 3.0, 20)).sum().backward()
    for leaf in (hidden, weight, bias):
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_return_lse():
    h, w, b, t = make(bias=True, lead=(3, 9))
    loss, lse = linear_cross_entropy(h, w, t, b, return_lse=True, logit_scale=0.5, softcap=4.0)
    z = 4.0 * torch.tanh((h @ w.T + b) * 0.5 / 4.0)
    want = torch.where(t != -100, torch.logsumexp(z, -1), torch.zeros(()).double())
    assert lse.shape == t.shape and not lse.requires_grad
    torch.testing.assert_close(lse, want)
    torch.testing.assert_close(loss, reference(h, w, t, b, logit_scale=0.5, softcap=4.0))


def test_extreme_logits_stay_exact():
    """A target probability far below float32's range still gives the exact (finite) loss."""
    h, w, _, t = make(dtype=torch.float32, ignore_frac=0.0)
    w32 = (w.detach() * 40).requires_grad_()
    out = linear_cross_entropy(h, w32, t, reduction="none")
    ref = reference(h, w32, t, reduction="none")
    assert ref.max() > 200  # the regime where p_t underflows in float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)


def test_empty_and_all_ignored():
    h, w, b, t = make(bias=True)
    t_ign = torch.full_like(t, -100)
    for reduction in ("mean", "sum", "none"):
        out = linear_cross_entropy(h, w, t_ign, b, reduction=reduction)
        dense = F.cross_entropy(h @ w.T + b, t_ign, reduction=reduction)
        torch.testing.assert_close(out, dense, equal_nan=True)
        got = grads(out.sum(), (h, w, b))
        want = grads(dense.sum(), (h, w, b))
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, equal_nan=True)
    h0 = torch.zeros(0, 12, dtype=torch.float64, requires_grad=True)
    t0 = torch.zeros(0, dtype=torch.long)
    out = linear_cross_entropy(h0, w, t0, reduction="sum")
    assert out.item() == 0.0
    out.backward()
    assert h0.grad.shape == (0, 12) and w.grad.abs().sum() == 0
    assert linear_cross_entropy(h0, w, t0).isnan()
    assert linear_cross_entropy(h0, w, t0, reduction="none").shape == (0,)


def test_only_requested_gradients():
    h, w, b, t = make(bias=True)
    h.requires_grad_(False)
    gw, = torch.autograd.grad(linear_cross_entropy(h, w, t), (w,))
    torch.testing.assert_close(gw, torch.autograd.grad(reference(h, w, t), (w,))[0])
    h.requires_grad_(True)
    w.requires_grad_(False)
    loss = linear_cross_entropy(h, w, t, b)
    gh, gb = torch.autograd.grad(loss, (h, b))
    ref = reference(h, w, t, b)
    eh, eb = torch.autograd.grad(ref, (h, b))
    torch.testing.assert_close(gh, eh)
    torch.testing.assert_close(gb, eb)


def test_backward_twice_through_retained_graph():
    h, w, b, t = make(bias=True)
    loss = linear_cross_entropy(h, w, t, b, z_loss=0.01) * 3.0
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in (h, w, b)]
    loss.backward()
    want = grads(reference(h, w, t, b, z_loss=0.01) * 3.0, (h, w, b))
    for f, x, e in zip(first, (h, w, b), want):
        torch.testing.assert_close(f, e)
        torch.testing.assert_close(x.grad, 2 * e)


def test_no_grad_does_no_gradient_work(monkeypatch):
    h, w, b, t = make(bias=True)
    calls = []
    original = _engine._Grads.add_block
    monkeypatch.setattr(_engine._Grads, "add_block",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, b)
    assert not loss.requires_grad and calls == []
    torch.testing.assert_close(loss, reference(h, w, t, b))
    linear_cross_entropy(h, w, t, b)
    assert calls  # the check above can fail: with grad enabled the engine does do grad work


def test_inputs_not_modified():
    h, w, b, t = make(bias=True)
    cw = _cw()
    before = [x.detach().clone() for x in (h, w, b, t, cw)]
    for reduction in ("mean", "none"):
        out = linear_cross_entropy(h, w, t, b, class_weight=cw, softcap=2.0, label_smoothing=0.1,
                                   z_loss=0.1, logit_scale=2.0, reduction=reduction)
        out.sum().backward()
    for x, y in zip((h, w, b, t, cw), before):
        assert torch.equal(x.detach(), y)


def test_bfloat16_against_float64_reference():
    g = torch.Generator().manual_seed(0)
    n, d, v = 8, 64, 32000
    h = torch.randn(n, d, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.1).bfloat16().requires_grad_()
    b = torch.randn(v, generator=g).bfloat16()
    t = torch.randint(0, v, (n,), generator=g)
    t[2] = -100
    loss = linear_cross_entropy(h, w, t, b, label_smoothing=0.1, chunk_size=3)
    assert loss.dtype == torch.float32
    ref = reference(h, w, t, b, label_smoothing=0.1)
    assert abs(loss.double() - ref) / ref <= 1e-3
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    zl = linear_cross_entropy(h, w, t, b, z_loss=1e-3)  # the non-row-scaled gradient path
    assert abs(zl.double() - reference(h, w, t, b, z_loss=1e-3)) / zl <= 1e-3
    eh, ew = torch.autograd.grad(ref, (h, w))
    assert (h.grad.double() - eh).norm() / eh.norm() < 2e-2
    assert (w.grad.double() - ew).norm() / ew.norm() < 2e-2


def test_gradcheck_tiny():
    h, w, b, t = make(n=5, d=3, v=7, bias=True, ignore_frac=0.2)
    cw = _cw(7)
    for reduction in ("mean", "none"):
        fn = lambda h_, w_, b_: linear_cross_entropy(  # noqa: E731
            h_, w_, t, b_, reduction=reduction, class_weight=cw, label_smoothing=0.1,
            z_loss=0.05, softcap=2.0, chunk_size=2)
        assert torch.autograd.gradcheck(fn, (h, w, b))


def test_torch_compile_matches_eager():
    h, w, b, t = make(bias=True)

    def step(h_, w_, b_, t_):
        return linear_cross_entropy(h_, w_, t_, b_, label_smoothing=0.1, z_loss=0.01) * 2.0

    compiled = torch.compile(step, backend="eager")
    got = compiled(h, w, b, t)
    want = step(h, w, b, t)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads(got, (h, w, b)), grads(want, (h, w, b)))


def test_module_api():
    h, w, b, t = make(bias=True)
    cw = _cw()
    mod = LinearCrossEntropyLoss(class_weight=cw, label_smoothing=0.1, z_loss=0.01, softcap=3.0,
                                 reduction="sum")
    assert "softcap=3.0" in repr(mod) and "class_weight" in dict(mod.named_buffers())
    torch.testing.assert_close(mod(h, w, t, b), reference(h, w, t, b, class_weight=cw,
                                                          label_smoothing=0.1, z_loss=0.01,
                                                          softcap=3.0, reduction="sum"))
    mean = LinearCrossEntropyLoss()(h, w, t, num_items=10)
    torch.testing.assert_close(mean, reference(h, w, t, num_items=10))
    assert leanloss.linear_cross_entropy is linear_cross_entropy


@pytest.mark.parametrize("bad, match", [
    (dict(weight=torch.randn(41, 11, dtype=torch.float64)), "'weight'"),
    (dict(target=torch.zeros(28, dtype=torch.long)), "'target'"),
    (dict(bias=torch.zeros(40, dtype=torch.float64)), "'bias'"),
    (dict(class_weight=torch.ones(40, dtype=torch.float64)), "'class_weight'"),
    (dict(label_smoothing=1.5), "'label_smoothing'"),
    (dict(z_loss=-1.0), "'z_loss'"),
    (dict(softcap=0.0), "'softcap'"),
    (dict(logit_scale=0.0), "'logit_scale'"),
    (dict(bias=torch.zeros(41, dtype=torch.float32)), "'bias'"),
    (dict(weight=torch.randn(41, 12, dtype=torch.float32)), "'weight'"),
    (dict(target=torch.zeros(29, dtype=torch.int32)), "'target'"),
])
def test_argument_errors_name_the_argument(bad, match):
    h, w, _, t = make()
    kw = dict(hidden=h, weight=w, target=t)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_cross_entropy(**kw)


def test_target_out_of_range():
    h, w, _, t = make()
    t = t.clone()
    t[3] = 41
    with pytest.raises(TargetOutOfRangeError, match="'target'"):
        linear_cross_entropy(h, w, t)
    assert issubclass(LeanlossValueError, ValueError)


@pytest.mark.parametrize("device", DEVICES)
def test_devices(device):
    assert_matches(dict(COMBINED), device=device, bias=True)
    assert_matches({"reduction": "none"}, device=device, dtype=torch.float32, atol=2e-5, rtol=2e-4)
