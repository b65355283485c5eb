"""Dense distillation losses (`distill_loss`, `jsd`, `DistillLoss`) against float64 references
built from torch ops (`F.log_softmax`, `F.kl_div`, `F.cross_entropy`)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import leanloss
from _oracle import all_finite, assert_close, compare, gen, logits

IGNORE = -100


# --------------------------------------------------------------------------------------------
# references (float64, torch ops only; the jsd mixture is formed in probability space)
# --------------------------------------------------------------------------------------------


def kl_rows(log_p, log_q):
    """KL(p || q) per row, from F.kl_div on log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def ref_divergence(log_p, log_q, kind, beta):
    if kind == "forward" or (kind == "jsd" and beta == 0):
        return kl_rows(log_p, log_q)
    if kind == "reverse" or (kind == "jsd" and beta == 1):
        return kl_rows(log_q, log_p)
    log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
    return beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)


def ref_distill(student, teacher, target=None, *, kind="forward", beta=0.5, temperature=1.0,
                ignore_index=IGNORE, hard_weight=0.0, reduction="mean"):
    s, t = student.double(), teacher.double()
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    loss = (1 - hard_weight) * temperature**2 * ref_divergence(log_p, log_q, kind, beta)
    if target is None:
        return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]
    keep = target != ignore_index
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                         reduction="none").reshape(target.shape)
    loss = torch.where(keep, loss + hard_weight * ce, torch.zeros((), dtype=loss.dtype))
    return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / keep.sum()}[reduction]


def target_for(shape, mode, vocab, seed=5):
    if mode == "none":
        return None
    t = torch.randint(0, vocab, shape, generator=gen(seed))
    t.view(-1)[::3] = IGNORE
    return t


# --------------------------------------------------------------------------------------------
# distill_loss against the reference
# --------------------------------------------------------------------------------------------

KIND_BETAS = [("forward", 0.5), ("reverse", 0.5)] + [("jsd", b) for b in (0.0, 0.3, 0.5, 1.0)]
MODES = ("none", "ignored", "hard")  # no target / target with ignored rows / + hard_weight 0.4
REDUCTIONS = ("mean", "sum", "none")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", (1.0, 2.0))
@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_distill_loss_matches_reference(kind, beta, temperature, mode):
    n, v = 7, 9
    case = KIND_BETAS.index((kind, beta)) + MODES.index(mode) + int(temperature)
    reduction = REDUCTIONS[case % 3]
    student = logits((n, v), seed=case)
    teacher = logits((n, v), seed=case + 50)
    target = target_for((n,), mode, v, seed=case)
    kwargs = dict(kind=kind, beta=beta, temperature=temperature, reduction=reduction,
                  hard_weight=0.4 if mode == "hard" else 0.0)
    compare(leanloss.distill_loss, ref_distill, (student, teacher, target), kwargs)


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("jsd", 0.3)])
def test_distill_loss_leading_shape_and_all_ignored(kind, beta):
    student, teacher = logits((2, 3, 5), seed=1), logits((2, 3, 5), seed=2)
    target = torch.randint(0, 5, (2, 3), generator=gen(3))
    target[0, 1] = IGNORE
    for reduction in REDUCTIONS:
        compare(leanloss.distill_loss, ref_distill, (student, teacher, target),
                dict(kind=kind, beta=beta, temperature=2.0, hard_weight=0.25, reduction=reduction))
    all_ignored = torch.full((2, 3), IGNORE)
    out = leanloss.distill_loss(student, teacher, all_ignored, kind=kind)
    assert torch.isnan(out)  # mean over no token, like torch's cross entropy
    assert leanloss.distill_loss(student, teacher, all_ignored, kind=kind, reduction="sum") == 0


