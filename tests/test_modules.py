"""leanloss's modules against torch.nn's: constructor signature and attributes, forward value
and gradients, buffers and state_dict (keys equal, loadable both ways), .to(), copy, repr."""
from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
import torch.nn as nn

import leanloss
from _oracle import compare, index_target, module_oracle, log_probs, logits, positive, probs, unit

pytestmark = [
    pytest.mark.filterwarnings("ignore::leanloss.InputWarning"),
    pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated"),
    pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss"),
]

PAIRS = {
    "CrossEntropyLoss": (nn.CrossEntropyLoss, leanloss.CrossEntropyLoss),
    "NLLLoss": (nn.NLLLoss, leanloss.NLLLoss),
    "KLDivLoss": (nn.KLDivLoss, leanloss.KLDivLoss),
    "BCELoss": (nn.BCELoss, leanloss.BCELoss),
    "BCEWithLogitsLoss": (nn.BCEWithLogitsLoss, leanloss.BCEWithLogitsLoss),
    "CosineEmbeddingLoss": (nn.CosineEmbeddingLoss, leanloss.CosineEmbeddingLoss),
}
SHAPE = (4, 3, 2)


def _inputs(name, dtype=torch.float64):
    """Forward inputs for the module ``name`` (weight-able dimension C = 3 is dim 1)."""
    if name == "CrossEntropyLoss":
        return logits(SHAPE, dtype), index_target(SHAPE, ignore_index=1)
    if name == "NLLLoss":
        return log_probs(SHAPE, dtype), index_target(SHAPE, ignore_index=1)
    if name == "KLDivLoss":
        return log_probs(SHAPE, dtype), probs(SHAPE, dtype)
    if name == "BCELoss":
        return unit(SHAPE, dtype), unit(SHAPE, dtype, seed=1)
    if name == "BCEWithLogitsLoss":
        return logits(SHAPE, dtype), unit(SHAPE, dtype, seed=1)
    return logits((4, 3), dtype), logits((4, 3), dtype, seed=1), torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=dtype)


def _w(shape=(3,), dtype=torch.float64, seed=3):
    return positive(shape, dtype, seed)


#: constructor keyword sets per module: every argument torch's constructor takes
CONFIGS = {
    "CrossEntropyLoss": ({}, {"weight": _w()}, {"ignore_index": 1, "reduction": "sum"},
                         {"label_smoothing": 0.2, "weight": _w(), "ignore_index": 1, "reduction": "none"},
                         {"size_average": False}, {"reduce": False}),
    "NLLLoss": ({}, {"weight": _w(), "ignore_index": 1}, {"reduction": "none"}, {"size_average": False}),
    "KLDivLoss": ({}, {"reduction": "batchmean"}, {"reduction": "none", "log_target": True}, {"reduce": False}),
    "BCELoss": ({}, {"weight": _w((3, 1))}, {"reduction": "sum"}, {"size_average": True, "reduce": False}),
    "BCEWithLogitsLoss": ({}, {"weight": _w((2,))}, {"pos_weight": _w((3, 1), seed=4), "reduction": "none"},
                          {"weight": _w((1, 2)), "pos_weight": _w((2,), seed=4), "reduction": "sum"},
                          {"size_average": False}),
    "CosineEmbeddingLoss": ({}, {"margin": 0.3}, {"margin": -0.2, "reduction": "none"}, {"reduce": False}),
}
CASES = [(name, i) for name, configs in CONFIGS.items() for i in range(len(configs))]


@pytest.mark.parametrize("name", PAIRS)
def test_constructor_signature_and_attributes(name):
    theirs, ours = PAIRS[name]
    sig = lambda cls: [(p.name, p.default, p.kind) for p in inspect.signature(cls.__init__).parameters.values()]  # noqa: E731
    assert sig(ours) == sig(theirs)
    for kwargs in CONFIGS[name]:
        t, o = theirs(**kwargs), ours(**kwargs)
        public = lambda m: {k: v for k, v in vars(m).items() if not k.startswith("_")}  # noqa: E731
        assert public(o) == public(t)
        assert [n for n, _ in o.named_buffers()] == [n for n, _ in t.named_buffers()]
        for (_, a), (_, b) in zip(o.named_buffers(), t.named_buffers()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_forward_matches_torch(name, config, dtype):
    theirs, ours = PAIRS[name]
    kwargs = CONFIGS[name][config]
    t, o = theirs(**kwargs).to(dtype), ours(**kwargs).to(dtype)
    compare(o, t, _inputs(name, dtype))


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_state_dict_round_trip(name, config):
    theirs, ours = PAIRS[name]
    kwargs = CONFIGS[name][config]
    t, o = theirs(**kwargs), ours(**kwargs)
    assert list(o.state_dict()) == list(t.state_dict())
    # load torch's state into leanloss's module and back, strictly; values travel
    scaled = {k: v * 2 for k, v in t.state_dict().items()}
    assert o.load_state_dict(scaled, strict=True) == t.load_state_dict(scaled, strict=True)
    fresh = theirs(**kwargs)
    fresh.load_state_dict(o.state_dict(), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, scaled[k])
    compare(o, t, _inputs(name))


@pytest.mark.parametrize("name", ("CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss"))
def test_buffers_move_with_to(name):
    theirs, ours = PAIRS[name]
    kwargs = {"weight": _w((3, 1) if "BCE" in name else (3,), torch.float32)}
    if name == "BCEWithLogitsLoss":
        kwargs["pos_weight"] = _w((3, 1), torch.float32, seed=4)
    o = ours(**kwargs)
    assert all(b.dtype == torch.float32 for b in o.buffers())
    o.double()
    assert all(b.dtype == torch.float64 for b in o.buffers()) and len(list(o.buffers())) == len(kwargs)
    o.to(torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 for b in o.buffers())
    o.to("cpu")
    assert all(b.device.type == "cpu" for b in o.buffers())
    compare(o, module_oracle(lambda: theirs(**kwargs)),
            tuple(a.detach().to(torch.bfloat16).requires_grad_(a.requires_grad) if a.is_floating_point() else a
                  for a in _inputs(name)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_buffers_move_to_cuda():
    o = leanloss.CrossEntropyLoss(weight=_w()).cuda()
    assert o.weight.is_cuda
    x, t = _inputs("CrossEntropyLoss")
    out = o(x.detach().cuda(), t.cuda())
    ref = nn.CrossEntropyLoss(weight=_w())(x.detach(), t)
    torch.testing.assert_close(out.cpu(), ref)


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_copy_pickle_and_repr(name, config):
    theirs, ours = PAIRS[name]
    kwargs = CONFIGS[name][config]
    o = ours(**kwargs)
    for clone in (copy.deepcopy(o), pickle.loads(pickle.dumps(o))):
        assert type(clone) is type(o) and vars(clone).keys() == vars(o).keys()
        compare(clone, o, _inputs(name))
    text = repr(o)
    assert text.startswith(f"{name}(") and text.endswith(")")
    assert f"reduction={o.reduction!r}" in text
    for attr in ("ignore_index", "label_smoothing", "log_target", "margin"):
        if hasattr(o, attr):
            assert f"{attr}={getattr(o, attr)!r}" in text


def test_bad_reduction_raises_like_torch_at_forward():
    x, t = _inputs("CrossEntropyLoss")
    for cls in (nn.CrossEntropyLoss, leanloss.CrossEntropyLoss):
        module = cls(reduction="avg")  # torch accepts it at construction and raises at forward
        with pytest.raises(ValueError, match="reduction"):
            module(x, t)
