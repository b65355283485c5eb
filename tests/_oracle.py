"""Shared helpers for the exactness tests: torch is the oracle.

* :data:`TOL` -- tolerances per dtype: float64 ~1e-12, float32 ~1e-6, float16/bfloat16 the
  tolerances ``torch.testing.assert_close`` uses by default for the dtype (with an absolute
  floor of the same order, since losses are O(1)).
* :func:`compare` -- run a leanloss function and its torch twin on identical copies of the
  same inputs; compare the value, its dtype and shape, and the gradient of every input that
  requires grad after a backward with a random, non-uniform upstream gradient. For float16 and
  bfloat16, torch is also run in float64 on the same (exactly upcast) inputs: leanloss, which
  accumulates in float32, must sit within the dtype's tolerance of that reference, and within
  twice that tolerance of torch's own low-precision result, plus torch's own rounding error.
* random input builders (:func:`logits`, :func:`log_probs`, :func:`index_target`, ...) drawn
  from one seeded generator per call, so every test is reproducible.
* :func:`linear_cross_entropy_reference`, :func:`linear_log_probs_reference` -- the fused
  LM-head losses on the materialized float64 logits (:func:`lm_head_logits`): torch's dense cross
  entropy plus the z-loss, and per-token log-probabilities and entropy, for the single-device
  and the vocab-parallel tests alike.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

#: (rtol, atol) per dtype
TOL: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

#: the input shapes torch documents for class-dimension losses: (C), (N,C), (N,C,d1), (N,C,d1,d2), (N,C,d1,d2,d3)
CLASS_SHAPES = ((5,), (4, 5), (3, 4, 3), (2, 3, 3, 2), (2, 3, 2, 2, 2))
SHAPE_IDS = ("C", "NC", "NCd1", "NCd1d2", "NCd1d2d3")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits(shape: Sequence[int], dtype=torch.float64, seed: int = 0, scale: float = 2.0) -> Tensor:
    """Random logits, N(0, scale^2), exactly representable in ``dtype``; a leaf requiring grad."""
    x = torch.randn(tuple(shape), generator=gen(seed), dtype=torch.float64) * scale
    return x.to(dtype).requires_grad_()


def log_probs(shape: Sequence[int], dtype=torch.float64, seed: int = 0, dim: int = 1) -> Tensor:
    """Random log-probabilities along ``dim`` (dim 0 for 1-d shapes); a leaf requiring grad."""
    dim = 0 if len(shape) == 1 else dim
    x = torch.log_softmax(torch.randn(tuple(shape), generator=gen(seed), dtype=torch.float64) * 2, dim=dim)
    return x.to(dtype).requires_grad_()


def probs(shape: Sequence[int], dtype=torch.float64, seed: int = 1, dim: int = 1, grad: bool = True) -> Tensor:
    """Random probability rows along ``dim`` (dim 0 for 1-d shapes)."""
    dim = 0 if len(shape) == 1 else dim
    p = torch.softmax(torch.randn(tuple(shape), generator=gen(seed), dtype=torch.float64) * 2, dim=dim)
    return p.to(dtype).requires_grad_(grad)


def unit(shape: Sequence[int], dtype=torch.float64, seed: int = 0, grad: bool = True, lo: float = 0.02) -> Tensor:
    """Random values in [lo, 1 - lo] (BCE probabilities / soft targets)."""
    u = torch.rand(tuple(shape), generator=gen(seed), dtype=torch.float64) * (1 - 2 * lo) + lo
    return u.to(dtype).requires_grad_(grad)


def positive(shape: Sequence[int], dtype=torch.float64, seed: int = 3, grad: bool = False) -> Tensor:
    """Random positive weights in [0.25, 2)."""
    w = torch.rand(tuple(shape), generator=gen(seed), dtype=torch.float64) * 1.75 + 0.25
    return w.to(dtype).requires_grad_(grad)


def num_classes(input_shape: Sequence[int]) -> int:
    """C of an input of shape (C) / (N, C) / (N, C, d...)."""
    return input_shape[0] if len(input_shape) == 1 else input_shape[1]


def class_weight(input_shape: Sequence[int], dtype=torch.float64) -> Tensor:
    """Random positive per-class weights (:func:`positive`) for an input of shape (C) / (N, C, ...)."""
    return positive((num_classes(input_shape),), dtype)


def index_target(input_shape: Sequence[int], seed: int = 2, ignore_index: Optional[int] = None,
                 ignore_every: int = 3) -> Tensor:
    """Class indices for an input of shape (C) / (N, C) / (N, C, d...): shape () / (N) / (N, d...).

    With ``ignore_index`` set, every ``ignore_every``-th element (flat order) is replaced by it.
    """
    shape = tuple(input_shape)
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = torch.randint(0, num_classes(shape), tshape, generator=gen(seed))
    if ignore_index is not None and t.numel():
        flat = t.view(-1)
        flat[::ignore_every] = ignore_index
    return t


def _clone(a):
    if isinstance(a, Tensor):
        return a.detach().clone().requires_grad_(a.requires_grad)
    return a


def _grad_leaves(args) -> list:
    return [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]


def upstream(out: Tensor, seed: int = 7) -> Tensor:
    """A random, non-uniform upstream gradient of ``out``'s shape and dtype (scalars too)."""
    g = torch.rand(out.shape, generator=gen(seed), dtype=torch.float64) * 1.5 + 0.25
    return g.to(out.dtype)


