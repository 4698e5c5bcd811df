"""OpenRLHF 0.11.2's ``GPTLMLoss``, ``SFTLoss``, ``ValueLoss``, ``PairWiseLoss`` and ``LogExpLoss``
(``openrlhf/models/loss.py``) with OpenRLHF's constructor, ``forward`` and return value, computed by fastalign,
and what every OpenRLHF adapter shares: its options, OpenRLHF's result dtypes and aggregation. Import them from
:mod:`fastalign.integrations.openrlhf`, whose docstring describes them all. Nothing here imports OpenRLHF.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from fastalign import _validate
from fastalign.aggregate import aggregate_loss, divisor, whole_divisor
from fastalign.integrations._dtypes import float64_as_float32, refuse_out_of_range
from fastalign.integrations._live_options import LiveOptions
from fastalign.logprobs import token_logprobs

__all__ = ["GPTLMLoss", "SFTLoss", "ValueLoss", "PairWiseLoss", "LogExpLoss"]


def _operand_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """:func:`fastalign._validate.result_dtype` of floating operands as one elementwise expression promotes them:
    a 0-dim tensor counts only when every operand is 0-dim."""
    given = [t for t in tensors if isinstance(t, Tensor)]
    return _validate.result_dtype(*([t for t in given if t.dim()] or given))


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``x`` over the valid tokens, weighted by a fractional mask as OpenRLHF's; 0 with none (where
    OpenRLHF divides 0 by 0)."""
    m = mask.to(torch.float32)
    return (x.float() * m).sum() / divisor(m.sum())


def _check_counts(dp_size, batch_num_tokens, global_batch_size) -> None:
    """OpenRLHF's aggregation arguments, named as OpenRLHF names them."""
    _validate.count("batch_num_tokens", batch_num_tokens)
    _validate.count("global_batch_size", global_batch_size)
    _validate.at_least("dp_size", dp_size, 1)


def _check_tokens(name: str, x: Tensor, **others: Optional[Tensor]) -> None:
    """``x`` a floating ``[B, T]`` (or one sequence ``[T]``); ``others`` (None skipped) real tensors of its shape."""
    _validate.any_float(name, x)
    if x.dim() not in (1, 2):
        raise ValueError(f"{name} must be [B, T] or one sequence [T], got shape {tuple(x.shape)}")
    _validate.like(tuple(x.shape), f"{name}.shape", device=x.device, device_of=name, kind="real", **others)


def _aggregate(loss: Tensor, mask: Optional[Tensor], token_level_loss: bool, dp_size: int, batch_num_tokens,
               global_batch_size, *operands: Optional[Tensor]) -> Tensor:
    """OpenRLHF's ``aggregate_loss`` of a per-token ``loss`` by :func:`fastalign.aggregate_loss`, in fp32, returned
    in the dtype OpenRLHF's arithmetic gives ``operands`` (the loss's inputs), the mask and the count. A mask of
    None: every token valid."""
    count = batch_num_tokens if token_level_loss else global_batch_size
    # the seq-mean modes add a float32 mask (ones)
    out = _validate.result_dtype(*operands, mask, count, *(() if token_level_loss else (torch.ones(()),)))
    if loss.dim() == 1:  # one sequence: a batch of one (OpenRLHF's results are 0-dim either way)
        loss, mask = loss.unsqueeze(0), None if mask is None else mask.unsqueeze(0)
    if mask is None:
        mask = torch.ones_like(loss, dtype=torch.bool)
    agg = "token-mean" if token_level_loss else "seq-mean-token-mean"
    if count is None:  # the local means: OpenRLHF applies dp_size only with a global count
        return aggregate_loss(loss, mask, agg).to(out)
    key = "global_tokens" if token_level_loss else "global_seqs"
    return aggregate_loss(loss, mask, agg, dp_size=int(dp_size), **{key: count}).to(out)


class _Options(LiveOptions):
    """The options of an OpenRLHF adapter: an assignment checks the value it sets (``_check_values``: an invalid one
    raises there, naming the option, and leaves the old value); how the options combine is checked, and what the
    forward reads built (``_combine``), when the module is built and at the first call after an assignment
    (:meth:`_ready`), so that assignments reach a valid configuration in any order, as OpenRLHF's."""

    def _configure(self) -> None:
        self._check_values()
        self._combined = False

    def _ready(self) -> None:
        """Check the options' combination (``ValueError`` naming them) and build what the forward reads, once
        after an assignment."""
        if not self._combined:
            self._combine()
            self._combined = True

    def _combine(self) -> None:
        """Options that combine freely: nothing to check."""


