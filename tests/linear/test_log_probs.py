"""linear_log_probs against dense torch in float64: per-token log p(target), entropy and the
statistics of ``return_stats``, and the gradients of any combination of them (the vocab-parallel
form: tests/parallel/test_vocab_parallel_log_probs.py and tests/parallel/test_log_prob_stats.py)."""
from __future__ import annotations

import pytest
import torch

import leanloss
from leanloss import LinearLogProbs, linear_log_probs
from leanloss._checks import LeanlossTypeError, LeanlossValueError, TargetOutOfRangeError
from leanloss._fused import engine as _engine
from leanloss._fused import logp_rows
from leanloss.parallel import vocab_parallel_linear_log_probs

from _oracle import dense_token_stats, in_kernel_modes, log_probs_objective as objective
from _oracle import linear_log_probs_reference as reference


def make(shape=(23,), d=6, v=37, *, dtype=torch.float64, bias=True, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, shape, generator=g)
    t[torch.rand(shape, generator=g) < ignore_frac] = -100
    return h, w, b, t


def upstream(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randn(shape, generator=g, dtype=torch.float64))


def leaves_of(*xs):
    return [x for x in xs if x is not None]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [4, None])
def test_values_and_gradients_float64(temperature, bias, chunk_size):
    h, w, b, t = make(bias=bias)
    logp, ent = linear_log_probs(h, w, t, b, temperature=temperature, return_entropy=True,
                                 chunk_size=chunk_size)
    rl, re = reference(h, w, t, b, temperature=temperature)
    assert logp.dtype == ent.dtype == torch.float64 and logp.shape == t.shape
    torch.testing.assert_close(logp, rl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, re, rtol=1e-12, atol=1e-12)
    a, c = upstream(t.shape)
    got = torch.autograd.grad(objective(logp, ent, a, c), leaves_of(h, w, b))
    want = torch.autograd.grad(objective(rl, re, a, c), leaves_of(h, w, b))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_one_output_alone(which):
    """Only one output in the graph: its gradient alone (the other's upstream is zero)."""
    h, w, b, t = make(shape=(3, 5))
    logp, ent = linear_log_probs(h, w, t, b, temperature=0.8, return_entropy=True, chunk_size=4)
    rl, re = reference(h, w, t, b, temperature=0.8)
    out, ref = (logp, rl) if which == "logp" else (ent, re)
    a, _ = upstream(t.shape)
    got = torch.autograd.grad((out * a).sum(), (h, w, b))
    want = torch.autograd.grad((ref * a).sum(), (h, w, b))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-11)


def test_logp_only_is_the_default_return():
    h, w, b, t = make()
    logp = linear_log_probs(h, w, t, b, temperature=0.9)
    assert isinstance(logp, torch.Tensor)
    torch.testing.assert_close(logp, reference(h, w, t, b, temperature=0.9)[0], rtol=1e-12, atol=1e-12)


def test_entropy_gradient_is_the_closed_form():
    """dH/dz_c = -p_c (log p_c + H) / T, the formula the kernel writes (logits as leaves)."""
    g = torch.Generator().manual_seed(3)
    v, temp = 11, 0.6
    z = torch.randn(5, v, generator=g, dtype=torch.float64)
    w = torch.eye(v, dtype=torch.float64)  # hidden @ w.T = hidden: the logits are the leaves
    h = z.clone().requires_grad_()
    _, ent = linear_log_probs(h, w, torch.zeros(5, dtype=torch.int64), temperature=temp,
                              return_entropy=True)
    (grad,) = torch.autograd.grad(ent.sum(), h)
    log_p = torch.log_softmax(z / temp, -1)
    p, entropy = log_p.exp(), -(log_p.exp() * log_p).sum(-1, keepdim=True)
    torch.testing.assert_close(grad, -p * (log_p + entropy) / temp, rtol=1e-12, atol=1e-13)


