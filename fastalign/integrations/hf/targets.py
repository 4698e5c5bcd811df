"""The targets each position scores: :func:`next_token_targets`, :func:`shifted_targets` (pre-shifted labels), and
the position ids of one packed row from its ``cu_seqlens`` (:func:`packed_position_ids`). On device, no host
sync."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.sequence import segment_ids


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
    ``y_{t+1}`` is ``ignore_index``, or ``response_mask[:, t+1]`` / ``attention_mask[:, t+1]`` is 0, or the next
    token starts another packed sequence: without an ``attention_mask``, ``position_ids[:, t+1] != position_ids[:, t]
    + 1`` (``transformers``' rule, whether the ids restart at 0 or at 1), with one, ``position_ids[:, t+1] == 0``
    after a real token ``t`` (after padding, ``attention_mask[:, t] == 0``, it starts the row's first one), or
    ``past_end[:, t+1]`` (padding after the last packed sequence). On device, no host sync."""
    _validate.integer("input_ids", input_ids, dim=2)
    ignore_index = _validate.index_value("ignore_index", ignore_index)
    shape, dev = tuple(input_ids.shape), dict(device=input_ids.device, device_of="input_ids")
    _validate.like(shape, "input_ids.shape", kind="integer", **dev, labels=labels)
    _validate.like(shape, "input_ids.shape", kind="real", **dev, response_mask=response_mask,
                   attention_mask=attention_mask, position_ids=position_ids, past_end=past_end)
    targets = (input_ids if labels is None else labels)[:, 1:]
    not_a_new_sequence = None
    if position_ids is not None:
        if attention_mask is None:  # transformers' rule: a sequence starts wherever the ids do not step by 1
            not_a_new_sequence = position_ids[:, 1:] == position_ids[:, :-1] + 1
        else:  # ids back at 0 after a real token; after padding (left padding, generate's ids) the row's first one
            not_a_new_sequence = (position_ids[:, 1:] != 0) | ~attention_mask[:, :-1].bool()
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
