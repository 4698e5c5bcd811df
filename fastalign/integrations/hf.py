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
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Optional

import torch
from torch import Tensor

from fastalign import _dtensor, _validate
from fastalign.linear import linear_logprobs
from fastalign.logprobs import TokenStats
from fastalign.sequence import segment_ids

_PLAIN_HEAD = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "olmo2",
    "starcoder2", "deepseek_v3", "gpt2", "gpt_neox", "opt", "phi", "phimoe", "olmo", "olmo3", "olmoe", "smollm3",
    "gpt_oss", "stablelm", "glm", "glm4", "exaone4", "seed_oss", "nemotron", "ministral", "helium", "internlm3",
    "persimmon", "jetmoe", "bloom",
    "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "deepseek_v2", "deepseek_v32", "deepseek_v4", "glm4_moe",
    "glm4_moe_lite", "glm_moe_dsa", "llama4_text", "ministral3", "ernie4_5", "ernie4_5_moe", "exaone_moe",
    "hunyuan_v1_dense", "hunyuan_v1_moe", "minimax_m2", "mimo_v2_flash", "longcat_flash", "solar_open", "apertus",
    "arcee", "bitnet", "cwm", "diffllama", "doge", "flex_olmo", "jais2", "mellum", "gpt_bigcode", "gpt_neo",
    "lfm2", "mamba", "mamba2", "falcon_mamba", "nemotron_h", "afmoe",
    "falcon", "gptj", "codegen", "exaone", "openai-gpt", "ctrl", "gpt_neox_japanese", "rwkv", "olmo_hybrid",
    "minicpm5_moe", "param2moe", "sarvam_moe", "apertus1p5_text", "aria_text", "minimax_m3_vl_text", "hy_v3", "hy_v4",
    "laguna", "lfm3", "iquestcoder", "ergo", "flint", "hrm_text", "kolibri1", "lara_mini", "dots1", "lfm2_moe",
    "bamba", "jamba", "zamba2", "biogpt", "cpmant", "gpt-sw3", "minimax", "xglm", "phi4_multimodal",
    "axk1", "axk2", "youtu", "sarvam_mla", "dots3_note_text", "zaya", "kimi_linear", "bailing_hybrid", "qwen4_exp_text",
)


def _plain(config) -> tuple[float, Optional[float]]:
    return 1.0, None


def _config_number(config, field: str, value, *, positive: bool = False) -> float:
    """``config.<field>`` as a finite float (> 0 with ``positive``, else non-zero), or a ``ValueError`` naming the
    field: the model's own forward would give NaN or fail on it."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not math.isfinite(number) or (number <= 0 if positive else number == 0):
        raise ValueError(f"model: config.{field} = {value!r} ({type(config).__name__}): the head transform needs a "
                         f"finite {'positive' if positive else 'non-zero'} number there")
    return float(number)


def _softcap_by(field: str):
    """The rule of a head that softcaps its logits at ``config.<field>`` (none where it is unset or None)."""
    def rule(config) -> tuple[float, Optional[float]]:
        cap = getattr(config, field, None)
        return 1.0, None if cap is None else _config_number(config, field, cap, positive=True)

    return rule


def _of_text(rule):
    """``rule`` read from a vision-language model's text config (its forward applies its text model's transform)."""
    return lambda config: rule(config.get_text_config())


def _scale_by(field: str, reciprocal: bool = False, unset: Optional[float] = None):
    """The rule of a head that multiplies its logits by ``config.<field>`` (by its inverse with ``reciprocal``);
    ``unset``: the scale where the field is None, for a model that then scales by it."""
    def rule(config) -> tuple[float, Optional[float]]:
        value = getattr(config, field)
        value = _config_number(config, field, unset if value is None and unset is not None else value)
        return (1.0 / value if reciprocal else value), None

    return rule


@functools.lru_cache(maxsize=None)
def _transformers_at_least(version: str) -> bool:
    """Whether the installed ``transformers`` is ``version`` or newer."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


