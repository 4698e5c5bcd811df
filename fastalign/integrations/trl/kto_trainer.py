"""``KTOTrainer``: TRL 1.16's ``trl.KTOTrainer`` with its log-probs and loss in fastalign.

Same constructor, same ``trl.KTOConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import KTOTrainer   # was: from trl import KTOTrainer

The completion log-probs of the policy and of the reference (live or precomputed), and those of the
mismatched KL completions, come from the last hidden states and the model's own output head
(no ``[B, T, V]`` logits); the loss is :class:`fastalign.integrations.trl.KTOLoss` of the
trainer's config (``kto`` and ``apo_zero_unpaired``, desirable and undesirable weights). The
training loss goes through the head itself (:func:`fastalign.linear_step.separable_step`:
one pass over blocks of whole responses). The forwards run in TRL's order (KL completions, policy,
reference), so dropout draws the same masks. Metrics go through TRL's ``_metrics`` under TRL's
names (``kl``, ``rewards/*``, ``logps/*``, ``entropy``, ``num_tokens``, ``logits/*``; a class
absent from the batch logs nothing, as in TRL).

A MoE model's load-balancing loss comes from the router logits of the policy's body forward, as TRL
adds it. Options the drop-in cannot honour raise a ValueError naming the config field at
construction, as for the other drop-ins (a float64 policy or reference: a TypeError). ``beta``,
``desirable_weight``, ``undesirable_weight`` and ``loss_type`` assigned on the trainer take effect at the next
step, as in TRL (the KL completions are those TRL prepared for the constructed loss type: ``kto`` switched on
after ``apo_zero_unpaired`` has a KL baseline of 0, as in TRL). ``calculate_KL`` is read at every step too, as
TRL's ``_compute_loss`` reads it:
set to False (a callback), the KL completions are no longer scored and ``kto``'s KL baseline (and the ``kl``
metric) is 0, as in TRL; set to True with ``apo_zero_unpaired``, the KL is computed and logged, not used by the
loss, as in TRL (the batches must hold the KL completions, which TRL prepares only when the constructed loss type
needs them). With several processes the KL baseline is the mean of every process's estimate and ``rewards/*`` /
``logps/*`` average every process's responses of each class, as in TRL.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import trl
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import (add_aux_loss, head_call, head_separable_loss,
                                              install_head, install_heads, policy_operands)
from fastalign.integrations.trl._live_loss import LiveLoss, build_loss
from fastalign.integrations.trl._metrics import gathered_mean, log_num_tokens, token_mean
from fastalign.integrations.trl.preference import KTOLoss

__all__ = ["KTOTrainer"]

_NOT_MODEL_INPUTS = ("completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask",
                     "KL_token_type_ids", "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps")


def _extra_inputs(batch: dict, kl: bool = False) -> dict:
    """The inputs of a KTO batch that the body takes beside the token ids and attention mask (a vision-language
    model's: the images of each prompt), for its completions or, with ``kl``, its KL completions (their own token
    types, as TRL's)."""
    inputs = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS and k not in ("input_ids", "attention_mask")}
    if kl:
        inputs.update({name: batch[f"KL_{name}"] for name in ("token_type_ids", "mm_token_type_ids")
                       if f"KL_{name}" in batch})
    return inputs


