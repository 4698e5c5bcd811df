r"""Per-token log-probs of a Hugging Face ``transformers`` causal LM, without its logits.

:func:`causal_lm_logprobs` runs the model's body (the decoder stack and its final norm),
takes the last hidden states and sends them through :func:`fastalign.linear_logprobs`
with the model's own output head, so the ``[batch, tokens, vocabulary]`` logits are
never built. ``transformers`` is imported lazily; this module imports without it.

The head transform each supported architecture applies between the last hidden state
``h`` and its logits, as ``(logit_scale, softcap)`` of :func:`fastalign.linear_logprobs`
(``z = softcap * tanh(logit_scale * (h @ W.T + b) / softcap)``):

=============================================================  ===========================================
``config.model_type``                                           head transform
=============================================================  ===========================================
llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe,   none (``logits = lm_head(h)``)
qwen3_next, qwen3_5_text, qwen3_5_moe_text, phi3, gemma,
olmo2, starcoder2, deepseek_v2, deepseek_v3, deepseek_v32,
glm4_moe, llama4_text, ernie4_5 and the others listed
gemma2, gemma3_text, gemma3n_text, gemma4_text, vaultgemma,    ``softcap = final_logit_softcapping``
gemma4_unified_text, nanochat
recurrent_gemma                                                 ``softcap = logits_soft_cap``
cohere, cohere2, cohere2_moe                                    ``logit_scale = config.logit_scale``
granite, granitemoe, granitemoeshared, granitemoehybrid,       ``logit_scale = 1 / logits_scaling``
granite_swa, granitemoe_swa, minicpm3
hyperclovax                                                     ``logit_scale = logits_scaling``
falcon_h1                                                       ``logit_scale = lm_head_multiplier``
inkling_text (its logits: the head's first                      ``logit_scale = 1 / logits_mup_width_multiplier``
``unpadded_vocab_size`` rows, :func:`head_rows`)
inkling2_text, inkling2_loop_text                               ``softcap = final_logit_softcapping``
gemma3 (its forward ignores the softcap), qwen2_vl,             none (vision-language models)
qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe,
mistral3, llava, llava_next, llava_onevision, idefics3,
smolvlm, internvl, glm4v, glm4v_moe, glm46v, cohere2_vision,
lfm2_vl, vipllava, llava_next_video, video_llava, idefics2,
aria, mllama, ovis2, deepseek_vl, llava_onevision1_5,
lighton_ocr, fuyu, got_ocr2, glm_ocr, paddleocr_vl, kimi_k25
gemma3n, gemma4, gemma4_unified, paligemma (vision-language)    ``softcap = text_config.final_logit_softcapping``
aya_vision (vision-language)                                    ``logit_scale = text_config.logit_scale``
granite_docling (vision-language)                               ``logit_scale = 1 / text_config.logits_scaling``
=============================================================  ===========================================

Any other architecture raises unless the caller states its head transform with
``logit_scale=`` and ``softcap=`` (a wrong transform would be a silently wrong number).

The package's modules: :mod:`~fastalign.integrations.hf.head_transforms` (the table above and
:func:`register_head_transform`), :mod:`~fastalign.integrations.hf.packing` (packed rows),
:mod:`~fastalign.integrations.hf.peft` (PEFT adapters), :mod:`~fastalign.integrations.hf.targets` (the scored
targets), :mod:`~fastalign.integrations.hf.distributed` (DDP, FSDP2) and :mod:`~fastalign.integrations.hf.fused_loss`
(the model's own loss without its logits, for ``transformers.Trainer``); their public names are imported here.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.integrations.hf.distributed import _forward_route, _inside_forward
from fastalign.integrations.hf.head_transforms import (  # noqa: F401
    HEAD_ROWS, HEAD_TRANSFORMS, _LISTED, _stated_transform, head_rows, head_transform, kept_head, known_head_transform,
    register_head_transform)
from fastalign.integrations.hf.packing import (
    _FLASH_VARLEN_KWARGS, _body, _flash_attention, _flash_varlen_keywords, _packed_rows_flag, packed_rows_refusal)
from fastalign.integrations.hf.peft import (  # noqa: F401
    _head, _peft_forward, head_adapters_refusal, peft_refusal, unwrap_peft)
from fastalign.integrations.hf.targets import next_token_targets, packed_position_ids, shifted_targets
from fastalign.linear import linear_logprobs
from fastalign.logprobs import TokenStats

_UNSET = object()


def load_balancing_loss_func(model):
    """The ``load_balancing_loss_func`` of the model's modeling module (a MoE model whose forward adds that loss with
    ``output_router_logits``), or None (a dense model; a MoE model whose forward adds none: GLM-4-MoE, dots1)."""
    import sys

    base = unwrap_peft(model)
    return getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)


def moe_setting(model, *names, default=None):
    """A MoE setting as the model's forward reads it: the first of ``names`` held by the model (Mixtral's
    ``num_experts``, ``router_aux_loss_coef``), else by its config, else by its text config (a vision-language
    MoE such as Qwen3-VL-MoE reads ``text_config.router_aux_loss_coef``); ``default`` where none holds one (None
    counts as none)."""
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    for holder in (base, config, text_config):
        for name in names:
            if getattr(holder, name, None) is not None:
                return getattr(holder, name)
    return default


def router_aux_loss(model, router_logits, attention_mask: Optional[Tensor] = None) -> Tensor:
    """The MoE load-balancing loss the model's own forward adds with ``output_router_logits=True``: its modeling
    module's ``load_balancing_loss_func`` of the body's ``router_logits``, the number of experts and
    ``num_experts_per_tok`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE; of the text config in a
    vision-language MoE, Qwen3-VL-MoE), differentiable."""
    loss_fn = load_balancing_loss_func(model)
    experts = moe_setting(model, "num_experts", "num_local_experts")
    per_token = moe_setting(model, "num_experts_per_tok")
    if loss_fn is None or experts is None or per_token is None:
        raise ValueError(f"model: {type(unwrap_peft(model)).__name__} has no MoE load-balancing loss "
                         "(load_balancing_loss_func with num_experts and num_experts_per_tok)")
    if router_logits is None:
        raise ValueError("model: the body returned no router logits; pass output_router_logits=True")
    return loss_fn(router_logits, experts, per_token, attention_mask)


def _check_plain_head(model) -> None:
    """For an architecture outside the listed ones (its transform stated by the caller): the output head must be the
    model's own child, applied to the body's last hidden states, and no other child may hold parameters. BERT's and
    RoBERTa's LM heads run a dense layer, an activation and a norm before the linear layer that
    ``get_output_embeddings()`` returns (ELECTRA's generator a module of its own): scored through that layer alone,
    their log-probs would be silently wrong, so they raise."""
    base = unwrap_peft(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type in _LISTED or not hasattr(base, "get_output_embeddings"):
        return
    head, body = base.get_output_embeddings(), _body(model)
    children = dict(base.named_children())
    others = [name for name, child in children.items()
              if child is not head and child is not body and next(child.parameters(), None) is not None]
    if any(child is head for child in children.values()) and not others:
        return
    head_name = next((name for name, module in base.named_modules() if module is head), "?")
    raise ValueError(f"model: {type(base).__name__} (model_type {model_type!r}) holds {others} beside its body and "
                     f"its output head {head_name!r}, which its forward may apply to the last hidden states before "
                     "that head (as BERT's and RoBERTa's LM heads do); fastalign scores the body's last hidden "
                     "states through the output head alone, so it cannot score this architecture")


#: Listed ``model_type``\ s whose forward casts the last hidden states to the output head's dtype,
#: ``lm_head(h.to(lm_head.weight.dtype))``: Mamba's residual stream kept in fp32, HY-V4's head kept in fp32.
_HIDDEN_TO_HEAD_DTYPE = frozenset({"mamba", "mamba2", "falcon_mamba", "hy_v4"})


def autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs an ``nn.Linear`` in on ``t``'s device type, or None outside autocast."""
    device_type = t.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def head_operands(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                  head_dtype: Optional[torch.dtype] = None, on_body=None, **model_kwargs):
    """``(hidden [B, T, H], weight, bias, low_rank)``: the model's body run on ``input_ids`` (no KV cache)
    and its output head's operands at every position (:func:`_head`), all in the autocast dtype under
    ``torch.autocast`` (as the model's ``nn.Linear`` would run), or all in ``head_dtype`` when given
    (a head kept in fp32 whatever the body's dtype: TRL's ``cast_lm_head_to_fp32``), or, for an FSDP2 head
    sharded apart from the body (its own ``fully_shard``, not gathered here), in the body's dtype: FSDP2's
    mixed precision casts the head it gathers to its ``param_dtype``, which the body's outputs have;
    ``hidden @ weight.T + a @ L.T + bias`` are the head's logits before its transform
    (:data:`HEAD_TRANSFORMS`). Outside autocast, the architectures whose forward casts the hidden states to the
    head's dtype (Mamba, HY-V4) are cast so; other dtypes that differ raise ``TypeError``. ``on_body`` is called
    with the body's outputs (e.g. a MoE body's ``router_logits`` for :func:`router_aux_loss`). Called inside the
    model's forward when it is a ``DistributedDataParallel`` wrapper or a sharded FSDP2 root
    (:func:`causal_lm_logprobs` does so)."""
    if _forward_route(model) is not None:
        raise ValueError(f"model: a {type(model).__name__} runs its hooks (DDP's gradient all-reduce, FSDP2's "
                         "gathering of the root's parameters) in its own forward, which head_operands does not run; "
                         "call it inside that forward, or score with causal_lm_logprobs(model, ...), which does")
    refusal = peft_refusal(model)
    if refusal is not None:
        raise ValueError(f"model: {refusal}")
    if "adapter_names" in model_kwargs:
        raise ValueError("adapter_names (one PEFT adapter per row) is not supported: set the active adapter "
                         "(model.set_adapter) and score each adapter's rows in their own call")
    if head_dtype is not None and head_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"head_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {head_dtype}")
    if model_kwargs.pop("return_dict", None) is not None:  # None: unset, as PEFT's forward passes it on
        raise ValueError("return_dict does not apply: the body's outputs are read by name (leave it out)")
    inputs = input_ids if input_ids is not None else model_kwargs.get("inputs_embeds")
    packed = _packed_rows_flag(model, attention_mask, model_kwargs, rows=1 if inputs is None else inputs.shape[0])
    # No KV cache: transformers builds its per-sequence (packed) attention mask only without one (flash attention
    # splits packed rows from the position ids with a new cache too, not after a filled one).
    caching = model_kwargs.get("past_key_values") is not None or (
        model_kwargs.get("use_cache") and _flash_attention(model) is None)
    if attention_mask is None and model_kwargs.get("position_ids") is not None and caching:
        raise ValueError("use_cache=True / past_key_values do not apply to rows given by position_ids without an "
                         "attention_mask: transformers splits packed sequences only without a KV cache")
    model_kwargs.setdefault("use_cache", False)
    _check_plain_head(model)
    with _peft_forward(model, input_ids, model_kwargs) as body_kwargs:
        outputs = _body(model)(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **body_kwargs)
    if on_body is not None:
        on_body(outputs)
    hidden = outputs.last_hidden_state
    if packed is not None:  # packed rows the body did not split, not read on the host: NaN, never wrong numbers
        hidden = _validate.nan_if(packed, hidden)
    weight, bias, low_rank = _head(model, hidden, head_dtype)
    dtype = head_dtype or autocast_dtype(hidden)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if dtype is None and weight.dtype != hidden.dtype and model_type in _HIDDEN_TO_HEAD_DTYPE:
        dtype = weight.dtype  # as its forward casts the hidden states
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        low_rank = None if low_rank is None else (low_rank[0].to(dtype), low_rank[1].to(dtype))
    elif weight.dtype != hidden.dtype:
        raise TypeError(f"model: the output head weight is {weight.dtype} but the hidden states are "
                        f"{hidden.dtype}; run under torch.autocast, pass head_dtype= (the dtype the model's forward "
                        "runs its head in) or give the head the body's dtype")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"model: its dtype is {hidden.dtype} (hidden states and output head); the head runs in "
                        "float32, bfloat16 or float16: cast the model (e.g. model.float()) or pass "
                        "head_dtype=torch.float32")
    return hidden, weight, bias, low_rank


def _aligned(name: str, mask: Optional[Tensor], shape) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


@functools.lru_cache(maxsize=None)
def _transformers_kwargs() -> frozenset:
    """The keywords ``transformers`` bodies take through ``**kwargs: Unpack[TransformersKwargs]`` (the flash
    attention's ``cu_seq_lens_q``, ``max_length_k``, ...), none of them in a forward's signature."""
    try:
        from transformers.utils.generic import TransformersKwargs
    except ImportError:
        return frozenset()
    return frozenset(k for cls in TransformersKwargs.__mro__ for k in getattr(cls, "__annotations__", {}))


def _refuse_misspelled_options(model, model_kwargs: dict) -> None:
    """A ``TypeError`` for a keyword of ``model_kwargs`` that reads as a misspelled option of
    :func:`causal_lm_logprobs` (``temprature``, ``label``) and that neither the model's forward nor its body's names:
    a ``transformers`` body takes any keyword and drops the ones it does not know, so the option would be lost."""
    import difflib

    if not model_kwargs:
        return
    ours = [n for n, p in inspect.signature(causal_lm_logprobs).parameters.items() if p.kind is p.KEYWORD_ONLY]
    close = {}
    for key in model_kwargs:  # a loop, not a comprehension with an assignment expression: torch.compile traces it
        match = difflib.get_close_matches(key, ours, n=1, cutoff=0.75)
        if match:
            close[key] = match[0]
    if not close:  # the usual call: no keyword near an option, no signature to read
        return
    named = set(_transformers_kwargs())
    for module in (model, getattr(model, "base_model", None)):
        forward = getattr(module, "forward", None)
        if forward is not None:
            named.update(inspect.signature(forward).parameters)
    with contextlib.suppress(TypeError, ValueError):
        named.update(inspect.signature(_body(model).forward).parameters)
    for key, option in close.items():
        if key not in named:
            raise TypeError(f"causal_lm_logprobs() got an unexpected keyword argument {key!r}: did you mean "
                            f"{option!r}? (other keywords go to the model's body, which drops the ones it does "
                            "not know)")


def causal_lm_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    labels: Optional[Tensor] = None,
    response_mask: Optional[Tensor] = None,
    shift_labels: Optional[Tensor] = None,
    position_ids: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    temperature: float = 1.0,
    entropy: bool = False,
    sum_p2: bool = False,
    argmax: bool = False,
    mean_logit: bool = False,
    ignore_index: int = -100,
    logit_scale=_UNSET,
    softcap=_UNSET,
    on_head=None,
    head_dtype: Optional[torch.dtype] = None,
    **model_kwargs,
) -> TokenStats:
    r"""Next-token log-probs (and entropy) of a ``transformers`` causal LM, from its hidden states.

    With ``h = body(input_ids)`` the last hidden states (after the final norm) and
    ``z_t = softcap * tanh(logit_scale * (W h_t + b) / softcap) / temperature`` the model's
    own logits at position ``t`` (``W, b`` its output head, ``logit_scale``/``softcap``
    from its config, see :data:`HEAD_TRANSFORMS`), entry ``t`` of the result is

    .. math:: \log p(y_{t+1} \mid x_{\le t}) = z_{t, y_{t+1}} - \log \sum_j e^{z_{t,j}},
        \qquad \text{entropy}_t = \log \sum_j e^{z_{t,j}} - \sum_j p_{t,j} z_{t,j}

    for ``t < T - 1`` (shape ``[B, T-1]``), where ``y = labels`` if given, else ``input_ids``
    (``y_{t+1} = shift_labels[:, t]`` for every ``t < T``, shape ``[B, T]``, with ``shift_labels``).
    Entry ``t`` is scored when ``y_{t+1} != ignore_index``, ``response_mask[:, t+1]`` (if
    given), ``attention_mask[:, t+1]`` (if given) and, for packed rows, when the next token does not start another
    sequence: without an ``attention_mask``, ``position_ids[:, t+1] == position_ids[:, t] + 1`` (``transformers``'
    rule: ids that restart at 0 or at 1), with one, ``position_ids[:, t+1] != 0`` after a real token ``t`` (a
    restart after left padding starts the row's first one, scored as without ``position_ids``). Unscored entries
    are 0 for every statistic (-1 for ``argmax``) and get no gradient. The selection is a mask on device: no host
    sync.

    Args:
        model: a ``transformers`` ``*ForCausalLM`` (``get_output_embeddings()``, tied or
            not, with its bias if any; its body from ``get_decoder()`` or
            ``base_model_prefix``), run in its own forward path, without computing logits.
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (left or right).
        labels: ``[B, T]`` aligned with ``input_ids`` like the ``labels`` of ``transformers``
            (shifted inside): ``ignore_index`` marks unscored tokens.
        response_mask: ``[B, T]`` nonzero at tokens to score (e.g. response tokens);
            exclusive with ``labels``.
        shift_labels: ``[B, T]`` the token each position predicts, already shifted: entry ``t``
            scores ``shift_labels[:, t]`` (``ignore_index``: unscored), and the statistics are
            ``[B, T]``, the last position's included. For rows whose next tokens are not the next
            input ids: a prefix tree of samples (TRL's ``AsyncGRPOTrainer`` packs its rollouts so),
            a context-parallel shard. Exclusive with ``labels`` and ``response_mask``; the
            packed-row rule of ``position_ids`` does not apply (the labels say what is scored);
            ``attention_mask[:, t]`` (and padding past ``cu_seqlens[-1]``) unscores entry ``t``.
        position_ids: ``[B, T]`` (or ``[1, T]`` for every row) passed to the model; a packed row's ids restart at
            each sequence (at 0, or at 1 as ``DataCollatorWithFlattening(position_ids_start=1)`` writes them); with
            ``attention_mask=None`` ``transformers`` then attends within each sequence only (with an attention mask
            it does not split packed rows). A body that
            does not split packed rows (one of ``_MIXES_PACKED_ROWS``: opt, gpt_oss; one that takes no
            ``position_ids``: bloom, mpt; a recurrent one, ``_is_recurrent``: granitemoehybrid)
            refuses them: a ValueError for CPU position ids; on a GPU (not read on the host)
            the hidden states are NaN, so is every scored statistic.
        cu_seqlens: ``[S+1]`` cumulative sequence lengths (starting at 0) of one packed row
            ``input_ids [1, total]``, instead of ``position_ids`` (which are then made from it
            on device). Tokens past ``cu_seqlens[-1]`` are padding, unscored. Malformed offsets
            raise for CPU tensors; on a GPU they are not read on the host and make every
            statistic NaN. Under flash attention (a model loaded with
            ``attn_implementation="flash_attention_2"``, say) they reach flash-attn's variable-length kernel as the
            ``cu_seq_lens_q/k`` and ``max_length_q/k`` keywords (not given beside ``cu_seqlens``), which split the row
            for every body that hands them on: ``transformers`` derives no offsets from the position ids in every
            layer, and the longest sequence is read on the host once (device offsets: one read per call).
            A body that does not split packed rows (as for ``position_ids``, or under flash attention GPT-Neo's,
            which drops the keywords and hands it no position ids) raises a ValueError.
        temperature: the logits are divided by it (after the head transform).
        entropy: compute the entropy too.
        sum_p2, argmax: compute :math:`\sum_j p_j^2` and the argmax too (as
            :func:`fastalign.linear_logprobs`).
        mean_logit: compute the mean of the model's logits :math:`\frac{1}{V}\sum_j z_{t,j}` too, before the
            temperature (differentiable, from the same pass: a label-smoothing term
            :math:`-\frac{1}{V}\sum_j \log p_{t,j} = \log \sum_j e^{z_{t,j}} - \text{mean}` at temperature 1).
        ignore_index: label value of unscored tokens.
        logit_scale, softcap: the head transform, for an architecture not in
            :data:`HEAD_TRANSFORMS` (both must be given; ``logit_scale`` finite and non-zero,
            ``softcap`` None (off) or > 0), as :func:`register_head_transform` takes it. For an
            architecture in the table they must equal the transform its config gives (else ValueError).
        on_head: called with the head's operands ``(hidden [B, T, H], weight, bias, low_rank)`` of
            every position (after the autocast cast; ``low_rank`` as :func:`head_operands`) before the
            vocabulary pass, for statistics derived from the hidden states beside the log-probs (the
            TRL drop-ins take their mean logit ``h · mean_j W_j`` from it) without running the body twice.
        head_dtype: run the head in this dtype, whatever the body's and the autocast's: the hidden
            states and the head are cast to it (``torch.float32``: TRL's ``cast_lm_head_to_fp32``).
            The head runs in float32, bfloat16 or float16: a float64 model raises a TypeError
            unless ``head_dtype`` is one of them.
        **model_kwargs: passed to the body (a keyword that reads as a misspelled option of this
            function, ``temprature``, and that the model does not name raises a TypeError);
            ``use_cache`` defaults to False (``transformers``
            attends within packed sequences only without a cache: ``use_cache=True`` or
            ``past_key_values`` with ``position_ids`` and no ``attention_mask``, or with ``cu_seqlens``,
            raise a ValueError); ``return_dict`` raises (None,
            what ``PeftModelForCausalLM.forward`` passes on, is dropped).

    Distributed weights:
        * DDP: pass the ``DistributedDataParallel`` wrapper itself; the statistics are computed inside its
          forward call, so its backward all-reduces the gradients as after the model's own forward (its
          ``module`` alone would skip that).
        * FSDP2 / tensor parallel: a ``DTensor`` head weight (and bias) is gathered with
          ``.full_tensor()`` (differentiable: its gradient flows back to the shard). A model sharded with
          ``fully_shard`` (its layers, then the model itself, the usual layout) is scored inside the root's
          forward call, whose hooks gather the root's parameters (embedding, final norm, head) and reduce
          their gradients, as for the model's own forward.
        * DeepSpeed ZeRO-3: parameters are partitioned outside their module's forward;
          gather the head around the call::

              with deepspeed.zero.GatheredParameters([model.lm_head.weight]):
                  stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)

          (a partitioned, empty weight raises a ValueError naming this context). This is the
          context for scoring without gradients (old-policy and reference log-probs); a
          head gradient under ZeRO-3 also needs DeepSpeed to track the head as used here
          (its ``fwd_module`` / ``register_external_parameter``), untested with fastalign.

    Mixed precision: under ``torch.autocast`` the head runs as the model's ``nn.Linear``
    would, with hidden states and weight cast to the autocast dtype (e.g. an fp32
    lm_head with bf16 hidden states), accumulating in fp32. Outside autocast the two
    dtypes must match, as they must for the model itself.

    PEFT: a ``PeftModel`` (or its base model) is scored as its forward computes: LoRA layers in
    the body run in its forward; a ``modules_to_save`` head is its active copy; a LoRA head
    ``W + s B A`` goes through the vocabulary pass as ``h W^T + (s A(dropout(h))) B^T``, the
    low-rank term of :func:`fastalign.linear_logprobs` (no widened weight; gradients reach ``A``
    and ``B`` only, none is formed for a frozen ``W``). Its dropout runs on the hidden states of
    every position, as PEFT's forward without ``logits_to_keep`` does, so with ``lora_dropout > 0``
    the draws are PEFT's own for the same random state. Under ``disable_adapter()`` the base
    model is scored (merged adapters are unmerged, the head's included, as PEFT's forward does).
    DoRA and other LoRA variants on the head raise a ValueError. The body runs inside what PEFT's
    forward sets up: aLoRA adapters (``alora_invocation_tokens``) act from their invocation sequence on,
    at the offsets PEFT finds in ``input_ids`` (on the host, as its forward does); Poly adapters take
    ``task_ids=``. Prompt learning, X-LoRA and ShadowPEFT (set up outside the body) raise a ValueError.

    Returns:
        :class:`fastalign.TokenStats` with ``[B, T-1]`` fp32 ``logprobs`` (and ``entropy``); ``[B, T]`` with
        ``shift_labels``.
    """
    route = _forward_route(model)
    if route is not None:  # through the wrapper's (or the FSDP2 root's) own forward call
        outer, inner = route
        return _inside_forward(outer, inner, functools.partial(
            causal_lm_logprobs, inner, input_ids, attention_mask, labels=labels, response_mask=response_mask,
            shift_labels=shift_labels, position_ids=position_ids, cu_seqlens=cu_seqlens, temperature=temperature,
            entropy=entropy, sum_p2=sum_p2, argmax=argmax, mean_logit=mean_logit, ignore_index=ignore_index,
            logit_scale=logit_scale, softcap=softcap, on_head=on_head, head_dtype=head_dtype, **model_kwargs))
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, tokens] tensor")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids needs at least 2 tokens per row (one prediction), got {input_ids.shape[1]}")
    if sum(x is not None for x in (labels, response_mask, shift_labels)) > 1:
        raise ValueError("pass one of labels, response_mask and shift_labels")
    shape = input_ids.shape
    attention_mask = _aligned("attention_mask", attention_mask, shape)
    labels = _aligned("labels", labels, shape)
    shift_labels = _aligned("shift_labels", shift_labels, shape)
    response_mask = _aligned("response_mask", response_mask, shape)
    if isinstance(position_ids, Tensor) and position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids.expand(shape[0], -1)  # one row for every row, as transformers broadcasts it
    position_ids = _aligned("position_ids", position_ids, shape)
    malformed = past_end = None
    if cu_seqlens is not None:
        if position_ids is not None:
            raise ValueError("give cu_seqlens or position_ids, not both")
        if attention_mask is not None:  # a 2-D mask would let the packed sequences attend to each other
            raise ValueError("give cu_seqlens or attention_mask, not both: cu_seqlens declares the sequences (tokens "
                             "past cu_seqlens[-1] are padding, unscored)")
        if shape[0] != 1:
            raise ValueError(f"cu_seqlens describes one packed row: input_ids must be [1, total], got {tuple(shape)}")
        given = [key for key in _FLASH_VARLEN_KWARGS if key in model_kwargs]
        if given:
            raise ValueError(f"give cu_seqlens or {', '.join(given)}, not both: cu_seqlens makes the flash-attention "
                             "keywords")
        malformed = _validate.offsets("cu_seqlens", cu_seqlens, shape[1], device=input_ids.device)
        varlen = _flash_varlen_keywords(model, cu_seqlens, shape[1])
        unsplit = packed_rows_refusal(model, varlen=bool(varlen))
        if unsplit is not None:
            raise ValueError(f"cu_seqlens: {unsplit}; score each sequence in its own row (padded, with "
                             "attention_mask) instead")
        position_ids, past_end = packed_position_ids(cu_seqlens, shape[1])
        model_kwargs.update(varlen)  # under flash attention: its own split, no offsets derived in every layer
    if "logits_to_keep" in model_kwargs or "num_logits_to_keep" in model_kwargs:
        raise ValueError("logits_to_keep does not apply: no logits are computed")
    _refuse_misspelled_options(model, model_kwargs)
    if (logit_scale is _UNSET) != (softcap is _UNSET):
        raise ValueError("logit_scale and softcap override the head transform together: pass both or neither")
    if logit_scale is _UNSET:
        logit_scale, softcap = head_transform(model.config)
    else:
        logit_scale, softcap = _stated_transform(logit_scale, softcap)
        known = known_head_transform(model.config)
        if known is not None and known != (logit_scale, softcap):  # the model's own forward applies `known`
            raise ValueError(f"logit_scale={logit_scale}, softcap={softcap} differ from the head transform "
                             f"{known} that model_type {model.config.model_type!r} applies (read from its "
                             "config); leave them out")

    if shift_labels is None:
        targets = next_token_targets(input_ids, labels=labels, response_mask=response_mask,
                                     attention_mask=attention_mask, position_ids=position_ids, past_end=past_end,
                                     ignore_index=ignore_index)
    else:
        targets = shifted_targets(shift_labels, attention_mask=attention_mask, past_end=past_end,
                                  ignore_index=ignore_index)
    predicting = slice(None) if shift_labels is not None else slice(None, -1)  # the positions that predict

    hidden, weight, bias, low_rank = head_operands(model, input_ids, attention_mask, position_ids=position_ids,
                                                   head_dtype=head_dtype, **model_kwargs)
    device_type = hidden.device.type
    if on_head is not None:  # the head's operands at every position, for statistics beside the log-probs
        on_head(hidden, weight, bias, low_rank)
    with torch.autocast(device_type, enabled=False):
        stats = linear_logprobs(hidden[:, predicting], weight, targets, bias=bias, temperature=temperature,
                                softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index,
                                entropy=entropy, sum_p2=sum_p2, argmax=argmax, mean_logit=mean_logit,
                                low_rank=None if low_rank is None else (low_rank[0][:, predicting], low_rank[1]))
    if argmax:  # linear_logprobs gives every row's argmax: -1 where unscored, as the other statistics are 0
        stats = stats._replace(argmax=torch.where(targets != ignore_index, stats.argmax, -1))
    if malformed is not None:  # offsets not read on the host: NaN statistics, never wrong ones
        stats = TokenStats(*(t if t is None or not t.is_floating_point() else _validate.nan_if(malformed, t)
                             for t in stats))
    return stats


from fastalign.integrations.hf.fused_loss import (  # noqa: E402,F401
    causal_lm_loss, install_fused_loss, remove_fused_loss)
