"""``OnlineDPOTrainer``: TRL 1.16's experimental ``OnlineDPOTrainer`` with its completion log-probs computed by
fastalign.

Same constructor, same ``OnlineDPOConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import OnlineDPOTrainer   # was: from trl.experimental.online_dpo import ...

Each step TRL samples two completions per prompt, ranks them with the reward functions and takes the
sigmoid or IPO loss of the pair's summed log-probs against the reference's. Its ``_forward`` builds the
policy's (and the reference's) ``[2B, T, V]`` logits for those log-probs; here ``_forward`` runs the body and
takes them straight from the last hidden states and the model's own output head
(:func:`fastalign.linear_logprobs`, the head transform of :func:`fastalign.integrations.hf.head_transform`,
a PEFT LoRA adapter on the ``lm_head`` as its low-rank term), at temperature 1 as TRL, so the logits are
never built. Every completion position is scored, padding included, as TRL scores them (its
``objective/kl`` and ``objective/entropy`` sum over them; the loss masks them). The generation, the
rewards, the pair loss, ``beta`` (a list: one per epoch, which TRL 1.16's own property fails to index),
``missing_eos_penalty``, the left truncation to
``max_length`` and the logged metrics stay TRL's.

Refused at construction, each naming the argument: ``use_liger_kernel``, PEFT
prompt learning, an architecture without a known head transform and a float64 model or reference (the
head runs in float32, bfloat16 or float16).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from trl.experimental.online_dpo import OnlineDPOTrainer as _TRLOnlineDPOTrainer

from fastalign.integrations.hf import head_transform
from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import base_model, head_call, install_head
from fastalign.linear import linear_logprobs

__all__ = ["OnlineDPOTrainer"]

#: The vision inputs TRL's ``_forward`` hands to the model.
_VISION_FORWARDED = ("pixel_values", "pixel_attention_mask", "image_sizes", "image_grid_thw")


class OnlineDPOTrainer(_TRLOnlineDPOTrainer):
    """TRL's experimental ``OnlineDPOTrainer`` whose log-probs come from the hidden states (see the module doc)."""

    @functools.wraps(_TRLOnlineDPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, _TRLOnlineDPOTrainer.__init__, args, kwargs,
                     lambda config: check_config(config, "OnlineDPOConfig"))
        check_model(self, "OnlineDPOConfig")
        install_head(self.accelerator.unwrap_model(self.model))
        if self.ref_model is not None:
            install_head(self.accelerator.unwrap_model(self.ref_model))

    @property
    def beta(self) -> float:
        """``OnlineDPOConfig.beta`` of the current epoch: a list gives one beta per epoch (its last entry after it
        runs out). TRL's own property indexes the list with the fractional ``state.epoch`` and raises; this one
        takes the epoch's whole number."""
        if isinstance(self._beta, list):
            epoch = int(self.state.epoch or 0)
            return self._beta[min(epoch, len(self._beta) - 1)]
        return self._beta

    def _forward(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs=None) -> Tensor:
        """``[2B, C]``: ``log p(completion_ids[:, c] | prompt, completion_ids[:, :c])`` under ``model``, as TRL's
        ``_forward`` (without images, the prompt left-truncated so that prompt and completion fit ``max_length``;
        ``vision_inputs``: the images of each row, TRL's four that the body takes)."""
        images = {k: vision_inputs[k] for k in _VISION_FORWARDED if k in (vision_inputs or {})}
        if vision_inputs is None:  # with images, truncation would drop image tokens
            cut = max(prompt_ids.size(1) + completion_ids.size(1) - self.max_length, 0)
            prompt_ids, prompt_mask = prompt_ids[:, cut:], prompt_mask[:, cut:]
        ids = torch.cat((prompt_ids, completion_ids), dim=1)
        attention = torch.cat((prompt_mask, completion_mask), dim=1)
        hidden, weight, bias, low_rank = model(input_ids=ids, attention_mask=attention, **images,
                                               **head_call(self, ("operands",))).operands
        # position t predicts token t+1; TRL's slice of the positions that predict the completion
        prompt_len = prompt_ids.size(1)
        rows = slice(prompt_len - 1, -1) if prompt_len > 0 else slice(0, None)
        if low_rank is not None:
            low_rank = (low_rank[0][:, rows], low_rank[1])
        scale, softcap = head_transform(base_model(self, model).config)
        return linear_logprobs(hidden[:, rows], weight, completion_ids, bias=bias, low_rank=low_rank,
                               logit_scale=scale, softcap=softcap).logprobs
