"""The fused LM head the TRL drop-in trainers call: a model forward that returns per-token
statistics from the last hidden states through :func:`fastalign.integrations.hf.causal_lm_logprobs`,
and the losses that go through the head itself (the checks at construction: :mod:`._checks`; the live profile
loss: :mod:`._live_loss`; the logged metrics: :mod:`._metrics`; CPO's and ORPO's concatenated pairs:
:mod:`._pairs`).

:func:`install_head` wraps ``model.forward`` so that ``model(input_ids=..., attention_mask=...,
labels=labels, **head_call(trainer, fields))`` returns :class:`HeadOutputs` instead of running the
previous forward, at that trainer's temperature and head dtype. Going through ``model(...)`` keeps every
wrapper's forward in the path (DDP, FSDP, PEFT); any other call (generation included) reaches the previous
forward unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import types
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastalign import _validate
from fastalign._options import check_choice
from fastalign.integrations._label_logit import label_logits
from fastalign.integrations.hf import causal_lm_logprobs, head_operands, head_transform, router_aux_loss, unwrap_peft
from fastalign.integrations.trl._vision import body_inputs, row_chunks, vision_inputs
from fastalign.linear_divergence import linear_divergence_loss
from fastalign.linear_mean import linear_mean_logits
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
    scores ``labels[:, t+1]`` (``-100``: unscored; ``[B, T]`` of ``shift_labels[:, t]`` with the pre-shifted
    ``shift_labels=`` instead): ``log_probs = z_{y} - logsumexp(z)`` and
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
    if labels is None and model_kwargs.get("shift_labels") is None:
        raise ValueError("fastalign_head: the statistics score labels; pass labels= (or shift_labels=)")
    stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, temperature=temperature,
                               entropy="entropy" in fields, head_dtype=head_dtype, **model_kwargs)
    return HeadOutputs(log_probs=stats.logprobs, entropy=stats.entropy, aux_loss=aux[0] if aux else None)


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


def predicting_head(trainer, model, input_ids: Tensor, attention_mask: Tensor, **model_inputs) -> tuple:
    """``(hidden [B, T-1, H'], weight, bias, logit_scale, softcap)``: ``model``'s head at the positions that predict a
    next token (:func:`predicting_operands` of its body run through the fused head, with ``model_inputs``: a
    vision-language model's images) and its head transform."""
    operands = model(input_ids=input_ids, attention_mask=attention_mask, **model_inputs,
                     **head_call(trainer, ("operands",))).operands
    return predicting_operands(operands) + head_transform(base_model(trainer, model).config)


def head_pair(student: tuple, teacher: tuple) -> dict:
    """Two :func:`predicting_head` tuples as the keywords of a student-teacher loss (``hidden``, ``weight``,
    ``teacher_hidden``, ``teacher_weight``, ``bias``, ``teacher_bias`` and each side's ``logit_scale`` and
    ``softcap``), the teacher's tensors moved to the student's device."""
    hidden, weight, bias, scale, softcap = student
    t_hidden, t_weight, t_bias, t_scale, t_softcap = teacher
    device = hidden.device
    return dict(hidden=hidden, weight=weight, teacher_hidden=t_hidden.to(device), teacher_weight=t_weight.to(device),
                bias=bias, teacher_bias=None if t_bias is None else t_bias.to(device), logit_scale=scale,
                softcap=softcap, teacher_logit_scale=t_scale, teacher_softcap=t_softcap)


def head_divergence(student: tuple, teacher: tuple, **options):
    """:func:`fastalign.linear_divergence_loss` of two :func:`predicting_head` tuples (:func:`head_pair`);
    ``options``: the loss's own (``beta``, ``temperature``, ``response_mask``, ...)."""
    return linear_divergence_loss(**head_pair(student, teacher), **options)


def trl_global_tokens(num_items_in_batch, device) -> Optional[Tensor]:
    """TRL's ``num_items_in_batch`` (None, a number or a one-element tensor) as the ``global_tokens`` of
    :func:`fastalign.linear_divergence_loss`: a 0-dim fp32 tensor on ``device`` (a count of 0 divides as 1, as
    TRL's clamped count), checked under its own name, the one the trainer's user passed: a ``TypeError`` /
    ``ValueError`` naming ``num_items_in_batch``, a negative, NaN or infinite count raising when it is read on
    the host (:func:`fastalign._validate.count`)."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, Tensor):
        _validate.count("num_items_in_batch", num_items_in_batch)
    elif not _validate.finite_number("num_items_in_batch", num_items_in_batch) >= 0:  # 0 is TRL's, divided as 1
        raise ValueError(f"num_items_in_batch must be >= 0 and finite, got {num_items_in_batch}")
    count = torch.as_tensor(num_items_in_batch, device=device).float().reshape(())
    _validate.count("num_items_in_batch", count)  # a count past fp32's range is inf now
    return count


def teacher_divergence(trainer, model, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                       num_items_in_batch=None, model_inputs: Optional[dict] = None, **options) -> Tensor:
    """:func:`fastalign.linear_divergence_loss` of ``model`` against ``trainer.teacher_model`` (under ``no_grad``,
    in eval mode) on the same tokens, from both bodies' hidden states at the positions that predict a next token
    (:func:`predicting_head`); ``response_mask [B, T-1]`` the scored positions, divided by ``num_items_in_batch``
    when given (else their count, at least 1); ``model_inputs``: the other inputs both bodies take (a
    vision-language model's images). ``options``: the divergence's (``beta``, ``temperature``)."""
    model_inputs = model_inputs or {}
    student = predicting_head(trainer, model, input_ids, attention_mask, **model_inputs)
    trainer.teacher_model.eval()
    with torch.no_grad():
        teacher = predicting_head(trainer, trainer.teacher_model, input_ids, attention_mask, **model_inputs)
    return head_divergence(student, teacher, response_mask=response_mask,
                           global_tokens=trl_global_tokens(num_items_in_batch, student[0].device), **options)[0]


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
    return unwrap_peft(model)


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
    trainer's batch (``ids = prompt + completion``, with its ``vision`` inputs: :func:`._vision.batch_vision`),
    through the model's head from its hidden states
    (:func:`fastalign.linear_policy.policy_step`: one pass over blocks of whole completions when gradients
    are needed), padding unscored as in :func:`fused_logps_and_entropies`; ``old=None``: the policy's own
    log-probs, detached; the temperature is ``trainer.temperature``. ``loss`` must be separable over
    completions; ``token_separable``: over tokens too (blocks of any tokens, so long completions take the
    pass as well; :attr:`fastalign.PolicyConfig.token_separable`); ``aux``: the MoE body's load-balancing
    loss when the trainer adds one (:func:`policy_operands`), else None. Without gradients (evaluation) the
    log-probs are still those of the pass with gradients (:func:`fastalign.linear_policy.policy_logprobs`), as
    the old policy's of :func:`fused_logps_and_entropies`."""
    with trainer.accelerator.autocast():
        out = policy_operands(trainer, model, input_ids=ids, attention_mask=attention, **body_inputs(vision))
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
                        mean_logit: bool = False, extras: Sequence[str] = (), separable: bool = True,
                        position_means: Optional[str] = None):
    """``(loss, metrics, stats)`` of ``loss(lp [N, T-1], aux)`` (``aux``: ``sum_p2`` or, differentiable, the
    ``mean_logit`` when asked, else None) over the rows whose head ``operands`` (of
    ``model(..., **head_call(trainer, ("operands",)))``) are given, through the head itself
    (:func:`fastalign.linear_step.separable_step`: one pass over blocks of whole ``items``, one of
    :data:`fastalign.linear_step.ITEMS`, when gradients are needed and ``separable``), never the logits.
    ``targets [N, T-1]``: the next token at each position, ``-100`` where unscored; ``config``: the
    model's (its head transform). ``stats`` as :func:`~fastalign.linear_step.separable_step`'s, ``[N, T-1]``, plus
    ``"position_mean_logits" [N, T]`` with ``position_means``: at ``"every"`` position or where it is needed, the
    ``"scored"`` ones (0 elsewhere). A linear head's come from one ``H``-vector (:func:`fastalign.linear_mean_logits`);
    a softcapped head's from the loss's own pass (``"scored"``) or a vocabulary pass without gradients."""
    hidden, weight, bias, low_rank = operands
    scale, softcap = head_transform(config)
    if position_means is not None:
        check_choice("position_means", position_means, ("every", "scored"))
    in_pass = position_means == "scored" and softcap is not None  # the logits the loss's pass reads anyway
    value, metrics, stats = separable_step(
        hidden[:, :-1], weight, targets, loss, bias=bias, items=items, sum_p2=sum_p2, mean_logit=mean_logit,
        extras=(*extras, "mean_logit") if in_pass else extras,
        low_rank=None if low_rank is None else (low_rank[0][:, :-1], low_rank[1]),
        single_pass="auto" if separable else False, logit=dict(logit_scale=scale, softcap=softcap))
    if in_pass:
        stats["position_mean_logits"] = torch.nn.functional.pad(stats.pop("mean_logit"), (0, 1))
    elif position_means is not None:
        scored = None if position_means == "every" else torch.nn.functional.pad(targets != -100, (0, 1))
        with torch.no_grad():  # a metric: no graph
            stats["position_mean_logits"] = linear_mean_logits(hidden, weight, bias=bias, low_rank=low_rank,
                                                               logit_scale=scale, softcap=softcap,
                                                               response_mask=scored)
    return value, metrics, stats


def label_logit(operands, targets: Tensor, scale: float, softcap: Optional[float] = None, *,
                minus_mean: bool = False) -> Tensor:
    r"""The label's logit ``z_y`` at each position ``[B, T-1]`` (fp32, differentiable; 0 where ``targets`` is -100)
    of a head from its operands and the next tokens ``targets``
    (:func:`~fastalign.integrations._label_logit.label_logits`: one head row per position); ``minus_mean`` (a
    linear head only): ``z_y - (1/V) Σ_j z_j``, with no vocabulary pass. With ``lp = z_y - lse`` the
    label-smoothing term ``-(1/V) Σ_j log p_j = lse - mean_j z_j`` is that margin ``- lp`` (a softcapped head's
    mean logit comes from the loss's own pass: ``mean_logit`` of :func:`fastalign.linear_step.separable_step`)."""
    hidden, weight, bias, low_rank = operands
    z_y = label_logits(hidden[:, :-1], weight, targets.clamp(min=0), bias=bias,
                       low_rank=None if low_rank is None else (low_rank[0][:, :-1], low_rank[1]), logit_scale=scale,
                       softcap=softcap, minus_mean=minus_mean)
    return torch.where(targets != -100, z_y, 0.0)


def install_head(model) -> None:
    """Wrap ``model.forward``: with ``fastalign_head=fields`` (a tuple of :data:`FIELDS`) it returns
    :func:`head_outputs` of ``labels``, with ``fastalign_options`` (``temperature``, ``head_dtype``: the
    calling trainer's, :func:`head_call`) as its keywords; without, the previous forward runs as before.
    It goes on the ``PreTrainedModel`` (the base model under PEFT), after TRL's own fused head; once per
    model, and holds no trainer's options, so every trainer sharing the model scores with its own; again when
    ``model.forward`` is not (or no longer: a pickled or ``torch.save``-loaded model) this wrapper.

    Mixed precision: the head path runs the body (and the head) under the autocast that the replaced forward's
    wrappers enter (:func:`_forward_autocasts`): a model that accelerate prepared with ``bf16`` / ``fp16`` before
    the head was installed (TRL's reference and teacher models) runs under that autocast, as TRL's call of its
    forward does; a model prepared afterwards (the policy, at ``train()``) gets accelerate's wrapper around this
    one; without such a wrapper the head path runs in whatever autocast its caller entered (none: the model's
    own dtype).

    The wrapper calls the forwards it wraps as methods of the model, which ``copy.deepcopy`` binds to the copy;
    a call without a fused head skips TRL's wrappers under it, which hold the original model's forward in
    their closure and pass such a call on unchanged. So a deep copy computes with its own weights. What
    remains TRL's: a copy taken while a TRL head is the outermost wrapper (TRL's trainer built on the model
    after this head) runs the original's weights, until a fastalign trainer patches the copy."""
    model = unwrap_peft(model)
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
        with contextlib.ExitStack() as contexts:
            for autocast in _forward_autocasts(self, self._fastalign_forwards[0]):  # as the replaced forward ran
                contexts.enter_context(copy.copy(autocast))  # a fresh context: the body may enter the original
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


def _closure_cell(func, wrapper: str, cell: str, package: str):
    """The value of the closure variable ``cell`` of ``func`` when ``func`` is the function named ``wrapper``
    defined in ``package`` (a library's wrapper that holds what it wraps in its closure); None otherwise."""
    code = getattr(func, "__code__", None)
    if (code is None or code.co_name != wrapper or cell not in code.co_freevars
            or not func.__globals__.get("__name__", "").startswith(package + ".")):
        return None
    return func.__closure__[code.co_freevars.index(cell)].cell_contents


def _trl_inner(func, model):
    """The forward that TRL's ``add_fused_lm_head`` wrapper function ``func`` wraps (held in its closure), when it
    is bound to ``model``; None for any other function."""
    inner = _closure_cell(func, "_fused_forward", "original_forward", "trl")
    return inner if getattr(inner, "__self__", None) is model else None


def _plain_forward(model, forward):
    """The forward of ``model`` that a call without any fused head reaches from ``forward``: past this head's
    wrappers and TRL's ``add_fused_lm_head`` ones (whose closure holds the forward they wrap) bound to ``model``."""
    while getattr(forward, "__self__", None) is model:
        func = forward.__func__
        if _is_head(func):
            return model._fastalign_forwards[1]
        inner = _trl_inner(func, model)
        if inner is None:
            break
        forward = inner
    return forward


def _autocast_of(func) -> Optional[torch.autocast]:
    """The ``torch.autocast`` that ``func`` enters around the function it wraps, when it is the wrapper of
    ``torch.autocast(...)(f)`` (how accelerate's mixed precision wraps a prepared model's forward); else None."""
    instance = _closure_cell(func, "decorate_autocast", "autocast_instance", "torch")
    return instance if isinstance(instance, torch.autocast) else None


def _forward_autocasts(model, forward) -> list:
    """The ``torch.autocast`` contexts, outermost first, that the wrappers of ``model``'s class forward in
    ``forward`` (the forward :func:`install_head` replaced) enter before it runs: the autocast of
    accelerate's mixed precision when the model was prepared (``Accelerator.prepare_model``) before the head was
    installed, under accelerate's output cast and TRL's ``add_fused_lm_head`` wrappers. The walk follows each
    wrapper's ``__wrapped__`` (and a TRL head's closure) down to the class forward."""
    contexts, seen, last = [], [], getattr(type(model), "forward", None)
    while forward is not None and forward is not last and not any(forward is f for f in seen):
        seen.append(forward)
        if getattr(forward, "__self__", None) is model:  # a bound wrapper
            forward = forward.__func__
            continue
        if _is_head(forward):  # a head under these wrappers: what it runs is not this model's class forward
            break
        autocast = _autocast_of(forward)
        if autocast is not None:
            contexts.append(autocast)
        forward = _trl_inner(forward, model) or getattr(forward, "__wrapped__", None)
    return contexts


def head_call(trainer, fields: Sequence[str]) -> dict:
    """The keywords of a model call through the fused head for ``fields``, at the trainer's own head options
    (:func:`install_heads`: its ``temperature`` and ``head_dtype``; none for trainers without)."""
    return {"fastalign_head": tuple(fields), "fastalign_options": getattr(trainer, "fastalign_head_options", {})}


def head_temperature(trainer) -> float:
    """The temperature the trainer's head scores at: the one it was built with (:func:`install_heads`), as TRL's
    fused head keeps the temperature it was added with (a later ``trainer.temperature`` reaches generation only)."""
    return getattr(trainer, "fastalign_head_options", {}).get("temperature", 1.0)


def install_heads(trainer, **options) -> None:
    """:func:`install_head` on the trainer's model and its reference model (when it has one); ``options``
    (``temperature``, ``head_dtype``) are the trainer's own, passed with each of its calls (:func:`head_call`)."""
    trainer.fastalign_head_options = dict(options)
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            install_head(trainer.accelerator.unwrap_model(model))


def fused_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                              compute_entropy=False, compute_aux_loss=False, **vision):
    r"""TRL's ``_get_per_token_logps_and_entropies`` (GRPO and RLOO trainers) through the fused head:
    ``(log p(y_t | y_{<t}), H_t, aux)`` of the last ``logits_to_keep`` tokens, ``[B, logits_to_keep]``,
    from the hidden states (``H_t = -Σ_j p_j log p_j`` at temperature ``self.temperature``);
    padding (``attention_mask == 0``) gives 0; ``aux``: with ``compute_aux_loss`` the MoE body's
    load-balancing loss, the mean over the chunks as TRL's, else None. Chunked by ``batch_size`` rows like
    TRL, each chunk with the images of its rows (``vision``: the vision inputs of :mod:`._vision`).

    Without gradients, for a trainer whose loss goes through the head itself (its ``_policy_pass()``: the
    ``token_separable`` of its :func:`head_policy_loss`, None when its loss takes these log-probs instead), the
    statistics are those of that loss's pass (:func:`fastalign.linear_policy.policy_logprobs`), bit for bit: the
    old policy's log-probs of an on-policy step give a ratio of exactly 1 (and an unchanged reference a KL of 0,
    up to the rounding of a matrix product over other scored rows), as TRL's, which computes both with one
    function."""
    vision = vision_inputs(vision)
    policy_pass = getattr(self, "_policy_pass", None)
    token_separable = policy_pass() if policy_pass is not None and not torch.is_grad_enabled() else None
    fields = ("log_probs", "entropy") if compute_entropy else ("log_probs",)
    if token_separable is not None:  # the head's operands, for the loss's own pass
        fields = ("operands",)
    router = {"output_router_logits": True} if compute_aux_loss else {}
    batch_size = batch_size or input_ids.size(0)
    logps, entropies, aux = [], [], []
    chunks = row_chunks(vision, input_ids.size(0), batch_size)  # each chunk's rows' images
    for start, images in zip(range(0, input_ids.size(0), batch_size), chunks):
        ids, att = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        labels = ids.masked_fill(att == 0, -100)
        labels[:, :-logits_to_keep] = -100
        with self.accelerator.autocast():
            out = model(input_ids=ids, attention_mask=att, labels=labels, **head_call(self, fields), **router,
                        **images)
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
