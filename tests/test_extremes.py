"""Extreme values: logits at +-1e4, float16/bfloat16 inputs, a 128k vocabulary.

Wherever the math is finite, leanloss's value and gradient are finite and equal to a float64
reference built from torch ops on the exactly upcast inputs (torch's loss functions are not
used as the reference here: in float16 some of them overflow where the math does not).
Tolerances: the rounding of the result to the input dtype (float32 1e-5 relative, float16
1e-3, bfloat16 1e-2), or 1e-9 for float64.
"""
from __future__ import annotations

import pytest
import torch

import leanloss

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
IDS = [str(d).split(".")[-1] for d in DTYPES]
BIG = 1e4


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def extreme_logits(n, c, dtype, seed=0):
    """Random logits with entries at +-1e4 in every row (exact in every dtype up to rounding)."""
    g = _gen(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    cols = torch.randint(0, c, (n, 2), generator=g)
    x[torch.arange(n), cols[:, 0]] = BIG
    x[torch.arange(n), cols[:, 1]] = -BIG
    return x.to(dtype).requires_grad_()


def close(actual, expected, dtype):
    assert torch.isfinite(actual).all(), actual
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL[dtype], atol=RTOL[dtype])


def grad_of(fn, *leaves):
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves)
    return value.detach(), grads


# ------------------------------------------------------------------------------------------
# float64 references from torch ops
# ------------------------------------------------------------------------------------------


def ref_ce(x, t, label_smoothing=0.0):
    logp = torch.log_softmax(x.double(), dim=-1)
    nll = -logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    smooth = -logp.mean(-1)
    return ((1 - label_smoothing) * nll + label_smoothing * smooth).mean()


def ref_bce_logits(x, t):
    x, t = x.double(), t.double()
    return (x.clamp(min=0) - x * t + torch.log1p(torch.exp(-x.abs()))).mean()


def ref_bce(p, t):
    p, t = p.double(), t.double()
    return -(t * torch.log(p).clamp(min=-100) + (1 - t) * torch.log1p(-p).clamp(min=-100)).mean()


