"""The chunked engine (leanloss._fused.engine) on its own, with toy scorers: its contract, the
block plan, the 16-bit weight-gradient modes and their accuracy."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from leanloss import linear_cross_entropy
from leanloss._fused import engine
from leanloss._fused.engine import PointGradient, ScoreResult, fused_linear_loss

from _oracle import linear_cross_entropy_reference


class Quadratic:
    """``loss_r = 0.5 * sum_c (z_rc - y_rc)^2``: gradient ``z - y``, no softmax."""

    outputs = 1

    def __init__(self, y: torch.Tensor, low_precision_blocks: bool = False, saves: bool = False):
        self.y, self.low_precision_blocks, self.saves = y, low_precision_blocks, saves
        self.first_scorings = 0

    def score(self, z: torch.Tensor, rows: slice, saved: Optional[torch.Tensor],
              upstream: Optional[torch.Tensor]) -> ScoreResult:
        diff = z.to(self.y.dtype) - self.y[rows]
        if saved is None:
            self.first_scorings += 1
            loss = 0.5 * diff.square().sum(1)
        else:  # the engine hands back what the block's first scoring saved
            loss = saved[:, 0]
        keep = loss.unsqueeze(1) if self.saves else None
        if upstream is None:
            return ScoreResult(loss, saved=keep)
        z.copy_(diff * upstream)
        return ScoreResult(loss, saved=keep)


def toy(n=13, d=5, v=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.randn(n, v, generator=g, dtype=torch.float64)
    return h, w, b, y


def dense_quadratic(h, w, b, y, reduction):
    per = 0.5 * (h @ w.T + b - y).square().sum(1)
    return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("saves", [False, True])
def test_gradcheck_toy_scorer(reduction, saves):
    h, w, b, y = toy()

    def fn(h_, w_, b_):
        return fused_linear_loss(h_, w_, b_, Quadratic(y, saves=saves), reduction=reduction,
                                 chunk_size=4)

    assert torch.autograd.gradcheck(fn, (h, w, b))
    torch.testing.assert_close(fn(h, w, b), dense_quadratic(h, w, b, y, reduction))


def test_none_recompute_hands_back_saved_statistics():
    """'none' recomputes each block in backward; a scorer's saved row statistics come back to
    it there (so it scores each block for the first time once), and values are unchanged."""
    h, w, b, y = toy()
    scorer = Quadratic(y, saves=True)
    out = fused_linear_loss(h, w, b, scorer, reduction="none", chunk_size=4)
    upstream = torch.linspace(-1, 2, out.shape[0], dtype=out.dtype)
    (out * upstream).sum().backward()
    assert scorer.first_scorings == 4  # 13 rows in blocks of 4, scored afresh in forward only
    leaves = [x.detach().requires_grad_() for x in (h, w, b)]
    (dense_quadratic(*leaves, y, "none") * upstream).sum().backward()
    for got, want in zip((h, w, b), leaves):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("chunk", [None, 3, 13])
@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_blocks_match_float64(chunk, native):
    """16-bit blocks, scored natively or upcast by the engine, one block or an accumulator."""
    h, w, b, y = toy(n=40, d=6, v=9, dtype=torch.bfloat16, seed=1)
    loss = fused_linear_loss(h, w, b, Quadratic(y.float(), low_precision_blocks=native), reduction="sum",
                             chunk_size=chunk)
    assert loss.dtype == torch.float32
    leaves64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
    ref = dense_quadratic(*leaves64, y, "sum")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=1e-2)
    got = torch.autograd.grad(loss, (h, w, b))
    want = torch.autograd.grad(ref, leaves64)
    for g_, e in zip(got, want):
        assert g_.dtype == torch.bfloat16
        assert float((g_.double() - e).norm() / e.norm()) < 2e-2


def test_point_gradient_is_added_exactly_in_the_accumulator():
    """A scorer whose gradient is mostly its point term: with several blocks the float32
    accumulator gets the point rows exactly, so the weight gradient is the one-rounding result."""

    class PointOnly:
        low_precision_blocks = True
        outputs = 1

        def __init__(self, cols):
            self.cols = cols

        def score(self, z, rows, saved, upstream):
            loss = z.gather(1, self.cols[rows].unsqueeze(1)).squeeze(1).float()
            if upstream is None:
                return ScoreResult(loss)
            coef = upstream.reshape(-1)
            z.zero_()  # the dense part; the engine writes the point terms
            return ScoreResult(loss, PointGradient(self.cols[rows], coef, torch.zeros_like(coef)))

    g = torch.Generator().manual_seed(3)
    n, d, v = 300, 8, 5
    h = (torch.randn(n, d, generator=g) * 3).bfloat16().requires_grad_()
    w = torch.randn(v, d, generator=g).bfloat16().requires_grad_()
    cols = torch.randint(0, v, (n,), generator=g)
    fused_linear_loss(h, w, None, PointOnly(cols), reduction="sum", chunk_size=7).backward()
    exact = torch.zeros(v, d, dtype=torch.float64).index_add_(0, cols, h.detach().double())
    assert torch.equal(w.grad, exact.bfloat16())  # rounded once, whatever the block count


class _TargetAndAddedPoints:
    """``loss_r = z[r, t_r] + sum_i a_ri z[r, c_ri]`` over the ``c_ri >= 0``: a zero dense part,
    the target's point term and ``k`` added point terms per row."""

    low_precision_blocks = True
    outputs = 1

    def __init__(self, t, cols, coefs):
        self.t, self.cols, self.coefs = t, cols, coefs

    def score(self, z, rows, saved, upstream):
        t, cols, a = self.t[rows], self.cols[rows], self.coefs[rows]
        at_ids = torch.where(cols >= 0, a * z.gather(1, cols.clamp_min(0)).float(), 0.0)
        loss = z.gather(1, t.unsqueeze(1)).squeeze(1).float() + at_ids.sum(1)
        if upstream is None:
            return ScoreResult(loss)
        g = upstream.reshape(-1)
        z.zero_()
        return ScoreResult(loss, PointGradient(t, g, torch.zeros_like(g), cols, a * g.unsqueeze(1)))


