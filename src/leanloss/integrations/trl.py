"""leanloss's engine behind TRL's fused LM head and its distillation divergence.

TRL's trainers (SFT, DPO, KTO, GRPO, RLOO) patch their policy and reference models with
``trl.trainer.utils.add_fused_lm_head``: a call ``model(..., labels=labels, fused_lm_head=True)``
runs the backbone and returns per-token statistics of the next-token distribution in a
``trl.trainer.utils.FusedCausalLMOutput``. TRL's ``DistillationTrainer`` computes the generalized
JSD of a student and a teacher head with ``_chunked_divergence_loss``. This module gives both
the same values, computed by leanloss's chunked engine:

* :func:`add_fused_lm_head` has TRL's signature and returns TRL's output class; per token ``i``
  with ``h_i`` the backbone's hidden state, ``y_i`` the next-token label (``labels[:, 1:]``, or
  ``shift_labels`` as given) and the logits

      z_i = softcap(s * (h_i @ W.T + b)) / T,     softcap(x) = c * tanh(x / c)

  (``s`` and ``c`` read from the model's text config as TRL reads them, :func:`head_transform`),
  it returns ``log_probs = log_softmax(z_i)[y_i]``, ``entropy``, ``log_sum_sq_probs``,
  ``mean_logits``, ``is_top1`` (see :func:`token_stats`), 0 where ``y_i = -100``, and
  ``loss = -sum_i log_probs_i / n`` (``n`` = ``num_items_in_batch`` or the number of labels),
  plus the MoE router loss when the model returns router logits. Ignored positions are dropped
  before any matmul; the ``(tokens, vocab)`` logits never exist.
* :func:`apply_leanloss` takes a constructed TRL trainer, re-patches the models TRL patched
  with the same settings, and routes ``DistillationTrainer``'s divergence through
  :func:`leanloss.linear_distill_loss`.

A head whose weight is a DTensor sharded on the vocabulary (tensor parallel, ``ColwiseParallel``)
runs the vocab-parallel scorers over its mesh, never gathering the head; a head sharded by
FSDP2 outside its model's forward is gathered, as TRL does.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import importlib
import types
from contextlib import nullcontext
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

try:
    import trl
    import transformers
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "leanloss.integrations.trl needs the 'trl' package (1.16): pip install 'leanloss[trl]'"
    ) from exc

from packaging.version import Version

from .. import _checks
from .._checks import LeanlossTypeError, LeanlossValueError
from .._dtensor import has_dtensor
from ..functional import linear_distill_loss, linear_log_probs
from ..linear import TokenStats
from .transformers import _check_head_not_sharded_alone, _fsdp_module_class

__all__ = [
    "UnsupportedTrainerError",
    "SUPPORTED_TRL",
    "OUTPUT_FIELDS",
    "add_fused_lm_head",
    "apply_leanloss",
    "head_transform",
    "token_stats",
    "divergence_loss",
]

#: The TRL versions this integration reproduces: ``low <= version < high`` (pyproject.toml's
#: ``trl`` extra pins the same range). The registry serves one release in it, 1.16.0, so the
#: tests of that release are the tests of both ends (a later 1.16.x is to be tested as well).
SUPPORTED_TRL = ("1.16.0", "1.17.0")
#: The per-token fields of ``FusedCausalLMOutput`` that ``outputs`` may name.
OUTPUT_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_STATE_ATTR = "_leanloss_trl_head"


class UnsupportedTrainerError(LeanlossTypeError):
    """:func:`apply_leanloss` cannot reproduce this trainer (its class, TRL version or setup)."""


def _trl_version() -> str:
    return getattr(trl, "__version__", "unknown")


def _check_trl_version(what: str) -> None:
    low, high = SUPPORTED_TRL
    version = _trl_version()
    try:
        ok = Version(low) <= Version(version) < Version(high)
    except Exception:  # an unparsable version string
        ok = False
    if not ok:
        raise UnsupportedTrainerError(
            f"{what}: TRL {version} is not supported (leanloss.integrations.trl reproduces TRL "
            f">={low},<{high}); pip install 'leanloss[trl]'"
        )


# ----------------------------------------------------------------------------------------------
# the head's logit transform, read from the config as TRL reads it


def head_transform(config) -> tuple[Optional[float], float]:
    """``(softcap, logit_scale)`` of a model's LM head, read from ``config.get_text_config()``.

    ``logit_scale`` is the first of ``logit_scale`` (Cohere), ``output_multiplier``,
    ``lm_head_multiplier`` (Falcon-H1) that is set, else ``logits_scaling`` (HyperCLOVA X
    multiplies by it, Granite and MiniCPM3 divide by it), else 1; ``softcap`` is
    ``final_logit_softcapping`` (Gemma 2/3) or ``None``. The logits are then
    ``softcap(logit_scale * lm_head(h)) / T``.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None)
        if scale is not None:
            break
    divisor = getattr(text, "logits_scaling", None)
    if scale is None and divisor is not None:
        scale = divisor if getattr(text, "model_type", "") == "hyperclovax" else 1 / divisor
    softcap = getattr(text, "final_logit_softcapping", None)
    return (None if softcap is None else float(softcap)), (1.0 if scale is None else float(scale))


