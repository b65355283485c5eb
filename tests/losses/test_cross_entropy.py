"""leanloss.cross_entropy against torch.nn.functional.cross_entropy: value, dtype, gradients.

Every argument configuration x reduction x dtype x shape (C), (N,C), (N,C,d1), (N,C,d1,d2),
(N,C,d1,d2,d3); then the edge cases, double backward and error parity.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import leanloss
from _oracle import (CLASS_SHAPES, DTYPES, SHAPE_IDS, class_weight, compare, index_target, logits, probs, raises_like)

pytestmark = [
    pytest.mark.filterwarnings("ignore::leanloss.InputWarning"),
    pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated"),
]

REDUCTIONS = ("none", "mean", "sum")
LEGACY = ({"size_average": False}, {"reduce": False}, {"size_average": True, "reduce": True},
          {"size_average": False, "reduce": True})

# name -> (target kind, ignore_index or None, use weight, extra kwargs)
INDEX_CONFIGS = {
    "plain": (None, False, {}),
    "weight": (None, True, {}),
    "ignore_default": (-100, False, {}),
    "ignore_negative": (-7, False, {"ignore_index": -7}),
    "ignore_valid_class": (1, False, {"ignore_index": 1}),
    "weight_ignore": (2, True, {"ignore_index": 2}),
    "smoothing": (None, False, {"label_smoothing": 0.2}),
    "smoothing_weight_ignore": (-3, True, {"label_smoothing": 0.3, "ignore_index": -3}),
    "smoothing_weight_ignore_class": (0, True, {"label_smoothing": 0.15, "ignore_index": 0}),
    "smoothing_one": (None, False, {"label_smoothing": 1.0}),
}
PROB_CONFIGS = {
    "probs": (False, {}),
    "probs_weight": (True, {}),
    "probs_smoothing": (False, {"label_smoothing": 0.25}),
    "probs_smoothing_weight": (True, {"label_smoothing": 0.1}),
}


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("config", list(INDEX_CONFIGS))
def test_index_targets(config, reduction, dtype, shape):
    ignore, use_weight, kwargs = INDEX_CONFIGS[config]
    x = logits(shape, dtype)
    t = index_target(shape, ignore_index=ignore)
    kw = dict(kwargs, reduction=reduction)
    if use_weight:
        kw["weight"] = class_weight(shape, dtype)
    compare(leanloss.cross_entropy, F.cross_entropy, (x, t), kw)


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("config", list(PROB_CONFIGS))
def test_probability_targets(config, reduction, dtype, shape):
    use_weight, kwargs = PROB_CONFIGS[config]
    x = logits(shape, dtype)
    p = probs(shape, dtype)  # requires grad: torch differentiates w.r.t. soft targets too
    kw = dict(kwargs, reduction=reduction)
    if use_weight:
        kw["weight"] = class_weight(shape, dtype)
    compare(leanloss.cross_entropy, F.cross_entropy, (x, p), kw)


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("legacy", LEGACY, ids=str)
def test_legacy_size_average_reduce(legacy, dtype, shape):
    x = logits(shape, dtype)
    t = index_target(shape, ignore_index=-100)
    compare(leanloss.cross_entropy, F.cross_entropy, (x, t), dict(legacy, weight=class_weight(shape, dtype)))
    compare(leanloss.cross_entropy, F.cross_entropy, (x, probs(shape, dtype)), dict(legacy))


# ------------------------------------------------------------------------------------- edges


@pytest.mark.parametrize("shape", CLASS_SHAPES[1:], ids=SHAPE_IDS[1:])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_weight", (False, True))
def test_all_targets_ignored(shape, reduction, use_weight):
    x = logits(shape)
    t = torch.full_like(index_target(shape), -100)
    kw = {"reduction": reduction, "weight": class_weight(shape, torch.float64) if use_weight else None}
    out = compare(leanloss.cross_entropy, F.cross_entropy, (x, t), kw)
    if reduction == "mean":
        assert torch.isnan(out)  # torch divides 0 by 0
    ls = compare(leanloss.cross_entropy, F.cross_entropy, (x, t), dict(kw, label_smoothing=0.2))
    assert torch.isnan(ls) if reduction == "mean" else bool((ls == 0).all())


@pytest.mark.parametrize("shape", ((0, 4), (0, 4, 3), (2, 4, 0), (0, 4, 2, 2)), ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_kind", ("index", "probs"))
def test_empty_batch(shape, reduction, target_kind):
    x = logits(shape)
    t = index_target(shape) if target_kind == "index" else probs(shape)
    compare(leanloss.cross_entropy, F.cross_entropy, (x, t), {"reduction": reduction})
    compare(leanloss.cross_entropy, F.cross_entropy, (x, t),
            {"reduction": reduction, "weight": class_weight(shape, torch.float64), "label_smoothing": 0.1})


@pytest.mark.parametrize("shape", ((1,), (4, 1), (3, 1, 2)), ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_class(shape, reduction):
    x = logits(shape)
    compare(leanloss.cross_entropy, F.cross_entropy, (x, index_target(shape)),
            {"reduction": reduction, "label_smoothing": 0.3})
    compare(leanloss.cross_entropy, F.cross_entropy, (x, probs(shape)), {"reduction": reduction})


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", (0.0, 0.2))
def test_weight_with_zeros(reduction, smoothing):
    shape = (4, 5, 3)
    w = torch.tensor([0.0, 1.5, 0.0, 2.0, 0.5], dtype=torch.float64)
    kw = {"reduction": reduction, "weight": w, "label_smoothing": smoothing}
    compare(leanloss.cross_entropy, F.cross_entropy, (logits(shape), index_target(shape)), kw)
    compare(leanloss.cross_entropy, F.cross_entropy, (logits(shape), probs(shape)), kw)
    # every target of zero weight: 'mean' is 0/0 in torch
    t = torch.tensor([0, 2, 2, 0])
    compare(leanloss.cross_entropy, F.cross_entropy, (logits((4, 5)), t), kw)


def _noncontiguous_cases():
    base = torch.randn(5, 4, 3, dtype=torch.float64)
    yield "transposed", base.transpose(0, 1)  # (4, 5, 3) with C=5 in a strided layout
    yield "expanded", torch.randn(1, 5, 3, dtype=torch.float64).expand(4, 5, 3)
    yield "sliced", torch.randn(4, 10, 3, dtype=torch.float64)[:, ::2]
    yield "channels_last", torch.randn(2, 5, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", [n for n, _ in _noncontiguous_cases()])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_noncontiguous_inputs(name, reduction):
    x = dict(_noncontiguous_cases())[name].detach().requires_grad_()
    t = index_target(x.shape, ignore_index=-100)
    t_nc = torch.stack([t, t], -1)[..., 0]  # non-contiguous target
    kw = {"reduction": reduction, "weight": class_weight(x.shape, torch.float64)[::1], "label_smoothing": 0.1}
    compare(leanloss.cross_entropy, F.cross_entropy, (x, t_nc), kw)
    p = probs(x.shape).detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_()
    compare(leanloss.cross_entropy, F.cross_entropy, (x, p), kw)


def test_expanded_target_and_weight():
    x = logits((4, 5))
    t = torch.tensor(3).expand(4)
    w = torch.tensor(1.5, dtype=torch.float64).expand(5)
    compare(leanloss.cross_entropy, F.cross_entropy, (x, t), {"weight": w})


def test_uint8_index_target():
    x = logits((4, 5))
    t = index_target((4, 5)).to(torch.uint8)
    compare(leanloss.cross_entropy, F.cross_entropy, (x, t), {"reduction": "none"})


def test_does_not_modify_inputs():
    x = logits((4, 5, 3))
    t = index_target((4, 5, 3), ignore_index=-100)
    x0, t0 = x.detach().clone(), t.clone()
    leanloss.cross_entropy(x, t, label_smoothing=0.2).backward()
    assert torch.equal(x.detach(), x0) and torch.equal(t, t0)


# -------------------------------------------------------------------------- autograd checks


@pytest.mark.parametrize("kwargs", (
    {"reduction": "none"},
    {"reduction": "mean", "weight": "w", "ignore_index": 1},
    {"reduction": "sum", "label_smoothing": 0.3, "weight": "w", "ignore_index": -100},
), ids=("none", "mean_weight_ignore", "sum_smoothing"))
def test_gradcheck_gradgradcheck_index(kwargs):
    shape = (3, 4, 2)
    kw = {k: (class_weight(shape, torch.float64) if v == "w" else v) for k, v in kwargs.items()}
    x = logits(shape)
    t = index_target(shape, ignore_index=kw.get("ignore_index"))
    for fn in (F.cross_entropy, leanloss.cross_entropy):  # torch supports double backward here
        assert torch.autograd.gradcheck(lambda a: fn(a, t, **kw), (x,))
        assert torch.autograd.gradgradcheck(lambda a: fn(a, t, **kw), (x,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_gradgradcheck_probs(reduction):
    shape = (3, 4)
    x, p = logits(shape), probs(shape)
    kw = {"reduction": reduction, "weight": class_weight(shape, torch.float64), "label_smoothing": 0.2}
    for fn in (F.cross_entropy, leanloss.cross_entropy):
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, **kw), (x, p))
        assert torch.autograd.gradgradcheck(lambda a, b: fn(a, b, **kw), (x, p))


# ----------------------------------------------------------------------------- error parity


def _errors():
    x = logits((3, 4)).detach()
    yield "float_index_target_wrong_shape", (x, torch.zeros(3)), {}
    yield "int32_target", (x, torch.zeros(3, dtype=torch.int32)), {}
    yield "batch_mismatch", (x, torch.zeros(2, dtype=torch.long)), {}
    yield "spatial_mismatch", (logits((3, 4, 2)).detach(), torch.zeros(3, 3, dtype=torch.long)), {}
    yield "class_out_of_range", (x, torch.tensor([0, 4, 1])), {}
    yield "negative_class", (x, torch.tensor([0, -1, 1])), {}
    yield "weight_length", (x, torch.zeros(3, dtype=torch.long)), {"weight": torch.ones(3, dtype=torch.float64)}
    yield "bad_reduction", (x, torch.zeros(3, dtype=torch.long)), {"reduction": "avg"}
    yield "smoothing_above_one", (x, torch.zeros(3, dtype=torch.long)), {"label_smoothing": 1.5}
    yield "probs_wrong_shape", (x, torch.rand(3, 5, dtype=torch.float64)), {}
    yield "probs_with_ignore_index", (x, torch.rand(3, 4, dtype=torch.float64)), {"ignore_index": 1}
    yield "weight_dtype_differs", (x, torch.zeros(3, dtype=torch.long)), {"weight": torch.ones(4)}
    yield "weight_bf16_input_bf16_f32", (x.bfloat16(), torch.zeros(3, dtype=torch.long)), {"weight": torch.ones(4)}
    yield "int_probs_same_shape", (x, torch.zeros(3, 4, dtype=torch.long)), {}
    yield "scalar_input", (torch.tensor(1.0), torch.tensor(0)), {}


@pytest.mark.parametrize("name", [n for n, _, _ in _errors()])
def test_error_parity(name):
    args, kwargs = next((a, k) for n, a, k in _errors() if n == name)
    raises_like(leanloss.cross_entropy, F.cross_entropy, *args, **kwargs)


def test_negative_label_smoothing_is_rejected():
    """torch silently treats label_smoothing < 0 as 0; leanloss rejects it (deliberately stricter)."""
    x, t = logits((3, 4)).detach(), torch.zeros(3, dtype=torch.long)
    assert torch.equal(F.cross_entropy(x, t, label_smoothing=-0.1), F.cross_entropy(x, t))
    with pytest.raises(ValueError, match="label_smoothing"):
        leanloss.cross_entropy(x, t, label_smoothing=-0.1)


@pytest.mark.parametrize("dtypes", ((torch.float32, torch.float64, None), (torch.float64, torch.float32, None),
                                    (torch.float32, torch.float32, torch.float64),
                                    (torch.float64, torch.float64, torch.float32),
                                    (torch.bfloat16, torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.float32, None)), ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets_mixed_dtypes(dtypes, reduction):
    """torch computes log_softmax(x) * p * w: the result promotes over all three dtypes."""
    shape = (3, 4, 2)
    x, p = logits(shape, dtypes[0]), probs(shape, dtypes[1])
    w = None if dtypes[2] is None else class_weight(shape, dtypes[2])
    lowest = max((d for d in dtypes if d is not None), key=lambda d: torch.finfo(d).eps)
    compare(leanloss.cross_entropy, F.cross_entropy, (x, p), {"reduction": reduction, "weight": w,
                                                            "label_smoothing": 0.1}, dtype=lowest)
