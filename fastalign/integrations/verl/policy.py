"""verl 0.9.1 actor profile: the PPO-family actor loss, gradient and metrics from verl's config.

:class:`VerlPolicyLoss` reads an ``ActorConfig`` (``actor_rollout_ref.actor``, object or dict)
once — ``policy_loss.loss_mode``, ``clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high`` /
``clip_ratio_c``, ``loss_agg_mode``, ``loss_scale_factor``, ``use_kl_loss`` / ``kl_loss_coef``
/ ``kl_loss_type``, ``entropy_coeff``, ``tau_pos`` / ``tau_neg``, ``policy_loss.clip_cov_*`` /
``kl_cov_ratio`` / ``ppo_kl_coef`` / ``dro_beta`` — and computes what verl's actor computes from
``get_policy_loss_fn(loss_mode)`` plus its KL and entropy terms:
``pg_loss - entropy_coeff * agg(H) + kl_loss_coef * agg(KL)``.

A key absent from the config (a dict, or an object without the attribute) takes verl's default, the value
of its ``ActorConfig`` / ``PolicyLossConfig`` dataclasses (and ``actor.yaml``): a dict gives what the same
config built as verl's dataclass gives (``clip_ratio_low`` / ``clip_ratio_high`` 0.2 whatever
``clip_ratio``; ``clip_ratio_c`` 3.0, dppo_tv / dppo_kl included; ``policy_loss.ppo_kl_coef`` 0.1). A key set to
None takes what verl's loss modes take for None: ``clip_ratio`` for ``clip_ratio_low`` / ``clip_ratio_high``,
1.0 for ``ppo_kl_coef``, else the default. A dict key that is not a field of verl's ``ActorConfig`` (or of its
FSDP / Megatron / VeOmni / TorchTitan subclasses; ``policy_loss``: ``PolicyLossConfig``; ``global_batch_info``:
the keywords of verl's ``agg_loss``) raises ``ValueError`` naming it, as verl's dataclasses refuse it.

The loss is computed in float32 (float64 inputs too) and returned in the dtype verl's arithmetic gives it: the
promoted dtype of the tensors that reach verl's loss (bf16 in, bf16 out in token-mean and token-sum; a float
mask, float64 advantages or weights, or a floating tensor count promote it), at least float32 where verl
mixes in a float32 tensor (the seq-mean aggregations, sapo's policy term, dppo_tv / dppo_kl, and geo_mean with
a bool or integer mask). The actor loss (not ``policy_term_only``) has the dtype of its policy term over a
bool mask, as verl's casts ``response_mask`` to bool and adds the entropy and KL terms in place. The metrics
stay float32.

Where verl's behaviour differs from fastalign's defaults, the profile follows verl:

* vanilla always applies the dual clip (``clip_ratio_c``, default 3.0).
* gspo aggregates with ``loss_agg_mode`` (fastalign's default for gspo is seq-mean-token-mean);
  sapo always aggregates its policy term as seq-mean-token-mean, geo_mean averages over every
  sequence, while KL and entropy use ``loss_agg_mode``.
* seq-mean-token-sum-norm divides by the non-empty sequences times ``loss_scale_factor``.
* dppo_tv / dppo_kl read ``clip_ratio_low`` / ``clip_ratio_high`` as the divergence bounds and
  truncate the detached ratio at ``clip_ratio_c``; ``actor/pg_clipfrac_lower`` is the fraction
  of kept tokens so truncated.
* dro requires ``policy_loss.dro_beta > 0`` and logs only ``actor/ppo_kl``.
* clip_cov takes a ``clip_cov_ratio`` above 1 as 1.0 (verl picks every candidate there too).
* kl_cov uses ``ppo_kl_coef`` (verl's config ships 0.1) and logs ``mean |l|`` as ``ppo_kl``.
* ``rollout_is_weights`` multiply the policy term; geo_mean takes their geometric mean per
  sequence.

* gspo caps the mean log-ratio at 10 as verl does, with no gradient beyond the cap (``torch.clamp``).
* ``actor/ppo_kl`` is ``mean_m(-clamp(l, -20, 20))`` in vanilla, cispo, sapo, dppo_tv and dppo_kl (verl
  clamps the log-ratio there), ``mean_m(-l)`` in the other modes.

Global normalisers: ``dp_size``, ``batch_num_tokens``, ``global_batch_size`` as in verl's
``global_batch_info``: the call's arguments, else the config's ``global_batch_info`` (verl's actor loss
writes the batch's counts there before its loss mode reads them, so a count given to the call wins).
``loss_scale_factor`` (seq-mean-token-sum-norm): the loss function verl's registry holds
(``policy_term_only``) reads ``global_batch_info["loss_scale_factor"]`` alone, as verl's loss modes do
(absent or None: the padded length); the actor loss reads the config's ``loss_scale_factor``, else
``global_batch_info["loss_scale_factor"]``, and raises ``ValueError`` when the two are set and differ.
As verl's ``agg_loss``, ``dp_size > 1`` without the count of an aggregation
raises ``ValueError`` naming it (token-mean: ``batch_num_tokens``; the seq-mean modes and sapo's
policy term: ``global_batch_size``; geo_mean's policy term reads no count). Metrics (0-dim device
tensors), as verl's actor loss logs them:
``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` (those its loss function
returns), ``actor/pg_loss``, ``actor/entropy_loss`` (when an entropy is given), ``kl_loss`` and
``kl_coef`` (with ``use_kl_loss``). ``actor/pg_loss`` is verl's ``pg_loss``, the policy term alone aggregated
as the loss's: where the KL or entropy term is fused into the kernel's loss, it comes from a second pass of the
kernel over the policy term (forward only, no gradient; Clip-Cov picks the same tokens), not from subtracting
the terms from the loss, which would lose its digits in float32 next to a large KL term.

Shapes: ``advantages`` ``[B, T]``, ``[B, 1]`` (broadcast along ``T``, as verl's arithmetic broadcasts it) or
``[B]``; ``rollout_is_weights`` the same. ``[B]`` is read as one value per sequence, as ``[B, 1]``: that is
:class:`VerlPolicyLoss`'s reading, not verl's (verl's loss modes broadcast a 1-D tensor along the positions), so
the ``fastalign_<mode>`` functions of verl's registry (:mod:`fastalign.integrations.verl.plugin`) refuse a 1-D
tensor.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.aggregate import AGGS, aggregate_loss, counts_read, divisor
from fastalign.integrations._dtypes import float64_as_float32
from fastalign.integrations.verl._keys import ACTOR, GLOBAL_BATCH_INFO, check_keys
from fastalign.integrations.verl._names import unprefixed
from fastalign.kl import canonical_kl, kl_penalty
from fastalign.policy import policy_loss
from fastalign.policy_config import PolicyConfig

__all__ = ["VerlPolicyLoss", "verl_policy_config"]

_MODES = {"vanilla": "ppo", "gspo": "gspo", "sapo": "sapo", "gpg": "reinforce", "clip_cov": "clip_cov",
          "kl_cov": "kl_cov", "geo_mean": "gmpo", "cispo": "cispo", "dppo_tv": "dppo_tv", "dppo_kl": "dppo_kl",
          "dro": "dro"}
_LOWER_MODES = ("vanilla", "dppo_tv", "dppo_kl")  # pg_clipfrac_lower: dual clip / ratio truncation
_OWN_AGG = {"sapo": "seq-mean-token-mean", "geo_mean": "seq-mean-token-mean"}  # the policy term ignores the mode
# modes whose ppo_kl is mean_m(-clamp(l, -20, 20)) in verl (the others log the unclamped mean_m(-l))
_CLAMPED_KL_MODES = ("vanilla", "cispo", "sapo", "dppo_tv", "dppo_kl")


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    """``sum_m x / sum m`` on the device (one fused reduction; NaN in masked slots never reaches it; a mask
    summing to 0 gives 0, :func:`fastalign.aggregate.divisor`), as verl's ``masked_mean``."""
    return torch.where(m > 0, x * m, 0.0).sum() / divisor(m.sum())


