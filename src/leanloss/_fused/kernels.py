"""Row-wise block kernels: one torch function per loss, compiled by inductor or run eagerly.

The elementwise math of a fused loss (row statistics, the row loss, the gradient written over
the logits block) is one plain torch function of a ``(n, V)`` block and per-row tensors.
:class:`RowKernel` runs it compiled (``torch.compile(fn, dynamic=True, fullgraph=True)``: the
16-bit block is read and overwritten in place; on CPU a kernel made with ``cpu='tiled'`` runs
on row tiles of about ``_TILE_BYTES``, near the L2 caches in size) or eagerly on row
sub-blocks of about ``_SUB_BYTES`` per float32 temporary, with the same values.

Mode ``'auto'`` (default): compiled on CUDA from the first call; on CPU only where
:meth:`RowKernel.compile_pays` (kernels made with ``cpu='compiled'`` or ``'tiled'``), tiered
like a JIT: a signature (:func:`_signature`) runs eagerly in the first loss call that meets it;
a LATER loss call (:func:`new_loss_call`) hands a copy of a few rows to one background daemon
thread that compiles it (with the switch interval lowered to ``_SWITCH_INTERVAL_S`` meanwhile,
so the caller's small eager ops do not wait for the interpreter lock), and calls run compiled
once it is ready (:func:`wait_for_compiles`). Eager wherever compiling is unavailable or does not pay.
A kernel with a native form (the cross-entropy and distillation blocks, the log-prob kernels:
:mod:`leanloss._fused.native`) runs that form on CPU in ``'auto'`` wherever it applies, instead
of either.
``'compiled'`` compiles every kernel on the calling thread (errors propagate); ``'eager'`` never
compiles (:func:`set_kernel_mode` or ``LEANLOSS_KERNELS``). A compile failure in ``'auto'`` falls
back to eager for the process, with one warning. The measurements behind this policy:
``docs/fused-losses.md`` (the row kernels).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import os
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Deque, Dict, Hashable, Iterator, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["RowKernel", "set_kernel_mode", "get_kernel_mode", "new_loss_call", "wait_for_compiles",
           "compiles_deferred", "background_compiles_submitted", "row_logsumexp", "row_softmax"]

_MODES = ("auto", "compiled", "eager")
_mode = os.environ.get("LEANLOSS_KERNELS", "auto")
# Bytes of float32 per temporary of one eager sub-block (the block rows it covers stay in cache).
_SUB_BYTES = 2 * 2**20
# Blocks with fewer elements run eagerly in 'auto' (a compiled call costs ~0.1 ms of overhead).
_MIN_COMPILED_NUMEL = 2**18
# Bytes of block (and of row arguments as wide as it) per compiled call on CPU: a few times the
# L2 cache of the cores that share the call, so the kernel's tile-sized float32 intermediates
# stay near the cores and the per-call overhead is amortized. JSD N=2048 D=1024 V=32000, two
# threads, x its four matmuls by tile size 1/2/4/8/16/32 MiB: 2-core AMX Xeon (2 MiB L2 a core)
# float32 1.23/1.17/1.16/1.12-1.14/1.12/1.14, bf16 1.61/1.45/1.36/1.35-1.37/1.39/1.77;
# 2-core AMD EPYC (1 MiB L2 a core) bf16 1.16/1.12/1.11/1.11 up to 8 MiB.
_TILE_BYTES = 8 * 2**20
_COMPILABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_compile_broken: Optional[str] = None
_RECOMPILE_LIMIT = 64
# Rows of the copy a background compile runs on, and its tile: tiles at storage offset 0 and
# beyond, none of one row (dynamo specializes sizes 0 and 1).
_WARM_ROWS, _WARM_TILE = 6, 2
# Signatures remembered per kernel (a schedule of option values makes a new one per value).
_MAX_SIGNATURES = 1024
# The interpreter's switch interval while a background compile runs (Python's default: 5 ms):
# a thread that waits for the interpreter lock gets it back after this long.
_SWITCH_INTERVAL_S = 1e-4
# Loss calls so far in this process (see new_loss_call).
_loss_calls = 0


def new_loss_call() -> None:
    """Mark the start of a loss call: in ``'auto'`` on CPU a kernel signature met again in a
    later loss call than its first is compiled in the background (the module docstring)."""
    global _loss_calls
    _loss_calls += 1


def set_kernel_mode(mode: str) -> None:
    """``'auto'`` (default), ``'compiled'`` (always compile; errors propagate) or ``'eager'``."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"set_kernel_mode: argument 'mode' must be one of {_MODES}, got {mode!r}")
    _mode = mode


