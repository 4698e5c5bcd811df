"""The head transform of each architecture, :data:`HEAD_TRANSFORMS` (``model_type`` -> what its forward applies
between its lm_head and its logits), the head rows a padded head keeps (:data:`HEAD_ROWS`), and the registry of
the architectures a caller states (:func:`register_head_transform`, its packed-rows statement included)."""
from __future__ import annotations

import functools
import math
from typing import Optional

from torch import Tensor

from fastalign import _validate

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


#: The architectures listed above, each checked for packed rows (:func:`packed_rows_refusal`).
_LISTED = frozenset(HEAD_TRANSFORMS)
#: Listed ``model_type``\ s whose rule cannot tell every config (it returns None: MPT's remote-code config with
#: ``logit_scale``) -> the transform the caller stated for those configs (:func:`register_head_transform`).
_UNDECIDED_STATED: dict = {}
#: the model types added to HEAD_TRANSFORMS by register_head_transform
_STATED: set = set()
_UNDECIDED = frozenset({"mpt"})
#: Registered architectures whose caller states that their body splits packed rows (``packed_rows=True``).
_PACKED_ROWS_STATED: set = set()


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
            f"model: config.model_type {model_type!r} has no known head transform (the {len(HEAD_TRANSFORMS)} "
            "known ones: fastalign.integrations.hf.HEAD_TRANSFORMS). State what its forward applies between the "
            "last hidden state and the "
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