def _loss_dtype(mode: str, agg: str, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                response_mask: Optional[Tensor], rollout_is_weights: Optional[Tensor], dp_size, batch_num_tokens,
                global_batch_size) -> torch.dtype:
    """The dtype of the loss verl 0.9.1's mode ``mode`` returns: its arithmetic promotes the tensors that reach it
    (gpg reads no ``old_log_prob``), dppo's float32 ``valid_mask``, the float32 sequence mask of the seq-mean
    aggregations (``.float()``) and of geo_mean's mean over a bool or integer mask (``mask.sum(-1) + 1e-8``),
    and the tensor counts ``agg_loss`` applies (``dp_size``; ``batch_num_tokens`` in token-mean,
    ``global_batch_size`` in the seq-mean modes; a Python number changes nothing). ``response_mask`` None: a bool
    mask."""
    ops = [log_prob, advantages, response_mask, rollout_is_weights, None if mode == "gpg" else old_log_prob]
    if mode in ("dppo_tv", "dppo_kl"):
        ops.append(torch.float32)
    if mode == "geo_mean":  # a plain mean over the sequences: no agg_loss, no count
        float_mask = response_mask is not None and response_mask.is_floating_point()
        return _validate.result_dtype(*ops, None if float_mask else torch.float32)
    agg = _OWN_AGG.get(mode, agg)
    seq = agg.startswith("seq-mean")
    return _validate.result_dtype(*ops, torch.float32 if seq else None, dp_size,
                                  global_batch_size if seq else batch_num_tokens if agg == "token-mean" else None)