class KTOTrainer(trl.KTOTrainer):
    """``trl.KTOTrainer`` with fastalign's fused log-probs and loss (see the module doc)."""

    #: the options TRL's ``_compute_loss`` reads from the trainer at every step -> their ``KTOConfig`` fields;
    #: ``calculate_KL``, also read at every step, is followed by ``_compute_loss`` itself
    fastalign_loss = LiveLoss(KTOLoss, {"beta": "beta", "desirable_weight": "desirable_weight",
                                        "undesirable_weight": "undesirable_weight", "loss_type": "loss_type"})

    @functools.wraps(trl.KTOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, trl.KTOTrainer.__init__, args, kwargs, self._check_config)
        check_model(self, "KTOConfig")
        build_loss(self)
        install_heads(self)

    @staticmethod
    def _check_config(args) -> None:
        check_config(args, "KTOConfig")
        KTOLoss(args)  # raises on a loss_type the profile does not map

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's pass of the reference over ``dataset`` (``precompute_ref_log_probs``, inside ``__init__``), after
        the model checks: a refused model raises before the pass, not after it."""
        check_model(self, "KTOConfig")
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _summed(self, model, input_ids, attention_mask, completion_mask, **model_kwargs):
        """Summed completion log-probs ``[N]`` of ``model`` (a no-grad caller wraps it)."""
        install_head(self.accelerator.unwrap_model(model))  # the precomputed reference runs inside __init__
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                    **head_call(self, ("log_probs",)), **model_kwargs)
        return out.log_probs[:, -(input_ids.size(1) - 1):].sum(-1)

    def _reference_context(self):
        if self.ref_model is None and hasattr(self.accelerator.unwrap_model(self.model), "peft_config"):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def compute_ref_log_probs(self, model, inputs):
        """The reference's summed completion log-probs ``[N]`` and, for ``kto``, those of the KL completions."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self._reference_context(), self.accelerator.autocast():
            kl = self._kl_logps(model, inputs)  # the KL completions first, as in TRL (the order of dropout draws)
            logps = self._summed(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"],
                                 **_extra_inputs(inputs))
        return logps, kl

    def _kl_logps(self, model, batch):
        """The summed log-probs ``[M]`` of the batch's KL completions under ``model``, without gradients, when the
        trainer's ``calculate_KL`` (read at every step, as TRL) is on; else None."""
        if not self.calculate_KL:
            return None
        with torch.no_grad():
            return self._summed(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"],
                                use_cache=False, **_extra_inputs(batch, kl=True))

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        kto_loss = self.fastalign_loss  # the options assigned since the last step, checked
        batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        model_kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            **_extra_inputs(batch))
        shift_mask = batch["completion_mask"][:, 1:]
        targets = batch["input_ids"][:, 1:].masked_fill(shift_mask == 0, -100)
        # the forwards in TRL's order (that of their dropout draws): the KL completions, the policy, the reference
        kl_logps = self._kl_logps(model, batch)
        policy = policy_operands(self, model, **model_kwargs)
        if self.precompute_ref_logps:
            ref_logps, ref_kl_logps = batch["ref_logps"], batch["ref_KL_logps"] if self.calculate_KL else None
        else:
            ref_logps, ref_kl_logps = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, batch)
        label = torch.as_tensor(batch["label"], dtype=torch.bool, device=targets.device)
        if kl_logps is not None:  # the KL completions of every process (equal shares: TRL's mean of process means)
            kl_logps, ref_kl_logps = self.accelerator.gather((kl_logps.detach(), ref_kl_logps.detach()))
        kl_only = None  # the KL that TRL logs and its loss does not take (apo_zero_unpaired)
        if kto_loss.options["loss_type"] != "kto" and kl_logps is not None:
            kl_only = (kl_logps - ref_kl_logps).float().mean().clamp(min=0)
            kl_logps = ref_kl_logps = None
        elif kto_loss.options["loss_type"] == "kto" and kl_logps is None:  # calculate_KL off: TRL's KL is 0
            kl_logps = ref_kl_logps = torch.zeros(1, device=targets.device)

        def kto(per_token_logps, _sum_p2):
            return kto_loss(per_token_logps, shift_mask, label, ref_logps, kl_logps, ref_kl_logps)

        unwrapped = self.accelerator.unwrap_model(self.model)
        loss, metrics, stats = head_separable_loss(policy.operands, unwrapped.config, targets, kto, items="rows",
                                                   extras=("entropy",), position_means="scored")
        log = self._metrics[mode]
        counts = {"chosen": label.sum(), "rejected": (~label).sum()}
        logged = {"kl": (metrics["kl"] if kl_only is None else kl_only).item()}  # the same on every process
        for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            logged[name] = gathered_mean(self.accelerator, metrics[name], counts[name.split("/")[1]])
        logged["rewards/margins"] = logged["rewards/chosen"] - logged["rewards/rejected"]
        for name in metrics:
            if not math.isnan(logged[name]):  # a class absent from every process: TRL logs nothing
                log[name].append(logged[name])
        self._log_head_metrics(mode, stats, targets != -100, batch["attention_mask"], label)
        loss = add_aux_loss(self, loss, policy.aux_loss, mode)
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _log_head_metrics(self, mode, stats, mask, attention_mask, label) -> None:
        """TRL's ``entropy``, ``num_tokens`` and ``logits/*``: token-weighted, sums and counts gathered, from the
        statistics of the loss's own pass."""
        log = self._metrics[mode]
        log["entropy"].append(token_mean(self.accelerator, stats["entropy"], mask))
        log_num_tokens(self, mode, attention_mask)
        for name, rows in (("logits/chosen", label), ("logits/rejected", ~label)):
            mean = token_mean(self.accelerator, stats["position_mean_logits"][:, :-1], mask & rows[:, None],
                              empty=None)
            if mean is not None:
                log[name].append(mean)
