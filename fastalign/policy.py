"""Policy-gradient losses of the PPO / GRPO family, fused (docs/math.md#policy-losses)."""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from fastalign import _backend, _validate
from fastalign._options import FixedOptions, check_read
from fastalign.aggregate import RowAggregation, check_counts, divisor, whole_divisor
from fastalign.ops import policy_loss as _ops
from fastalign.policy_config import FIELDS, LOSS_TYPES, PRESETS, ROLLOUT_MODES, CovParams, PolicyConfig  # noqa: F401


def _mask_u8(mask: Tensor) -> tuple:
    """(``mask`` as contiguous uint8, nonzero (NaN too) being 1; :func:`fastalign._validate.binary_mask`'s flag of
    a value other than 0 and 1, read from the same bool tensor). The kernels read it row-major: a cast keeps a
    transposed mask's strides, so it is made contiguous."""
    as_bool = mask.bool()
    fractional = _validate.binary_mask("response_mask", mask, as_bool)
    # a cast, not a bool-to-uint8 view: inductor cannot lower every such view, nor vmap batch it (torch 2.11)
    return as_bool.to(torch.uint8).contiguous(), fractional


def _detached(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` cut from the graph (None stays None); a tensor without a graph is returned as it is."""
    return t.detach() if t is not None and t.requires_grad else t


def entropy_quantile(h: Tensor, q: float) -> Tensor:
    """0-dim ``1 - q`` quantile, with ``torch.quantile``'s linear interpolation, of the entries of the flat
    ``h`` that count; ``+inf`` marks the ones that do not (with none counting, the result is ``+inf``).
    On the device: a sort and two gathers, no host synchronisation."""
    s = torch.sort(h).values  # the entries that count, then the +inf ones, then any NaN
    n = (s != math.inf).sum()
    pos = (1.0 - q) * (n - 1).clamp(min=0).to(torch.float32)
    below = s.gather(0, pos.floor().long().reshape(1))
    above = s.gather(0, pos.ceil().long().reshape(1))
    return torch.lerp(below, above, pos - pos.floor()).reshape(())


def _entropy_keep(entropy: Tensor, valid: Tensor, q: float, threshold: Optional[Tensor] = None) -> Tensor:
    """1.0 where H >= the (1 - q) quantile of the valid entropies (:func:`entropy_quantile`), or H >=
    ``threshold`` when given; on the device."""
    h = entropy.detach().float()
    if threshold is None:
        threshold = entropy_quantile(torch.where(valid, h, math.inf).flatten(), q)
    return (h >= threshold.detach().float().reshape(())).to(torch.float32).contiguous()


def _expand_weights(w: Tensor, shape: tuple) -> Tensor:
    """Importance weights [B, T], [B, 1] or [B] as [B, T]."""
    if w.dim() == 1:
        _validate.shape("importance_weights", w, shape[:1], "[B], [B, 1] or logprobs.shape")
        return w[:, None].expand(shape)
    if w.dim() == 2 and w.shape[1] == 1 and shape[1] != 1:
        _validate.shape("importance_weights", w, (shape[0], 1), "[B], [B, 1] or logprobs.shape")
        return w.expand(shape)
    _validate.shape("importance_weights", w, shape, "[B], [B, 1] or logprobs.shape")
    return w


def _clip_metrics(rd: Tensor, ext: Tensor, per: tuple, per_sequence: bool) -> dict:
    """clip_low / clip_high / clip_region means and the per-sequence clip_low_min / clip_high_max.

    Token level: means over valid tokens (``per``: the column means), min / max over non-empty
    sequences (NaN if none): ``ext``, the kernel's :func:`~fastalign.ops.policy_loss.clip_extremes`.
    ``per_sequence`` (the sequence ratio with one advantage per sequence, so one flag per sequence): one
    value per sequence, every sequence counts. With ``[B, T]`` advantages a token's flag reads its own
    advantage: token level, as TRL."""
    if per_sequence:
        frac = rd[:, 8:10] / whole_divisor(rd[:, 1:2])  # the counts of a bool mask are whole numbers
        lo_mean, hi_mean = (frac.sum(0) / max(rd.shape[0], 1)).unbind(0)
        ext = torch.stack((frac[:, 0].amin(), frac[:, 1].amax())) if rd.shape[0] else rd.new_full((2,), math.nan)
    else:
        lo_mean, hi_mean = per[8], per[9]
    lo_min, hi_max = ext.unbind(0)
    return {"clip_low": lo_mean, "clip_high": hi_mean, "clip_region": lo_mean + hi_mean,
            "clip_low_min": lo_min, "clip_high_max": hi_max}


class _Plan(NamedTuple):
    """What :func:`policy_loss` reads from its configuration alone, built once per :class:`PolicyConfig`."""

    row: str  # the kernel row of the loss type
    agg: str
    seq_count: str
    kl_options_set: tuple
    entropy_in_kernel: bool  # the entropy term is part of the kernel's loss (entropy_agg="loss")
    params: list  # the KernelParams as the flat float list the ops carry
    cov_params: CovParams
    clip_metrics: bool  # the row reports clip_low / clip_high


def _make_plan(cfg: PolicyConfig) -> _Plan:
    entropy_in_kernel = cfg.entropy_agg == "loss"
    return _Plan(cfg.row, cfg.resolved_agg, cfg.resolved_seq_count, cfg.kl_options_set, entropy_in_kernel,
                 [float(x) for x in cfg.kernel_params(entropy_in_kernel=entropy_in_kernel)], cfg.cov_params,
                 cfg.row in ("ppo", "gspo", "clip_cov", "cispo", "gmpo"))


def _plan(cfg: PolicyConfig) -> _Plan:
    """The :class:`_Plan` of ``cfg``, kept on the (immutable) configuration for its next eager call."""
    if torch.compiler.is_compiling():  # traced once per graph; the cache is an eager-mode saving
        return _make_plan(cfg)
    plan = cfg.__dict__.get("_policy_plan")
    if plan is None:
        plan = cfg.__dict__["_policy_plan"] = _make_plan(cfg)
    return plan


class SharedSeed(NamedTuple):
    """A Clip-Cov seed shared by the ranks of ``group`` (ranks holding the same tokens, e.g. a vocabulary split
    over it), passed as ``policy_loss(generator=...)``: the draw from ``generator`` (torch's global generator
    when None) on the group's first rank goes to every rank."""
    generator: Optional[torch.Generator]
    group: Any


def _clip_cov_seed(generator, device: torch.device) -> Tensor:
    """The Clip-Cov seed, ``[1]`` int64 on ``device``, drawn from ``generator`` (torch's global generator when
    None). A :class:`SharedSeed` gives every rank of its group the draw of the group's first rank: the others
    contribute 0 to one all-reduce (sum) of the seed, on the device (no host synchronisation; traceable by
    ``torch.compile`` with the global generator)."""
    group = None
    if isinstance(generator, SharedSeed):
        generator, group = generator
    if generator is not None and torch.compiler.is_compiling():
        raise ValueError("generator: torch.compile cannot trace a draw from a torch.Generator; inside a compiled "
                         "step leave it None (torch's global generator, seeded by torch.manual_seed)")
    seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=device, dtype=torch.int64)
    if group is not None:
        import torch.distributed as dist

        if dist.get_rank(group) != 0:
            seed = torch.zeros_like(seed)
        dist.all_reduce(seed, group=group)
    return seed


def _covariance_sums(cfg: PolicyConfig, logprobs, advantages, mask, generator, fused: bool):
    """Clip-Cov / KL-Cov's ``(sums, seed)``: the token sums ``[sum_m A, sum_m lp, n]`` of the covariance means
    with this rank's token count appended (``[4]``, all-reduced over ``cov_group`` with ``cov_global``; else
    None when ``fused``, as the fused C++ row kernel sums its own batch) and the seed of Clip-Cov's random pick
    (0 for KL-Cov, whose pick is deterministic: it leaves the global generator alone)."""
    if cfg.row == "clip_cov":
        seed = _clip_cov_seed(generator, logprobs.device)
    else:
        seed = torch.zeros(1, device=logprobs.device, dtype=torch.int64)
    if fused and not cfg.cov_global:
        return None, seed
    local = _ops.cov_sums(_f32(logprobs), _f32(advantages), mask, _backend.request(logprobs.device, cfg.backend))
    sums = local
    if cfg.cov_global:
        import torch.distributed as dist

        sums = local.clone()
        dist.all_reduce(sums, group=cfg.cov_group)
    return torch.cat([sums, local[2:3]]), seed


def _covariance_selection(cfg: PolicyConfig, plan: _Plan, logprobs, old_logprobs, advantages, mask,
                          generator) -> Tensor:
    """uint8 ``[B, T]``: the tokens Clip-Cov or KL-Cov picks (the selection of the row kernels that do not pick
    themselves)."""
    lp, adv = _f32(logprobs), _f32(advantages)
    cov, seed = _covariance_sums(cfg, lp, adv, mask, generator, fused=False)
    eps_low, eps_high = cfg.clip_eps
    return _ops.cov_select(lp, _f32(old_logprobs), adv, mask, sums=cov[:3], n_local=cov[3:], seed=seed,
                           mode=0 if cfg.row == "clip_cov" else 1, ratio=plan.cov_params.ratio,
                           lb=plan.cov_params.lb, ub=plan.cov_params.ub, eps_low=eps_low, eps_high=eps_high,
                           backend=_backend.request(logprobs.device, cfg.backend))


def _f32(t: Tensor) -> Tensor:
    """A detached contiguous fp32 copy of ``t`` (``t`` itself, detached, when it is one), as the covariance kernels
    read it."""
    return t.detach().float().contiguous()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    ref_logprobs: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    rollout_logprobs: Optional[Tensor] = None,
    importance_weights: Optional[Tensor] = None,
    entropy_threshold: Optional[Tensor] = None,
    global_tokens=None,
    global_seqs=None,
    generator: Optional[Union[torch.Generator, SharedSeed]] = None,
    config: Optional[PolicyConfig] = None,
    **options,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Policy-gradient loss and metrics, one fused pass per sequence (forward and d/d(logprobs)).

    The options are the fields of :class:`fastalign.PolicyConfig` (docs/math.md#policy-losses),
    given as keywords (``loss_type="grpo", eps_high=0.28``) and/or as ``config``; an unknown
    name raises ``TypeError`` with the closest valid one, an option the loss type does not use
    raises ``ValueError``.

    With ``l = lp - old``, ``rho = exp(l)`` (the sequence ratio ``exp(mean_m l)`` under
    ``importance_sampling_level="sequence"``), ``A`` the advantage and ``m`` the mask, the
    per-token loss is ``L = w * pg + kl_coef * KL (* rho under kl_rho) - entropy_coef * H``,
    ``pg`` the row of ``loss_type`` (``sg``: no gradient; docs/math.md#policy-losses has each row's edge cases
    and gradient; presets grpo, bnpo, dr_grpo, dapo, luspo, vanilla, geo_mean pick a row and an aggregation):

    * ``ppo``: ``max(-A min(rho, delta), -A clip(rho, 1 - eps_low, 1 + eps_high))``, for ``A < 0`` with
      ``dual_clip = c``: ``min(., -c A)``; ``l`` clamped to ``[-log_ratio_cap, log_ratio_cap]``
    * ``gspo``: the ppo clip of the sequence ratio ``s = exp(min(mean_m l, 10))``, per token
      ``exp(lp - sg(lp) + sg(log s))``
    * ``cispo``: ``-sg(clip(rho, cispo_low, cispo_high)) A lp``
    * ``sapo``: ``-(4 / tau) sigmoid(tau (rho - 1)) A``, ``tau = sapo_tau_pos`` if ``A > 0`` else
      ``sapo_tau_neg``
    * ``reinforce`` / ``gpg``: ``-A lp``;  ``dro``: ``-A lp + dro_beta / 2 * l^2``
    * ``gmpo``: per sequence ``-exp(mean_m c) mean_m A``, ``c`` the log-ratio clipped to
      ``[-eps_low, eps_high]`` on the side of ``A``'s sign
    * ``dppo_tv`` / ``dppo_kl``: ``-sg(min(rho, delta) k) A lp``, ``k = 1`` where the token's probability
      moved within the total-variation / binary-KL bound ``eps_high`` (``A > 0``) or ``eps_low``
    * ``vespo``: ``-sg(phi) A lp``, ``phi = exp(lambda + k log_w - lambda exp(log_w))`` of the sequence's
      summed log-ratio ``log_w``, ``(k, lambda)`` the ``_pos`` or ``_neg`` options by the sign of ``A``
    * ``clip_cov``: the ppo clip (no log-ratio clamp, no dual clip) with ``pg = 0`` at the picked tokens: a
      ``cov_ratio`` share drawn at random among the unclipped ones whose covariance
      ``(A - mean_m A)(lp - mean_m lp)`` lies in ``(cov_lb, cov_ub)``; ``kl_cov``: ``-A rho``, plus
      ``cov_kl_coef |l|`` on the top ``cov_ratio`` share by covariance
    ``w`` is detached: rollout correction (from ``rollout_logprobs``; a NaN there is a log-ratio
    of 0), ``importance_weights`` (precomputed per-token or per-sequence weights, e.g. verl's
    ``rollout_is_weights`` or TRL's ``importance_sampling_ratio``; gmpo takes their geometric
    mean per sequence, vespo folds them into its sequence weight), the entropy-quantile keep mask
    and the sequence off-policy mask (``mean_m(rollout_or_old - lp) > offpolicy_threshold`` with
    ``A < 0``). KL needs ``ref_logprobs``; the entropy bonus and ``entropy_quantile`` need
    ``entropy`` (differentiable); ``old_logprobs``, ``advantages``, ``ref_logprobs``, ``rollout_logprobs`` and
    ``importance_weights`` are constants (no gradient reaches them, as trainers compute them without one). The
    keep mask is ``H >= q_{1 - entropy_quantile}(H_valid)``, the
    linearly interpolated quantile of this batch's valid entropies; ``entropy_threshold`` (a
    one-element tensor, e.g. that quantile over every data-parallel process's valid entropies)
    replaces it: ``keep = H >= entropy_threshold`` (a NaN threshold keeps no token). It needs
    ``entropy_quantile``.

    ``global_tokens`` / ``global_seqs`` are the step-wide counts of docs/math.md#aggregation (ints or device
    tensors; with ``dp_size`` they make micro-batching and data parallelism exact): ``global_tokens`` for
    ``token-mean``, ``global_seqs`` for the seq-mean modes; a count the aggregation does not read raises);
    ``generator`` seeds the Clip-Cov choice (the default: torch's global generator; ranks holding the same
    tokens, e.g. log-probs of a vocabulary split over a group, need generators seeded alike, or a
    :class:`SharedSeed` of the group: :class:`fastalign.LinearPolicyLoss` with ``vocab_group`` passes one itself);
    the other loss types draw nothing at random (kl_cov takes the top covariances) and refuse one
    (``ValueError``); under ``torch.compile`` only the global generator traces (a ``torch.Generator`` raises).
    Under ``torch.compile`` the options are constants of the graph: a new value of a float option (a
    ``kl_coef`` schedule) compiles the step again. Inputs are ``[B, T]``
    (advantages may be ``[B]``), fp32/bf16/fp16; math is fp32.

    Returns:
        ``(loss, metrics)``: a 0-dim fp32 loss and a dict of 0-dim fp32 device tensors:
        ``clipfrac`` (``mean_m[L2 > L1]``; dppo: the tokens outside the divergence bound),
        ``clipfrac_lower`` (dual clip; dppo: kept tokens with ``rho > delta``), ``approx_kl``
        (``mean_m(-l)``); for the clipped rows ``clip_low`` (``A < 0`` and ``r < 1 - eps_low``),
        ``clip_high`` (``A > 0`` and ``r > 1 + eps_high``, ``r = min(rho, delta)``; cispo: its
        bounds), ``clip_region`` and the per-sequence ``clip_low_min`` / ``clip_high_max`` (token
        means over non-empty sequences; at sequence level one value per sequence, means over
        every sequence); ``kl`` (the KL term before ``kl_coef``), ``entropy``,
        ``cov_selected_frac``, ``phi_mean`` (vespo: with ``[B]`` advantages the mean over sequences of the
        sequence's ``phi``, with ``[B, T]`` advantages the mean over valid tokens of ``phi_t``, ``(k, lambda)``
        by the sign of ``A_t``, 0 when no token is valid) when computed; ``kl_term`` / ``entropy_term``: the
        KL and entropy aggregated like the loss (before their coefficients); with
        ``entropy_agg="token-mean"``, ``policy_term`` (the loss before the entropy bonus). Nothing
        synchronises with the host.
    """
    cfg = PolicyConfig.make(config, **options)
    plan = _plan(cfg)
    loss_type, agg = plan.row, plan.agg
    # ---------------- host-side validation (shapes, dtypes, options only) ----------------
    _validate.floating("logprobs", logprobs, dim=2)
    shape = tuple(logprobs.shape)
    if loss_type in ("clip_cov", "kl_cov") and logprobs.numel() >= 2 ** 32:
        raise ValueError(f"loss_type {loss_type!r} selects among fewer than 2**32 tokens per call (a token's "
                         f"position is a 32-bit key), got logprobs of shape {shape}: split the batch")
    _validate.floating("old_logprobs", old_logprobs, dim=2)
    _validate.shape("old_logprobs", old_logprobs, shape, "logprobs.shape")
    _validate.floating("advantages", advantages)
    per_sequence_advantages = advantages.dim() == 1
    if advantages.dim() == 1:
        _validate.shape("advantages", advantages, shape[:1], "[B] or logprobs.shape")
        advantages = advantages[:, None].expand(shape)
    _validate.shape("advantages", advantages, shape, "logprobs.shape (or [B])")
    _validate.real("response_mask", response_mask, dim=2)
    _validate.shape("response_mask", response_mask, shape, "logprobs.shape")
    mask, fractional = _mask_u8(response_mask)
    check_counts(agg, global_tokens, global_seqs)
    _validate.counts(global_tokens=global_tokens, global_seqs=global_seqs, dp_size=cfg.dp_size, max_len=cfg.max_len)
    for name, t in (("ref_logprobs", ref_logprobs), ("entropy", entropy), ("rollout_logprobs", rollout_logprobs)):
        if t is not None:
            _validate.floating(name, t, dim=2)
            _validate.shape(name, t, shape, "logprobs.shape")
    if importance_weights is not None:
        _validate.floating("importance_weights", importance_weights)
        importance_weights = _expand_weights(importance_weights, shape)
    _validate.same_device(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                          response_mask=response_mask, ref_logprobs=ref_logprobs, entropy=entropy,
                          rollout_logprobs=rollout_logprobs, importance_weights=importance_weights)
    check_read("generator", generator is not None, cfg.loss_type, (loss_type,), ("clip_cov",))
    if cfg.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if ref_logprobs is None and plan.kl_options_set:
        raise ValueError(f"{plan.kl_options_set[0]} applies only with the KL term (ref_logprobs), "
                         f"got {plan.kl_options_set[0]}={getattr(cfg, plan.kl_options_set[0])!r}")
    if cfg.entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if cfg.rollout_correction is not None and rollout_logprobs is None:
        raise ValueError("rollout_correction needs rollout_logprobs")
    if rollout_logprobs is not None and cfg.rollout_correction is None and cfg.offpolicy_threshold is None:
        raise ValueError("rollout_logprobs is used only with rollout_correction or offpolicy_threshold")
    if cfg.entropy_quantile is not None and entropy is None:
        raise ValueError("entropy_quantile needs entropy")
    if entropy_threshold is not None:
        _validate.any_float("entropy_threshold", entropy_threshold)
        if entropy_threshold.numel() != 1:
            raise ValueError(f"entropy_threshold must hold one value, got shape {tuple(entropy_threshold.shape)}")
        if cfg.entropy_quantile is None:
            raise ValueError("entropy_threshold is used only with entropy_quantile (it replaces the batch's quantile)")
        _validate.same_device(logprobs=logprobs, entropy_threshold=entropy_threshold)

    name = _backend.backend_for("policy_loss_rows", logprobs.device, cfg.backend)

    # ---------------- inputs for the kernels ----------------
    def prep(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        if name == "cpp" and t.dtype != torch.float32:
            t = t.float()
        return t.contiguous()

    lp = prep(logprobs)
    old = prep(_detached(old_logprobs))
    adv = prep(_detached(advantages))
    ref = prep(_detached(ref_logprobs))
    ent = prep(entropy)
    roll = prep(_detached(rollout_logprobs))
    keep = ent_keep = None
    if cfg.entropy_quantile is not None and logprobs.numel() > 0:
        keep = ent_keep = _entropy_keep(entropy, mask.bool(), float(cfg.entropy_quantile), entropy_threshold)
    iw = None
    if importance_weights is not None:
        w = importance_weights.detach().float()
        if loss_type in ("gmpo", "vespo"):  # enter through the sequence weight
            iw = w.contiguous()
        else:  # multiply the policy term like the keep mask
            keep = (w if keep is None else keep * w).contiguous()

    entropy_in_kernel, params = plan.entropy_in_kernel, plan.params
    is_cov = loss_type in ("clip_cov", "kl_cov")
    if is_cov and name == "cpp":
        # covariance sums, selection and loss in one compiled call (no selection mask, no key pass)
        cov, seed = _covariance_sums(cfg, logprobs, advantages, mask, generator, fused=True)
        want_dlp = torch.is_grad_enabled() and (logprobs.requires_grad or (ent is not None and ent.requires_grad))
        row, _dlp, ext = _ops.cov_rows(lp, old, adv, mask, ref, ent, roll, keep, cov, seed, params, want_dlp)
    else:
        sel = _covariance_selection(cfg, plan, logprobs, old_logprobs, advantages, mask, generator) if is_cov \
            else None
        row, _dlp, ext = _ops.rows(lp, old, adv, mask, ref, ent, roll, keep, iw, sel, params, name)

    # ---------------- aggregation and metrics on [B] rows (device only) ----------------
    rd = row.detach()
    # the token counts of a bool mask are whole numbers
    aggregate = RowAggregation(rd[:, 1], agg, shape[1], global_tokens, global_seqs, cfg.dp_size, cfg.max_len,
                               whole_counts=True, seq_count=plan.seq_count)
    loss = aggregate(row[:, 0])
    if ref_logprobs is not None or entropy is not None:  # KL and entropy aggregated like the loss
        terms = aggregate(rd[:, 5:7])
    tot = rd.sum(0)
    per = (tot / whole_divisor(tot[1])).unbind(0)  # every column over the valid count, one division
    metrics = {"clipfrac": per[2], "clipfrac_lower": per[3], "approx_kl": per[4]}
    if plan.clip_metrics:
        metrics.update(_clip_metrics(rd, ext, per, cfg.sequence_level and per_sequence_advantages))
    if ref_logprobs is not None:
        metrics["kl"] = per[5]
        metrics["kl_term"] = terms[0]
    if entropy is not None:
        metrics["entropy"] = per[6]
        if entropy_in_kernel:
            metrics["entropy_term"] = terms[1]
    if is_cov:
        metrics["cov_selected_frac"] = per[7]
    if loss_type == "vespo":  # [B] advantages: the mean over sequences of phi; [B, T]: over valid tokens of phi_t
        metrics["phi_mean"] = rd[:, 10].sum() / max(shape[0], 1) if per_sequence_advantages else per[7]
    if cfg.entropy_coef != 0.0 and not entropy_in_kernel:
        # coef * token-mean(H) over the kept tokens, independent of the loss aggregation
        metrics["policy_term"] = loss.detach()
        kept = mask.to(torch.float32) if ent_keep is None else mask.to(torch.float32) * ent_keep
        h = torch.where(kept > 0, entropy.float(), torch.zeros((), device=kept.device))
        loss = loss - cfg.entropy_coef * (h * kept).sum() / divisor(kept.sum())
    # a fractional mask whose values were not read: NaN loss and gradients, not a binarised mask's
    return _validate.nan_if(fractional, loss), metrics


class PolicyLoss(FixedOptions, nn.Module):
    """``fastalign.policy_loss`` with a fixed configuration: ``PolicyLoss(loss_type="grpo", eps_high=0.28)``
    or ``PolicyLoss(config=PolicyConfig(...))``. The configuration is validated here, at construction.

    ``forward(logprobs, old_logprobs, advantages, response_mask, **per_call)`` returns
    ``(loss, metrics)``; per-call keywords are the tensors and counts of :func:`policy_loss`
    (``ref_logprobs``, ``entropy``, ``global_tokens``, ...) or configuration fields that
    override the configuration for that call. Assigning a field to the module (``loss.eps_high = 0.28``) raises
    ``AttributeError``: build a new module, or assign ``loss.config`` a new :class:`PolicyConfig`.
    """

    _PER_CALL = True

    def __init__(self, config: Optional[PolicyConfig] = None, **options):
        super().__init__()
        self.config = PolicyConfig.make(config, "PolicyLoss", **options)
        self._fix_options(FIELDS)  # an option is a field of self.config (or a per-call override)

    def forward(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
                **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        return policy_loss(logprobs, old_logprobs, advantages, response_mask, config=self.config, **kwargs)

    def extra_repr(self) -> str:
        default = PolicyConfig()
        return ", ".join(f"{f}={getattr(self.config, f)!r}" for f in FIELDS
                         if getattr(self.config, f) != getattr(default, f) or f == "loss_type")
