"""Row kernels (leanloss._fused.kernels): the compiled and the eager run of each block function
give the same values, and compile failures fall back to eager."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

from leanloss._fused import kernels
from leanloss._fused.kernels import RowKernel
from leanloss._fused.ce_rows import CE_KERNEL as _CE_KERNEL
from leanloss._fused.distill_rows import DISTILL_KERNEL as _DISTILL_KERNEL


@pytest.fixture
def mode():
    before = kernels.get_kernel_mode()
    yield kernels.set_kernel_mode
    kernels.set_kernel_mode(before)


def _both(mode, kernel, block, *row_args, **options):
    """(outputs, block after) of the eager run and of the compiled run on copies of ``block``."""
    runs = []
    for m in ("eager", "compiled"):
        mode(m)
        z = block.clone()
        runs.append((kernel(z, *[None if a is None else a.clone() for a in row_args], **options), z))
    return runs


def _close(a, b, dtype):
    tol = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-5)}[dtype]
    torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[1])


# Each case is one or two compiled graphs (a few seconds each): the paths, not every pairing.
@pytest.mark.parametrize("dtype, options", [
    (torch.bfloat16, dict(eps=0.0, z_loss=0.0, softcap=None, weighted=False)),
    (torch.bfloat16, dict(eps=0.1, z_loss=1e-3, softcap=None, weighted=True)),
    (torch.bfloat16, dict(eps=0.0, z_loss=0.0, softcap=20.0, weighted=False)),
    (torch.float32, dict(eps=0.1, z_loss=0.0, softcap=None, weighted=False)),
])
def test_cross_entropy_kernel_compiled_equals_eager(mode, dtype, options):
    g = torch.Generator().manual_seed(0)
    n, v = 37, 3001  # odd sizes: vector tails
    z = (torch.randn(n, v, generator=g) * 4).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    cw = torch.rand(v, generator=g) + 0.5 if options["weighted"] else None
    x_t = z.gather(1, t.unsqueeze(1)).squeeze(1).float()
    w_t = None if cw is None else cw[t]
    scale = torch.rand(n, generator=g) + 0.5
    opts = dict(class_weight=cw, scale=1.5, softcap=options["softcap"], smoothing=options["eps"], num_classes=v,
                w_total=float(v if cw is None else cw.sum()), z_loss=options["z_loss"])
    for g_ in (None, scale):
        (eager, z_eager), (comp, z_comp) = _both(mode, _CE_KERNEL, z, x_t, w_t, g_, **opts)
        for a, b in zip(eager, comp):
            _close(a, b, torch.float32)
        _close(z_comp.float(), z_eager.float(), dtype)


@pytest.mark.parametrize("kind, hard_weight, temperature", [
    ("forward", 0.3, 2.0), ("reverse", 0.0, 2.0), ("jsd", 0.3, 2.0), ("jsd", 1.0, 2.0), ("jsd", 0.3, 1.0)])
def test_distill_kernel_compiled_equals_eager(monkeypatch, mode, kind, hard_weight, temperature):
    """Compiled on CPU row tiles of 4 rows (the last one 3), eager on whole blocks."""
    g = torch.Generator().manual_seed(1)
    n, v = 19, 1501
    a = (torch.randn(n, v, generator=g) * 3).bfloat16()
    b = None if hard_weight == 1.0 else (torch.randn(n, v, generator=g) * 3).bfloat16()
    y = torch.randint(0, v, (n,), generator=g)
    a_y = None if hard_weight == 0.0 else a.gather(1, y.unsqueeze(1)).squeeze(1).float()
    scale = torch.rand(n, generator=g)
    row_bytes = 2 * v * (1 if b is None else 2)
    monkeypatch.setattr(kernels, "_TILE_BYTES", 4 * row_bytes)
    opts = dict(kind=kind, beta=0.3, temperature=temperature, hard_weight=hard_weight, dtype=torch.float32)
    (eager, a_eager), (comp, a_comp) = _both(mode, _DISTILL_KERNEL, a, b, a_y, scale, **opts)
    _close(comp[0], eager[0], torch.float32)
    _close(a_comp.float(), a_eager.float(), torch.bfloat16)


def test_eager_runs_in_row_sub_blocks(monkeypatch, mode):
    """The eager run walks row sub-blocks (here 2 rows) and joins their outputs in order."""
    seen = []

    def rowsum(block, w):
        seen.append(block.shape[0])
        out = (block * w.unsqueeze(1)).sum(1)
        block.mul_(2)
        return (out,)

    monkeypatch.setattr(kernels, "_SUB_BYTES", 4 * 10 * 2)
    mode("eager")
    block = torch.arange(50.0).reshape(5, 10)
    w = torch.arange(5.0)
    (out,) = RowKernel(rowsum, "test")(block, w)
    assert seen == [2, 2, 1]
    torch.testing.assert_close(out, torch.arange(50.0).reshape(5, 10).sum(1) * w)
    torch.testing.assert_close(block, torch.arange(50.0).reshape(5, 10) * 2)


@pytest.mark.parametrize("tiled", [True, False])
def test_compiled_runs_in_row_tiles_on_cpu(monkeypatch, mode, tiled):
    """On CPU the compiled function gets row tiles of about _TILE_BYTES of the block and of the
    row arguments as wide as it (here 2 rows of 10 float32 + 10 float32), each a plain tensor
    (not a view), and the outputs are joined in order; ``cpu='compiled'`` calls it once."""
    seen = []

    def rowsum(block, wide, w):
        seen.append((block.shape[0], block._base is None))
        out = (block * wide * w.unsqueeze(1)).sum(1)
        block.mul_(2)
        return (out,)

    monkeypatch.setattr(kernels, "_TILE_BYTES", 2 * 2 * 10 * 4)
    mode("compiled")
    kernel = RowKernel(rowsum, "test", cpu="tiled" if tiled else "compiled")
    kernel._compiled = rowsum  # stands in for torch.compile(rowsum): the tiling is under test
    base = torch.arange(60.0).reshape(6, 10)
    block = base[1:]  # a view, as the engine's blocks are
    wide = torch.full((5, 10), 0.5)
    w = torch.arange(5.0)
    (out,) = kernel(block, wide, w)
    assert seen == ([(2, True), (2, True), (1, True)] if tiled else [(5, True)])
    expected = torch.arange(10.0, 60.0).reshape(5, 10)
    torch.testing.assert_close(out, (expected * 0.5).sum(1) * w)
    torch.testing.assert_close(base[1:], expected * 2)
    torch.testing.assert_close(base[0], torch.arange(10.0))


def test_row_sub_blocks_are_evened_out():
    """9 rows in steps of at most 4 go as 3 + 3 + 3, not 4 + 4 + 1 (a 1-row tile would cost a
    compiled function a graph of its own)."""
    seen = []

    def rows(block):
        seen.append(block.shape[0])
        return (block.sum(1),)

    block = torch.arange(18.0).reshape(9, 2)
    (out,) = kernels._by_rows(rows, block, (), {}, 4, alias=True)
    assert seen == [3, 3, 3]
    torch.testing.assert_close(out, block.sum(1))


class FakeCompile:
    """Stands in for ``torch.compile``: the function it returns runs ``fn`` and records the
    thread of each call; its first call blocks until ``release()`` (a slow compile)."""

    def __init__(self, monkeypatch):
        self.compiles = 0
        self.calls = []
        self.gate = threading.Event()
        monkeypatch.setattr(torch, "compile", self)

    def __call__(self, fn, **kwargs):
        self.compiles += 1

        def compiled(*args, **kw):
            self.gate.wait(30)
            self.calls.append(threading.current_thread() is threading.main_thread())
            return fn(*args, **kw)

        return compiled

    def release(self):
        self.gate.set()


@pytest.fixture
def auto(monkeypatch, mode):
    """'auto' with compiling allowed for any block size; background work drained before (a job of
    an earlier test must not meet this test's stand-in compiler) and after."""
    assert kernels.wait_for_compiles(timeout=600)
    mode("auto")
    monkeypatch.setattr(kernels, "_MIN_COMPILED_NUMEL", 1)
    monkeypatch.setattr(kernels, "_compile_broken", None)
    monkeypatch.setattr(kernels, "_unreported", None)
    yield
    assert kernels.wait_for_compiles(timeout=60)


def _scaled_rowsum(block, w, *, factor):
    out = (block * w.unsqueeze(1)).sum(1) * factor
    block.mul_(2)
    return (out,)


def _inputs():
    return torch.arange(60.0).reshape(6, 10), torch.arange(6.0)


def _expected(factor):
    block, w = _inputs()
    return (block * w.unsqueeze(1)).sum(1) * factor, block * 2


def test_auto_compiles_a_signature_met_again_in_a_later_loss_call(monkeypatch, auto):
    """Tiered: the first loss call that meets a signature runs it eagerly and queues nothing
    (however often it calls the kernel); a later loss call queues one background compile and
    stays eager until it is ready; then calls run compiled on the calling thread."""
    fake = FakeCompile(monkeypatch)
    kernel = RowKernel(_scaled_rowsum, "test", cpu="tiled")
    kernels.new_loss_call()
    for _ in range(2):  # one loss call, two blocks: eager, nothing queued
        block, w = _inputs()
        (out,) = kernel(block, w, factor=3.0)
        torch.testing.assert_close(out, _expected(3.0)[0])
        torch.testing.assert_close(block, _expected(3.0)[1])
        assert fake.compiles == 0 and not kernel._queued and not kernel._ready
    assert kernels.compiles_deferred()
    for _ in range(2):  # later loss calls: one job, eager while it runs
        kernels.new_loss_call()
        block, w = _inputs()
        (out,) = kernel(block, w, factor=3.0)
        torch.testing.assert_close(out, _expected(3.0)[0])
        torch.testing.assert_close(block, _expected(3.0)[1])
        assert fake.calls == [] and len(kernel._queued) == 1 and not kernel._ready
    assert not kernel._first_seen
    fake.release()
    assert kernels.wait_for_compiles(timeout=30)
    assert fake.compiles == 1 and fake.calls and not any(fake.calls)  # warmed on the worker thread
    assert len(kernel._ready) == 1 and not kernel._queued
    warm_calls = len(fake.calls)
    block, w = _inputs()
    (out,) = kernel(block, w, factor=3.0)  # now compiled, on this thread
    assert len(fake.calls) > warm_calls and all(fake.calls[warm_calls:])
    torch.testing.assert_close(out, _expected(3.0)[0])
    torch.testing.assert_close(block, _expected(3.0)[1])
    before = len(fake.calls)
    block, w = _inputs()
    (out,) = kernel(block, w, factor=0.5)  # a new option value: eager again, nothing queued yet
    assert len(fake.calls) == before and len(kernel._ready) == 1 and not kernel._queued
    torch.testing.assert_close(out, _expected(0.5)[0])
    kernels.new_loss_call()
    kernel(*_inputs(), factor=0.5)
    assert kernels.wait_for_compiles(timeout=30) and len(kernel._ready) == 2


def test_background_compile_lowers_the_switch_interval_while_it_runs(monkeypatch, auto):
    """A thread waiting for the interpreter lock gets it back sooner while a job runs, and the
    caller's interval is restored after."""
    seen = []

    def compiling(fn, **kwargs):
        seen.append(sys.getswitchinterval())
        return fn

    monkeypatch.setattr(torch, "compile", compiling)
    before = sys.getswitchinterval()
    kernel = RowKernel(_scaled_rowsum, "test", cpu="tiled")
    for _ in range(2):
        kernels.new_loss_call()
        kernel(*_inputs(), factor=1.0)
    assert kernels.wait_for_compiles(timeout=30)
    assert seen == [pytest.approx(kernels._SWITCH_INTERVAL_S)] and kernels._SWITCH_INTERVAL_S < before
    assert sys.getswitchinterval() == before


def test_auto_compiles_on_cpu_only_where_it_pays(monkeypatch, auto):
    """Kernels made with ``cpu='eager'`` (the default: cross entropy, top-k, ...) run eagerly on
    CPU, no compile at all; ``'compiled'`` and ``'tiled'`` ones compile there; the option is checked."""
    fake = FakeCompile(monkeypatch)
    fake.release()
    kernel = RowKernel(_scaled_rowsum, "test")
    block, w = _inputs()
    assert not kernel.compile_pays(block)
    assert all(RowKernel(_scaled_rowsum, "t", cpu=c).compile_pays(block) for c in ("compiled", "tiled"))
    with pytest.raises(ValueError, match="argument 'cpu'"):
        RowKernel(_scaled_rowsum, "t", cpu="yes")
    (out,) = kernel(block, w, factor=1.0)
    assert kernels.wait_for_compiles(timeout=30)
    assert fake.compiles == 0 and not kernel._queued and not kernel._ready
    torch.testing.assert_close(out, _expected(1.0)[0])


@pytest.mark.parametrize("forced", ["eager", "compiled"])
def test_forced_modes_do_no_background_work(monkeypatch, auto, mode, forced):
    """'eager': never compiled; 'compiled': compiled on the calling thread at the first call."""
    fake = FakeCompile(monkeypatch)
    fake.release()
    mode(forced)
    kernel = RowKernel(_scaled_rowsum, "test")  # cpu='eager': mode 'compiled' compiles it anyway
    block, w = _inputs()
    (out,) = kernel(block, w, factor=2.0)
    assert not kernel._queued and not kernel._ready and kernels.wait_for_compiles(timeout=0)
    assert fake.calls == ([True] if forced == "compiled" else [])
    assert fake.compiles == (forced == "compiled")
    torch.testing.assert_close(out, _expected(2.0)[0])
    torch.testing.assert_close(block, _expected(2.0)[1])


def test_background_compile_of_the_distill_kernel_equals_eager(mode):
    """The real compiler on its thread: the grad mode of the caller is reproduced there, so the
    call after the handoff finds the graph ready (no compile on this thread), and its values
    are the eager ones."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(2)
    n, v = 40, 2003
    a = (torch.randn(n, v, generator=g) * 3).bfloat16()
    b = (torch.randn(n, v, generator=g) * 3).bfloat16()
    a_y, scale = torch.randn(n, generator=g), torch.rand(n, generator=g)
    opts = dict(kind="jsd", beta=0.4, temperature=1.5, hard_weight=0.25, dtype=torch.float32)
    mode("eager")
    want_a = a.clone()
    (want,) = _DISTILL_KERNEL(want_a, b, a_y, scale, **opts)
    mode("auto")
    runs = []
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "_MIN_COMPILED_NUMEL", 1)
        mp.setattr(kernels, "_compile_broken", None)
        for i in range(3):  # eager (first loss call), eager while compiling, then compiled
            kernels.new_loss_call()
            if i == 2:
                graphs = counters["stats"]["unique_graphs"]
                assert _DISTILL_KERNEL._ready
            z = a.clone()
            runs.append((_DISTILL_KERNEL(z, b, a_y, scale, **opts), z))
            assert kernels.wait_for_compiles(timeout=600)
        assert counters["stats"]["unique_graphs"] == graphs
    for (out,), z in runs:
        _close(out, want, torch.float32)
        _close(z.float(), want_a.float(), torch.bfloat16)


def test_background_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, auto):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    kernel = RowKernel(_scaled_rowsum, "test", cpu="tiled")
    outs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            kernels.new_loss_call()
            block, w = _inputs()
            outs.append(kernel(block, w, factor=1.0)[0])
            assert kernels.wait_for_compiles(timeout=30)
    assert all(torch.equal(out, _expected(1.0)[0]) for out in outs)
    assert [str(w.message).count("no C++ compiler") for w in caught] == [1]
    assert not kernel.use_compiled(_inputs()[0])
    kernels.set_kernel_mode("compiled")  # an explicit 'compiled' mode does not hide the error
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        RowKernel(lambda z: (z.sum(1),), "test")(torch.ones(3, 4))


def test_process_exits_and_forks_while_compiling(tmp_path):
    """A compile still running does not hold up the exit; a child forked meanwhile runs eagerly
    and compiles nothing."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import os, threading, torch
        from leanloss._fused import kernels
        gate = threading.Event()
        torch.compile = lambda fn, **kw: (lambda *a, **k: gate.wait() or fn(*a, **k))
        kernels._MIN_COMPILED_NUMEL = 1
        kernel = kernels.RowKernel(lambda z: (z.sum(1),), "test", cpu="tiled")
        for _ in range(2):  # the second loss call queues the compile
            kernels.new_loss_call()
            assert kernel(torch.ones(4, 3))[0].tolist() == [3.0] * 4
        kernels.new_loss_call()
        pid = os.fork()
        if pid == 0:
            ok = kernel(torch.ones(4, 2, dtype=torch.bfloat16))[0].tolist() == [2.0] * 4
            off = kernels._background_off == "forked while compiling"
            os._exit(0 if ok and off and len(kernel._queued) == 1 and not kernels._jobs else 1)
        assert os.waitpid(pid, 0)[1] == 0
        print("done")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LEANLOSS_KERNELS": "auto"})
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr


def test_auto_mode_rules(monkeypatch, mode):
    mode("auto")
    monkeypatch.setattr(kernels, "_compile_broken", None)
    k = RowKernel(lambda z: (z,), "test", cpu="tiled")
    big = torch.empty(1024, 1024)
    assert not RowKernel(lambda z: (z,), "test").use_compiled(big)  # CPU: only where it pays
    assert k.use_compiled(big)
    assert not k.use_compiled(big.double())  # float64: eager
    assert not k.use_compiled(torch.empty(4, 4))  # too small to repay a launch
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert not k.use_compiled(big)
    with pytest.raises(ValueError, match="'mode'"):
        kernels.set_kernel_mode("fast")
