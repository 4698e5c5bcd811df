"""verl 0.9.1 profiles: build fastalign losses and advantages from verl's own configs.

``policy``: ``actor_rollout_ref.actor.policy_loss`` (``loss_mode``, clip ratios, ``loss_agg_mode``,
KL and entropy terms); ``advantages``: ``algorithm.adv_estimator``. Metrics come back under
verl's names (``actor/pg_clipfrac``, ...).
"""
from fastalign.integrations.verl.advantages import *  # noqa: F401,F403
from fastalign.integrations.verl.policy import *  # noqa: F401,F403
