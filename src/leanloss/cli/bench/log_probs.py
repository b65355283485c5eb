"""Per-token log-probabilities and entropy (the RL input): fused vs dense, training and scoring.

Case: ``hidden (N, D)`` and ``weight (V, D)`` (both require grad), targets with none ignored,
temperature 0.9, objective ``sum(a * logp) + sum(b * entropy)`` with fixed random ``a``, ``b``
(the upstream gradients of a policy-gradient loss are per token, known only in backward).
Impls:

The roofline (timed interleaved in the same process, see ``harness``) is the four matmuls a
per-token objective needs at least: ``z = h @ W.T`` in forward, the same product again in
backward (the upstream gradient is not known in forward), ``g @ W`` and ``g.T @ h``; for the
scoring impls it is ONE matmul ``h @ W.T``.

* ``leanloss``: :func:`leanloss.linear_log_probs` with ``return_entropy=True``, fwd+bwd;
* ``torch_eager``: ``log_softmax((h @ W.T) / T)`` gathered at the targets and
  ``-(p * log p).sum(-1)``, eager, fwd+bwd;
* ``leanloss_softcap`` / ``torch_eager_softcap``: the same under Gemma 2's logit softcap
  (``softcap=30``: ``log_softmax(30 tanh((h @ W.T) / 30) / T)``), a group of their own;
* ``leanloss_score`` / ``torch_eager_score``: the same two outputs under ``torch.no_grad()``
  (rollout scoring).

``extra_mb`` is the peak RSS of one warmed-up step above the inputs and (for the training
impls) their gradients. One case: ``python -m leanloss.cli.bench.log_probs --case JSON``.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

import leanloss
from leanloss.cli.bench import harness

SUITE = "log_probs"
DEFAULT: Dict[str, Any] = dict(N=2048, D=1024, V=131072, dtypes=("float32", "bfloat16"), repeats=3)
QUICK: Dict[str, Any] = dict(N=2048, D=1024, V=32000, dtypes=("bfloat16",), repeats=2)
IMPLS = ("leanloss", "torch_eager", "leanloss_softcap", "torch_eager_softcap", "leanloss_score", "torch_eager_score")
QUICK_IMPLS = ("leanloss",)
TEMPERATURE = 0.9
SOFTCAP = 30.0  # Gemma 2's final_logit_softcapping


def cases(*, quick: bool, vocab=None, tokens=None, hidden=None, dtype=None, only=None) -> list:
    base = QUICK if quick else DEFAULT
    dtypes = base["dtypes"] if dtype is None else (dtype,)
    impls = [i for i in IMPLS if (only is None or i == only) and (only or not quick or i in QUICK_IMPLS)]
    return [dict(suite=SUITE, impl=impl, N=int(tokens or base["N"]), D=int(hidden or base["D"]),
                 V=int(vocab or base["V"]), dtype=dt, repeats=base["repeats"], temperature=TEMPERATURE,
                 **({"softcap": SOFTCAP} if impl.endswith("_softcap") else {}))
            for dt in dtypes for impl in impls]


def _dense(h, w, t, temperature, softcap=None):
    z = (h @ w.T).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_q = torch.log_softmax(z / temperature, dim=-1)
    logp = log_q.gather(1, t.unsqueeze(1)).squeeze(1)
    return logp, -(log_q.exp() * log_q).sum(-1)


def _step_fn(impl: str, h, w, t, a, b, temperature, softcap=None):
    if impl == "roofline":
        def step():
            with torch.no_grad():
                z = h @ w.T
                z = h @ w.T
                z @ w
                z.T @ h
        return step
    if impl == "matmul":
        def matmul():
            with torch.no_grad():
                h @ w.T
        return matmul
    if impl.startswith("leanloss"):
        def outputs():
            return leanloss.linear_log_probs(h, w, t, temperature=temperature, return_entropy=True, softcap=softcap)
    elif impl.startswith("torch_eager"):
        def outputs():
            return _dense(h, w, t, temperature, softcap)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    if impl.endswith("_score"):
        def score():
            with torch.no_grad():
                outputs()
        return score

    def train():
        logp, ent = outputs()
        ((logp * a).sum() + (ent * b).sum()).backward()
    return train


def run_case(case: dict) -> dict:
    dtype = getattr(torch, case["dtype"])
    n, d, v = case["N"], case["D"], case["V"]
    temperature = case.get("temperature", TEMPERATURE)
    g = torch.Generator().manual_seed(0)
    # drawn in their dtype and scaled in place: no float32 temporaries, whose peak would count
    # as the scoring impls' extra memory
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=dtype).mul_(d ** -0.5).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    impl = case["impl"]
    training = not impl.endswith("_score")
    step = _step_fn(impl, h, w, t, a, b, temperature, case.get("softcap"))
    reference = _step_fn("roofline" if training else "matmul", h, w, t, a, b, temperature)
    return harness.measure(case, step, leaves=(h, w) if training else (), reference=reference)


if __name__ == "__main__":
    harness.main(run_case)