def get_kernel_mode() -> str:
    return _mode


def _dynamo_disabled() -> bool:
    if os.environ.get("TORCHDYNAMO_DISABLE", "") not in ("", "0"):
        return True
    dynamo = sys.modules.get("torch._dynamo")  # maybe half imported by the compiler thread
    config = getattr(dynamo, "config", None)
    return bool(config is not None and config.disable)


def row_logsumexp(x: Tensor) -> Tensor:
    """``logsumexp`` of each row of ``x`` as an ``(n,)`` vector, shifted by the row maximum: the
    statistic the block kernels share, written as plain ops so inductor fuses it into them."""
    m = x.amax(1, keepdim=True)
    return (m + (x - m).exp().sum(1, keepdim=True).log()).squeeze(1)


def row_softmax(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(softmax(x), logsumexp(x))`` of each row (``lse`` as an ``(n, 1)`` column), with one
    exponential per element: ``e = exp(x - m)`` feeds both the row sum ``S`` and
    ``softmax = e / S``, and ``lse = m + log S``."""
    m = x.amax(1, keepdim=True)
    e = (x - m).exp()
    total = e.sum(1, keepdim=True)
    return e / total, m + total.log()


class RowKernel:
    """``fn(block, *row_args, **options) -> tuple of (n,) tensors``, compiled or eager.

    ``fn`` must be row-wise: row ``r`` of its outputs (and of ``block``, which it may overwrite
    in place) depends only on row ``r`` of ``block`` and of each tensor in ``row_args``
    (``None`` entries allowed). ``options`` are Python scalars, bools or tensors that are not
    per row (a class-weight vector, say); bools select code paths (one compiled graph each).
    ``cpu``: how mode ``'auto'`` runs it on CPU: ``'eager'``, ``'compiled'`` (tiered), or
    ``'tiled'`` (tiered, on row tiles: for kernels that read several block-wide inputs).
    ``native``: ``fn``'s values computed natively on CPU (:mod:`leanloss._fused.native`), or
    ``None`` where that does not apply; mode ``'auto'`` tries it first.
    """

    def __init__(self, fn: Callable[..., Tuple[Tensor, ...]], name: str, *, cpu: str = "eager",
                 native: Optional[Callable[..., Optional[Tuple[Tensor, ...]]]] = None) -> None:
        if cpu not in ("eager", "compiled", "tiled"):
            raise ValueError(f"RowKernel: argument 'cpu' must be 'eager', 'compiled' or 'tiled', got {cpu!r}")
        self.fn = fn
        self.name = name
        self.cpu = cpu
        self.native = native
        self._compiled: Optional[Callable] = None
        # signatures (see _signature) compiled in the background / handed to it
        self._ready: Set[Hashable] = set()
        self._queued: Set[Hashable] = set()
        # signature -> the loss call that first met it (not compiled yet)
        self._first_seen: Dict[Hashable, int] = {}
        _kernels.add(self)

    def compile_pays(self, block: Tensor) -> bool:
        """Whether the compiled form beats the eager one for ``block``'s device (in ``'auto'``):
        CUDA always; CPU as ``cpu`` says (measured: ``docs/fused-losses.md``)."""
        return block.device.type == "cuda" or self.cpu != "eager"

    def use_compiled(self, block: Tensor) -> bool:
        """Whether ``block`` goes to the compiled form (in ``'auto'`` on CPU: once it is ready)."""
        if _mode == "eager":
            return False
        if _mode == "compiled":
            return True
        return (_compile_broken is None and block.dtype in _COMPILABLE_DTYPES
                and block.device.type in ("cpu", "cuda") and block.numel() >= _MIN_COMPILED_NUMEL
                and self.compile_pays(block) and not _dynamo_disabled()
                # a Python dispatch mode (a memory or FLOP counter): dynamo would run eagerly and refuse
                and _get_current_dispatch_mode() is None)

    def __call__(self, block: Tensor, *row_args: Optional[Tensor], **options) -> Tuple[Tensor, ...]:
        _report_background_failure()
        if self.native is not None and _mode == "auto" and block.device.type == "cpu":
            out = self.native(block, *row_args, **options)
            if out is not None:
                return out
        if self.use_compiled(block) and (_mode == "compiled" or block.device.type != "cpu"
                                         or self._ready_or_queue(block, row_args, options)):
            try:
                return self._run_compiled(block, row_args, options)
            except Exception as exc:  # noqa: BLE001 -- any compile failure: fall back, once
                if _mode == "compiled":
                    raise
                _disable_compiled(exc)
                _warn_disabled(self.name)
        sub_rows = max(1, _SUB_BYTES // (4 * max(block.shape[1], 1)))  # _SUB_BYTES of float32 per temporary
        return _by_rows(self.fn, block, row_args, options, sub_rows, alias=False)

    def _ready_or_queue(self, block: Tensor, row_args: Sequence[Optional[Tensor]], options) -> bool:
        """True where this call's signature is compiled; otherwise False, and where a later loss
        call than the first meets the signature, hand a copy of a few of its rows to the
        background compiler (once per signature)."""
        state = _caller_state()
        key = _signature(block, row_args, options, state)
        with _lock:
            if key in self._ready:
                return True
            if key in self._queued or _background_off is not None:
                return False
            first = self._first_seen.setdefault(key, _loss_calls)
            if first == _loss_calls:  # the first loss call that meets it: eager, nothing more
                if len(self._first_seen) > _MAX_SIGNATURES:
                    self._first_seen.clear()
                return False
            del self._first_seen[key]
            self._queued.add(key)
        rows = block.shape[0] if block.shape[0] < 4 else (4 if block.shape[0] < _WARM_ROWS else _WARM_ROWS)
        row_copies = tuple(None if a is None else _copy_rows(a, rows) for a in row_args)
        _submit(functools.partial(self._compile_in_background, key, _copy_rows(block, rows), row_copies,
                                  dict(options), state))
        return False

    def _compile_in_background(self, key: Hashable, block: Tensor, row_args: tuple, options: Dict[str, Any],
                               state: "_State") -> None:
        """A background job: compile this kernel for one signature on a copy of a few rows of a call."""
        try:
            if _mode == "auto" and _compile_broken is None and _background_off is None:
                with _as_caller(state):
                    self._run_compiled(block, row_args, options, step=_WARM_TILE)
                with _lock:
                    if len(self._ready) >= _MAX_SIGNATURES:  # option values that never repeat
                        self._ready.clear()
                    self._ready.add(key)
        except Exception as exc:  # noqa: BLE001 -- reported by the next call, on its thread
            if _background_off is None:
                _disable_compiled(exc, report=self.name)
        finally:
            with _lock:
                self._queued.discard(key)

    def _run_compiled(self, block, row_args, options, step: Optional[int] = None):
        if self._compiled is None:  # made outside the lock: the first one imports torch._dynamo
            made = torch.compile(self.fn, dynamic=True, fullgraph=True)
            with _lock:
                if self._compiled is None:
                    self._compiled = made
        compiled = self._compiled
        if step is None:
            step = block.shape[0]
            if self.cpu == "tiled" and block.device.type == "cpu":
                # bytes per row of the block and of the row arguments as wide as it
                row_bytes = sum(t.shape[1] * t.element_size() for t in (block, *row_args)
                                if t is not None and t.dim() == 2 and t.shape[1] == block.shape[1])
                step = max(2, _TILE_BYTES // max(1, row_bytes))
        with _recompile_limit():
            return _by_rows(compiled, block, row_args, options, step, alias=True)


_State = Tuple[bool, bool, bool, torch.dtype]


def _caller_state() -> _State:
    """Thread-local state that dynamo guards on: grad mode, inference mode, CPU autocast."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"))