def _since(version: str, rule, before=_plain):
    """``rule`` with ``transformers`` ``version`` or newer, ``before`` with an older one: the model's forward began
    to apply the transform in that release (checked against each release's own logits)."""
    return lambda config: rule(config) if _transformers_at_least(version) else before(config)


def _mpt(config) -> Optional[tuple[float, Optional[float]]]:
    """transformers' ``MptForCausalLM`` ignores ``config.logit_scale`` (its logits are ``lm_head(h)``): a plain
    head for its ``MptConfig``, whatever that field says. MosaicML's original MPT code (``trust_remote_code``:
    the same ``model_type``, its own config class) multiplies its logits by it: not known (None) there."""
    if getattr(config, "logit_scale", None) is None:
        return 1.0, None
    from transformers import MptConfig

    return (1.0, None) if isinstance(config, MptConfig) else None


#: ``model_type`` -> ``config -> (logit_scale, softcap)``: what the model's forward applies after its lm_head.
HEAD_TRANSFORMS = {
    **{name: _plain for name in _PLAIN_HEAD},
    **{name: _softcap_by("final_logit_softcapping")
       for name in ("gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "gemma4_unified_text", "vaultgemma",
                    "nanochat")},
    **{name: _scale_by("logit_scale") for name in ("cohere", "cohere2", "cohere2_moe")},
    "cohere_compass_text": _scale_by("logit_scale", unset=1.0),  # its model scales by 1 where the field is None
    # MiniCPM3 divides the hidden states by its logits_scaling (hidden_size / dim_model_base); its head has no bias
    **{name: _scale_by("logits_scaling", reciprocal=True)
       for name in ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa",
                    "minicpm3")},
    "recurrent_gemma": _softcap_by("logits_soft_cap"),
    "hyperclovax": _scale_by("logits_scaling"),  # multiplies, where Granite divides
    "falcon_h1": _scale_by("lm_head_multiplier"),
    # Inkling divides the hidden states by its muP width multiplier before its bias-free head (and keeps the first
    # unpadded_vocab_size logits: HEAD_ROWS); Inkling 2 softcaps the logits of its unpadded head
    "inkling_text": _scale_by("logits_mup_width_multiplier", reciprocal=True),
    **{name: _softcap_by("final_logit_softcapping") for name in ("inkling2_text", "inkling2_loop_text")},
    "mpt": _mpt,
    # vision-language models (their ForConditionalGeneration classes): Gemma 3's forward applies no softcap,
    # whatever its text config says (unlike Gemma3ForCausalLM); Gemma 4's applies its text config's
    # (Cohere2-Vision's ignores its text config's logit_scale, Aya Vision's applies it)
    **{name: _plain for name in ("gemma3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5",
                                 "qwen3_5_moe", "mistral3", "llava", "llava_next", "llava_onevision", "idefics3",
                                 "smolvlm", "internvl", "glm4v", "glm4v_moe", "glm46v", "cohere2_vision",
                                 "lfm2_vl", "vipllava", "llava_next_video", "video_llava", "idefics2", "aria",
                                 "mllama", "ovis2", "deepseek_vl", "llava_onevision1_5", "lighton_ocr", "fuyu",
                                 "got_ocr2", "glm_ocr", "paddleocr_vl", "kimi_k25")},
    **{name: _of_text(_softcap_by("final_logit_softcapping")) for name in ("gemma3n", "gemma4", "gemma4_unified")},
    # PaliGemma's forward applies its text config's softcap from transformers 5.23, Aya Vision's its scale from 5.25
    "paligemma": _since("5.23", _of_text(_softcap_by("final_logit_softcapping"))),
    "aya_vision": _since("5.25", _of_text(_scale_by("logit_scale"))),
    "granite_docling": _of_text(_scale_by("logits_scaling", reciprocal=True)),
}

