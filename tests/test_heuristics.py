"""InputWarning: each classic loss-input confusion warns; ordinary inputs never do.

Each warning is asserted with ``pytest.warns`` (its text says what the input looks like and
what to do, and points at the caller's line); the absence of warnings on ordinary inputs is
asserted with InputWarning turned into an error.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import leanloss
from leanloss import _heuristics

G = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=G).to(dtype)


X = randn(8, 5)
T = torch.randint(0, 5, (8,), generator=G)


def nan_at(x, index, value=float("nan")):
    y = x.clone()
    y[index] = value
    return y


# (id, call, regex the message must match: what it looks like AND what to do)
WARNS = [
    ("ce-probabilities", lambda: leanloss.cross_entropy(X.softmax(1), T),
     r"'input' looks like probabilities.*Pass the logits"),
    ("ce-probabilities-kdim", lambda: leanloss.cross_entropy(randn(2, 5, 3).softmax(1), torch.zeros(2, 3, dtype=torch.long)),
     r"'input' looks like probabilities"),
    ("ce-probabilities-with-probability-target", lambda: leanloss.cross_entropy(X.softmax(1), X.softmax(1)),
     r"'input' looks like probabilities"),
    ("nll-raw-scores", lambda: leanloss.nll_loss(X, T), r"'input' does not look like log-probabilities.*raw scores.*log_softmax"),
    ("nll-probabilities", lambda: leanloss.nll_loss(X.softmax(1), T), r"looks like probabilities.*Apply log_softmax"),
    ("nll-negative-but-unnormalized", lambda: leanloss.nll_loss(-X.abs() - 3, T), r"logsumexp"),
    ("kl-input-probabilities", lambda: leanloss.kl_div(X.softmax(1), X.softmax(1), reduction="batchmean"),
     r"'input' is not in log space.*log_softmax"),
    ("kl-target-log-probabilities", lambda: leanloss.kl_div(X.log_softmax(1), X.log_softmax(1), reduction="batchmean"),
     r"'target' has negative values.*log_target=True"),
    ("kl-log-target-probabilities", lambda: leanloss.kl_div(X.log_softmax(1), X.softmax(1), reduction="batchmean", log_target=True),
     r"'target' has positive values.*log_target=False"),
    ("kl-mean", lambda: leanloss.kl_div(X.log_softmax(1), X.softmax(1)), r"reduction='mean'.*batchmean"),
    ("bcel-sigmoid-outputs", lambda: leanloss.binary_cross_entropy_with_logits(X.sigmoid(), torch.rand(8, 5, generator=G)),
     r"looks like sigmoid outputs.*Pass the logits"),
    ("ce-target-not-summing-to-1", lambda: leanloss.cross_entropy(X, torch.rand(8, 5, generator=G)),
     r"'target' is read as class probabilities.*sum to 1"),
    ("ce-target-negative", lambda: leanloss.cross_entropy(X, X.softmax(1) - 0.1),
     r"'target' is read as class probabilities.*non-negative"),
    ("ce-nan-input", lambda: leanloss.cross_entropy(nan_at(X, (3, 2)), T), r"'input' contains NaN.*position \(3, 2\)"),
    ("ce-inf-input", lambda: leanloss.cross_entropy(nan_at(X, (1, 1), float("inf")), T), r"'input' contains NaN or Inf.*inf"),
    ("ce-nan-probability-target", lambda: leanloss.cross_entropy(X, nan_at(X.softmax(1), (0, 0))), r"'target' contains NaN"),
    ("nll-nan-input", lambda: leanloss.nll_loss(nan_at(X.log_softmax(1), (0, int(T[0]))), T, reduction="none"), r"'input' contains NaN"),
    ("kl-nan-target", lambda: leanloss.kl_div(X.log_softmax(1), nan_at(X.softmax(1), (2, 2)), reduction="batchmean"),
     r"'target' contains NaN"),
    ("bce-nan-target", lambda: leanloss.binary_cross_entropy(X.sigmoid(), nan_at(torch.rand(8, 5, generator=G), (5, 0))),
     r"'target' contains NaN"),
    ("bcel-inf-input", lambda: leanloss.binary_cross_entropy_with_logits(nan_at(X, (0, 0), float("inf")), torch.rand(8, 5, generator=G)),
     r"'input' contains NaN or Inf"),
    ("cos-nan-input", lambda: leanloss.cosine_embedding_loss(nan_at(X, (1, 1)), X, torch.ones(8)), r"'input1' contains NaN"),
    ("jsd-input-probabilities", lambda: leanloss.jsd(X.softmax(1), X.softmax(1), reduction="batchmean"),
     r"jsd: argument 'input' is not in log space"),
    ("jsd-target-log-probabilities", lambda: leanloss.jsd(X.log_softmax(1), X.log_softmax(1), reduction="batchmean"),
     r"'target' has negative values.*log_target=True"),
    ("distill-nan-student", lambda: leanloss.distill_loss(nan_at(X, (2, 1)), X), r"'student_logits' contains NaN"),
    ("linear-ce-nan-hidden", lambda: leanloss.linear_cross_entropy(nan_at(X, (4, 3)), X[:6], T % 6),
     r"linear_cross_entropy: argument 'hidden' contains NaN.*position \(4, 3\)"),
    ("linear-ce-inf-weight", lambda: leanloss.linear_cross_entropy(X, nan_at(X[:6], (1, 0), float("inf")), T % 6,
                                                                   reduction="none"),
     r"argument 'weight' contains NaN or Inf"),
    ("parallel-ce-nan-logits", lambda: leanloss.parallel.vocab_parallel_cross_entropy(nan_at(X, (3, 2)), T),
     r"vocab_parallel_cross_entropy: argument 'local_logits' contains NaN"),
    ("parallel-linear-ce-nan-hidden",
     lambda: leanloss.parallel.vocab_parallel_linear_cross_entropy(nan_at(X, (0, 1)), X[:6], T % 6),
     r"argument 'hidden' contains NaN"),
    ("linear-distill-nan-student",
     lambda: leanloss.linear_distill_loss(nan_at(X, (5, 0)), X[:6], X, X[:6]),
     r"linear_distill_loss: argument 'student_hidden' contains NaN.*position \(5, 0\)"),
    ("parallel-linear-distill-nan-weight",
     lambda: leanloss.parallel.vocab_parallel_linear_distill_loss(X, nan_at(X[:6], (2, 2)), X, X[:6]),
     r"argument 'student_local_weight' contains NaN"),
    ("parallel-topk-distill-nan-hidden",
     lambda: leanloss.parallel.vocab_parallel_linear_topk_distill_loss(nan_at(X, (1, 2)), X[:6], (T % 6)[:, None], X[:, :1]),
     r"vocab_parallel_linear_topk_distill_loss: argument 'student_hidden' contains NaN"),
    ("parallel-log-probs-nan-hidden",
     lambda: leanloss.parallel.vocab_parallel_linear_log_probs(nan_at(X, (1, 1)), X[:6], T % 6),
     r"vocab_parallel_linear_log_probs: argument 'hidden' contains NaN"),
    ("ce-module-probabilities", lambda: leanloss.CrossEntropyLoss()(X.softmax(1), T), r"looks like probabilities"),
]


@pytest.mark.parametrize("call, regex", [w[1:] for w in WARNS], ids=[w[0] for w in WARNS])
def test_confusion_warns(call, regex):
    with pytest.warns(leanloss.InputWarning, match=regex) as record:
        call()
    ours = [w for w in record if issubclass(w.category, leanloss.InputWarning)]
    assert issubclass(ours[0].category, UserWarning)
    assert ours[0].filename == __file__, "the warning must point at the caller's line"


def test_warnings_need_full_checks():
    for mode in ("shapes", "off"):
        with leanloss.checks(mode), warnings.catch_warnings():
            warnings.simplefilter("error", leanloss.InputWarning)
            leanloss.cross_entropy(X.softmax(1), T)
            leanloss.nll_loss(X, T)
            leanloss.cross_entropy(nan_at(X, (0, 0)), T)


# ------------------------------------------------------------------------------------------
# ordinary inputs: no warning
# ------------------------------------------------------------------------------------------


def _one_hot(target, c, dtype=torch.float32):
    return torch.nn.functional.one_hot(target, c).to(dtype)


def _ordinary_calls(dtype):
    x = randn(16, 7, dtype=dtype) * 3
    t = torch.randint(0, 7, (16,), generator=G)
    xk = randn(4, 7, 3, 2, dtype=dtype)
    tk = torch.randint(0, 7, (4, 3, 2), generator=G)
    smooth = _one_hot(t, 7, dtype) * 0.9 + 0.1 / 7
    logp = x.float().log_softmax(1).to(dtype)
    masked = x.clone()
    masked[:, 0] = float("-inf")  # masked class
    ignored = torch.full_like(t, -100)
    probs = torch.rand(16, 7, generator=G).to(dtype)
    binary = torch.rand(16, 7, generator=G).round().to(dtype)
    return [
        lambda: leanloss.cross_entropy(x, t),
        lambda: leanloss.cross_entropy(x, t, label_smoothing=0.1),
        lambda: leanloss.cross_entropy(xk, tk),
        lambda: leanloss.cross_entropy(x[0], t[0]),
        lambda: leanloss.cross_entropy(x, _one_hot(t, 7, dtype)),
        lambda: leanloss.cross_entropy(x, smooth),
        lambda: leanloss.cross_entropy(x, x.float().softmax(1).to(dtype)),
        lambda: leanloss.cross_entropy(xk, xk.float().softmax(1).to(dtype)),
        lambda: leanloss.cross_entropy(masked, torch.ones_like(t)),
        lambda: leanloss.cross_entropy(x, ignored),  # all ignored: nan, as torch, no warning
        lambda: leanloss.cross_entropy(x[:0], t[:0]),
        lambda: leanloss.cross_entropy(randn(16, 1, dtype=dtype), torch.zeros_like(t)),
        lambda: leanloss.cross_entropy(torch.zeros(16, 7, dtype=dtype), t),  # zero-initialized head
        lambda: leanloss.nll_loss(logp, t),
        lambda: leanloss.nll_loss(xk.float().log_softmax(1).to(dtype), tk),
        lambda: leanloss.nll_loss(masked.float().log_softmax(1).to(dtype), torch.ones_like(t)),
        lambda: leanloss.kl_div(logp, x.float().softmax(1).to(dtype), reduction="batchmean"),
        lambda: leanloss.kl_div(logp, smooth, reduction="batchmean"),
        lambda: leanloss.kl_div(logp, _one_hot(t, 7, dtype), reduction="sum"),
        lambda: leanloss.kl_div(logp, logp, reduction="batchmean", log_target=True),
        lambda: leanloss.binary_cross_entropy(probs, binary),
        lambda: leanloss.binary_cross_entropy(x.float().sigmoid().to(dtype), probs),
        lambda: leanloss.binary_cross_entropy_with_logits(x, binary),
        lambda: leanloss.binary_cross_entropy_with_logits(x, probs, pos_weight=torch.ones(7, dtype=dtype)),
        lambda: leanloss.binary_cross_entropy_with_logits(torch.zeros(16, 7, dtype=dtype), binary),
        lambda: leanloss.cosine_embedding_loss(x, randn(16, 7, dtype=dtype), torch.where(t > 3, 1.0, -1.0)),
        lambda: leanloss.entropy(logits=x),
        lambda: leanloss.entropy(probs=smooth),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
def test_no_warning_on_ordinary_inputs(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error", leanloss.InputWarning)
        for call in _ordinary_calls(dtype):
            call()


def test_no_warning_at_large_vocabulary():
    """Rounding in low precision over many classes must not look like 'not a distribution'."""
    x = randn(4, 50_000) * 4
    t = torch.randint(0, 50_000, (4,), generator=G)
    with warnings.catch_warnings():
        warnings.simplefilter("error", leanloss.InputWarning)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd = x.to(dtype)
            leanloss.nll_loss(xd.float().log_softmax(1).to(dtype), t)
            leanloss.cross_entropy(xd, xd.float().softmax(1).to(dtype))
            leanloss.kl_div(xd.float().log_softmax(1).to(dtype), xd.float().softmax(1).to(dtype), reduction="batchmean")


def test_no_warning_on_fused_and_distillation_losses():
    h, w = randn(6, 4), randn(9, 4)
    t = torch.randint(0, 9, (6,), generator=G)
    with warnings.catch_warnings():
        warnings.simplefilter("error", leanloss.InputWarning)
        leanloss.linear_cross_entropy(h, w, t)
        leanloss.distill_loss(randn(6, 9), randn(6, 9), t, hard_weight=0.5)
        leanloss.jsd(randn(6, 9).log_softmax(1), randn(6, 9).log_softmax(1), log_target=True, reduction="batchmean")
        leanloss.jsd(randn(6, 9).log_softmax(1), randn(6, 9).softmax(1), reduction="batchmean")
        leanloss.distill_loss(randn(6, 9), randn(6, 9), kind="jsd", beta=0.3, temperature=2.0)
        leanloss.linear_distill_loss(h, w, randn(6, 4), randn(9, 4))


# ------------------------------------------------------------------------------------------
# the heuristics' cost is bounded: they read a fixed number of rows, never the whole input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, class_dim", [((1000, 7), 1), ((50, 7, 40), 1), ((3, 7, 2, 500), 1), ((7,), 0)])
def test_heuristics_read_a_bounded_sample(shape, class_dim):
    x = randn(*shape)
    rows = _heuristics._sample_rows(x, class_dim)
    assert rows.shape == (min(_heuristics._SAMPLE_ROWS, x.numel() // 7), 7)
    wide = _heuristics._sample_rows(randn(40, 5000), 1)  # long rows: the element budget caps the rows
    assert wide.shape == (_heuristics._SAMPLE_ELEMENTS // 5000, 5000)
    assert _heuristics._sample_rows(randn(3, 50_000), 1).shape == (1, 50_000)  # but never below one row
    # the sampled rows are rows of the input, classes last
    expected = x.movedim(class_dim, -1).reshape(-1, 7)
    assert any(torch.equal(rows[0], r) for r in expected[: x.numel() // 7])


def test_probabilities_beyond_the_sample_rows_are_not_read():
    """Documents the trade-off: rows past the sample do not enter the heuristics."""
    x = randn(200, 5)
    x[: _heuristics._SAMPLE_ROWS] = x[: _heuristics._SAMPLE_ROWS].softmax(1)
    with pytest.warns(leanloss.InputWarning, match="looks like probabilities"):
        leanloss.cross_entropy(x, torch.zeros(200, dtype=torch.long))
