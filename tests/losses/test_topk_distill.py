"""topk_distill_loss (dense) and linear_topk_distill_loss (fused) against a float64 oracle built
from torch's kl_div on the teacher's top-k distribution scattered over the vocabulary."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import leanloss
from leanloss import (InputWarning, LinearTopKDistillLoss, TopKDistillLoss, linear_topk_distill_loss,
                      topk_distill_loss)
from leanloss._checks import LeanlossTypeError, LeanlossValueError, TargetOutOfRangeError
from leanloss._fused import topk_rows

from _oracle import in_kernel_modes


def oracle(logits, ids, logprobs, target=None, *, temperature=1.0, hard_weight=0.0,
           reduction="mean", ignore_index=-100):
    """float64: ``a CE(z, y) + (1 - a) T^2 KL(p || q)``, ``p`` the renormalized tempered top-k
    teacher scattered into a vocabulary-sized vector (0 elsewhere), via torch's kl_div."""
    z = logits.double()
    v = z.shape[-1]
    k = ids.shape[-1]
    z2, ids2, lp2 = z.reshape(-1, v), ids.reshape(-1, k), logprobs.double().reshape(-1, k)
    p_full = torch.zeros_like(z2)
    for r in range(z2.shape[0]):
        real = ids2[r] >= 0
        if real.any():
            p_full[r, ids2[r][real]] = torch.softmax(lp2[r][real] / temperature, 0)
    log_q = torch.log_softmax(z2 / temperature, -1)
    soft = F.kl_div(log_q, p_full, reduction="none").sum(-1) * temperature**2
    loss = (1 - hard_weight) * soft
    keep = torch.ones(z2.shape[0], dtype=torch.bool)
    if target is not None:
        t = target.reshape(-1)
        keep = t != ignore_index
        if hard_weight > 0:
            loss = loss + hard_weight * F.cross_entropy(z2, t, ignore_index=ignore_index, reduction="none")
    loss = torch.where(keep, loss, 0.0)
    if reduction == "none":
        return loss.reshape(z.shape[:-1])
    return loss.sum() if reduction == "sum" else loss.sum() / keep.sum()


def make(shape=(13,), d=6, v=31, k=5, *, dtype=torch.float64, bias=True, pad=True, ignore=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    n = torch.Size(shape).numel()
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    logprobs = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1).gather(1, ids)
    logprobs, order = logprobs.sort(1, descending=True)
    ids = ids.gather(1, order)
    if pad:  # rows with fewer entries, and one row of padding only
        ids[1, 3:] = -1
        ids[2, 1:] = -1
        ids[4, :] = -1
    t = torch.randint(0, v, shape, generator=g)
    if ignore:
        t.view(-1)[[0, 5]] = -100
    return h, w, b, ids.reshape(*shape, k), logprobs.float().reshape(*shape, k), t


def logits_of(h, w, b):
    z = h @ w.T
    return z if b is None else z + b


