"""A catalogue of bad inputs, one per row, across every public loss.

Each row asserts (1) the exception class, (2) that the message names the argument, says what
was expected and what came, and (3) where torch raises for the same input, that leanloss's
exception is an instance of the class torch raises (so ``except RuntimeError`` etc. keeps
working); where torch stays silent (leanloss is stricter on purpose) the row says so and the
test checks that torch indeed accepts the input.

Rows marked ``moduleinfo-*`` / ``opinfo-*`` rebuild the error inputs of torch's own test
suite (``torch.testing._internal.common_modules`` ``module_error_inputs_torch_nn_*Loss`` and
``common_methods_invocations.error_inputs_linear_cross_entropy``) and also hold leanloss's
message to torch's regex for them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import leanloss
from leanloss import parallel
from leanloss import (
    LeanlossTypeError,
    LeanlossValueError,
    TargetOutOfRangeError,
    UnsupportedDtypeError,
)

SILENT = "torch accepts this input"  # torch_raises=False rows: leanloss is stricter on purpose
NO_TWIN = None  # no torch function to compare with


@dataclass
class Bad:
    id: str
    call: Callable[[], object]  # calls leanloss
    exc: type  # the class leanloss raises
    arg: str  # the argument the message must name
    expect: str  # what was expected, as the message says it
    got: str  # what came, as the message says it
    torch_call: Optional[Callable[[], object]] = None  # torch's twin on the same input
    torch_raises: Optional[bool] = True  # None: no twin; False: torch is silent
    torch_regex: Optional[str] = None  # torch's own test regex (moduleinfo/opinfo rows)
    extra: tuple = field(default_factory=tuple)  # more fragments the message must hold


def x23(dtype=torch.float32):
    return torch.randn(2, 3, dtype=dtype)


def t2(*values):
    return torch.tensor(values or (0, 2))


def pair(fname, *args, **kwargs):
    """(leanloss call, torch call) of the function ``fname`` on the same inputs."""
    return (
        lambda: getattr(leanloss, fname)(*args, **kwargs),
        lambda: getattr(F, fname)(*args, **kwargs),
    )


def row(id, fname, args, kwargs, exc, arg, expect, got, torch_raises=True, **more):
    ours, theirs = pair(fname, *args, **kwargs)
    return Bad(id, ours, exc, arg, expect, got, theirs if torch_raises is not None else None,
               torch_raises, **more)


META = torch.device("meta")
X = torch.randn(4, 3)
T = torch.tensor([0, 1, 2, 1])
X3 = torch.randn(2, 3, 4)  # (N, C, d1)
P = torch.rand(4, 3)  # probabilities for BCE
P01 = torch.rand(4, 3).round()  # binary targets
E1, E2 = torch.randn(3, 4), torch.randn(3, 4)  # embeddings
Y = torch.tensor([1.0, -1.0, 1.0])

CATALOGUE = [
    # ---------------------------------------------------------------- cross_entropy
    row("ce-target-above-range", "cross_entropy", (X, t2(0, 1, 2, 7)), {}, TargetOutOfRangeError,
        "target", "[0, 2]", "got 7 at position (3,)"),
    row("ce-target-negative", "cross_entropy", (X, t2(0, -5, 2, 1)), {}, TargetOutOfRangeError,
        "target", "ignore_index=-100", "got -5 at position (1,)"),
    row("ce-target-out-of-range-kdim", "cross_entropy",
        (X3, torch.tensor([[0, 1, 2, 0], [1, 2, 3, 0]])), {}, TargetOutOfRangeError,
        "target", "[0, 2]", "got 3 at position (1, 2)"),
    row("ce-target-out-of-range-1d-input", "cross_entropy", (torch.randn(3), torch.tensor(5)), {},
        TargetOutOfRangeError, "target", "[0, 2]", "got 5 at position ()"),
    row("ce-float-index-target", "cross_entropy", (X, T.float()), {}, LeanlossTypeError,
        "target", "int64 (Long)", "torch.float32"),
    row("ce-int32-index-target", "cross_entropy", (X, T.int()), {}, LeanlossTypeError,
        "target", "int64 (Long)", "torch.int32"),
    row("ce-bool-index-target", "cross_entropy", (X, T.bool()), {}, LeanlossTypeError,
        "target", "int64 (Long)", "torch.bool"),
    row("ce-integer-probability-target", "cross_entropy", (X, torch.zeros(4, 3, dtype=torch.long)), {},
        LeanlossTypeError, "target", "must be floating", "torch.int64"),
    row("ce-probability-target-wrong-class-count", "cross_entropy", (X, torch.rand(4, 5)), {},
        LeanlossTypeError, "target", "same shape as 'input'", "torch.float32"),
    row("ce-probability-target-with-ignore-index", "cross_entropy", (X, X.softmax(1)),
        {"ignore_index": 1}, LeanlossValueError, "ignore_index", "keep its default", "got 1"),
    row("ce-batch-mismatch", "cross_entropy", (X, t2(0, 1, 2)), {}, LeanlossValueError,
        "target", "batch_size (4)", "(3,)", extra=("target batch_size (3)",)),
    row("ce-spatial-mismatch", "cross_entropy", (X3, torch.zeros(2, 5, dtype=torch.long)), {},
        LeanlossValueError, "target", "(2, 4)", "(2, 5)"),
    row("ce-multi-target", "cross_entropy", (X, T.unsqueeze(1)), {}, LeanlossValueError,
        "target", "(N,)", "(4, 1)"),
    row("ce-1d-input-long-target", "cross_entropy", (torch.randn(3), t2(0, 1)), {},
        LeanlossValueError, "target", "0-dim class index", "(2,)"),
    row("ce-0d-input", "cross_entropy", (torch.tensor(1.0), torch.tensor(0)), {},
        LeanlossValueError, "input", "1 or more dimensions", "got 0"),
    row("ce-weight-wrong-length", "cross_entropy", (X, T), {"weight": torch.ones(2)},
        LeanlossValueError, "weight", "(3,)", "(2,)"),
    row("ce-weight-3d", "cross_entropy", (X, T), {"weight": torch.ones(1, 1, 3)},
        LeanlossValueError, "weight", "(3,)", "(1, 1, 3)"),
    row("ce-weight-wrong-dtype", "cross_entropy", (X, T), {"weight": torch.ones(3, dtype=torch.float64)},
        LeanlossTypeError, "weight", "torch.float32", "torch.float64"),
    row("ce-weight-integer", "cross_entropy", (X, T), {"weight": torch.ones(3, dtype=torch.long)},
        LeanlossTypeError, "weight", "torch.float32", "torch.int64"),
    row("ce-weight-wrong-length-probability-target", "cross_entropy", (X, X.softmax(1)),
        {"weight": torch.ones(4)}, LeanlossValueError, "weight", "(3,)", "(4,)"),
    row("ce-unknown-reduction", "cross_entropy", (X, T), {"reduction": "avg"}, ValueError,
        "reduction", "'none', 'mean', 'sum'", "'avg'"),
    row("ce-label-smoothing-above-1", "cross_entropy", (X, T), {"label_smoothing": 1.5},
        LeanlossValueError, "label_smoothing", "[0, 1]", "1.5"),
    row("ce-label-smoothing-negative", "cross_entropy", (X, T), {"label_smoothing": -0.1},
        LeanlossValueError, "label_smoothing", "[0, 1]", "-0.1", torch_raises=False),
    row("ce-integer-logits", "cross_entropy", (X.long(), T), {}, UnsupportedDtypeError,
        "input", "floating-point", "torch.int64"),
    row("ce-boolean-logits", "cross_entropy", (X > 0, T), {}, UnsupportedDtypeError,
        "input", "floating-point", "torch.bool"),
    row("ce-target-on-other-device", "cross_entropy", (X, T.to(META)), {}, LeanlossValueError,
        "target", "same device", "meta"),
    row("ce-weight-on-other-device", "cross_entropy", (X, T), {"weight": torch.ones(3, device=META)},
        LeanlossValueError, "weight", "same device", "meta"),
    # ---------------------------------------------------------------- nll_loss
    row("nll-target-above-range", "nll_loss", (X.log_softmax(1), t2(0, 3, 1, 1)), {},
        TargetOutOfRangeError, "target", "[0, 2]", "got 3 at position (1,)"),
    row("nll-integer-input", "nll_loss", (X.long(), T), {}, UnsupportedDtypeError,
        "input", "floating-point", "torch.int64"),
    row("nll-0d-input", "nll_loss", (torch.tensor(1.0), torch.tensor(0)), {}, LeanlossValueError,
        "input", "1 or more dimensions", "got 0"),
    row("nll-probability-target", "nll_loss", (X.log_softmax(1), X.softmax(1)), {},
        LeanlossTypeError, "target", "int64 (Long)", "torch.float32"),
    row("nll-spatial-mismatch", "nll_loss", (X3, torch.zeros(2, dtype=torch.long)), {},
        LeanlossValueError, "target", "(2, 4)", "(2,)"),
    row("nll-weight-wrong-length", "nll_loss", (X.log_softmax(1), T), {"weight": torch.ones(5)},
        LeanlossValueError, "weight", "(3,)", "(5,)"),
    row("nll-unknown-reduction", "nll_loss", (X.log_softmax(1), T), {"reduction": "batchmean"},
        ValueError, "reduction", "'none', 'mean', 'sum'", "'batchmean'"),
    # ---------------------------------------------------------------- kl_div
    row("kl-integer-input", "kl_div", (torch.ones(3, dtype=torch.long), torch.ones(3)), {"reduction": "batchmean"},
        LeanlossTypeError, "input", "floating", "torch.int64"),
    row("kl-integer-target", "kl_div", (torch.zeros(3), torch.ones(3, dtype=torch.long)), {"reduction": "batchmean"},
        LeanlossTypeError, "target", "floating", "torch.int64"),
    row("kl-shape-mismatch", "kl_div", (X.log_softmax(1), torch.rand(4, 5)), {"reduction": "batchmean"},
        LeanlossValueError, "target", "broadcast", "(4, 5)"),
    row("kl-unknown-reduction", "kl_div", (X.log_softmax(1), X.softmax(1)), {"reduction": "bm"},
        ValueError, "reduction", "'batchmean'", "'bm'"),
    row("kl-target-on-other-device", "kl_div", (X.log_softmax(1), X.softmax(1).to(META)),
        {"reduction": "batchmean"}, LeanlossValueError, "target", "same device", "meta"),
    # ---------------------------------------------------------------- binary_cross_entropy
    row("bce-input-above-1", "binary_cross_entropy", (torch.tensor([0.5, 1.5]), torch.tensor([0.0, 1.0])),
        {}, LeanlossValueError, "input", "[0, 1]", "got 1.5 at position (1,)",
        extra=("binary_cross_entropy_with_logits",)),
    row("bce-logits-as-input", "binary_cross_entropy", (torch.tensor([[0.2, -0.7], [0.3, 0.1]]), P01[:2, :2]),
        {}, LeanlossValueError, "input", "[0, 1]", "got -0.7", extra=("with_logits",)),
    row("bce-nan-input", "binary_cross_entropy", (torch.tensor([0.5, float("nan")]), torch.tensor([0.0, 1.0])),
        {}, LeanlossValueError, "input", "[0, 1]", "got nan at position (1,)"),
    row("bce-shape-mismatch", "binary_cross_entropy", (torch.rand(3), torch.rand(4)), {},
        ValueError, "target", "same size", "(4,)"),
    row("bce-target-wrong-dtype", "binary_cross_entropy", (P, P01.double()), {}, LeanlossTypeError,
        "target", "torch.float32", "torch.float64"),
    row("bce-integer-target", "binary_cross_entropy", (P, P01.long()), {}, UnsupportedDtypeError,
        "target", "floating-point", "torch.int64"),
    row("bce-integer-input", "binary_cross_entropy", (P01.long(), P01), {}, UnsupportedDtypeError,
        "input", "floating-point", "torch.int64"),
    row("bce-weight-not-broadcastable", "binary_cross_entropy", (P, P01), {"weight": torch.ones(4)},
        LeanlossValueError, "weight", "(4, 3)", "(4,)"),
    # ---------------------------------------------------------------- binary_cross_entropy_with_logits
    row("bcel-shape-mismatch", "binary_cross_entropy_with_logits", (torch.randn(3), torch.rand(4)), {},
        ValueError, "target", "same as input size", "(4,)"),
    row("bcel-pos-weight-wrong-length", "binary_cross_entropy_with_logits", (X, P01),
        {"pos_weight": torch.ones(4)}, LeanlossValueError, "pos_weight", "one weight per class", "(4,)"),
    row("bcel-weight-wrong-length", "binary_cross_entropy_with_logits", (X, P01),
        {"weight": torch.ones(5)}, LeanlossValueError, "weight", "(4, 3)", "(5,)"),
    row("bcel-integer-logits", "binary_cross_entropy_with_logits", (X.long(), P01), {},
        UnsupportedDtypeError, "input", "floating-point", "torch.int64"),
    row("bcel-integer-target", "binary_cross_entropy_with_logits", (X, P01.long()), {},
        UnsupportedDtypeError, "target", "floating-point", "torch.int64"),
    row("bcel-unknown-reduction", "binary_cross_entropy_with_logits", (X, P01), {"reduction": None},
        ValueError, "reduction", "'none', 'mean', 'sum'", "None"),
    row("bcel-pos-weight-on-other-device", "binary_cross_entropy_with_logits", (X, P01),
        {"pos_weight": torch.ones(3, device=META)}, LeanlossValueError, "pos_weight", "same device", "meta"),
    # ---------------------------------------------------------------- cosine_embedding_loss
    row("cos-target-zero-one", "cosine_embedding_loss", (E1, E2, torch.tensor([1.0, 0.0, 1.0])), {},
        LeanlossValueError, "target", "only 1 (similar) or -1", "got 0 at position (1,)",
        torch_raises=False),
    row("cos-target-two", "cosine_embedding_loss", (E1, E2, torch.tensor([1, -1, 2])), {},
        LeanlossValueError, "target", "only 1 (similar) or -1", "got 2 at position (2,)",
        torch_raises=False),
    row("cos-target-2d", "cosine_embedding_loss", (E1, E2, Y.unsqueeze(1)), {}, LeanlossValueError,
        "target", "0D or 1D", "(3, 1)"),
    row("cos-inputs-3d", "cosine_embedding_loss", (E1.unsqueeze(2), E2.unsqueeze(2), Y), {},
        LeanlossValueError, "input1", "(N, D)", "[3, 4, 1]"),
    row("cos-feature-mismatch", "cosine_embedding_loss", (E1, torch.randn(3, 5), Y), {},
        LeanlossValueError, "input2", "(3, 4)", "(3, 5)"),
    row("cos-batch-mismatch", "cosine_embedding_loss", (E1, E2, Y[:2]), {}, LeanlossValueError,
        "target", "(3,)", "(2,)"),
    row("cos-unknown-reduction", "cosine_embedding_loss", (E1, E2, Y), {"reduction": "avg"},
        ValueError, "reduction", "'none', 'mean', 'sum'", "'avg'"),
    # ---------------------------------------------------------------- entropy (no torch twin)
    Bad("entropy-both-arguments", lambda: leanloss.entropy(logits=X, probs=P), ValueError,
        "logits", "exactly one", "'probs'", torch_raises=NO_TWIN),
    Bad("entropy-negative-probs", lambda: leanloss.entropy(probs=-P), LeanlossValueError,
        "probs", "non-negative", "at position (0, 0)", torch_raises=NO_TWIN),
    Bad("entropy-integer-logits", lambda: leanloss.entropy(logits=X.long()), UnsupportedDtypeError,
        "logits", "floating-point", "torch.int64", torch_raises=NO_TWIN),
    # ---------------------------------------------------------------- modules
    Bad("module-CrossEntropyLoss-weight-length", lambda: leanloss.CrossEntropyLoss(weight=torch.ones(2))(X, T),
        LeanlossValueError, "weight", "(3,)", "(2,)",
        torch_call=lambda: torch.nn.CrossEntropyLoss(weight=torch.ones(2))(X, T)),
    Bad("module-BCEWithLogitsLoss-pos-weight", lambda: leanloss.BCEWithLogitsLoss(pos_weight=torch.ones(5))(X, P01),
        LeanlossValueError, "pos_weight", "one weight per class", "(5,)",
        torch_call=lambda: torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones(5))(X, P01)),
]

# ------------------------------------------------------------------------------------------
# torch's own error inputs (ModuleInfo for CrossEntropyLoss / NLLLoss, OpInfo for
# linear_cross_entropy), rebuilt here with torch's regex for each
# ------------------------------------------------------------------------------------------


def _module_rows(dtype):
    name = str(dtype).split(".")[-1]
    ce = lambda x, t, **kw: (lambda: leanloss.CrossEntropyLoss(**kw)(x, t),
                             lambda: torch.nn.CrossEntropyLoss(**kw)(x, t))
    w_dtype = torch.float32 if dtype == torch.float16 else torch.float16
    specs = [
        ("soft-target-long", ce(torch.randn(2, 3, dtype=dtype), torch.zeros(2, 3, dtype=torch.long)),
         LeanlossTypeError, "target", "floating", "torch.int64",
         "Expected floating point type for target with class probabilities"),
        ("index-target-float", ce(torch.randn(2, 3, dtype=dtype), torch.randn(2, dtype=dtype)),
         LeanlossTypeError, "target", "int64 (Long)", str(dtype), "expected target dtype to be Long or Byte"),
        ("batch-size", ce(torch.randn(2, 3, dtype=dtype), torch.tensor([0, 1, 2])),
         LeanlossValueError, "target", "batch_size (2)", "(3,)",
         "Expected input batch_size .* to match target batch_size"),
        ("weight-shape", ce(torch.randn(2, 3, dtype=dtype), torch.tensor([0, 1]), weight=torch.randn(2, dtype=dtype)),
         LeanlossValueError, "weight", "(3,)", "(2,)",
         "weight tensor should be defined either for all .* classes or no classes"),
        ("prob-target-ignore-index", ce(torch.randn(2, 3, dtype=dtype), torch.randn(2, 3, dtype=dtype).softmax(1), ignore_index=1),
         LeanlossValueError, "ignore_index", "default", "got 1", "ignore_index is not supported for floating point target"),
        ("label-smoothing", ce(torch.randn(2, 3, dtype=dtype), torch.tensor([0, 1]), label_smoothing=1.5),
         LeanlossValueError, "label_smoothing", "[0, 1]", "1.5", "label_smoothing must be between 0.0 and 1.0"),
        ("target-size", ce(torch.randn(2, 3, 5, dtype=dtype), torch.zeros(2, 4, dtype=torch.long)),
         LeanlossValueError, "target", "(2, 5)", "(2, 4)", "Expected target size"),
    ]
    rows = [
        Bad(f"moduleinfo-CrossEntropyLoss-{sid}-{name}", ours, exc, arg, expect, got, torch_call=theirs,
            torch_regex=regex)
        for sid, (ours, theirs), exc, arg, expect, got, regex in specs
    ]
    empty = torch.empty(0, 0, dtype=dtype), torch.empty(0, dtype=torch.long)
    weight = torch.empty(0, dtype=w_dtype)
    rows.append(Bad(
        f"moduleinfo-NLLLoss-weight-dtype-{name}", lambda: leanloss.NLLLoss(weight=weight)(*empty),
        LeanlossTypeError, "weight", str(dtype), str(w_dtype),
        torch_call=lambda: torch.nn.NLLLoss(weight=weight)(*empty),
        torch_regex=r"expected scalar type \w+ but found \w+",
    ))
    return rows


for _dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    CATALOGUE += _module_rows(_dtype)


def _lce(*args, **kwargs):
    """(leanloss.linear_cross_entropy, torch's linear_cross_entropy) on the same inputs."""
    bias = kwargs.pop("bias", None)
    return (
        lambda: leanloss.linear_cross_entropy(*args, bias=bias, **kwargs),
        lambda: F.linear_cross_entropy(*args, linear_bias=bias, **kwargs),
    )


def _linear_rows():
    f = lambda *shape: torch.randn(*shape)
    lng = lambda *shape: torch.zeros(*shape, dtype=torch.long)
    specs = [
        # torch's OpInfo error inputs (its linear_cross_entropy allows (N, D) or (D) input only;
        # leanloss allows any leading shape, so the 3-D case fails on the target shape instead)
        ("opinfo-3d-input", _lce(f(2, 3, 3), f(2, 3), f(3, 2)), LeanlossTypeError, "target", "int64", "torch.float32"),
        ("opinfo-3d-input-long-target", _lce(f(2, 3, 3), f(2, 3), lng(3, 2)), LeanlossValueError,
         "target", "(2, 3)", "(3, 2)"),
        ("opinfo-1d-weight", _lce(f(2, 3), f(2), lng(2)), LeanlossValueError, "weight", "(V, D)", "(2,)"),
        ("opinfo-hidden-weight-mismatch", _lce(f(2, 3), f(2, 4), lng(2)), LeanlossValueError,
         "weight", "D = hidden.shape[-1] = 3", "(2, 4)"),
        ("opinfo-probability-target-ignore-index", _lce(f(2, 3), f(2, 3), f(2, 2), ignore_index=0),
         LeanlossTypeError, "target", "int64", "torch.float32"),
        ("opinfo-3d-weight", _lce(f(3), f(2, 4, 3), lng(2, 4)), LeanlossValueError, "weight", "(V, D)", "(2, 4, 3)"),
        ("opinfo-bias-shape", _lce(f(2, 3), f(2, 3), lng(2), bias=f(3)), LeanlossValueError, "bias", "(2,)", "(3,)"),
        # leanloss's own
        ("target-out-of-vocab", _lce(f(4, 3), f(5, 3), torch.tensor([0, 4, 5, 1])), TargetOutOfRangeError,
         "target", "[0, 4]", "got 5 at position (2,)"),
        ("target-batch-mismatch", _lce(f(4, 3), f(5, 3), lng(3)), LeanlossValueError, "target", "(4,)", "(3,)"),
        ("weight-dtype", _lce(f(4, 3), f(5, 3).double(), lng(4)), LeanlossTypeError, "weight", "torch.float32", "torch.float64"),
        ("integer-hidden", _lce(lng(4, 3), f(5, 3), lng(4)), UnsupportedDtypeError, "hidden", "floating-point", "torch.int64"),
        ("class-weight-length", _lce(f(4, 3), f(5, 3), lng(4), weight=torch.ones(4)), LeanlossValueError,
         "class_weight", "(5,)", "(4,)"),
    ]
    rows = []
    for sid, (ours, theirs), exc, arg, expect, got, *kw in specs:
        if sid == "class-weight-length":  # leanloss calls it class_weight; torch calls it weight
            ours = lambda: leanloss.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3),
                                                         torch.zeros(4, dtype=torch.long),
                                                         class_weight=torch.ones(4))
        rows.append(Bad(f"linear_cross_entropy-{sid}", ours, exc, arg, expect, got, torch_call=theirs))
    rows += [
        Bad("linear_cross_entropy-softcap-zero",
            lambda: leanloss.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long), softcap=0.0),
            LeanlossValueError, "softcap", "positive", "got 0.0", torch_raises=NO_TWIN),
        Bad("linear_cross_entropy-negative-z-loss",
            lambda: leanloss.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long), z_loss=-1.0),
            LeanlossValueError, "z_loss", "[0.0, inf]", "got -1.0", torch_raises=NO_TWIN),
    ]
    return rows


