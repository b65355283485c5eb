"""Train Hugging Face ``*ForCausalLM`` models with the fused linear cross entropy.

``apply_leanloss(model)`` patches one model *instance* (its class and every other instance are
left alone). When the patched ``forward`` gets ``labels`` in training mode it runs the model's
base (decoder) module, takes the last hidden states and computes

    loss = linear_cross_entropy(h, W, shift(labels), b, ignore_index=-100,
                                num_items=num_items_in_batch,
                                softcap=config.final_logit_softcapping, logit_scale=s)

where ``W``/``b`` are ``model.get_output_embeddings()``'s weight and bias, ``shift`` is
transformers' causal shift (``labels[..., 1:]`` padded on the right with -100, or the
``shift_labels`` keyword as given) and ``s`` the architecture's fixed logit scale (Cohere's
``logit_scale``, Granite's ``1 / logits_scaling``). This is the value of the model's own loss,
``ForCausalLMLoss(softcap(s * lm_head(h)), labels)``, without the (tokens x vocab) logits ever
existing: the output is the model's usual ``CausalLMOutputWithPast`` with ``loss`` set and
``logits=None``.

Everything else runs the original ``forward`` unchanged: calls without ``labels``, and calls in
eval mode (``model.eval()``) unless ``apply_leanloss(model, eval_logits=False)``. A call may force
either path with the extra keyword ``return_logits=True`` (original forward, logits and loss)
or ``return_logits=False`` (fused loss, no logits).

Distributed: under DDP and FSDP2 (``fully_shard`` per layer and on the root, before or after
patching) the loss runs on the gathered head. A head parallelized with
``ColwiseParallel(use_local_output=False)`` has a vocab-sharded DTensor weight, so
``linear_cross_entropy`` runs the vocab-parallel fused loss over the tensor-parallel group (also
inside FSDP2 on a 2-D mesh). A head given to ``fully_shard`` on its own is refused: its weight is
only gathered when its own forward runs, which the fused loss never calls.

Models the patch cannot reproduce are refused with :class:`UnsupportedModelError` naming the
reason: no output embeddings, no base model, a non-causal-LM loss, an encoder-decoder, a MoE
router auxiliary loss, or (checked by a tiny probe forward when ``verify=True``) logits that are
not ``softcap(s * (h @ W.T + b))`` of the base model's last hidden state.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import transformers
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "leanloss.integrations.transformers needs the 'transformers' package: "
        "pip install 'leanloss[transformers]'"
    ) from exc

from ..linear import linear_cross_entropy
from .._dtensor import has_dtensor, replicated_local
from .. import _checks
from .._checks import LeanlossTypeError, LeanlossValueError

__all__ = [
    "UnsupportedModelError",
    "apply_leanloss",
    "remove_leanloss",
    "is_leanloss_applied",
    "LeanlossTrainer",
]

#: Keyword arguments of a causal LM's ``forward`` that feed only its loss, never the decoder.
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
_STATE_ATTR = "_leanloss_state"
_MISSING = object()


class UnsupportedModelError(LeanlossTypeError):
    """``apply_leanloss`` cannot reproduce this model's loss with the fused linear cross entropy."""


@dataclasses.dataclass
class _PatchState:
    """What ``apply_leanloss`` installed on one model, and what ``remove_leanloss`` restores."""

    original_forward: Callable  # the ``forward`` the model had (bound method or instance attribute)
    instance_forward: Any  # the instance-level ``forward`` before patching, or ``_MISSING``
    signature: inspect.Signature  # the original forward's signature (no ``self``)
    output_class: type  # what the original forward returns (CausalLMOutputWithPast or a subclass-like)
    softcap: Optional[float]
    logit_scale: float
    eval_logits: bool
    label_smoothing: float
    chunk_size: Optional[int]


# ----------------------------------------------------------------------------------------------
# what the model's head does, read from its config


