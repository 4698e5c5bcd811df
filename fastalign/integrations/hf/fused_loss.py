r"""The loss a ``transformers`` causal LM computes from its labels, from its last hidden states: no logits.

``model(input_ids, labels=labels).loss`` is ``transformers``' ``ForCausalLMLoss`` of the model's logits. The same
number comes from the body's last hidden states and the output head a block of rows at a time
(:func:`fastalign.linear_logprobs`), so the ``[batch, tokens, vocabulary]`` logits (and their fp32 copy and
gradient) are never built:

.. math:: \text{loss} = -\frac{1}{n} \sum_{t:\ y_{t+1} \ne \text{ignore\_index}} \log p(y_{t+1} \mid x_{\le t})

with ``y`` the labels (shifted inside, or ``shift_labels`` as given) and ``n`` the ``num_items_in_batch`` that
``transformers.Trainer`` passes (a count over the accumulated micro-batches), else the count of scored targets.
:func:`causal_lm_loss` computes it; :func:`install_fused_loss` makes a model's forward compute it in training, so
that ``transformers.Trainer`` (and any loop that reads ``model(**batch).loss``) trains without the logits.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.integrations.hf import (_aligned, head_operands, head_transform, head_transforms,
                                       load_balancing_loss_func, moe_setting, peft_refusal, router_aux_loss,
                                       unwrap_peft)
from fastalign.integrations.hf.packing import _flash_attention, _restarts, _text_config, _text_positions
from fastalign.linear import linear_logprobs


def causal_lm_loss(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                   labels: Optional[Tensor] = None, shift_labels: Optional[Tensor] = None,
                   num_items_in_batch: Optional[Union[int, Tensor]] = None, ignore_index: int = -100,
                   **model_kwargs) -> Tensor:
    r"""``model(input_ids, attention_mask, labels=labels).loss`` from the last hidden states, without the logits.

    The mean over the scored targets of ``-log p`` (module docstring): every position whose next label is not
    ``ignore_index`` is scored, as the model's own loss scores it (a padding position too, where the labels do not
    mark it), divided by ``num_items_in_batch`` when given (``transformers.Trainer``'s count over the gradient
    accumulation steps), else by the count of scored targets (none: NaN, as the model's own loss). The model's
    head transform (softcapping, logit scaling: :data:`~fastalign.integrations.hf.HEAD_TRANSFORMS`) and a PEFT
    LoRA head are applied as :func:`~fastalign.integrations.hf.causal_lm_logprobs` applies them. A MoE model with
    ``output_router_logits`` (the keyword or its config) adds ``router_aux_loss_coef`` times its load-balancing
    loss, as its forward does.

    Args:
        model: a ``transformers`` ``*ForCausalLM`` (or a PEFT model of one).
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``, passed to the body.
        labels: ``[B, T]``, aligned with ``input_ids`` (shifted inside); or
        shift_labels: ``[B, T]``, the token each position predicts (already shifted; taken over ``labels`` when
            both are given, as the model's own loss takes it: ``transformers.Trainer`` passes both under context
            parallelism).
        num_items_in_batch: the divisor (an int or a one-element tensor), None: the scored count.
        ignore_index: the label of an unscored position.
        **model_kwargs: passed to the body (``position_ids`` of packed rows, ...).

    Returns:
        The loss, fp32, 0-dim, differentiable with respect to the model's parameters.
    """
    return _loss_and_body(model, input_ids, attention_mask, labels, shift_labels, num_items_in_batch, ignore_index,
                          model_kwargs)[0]


def _loss_and_body(model, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
                   shift_labels: Optional[Tensor], num_items_in_batch, ignore_index: int, model_kwargs: dict):
    """``(loss, aux_loss, body_outputs)`` of :func:`causal_lm_loss`: ``aux_loss`` the MoE load-balancing loss
    (None without), ``body_outputs`` the body's (its ``hidden_states``, ``attentions``, ``router_logits``)."""
    if labels is None and shift_labels is None:
        raise ValueError("causal_lm_loss needs labels or shift_labels")
    if shift_labels is None:  # the model's own rule: shift_labels when given, else the labels shifted
        targets = torch.nn.functional.pad(_aligned("labels", labels, input_ids.shape)[:, 1:], (0, 1),
                                          value=ignore_index)
    else:
        targets = _aligned("shift_labels", shift_labels, input_ids.shape)
    config = getattr(model, "config", None)
    scale, softcap = head_transform(config)
    base = unwrap_peft(model)
    asked = model_kwargs.get("output_router_logits")  # None: the config's, as the model's forward reads it
    # the load-balancing term, where the model's forward adds one (its module has load_balancing_loss_func; not
    # GLM-4-MoE, dots1, HunYuan-MoE), with its coefficient (router_aux_loss_coef; JetMoE's aux_loss_coef)
    with_aux = bool(moe_setting(model, "output_router_logits", default=False) if asked is None else asked) and \
        load_balancing_loss_func(model) is not None
    coef = moe_setting(model, "router_aux_loss_coef", "aux_loss_coef")
    if with_aux and coef is None:
        raise ValueError(f"model: {type(base).__name__} adds a load-balancing loss with a coefficient fastalign does "
                         "not know (neither router_aux_loss_coef nor aux_loss_coef)")
    if with_aux:
        model_kwargs["output_router_logits"] = True
    body = {}
    hidden, weight, bias, low_rank = head_operands(model, input_ids, attention_mask,
                                                   on_body=lambda out: body.update(outputs=out), **model_kwargs)
    stats = linear_logprobs(hidden, weight, targets.to(input_ids.device), bias=bias, low_rank=low_rank,
                            logit_scale=scale, softcap=softcap, ignore_index=ignore_index)
    count = (targets != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    loss = -stats.logprobs.sum() / torch.as_tensor(count, device=hidden.device)
    aux = None
    if with_aux:
        aux = router_aux_loss(model, body["outputs"].router_logits, attention_mask)
        loss = loss + coef * aux.to(loss.device)
    return loss, aux, body["outputs"]


class _FusedForward:
    """A model's forward after :func:`install_fused_loss`: an object holding the model and the forward it wraps (the
    class's function, called with the model, or a callable the instance held), not a closure, so that a deep copy
    (a frozen reference model) or an unpickled model computes with its own weights. Its signature is the wrapped
    forward's (``transformers.Trainer`` reads it to pass ``num_items_in_batch``). ``evaluation``: also in eval mode."""

    def __init__(self, model, own, evaluation: bool = False):
        self.model = model
        self.own = own
        self.evaluation = evaluation
        self.warned = set()  # what has been warned of, once per model: "logits", "cache"
        self.__signature__ = inspect.signature(self._own_call())

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(f"install_fused_loss: {message} (warned once per model)", stacklevel=_caller_level())

    def _own_call(self):
        return functools.partial(self.own, self.model) if inspect.isfunction(self.own) else self.own

    def __call__(self, *args, **kwargs):
        own = self._own_call()
        try:
            call = self.__signature__.bind(*args, **kwargs).arguments
        except TypeError:
            return own(*args, **kwargs)
        params = self.__signature__.parameters
        extra = call.pop(next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), ""), {})
        call = {**call, **extra}
        labels, shift_labels = call.pop("labels", None), call.pop("shift_labels", None)
        base = unwrap_peft(self.model)
        declined = _declined(call, labels, base) if self.model.training or self.evaluation else \
            ("evaluation: logits for metrics", False)
        if declined is not None:
            reason, spared_logits_built = declined
            if spared_logits_built and self.model.training:  # evaluation=True: a call without labels is expected
                self._warn_once("logits", f"a training call of {type(base).__name__} ran its own forward, which "
                                f"builds the [batch, tokens, vocabulary] logits ({reason}); the fused loss saves "
                                "nothing on such calls")
            return own(*args, **kwargs)
        if _packed_with_a_cache(call, base):
            restart = "restart" if call["position_ids"].device.type == "cpu" else "may restart (not read on a GPU)"
            self._warn_once("cache", f"position_ids that {restart} without an attention_mask (packed rows), with a "
                            "KV cache on (use_cache=True, or its text config's): the own forward of "
                            f"{type(base).__name__} would build the cache and let each packed sequence attend to the "
                            "ones before it (transformers splits packed rows only without a cache), where the fused "
                            "loss keeps each sequence to itself. Pass use_cache=False, or set "
                            "model.config.get_text_config().use_cache = False, for both to agree "
                            "(transformers.Trainer sets model.config.use_cache, which a vision-language model's text "
                            "config does not follow)")
        from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

        # use_cache: no cache, which the loss does not need and the output does not carry
        for key in ("return_dict", "logits_to_keep", "use_cache", "past_key_values", "cache", "cache_position",
                    "inputs_embeds"):
            call.pop(key, None)
        ids, mask = call.pop("input_ids"), call.pop("attention_mask", None)
        items, ignore_index = call.pop("num_items_in_batch", None), call.pop("ignore_index", -100)
        loss, aux, body = _loss_and_body(self.model, ids, mask, labels, shift_labels, items, ignore_index, call)
        fields = dict(loss=loss, logits=None, hidden_states=getattr(body, "hidden_states", None),
                      attentions=getattr(body, "attentions", None))
        if not hasattr(body, "router_logits"):  # a dense body
            out = CausalLMOutputWithPast(**fields)
        else:  # as a MoE model's
            out = MoeCausalLMOutputWithPast(**fields, aux_loss=aux, router_logits=body.router_logits)
        for name, value in body.items():  # a vision-language body's own outputs (its image features)
            if name not in out and name not in ("last_hidden_state", "past_key_values", "cache"):
                out[name] = value
        return out


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning of :meth:`_FusedForward._warn_once` at the code that called the
    model: the first frame outside this module, ``torch.nn.Module``'s call machinery, torch's autocast wrapper and
    the wrappers of PEFT and accelerate (where imported)."""
    files = (__file__, torch.nn.modules.module.__file__)
    folders = tuple(os.path.dirname(module.__file__) + os.sep for module in
                    (torch.amp, sys.modules.get("peft"), sys.modules.get("accelerate")) if module is not None)
    frame, level = sys._getframe(2), 2  # _warn_once's caller, as stacklevel 2 names it
    while frame is not None and (frame.f_code.co_filename in files or frame.f_code.co_filename.startswith(folders)):
        frame, level = frame.f_back, level + 1
    return level


def _packed_with_a_cache(call: dict, base) -> bool:
    """Whether the model's own forward would build a KV cache on packed rows, and so let each packed sequence see
    the ones before it: ``position_ids`` without an ``attention_mask`` that restart within a row (read on the CPU;
    on a GPU, not read, taken as restarting; ``[4, B, T]`` ids by their first, the text positions), ``use_cache``
    on (given, else the decoder's config, the text config), and no gradient checkpointing with gradients on (which
    turns the cache off). Not under flash attention, which splits packed rows from the position ids, a cache or
    not."""
    ids = call.get("position_ids")
    if not isinstance(ids, Tensor) or call.get("attention_mask") is not None or _flash_attention(base) is not None:
        return False
    text = _text_positions(ids)  # None for [3, B, T] ids: no body splits their packed rows (they are refused)
    if text is None or (text.device.type == "cpu" and not bool(_restarts(text))):
        return False
    use_cache = call.get("use_cache")
    if not (getattr(_text_config(base), "use_cache", False) if use_cache is None else use_cache):
        return False
    checkpointing = getattr(base, "is_activation_checkpointing", None)  # transformers 5.x; before, the older name
    checkpointing = getattr(base, "is_gradient_checkpointing", False) if checkpointing is None else checkpointing
    return not (checkpointing and base.training and torch.is_grad_enabled())


def _declined(call: dict, labels: Optional[Tensor], base) -> Optional[tuple]:
    """``(why, spared_logits_built)`` when a training call is left to the model's own forward, else None (the fused
    loss). ``spared_logits_built`` is whether that forward builds the full logits that the fused loss would have
    spared (warned of); not so for a call that asks for the last positions' logits alone (``logits_to_keep``), one
    that carries a cache (generation) or a prefix (PEFT's prefix tuning: ``past_key_values``), or TRL's own
    trainers' calls with their own fused head (``fused_lm_head``)."""
    if "fused_lm_head" in call:
        return "TRL's fused_lm_head", False
    if call.get("past_key_values") is not None or call.get("cache") is not None:
        return "a cache or a prefix", False
    if call.get("logits_to_keep"):
        return "logits_to_keep", False
    if labels is None:  # shift_labels alone: no loss, as the model's own forward computes none then
        return ("no labels: the loss is computed outside the model, as transformers.Trainer's "
                "label_smoothing_factor and compute_loss_func and TRL's own trainers compute theirs"), True
    if call.get("input_ids") is None or call.get("inputs_embeds") is not None:
        return "inputs_embeds in place of input_ids", True
    if "_loss_function" in vars(base):
        return "a loss_function of the caller's, which reads the logits", True
    if call.get("return_dict", True) is False:
        return "return_dict=False", True
    return None


def _fused_in(forward) -> Optional[_FusedForward]:
    """The fused forward that ``forward`` is or wraps (along ``__wrapped__`` and ``__func__``), else None."""
    seen = set()
    while forward is not None and id(forward) not in seen:
        if isinstance(forward, _FusedForward):
            return forward
        seen.add(id(forward))
        forward = getattr(forward, "__wrapped__", None) or getattr(forward, "__func__", None)
    return None


#: the ``transformers`` auto classes of models with a language-model head (the causal LMs, the vision-language
#: models; encoder-decoder ones among them have no known head transform, which refuses them next)
_LM_MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES")
#: the class names of language models (remote code: Qwen-1's QWenLMHeadModel, ChatGLM's ...ForConditionalGeneration)
_LM_CLASS_ENDINGS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _check_causal_lm(model) -> None:
    """``ValueError`` unless the model (under PEFT) is a language model: its class, or one it derives from, is one
    of the ``transformers`` causal-LM or vision-language classes, or is named like one (``...ForCausalLM``,
    ``...LMHeadModel``, ``...ForConditionalGeneration``), or its ``model_type`` has a head transform stated by
    :func:`~fastalign.integrations.hf.register_head_transform` (the caller's word for a custom class). A model
    wrapped by ``torch.compile`` or ``DistributedDataParallel``, a bare body, a sequence or token classifier, or a
    model with a second head (GPT-2's double heads) is refused here, not at its first training step."""
    from transformers.models.auto import modeling_auto

    inner = model._modules.get("_orig_mod") or model._modules.get("module")  # torch.compile's, DDP's
    if inner is not None:
        raise ValueError(f"model: {type(model).__name__} wraps the model ({type(inner).__name__}): install_fused_loss "
                         "on the model itself, before wrapping it (DistributedDataParallel, torch.compile, ...)")
    names = set()
    for mapping in _LM_MAPPINGS:
        for value in getattr(modeling_auto, mapping, {}).values():
            names.update((value,) if isinstance(value, str) else value)
    base = unwrap_peft(model)
    if getattr(getattr(base, "config", None), "model_type", None) in head_transforms._STATED or \
            any(cls.__name__ in names or cls.__name__.endswith(_LM_CLASS_ENDINGS) for cls in type(base).__mro__):
        return
    raise ValueError(f"model: {type(base).__name__} is not a causal LM (a transformers ...ForCausalLM or "
                     "image-text-to-text class): install_fused_loss replaces the loss of next-token prediction (a "
                     "causal LM of your own: state its head transform with register_head_transform)")


def install_fused_loss(model, *, evaluation: bool = False):
    """Make ``model(..., labels=labels)`` in training mode return :func:`causal_lm_loss` as its ``loss``, its
    ``logits`` None (never built): ``transformers.Trainer`` and any loop that reads ``model(**batch).loss`` then
    train without the ``[B, T, V]`` logits, with the same loss and gradients. Returns ``model``.

    ``evaluation=True`` fuses the calls with labels in eval mode too (``model.eval()``), for evaluation that reads
    the loss alone: ``Trainer``'s ``eval_loss`` with ``prediction_loss_only=True`` (or without a
    ``compute_metrics``), a perplexity loop. There are no logits for metrics then: ``Trainer`` hands a
    ``compute_metrics`` (and ``preprocess_logits_for_metrics``, ``predict()``) an empty tuple of predictions.

    The output's ``hidden_states`` and ``attentions`` are the body's, as the model's own output has them when asked
    for, and a MoE model's is a ``MoeCausalLMOutputWithPast``, with its ``aux_loss`` and ``router_logits`` under
    ``output_router_logits``; a vision-language body's own outputs (its image features) are kept. Every other call
    runs the model's own forward: evaluation (``model.eval()``: the logits are there for metrics, unless
    ``evaluation=True``), generation, a call without labels, or one with ``inputs_embeds``, ``past_key_values`` (a
    cache, PEFT's prefix), ``logits_to_keep`` or ``return_dict=False``, a model given a ``loss_function`` of the
    caller's, and TRL's own trainers' ``fused_lm_head`` calls (TRL's trainers fuse their own head: under them the
    install changes nothing).
    The first training call that builds the full logits so (without labels, as under ``Trainer``'s label smoothing
    or a ``compute_loss_func``; with ``inputs_embeds``, a ``loss_function`` of the caller's or
    ``return_dict=False``) warns, once per model, that the install saves nothing there. Packed rows
    (``position_ids`` restarting, no ``attention_mask``) are each sequence alone, computed without a KV cache:
    with ``use_cache`` on (given, or the text config's), where the model's own forward would build one and let each
    sequence attend to the ones before it, the first call warns. A vision-language MoE reads its load-balancing
    settings from its text config, as its forward does.
    Raising here, not at the first step: a model that is not a causal LM (a classifier, a bare body, GPT-2's double
    heads, a model wrapped by ``torch.compile`` or DDP), PEFT prompt learning, a forward already wrapped by
    accelerate's mixed precision (install before ``accelerator.prepare`` or ``Trainer.train()``, so that its
    autocast wraps the fused loss), and an architecture outside :data:`~fastalign.integrations.hf.HEAD_TRANSFORMS`
    (register it with :func:`~fastalign.integrations.hf.register_head_transform`). A deep copy or an unpickled
    copy of the model computes with its own weights. The TRL drop-in trainers fuse their own losses and do not
    need it. :func:`remove_fused_loss` undoes it."""
    evaluation = _validate.boolean("evaluation", evaluation)
    if _fused_in(vars(model).get("forward")) is not None:
        raise ValueError("model: install_fused_loss was already applied to this model (remove_fused_loss(model) "
                         "first to install it with other options)")
    if "_original_forward" in vars(model):
        raise ValueError("model: its forward is accelerate's mixed-precision wrapper (accelerator.prepare, or a "
                         "Trainer with bf16/fp16 that has trained), whose autocast would not reach the fused loss: "
                         "install_fused_loss before accelerator.prepare or Trainer.train()")
    _check_causal_lm(model)
    head_transform(getattr(model, "config", None))
    refusal = peft_refusal(model)  # PEFT prompt learning and the tuners set up around the whole model
    if refusal is not None:
        raise ValueError(f"model: {refusal}")
    own = vars(model).get("forward", type(model).forward)  # the instance's own forward, else the class's function
    model.forward = _FusedForward(model, own, evaluation)
    return model


def remove_fused_loss(model):
    """Undo :func:`install_fused_loss`: the model's forward is its own again. Returns ``model``."""
    fused = vars(model).get("forward")
    if not isinstance(fused, _FusedForward):
        if _fused_in(fused) is not None:
            raise ValueError("model: its fused forward is wrapped by another (accelerate's mixed-precision wrapper, "
                             "after accelerator.prepare or a Trainer with bf16/fp16): unwrap it first, with "
                             "accelerator.unwrap_model(model, keep_fp32_wrapper=False)")
        raise ValueError("model: install_fused_loss was not applied to this model")
    if fused.own is type(model).forward:
        del model.forward  # the class's forward again
    else:
        model.forward = fused.own
    return model