def _run(fn: Callable, args, kwargs, grad_seed: int):
    args = tuple(_clone(a) for a in args)
    out = fn(*args, **kwargs)
    leaves = _grad_leaves(args)
    grads = []
    if leaves and out.requires_grad:
        ins = [args[i] for i in leaves]
        grads = torch.autograd.grad(out, ins, upstream(out, grad_seed), allow_unused=True)
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(ins, grads)]
    return out, grads, leaves


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str, scale: float = 1.0) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol * scale, atol=atol * scale, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def _upcast_arg(a):
    if isinstance(a, Tensor) and a.dtype in LOW_PRECISION:
        return a.detach().double().requires_grad_(a.requires_grad)
    return a


def compare(ours: Callable, theirs: Callable, args: Sequence, kwargs: Optional[dict] = None,
            dtype: Optional[torch.dtype] = None, grad_seed: int = 7) -> Tensor:
    """Assert ``ours(*args, **kwargs)`` equals ``theirs(*args, **kwargs)`` in value and gradients.

    ``dtype`` picks the tolerance (default: the dtype of the first floating tensor argument).
    Returns leanloss's output (for extra assertions by the caller).
    """
    kwargs = dict(kwargs or {})
    if dtype is None:
        dtype = next(a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point())
    out, grads, leaves = _run(ours, args, kwargs, grad_seed)
    ref, ref_grads, _ = _run(theirs, args, kwargs, grad_seed)
    assert out.dtype == ref.dtype, f"dtype: leanloss {out.dtype} vs torch {ref.dtype}"
    assert out.shape == ref.shape, f"shape: leanloss {tuple(out.shape)} vs torch {tuple(ref.shape)}"
    assert len(grads) == len(ref_grads), "leanloss and torch disagree on which inputs get gradients"
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
    if dtype not in LOW_PRECISION:
        assert_close(out, ref, dtype, "value")
        for i, g, r in zip(leaves, grads, ref_grads):
            assert_close(g, r, dtype, f"gradient of argument {i}")
        return out
    # low precision: within the dtype's tolerance of torch in float64 on the same inputs ...
    up_args = [_upcast_arg(a) for a in args]
    up_kwargs = {k: _upcast_arg(v) for k, v in kwargs.items()}
    ref64, ref64_grads, _ = _run(theirs, up_args, up_kwargs, grad_seed)
    # the float64 reference rounded to the result's dtype: the best answer that dtype can hold
    # (e.g. torch's BCE gradient 1e12 at x = 0 is inf in float16)
    ref64 = ref64.to(out.dtype)
    ref64_grads = [r.to(g.dtype) for g, r in zip(grads, ref64_grads)]
    assert_close(out, ref64, dtype, "value vs torch float64")
    for i, g, r in zip(leaves, grads, ref64_grads):
        assert_close(g, r, dtype, f"gradient of argument {i} vs torch float64")
    # ... and as close to torch's own low-precision result as torch's own rounding error allows
    _assert_near_low_precision(out, ref, ref64, dtype, "value vs torch (same dtype)")
    for i, g, r, r64 in zip(leaves, grads, ref_grads, ref64_grads):
        _assert_near_low_precision(g, r, r64, dtype, f"gradient of argument {i} vs torch (same dtype)")
    return out


