"""TRL 1.16 integration: trainer profiles and drop-in trainers.

Profiles build fastalign losses from TRL's own config objects: ``grpo`` (the policy loss of
``GRPOTrainer``), ``gmpo`` (the loss of the experimental ``GMPOTrainer``), ``preference`` (the losses of
``DPOTrainer``, ``CPOTrainer``, ``ORPOTrainer``, ``KTOTrainer`` and the experimental ``TPOTrainer``),
``grpo_rewards`` (``GRPOTrainer``'s advantages), ``rloo`` (``RLOOTrainer``'s advantages and
loss), ``iw_opd`` and ``iw_opd_jsd`` (the experimental ``IWOPDTrainer``'s IW-OPD and JSD objectives),
``a2po`` (the experimental ``A2POTrainer``'s optimal values and loss) and ``self_distillation`` (the
experimental ``SDPOTrainer``'s and ``SDFTTrainer``'s self-distillation loss). Metrics come back under TRL's names.

Drop-in trainers, subclasses of TRL's with the same constructor and config classes::

    from fastalign.integrations.trl import SFTTrainer, GRPOTrainer, RLOOTrainer, DPOTrainer, KTOTrainer   # was: from trl import ...
    from fastalign.integrations.trl import CPOTrainer, ORPOTrainer   # was: from trl.experimental.cpo / .orpo
    from fastalign.integrations.trl import GMPOTrainer   # was: from trl.experimental.gmpo import GMPOTrainer
    from fastalign.integrations.trl import TPOTrainer   # was: from trl.experimental.tpo import TPOTrainer
    from fastalign.integrations.trl import DistillationTrainer   # was: from trl import DistillationTrainer
    from fastalign.integrations.trl import GKDTrainer   # was: from trl.experimental.gkd import GKDTrainer
    from fastalign.integrations.trl import GOLDTrainer   # was: from trl.experimental.gold import GOLDTrainer
    from fastalign.integrations.trl import OnlineDPOTrainer   # was: from trl.experimental.online_dpo import ...
    from fastalign.integrations.trl import A2POTrainer   # was: from trl.experimental.a2po import A2POTrainer
    from fastalign.integrations.trl import IWOPDTrainer   # was: from trl.experimental.iw_opd import IWOPDTrainer
    from fastalign.integrations.trl import SDPOTrainer, SDFTTrainer   # was: from trl.experimental.sdpo / .sdft
    from fastalign.integrations.trl import AsyncGRPOTrainer   # was: from trl.experimental.async_grpo import ...

They are loaded on first access, so importing this package does not import ``trl``.
"""
import importlib

from fastalign.integrations.trl.a2po import *  # noqa: F401,F403
from fastalign.integrations.trl.gmpo import *  # noqa: F401,F403
from fastalign.integrations.trl.grpo import *  # noqa: F401,F403
from fastalign.integrations.trl.grpo_rewards import *  # noqa: F401,F403
from fastalign.integrations.trl.iw_opd import *  # noqa: F401,F403
from fastalign.integrations.trl.iw_opd_jsd import *  # noqa: F401,F403
from fastalign.integrations.trl.preference import *  # noqa: F401,F403
from fastalign.integrations.trl.rloo import *  # noqa: F401,F403
from fastalign.integrations.trl.self_distillation import *  # noqa: F401,F403

#: Drop-in trainer -> the module that defines it (imported on first access: it imports trl).
_TRAINERS = {"SFTTrainer": "sft_trainer", "GRPOTrainer": "grpo_trainer", "RLOOTrainer": "rloo_trainer",
             "DPOTrainer": "dpo_trainer", "KTOTrainer": "kto_trainer", "CPOTrainer": "cpo_trainer",
             "ORPOTrainer": "orpo_trainer", "DistillationTrainer": "distillation_trainer",
             "GMPOTrainer": "gmpo_trainer", "TPOTrainer": "tpo_trainer", "GKDTrainer": "gkd_trainer",
             "GOLDTrainer": "gold_trainer",
             "OnlineDPOTrainer": "online_dpo_trainer", "A2POTrainer": "a2po_trainer",
             "IWOPDTrainer": "iw_opd_trainer", "SDPOTrainer": "self_distillation_trainer",
             "SDFTTrainer": "self_distillation_trainer", "AsyncGRPOTrainer": "async_grpo_trainer"}


def __getattr__(name):
    if name in _TRAINERS:
        try:
            module = importlib.import_module(f"{__name__}.{_TRAINERS[name]}")
        except ModuleNotFoundError as e:
            if e.name not in ("trl", "transformers", "accelerate", "datasets"):
                raise
            raise ModuleNotFoundError(f"fastalign.integrations.trl.{name} subclasses TRL 1.16's trainer, which needs "
                                      f"{e.name!r}: pip install 'trl==1.16.*'", name=e.name) from e
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_TRAINERS))