@contextlib.contextmanager
def _as_caller(state: _State) -> Iterator[None]:
    grad, inference, autocast, autocast_dtype = state
    with contextlib.ExitStack() as stack:
        if inference:
            stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.set_grad_enabled(grad))
        stack.enter_context(torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast))
        yield


def _tensor_class(t: Tensor) -> tuple:
    """What a dynamic-shape graph specializes a tensor on: dtype, device, autograd, and each
    size and stride as 0, 1 or more."""
    return (t.dtype, t.device, t.requires_grad, tuple(min(s, 2) for s in t.shape),
            tuple(min(abs(s), 2) for s in t.stride()))


def _copy_rows(t: Tensor, rows: int) -> Tensor:
    """The first ``rows`` rows of ``t`` as a tensor of their own with the same stride classes
    (a broadcast dimension, stride 0, stays one), so the graph compiled on it is the call's."""
    part = t[:rows]
    distinct = part[tuple(slice(0, 1) if st == 0 else slice(None) for st in part.stride())]
    return distinct.clone(memory_format=torch.preserve_format).expand(part.shape)


def _signature(block: Tensor, row_args: Sequence[Optional[Tensor]], options: Dict[str, Any],
               state: _State) -> Hashable:
    """One compiled graph's worth of calls (conservatively: option values count exactly)."""
    def option(v: Any) -> Hashable:
        return _tensor_class(v) if isinstance(v, Tensor) else (type(v).__name__, v)

    return (_tensor_class(block), tuple(None if a is None else _tensor_class(a) for a in row_args),
            tuple(sorted((k, option(v)) for k, v in options.items())), state)