# ----------------------------------------------------------------------------------------------
# the per-token statistics


#: ``outputs`` names (TRL's) -> :class:`leanloss.TokenStats` field names
_STAT_NAMES = {"entropy": "entropy", "log_sum_sq_probs": "log_sum_sq_probs", "mean_logits": "mean_logit",
               "is_top1": "is_top1"}
#: the fields TRL returns without a gradient (``ChunkedLogProbFunction`` marks them so)
_NO_GRAD = ("log_sum_sq_probs", "mean_logit", "is_top1")


def _positive_scale(hidden: Tensor, bias: Optional[Tensor], scale: float):
    """``(hidden, bias, scale)`` with a scale leanloss's scorers take (positive): one that is not
    is folded into ``hidden`` and ``bias``, ``s (h W^T + b) = (s h) W^T + s b``."""
    if scale > 0:
        return hidden, bias, scale
    return hidden * scale, None if bias is None else bias * scale, 1.0


def token_stats(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                temperature: float = 1.0, softcap: Optional[float] = None, logit_scale: float = 1.0,
                return_stats: Sequence[str] = ()) -> TokenStats:
    """Per-token statistics of ``p = softmax(z)``, ``z = softcap(s * (hidden @ weight.T + bias)) / T``.

    With ``y`` the target and ``V`` the vocabulary size: ``logp = log p_y``; ``entropy =
    -sum_v p_v log p_v``; ``log_sum_sq_probs = log sum_v p_v^2``; ``mean_logit = sum_v z_v / V``;
    ``is_top1``: ``y`` is the first index of ``max_v z_v`` (a tie with an earlier class does not
    count). These are :func:`leanloss.linear_log_probs`' statistics (``return_stats``; its
    docstring states the math); as in TRL, ``logp`` and ``entropy`` carry a gradient and the
    other three do not. Rows whose target is -100 are dropped before any matmul and give 0
    (``False``).
    """
    hidden, bias, logit_scale = _positive_scale(hidden, bias, logit_scale)
    got = linear_log_probs(hidden, weight, target, bias, temperature=temperature, softcap=softcap,
                           logit_scale=logit_scale, return_stats=tuple(return_stats))
    if not return_stats:
        return TokenStats(got, None, None, None, None)
    return TokenStats(**{name: (None if value is None else value.detach() if name in _NO_GRAD else value)
                         for name, value in got._asdict().items()})


# ----------------------------------------------------------------------------------------------
# the head's tensors


def _is_fsdp_managed(model: nn.Module) -> bool:
    fsdp = _fsdp_module_class()
    return fsdp is not None and any(isinstance(m, fsdp) for m in (model, *model.children()))


def _head_tensors(model: nn.Module, head: nn.Module) -> tuple[Any, Any]:
    """The head's weight and bias for the fused scorers: a DTensor sharded by tensor parallelism
    stays sharded (the vocab-parallel path); one an FSDP2 model holds sharded outside its
    forward is gathered (``full_tensor``), as TRL does."""
    weight, bias = head.weight, head.bias
    if has_dtensor(weight, bias) and _is_fsdp_managed(model):
        weight = weight.full_tensor() if has_dtensor(weight) else weight
        bias = bias.full_tensor() if has_dtensor(bias) else bias
    return weight, bias


# ----------------------------------------------------------------------------------------------
# add_fused_lm_head


