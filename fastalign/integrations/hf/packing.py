"""Packed rows: whether a model's body splits the sequences of a packed row (position ids that restart, or
``cu_seqlens``) into independent ones (:func:`packed_rows_refusal`), the refusal of packed rows it would mix
(:func:`_packed_rows_flag`), and the body itself (:func:`_body`)."""
from __future__ import annotations

import functools
import inspect
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.integrations.hf import head_transforms
from fastalign.integrations.hf.head_transforms import _LISTED, _transformers_at_least
from fastalign.integrations.hf.peft import unwrap_peft

_MASK_WITHOUT_RESTARTS = "builds its causal mask without the position ids"
#: ``model_type`` -> ``(how its transformers body mixes the sequences of a packed row, the transformers release from
#: which it no longer does, or None)``, so that each packed sequence attends to the ones before it. Bodies that take
#: ``position_ids`` but build their causal mask without their restarts (a vision-language model's: its multimodal
#: rotary positions too; Falcon's attention went causal without a mask before 5.24, Doge's dynamic mask dropped it
#: before 5.18, Llama 4's chunked attention ignored them before 5.23), and one that mixes them whatever its mask
#: (DeepSeek-V4's compressed attention pools keys over fixed windows of the whole row and lets a query see the
#: windows before its position id). Packed rows of these (and of any body that takes no ``position_ids`` or carries
#: a recurrent state, :func:`packed_rows_refusal`) raise.
_MIXES_PACKED_ROWS = {
    **dict.fromkeys(("opt", "gpt_oss", "afmoe", "openai-gpt", "qwen2_vl", "qwen2_5_vl", "glm4v", "glm4v_moe",
                     "glm46v", "paligemma", "glm_ocr", "paddleocr_vl", "biogpt", "xglm"),
                    (_MASK_WITHOUT_RESTARTS, None)),
    "falcon": (_MASK_WITHOUT_RESTARTS, "5.24"), "doge": (_MASK_WITHOUT_RESTARTS, "5.18"),
    "llama4_text": (_MASK_WITHOUT_RESTARTS, "5.23"),
    "deepseek_v4": ("pools the keys of its compressed attention over windows of the whole row", None),
}


#: ``model_type`` -> (what its ``transformers`` body hands its flash attention where a packed row's position ids are
#: due, whether the text positions of ``[4, B, T]`` ids reach it instead): flash attention then finds no sequence
#: boundary (or wrong ones) to split even a one-row packed batch at. Checked through transformers' own flash path.
_FLASH_POSITIONS = {
    **dict.fromkeys(("gpt_neo", "gpt_bigcode", "ctrl", "persimmon", "fuyu"), ("no position ids", False)),
    **dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "glm4v", "glm46v", "glm_ocr", "paddleocr_vl"),
                    ("no text positions from [B, T] ids", True)),
    "glm4v_moe": ("its multimodal rotary ids [3, B, T] whatever ids it is given", False),
}
#: ``model_type`` -> (the ``transformers`` release from which its body hands its flash attention the position ids,
#: whether it hands on the ``cu_seq_lens_*`` / ``max_length_*`` keywords before it); checked from 5.17 on.
_FLASH_POSITIONS_SINCE = {"ministral3": ("5.23", True), "cohere_compass_text": ("5.25", True), "gptj": ("5.24", False)}
#: Those whose body does not hand its flash attention the ``cu_seq_lens_*`` / ``max_length_*`` keywords: only the
#: position ids of a one-row batch split their packed rows there.
_FLASH_DROPS_VARLEN = frozenset(("gpt_neo", "stablelm", "falcon", "nemotron"))
#: The keywords that split a packed batch in transformers' flash path, given all together (TRL's padding-free
#: collator writes them).
_FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _body(model):
    """The module that maps input_ids to the last hidden states (the model without its head): ``get_decoder()``,
    else the ``base_model_prefix`` attribute, else ``model.model``; for a vision-language model (a config with a
    text config of its own) the ``base_model_prefix`` attribute first, the module its forward calls, so that
    vision inputs reach its vision tower (its ``get_decoder()`` is the language model alone). A ``get_decoder()``
    that returns the output head itself (ModernBERT-decoder) raises: such a head reads more than the body's last
    hidden states. Under PEFT, the body of the base model (its adapters in place)."""
    model = unwrap_peft(model)
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
    return any(t in _RECURRENT_LAYER_TYPES for t in (getattr(_text_config(model), "layer_types", None) or ()))