CATALOGUE += _linear_rows()

# ------------------------------------------------------------------------------------------
# distillation (no torch twin)
# ------------------------------------------------------------------------------------------
S, TCH = torch.randn(4, 6), torch.randn(4, 6)
H, W = torch.randn(4, 3), torch.randn(6, 3)


def _distill(**kw):
    return lambda: leanloss.distill_loss(S, TCH, **kw)


def _linear_distill(*args, **kw):
    return lambda: leanloss.linear_distill_loss(*args, **kw)


CATALOGUE += [
    Bad("distill-temperature-zero", _distill(temperature=0.0), LeanlossValueError, "temperature",
        "positive", "got 0.0", torch_raises=NO_TWIN),
    Bad("distill-temperature-negative", _distill(temperature=-2.0), LeanlossValueError, "temperature",
        "positive", "got -2.0", torch_raises=NO_TWIN),
    Bad("distill-beta-above-1", _distill(kind="jsd", beta=1.5), LeanlossValueError, "beta",
        "[0", "got 1.5", torch_raises=NO_TWIN),
    Bad("distill-beta-negative", _distill(kind="jsd", beta=-0.1), LeanlossValueError, "beta",
        "[0", "got -0.1", torch_raises=NO_TWIN),
    Bad("distill-unknown-kind", _distill(kind="kl"), ValueError, "kind", "'forward'", "'kl'",
        torch_raises=NO_TWIN),
    Bad("distill-teacher-shape", lambda: leanloss.distill_loss(S, torch.randn(4, 7)), LeanlossValueError,
        "teacher_logits", "(4, 6)", "(4, 7)", torch_raises=NO_TWIN),
    Bad("distill-target-out-of-range", lambda: leanloss.distill_loss(S, TCH, torch.tensor([0, 1, 6, 2]), hard_weight=0.5),
        TargetOutOfRangeError, "target", "[0, 5]", "got 6 at position (2,)", torch_raises=NO_TWIN),
    Bad("jsd-beta-above-1", lambda: leanloss.jsd(S.log_softmax(1), TCH.log_softmax(1), beta=2.0, log_target=True),
        LeanlossValueError, "beta", "[0", "got 2.0", torch_raises=NO_TWIN),
    Bad("linear-distill-hidden-weight-mismatch", _linear_distill(H, torch.randn(6, 2), H, W),
        LeanlossValueError, "student_weight", "(V, D)", "(6, 2)", torch_raises=NO_TWIN,
        extra=("'student_hidden'", "(4, 3)")),
    Bad("linear-distill-teacher-vocab", _linear_distill(H, W, H, torch.randn(7, 3)),
        LeanlossValueError, "teacher_weight", "vocabulary size 6", "(7, 3)", torch_raises=NO_TWIN),
    Bad("linear-distill-temperature", _linear_distill(H, W, H, W, temperature=0),
        LeanlossValueError, "temperature", "positive", "got 0", torch_raises=NO_TWIN),
    Bad("linear-distill-beta", _linear_distill(H, W, H, W, kind="jsd", beta=1.01),
        LeanlossValueError, "beta", "[0", "got 1.01", torch_raises=NO_TWIN),
]