def _assert_near_low_precision(out: Tensor, ref: Tensor, ref64: Tensor, dtype: torch.dtype, what: str) -> None:
    """``|out - ref| <= 2 (atol + rtol |ref64|) + |ref - ref64|`` elementwise (nan where torch's is).

    ``ref64`` is torch's float64 result rounded to the result's dtype."""
    rtol, atol = TOL[dtype]
    out, ref, ref64 = out.double(), ref.double(), ref64.double()
    both_nan = torch.isnan(out) & torch.isnan(ref)
    same_inf = torch.isinf(out) & (out == ref)
    allowed = 2 * (atol + rtol * ref64.abs()) + (ref - ref64).abs()
    # where torch's own low-precision arithmetic overflows to inf/nan but float64 does not
    # (float16 BCE: its 1e-12 epsilon underflows, 0/0 at x = t in {0, 1}), leanloss, already
    # checked against the float64 reference, keeps the finite answer
    torch_lost = ~torch.isfinite(ref) & torch.isfinite(ref64)
    ok = both_nan | same_inf | torch_lost | ((out - ref).abs() <= allowed)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: at {bad} leanloss {out[tuple(bad)].item()} vs torch {ref[tuple(bad)].item()} "
            f"(float64 reference {ref64[tuple(bad)].item()})"
        )


def module_oracle(make_module: Callable[[], torch.nn.Module]) -> Callable:
    """A torch module as an oracle for :func:`compare`: built fresh per call and moved to the dtype
    of the call's first input, so the float64 reference run gets float64 buffers too."""
    def call(*args, **kwargs):
        return make_module().to(args[0].dtype)(*args, **kwargs)
    return call


