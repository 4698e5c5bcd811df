"""The fused LM head the TRL drop-in trainers call: a model forward that returns per-token
statistics from the last hidden states through :func:`fastalign.integrations.hf.causal_lm_logprobs`,
and the checks that a trainer's config and model are ones this head can serve.

:func:`install_head` wraps ``model.forward`` so that ``model(input_ids=..., attention_mask=...,
labels=labels, **head_call(trainer, fields))`` returns :class:`HeadOutputs` instead of running the
previous forward, at that trainer's temperature and head dtype. Going through ``model(...)`` keeps every wrapper's forward in the path
(DDP, FSDP, PEFT); any other call (generation included) reaches the previous forward unchanged.
"""
from __future__ import annotations

import copy
import functools
import inspect
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from fastalign.integrations.hf import (_WHOLE_MODEL_TUNERS, causal_lm_logprobs, head_operands, head_transform,
                                       next_token_targets, router_aux_loss)
from fastalign.linear_divergence import linear_divergence_loss
from fastalign.linear_policy import policy_logprobs, policy_step
from fastalign.linear_step import separable_step

#: The per-token fields :func:`head_outputs` can compute (TRL's ``FusedCausalLMOutput`` names), and
#: ``operands``: the head's own operands instead, for a loss that goes through the head itself.
FIELDS = ("log_probs", "entropy", "operands")


@dataclass
class HeadOutputs:
    """Per-token statistics ``[B, T-1]`` of the next token, differentiable; unscored positions are 0.
    Fields not requested are None. ``operands`` (alone) is ``(hidden [B, T, H], weight, bias, low_rank)``
    of :func:`fastalign.integrations.hf.head_operands`, with no vocabulary pass (``log_probs`` None).
    ``aux_loss``: a MoE body's load-balancing loss, with ``output_router_logits=True``."""

    log_probs: Optional[Tensor]
    entropy: Optional[Tensor] = None
    operands: Optional[tuple] = None
    aux_loss: Optional[Tensor] = None


def head_outputs(model, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
                 fields: Sequence[str], *, temperature: float = 1.0, head_dtype: Optional[torch.dtype] = None,
                 **model_kwargs) -> HeadOutputs:
    r"""TRL's fused-head statistics of ``model`` from its hidden states, never its logits.

    With ``z_t = head(h_t) / temperature`` (the model's head transform included), entry ``t``
    scores ``labels[:, t+1]`` (``-100``: unscored): ``log_probs = z_{y} - logsumexp(z)`` and
    ``entropy = logsumexp(z) - Σ_j p_j z_j``. A loss that goes through the head itself asks for
    ``operands`` (:func:`head_policy_loss`, :func:`head_separable_loss`). ``head_dtype``: the dtype the head
    runs in, whatever the body's (``torch.float32``: TRL's ``cast_lm_head_to_fp32``).
    """
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"fastalign_head: unknown fields {sorted(unknown)}; known: {FIELDS}")
    aux = []
    if model_kwargs.get("output_router_logits"):  # the MoE load-balancing loss, as the model's forward adds it
        model_kwargs["on_body"] = lambda body: aux.append(router_aux_loss(model, body.router_logits, attention_mask))
    if "operands" in fields:
        if len(fields) != 1:
            raise ValueError("fastalign_head: 'operands' is asked alone (the head's operands, no statistics)")
        operands = head_operands(model, input_ids, attention_mask, head_dtype=head_dtype, **model_kwargs)
        return HeadOutputs(log_probs=None, operands=operands, aux_loss=aux[0] if aux else None)
    if labels is None:
        raise ValueError("fastalign_head: the statistics score labels; pass labels=")
    stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, temperature=temperature,
                               entropy="entropy" in fields, head_dtype=head_dtype, **model_kwargs)
    return HeadOutputs(log_probs=stats.logprobs, entropy=stats.entropy, aux_loss=aux[0] if aux else None)


def mean_logits(operands, scale: float) -> Tensor:
    r"""The mean logit ``(1/V) Σ_j z_j`` at every position ``[B, T]`` (fp32, no gradient) of a head without
    softcapping, from its operands ``(hidden, weight, bias, low_rank)``: linear in ``h``,
    ``scale (h · mean_j W_j + a · mean_j L_j + mean_j b_j)`` (``scale``: logit scale over temperature;
    ``a @ L.T`` a LoRA head's low-rank term), with no vocabulary pass. A softcapped head has no such form
    (:func:`has_mean_logits`)."""
    hidden, weight, bias, low_rank = operands
    with torch.no_grad():  # the means accumulate in fp32 without an fp32 copy of the [V, H] head
        mean = hidden.float() @ weight.mean(0, dtype=torch.float32)
        if low_rank is not None:
            mean = mean + low_rank[0].float() @ low_rank[1].mean(0, dtype=torch.float32)
        if bias is not None:
            mean = mean + bias.mean(dtype=torch.float32)
        return mean * scale


