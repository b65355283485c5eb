"""Optional integrations with other libraries.

Each submodule imports its library on import and is never imported by ``leanloss`` itself:

* :mod:`leanloss.integrations.transformers` (extra ``leanloss[transformers]``):
  ``apply_leanloss(model)`` / ``remove_leanloss(model)`` and ``LeanlossTrainer`` train Hugging
  Face causal LMs with :func:`leanloss.linear_cross_entropy`, never holding the logits.
* :mod:`leanloss.integrations.trl` (extra ``leanloss[trl]``): ``add_fused_lm_head(model)`` and
  ``apply_leanloss(trainer)`` put leanloss's engine behind TRL's fused LM head (SFT, DPO, KTO,
  GRPO, RLOO) and its distillation divergence.
"""
