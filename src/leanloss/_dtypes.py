"""Accumulation dtypes: half-precision inputs are computed in float32, returned in their dtype."""
from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16, otherwise ``dtype`` itself (float32, float64)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def upcast(t: Tensor) -> Tensor:
    """``t`` in its accumulation dtype (a differentiable cast; a no-op for float32/float64)."""
    target = compute_dtype(t.dtype)
    return t if t.dtype == target else t.to(target)


# --- torch.autocast ------------------------------------------------------------------------------
# The cast policy torch's autocast applies to each loss's torch twin (torch 2.13,
# aten/src/ATen/autocast_mode.{h,cpp}), on CPU and on CUDA (which the other accelerators share):
#
#   fp32    every floating argument that is not float64 is computed in float32 (torch: the op is
#           on the autocast "fp32" list: nll_loss, cross_entropy_loss (CPU; on CUDA its parts
#           log_softmax / nll_loss are), kl_div, binary_cross_entropy (CPU),
#           binary_cross_entropy_with_logits, cosine_embedding_loss; on CUDA also logsumexp and
#           log_softmax, the ops of Categorical(logits).entropy())
#   banned  torch raises (binary_cross_entropy on CUDA: "unsafe to autocast")
#   None    autocast leaves the op alone (entropy on CPU: none of its ops is on the CPU lists)
#
# ``jsd`` follows ``kl_div`` (same conventions); ``distill_loss`` is a KL of log-softmaxes.
AUTOCAST_POLICY = {
    # name: (policy on CPU, policy on CUDA and other accelerators)
    "cross_entropy": ("fp32", "fp32"),
    "nll_loss": ("fp32", "fp32"),
    "kl_div": ("fp32", "fp32"),
    "jsd": ("fp32", "fp32"),
    "distill_loss": ("fp32", "fp32"),
    "binary_cross_entropy": ("fp32", "banned"),
    "binary_cross_entropy_with_logits": ("fp32", "fp32"),
    "cosine_embedding_loss": ("fp32", "fp32"),
    "entropy": (None, "fp32"),
}


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (``False`` where autocast does not exist)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # e.g. 'meta': no autocast for that device type
        return False


def _eligible(t) -> bool:
    """A tensor autocast would cast: floating, not float64, on a device with autocast enabled."""
    return (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and autocast_enabled(t.device.type))


def autocast_loss_inputs(fn: str, *tensors):
    """The tensor arguments of loss ``fn`` as torch's autocast hands them to its torch twin.

    Outside autocast they come back unchanged. Under ``torch.autocast`` for a tensor's device,
    ``fn``'s policy in :data:`AUTOCAST_POLICY` applies: ``'fp32'`` casts each eligible tensor
    (floating, not float64) to float32 with a differentiable cast, so the loss is computed and
    returned in float32 and the gradient flows back in the tensor's own dtype; ``'banned'``
    raises the ``RuntimeError`` torch raises. Anything that is not a tensor (``None``, a wrong
    argument left for the checks to report) passes through.
    """
    if not any(_eligible(t) for t in tensors):
        return tensors
    device_type = next(t.device.type for t in tensors if _eligible(t))
    policy = AUTOCAST_POLICY[fn][0 if device_type == "cpu" else 1]
    if policy == "banned":
        raise RuntimeError(
            f"{fn}: torch.nn.functional.{fn} is unsafe to autocast on {device_type} (torch raises "
            f"here too): its input is usually a sigmoid output, whose rounding to a 16-bit dtype "
            f"loses the probabilities near 0 and 1. Use binary_cross_entropy_with_logits on the "
            f"logits instead, or compute this loss outside the autocast region"
        )
    if policy is None:
        return tensors
    return tuple(t.float() if _eligible(t) else t for t in tensors)


def autocast_matmul_operands(*tensors):
    """The operands of a linear head as ``F.linear`` under ``torch.autocast`` would use them.

    Under autocast for a tensor's device, each floating tensor other than float64 is cast (with
    a differentiable cast, so its gradient comes back in its own dtype) to that device's
    autocast dtype (``torch.get_autocast_dtype``): the matmuls run in the lower precision while
    the fused losses keep their float32 statistics and return a float32 loss. Outside autocast,
    and for ``None`` or float64 arguments, they come back unchanged.
    """
    if not any(_eligible(t) for t in tensors):
        return tensors
    return tuple(t.to(torch.get_autocast_dtype(t.device.type)) if _eligible(t) else t for t in tensors)
