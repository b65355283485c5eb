"""Native CPU row kernels: ``native_rows.c``, built at run time with the system C compiler.

On CPU the elementwise work of the distillation and log-prob kernels is what a step spends
beyond its matmuls. Inductor's code for the JSD makes six passes with tile-sized float32
buffers; ``native_rows.c`` reads each row from memory once (prefetching ahead), keeps it in
cache for its other passes, computes exp and log inline, and splits the rows over torch's
OpenMP threads. It computes the values of
:func:`~leanloss._fused.distill_rows.distill_block` and of the log-prob kernels' sums and
gradient (:mod:`leanloss._fused.logp_rows`), which cross entropy's block shares
(:mod:`leanloss._fused.ce_rows`), for float32 and bfloat16 blocks; the tests hold it to the
torch forms.

The library is built the first time a kernel asks for it (``cc -O3 -march=native``, about
1.2 s; ``CC`` in the environment names another compiler) into a cache that later processes
load from (``$LEANLOSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/leanloss`` or ``~/.cache/leanloss``;
keyed by the source, the build command, the compiler and the CPU). Where it cannot be built (no
compiler, a build error, a platform other than Linux x86-64, where it is not measured:
:func:`status` says why) the torch form runs. ``LEANLOSS_NATIVE=0``
turns it off; kernel modes other than ``'auto'`` never use it.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["distill", "logp_sums", "logp_grad", "library", "status"]

_SOURCE = Path(__file__).with_name("native_rows.c")
_KINDS = {"forward": 0, "reverse": 1, "jsd": 2}
_DTYPES = (torch.float32, torch.bfloat16)
# Blocks with fewer elements run on the calling thread only.
_MIN_THREADED_NUMEL = 2**16

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_state = "not built"  # -> "ready" | "failed: <why>"


def _enabled() -> bool:
    return os.environ.get("LEANLOSS_NATIVE", "1") not in ("0", "")


def status() -> str:
    """``'ready'``, ``'not built'`` (not asked for yet), ``'off'`` (``LEANLOSS_NATIVE=0``) or
    ``'failed: <why>'``."""
    return "off" if not _enabled() else _state


def library() -> Optional[ctypes.CDLL]:
    """The loaded library (built on the first call), or None: it failed to build, or it is off."""
    global _lib, _state
    if not _enabled():
        return None
    if _lib is not None:
        return _lib
    with _lock:
        if _state == "not built":
            _lib, _state = _build()
    return _lib


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a build on another thread of the parent does not exist here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _build_flags() -> List[List[str]]:
    """The build's flags, tuned for this CPU first, then plain (a compiler without ``-march=native``)."""
    base = ["-O3", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-fno-trapping-math"]
    tuned = ["-march=native", "-mprefer-vector-width=512"]  # AVX-512 where the CPU has it
    # -fopenmp: rows on torch's OpenMP threads (native_rows.c: split_rows); else pthreads
    return [base + ["-fopenmp"] + tuned, base + ["-fopenmp-simd"] + tuned, base + ["-fopenmp-simd"]]


def _cache_dir() -> Optional[Path]:
    """Where built libraries are kept (created), or None where it cannot be."""
    root = os.environ.get("LEANLOSS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "leanloss")
    folder = Path(root) / "native"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def _machine() -> str:
    """What ``-march=native`` builds for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as info:
            return "".join(line for line in info.read().split("\n\n")[0].splitlines(True)
                           if line.startswith(("model name", "flags", "Features", "CPU part")))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _supported() -> bool:
    """Linux on x86-64: where the kernels are measured against inductor's code (and torch's
    threads are libgomp's, which the OpenMP build shares). Elsewhere the torch forms run."""
    return platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")


def _build() -> Tuple[Optional[ctypes.CDLL], str]:
    """Load the cached library, or compile ``native_rows.c`` (into the cache, or a temporary
    folder removed at exit) and load it."""
    if not _supported():
        return None, f"failed: built only on Linux x86-64 (this is {platform.system()} {platform.machine()})"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "failed: no C compiler (cc, gcc or clang) on PATH"
    try:
        source = _SOURCE.read_bytes()
        compiler = shutil.which(cc) or cc
        compiler_id = f"{os.path.realpath(compiler)} {os.stat(compiler).st_mtime_ns}" if os.path.exists(compiler) else cc
        cache = _cache_dir()
        builds = [(flags, "native_rows-" + hashlib.sha256(b"\0".join(
            [source, " ".join(flags).encode(), compiler_id.encode(), _machine().encode()])).hexdigest()[:24] + ".so")
            for flags in _build_flags()]
        # a cached build of any flag set, so that a process after a fallback build does not
        # retry (and fail) the preferred flags first
        if cache is not None:
            for _, name in builds:
                if (cache / name).exists():
                    return _load(cache / name), "ready"
        folder = Path(tempfile.mkdtemp(prefix="leanloss-native-", dir=cache))  # beside the cache: atomic rename
        atexit.register(shutil.rmtree, folder, True)
        for flags, name in builds:
            done = subprocess.run([cc, *flags, str(_SOURCE), "-o", str(folder / name), "-lm"], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode == 0:
                if cache is None:
                    return _load(folder / name), "ready"
                os.replace(folder / name, cache / name)
                shutil.rmtree(folder, True)
                return _load(cache / name), "ready"
        return None, f"failed: {cc} exited with {done.returncode}: {done.stderr.strip()[-300:]}"
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:  # AttributeError: a symbol missing
        return None, f"failed: {type(exc).__name__}: {exc}"


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    ptr, long, f32, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    for name, args in (("leanloss_distill", [ptr] * 5 + [long] * 2 + [i32] + [f32] * 3 + [i32] * 3),
                       ("leanloss_logp_sums", [ptr] * 2 + [long] * 2 + [f32] * 2 + [i32] + [ptr] * 7 + [i32] * 2),
                       ("leanloss_logp_grad", [ptr] + [long] * 2 + [f32] * 4 + [ptr] * 5 + [i32] * 2)):
        getattr(lib, name).restype = i32
        getattr(lib, name).argtypes = args
    return lib


def _is_plain(t: Optional[Tensor], dtypes=_DTYPES) -> bool:
    return (t is not None and type(t) is Tensor and t.device.type == "cpu" and t.dtype in dtypes
            and t.is_contiguous() and not t.requires_grad)


def _pointer(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _threads(block: Tensor) -> int:
    return torch.get_num_threads() if block.numel() >= _MIN_THREADED_NUMEL else 1


def _is_block(z: Tensor) -> bool:
    """A non-empty plain ``(n, V)`` float32 or bfloat16 CPU block, outside any dispatch mode."""
    return z.numel() > 0 and z.dim() == 2 and _is_plain(z) and _get_current_dispatch_mode() is None


def _row_vectors(n: int, *rows: Optional[Tensor]) -> Optional[List[Optional[Tensor]]]:
    """``rows`` as contiguous float32 ``(n,)`` vectors (``None`` kept), or ``None`` where one
    cannot be passed as such."""
    out = [None if r is None else r.to(torch.float32).contiguous() for r in rows]
    return out if all(r is None or (_is_plain(r, (torch.float32,)) and r.shape == (n,)) for r in out) else None


def distill(a: Tensor, b: Optional[Tensor], a_y: Optional[Tensor], g: Optional[Tensor], *, kind: str,
            beta: float, temperature: float, hard_weight: float, dtype: torch.dtype) -> Optional[Tuple[Tensor]]:
    """:func:`~leanloss._fused.distill_rows.distill_block` natively, or ``None`` where it does
    not apply (no library, a float16 or float64 block, no teacher, a hard term at
    ``T != 1``, a tensor subclass or dispatch mode): the caller then runs the torch form."""
    if (b is None or dtype != torch.float32 or kind not in _KINDS or not _is_block(a) or not _is_plain(b)
            or b.shape != a.shape or (a_y is not None and temperature != 1.0)):
        return None
    rows = _row_vectors(a.shape[0], a_y, g)
    lib = None if rows is None else library()
    if lib is None or rows is None:
        return None
    n, v = a.shape
    loss = torch.empty(n, dtype=torch.float32)
    failed = lib.leanloss_distill(
        _pointer(a), _pointer(b), *map(_pointer, rows), _pointer(loss), n, v, _KINDS[kind], beta,
        (1.0 - hard_weight) * temperature * temperature, hard_weight, a.dtype == torch.bfloat16,
        b.dtype == torch.bfloat16, _threads(a))
    return None if failed else (loss,)


def _logit_args(scale: float, softcap: Optional[float]) -> Optional[Tuple[float, float, float]]:
    """``(mul, cap, 1 / cap)`` of native_rows.c's ``logit_of`` for
    :func:`~leanloss._fused.ce_rows.transform`'s ``scale`` and ``softcap`` (``cap = 0``: none),
    passed as the float32 values that transform's tensor arithmetic uses; ``None`` where that
    does not apply."""
    if not scale > 0.0:
        return None
    if softcap is None:
        return scale, 0.0, 0.0
    if not 0.0 < softcap < float("inf"):
        return None
    return scale / softcap, softcap, 1.0 / softcap


def logp_sums(z: Tensor, scale: float, t: Optional[Tensor], *, entropy: bool, log_sum_sq: bool,
              mean: bool, softcap: Optional[float] = None
              ) -> Optional[Tuple[Tensor, List[Tensor], Optional[Tuple[Tensor, Tensor]]]]:
    """The log-probabilities' row statistics of the logits ``y = transform(z, scale, softcap)``
    (:func:`~leanloss._fused.ce_rows.transform`): the row maxima ``m``,
    :func:`~leanloss._fused.logp_rows.row_sums` (``[S, U?, Q?, Y?]``, the optional ones where
    asked for) and, with targets ``t``, ``(before, y_t)``: the maxima over the classes before
    each target and the target's logit, mapped by the same code as ``m`` (what
    :func:`~leanloss._fused.logp_rows.is_top1` compares); or ``None`` where it does not apply."""
    logit = _logit_args(scale, softcap)
    if (logit is None or not _is_block(z)
            or (t is not None and not (_is_plain(t, (torch.int64,)) and t.shape == (z.shape[0],)))):
        return None
    lib = library()
    if lib is None:
        return None
    n, v = z.shape
    m, s, u, q, y_sum, before, y_t = (torch.empty(n) for _ in range(7))
    asked = int(entropy) | int(log_sum_sq) << 1 | int(mean) << 2  # native_rows.c: SUM_U | SUM_Q | SUM_Y
    failed = lib.leanloss_logp_sums(_pointer(z), _pointer(t), n, v, *logit[:2], asked,
                                    *map(_pointer, (m, s, u, q, y_sum, before, y_t)), z.dtype == torch.bfloat16,
                                    _threads(z))
    if failed:
        return None
    sums = [s, *(x for x, on in ((u, entropy), (q, log_sum_sq), (y_sum, mean)) if on)]
    return m, sums, (before, y_t) if t is not None else None


def logp_grad(z: Tensor, scale: float, lse: Tensor, A: Tensor, B: Optional[Tensor], G: Optional[Tensor],
              K: Optional[Tensor], *, out_scale: Optional[float] = None, softcap: Optional[float] = None) -> bool:
    """Overwrite ``z`` with ``out_scale (p (B log p + G p + A) + K) dy/dz`` (``0`` for the part
    with ``p = 0``), ``log p = y - lse``, ``y = transform(z, scale, softcap)``, per-row
    coefficients ``(n,)`` (``None``: 0; ``out_scale``: ``scale`` unless given; ``dy/dz / scale``:
    1, or :func:`~leanloss._fused.ce_rows.softcap_slope`); returns whether it ran (False where it
    does not apply: the caller runs the torch form)."""
    logit = _logit_args(scale, softcap)
    if logit is None or not _is_block(z):
        return False
    n = z.shape[0]
    rows = _row_vectors(n, lse, A, B, G, K)
    lib = None if rows is None else library()
    if lib is None or rows is None:
        return False
    rows = [torch.zeros(n) if r is None else r for r in rows]
    return not lib.leanloss_logp_grad(_pointer(z), n, z.shape[1], *logit, scale if out_scale is None else out_scale,
                                      *map(_pointer, rows), z.dtype == torch.bfloat16, _threads(z))