@pytest.mark.parametrize("dtype, chunk", [(torch.float32, 7), (torch.bfloat16, 1000), (torch.bfloat16, 7)])
def test_added_point_terms_repeat_and_skip_negative_columns(dtype, chunk):
    """``(n, k)`` added point terms: repeated columns add up, columns ``< 0`` contribute nothing,
    and in the 16-bit accumulator (several blocks) they are added exactly, like the target's."""
    g = torch.Generator().manual_seed(4)
    n, d, v, k = 300, 8, 5, 3
    h = (torch.randn(n, d, generator=g) * 3).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    cols = torch.randint(0, v, (n, k), generator=g)
    cols[:, 1] = cols[:, 0]
    cols[::3, 2] = -1
    coefs = torch.tensor([1.0, 0.5, -2.0]).expand(n, k)
    up = torch.tensor([1.0, 2.0, -1.0]).repeat(n // 3)
    loss = fused_linear_loss(h, w, None, _TargetAndAddedPoints(t, cols, coefs), reduction="none", chunk_size=chunk)
    loss.backward(up)
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = hd @ wd.T
    ref = z.gather(1, t.unsqueeze(1)).squeeze(1) + torch.where(cols >= 0, coefs.double() * z.gather(1, cols.clamp_min(0)), 0.0).sum(1)
    tol = dict(rtol=1e-2, atol=0.25) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref, **tol)  # 16-bit logits
    gh, gw = torch.autograd.grad(ref, (hd, wd), up.double())
    if dtype == torch.bfloat16 and chunk < n:
        assert torch.equal(w.grad, gw.bfloat16())  # rounded once, whatever the block count
    else:
        # float32: each entry sums 300 products (magnitudes ~1.4e3 in all), whose rounding
        # depends on the BLAS's order (1.2e-5 on an AMX Xeon): 1e-4
        w_tol = tol if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(w.grad.double(), gw, **w_tol)
    torch.testing.assert_close(h.grad.double(), gh, **tol)


def test_plan_chunk():
    mib = 2**20
    # float32: ~96 MiB blocks of at least 512 rows (a quarter of fewer), as default_chunk_size
    assert engine.plan_chunk(2048, 32000, 1024, torch.float32, True) == 683
    assert engine.plan_chunk(512, 128256, 512, torch.float32, True) == 171
    # bfloat16 with a weight gradient: one block while M <= 2 D ...
    assert engine.plan_chunk(2048, 32000, 1024, torch.bfloat16, True) == 2048
    assert engine.plan_chunk(512, 128256, 512, torch.bfloat16, True) == 512
    assert engine.plan_chunk(4096, 128256, 4096, torch.bfloat16, True) == 4096
    # ... else blocks of max(512, D) rows into a float32 accumulator
    assert engine.plan_chunk(8192, 131072, 1024, torch.bfloat16, True) == 1024
    assert engine.plan_chunk(8192, 32000, 256, torch.bfloat16, True) == 512
    # ... unless the whole 16-bit block fits the block budget
    assert engine.plan_chunk(1500, 32000, 64, torch.bfloat16, True) == 1500
    assert 1500 * 32000 * 2 <= 96 * mib
    # no weight gradient: ~96 MiB of 16-bit logits per block
    assert engine.plan_chunk(8192, 32000, 256, torch.bfloat16, False) == 1366