def raises_like(ours: Callable, theirs: Callable, *args, **kwargs) -> Tuple[BaseException, BaseException]:
    """Assert torch raises on the call and leanloss raises an instance of torch's exception class."""
    try:
        theirs(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any exception torch raises is the oracle
        torch_exc = e
    else:
        raise AssertionError("torch did not raise: this case is not an error-parity case")
    try:
        ours(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        assert isinstance(e, type(torch_exc)), (
            f"leanloss raised {type(e).__name__} ({e}); torch raised {type(torch_exc).__name__} ({torch_exc})"
        )
        return e, torch_exc
    raise AssertionError(f"leanloss did not raise; torch raised {type(torch_exc).__name__}: {torch_exc}")


def all_finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def lm_head_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, logit_scale: float = 1.0,
                   softcap: Optional[float] = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """The materialized logits of a fused LM-head loss in ``dtype`` (float64: the reference; the
    inputs' own dtype: eager torch's rounding):
    ``z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` (the tanh only with
    a softcap)."""
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = z * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                                   logit_scale: float = 1.0, softcap: Optional[float] = None,
                                   **options) -> Tensor:
    """The fused LM-head cross entropy: :func:`cross_entropy_reference` of :func:`lm_head_logits`;
    ``options`` are the former's keywords."""
    z = lm_head_logits(hidden, weight, bias, logit_scale=logit_scale, softcap=softcap)
    return cross_entropy_reference(z, target, **options)


def linear_log_probs_reference(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                               temperature: float = 1.0, ignore_index: int = -100) -> Tuple[Tensor, Tensor]:
    """Per-token ``log_softmax(z / T)`` at the target and the entropy ``-sum p log p`` of
    :func:`lm_head_logits`, in float64; both 0 at ignored targets (:func:`dense_token_stats`)."""
    out = dense_token_stats(hidden, weight, target, bias, temperature=temperature, ignore_index=ignore_index)
    return out["logp"], out["entropy"]


def dense_token_stats(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                      temperature: float = 1.0, softcap: Optional[float] = None,
                      logit_scale: float = 1.0, ignore_index: int = -100,
                      dtype: torch.dtype = torch.float64) -> Dict[str, Tensor]:
    """The per-token outputs of a linear head's softmax, dense in ``dtype`` (float64: the
    reference; the inputs' own dtype: eager torch's rounding), differentiable in the inputs:
    ``y = lm_head_logits(...) / temperature`` and ``logp`` (the target's log-softmax),
    ``entropy``, ``log_sum_sq_probs`` (``log sum_c p_c^2``), ``mean_logit`` (``y`` averaged over
    the classes) and ``is_top1`` (``argmax y == target``); each ``0`` (``False``) at ignored
    targets."""
    y = lm_head_logits(hidden, weight, bias, logit_scale=logit_scale, softcap=softcap, dtype=dtype) / temperature
    log_q = torch.log_softmax(y, dim=-1)
    q = log_q.exp()
    keep = target != ignore_index
    safe = torch.where(keep, target, 0)
    zero = torch.zeros((), dtype=dtype)
    out = {
        "logp": log_q.gather(-1, safe.unsqueeze(-1)).squeeze(-1),
        "entropy": -(q * log_q).sum(-1),
        "log_sum_sq_probs": q.square().sum(-1).log(),
        "mean_logit": y.mean(-1),
    }
    out = {name: torch.where(keep, value, zero) for name, value in out.items()}
    out["is_top1"] = keep & (y.argmax(-1) == safe)
    return out


def log_probs_objective(logp: Tensor, entropy: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * logp) + sum(b * entropy)``: any upstream gradients of both outputs."""
    return (logp.double() * a).sum() + (entropy.double() * b).sum()


def cross_entropy_reference(logits: Tensor, target: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                            label_smoothing: float = 0.0, class_weight: Optional[Tensor] = None,
                            z_loss: float = 0.0, num_items: Optional[int] = None) -> Tensor:
    """Cross entropy plus the z-loss on logits ``(..., V)`` with class indices ``target (...)``, in
    float64: per row ``ce + z_loss * w_t * logsumexp(z)^2`` (torch's cross entropy with
    ``reduction='none'``; ``w_t`` the target's class weight, 0 where ignored); ``'mean'`` divides
    the sum by ``num_items`` when given, else by the sum of ``w_t``."""
    vocab = logits.shape[-1]
    z, t = logits.double().reshape(-1, vocab), target.reshape(-1)
    weight = None if class_weight is None else class_weight.double()
    ce = F.cross_entropy(z, t, weight=weight, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    valid = t != ignore_index
    safe_t = torch.where(valid, t, 0)
    w_t = (torch.ones_like(ce) if weight is None else weight[safe_t]) * valid
    # where, not a product with w_t = 0: with every row ignored, 'mean' is 0/0 and an ignored
    # row's gradient must stay 0 (as torch's), not 0 * inf
    rows = ce + torch.where(valid, z_loss * w_t * torch.logsumexp(z, 1).square(), 0.0)
    if reduction == "none":
        return rows.reshape(target.shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (w_t.sum() if num_items is None else num_items)


__all__ = [
    "LOW_PRECISION", "DTYPES", "TOL", "CLASS_SHAPES", "SHAPE_IDS", "gen", "logits", "log_probs",
    "probs", "unit", "positive", "num_classes", "class_weight", "index_target", "upstream", "assert_close", "compare",
    "raises_like", "all_finite", "module_oracle", "lm_head_logits", "linear_cross_entropy_reference",
    "cross_entropy_reference", "linear_log_probs_reference", "dense_token_stats", "log_probs_objective",
]


def in_kernel_modes(run: Callable[[], Sequence[Tensor]]) -> Tuple[list, list]:
    """``run()``'s tensors with the row kernels forced eager, then forced compiled (the mode is
    restored afterwards): the two ways of running a kernel must agree."""
    from leanloss._fused.kernels import get_kernel_mode, set_kernel_mode

    previous = get_kernel_mode()
    results = []
    try:
        for mode in ("eager", "compiled"):
            set_kernel_mode(mode)
            results.append(list(run()))
    finally:
        set_kernel_mode(previous)
    return results[0], results[1]
