"""Fused `linear_distill_loss` against the dense `distill_loss` on materialized logits (itself
tested against torch ops in test_distill.py): values, student gradients, no teacher gradient."""
from __future__ import annotations

import pytest
import torch

import leanloss
from _oracle import assert_close, gen, upstream

IGNORE = -100


def heads(n=11, d=6, dt=5, v=13, dtype=torch.float64, bias=True, seed=0, lead=None):
    """Student and teacher hidden states/heads; the student leaves require grad, the teacher's too
    (to check that they get none)."""
    g = gen(seed)
    shape = lead or (n,)

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    student = dict(hidden=randn(*shape, d), weight=randn(v, d, scale=0.7), bias=randn(v) if bias else None)
    teacher = dict(hidden=randn(*shape, dt), weight=randn(v, dt, scale=0.9), bias=randn(v) if bias else None)
    return student, teacher


def dense(student, teacher, target, **kw):
    """``distill_loss`` on the materialized logits, scaled and soft-capped as ``kw`` asks."""
    def logits(side, name):
        z = side["hidden"] @ side["weight"].T
        z = (z if side["bias"] is None else z + side["bias"]) * kw.pop(f"{name}_logit_scale", 1.0)
        cap = kw.pop(f"{name}_softcap", None)
        return z if cap is None else cap * torch.tanh(z / cap)

    kw.pop("chunk_size", None)
    z_s, z_t = logits(student, "student"), logits(teacher, "teacher")
    return leanloss.distill_loss(z_s, z_t.detach(), target, **kw)


def fused(student, teacher, target, **kw):
    return leanloss.linear_distill_loss(
        student["hidden"], student["weight"], teacher["hidden"], teacher["weight"], target,
        student_bias=student["bias"], teacher_bias=teacher["bias"], **kw)


def student_leaves(student):
    return [t for t in (student["hidden"], student["weight"], student["bias"]) if t is not None]


def check_fused_vs_dense(student, teacher, target, tol_dtype=torch.float64, ref_student=None,
                         ref_teacher=None, scale=1.0, **kw):
    """Value and student gradients (random upstream for 'none'); the teacher gets no gradient."""
    out = fused(student, teacher, target, **kw)
    ref = dense(ref_student or student, ref_teacher or teacher, target, **kw)
    assert out.shape == ref.shape
    assert_close(out, ref, tol_dtype, "value", scale)
    grad_out = upstream(ref)
    grads = torch.autograd.grad(out, student_leaves(student), grad_out.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, student_leaves(ref_student or student), grad_out)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_close(g, r, tol_dtype, f"grad of student {name}", scale)
    return out


KIND_BETAS = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 1.0)]


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_fused_matches_dense_every_kind(kind, beta):
    """Pairwise over (temperature, hard_weight, reduction, chunk size, bias)."""
    cases = [(1.0, 0.0, "mean", 4, True), (2.0, 0.4, "sum", 3, False), (2.0, 0.0, "none", 5, True),
             (1.0, 0.3, "none", None, False), (0.5, 1.0, "mean", 16, True)]
    for i, (temperature, hard_weight, reduction, chunk, bias) in enumerate(cases):
        student, teacher = heads(bias=bias, seed=i)
        target = torch.randint(0, 13, (11,), generator=gen(i))
        target[:: 2 + i % 3] = IGNORE
        check_fused_vs_dense(student, teacher, target, kind=kind, beta=beta, temperature=temperature,
                             hard_weight=hard_weight, reduction=reduction, chunk_size=chunk)
    student, teacher = heads(seed=9)  # no target at all
    check_fused_vs_dense(student, teacher, None, kind=kind, beta=beta, temperature=2.0, chunk_size=4)