# ------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------


def _check_message(case: Bad, err: BaseException) -> None:
    msg = str(err)
    assert f"'{case.arg}'" in msg, f"message does not name argument '{case.arg}': {msg}"
    for fragment in (case.expect, case.got, *case.extra):
        assert fragment in msg, f"message lacks {fragment!r}: {msg}"
    if case.torch_regex is not None:
        assert re.search(case.torch_regex, msg), f"message does not match torch's {case.torch_regex!r}: {msg}"


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input(case: Bad):
    with pytest.raises(case.exc) as info:
        case.call()
    _check_message(case, info.value)
    if case.torch_raises is None:
        return
    if case.id.startswith("linear_cross_entropy-") and not hasattr(F, "linear_cross_entropy"):
        pytest.skip(f"torch {torch.__version__} has no F.linear_cross_entropy (later torch versions add it) "
                    "to compare the error class with; leanloss's error and message were checked")
    if case.torch_raises:
        with pytest.raises(Exception) as theirs:
            case.torch_call()
        assert isinstance(info.value, type(theirs.value)), (
            f"torch raises {type(theirs.value).__name__}, leanloss {type(info.value).__name__} "
            f"(MRO {[k.__name__ for k in type(info.value).__mro__]})"
        )
    else:
        case.torch_call()  # torch accepts it: leanloss is stricter on purpose