OPTIONS = [
    dict(),
    dict(temperature=2.0),
    dict(temperature=0.7, hard_weight=0.3),
    dict(hard_weight=1.0),
    dict(reduction="sum", temperature=1.5, hard_weight=0.5),
    dict(reduction="none", temperature=0.8, hard_weight=0.2),
    dict(reduction="none"),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("form", ["dense", "fused"])
def test_matches_float64_oracle(form, opts):
    h, w, b, ids, lps, t = make()
    up = torch.randn(t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if form == "dense":
        z = logits_of(h, w, b)
        out = topk_distill_loss(z, ids, lps, t, **opts)
    else:
        out = linear_topk_distill_loss(h, w, ids, lps, t, student_bias=b, chunk_size=4, **opts)
    ref = oracle(logits_of(h, w, b), ids, lps, t, **opts)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    scalar = (lambda x: (x * up).sum()) if opts.get("reduction") == "none" else (lambda x: x)
    got = torch.autograd.grad(scalar(out), (h, w, b))
    want = torch.autograd.grad(scalar(ref), (h, w, b))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("form", ["dense", "fused"])
def test_without_target_every_row_counts(form):
    h, w, b, ids, lps, _ = make(shape=(2, 5))
    z = logits_of(h, w, b)
    out = (topk_distill_loss(z, ids, lps, temperature=1.3) if form == "dense"
           else linear_topk_distill_loss(h, w, ids, lps, student_bias=b, temperature=1.3))
    ref = oracle(z, ids, lps, temperature=1.3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert torch.isclose(ref * 10, oracle(z, ids, lps, temperature=1.3, reduction="sum"))


def test_padding_and_ignored_rows():
    h, w, b, ids, lps, t = make()
    per_row = linear_topk_distill_loss(h, w, ids, lps, t, student_bias=b, reduction="none")
    assert per_row[4] == 0 and (per_row[[0, 5]] == 0).all()  # padding only; ignored targets
    assert (per_row[[1, 2, 3]] > 0).all()
    mean = linear_topk_distill_loss(h, w, ids, lps, t, student_bias=b)
    torch.testing.assert_close(mean, per_row.sum() / 11)  # 13 rows, 2 ignored (the padded row counts)
    (gh,) = torch.autograd.grad(mean, h)
    assert (gh[[0, 4, 5]] == 0).all() and (gh[1] != 0).any()
    # a padded entry's logprob does not matter; renormalization over the real entries does
    lps2 = lps.clone()
    lps2[1, 3:] = 5.0
    lps2[3] = lps2[3] - 1.0
    torch.testing.assert_close(linear_topk_distill_loss(h, w, ids, lps2, t, student_bias=b, reduction="none"),
                               per_row)


def test_all_ignored_mean_is_nan_sum_is_zero():
    h, w, b, ids, lps, t = make()
    t[:] = -100
    for fn in ("dense", "fused"):
        call = ((lambda **kw: topk_distill_loss(logits_of(h, w, b), ids, lps, t, **kw)) if fn == "dense"
                else (lambda **kw: linear_topk_distill_loss(h, w, ids, lps, t, student_bias=b, **kw)))
        assert call().isnan()
        assert call(reduction="sum") == 0


def test_no_gradient_to_the_teacher():
    h, w, b, ids, lps, t = make()
    lps = lps.double().requires_grad_()
    for out in (topk_distill_loss(logits_of(h, w, b), ids, lps, t),
                linear_topk_distill_loss(h, w, ids, lps, t, student_bias=b)):
        (g,) = torch.autograd.grad(out, lps, allow_unused=True)
        assert g is None or torch.equal(g, torch.zeros_like(g))


def test_bfloat16_fused_against_float64():
    g = torch.Generator().manual_seed(1)
    n, d, v, k = 40, 32, 3000, 8
    h = torch.randn(n, d, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).bfloat16().requires_grad_()
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lps = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 1.0
    t = torch.randint(0, v, (n,), generator=g)
    t[3] = -100
    out = linear_topk_distill_loss(h, w, ids, lps, t, temperature=1.5, hard_weight=0.2, chunk_size=8)
    assert out.dtype == torch.float32
    ref = oracle(h.double() @ w.double().T, ids, lps, t, temperature=1.5, hard_weight=0.2)
    assert abs(float(out.detach()) - float(ref.detach())) <= 1e-2 * abs(float(ref.detach()))
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.autograd.grad(oracle(hd @ wd.T, ids, lps, t, temperature=1.5, hard_weight=0.2), (hd, wd))
    got = torch.autograd.grad(out, (h, w))
    for x, y in zip(got, want):
        assert x.dtype == torch.bfloat16
        assert (x.double() - y).norm() / y.norm() < 2e-2


def test_compiled_kernel_equals_eager():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 300, generator=g) * 3
    ids = torch.stack([torch.randperm(300, generator=g)[:4] for _ in range(6)])
    p = torch.softmax(torch.randn(6, 4, generator=g), -1)
    p[2, 2:] = 0
    args = (z.gather(1, ids), p, p.sum(1), torch.special.xlogy(p, p).sum(1), z[:, 9].clone(),
            torch.randn(6, generator=g))

    def run():
        block = z.clone()
        (loss,) = topk_rows.TOPK_KERNEL(block, *args, scale=1 / 1.3, temperature=1.3, hard_weight=0.4)
        sliced = z[:, :100].clone()  # the vocab-parallel gradient of a slice, from global statistics
        topk_rows.TOPK_GRAD_KERNEL(sliced, z.logsumexp(1) / 1.3, z.logsumexp(1), args[2], args[-1],
                                   scale=1 / 1.3, temperature=1.3, hard_weight=0.4)
        return loss, block, sliced

    eager, compiled = in_kernel_modes(run)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gradcheck_tiny():
    h, w, b, ids, lps, t = make(shape=(6,), d=3, v=9, k=3)
    for reduction in ("mean", "none"):
        def fn(h_, w_, b_):
            return linear_topk_distill_loss(h_, w_, ids, lps, t, student_bias=b_, temperature=0.8,
                                            hard_weight=0.3, reduction=reduction, chunk_size=2)
        assert torch.autograd.gradcheck(fn, (h, w, b))


def test_duplicate_ids_count_like_the_dense_formula():
    h, w, b, ids, lps, t = make(pad=False)
    ids[:, 1] = ids[:, 0]
    dense = topk_distill_loss(logits_of(h, w, b), ids, lps, t, temperature=1.2, reduction="none")
    fused = linear_topk_distill_loss(h, w, ids, lps, t, student_bias=b, temperature=1.2, reduction="none")
    torch.testing.assert_close(fused, dense, rtol=1e-10, atol=1e-12)
    gd = torch.autograd.grad(dense.sum(), (h, w))
    gf = torch.autograd.grad(fused.sum(), (h, w))
    for x, y in zip(gf, gd):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_modules():
    h, w, b, ids, lps, t = make()
    dense = TopKDistillLoss(temperature=1.5, hard_weight=0.1)
    fused = LinearTopKDistillLoss(temperature=1.5, hard_weight=0.1, chunk_size=3)
    ref = oracle(logits_of(h, w, b), ids, lps, t, temperature=1.5, hard_weight=0.1)
    torch.testing.assert_close(dense(logits_of(h, w, b), ids, lps, t), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused(h, w, ids, lps, t, student_bias=b), ref, rtol=1e-10, atol=1e-12)
    assert "hard_weight=0.1" in repr(fused)
    assert leanloss.functional.topk_distill_loss is topk_distill_loss


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(temperature=0.0), LeanlossValueError, ["'temperature'"]),
        (dict(hard_weight=1.5), LeanlossValueError, ["'hard_weight'"]),
        (dict(ids=torch.tensor([[0, 9], [1, 2], [3, -1]])), TargetOutOfRangeError, ["'topk_ids'", "9"]),
        (dict(ids=torch.tensor([[0, 1], [1, 2]])), LeanlossValueError, ["'topk_ids'", "(3, 'k')"]),
        (dict(lps=torch.zeros(3, 3)), LeanlossValueError, ["'topk_logprobs'", "(3, 2)"]),
        (dict(ids=torch.tensor([[0.0, 1.0], [1.0, 2.0], [3.0, 4.0]])), LeanlossTypeError, ["'topk_ids'", "int64"]),
        (dict(lps=torch.zeros(3, 2, dtype=torch.int64)), TypeError, ["'topk_logprobs'"]),
        (dict(hard_weight=0.5, target=None), LeanlossValueError, ["'target'", "hard_weight"]),
        (dict(target=torch.tensor([0, 1, 9])), TargetOutOfRangeError, ["'target'"]),
    ],
)
@pytest.mark.parametrize("form", ["dense", "fused"])
def test_errors_name_the_argument(form, change, error, words):
    args = dict(ids=torch.tensor([[0, 1], [1, 2], [3, -1]]), lps=torch.full((3, 2), -1.0),
                target=torch.tensor([0, 1, 2]))
    args.update(change)
    ids, lps, target = args.pop("ids"), args.pop("lps"), args.pop("target")
    with pytest.raises(error) as info:
        if form == "dense":
            topk_distill_loss(torch.randn(3, 7), ids, lps, target, **args)
        else:
            linear_topk_distill_loss(torch.randn(3, 4), torch.randn(7, 4), ids, lps, target, **args)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("form", ["dense", "fused"])
def test_probabilities_for_log_probabilities_warn(form):
    h, w, b, ids, lps, t = make(bias=False)

    def call(values):
        if form == "dense":
            return topk_distill_loss(logits_of(h, w, None), ids, values, t)
        return linear_topk_distill_loss(h, w, ids, values, t)

    with pytest.warns(InputWarning, match="'topk_logprobs'.*probabilities"):
        call(lps.exp())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(lps)  # log-probabilities: no warning
        call(lps + 3.0)  # top-k logits give the same distribution: no warning either