@pytest.mark.parametrize("kind,beta", KIND_BETAS)
def test_softcap_and_logit_scale_of_each_head(kind, beta):
    """``softcap(s * z)`` on each side (Gemma's final_logit_softcapping): with a hard term, every
    reduction, one side capped or both; caps small enough to bend the logits."""
    cases = [(dict(student_softcap=1.5, teacher_softcap=2.0), 1.0, 0.0, "mean"),
             (dict(student_softcap=1.2, student_logit_scale=1.7, teacher_logit_scale=0.6), 2.0, 0.4, "sum"),
             (dict(teacher_softcap=0.8, teacher_logit_scale=2.5), 0.7, 0.0, "none"),
             (dict(student_softcap=2.5, teacher_softcap=1.0, student_logit_scale=0.5), 1.3, 0.3, "none")]
    for i, (caps, temperature, hard_weight, reduction) in enumerate(cases):
        student, teacher = heads(bias=i % 2 == 0, seed=20 + i)
        target = torch.randint(0, 13, (11,), generator=gen(i))
        target[:: 2 + i % 3] = IGNORE
        check_fused_vs_dense(student, teacher, target, kind=kind, beta=beta, temperature=temperature,
                             hard_weight=hard_weight, reduction=reduction, chunk_size=4, **caps)


@pytest.mark.parametrize("kind", ("forward", "jsd"))
def test_softcap_with_bfloat16_blocks(kind):
    """bf16 heads (the engine scores 16-bit blocks in place): the cap runs in float32 on the
    block; against float64 within bf16's tolerance."""
    student, teacher = heads(dtype=torch.bfloat16, seed=3)
    ref_student, ref_teacher = ({k: None if v is None else v.detach().double().requires_grad_() for k, v in side.items()}
                                for side in (student, teacher))
    target = torch.randint(0, 13, (11,), generator=gen(3))
    check_fused_vs_dense(student, teacher, target, tol_dtype=torch.bfloat16, ref_student=ref_student,
                         ref_teacher=ref_teacher, kind=kind, temperature=0.9, student_softcap=1.5,
                         teacher_softcap=2.0, student_logit_scale=1.3, hard_weight=0.2)


def test_teacher_gets_no_gradient_and_inputs_are_untouched():
    student, teacher = heads()
    before = {k: v.detach().clone() for k, v in teacher.items()}
    s_before = student["hidden"].detach().clone()
    loss = fused(student, teacher, None, kind="jsd", temperature=2.0, chunk_size=4)
    loss.backward()
    assert all(t.grad is None for t in teacher.values())
    assert student["hidden"].grad is not None and student["weight"].grad is not None
    assert all(torch.equal(teacher[k], before[k]) for k in before)
    assert torch.equal(student["hidden"].detach(), s_before)


def test_leading_shape_all_ignored_and_no_grad():
    student, teacher = heads(lead=(2, 5), seed=3)
    target = torch.randint(0, 13, (2, 5), generator=gen(3))
    target[1, ::2] = IGNORE
    out = check_fused_vs_dense(student, teacher, target, kind="reverse", temperature=2.0, hard_weight=0.5,
                               reduction="none", chunk_size=3)
    assert out.shape == (2, 5) and bool((out[1, ::2] == 0).all())
    all_ignored = torch.full((2, 5), IGNORE)
    assert torch.isnan(fused(student, teacher, all_ignored))
    total = fused(student, teacher, all_ignored, reduction="sum")
    total.backward()
    assert total == 0 and bool((student["hidden"].grad == 0).all())
    with torch.no_grad():
        value = fused(student, teacher, target, kind="jsd", chunk_size=4)
    assert not value.requires_grad
    assert_close(value, dense(student, teacher, target, kind="jsd"), torch.float64, "no_grad value")


def test_float32_and_teacher_underflow():
    student, teacher = heads(n=20, v=40, dtype=torch.float32, seed=4)
    with torch.no_grad():
        teacher["bias"][::5] = -1e4  # those teacher probabilities underflow to exactly 0
    target = torch.randint(0, 40, (20,), generator=gen(4))
    target[::4] = IGNORE
    # Against float64: with teacher logits 5000 below the student's, x - y keeps float32's
    # absolute rounding of 5000 (~2.4e-4), which the reverse KL's gradient carries (a float32
    # dense reference is off by as much, in its own direction).
    up = lambda side: {k: None if v is None else v.detach().double().requires_grad_() for k, v in side.items()}  # noqa: E731
    for kind, beta, scale in (("forward", 0.5, 5.0), ("reverse", 0.5, 50.0), ("jsd", 0.3, 5.0)):
        out = check_fused_vs_dense(student, teacher, target, tol_dtype=torch.float32, scale=scale, kind=kind,
                                   beta=beta, temperature=2.0, hard_weight=0.2, chunk_size=7,
                                   ref_student=up(student), ref_teacher=up(teacher))
        assert bool(torch.isfinite(out))