def test_catalogue_is_large_and_unique():
    ids = [c.id for c in CATALOGUE]
    assert len(set(ids)) == len(ids)
    assert len(ids) >= 40


def test_every_public_loss_is_in_the_catalogue():
    names = {
        "cross_entropy", "nll_loss", "kl_div", "binary_cross_entropy", "binary_cross_entropy_with_logits",
        "cosine_embedding_loss", "entropy", "linear_cross_entropy", "distill_loss", "jsd",
        "linear_distill_loss", "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
    }
    prefixes = {"ce": "cross_entropy", "nll": "nll_loss", "kl": "kl_div", "bce": "binary_cross_entropy",
                "bcel": "binary_cross_entropy_with_logits", "cos": "cosine_embedding_loss",
                "entropy": "entropy", "linear_cross_entropy": "linear_cross_entropy",
                "distill": "distill_loss", "jsd": "jsd", "linear-distill": "linear_distill_loss",
                "moduleinfo": "cross_entropy"}
    covered = {full for c in CATALOGUE for p, full in prefixes.items() if c.id.startswith(p + "-")}
    covered |= {c.__name__ for c in PARALLEL_CALLS}
    assert names <= covered, names - covered


# ------------------------------------------------------------------------------------------
# the parallel losses in a world of one rank (gloo): global target ids out of the vocabulary
# ------------------------------------------------------------------------------------------
PARALLEL_CALLS = (parallel.vocab_parallel_cross_entropy, parallel.vocab_parallel_linear_cross_entropy)


