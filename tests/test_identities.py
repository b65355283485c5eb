"""leanloss.cli.identities: both sides of every identity hold, and each side equals torch's."""
import pytest
import torch
import torch.nn.functional as F

from leanloss.cli import identities as I

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
    # the seed's lesson: in float32 the sigmoid saturates at |x| = 50 and the identity breaks
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
