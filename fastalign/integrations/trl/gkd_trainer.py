"""``GKDTrainer``: TRL 1.16's experimental ``GKDTrainer`` (generalized knowledge distillation) with its loss
computed by fastalign.

Same constructor, same ``GKDConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import GKDTrainer   # was: from trl.experimental.gkd import GKDTrainer

TRL's ``compute_loss`` runs both models to their ``[B, T, V]`` logits; here it runs their bodies and takes
the generalized JSD straight from the last hidden states and each model's own output head
(:func:`fastalign.linear_divergence_loss`, the head transform of :func:`fastalign.integrations.hf.head_transform`):

    loss = Σ_{t ∈ S} D_β(p_student,t ‖ p_teacher,t) / n,   S = {t : labels[t+1] ≠ -100}

``D_0 = KL(p_t ‖ p_s)``, ``D_1 = KL(p_s ‖ p_t)``, else ``β KL(p_t ‖ m) + (1-β) KL(p_s ‖ m)`` with
``m = (1-β) p_s + β p_t`` (``β``: ``GKDConfig.beta``, read at every step as TRL reads ``trainer.beta``),
``n`` = ``num_items_in_batch`` when ``Trainer`` passes it, else ``max(|S|, 1)``. As in TRL the divergence is
taken at temperature 1: ``GKDConfig.temperature`` is the sampling temperature of the on-policy and
sequence-level generations, which the drop-in leaves to TRL (``lmbda``, ``seq_kd``, ``max_new_tokens``),
together with the collator, the teacher's loading and the evaluation loop. Only scored tokens go through the
vocabulary; with gradients, one pass over blocks of tokens. PEFT adapters on the body train as in TRL (an
adapter on the ``lm_head`` is refused by TRL's ``SFTTrainer``).

Options the drop-in cannot honour raise at construction: ``use_liger_kernel``,
PEFT prompt learning, an architecture without a known head transform
(:func:`~fastalign.integrations.hf.register_head_transform` states one), a float64 student or teacher
(the heads run in float32, bfloat16 or float16) and vocabularies of different sizes (as TRL).
``compute_loss(..., return_outputs=True)`` (an evaluation that hands logits to ``compute_metrics``) runs an
extra forward of the student without gradients for them, with a warning, as TRL's ``SFTTrainer``.
:class:`SameTokensDistillation` is shared with the GOLD drop-in (:mod:`fastalign.integrations.trl.gold_trainer`).
"""
from __future__ import annotations

import functools

from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer

from fastalign.integrations.hf import next_token_targets
from fastalign.integrations.trl._checks import check_config, check_model, check_teacher, init_checked
from fastalign.integrations.trl._head import install_head, loss_and_outputs, teacher_divergence

__all__ = ["GKDTrainer"]


class SameTokensDistillation:
    """``compute_loss`` of TRL's GKD and GOLD trainers (same tokenizer): the generalized JSD at ``trainer.beta`` and
    :meth:`_divergence_temperature` of the student against the teacher on the batch's own tokens, over the positions
    whose next label is not -100, from both models' hidden states (see the module doc)."""

    _config_name: str

    def _init_fused(self, init, args, kwargs, check) -> None:
        init_checked(self, init, args, kwargs, check)
        check_model(self, self._config_name)
        install_head(self.accelerator.unwrap_model(self.model))
        check_teacher(self, self.teacher_model)

    def _divergence_temperature(self) -> float:
        return 1.0

    def _model_inputs(self, inputs) -> dict:
        """What of the batch ``inputs`` both models take beside the token ids and attention mask (TRL's GKD: none)."""
        return {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        scored = next_token_targets(ids, labels=inputs["labels"]) != -100
        extra = self._model_inputs(inputs)
        loss = teacher_divergence(self, model, ids, attention, scored, num_items_in_batch, model_inputs=extra,
                                  beta=self.beta, temperature=self._divergence_temperature())
        return loss_and_outputs(loss, model, return_outputs, input_ids=ids, attention_mask=attention, **extra)


class GKDTrainer(SameTokensDistillation, _TRLGKDTrainer):
    """TRL's experimental ``GKDTrainer`` whose generalized JSD goes through fastalign (see the module doc)."""

    _config_name = "GKDConfig"

    @functools.wraps(_TRLGKDTrainer.__init__)
    def __init__(self, *args, **kwargs):
        self._init_fused(_TRLGKDTrainer.__init__, args, kwargs, lambda config: check_config(config, "GKDConfig"))
