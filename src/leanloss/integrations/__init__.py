"""Optional integrations with other libraries.

Each submodule imports its library on import and is never imported by ``leanloss`` itself:

* :mod:`leanloss.integrations.transformers` (extra ``leanloss[transformers]``):
  ``apply_leanloss(model)`` / ``remove_leanloss(model)`` and ``LeanlossTrainer`` train Hugging
  Face causal LMs with :func:`leanloss.linear_cross_entropy`, never holding the logits.
"""
