"""leanloss.cosine_embedding_loss against torch: value, dtype, gradients of both inputs, every
margin x reduction (incl. legacy) x dtype x shape ((D) with a 0-dim target, (N, D)); edge cases,
double backward, error parity. torch accepts no other shapes (see test_error_parity)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import leanloss
from _oracle import DTYPES, compare, logits, raises_like

pytestmark = pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")

REDUCTION_ARGS = ({"reduction": "none"}, {"reduction": "mean"}, {"reduction": "sum"},
                  {"size_average": False}, {"reduce": False}, {"size_average": True, "reduce": True})
RIDS = ("none", "mean", "sum", "legacy_sum", "legacy_none", "legacy_mean")
SHAPES = ((5,), (4, 5), (1, 3))


def _target(shape, dtype=torch.float64):
    if len(shape) == 1:
        return torch.tensor(-1, dtype=dtype)
    return torch.tensor([1, -1, -1, 1][: shape[0]], dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("margin", (0.0, 0.3, -0.5))
@pytest.mark.parametrize("red", REDUCTION_ARGS, ids=RIDS)
def test_cosine_embedding_loss(red, margin, dtype, shape):
    a, b = logits(shape, dtype, seed=0), logits(shape, dtype, seed=1)
    compare(leanloss.cosine_embedding_loss, F.cosine_embedding_loss, (a, b, _target(shape, dtype)),
            dict(red, margin=margin))


@pytest.mark.parametrize("target_dtype", (torch.int64, torch.float32, torch.int8), ids=str)
def test_target_dtypes(target_dtype):
    a, b = logits((4, 5)), logits((4, 5), seed=1)
    compare(leanloss.cosine_embedding_loss, F.cosine_embedding_loss, (a, b, _target((4, 5), target_dtype)),
            {"margin": 0.1, "reduction": "none"})


@pytest.mark.parametrize("reduction", ("none", "mean", "sum"))
@pytest.mark.parametrize("case", ("empty", "zero_vectors", "identical", "noncontiguous", "expanded", "mixed_dtype"))
def test_edge_cases(case, reduction):
    a, b, t = logits((4, 5)), logits((4, 5), seed=1), _target((4, 5))
    if case == "empty":
        a, b, t = logits((0, 5)), logits((0, 5), seed=1), t[:0]
    elif case == "zero_vectors":  # torch's eps keeps cos finite
        a = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
    elif case == "identical":
        b = a.detach().clone().requires_grad_()
    elif case == "noncontiguous":
        a = logits((5, 4)).detach().t().requires_grad_()
        b = logits((4, 10), seed=1).detach()[:, ::2].requires_grad_()
        t = torch.stack([t, t], 1)[:, 0]
    elif case == "expanded":
        a = logits((1, 5)).detach().expand(4, 5).requires_grad_()
    else:
        b = logits((4, 5), torch.float32, seed=1)
    out = compare(leanloss.cosine_embedding_loss, F.cosine_embedding_loss, (a, b, t),
                  {"reduction": reduction, "margin": 0.2}, dtype=b.dtype)
    assert bool(torch.isfinite(out).all()) or (case == "empty" and reduction == "mean")


@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_gradcheck_gradgradcheck(reduction):
    a, b, t = logits((3, 4)), logits((3, 4), seed=1), torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    for fn in (F.cosine_embedding_loss, leanloss.cosine_embedding_loss):  # torch: double backward ok
        f = lambda x, y: fn(x, y, t, margin=-0.3, reduction=reduction)  # noqa: E731
        assert torch.autograd.gradcheck(f, (a, b))
        assert torch.autograd.gradgradcheck(f, (a, b))


def _errors():
    a, b = logits((2, 3)).detach(), logits((2, 3), seed=1).detach()
    yield "batch_mismatch", (a, b, torch.ones(3)), {}
    yield "feature_mismatch", (a, logits((2, 4)).detach(), torch.ones(2)), {}
    yield "target_2d", (a, b, torch.ones(2, 1)), {}
    yield "input_3d", (a[None], b[None], torch.ones(1)), {}
    yield "input_NCd1_shape", (logits((2, 3, 2)).detach(), logits((2, 3, 2)).detach(), torch.ones(2)), {}
    yield "bad_reduction", (a, b, torch.ones(2)), {"reduction": "avg"}


@pytest.mark.parametrize("name", [n for n, _, _ in _errors()])
def test_error_parity(name):
    args, kwargs = next((a, k) for n, a, k in _errors() if n == name)
    raises_like(leanloss.cosine_embedding_loss, F.cosine_embedding_loss, *args, **kwargs)


def test_target_outside_plus_minus_one_is_rejected():
    """torch silently gives 0 for a target of 0; leanloss raises (deliberately stricter)."""
    a, b = logits((2, 3)).detach(), logits((2, 3), seed=1).detach()
    t = torch.tensor([1.0, 0.0])
    assert F.cosine_embedding_loss(a, b, t, reduction="none")[1] == 0
    with pytest.raises(ValueError, match="target"):
        leanloss.cosine_embedding_loss(a, b, t)
