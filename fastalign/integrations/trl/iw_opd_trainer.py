"""``IWOPDTrainer``: TRL 1.16's experimental ``IWOPDTrainer`` with its loss computed by fastalign from hidden states.

Same constructor, same ``IWOPDConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import IWOPDTrainer   # was: from trl.experimental.iw_opd import IWOPDTrainer

TRL's ``compute_loss`` builds the student's and the local teacher's ``[B, T, V]`` logits; here both models run
their bodies and the loss comes from their last hidden states and output heads (each head's transform from
:func:`fastalign.integrations.hf.head_transform`), over the completion tokens (``labels != -100``) from the
batch's earliest completion start, as TRL:

* ``distillation_objective="iw_opd"``: the student's and the teacher's log-probs of the sampled tokens at
  ``temperature`` (only those tokens go through the vocabulary), then
  :class:`~fastalign.integrations.trl.IWOPDLoss` (REINFORCE with :func:`fastalign.iw_opd_advantages`, the
  rollout log-probs of the batch when cached), its ``iw_opd/*`` metrics logged as TRL logs them;
* ``distillation_objective="jsd"``: :class:`~fastalign.integrations.trl.IWOPDJSDLoss`, the generalized JSD at
  ``beta`` and ``temperature`` over the full vocabulary (``loss_top_k=0``, :func:`fastalign.linear_divergence_loss`)
  or over each token's top-k support (the teacher's, the student's or their union by ``beta``; the top-1 pair with
  the sampled or the student's argmax token; renormalised or with ``loss_add_tail``'s tail bucket), both models'
  log-probs there from :func:`fastalign.linear_topk_logprobs`; neither model's logits built.

Either is divided by ``num_items_in_batch`` when ``Trainer`` passes it, else by the valid-token count (at
least 1). Generation (``lmbda``), buffering across gradient accumulation and the completion metrics stay TRL's.

As in TRL, the loss options are the trainer's attributes, read at every step: ``distillation_objective``,
``temperature``, ``iw_opd_gamma``, ``iw_opd_epsilon``, ``beta``, ``loss_top_k``, ``loss_add_tail`` and
``reverse_kl_top_1_mode`` assigned after construction (a schedule, a callback) change the next step's loss; a
value the loss refuses raises there, naming it (``IWOPDTrainer.beta=2.0: ...``).

Refused at construction, each naming the field: ``use_teacher_server`` (the server returns per-token log-probs
for TRL's own path), ``use_liger_kernel``, PEFT prompt learning, an architecture without
a known head transform and a float64 student or teacher. ``compute_loss(..., return_outputs=True)`` runs one more
student forward without gradients for the outputs, with a warning.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from trl.experimental.iw_opd import IWOPDTrainer as _TRLIWOPDTrainer

from fastalign.integrations.trl._checks import check_config, check_model, check_teacher, init_checked
from fastalign.integrations.trl._head import head_pair, install_head, loss_and_outputs, predicting_head
from fastalign.integrations.trl._live_loss import LiveLoss, build_loss
from fastalign.integrations.trl.iw_opd import IWOPDLoss
from fastalign.integrations.trl.iw_opd_jsd import IWOPDJSDLoss

__all__ = ["IWOPDTrainer"]


def _check_iw_opd_config(args) -> None:
    check_config(args, "IWOPDConfig")
    if args.use_teacher_server:
        raise ValueError("IWOPDConfig.use_teacher_server: the fastalign IWOPDTrainer scores a local teacher_model "
                         "from its hidden states; the teacher server's top-k log-probs are TRL's own path")


def _objective_loss(config):
    """The profile of ``config.distillation_objective``: :class:`IWOPDJSDLoss` for ``"jsd"``, else
    :class:`IWOPDLoss` (which refuses any objective but ``"iw_opd"``)."""
    return IWOPDJSDLoss(config) if config.distillation_objective == "jsd" else IWOPDLoss(config)


class IWOPDTrainer(_TRLIWOPDTrainer):
    """TRL's experimental ``IWOPDTrainer`` whose loss goes through fastalign (see the module doc)."""

    #: the objective's loss, from the option attributes TRL's ``compute_loss`` reads at every step
    fastalign_loss = LiveLoss(_objective_loss, {name: name for name in (
        "distillation_objective", "temperature", "iw_opd_gamma", "iw_opd_epsilon", "beta", "loss_top_k",
        "loss_add_tail", "reverse_kl_top_1_mode")})

    @functools.wraps(_TRLIWOPDTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, _TRLIWOPDTrainer.__init__, args, kwargs, _check_iw_opd_config)
        check_model(self, "IWOPDConfig")
        install_head(self.accelerator.unwrap_model(self.model))
        check_teacher(self, self.teacher_model)
        build_loss(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._raise_if_local_teacher_tokenizer_mismatch()
        objective = self.fastalign_loss  # the options assigned since the last step, checked
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        prompt_length = self._compute_prompt_length(inputs)
        labels = inputs["labels"].clone()
        labels[:, :prompt_length] = -100  # TRL scores the completion from the batch's earliest start
        if isinstance(objective, IWOPDLoss):
            loss = self._iw_opd(objective, model, ids, attention, labels, prompt_length,
                                inputs.get("rollout_logprobs"), num_items_in_batch)
        else:
            loss = self._jsd(objective, model, ids, attention, labels, num_items_in_batch)
        return loss_and_outputs(loss, model, return_outputs, input_ids=ids, attention_mask=attention)

    def _sampled_logprobs(self, model, ids: Tensor, attention: Tensor, labels: Tensor, start: int) -> Tensor:
        """``[B, T - start]``: log p(labels[:, t]) at ``temperature`` for the completion columns ``t >= start``
        (0 where a label is -100), from ``model``'s hidden states."""
        out = model(input_ids=ids, attention_mask=attention, labels=labels, fastalign_head=("log_probs",),
                    fastalign_options={"temperature": self.temperature})
        return out.log_probs[:, start - 1:]  # entry t of [B, T-1] scores labels[:, t+1]

    def _iw_opd(self, iw_opd_loss: IWOPDLoss, model, ids, attention, labels, prompt_length, rollout_logprobs,
                num_items_in_batch) -> Tensor:
        logprobs = self._sampled_logprobs(model, ids, attention, labels, prompt_length)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_logprobs = self._sampled_logprobs(self.teacher_model, ids, attention, labels, prompt_length)
        if rollout_logprobs is not None:  # cached at full width
            rollout_logprobs = rollout_logprobs[:, prompt_length:]
        valid = labels[:, prompt_length:] != -100
        loss, metrics = iw_opd_loss(logprobs, teacher_logprobs, valid, rollout_logprobs, num_items_in_batch)
        # one read of the host for every metric; TRL logs nothing for a batch without a completion token
        any_valid, *values = torch.stack([valid.any().float(), *metrics.values()]).tolist()
        if any_valid:
            mode = "train" if self.model.training else "eval"
            for name, value in zip(metrics, values):
                self._metrics[mode][name].append(value)
        return loss

    def _jsd(self, jsd_loss: IWOPDJSDLoss, model, ids, attention, labels, num_items_in_batch) -> Tensor:
        student = predicting_head(self, model, ids, attention)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher = predicting_head(self, self.teacher_model, ids, attention)
        return jsd_loss.linear(**head_pair(student, teacher), completion_ids=ids[:, 1:],
                               loss_mask=labels[:, 1:] != -100, num_items_in_batch=num_items_in_batch)