def predicting_operands(operands) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(hidden [B, T-1, H'], weight [V, H'], bias)``: a model's head operands ``(hidden, weight, bias, low_rank)``
    at the positions that predict a next token, for a loss that takes one weight (a divergence): a LoRA head's
    low-rank term ``(a [B, T, r], L [V, r])`` is appended as ``r`` more hidden columns,
    ``[h, a] [W, L]^T = h W^T + a L^T`` (gradients reach ``a`` and ``L`` through the concatenation)."""
    hidden, weight, bias, low_rank = operands
    hidden = hidden[:, :-1]
    if low_rank is not None:
        a, lora = low_rank
        hidden = torch.cat([hidden, a[:, :-1].to(hidden.dtype)], dim=-1)
        weight = torch.cat([weight, lora.to(weight.dtype)], dim=-1)
    return hidden, weight, bias


def check_teacher(trainer, teacher, name: str = "teacher_model") -> None:
    """Raise on a teacher the fused head cannot score (a float64 head, a vision-language model, an architecture
    without a known head transform), naming it; then install the fused head on it."""
    check_head_dtype(trainer, teacher, name)
    base = base_model(trainer, teacher)
    if base.config.get_text_config() is not base.config:
        raise ValueError(f"{name}: {type(base).__name__} is a vision-language model; the fastalign trainers take "
                         "text-only causal LMs")
    head_transform(base.config)  # raises for an architecture without a known head transform
    install_head(trainer.accelerator.unwrap_model(teacher))


def teacher_divergence(trainer, model, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                       num_items_in_batch=None, **options) -> Tensor:
    """:func:`fastalign.linear_divergence_loss` of ``model`` against ``trainer.teacher_model`` (under ``no_grad``,
    in eval mode) on the same tokens, from both bodies' hidden states at the positions that predict a next token
    (:func:`predicting_operands`) and each head's transform; ``response_mask [B, T-1]`` the scored positions,
    divided by ``num_items_in_batch`` when given (else their count, at least 1). ``options``: the divergence's
    (``beta``, ``temperature``)."""
    call = dict(input_ids=input_ids, attention_mask=attention_mask, **head_call(trainer, ("operands",)))
    hidden, weight, bias = predicting_operands(model(**call).operands)
    teacher = trainer.teacher_model
    teacher.eval()
    with torch.no_grad():
        t_hidden, t_weight, t_bias = predicting_operands(teacher(**call).operands)
    device = hidden.device
    normalizer = None
    if num_items_in_batch is not None:
        normalizer = torch.as_tensor(num_items_in_batch, device=device).float().reshape(())
    scale, softcap = head_transform(base_model(trainer, model).config)
    t_scale, t_softcap = head_transform(base_model(trainer, teacher).config)
    loss, _ = linear_divergence_loss(
        hidden, weight, t_hidden.to(device), t_weight.to(device), bias=bias,
        teacher_bias=None if t_bias is None else t_bias.to(device), logit_scale=scale, softcap=softcap,
        teacher_logit_scale=t_scale, teacher_softcap=t_softcap, response_mask=response_mask, normalizer=normalizer,
        **options)
    return loss


def loss_and_outputs(loss: Tensor, model, return_outputs: bool, **model_inputs):
    """A drop-in's ``compute_loss`` result: ``loss``, or with ``return_outputs`` (an evaluation that hands the
    logits to ``compute_metrics``) ``(loss, model(**model_inputs))`` from one more forward without gradients, with
    a warning (the fused head never builds the logits)."""
    if not return_outputs:
        return loss
    warnings.warn("return_outputs=True computes the logits with an extra forward pass (the fused head never builds "
                  "them)", stacklevel=3)
    with torch.no_grad():
        return loss, model(**model_inputs)


def base_model(trainer, model):
    """The ``PreTrainedModel`` under the trainer's wrappers and a PEFT model."""
    model = trainer.accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def policy_operands(trainer, model, **inputs) -> HeadOutputs:
    """``model(**inputs)`` through the fused head for its operands, with the MoE body's load-balancing loss
    (``aux_loss``) when the trainer adds one (TRL's ``aux_loss_enabled``)."""
    router = {"output_router_logits": True} if trainer.aux_loss_enabled else {}
    return model(**inputs, **router, **head_call(trainer, ("operands",)))


def add_aux_loss(trainer, loss: Tensor, aux: Optional[Tensor], mode: Optional[str], *, coef: Optional[float] = None,
                 scale: float = 1.0) -> Tensor:
    """``loss + coef * aux / scale`` when the trainer adds a MoE body's load-balancing loss ``aux`` (``coef``: its
    ``router_aux_loss_coef`` by default), logging TRL's ``aux_loss`` metric under ``mode`` (None: not logged);
    ``loss`` otherwise."""
    if not trainer.aux_loss_enabled:
        return loss
    log_aux_loss(trainer, aux, mode)
    return loss + (trainer.router_aux_loss_coef if coef is None else coef) * aux / scale


def log_aux_loss(trainer, aux: Optional[Tensor], mode: Optional[str]) -> None:
    """Log TRL's ``aux_loss`` metric (the mean of every process's ``aux``) under ``mode`` when the trainer adds a
    MoE body's load-balancing loss; nothing otherwise (or with ``mode`` None)."""
    if trainer.aux_loss_enabled and mode is not None:
        trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux).mean().item())