def test_ignored_tokens_are_zero_and_get_no_gradient():
    h, w, b, t = make(shape=(4, 6), ignore_frac=0.4)
    logp, ent = linear_log_probs(h, w, t, b, return_entropy=True)
    ignored = t == -100
    assert ignored.any() and (~ignored).any()
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all() and (ent[~ignored] > 0).all()
    (gh,) = torch.autograd.grad(objective(logp, ent, *upstream(t.shape)), h)
    assert (gh[ignored] == 0).all() and (gh[~ignored] != 0).any()


def test_custom_ignore_index_inside_vocabulary():
    h, w, b, t = make(ignore_frac=0.0)
    t[::3] = 5
    logp, ent = linear_log_probs(h, w, t, b, return_entropy=True, ignore_index=5)
    rl, re = reference(h, w, t, b, ignore_index=5)
    torch.testing.assert_close(logp, rl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, re, rtol=1e-12, atol=1e-12)


def test_all_ignored_and_empty():
    h, w, b, t = make(shape=(4,))
    t[:] = -100
    logp, ent = linear_log_probs(h, w, t, b, return_entropy=True)
    assert torch.equal(logp, torch.zeros(4, dtype=torch.float64)) and torch.equal(ent, logp)
    (gw,) = torch.autograd.grad((logp + ent).sum(), w)
    assert torch.equal(gw, torch.zeros_like(w))
    empty = linear_log_probs(h[:0], w, t[:0], b)
    assert empty.shape == (0,)


def test_masked_vocabulary_entries_stay_exact():
    """A -inf bias masks classes (padded vocabularies): finite entropy, exact gradients."""
    h, w, b, t = make(ignore_frac=0.0)
    mask = torch.zeros(w.shape[0], dtype=torch.bool)
    mask[-7:] = True
    t = torch.where(mask[t], 0, t)
    bias = b.detach().masked_fill(mask, float("-inf")).requires_grad_()
    logp, ent = linear_log_probs(h, w, t, bias, temperature=0.8, return_entropy=True, chunk_size=5)
    z = (h.double() @ w.double().T)[:, ~mask] + b.double()[~mask]
    rl, re = reference(h, w[~mask], t, b[~mask], temperature=0.8)
    assert torch.isfinite(ent).all()
    torch.testing.assert_close(logp, rl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, re, rtol=1e-12, atol=1e-12)
    a, c = upstream(t.shape)
    gh, gw = torch.autograd.grad(objective(logp, ent, a, c), (h, w))
    wh, ww = torch.autograd.grad(objective(rl, re, a, c), (h, w))
    torch.testing.assert_close(gh, wh, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(gw, ww, rtol=1e-10, atol=1e-11)  # masked rows: 0 in both
    assert z.isfinite().all()


def test_float32_and_leading_shape():
    h, w, b, t = make(shape=(2, 3, 5), dtype=torch.float32)
    logp, ent = linear_log_probs(h, w, t, b, temperature=0.9, return_entropy=True, chunk_size=7)
    assert logp.dtype == torch.float32 and logp.shape == (2, 3, 5)
    rl, re = reference(h, w, t, b, temperature=0.9)
    torch.testing.assert_close(logp.double(), rl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), re, rtol=1e-5, atol=1e-5)