def _check_global_counts(aggs, dp_size: int, batch_num_tokens, global_batch_size) -> None:
    """verl's ``agg_loss``: with ``dp_size > 1`` token-mean needs ``batch_num_tokens`` and the seq-mean
    modes ``global_batch_size`` (a local mean times ``dp_size`` would scale the gradient by ``dp_size``)."""
    if dp_size <= 1:
        return
    for agg in aggs:
        if agg == "token-mean" and batch_num_tokens is None:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        if agg.startswith("seq-mean") and global_batch_size is None:
            raise ValueError("global_batch_size is required when dp_size > 1")


def _check_inputs(log_prob, old_log_prob, advantages, response_mask, entropy, ref_log_prob,
                  rollout_is_weights) -> None:
    """The actor loss's tensors under verl's names (fastalign's loss would name its own arguments): floating
    ``[B, T]`` log-probs (float64 too: computed in float32), ``advantages`` ``[B, T]``, ``[B, 1]`` or ``[B]``, a
    real ``response_mask`` ``[B, T]``, ``rollout_is_weights`` ``[B, T]``, ``[B, 1]`` or ``[B]``, all on one
    device (``[B, 1]`` and ``[B]``: one value per sequence)."""
    _validate.any_float("log_prob", log_prob, dim=2)
    shape = tuple(log_prob.shape)
    dev = dict(device=log_prob.device, device_of="log_prob")
    _validate.like(shape, "log_prob.shape", required=True, **dev, old_log_prob=old_log_prob)
    _validate.like([shape, (shape[0], 1), shape[:1]], "per token or per sequence", required=True,
                   **dev, advantages=advantages)
    _validate.like(shape, "log_prob.shape", required=True, kind="real", **dev, response_mask=response_mask)
    _validate.like(shape, "log_prob.shape", **dev, entropy=entropy, ref_log_prob=ref_log_prob)
    _validate.like([shape, (shape[0], 1), shape[:1]], "per token or per sequence", **dev,
                   rollout_is_weights=rollout_is_weights)


#: verl 0.9.1's defaults of the ``ActorConfig`` keys read here (its dataclass and ``actor.yaml``): what a key
#: absent from the config takes
_ACTOR_DEFAULTS: Mapping[str, Any] = dict(
    clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, loss_agg_mode="token-mean",
    loss_scale_factor=None, entropy_coeff=0.0, tau_pos=1.0, tau_neg=1.05, use_kl_loss=False, kl_loss_coef=0.001,
    kl_loss_type="low_var_kl")
