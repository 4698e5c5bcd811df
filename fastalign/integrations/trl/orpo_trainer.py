"""``ORPOTrainer``: TRL 1.16's ``trl.experimental.orpo.ORPOTrainer`` with its log-probs and loss in fastalign.

Same constructor, same ``ORPOConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import ORPOTrainer   # was: from trl.experimental.orpo import ORPOTrainer

The per-token log-probs of the chosen and rejected rows come from the last hidden states and the
model's own output head (no ``[B, T, V]`` logits), over the prompt too since ORPO's NLL runs over
every attended token of the chosen rows, the training loss through the head itself in one pass over
blocks of whole pairs (:func:`fastalign.linear_step.separable_step`); the loss is :class:`fastalign.integrations.trl.ORPOLoss` of the trainer's config.
Metrics keep TRL's names and values: ``rewards/*``, ``logps/*``, ``nll_loss``, ``log_odds_ratio``,
``log_odds_chosen`` and ``logits/chosen`` / ``logits/rejected`` (TRL's mean over every position
but the last, from one ``H``-vector; a softcapped head's by one more vocabulary pass without gradients).

Options the drop-in cannot honour raise a ValueError naming the config field at construction, as
for :class:`fastalign.integrations.trl.CPOTrainer` (a float64 model: a TypeError); ``beta`` assigned on the
trainer takes effect at the next step, as in TRL.
"""
from __future__ import annotations

import functools

from trl.experimental.orpo import ORPOTrainer as _TRLORPOTrainer

from fastalign.integrations.trl._checks import check_config, init_checked
from fastalign.integrations.trl._live_loss import LiveLoss
from fastalign.integrations.trl._pairs import ConcatenatedPairsMixin
from fastalign.integrations.trl.preference import ORPOLoss

__all__ = ["ORPOTrainer"]


class ORPOTrainer(ConcatenatedPairsMixin, _TRLORPOTrainer):
    """``trl.experimental.orpo.ORPOTrainer`` with fastalign's fused log-probs and loss (see the module doc)."""

    config_name = "ORPOConfig"
    nll_over_prompt = True
    logits_last_position = False
    #: the option TRL's ``odds_ratio_loss`` reads from the trainer at every step -> its ``ORPOConfig`` field
    fastalign_loss = LiveLoss(ORPOLoss, {"beta": "beta"})

    @functools.wraps(_TRLORPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, _TRLORPOTrainer.__init__, args, kwargs, self._check_config)
        self._setup_pairs()

    @staticmethod
    def _check_config(args) -> None:
        check_config(args, "ORPOConfig")
        ORPOLoss(args)  # raises on a value the loss refuses (beta <= 0), before the model is loaded