def test_distill_loss_temperature_scales_soft_term_by_t_squared():
    student, teacher = logits((4, 6), seed=1), logits((4, 6), seed=2)
    plain = leanloss.distill_loss(student / 3, teacher / 3)
    tempered = leanloss.distill_loss(student, teacher, temperature=3.0)
    assert_close(tempered, 9 * plain, torch.float64, "T^2 * KL at T=3")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_teacher_underflow_is_finite_and_exact(kind, beta, dtype):
    """Teacher logits of -1e4 (probability exactly 0 after exp, log-probability finite) and
    -inf (log-probability -inf: finite wherever the teacher weights the term, i.e. except for
    the reverse KL, which is then truly infinite)."""
    n, v = 5, 8
    student = logits((n, v), dtype=dtype, seed=11)
    teacher = logits((n, v), seed=12).detach()
    teacher[:, ::3] = -1e4
    teacher_inf = teacher.clone()
    teacher_inf[:, ::3] = -float("inf")
    reverse = kind == "reverse" or beta == 1.0
    if reverse:
        with pytest.warns(leanloss.InputWarning, match="'teacher_logits' contains NaN or Inf"):
            out = leanloss.distill_loss(student, teacher_inf.to(dtype), kind=kind, beta=beta)
        assert out == float("inf")
    for t in (teacher,) if reverse else (teacher, teacher_inf):
        out = leanloss.distill_loss(student, t.to(dtype), kind=kind, beta=beta, temperature=2.0)
        (grad,) = torch.autograd.grad(out, student)
        ref = ref_distill(student, teacher, kind=kind, beta=beta, temperature=2.0)  # -1e4: finite in f64
        (ref_grad,) = torch.autograd.grad(ref, student)
        assert all_finite(out) and all_finite(grad), (kind, beta, t[0, 0].item())
        assert_close(out, ref, dtype, "value")
        assert_close(grad, ref_grad, dtype, "student gradient")


def test_jsd_endpoints_are_the_limits_of_the_normalized_divergence():
    """beta=0 / 1 are forward / reverse KL, the limits of JSD_beta / (beta (1 - beta))."""
    student, teacher = logits((6, 7), seed=3), logits((6, 7), seed=4)
    forward = leanloss.distill_loss(student, teacher, kind="forward", reduction="none")
    reverse = leanloss.distill_loss(student, teacher, kind="reverse", reduction="none")
    assert_close(leanloss.distill_loss(student, teacher, kind="jsd", beta=0.0, reduction="none"),
                 forward, torch.float64, "beta=0 is forward KL")
    assert_close(leanloss.distill_loss(student, teacher, kind="jsd", beta=1.0, reduction="none"),
                 reverse, torch.float64, "beta=1 is reverse KL")
    eps = 1e-6
    for beta, kl in ((eps, forward), (1 - eps, reverse)):
        near = leanloss.distill_loss(student, teacher, kind="jsd", beta=beta, reduction="none")
        torch.testing.assert_close(near / (beta * (1 - beta)), kl, rtol=1e-4, atol=1e-8)
    # and at beta = 1/2 it is the ordinary Jensen-Shannon divergence, bounded by log 2
    half = leanloss.distill_loss(student, teacher, kind="jsd", beta=0.5, reduction="none")
    assert bool((half <= math.log(2)).all()) and bool((half >= 0).all())


def test_distill_loss_16bit_inputs_accumulate_in_float32():
    student, teacher = logits((6, 50), dtype=torch.bfloat16, seed=1), logits((6, 50), dtype=torch.bfloat16, seed=2)
    out = leanloss.distill_loss(student, teacher, kind="jsd", beta=0.3, temperature=2.0)
    assert out.dtype == torch.float32
    ref = ref_distill(student.detach(), teacher.detach(), kind="jsd", beta=0.3, temperature=2.0)
    assert_close(out, ref, torch.float32, "bf16 inputs vs float64 on the same values", scale=10)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=0.0), "'temperature'"),
        (dict(temperature=-1.0), "'temperature'"),
        (dict(beta=1.5, kind="jsd"), "'beta'"),
        (dict(beta=-0.1, kind="jsd"), "'beta'"),
        (dict(hard_weight=1.2), "'hard_weight'"),
        (dict(kind="backward"), "'kind'"),
        (dict(reduction="batchmean"), "reduction"),
        (dict(hard_weight=0.5, target=None), "'target'"),
        (dict(target=torch.zeros(3, dtype=torch.long)), "'target'"),
        (dict(target=torch.zeros(4)), "'target'"),
        (dict(teacher=torch.zeros(4, 6)), "'teacher_logits'"),
    ],
)
def test_distill_loss_errors_name_the_argument(kwargs, message):
    args = dict(student=torch.zeros(4, 5), teacher=torch.zeros(4, 5), target=torch.zeros(4, dtype=torch.long))
    for key in ("student", "teacher", "target"):
        if key in kwargs:
            args[key] = kwargs.pop(key)
    with pytest.raises((ValueError, TypeError)) as info:
        leanloss.distill_loss(args["student"], args["teacher"], args["target"], **kwargs)
    assert message in str(info.value)