@dataclasses.dataclass(frozen=True)
class _HeadSettings:
    """What one fused head computes (TRL's ``add_fused_lm_head`` arguments) and what it wraps."""

    temperature: float
    cast_lm_head_to_fp32: bool
    outputs: tuple
    original_forward: Any


def _check_outputs(outputs) -> tuple:
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUT_FIELDS]
    if unknown:
        raise LeanlossValueError(
            f"add_fused_lm_head: argument 'outputs' names {unknown}; the fields are {OUTPUT_FIELDS}"
        )
    return outputs


def _router_loss(model: nn.Module, text_config, backbone_outputs, attention_mask) -> Any:
    """The MoE load-balancing loss of the router logits (Mixtral's, which every MoE family uses)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(model, "num_experts", None)
    if num_experts is None:
        num_experts = text_config.num_experts
    per_token = getattr(model, "num_experts_per_tok", None)
    if per_token is None:
        per_token = text_config.num_experts_per_tok
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, per_token, attention_mask)


def _fused_outputs(model: nn.Module, settings: _HeadSettings, backbone_attr: str, text_config,
                   args, labels, shift_labels, num_items_in_batch, kwargs) -> FusedCausalLMOutput:
    kwargs["use_cache"] = False
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    backbone_outputs = getattr(model, backbone_attr)(*args, **kwargs)
    hidden = backbone_outputs.last_hidden_state
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    head = model.get_output_embeddings()
    _check_head_not_sharded_alone(model, head)
    weight, bias = _head_tensors(model, head)
    device = head.weight.device
    hidden, labels = hidden.to(device), labels.to(device)
    mask = labels != -100
    autocast = nullcontext()
    if settings.cast_lm_head_to_fp32:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
        autocast = torch.autocast(device.type, enabled=False)
    softcap, scale = head_transform(model.config)
    stats = tuple(_STAT_NAMES[o] for o in settings.outputs if o in _STAT_NAMES)
    with autocast:
        got = token_stats(hidden, weight, labels, bias, temperature=settings.temperature, softcap=softcap,
                          logit_scale=scale, return_stats=stats)
    log_probs = got.logp
    if not log_probs.requires_grad and torch.is_grad_enabled() and hidden.requires_grad:
        # no label is kept: a differentiable zero, so that backward() runs on an all-ignored batch
        log_probs = log_probs + hidden.sum() * 0
    divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / divisor
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _router_loss(model, text_config, backbone_outputs, kwargs.get("attention_mask"))
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=got.entropy,
                               log_sum_sq_probs=got.log_sum_sq_probs, mean_logits=got.mean_logit,
                               is_top1=got.is_top1, label_mask=mask, aux_loss=aux_loss)


def _fused_forward_function(model: nn.Module, settings: _HeadSettings):
    """The ``forward`` (a function of ``self``) that a fused head installs on ``model``."""
    text_config = model.config.get_text_config()
    # before transformers 5, vision-language models expose their language backbone as `model`
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"
    original = settings.original_forward

    @functools.wraps(type(model).forward)  # generate() validates its keywords against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original(*args, **kwargs)
        return _fused_outputs(self, settings, backbone_attr, text_config, args, labels, shift_labels,
                              num_items_in_batch, kwargs)

    forward._leanloss_settings = settings
    return forward


def add_fused_lm_head(model: nn.Module, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """TRL's ``add_fused_lm_head``, computed by leanloss: patch ``model`` (an instance) so that
    ``model(..., labels=labels, fused_lm_head=True)`` returns a ``trl.trainer.utils.FusedCausalLMOutput``.

    The fields (the module docstring states them): ``loss``, ``log_probs`` ``(B, T-1)`` (or
    ``(B, T)`` with ``shift_labels``), the statistics named in ``outputs`` (``"entropy"``,
    ``"log_sum_sq_probs"``, ``"mean_logits"``, ``"is_top1"``; the others ``None``), ``label_mask``
    and ``aux_loss`` (with router logits). ``log_probs`` and ``entropy`` are differentiable with
    respect to the backbone and the head. Calls without ``fused_lm_head=True`` run the original
    forward. Add the head before wrapping the model with PEFT, as with TRL's.

    Args:
        model: a transformers causal LM (or a vision-language model; its text config is read).
        temperature: ``T``, the logits are divided by it.
        cast_lm_head_to_fp32: run the head in float32, outside autocast.
        outputs: the per-token fields to compute (``"log_probs"`` always is).
    """
    temperature = _checks.check_positive("add_fused_lm_head", "temperature", temperature)
    outputs = _check_outputs(outputs)
    original = model.forward
    previous = model.__dict__.get(_STATE_ATTR)
    if previous is not None:  # patching twice: wrap the first original, not our forward
        original = previous.original_forward
    settings = _HeadSettings(temperature, bool(cast_lm_head_to_fp32), outputs, original)
    model.__dict__[_STATE_ATTR] = settings
    model.forward = types.MethodType(_fused_forward_function(model, settings), model)


# ----------------------------------------------------------------------------------------------
# apply_leanloss(trainer)


def _is_trl_fused(fn) -> bool:
    """Whether ``fn`` (a function or bound method) is the forward TRL's ``add_fused_lm_head`` installs."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return (code is not None and code.co_name == "_fused_forward"
            and code.co_filename.replace("\\", "/").endswith("trl/trainer/utils.py"))


