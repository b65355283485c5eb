"""Argument and input validation, in one package.

* :mod:`leanloss.errors`: the public exception and warning classes (re-exported here);
* :mod:`.mode`: the check mode (``'full'`` | ``'shapes'`` | ``'off'``) and whether metadata or
  value checks run now;
* :mod:`.primitives`: generic tensor, dtype, device, shape, number and value-range checks, the
  message formatters, and :func:`warn`;
* :mod:`.losses`: validators of one loss's arguments (class weights, label smoothing, targets,
  fused LM-head inputs, distillation options, top-k teachers);
* :mod:`.distributed`: the summaries of targets (and other per-row tensors that must agree)
  that a vocab-parallel group checks together.

Callers use the names below as ``_checks.<name>``.
"""
from .. import errors
from ..errors import *  # noqa: F403 - the public error classes, re-exported (errors.__all__)
from .distributed import (FINGERPRINT_SIZE, TARGET_SUMMARY_SIZE, check_identical_across_ranks,
                          check_targets_across_ranks, fingerprint, target_summary)
from .losses import (
    DISTILL_KINDS,
    check_class_weight,
    check_distill_options,
    check_distill_target,
    check_index_target_dtype,
    check_index_target_range,
    check_index_target_shape,
    check_label_smoothing,
    check_linear_shapes,
    check_row_targets,
    check_topk,
    check_topk_options,
)
from .mode import CHECK_MODES, checks, get_checks, set_checks, shapes_enabled, values_enabled
from .primitives import (
    check_broadcastable,
    check_floating,
    check_in_closed_interval,
    check_nonnegative,
    check_plus_minus_one,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    check_tensor,
    check_unit_interval,
    choices,
    dtype_name,
    first_position,
    fmt_shape,
    fmt_value,
    warn,
)

__all__ = errors.__all__ + [
    "CHECK_MODES",
    "set_checks",
    "get_checks",
    "checks",
    "shapes_enabled",
    "values_enabled",
    "warn",
    "fmt_value",
    "fmt_shape",
    "dtype_name",
    "first_position",
    "check_tensor",
    "check_floating",
    "check_same_dtype",
    "check_same_shape",
    "check_broadcastable",
    "check_same_device",
    "choices",
    "check_positive",
    "check_in_closed_interval",
    "check_unit_interval",
    "check_nonnegative",
    "check_plus_minus_one",
    "check_class_weight",
    "check_label_smoothing",
    "check_index_target_dtype",
    "check_index_target_shape",
    "check_row_targets",
    "check_index_target_range",
    "check_linear_shapes",
    "DISTILL_KINDS",
    "check_distill_options",
    "check_distill_target",
    "check_topk",
    "check_topk_options",
    "TARGET_SUMMARY_SIZE",
    "target_summary",
    "check_targets_across_ranks",
    "FINGERPRINT_SIZE",
    "fingerprint",
    "check_identical_across_ranks",
]
