"""Trainer integrations: one sub-package per trainer or model library.

Each imports its library lazily, and is the only place in fastalign that does.

* :mod:`fastalign.integrations.hf` — ``transformers`` causal LMs: ``causal_lm_logprobs`` from
  hidden states and the model's own head, without the ``[B, T, V]`` logits.
* :mod:`fastalign.integrations.trl` — TRL 1.16 profiles: ``GRPOConfig`` / ``RLOOConfig`` /
  ``DPOConfig`` / ``CPOConfig`` / ``ORPOConfig`` / ``KTOConfig`` / ``GMPOConfig`` → fastalign losses with
  TRL's numbers and metric names, and drop-in trainers (one import to change).
* :mod:`fastalign.integrations.verl` — verl 0.9.1 profiles: ``policy_loss`` configs and
  ``adv_estimator`` → fastalign losses and advantages with verl's numbers and metric names; a
  ``verl.plugins`` entry point registers them as ``fastalign_<name>`` and adds the fused head
  ``impl_backend=fastalign``.
* :mod:`fastalign.integrations.openrlhf` — every loss of OpenRLHF 0.11.2's ``loss.py`` (``PolicyLoss``,
  ``DPOLoss``, ``GPTLMLoss``, ``SFTLoss``, ``ValueLoss``, ``PairWiseLoss``, ``LogExpLoss``; same constructor
  and call), computed by fastalign.
* :mod:`fastalign.integrations.liger` — Liger-Kernel 0.8's fused-linear losses (GRPO, DPO, CPO, ORPO,
  SimPO, KTO, JSD, cross-entropy; same constructor and call), from hidden states.
"""