def bf16_head(n, *, seed, d=32, v=3000):
    """A bfloat16 head of ``v`` classes (several 16-bit blocks), row 5's target ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).bfloat16().requires_grad_()
    b = torch.randn(v, generator=g).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[5] = -100
    return h, w, b, t


def test_bfloat16_against_float64_reference():
    """16-bit blocks read in place; several blocks, so the weight gradient takes the float32
    accumulator with the exact target terms."""
    h, w, b, t = bf16_head(40, seed=0)
    logp, ent = linear_log_probs(h, w, t, b, temperature=0.9, return_entropy=True, chunk_size=8)
    assert logp.dtype == ent.dtype == torch.float32
    rl, re = reference(h, w, t, b, temperature=0.9)
    assert (logp.double() - rl).abs().max() < 2e-2 * rl.abs().max()
    assert (ent.double() - re).abs().max() < 2e-2 * re.abs().max()
    a, c = upstream(t.shape)
    got = torch.autograd.grad(objective(logp, ent, a, c), (h, w, b))
    want = torch.autograd.grad(objective(rl, re, a, c), (h, w, b))
    for x, y in zip(got, want):
        assert x.dtype == torch.bfloat16
        assert (x.double() - y).norm() / y.norm() < 2e-2


def test_no_grad_runs_only_the_forward_matmul(monkeypatch):
    h, w, b, t = make()
    calls = []
    for owner, name in ((_engine._Grads, "add_block"), (_engine, "_logits_"),
                        (logp_rows.LOGP_GRAD_KERNEL, "fn")):
        original = getattr(owner, name)
        wrapped = (lambda *a, _name=name, _original=original, **k:
                   calls.append(_name) or _original(*a, **k))
        monkeypatch.setattr(owner, name, wrapped)
    with torch.no_grad():
        logp, ent = linear_log_probs(h, w, t, b, return_entropy=True, chunk_size=5)
    blocks = -(-int((t != -100).sum()) // 5)
    assert not logp.requires_grad and calls == ["_logits_"] * blocks
    torch.testing.assert_close(logp, reference(h, w, t, b)[0], rtol=1e-12, atol=1e-12)
    calls.clear()
    logp, ent = linear_log_probs(h, w, t, b, return_entropy=True, chunk_size=5)
    (logp + ent).sum().backward()  # the check above can fail: with grad there is more work
    assert calls.count("_logits_") == 2 * blocks and calls.count("add_block") == blocks and "fn" in calls


def test_backward_twice_through_retained_graph():
    h, w, b, t = make()
    logp, ent = linear_log_probs(h, w, t, b, return_entropy=True, chunk_size=5)
    loss = objective(logp, ent, *upstream(t.shape))
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in (h, w, b)]
    loss.backward()
    rl, re = reference(h, w, t, b)
    want = torch.autograd.grad(objective(rl, re, *upstream(t.shape)), (h, w, b))
    for f, x, e in zip(first, (h, w, b), want):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(x.grad, 2 * e, rtol=1e-10, atol=1e-11)


def test_inputs_not_modified():
    h, w, b, t = make()
    before = [x.detach().clone() for x in (h, w, b, t)]
    logp, ent = linear_log_probs(h, w, t, b, temperature=0.5, return_entropy=True)
    (logp + ent).sum().backward()
    for x, y in zip((h, w, b, t), before):
        assert torch.equal(x.detach(), y)


def test_gradcheck_tiny():
    h, w, b, t = make(shape=(5,), d=3, v=7, ignore_frac=0.2)

    def fn(h_, w_, b_):
        return linear_log_probs(h_, w_, t, b_, temperature=0.7, return_entropy=True, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("kernel", ["stats", "grad"])
@pytest.mark.parametrize("every_stat", [False, True])
def test_compiled_kernel_equals_eager(kernel, every_stat):
    """Both code paths of each kernel: ``logp`` alone, and every statistic with a softcap."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 300, generator=g) * 3
    z[:3, 40] = z[:3, 7] = z[:3].amax(1) + 1.0  # ties for the maximum: the first index is top-1
    t = torch.tensor([7, 40, 3, 7, 9, 11])
    x_t = z.gather(1, t[:, None])[:, 0]
    options = dict(scale=0.8, softcap=4.0 if every_stat else None, num_classes=300)
    lse, ent, lss, *up = torch.logsumexp(z * 0.8, 1), *torch.rand(2, 6, generator=g), *torch.randn(4, 6, generator=g)
    if not every_stat:
        ent = lss = up[1] = up[2] = up[3] = None

    def run():
        block = z.clone()
        if kernel == "stats":
            flags = dict(entropy=every_stat, log_sum_sq=every_stat, mean=every_stat, top1=every_stat)
            return [*logp_rows.LOGP_STATS_KERNEL(block, x_t, t if every_stat else None, **options, **flags), block]
        return [*logp_rows.LOGP_GRAD_KERNEL(block, x_t, lse, ent, lss, *up, **options), block]

    eager, compiled = in_kernel_modes(run)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if kernel == "stats" and every_stat:
        assert eager[-2].tolist() == [True, False, False, z[3].argmax() == 7, z[4].argmax() == 9, z[5].argmax() == 11]