class GPTLMLoss(_Options, torch.nn.Module):
    """OpenRLHF's ``GPTLMLoss``: the next-token cross-entropy ``-sum_t lp_t / N`` over the labels other than -100
    (``lp_t = log softmax(logits[..., t, :])[labels[..., t + 1]]``, ``N`` their count) by
    :func:`fastalign.token_logprobs`: no shifted copy of the logits, no ``[N, V]`` log-softmax, fp32 whatever their
    dtype; returned in the logits' dtype. ``ring_attn_group``: the logits are this rank's chunk of the sequence;
    the labels, whole, are cut to it (``labels[..., r * (T // W): (r + 1) * (T // W)]`` for rank ``r`` of ``W``),
    shifted within it, and the loss is the ranks' mean of their chunk losses (an all-reduce; the gradient is the
    local chunk's, divided by ``W``, as OpenRLHF's). No valid label gives 0 (OpenRLHF: NaN without the group)."""

    OPTIONS = ("ring_attn_group",)
    IGNORE_INDEX = -100

    def __init__(self, ring_attn_group=None):
        super().__init__()
        self._configure_options(locals())
        self._ready()

    def _check_values(self) -> None:
        """``ring_attn_group``: None or a process group this process belongs to (its rank and size read here, as
        OpenRLHF's constructor reads them)."""
        group = self.ring_attn_group
        _validate.process_group("ring_attn_group", group)
        if group is not None:
            rank = dist.get_rank(group)
            if rank < 0:
                raise ValueError("ring_attn_group must contain this process (dist.get_rank(ring_attn_group) is -1)")
            self.ring_attn_rank, self.ring_attn_world_size = rank, dist.get_world_size(group)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        self._ready()
        _validate.any_float("logits", logits, min_dim=2)
        _validate.integer("labels", labels)
        _validate.same_device(logits=logits, labels=labels)
        ring = self.ring_attn_group is not None
        what = "logits.shape[:-1]"
        if ring:  # this rank's chunk of the labels
            total = labels.size(-1)
            start = self.ring_attn_rank * (total // self.ring_attn_world_size)
            labels = labels[..., start:min(start + total // self.ring_attn_world_size, total)]
            what += f"; with ring_attn_group, labels[..., {start}:{start + labels.size(-1)}]: this rank's chunk"
        if tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} ({what}), got {tuple(labels.shape)}")
        shift_labels = labels[..., 1:]
        lp = token_logprobs(float64_as_float32(logits)[..., :-1, :], shift_labels, ignore_index=self.IGNORE_INDEX)
        loss = -lp.logprobs.sum() / whole_divisor((shift_labels != self.IGNORE_INDEX).sum())
        loss = refuse_out_of_range(loss, shift_labels, logits.shape[-1], self.IGNORE_INDEX, "labels")
        if ring:  # the ranks' mean; the gradient of the local loss, as OpenRLHF's (its all-reduce has none)
            total = loss.detach().clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.ring_attn_group)
            loss = (total + (loss - loss.detach())) / self.ring_attn_world_size
        return loss.to(logits.dtype)


class SFTLoss(_Options, torch.nn.Module):
    """OpenRLHF's ``SFTLoss``: ``-per_token_logps`` aggregated by :func:`fastalign.aggregate_loss` as OpenRLHF's
    ``aggregate_loss`` (``token_level_loss``: ``sum_m -lp / batch_num_tokens * dp_size``, the local token mean
    without the count; else ``sum_i mean_m(-lp_i) / global_batch_size * dp_size`` over the non-empty sequences, the
    local mean over them without the count). It takes per-token log-probs, as OpenRLHF's (from
    :func:`fastalign.token_logprobs` or :func:`fastalign.linear_logprobs` they skip the ``[N, V]`` log-softmax)."""

    OPTIONS = ("token_level_loss",)

    def __init__(self, token_level_loss: bool = True):
        super().__init__()
        self._configure_options(locals())
        self._ready()

    def _check_values(self) -> None:
        _validate.boolean("token_level_loss", self.token_level_loss)

    def forward(self, per_token_logps: Tensor, loss_mask: Tensor, dp_size: int = 1,
                batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None) -> Tensor:
        self._ready()
        _check_tokens("per_token_logps", per_token_logps, loss_mask=loss_mask)
        _check_counts(dp_size, batch_num_tokens, global_batch_size)
        return _aggregate(-float64_as_float32(per_token_logps), loss_mask, self.token_level_loss, dp_size,
                          batch_num_tokens, global_batch_size, per_token_logps)


class ValueLoss(_Options, torch.nn.Module):
    """OpenRLHF's ``ValueLoss`` (PPO critic): ``0.5 * agg((v - R)^2)`` or, with ``clip_eps``,
    ``0.5 * agg(max((v_old + clip(v - v_old, -clip_eps, clip_eps) - R)^2, (v - R)^2))``, with ``agg`` OpenRLHF's
    aggregation by :func:`fastalign.aggregate_loss` (as :class:`SFTLoss`'s) under ``action_mask`` (None: every
    token). Computed in fp32, returned in OpenRLHF's dtype. ``old_values`` is read only with ``clip_eps``."""

    OPTIONS = ("clip_eps", "token_level_loss")

    def __init__(self, clip_eps: Optional[float] = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self._configure_options(locals())
        self._ready()

    def _check_values(self) -> None:
        """``clip_eps`` None or a finite number >= 0, ``token_level_loss`` a bool."""
        if self.clip_eps is not None and not _validate.finite_number("clip_eps", self.clip_eps) >= 0:
            raise ValueError(f"clip_eps must be >= 0 (or None), got {self.clip_eps}")
        _validate.boolean("token_level_loss", self.token_level_loss)

    def forward(self, values: Tensor, old_values: Tensor, returns: Tensor, action_mask: Optional[Tensor] = None,
                dp_size: int = 1, batch_num_tokens: Optional[float] = None,
                global_batch_size: Optional[float] = None) -> Tensor:
        self._ready()
        clipped = self.clip_eps is not None
        _check_tokens("values", values, action_mask=action_mask)
        shape = tuple(values.shape)
        _validate.like(shape, "values.shape", required=True, device=values.device, device_of="values", returns=returns,
                      **({"old_values": old_values} if clipped else {}))
        _validate.like(shape, "values.shape", device=values.device, device_of="values", old_values=old_values)
        _check_counts(dp_size, batch_num_tokens, global_batch_size)
        v, ret = values.float(), returns.float()
        loss = (v - ret) ** 2
        if clipped:
            old = old_values.float()
            eps = float(self.clip_eps)
            loss = torch.max((old + (v - old).clamp(-eps, eps) - ret) ** 2, loss)
        return _aggregate(0.5 * loss, action_mask, self.token_level_loss, dp_size, batch_num_tokens,
                          global_batch_size, values, returns, old_values if clipped else None)


def _check_pairs(chosen_reward: Tensor, reject_reward: Tensor, margin=None) -> Optional[Tensor]:
    """Both rewards floating tensors of one shape; ``margin`` None, a number or a real tensor that broadcasts to
    it (returned as a tensor: a number as a 0-dim one, which promotes no dtype)."""
    _validate.any_float("chosen_reward", chosen_reward)
    shape = tuple(chosen_reward.shape)
    _validate.like(shape, "chosen_reward.shape", required=True, device=chosen_reward.device, device_of="chosen_reward",
                  reject_reward=reject_reward)
    if margin is None:
        return None
    if isinstance(margin, numbers.Real) and not isinstance(margin, bool):
        return torch.tensor(float(margin), device=chosen_reward.device)
    _validate.real("margin", margin)
    _validate.same_device(chosen_reward=chosen_reward, margin=margin)
    if not _broadcasts_to(tuple(margin.shape), shape):
        raise ValueError(f"margin must broadcast to chosen_reward's shape {shape} (one margin per pair, or one for "
                         f"all), got shape {tuple(margin.shape)}")
    return margin


def _broadcasts_to(a: tuple, shape: tuple) -> bool:
    try:
        return torch.broadcast_shapes(a, shape) == shape
    except RuntimeError:
        return False


def _pair_mean(loss: Tensor) -> Tensor:
    """The mean over the pairs; 0 for none (OpenRLHF's mean of nothing: NaN)."""
    return loss.sum() / max(loss.numel(), 1)


class PairWiseLoss(torch.nn.Module):
    """OpenRLHF's ``PairWiseLoss`` (reward model, Bradley-Terry): ``mean(-log σ(c - r - margin))`` over the pairs
    (``margin`` optional: a tensor per pair, or one for all), in fp32, returned in the dtype OpenRLHF's arithmetic
    gives the inputs."""

    def forward(self, chosen_reward: Tensor, reject_reward: Tensor, margin: Tensor = None) -> Tensor:
        m = _check_pairs(chosen_reward, reject_reward, margin)
        d = chosen_reward.float() - reject_reward.float()
        if m is not None:
            d = d - m.float()
        return _pair_mean(-F.logsigmoid(d)).to(_operand_dtype(chosen_reward, reject_reward, m))


class LogExpLoss(torch.nn.Module):
    """OpenRLHF's ``LogExpLoss`` (reward model): ``mean(log(1 + exp(r - c)))`` over the pairs, as ``softplus``
    in fp32 (finite where OpenRLHF's ``exp`` overflows: ``r - c > 88``), returned in the inputs' dtype. OpenRLHF
    ignores ``margin``; here a margin raises ``ValueError`` (use :class:`PairWiseLoss` for one)."""

    def forward(self, chosen_reward: Tensor, reject_reward: Tensor, margin: Tensor = None) -> Tensor:
        if margin is not None:
            raise ValueError("margin does not apply to LogExpLoss (OpenRLHF's ignores it: log(1 + exp(r - c)) has no "
                             "margin term); use PairWiseLoss for a margin, or pass margin=None")
        _check_pairs(chosen_reward, reject_reward)
        loss = F.softplus(reject_reward.float() - chosen_reward.float())
        return _pair_mean(loss).to(_operand_dtype(chosen_reward, reject_reward))
