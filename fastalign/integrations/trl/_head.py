"""The fused LM head the TRL drop-in trainers call: a model forward that returns per-token
statistics from the last hidden states through :func:`fastalign.integrations.hf.causal_lm_logprobs`,
and the checks that a trainer's config and model are ones this head can serve.

:func:`install_head` wraps ``model.forward`` so that ``model(input_ids=..., attention_mask=...,
labels=labels, fastalign_head=fields)`` returns :class:`HeadOutputs` instead of running the
previous forward. Going through ``model(...)`` keeps every wrapper's forward in the path
(DDP, FSDP, PEFT); any other call (generation included) reaches the previous forward unchanged.
"""
from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastalign.integrations.hf import _body, _head, causal_lm_logprobs, head_transform

#: The per-token fields :func:`head_outputs` can compute (TRL's ``FusedCausalLMOutput`` names).
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass
class HeadOutputs:
    """Per-token statistics ``[B, T-1]`` of the next token; unscored positions are 0 (False).

    ``log_probs`` and ``entropy`` are differentiable; ``log_sum_sq_probs`` (``log Σ_j p_j²``),
    ``mean_logits`` (``(1/V) Σ_j z_j``) and ``is_top1`` (``label == argmax_j z_j``) are not.
    Fields not requested are None."""

    log_probs: Tensor
    entropy: Optional[Tensor] = None
    log_sum_sq_probs: Optional[Tensor] = None
    mean_logits: Optional[Tensor] = None
    is_top1: Optional[Tensor] = None


def head_outputs(model, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Tensor,
                 fields: Sequence[str], *, temperature: float = 1.0, **model_kwargs) -> HeadOutputs:
    r"""TRL's fused-head statistics of ``model`` from its hidden states, never its logits.

    With ``z_t = head(h_t) / temperature`` (the model's head transform included), entry ``t``
    scores ``labels[:, t+1]`` (``-100``: unscored): ``log_probs = z_{y} - logsumexp(z)``,
    ``entropy = logsumexp(z) - Σ_j p_j z_j``, ``log_sum_sq_probs = log Σ_j p_j²``,
    ``is_top1 = [y = argmax_j z_j]`` and ``mean_logits = (1/V) Σ_j z_j``, which is linear in
    ``h`` for a head without softcapping: ``logit_scale (h · mean_j W_j + mean_j b_j) / temperature``
    (one ``H``-vector, no vocabulary pass). A softcapped head has no such form: ``mean_logits``
    raises a ValueError there.
    """
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"fastalign_head: unknown fields {sorted(unknown)}; known: {FIELDS}")
    hidden_states = []
    hook = None
    if "mean_logits" in fields:
        scale, softcap = head_transform(model.config)
        if softcap is not None:
            raise ValueError("mean_logits: a softcapped head (final_logit_softcapping) has no mean logit without "
                             "the full logits")
        hook = _body(model).register_forward_hook(lambda m, a, out: hidden_states.append(out.last_hidden_state))
    try:
        stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, temperature=temperature,
                                   entropy="entropy" in fields, sum_p2="log_sum_sq_probs" in fields,
                                   argmax="is_top1" in fields, **model_kwargs)
    finally:
        if hook is not None:
            hook.remove()
    scored = labels[:, 1:] != -100
    out = HeadOutputs(log_probs=stats.logprobs, entropy=stats.entropy)
    if stats.sum_p2 is not None:
        out.log_sum_sq_probs = torch.where(scored, stats.sum_p2.detach().clamp(min=1e-38).log(), 0.0)
    if stats.argmax is not None:
        out.is_top1 = (stats.argmax == labels[:, 1:]) & scored
    if hidden_states:
        with torch.no_grad():
            weight, bias = _head(model)
            w_mean = weight.float().mean(0)
            mean = hidden_states[0][:, :-1].float() @ w_mean
            if bias is not None:
                mean = mean + bias.float().mean()
            out.mean_logits = torch.where(scored, mean * (scale / temperature), 0.0)
    return out


def has_mean_logits(model) -> bool:
    """Whether :func:`head_outputs` gives ``mean_logits`` for ``model`` (its head is not softcapped)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return head_transform(model.config)[1] is None


def install_head(model, *, temperature: float = 1.0) -> None:
    """Wrap ``model.forward``: with ``fastalign_head=fields`` (a tuple of :data:`FIELDS`) it returns
    :func:`head_outputs` of ``labels``; without, the previous forward runs as before. It goes on the
    ``PreTrainedModel`` (the base model under PEFT), after TRL's own fused head; once per model."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(model, "_fastalign_head", False):
        return
    model._fastalign_head = True
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fastalign_head=None, **kwargs):
        if fastalign_head is None:
            return previous(*args, **kwargs)
        if args:
            raise TypeError("fastalign_head: pass input_ids and attention_mask by keyword")
        labels = kwargs.pop("labels")
        return head_outputs(self, kwargs.pop("input_ids"), kwargs.pop("attention_mask", None), labels,
                            tuple(fastalign_head), temperature=temperature, **kwargs)

    model.forward = types.MethodType(forward, model)


def check_config(args, name: str) -> None:
    """Raise on the fields of a TRL config that the drop-in trainers cannot honour."""
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(f"{name}.use_liger_kernel: the fastalign trainers replace the LM head and loss that Liger "
                         "would patch; set it to False")
    if getattr(args, "cast_lm_head_to_fp32", False):
        raise ValueError(f"{name}.cast_lm_head_to_fp32 is not supported: the fastalign head runs in the model's "
                         "(or autocast's) dtype and accumulates in fp32")


def check_model(trainer, name: str) -> None:
    """Raise on a model the fastalign head cannot score like TRL's fused head."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.get_text_config() is not base.config:
        raise ValueError(f"model: {type(base).__name__} is a vision-language model; the fastalign trainers take "
                         "text-only causal LMs (vision inputs are not supported)")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError(f"{name}.router_aux_loss_coef: the MoE load-balancing loss is not supported by the "
                         "fastalign trainers; set it to 0")
    head_transform(base.config)  # raises for an architecture without a known head transform


def bind_config(init, args, kwargs):
    """The ``args`` (config) argument of a trainer ``__init__`` call, or None."""
    bound = inspect.signature(init).bind_partial(None, *args, **kwargs)
    return bound.arguments.get("args")