# The background compiler: one daemon thread, one job at a time.
_kernels: "weakref.WeakSet[RowKernel]" = weakref.WeakSet()  # every live kernel, for compiles_deferred
_lock = threading.Lock()
_changed = threading.Condition(_lock)
_jobs: Deque[Callable[[], None]] = collections.deque()
_worker: Optional[threading.Thread] = None
_running = 0  # jobs taken by the worker and not finished
# why no job is started any more: the process exits, or it was forked while a job ran
_background_off: Optional[str] = None
_unreported: Optional[str] = None  # a kernel whose background compile failed, to warn about
_submitted = 0  # background compile jobs submitted in this process


def _submit(job: Callable[[], None]) -> None:
    global _worker, _submitted
    with _lock:
        _submitted += 1
        _jobs.append(job)
        if _worker is None:
            _worker = threading.Thread(target=_work, name="leanloss-compile", daemon=True)
            _worker.start()
        _changed.notify_all()


def _work() -> None:
    global _running
    while True:
        with _lock:
            while not _jobs:
                _changed.wait()
            job = _jobs.popleft()
            _running += 1
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, _SWITCH_INTERVAL_S))
        try:
            job()
        finally:
            sys.setswitchinterval(interval)
            with _lock:
                _running -= 1
                _changed.notify_all()


def compiles_deferred() -> bool:
    """Whether some kernel signature waits for a later loss call to be compiled (see the module
    docstring): one more call of the same loss would start its background compile."""
    with _lock:
        return any(kernel._first_seen for kernel in _kernels)


def background_compiles_submitted() -> int:
    """How many row-kernel signatures this process has handed to the background compiler."""
    return _submitted


