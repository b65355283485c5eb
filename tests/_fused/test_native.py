"""Native row kernels (leanloss._fused.native): the C form of the distillation block computes
the torch form's values, is used only where it applies, and its absence changes nothing."""
from __future__ import annotations

import itertools
import shutil

import pytest
import torch

import leanloss
from leanloss._fused import kernels, native
from leanloss._fused.distill_rows import DISTILL_KERNEL, distill_block
from leanloss._fused.kernels import RowKernel

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture
def lib():
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        pytest.skip("no C compiler on this machine: the native kernels cannot be built")
    if not native._supported():
        pytest.skip("the native kernels are built on Linux x86-64 only")
    got = native.library()
    assert got is not None, native.status()
    return got


def _block(n, v, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype)


def _torch_form(a, b, a_y, g, **options):
    before = kernels.get_kernel_mode()
    kernels.set_kernel_mode("eager")
    try:
        out = a.clone()
        (loss,) = distill_block(out, b, a_y, g, dtype=F32, **options)
    finally:
        kernels.set_kernel_mode(before)
    return loss, out


def _assert_grad_close(got, want):
    """float32: to the rounding of terms as large as the largest; 16-bit: one unit in the last place."""
    scale = want.float().abs().max().item()
    if got.dtype == F32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6 * scale)


@pytest.mark.parametrize("a_dtype,b_dtype", [(F32, F32), (BF16, BF16), (F32, BF16), (BF16, F32)])
@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
@pytest.mark.parametrize("hard,temperature,grad", [(False, 1.0, True), (True, 1.0, True), (False, 2.0, True),
                                                   (True, 1.0, False)])
def test_native_equals_torch_form(lib, a_dtype, b_dtype, kind, beta, hard, temperature, grad):
    n, v = 7, 301
    a, b = _block(n, v, a_dtype, seed=1), _block(n, v, b_dtype, seed=2)
    a_y = a[:, 5].float() if hard else None
    g = torch.rand(n) if grad else None
    options = dict(kind=kind, beta=beta, temperature=temperature, hard_weight=0.3 if hard else 0.0)
    want_loss, want = _torch_form(a, b, a_y, g, **options)
    got = a.clone()
    result = native.distill(got, b, a_y, g, dtype=F32, **options)
    assert result is not None
    torch.testing.assert_close(result[0], want_loss, rtol=2e-6, atol=2e-6)
    if grad:
        _assert_grad_close(got, want)
    else:
        assert torch.equal(got, a)  # without an upstream gradient the block is left as it was


def test_rows_split_over_threads(lib):
    """Several threads share the rows (an odd count); each row's result is the one-thread one."""
    n, v = 37, 4096
    a, b = _block(n, v, BF16, seed=3), _block(n, v, BF16, seed=4)
    g = torch.rand(n)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            z = a.clone()
            outs.append((native.distill(z, b, None, g, kind="jsd", beta=0.5, temperature=1.0, hard_weight=0.0,
                                        dtype=F32)[0], z))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype,bound", [(BF16, 1.01), (F32, 2.0)])
def test_gradient_error_against_float64(lib, dtype, bound):
    """Against float64 on the same logits, the native gradient is as accurate as the torch
    form's: in bfloat16 both round the float32 result once; in float32 both are a few roundings
    off where the JSD's terms cancel (ratios 0.8-1.5 measured over betas and seeds)."""
    n, v = 64, 2000
    a, b = _block(n, v, dtype, seed=5), _block(n, v, dtype, seed=6)
    g = torch.full((n,), 1.0 / n)
    x = a.double().requires_grad_()
    q, p = x.log_softmax(1), b.double().log_softmax(1)
    m = torch.logsumexp(torch.stack([q, p]), 0) - torch.tensor(2.0, dtype=torch.float64).log()
    jsd = 0.5 * (p.exp() * (p - m)).sum(1) + 0.5 * (q.exp() * (q - m)).sum(1)
    (exact,) = torch.autograd.grad((jsd * g.double()).sum(), x)
    options = dict(kind="jsd", beta=0.5, temperature=1.0, hard_weight=0.0)
    _, torch_form = _torch_form(a, b, None, g, **options)
    got = a.clone()
    native.distill(got, b, None, g, dtype=F32, **options)
    err_native = (got.double() - exact).abs().max().item()
    err_torch = (torch_form.double() - exact).abs().max().item()
    assert err_native <= bound * err_torch, (err_native, err_torch)
    assert err_native < (2**-8 if dtype == BF16 else 1e-5) * exact.abs().max().item()


