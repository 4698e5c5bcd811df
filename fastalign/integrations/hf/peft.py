"""PEFT: the output head's operands (a LoRA head's adapters as the low-rank term, :func:`_head`), the refusals of
what the fused head cannot score (:func:`head_adapters_refusal`, :func:`peft_refusal`), and the body run inside
what ``PeftModelForCausalLM.forward`` sets up (:func:`_peft_forward`)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from fastalign import _deprecate, _dtensor
from fastalign.integrations.hf.head_transforms import kept_head


def unwrap_peft(model):
    """The model under a PEFT wrapper (its ``get_base_model()``, adapters in place), else the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora_low_rank(head, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: Optional[torch.dtype]):
    r"""``(bias, low_rank)`` of a PEFT LoRA layer on the head, whose forward is
    ``h W^T + b + Σ_a s_a B_a(A_a(dropout_a(h)))``: the low-rank term ``(a, L)`` of
    :func:`fastalign.linear_logprobs` with ``a = [s_a A_a(dropout_a(h)), ...]`` and ``L = [B_a, ...]``
    (``Σ_a r_a`` columns; gradients reach A and B), and ``b + Σ_a s_a b_{B_a}``. The dropout draws
    are PEFT's own (its dropout modules, in its order, on an input of the same shape). Disabled
    adapters give the base head (:func:`_head` unmerges merged ones first, as PEFT's forward does);
    merged ones are in its weight already (PEFT's own rules). ``dtype``
    (``head_dtype``): ``A_a`` runs in it, outside any autocast."""
    if head.disable_adapters or head.merged:
        return bias, None
    downs, ups = [], []
    for name in head.active_adapters:
        if name not in head.lora_A.keys():
            continue
        lora_a, lora_b, scaling = head.lora_A[name], head.lora_B[name], head.scaling[name]
        x = head.lora_dropout[name](hidden.to(lora_a.weight.dtype))  # PEFT casts, then drops out
        if dtype is None:
            down = lora_a(x)
        else:
            with torch.autocast(hidden.device.type, enabled=False):
                down = torch.nn.functional.linear(x.to(dtype), lora_a.weight.to(dtype))
        downs.append((down * scaling).to(dtype or hidden.dtype))
        ups.append(lora_b.weight.to(dtype or weight.dtype))  # head_dtype: no rounding to the base head's first
        if lora_b.bias is not None:
            extra = (lora_b.bias * scaling).to(dtype or weight.dtype)
            bias = extra if bias is None else bias + extra
    if not downs:
        return bias, None
    return bias, (torch.cat(downs, dim=-1), torch.cat(ups, dim=1))


def _peft_tuner(head) -> Optional[str]:
    """The PEFT tuner of a head layer ("lora", "adalora", "ia3", ...), None for a plain module (or a
    ``modules_to_save`` copy)."""
    module = type(head).__module__
    return module.split(".")[2] if module.startswith("peft.tuners.") and module.count(".") >= 2 else None


def head_adapters_refusal(head) -> Optional[str]:
    """Why the fused head cannot score the output head ``head`` as its PEFT adapters set it up (None when it
    can): another tuner's active, unmerged adapters (LoHa, LoKr, IA3, OFT, VeRA, AdaLoRA, ...), or an active LoRA
    adapter that is not a plain LoRA on an ``nn.Linear`` (DoRA and other variants, ``fan_in_fan_out``)."""
    tuner = _peft_tuner(head)
    if tuner is None or getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return None
    if tuner != "lora":
        return (f"the output head carries PEFT {tuner} adapters ({type(head).__name__}), which the fused head cannot "
                "express (plain LoRA only); merge them (merge_adapter()) or leave the head out of target_modules")
    for name in getattr(head, "active_adapters", ()):
        if name in getattr(head, "lora_A", {}) and (name in getattr(head, "lora_variant", {}) or head.fan_in_fan_out):
            return (f"the output head's LoRA adapter {name!r} is not a plain LoRA on an nn.Linear (DoRA and other "
                    "variants, fan_in_fan_out), which the fused head cannot express")
    return None