def _flash_attention(model) -> Optional[str]:
    """The decoder's flash-attention implementation (``flash_attention_2``, ``flash_attention_3``, a hub kernel such
    as ``kernels-community/vllm-flash-attn3``: ``"flash"`` in its name, transformers' own test), else None. That
    path ignores the causal mask the body builds: it splits the sequences of a packed row at ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` given with ``max_length_q`` / ``max_length_k`` (over the flattened batch), else only in a batch
    of one row, where the position ids equal the row's least; without the keywords the rows of a larger batch are
    each attended as one sequence."""
    implementation = getattr(_text_config(model), "_attn_implementation", None)
    return implementation if isinstance(implementation, str) and "flash" in implementation else None


def _model_type(model) -> Optional[str]:
    """The model's ``config.model_type`` (None without one)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def _flash_varlen_keywords(model, cu_seqlens: Tensor, total: int) -> dict:
    """The :data:`_FLASH_VARLEN_KWARGS` that split one packed row ``[1, total]`` at ``cu_seqlens`` under flash
    attention, for a body that hands them on (:class:`_FlashPath`); empty under any other attention. Tokens past
    ``cu_seqlens[-1]`` (padding, unscored) join the last sequence, after it; offsets are clamped into ``[0, total]``,
    never decreasing, so that malformed ones (refused, or flagged NaN, by the caller) read no memory past the tokens.
    ``max_length`` is the longest sequence, read on the host: free for CPU offsets, one read of device ones (where
    ``transformers`` would derive the offsets from the position ids in every layer, with reads of its own)."""
    flash = _flash_path(model, _body(model))
    if flash is None or not flash.hands_keywords:
        return {}
    cu = torch.cummax(cu_seqlens.clamp(0, total), 0).values.to(torch.int32)
    cu = torch.cat([torch.zeros_like(cu[:1]), cu[1:-1], torch.full_like(cu[:1], total)])
    longest = int((cu[1:] - cu[:-1]).max())
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)


def _text_config(model):
    """The config the model's decoder reads: a vision-language model's text config, a text model's own."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _text_positions(position_ids: Tensor) -> Optional[Tensor]:
    """The ``[B, T]`` text positions of ``position_ids``, at which ``transformers`` splits packed rows: ``[B, T]``
    ids themselves, the first of multimodal rotary ``[4, B, T]`` ones; None for ``[3, B, T]`` ones (temporal,
    height, width: no text positions) and other shapes."""
    if position_ids.dim() == 2:
        return position_ids
    return position_ids[0] if position_ids.dim() == 3 and position_ids.shape[0] == 4 else None


def _restart_steps(text_positions: Tensor) -> Tensor:
    """``[B, T-1]`` bool: where the ids restart, from position ``t`` to ``t+1`` (they do not step by 1,
    ``transformers``' rule)."""
    return text_positions[:, 1:] - text_positions[:, :-1] != 1


def _restarts(text_positions: Tensor) -> Tensor:
    """0-dim bool: whether the ids restart within a row (:func:`_restart_steps`)."""
    return _restart_steps(text_positions).any()


def _starts_off_the_least(text_positions: Tensor) -> Tensor:
    """0-dim bool: whether a sequence starts at an id other than its row's least, at the row's first token or at a
    restart (:func:`_restarts`). Flash attention starts sequences only at the least id: it attends such a
    sequence together with the one before it, and one that opens the row not at all (its outputs left unwritten)."""
    least = text_positions.amin(-1, keepdim=True)
    starts_off = _restart_steps(text_positions) & (text_positions[:, 1:] != least)
    return (text_positions[:, :1] != least).any() | starts_off.any()


def packed_rows_refusal(model, text_positions: bool = False, rows: int = 1, varlen: bool = False) -> Optional[str]:
    """Why the model's body would let the sequences of a packed row see each other (None if it splits them, as
    ``transformers`` does from position ids that restart, without an attention mask): a recurrent (state-space)
    body, :func:`_is_recurrent`, carries its state from one sequence into the next; a body that takes no
    ``position_ids`` builds its causal mask without them; one of :data:`_MIXES_PACKED_ROWS` mixes them (before the
    release given there; not, with ``text_positions``, a multimodal body whose mask ignores 2-D ids but splits
    packed rows at the text positions of ``[4, B, T]`` ids). Under flash attention (:func:`_flash_attention`) the
    mask plays no part: a batch of more than one row (``rows``) is mixed, and so is a packed row of a body that
    hands it no position ids (:class:`_FlashPath`), unless ``varlen`` (the call carries :data:`_FLASH_VARLEN_KWARGS`) and the body hands
    them on (not :data:`_FLASH_DROPS_VARLEN`), which splits a batch of any number of rows. An architecture outside
    the checked table is refused unless registered with ``packed_rows=True``."""
    return _packed_rows_split(model, text_positions, rows, varlen)[0]