@pytest.mark.parametrize("case", ["float16", "float64", "no teacher", "hard term at T=2", "strided", "grad mode"])
def test_does_not_apply(lib, case):
    n, v = 4, 64
    a, b = _block(n, v, F32), _block(n, v, F32, seed=1)
    a_y, temperature = None, 1.0
    if case == "float16":
        a, b = a.half(), b.half()
    elif case == "float64":
        a, b = a.double(), b.double()
    elif case == "no teacher":
        b = None
    elif case == "hard term at T=2":
        a_y, temperature = a[:, 0].clone(), 2.0
    elif case == "strided":
        a = _block(n, 2 * v, F32)[:, ::2]
    elif case == "grad mode":
        a.requires_grad_()
    assert native.distill(a, b, a_y, None, kind="jsd", beta=0.5, temperature=temperature, hard_weight=0.5,
                          dtype=F32) is None


def test_row_kernel_tries_native_in_auto_mode_only():
    calls = []

    def torch_form(block):
        return (block.sum(1),)

    def native_form(block):
        calls.append(kernels.get_kernel_mode())
        return (block.sum(1) + 1,)

    kernel = RowKernel(torch_form, "test", native=native_form)
    block = torch.ones(3, 4)
    before = kernels.get_kernel_mode()
    try:
        outs = {}
        for mode in ("auto", "eager", "compiled"):
            kernels.set_kernel_mode(mode)
            outs[mode] = kernel(block)[0]
    finally:
        kernels.set_kernel_mode(before)
    assert calls == ["auto"]
    assert outs["auto"].tolist() == [5.0] * 3 and outs["eager"].tolist() == [4.0] * 3
    # a native form that does not apply (None) leaves the call to the torch form
    assert RowKernel(torch_form, "test", native=lambda block: None)(block)[0].tolist() == [4.0] * 3