def test_distill_loss_target_out_of_range_raises_index_error():
    with pytest.raises(IndexError, match="'target'"):
        leanloss.distill_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3]))


def test_distill_module_matches_function():
    student, teacher = logits((5, 6), seed=1), logits((5, 6), seed=2)
    target = torch.tensor([1, IGNORE, 2, 0, 5])
    kwargs = dict(kind="jsd", beta=0.3, temperature=2.0, hard_weight=0.2, reduction="sum")
    module = leanloss.DistillLoss(**kwargs)
    assert "kind='jsd'" in repr(module)
    assert_close(module(student, teacher, target), leanloss.distill_loss(student, teacher, target, **kwargs),
                 torch.float64, "DistillLoss")


# --------------------------------------------------------------------------------------------
# jsd on log-probabilities (kl_div's conventions)
# --------------------------------------------------------------------------------------------


def ref_jsd(input, target, beta=0.5, log_target=False, reduction="mean"):
    log_p = target if log_target else torch.log(target)
    p, q = log_p.exp(), input.exp()
    if beta == 0:
        pointwise = F.kl_div(input, target, reduction="none", log_target=log_target)
    elif beta == 1:
        pointwise = F.kl_div(log_p, input, reduction="none", log_target=True)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        pointwise = (beta * F.kl_div(log_m, target, reduction="none", log_target=log_target)
                     + (1 - beta) * F.kl_div(log_m, input, reduction="none", log_target=True))
    if reduction == "batchmean":
        return pointwise.sum() / input.shape[0]
    return {"none": pointwise, "sum": pointwise.sum(), "mean": pointwise.mean()}[reduction]


@pytest.mark.parametrize("reduction", ("none", "mean", "sum", "batchmean"))
@pytest.mark.parametrize("log_target", (False, True))
@pytest.mark.parametrize("beta", (0.0, 0.3, 0.5, 1.0))
def test_jsd_matches_reference(beta, log_target, reduction):
    input = torch.log_softmax(torch.randn(4, 6, generator=gen(1), dtype=torch.float64), 1).requires_grad_()
    target = torch.softmax(torch.randn(4, 6, generator=gen(2), dtype=torch.float64) * 2, 1)
    target = (target.log() if log_target else target).requires_grad_()
    compare(leanloss.jsd, ref_jsd, (input, target), dict(beta=beta, log_target=log_target, reduction=reduction))


def test_jsd_zero_target_probabilities_broadcast_and_dtype():
    input = torch.log_softmax(torch.randn(3, 5, generator=gen(1), dtype=torch.float64), 1).requires_grad_()
    target = torch.softmax(torch.randn(3, 5, generator=gen(2), dtype=torch.float64), 1)
    target[:, 0] = 0.0
    target = target / target.sum(1, keepdim=True)
    for beta in (0.0, 0.3, 1.0):
        out = leanloss.jsd(input, target, beta=beta, reduction="batchmean")
        assert all_finite(out) == (beta < 1)  # the reverse KL of a zero teacher probability is inf
        assert_close(out, ref_jsd(input, target, beta=beta, reduction="batchmean"), torch.float64, f"beta={beta}")
    row = target[0]  # broadcasts against every row of input, as kl_div allows
    assert_close(leanloss.jsd(input, row, reduction="none"), ref_jsd(input, row.expand(3, 5), reduction="none"),
                 torch.float64, "broadcast target")
    assert leanloss.jsd(input.float(), target, reduction="sum").dtype == torch.float64
    assert leanloss.jsd(input.detach().bfloat16(), target.bfloat16()).dtype == torch.bfloat16


def test_jsd_errors_name_the_argument():
    x = torch.log_softmax(torch.randn(3, 4), 1)
    with pytest.raises(ValueError, match="'beta'"):
        leanloss.jsd(x, x.exp(), beta=2.0)
    with pytest.raises(ValueError, match="'target'"):
        leanloss.jsd(x, torch.rand(3, 5))
    with pytest.raises(TypeError, match="'input'"):
        leanloss.jsd(torch.zeros(3, 4, dtype=torch.long), x.exp())
    with pytest.raises(ValueError, match="reduction"):
        leanloss.jsd(x, x.exp(), reduction="avg")


def test_functional_exports():
    import leanloss.functional as LF

    assert LF.distill_loss is leanloss.distill_loss and LF.jsd is leanloss.jsd
    assert LF.linear_distill_loss is leanloss.linear_distill_loss
