"""leanloss.nll_loss against torch.nn.functional.nll_loss: value, dtype, gradients.

Every argument configuration x reduction x dtype x shape (C), (N,C), (N,C,d1), (N,C,d1,d2),
(N,C,d1,d2,d3); edge cases; double backward; error parity.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import leanloss
from _oracle import (CLASS_SHAPES, DTYPES, SHAPE_IDS, class_weight, compare, index_target, log_probs, raises_like)

pytestmark = [
    pytest.mark.filterwarnings("ignore::leanloss.InputWarning"),
    pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated"),
]

REDUCTIONS = ("none", "mean", "sum")
# name -> (ignore value written into the target or None, use weight, kwargs)
CONFIGS = {
    "plain": (None, False, {}),
    "weight": (None, True, {}),
    "ignore_default": (-100, False, {}),
    "ignore_negative": (-5, False, {"ignore_index": -5}),
    "ignore_valid_class": (2, False, {"ignore_index": 2}),
    "weight_ignore": (-100, True, {}),
    "weight_ignore_valid_class": (0, True, {"ignore_index": 0}),
    "legacy_sum": (-100, True, {"size_average": False}),
    "legacy_none": (-100, True, {"reduce": False}),
    "legacy_mean": (-100, True, {"size_average": True, "reduce": True}),
}


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_nll_loss(config, reduction, dtype, shape):
    ignore, use_weight, kwargs = CONFIGS[config]
    kw = dict(kwargs, reduction=reduction)
    if use_weight:
        kw["weight"] = class_weight(shape, dtype)
    compare(leanloss.nll_loss, F.nll_loss, (log_probs(shape, dtype), index_target(shape, ignore_index=ignore)), kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", ((4, 5), (2, 5, 3), (2, 5, 1, 2)), ids=str)
def test_all_ignored_and_zero_weights(reduction, shape):
    x = log_probs(shape)
    t = torch.full_like(index_target(shape), -100)
    out = compare(leanloss.nll_loss, F.nll_loss, (x, t), {"reduction": reduction})
    assert torch.isnan(out) if reduction == "mean" else bool((out == 0).all())
    w = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    compare(leanloss.nll_loss, F.nll_loss, (x, index_target(shape)), {"reduction": reduction, "weight": w})
    zero_t = torch.zeros_like(t)  # every target has weight 0: 0/0 for 'mean'
    compare(leanloss.nll_loss, F.nll_loss, (x, zero_t), {"reduction": reduction, "weight": w})


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", ((0, 3), (0, 3, 2), (2, 3, 0), (1,), (3, 1), (2, 1, 2)), ids=str)
def test_empty_and_single_class(reduction, shape):
    compare(leanloss.nll_loss, F.nll_loss, (log_probs(shape), index_target(shape)),
            {"reduction": reduction, "weight": class_weight(shape, torch.float64)})


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_noncontiguous(reduction):
    x = log_probs((5, 4, 3)).detach().transpose(0, 1).requires_grad_()  # (4, 5, 3), C=5 strided
    t = index_target((4, 5, 3), ignore_index=-100).t().contiguous().t()
    compare(leanloss.nll_loss, F.nll_loss, (x, t), {"reduction": reduction})
    e = log_probs((1, 5)).detach().expand(4, 5).requires_grad_()
    compare(leanloss.nll_loss, F.nll_loss, (e, torch.tensor(1).expand(4)), {"reduction": reduction})


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_gradgradcheck(reduction):
    shape = (3, 4, 2)
    x, t = log_probs(shape), index_target(shape, ignore_index=1)
    kw = {"reduction": reduction, "weight": class_weight(shape, torch.float64), "ignore_index": 1}
    for fn in (F.nll_loss, leanloss.nll_loss):  # torch supports double backward for nll_loss
        assert torch.autograd.gradcheck(lambda a: fn(a, t, **kw), (x,))
        assert torch.autograd.gradgradcheck(lambda a: fn(a, t, **kw), (x,))


def _errors():
    x = log_probs((3, 4)).detach()
    long = torch.zeros(3, dtype=torch.long)
    yield "float_target", (x, torch.zeros(3)), {}
    yield "batch_mismatch", (x, torch.zeros(4, dtype=torch.long)), {}
    yield "spatial_mismatch", (log_probs((2, 4, 3)).detach(), torch.zeros(2, 2, dtype=torch.long)), {}
    yield "class_out_of_range", (x, torch.tensor([0, 1, 4])), {}
    yield "weight_length", (x, long), {"weight": torch.ones(5, dtype=torch.float64)}
    yield "weight_dtype_differs", (x, long), {"weight": torch.ones(4)}
    yield "bad_reduction", (x, long), {"reduction": "batchmean"}
    yield "scalar_input", (torch.tensor(0.5), torch.tensor(0)), {}


@pytest.mark.parametrize("name", [n for n, _, _ in _errors()])
def test_error_parity(name):
    args, kwargs = next((a, k) for n, a, k in _errors() if n == name)
    raises_like(leanloss.nll_loss, F.nll_loss, *args, **kwargs)
