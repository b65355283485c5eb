"""The identities between the losses that ``leanloss tour`` teaches, as functions you can check.

Each function computes both sides of one identity with leanloss's own losses and returns an
:class:`Identity`: ``lhs`` and ``rhs`` tensors, ``holds()`` to compare them, and tuple
unpacking (``lhs, rhs = ce_equals_entropy_plus_kl(p, q_logits)``). ``leanloss tour`` prints
them next to torch's values; tests hold both sides against torch.

The identities (per sample, natural logarithms):

* cross entropy = entropy + KL divergence: :math:`H(p, q) = H(p) + D_{KL}(p \\| q)`;
* ``nll_loss(log_softmax(x), y) == cross_entropy(x, y)``;
* one-hot probability targets give the class-index cross entropy;
* binary cross entropy is the two-class negative log-likelihood;
* ``binary_cross_entropy_with_logits(x, t) == binary_cross_entropy(sigmoid(x), t)`` (where the
  sigmoid does not saturate);
* ``kl_div(..., 'batchmean') == kl_div(..., 'mean') * C`` for (N, C) inputs, and
  ``log_target=True`` on :math:`\\log p` equals ``log_target=False`` on :math:`p`;
* ``entropy`` equals ``torch.distributions.Categorical(...).entropy()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from leanloss.functional import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    entropy,
    kl_div,
    nll_loss,
)

__all__ = [
    "Identity",
    "ce_equals_entropy_plus_kl",
    "log_softmax_nll_equals_ce",
    "onehot_ce_equals_index_ce",
    "bce_equals_two_class_nll",
    "bce_with_logits_equals_sigmoid_bce",
    "kl_batchmean_equals_mean_times_classes",
    "kl_log_target_equals_prob_target",
    "entropy_equals_categorical",
]


@dataclass(frozen=True)
class Identity:
    """Both sides of an identity: ``name`` reads ``"lhs = rhs"``; unpacks as ``(lhs, rhs)``."""

    name: str
    lhs: Tensor
    rhs: Tensor

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.lhs, self.rhs))

    @property
    def max_abs_diff(self) -> float:
        """``max |lhs - rhs|`` (0.0 for empty tensors)."""
        diff = (self.lhs.detach().double() - self.rhs.detach().double()).abs()
        return float(diff.max()) if diff.numel() else 0.0

    def holds(self, rtol: float | None = None, atol: float | None = None) -> bool:
        """``torch.allclose(lhs, rhs, rtol, atol)``; default tolerances follow the dtype
        (1e-5 relative for float32 and below, 1e-10 for float64)."""
        if rtol is None:
            rtol = 1e-10 if self.lhs.dtype == torch.float64 else 1e-5
        if atol is None:
            atol = 1e-12 if self.lhs.dtype == torch.float64 else 1e-7
        lhs, rhs = self.lhs.detach(), self.rhs.detach().to(self.lhs.dtype)
        return lhs.shape == rhs.shape and bool(torch.allclose(lhs, rhs, rtol=rtol, atol=atol))


def _probs(p: Tensor, is_logits: bool) -> Tensor:
    return torch.softmax(p, dim=-1) if is_logits else p


def ce_equals_entropy_plus_kl(p: Tensor, q_logits: Tensor, *, p_is_logits: bool = False) -> Identity:
    r"""Cross entropy = entropy + KL divergence, per sample:

    .. math:: H(p, q) = -\sum_c p_c \log q_c = H(p) + D_{KL}(p \| q),
              \quad q = \mathrm{softmax}(\text{q\_logits})

    ``p`` (N, C) holds target probabilities (or logits with ``p_is_logits=True``, softmaxed
    along the last dim); ``q_logits`` (N, C). lhs is ``cross_entropy(q_logits, p,
    reduction='none')`` (torch: ``F.cross_entropy`` with probability targets); rhs is
    ``entropy(probs=p) + kl_div(log_softmax(q_logits), p, reduction='none').sum(-1)``
    (torch: ``Categorical(probs=p).entropy() + F.kl_div(...).sum(-1)``). Both shape (N,).
    """
    p = _probs(p, p_is_logits)
    lhs = cross_entropy(q_logits, p, reduction="none")
    kl = kl_div(torch.log_softmax(q_logits, dim=-1), p, reduction="none").sum(-1)
    return Identity("H(p, q) = H(p) + KL(p || q)", lhs, entropy(probs=p) + kl)


def log_softmax_nll_equals_ce(logits: Tensor, target: Tensor, reduction: str = "mean") -> Identity:
    r"""``nll_loss(log_softmax(logits), target) == cross_entropy(logits, target)``:

    .. math:: -\log \mathrm{softmax}(x)_y = -x_y + \log \sum_c e^{x_c}

    ``logits`` (N, C), ``target`` (N) int64 class indices; mirrors ``F.nll_loss`` and
    ``F.cross_entropy``. lhs is the NLL of the log-softmax, rhs the cross entropy.
    """
    lhs = nll_loss(torch.log_softmax(logits, dim=1), target, reduction=reduction)
    rhs = cross_entropy(logits, target, reduction=reduction)
    return Identity("nll_loss(log_softmax(x), y) = cross_entropy(x, y)", lhs, rhs)


def onehot_ce_equals_index_ce(logits: Tensor, target: Tensor, reduction: str = "mean") -> Identity:
    r"""Cross entropy with one-hot probability targets equals it with class-index targets:

    .. math:: -\sum_c \mathbb{1}[c = y] \log q_c = -\log q_y

    ``logits`` (N, C), ``target`` (N) int64; lhs uses ``one_hot(target, C)`` as float
    probabilities, rhs the indices (both ``F.cross_entropy``). ``reduction`` 'mean' divides
    both by N (no class weights involved).
    """
    onehot = torch.nn.functional.one_hot(target, logits.shape[1]).to(logits.dtype)
    lhs = cross_entropy(logits, onehot, reduction=reduction)
    rhs = cross_entropy(logits, target, reduction=reduction)
    return Identity("cross_entropy(x, one_hot(y)) = cross_entropy(x, y)", lhs, rhs)


def bce_equals_two_class_nll(probs: Tensor, target: Tensor, reduction: str = "mean") -> Identity:
    r"""Binary cross entropy is the negative log-likelihood of two classes:

    .. math:: -[t \log p + (1 - t) \log(1 - p)] = -\log [1 - p, p]_t

    ``probs`` (N) in (0, 1) (sigmoid outputs), ``target`` (N) of 0/1 (any dtype). lhs is
    ``binary_cross_entropy(probs, target)`` (``F.binary_cross_entropy``), rhs
    ``nll_loss(log(stack([1 - p, p], -1)), target)`` (``F.nll_loss``).
    """
    lhs = binary_cross_entropy(probs, target.to(probs.dtype), reduction=reduction)
    two_class = torch.stack([1 - probs, probs], dim=-1)
    rhs = nll_loss(torch.log(two_class), target.long(), reduction=reduction)
    return Identity("binary_cross_entropy(p, t) = nll_loss(log [1-p, p], t)", lhs, rhs)


def bce_with_logits_equals_sigmoid_bce(logits: Tensor, target: Tensor, reduction: str = "mean") -> Identity:
    r"""``binary_cross_entropy_with_logits(x, t) == binary_cross_entropy(sigmoid(x), t)``:

    .. math:: -[t \log\sigma(x) + (1 - t) \log(1 - \sigma(x))]

    Holds where the sigmoid does not saturate; for |x| large (e.g. 50 in float32) the sigmoid
    rounds to 0 or 1 and the right side is clamped at 100 or rounds to 0, while the left side
    stays exact. ``logits`` and ``target`` share one shape; mirrors the two torch functions.
    """
    t = target.to(logits.dtype)
    lhs = binary_cross_entropy_with_logits(logits, t, reduction=reduction)
    rhs = binary_cross_entropy(torch.sigmoid(logits), t, reduction=reduction)
    return Identity("bce_with_logits(x, t) = bce(sigmoid(x), t)", lhs, rhs)


def kl_batchmean_equals_mean_times_classes(log_q: Tensor, p: Tensor) -> Identity:
    r"""``kl_div(log_q, p, 'batchmean') == kl_div(log_q, p, 'mean') * C`` for (N, C) inputs:

    .. math:: \frac{1}{N}\sum_{n,c} \ell_{nc} = C \cdot \frac{1}{NC}\sum_{n,c} \ell_{nc}

    'mean' averages over all N*C elements, so it is the per-sample KL divergence divided by C;
    'batchmean' is the KL divergence per sample. ``log_q`` log-probabilities, ``p``
    probabilities, both (N, C); mirrors ``F.kl_div``. The 'mean' side raises leanloss's
    InputWarning about 'mean', which is silenced here.
    """
    import warnings

    lhs = kl_div(log_q, p, reduction="batchmean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean = kl_div(log_q, p, reduction="mean")
    return Identity("kl_div(batchmean) = kl_div(mean) * C", lhs, mean * log_q.shape[-1])


def kl_log_target_equals_prob_target(log_q: Tensor, p: Tensor, reduction: str = "batchmean") -> Identity:
    r"""``kl_div(log_q, log(p), log_target=True) == kl_div(log_q, p)``:

    .. math:: e^{\log p} (\log p - \log q) = p (\log p - \log q)

    ``log_q`` log-probabilities and ``p`` probabilities (> 0), both (N, C); mirrors ``F.kl_div``.
    """
    lhs = kl_div(log_q, torch.log(p), reduction=reduction, log_target=True)
    rhs = kl_div(log_q, p, reduction=reduction)
    return Identity("kl_div(log q, log p, log_target=True) = kl_div(log q, p)", lhs, rhs)


def entropy_equals_categorical(probs: Tensor) -> Identity:
    r"""``entropy(probs=p) == torch.distributions.Categorical(probs=p).entropy()``:

    .. math:: H(p) = -\sum_c p_c \log p_c

    ``probs`` (..., C), non-negative (normalized along the last dim as Categorical does).
    lhs is leanloss's entropy, rhs torch's Categorical entropy; shape (...).
    """
    lhs = entropy(probs=probs)
    rhs = torch.distributions.Categorical(probs=probs).entropy()
    return Identity("entropy(p) = Categorical(p).entropy()", lhs, rhs)
