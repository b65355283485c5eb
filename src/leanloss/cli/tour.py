"""``leanloss tour``: the classic lessons about these losses, run live, leanloss next to torch.

Every row computes a value with leanloss and the same value with torch (and, in the "lesson"
column, the textbook value where the lesson has one, for reference); a check mark means leanloss
agrees with torch. The tour exits non-zero when any row disagrees. Output fits 100 columns.

Steps: 1 cross entropy, 2 log_softmax + NLL, 3 KL divergence and entropy, 4 binary cross
entropy, 5 cosine embedding loss, 6 the loss-input confusion cheatsheet, 7 fused linear cross
entropy against the dense loss.
"""
from __future__ import annotations

import math
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor

import leanloss

from . import identities
from .bench import harness

WIDTH = 100
LABEL_W = 30
VALUE_W = 21
# Character slices of a value row (used by tests to read the columns back).
LEANLOSS_COL = slice(2 + LABEL_W + 1, 2 + LABEL_W + 1 + VALUE_W)
TORCH_COL = slice(LEANLOSS_COL.stop + 1, LEANLOSS_COL.stop + 1 + VALUE_W)
LESSON_COL = slice(TORCH_COL.stop + 1, TORCH_COL.stop + 1 + VALUE_W)
OK, BAD, SILENT = "✓", "✗", "!"


def _shortest(x: float) -> str:
    """``repr(x)``, or where that is wider than a column the shortest scientific form that
    still reads back as exactly ``x`` (``1.3624693383462727e-4``)."""
    text = repr(x)
    if len(text) <= VALUE_W or not math.isfinite(x):
        return text
    for digits in range(17):
        text = f"{x:.{digits}e}"
        if float(text) == x:
            break
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def _fmt(value) -> str:
    """A value for one column: floats with full precision (``repr``), short vectors with 6
    significant digits, strings as they are; cut to the column width."""
    if isinstance(value, Tensor):
        value = value.detach()
        if value.numel() == 1:
            value = float(value)
        else:
            items = [f"{float(v):.6g}" for v in value.flatten()[:3]]
            text = "[" + ", ".join(items) + (", …]" if value.numel() > 3 else "]")
            value = text
    if isinstance(value, float):
        value = _shortest(value)
    text = "" if value is None else str(value)
    return text if len(text) <= VALUE_W else text[: VALUE_W - 1] + "…"


def _agree(ours, theirs, rtol: float, atol: float) -> bool:
    if isinstance(ours, Tensor) and isinstance(theirs, Tensor):
        a, b = ours.detach().double(), theirs.detach().double()
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return math.isclose(ours, theirs, rel_tol=rtol, abs_tol=atol) or (ours != ours and theirs != theirs)
    return ours == theirs


@dataclass
class Report:
    """Prints rows and notes at a fixed width and remembers which rows disagreed."""

    out: Optional[TextIO] = None  # None: sys.stdout at the time of printing
    failures: List[str] = field(default_factory=list)
    silent: List[str] = field(default_factory=list)
    shown: set = field(default_factory=set)

    def line(self, text: str = "") -> None:
        print(text[:WIDTH], file=self.out or sys.stdout)

    def header(self, number: int, title: str) -> None:
        head = f"── {number}. {title} "
        self.line()
        self.line(head + "─" * (WIDTH - len(head)))

    def columns(self, first: str = "", a: str = "leanloss", b: str = "torch", c: str = "lesson") -> None:
        self.line(f"  {first:<{LABEL_W}} {a:>{VALUE_W}} {b:>{VALUE_W}} {c:>{VALUE_W}}")

    def note(self, text: str, indent: str = "  ") -> None:
        for para in text.split("\n"):
            for piece in textwrap.wrap(para, WIDTH - len(indent) - 2) or [""]:
                self.line(indent + piece)

    def row(self, label: str, ours, theirs, lesson=None, *, ok: Optional[bool] = None,
            rtol: float = 1e-5, atol: float = 1e-7) -> bool:
        """One value row; ``ok`` defaults to leanloss agreeing with torch (``allclose``)."""
        if ok is None:
            ok = _agree(ours, theirs, rtol, atol)
        mark = OK if ok else BAD
        if not ok:
            self.failures.append(label)
        self.line(f"  {label:<{LABEL_W}.{LABEL_W}} {_fmt(ours):>{VALUE_W}} {_fmt(theirs):>{VALUE_W}} "
                  f"{_fmt(lesson):>{VALUE_W}} {mark}")
        return ok

    def info(self, label: str, ours, theirs, extra: str = "") -> None:
        """A row that informs without checking (no mark)."""
        self.line(f"  {label:<{LABEL_W}.{LABEL_W}} {_fmt(ours):>{VALUE_W}} {_fmt(theirs):>{VALUE_W}} "
                  f"{_fmt(extra):>{VALUE_W}}")

    def warnings_from(self, caught) -> None:
        """Show leanloss's InputWarnings raised while computing the rows above (each message
        once per tour)."""
        for w in caught:
            message = str(w.message)
            if issubclass(w.category, leanloss.InputWarning) and message not in self.shown:
                self.shown.add(message)
                self.note(f"leanloss warns: {message}", indent="    ⚠ ")