def _relative_grad_errors(student_hidden, student_weight, teacher_hidden, teacher_weight, target, *,
                          chunk_size, **kw):
    """Relative (Frobenius) errors of the fused loss's float32 student gradients against
    float64 autograd of the dense loss on the same inputs."""
    errors = []
    grads = []
    for prec in (torch.float32, torch.float64):
        h = student_hidden.detach().to(prec).requires_grad_()
        w = student_weight.detach().to(prec).requires_grad_()
        th, tw = teacher_hidden.to(prec), teacher_weight.to(prec)
        if prec == torch.float32:
            loss = leanloss.linear_distill_loss(h, w, th, tw, target, chunk_size=chunk_size, **kw)
        else:
            loss = leanloss.distill_loss(h @ w.T, th @ tw.T, target, **kw)
        loss.backward()
        grads.append((h.grad.double(), w.grad.double()))
    for got, ref in zip(*grads):
        errors.append(float((got - ref).norm() / ref.norm()))
    return errors


@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_jsd_float32_gradient_keeps_float32_digits_at_large_logits(temperature):
    """Logits of several tens: the jsd gradient is written with s = lambda - log q, in which each
    row's log-sum-exp cancels before any product (measured 1.3e-6 here). The earlier form
    q (a - lambda - <q, a - lambda>) kept float32's rounding of |a|: 6e-5 to 1.1e-4."""
    g = gen(11)
    n, d, v = 64, 32, 3000
    sh = torch.randn(n, d, generator=g) * 8
    sw = torch.randn(v, d, generator=g) * d**-0.5 * 2
    th = torch.randn(n, d, generator=g) * 8
    tw = torch.randn(v, d, generator=g) * d**-0.5 * 2
    target = torch.randint(0, v, (n,), generator=g)
    errors = _relative_grad_errors(sh, sw, th, tw, target, kind="jsd", beta=0.4,
                                   temperature=temperature, hard_weight=0.25, chunk_size=24)
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("kind", ("forward", "jsd"))
def test_bfloat16_inputs_against_float64(kind):
    student, teacher = heads(n=24, d=16, dt=12, v=64, dtype=torch.bfloat16, seed=5)
    up = lambda side: {k: None if v is None else v.detach().double().requires_grad_() for k, v in side.items()}  # noqa: E731
    target = torch.randint(0, 64, (24,), generator=gen(5))
    target[::5] = IGNORE
    out = check_fused_vs_dense(student, teacher, target, tol_dtype=torch.bfloat16, ref_student=up(student),
                               ref_teacher=up(teacher), kind=kind, beta=0.3, hard_weight=0.3, chunk_size=10)
    assert out.dtype == torch.float32
    assert student["weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(student_weight=torch.zeros(13, 7)), "'student_weight'"),
        (dict(teacher_weight=torch.zeros(13, 6)), "'teacher_weight'"),
        (dict(teacher_weight=torch.zeros(12, 5)), "'teacher_weight'"),
        (dict(teacher_hidden=torch.zeros(10, 5)), "'teacher_hidden'"),
        (dict(student_bias=torch.zeros(12)), "'student_bias'"),
        (dict(target=torch.zeros(10, dtype=torch.long)), "'target'"),
        (dict(temperature=0.0), "'temperature'"),
        (dict(beta=1.1), "'beta'"),
        (dict(hard_weight=-0.5), "'hard_weight'"),
        (dict(hard_weight=0.5, target=None), "'target'"),
    ],
)
def test_errors_name_the_argument(change, message):
    args = dict(student_hidden=torch.zeros(11, 6), student_weight=torch.zeros(13, 6), teacher_hidden=torch.zeros(11, 5),
                teacher_weight=torch.zeros(13, 5), target=torch.zeros(11, dtype=torch.long))
    kwargs = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(ValueError) as info:
        leanloss.linear_distill_loss(**args, **kwargs)
    assert message in str(info.value)