def _head(model, hidden: Tensor, dtype: Optional[torch.dtype] = None
          ) -> tuple[Tensor, Optional[Tensor], Optional[tuple[Tensor, Tensor]]]:
    """``(weight, bias, low_rank)`` of the model's output head applied to ``hidden``: the head's own
    weight and bias (gathered if DTensors, in ``dtype`` or else ``hidden``'s as FSDP2's mixed precision casts
    them: :func:`fastalign._dtensor.head`) and, under a PEFT LoRA head, its adapters as the low-rank term
    of :func:`fastalign.linear_logprobs` (:func:`_lora_low_rank`; a ``modules_to_save`` head resolves
    to its active copy itself). A LoRA head merged while its adapters are disabled is unmerged first
    (``head.unmerge()``), as PEFT's own forward does, and its base weight used. Another PEFT tuner's
    active, unmerged adapters on the head (LoHa, LoKr, IA3, OFT, VeRA, AdaLoRA, ...) raise: the fused
    head cannot express them."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"model: {type(model).__name__}.get_output_embeddings() has no weight")
    refusal = head_adapters_refusal(head)
    if refusal is not None:
        raise ValueError(f"model: {refusal}")
    lora = _peft_tuner(head) == "lora" and hasattr(head, "lora_A") and hasattr(head, "get_base_layer")
    if lora and head.disable_adapters and head.merged:  # PEFT's forward rule: disabled adapters leave the weight
        head.unmerge()
    base = head.get_base_layer() if lora else head
    if base.weight.is_meta and any(hasattr(m, "_hf_hook") for m in (head, base)):
        raise ValueError("model: the output head's weight is offloaded (accelerate's cpu_offload / device_map: on "
                         "the meta device, loaded by a hook inside the head's forward, which the fused head does not "
                         "call); keep lm_head on a device, e.g. device_map={..., 'lm_head': <the last layer's "
                         "device>}")
    warn_skipped_hooks(head, base)
    _, weight, bias, _ = _dtensor.head(hidden, base.weight, getattr(base, "bias", None), dtype=dtype)
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"model: the output head weight has shape {tuple(weight.shape)}; a partitioned parameter "
            "(DeepSpeed ZeRO-3) must be gathered around the call, e.g. with "
            "deepspeed.zero.GatheredParameters([lm_head.weight, lm_head.bias])")
    low_rank = None
    if lora:
        bias, low_rank = _lora_low_rank(head, hidden, weight, bias, dtype)
    weight, bias = kept_head(getattr(model, "config", None), weight, bias)  # a padded head: the rows kept
    if low_rank is not None:
        low_rank = (low_rank[0], low_rank[1][:weight.shape[0]])
    return weight, bias, low_rank


#: The modules whose forward hooks on the output head leave its outputs as they are: parameter gathering (FSDP2;
#: DeepSpeed ZeRO-3, whose head is gathered around the call), PEFT's adapter set-up, accelerate's device placement,
#: TRL's activation offloading.
_OUTPUT_PRESERVING_HOOKS = ("torch.distributed.", "deepspeed.", "peft.", "accelerate.",
                            "trl.models.activation_offloading")


def _hook_source(hook) -> str:
    """The module (package path) that defines ``hook``: a function, a bound method, a ``functools.partial`` or a
    callable object."""
    fn = getattr(hook, "func", hook)
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__module__", None) or type(fn).__module__


def warn_skipped_hooks(*head_modules) -> None:
    """A ``UserWarning`` naming the forward hooks (and pre-hooks) on the output head (the module ``head_modules``
    name: a PEFT layer and its base layer) that the fused head does not run (it reads the head's weight, never
    calling the head's forward), so that a hook that changes the head's input or output is not skipped without a
    word; hooks from :data:`_OUTPUT_PRESERVING_HOOKS` are left out. Shown at the caller's line (past fastalign's
    and torch's frames)."""
    found = []
    for module in dict.fromkeys(head_modules):  # once each, in order
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            for hook in getattr(module, kind, {}).values():
                source = _hook_source(hook)
                if not source.startswith(_OUTPUT_PRESERVING_HOOKS):
                    found.append(f"{type(module).__name__}.{kind[1:-1]} {getattr(hook, '__qualname__', hook)!r} "
                                 f"({source})")
    if found:
        _deprecate.warn(f"model: hooks on the output head that fastalign does not run: {'; '.join(found)}. It scores "
                        "the body's last hidden states through the head's weight, without calling the head's "
                        "forward: a hook that changes the head's input or output is not applied", category=UserWarning)


#: PEFT tuners (``peft_type``) whose forward hooks the whole model (``get_base_model()``), not only its body:
#: X-LoRA computes its adapters' scalings in a pass of the whole model, ShadowPEFT seeds its shadow state from
#: the model's inputs. The body alone would run without them, so :func:`head_operands` refuses them.
_WHOLE_MODEL_TUNERS = ("XLORA", "SHADOW")


def peft_refusal(model) -> Optional[str]:
    """Why the fused head cannot score a PEFT ``model`` as its active adapter sets it up (None when it can): prompt
    learning (``PromptTuningConfig``, ``PrefixTuningConfig``, ...: its virtual tokens reach the body as
    ``inputs_embeds``), and the tuners set up by hooks on the whole model's forward (:data:`_WHOLE_MODEL_TUNERS`).
    The output head's own adapters: :func:`head_adapters_refusal`."""
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return None
    if getattr(config, "is_prompt_learning", False):
        return (f"PEFT prompt learning ({type(config).__name__}) adds virtual tokens that the body alone does not "
                "see; it is not supported (LoRA and merged adapters are)")
    if getattr(config, "peft_type", None) in _WHOLE_MODEL_TUNERS:
        return (f"PEFT {type(config).__name__} adapters are set up by hooks on the whole model's forward, which the "
                "body alone does not run (the base model, or a stale state, would be scored); it is not supported "
                "(LoRA, aLoRA, Poly and merged adapters are)")
    return None


@contextlib.contextmanager
def _peft_forward(model, input_ids: Tensor, model_kwargs: dict):
    """Runs the body in what ``PeftModelForCausalLM.forward`` sets up around its base model (LoRA and the other
    non-prompt-learning tuners), yielding the body's keyword arguments; a plain ``transformers`` model passes
    ``model_kwargs`` through unchanged. For a ``PeftModel``: aLoRA adapters (``alora_invocation_tokens``) act
    from their invocation sequence on, at ``alora_offsets`` found in ``input_ids`` by PEFT's own
    ``get_alora_offsets_for_forward`` (read on the host, as PEFT's forward does) unless given, injected into
    the LoRA layers by the model's ``_enable_peft_forward_hooks``; ``task_ids`` goes to a Poly tuner's layers
    (its ``_manage_pre_hooks``, as its forward does) and is dropped otherwise, as PEFT's forward drops it."""
    if not hasattr(model, "special_peft_forward_args"):  # not a PeftModel: a Poly tuner passed itself, or none
        manage = getattr(model, "_manage_pre_hooks", None)
        if manage is None:
            yield model_kwargs
            return
        kwargs = dict(model_kwargs)
        with manage(kwargs.pop("task_ids", None)):
            yield kwargs
        return
    kwargs = dict(model_kwargs)
    task_ids = kwargs.pop("task_ids", None)
    if getattr(model.active_peft_config, "alora_invocation_tokens", None):
        from peft.tuners.lora.variants import get_alora_offsets_for_forward

        kwargs = get_alora_offsets_for_forward(model, input_ids, None, **kwargs)
    manage = getattr(model.base_model, "_manage_pre_hooks", None)
    with model._enable_peft_forward_hooks(**kwargs), \
            (contextlib.nullcontext() if manage is None else manage(task_ids)):
        yield {k: v for k, v in kwargs.items() if k not in model.special_peft_forward_args}