def _leanloss_warnings():
    """Record warnings; torch's own UserWarnings are dropped, leanloss's are kept for display."""
    ctx = warnings.catch_warnings(record=True)
    caught = ctx.__enter__()
    warnings.simplefilter("always")
    return ctx, caught


# --------------------------------------------------------------------------------------------
# the lessons' example inputs
# --------------------------------------------------------------------------------------------

UNSURE_LOGITS = [[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]
CONFIDENT_LOGITS = [[0.0, 0.0, 10.0, 0.0], [0.0, 0.0, 0.0, 10.0]]
CLASS_TARGETS = [2, 3]
BCE_TARGETS = [1.0, 0.0]
BCE_WRONG, BCE_RIGHT = [0.3, 0.7], [0.9, 0.1]
LOGITS_WRONG, LOGITS_RIGHT = [-50.0, 50.0], [50.0, -50.0]
LESSON_VALUES = {  # the lessons' reference values, shown beside; rows check against torch
    "ce_unsure": 1.5649813413619995,
    "ce_confident": 0.00013624693383462727,
    "bce_wrong": 1.2039728164672852,
    "bce_right": 0.10536053031682968,
    "bcel_wrong": 50.0,
    "bcel_right": 9.643749466768692e-23,
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------


def step_cross_entropy(r: Report) -> None:
    r.note("cross_entropy takes logits; targets are class indices (N,) or probabilities (N, C).")
    r.columns("cross_entropy(x, y)")
    y = torch.tensor(CLASS_TARGETS)
    unsure, confident = torch.tensor(UNSURE_LOGITS), torch.tensor(CONFIDENT_LOGITS)
    ctx, caught = _leanloss_warnings()
    try:
        r.row("unsure logits, y=[2, 3]", leanloss.cross_entropy(unsure, y), F.cross_entropy(unsure, y),
              LESSON_VALUES["ce_unsure"])
        r.row("confident (10 on y), y=[2, 3]", leanloss.cross_entropy(confident, y),
              F.cross_entropy(confident, y), LESSON_VALUES["ce_confident"])
        onehot = F.one_hot(y, 4).float()
        same = identities.onehot_ce_equals_index_ce(confident, y)
        r.row("one-hot probability targets", same.lhs, F.cross_entropy(confident, onehot))
        r.row("  = index targets", same.lhs, F.cross_entropy(confident, y), ok=same.holds()
              and _agree(same.lhs, F.cross_entropy(confident, y), 1e-5, 1e-9))
        x, t = torch.randn(2, 4, generator=_gen(1)), torch.randn(2, 4, generator=_gen(2)).softmax(-1)
        r.row("soft targets softmax(randn)", leanloss.cross_entropy(x, t), F.cross_entropy(x, t))
        r.row("  per sample (reduction=none)", leanloss.cross_entropy(x, t, reduction="none"),
              F.cross_entropy(x, t, reduction="none"))
    finally:
        ctx.__exit__(None, None, None)
    r.warnings_from(caught)
    r.note("Uniform scores give a loss near log 4 = 1.386; confident right answers a loss near 0. "
           "The lesson's 'unsure logits' rows happen to sum to 1, which is why leanloss asks "
           "whether they are probabilities.")


def step_nll(r: Report) -> None:
    r.note("nll_loss takes log-probabilities: nll_loss(log_softmax(x), y) is cross_entropy(x, y).")
    r.columns("nll_loss(...)")
    y = torch.tensor(CLASS_TARGETS)
    x = torch.tensor(UNSURE_LOGITS)
    ctx, caught = _leanloss_warnings()
    try:
        lsm = torch.log_softmax(x, dim=1)
        r.row("nll(log_softmax(x), y)", leanloss.nll_loss(lsm, y), F.nll_loss(lsm, y), LESSON_VALUES["ce_unsure"])
        ident = identities.log_softmax_nll_equals_ce(x, y)
        r.row("  = cross_entropy(x, y)", ident.rhs, F.cross_entropy(x, y), ok=ident.holds()
              and _agree(ident.rhs, F.cross_entropy(x, y), 1e-5, 1e-9))
        eps = torch.log(torch.softmax(x, dim=1) + 1e-7)
        close = leanloss.nll_loss(eps, y)
        r.row("nll(log(softmax(x) + 1e-7), y)", close, F.nll_loss(eps, y))
        r.note(f"log(softmax + 1e-7) is only close: it differs from cross_entropy by "
               f"{abs(float(close) - float(ident.rhs)):.3g}. Where the model is confidently wrong "
               f"the 1e-7 caps the loss at -log(1e-7) = {-math.log(1e-7):.4g}:")
        wrong, y1 = torch.tensor([[20.0, 0.0, 0.0, 0.0]]), torch.tensor([1])
        r.row("CE, x=[20, 0, 0, 0], y=1", leanloss.cross_entropy(wrong, y1), F.cross_entropy(wrong, y1))
        capped = torch.log(torch.softmax(wrong, dim=1) + 1e-7)
        r.row("  nll(log(softmax + 1e-7))", leanloss.nll_loss(capped, y1), F.nll_loss(capped, y1))
    finally:
        ctx.__exit__(None, None, None)
    r.warnings_from(caught)


def step_kl(r: Report) -> None:
    r.note("kl_div(input, target): input log q (log-probabilities), target p (probabilities, or log p "
           "with log_target=True); KL(p || q) = sum p (log p - log q).")
    r.columns("kl_div / entropy")
    x, t = torch.randn(2, 4, generator=_gen(3)), torch.randn(2, 4, generator=_gen(4))
    log_q, p = torch.log_softmax(x, -1), torch.softmax(t, -1)
    ctx, caught = _leanloss_warnings()
    try:
        r.row("kl_div(log q, p) 'mean'", leanloss.kl_div(log_q, p), F.kl_div(log_q, p))
        bm = F.kl_div(log_q, p, reduction="batchmean")
        r.row("kl_div(log q, p) 'batchmean'", leanloss.kl_div(log_q, p, reduction="batchmean"), bm)
        ident = identities.kl_batchmean_equals_mean_times_classes(log_q, p)
        r.row("  = 'mean' x C (C=4)", ident.rhs, bm, ok=ident.holds() and _agree(ident.rhs, bm, 1e-5, 1e-9))
        lt = identities.kl_log_target_equals_prob_target(log_q, p)
        r.row("log_target=True on log p", lt.lhs,
              F.kl_div(log_q, torch.log(p), reduction="batchmean", log_target=True),
              ok=lt.holds() and _agree(lt.lhs, bm, 1e-5, 1e-9))
        ce = F.cross_entropy(x, p, reduction="none")
        r.row("CE H(p, q) per sample", leanloss.cross_entropy(x, p, reduction="none"), ce)
        decomposed = identities.ce_equals_entropy_plus_kl(p, x)
        r.row("  = H(p) + KL(p || q)", decomposed.rhs, ce, ok=decomposed.holds() and _agree(decomposed.rhs, ce, 1e-5, 1e-7))
        ent = identities.entropy_equals_categorical(p)
        r.row("entropy H(p) vs Categorical", ent.lhs, ent.rhs)
        zero = torch.tensor([0.5, 0.5, 0.0, 0.0])
        r.row("entropy of [.5, .5, 0, 0]", leanloss.entropy(probs=zero),
              torch.distributions.Categorical(probs=zero).entropy())
    finally:
        ctx.__exit__(None, None, None)
    r.warnings_from(caught)
    r.note("'mean' averages over all N*C elements, so it is KL / C; 'batchmean' is the KL per sample. "
           "Since H(p) does not depend on the model, minimizing CE and minimizing KL are the same.")


def step_bce(r: Report) -> None:
    r.note("binary_cross_entropy takes probabilities (sigmoid outputs); the _with_logits form takes "
           "logits and stays exact where the sigmoid saturates.")
    r.columns("binary cross entropy")
    t = torch.tensor(BCE_TARGETS)
    wrong, right = torch.tensor(BCE_WRONG), torch.tensor(BCE_RIGHT)
    lw, lr = torch.tensor(LOGITS_WRONG), torch.tensor(LOGITS_RIGHT)
    ctx, caught = _leanloss_warnings()
    try:
        r.row("bce([0.3, 0.7], [1, 0])", leanloss.binary_cross_entropy(wrong, t),
              F.binary_cross_entropy(wrong, t), LESSON_VALUES["bce_wrong"])
        r.row("bce([0.9, 0.1], [1, 0])", leanloss.binary_cross_entropy(right, t),
              F.binary_cross_entropy(right, t), LESSON_VALUES["bce_right"])
        two = identities.bce_equals_two_class_nll(wrong, t)
        ref = F.binary_cross_entropy(wrong, t)
        r.row("  = two-class nll_loss", two.rhs, ref, ok=two.holds() and _agree(two.rhs, ref, 1e-5, 1e-9))
        r.row("bce_logits([-50, 50], [1, 0])", leanloss.binary_cross_entropy_with_logits(lw, t),
              F.binary_cross_entropy_with_logits(lw, t), LESSON_VALUES["bcel_wrong"])
        r.row("bce_logits([50, -50], [1, 0])", leanloss.binary_cross_entropy_with_logits(lr, t),
              F.binary_cross_entropy_with_logits(lr, t), LESSON_VALUES["bcel_right"], rtol=1e-5, atol=0.0)
        r.row("  sigmoid + bce, [-50, 50]", leanloss.binary_cross_entropy(torch.sigmoid(lw), t),
              F.binary_cross_entropy(torch.sigmoid(lw), t))
        r.row("  sigmoid + bce, [50, -50]", leanloss.binary_cross_entropy(torch.sigmoid(lr), t),
              F.binary_cross_entropy(torch.sigmoid(lr), t))
        x = torch.randn(6, generator=_gen(5))
        t6 = (torch.rand(6, generator=_gen(6)) > 0.5).float()
        same = identities.bce_with_logits_equals_sigmoid_bce(x, t6)
        ref = F.binary_cross_entropy_with_logits(x, t6)
        r.row("bce_logits = sigmoid + bce", same.lhs, ref, ok=same.holds() and _agree(same.lhs, ref, 1e-5, 1e-9))
    finally:
        ctx.__exit__(None, None, None)
    r.warnings_from(caught)
    r.note("At |x| = 50 float32's sigmoid rounds to exactly 0 or 1: sigmoid + BCE gives 75 (one log "
           "clamped at -100) and 0.0 instead of 50 and 9.64e-23.")


def step_cosine(r: Report) -> None:
    r.note("cosine_embedding_loss(a, b, y): 1 - cos(a, b) for y = 1, max(0, cos(a, b) - margin) for "
           "y = -1. y must be 1 or -1.")
    r.columns("cosine_embedding_loss")
    a = torch.randn(2, 512, generator=_gen(7))
    b = a + 0.8 * torch.randn(2, 512, generator=_gen(8))  # similar pairs: cos about 0.78
    pos, neg, mixed = torch.tensor([1, 1]), torch.tensor([-1, -1]), torch.tensor([1, -1])
    ctx, caught = _leanloss_warnings()
    try:
        r.row("y = [1, 1]", leanloss.cosine_embedding_loss(a, b, pos), F.cosine_embedding_loss(a, b, pos))
        r.row("y = [-1, -1]", leanloss.cosine_embedding_loss(a, b, neg), F.cosine_embedding_loss(a, b, neg))
        r.row("y = [-1, -1], margin 0.5", leanloss.cosine_embedding_loss(a, b, neg, margin=0.5),
              F.cosine_embedding_loss(a, b, neg, margin=0.5))
        r.row("y = [1, -1], margin 0.5, none",
              leanloss.cosine_embedding_loss(a, b, mixed, margin=0.5, reduction="none"),
              F.cosine_embedding_loss(a, b, mixed, margin=0.5, reduction="none"))
    finally:
        ctx.__exit__(None, None, None)
    r.warnings_from(caught)
    r.note(f"cos(a, b) = {F.cosine_similarity(a, b).tolist()[0]:.4f}, "
           f"{F.cosine_similarity(a, b).tolist()[1]:.4f}: similar pairs cost little as positives and "
           "cos - margin as negatives.")


@dataclass
class Confusion:
    title: str
    torch_call: Callable[[], Tensor]
    leanloss_call: Callable[[], Tensor]
    advice: str


def _outcome(call: Callable[[], Tensor]):
    """(value or None, exception or None, InputWarnings) of one call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value, error = call(), None
        except Exception as exc:  # noqa: BLE001 - shown to the reader
            value, error = None, exc
    found = [w for w in caught if issubclass(w.category, leanloss.InputWarning)]
    return value, error, found


def _confusions() -> List[Confusion]:
    g = _gen(9)
    logits = torch.randn(4, 5, generator=g) * 2
    y = torch.tensor([0, 3, 1, 4])
    probs = logits.softmax(-1)
    bl = torch.randn(4, 8, generator=g) * 2  # a batch of 4 samples x 8 binary labels
    bt = (torch.rand(4, 8, generator=g) > 0.5).float()
    log_q, p = torch.randn(4, 5, generator=g).log_softmax(-1), torch.randn(4, 5, generator=g).softmax(-1)
    v1, v2 = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    y01 = torch.tensor([1, 0, 1, 0])
    nan_logits = logits.clone()
    nan_logits[1, 2] = float("nan")
    return [
        Confusion("probs into cross_entropy", lambda: F.cross_entropy(probs, y),
                  lambda: leanloss.cross_entropy(probs, y), "pass logits"),
        Confusion("raw scores into nll_loss", lambda: F.nll_loss(logits, y),
                  lambda: leanloss.nll_loss(logits, y), "apply log_softmax first"),
        Confusion("probs into nll_loss", lambda: F.nll_loss(probs, y),
                  lambda: leanloss.nll_loss(probs, y), "take the log first"),
        Confusion("logits into BCE", lambda: F.binary_cross_entropy(bl, bt),
                  lambda: leanloss.binary_cross_entropy(bl, bt), "use the with_logits form"),
        Confusion("sigmoid probs into BCE-logits",
                  lambda: F.binary_cross_entropy_with_logits(torch.sigmoid(bl), bt),
                  lambda: leanloss.binary_cross_entropy_with_logits(torch.sigmoid(bl), bt),
                  "pass the logits"),
        Confusion("probs as kl_div input", lambda: F.kl_div(log_q.exp(), p, reduction="batchmean"),
                  lambda: leanloss.kl_div(log_q.exp(), p, reduction="batchmean"), "pass log q"),
        Confusion("log p target, log_target=False", lambda: F.kl_div(log_q, p.log(), reduction="batchmean"),
                  lambda: leanloss.kl_div(log_q, p.log(), reduction="batchmean"), "log_target=True"),
        Confusion("kl_div reduction='mean'", lambda: F.kl_div(log_q, p),
                  lambda: leanloss.kl_div(log_q, p), "use 'batchmean'"),
        Confusion("logits as probability targets", lambda: F.cross_entropy(logits, logits),
                  lambda: leanloss.cross_entropy(logits, logits), "softmax the target"),
        Confusion("cosine targets 0/1, not -1/1", lambda: F.cosine_embedding_loss(v1, v2, y01),
                  lambda: leanloss.cosine_embedding_loss(v1, v2, y01), "use -1 for dissimilar"),
        Confusion("NaN in the logits", lambda: F.cross_entropy(nan_logits, y),
                  lambda: leanloss.cross_entropy(nan_logits, y), "fix the model"),
    ]


def _describe(value, error) -> str:
    return type(error).__name__ if error is not None else _fmt(value)


def step_confusions(r: Report) -> None:
    r.note("The classic loss-input confusions: torch returns a number (or a terse error); leanloss "
           "returns the same number with an InputWarning that says what happened, or a clear error.")
    r.columns("confusion", "torch", "leanloss", "leanloss says")
    for c in _confusions():
        t_value, t_error, _ = _outcome(c.torch_call)
        l_value, l_error, found = _outcome(c.leanloss_call)
        if t_value is not None and l_value is not None:
            same = _agree(l_value, t_value, 1e-5, 1e-7)
        else:
            same = True  # one side raised: nothing numeric to compare
        if l_error is not None:
            says, message = type(l_error).__name__, str(l_error)
        elif found:
            says, message = "InputWarning", str(found[0].message)
        else:
            says, message = "nothing", ""
        caught = l_error is not None or bool(found)
        mark = (OK if caught else SILENT) if same else BAD
        if not same:
            r.failures.append(c.title)
        if not caught:
            r.silent.append(c.title)
        r.line(f"  {c.title:<{LABEL_W}.{LABEL_W}} {_describe(t_value, t_error):>{VALUE_W}} "
               f"{_describe(l_value, l_error):>{VALUE_W}} {says:>{VALUE_W}} {mark}")
        if caught:
            for piece in textwrap.wrap(message, WIDTH - 8, max_lines=3, placeholder=" …"):
                r.line("      " + piece)
        else:
            r.note(f"NOT CAUGHT: leanloss gave no warning or error here yet ({c.advice}).", indent="      ")
    r.note(f"{OK} caught (same number as torch where both return one), {SILENT} not caught yet, "
           f"{BAD} leanloss and torch disagree.")


def _fwd_bwd_peak(loss_fn: Callable[[Tensor, Tensor], Tensor], hidden: Tensor, weight: Tensor):
    """Loss, grads and peak tensor memory (bytes) of one forward + backward."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    probe = harness.PeakTensorMemory()
    with probe:
        loss = loss_fn(h, w)
        loss.backward()
    return loss.detach(), h.grad, w.grad, probe.peak


def step_fused(r: Report) -> None:
    fused = getattr(leanloss, "linear_cross_entropy", None)
    if fused is None:
        r.note("leanloss.linear_cross_entropy is not available in this build: step skipped.")
        return
    n, d, v = 512, 64, 8192
    g = _gen(10)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    target = torch.randint(v, (n,), generator=g)
    target[::7] = -100
    r.note(f"An LM head: hidden ({n}, {d}) @ weight ({v}, {d}).T -> logits ({n}, {v}), "
           f"every 7th target ignored (-100). Forward + backward.")
    r.columns("", "leanloss fused", "torch dense", "")
    chunk = 64  # rows per block; the default blocks (about 96 MiB) would hold this whole head
    f_loss, f_h, f_w, f_peak = _fwd_bwd_peak(lambda h, w: fused(h, w, target, chunk_size=chunk), hidden, weight)
    d_loss, d_h, d_w, d_peak = _fwd_bwd_peak(lambda h, w: F.cross_entropy(h @ w.T, target), hidden, weight)
    r.row("loss", f_loss, d_loss, rtol=1e-5, atol=1e-6)
    r.row("|grad hidden| (all agree)", f_h.norm(), d_h.norm(), ok=_agree(f_h, d_h, 1e-4, 1e-6))
    r.row("|grad weight| (all agree)", f_w.norm(), d_w.norm(), ok=_agree(f_w, d_w, 1e-4, 1e-6))
    mb = 2**20
    grads = (hidden.numel() + weight.numel()) * 4
    r.info("peak tensor memory (MB)", f"{f_peak / mb:.2f}", f"{d_peak / mb:.2f}")
    r.info("  minus the gradients (MB)", f"{(f_peak - grads) / mb:.2f}", f"{(d_peak - grads) / mb:.2f}")
    r.note(f"The logits alone are {n * v * 4 / mb:.0f} MB in float32 (their gradient as much again); "
           f"the fused loss never holds them: it walks {chunk} tokens at a time (chunk_size={chunk}; "
           f"the default aims at about 96 MiB of float32 logits per block). Dense torch needed {d_peak / max(f_peak, 1):.1f}x "
           f"the fused loss's memory here (peak of the tensors a call creates, alive at once).")


STEPS = (
    ("Cross entropy: class indices and probabilities", step_cross_entropy),
    ("log_softmax + nll_loss = cross_entropy", step_nll),
    ("KL divergence, cross entropy = entropy + KL", step_kl),
    ("Binary cross entropy, with and without logits", step_bce),
    ("Cosine embedding loss", step_cosine),
    ("The loss-input confusion cheatsheet", step_confusions),
    ("Fused linear cross entropy vs the dense loss", step_fused),
)


def run(section: Optional[int] = None, out: Optional[TextIO] = None) -> int:
    """Run the tour (or one step, numbered from 1); return the exit status: 0 when every row
    agrees with torch, 1 otherwise."""
    if section is not None and not 1 <= section <= len(STEPS):
        raise ValueError(f"section must be between 1 and {len(STEPS)}, got {section}")
    r = Report(out=out)
    chosen = [section] if section is not None else range(1, len(STEPS) + 1)
    for number in chosen:
        title, fn = STEPS[number - 1]
        r.header(number, title)
        fn(r)
    r.line()
    if r.silent:
        r.note(f"Not caught yet by leanloss: {', '.join(r.silent)}.", indent="")
    if r.failures:
        r.note(f"{BAD} {len(r.failures)} row(s) disagree with torch: {', '.join(r.failures)}", indent="")
        return 1
    r.line(f"{OK} every value agrees with torch.")
    return 0

