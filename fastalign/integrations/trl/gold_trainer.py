"""``GOLDTrainer``: TRL 1.16's experimental ``GOLDTrainer`` with its same-tokenizer loss computed by fastalign.

Same constructor, same ``GOLDConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import GOLDTrainer   # was: from trl.experimental.gold import GOLDTrainer

When the student and the teacher share a tokenizer (``use_uld_loss=False``, the default), GOLD's loss is the
generalized JSD at ``beta`` and ``temperature`` (both read at every step, as TRL) over the positions whose next
label is not -100, divided by ``num_items_in_batch`` when ``Trainer`` passes it, else by their count (at least
1): here from both models' last hidden states and heads (:func:`fastalign.linear_divergence_loss`), as the GKD
drop-in (:mod:`fastalign.integrations.trl.gkd_trainer`) but at the config's temperature. Generation (``lmbda``,
``seq_kd``, vLLM), the collator and the evaluation loop stay TRL's.

Refused at construction, each naming the field: ``use_uld_loss=True`` (the cross-tokenizer ULD loss aligns two
vocabularies' sorted distributions: no fused form), ``use_liger_kernel``, PEFT prompt
learning, an architecture without a known head transform and a float64 student or teacher.
``compute_loss(..., return_outputs=True)`` runs one more student forward for the logits, with a warning.
"""
from __future__ import annotations

import functools

from trl.experimental.gold import GOLDTrainer as _TRLGOLDTrainer

from fastalign.integrations.trl._checks import check_config
from fastalign.integrations.trl.gkd_trainer import SameTokensDistillation

__all__ = ["GOLDTrainer"]


def _check_gold_config(args) -> None:
    check_config(args, "GOLDConfig")
    if args.use_uld_loss:
        raise ValueError("GOLDConfig.use_uld_loss=True: the cross-tokenizer ULD loss has no fused form in fastalign; "
                         "the fastalign GOLDTrainer takes a teacher with the student's tokenizer (use_uld_loss=False)")


class GOLDTrainer(SameTokensDistillation, _TRLGOLDTrainer):
    """TRL's experimental ``GOLDTrainer`` whose same-tokenizer JSD goes through fastalign (see the module doc)."""

    _config_name = "GOLDConfig"

    @functools.wraps(_TRLGOLDTrainer.__init__)
    def __init__(self, *args, **kwargs):
        self._init_fused(_TRLGOLDTrainer.__init__, args, kwargs, _check_gold_config)

    def _divergence_temperature(self) -> float:
        return self.temperature

    def _model_inputs(self, inputs) -> dict:
        """TRL's student forward inputs beside the token ids (a vision-language model's images), which the teacher
        takes too."""
        return self._get_model_forward_kwargs(inputs)
