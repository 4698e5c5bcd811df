"""``AsyncGRPOTrainer``: TRL 1.16's experimental ``trl.experimental.async_grpo.AsyncGRPOTrainer`` with its
log-probs and entropies from fastalign's fused head.

Same constructor, same ``AsyncGRPOConfig``; a TRL user changes one import::

    from fastalign.integrations.trl import AsyncGRPOTrainer   # was: from trl.experimental.async_grpo import ...

TRL's asynchronous GRPO streams its rollouts from a vLLM server and packs each micro-batch into one prefix tree
per process: a token that several samples share is forwarded once, and tree attention shows each sample its own
path. Its loss takes a term ``m`` for every trained token of every sample, scored from the packed position
``i(m)`` that predicts it (``token_index``; a shared position serves every sample through it)::

    rho_m = exp(lp_{i(m)} - old_m),  loss = -Σ_m min(rho_m A_m, clip(rho_m, 1 - ε_low, 1 + ε_high) A_m) / (N/P) / G

``N`` the trained-token count over every process, ``P`` the process count, ``G`` the gradient-accumulation steps.
The log-probs ``lp`` and entropies of the packed positions (the vocabulary-sized work, where a step's head time
and memory go) come from the last hidden states and the model's own output head:
:func:`fastalign.integrations.hf.causal_lm_logprobs` with the tree's pre-shifted ``shift_labels`` at the trainer's
temperature, only the labelled positions through the vocabulary, without a host sync and without the ``[N, V]``
logits. The clipped loss over the terms, its metrics (``ratio``, ``kl``, ``entropy``, ``clip_ratio/*``) and the
step's token and time accounting are TRL's own ``compute_loss``, run on those statistics: same names, same values.
A MoE body's load-balancing loss comes from the router logits of the same body forward, as TRL adds it.
"""
from __future__ import annotations

import functools

from trl.experimental import async_grpo as trl_async_grpo

from fastalign.integrations.trl._checks import check_config, check_model, init_checked
from fastalign.integrations.trl._head import head_call, install_heads

__all__ = ["AsyncGRPOTrainer"]


class AsyncGRPOTrainer(trl_async_grpo.AsyncGRPOTrainer):
    """``trl.experimental.async_grpo.AsyncGRPOTrainer`` with fastalign's fused log-probs and entropies (see the
    module doc)."""

    @functools.wraps(trl_async_grpo.AsyncGRPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        init_checked(self, trl_async_grpo.AsyncGRPOTrainer.__init__, args, kwargs, self._check_config)
        check_model(self, "AsyncGRPOConfig")
        install_heads(self, temperature=self.temperature)  # TRL's head keeps the temperature it was built with

    @staticmethod
    def _check_config(args) -> None:
        check_config(args, "AsyncGRPOConfig")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(_TreeHead(self, model), inputs, return_outputs, num_items_in_batch)


class _TreeHead:
    """The model as TRL's ``compute_loss`` calls it, ``model(input_ids, position_ids, shift_labels,
    fused_lm_head=True, tree_*...)``, its fused head fastalign's: ``log_probs`` and ``entropy`` ``[1, N]`` of the
    packed positions (0 where unlabelled) and, with ``output_router_logits``, the MoE body's ``aux_loss``."""

    def __init__(self, trainer, model):
        self.trainer, self.model = trainer, model

    def __call__(self, *, fused_lm_head: bool = False, **inputs):
        if not fused_lm_head:
            raise ValueError("AsyncGRPOTrainer: the loss scores the packed rows through the fused head "
                             "(fused_lm_head=True)")
        return self.model(**inputs, **head_call(self.trainer, ("log_probs", "entropy")))