def head_policy_loss(trainer, model, ids: Tensor, attention: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                     old: Optional[Tensor], loss, vision: dict, *, token_separable: bool = False):
    """``(loss, metrics, entropies, aux)`` of a policy ``loss(lp, old, entropy)`` on the completion tokens of an online
    trainer's batch (``ids = prompt + completion``), through the model's head from its hidden states
    (:func:`fastalign.linear_policy.policy_step`: one pass over blocks of whole completions when gradients
    are needed), padding unscored as in :func:`fused_logps_and_entropies`; ``old=None``: the policy's own
    log-probs, detached; the temperature is ``trainer.temperature``. ``loss`` must be separable over
    completions; ``token_separable``: over tokens too (blocks of any tokens, so long completions take the
    pass as well; :attr:`fastalign.PolicyConfig.token_separable`); ``aux``: the MoE body's load-balancing
    loss when the trainer adds one (:func:`policy_operands`), else None. Without gradients (evaluation) the
    log-probs are still those of the pass with gradients (:func:`fastalign.linear_policy.policy_logprobs`), as
    the old policy's of :func:`fused_logps_and_entropies`."""
    text_only(vision)
    with trainer.accelerator.autocast():
        out = policy_operands(trainer, model, input_ids=ids, attention_mask=attention)
    args, options = _policy_head(trainer, model, out.operands,
                                 completion_ids.masked_fill(completion_mask == 0, -100), token_separable)
    if torch.is_grad_enabled():
        value, metrics, _lp, entropies = policy_step(*args, old, loss, **options)
    else:
        lp, entropies = policy_logprobs(*args, **options)
        value, metrics = loss(lp, lp if old is None else old, entropies)
    return value, metrics, entropies, out.aux_loss


def _policy_head(trainer, model, operands, targets: Tensor, token_separable: bool):
    """The arguments ``(hidden, weight, labels)`` and keywords of :func:`fastalign.linear_policy.policy_step` (and
    :func:`~fastalign.linear_policy.policy_logprobs`) for the last ``targets.size(1)`` tokens of the rows whose
    head ``operands`` (of ``model``) are given, at the trainer's temperature (``targets``: -100 where unscored)."""
    hidden, weight, bias, low_rank = operands
    k = targets.size(1)
    positions = slice(hidden.size(1) - k - 1, hidden.size(1) - 1)  # those that predict the last k tokens
    scale, softcap = head_transform(trainer.accelerator.unwrap_model(model).config)
    return (hidden[:, positions], weight, targets), dict(
        bias=bias, low_rank=None if low_rank is None else (low_rank[0][:, positions], low_rank[1]), entropy=True,
        token_separable=token_separable,
        logit=dict(temperature=head_temperature(trainer), logit_scale=scale, softcap=softcap))


def head_separable_loss(operands, config, targets: Tensor, loss, *, items: str = "pairs", sum_p2: bool = False,
                        extras: Sequence[str] = (), separable: bool = True, position_means: bool = False):
    """``(loss, metrics, stats)`` of ``loss(lp [N, T-1], sum_p2)`` over the rows whose head ``operands`` (of
    ``model(..., **head_call(trainer, ("operands",)))``) are given, through the head itself
    (:func:`fastalign.linear_step.separable_step`: one pass over blocks of whole ``items``, one of
    :data:`fastalign.linear_step.ITEMS`, when gradients are needed and ``separable``), never the logits.
    ``targets [N, T-1]``: the next token at each position, ``-100`` where unscored; ``config``: the
    model's (its head transform). ``stats`` as :func:`~fastalign.linear_step.separable_step`'s, ``[N, T-1]``, plus
    ``"position_mean_logits" [N, T]`` (:func:`mean_logits`) with ``position_means``."""
    hidden, weight, bias, low_rank = operands
    scale, softcap = head_transform(config)
    value, metrics, stats = separable_step(
        hidden[:, :-1], weight, targets, loss, bias=bias, items=items, sum_p2=sum_p2, extras=extras,
        low_rank=None if low_rank is None else (low_rank[0][:, :-1], low_rank[1]),
        single_pass="auto" if separable else False, logit=dict(logit_scale=scale, softcap=softcap))
    if position_means:
        stats["position_mean_logits"] = mean_logits(operands, scale)
    return value, metrics, stats


def label_margin(operands, targets: Tensor, scale: float) -> Tensor:
    r"""``z_y - (1/V) Σ_j z_j`` at each position ``[B, T-1]`` (fp32, differentiable; 0 where ``targets`` is
    -100) of a head without softcapping, from its operands and the next tokens ``targets``: linear in ``h``,
    ``scale (h · (W_y - mean_j W_j) + (b_y - mean_j b_j) + a · (L_y - mean_j L_j))``, with no vocabulary pass
    (one row of the head per position). With ``lp = z_y - lse``, the label-smoothing term
    ``-(1/V) Σ_j log p_j = lse - mean_j z_j`` is ``label_margin - lp``."""
    hidden, weight, bias, low_rank = operands
    scored = targets != -100
    y = targets.clamp(min=0)

    def margin(rows, w):  # rows · (w_y - mean_j w_j) per position; one head row per position in fp32, not [V, H]
        return (rows.float() * (w[y].float() - w.mean(0, dtype=torch.float32))).sum(-1)

    out = margin(hidden[:, :-1], weight)
    if bias is not None:
        out = out + (bias[y].float() - bias.mean(dtype=torch.float32))
    if low_rank is not None:
        out = out + margin(low_rank[0][:, :-1], low_rank[1])
    return torch.where(scored, out * scale, 0.0)