@pytest.fixture
def fresh_build(monkeypatch):
    """The module as in a process that has not built the library yet."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_state", "not built")
    return monkeypatch


def test_build_failure_leaves_the_torch_form(fresh_build, tmp_path):
    fresh_build.setenv("LEANLOSS_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'no compiling today' >&2\nexit 3\n")
    broken.chmod(0o755)
    fresh_build.setenv("CC", str(broken))
    h, w = torch.randn(6, 8), torch.randn(50, 8, requires_grad=True)
    ht, wt = torch.randn(6, 8), torch.randn(50, 8)
    loss = leanloss.linear_distill_loss(h, w, ht, wt, kind="jsd")
    assert native.status().startswith("failed:") and "exited with 3" in native.status()
    assert "no compiling today" in native.status()
    assert native.library() is None  # tried once per process
    kernels.set_kernel_mode("eager")
    try:
        torch.testing.assert_close(loss, leanloss.linear_distill_loss(h, w, ht, wt, kind="jsd"))
    finally:
        kernels.set_kernel_mode("auto")


def test_no_compiler(fresh_build):
    fresh_build.delenv("CC", raising=False)
    fresh_build.setattr(native.shutil, "which", lambda name: None)
    assert native.library() is None
    assert native.status() == "failed: no C compiler (cc, gcc or clang) on PATH"


def test_switched_off(lib, monkeypatch):
    """Off even after the library was built."""
    monkeypatch.setenv("LEANLOSS_NATIVE", "0")
    assert native.status() == "off" and native.library() is None
    a, b = _block(3, 40, F32), _block(3, 40, F32, seed=1)
    assert native.distill(a, b, None, None, kind="jsd", beta=0.5, temperature=1.0, hard_weight=0.0, dtype=F32) is None


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fused_loss_with_and_without_native(lib, dtype):
    """linear_distill_loss in 'auto' (native) equals the eager torch form, value and gradients."""
    torch.manual_seed(0)
    h = (torch.randn(40, 16) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(600, 16) * 0.3).to(dtype).requires_grad_()
    ht, wt = (torch.randn(40, 16) * 0.5).to(dtype), (torch.randn(600, 16) * 0.3).to(dtype)
    target = torch.randint(0, 600, (40,))
    runs = []
    for mode in ("auto", "eager"):
        kernels.set_kernel_mode(mode)
        try:
            loss = leanloss.linear_distill_loss(h, w, ht, wt, target, kind="jsd", beta=0.3, hard_weight=0.2)
            runs.append((loss, *torch.autograd.grad(loss, (h, w))))
        finally:
            kernels.set_kernel_mode("auto")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == F32 else dict(rtol=2e-2, atol=1e-4)
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, **tol)
    assert DISTILL_KERNEL.native is native.distill


# ---- log-probabilities ------------------------------------------------------------------------

def _logp_block(dtype):
    """Rows with a masked class (-inf), and maxima tied with the target before and after it."""
    z = _block(6, 257, F32, scale=2.0, seed=7)
    t = torch.tensor([3, 100, 0, 256, 50, 7])
    z[0, 10] = float("-inf")
    z[1, 5] = z[1, 100] = z[1].max() + 1.0  # a tie before the target: not top-1
    z[2, 0] = z[2, 9] = z[2].max() + 1.0  # the target is the first of two maxima: top-1
    z[3, 256] = z[3].max() + 1.0  # the last class
    return z.to(dtype), t


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("scale", [1.0, 0.7])
@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)))  # each sum compiles apart
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_logp_statistics_equal_torch_form(lib, dtype, scale, flags, softcap):
    from leanloss._fused.logp_rows import _stats_natively, logp_stats_block

    z, t = _logp_block(dtype)
    x_t = z.float().gather(1, t[:, None]).squeeze(1)
    entropy, log_sum_sq, mean, top1 = flags
    options = dict(scale=scale, softcap=softcap, num_classes=z.shape[1], entropy=entropy, log_sum_sq=log_sum_sq,
                   mean=mean, top1=top1)
    want = logp_stats_block(z, x_t, t, **options)
    got = _stats_natively(z, x_t, t, **options)
    assert got is not None and len(got) == len(want) == 2 + sum(flags)
    for g, w in zip(got, want):
        if w.dtype == torch.bool:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)
    if top1:
        assert got[-1].tolist() == [False, False, True, True, False, False]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("terms", ["logp", "entropy", "all"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_logp_gradient_equals_torch_form(lib, dtype, terms, softcap):
    from leanloss._fused.logp_rows import _grad_natively, logp_grad_block

    z, t = _logp_block(dtype)
    n, v = z.shape
    y = z.float() * 0.7
    lse = torch.logsumexp(y, 1)
    p = (y - lse[:, None]).exp()
    ent = -torch.where(p > 0, p * (y - lse[:, None]), torch.zeros_like(p)).sum(1)
    log_sum_sq = (p * p).sum(1).log()
    x_t = z.float().gather(1, t[:, None]).squeeze(1)
    up = lambda seed: torch.randn(n, generator=torch.Generator().manual_seed(seed))
    b = up(2) if terms != "logp" else None
    g, k = (up(3), up(4)) if terms == "all" else (None, None)
    args = (x_t, lse, ent, log_sum_sq, up(1), b, g, k)
    options = dict(scale=0.7, softcap=softcap, num_classes=v)
    want_block = z.clone()
    want = logp_grad_block(want_block, *args, **options)
    got_block = z.clone()
    got = _grad_natively(got_block, *args, **options)
    assert got is not None
    for gt, w in zip(got, want):
        torch.testing.assert_close(gt, w)
    _assert_grad_close(got_block, want_block)
    if softcap is not None:  # the masked class's logit is -softcap there: no longer masked
        return
    # the masked class: 0, but for the mean logit's k / V (which counts every class)
    assert got_block[0, 10].item() == (0.0 if k is None else pytest.approx(0.7 * k[0].item() / v, rel=1e-2))


@pytest.mark.parametrize("case", ["float64", "float16", "scale 0"])
def test_logp_does_not_apply(lib, case):
    from leanloss._fused.logp_rows import _grad_natively, _stats_natively

    z, t = _logp_block(F32)
    scale, softcap = (0.0 if case == "scale 0" else 1.0), None
    if case in ("float64", "float16"):
        z = z.to(getattr(torch, case))
    dtype = torch.float64 if case == "float64" else F32
    x_t = z.to(dtype).gather(1, t[:, None]).squeeze(1)
    stats = dict(scale=scale, softcap=softcap, num_classes=z.shape[1])
    assert _stats_natively(z, x_t, t, entropy=True, log_sum_sq=False, mean=False, top1=False, **stats) is None
    rows = torch.zeros(z.shape[0], dtype=dtype)
    assert _grad_natively(z, x_t, rows, rows, None, rows + 1, rows, None, None, **stats) is None


def test_built_library_is_cached(fresh_build, tmp_path):
    """A later process loads the cached library instead of compiling again; an unwritable cache
    leaves a build of the process's own."""
    fresh_build.setenv("LEANLOSS_CACHE_DIR", str(tmp_path))
    assert native.library() is not None
    assert [p.name.startswith("native_rows-") for p in (tmp_path / "native").iterdir()] == [True]

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled although the library was cached")

    fresh_build.setattr(native, "_lib", None)
    fresh_build.setattr(native, "_state", "not built")
    fresh_build.setattr(native.subprocess, "run", no_compiling)
    assert native.library() is not None and native.status() == "ready"


