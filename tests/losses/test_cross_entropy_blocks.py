"""The row-block kernel of cross_entropy (losses/_ce_rows_dense.py) over MANY blocks.

The other cross-entropy tests use inputs that fit one block; here the block is shrunk to a few
rows so that every case crosses block boundaries. Oracle: torch in float64 on the same (exactly
upcast) inputs, and torch in the input's dtype.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _oracle import TOL, compare, index_target, logits, positive

import leanloss
from leanloss.losses import _ce_rows_dense


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # 3 rows of 11 classes per block in float32 (2 in float64): 23 rows make 8-12 blocks
    monkeypatch.setattr(_ce_rows_dense, "BLOCK_BYTES", 3 * 11 * 4)


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp64", "fp32", "bf16", "fp16"]
OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"ignore_index": 4},
    {"weight": True},
    {"weight": True, "ignore_index": 1, "reduction": "none"},
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.3, "weight": True, "ignore_index": 2},
    {"label_smoothing": 0.2, "reduction": "none", "weight": True},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "mean")
def test_many_blocks_match_torch(opts, dtype):
    opts = dict(opts)
    if opts.pop("weight", False):
        opts["weight"] = positive((11,), dtype)
    x = logits((23, 11), dtype, seed=5)
    t = index_target((23, 11), seed=6)
    if "ignore_index" in opts:
        t[::4] = opts["ignore_index"]
    assert _ce_rows_dense.block_path_applies(x, opts.get("weight"), opts.get("label_smoothing", 0.0)) \
        or (dtype in (torch.float32, torch.float64) and opts.get("label_smoothing", 0.0) > 0)
    compare(leanloss.cross_entropy, F.cross_entropy, (x, t), opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_with_an_underflowing_target_probability_stay_exact(dtype):
    x = logits((9, 11), dtype, seed=2, scale=1.0).detach()
    t = index_target((9, 11), seed=3)
    x[::2, 0] = 200.0  # p_t ~ e^-200 in every other row: log(p_t) would be -inf in float32
    t[::2] = 1
    x.requires_grad_()
    got = leanloss.cross_entropy(x, t, reduction="none")
    want = F.cross_entropy(x.detach().double(), t, reduction="none")
    assert torch.isfinite(got).all()
    tol = dict(zip(("rtol", "atol"), TOL[dtype]))
    torch.testing.assert_close(got.double(), want.to(got.dtype).double(), **tol)
    (g,) = torch.autograd.grad(got.sum(), x)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(F.cross_entropy(x64, t, reduction="none").sum(), x64)
    torch.testing.assert_close(g.double(), g64.to(dtype).double(), **tol)


def test_backward_twice_through_a_retained_graph_and_scaled_upstream():
    x = logits((23, 11), torch.bfloat16, seed=7)
    t = index_target((23, 11), seed=8)
    loss = leanloss.cross_entropy(x, t, label_smoothing=0.1)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(2.5), retain_graph=True)  # recomputed
    torch.testing.assert_close(g2.float(), (g1.float() * 2.5), rtol=1e-2, atol=1e-4)
    (g3,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g3)


def test_double_backward_differentiates_the_reference_formula():
    x = logits((23, 11), torch.float64, seed=9)
    t = index_target((23, 11), seed=10)
    w = positive((11,), torch.float64)
    assert torch.autograd.gradgradcheck(lambda a: leanloss.cross_entropy(a, t, weight=w), (x,))
    assert torch.autograd.gradgradcheck(lambda a: leanloss.cross_entropy(a, t, reduction="none"), (x,))


def test_16bit_gradients_are_float32_accurate():
    """bf16 logits: the block kernel's value and gradient are the float32 answer rounded once,
    closer to float64 than torch's own bfloat16 computation."""
    x = logits((23, 11), torch.bfloat16, seed=11)
    t = index_target((23, 11), seed=12)
    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, t, label_smoothing=0.1)
    (ref_g,) = torch.autograd.grad(ref, x64)
    got = leanloss.cross_entropy(x, t, label_smoothing=0.1)
    (g,) = torch.autograd.grad(got, x)
    # one bfloat16 rounding of each gradient entry (half an ulp), not more
    assert ((g.double() - ref_g).abs() <= ref_g.abs() * 2**-8 + 1e-12).all()
    torch.testing.assert_close(got.double(), ref.to(torch.bfloat16).double(), rtol=2**-8, atol=0)