def has_mean_logits(model) -> bool:
    """Whether :func:`mean_logits` applies to ``model``: its head is not softcapped."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return head_transform(model.config)[1] is None


def install_head(model) -> None:
    """Wrap ``model.forward``: with ``fastalign_head=fields`` (a tuple of :data:`FIELDS`) it returns
    :func:`head_outputs` of ``labels``, with ``fastalign_options`` (``temperature``, ``head_dtype``: the
    calling trainer's, :func:`head_call`) as its keywords; without, the previous forward runs as before.
    It goes on the ``PreTrainedModel`` (the base model under PEFT), after TRL's own fused head; once per
    model, and holds no trainer's options, so every trainer sharing the model scores with its own; again when
    ``model.forward`` is not (or no longer: a pickled or ``torch.save``-loaded model) this wrapper.

    The wrapper calls the forwards it wraps as methods of the model, which ``copy.deepcopy`` binds to the copy;
    a call without a fused head skips TRL's wrappers under it, which hold the original model's forward in
    their closure and pass such a call on unchanged. So a deep copy computes with its own weights. What
    remains TRL's: a copy taken while a TRL head is the outermost wrapper (TRL's trainer built on the model
    after this head) runs the original's weights, until a fastalign trainer patches the copy."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _installed(model):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fastalign_head=None, fastalign_options=None, **kwargs):
        if fastalign_head is None:
            if kwargs.get("fused_lm_head"):  # TRL's fused head, under this one
                return self._fastalign_forwards[0](*args, **kwargs)
            kwargs = {k: v for k, v in kwargs.items() if not (k in _TRL_HEAD_KEYWORDS and v is None)}
            kwargs.pop("fused_lm_head", None)
            return self._fastalign_forwards[1](*args, **kwargs)
        if args:
            raise TypeError("fastalign_head: pass input_ids and attention_mask by keyword")
        if kwargs.get("input_ids") is None:  # PEFT prompt learning passes inputs_embeds with virtual tokens
            given = "inputs_embeds without input_ids" if kwargs.get("inputs_embeds") is not None else "no input_ids"
            raise ValueError(f"fastalign_head: {given}; the fused head scores input_ids (PEFT prompt learning, "
                             "which passes its virtual tokens as inputs_embeds, is not supported)")
        labels = kwargs.pop("labels", None)
        return head_outputs(self, kwargs.pop("input_ids"), kwargs.pop("attention_mask", None), labels,
                            tuple(fastalign_head), **(fastalign_options or {}), **kwargs)

    # generate() and the Trainer read the class forward's signature; without __wrapped__, accelerate's
    # unwrap_model(keep_fp32_wrapper=False) stops at this wrapper instead of the class forward
    del forward.__wrapped__
    forward.__signature__ = inspect.signature(type(model).forward)
    forward._fastalign_head = forward
    # bound methods of the model, which copy.deepcopy binds to the copy (a closure would keep the original)
    model._fastalign_forwards = (previous, _plain_forward(model, previous))
    model.forward = types.MethodType(forward, model)


#: The keywords TRL's fused-head wrapper drops when None before its previous forward (with ``fused_lm_head``).
_TRL_HEAD_KEYWORDS = ("labels", "shift_labels", "num_items_in_batch")


def _is_head(func) -> bool:
    """Whether ``func`` is :func:`install_head`'s wrapper (a ``functools.wraps`` of it copies its mark, which
    names the wrapper itself)."""
    return getattr(func, "_fastalign_head", None) is func


def _installed(model) -> bool:
    """Whether ``model.forward`` is :func:`install_head`'s wrapper bound to ``model`` (accelerate's autocast
    wrappers around it included)."""
    forward = model.forward
    func = forward.__func__ if getattr(forward, "__self__", None) is model else None
    while func is not None and not _is_head(func):
        func = getattr(func, "__wrapped__", None)
    return func is not None


def _plain_forward(model, forward):
    """The forward of ``model`` that a call without any fused head reaches from ``forward``: past this head's
    wrappers and TRL's ``add_fused_lm_head`` ones (whose closure holds the forward they wrap) bound to ``model``."""
    while getattr(forward, "__self__", None) is model:
        func = forward.__func__
        if _is_head(func):
            return model._fastalign_forwards[1]
        code = getattr(func, "__code__", None)
        if (code is None or code.co_name != "_fused_forward" or "original_forward" not in code.co_freevars
                or not func.__globals__.get("__name__", "").startswith("trl.")):
            break
        inner = func.__closure__[code.co_freevars.index("original_forward")].cell_contents
        if getattr(inner, "__self__", None) is not model:
            break
        forward = inner
    return forward


