"""``SDPOTrainer`` / ``SDFTTrainer``: TRL 1.16's experimental self-distillation trainers with their loss computed by
fastalign from hidden states.

Same constructors, same ``SDPOConfig`` / ``SDFTConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import SDPOTrainer   # was: from trl.experimental.sdpo import SDPOTrainer
    from fastalign.integrations.trl import SDFTTrainer   # was: from trl.experimental.sdft import SDFTTrainer

TRL's ``compute_loss`` builds the student's logits on its own prompt and completion and the teacher's (the model
shown a privileged context: ``teacher_input_ids``, under TRL's teacher context, EMA adapter or base weights) on the
same completion; here both run their bodies and the losses come from the last hidden states at the completion
positions and each model's head (its transform from :func:`fastalign.integrations.hf.head_transform`; a LoRA
``lm_head`` as appended hidden columns), at ``temperature``:

* the self-distillation loss: :class:`~fastalign.integrations.trl.SelfDistillationLoss` (``sampled_token``;
  ``full_logits`` through :func:`fastalign.linear_divergence_loss`; ``topk_logits``, SDFT's default, over the
  student's top-k support from :func:`fastalign.linear_topk_logprobs`), over ``completion_mask`` times the batch's
  ``self_distillation_mask`` (SDPO) or times ``position >= num_loss_tokens_to_skip`` (SDFT: the first
  ``num_loss_tokens_to_skip`` completion tokens are not distilled), with TRL's clipped importance ratio to
  ``old_per_token_logps``;
* SDPO's policy term (``distillation_weight != 1``): the PPO-clipped loss of its ``loss_type``
  (grpo / bnpo / dr_grpo / dapo over the local batch, ``importance_sampling_level``) on the completion log-probs,
  :func:`fastalign.policy_loss` with :func:`~fastalign.integrations.trl.grpo_policy_config`'s rows; another
  ``loss_type`` raises TRL's ``ValueError("Unsupported loss_type: ...")``, at construction when the config's
  ``distillation_weight`` is not 1, else at the first step that takes the policy term;

``(1 - distillation_weight) policy + distillation_weight distillation``, divided by the accumulation steps in
training, as TRL. The metrics keep TRL's names (``self_distillation/distillation_loss``,
``<trainer>/distillation_loss``, ``self_distillation/policy_loss``). Generation, reprompting, rewards,
advantages and the teacher's updates stay TRL's.

As in TRL, the trainer's attributes ``temperature`` (both terms), ``loss_type``, ``epsilon_low`` /
``epsilon_high``, ``importance_sampling_level`` (SDPO) and ``num_loss_tokens_to_skip`` (SDFT) and the config
fields ``distillation_weight``, ``distillation_mode``, ``distillation_alpha``, ``distillation_is_clip``,
``distillation_topk`` and ``distillation_add_tail`` are read at every step: assigned after construction (a
schedule, a callback), they change the next step's loss; a value the loss refuses raises there, naming it
(``SDFTTrainer.temperature=0.0: ...``).

Refused at construction, each naming the field: ``use_teacher_server`` (the server returns log-probs for TRL's
own path), ``use_liger_kernel``, PEFT prompt
learning, an architecture without a known head transform and a float64 model (the heads run in float32,
bfloat16 or float16). ``return_outputs=True`` raises, as in TRL.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from trl.experimental.sdft import SDFTTrainer as _TRLSDFTTrainer
from trl.experimental.sdpo import SDPOTrainer as _TRLSDPOTrainer

from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import head_pair, install_head, predicting_head
from fastalign.integrations.trl._live_loss import LiveLoss, build_loss
from fastalign.integrations.trl.grpo import grpo_policy_config
from fastalign.integrations.trl.self_distillation import SelfDistillationLoss
from fastalign.linear import linear_logprobs
from fastalign.policy import policy_loss

__all__ = ["SDFTTrainer", "SDPOTrainer"]

#: the ``loss_type`` values of TRL 1.16's ``SDPOTrainer._compute_policy_loss``
SDPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
#: the config fields TRL's self-distillation loss reads from ``self.args`` at every step
_DISTILLATION_ARGS = ("distillation_mode", "distillation_alpha", "distillation_is_clip", "distillation_topk",
                      "distillation_add_tail")


def _check_sdpo_loss_type(loss_type, name: str) -> None:
    """TRL's ``SDPOTrainer`` raises ``Unsupported loss_type`` for a policy term of another ``loss_type``."""
    if loss_type not in SDPO_LOSS_TYPES:
        raise ValueError(f"Unsupported loss_type: {loss_type} ({name}.loss_type: TRL's SDPOTrainer computes its "
                         f"policy term for {', '.join(SDPO_LOSS_TYPES)} only)")


def _checker(name: str):
    def check(args) -> None:
        check_config(args, name)
        if args.use_teacher_server:
            raise ValueError(f"{name}.use_teacher_server: the fastalign trainer scores the local teacher from its "
                             "hidden states; the teacher server's log-probs are TRL's own path")
        SelfDistillationLoss(args, config_name=name)  # checks the distillation fields, naming a bad one
        if getattr(args, "distillation_weight", 1.0) != 1.0:  # SDPO with a policy term
            _check_sdpo_loss_type(args.loss_type, name)
    return check


def _profile(name: str):
    """``config -> SelfDistillationLoss(config)`` naming ``name`` in its errors (a :class:`LiveLoss` profile)."""
    return functools.partial(SelfDistillationLoss, config_name=name)