@pytest.fixture(scope="module")
def gloo_world_of_one():
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield None
    if created:
        dist.destroy_process_group()


def _parallel_args(fn, target, **kw):
    if fn is parallel.vocab_parallel_cross_entropy:
        return (torch.randn(4, 5), target), kw
    return (torch.randn(4, 3), torch.randn(5, 3), target), kw


@pytest.mark.parametrize("fn", PARALLEL_CALLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "target, exc, arg, expect, got",
    [
        (torch.tensor([0, 1, 5, 2]), TargetOutOfRangeError, "target", "[0, 4]", "got 5 at position (2,)"),
        (torch.tensor([0, -3, 1, 2]), TargetOutOfRangeError, "target", "[0, 4]", "got -3 at position (1,)"),
        (torch.tensor([0.0, 1.0, 1.0, 2.0]), LeanlossTypeError, "target", "int64 (Long)", "torch.float32"),
        (torch.tensor([0, 1, 2]), LeanlossValueError, "target", "(4,)", "(3,)"),
    ],
    ids=["above-vocab", "negative", "float-target", "batch-mismatch"],
)
def test_parallel_bad_targets(gloo_world_of_one, fn, target, exc, arg, expect, got):
    args, kw = _parallel_args(fn, target)
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    _check_message(Bad("parallel", lambda: None, exc, arg, expect, got), info.value)


