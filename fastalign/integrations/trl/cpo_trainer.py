"""``CPOTrainer``: TRL 1.16's ``trl.experimental.cpo.CPOTrainer`` with its log-probs and loss in fastalign.

Same constructor, same ``CPOConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import CPOTrainer   # was: from trl.experimental.cpo import CPOTrainer

The chosen and rejected completion log-probs come from the last hidden states and the model's own
output head (no ``[B, T, V]`` logits), the training loss through the head itself in one pass over
blocks of whole pairs (:func:`fastalign.linear_step.separable_step`); the loss is :class:`fastalign.integrations.trl.CPOLoss` of the trainer's config (sigmoid,
hinge, ipo, simpo and alphapo, label smoothing, ``simpo_gamma``, the AlphaPO reward ``alpha`` and
the behaviour-cloning weight ``cpo_alpha``). Metrics keep TRL's names and values: ``rewards/*``,
``logps/*``, ``nll_loss`` and ``logits/chosen`` / ``logits/rejected`` (TRL's mean over every
position of the logits, from one ``H``-vector; a softcapped head's by one more vocabulary pass without gradients).

Options the drop-in cannot honour raise a ValueError naming the config field at construction:
``use_liger_kernel``, encoder-decoder models (``is_encoder_decoder``) and an architecture without a known head
transform. A MoE model's load-balancing loss (the config's ``output_router_logits`` and
``router_aux_loss_coef``) comes from the router logits of the same body forward, as TRL adds it. A float64 model
raises a TypeError at construction (the fused head runs in float32, bfloat16 or float16, or in the bf16 / fp16
of mixed precision). ``beta``, ``label_smoothing``, ``loss_type``, ``cpo_alpha``, ``simpo_gamma`` and ``alpha``
assigned on the trainer take effect at the next step, as in TRL.
"""
from __future__ import annotations

import functools

from trl.experimental.cpo import CPOTrainer as _TRLCPOTrainer

from fastalign.integrations.trl._checks import check_config, init_checked
from fastalign.integrations.trl._pairs import ConcatenatedPairsMixin
from fastalign.integrations.trl._live_loss import LiveLoss
from fastalign.integrations.trl.preference import CPOLoss

__all__ = ["CPOTrainer"]


class CPOTrainer(ConcatenatedPairsMixin, _TRLCPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` with fastalign's fused log-probs and loss (see the module doc)."""

    config_name = "CPOConfig"
    #: the options TRL's ``cpo_loss`` and ``concatenated_forward`` read from the trainer at every step -> their
    #: ``CPOConfig`` fields
    fastalign_loss = LiveLoss(CPOLoss, {"beta": "beta", "label_smoothing": "label_smoothing", "loss_type": "loss_type",
                                        "cpo_alpha": "cpo_alpha", "simpo_gamma": "simpo_gamma", "alpha": "alpha"})

    @functools.wraps(_TRLCPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, _TRLCPOTrainer.__init__, args, kwargs, self._check_config)
        self._setup_pairs()

    @staticmethod
    def _check_config(args) -> None:
        check_config(args, "CPOConfig")
        CPOLoss(args)  # raises on an option the profile does not map (label smoothing TRL would ignore)