def test_fallback_build_is_cached_and_reused(fresh_build, tmp_path):
    """A compiler without OpenMP builds the fallback flags; a later process loads that build
    without trying (and failing) the preferred flags again."""
    real = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if real is None:
        pytest.skip("no C compiler on this machine")
    fresh_build.setenv("LEANLOSS_CACHE_DIR", str(tmp_path / "cache"))
    no_openmp = tmp_path / "cc"
    no_openmp.write_text("#!/bin/sh\n"
                         'for a in "$@"; do [ "$a" = -fopenmp ] && { echo "no OpenMP" >&2; exit 1; }; done\n'
                         f'exec {real} "$@"\n')
    no_openmp.chmod(0o755)
    fresh_build.setenv("CC", str(no_openmp))
    calls = []
    run = native.subprocess.run
    fresh_build.setattr(native.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or run(cmd, **kw))
    assert native.library() is not None and native.status() == "ready"
    assert ["-fopenmp" in cmd for cmd in calls] == [True, False]

    fresh_build.setattr(native, "_lib", None)
    fresh_build.setattr(native, "_state", "not built")
    calls.clear()
    assert native.library() is not None and native.status() == "ready"
    assert calls == []


def test_unwritable_cache(fresh_build, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    fresh_build.setenv("LEANLOSS_CACHE_DIR", str(blocked))  # a file: no folder can be made under it
    assert native._cache_dir() is None
    assert native.library() is not None and native.status() == "ready"


def test_softcap_tanh_is_within_two_ulp(lib):
    """The softcap's tanh (native_rows.c: tanh_inline), read off the row maxima of one-class
    rows: within 2 units in the last place of float64's tanh, odd, saturating to +-1 and
    keeping a NaN."""
    x = torch.cat([torch.linspace(-12.0, 12.0, 200001), torch.logspace(-30, 1, 3001),
                   -torch.logspace(-30, 1, 3001), torch.tensor([0.0, -0.0, 0.625, -0.625, 9.0, 20.0, 50.0, 1e30])])
    m, _, _ = native.logp_sums(x[:, None].contiguous(), 1.0, None, entropy=False, log_sum_sq=False, mean=False,
                               softcap=1.0)
    want = x.double().tanh()
    _, exponent = torch.frexp(want.float())  # want = mantissa 2^exponent, mantissa in [1/2, 1)
    ulp = torch.ldexp(torch.ones_like(want), (exponent - 24).double())  # float32's unit at want
    ulps = (m.double() - want).abs() / ulp
    assert ulps.max().item() <= 2.0, x[ulps.argmax()].item()
    assert torch.equal(m[x < 0], -native.logp_sums((-x[x < 0])[:, None].contiguous(), 1.0, None, entropy=False,
                                                   log_sum_sq=False, mean=False, softcap=1.0)[0])
    special, (s,), _ = native.logp_sums(torch.tensor([[float("inf")], [float("-inf")], [float("nan")]]), 1.0,
                                        None, entropy=False, log_sum_sq=False, mean=False, softcap=1.0)
    assert special[:2].tolist() == [1.0, -1.0] and s[2].isnan()  # (the maxima pass over a NaN; the sums do not)


# ---- cross entropy ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("smoothing,z_loss,scale", [(0.0, 0.0, 1.0), (0.1, 0.0, 1.0), (0.0, 1e-3, 0.7),
                                                    (0.2, 1e-2, 0.7)])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_cross_entropy_equals_torch_form(lib, dtype, smoothing, z_loss, scale, grad, softcap):
    from leanloss._fused.ce_rows import _ce_natively, ce_block

    z, t = _logp_block(dtype)
    x_t = z.float().gather(1, t[:, None]).squeeze(1)
    g = torch.rand(z.shape[0]) if grad else None
    options = dict(class_weight=None, scale=scale, softcap=softcap, smoothing=smoothing, num_classes=z.shape[1],
                   w_total=float(z.shape[1]), z_loss=z_loss)
    want_block, got_block = z.clone(), z.clone()
    want = ce_block(want_block, x_t, None, g, **options)
    got = _ce_natively(got_block, x_t, None, g, **options)
    assert got is not None and len(got) == len(want) == (4 if grad else 2)
    for gt, w in zip(got, want):
        torch.testing.assert_close(gt, w, rtol=2e-6, atol=2e-6)
    if grad:
        _assert_grad_close(got_block, want_block)
    else:
        assert torch.equal(got_block, z)


