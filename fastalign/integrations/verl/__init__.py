"""verl 0.9.1 profiles: build fastalign losses and advantages from verl's own configs.

``policy``: ``actor_rollout_ref.actor.policy_loss`` (``loss_mode``, clip ratios, ``loss_agg_mode``,
KL and entropy terms); ``advantages``: ``algorithm.adv_estimator``. Metrics come back under
verl's names (``actor/pg_clipfrac``, ...). ``plugin`` (loaded by verl's ``verl.plugins`` entry point
at ``import verl``) registers them in verl's registries as ``fastalign_<name>``; ``fused`` is the
fused log-prob / entropy head selected by ``fused_kernel_options.impl_backend=fastalign``; ``megatron`` the
logits processor of verl's Megatron engine (tensor-parallel logits, ``FASTALIGN_VERL_MEGATRON=1``);
``distillation`` the top-k forward KL of on-policy distillation (``loss_mode=fastalign_forward_kl_topk``).
"""
from fastalign.integrations.verl.advantages import *  # noqa: F401,F403
from fastalign.integrations.verl.policy import *  # noqa: F401,F403