def _head_transform(config) -> tuple[Optional[float], float]:
    """``(softcap, logit_scale)`` the architecture applies to ``lm_head(h)`` before its loss.

    Gemma 2/3 (and every config with ``final_logit_softcapping``): ``c * tanh(z / c)``;
    Cohere/Cohere2: ``z * config.logit_scale``; Granite: ``z / config.logits_scaling``.
    Other config keys of the same name that the architecture does not apply are caught by the
    probe in :func:`apply_leanloss`.
    """
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0:
            raise UnsupportedModelError(
                f"apply_leanloss: config.final_logit_softcapping must be positive, got {softcap}"
            )
    scale = 1.0
    model_type = getattr(config, "model_type", "")
    cfg_scale = getattr(config, "logit_scale", None)
    if cfg_scale is not None and model_type.startswith("cohere"):
        scale *= float(cfg_scale)
    cfg_div = getattr(config, "logits_scaling", None)
    if cfg_div is not None:
        scale /= float(cfg_div)
    return softcap, scale


def _transform_logits(z: Tensor, softcap: Optional[float], scale: float) -> Tensor:
    """``softcap(scale * z)`` with ``softcap(x) = c * tanh(x / c)``: the dense twin of the fused head."""
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


# ----------------------------------------------------------------------------------------------
# checks on the model


def _refuse(model: nn.Module, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"apply_leanloss: cannot patch {type(model).__name__}: {reason}"
    )


