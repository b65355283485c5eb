"""The identities between the entropy-family losses.

First on leanloss itself in float64 (value and gradient), each side also equal to its torch twin:

* cross entropy = entropy + KL:      CE(x, p) = H(p) + KL(p || softmax(x))
* log_softmax + NLL = cross entropy: NLL(log_softmax(x), y) = CE(x, y) (weight, ignore_index)
* BCE = two-class NLL / CE:          BCE(q, y) = NLL(log [1 - q, q], y); soft targets via CE
* BCE-with-logits = sigmoid + BCE:   where sigmoid(x) does not saturate

then as ``leanloss.cli.identities`` shows them (the functions the tour walks through): both sides
of every identity hold, and each side equals torch's.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import leanloss
from _oracle import CLASS_SHAPES, SHAPE_IDS, assert_close, compare, index_target, positive, unit
from _oracle import logits as oracle_logits
from leanloss.cli import identities as I

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
    x, z = oracle_logits(shape), oracle_logits(shape, seed=9)

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
    x = oracle_logits(shape)
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
    x, t = oracle_logits(shape), unit(shape, seed=1, grad=True)
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


# -- leanloss.cli.identities ----------------------------------------------------------------

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol)


@pytest.fixture
def logits():
    return torch.randn(5, 7, generator=_gen(0), dtype=DT) * 3


@pytest.fixture
def probs():
    return torch.randn(5, 7, generator=_gen(1), dtype=DT).softmax(-1)


@pytest.fixture
def target():
    return torch.randint(7, (5,), generator=_gen(2))


def test_ce_equals_entropy_plus_kl_against_torch(probs, logits):
    ident = I.ce_equals_entropy_plus_kl(probs, logits)
    assert ident.holds()
    _close(ident.lhs, F.cross_entropy(logits, probs, reduction="none"))
    torch_rhs = torch.distributions.Categorical(probs=probs).entropy() + F.kl_div(
        logits.log_softmax(-1), probs, reduction="none"
    ).sum(-1)
    _close(ident.rhs, torch_rhs)
    assert ident.lhs.shape == (5,)


def test_ce_equals_entropy_plus_kl_from_logits(logits):
    p_logits = torch.randn(5, 7, generator=_gen(3), dtype=DT)
    ident = I.ce_equals_entropy_plus_kl(p_logits, logits, p_is_logits=True)
    assert ident.holds()
    _close(ident.lhs, F.cross_entropy(logits, p_logits.softmax(-1), reduction="none"))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_log_softmax_nll_equals_ce(logits, target, reduction):
    ident = I.log_softmax_nll_equals_ce(logits, target, reduction)
    assert ident.holds()
    _close(ident.lhs, F.nll_loss(logits.log_softmax(1), target, reduction=reduction))
    _close(ident.rhs, F.cross_entropy(logits, target, reduction=reduction))


def test_onehot_ce_equals_index_ce(logits, target):
    ident = I.onehot_ce_equals_index_ce(logits, target)
    assert ident.holds()
    _close(ident.lhs, F.cross_entropy(logits, F.one_hot(target, 7).to(DT)))
    _close(ident.rhs, F.cross_entropy(logits, target))


@pytest.mark.parametrize("target_dtype", [torch.int64, DT])
def test_bce_equals_two_class_nll(target_dtype):
    p = torch.rand(9, generator=_gen(4), dtype=DT) * 0.98 + 0.01
    t = (torch.rand(9, generator=_gen(5)) > 0.5).to(target_dtype)
    ident = I.bce_equals_two_class_nll(p, t)
    assert ident.holds()
    _close(ident.lhs, F.binary_cross_entropy(p, t.to(DT)))
    _close(ident.rhs, F.nll_loss(torch.stack([1 - p, p], -1).log(), t.long()))


def test_bce_with_logits_equals_sigmoid_bce_and_where_it_fails():
    x = torch.randn(9, generator=_gen(6), dtype=DT) * 2
    t = (torch.rand(9, generator=_gen(7)) > 0.5).to(DT)
    ident = I.bce_with_logits_equals_sigmoid_bce(x, t)
    assert ident.holds()
    _close(ident.lhs, F.binary_cross_entropy_with_logits(x, t))
    _close(ident.rhs, F.binary_cross_entropy(torch.sigmoid(x), t))
    # the lesson: in float32 the sigmoid saturates at |x| = 50 and the identity breaks
    sat = I.bce_with_logits_equals_sigmoid_bce(torch.tensor([-50.0, 50.0]), torch.tensor([1.0, 0.0]))
    assert not sat.holds()
    _close(sat.lhs, F.binary_cross_entropy_with_logits(torch.tensor([-50.0, 50.0]), torch.tensor([1.0, 0.0])), 1e-6, 0)
    _close(sat.rhs, F.binary_cross_entropy(torch.sigmoid(torch.tensor([-50.0, 50.0])), torch.tensor([1.0, 0.0])), 1e-6, 0)
    assert sat.max_abs_diff > 1.0


def test_kl_identities(probs, logits):
    log_q = logits.log_softmax(-1)
    bm = I.kl_batchmean_equals_mean_times_classes(log_q, probs)
    assert bm.holds()
    _close(bm.lhs, F.kl_div(log_q, probs, reduction="batchmean"))
    lt = I.kl_log_target_equals_prob_target(log_q, probs)
    assert lt.holds()
    _close(lt.lhs, F.kl_div(log_q, probs.log(), reduction="batchmean", log_target=True))
    _close(lt.rhs, F.kl_div(log_q, probs, reduction="batchmean"))


def test_entropy_equals_categorical_with_zeros(probs):
    p = probs.clone()
    p[0, :3] = 0
    ident = I.entropy_equals_categorical(p)
    assert ident.holds()
    assert torch.isfinite(ident.lhs).all()


def test_identity_object_unpacks_and_compares():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])
    ident = I.Identity("a = b", a, b)
    lhs, rhs = ident
    assert lhs is a and rhs is b
    assert not ident.holds()
    assert ident.holds(atol=0.6)
    assert ident.max_abs_diff == pytest.approx(0.5)
    assert not I.Identity("shape", a, a[:1]).holds()