def test_parallel_linear_hidden_weight_mismatch(gloo_world_of_one):
    with pytest.raises(LeanlossValueError) as info:
        parallel.vocab_parallel_linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 2), torch.zeros(4, dtype=torch.long))
    _check_message(Bad("p", lambda: None, LeanlossValueError, "local_weight", "D = hidden.shape[-1] = 3", "(5, 2)"), info.value)


@pytest.mark.parametrize("fn", PARALLEL_CALLS, ids=lambda f: f.__name__)
def test_parallel_label_smoothing_and_class_weight(gloo_world_of_one, fn):
    args, _ = _parallel_args(fn, torch.zeros(4, dtype=torch.long))
    with pytest.raises(LeanlossValueError) as info:
        fn(*args, label_smoothing=2.0)
    _check_message(Bad("p", lambda: None, LeanlossValueError, "label_smoothing", "[0, 1]", "2.0"), info.value)
    with pytest.raises(LeanlossValueError) as info:
        fn(*args, class_weight=torch.ones(3))
    _check_message(Bad("p", lambda: None, LeanlossValueError, "class_weight", "(5,)", "(3,)"), info.value)


# ------------------------------------------------------------------------------------------
# check modes change what is checked, not the errors' classes
# ------------------------------------------------------------------------------------------