#: ``model_type`` -> the config field that holds how many of the head's rows the model's logits keep (the first
#: ones; a head padded past its vocabulary, sliced in its forward), where that is set and below the head's rows.
HEAD_ROWS = {"inkling_text": "unpadded_vocab_size"}


def head_rows(config, rows: int) -> int:
    """How many of the ``rows`` rows of the output head the logits of ``config``'s model keep: the first
    ``config.<field>`` of :data:`HEAD_ROWS` where that is set and smaller, else all of them."""
    field = HEAD_ROWS.get(getattr(config, "model_type", None))
    kept = None if field is None else getattr(config, field, None)
    return rows if kept is None or kept >= rows else int(kept)


def kept_head(config, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """``(weight, bias)`` of an output head, the rows its model's logits keep (:func:`head_rows`): the tensors
    themselves, or views of their first rows (gradients reach them)."""
    rows = head_rows(config, weight.shape[0])
    if rows == weight.shape[0]:
        return weight, bias
    return weight[:rows], None if bias is None else bias[:rows]


#: The architectures listed above, each checked for packed rows (:func:`_unsplit_packing`).
_LISTED = frozenset(HEAD_TRANSFORMS)
#: Listed ``model_type``\ s whose rule cannot tell every config (it returns None: MPT's remote-code config with
#: ``logit_scale``) -> the transform the caller stated for those configs (:func:`register_head_transform`).
_UNDECIDED_STATED: dict = {}
#: the model types added to HEAD_TRANSFORMS by register_head_transform
_STATED: set = set()
_UNDECIDED = frozenset({"mpt"})
#: Registered architectures whose caller states that their body splits packed rows (``packed_rows=True``).
_PACKED_ROWS_STATED: set = set()

_UNSET = object()

_MASK_WITHOUT_RESTARTS = "builds its causal mask without the position ids"
#: ``model_type`` -> ``(how its transformers body mixes the sequences of a packed row, the transformers release from
#: which it no longer does, or None)``, so that each packed sequence attends to the ones before it. Bodies that take
#: ``position_ids`` but build their causal mask without their restarts (a vision-language model's: its multimodal
#: rotary positions too; Falcon's attention went causal without a mask before 5.24, Doge's dynamic mask dropped it
#: before 5.18, Llama 4's chunked attention ignored them before 5.23), and one that mixes them whatever its mask
#: (DeepSeek-V4's compressed attention pools keys over fixed windows of the whole row and lets a query see the
#: windows before its position id). Packed rows of these (and of any body that takes no ``position_ids`` or carries
#: a recurrent state, :func:`_unsplit_packing`) raise.
_MIXES_PACKED_ROWS = {
    **dict.fromkeys(("opt", "gpt_oss", "afmoe", "openai-gpt", "qwen2_vl", "qwen2_5_vl", "glm4v", "glm4v_moe",
                     "glm46v", "paligemma", "glm_ocr", "paddleocr_vl", "biogpt", "xglm"),
                    (_MASK_WITHOUT_RESTARTS, None)),
    "falcon": (_MASK_WITHOUT_RESTARTS, "5.24"), "doge": (_MASK_WITHOUT_RESTARTS, "5.18"),
    "llama4_text": (_MASK_WITHOUT_RESTARTS, "5.23"),
    "deepseek_v4": ("pools the keys of its compressed attention over windows of the whole row", None),
}


def known_head_transform(config) -> Optional[tuple[float, Optional[float]]]:
    """``(logit_scale, softcap)`` of :data:`HEAD_TRANSFORMS` (registered architectures included) for this
    ``config``'s ``model_type``, or None for an architecture missing from it."""
    model_type = getattr(config, "model_type", None)
    rule = HEAD_TRANSFORMS.get(model_type)
    transform = None if rule is None else rule(config)
    return _UNDECIDED_STATED.get(model_type) if transform is None else transform


def head_transform(config) -> tuple[float, Optional[float]]:
    """``(logit_scale, softcap)`` the model of this ``config`` applies between its lm_head and its logits."""
    transform = known_head_transform(config)
    model_type = getattr(config, "model_type", None)
    if transform is None and model_type in HEAD_TRANSFORMS:  # a listed type whose rule cannot tell (mpt)
        raise ValueError(
            f"model: a {type(config).__name__} of model_type {model_type!r} that is not transformers' own config "
            f"sets config.logit_scale={getattr(config, 'logit_scale', None)!r}, which that model's forward may apply "
            "to its logits (transformers' own class ignores it): state what it applies, per call with "
            "causal_lm_logprobs(..., logit_scale=..., softcap=...), or once for every call, the trainers included, "
            f"with fastalign.integrations.hf.register_head_transform({model_type!r}, logit_scale=..., softcap=...)")
    if transform is None:
        raise ValueError(
            f"model: config.model_type {model_type!r} has no known head transform; supported: "
            f"{sorted(HEAD_TRANSFORMS)}. State what its forward applies between the last hidden state and the "
            "logits: causal_lm_logprobs takes logit_scale= and softcap=; for the trainers, "
            f"fastalign.integrations.hf.register_head_transform({model_type!r}, logit_scale=..., softcap=...)")
    return transform


def _stated_transform(logit_scale, softcap) -> tuple[float, Optional[float]]:
    """A head transform stated by the caller, as floats: ``logit_scale`` finite and non-zero (0 would make every
    logit 0), ``softcap`` None or finite and > 0."""
    scale = _validate.finite_number("logit_scale", logit_scale)
    if scale == 0.0:
        raise ValueError(f"logit_scale must be finite and non-zero, got {logit_scale}")
    return scale, None if softcap is None else _validate.positive("softcap", softcap)


def register_head_transform(model_type: str, *, logit_scale: float = 1.0, softcap: Optional[float] = None,
                            packed_rows: bool = False) -> None:
    """State the head transform of a ``model_type`` missing from :data:`HEAD_TRANSFORMS` (a custom or new
    architecture): its forward computes ``logits = softcap * tanh(logit_scale * lm_head(h) / softcap)`` (no
    ``tanh`` with ``softcap=None``) from the last hidden states ``h``. Every call through this module, the TRL
    drop-ins included, then reads it. A ``model_type`` already in the table raises (its rule reads the config),
    except ``"mpt"``, whose rule cannot tell a config of another class than transformers' ``MptConfig`` with
    ``logit_scale`` set (MosaicML's remote code): the stated transform applies to those configs alone, and
    transformers' own ``MptForCausalLM`` (which ignores ``logit_scale``) keeps its plain head. Stating a
    ``model_type`` again replaces what was stated for it (``packed_rows`` included).

    ``packed_rows=True`` states that the architecture's body splits packed rows (position ids that restart, or
    ``cu_seqlens``) into independent sequences; without it, packed rows of this ``model_type`` raise, since a
    body may build its causal mask without the position ids and let each sequence see the ones before it."""
    if not isinstance(model_type, str):
        raise TypeError(f"model_type must be a non-empty string, got {model_type!r}")
    if not model_type:
        raise ValueError("model_type must be a non-empty string, got ''")
    undecided = model_type in _UNDECIDED
    if model_type in HEAD_TRANSFORMS and not undecided and model_type not in _STATED:
        raise ValueError(f"model_type {model_type!r} already has a head transform (read from its config)")
    _validate.boolean("packed_rows", packed_rows)
    scale, cap = _stated_transform(logit_scale, softcap)
    if undecided:
        if packed_rows:
            raise ValueError(f"packed_rows applies to a model_type missing from HEAD_TRANSFORMS; {model_type!r} "
                             "is listed and its packed rows are checked")
        _UNDECIDED_STATED[model_type] = (scale, cap)
        return
    HEAD_TRANSFORMS[model_type] = lambda config: (scale, cap)
    _STATED.add(model_type)
    (_PACKED_ROWS_STATED.add if packed_rows else _PACKED_ROWS_STATED.discard)(model_type)


def _body(model):
    """The module that maps input_ids to the last hidden states (the model without its head): ``get_decoder()``,
    else the ``base_model_prefix`` attribute, else ``model.model``; for a vision-language model (a config with a
    text config of its own) the ``base_model_prefix`` attribute first, the module its forward calls, so that
    vision inputs reach its vision tower (its ``get_decoder()`` is the language model alone). A ``get_decoder()``
    that returns the output head itself (ModernBERT-decoder) raises: such a head reads more than the body's last
    hidden states. Under PEFT, the body of the base model (its adapters in place)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and decoder is head:
        raise ValueError(f"model: get_decoder() of {type(model).__name__} returns its output head, not the body "
                         "whose last hidden states the head reads; fastalign cannot score it from hidden states")
    prefixed = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    config = getattr(model, "config", None)
    composite = hasattr(config, "get_text_config") and config.get_text_config() is not config
    for body in ((prefixed, decoder) if composite else (decoder, prefixed)) + (getattr(model, "model", None),):
        if isinstance(body, torch.nn.Module) and body is not model and body is not head:
            return body
    raise TypeError(f"model: cannot find the body of {type(model).__name__} (get_decoder(), base_model_prefix, "
                    ".model)")


@functools.lru_cache(maxsize=None)
def _takes_position_ids(body_cls) -> bool:
    """Whether a body class's ``forward`` has a ``position_ids`` parameter (not only ``**kwargs``)."""
    return "position_ids" in inspect.signature(body_cls.forward).parameters


def _masks_split_packed_rows() -> bool:
    """Whether the installed ``transformers`` splits a packed row's attention at restarting position ids."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


#: Layer types (a config's ``layer_types``) whose layers carry a recurrent state from token to token: state-space,
#: linear-attention and convolution layers, alone or beside attention (transformers' names, old and new).
_RECURRENT_LAYER_TYPES = ("linear_attention", "mamba", "mamba2", "conv", "hybrid", "hybrid_sliding")


def _is_recurrent(model, body) -> bool:
    """Whether the body carries a recurrent state: marked ``_is_stateful`` (transformers before 5.25), or a layer
    of its config's ``layer_types`` is recurrent (:data:`_RECURRENT_LAYER_TYPES`)."""
    if getattr(body, "_is_stateful", False):
        return True
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(t in _RECURRENT_LAYER_TYPES for t in (getattr(text, "layer_types", None) or ()))


def _unsplit_packing(model) -> Optional[str]:
    """Why the model's body would let the sequences of a packed row see each other (None if it splits them, as
    ``transformers`` does from position ids that restart, without an attention mask): a recurrent (state-space)
    body, :func:`_is_recurrent`, carries its state from one sequence into the next; a body that takes no
    ``position_ids`` builds its causal mask without them; one of :data:`_MIXES_PACKED_ROWS` mixes them (before the
    release given there). An architecture
    outside the checked table is refused unless registered with ``packed_rows=True``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _LISTED and model_type not in _PACKED_ROWS_STATED:
        return (f"model_type {model_type!r} is not among the architectures checked for packed rows; state that its "
                f"body splits them with fastalign.integrations.hf.register_head_transform({model_type!r}, ..., "
                "packed_rows=True)")
    if not _masks_split_packed_rows():
        import transformers

        return (f"transformers {transformers.__version__} builds the causal mask without splitting packed rows "
                "(transformers 4.54 and later split them at restarting position ids)")
    body = _body(model)
    if _is_recurrent(model, body):
        return (f"the body of model_type {model_type!r} carries its recurrent (state-space) state from one packed "
                "sequence into the next")
    how, since = _MIXES_PACKED_ROWS.get(model_type, (None, None))
    if (how is not None and (since is None or not _transformers_at_least(since))) or not _takes_position_ids(
            type(body)):
        import transformers

        newer = "" if since is None else f" before transformers {since} (this is {transformers.__version__})"
        return (f"the transformers body of model_type {model_type!r} {how or _MASK_WITHOUT_RESTARTS}{newer}, so "
                "each packed sequence would attend to the ones before it")
    return None


#: Keywords of an attention function that splits the packed sequences itself, whatever mask the body builds: TRL's
#: tree attention (its AsyncGRPOTrainer packs samples sharing a prompt into one row, each segment attending to its
#: root-to-segment path).
_SPLITTING_ATTENTION_KWARGS = ("tree_cu_seqlens_q", "tree_kv_index")


def _packed_rows_flag(model, attention_mask: Optional[Tensor], model_kwargs: dict) -> Optional[Tensor]:
    """Refuses packed rows (``position_ids`` that do not step by 1 within a row, ``transformers``' rule, with no
    ``attention_mask``) for a body that would not split them (:func:`_unsplit_packing`): a ``ValueError`` for
    CPU position ids; on a GPU they are not read on the host, and the returned flag makes the hidden states NaN
    (:func:`fastalign._validate.flag_or_raise`). None when nothing is to refuse, and when ``model_kwargs`` carry
    an attention function's own split (:data:`_SPLITTING_ATTENTION_KWARGS`)."""
    position_ids = model_kwargs.get("position_ids")
    if not isinstance(position_ids, Tensor) or attention_mask is not None or position_ids.dim() != 2:
        return None
    if any(model_kwargs.get(key) is not None for key in _SPLITTING_ATTENTION_KWARGS):
        return None
    unsplit = _unsplit_packing(model)
    if unsplit is None:
        return None
    return _validate.flag_or_raise(
        (position_ids[:, 1:] - position_ids[:, :-1] != 1).any(), position_ids,
        lambda: (f"position_ids restart within a row (packed sequences), but {unsplit}; score each sequence in its "
                 "own row (padded, with attention_mask) instead"))


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


def router_aux_loss(model, router_logits, attention_mask: Optional[Tensor] = None) -> Tensor:
    """The MoE load-balancing loss the model's own forward adds with ``output_router_logits=True``: its modeling
    module's ``load_balancing_loss_func`` of the body's ``router_logits``, ``num_experts`` and
    ``num_experts_per_tok`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE), differentiable."""
    import sys

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    loss_fn = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    if loss_fn is None or not hasattr(base, "num_experts") or not hasattr(base, "num_experts_per_tok"):
        raise ValueError(f"model: {type(base).__name__} has no MoE load-balancing loss (load_balancing_loss_func with "
                         "num_experts and num_experts_per_tok)")
    if router_logits is None:
        raise ValueError("model: the body returned no router logits; pass output_router_logits=True")
    return loss_fn(router_logits, base.num_experts, base.num_experts_per_tok, attention_mask)


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


def _check_plain_head(model) -> None:
    """For an architecture outside the listed ones (its transform stated by the caller): the output head must be the
    model's own child, applied to the body's last hidden states, and no other child may hold parameters. BERT's and
    RoBERTa's LM heads run a dense layer, an activation and a norm before the linear layer that
    ``get_output_embeddings()`` returns (ELECTRA's generator a module of its own): scored through that layer alone,
    their log-probs would be silently wrong, so they raise."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
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
    packed = _packed_rows_flag(model, attention_mask, model_kwargs)
    # No KV cache: transformers builds its per-sequence (packed) attention mask only without one.
    if attention_mask is None and model_kwargs.get("position_ids") is not None and (
            model_kwargs.get("use_cache") or model_kwargs.get("past_key_values") is not None):
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


def packed_position_ids(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """``position_ids [1, total]`` restarting at 0 at each ``cu_seqlens`` offset, and a
    ``[1, total]`` bool mask of the tokens past ``cu_seqlens[-1]`` (padding after the last
    sequence). On device, without a host sync: token ``t`` is in sequence
    ``s = #{k >= 1 : cu[k] <= t}`` at position ``t - cu[s]``."""
    _validate.integer("cu_seqlens", cu_seqlens, dim=1)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have at least 2 entries ([S+1], starting at 0), got shape "
                         f"{tuple(cu_seqlens.shape)}")
    total = _validate.at_least("total", total, 0)
    t = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seq = segment_ids(total, cu_seqlens.device, cu_seqlens, None)
    past_end = seq >= cu_seqlens.shape[0] - 1
    start = cu_seqlens[seq.clamp(max=cu_seqlens.shape[0] - 2)]
    return (t - start).to(torch.long)[None], past_end[None]