#: the same for the ``PolicyLossConfig`` keys (``actor.policy_loss``)
_POLICY_LOSS_DEFAULTS: Mapping[str, Any] = dict(
    loss_mode="vanilla", clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0, kl_cov_ratio=0.0002,
    ppo_kl_coef=0.1, dro_beta=None)


def _lookup(cfg: Any, name: str, default=None):
    """``cfg``'s value at ``name`` (a mapping's key or an object's attribute), None included; ``default`` when
    ``cfg`` lacks it."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _get(cfg: Any, name: str, default=None):
    """``cfg``'s value at ``name``; ``default`` when ``cfg`` lacks it or holds None."""
    v = _lookup(cfg, name, default)
    return default if v is None else v


def _setting(cfg: Any, key: str, defaults: Mapping[str, Any] = _ACTOR_DEFAULTS):
    """verl's ``key`` in ``cfg``: absent or None, verl's default ``defaults[key]``."""
    return _get(cfg, key, defaults[key])


def _number(cfg: Any, key: str, *, defaults: Mapping[str, Any] = _ACTOR_DEFAULTS, none: Optional[float] = None,
            above: Optional[float] = None, at_least: Optional[float] = None, path: str = "") -> float:
    """The finite number at verl's ``key``, checked under verl's name (``path`` + ``key``): ``> above`` and
    ``>= at_least`` when given. Absent: verl's default ``defaults[key]``; None: ``none`` when given (the value
    verl's loss modes take for None), else the default."""
    name = path + key
    value = _lookup(cfg, key, defaults[key])
    if value is None:
        value = defaults[key] if none is None else none
    value = _validate.finite_number(name, value)
    if above is not None and not value > above:
        raise ValueError(f"{name} must be > {above}, got {value}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{name} must be >= {at_least}, got {value}")
    return value


def _loss_agg_mode(value: Any) -> str:
    """verl's ``loss_agg_mode``, checked under its name against the modes verl's ``ActorConfig`` accepts."""
    if not isinstance(value, str) or value not in AGGS:
        raise ValueError(f"loss_agg_mode must be one of {AGGS}, got {value!r}")
    return value


def _kl_loss_type(actor: Any) -> str:
    """verl's ``kl_loss_type`` (default ``"low_var_kl"``), checked under its name."""
    kind = _setting(actor, "kl_loss_type")
    canonical_kl(kind, "kl_loss_type")
    return kind


def _clip_bounds(cfg: Any) -> tuple[float, float]:
    """verl's ``(clip_ratio_low, clip_ratio_high)``: absent, verl's default 0.2 (whatever ``clip_ratio``); None,
    ``clip_ratio``, as verl's loss modes read them."""
    ratio = _number(cfg, "clip_ratio", at_least=0.0)
    return (_number(cfg, "clip_ratio_low", none=ratio, at_least=0.0),
            _number(cfg, "clip_ratio_high", none=ratio, at_least=0.0))