# ------------------------------------------------------------------------------------------
# logits at +-1e4 in every dtype
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_extreme_logits(dtype, label_smoothing):
    x = extreme_logits(6, 11, dtype)
    t = torch.randint(0, 11, (6,), generator=_gen(1))
    t[0] = int(x[0].argmin())  # a target at -1e4: loss ~ 2e4, still finite (fp16 max 65504)
    t[1] = int(x[1].argmax())
    value, (g,) = grad_of(lambda a: leanloss.cross_entropy(a, t, label_smoothing=label_smoothing), x)
    ref_value, (ref_g,) = grad_of(lambda a: ref_ce(a, t, label_smoothing), x.detach().double().requires_grad_())
    assert value.dtype == dtype and g.dtype == dtype
    close(value, ref_value, dtype)
    close(g, ref_g, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_cross_entropy_probability_targets_extreme_logits(dtype):
    x = extreme_logits(5, 7, dtype)
    p = torch.softmax(torch.randn(5, 7, generator=_gen(2), dtype=torch.float64), -1).to(dtype)
    value = leanloss.cross_entropy(x, p)
    ref = -(p.double() * torch.log_softmax(x.detach().double(), -1)).sum(-1).mean()
    close(value, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_nll_loss_extreme_log_probs(dtype):
    logp = torch.log_softmax(extreme_logits(6, 9, torch.float64).detach(), -1).to(dtype).requires_grad_()
    t = torch.arange(6) % 9
    value, (g,) = grad_of(lambda a: leanloss.nll_loss(a, t, reduction="sum"), logp)
    ref = -logp.detach().double().gather(1, t[:, None]).sum()
    close(value, ref, dtype)
    expected_grad = torch.zeros(6, 9, dtype=torch.float64)
    expected_grad[torch.arange(6), t] = -1
    close(g, expected_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_kl_div_extreme_log_probs_and_zero_probabilities(dtype):
    logq = torch.log_softmax(extreme_logits(4, 8, torch.float64, seed=3).detach(), -1)
    p = torch.softmax(extreme_logits(4, 8, torch.float64, seed=4).detach(), -1)  # many exact zeros
    assert (p == 0).any()
    x, t = logq.to(dtype).requires_grad_(), p.to(dtype)
    value, (g,) = grad_of(lambda a: leanloss.kl_div(a, t, reduction="batchmean"), x)
    xd, td = x.detach().double(), t.double()
    ref = (torch.xlogy(td, td) - td * xd).sum() / 4
    close(value, ref, dtype)
    close(g, -td / 4, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_bce_with_logits_extreme(dtype):
    x = extreme_logits(4, 6, dtype, seed=5)
    t = torch.rand(4, 6, generator=_gen(6), dtype=torch.float64).round().to(dtype)
    value, (g,) = grad_of(lambda a: leanloss.binary_cross_entropy_with_logits(a, t), x)
    xd = x.detach().double().requires_grad_()
    ref_value, (ref_g,) = grad_of(lambda a: ref_bce_logits(a, t), xd)
    close(value, ref_value, dtype)
    close(g, ref_g, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_bce_on_saturated_probabilities(dtype):
    """Probabilities exactly 0 and 1 (sigmoid of +-1e4): torch's -100 clamp keeps it finite."""
    p = torch.sigmoid(extreme_logits(4, 6, torch.float64, seed=7).detach()).to(dtype)
    assert ((p == 0) | (p == 1)).any()
    t = torch.rand(4, 6, generator=_gen(8), dtype=torch.float64).to(dtype)
    close(leanloss.binary_cross_entropy(p, t), ref_bce(p, t), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_cosine_embedding_large_embeddings(dtype):
    """|a|^2 ~ 1e9 overflows float16 if computed there; leanloss accumulates in float32."""
    a = (torch.randn(5, 8, generator=_gen(9), dtype=torch.float64) * BIG).to(dtype)
    b = (torch.randn(5, 8, generator=_gen(10), dtype=torch.float64) * BIG).to(dtype)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    ad, bd = a.double(), b.double()
    cos = (ad * bd).sum(1) / (((ad * ad).sum(1) + 1e-12) * ((bd * bd).sum(1) + 1e-12)).sqrt()
    ref = torch.where(y == 1, 1 - cos, cos.clamp(min=0)).mean()
    close(leanloss.cosine_embedding_loss(a, b, y), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_entropy_extreme_logits(dtype):
    x = extreme_logits(5, 9, dtype, seed=11).detach()
    logp = torch.log_softmax(x.double(), -1)
    ref = -(logp.exp() * logp).nan_to_num(0.0).sum(-1)
    close(leanloss.entropy(logits=x), ref, dtype)


# ------------------------------------------------------------------------------------------
# a 128k vocabulary
# ------------------------------------------------------------------------------------------
V = 131072


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cross_entropy_vocabulary_128k(dtype):
    x = extreme_logits(3, V, dtype, seed=12)
    t = torch.tensor([0, V - 1, 12345])
    value, (g,) = grad_of(lambda a: leanloss.cross_entropy(a, t, label_smoothing=0.05), x)
    ref_value, (ref_g,) = grad_of(lambda a: ref_ce(a, t, 0.05), x.detach().double().requires_grad_())
    close(value, ref_value, dtype)
    # the gradient at the 1e4 logit is 1/N minus a sum over all V upstream gradients: in float32
    # that sum carries ~1e-4 rounding (torch's own float32 gradient has exactly the same), so the
    # float64 comparison allows V * eps; torch in the same dtype is held tighter
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double(), ref_g, rtol=RTOL[dtype], atol=max(RTOL[dtype], V * 2**-24))
    _, (torch_g,) = grad_of(lambda a: torch.nn.functional.cross_entropy(a, t, label_smoothing=0.05), x)
    torch.testing.assert_close(g, torch_g, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)


def test_linear_cross_entropy_vocabulary_128k():
    g = _gen(13)
    h = torch.randn(5, 16, generator=g, dtype=torch.float64)
    w = torch.randn(V, 16, generator=g, dtype=torch.float64) * 4
    t = torch.tensor([0, V - 1, 7, 99999, 65536])
    for dtype in (torch.float32, torch.bfloat16):
        hd, wd = h.to(dtype), w.to(dtype)
        value = leanloss.linear_cross_entropy(hd, wd, t)
        ref = ref_ce(hd.double() @ wd.double().T, t)
        close(value, ref, dtype)


def test_distill_loss_vocabulary_128k_with_temperature():
    s = extreme_logits(2, V, torch.float32, seed=14).detach()
    te = extreme_logits(2, V, torch.float32, seed=15).detach()
    value = leanloss.distill_loss(s, te, temperature=2.0)
    log_s = torch.log_softmax(s.double() / 2, -1)
    log_t = torch.log_softmax(te.double() / 2, -1)
    ref = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * 4
    close(value, ref, torch.float32)