def next_token_targets(input_ids: Tensor, *, labels: Optional[Tensor] = None, response_mask: Optional[Tensor] = None,
                       attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                       past_end: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """``[B, T-1]``: the token position ``t`` predicts (``y_{t+1}``, ``y = labels`` if given, else
    ``input_ids``), ``ignore_index`` where it is not scored (the rule of :func:`causal_lm_logprobs`):
    ``y_{t+1}`` is ``ignore_index``, or ``response_mask[:, t+1]`` / ``attention_mask[:, t+1]`` is 0, or
    ``position_ids[:, t+1] == 0`` after a real token ``t`` (the next token starts another packed sequence; after
    padding, ``attention_mask[:, t] == 0``, it starts the row's first one), or ``past_end[:, t+1]`` (padding after
    the last packed sequence). On device, no host sync."""
    _validate.integer("input_ids", input_ids, dim=2)
    ignore_index = _validate.index_value("ignore_index", ignore_index)
    shape, dev = tuple(input_ids.shape), dict(device=input_ids.device, device_of="input_ids")
    _validate.like(shape, "input_ids.shape", kind="integer", **dev, labels=labels)
    _validate.like(shape, "input_ids.shape", kind="real", **dev, response_mask=response_mask,
                   attention_mask=attention_mask, position_ids=position_ids, past_end=past_end)
    targets = (input_ids if labels is None else labels)[:, 1:]
    not_a_new_sequence = None
    if position_ids is not None:
        not_a_new_sequence = position_ids[:, 1:] != 0
        if attention_mask is not None:  # a restart after padding (left padding, generate's ids) is the first one
            not_a_new_sequence = not_a_new_sequence | ~attention_mask[:, :-1].bool()
    return _scored_only(targets, ignore_index, *(None if m is None else m[:, 1:].bool()
                                                 for m in (response_mask, attention_mask)),
                        not_a_new_sequence, None if past_end is None else ~past_end[:, 1:])


def _scored_only(targets: Tensor, ignore_index: int, *keep: Optional[Tensor]) -> Tensor:
    """``targets`` where they are not ``ignore_index`` and every given ``keep`` mask holds, ``ignore_index``
    elsewhere."""
    scored = targets != ignore_index
    for mask in keep:
        if mask is not None:
            scored = scored & mask
    return torch.where(scored, targets, torch.full_like(targets, ignore_index))


def shifted_targets(shift_labels: Tensor, *, attention_mask: Optional[Tensor] = None,
                    past_end: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """``[B, T]``: the pre-shifted ``shift_labels`` (entry ``t`` predicted by position ``t``), ``ignore_index``
    where position ``t`` is padding (``attention_mask[:, t]`` 0, or ``past_end[:, t]``). On device, no host sync."""
    _validate.integer("shift_labels", shift_labels, dim=2)
    ignore_index = _validate.index_value("ignore_index", ignore_index)
    dev = dict(device=shift_labels.device, device_of="shift_labels")
    _validate.like(tuple(shift_labels.shape), "shift_labels.shape", kind="real", **dev,
                   attention_mask=attention_mask, past_end=past_end)
    return _scored_only(shift_labels, ignore_index, None if attention_mask is None else attention_mask.bool(),
                        None if past_end is None else ~past_end)


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


def _forward_route(model):
    """``(outer, inner)`` when the statistics must be computed inside ``outer``'s own forward call, else None:
    a ``DistributedDataParallel`` wrapper (its forward prepares the gradient all-reduce of the backward;
    ``inner`` is its ``module``), or an FSDP2 root whose own unit is sharded now (``fully_shard`` on its layers,
    then on the model: the root's forward hooks gather the embedding, final norm and head, and reduce their
    gradients). Inside that forward (a wrapper's forward that calls this one included) they are gathered: None."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model, model.module
    return (model, model) if _sharded_fsdp2_unit(model) else None


def _sharded_fsdp2_unit(model) -> bool:
    """Whether ``model`` is an FSDP2 module one of whose own parameters (those outside the units of its sharded
    submodules) is a shard now (a ``DTensor``: gathered into a plain tensor by its forward's hooks)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(model, FSDPModule):
        return False
    unit = [model]
    while unit:
        module = unit.pop()
        if any(isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            return True
        unit.extend(child for child in module.children() if not isinstance(child, FSDPModule))
    return False


def _inside_forward(outer, inner, compute) -> TokenStats:
    """``compute()`` (statistics) run as ``inner``'s forward inside ``outer()``: the wrappers' forwards and the
    module hooks run around it as around the model's own forward; ``inner``'s forward is restored after."""
    previous = inner.__dict__.get("forward")

    def forward(*_args, **_kwargs):  # views of larger outputs come back as tensors of their own: an in-place op
        # on a view of an FSDP2 module's output would drop its pre-backward hook (torch warns of it)
        return TokenStats(*(t.clone() if isinstance(t, Tensor) and t._is_view() else t for t in compute()))

    inner.forward = forward
    try:
        return outer()
    finally:
        if previous is None:
            del inner.forward
        else:
            inner.forward = previous


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
    given), ``attention_mask[:, t+1]`` (if given) and, for packed rows, ``position_ids[:, t+1]
    != 0`` after a real token ``t`` (the next token starts another sequence; a restart after left
    padding starts the row's first one, scored as without ``position_ids``). Unscored entries are 0 for every
    statistic (-1 for ``argmax``) and get no gradient. The selection is a mask on device: no host sync.

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
        position_ids: ``[B, T]`` (or ``[1, T]`` for every row) passed to the model; a packed row restarts at 0 at each
            sequence; with ``attention_mask=None`` ``transformers`` then attends within each
            sequence only (with an attention mask it does not split packed rows). A body that
            does not split packed rows (one of ``_MIXES_PACKED_ROWS``: opt, gpt_oss; one that takes no
            ``position_ids``: bloom, mpt; a recurrent one, ``_is_recurrent``: granitemoehybrid)
            refuses them: a ValueError for CPU position ids; on a GPU (not read on the host)
            the hidden states are NaN, so is every scored statistic.
        cu_seqlens: ``[S+1]`` cumulative sequence lengths (starting at 0) of one packed row
            ``input_ids [1, total]``, instead of ``position_ids`` (which are then made from it
            on device). Tokens past ``cu_seqlens[-1]`` are padding, unscored. Malformed offsets
            raise for CPU tensors; on a GPU they are not read on the host and make every
            statistic NaN. With a model loaded with ``attn_implementation="flash_attention_2"``
            ``transformers`` runs flash-attn's variable-length kernel on these packed rows.
            A body that does not split packed rows (as for ``position_ids``) raises a ValueError.
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
        malformed = _validate.offsets("cu_seqlens", cu_seqlens, shape[1], device=input_ids.device)
        unsplit = _unsplit_packing(model)
        if unsplit is not None:
            raise ValueError(f"cu_seqlens: {unsplit}; score each sequence in its own row (padded, with "
                             "attention_mask) instead")
        position_ids, past_end = packed_position_ids(cu_seqlens, shape[1])
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