def head_call(trainer, fields: Sequence[str]) -> dict:
    """The keywords of a model call through the fused head for ``fields``, at the trainer's own head options
    (:func:`install_heads`: its ``temperature`` and ``head_dtype``; none for trainers without)."""
    return {"fastalign_head": tuple(fields), "fastalign_options": getattr(trainer, "fastalign_head_options", {})}


def head_temperature(trainer) -> float:
    """The temperature the trainer's head scores at: the one it was built with (:func:`install_heads`), as TRL's
    fused head keeps the temperature it was added with (a later ``trainer.temperature`` reaches generation only)."""
    return getattr(trainer, "fastalign_head_options", {}).get("temperature", 1.0)


def check_config(args, name: str) -> None:
    """Raise on the fields of a TRL config that the drop-in trainers cannot honour."""
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(f"{name}.use_liger_kernel: the fastalign trainers replace the LM head and loss that Liger "
                         "would patch; set it to False")


def check_model(trainer, name: str, *, head_dtype: Optional[torch.dtype] = None) -> None:
    """Raise on a model the fastalign head cannot score like TRL's fused head: a vision-language model, an
    architecture without a known head transform, a policy or reference with a PEFT adapter set up outside
    the body (:func:`check_peft`), and a policy or reference whose head would run in float64
    (:func:`check_head_dtype`; ``head_dtype``: the dtype the trainer runs its head in, None: the model's)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    check_peft(model, "model")
    if getattr(trainer, "ref_model", None) is not None:
        check_peft(trainer.accelerator.unwrap_model(trainer.ref_model), "ref_model")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.get_text_config() is not base.config:
        raise ValueError(f"model: {type(base).__name__} is a vision-language model; the fastalign trainers take "
                         "text-only causal LMs (vision inputs are not supported)")
    head_transform(base.config)  # raises for an architecture without a known head transform
    check_head_dtype(trainer, trainer.model, "model", head_dtype=head_dtype)
    if getattr(trainer, "ref_model", None) is not None:
        check_head_dtype(trainer, trainer.ref_model, "ref_model", head_dtype=head_dtype)


def check_peft(model, name: str) -> None:
    """A ``ValueError`` naming ``name`` and the PEFT config type for a PEFT model whose active adapter the fused
    head cannot score (:func:`fastalign.integrations.hf.head_operands` refuses it at every call): prompt learning
    (``PromptTuningConfig``, ``PrefixTuningConfig``, ``PromptEncoderConfig``, ...: its virtual tokens reach the
    body as ``inputs_embeds``), X-LoRA and ShadowPEFT (set up by hooks on the whole model's forward)."""
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(f"{name}: PEFT prompt learning ({type(config).__name__}) adds virtual tokens that the "
                         "fastalign trainers' fused head does not see; it is not supported (LoRA and merged "
                         "adapters are)")
    if getattr(config, "peft_type", None) in _WHOLE_MODEL_TUNERS:
        raise ValueError(f"{name}: PEFT {type(config).__name__} adapters are set up by hooks on the whole model's "
                         "forward, which the fastalign trainers' fused head does not run; they are not supported "
                         "(LoRA, aLoRA, Poly and merged adapters are)")


def check_head_dtype(trainer, model, name: str, *, head_dtype: Optional[torch.dtype] = None,
                     autocast: bool = True) -> None:
    """A ``TypeError`` naming ``name`` for a float64 ``model`` whose head would run in float64: the fused head runs
    in float32, bfloat16 or float16. It runs in ``head_dtype`` when given, else (``autocast``: a head that runs
    under the trainer's autocast) in the trainer's mixed precision (bf16 / fp16) when on, else in the model's dtype."""
    if head_dtype is not None or (autocast and trainer.accelerator.mixed_precision in ("bf16", "fp16")):
        return
    model = trainer.accelerator.unwrap_model(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.dtype == torch.float64:
        raise TypeError(f"{name}: its dtype is torch.float64, which the fastalign trainers' fused LM head does not "
                        f"run in: cast the model to float32, bfloat16 or float16 (e.g. {name}.float(), or "
                        f"dtype=torch.float32 when loading it) before passing it to the trainer")


def init_checked(trainer, init, args, kwargs, check) -> None:
    """Run TRL's trainer ``init`` with ``check`` applied to its config: before, when the caller
    passes one (so a refused option fails before any model work), and after, on the config TRL
    settled on (a default one when none was passed)."""
    config = inspect.signature(init).bind_partial(None, *args, **kwargs).arguments.get("args")
    if config is not None:
        check(config)
    init(trainer, *args, **kwargs)
    check(trainer.args)


#: How a TRL attribute reaches the profile: the config field it stands for; ``(field, read)`` with
#: ``read(trainer)`` its value as TRL uses it; None: read at construction only (another value raises).
LiveOption = Union[str, tuple, None]


class LiveLoss:
    """A drop-in trainer's ``fastalign_loss``: the profile loss of its config, kept in step with the option
    attributes TRL's own trainer reads at every step (``trainer.beta = 0.5`` between steps changes TRL's loss).

    ``LiveLoss(profile, options)`` is a class attribute; ``options`` maps each such TRL attribute to the config
    field it stands for (:data:`LiveOption`). Reading ``trainer.fastalign_loss`` compares the attributes' values
    (and types) with those the loss was built from, and builds ``profile(config)`` again, the trainer's config
    with those fields replaced, only when one changed: no cost at a step where none did. A value the profile
    refuses raises its ``ValueError`` / ``TypeError`` there, at the next step, naming the attribute
    (``DPOTrainer.beta=...``); the loss and its values stay the last good ones. An attribute the trainer does
    not set (CPO's ``simpo_gamma`` without simpo) reads its config field.

    ``args``: the config fields TRL's loss reads from ``self.args`` itself at every step (GRPO's ``delta``, DPO's
    ``discopop_tau``), followed the same way (a callback that changes ``args.delta``), named
    ``GRPOTrainer.args.delta=...`` in an error."""

    def __init__(self, profile: Callable, options: dict, args: Sequence[str] = ()):
        self.profile, self.options = profile, dict(options)
        self.options.update({f"args.{field}": (field, functools.partial(_args_field, field)) for field in args})

    def __set_name__(self, owner, name) -> None:
        self.slot = f"_{name}_live"

    def _values(self, trainer) -> tuple:
        def value(attr, option):
            if isinstance(option, tuple):
                return option[1](trainer)
            return getattr(trainer, attr) if option is None else getattr(trainer, attr, getattr(trainer.args, option))

        return tuple(value(attr, option) for attr, option in self.options.items())

    def __get__(self, trainer, owner=None):
        if trainer is None:
            return self
        values = self._values(trainer)
        key = tuple((type(v), v) for v in values)  # with the types: 0 for False, "0.5" for 0.5 are changes too
        state = trainer.__dict__.get(self.slot)
        if state is None or key != state[0]:
            state = (copy.deepcopy(key), self._build(trainer, values, state))  # a copy: in-place edits are changes
            trainer.__dict__[self.slot] = state
        return state[1]

    def __set__(self, trainer, value) -> None:
        raise AttributeError(f"{type(trainer).__name__}.fastalign_loss follows the trainer's option attributes "
                             f"({', '.join(self.options)}); assign those")

    def _build(self, trainer, values, state):
        changed = [(attr, value) for i, (attr, value) in enumerate(zip(self.options, values))
                   if state is None or (type(value), value) != state[0][i]]
        fields = {}
        for (attr, option), value in zip(self.options.items(), values):
            if option is None:
                if state is not None and any(attr == a for a, _ in changed):
                    raise ValueError(f"{type(trainer).__name__}.{attr}={value!r}: the fastalign trainer reads "
                                     f"{attr} at construction only; build a new trainer to change it")
            else:
                fields[option[0] if isinstance(option, tuple) else option] = value
        try:
            return self.profile(_ConfigView(trainer.args, fields))
        except (ValueError, TypeError) as error:
            if state is None:
                raise
            named = ", ".join(f"{type(trainer).__name__}.{attr}={value!r}" for attr, value in changed)
            raise type(error)(f"{named}: {error}") from error


def _args_field(field: str, trainer):
    """The trainer's config field ``field`` (``trainer.args.<field>``), as TRL's loss reads it at every step."""
    return getattr(trainer.args, field)


def build_loss(trainer) -> None:
    """Build the trainer's ``fastalign_loss`` (:class:`LiveLoss`) from its option attributes as TRL's constructor
    set them: a later assignment is a change, checked and named at the next step."""
    type(trainer).fastalign_loss.__get__(trainer)


class _ConfigView:
    """A trainer's config with some fields replaced, read as a config object (attribute access)."""

    def __init__(self, args, fields: dict):
        self.__dict__.update(_args=args, _fields=fields)

    def __getattr__(self, name):
        fields = self.__dict__["_fields"]
        return fields[name] if name in fields else getattr(self.__dict__["_args"], name)


def install_heads(trainer, **options) -> None:
    """:func:`install_head` on the trainer's model and its reference model (when it has one); ``options``
    (``temperature``, ``head_dtype``) are the trainer's own, passed with each of its calls (:func:`head_call`)."""
    trainer.fastalign_head_options = dict(options)
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            install_head(trainer.accelerator.unwrap_model(model))


def token_mean(accelerator, values: Tensor, where: Tensor, empty=0.0):
    """The mean of ``values`` at the positions ``where`` over every process (sums and counts gathered, as TRL
    gathers its token metrics); ``empty`` where no process has such a position."""
    gather = accelerator.gather_for_metrics
    total, count = gather(values.detach().float()[where].sum()).sum(), gather(where.sum()).sum()
    return (total / count).item() if count > 0 else empty


def log_num_tokens(trainer, mode: str, attention_mask: Tensor) -> None:
    """TRL's ``num_tokens``: the attended tokens of every process trained on so far (the ranks of a tensor-parallel
    group hold the same batch: counted once)."""
    if mode == "train":
        trainer._total_train_tokens += (trainer.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
                                        // trainer._tp_size)
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


def log_pair_metrics(trainer, mode: str, stats: dict, targets: Tensor, parts: int = 2) -> None:
    """TRL's ``logits/chosen``, ``logits/rejected`` (from ``stats["position_mean_logits"]``, when the head has
    them) and ``mean_token_accuracy`` (of the chosen rows), token-weighted over every process, for a batch of
    ``parts`` equal parts (the chosen rows first, then the rejected ones; TPO's gold rows third) from the
    statistics of the loss's own pass (:func:`head_separable_loss`)."""
    log = trainer._metrics[mode]
    scored = (targets != -100).chunk(parts, dim=0)

    def only(i):  # the scored positions of the i-th part
        return torch.cat([p if j == i else torch.zeros_like(p) for j, p in enumerate(scored)])

    if "position_mean_logits" in stats:
        mean_logits = stats["position_mean_logits"][:, :-1]
        log["logits/chosen"].append(token_mean(trainer.accelerator, mean_logits, only(0)))
        log["logits/rejected"].append(token_mean(trainer.accelerator, mean_logits, only(1)))
    log["mean_token_accuracy"].append(token_mean(trainer.accelerator, stats["argmax"] == targets, only(0)))


def gathered_mean(accelerator, mean: Tensor, count, *, empty: float = float("nan")) -> float:
    """The mean over every process of values each process holds ``count`` of, from each process's
    ``mean``: ``Σ_p count_p mean_p / Σ_p count_p`` (what TRL's gather of the values themselves, or of
    their sums and counts, gives; with one process it is ``mean``). A process holding none (its
    mean NaN) adds nothing; ``empty`` where no process holds any."""
    count = torch.as_tensor(count, dtype=torch.float32, device=mean.device).reshape(())
    local = torch.where(count > 0, mean.detach().float().reshape(()) * count, 0.0)
    total, held = accelerator.gather(torch.stack([local, count]).reshape(1, 2)).reshape(-1, 2).sum(0).tolist()
    return total / held if held > 0 else empty


#: The vision-language inputs TRL's log-prob methods take (the fused head refuses them).
VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                 "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def text_only(vision_inputs: dict) -> None:
    """Raise on what the fused head cannot take: vision inputs, unknown ones."""
    unexpected = set(vision_inputs) - set(VISION_INPUTS) - {"num_images"}
    if unexpected:
        raise TypeError(f"unexpected arguments {sorted(unexpected)}")
    given = sorted(k for k, v in vision_inputs.items() if v is not None)
    if given:
        raise ValueError(f"vision inputs {given} are not supported by the fastalign trainers")


def fused_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                              compute_entropy=False, compute_aux_loss=False, **vision_inputs):
    r"""TRL's ``_get_per_token_logps_and_entropies`` (GRPO and RLOO trainers) through the fused head:
    ``(log p(y_t | y_{<t}), H_t, aux)`` of the last ``logits_to_keep`` tokens, ``[B, logits_to_keep]``,
    from the hidden states (``H_t = -Σ_j p_j log p_j`` at temperature ``self.temperature``);
    padding (``attention_mask == 0``) gives 0; ``aux``: with ``compute_aux_loss`` the MoE body's
    load-balancing loss, the mean over the chunks as TRL's, else None. Text only; chunked by
    ``batch_size`` rows like TRL.

    Without gradients, for a trainer whose loss goes through the head itself (its ``_policy_pass()``: the
    ``token_separable`` of its :func:`head_policy_loss`, None when its loss takes these log-probs instead), the
    statistics are those of that loss's pass (:func:`fastalign.linear_policy.policy_logprobs`), bit for bit: the
    old policy's log-probs of an on-policy step give a ratio of exactly 1 (and an unchanged reference a KL of 0),
    as TRL's, which computes both with one function."""
    text_only(vision_inputs)
    policy_pass = getattr(self, "_policy_pass", None)
    token_separable = policy_pass() if policy_pass is not None and not torch.is_grad_enabled() else None
    fields = ("log_probs", "entropy") if compute_entropy else ("log_probs",)
    if token_separable is not None:  # the head's operands, for the loss's own pass
        fields = ("operands",)
    router = {"output_router_logits": True} if compute_aux_loss else {}
    batch_size = batch_size or input_ids.size(0)
    logps, entropies, aux = [], [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, att = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        labels = ids.masked_fill(att == 0, -100)
        labels[:, :-logits_to_keep] = -100
        with self.accelerator.autocast():
            out = model(input_ids=ids, attention_mask=att, labels=labels, **head_call(self, fields), **router)
        lp, entropy = out.log_probs, out.entropy
        if token_separable is not None:  # the pass of the loss, on the completion positions only
            args, options = _policy_head(self, model, out.operands, labels[:, -logits_to_keep:], token_separable)
            lp, entropy = policy_logprobs(*args, **options)
        logps.append(lp[:, -logits_to_keep:])
        if compute_entropy:
            entropies.append(entropy[:, -logits_to_keep:])
        if compute_aux_loss:
            aux.append(out.aux_loss)
    return (torch.cat(logps), torch.cat(entropies) if compute_entropy else None,
            torch.stack(aux).mean() if compute_aux_loss else None)


class ConcatenatedPairsMixin:
    r"""``get_batch_loss_metrics`` of TRL's concatenated-pairs trainers (``CPOTrainer``, ``ORPOTrainer``)
    from the fused head: one forward over the chosen then the rejected rows, the trainer's profile loss
    (``fastalign_loss``) of the scored tokens' log-probs through the head itself (:func:`head_separable_loss`:
    one pass over blocks of whole pairs when gradients are needed) and TRL's metrics.

    A subclass sets ``fastalign_loss`` (a :class:`LiveLoss` of its profile), ``config_name``,
    ``nll_over_prompt`` (ORPO: the NLL runs over every attended token, so the prompt is scored too)
    and ``logits_last_position`` (CPO's ``logits/*`` average every position, ORPO's drop the last).
    ``logits/*`` is TRL's mean logit ``mean_{b,t,j} z_{b,t,j}`` of each half, from one ``H``-vector
    (absent for a softcapped head); the per-pair metrics (``rewards/*``, ``logps/*``) are averaged over
    every process's pairs and the per-batch ones (``nll_loss``, ``logits/*``, ORPO's ``log_odds_*``) over processes, as TRL
    gathers them.

    A length-averaged loss (ORPO; CPO's ipo, simpo, alphapo) on a batch holding a row with no
    completion token (its prompt fills ``max_length``, so truncation leaves nothing to score) raises a
    ValueError naming ``max_length``: the average is 0/0 there, which TRL turns into a NaN loss and NaN
    weights after the step. The check gathers one flag per batch, after the metrics are read back, so
    every process raises together."""

    config_name = ""
    nll_over_prompt = False
    logits_last_position = True

    def _setup_pairs(self) -> None:
        check_model(self, self.config_name)
        if self.is_encoder_decoder:
            raise ValueError(f"{self.config_name}.is_encoder_decoder: the fastalign trainers take decoder-only causal "
                             "LMs")
        self._mean_logits = has_mean_logits(self.accelerator.unwrap_model(self.model))
        if self.eval_dataset is not None and self.compute_metrics is not None:
            self._check_predicts_loss_only(self.args.prediction_loss_only)
        build_loss(self)
        install_head(self.accelerator.unwrap_model(self.model))

    def _check_predicts_loss_only(self, prediction_loss_only: bool) -> None:
        if not self._mean_logits and not prediction_loss_only:
            raise ValueError(f"{self.config_name}.prediction_loss_only: evaluation with compute_metrics predicts "
                             "logits/chosen and logits/rejected, which a softcapped head cannot give without the "
                             "full logits; set it to True")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._check_predicts_loss_only(prediction_loss_only)  # also for a dataset given to evaluate() or predict()
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _padding_value(self) -> int:
        return self.padding_value if hasattr(self, "padding_value") else self.pad_token_id

    def _empty_completion(self, completion_mask) -> bool:
        """Whether a row of any process's batch has no completion token (every process raises together)."""
        empty = (completion_mask.sum(1) == 0).any().reshape(1).to(torch.int32)
        return bool(self.accelerator.gather(empty).any())

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        pair_loss = self.fastalign_loss  # the options assigned since the last step, checked
        cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self._padding_value(),
                                       device=self.accelerator.device)
        ids, attention = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
        completion_labels = cat["concatenated_labels"]
        pairs = batch["chosen_labels"].shape[0]
        labels = ids.masked_fill(attention == 0, -100) if self.nll_over_prompt else completion_labels
        targets = next_token_targets(ids, labels=labels, attention_mask=attention)
        completion_mask = (completion_labels[:, 1:] != -100).float()
        extra = (attention[:, 1:].float(),) if self.nll_over_prompt else ()
        policy = policy_operands(self, model, input_ids=ids, attention_mask=attention, use_cache=False)
        loss, metrics, stats = head_separable_loss(
            policy.operands, self.accelerator.unwrap_model(self.model).config, targets,
            lambda per_token_logps, _sum_p2: pair_loss(per_token_logps, completion_mask, *extra),
            position_means=self._mean_logits)
        # the MoE load-balancing loss of the same forward, with the config's coefficient, not logged (as TRL)
        loss = add_aux_loss(self, loss, policy.aux_loss, None, coef=self.aux_loss_coef)

        prefix = "eval_" if train_eval == "eval" else ""
        logged = {}
        for name, value in metrics.items():
            if name in ("nll_loss", "log_odds_ratio", "log_odds_chosen"):  # one value per process in TRL
                logged[prefix + name] = self.accelerator.gather_for_metrics(value.detach().float()).mean().item()
            else:
                logged[prefix + name] = gathered_mean(self.accelerator, value, pairs)
        if self._mean_logits:
            position_means = stats["position_mean_logits"]
            if not self.logits_last_position:
                position_means = position_means[:, :-1]
            for name, half in (("logits/chosen", position_means[:pairs]), ("logits/rejected", position_means[pairs:])):
                logged[prefix + name] = self.accelerator.gather_for_metrics(half.mean()).mean().item()
        if pair_loss.averaged and self._empty_completion(completion_mask):
            raise ValueError(f"{self.config_name}.max_length: a pair has a row with no completion token (its prompt "
                             f"fills max_length={self.max_length}, so truncation leaves an empty completion); the "
                             f"length-averaged log-probs of this loss are 0/0 there (TRL gives a NaN loss and NaN "
                             f"weights after the step). Increase max_length or filter out the long prompts")
        return loss, logged