@pytest.mark.parametrize("case", ["softcap inf", "class weight", "one class", "float64"])
def test_cross_entropy_does_not_apply(lib, case):
    from leanloss._fused.ce_rows import _ce_natively

    z, t = _logp_block(F32)
    if case == "one class":
        z, t = z[:, :1].contiguous(), torch.zeros_like(t)
    if case == "float64":
        z = z.double()
    x_t = z.gather(1, t[:, None]).squeeze(1).to(torch.float64 if case == "float64" else F32)
    options = dict(class_weight=torch.ones(z.shape[1]) if case == "class weight" else None, scale=1.0,
                   softcap=float("inf") if case == "softcap inf" else None, smoothing=0.0, num_classes=z.shape[1],
                   w_total=float(z.shape[1]), z_loss=0.0)
    assert _ce_natively(z, x_t, None, torch.ones(z.shape[0]), **options) is None


@pytest.mark.parametrize("system,machine", [("Linux", "aarch64"), ("Darwin", "x86_64"), ("Windows", "AMD64")])
def test_other_platforms_keep_the_torch_form(fresh_build, system, machine):
    """The kernels are measured against inductor's code on Linux x86-64 only: not built elsewhere."""
    fresh_build.setattr(native.platform, "system", lambda: system)
    fresh_build.setattr(native.platform, "machine", lambda: machine)
    assert native.library() is None
    assert native.status() == f"failed: built only on Linux x86-64 (this is {system} {machine})"