def test_module_form():
    h, w, b, t = make()
    module = LinearLogProbs(temperature=0.8, return_entropy=True, chunk_size=4)
    logp, ent = module(h, w, t, b)
    rl, re = reference(h, w, t, b, temperature=0.8)
    torch.testing.assert_close(logp, rl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, re, rtol=1e-12, atol=1e-12)
    assert "temperature=0.8" in repr(module)
    assert leanloss.functional.linear_log_probs is linear_log_probs


def grpo_loss(logp, old_logp, advantages, mask, *, clip_eps=0.2, entropy=None, entropy_coef=0.0):
    """The GRPO-style clipped objective of docs/log-probs.md (token-level mean over the completion)."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = -torch.minimum(ratio * advantages[:, None], clipped * advantages[:, None])
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
    return (per_token * mask).sum() / mask.sum()


def test_grpo_objective_equals_dense():
    """The recipe of docs/log-probs.md: the fused log-probs give the dense objective and its gradients."""
    g = torch.Generator().manual_seed(7)
    groups, length, d, v = 4, 6, 8, 50
    h, w, b, t = make(shape=(groups, length), d=d, v=v, ignore_frac=0.2, seed=7)
    mask = (t != -100).double()
    advantages = torch.randn(groups, generator=g, dtype=torch.float64)
    with torch.no_grad():  # the rollout policy's scores, before the update
        old = linear_log_probs(h + 0.05, w, t, b, temperature=0.9)
    logp, ent = linear_log_probs(h, w, t, b, temperature=0.9, return_entropy=True)
    loss = grpo_loss(logp, old, advantages, mask, entropy=ent, entropy_coef=0.01)
    rl, re = reference(h, w, t, b, temperature=0.9)
    with torch.no_grad():
        dense_old = reference(h + 0.05, w, t, b, temperature=0.9)[0]
    torch.testing.assert_close(old, dense_old, rtol=1e-12, atol=1e-12)
    dense = grpo_loss(rl, dense_old, advantages, mask, entropy=re, entropy_coef=0.01)
    torch.testing.assert_close(loss, dense, rtol=1e-12, atol=1e-12)
    got, want = torch.autograd.grad(loss, (h, w, b)), torch.autograd.grad(dense, (h, w, b))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert any(y.abs().max() > 1e-3 for y in want)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"temperature": 0.0}, LeanlossValueError, ["'temperature'"]),
        ({"temperature": -1.0}, LeanlossValueError, ["'temperature'"]),
        ({"target": torch.tensor([0, 7, 1])}, TargetOutOfRangeError, ["'target'", "7"]),
        ({"target": torch.tensor([0, 1])}, LeanlossValueError, ["'target'", "(3,)"]),
        ({"target": torch.tensor([0.0, 1.0, 2.0])}, LeanlossTypeError, ["'target'", "int64"]),
        ({"weight": torch.randn(7, 5)}, LeanlossValueError, ["'weight'", "(V, D)"]),
        ({"bias": torch.randn(7, dtype=torch.float64)}, LeanlossTypeError, ["'bias'"]),
        ({"bias": torch.randn(6)}, LeanlossValueError, ["'bias'", "(7,)"]),
    ],
)
def test_errors_name_the_argument(kwargs, error, words):
    args = {"hidden": torch.randn(3, 4), "weight": torch.randn(7, 4), "target": torch.tensor([0, 6, 1])}
    args.update(kwargs)
    with pytest.raises(error) as info:
        linear_log_probs(args.pop("hidden"), args.pop("weight"), args.pop("target"), **args)
    for word in words:
        assert word in str(info.value)


# ------------------------------------------------------------------------------------------
# per-token statistics (return_stats), softcap and logit_scale
# ------------------------------------------------------------------------------------------

ALL_STATS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
DIFFERENTIABLE = ("logp", "entropy", "log_sum_sq_probs", "mean_logit")
TRANSFORMS = {
    "plain": dict(),
    "temperature": dict(temperature=0.7),
    "softcap": dict(softcap=3.0, temperature=1.3),
    "softcap_scale": dict(softcap=2.0, logit_scale=0.6, temperature=0.8),
    "scale": dict(logit_scale=1.7),
}


def stat_upstreams(shape, names, seed=4):
    """A random upstream gradient per differentiable output in ``names``."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=torch.float64) for name in names}


