"""``DistillationTrainer``: TRL 1.16's ``trl.DistillationTrainer`` with its divergence computed by fastalign.

Same constructor, same ``trl.DistillationConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import DistillationTrainer   # was: from trl import DistillationTrainer

TRL's ``_compute_loss`` is replaced, nothing else (the constructor also checks the models' dtype): the
student's and teacher's last hidden states come from TRL's own ``_get_last_hidden_state`` (the teacher
under ``no_grad``, through its wrapper), and the loss is :func:`fastalign.linear_divergence_loss` over the
completion tokens (``completion_mask``, times ``tool_mask`` when present), with the trainer's ``beta``
and ``temperature`` (read at every step, as TRL reads them) and each model's logit scale and softcap from
:data:`fastalign.integrations.hf.HEAD_TRANSFORMS` (an architecture stated with
:func:`~fastalign.integrations.hf.register_head_transform` included), or, for an architecture missing from it,
read from its config as TRL reads them (``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``,
``logits_scaling``; ``final_logit_softcapping``). The generalized JSD over the
valid tokens is divided by ``num_items_in_batch`` when ``compute_loss`` passes it (the completion-token
count of the step over the process count, as TRL), else by the local valid-token count; TRL's
``compute_loss`` then logs the mean student entropy at the temperature under ``entropy``. The logits of
neither model are built; with gradients, one pass over blocks of tokens (four matrix products per token
instead of TRL's recomputing backward). A float64 student or teacher raises a TypeError at construction:
the heads run in the hidden states' dtype, which must be float32, bfloat16 or float16.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import trl

from fastalign import _dtensor
from fastalign.integrations.hf import kept_head, known_head_transform
from fastalign.integrations.trl._checks import check_head_dtype
from fastalign.integrations.trl._head import trl_global_tokens
from fastalign.integrations.trl._vision import batch_vision, body_inputs
from fastalign.linear_divergence import linear_divergence_loss

__all__ = ["DistillationTrainer", "config_head_transform"]


def _trl_logit_scale(config) -> float:
    """The multiplier a model applies to its logits before any softcap, read as TRL 1.16 reads it."""
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by logits_scaling; HyperCLOVA X multiplies by it
        s = config.logits_scaling
        scale = s if getattr(config, "model_type", None) == "hyperclovax" else 1 / s
    return 1.0 if scale is None else float(scale)


def config_head_transform(config) -> tuple[float, Optional[float]]:
    """``(logit_scale, softcap)`` of a model's head, ``logits = softcap * tanh(logit_scale * lm_head(h) / softcap)``:
    :func:`~fastalign.integrations.hf.known_head_transform` for an architecture in
    :data:`~fastalign.integrations.hf.HEAD_TRANSFORMS` (or registered), else as TRL 1.16 reads the config
    (:func:`_trl_logit_scale`, ``final_logit_softcapping``)."""
    known = known_head_transform(config)
    if known is not None:
        return known
    return _trl_logit_scale(config), getattr(config, "final_logit_softcapping", None)


def _kept_rows(config, head) -> tuple:
    """``(weight, bias)`` of a model's output head (gathered if DTensors), the rows its logits keep
    (:func:`fastalign.integrations.hf.kept_head`: a head padded past its vocabulary, Inkling's)."""
    return kept_head(config, _dtensor.full(head.weight), _dtensor.full(head.bias))


class DistillationTrainer(trl.DistillationTrainer):
    """``trl.DistillationTrainer`` whose generalized JSD goes through fastalign (see the module doc)."""

    @functools.wraps(trl.DistillationTrainer.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the heads run in the hidden states' dtype, under autocast too (a float64 body's last norm gives float64)
        for name in ("model", "teacher_model"):
            if getattr(self, name, None) is not None:
                check_head_dtype(self, getattr(self, name), name, autocast=False)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_mask = inputs["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = body_inputs(batch_vision(inputs))
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                     **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, logits_to_keep, **multimodal)
        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        if student_head.weight.device != teacher_head.weight.device:
            raise ValueError(f"The student `lm_head` is on {student_head.weight.device} but the teacher `lm_head` is "
                             f"on {teacher_head.weight.device}. Place both on the same device in their `device_map`.")
        device = student_head.weight.device
        student_config = unwrapped_student.config.get_text_config()
        teacher_config = unwrapped_teacher.config.get_text_config()
        weight, bias = _kept_rows(student_config, student_head)
        teacher_weight, teacher_bias = _kept_rows(teacher_config, teacher_head)
        student_hidden = student_hidden.to(device)
        teacher_hidden = teacher_hidden.to(device)
        # the head runs in the hidden states' dtype (a mixed-precision master copy is cast once)
        weight = weight.to(student_hidden.dtype)
        teacher_weight = teacher_weight.to(teacher_hidden.dtype)
        scale, softcap = config_head_transform(student_config)
        teacher_scale, teacher_softcap = config_head_transform(teacher_config)
        loss, metrics = linear_divergence_loss(
            student_hidden, weight, teacher_hidden, teacher_weight, beta=self.beta, temperature=self.temperature,
            bias=bias, teacher_bias=teacher_bias, logit_scale=scale,
            softcap=softcap,
            teacher_logit_scale=teacher_scale, teacher_softcap=teacher_softcap, response_mask=loss_mask.to(device),
            global_tokens=trl_global_tokens(num_items_in_batch, device))
        return loss, metrics["entropy_sum"], metrics["num_tokens"].long()

