"""leanloss.kl_div against torch.nn.functional.kl_div: value, dtype and gradients of input and
target, for every reduction (incl. batchmean and legacy) x log_target x dtype x shape."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import leanloss
from _oracle import CLASS_SHAPES, DTYPES, SHAPE_IDS, compare, log_probs, probs, raises_like

pytestmark = [
    pytest.mark.filterwarnings("ignore::leanloss.InputWarning"),
    pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated"),
    pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss"),
]

REDUCTION_ARGS = (
    {"reduction": "none"}, {"reduction": "mean"}, {"reduction": "sum"}, {"reduction": "batchmean"},
    {"size_average": False}, {"reduce": False}, {"size_average": True, "reduce": True},
)
RIDS = ("none", "mean", "sum", "batchmean", "legacy_sum", "legacy_none", "legacy_mean")


def _target(shape, dtype, log_target):
    if log_target:
        return log_probs(shape, dtype, seed=5)
    return probs(shape, dtype, seed=5)


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log_target", (False, True))
@pytest.mark.parametrize("red", REDUCTION_ARGS, ids=RIDS)
def test_kl_div(red, log_target, dtype, shape):
    x = log_probs(shape, dtype)
    compare(leanloss.kl_div, F.kl_div, (x, _target(shape, dtype, log_target)), dict(red, log_target=log_target))


@pytest.mark.parametrize("red", REDUCTION_ARGS[:4], ids=RIDS[:4])
def test_zero_probabilities_in_target(red):
    """0 log 0 = 0: zero target entries contribute nothing (and no nan gradient)."""
    x = log_probs((3, 4))
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]],
                     dtype=torch.float64, requires_grad=True)
    compare(leanloss.kl_div, F.kl_div, (x, p), red)
    lp = torch.log(p.detach()).requires_grad_()  # -inf log-targets
    compare(leanloss.kl_div, F.kl_div, (x, lp), dict(red, log_target=True))


@pytest.mark.parametrize("red", REDUCTION_ARGS[:4], ids=RIDS[:4])
@pytest.mark.parametrize("case", ("scalar", "empty", "broadcast_target", "broadcast_input", "noncontiguous"))
def test_shapes(red, case):
    if case == "scalar":
        x, t = log_probs((1,)).detach()[0].requires_grad_(), torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    elif case == "empty":
        x, t = log_probs((0, 4)), probs((0, 4))
    elif case == "broadcast_target":
        x, t = log_probs((3, 4)), probs((1, 4))
    elif case == "broadcast_input":
        x, t = log_probs((4,)), probs((3, 4))
    else:
        x = log_probs((4, 3)).detach().t().requires_grad_()
        t = probs((1, 4)).detach().expand(3, 4).requires_grad_()
    compare(leanloss.kl_div, F.kl_div, (x, t), red)


@pytest.mark.parametrize("log_target", (False, True))
@pytest.mark.parametrize("reduction", ("none", "batchmean"))
def test_gradcheck_gradgradcheck(reduction, log_target):
    x, t = log_probs((2, 3)), _target((2, 3), torch.float64, log_target)
    for fn in (F.kl_div, leanloss.kl_div):  # torch supports double backward for kl_div
        f = lambda a, b: fn(a, b, reduction=reduction, log_target=log_target)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, t))
        assert torch.autograd.gradgradcheck(f, (x, t))


def _errors():
    x = log_probs((3, 4)).detach()
    yield "bad_reduction", (x, probs((3, 4))), {"reduction": "avg"}
    yield "shape_mismatch", (x, probs((3, 5))), {}
    yield "integer_input", (torch.zeros(3, 4, dtype=torch.long), probs((3, 4))), {}


@pytest.mark.parametrize("name", [n for n, _, _ in _errors()])
@pytest.mark.filterwarnings("ignore")
def test_error_parity(name):
    args, kwargs = next((a, k) for n, a, k in _errors() if n == name)
    raises_like(leanloss.kl_div, F.kl_div, *args, **kwargs)