def _output_head(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise _refuse(model, "it has no output embeddings (get_output_embeddings() returned None)")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise _refuse(
            model,
            f"its output embeddings {type(head).__name__} hold no floating-point (vocab, hidden) "
            "weight (quantized or custom heads are not supported)",
        )
    if type(head).forward is not nn.Linear.forward:
        raise _refuse(
            model,
            f"its output embeddings {type(head).__name__} are not a plain nn.Linear "
            "(their forward may do more than h @ W.T + b)",
        )
    return head


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        raise _refuse(
            model,
            "no decoder found: model.base_model (the attribute named by base_model_prefix="
            f"{getattr(model, 'base_model_prefix', None)!r}) is missing or the model itself",
        )
    return base


def _accepts(sig: inspect.Signature, name: str) -> bool:
    params = sig.parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_model(model: nn.Module, sig: inspect.Signature, base: nn.Module) -> None:
    if not isinstance(model, transformers.PreTrainedModel):
        raise _refuse(model, "it is not a transformers.PreTrainedModel (for a PEFT model, "
                      "patch peft_model.get_base_model())")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(model, "encoder-decoder models align labels differently (no causal shift)")
    if any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
        raise _refuse(model, "its forward takes *args")
    if "labels" not in sig.parameters:
        raise _refuse(model, "its forward takes no 'labels' argument")
    if getattr(config, "output_router_logits", False):
        raise _refuse(model, "config.output_router_logits=True adds a MoE router auxiliary loss "
                      "that the fused loss does not compute")
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers < 4.46
        ForCausalLMLoss = None
    loss_fn = getattr(model, "loss_function", None)
    if ForCausalLMLoss is not None and loss_fn is not ForCausalLMLoss:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise _refuse(model, f"its loss function is {name}, not transformers' ForCausalLMLoss")
    base_sig = inspect.signature(base.forward)
    for name in sig.parameters:
        if name in ("labels", "logits_to_keep", "num_logits_to_keep") or name in _LOSS_KWARGS:
            continue
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if not _accepts(base_sig, name):
            raise _refuse(model, f"its forward argument {name!r} is not an argument of its base "
                          f"model {type(base).__name__}, so the forward does more than "
                          "base model + LM head")


def _local_logits(logits: Tensor) -> Tensor:
    """This rank's part of logits that may be a DTensor (a vocab-parallel head's output)."""
    return logits.to_local() if has_dtensor(logits) else logits


def _head_logits(hidden: Tensor, head: nn.Module) -> Tensor:
    """``head(hidden)`` as this rank holds it: for a DTensor head, its local shard of the logits
    (``hidden @ W_local.T + b_local``), which is what its own forward gives this rank."""
    weight, bias = head.weight, head.bias
    if has_dtensor(hidden, weight, bias):
        hidden = replicated_local("apply_leanloss", "hidden", hidden)
        weight, bias = _local_logits(weight), None if bias is None else _local_logits(bias)
    return F.linear(hidden, weight, bias)


def _fsdp_module_class():
    """``FSDPModule`` once ``torch.distributed.fsdp`` was imported (else no model can be one)."""
    module = sys.modules.get("torch.distributed.fsdp")
    return getattr(module, "FSDPModule", None)


def _check_head_not_sharded_alone(model: nn.Module, head: nn.Module) -> None:
    """A head given to ``fully_shard`` on its own is all-gathered only when its own forward
    runs, which the fused loss never calls: its weight would be this rank's FSDP shard."""
    fsdp = _fsdp_module_class()
    if fsdp is not None and head is not model and isinstance(head, fsdp):
        raise _refuse(model, f"its output embeddings {type(head).__name__} were passed to "
                      "fully_shard on their own; the fused loss reads their weight without "
                      "calling them, so shard them together with the root module (call "
                      "fully_shard on the model last, not on lm_head)")


def _probe(model: nn.Module, base: nn.Module, head: nn.Module, sig: inspect.Signature,
           softcap: Optional[float], scale: float) -> None:
    """Check on 4 tokens that the original logits equal ``softcap(scale * head(base(x)))``.

    One call of the model (through ``__call__``, so that its hooks run: a model already given to
    ``fully_shard`` gathers its parameters); the head's logits are recomputed from the base
    model's output inside a hook on the base model, where those parameters are gathered. A
    tensor-parallel head compares this rank's slice of the vocabulary."""
    vocab = head.weight.shape[0]
    device = head.weight.device
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and isinstance(getattr(embed, "weight", None), Tensor):
        device = embed.weight.device
    ids = (torch.arange(4, device=device) * 7919 % max(vocab, 1)).unsqueeze(0)
    kwargs = {"use_cache": False} if "use_cache" in sig.parameters else {}
    was_training = model.training
    recomputed = []

    def recompute(module, args, output):
        recomputed.append(_transform_logits(_head_logits(_last_hidden_state(output), head).float(),
                                            softcap, scale))

    hook = base.register_forward_hook(recompute)
    try:
        model.eval()
        with torch.no_grad():
            reference = model(input_ids=ids, return_dict=True, **kwargs).logits
    except UnsupportedModelError:
        raise
    except Exception as exc:  # the probe could not even run: refuse with the cause
        raise _refuse(model, f"the verification probe failed ({type(exc).__name__}: {exc}); "
                      "pass verify=False to skip it") from exc
    finally:
        hook.remove()
        model.train(was_training)
    if len(recomputed) != 1:
        raise _refuse(model, "its forward does not call its base model exactly once")
    ours = recomputed[0]
    if reference is not None:
        reference = _local_logits(reference)
    if reference is None or reference.shape != ours.shape:
        raise _refuse(model, "its forward does not return logits of shape (batch, tokens, vocab) "
                      "from the base model's last hidden state")
    reference = reference.float()
    tol = (1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 3e-2)
    bound = tol * (1.0 + reference.abs().max().item())
    err = (reference - ours).abs().max().item()
    if not err <= bound:
        raise _refuse(
            model,
            f"its logits are not softcap={softcap}, logit_scale={scale} applied to "
            f"lm_head(last hidden state) (max deviation {err:.3g} on a probe, allowed {bound:.3g}); "
            "its forward transforms the logits in a way leanloss does not reproduce",
        )


# ----------------------------------------------------------------------------------------------
# the patched forward


def _output_class(model: nn.Module, sig: inspect.Signature) -> type:
    """The ``ModelOutput`` class the forward's return annotation names (``CausalLMOutputWithPast``
    if none): MoE models keep their ``MoeCausalLMOutputWithPast``."""
    ann = sig.return_annotation
    if isinstance(ann, str):
        module = inspect.getmodule(type(model))
        ann = getattr(module, ann.split("[")[0].strip(), None)
    if isinstance(ann, type) and dataclasses.is_dataclass(ann):
        names = {f.name for f in dataclasses.fields(ann)}
        if {"loss", "logits"} <= names:
            return ann
    return CausalLMOutputWithPast


def _last_hidden_state(out) -> Tensor:
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out[0]


def _slice_kept(hidden: Tensor, logits_to_keep) -> Tensor:
    """``hidden`` restricted to the positions ``logits_to_keep`` selects, as the model's forward does."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # transformers 4.x: an int (0 keeps all) or a 1D index tensor
        index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, index, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _causal_targets(labels: Tensor, shift_labels: Optional[Tensor], ignore_index: int) -> Tensor:
    """transformers' ``ForCausalLMLoss`` shift: position i predicts ``labels[i + 1]``, last -> ignored."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _fused_forward(model: nn.Module, state: _PatchState, named: dict) -> Any:
    labels = named.pop("labels")
    logits_to_keep = named.pop("logits_to_keep", named.pop("num_logits_to_keep", 0))
    num_items = named.pop("num_items_in_batch", None)
    shift_labels = named.pop("shift_labels", None)
    ignore_index = named.pop("ignore_index", -100)
    return_dict = named.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    if named.get("output_router_logits"):
        raise _refuse(model, "output_router_logits=True adds a MoE router auxiliary loss that "
                      "the fused loss does not compute; call with return_logits=True")

    out = _base_model(model)(**named, return_dict=True)
    hidden = _slice_kept(_last_hidden_state(out), logits_to_keep)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = _causal_targets(labels, shift_labels, ignore_index).to(hidden.device)
    if target.numel() != hidden.shape[0]:
        raise LeanlossValueError(
            f"{type(model).__name__}.forward (leanloss): the shifted labels hold {target.numel()} "
            f"targets but logits_to_keep={logits_to_keep!r} keeps {hidden.shape[0]} positions"
        )
    head = model.get_output_embeddings()
    _check_head_not_sharded_alone(model, head)
    if torch.is_tensor(num_items):
        num_items = num_items.to(hidden.device)
    loss = linear_cross_entropy(
        hidden, head.weight, target, head.bias,
        ignore_index=ignore_index, label_smoothing=state.label_smoothing,
        softcap=state.softcap, logit_scale=state.logit_scale,
        num_items=num_items, chunk_size=state.chunk_size,
    )
    fields = {
        f.name: getattr(out, f.name, None)
        for f in dataclasses.fields(state.output_class)
        if f.name not in ("loss", "logits")
    }
    output = state.output_class(loss=loss, logits=None, **fields)
    return output if return_dict else output.to_tuple()


def _leanloss_forward(self: nn.Module, *args, **kwargs):
    """The patched ``forward``: fused loss for labelled training calls, the original otherwise."""
    state: _PatchState = self.__dict__[_STATE_ATTR]
    return_logits = kwargs.pop("return_logits", None)
    bound = state.signature.bind_partial(*args, **kwargs)
    named = dict(bound.arguments)
    for name, param in state.signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    if return_logits is None:
        fused = self.training or not state.eval_logits
    else:
        fused = not return_logits
    if named.get("labels") is None or not fused:
        return state.original_forward(*args, **kwargs)
    return _fused_forward(self, state, named)


# ----------------------------------------------------------------------------------------------
# public API


def apply_leanloss(
    model: nn.Module,
    *,
    eval_logits: bool = True,
    verify: bool = True,
    label_smoothing: float = 0.0,
    chunk_size: Optional[int] = None,
) -> nn.Module:
    """Patch a transformers ``*ForCausalLM`` instance to train with :func:`leanloss.linear_cross_entropy`.

    With ``labels`` (``(B, T)`` int64, -100 = ignored) in training mode the patched forward
    returns ``CausalLMOutputWithPast(loss=L, logits=None, cache/hidden_states/attentions of the
    base model; the class the forward's annotation names, e.g. MoE outputs)`` where ``L`` equals the model's own ``ForCausalLMLoss``:

        L = sum_i ce(softcap(s * (h_i @ W.T + b)), y_{i+1}) / n,  over non-ignored i,

    ``h = base_model(...).last_hidden_state`` sliced by ``logits_to_keep``, ``y`` the labels
    shifted left and padded with -100 (or ``shift_labels`` as given), ``n`` the number of
    non-ignored targets or ``num_items_in_batch`` when given (gradient accumulation). The
    ``(B, T, V)`` logits are never formed; gradients flow to the base model, ``W`` and ``b``.
    It mirrors ``model.forward(..., labels=labels).loss``.

    Args:
        model: a ``transformers.PreTrainedModel`` causal LM (not a class; the class and its
            other instances are untouched). Patching twice replaces the first patch.
        eval_logits: in eval mode (``model.training`` False) run the original forward, so
            evaluation gets logits as before. ``False`` uses the fused loss in eval too.
            A call can override both with ``return_logits=True|False``.
        verify: run a 4-token probe now and refuse the model if its logits are not
            ``softcap(s * (h @ W.T + b))`` of the base model's last hidden state (catches
            architecture-specific logit transforms). Soft-capping is invisible to the probe
            while the logits are far below the cap.
        label_smoothing: passed to the loss (what ``Trainer``'s ``label_smoothing_factor`` does).
        chunk_size: passed to ``linear_cross_entropy`` (``None``: its default).

    Under DDP/FSDP pass ``num_items_in_batch`` = the global number of counted (shifted) targets
    over the data-parallel ranks and accumulation steps, and scale the loss by the data-parallel
    size before ``backward`` (the engines average gradients); ``Trainer`` does both.

    Returns:
        ``model`` itself, patched.

    Raises:
        UnsupportedModelError: the model is not a causal LM whose loss is
            ``ForCausalLMLoss(softcap(s * lm_head(base_model(x))))``; the message says why.
    """
    if is_leanloss_applied(model):
        remove_leanloss(model)
    head = _output_head(model)
    _check_head_not_sharded_alone(model, head)
    base = _base_model(model)
    original = model.forward
    sig = inspect.signature(original)
    _check_model(model, sig, base)
    softcap, scale = _head_transform(model.config)
    if verify:
        _probe(model, base, head, sig, softcap, scale)
    label_smoothing = _checks.check_label_smoothing("apply_leanloss", label_smoothing)

    state = _PatchState(
        original_forward=original,
        instance_forward=model.__dict__.get("forward", _MISSING),
        signature=sig,
        output_class=_output_class(model, sig),
        softcap=softcap,
        logit_scale=scale,
        eval_logits=bool(eval_logits),
        label_smoothing=label_smoothing,
        chunk_size=chunk_size,
    )
    # One function per patch so that its signature (read by Trainer to pick dataset columns and
    # to detect loss kwargs) is the original one.
    def forward(self, *args, **kwargs):
        return _leanloss_forward(self, *args, **kwargs)

    forward.__doc__ = getattr(original, "__doc__", None)
    forward.__name__ = forward.__qualname__ = "forward"
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    model.__dict__[_STATE_ATTR] = state
    model.forward = types.MethodType(forward, model)
    return model


def is_leanloss_applied(model: nn.Module) -> bool:
    """Whether :func:`apply_leanloss` has patched ``model``."""
    return _STATE_ATTR in getattr(model, "__dict__", {})


def remove_leanloss(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_leanloss`: restore the exact ``forward`` the model had; return ``model``.

    Raises ``LeanlossValueError`` if ``model`` is not patched.
    """
    if not is_leanloss_applied(model):
        raise LeanlossValueError(
            f"remove_leanloss: {type(model).__name__} is not patched by apply_leanloss"
        )
    state: _PatchState = model.__dict__.pop(_STATE_ATTR)
    if state.instance_forward is _MISSING:
        del model.__dict__["forward"]
    else:
        model.__dict__["forward"] = state.instance_forward
    return model


class LeanlossTrainer(transformers.Trainer):
    """``transformers.Trainer`` that trains with the fused loss (:func:`apply_leanloss`).

    Same arguments as ``Trainer``, plus ``leanloss_options`` (a dict of :func:`apply_leanloss`
    keywords). The model (or each model ``model_init`` builds) is patched before ``Trainer``
    inspects it, so ``num_items_in_batch`` (gradient accumulation) reaches the fused loss as
    ``num_items``. ``args.label_smoothing_factor`` is applied inside the fused loss (the same
    value ``Trainer``'s ``LabelSmoother`` computes) instead of on logits.
    """

    def __init__(self, model=None, args=None, *more, leanloss_options: Optional[dict] = None,
                 **kwargs):
        options = dict(leanloss_options or {})
        smoothing = getattr(args, "label_smoothing_factor", 0.0) if args is not None else 0.0
        if smoothing:
            options.setdefault("label_smoothing", smoothing)
        self._leanloss_options = options
        if model is not None:
            apply_leanloss(model, **options)
        model_init = kwargs.get("model_init")
        if model_init is not None:
            kwargs["model_init"] = self._patched_init(model_init, options)
        super().__init__(model, args, *more, **kwargs)
        # The fused loss applies the smoothing; Trainer's smoother would need logits.
        self.label_smoother = None

    @staticmethod
    def _patched_init(model_init: Callable, options: dict) -> Callable:
        def init(*trial):
            return apply_leanloss(model_init(*trial), **options)

        return init
