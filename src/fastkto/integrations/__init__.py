"""Integrations with the training stack people use; each is optional and imported on demand.

* ``fastkto.integrations.transformers``: hidden states and LM head (weight, bias, logit transform) of any
  ``transformers`` causal LM, PEFT / LoRA models included (needs ``transformers``).
* ``fastkto.integrations.trl``: TRL's ``KTOTrainer`` and ``DPOTrainer`` with fastkto computing their log-probs
  (needs ``trl`` >= 1.16).

Nothing is imported here, so ``import fastkto`` never pulls in transformers or TRL.
"""