def _packed_rows_split(model, text_positions: bool, rows: int, varlen: bool) -> tuple:
    """``(``:func:`packed_rows_refusal` ``, the flash attention that splits the packed rows at their position ids,
    else None)``: flash attention starts a sequence only where the ids equal the row's least
    (:func:`_starts_off_the_least`)."""
    model_type = _model_type(model)
    if model_type not in _LISTED and model_type not in head_transforms._PACKED_ROWS_STATED:
        return (f"model_type {model_type!r} is not among the architectures checked for packed rows; state that its "
                f"body splits them with fastalign.integrations.hf.register_head_transform({model_type!r}, ..., "
                "packed_rows=True)"), None
    body = _body(model)
    if _is_recurrent(model, body):
        return (f"the body of model_type {model_type!r} carries its recurrent (state-space) state from one packed "
                "sequence into the next"), None
    how, since = _MIXES_PACKED_ROWS.get(model_type, (None, None))
    flash = _flash_path(model, body)
    if flash is not None and how in (None, _MASK_WITHOUT_RESTARTS):
        refusal = _flash_refusal(model_type, flash, rows, varlen, text_positions)
        by_ids = refusal is None and not flash.splits_at_keywords(varlen)
        return refusal, flash.implementation if by_ids else None
    return _mask_refusal(model_type, body, how, since, text_positions), None


def _mask_refusal(model_type, body, how: Optional[str], since: Optional[str], text_positions: bool) -> Optional[str]:
    """:func:`packed_rows_refusal` where the causal mask the body builds splits the packed rows or not (any attention
    but flash): ``how`` and ``since`` from :data:`_MIXES_PACKED_ROWS`."""
    if not _masks_split_packed_rows():
        import transformers

        return (f"transformers {transformers.__version__} builds the causal mask without splitting packed rows "
                "(transformers 4.54 and later split them at restarting position ids)")
    if text_positions and how == _MASK_WITHOUT_RESTARTS:
        return None
    if (how is not None and (since is None or not _transformers_at_least(since))) or not _takes_position_ids(
            type(body)):
        import transformers

        newer = "" if since is None else f" before transformers {since} (this is {transformers.__version__})"
        return (f"the transformers body of model_type {model_type!r} {how or _MASK_WITHOUT_RESTARTS}{newer}, so "
                "each packed sequence would attend to the ones before it")
    return None


class _FlashPath(NamedTuple):
    """How a body's flash attention (``implementation``) splits a packed row: at the call's ``cu_seq_lens_*`` /
    ``max_length_*`` keywords where the body hands them on (``hands_keywords``); else only in a batch of one row, at
    the position ids, unless the body hands it something else in their place (``withheld`` says what; None where it
    hands them), or the text positions of ``[4, B, T]`` ids reach it instead (``text_positions_reach``)."""
    implementation: str
    hands_keywords: bool
    withheld: Optional[str]
    text_positions_reach: bool

    def splits_at_keywords(self, varlen: bool) -> bool:
        """Whether the keywords of a call that carries them (``varlen``) split its packed rows."""
        return varlen and self.hands_keywords


def _flash_path(model, body) -> Optional[_FlashPath]:
    """The :class:`_FlashPath` of the model's body ``body`` under flash attention (:func:`_flash_attention`), read
    from :data:`_FLASH_DROPS_VARLEN`, :data:`_FLASH_POSITIONS_SINCE` (by the installed ``transformers``),
    whether the body takes ``position_ids``, and :data:`_FLASH_POSITIONS`; None under any other attention."""
    implementation = _flash_attention(model)
    if implementation is None:
        return None
    model_type = _model_type(model)
    hands_keywords = model_type not in _FLASH_DROPS_VARLEN
    since = _FLASH_POSITIONS_SINCE.get(model_type)
    if since is not None and not _transformers_at_least(since[0]):
        import transformers

        return _FlashPath(implementation, hands_keywords and since[1],
                          f"no position ids before transformers {since[0]} (this is {transformers.__version__})", False)
    if not _takes_position_ids(type(body)):
        return _FlashPath(implementation, hands_keywords, "no position ids", False)
    return _FlashPath(implementation, hands_keywords, *_FLASH_POSITIONS.get(model_type, (None, False)))


