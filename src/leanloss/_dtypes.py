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