def _find_trl_forward(model: nn.Module, node, depth: int = 0):
    """``(TRL's fused forward, a function that replaces it)`` found in ``node`` (the model's
    ``forward``) or in the wrappers around it (accelerate wraps a prepared model's forward in
    autocast and a float32 output conversion: closures and wrapper objects); ``None`` if absent."""
    if depth == 0 and _is_trl_fused(node):
        return node, lambda new: setattr(model, "forward", types.MethodType(new, model))
    if depth > 6 or node is None or isinstance(node, (nn.Module, Tensor, type)):
        return None
    func = getattr(node, "__func__", node)
    slots = []
    for cell in getattr(func, "__closure__", None) or ():
        try:
            slots.append((cell.cell_contents, cell, None))
        except ValueError:  # an empty cell
            continue
    if not isinstance(func, types.FunctionType):
        slots += [(value, None, name) for name, value in vars(func).items()] if hasattr(func, "__dict__") else []
    for value, cell, name in slots:
        if _is_trl_fused(value):
            def replace(new, value=value, cell=cell, name=name):
                new = types.MethodType(new, model) if isinstance(value, types.MethodType) else new
                if cell is not None:
                    cell.cell_contents = new
                else:
                    setattr(func, name, new)
                if getattr(func, "__wrapped__", None) is value:  # accelerate unwraps through __wrapped__
                    func.__wrapped__ = new
            return value, replace
        if callable(value):
            found = _find_trl_forward(model, value, depth + 1)
            if found is not None:
                return found
    return None


def _repatch(model: nn.Module) -> bool:
    """Replace the fused forward TRL installed on ``model`` (wherever wrappers put it) by
    leanloss's with the same settings; ``False`` when ``model`` has none."""
    if _STATE_ATTR in model.__dict__:  # already leanloss's
        return True
    found = _find_trl_forward(model, model.__dict__.get("forward"))
    if found is None:
        return False
    trl_forward, replace = found
    settings = _trl_head_settings(model, trl_forward)
    ours = _fused_forward_function(model, settings)
    replace(ours)
    if _is_trl_fused(model.__dict__.get("_original_forward")):  # what accelerate restores on unwrap
        model._original_forward = types.MethodType(ours, model)
    model.__dict__[_STATE_ATTR] = settings
    return True


def _trl_head_settings(model: nn.Module, trl_forward) -> _HeadSettings:
    """The arguments TRL's ``add_fused_lm_head`` gave ``model``, read from the closure of the
    forward it installed."""
    fn = getattr(trl_forward, "__func__", trl_forward)
    code = fn.__code__
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    needed = ("temperature", "cast_lm_head_to_fp32", "outputs", "original_forward")
    if any(name not in cells for name in needed):
        raise UnsupportedTrainerError(
            f"apply_leanloss: the fused head TRL {_trl_version()} installed on "
            f"{type(model).__name__} does not keep {needed}; this TRL version is not supported"
        )
    return _HeadSettings(float(cells["temperature"]), bool(cells["cast_lm_head_to_fp32"]),
                         _check_outputs(cells["outputs"]), cells["original_forward"])