def _flash_refusal(model_type, flash: _FlashPath, rows: int, varlen: bool, text_positions: bool) -> Optional[str]:
    """:func:`packed_rows_refusal` under flash attention (``flash``): None where it splits the packed rows."""
    if flash.splits_at_keywords(varlen):
        return None
    if rows > 1:
        return (f"flash attention ({flash.implementation}) splits the packed sequences of a batch of one row only (or "
                f"given the cu_seq_lens / max_length keywords), and this batch has {rows}: each packed sequence would "
                "attend to the ones before it in its row; pack them into one row [1, total] (as "
                "DataCollatorWithFlattening does)")
    if flash.withheld is not None and not (text_positions and flash.text_positions_reach):
        return (f"the transformers body of model_type {model_type!r} hands its flash attention "
                f"({flash.implementation}) {flash.withheld}, so it does not split packed rows at their sequences: each "
                "would attend to the ones before it")
    return None


#: Keywords of an attention function that splits the packed sequences itself, whatever mask the body builds: TRL's
#: tree attention (its AsyncGRPOTrainer packs samples sharing a prompt into one row, each segment attending to its
#: root-to-segment path).
_SPLITTING_ATTENTION_KWARGS = ("tree_cu_seqlens_q", "tree_kv_index")


def _packed_rows_flag(model, attention_mask: Optional[Tensor], model_kwargs: dict, rows: int) -> Optional[Tensor]:
    """Refuses packed rows (``position_ids`` that do not step by 1 within a row, ``transformers``' rule, with no
    ``attention_mask``) for a body that would not split them (:func:`packed_rows_refusal`, of a batch of ``rows``
    rows). Multimodal rotary ids: of ``[4, B, T]`` ones the first, the text positions, are read so (the body's mask
    splits packed rows at them, so only a recurrent body refuses them); ``[3, B, T]`` ones by
    :func:`_multimodal_restart_flag`. Under flash attention, which starts a sequence only where the ids equal the
    row's least, ids that start one at another value are refused too (:func:`_starts_off_the_least`). A
    ``ValueError`` for CPU position ids; on a GPU they are not read on the host, and the returned flag makes the
    hidden states NaN (:func:`fastalign._validate.flag_or_raise`). None when nothing is to refuse, and when
    ``model_kwargs`` carry an attention function's own split (:data:`_SPLITTING_ATTENTION_KWARGS`)."""
    position_ids = model_kwargs.get("position_ids")
    if not isinstance(position_ids, Tensor) or attention_mask is not None:
        return None
    if any(model_kwargs.get(key) is not None for key in _SPLITTING_ATTENTION_KWARGS):
        return None
    if position_ids.dim() == 3 and position_ids.shape[0] == 3:
        return _multimodal_restart_flag(position_ids)
    text = _text_positions(position_ids)
    if text is None:
        return None
    varlen = all(model_kwargs.get(key) is not None for key in _FLASH_VARLEN_KWARGS)
    unsplit, flash_by_ids = _packed_rows_split(model, position_ids.dim() == 3, rows, varlen)
    if flash_by_ids is not None:
        return _validate.flag_or_raise(
            _starts_off_the_least(text), position_ids,
            lambda: (f"position_ids start a sequence at a value other than the row's least (at a restart, or at the "
                     f"row's first token), where flash attention ({flash_by_ids}) starts none: it would attend that "
                     "sequence with the one before it, or, opening the row, not at all; start every sequence at the "
                     "same id (0)"))
    if unsplit is None:
        return None
    return _validate.flag_or_raise(
        _restarts(text), position_ids,
        lambda: (f"position_ids restart within a row (packed sequences), but {unsplit}; score each sequence in its "
                 "own row (padded, with attention_mask) instead"))


def _multimodal_restart_flag(position_ids: Tensor) -> Optional[Tensor]:
    """Refuses the multimodal rotary ids ``[3, B, T]`` (temporal, height, width: Qwen2-VL's family) of packed rows,
    which no ``transformers`` body splits (it builds the causal mask from ``[4, B, T]`` ids alone, the text
    positions first). A sequence's ids start at ``(0, 0, 0)`` and come back to it only within a video that opens
    the row, from a frame of its (an image's or a video's ids start where the text before them ends; a video's
    temporal ids jump ahead and back, so a fall is no sign): ``(0, 0, 0)`` after a token whose three ids are all
    above 0 (the end of a sequence) starts another one. As :func:`_packed_rows_flag`."""
    zero, above = (position_ids == 0).all(0), (position_ids > 0).all(0)
    return _validate.flag_or_raise(
        (zero[:, 1:] & above[:, :-1]).any(), position_ids,
        lambda: ("position_ids [3, B, T] restart within a row (packed sequences), which transformers does not split "
                 "(each sequence would attend to the ones before it): give [4, B, T] ids, the text positions first, "
                 "from which it builds the packed causal mask, or score each sequence in its own row (padded, with "
                 "attention_mask)"))