class _FusedSelfDistillation:
    """``compute_loss`` of TRL's SDPO / SDFT trainers from hidden states (see the module doc)."""

    _trl_trainer: type
    _config_name: str
    fastalign_loss: LiveLoss  # the self-distillation loss at the trainer's live temperature and config fields

    def _init_fused(self, args, kwargs) -> None:
        init_checked(self, self._trl_trainer.__init__, args, kwargs, _checker(self._config_name))
        check_model(self, self._config_name)
        install_head(self.accelerator.unwrap_model(self.model))
        install_head(self.accelerator.unwrap_model(self.teacher_model))
        build_loss(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError(f"The {type(self).__name__} does not support returning outputs")
        weight = getattr(self.args, "distillation_weight", 1.0)  # SDFT distils only
        distillation = self.fastalign_loss if weight != 0.0 else None  # the options assigned since, checked
        if weight != 1.0:
            _check_sdpo_loss_type(self.loss_type, type(self).__name__)
        keep = inputs["completion_ids"].size(1)
        student = self._completion_operands(model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                                            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), keep)
        loss = 0.0
        if weight != 0.0:
            with torch.no_grad(), self._get_teacher_context_for_self_distillation():
                teacher = self._completion_operands(self.teacher_model, inputs["teacher_input_ids"],
                                                    inputs["teacher_attention_mask"], keep)
            loss = weight * self._distillation_loss(distillation, model, inputs, student, teacher)
        if weight != 1.0:
            loss = loss + (1.0 - weight) * self._policy_loss(inputs, student)
        scale = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return loss / scale

    def _completion_operands(self, model, ids: Tensor, attention: Tensor, keep: int) -> tuple:
        """:func:`predicting_head` of ``model`` at the positions that predict the last ``keep`` tokens."""
        hidden, *head = predicting_head(self, model, ids, attention)
        return (hidden[:, -keep:], *head)

    def _loss_mask(self, inputs) -> Tensor:
        """The distilled tokens: ``completion_mask`` times the batch's ``self_distillation_mask`` when it has one."""
        loss_mask = inputs["completion_mask"]
        if inputs.get("self_distillation_mask") is not None:
            loss_mask = loss_mask * inputs["self_distillation_mask"].unsqueeze(1)
        return loss_mask

    def _distillation_loss(self, distillation: SelfDistillationLoss, model, inputs, student: tuple,
                           teacher: tuple) -> Tensor:
        loss, metrics = distillation.linear(
            **head_pair(student, teacher), completion_ids=inputs["completion_ids"], loss_mask=self._loss_mask(inputs),
            old_logprobs=inputs.get("old_per_token_logps"))
        mode = "train" if model.training else "eval"
        value = metrics["self_distillation/distillation_loss"]
        self._log_self_distillation_metric(mode, self.accelerator.gather(value.detach()).mean().item())
        return loss

    def _policy_loss(self, inputs, student: tuple) -> Tensor:
        """SDPO's policy term: TRL's PPO clip of ``loss_type`` (read from the trainer at each step, as TRL) on the
        completion log-probs at the temperature, no KL."""
        hidden, weight, bias, scale, softcap = student
        mask = inputs["completion_mask"]
        labels = inputs["completion_ids"].masked_fill(mask == 0, -100)  # padding: no vocabulary work, masked anyway
        logprobs = linear_logprobs(hidden, weight, labels, bias=bias, logit_scale=scale, softcap=softcap,
                                   temperature=self.temperature).logprobs
        old = inputs.get("old_per_token_logps")
        advantages = inputs["advantages"]
        config = grpo_policy_config(dict(
            loss_type=self.loss_type, epsilon=self.epsilon_low, epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length))
        if advantages.dim() == 2:  # [B, 1] or [B, T], broadcast as TRL's
            advantages = advantages.expand_as(logprobs)
        loss, _ = policy_loss(logprobs, logprobs.detach() if old is None else old, advantages, mask, config=config)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["self_distillation/policy_loss"].append(
            self.accelerator.gather(loss.detach()).mean().item())
        return loss


class SDPOTrainer(_FusedSelfDistillation, _TRLSDPOTrainer):
    """TRL's experimental ``SDPOTrainer`` whose losses go through fastalign (see the module doc)."""

    _trl_trainer = _TRLSDPOTrainer
    _config_name = "SDPOConfig"
    fastalign_loss = LiveLoss(_profile("SDPOConfig"), {"temperature": "temperature"}, args=_DISTILLATION_ARGS)

    @functools.wraps(_TRLSDPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        self._init_fused(args, kwargs)


class SDFTTrainer(_FusedSelfDistillation, _TRLSDFTTrainer):
    """TRL's experimental ``SDFTTrainer`` whose loss goes through fastalign (see the module doc)."""

    _trl_trainer = _TRLSDFTTrainer
    _config_name = "SDFTConfig"
    fastalign_loss = LiveLoss(_profile("SDFTConfig"), {"temperature": "temperature"}, args=_DISTILLATION_ARGS)

    @functools.wraps(_TRLSDFTTrainer.__init__)
    def __init__(self, *args, **kwargs):
        self._init_fused(args, kwargs)

    def _loss_mask(self, inputs) -> Tensor:
        """TRL's SDFT mask: ``completion_mask`` times ``position >= num_loss_tokens_to_skip`` (the trainer's
        attribute, read at every step) when that is above 0."""
        loss_mask = super()._loss_mask(inputs)
        if self.num_loss_tokens_to_skip > 0:
            positions = torch.arange(loss_mask.size(1), device=loss_mask.device).unsqueeze(0)
            loss_mask = loss_mask * (positions >= self.num_loss_tokens_to_skip).long()
        return loss_mask
