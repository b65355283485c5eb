"""KL divergence and entropy."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks, _heuristics
from .._dtypes import autocast_loss_inputs, upcast
from .._reduce import reduce_loss, resolve_reduction

__all__ = ["kl_div", "entropy"]


def kl_div(
    input: Tensor,
    target: Tensor,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    log_target: bool = False,
) -> Tensor:
    r"""Pointwise KL divergence; mirrors ``torch.nn.functional.kl_div``.

    ``input`` holds log-probabilities :math:`\log q`; ``target`` holds probabilities :math:`p`
    (or :math:`\log p` when ``log_target=True``). Elementwise, broadcasting as torch does:

    .. math::
        \ell = p (\log p - \log q) \;\; (\text{with } 0 \log 0 = 0), \qquad
        \ell = e^{\log p} (\log p - \log q) \;\; (\texttt{log\_target=True})

    Reductions: ``'none'`` (elementwise), ``'sum'``, ``'mean'`` (over **every element**: this is
    not the KL divergence of the distributions; leanloss warns and recommends ``'batchmean'``)
    and ``'batchmean'`` (sum divided by ``input.size(0)``, the KL divergence per sample).
    """
    fn = "kl_div"
    input, target = autocast_loss_inputs(fn, input, target)
    _checks.check_tensor(fn, "input", input)
    _checks.check_tensor(fn, "target", target)
    legacy = size_average is not None or reduce is not None
    reduction = resolve_reduction(
        reduction, size_average, reduce, allowed=("none", "mean", "sum", "batchmean")
    )
    if _checks.shapes_enabled():
        for name, t in (("input", input), ("target", target)):
            if not t.is_floating_point():
                raise _checks.LeanlossTypeError(
                    f"{fn}: Integral inputs not supported: argument '{name}' must be a floating "
                    f"tensor of {'log-' if name == 'input' or log_target else ''}probabilities, "
                    f"got dtype {t.dtype}"
                )
        _checks.check_same_device(fn, input=input, target=target)
        _checks.check_broadcastable(fn, "target", target, "input", input)
    if not legacy and reduction == "mean":
        _checks.warn(
            f"{fn}: reduction='mean' divides the total loss by both the batch size and the "
            f"support size; 'batchmean' divides only by the batch size and is the KL divergence "
            f"of the distributions. Pass reduction='batchmean'."
        )
    _heuristics.warn_kl_inputs(fn, input, target, log_target)
    out_dtype = torch.promote_types(input.dtype, target.dtype)
    x, t = upcast(input), upcast(target)
    if log_target:
        pointwise = torch.exp(t) * (t - x)
    else:
        pointwise = torch.xlogy(t, t) - t * x
    if reduction == "batchmean":
        if input.dim() == 0:
            loss = pointwise.sum()
        else:
            loss = reduce_loss(pointwise, "batchmean", batch_size=input.shape[0])
    else:
        loss = reduce_loss(pointwise, reduction)
    return _heuristics.finite_or_warn(fn, loss.to(out_dtype), input=input, target=target)


def entropy(logits: Optional[Tensor] = None, probs: Optional[Tensor] = None, dim: int = -1) -> Tensor:
    r"""Shannon entropy in nats, :math:`H(p) = -\sum_c p_c \log p_c`, along ``dim``.

    Give exactly one of ``logits`` (unnormalized; :math:`p = \mathrm{softmax}(\text{logits})`)
    or ``probs`` (non-negative; normalized along ``dim`` as
    ``torch.distributions.Categorical`` does). Terms with :math:`p_c = 0` contribute 0, so the
    result is finite when some probabilities are 0 (or some logits are ``-inf``); with ``probs``
    the log is taken of ``p`` clamped to ``[eps, 1 - eps]`` (``eps`` of the accumulation dtype),
    as ``Categorical`` does, so the gradient stays finite there too.

    Equals ``torch.distributions.Categorical(logits=...|probs=...).entropy()`` for ``dim=-1``;
    shape: the input's shape without ``dim``.
    """
    fn = "entropy"
    if (logits is None) == (probs is None):
        raise ValueError(f"{fn}: pass exactly one of the arguments 'logits' or 'probs'")
    name, x = ("logits", logits) if logits is not None else ("probs", probs)
    (x,) = autocast_loss_inputs(fn, x)
    _checks.check_tensor(fn, name, x)
    if _checks.shapes_enabled():
        _checks.check_floating(fn, name, x)
        if x.dim() == 0:
            raise _checks.LeanlossValueError(
                f"{fn}: argument '{name}' must have at least one dimension (the classes), got a 0-dim tensor"
            )
    xc = upcast(x)
    min_real = torch.finfo(xc.dtype).min
    if logits is not None:
        log_p = torch.log_softmax(xc, dim=dim)
        p = log_p.exp()
    else:
        _checks.check_nonnegative(fn, "probs", x)
        p = xc / xc.sum(dim, keepdim=True)
        # log of p clamped to [eps, 1 - eps], as Categorical's logits: finite gradients at p = 0
        eps = torch.finfo(xc.dtype).eps
        log_p = torch.log(p.clamp(min=eps, max=1 - eps))
    return -(p * log_p.clamp(min=min_real)).sum(dim).to(x.dtype)