def stats_objective(outputs, ups):
    """``sum_name sum(ups[name] * outputs[name])``: any upstream gradients of those outputs."""
    return sum((outputs[name].double() * up).sum() for name, up in ups.items())


def check_stats(got, want, names, *, rtol, atol):
    for name in names:
        if name == "is_top1":
            assert got.is_top1.dtype == torch.bool and torch.equal(got.is_top1, want["is_top1"])
        else:
            torch.testing.assert_close(getattr(got, name).double(), want[name], rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("chunk_size", [4, None])
def test_every_statistic_and_gradient_float64(transform, chunk_size):
    opts = TRANSFORMS[transform]
    h, w, b, t = make(shape=(4, 6), seed=5)
    got = linear_log_probs(h, w, t, b, return_stats=ALL_STATS, chunk_size=chunk_size, **opts)
    want = dense_token_stats(h, w, t, b, **opts)
    assert isinstance(got, leanloss.TokenStats) and got.logp.shape == t.shape
    assert got.is_top1[t == -100].logical_not().all() and got.is_top1.any()
    check_stats(got, want, DIFFERENTIABLE + ("is_top1",), rtol=1e-12, atol=1e-12)
    ups = stat_upstreams(t.shape, DIFFERENTIABLE)
    grads = torch.autograd.grad(stats_objective(got._asdict(), ups), (h, w, b))
    wants = torch.autograd.grad(stats_objective(want, ups), (h, w, b))
    for x, y in zip(grads, wants):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name", ALL_STATS)
def test_each_statistic_alone(name):
    """Only the statistic asked for is computed (the other fields are None); its gradient
    together with logp's."""
    opts = dict(softcap=2.5, temperature=0.9)
    h, w, b, t = make(seed=6)
    got = linear_log_probs(h, w, t, b, return_stats=[name], chunk_size=5, **opts)
    want = dense_token_stats(h, w, t, b, **opts)
    assert [f for f in got._fields if getattr(got, f) is not None] == ["logp", name]
    check_stats(got, want, ("logp", name), rtol=1e-12, atol=1e-12)
    ups = stat_upstreams(t.shape, [n for n in ("logp", name) if n in DIFFERENTIABLE])
    grads = torch.autograd.grad(stats_objective(got._asdict(), ups), (h, w, b))
    wants = torch.autograd.grad(stats_objective(want, ups), (h, w, b))
    for x, y in zip(grads, wants):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-11)


def test_return_entropy_adds_entropy_to_the_stats():
    h, w, b, t = make()
    got = linear_log_probs(h, w, t, b, return_entropy=True, return_stats=("mean_logit",))
    want = dense_token_stats(h, w, t, b)
    assert got.log_sum_sq_probs is None and got.is_top1 is None
    check_stats(got, want, ("logp", "entropy", "mean_logit"), rtol=1e-12, atol=1e-12)


