"""Trainer integrations: one sub-package per trainer or model library.

Each imports its library lazily, and is the only place in fastalign that does.

* :mod:`fastalign.integrations.hf` — ``transformers`` causal LMs: ``causal_lm_logprobs`` from
  hidden states and the model's own head, without the ``[B, T, V]`` logits.
* :mod:`fastalign.integrations.trl` — TRL 1.16 profiles: ``GRPOConfig`` / ``DPOConfig`` /
  ``CPOConfig`` / ``ORPOConfig`` / ``KTOConfig`` → fastalign losses with TRL's numbers and
  metric names.
* :mod:`fastalign.integrations.verl` — verl 0.9.1 profiles: ``policy_loss`` configs and
  ``adv_estimator`` → fastalign losses and advantages with verl's numbers and metric names; a
  ``verl.plugins`` entry point registers them as ``fastalign_<name>`` and adds the fused head
  ``impl_backend=fastalign``.
* :mod:`fastalign.integrations.openrlhf` — OpenRLHF 0.11.2's ``PolicyLoss`` and ``DPOLoss``
  (same constructor and call), computed by fastalign.
"""