def _patched_models(trainer) -> list:
    """The models whose forward TRL's trainer patched: the policy (its PEFT base model) and the
    reference model, unwrapped from accelerate's wrappers."""
    unwrap = getattr(getattr(trainer, "accelerator", None), "unwrap_model", lambda m: m)
    found = []
    for attr in ("model", "ref_model"):
        model = getattr(trainer, attr, None)
        if model is None:
            continue
        model = unwrap(model)
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base) and type(model).__name__.startswith("Peft"):
            model = get_base()
        if all(model is not m for m in found):
            found.append(model)
    return found


#: TRL trainers built on a supported one whose losses read full logits, not the fused head
_FULL_LOGIT_TRAINERS = ("GKDTrainer", "GOLDTrainer")


def _trainer_kind(trainer) -> str:
    names = ("SFTTrainer", "DPOTrainer", "KTOTrainer", "GRPOTrainer", "RLOOTrainer", "DistillationTrainer")
    full_logits = [c.__name__ for c in type(trainer).__mro__ if c.__name__ in _FULL_LOGIT_TRAINERS]
    for name in names if not full_logits else ():
        cls = getattr(trl, name, None)
        if isinstance(cls, type) and isinstance(trainer, cls):
            return name
    raise UnsupportedTrainerError(
        f"apply_leanloss: {type(trainer).__name__} (TRL {_trl_version()}) is not supported; "
        f"leanloss reproduces {', '.join(names)} (TRL's GKD and GOLD trainers compute their "
        "losses on full logits, not through the fused head)"
    )


def _check_no_zero3(trainer) -> None:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return
    if is_deepspeed_zero3_enabled():
        raise UnsupportedTrainerError(
            f"apply_leanloss: {type(trainer).__name__} (TRL {_trl_version()}) runs under DeepSpeed "
            "ZeRO-3, whose partitioned head leanloss does not gather; use FSDP2 or ZeRO-2"
        )


def apply_leanloss(trainer):
    """Put leanloss's engine behind a constructed TRL trainer; returns ``trainer``.

    * SFT, DPO, KTO, GRPO, RLOO: every model TRL patched with its ``add_fused_lm_head`` (the
      policy, or its PEFT base model, and the reference model) is re-patched by
      :func:`add_fused_lm_head` with the same ``temperature``, ``cast_lm_head_to_fp32`` and
      ``outputs``.
    * Distillation: the student-teacher divergence (generalized JSD with TRL's ``beta`` and
      ``temperature``, each head's logit scale and ``final_logit_softcapping``) runs
      :func:`divergence_loss` instead of TRL's chunked kernel.

    Losses, gradients and logged metrics equal TRL's own. Calling it twice is harmless.

    Raises:
        UnsupportedTrainerError: another trainer class (GKD, GOLD, ...), a TRL version outside
            :data:`SUPPORTED_TRL`, or DeepSpeed ZeRO-3; the message names the class and TRL's
            version.
    """
    kind = _trainer_kind(trainer)
    _check_trl_version(f"apply_leanloss({type(trainer).__name__})")
    _check_no_zero3(trainer)
    if kind == "DistillationTrainer":
        _route_divergence(trainer)
        return trainer
    patched = [_repatch(model) for model in _patched_models(trainer)]
    if not patched or not patched[0]:
        raise UnsupportedTrainerError(
            f"apply_leanloss: {type(trainer).__name__} (TRL {_trl_version()}): its model has no fused "
            "LM head from TRL's add_fused_lm_head to replace"
        )
    return trainer


# ----------------------------------------------------------------------------------------------
# the distillation divergence

_DIVERGENCE_FSDP: contextvars.ContextVar = contextvars.ContextVar("leanloss_trl_divergence", default=None)


def _gathered(weight: Optional[Tensor], fsdp: bool) -> Optional[Tensor]:
    return weight.full_tensor() if fsdp and has_dtensor(weight) else weight


