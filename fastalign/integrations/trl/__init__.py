"""TRL 1.16 trainer profiles: build fastalign losses from TRL's own config objects.

``grpo``: the policy loss of ``GRPOTrainer``; ``preference``: the losses of ``DPOTrainer``,
``CPOTrainer``, ``ORPOTrainer`` and ``KTOTrainer``; ``rloo``: ``RLOOTrainer``'s advantages.
Metrics come back under TRL's names.
"""
from fastalign.integrations.trl.grpo import *  # noqa: F401,F403
from fastalign.integrations.trl.preference import *  # noqa: F401,F403
from fastalign.integrations.trl.rloo import *  # noqa: F401,F403
