"""leanloss.entropy against torch.distributions.Categorical(...).entropy(): value, dtype and
gradient, from logits and from probs, every dtype and shape, with zero probabilities."""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical

import leanloss
from _oracle import CLASS_SHAPES, DTYPES, SHAPE_IDS, all_finite, compare, logits, positive, raises_like


def _categorical(kind, dim=-1):
    def entropy(x):
        return Categorical(**{kind: x.movedim(dim, -1)}, validate_args=False).entropy()
    return entropy


def _ours(kind, dim=-1):
    return lambda x: leanloss.entropy(**{kind: x}, dim=dim)


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ("logits", "probs"))
@pytest.mark.parametrize("dim", (-1, 0, 1), ids=lambda d: f"dim{d}")
def test_entropy(dim, kind, dtype, shape):
    if dim >= len(shape):
        dim = -1
    x = logits(shape, dtype) if kind == "logits" else positive(shape, dtype, grad=True)  # unnormalized
    compare(_ours(kind, dim), _categorical(kind, dim), (x,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_probabilities(dtype):
    """0 log 0 = 0: finite, equal to Categorical, finite gradients (Categorical's eps clamp)."""
    p = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 2.0]],
                     dtype=dtype, requires_grad=True)
    out = leanloss.entropy(probs=p)
    assert all_finite(out) and out.dtype == dtype
    (grad,) = torch.autograd.grad(out.sum(), p)
    assert all_finite(grad)
    if dtype in (torch.float64, torch.float32):
        compare(_ours("probs"), _categorical("probs"), (p,))
    else:
        # torch's Categorical clamps at the bfloat16/float16 eps (entropy of a one-hot row ~ eps);
        # leanloss accumulates in float32: compare the value with torch in float64
        ref = Categorical(probs=p.detach().double()).entropy()
        torch.testing.assert_close(out.double(), ref, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_logits(dtype):
    ninf = float("-inf")
    x = torch.tensor([[ninf, 0.0, 1.0], [2.0, ninf, ninf], [0.5, -0.5, 0.0]], dtype=dtype, requires_grad=True)
    out = compare(_ours("logits"), _categorical("logits"), (x,))
    assert all_finite(out)


@pytest.mark.parametrize("kind", ("logits", "probs"))
def test_gradcheck_gradgradcheck(kind):
    x = logits((2, 3)) if kind == "logits" else positive((2, 3), grad=True)
    for fn in (_categorical(kind), _ours(kind)):
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_arguments():
    x = logits((2, 3)).detach()
    for args in ({}, {"logits": x, "probs": x.softmax(-1)}):
        with pytest.raises(ValueError, match="exactly one"):
            leanloss.entropy(**args)
    with pytest.raises(ValueError, match="non-negative"):
        leanloss.entropy(probs=torch.tensor([0.5, -0.1, 0.6]))
    # torch raises for the same negative probs (with argument validation on)
    raises_like(lambda p: leanloss.entropy(probs=p), lambda p: Categorical(probs=p, validate_args=True),
                torch.tensor([0.5, -0.1, 0.6]))
