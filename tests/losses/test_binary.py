"""leanloss.binary_cross_entropy(_with_logits) against torch: value, dtype, gradients of input
and target, every argument (weight, pos_weight incl. broadcasting, reductions, legacy) x dtype x
shape; the clamp at x in {0, 1}, saturated logits (+-50, +-100), double backward, error parity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import leanloss
from _oracle import CLASS_SHAPES, DTYPES, SHAPE_IDS, all_finite, compare, logits, positive, raises_like, unit

pytestmark = [
    pytest.mark.filterwarnings("ignore::leanloss.InputWarning"),
    pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated"),
]

REDUCTION_ARGS = ({"reduction": "none"}, {"reduction": "mean"}, {"reduction": "sum"},
                  {"size_average": False}, {"reduce": False}, {"size_average": True, "reduce": True})
RIDS = ("none", "mean", "sum", "legacy_sum", "legacy_none", "legacy_mean")


def _weight(kind, shape, dtype, seed=3):
    if kind is None:
        return None
    if kind == "full":
        return positive(shape, dtype, seed)
    if kind == "last":  # broadcast along the last dimension
        return positive(shape[-1:], dtype, seed)
    if kind == "class":  # (C, 1, ..., 1): one weight per class of an (N, C, d...) input
        c_shape = shape[-1:] if len(shape) < 3 else (shape[1],) + (1,) * (len(shape) - 2)
        return positive(c_shape, dtype, seed)
    if kind == "scalar":
        return positive((), dtype, seed)
    raise AssertionError(kind)


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight", (None, "full", "last", "class"))
@pytest.mark.parametrize("red", REDUCTION_ARGS, ids=RIDS)
def test_binary_cross_entropy(red, weight, dtype, shape):
    x, t = unit(shape, dtype, seed=0), unit(shape, dtype, seed=1)
    kw = dict(red, weight=_weight(weight, shape, dtype))
    compare(leanloss.binary_cross_entropy, F.binary_cross_entropy, (x, t), kw)


@pytest.mark.parametrize("shape", CLASS_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight,pos_weight", (
    (None, None), ("full", None), (None, "last"), (None, "class"), (None, "full"), (None, "scalar"),
    ("last", "last"), ("class", "full"),
), ids=lambda v: str(v))
@pytest.mark.parametrize("red", REDUCTION_ARGS, ids=RIDS)
def test_binary_cross_entropy_with_logits(red, weight, pos_weight, dtype, shape):
    x, t = logits(shape, dtype), unit(shape, dtype, seed=1)
    kw = dict(red, weight=_weight(weight, shape, dtype), pos_weight=_weight(pos_weight, shape, dtype, seed=4))
    compare(leanloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x, t), kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("red", REDUCTION_ARGS[:3], ids=RIDS[:3])
def test_bce_inputs_exactly_zero_and_one(red, dtype):
    """torch clamps log at -100: the loss stays finite; its gradients are matched too."""
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5], dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.3, 0.7, 1.0], dtype=dtype)
    out = compare(leanloss.binary_cross_entropy, F.binary_cross_entropy, (x, t), red)
    assert all_finite(out)
    # target gradient at x in {0, 1} is +-inf in torch (log of 0, unclamped): matched, not finite
    compare(leanloss.binary_cross_entropy, F.binary_cross_entropy, (x, t.detach().requires_grad_()), red)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("red", REDUCTION_ARGS[:3], ids=RIDS[:3])
def test_bce_with_logits_saturated(red, dtype):
    x = torch.tensor([-100.0, 100.0, -100.0, 100.0, -50.0, 50.0, 0.0], dtype=dtype, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5], dtype=dtype, requires_grad=True)
    out = compare(leanloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x, t), red)
    assert all_finite(out)
    pw = torch.tensor(3.0, dtype=dtype)
    compare(leanloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x, t),
            dict(red, pos_weight=pw))


def test_saturated_logits_minus_50_50():
    """Logits [-50, 50] vs targets [1, 0], confidently wrong, give 50.0 (and torch agrees)."""
    x = torch.tensor([-50.0, 50.0], requires_grad=True)
    t = torch.tensor([1.0, 0.0])
    out = compare(leanloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x, t))
    assert out.item() == 50.0


@pytest.mark.parametrize("fn", ("bce", "bce_logits"))
@pytest.mark.parametrize("case", ("empty", "noncontiguous", "expanded", "zero_weights"))
def test_shapes_and_layouts(fn, case):
    ours, theirs = ((leanloss.binary_cross_entropy, F.binary_cross_entropy) if fn == "bce" else
                    (leanloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits))
    make_x = unit if fn == "bce" else logits
    kw = {}
    if case == "empty":
        x, t = make_x((0, 3)), unit((0, 3), seed=1)
    elif case == "noncontiguous":
        x = make_x((3, 4)).detach().t().requires_grad_()
        t = unit((4, 6), seed=1).detach()[:, ::2].requires_grad_()
        kw["weight"] = positive((3, 8))[:, ::2].t()
    elif case == "expanded":
        x = make_x((1, 3)).detach().expand(4, 3).requires_grad_()
        t = unit((4, 1), seed=1).detach().expand(4, 3).requires_grad_()
    else:
        x, t = make_x((2, 3)), unit((2, 3), seed=1)
        kw["weight"] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    for red in ("none", "mean", "sum"):
        compare(ours, theirs, (x, t), dict(kw, reduction=red))


@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_gradcheck_gradgradcheck(reduction):
    """torch supports double backward of both BCEs w.r.t. input and target."""
    x, t, w = unit((2, 3)), unit((2, 3), seed=1), positive((3,))
    lx = logits((2, 3))
    for fn in (F.binary_cross_entropy, leanloss.binary_cross_entropy):
        f = lambda a, b: fn(a, b, weight=w, reduction=reduction)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, t))
        assert torch.autograd.gradgradcheck(f, (x, t))
    for fn in (F.binary_cross_entropy_with_logits, leanloss.binary_cross_entropy_with_logits):
        f = lambda a, b: fn(a, b, weight=w, pos_weight=w.flip(0), reduction=reduction)  # noqa: E731
        assert torch.autograd.gradcheck(f, (lx, t))
        assert torch.autograd.gradgradcheck(f, (lx, t))


def _errors():
    x, t = unit((2, 3)).detach(), unit((2, 3), seed=1).detach()
    bce, bcel = "bce", "bce_logits"
    yield bce, "target_shape", (x, t.t()), {}
    yield bce, "weight_not_broadcastable", (x, t), {"weight": torch.ones(2, dtype=torch.float64)}
    yield bce, "input_above_one", (x * 3, t), {}
    yield bce, "target_float32_input_float64", (x, t.float()), {}
    yield bce, "target_bfloat16_input_float32", (x.float(), t.bfloat16()), {}
    yield bce, "integer_target", (x, t.long()), {}
    yield bce, "bad_reduction", (x, t), {"reduction": "avg"}
    yield bcel, "target_shape", (x, t.t()), {}
    yield bcel, "pos_weight_not_broadcastable", (x, t), {"pos_weight": torch.ones(2, dtype=torch.float64)}
    yield bcel, "weight_not_broadcastable", (x, t), {"weight": torch.ones(2, dtype=torch.float64)}
    yield bcel, "bad_reduction", (x, t), {"reduction": "avg"}


@pytest.mark.parametrize("fn,name", [(f, n) for f, n, _, _ in _errors()])
def test_error_parity(fn, name):
    args, kwargs = next((a, k) for f, n, a, k in _errors() if (f, n) == (fn, name))
    ours, theirs = ((leanloss.binary_cross_entropy, F.binary_cross_entropy) if fn == "bce" else
                    (leanloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits))
    raises_like(ours, theirs, *args, **kwargs)


@pytest.mark.parametrize("dtypes", ((torch.float32, torch.float64), (torch.float64, torch.float32),
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.float64)), ids=str)
@pytest.mark.parametrize("reduction", ("none", "mean", "sum"))
def test_bce_with_logits_mixed_dtypes(dtypes, reduction):
    """torch builds the loss in place on (1 - target): the result has the target's dtype."""
    x, t = logits((3, 4), dtypes[0]), unit((3, 4), dtypes[1], seed=1)
    kw = {"reduction": reduction, "weight": positive((4,), torch.float64), "pos_weight": positive((4,), dtypes[0])}
    lowest = max(dtypes, key=lambda d: torch.finfo(d).eps)
    compare(leanloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x, t), kw, dtype=lowest)


@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_bce_with_logits_weight_gradients(reduction):
    """torch gives no gradient for weight/pos_weight; leanloss does: checked numerically."""
    x, t = logits((2, 3)), unit((2, 3), seed=1)
    w, pw = positive((3,), grad=True), positive((2, 1), seed=4, grad=True)
    f = lambda a, b, c, d: leanloss.binary_cross_entropy_with_logits(a, b, c, pos_weight=d, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, t, w, pw))
    assert torch.autograd.gradgradcheck(f, (x, t, w, pw))
