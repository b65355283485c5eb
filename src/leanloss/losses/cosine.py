"""Cosine embedding loss."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks, _heuristics
from .._dtypes import autocast_loss_inputs, upcast
from .._reduce import reduce_loss, resolve_reduction

__all__ = ["cosine_embedding_loss"]

# torch's EPSILON is a float32 constant (constexpr float 1e-12), then widened: match it exactly,
# or cos (and its gradient) differs at 1e-9 relative where a vector is (near) zero
_EPS = float(torch.tensor(1e-12, dtype=torch.float32))


def cosine_embedding_loss(
    input1: Tensor,
    input2: Tensor,
    target: Tensor,
    margin: float = 0.0,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Cosine embedding loss; mirrors ``torch.nn.functional.cosine_embedding_loss``.

    .. math::
        \cos_i = \frac{\langle a_i, b_i \rangle}{\sqrt{(\|a_i\|^2 + \epsilon)(\|b_i\|^2 + \epsilon)}},
        \quad \ell_i = \begin{cases} 1 - \cos_i & y_i = 1 \\ \max(0, \cos_i - \text{margin}) & y_i = -1 \end{cases}

    with :math:`\epsilon = 10^{-12}`. Shapes: ``input1``/``input2`` (N, D) with ``target`` (N),
    or (D) with a 0-dim ``target``. ``target`` must hold only 1 and -1: torch silently gives 0
    for any other value; leanloss raises.
    """
    fn = "cosine_embedding_loss"
    reduction = resolve_reduction(reduction, size_average, reduce)
    input1, input2, target = autocast_loss_inputs(fn, input1, input2, target)
    for name, t in (("input1", input1), ("input2", input2), ("target", target)):
        _checks.check_tensor(fn, name, t)
    if _checks.shapes_enabled():
        if target.dim() not in (0, 1):
            raise _checks.LeanlossValueError(
                f"{fn}: 0D or 1D target tensor expected, multi-target not supported: argument "
                f"'target' has shape {tuple(target.shape)}"
            )
        want = 2 if target.dim() == 1 else 1
        if input1.dim() != want or input2.dim() != want:
            raise _checks.LeanlossValueError(
                f"{fn}: {target.dim()}D target tensor expects {want}D input tensors, but found "
                f"inputs with sizes {list(input1.shape)} and {list(input2.shape)}: arguments "
                f"'input1' and 'input2' must be {'(N, D)' if want == 2 else '(D)'}"
            )
        _checks.check_same_shape(fn, "input2", input2, "input1", input1)
        if target.dim() == 1 and target.shape[0] != input1.shape[0]:
            raise _checks.LeanlossValueError(
                f"{fn}: argument 'target' must have shape ({input1.shape[0]},), one entry per "
                f"row of 'input1' {_checks.fmt_shape(input1)}, got {_checks.fmt_shape(target)}"
            )
        _checks.check_same_device(fn, input1=input1, input2=input2, target=target)
    _checks.check_plus_minus_one(
        fn, "target", target,
        "; a 0/1 target silently gives a zero loss for the 0 entries (use target * 2 - 1)",
    )
    out_dtype = torch.promote_types(input1.dtype, input2.dtype)
    a, b = upcast(input1), upcast(input2)
    dim = target.dim()
    prod_sum = (a * b).sum(dim)
    mag1 = (a * a).sum(dim) + _EPS
    mag2 = (b * b).sum(dim) + _EPS
    cos = prod_sum / (mag1 * mag2).sqrt()
    zeros = torch.zeros_like(cos)
    pos = torch.where(target == 1, 1 - cos, zeros)
    neg = torch.where(target == -1, (cos - margin).clamp(min=0), zeros)
    loss = reduce_loss(pos + neg, reduction).to(out_dtype)
    return _heuristics.finite_or_warn(fn, loss, input1=input1, input2=input2)