def test_softcap_and_logit_scale_without_stats():
    """The transform alone: the return types of the default path, the dense values."""
    h, w, b, t = make()
    opts = dict(softcap=1.5, logit_scale=2.0, temperature=0.6)
    logp, ent = linear_log_probs(h, w, t, b, return_entropy=True, **opts)
    want = dense_token_stats(h, w, t, b, **opts)
    torch.testing.assert_close(logp, want["logp"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, want["entropy"], rtol=1e-12, atol=1e-12)
    logp = linear_log_probs(h, w, t, b, **opts)
    (got,) = torch.autograd.grad(logp.sum(), w)
    torch.testing.assert_close(got, torch.autograd.grad(want["logp"].sum(), w)[0], rtol=1e-10, atol=1e-11)


def tied_inputs(dtype):
    """Integer-valued inputs (exact logits in any dtype): classes 2 and 9 share the largest
    logit of rows 0-3, class 4 is the strict maximum of rows 4-5."""
    g = torch.Generator().manual_seed(9)
    h = torch.randint(1, 4, (6, 4), generator=g).to(dtype)
    w = torch.randint(-2, 3, (12, 4), generator=g).to(dtype)
    w[2] = w[9] = 6
    w[4] = 0
    w[4, 0] = 100
    h[:4, 0] = 0
    h[4:, 0] = 1
    t = torch.tensor([2, 9, 5, 2, 4, 9])
    return h.requires_grad_(), w.requires_grad_(), t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_is_top1_takes_the_first_of_tied_maxima(dtype, softcap):
    h, w, t = tied_inputs(dtype)
    got = linear_log_probs(h, w, t, return_stats=("is_top1",), softcap=softcap, temperature=0.5)
    want = dense_token_stats(h, w, t, softcap=softcap, temperature=0.5)["is_top1"]
    assert got.is_top1.tolist() == [True, False, False, True, True, False] == want.tolist()


def test_float32_statistics_and_gradients():
    opts = TRANSFORMS["softcap_scale"]
    h, w, b, t = make(shape=(3, 7), d=8, v=45, dtype=torch.float32, seed=8)
    got = linear_log_probs(h, w, t, b, return_stats=ALL_STATS, chunk_size=6, **opts)
    assert all(getattr(got, n).dtype == torch.float32 for n in DIFFERENTIABLE)
    want = dense_token_stats(h, w, t, b, **opts)
    check_stats(got, want, DIFFERENTIABLE + ("is_top1",), rtol=1e-5, atol=1e-5)
    ups = stat_upstreams(t.shape, DIFFERENTIABLE)
    grads = torch.autograd.grad(stats_objective(got._asdict(), ups), (h, w, b))
    wants = torch.autograd.grad(stats_objective(want, ups), (h, w, b))
    for x, y in zip(grads, wants):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_bfloat16_statistics_within_eager_bfloat16_error():
    """16-bit blocks read in place, several blocks: every statistic and the gradients sit as
    close to float64 as eager bfloat16 torch does (is_top1 exact wherever the logits' top two
    differ by more than bfloat16 rounds)."""
    n = 48
    h, w, b, t = bf16_head(n, seed=1)
    with torch.no_grad():  # a third of the targets are the argmax: both is_top1 values occur
        t[::3] = (h.double() @ w.double().T + b.double()).argmax(1)[::3]
    opts = dict(softcap=20.0, logit_scale=1.5, temperature=0.9)
    got = linear_log_probs(h, w, t, b, return_stats=ALL_STATS, chunk_size=16, **opts)
    ref = dense_token_stats(h, w, t, b, **opts)
    eager = dense_token_stats(h, w, t, b, dtype=torch.bfloat16, **opts)
    for name in DIFFERENTIABLE:
        err = (getattr(got, name).double() - ref[name]).abs().max()
        eager_err = (eager[name].double() - ref[name]).abs().max()
        assert err <= eager_err, f"{name}: {err} vs eager bfloat16 {eager_err}"
    with torch.no_grad():
        z = (h.double() @ w.double().T + b.double())
        others = z.scatter(1, t.clamp(min=0)[:, None], float("-inf")).amax(1)
        clear = (z.gather(1, t.clamp(min=0)[:, None])[:, 0] - others).abs() > 0.25
    assert got.is_top1[clear & ref["is_top1"]].all() and clear.sum() > n // 2
    assert torch.equal(got.is_top1[clear], ref["is_top1"][clear])
    ups = stat_upstreams(t.shape, DIFFERENTIABLE)
    grads = torch.autograd.grad(stats_objective(got._asdict(), ups), (h, w, b))
    wants = torch.autograd.grad(stats_objective(ref, ups), (h, w, b))
    eagers = torch.autograd.grad(stats_objective(eager, ups), (h, w, b))
    for x, y, e in zip(grads, wants, eagers):
        assert x.dtype == torch.bfloat16
        assert (x.double() - y).norm() <= (e.double() - y).norm()


def test_statistics_not_asked_for_are_not_computed(monkeypatch):
    """Each statistic is its own code path of the kernels: the default call runs none, and
    the gradient kernel gets no upstream for outputs that do not exist."""
    seen = {}
    for kernel in (logp_rows.LOGP_STATS_KERNEL, logp_rows.LOGP_GRAD_KERNEL):
        original = kernel.fn
        monkeypatch.setattr(kernel, "fn", lambda *a, _o=original, _k=kernel.name, **k:
                            seen.setdefault(_k, (a, k)) and _o(*a, **k))
    h, w, b, t = make()
    linear_log_probs(h, w, t, b).sum().backward()
    stats_args, stats_options = seen["log-prob statistics"]
    assert stats_args[2] is None and stats_options == dict(
        scale=1.0, softcap=None, num_classes=w.shape[0], entropy=False, log_sum_sq=False,
        mean=False, top1=False)
    grad_args, grad_options = seen["log-prob gradient"]
    assert [x is None for x in grad_args[3:]] == [True, True, False, True, True, True]
    assert grad_options == dict(scale=1.0, softcap=None, num_classes=w.shape[0])


def test_gradcheck_every_statistic():
    h, w, b, t = make(shape=(5,), d=3, v=7, ignore_frac=0.2)

    def fn(h_, w_, b_):
        out = linear_log_probs(h_, w_, t, b_, temperature=0.7, softcap=1.5, logit_scale=1.2,
                               return_stats=ALL_STATS, chunk_size=2)
        return tuple(getattr(out, name) for name in DIFFERENTIABLE)

    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_module_form_with_stats():
    h, w, b, t = make()
    module = LinearLogProbs(softcap=2.0, logit_scale=0.5, return_stats=["log_sum_sq_probs"])
    got = module(h, w, t, b)
    check_stats(got, dense_token_stats(h, w, t, b, softcap=2.0, logit_scale=0.5),
                ("logp", "log_sum_sq_probs"), rtol=1e-12, atol=1e-12)
    assert "return_stats=('log_sum_sq_probs',)" in repr(module)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"return_stats": ("entropy", "top1")}, LeanlossValueError,
         ["'return_stats'", "'top1'", "'log_sum_sq_probs'", "'mean_logit'", "'is_top1'"]),
        ({"return_stats": "entropy"}, LeanlossTypeError, ["'return_stats'", "tuple or list"]),
        ({"softcap": 0.0}, LeanlossValueError, ["'softcap'"]),
        ({"logit_scale": -2.0}, LeanlossValueError, ["'logit_scale'"]),
    ],
)
def test_stat_option_errors_name_the_argument(kwargs, error, words):
    h, w, t = torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 6, 1])
    for fn in (linear_log_probs, vocab_parallel_linear_log_probs):
        with pytest.raises(error) as info:
            fn(h, w, t, **kwargs)
        for word in words:
            assert word in str(info.value)