def divergence_loss(student_hidden_states: Tensor, teacher_hidden_states: Tensor, student_lm_head_weight: Tensor,
                    teacher_lm_head_weight: Tensor, completion_mask: Tensor, beta: float,
                    num_items_in_batch=None, student_lm_head_bias: Optional[Tensor] = None,
                    teacher_lm_head_bias: Optional[Tensor] = None, student_logit_scale: float = 1.0,
                    teacher_logit_scale: float = 1.0, student_final_logit_softcapping: Optional[float] = None,
                    teacher_final_logit_softcapping: Optional[float] = None, temperature: float = 1.0):
    r"""TRL's distillation divergence (``DistillationTrainer``'s ``_chunked_divergence_loss``,
    same arguments) by :func:`leanloss.linear_distill_loss`.

    Per kept position (``completion_mask != 0``), with ``q`` the student's and ``p`` the
    teacher's ``softmax(softcap(s * (h @ W.T + b)) / T)`` (each head's ``s`` and soft-cap
    ``c``, ``softcap(x) = c * tanh(x / c)``, none when ``c`` is ``None``, as TRL applies them):
    ``JSD_beta(p, q) = beta KL(p||m) + (1-beta) KL(q||m)``, ``m = beta p + (1-beta) q``, ``KL(p||q)`` at ``beta = 0`` and ``KL(q||p)`` at
    ``beta = 1`` (leanloss's ``kind='jsd'``; ``linear_distill_loss``'s ``T^2`` factor is divided
    out, TRL has none). Returns ``(loss, entropy_sum, n_valid)``: the summed divergence over
    ``num_items_in_batch`` (or ``n_valid`` clamped at 1), the summed student entropy (no
    gradient) and the number of kept positions.
    """
    fsdp = _DIVERGENCE_FSDP.get() or (False, False)
    w_s, b_s = _gathered(student_lm_head_weight, fsdp[0]), _gathered(student_lm_head_bias, fsdp[0])
    w_t, b_t = _gathered(teacher_lm_head_weight, fsdp[1]), _gathered(teacher_lm_head_bias, fsdp[1])
    h_s = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1]).detach()
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    target = torch.where(valid, 0, -100).to(device=h_s.device)
    h_s, b_s, s_s = _positive_scale(h_s, b_s, student_logit_scale)
    h_t, b_t, s_t = _positive_scale(h_t, b_t, teacher_logit_scale)
    total = linear_distill_loss(h_s, w_s, h_t, w_t.detach(), target, student_bias=b_s,
                                teacher_bias=None if b_t is None else b_t.detach(), kind="jsd", beta=beta,
                                temperature=temperature, reduction="sum",
                                student_softcap=student_final_logit_softcapping,
                                teacher_softcap=teacher_final_logit_softcapping,
                                student_logit_scale=s_s, teacher_logit_scale=s_t)
    if temperature != 1.0:
        total = total / (temperature * temperature)
    if not total.requires_grad and torch.is_grad_enabled() and h_s.requires_grad:
        total = total + h_s.sum() * 0  # no kept position: a differentiable zero
    with torch.no_grad():
        entropy = linear_log_probs(h_s.detach(), w_s.detach(), target, None if b_s is None else b_s.detach(),
                                   temperature=temperature, softcap=student_final_logit_softcapping,
                                   logit_scale=s_s, return_entropy=True)[1]
    if num_items_in_batch is None:
        loss = total / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    return loss, entropy.sum(), n_valid


def _divergence_router(original):
    """The replacement of TRL's module-level ``_chunked_divergence_loss``: leanloss's inside a
    patched trainer's ``_compute_loss``, TRL's everywhere else."""

    @functools.wraps(original)
    def routed(*args, **kwargs):
        if _DIVERGENCE_FSDP.get() is None:
            return original(*args, **kwargs)
        return divergence_loss(*args, **kwargs)

    routed._leanloss_original = original
    return routed


def _route_divergence(trainer) -> None:
    module = importlib.import_module("trl.trainer.distillation_trainer")
    current = getattr(module, "_chunked_divergence_loss", None)
    compute = getattr(trainer, "_compute_loss", None)
    if current is None or compute is None:
        raise UnsupportedTrainerError(
            f"apply_leanloss: {type(trainer).__name__} (TRL {_trl_version()}) has no "
            "_chunked_divergence_loss to route; this TRL version is not supported"
        )
    if not hasattr(current, "_leanloss_original"):
        module._chunked_divergence_loss = _divergence_router(current)
    if getattr(compute, "_leanloss_routed", False):
        return

    @functools.wraps(compute)
    def compute_loss(*args, **kwargs):
        fsdp = (_is_fsdp_managed(trainer.model), _is_fsdp_managed(trainer.teacher_model))
        token = _DIVERGENCE_FSDP.set(fsdp)
        try:
            return compute(*args, **kwargs)
        finally:
            _DIVERGENCE_FSDP.reset(token)

    compute_loss._leanloss_routed = True
    trainer._compute_loss = compute_loss