def test_module_matches_function():
    student, teacher = heads(seed=6)
    target = torch.randint(0, 13, (11,), generator=gen(6))
    kw = dict(kind="jsd", beta=0.3, temperature=2.0, hard_weight=0.2, reduction="sum")
    module = leanloss.LinearDistillLoss(chunk_size=4, **kw)
    assert "kind='jsd'" in repr(module)
    value = module(student["hidden"], student["weight"], teacher["hidden"], teacher["weight"], target,
                   student_bias=student["bias"], teacher_bias=teacher["bias"])
    assert_close(value, fused(student, teacher, target, **kw), torch.float64, "LinearDistillLoss")


def test_mixed_teacher_dtype_and_workspace_released():
    """A bfloat16 teacher with a float32 student; the scorer's block buffers do not outlive a pass."""
    from leanloss._fused.engine import fused_linear_loss
    from leanloss._fused.reduce_hook import LocalVocab
    from leanloss.linear.distill import DistillScorer

    student, teacher = heads(n=9, v=20, dtype=torch.float32, seed=7)
    teacher = {k: v.detach().bfloat16() for k, v in teacher.items()}
    check_fused_vs_dense(student, teacher, None, tol_dtype=torch.bfloat16, kind="jsd", beta=0.3, chunk_size=4)
    scorer = DistillScorer(teacher["hidden"], teacher["weight"], teacher["bias"], None, kind="forward",
                           beta=0.5, temperature=1.0, hard_weight=0.0, vocab=LocalVocab(20))
    loss = fused_linear_loss(student["hidden"], student["weight"], student["bias"], scorer, chunk_size=4)
    assert scorer._teacher_buf is None and loss.requires_grad


def test_student_dtype_mismatch_is_a_type_error():
    with pytest.raises(TypeError, match="'student_weight'"):
        leanloss.linear_distill_loss(torch.zeros(3, 4), torch.zeros(5, 4, dtype=torch.float64),
                                     torch.zeros(3, 2), torch.zeros(5, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_dense():
    student, teacher = heads(n=33, v=50, dtype=torch.float32, seed=8)
    student = {k: v.detach().cuda().requires_grad_() for k, v in student.items()}
    teacher = {k: v.detach().cuda() for k, v in teacher.items()}
    target = torch.randint(0, 50, (33,), generator=gen(8)).cuda()
    target[::4] = IGNORE
    for kind, beta in (("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)):
        check_fused_vs_dense(student, teacher, target, tol_dtype=torch.float32, scale=5.0, kind=kind, beta=beta,
                             temperature=2.0, hard_weight=0.2, chunk_size=8)


@pytest.mark.parametrize("kind,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_elementwise_sub_blocks(monkeypatch, kind, beta):
    """The scorer computes the teacher logits in pieces (3 rows here, not dividing the block)."""
    import leanloss.linear.distill as fused_module

    monkeypatch.setattr(fused_module, "_TEACHER_BYTES", 8 * 13 * 3)
    monkeypatch.setattr(fused_module, "_TEACHER_MIN_ROWS", 1)
    student, teacher = heads(seed=10)
    target = torch.randint(0, 13, (11,), generator=gen(10))
    target[::4] = IGNORE
    for temperature, hard_weight, reduction in ((2.0, 0.3, "mean"), (1.0, 0.0, "none"), (2.0, 1.0, "sum")):
        check_fused_vs_dense(student, teacher, target, kind=kind, beta=beta, temperature=temperature,
                             hard_weight=hard_weight, reduction=reduction, chunk_size=8)


def test_torch_compile_matches_eager():
    """Under torch.compile (graph breaks allowed) the value and student gradients equal eager's."""
    student, teacher = heads(n=9, seed=11)
    target = torch.randint(0, 13, (9,), generator=gen(11))
    target[::3] = IGNORE
    kw = dict(kind="jsd", beta=0.3, temperature=2.0, hard_weight=0.2)
    compiled = torch.compile(lambda s, t, y: fused(s, t, y, **kw))
    out = compiled(student, teacher, target)
    ref = fused(student, teacher, target, **kw)
    assert_close(out, ref, torch.float64, "compiled value")
    for g, r in zip(torch.autograd.grad(out, student_leaves(student)), torch.autograd.grad(ref, student_leaves(student))):
        assert_close(g, r, torch.float64, "compiled gradient")