def test_default_chunk_size_evens_out_blocks():
    assert engine.default_chunk_size(2048, 32000) == 683  # 3 blocks of ~87 MB
    assert engine.default_chunk_size(2048, 131072) == 512  # 512 rows at least from 2048 rows on
    assert engine.default_chunk_size(2600, 131072) == 434  # six even blocks, not five of 512 + 40
    # fewer rows: a quarter of them at least, so no block holds more than max(96 MiB, 1/4 of
    # the logits) (one 512-row block would be all 262 MB of them)
    assert engine.default_chunk_size(512, 128256) == 171  # 3 blocks of ~88 MB
    assert engine.default_chunk_size(1024, 131072) == 256
    assert engine.default_chunk_size(600, 131072) == 150
    assert engine.default_chunk_size(512, 32000) == 512  # 65 MB: one block
    assert engine.default_chunk_size(0, 10) == 1
    assert engine.default_chunk_size(2048, 32000, element_size=2) == 1024
    sizes = [engine.default_chunk_size(n, 50000, min_rows=7, block_bytes=4 * 50000 * 7)
             for n in (7, 8, 20, 21, 22)]
    assert sizes == [7, 4, 7, 7, 6]


def _rel(a, ref):
    return float((a.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_bfloat16_gradients_as_accurate_as_eager(chunk_size):
    """Against float64 on the same bf16-rounded inputs, the fused gradients are at most 1.25x as
    far off as eager bf16 with float32 logits (what transformers does), with one block, with
    the float32 accumulator (N > 2D) and with many small blocks."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 2048, 48, 3000
    h = torch.randn(n, d, generator=g).bfloat16()
    w = (torch.randn(v, d, generator=g) * 0.3).bfloat16()
    t = torch.randint(0, v, (n,), generator=g)
    t[::7] = -100
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    F.cross_entropy(h64 @ w64.T, t).backward()
    he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
    F.cross_entropy((he @ we.T).float(), t).backward()
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    linear_cross_entropy(hl, wl, t, chunk_size=chunk_size).backward()
    assert _rel(hl.grad, h64.grad) <= 1.25 * _rel(he.grad, h64.grad)
    assert _rel(wl.grad, w64.grad) <= 1.25 * _rel(we.grad, w64.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction, kw", [
    ("mean", dict(label_smoothing=0.1, z_loss=1e-3)),
    ("none", dict(softcap=15.0, logit_scale=0.5)),
])
def test_16bit_compiled_kernel_against_float64(dtype, reduction, kw):
    """The compiled path end to end in bf16 and fp16 (one block and the accumulator), against
    float64 on the same rounded inputs; 'none' with a random upstream gradient."""
    from leanloss._fused import kernels

    before = kernels.get_kernel_mode()
    kernels.set_kernel_mode("compiled")
    try:
        g = torch.Generator().manual_seed(2)
        n, d, v = 96, 16, 3000
        h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_()
        b = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), generator=g)
        t[::5] = -100
        up = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
        leaves64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
        ref = linear_cross_entropy_reference(*leaves64[:2], t, leaves64[2], reduction=reduction, **kw)
        for chunk in (None, 40):
            out = linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_size=chunk, **kw)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
            weights = up.float() if reduction == "none" else None
            got = torch.autograd.grad(out, (h, w, b), weights)
            want = torch.autograd.grad(ref, leaves64, up if reduction == "none" else None, retain_graph=True)
            for g_, e in zip(got, want):
                assert g_.dtype == dtype
                assert float((g_.double() - e).norm() / e.norm()) < 2e-2
    finally:
        kernels.set_kernel_mode(before)


def test_set_and_add_at_cols_write_through_the_flat_index_of_a_row_view():
    """Rows of a wider buffer (stride > width, as the engine's blocks are): set writes one value
    per row, add accumulates (n, k) values with repeated columns adding up; other entries and
    the buffer outside the view stay as they were."""
    base = torch.zeros(4, 7, dtype=torch.bfloat16)
    block = base[1:4, :5]
    engine.set_at_cols(block, torch.tensor([0, 4, 2]), torch.tensor([1.0, 2.0, 3.0]))
    engine.add_at_cols(block, torch.tensor([[1, 1], [4, 0], [2, 3]]),
                       torch.tensor([[0.5, 0.25], [1.0, -1.0], [2.0, 4.0]]))
    expected = torch.zeros(4, 7)
    expected[1, 0], expected[1, 1] = 1.0, 0.75
    expected[2, 4], expected[2, 0] = 3.0, -1.0
    expected[3, 2], expected[3, 3] = 5.0, 4.0
    torch.testing.assert_close(base.float(), expected)
    engine.set_at_cols(block[:0], torch.tensor([], dtype=torch.long), torch.tensor([]))  # no rows: no-op


# The logits source (fused_logits_loss): the same scorers and autograd scheme over rows of
# materialized logits.

def _dense_ce(x, t, **kw):
    from leanloss.losses._ce_rows_dense import DenseCrossEntropyScorer

    return DenseCrossEntropyScorer(x.detach(), t, kw.get("weight"), -100, kw.get("label_smoothing", 0.0))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("kept", [False, True])
def test_logits_source_gradcheck_toy_scorer(reduction, kept):
    """A toy scorer over logits rows, all of them or the kept ones (in their order): values and
    gradients (0 at the dropped rows); the caller's logits are only read."""
    _, _, _, x = toy(n=13, v=7)
    keep = torch.tensor([11, 0, 4, 5, 9, 2, 12]) if kept else None
    rows = x.detach() if keep is None else x.detach()[keep]
    y = torch.randn(rows.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x.requires_grad_()
    before = x.detach().clone()

    def fn(x_):
        return engine.fused_logits_loss(x_, Quadratic(y, saves=True), reduction=reduction, keep=keep,
                                        chunk_size=3)

    assert torch.autograd.gradcheck(fn, (x,))
    per = 0.5 * ((x if keep is None else x[keep]) - y).square().sum(1)
    torch.testing.assert_close(fn(x), {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction])
    if kept:
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
        dropped = torch.ones(13, dtype=torch.bool).index_fill_(0, keep, False)
        assert grad[dropped].eq(0).all() and grad[keep].ne(0).all()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_source_dense_cross_entropy_matches_torch(dtype, reduction):
    """The dense cross-entropy scorer over many blocks of logits, 'none' with a non-uniform
    upstream gradient: torch's value, and torch's float32 gradient rounded once to the input's
    dtype."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(29, 50, generator=g) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, 50, (29,), generator=g)
    t[::6] = -100
    w = (torch.rand(50, generator=g) + 0.5).to(dtype)
    out = engine.fused_logits_loss(x, _dense_ce(x, t, weight=w), reduction=reduction, chunk_size=4,
                                   divisor=w.float()[t[t != -100]].sum() if reduction == "mean" else None)
    x32 = x.detach().float().requires_grad_()
    ref = F.cross_entropy(x32, t, weight=w.float(), reduction=reduction)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)
    up = torch.rand(out.shape, generator=g) + 0.5 if reduction == "none" else None
    (got,) = torch.autograd.grad(out, x, up)
    (want,) = torch.autograd.grad(ref, x32, up)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=2e-6 if dtype == torch.float32 else 0,
                               atol=1e-7)


def test_logits_source_second_backward_through_a_retained_graph():
    """'sum'/'mean' hand out the gradient computed in forward; a second backward recomputes it,
    scaled by its upstream gradient."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(17, 9, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randint(0, 9, (17,), generator=g)
    loss = engine.fused_logits_loss(x, _dense_ce(x, t), reduction="sum", chunk_size=5)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(-2.5, dtype=loss.dtype))
    torch.testing.assert_close(g2, -2.5 * g1)
    x64 = x.detach().requires_grad_()
    torch.testing.assert_close(g1, torch.autograd.grad(F.cross_entropy(x64, t, reduction="sum"), x64)[0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_source_create_graph_differentiates_the_reference(reduction):
    """A create_graph backward of a logits loss differentiates its reference formula (dense CE's
    double backward); the first-order gradient is the engine's."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(11, 6, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randint(0, 6, (11,), generator=g)

    def fn(x_):
        return engine.fused_logits_loss(x_, _dense_ce(x_, t), reduction=reduction, chunk_size=4,
                                        reference=lambda a: F.cross_entropy(a, t, reduction=reduction))

    assert torch.autograd.gradgradcheck(fn, (x,))
    (gx,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    (hvp,) = torch.autograd.grad(gx.square().sum(), x)
    x64 = x.detach().requires_grad_()
    (rx,) = torch.autograd.grad(F.cross_entropy(x64, t, reduction=reduction).sum(), x64, create_graph=True)
    torch.testing.assert_close(hvp, torch.autograd.grad(rx.square().sum(), x64)[0])
