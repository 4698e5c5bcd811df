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

Options the drop-in cannot honour raise at construction: ``use_liger_kernel``, vision-language models,
PEFT prompt learning, an architecture without a known head transform
(:func:`~fastalign.integrations.hf.register_head_transform` states one), a float64 student or teacher
(the heads run in float32, bfloat16 or float16) and vocabularies of different sizes (as TRL).
``compute_loss(..., return_outputs=True)`` (an evaluation that hands logits to ``compute_metrics``) runs an
extra forward of the student without gradients for them, with a warning, as TRL's ``SFTTrainer``.
"""
from __future__ import annotations

import functools
import warnings
import torch
from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer

from fastalign.integrations.hf import head_transform, next_token_targets
from fastalign.integrations.trl._head import (check_config, check_head_dtype, check_model, head_call,
                                               init_checked, install_head, predicting_operands)
from fastalign.linear_divergence import linear_divergence_loss

__all__ = ["GKDTrainer"]


class GKDTrainer(_TRLGKDTrainer):
    """TRL's experimental ``GKDTrainer`` whose generalized JSD goes through fastalign (see the module doc)."""

    @functools.wraps(_TRLGKDTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, _TRLGKDTrainer.__init__, args, kwargs, lambda config: check_config(config, "GKDConfig"))
        check_model(self, "GKDConfig")
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        check_head_dtype(self, teacher, "teacher_model")
        if teacher.config.get_text_config() is not teacher.config:
            raise ValueError(f"teacher_model: {type(teacher).__name__} is a vision-language model; the fastalign "
                             "GKDTrainer takes text-only causal LMs")
        head_transform(teacher.config)  # raises for an architecture without a known head transform
        install_head(self.accelerator.unwrap_model(self.model))
        install_head(teacher)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        call = dict(input_ids=ids, attention_mask=attention, **head_call(self, ("operands",)))
        hidden, weight, bias = predicting_operands(model(**call).operands)
        self.teacher_model.eval()
        with torch.no_grad():
            t_hidden, t_weight, t_bias = predicting_operands(self.teacher_model(**call).operands)
        scored = next_token_targets(ids, labels=inputs["labels"]) != -100
        normalizer = None
        if num_items_in_batch is not None:
            normalizer = torch.as_tensor(num_items_in_batch, device=hidden.device).float().reshape(())
        scale, softcap = head_transform(self.accelerator.unwrap_model(self.model).config)
        t_scale, t_softcap = head_transform(self.accelerator.unwrap_model(self.teacher_model).config)
        loss, _ = linear_divergence_loss(
            hidden, weight, t_hidden.to(hidden.device), t_weight.to(hidden.device), beta=self.beta, bias=bias,
            teacher_bias=None if t_bias is None else t_bias.to(hidden.device), logit_scale=scale, softcap=softcap,
            teacher_logit_scale=t_scale, teacher_softcap=t_softcap, response_mask=scored, normalizer=normalizer)
        if return_outputs:
            warnings.warn("return_outputs=True computes the student's logits with an extra forward pass (the fused "
                          "head never builds them)", stacklevel=2)
            with torch.no_grad():
                outputs = model(input_ids=ids, attention_mask=attention)
            return loss, outputs
        return loss