def test_value_errors_need_full_mode():
    """'shapes' skips the checks that read values (no sync); metadata errors stay."""
    with leanloss.checks("shapes"):
        leanloss.cosine_embedding_loss(E1, E2, torch.tensor([1.0, 0.0, 1.0]))  # value check: skipped
        with pytest.raises(LeanlossValueError):
            leanloss.cross_entropy(X, t2(0, 1, 2))  # shape check: kept


def test_messages_point_at_torch_phrasing_for_out_of_range():
    """The out-of-range message starts as torch's ("Target 7 is out of bounds")."""
    with pytest.raises(IndexError) as ours:
        leanloss.cross_entropy(X, t2(0, 1, 2, 7))
    with pytest.raises(IndexError) as theirs:
        F.cross_entropy(X, t2(0, 1, 2, 7))
    assert str(theirs.value).split(".")[0] in str(ours.value)


@pytest.mark.parametrize("fname", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_1d_input_accepts_a_target_of_shape_1_like_torch(fname, reduction):
    """Checks must not reject what torch accepts: a (C) input with a (1,) target."""
    x = torch.randn(5, dtype=torch.float64)
    with leanloss.checks("shapes"):  # nll_loss on raw scores would (rightly) warn
        ours = getattr(leanloss, fname)(x, torch.tensor([3]), reduction=reduction)
    try:
        theirs = getattr(F, fname)(x, torch.tensor([3]), reduction=reduction)
    except RuntimeError as exc:
        # torch 2.5 rejects this pair ("size mismatch (got input: [5], target: [1])"); torch 2.13
        # accepts it as the unbatched () target, and leanloss follows the newer torch
        assert "size mismatch" in str(exc)
        theirs = getattr(F, fname)(x, torch.tensor(3), reduction=reduction)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, bases", [
    ("InputWarning", (UserWarning,)),
    ("LeanlossValueError", (ValueError, RuntimeError)),
    ("LeanlossTypeError", (TypeError, RuntimeError)),
    ("TargetOutOfRangeError", (IndexError, ValueError)),
    ("UnsupportedDtypeError", (LeanlossTypeError, NotImplementedError, RuntimeError)),
])
def test_error_classes_live_in_the_public_errors_module(name, bases):
    from leanloss import _checks, errors

    cls = getattr(errors, name)
    assert cls is getattr(leanloss, name) is getattr(_checks, name) and name in errors.__all__
    assert all(issubclass(cls, base) for base in bases), cls.__mro__
    assert "What to do" in (cls.__doc__ or ""), f"{name}'s docstring says when it is raised and what to do"
