"""OpenRLHF 0.11.2 adapters: every loss of ``openrlhf/models/loss.py`` (``PolicyLoss``, ``DPOLoss``,
``GPTLMLoss``, ``SFTLoss``, ``ValueLoss``, ``PairWiseLoss``, ``LogExpLoss``) with OpenRLHF's constructor,
``forward`` and return values, computed by fastalign. A user swaps the import::

    from fastalign.integrations.openrlhf import PolicyLoss, DPOLoss, GPTLMLoss, SFTLoss, ValueLoss

:class:`PolicyLoss` (``policy_loss_type`` ``"ppo"`` or ``"gspo"``), with ``l = log_probs -
old_log_probs``, ``A`` the advantages and ``m`` the action mask:

    ppo:  rho = exp(clamp(l, -20, 20)), pg = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
          (dual clip c: pg = min(pg, -c A) where A < 0)
    gspo: rho_i = exp(mean_m l_i) for every token of sequence i, the same clip (fastalign's ppo with
          importance_sampling_level="sequence"); the loss is always a per-sequence mean (OpenRLHF
          forces token_level_loss=False)

aggregated as ``sum_m pg / batch_num_tokens * dp_size`` (``token_level_loss``; the local token
mean without ``batch_num_tokens``) or ``sum_i mean_m(pg_i) / global_batch_size * dp_size`` over
the non-empty sequences, dividing by a positive count as given, on the device, also below 1 (OpenRLHF's
trainer passes its counts per accumulation step). ``forward`` returns ``(loss,
clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``: ``clip_ratio = mean_m[clipped surrogate < unclipped]``,
``ppo_kl = mean_m(-l)``; ``loss``, ``ppo_kl`` and ``vllm_kl`` in OpenRLHF's dtypes (computed in fp32, then
cast to the dtype its arithmetic promotes their operands to: bf16 in gives bf16, a float32 mask or the
sample-level mean float32, 0-dim advantages nothing), the shares of tokens (``clip_ratio``, a token-level
``is_filter_ratio``) fp32, float64 from a float64 ``action_mask``, as OpenRLHF's. ``advantages`` broadcast
against ``log_probs`` as in OpenRLHF (``[B, T]``, ``[B, 1]`` per sequence; a ``[T]`` per position; a
Python number for every token). ``log_probs`` is ``[B, T]`` or one sequence ``[T]`` (a batch of one, as
OpenRLHF's arithmetic computes it; the results are 0-dim either way).
A micro-batch with no valid token gives 0 (loss, ``clip_ratio``, ``ppo_kl``, ``vllm_kl``, a
token-level ``is_filter_ratio``) where OpenRLHF divides 0 by 0 (NaN); so does an empty batch of
:class:`DPOLoss` (OpenRLHF: the mean of nothing, NaN). ``advantages``, ``old_log_probs`` and
``rollout_log_probs`` are constants: no gradient reaches or passes through them (OpenRLHF's trainer detaches
them). The
options are attributes, read at each call: an assignment checks the value it sets (an invalid one
raises there and leaves the old value); how the options combine (``is_correction_mode="clip"`` with a
sequence level or a divergence gate, a divergence gate with a lower threshold > 0; ``ipo`` with
``label_smoothing`` or ``beta = 0``) is checked when the module is built and at the next call, which
raises ``ValueError`` naming the options, so that assignments reach a valid configuration in any order,
as OpenRLHF's.

Train/rollout correction (ppo, ``is_correction_level`` ``"token"`` or ``"seq"``) with
``r = exp(old_log_probs - rollout_log_probs)`` per token and ``[low, high] =
is_correction_threshold``: a gate reads a statistic per unit (a token, or the mean over a
sequence): the ratio (``is_correction_gating="ratio"``; a sequence's geometric mean), or the
binary KL ``p log(p/q) + (1-p) log((1-p)/(1-q))`` / the total variation ``|p - q|`` between the
sampled token's rollout and train probabilities ``p, q`` (clamped to ``[1e-6, 1 - 1e-6]``).
``mode="mask"`` weights pg by ``r`` inside the band and 0 outside; ``"clip"`` (token ratio only)
by the statistic clamped to the band. The weight is detached and enters :func:`fastalign.policy_loss`
as ``importance_weights``. ``vllm_kl = mean_m(rollout_log_probs - old_log_probs)``,
``is_filter_ratio`` the share of units outside the band (tokens, or every sequence). With gspo it
takes the sequence ratio against ``rollout_log_probs`` and no weight, as OpenRLHF.

:class:`DPOLoss` (``beta``, ``label_smoothing``, ``ipo``) with ``d = (pc - pr) - (rc - rr)``:
``-(1 - eps) log σ(βd) - eps log σ(-βd)`` or, with ``ipo``, ``(d - 1/(2β))²``, averaged over
pairs; returns ``(loss, chosen_rewards, rejected_rewards)``, ``β(pc - rc)`` and ``β(pr - rr)``
detached, per pair, each in its pair's dtype as OpenRLHF (bf16 in, bf16 out; computed in fp32, then
cast). The four log-probs share any shape (``[B]``, ``[B, 1]``): the loss averages every element and the
rewards keep the shape, as OpenRLHF's. ``beta = 0`` gives OpenRLHF's numbers: ``log 2`` per pair (the
loss at ``βd = 0``) with no gradient, zero rewards; a negative ``beta`` raises, and so does ``beta = 0``
with ``ipo`` (OpenRLHF divides by zero). ``label_smoothing`` in ``[0, 1]``, as OpenRLHF; with ``ipo`` it
raises (OpenRLHF ignores it).
All four log-probs are required tensors, as OpenRLHF's (a None raises ``TypeError`` naming it).
The reference log-probs get no gradient (OpenRLHF computes them without one).

The ppo ratio clamps ``l`` to ``[-20, 20]`` as OpenRLHF does (``PolicyConfig.log_ratio_cap``, no
gradient where the clamp binds); the gspo sequence ratio ``exp(mean_m l)`` has no clamp, as OpenRLHF's.

The other losses (:mod:`fastalign.integrations.openrlhf_losses`), with ``agg`` OpenRLHF's ``aggregate_loss``
by :func:`fastalign.aggregate_loss` (``token_level_loss``: ``sum_m L / batch_num_tokens * dp_size``, the local
token mean without the count; else ``sum_i mean_m(L_i) / global_batch_size * dp_size`` over the non-empty
sequences, the local mean over them without the count; a fractional mask weighs each token):

    GPTLMLoss:    -sum_t lp_t / N over the labels other than -100, lp_t the log-softmax of logits[..., t, :] at
                  labels[..., t + 1] (:func:`fastalign.token_logprobs`: no shifted copy of the logits, no
                  [N, V] log-softmax); ring_attn_group: this rank's chunk of the labels, the ranks' mean
    SFTLoss:      agg(-per_token_logps) under loss_mask
    ValueLoss:    0.5 agg((v - R)^2), with clip_eps 0.5 agg(max((v_old + clip(v - v_old, ±clip_eps) - R)^2,
                  (v - R)^2)) under action_mask
    PairWiseLoss: mean(-log σ(c - r - margin)) over the pairs
    LogExpLoss:   mean(log(1 + exp(r - c))) (softplus: finite where OpenRLHF's exp overflows); a margin, which
                  OpenRLHF ignores, raises ``ValueError``

computed in fp32 and returned in OpenRLHF's dtype (bf16 in, bf16 out; a float32 mask, margin or tensor count,
or the sample-level mean, float32). ``[B, T]`` inputs or one sequence ``[T]``; a mask of None counts every
token. Nothing to average gives 0 where OpenRLHF divides 0 by 0 (NaN).

:func:`compute_approx_kl` (:mod:`fastalign.integrations.openrlhf_kl`) is OpenRLHF's KL estimate per token, for its
trainer's KL loss and KL reward: ``k1``, ``k2`` or ``k3`` of ``l = log_probs - log_probs_base`` clamped to
``[-10, 10]``, optionally with the importance-weighted gradient ``w l`` (``unbiased_gradient``).

Nothing here imports OpenRLHF.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.integrations._dtypes import float64_as_float32
from fastalign.integrations.openrlhf_kl import compute_approx_kl
from fastalign.integrations.openrlhf_losses import (GPTLMLoss, LogExpLoss, PairWiseLoss, SFTLoss, ValueLoss,
                                                    _check_counts, _masked_mean, _Options)
from fastalign.policy import policy_loss
from fastalign.policy_config import PolicyConfig
from fastalign.preference import preference_loss

__all__ = ["PolicyLoss", "DPOLoss", "GPTLMLoss", "SFTLoss", "ValueLoss", "PairWiseLoss", "LogExpLoss",
           "compute_approx_kl"]


def _ratio_dtype(mask: Optional[Tensor]) -> torch.dtype:
    """The dtype of OpenRLHF's share of masked tokens, ``(x.float() * mask).sum() / mask.sum()``: fp32, or float64
    from a float64 mask."""
    return _validate.result_dtype(torch.float32, mask)


class PolicyLoss(_Options, torch.nn.Module):
    """OpenRLHF's ``PolicyLoss`` (PPO / GSPO actor loss) computed by :func:`fastalign.policy_loss`. Its options are
    attributes, read at each call as OpenRLHF reads them (an assignment takes effect at the next call)."""

    OPTIONS = ("clip_eps_low", "clip_eps_high", "dual_clip", "token_level_loss", "policy_loss_type",
               "is_correction_level", "is_correction_mode", "is_correction_gating", "is_correction_threshold")

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: Optional[float] = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold: Sequence[float] = (0.5, 5.0)) -> None:
        super().__init__()
        _validate.boolean("token_level_loss", token_level_loss)
        token_level_loss = token_level_loss and policy_loss_type != "gspo"  # gspo: per-sample mean
        self._configure_options(locals())
        self._ready()  # OpenRLHF's constructor refuses an invalid combination

    def _check_values(self) -> None:
        """Check each option's own value."""
        if self.policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"policy_loss_type must be 'ppo' or 'gspo', got {self.policy_loss_type!r}")
        if self.is_correction_level not in ("off", "token", "seq"):
            raise ValueError(f"is_correction_level must be off/token/seq, got {self.is_correction_level!r}")
        if self.is_correction_mode not in ("mask", "clip"):
            raise ValueError(f"is_correction_mode must be mask/clip, got {self.is_correction_mode!r}")
        if self.is_correction_gating not in ("ratio", "binary_kl", "tv"):
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {self.is_correction_gating!r}")
        threshold = _validate.finite_numbers("is_correction_threshold", self.is_correction_threshold)
        if len(threshold) != 2:
            raise ValueError(f"is_correction_threshold must be a pair (low, high), got {self.is_correction_threshold}")
        if self.dual_clip is not None and not _validate.finite_number("dual_clip", self.dual_clip) > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {self.dual_clip}")
        _validate.boolean("token_level_loss", self.token_level_loss)
        for name in ("clip_eps_low", "clip_eps_high"):
            if _validate.finite_number(name, getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def _combine(self) -> None:
        """Check how the correction options combine, as OpenRLHF's constructor, and build the
        :class:`~fastalign.PolicyConfig` of the call."""
        level, mode, gating = self.is_correction_level, self.is_correction_mode, self.is_correction_gating
        if mode == "clip" and (level == "seq" or gating != "ratio"):
            raise ValueError(f"is_correction_mode='clip' needs is_correction_level='token' and "
                             f"is_correction_gating='ratio' (only the per-token ratio is a weight to clamp), got "
                             f"is_correction_level={level!r} and is_correction_gating={gating!r}")
        threshold = _validate.finite_numbers("is_correction_threshold", self.is_correction_threshold)
        if gating != "ratio" and level != "off" and threshold[0] > 0:
            raise ValueError(f"is_correction_gating={gating!r} takes an upper bound only: "
                             f"is_correction_threshold must be (0, delta), got {threshold}")
        opts = dict(loss_type="ppo", eps_low=float(self.clip_eps_low), eps_high=float(self.clip_eps_high),
                    agg="token-mean" if self.token_level_loss else "seq-mean-token-mean")
        if self.policy_loss_type == "gspo":  # exp(mean l) with no clamp (ppo clamps l to [-20, 20], the default)
            opts.update(importance_sampling_level="sequence", log_ratio_cap=math.inf)
        if not self.token_level_loss:
            opts["seq_count"] = "nonempty"
        if self.dual_clip is not None:
            opts["dual_clip"] = float(self.dual_clip)
        self._threshold = threshold
        self._weights_rollout = level != "off" and self.policy_loss_type == "ppo"
        self._config = PolicyConfig.make(**opts)

    def _correction(self, old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor):
        """``(weight, vllm_kl, is_filter_ratio)`` of the train/rollout correction (see the module doc)."""
        low, high = self._threshold
        seq = self.is_correction_level == "seq"
        m = mask.to(torch.float32)
        old, rollout = old_log_probs.detach().float(), rollout_log_probs.detach().float()
        is_log_ratio = old - rollout
        token_is = is_log_ratio.exp()

        def per_unit(x: Tensor) -> Tensor:  # a sequence's mean (NaN for an empty one, as OpenRLHF), or x
            return ((x * m).sum(-1) / m.sum(-1)).unsqueeze(-1) if seq else x

        if self.is_correction_gating == "ratio":
            stat = per_unit(is_log_ratio).exp()
        else:
            p, q = rollout.exp().clamp(1e-6, 1 - 1e-6), old.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = per_unit(p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log())
            else:  # tv
                stat = per_unit((p - q).abs())
        if self.is_correction_mode == "clip":
            weight, filtered = stat.clamp(min=low, max=high), (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            weight, filtered = torch.where(keep, token_is, 0.0), ~keep
        weight = torch.where(mask.bool(), weight, 0.0)
        is_filter_ratio = filtered.float().mean() if seq else _masked_mean(filtered, mask).to(_ratio_dtype(mask))
        return weight, _masked_mean(rollout - old, mask), is_filter_ratio

    def forward(self, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                action_mask: Optional[Tensor] = None, rollout_log_probs: Optional[Tensor] = None, dp_size: int = 1,
                batch_num_tokens=None, global_batch_size=None):
        """``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``; the last two are None without
        the train/rollout correction."""
        if _validate.finite_numbers("is_correction_threshold", self.is_correction_threshold) != self._threshold:
            self._configure()  # a threshold list changed in place: OpenRLHF reads it at each call
        self._ready()
        _validate.any_float("log_probs", log_probs)
        if log_probs.dim() not in (1, 2):
            raise ValueError(f"log_probs must be [B, T] or one sequence [T], got shape {tuple(log_probs.shape)}")
        _validate.like(tuple(log_probs.shape), "log_probs.shape", required=True, device=log_probs.device,
                       device_of="log_probs", old_log_probs=old_log_probs)
        _validate.like(tuple(log_probs.shape), "log_probs.shape", device=log_probs.device, device_of="log_probs",
                       rollout_log_probs=rollout_log_probs)
        _validate.like(tuple(log_probs.shape), "log_probs.shape", device=log_probs.device, device_of="log_probs",
                       kind="real", action_mask=action_mask)
        if action_mask is not None:  # OpenRLHF would weigh the tokens by a fractional one
            _validate.host_binary_mask("action_mask", action_mask)
        if isinstance(advantages, numbers.Real) and not isinstance(advantages, bool):  # OpenRLHF multiplies by it
            advantages = torch.tensor(float(advantages), device=log_probs.device)  # 0-dim: promotes no dtype
        _validate.any_float("advantages", advantages)
        _check_counts(dp_size, batch_num_tokens, global_batch_size)
        corrected = self.is_correction_level != "off"
        if corrected and rollout_log_probs is None:
            raise ValueError("rollout_log_probs is required with is_correction_level != 'off'")
        gspo_vs_rollout = corrected and self.policy_loss_type == "gspo"
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask
        # the dtypes of OpenRLHF's results: its arithmetic promotes every operand of each
        count = batch_num_tokens if self.token_level_loss else global_batch_size
        loss_dtype = _validate.result_dtype(
            log_probs, rollout_log_probs if gspo_vs_rollout else old_log_probs,
            advantages if advantages.dim() else None,  # a 0-dim operand does not promote
            action_mask, count, *(() if self.token_level_loss else (torch.ones(()),)),
            *((old_log_probs, rollout_log_probs) if self._weights_rollout else ()))
        kl_dtype = _validate.result_dtype(log_probs, old_log_probs, action_mask)
        vllm_kl_dtype = _validate.result_dtype(rollout_log_probs, old_log_probs, action_mask)
        log_probs, old_log_probs, rollout_log_probs = map(float64_as_float32,
                                                          (log_probs, old_log_probs, rollout_log_probs))
        try:  # OpenRLHF's broadcasting: [B, T], [B, 1] (per sequence) or [T] (per position)
            advantages = torch.broadcast_to(float64_as_float32(advantages), log_probs.shape)
        except RuntimeError as e:
            raise ValueError(f"advantages of shape {tuple(advantages.shape)} do not broadcast against log_probs "
                             f"{tuple(log_probs.shape)}") from e
        if log_probs.dim() == 1:  # one sequence: a batch of one (OpenRLHF's results are 0-dim either way)
            log_probs, old_log_probs, rollout_log_probs, advantages, mask = (
                None if t is None else t.unsqueeze(0)
                for t in (log_probs, old_log_probs, rollout_log_probs, advantages, mask))
        # OpenRLHF applies dp_size only with the global count of its aggregation
        cfg = self._config if count is None or dp_size == 1 else PolicyConfig.make(self._config, dp_size=int(dp_size))
        counts = {} if count is None else {"global_tokens" if self.token_level_loss else "global_seqs": count}
        weight = vllm_kl = is_filter_ratio = None
        if self._weights_rollout:
            weight, vllm_kl, is_filter_ratio = self._correction(old_log_probs, rollout_log_probs, mask)
        loss, met = policy_loss(log_probs, rollout_log_probs if gspo_vs_rollout else old_log_probs, advantages, mask,
                                importance_weights=weight, config=cfg, **counts)
        ppo_kl = _masked_mean(old_log_probs - log_probs.detach(), mask) if gspo_vs_rollout else met["approx_kl"]
        return (loss.to(loss_dtype), met["clipfrac"].to(_ratio_dtype(action_mask)), ppo_kl.to(kl_dtype),
                None if vllm_kl is None else vllm_kl.to(vllm_kl_dtype), is_filter_ratio)


class DPOLoss(_Options, torch.nn.Module):
    """OpenRLHF's ``DPOLoss`` (DPO, conservative DPO with ``label_smoothing``, IPO) computed by
    :func:`fastalign.preference_loss`. Its options are attributes, read at each call as OpenRLHF reads them (an
    assignment takes effect at the next call)."""

    OPTIONS = ("beta", "label_smoothing", "ipo")

    def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False) -> None:
        super().__init__()
        self._configure_options(locals())
        self._ready()

    def _check_values(self) -> None:
        """Check each option's own value: ``beta >= 0``, ``label_smoothing`` in ``[0, 1]``, ``ipo`` a bool."""
        if not _validate.finite_number("beta", self.beta) >= 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0.0 <= _validate.finite_number("label_smoothing", self.label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {self.label_smoothing}")
        _validate.boolean("ipo", self.ipo)

    def _combine(self) -> None:
        """With ``ipo``: ``label_smoothing`` 0 (OpenRLHF ignores it) and ``beta > 0`` (IPO's target ``1/(2β)``)."""
        if self.ipo and self.label_smoothing != 0.0:
            raise ValueError(f"label_smoothing does not apply with ipo=True, got label_smoothing="
                             f"{self.label_smoothing}")
        if self.ipo and self.beta == 0.0:
            raise ValueError("ipo=True needs beta > 0 (its target margin is 1 / (2 beta)), got beta=0")

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                reference_rejected_logps: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        self._ready()
        inputs = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
        for name, t in zip(("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                            "reference_rejected_logps"), inputs):  # all four required, as OpenRLHF's
            _validate.any_float(name, t)
        _validate.like(tuple(policy_chosen_logps.shape), "policy_chosen_logps.shape",
                       device=policy_chosen_logps.device, device_of="policy_chosen_logps",
                       policy_rejected_logps=policy_rejected_logps, reference_chosen_logps=reference_chosen_logps,
                       reference_rejected_logps=reference_rejected_logps)
        pairs = tuple(t.reshape(-1) for t in inputs)  # any shape: OpenRLHF's loss averages every element
        beta = float(self.beta)
        if beta == 0.0:  # OpenRLHF's terms read the margin d as 0 * d: the loss at d = 0 (beta 1), no gradient
            pairs = tuple(t * 0.0 for t in pairs)
        kw = dict(beta=beta or 1.0)
        if self.ipo:  # OpenRLHF's IPO takes the log-probs as given: lengths of 1 keep them so
            one = torch.ones_like(pairs[0])
            kw.update(loss_type="ipo", chosen_lengths=one, rejected_lengths=one)
        else:
            kw.update(loss_type="sigmoid", label_smoothing=self.label_smoothing)
        loss, _ = preference_loss(*pairs, **kw)

        def reward(policy: Tensor, reference: Tensor) -> Tensor:  # computed in fp32, in the pair's dtype
            out = _validate.result_dtype(policy, reference)
            acc = torch.promote_types(out, torch.float32)
            with torch.no_grad():
                return (self.beta * (policy.to(acc) - reference.to(acc))).to(out)
        return (loss.to(_validate.result_dtype(*inputs)), reward(policy_chosen_logps, reference_chosen_logps),
                reward(policy_rejected_logps, reference_rejected_logps))