def verl_policy_config(actor: Any, *, fuse_terms: bool = True, loss_mode: Optional[str] = None,
                       loss_agg_mode: Optional[str] = None) -> PolicyConfig:
    """The :class:`fastalign.PolicyConfig` of a verl ``ActorConfig`` (object or dict).

    ``fuse_terms``: the KL and entropy terms go into the fused kernel (possible whenever they
    aggregate like the policy term). ``loss_mode`` / ``loss_agg_mode``: used instead of the
    config's ``policy_loss.loss_mode`` / ``loss_agg_mode`` when given. A dict key that is not one of
    verl's fields raises ``ValueError``."""
    check_keys(actor, ACTOR, "actor")
    pl = _get(actor, "policy_loss", {})
    mode = unprefixed(loss_mode if loss_mode is not None else _setting(pl, "loss_mode", _POLICY_LOSS_DEFAULTS))
    if mode not in _MODES:
        raise ValueError(f"policy_loss.loss_mode {mode!r} has no fastalign profile; supported: {tuple(_MODES)}")
    row = _MODES[mode]
    el, eh = _clip_bounds(actor)
    agg = _OWN_AGG.get(mode) or _loss_agg_mode(loss_agg_mode if loss_agg_mode is not None
                                               else _setting(actor, "loss_agg_mode"))
    opts: dict = dict(loss_type=row)
    if row in ("ppo", "gspo", "clip_cov", "gmpo", "cispo", "dppo_tv", "dppo_kl"):
        opts.update(eps_low=el, eps_high=eh)
    if row != "gmpo":
        opts["agg"] = agg
    if agg.startswith("seq-mean"):
        opts["seq_count"] = "all" if row == "gmpo" else "nonempty"
    if agg == "seq-mean-token-sum-norm" and _setting(actor, "loss_scale_factor") is not None:
        opts["max_len"] = _validate.at_least("loss_scale_factor", _setting(actor, "loss_scale_factor"), 1)
    if row == "ppo":
        opts["dual_clip"] = _number(actor, "clip_ratio_c", above=1.0)
    if row in ("dppo_tv", "dppo_kl"):  # clip_ratio_* are divergence bounds; clip_ratio_c truncates the ratio
        opts["delta"] = _number(actor, "clip_ratio_c", above=0.0)
    if row == "dro":
        beta = _setting(pl, "dro_beta", _POLICY_LOSS_DEFAULTS)
        if beta is None or not float(beta) > 0:
            raise ValueError(f"policy_loss.dro_beta must be > 0 for loss_mode 'dro', got {beta!r}")
        opts["dro_beta"] = float(beta)
    if row == "sapo":
        opts.update(sapo_tau_pos=_number(actor, "tau_pos", above=0.0),
                    sapo_tau_neg=_number(actor, "tau_neg", above=0.0))
    pl_number = (lambda key, **kw: _number(pl, key, defaults=_POLICY_LOSS_DEFAULTS, path="policy_loss.", **kw))
    if row == "clip_cov":
        lb, ub = pl_number("clip_cov_lb"), pl_number("clip_cov_ub")
        if not lb < ub:
            raise ValueError(f"policy_loss.clip_cov_lb must be < policy_loss.clip_cov_ub, got {lb} and {ub}")
        # verl picks min(int(ratio n), #candidates) tokens: a ratio above 1 picks every candidate, as 1.0 does
        opts.update(cov_ratio=min(pl_number("clip_cov_ratio", above=0.0), 1.0), cov_lb=lb, cov_ub=ub)
    if row == "kl_cov":  # verl's kl_cov takes 1.0 for a ppo_kl_coef of None
        opts.update(cov_ratio=pl_number("kl_cov_ratio", above=0.0), cov_kl_coef=pl_number("ppo_kl_coef", none=1.0))
    if fuse_terms:
        if _setting(actor, "use_kl_loss"):
            opts.update(kl_coef=_number(actor, "kl_loss_coef"), kl_type=_kl_loss_type(actor))
        if _number(actor, "entropy_coeff") != 0.0:
            opts["entropy_coef"] = _number(actor, "entropy_coeff")
    return PolicyConfig(**opts)


