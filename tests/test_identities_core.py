"""The seeds' identities between the dense losses, checked on leanloss itself in float64
(value and gradient), with each side also equal to its torch twin:

* cross entropy = entropy + KL:      CE(x, p) = H(p) + KL(p || softmax(x))
* log_softmax + NLL = cross entropy: NLL(log_softmax(x), y) = CE(x, y) (weight, ignore_index)
* BCE = two-class NLL / CE:          BCE(q, y) = NLL(log [1 - q, q], y); soft targets via CE
* BCE-with-logits = sigmoid + BCE:   where sigmoid(x) does not saturate
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import leanloss
from _oracle import CLASS_SHAPES, SHAPE_IDS, assert_close, compare, index_target, logits, positive, unit

pytestmark = pytest.mark.filterwarnings("ignore::leanloss.InputWarning")
F64 = torch.float64


def _class_dim(shape):
    return 0 if len(shape) == 1 else 1


def _same(lhs, rhs, inputs, rtol_scale=1.0):
    """Two callables of ``inputs``: equal values and equal gradients (random upstream)."""
    a, b = lhs(*inputs), rhs(*inputs)
    assert_close(a, b, F64, "value", scale=rtol_scale)
    g = torch.rand(a.shape, dtype=F64, generator=torch.Generator().manual_seed(1)) + 0.5
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    ga = torch.autograd.grad(a, leaves, g)
    gb = torch.autograd.grad(b, leaves, g)
    for i, (x, y) in enumerate(zip(ga, gb)):
        assert_close(x, y, F64, f"gradient of input {i}", scale=rtol_scale)


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("reduction", ("none", "sum"))
def test_cross_entropy_is_entropy_plus_kl(shape, reduction):
    dim = _class_dim(shape)
    # p = softmax(z): entropy(probs=...) renormalizes p, so gradients agree on the simplex only
    x, z = logits(shape), logits(shape, seed=9)

    def ce(x, z):
        return leanloss.cross_entropy(x, torch.softmax(z, dim), reduction=reduction)

    def h_plus_kl(x, z):
        p = torch.softmax(z, dim)
        kl = leanloss.kl_div(torch.log_softmax(x, dim), p, reduction="none").sum(dim)
        total = leanloss.entropy(probs=p, dim=dim) + kl
        return total if reduction == "none" else total.sum()

    _same(ce, h_plus_kl, (x, z), rtol_scale=10)

    def h_plus_kl_from_logits(x, z):  # the same with entropy(logits=z)
        kl = leanloss.kl_div(torch.log_softmax(x, dim), torch.log_softmax(z, dim), reduction="none",
                             log_target=True).sum(dim)
        total = leanloss.entropy(logits=z, dim=dim) + kl
        return total if reduction == "none" else total.sum()

    _same(ce, h_plus_kl_from_logits, (x, z), rtol_scale=10)
    compare(ce, lambda x, z: F.cross_entropy(x, torch.softmax(z, dim), reduction=reduction), (x, z))


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kwargs", ({}, {"weight": "w"}, {"ignore_index": 1}, {"weight": "w", "ignore_index": -100}),
                         ids=("plain", "weight", "ignore", "weight_ignore"))
@pytest.mark.parametrize("reduction", ("none", "mean", "sum"))
def test_log_softmax_plus_nll_is_cross_entropy(shape, kwargs, reduction):
    dim = _class_dim(shape)
    c = shape[dim]
    kw = {k: (positive((c,)) if v == "w" else v) for k, v in kwargs.items()}
    kw["reduction"] = reduction
    x = logits(shape)
    y = index_target(shape, ignore_index=kw.get("ignore_index", -100 if "ignore_index" in kwargs else None))
    _same(lambda x: leanloss.nll_loss(torch.log_softmax(x, dim), y, **kw),
          lambda x: leanloss.cross_entropy(x, y, **kw), (x,))
    compare(lambda x: leanloss.nll_loss(torch.log_softmax(x, dim), y, **kw),
            lambda x: F.nll_loss(torch.log_softmax(x, dim), y, **kw), (x,))


@pytest.mark.parametrize("shape", ((5,), (4, 3), (2, 3, 2)), ids=str)
@pytest.mark.parametrize("reduction", ("none", "mean", "sum"))
def test_bce_is_two_class_nll(shape, reduction):
    q = unit(shape)
    y = (torch.rand(shape, generator=torch.Generator().manual_seed(4)) > 0.5)

    def two_classes(a):  # (N, ...) -> (N, 2, ...): class 0 is "negative", class 1 "positive"
        return torch.stack([1 - a, a], dim=1)

    def nll(q):
        return leanloss.nll_loss(torch.log(two_classes(q)), y.long(), reduction=reduction)

    _same(lambda q: leanloss.binary_cross_entropy(q, y.to(F64), reduction=reduction), nll, (q,))
    # soft targets: BCE(q, t) = CE over the two classes with probabilities [1 - t, t]
    t = unit(shape, seed=5, grad=True)

    def soft_ce(q, t):
        return leanloss.cross_entropy(torch.log(two_classes(q)), two_classes(t), reduction=reduction)

    _same(lambda q, t: leanloss.binary_cross_entropy(q, t, reduction=reduction), soft_ce, (q, t))
    compare(leanloss.binary_cross_entropy, F.binary_cross_entropy, (q, t), {"reduction": reduction})


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("weights", ("none", "weight", "pos_weight"))
def test_bce_with_logits_is_sigmoid_plus_bce_where_finite(shape, weights):
    """Equal while sigmoid(x) does not saturate (|x| <= 8 here): the log clamp never acts."""
    x, t = logits(shape), unit(shape, seed=1, grad=True)
    kw = {"reduction": "none"}
    if weights == "weight":
        kw["weight"] = positive(shape[-1:])
    lhs = lambda x, t: leanloss.binary_cross_entropy_with_logits(x, t, **kw)  # noqa: E731
    if weights == "pos_weight":
        pw = positive(shape[-1:])
        lhs = lambda x, t: leanloss.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none")  # noqa: E731

        def rhs(x, t):  # -[pw t log s + (1 - t) log(1 - s)]
            s = torch.sigmoid(x)
            return -(pw * t * torch.log(s) + (1 - t) * torch.log1p(-s))
    else:
        def rhs(x, t):
            return leanloss.binary_cross_entropy(torch.sigmoid(x), t, **kw)
    assert float(x.detach().abs().max()) <= 8
    _same(lhs, rhs, (x, t), rtol_scale=1e3)  # the sigmoid round trip costs ~1e-13 relative


def test_bce_with_logits_stays_exact_where_sigmoid_saturates():
    """At |x| = 100 in float32, sigmoid + BCE hits the -100 log clamp; the logits form does not."""
    x = torch.tensor([-100.0, 100.0, -50.0, 50.0], requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0, 0.0])
    exact = compare(leanloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x, t),
                    {"reduction": "none"})
    assert torch.equal(exact, x.detach().abs())
    s = torch.sigmoid(x.detach())
    clamped = leanloss.binary_cross_entropy(s, t, reduction="none")
    assert torch.equal(clamped, F.binary_cross_entropy(s, t, reduction="none"))
    # sigmoid(50) rounds to 1 in float32: log(1 - 1) is clamped to -100, so 100 instead of 50
    assert float(s[3]) == 1.0 and float(clamped[3]) == 100.0 and float(exact.detach()[3]) == 50.0