def wait_for_compiles(timeout: Optional[float] = None) -> bool:
    """Wait until the background compiler has nothing left to do (benchmarks, tests). Returns
    False if ``timeout`` seconds passed first."""
    with _lock:
        return _changed.wait_for(lambda: not _jobs and not _running, timeout)


def _stop_background(reason: str) -> None:
    global _background_off
    _background_off = reason
    with _lock:
        _jobs.clear()


def _after_fork_in_child() -> None:
    """The worker thread does not exist in a forked child: start afresh, but if it was
    compiling, dynamo's compile lock may be held for good, so compile nothing more here."""
    global _lock, _changed, _worker, _running
    busy = _worker is not None and (_running > 0 or bool(_jobs))
    _lock = threading.Lock()
    _changed = threading.Condition(_lock)
    _jobs.clear()
    _worker, _running = None, 0
    if busy:
        _stop_background("forked while compiling")


atexit.register(_stop_background, "exiting")
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_limit_users = 0
_limit_saved: Any = None


@contextlib.contextmanager
def _recompile_limit() -> Iterator[None]:
    """Each combination of options that selects a code path (a class weight or none, label
    smoothing or none, ...) and dtype is one graph: allow more of them than dynamo's default
    while a row kernel runs compiled. Counted, so the calling and the background thread can
    overlap and the last one out restores the user's value."""
    global _limit_users, _limit_saved
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    with _lock:
        if _limit_users == 0:
            _limit_saved = getattr(config, name)
            setattr(config, name, max(_limit_saved, _RECOMPILE_LIMIT))
        _limit_users += 1
    try:
        yield
    finally:
        with _lock:
            _limit_users -= 1
            if _limit_users == 0:
                setattr(config, name, _limit_saved)


def _by_rows(fn: Callable, block: Tensor, row_args: Sequence[Optional[Tensor]], options, step: int,
             *, alias: bool) -> Tuple[Tensor, ...]:
    """``fn`` on row sub-blocks of at most ``step`` rows (evened out, so the last is not a sliver
    that a compiled function would specialize for), its per-row outputs concatenated;
    ``alias``: pass each sub-block and row argument as a plain tensor (:func:`_plain_alias`)."""
    def plain(t: Optional[Tensor]) -> Optional[Tensor]:
        return t if t is None or not alias else _plain_alias(t)

    n = block.shape[0]
    if n <= step:
        return fn(plain(block), *(plain(a) for a in row_args), **options)
    step = -(-n // -(-n // step))
    parts = []
    for start in range(0, n, step):
        sub = slice(start, min(start + step, n))
        parts.append(fn(plain(block[sub]), *(None if a is None else plain(a[sub]) for a in row_args), **options))
    return tuple(torch.cat(column) for column in zip(*parts))


def _plain_alias(t: Tensor) -> Tensor:
    """``t``'s memory as a tensor that is not a view: dynamo guards a view on its base (a
    mutated one on the base's size, which would recompile for the last, shorter block of every
    pass), so a view and a whole tensor would be two graphs."""
    if t._base is None:
        return t
    with torch.no_grad():
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _disable_compiled(exc: BaseException, *, report: Optional[str] = None) -> None:
    """Run eagerly from now on; ``report``: the kernel to warn about on the next call (the
    failure happened on the background thread)."""
    global _compile_broken, _unreported
    _compile_broken = f"{type(exc).__name__}: {exc}"
    if report is not None:
        _unreported = report


def _report_background_failure() -> None:
    global _unreported
    if _unreported is not None:
        name, _unreported = _unreported, None
        _warn_disabled(name, stacklevel=4)


def _warn_disabled(name: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"leanloss: compiling the {name} block kernel failed ({(_compile_broken or '')[:300]}); "
        "running the same math eagerly from now on (slower in bfloat16/float16). Set "
        "LEANLOSS_KERNELS=eager to skip the attempt.", RuntimeWarning, stacklevel=stacklevel)