class VerlPolicyLoss:
    """verl's actor loss from its ``ActorConfig``: ``VerlPolicyLoss(actor_config)(log_prob, ...)``.

    ``__call__(log_prob, old_log_prob, advantages, response_mask, *, entropy=None,
    ref_log_prob=None, rollout_is_weights=None, dp_size=None, batch_num_tokens=None,
    global_batch_size=None)`` returns ``(loss, metrics)`` with verl's metric names. A count not
    given is read from ``actor.global_batch_info`` at each call (``dp_size``: else 1); a count given
    wins, as in verl's actor loss, which writes the batch's counts there before its loss mode reads them.

    ``loss_scale_factor`` (seq-mean-token-sum-norm): ``actor.loss_scale_factor``, else
    ``actor.global_batch_info["loss_scale_factor"]`` (the two set and different: ``ValueError``);
    with ``policy_term_only`` (the loss function verl's registry holds) the latter alone, as verl's
    loss modes read it (absent or None: the padded length).

    ``advantages`` / ``rollout_is_weights``: ``[B, T]``, ``[B, 1]`` or ``[B]`` (the last two: one value per
    sequence, broadcast over its tokens).

    The loss is computed in float32 and returned in verl's dtype (the module's docstring says which; bf16 in,
    bf16 out in token-mean); the metrics stay float32.
    """

    def __init__(self, actor: Any, *, loss_mode: Optional[str] = None, loss_agg_mode: Optional[str] = None,
                 policy_term_only: bool = False):
        check_keys(actor, ACTOR, "actor")
        self.actor = actor
        self.mode = unprefixed(loss_mode if loss_mode is not None
                               else _setting(_get(actor, "policy_loss", {}), "loss_mode", _POLICY_LOSS_DEFAULTS))
        self.loss_agg_mode = loss_agg_mode if loss_agg_mode is not None else _setting(actor, "loss_agg_mode")
        # policy_term_only: the loss function verl's registry holds, without the KL and entropy terms
        self.policy_term_only = policy_term_only
        if not (policy_term_only and self.mode in _OWN_AGG):  # else verl's loss mode never reads it
            _loss_agg_mode(self.loss_agg_mode)
        self.use_kl = not policy_term_only and bool(_setting(actor, "use_kl_loss"))
        self.kl_coef = _number(actor, "kl_loss_coef")
        self.kl_type = _kl_loss_type(actor) if self.use_kl else str(_setting(actor, "kl_loss_type"))
        self.entropy_coeff = 0.0 if policy_term_only else _number(actor, "entropy_coeff")
        # sapo and geo_mean aggregate their policy term on their own (geo_mean: a plain mean over the
        # local sequences, without the global counts): KL and entropy then run apart
        self.fused = self.mode == "sapo" and self.loss_agg_mode == _OWN_AGG["sapo"] or self.mode not in _OWN_AGG
        # max_len (loss_scale_factor) is set at each call: global_batch_info changes between calls
        self.config = verl_policy_config(actor, fuse_terms=self.fused and not policy_term_only, loss_mode=self.mode,
                                         loss_agg_mode=self.loss_agg_mode)
        # the policy term alone, for actor/pg_loss when the KL or entropy term is fused into self.config's loss
        self.pg_config = verl_policy_config(actor, fuse_terms=False, loss_mode=self.mode,
                                            loss_agg_mode=self.loss_agg_mode)

    def _loss_scale_factor(self, info: Any) -> Optional[int]:
        """seq-mean-token-sum-norm's divisor per sequence (None: the padded length): verl's loss modes read
        ``global_batch_info["loss_scale_factor"]``; its actor loss writes ``loss_scale_factor`` there first."""
        given = _get(info, "loss_scale_factor")
        name = "global_batch_info['loss_scale_factor']"
        if not self.policy_term_only:
            own = _setting(self.actor, "loss_scale_factor")
            if own is not None and given is not None and own != given:
                raise ValueError(f"loss_scale_factor={own!r} differs from {name}={given!r}")
            if own is not None:
                given, name = own, "loss_scale_factor"
        return None if given is None else _validate.at_least(name, given, 1)

    def __call__(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, response_mask: Tensor, *,
                 entropy: Optional[Tensor] = None, ref_log_prob: Optional[Tensor] = None,
                 rollout_is_weights: Optional[Tensor] = None, dp_size: Optional[int] = None, batch_num_tokens=None,
                 global_batch_size=None) -> tuple[Tensor, dict]:
        _check_inputs(log_prob, old_log_prob, advantages, response_mask, entropy, ref_log_prob, rollout_is_weights)
        if advantages.dim() == 2 and advantages.shape != log_prob.shape:  # [B, 1]: broadcast along T, as verl
            advantages = advantages.expand(log_prob.shape)
        info = _get(self.actor, "global_batch_info", {})
        check_keys(info, GLOBAL_BATCH_INFO, "actor.global_batch_info")  # verl's agg_loss takes these keywords
        dp_size = dp_size if dp_size is not None else _get(info, "dp_size", 1)
        batch_num_tokens = batch_num_tokens if batch_num_tokens is not None else _get(info, "batch_num_tokens")
        global_batch_size = global_batch_size if global_batch_size is not None else _get(info, "global_batch_size")
        # the loss is returned in the dtype verl's arithmetic gives (computed in fp32, float64 inputs included:
        # the kernels' widest). verl's actor loss casts response_mask to bool and adds the entropy and KL terms
        # to its mode's loss in place: the dtype of the policy term alone
        dtype = _loss_dtype(self.mode, self.loss_agg_mode, log_prob, old_log_prob, advantages,
                            response_mask if self.policy_term_only else None, rollout_is_weights, dp_size,
                            batch_num_tokens, global_batch_size)
        log_prob, old_log_prob, advantages, entropy, ref_log_prob, rollout_is_weights = map(
            float64_as_float32, (log_prob, old_log_prob, advantages, entropy, ref_log_prob, rollout_is_weights))
        loss, metrics = self._loss(log_prob, old_log_prob, advantages, response_mask, entropy, ref_log_prob,
                                   rollout_is_weights, dp_size, batch_num_tokens, global_batch_size)
        return loss.to(dtype), metrics

    def _policy_term(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                     rollout_is_weights: Optional[Tensor], config: PolicyConfig, counts: dict) -> Tensor:
        """verl's ``pg_loss``: the policy term alone, aggregated as the loss's (``config``: the loss's config without
        the KL and entropy terms), without gradient. Clip-Cov draws its seed from torch's generator: the draw is
        undone, so that the loss's own pass picks the same tokens and the generator advances once per call."""
        dev = log_prob.device
        fork = (torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev], device_type=dev.type)
                if self.mode == "clip_cov" else contextlib.nullcontext())
        with torch.no_grad(), fork:
            return policy_loss(log_prob.detach(), old_log_prob, advantages, response_mask, config=config,
                               importance_weights=rollout_is_weights, **counts)[0]

    def _loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
              entropy: Optional[Tensor], ref_log_prob: Optional[Tensor], rollout_is_weights: Optional[Tensor],
              dp_size: Optional[int], batch_num_tokens, global_batch_size) -> tuple[Tensor, dict]:
        """:meth:`__call__` on inputs of the kernels' dtypes, with the counts resolved."""
        cfg = self.config
        if self.use_kl and ref_log_prob is None:
            raise ValueError("use_kl_loss=True needs ref_log_prob (the reference policy's log-probs)")
        if entropy is None and cfg.entropy_coef != 0.0:  # verl leaves the entropy term out without entropy
            cfg = PolicyConfig.make(cfg, entropy_coef=0.0)
        info = _get(self.actor, "global_batch_info", {})
        # the KL and entropy terms (the actor loss only) aggregate with loss_agg_mode
        terms_norm = not self.policy_term_only and self.loss_agg_mode == "seq-mean-token-sum-norm"
        lsf = self._loss_scale_factor(info) if terms_norm or cfg.agg == "seq-mean-token-sum-norm" else None
        per_call = {}  # the options of this call, for the loss and for the policy term alone
        if cfg.agg == "seq-mean-token-sum-norm" and cfg.max_len != lsf:
            per_call["max_len"] = lsf
        _validate.count("batch_num_tokens", batch_num_tokens)
        _validate.count("global_batch_size", global_batch_size)
        # verl passes both counts; each aggregation reads its own
        own_agg = _OWN_AGG.get(self.mode, self.loss_agg_mode)
        pg_counts = {} if self.mode == "geo_mean" else counts_read(own_agg, batch_num_tokens, global_batch_size)
        if self.mode != "geo_mean" and dp_size != 1:
            per_call["dp_size"] = int(dp_size)
        cfg = PolicyConfig.make(cfg, **per_call)
        # the aggregations verl's agg_loss runs: the policy term's (geo_mean: a plain local mean, no counts)
        # and, for the KL and entropy terms, loss_agg_mode (verl aggregates a given entropy for its metric
        # whatever entropy_coeff)
        aggs = [] if self.mode == "geo_mean" else [own_agg]
        if self.use_kl or entropy is not None:
            aggs.append(self.loss_agg_mode)
        _check_global_counts(aggs, int(dp_size), batch_num_tokens, global_batch_size)
        # the fused loss holds the KL or entropy term: the policy term (actor/pg_loss) is computed on its own, a
        # forward pass without gradient, rather than subtracted from the loss (which loses its digits in float32
        # when the KL term is large)
        pg = None
        if self.fused and (self.use_kl or cfg.entropy_coef != 0.0):
            pg = self._policy_term(log_prob, old_log_prob, advantages, response_mask, rollout_is_weights,
                                   PolicyConfig.make(self.pg_config, **per_call), pg_counts)
        loss, met = policy_loss(
            log_prob, old_log_prob, advantages, response_mask, config=cfg,
            ref_logprobs=ref_log_prob if (self.fused and self.use_kl) else None,
            entropy=entropy if self.fused else None, importance_weights=rollout_is_weights, **pg_counts)
        terms = {}
        if self.fused:
            if entropy is not None:
                terms["actor/entropy_loss"] = met["entropy_term"]
            if self.use_kl:
                terms["kl_loss"] = met["kl_term"]
            if pg is None:  # the loss is the policy term (an entropy given for its metric only adds 0 * H)
                pg = loss.detach()
        else:
            pg = loss.detach()
            kw = dict(counts_read(self.loss_agg_mode, batch_num_tokens, global_batch_size), dp_size=int(dp_size))
            if terms_norm:
                kw["max_len"] = lsf
                if global_batch_size is None:
                    kw["global_seqs"] = (response_mask.sum(-1) > 0).sum()
            if entropy is not None:
                terms["actor/entropy_loss"] = aggregate_loss(entropy, response_mask, self.loss_agg_mode, **kw)
                loss = loss - self.entropy_coeff * terms["actor/entropy_loss"]
            if self.use_kl:
                kl = kl_penalty(log_prob, ref_log_prob, self.kl_type)
                terms["kl_loss"] = aggregate_loss(kl, response_mask, self.loss_agg_mode, **kw)
                loss = loss + self.kl_coef * terms["kl_loss"]
        terms = {"actor/pg_loss": pg, **{k: v.detach() for k, v in terms.items()}}
        if self.use_kl:
            terms["kl_coef"] = torch.tensor(self.kl_coef, device=loss.device)
        zero = torch.zeros((), device=loss.device)
        mode = self.mode
        if mode == "gpg":
            return loss, terms
        if mode == "dro":
            return loss, {"actor/ppo_kl": met["approx_kl"], **terms}
        out = {"actor/pg_clipfrac": met["clipfrac"], "actor/ppo_kl": met["approx_kl"],
               "actor/pg_clipfrac_lower": met["clipfrac_lower"] if mode in _LOWER_MODES else zero}
        if mode in _CLAMPED_KL_MODES:  # verl clamps the log-ratio of its ppo_kl in these modes
            m = response_mask.to(torch.float32)
            log_ratio = log_prob.detach().float() - old_log_prob.float()
            out["actor/ppo_kl"] = _masked_mean(-log_ratio.clamp(-20.0, 20.0), m)
        if mode == "sapo":
            out["actor/pg_clipfrac"] = zero
        elif mode == "clip_cov":
            out["actor/pg_clipfrac"] = met["cov_selected_frac"]
        elif mode == "geo_mean":
            out["actor/pg_clipfrac"], out["actor/pg_clipfrac_lower"] = met["clip_high"], met["clip_low"]
        if mode == "kl_cov":
            m = response_mask.to(torch.float32)
            out = {"actor/ppo_kl": _masked_mean((log_prob.detach().float() - old_log_prob.float()).abs(), m)}
        elif mode == "clip_cov":
            out.pop("actor/pg_clipfrac_lower")
        return loss, {**out, **terms}
