"""Policy-gradient losses of the PPO / GRPO family, fused (docs/math.md#policy-losses)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fastalign import _backend, _validate
from fastalign.aggregate import aggregate_rows, check_agg
from fastalign.kl import canonical_kl
from fastalign.ops import policy_loss as _ops

LOSS_TYPES = ("ppo", "gspo", "cispo", "sapo", "reinforce", "gpg", "gmpo", "clip_cov", "kl_cov")
# Trainer names -> (loss type, aggregation); dapo expects global_tokens for the step-wide token mean.
PRESETS = {
    "vanilla": ("ppo", None),
    "grpo": ("ppo", "seq-mean-token-mean"),
    "bnpo": ("ppo", "token-mean"),
    "dr_grpo": ("ppo", "seq-mean-token-sum-norm"),
    "dapo": ("ppo", "token-mean"),
    "geo_mean": ("gmpo", None),
    "gpg": ("reinforce", None),
}
ROLLOUT_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop")


def _mask_u8(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask.contiguous().view(torch.uint8)
    return (mask != 0).contiguous().view(torch.uint8)


def _entropy_keep(entropy: Tensor, valid: Tensor, q: float) -> Tensor:
    """1.0 where H >= the (1 - q) quantile (linear interpolation) of the valid entropies; on the device."""
    h = entropy.detach().float()
    flat = torch.where(valid, h, torch.full_like(h, math.inf)).flatten()
    s = torch.sort(flat).values
    n = valid.sum().to(torch.float32)
    pos = (1.0 - q) * (n - 1.0).clamp(min=0.0)
    lo = pos.floor()
    hi = pos.ceil()
    v_lo = s.gather(0, lo.long().reshape(1))
    v_hi = s.gather(0, hi.long().reshape(1))
    thr = v_lo + (v_hi - v_lo) * (pos - lo)
    return (h >= thr).to(torch.float32).contiguous()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    loss_type: str = "ppo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: Optional[float] = None,
    delta: Optional[float] = None,
    agg: Optional[str] = None,
    ref_logprobs: Optional[Tensor] = None,
    kl_type: str = "k3",
    kl_coef: float = 0.0,
    kl_clamp: bool = True,
    kl_rho: bool = False,
    entropy: Optional[Tensor] = None,
    entropy_coef: float = 0.0,
    rollout_logprobs: Optional[Tensor] = None,
    rollout_correction: Optional[str] = None,
    rollout_min: float = 0.5,
    rollout_max: float = 2.0,
    entropy_quantile: Optional[float] = None,
    offpolicy_threshold: Optional[float] = None,
    cispo_bounds: Optional[tuple] = None,
    sapo_tau: tuple = (1.0, 1.05),
    cov_ratio: float = 2e-4,
    cov_lb: float = 1.0,
    cov_ub: float = 5.0,
    cov_kl_coef: float = 1.0,
    cov_global: bool = False,
    cov_group=None,
    generator: Optional[torch.Generator] = None,
    global_tokens=None,
    global_seqs=None,
    dp_size: int = 1,
    max_len: Optional[int] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, dict]:
    r"""Policy-gradient loss and metrics, one fused pass per sequence (forward and d/d(logprobs)).

    With ``l = lp - old``, ``rho = exp(l)``, ``A`` the advantage and ``m`` the mask, the
    per-token loss is ``L = w * pg + kl_coef * KL - entropy_coef * H`` where ``pg`` is the
    row of ``loss_type`` (docs/math.md#policy-losses):

    * ``ppo``: ``max(-A min(rho, delta), -A clip(rho, 1-eps_low, 1+eps_high))`` with ``l``
      clamped to [-20, 20]; for ``A < 0`` and ``dual_clip=c``: ``min(., -c A)``.
    * ``gspo``: ppo clip on the sequence ratio ``exp(mean_m l)`` (log capped at 10) with the
      per-token gradient ``rho``; aggregation forced to seq-mean-token-mean.
    * ``cispo``: ``-sg(clip(rho, lo, hi)) A lp``, ``cispo_bounds=(lo, hi)`` (default ``1 -/+ eps``).
    * ``sapo``: ``-(4/tau) sigmoid(tau (rho - 1)) A``, ``tau = sapo_tau[0]`` if A > 0 else ``sapo_tau[1]``.
    * ``reinforce`` / ``gpg``: ``-A lp``.
    * ``gmpo``: ``-exp(mean_m c) mean_m A`` per sequence, ``c`` the sign-aware clipped ``l``;
      aggregation forced to seq-mean-token-mean.
    * ``clip_cov``: ppo clip (no clamps, no dual clip); ``n = max(floor(cov_ratio n_valid), 1)``
      random candidates (valid, unclipped, ``cov_lb < cov < cov_ub``, ``cov = (A - mean A)(lp - mean lp)``)
      get ``pg = 0`` (they still count in the denominators).
    * ``kl_cov``: ``-A rho`` plus ``cov_kl_coef |l|`` on the top ``k`` tokens by cov (ties: lower index).

    TRL names are presets: ``grpo`` (ppo, seq-mean-token-mean), ``bnpo`` (ppo, token-mean),
    ``dr_grpo`` (ppo, seq-mean-token-sum-norm), ``dapo`` (ppo, token-mean; pass
    ``global_tokens``), ``vanilla``, ``gpg``, ``geo_mean``.

    The detached weight ``w`` multiplies ``pg`` only: rollout correction
    (``rollout_correction`` in token_truncate / token_mask / sequence_truncate / sequence_mask /
    icepop, ``r = exp(old - rollout_logprobs)``, bounds ``rollout_min``/``rollout_max``), the
    entropy-quantile mask (keep ``H >=`` the ``1 - entropy_quantile`` quantile) and the sequence
    off-policy mask (drop rows with ``mean A < 0`` and ``mean(old - lp) > offpolicy_threshold``).
    KL (``kl_type`` k1/abs/k2/k3, ``NAME+`` straight-through; ``kl_rho`` multiplies by ``sg(rho)``)
    needs ``ref_logprobs``; the entropy bonus needs ``entropy`` (differentiable).

    ``agg`` is one of docs/math.md#aggregation (default token-mean) with ``global_tokens``, ``global_seqs`` and
    ``dp_size`` for exact micro-batch / data-parallel normalisation. Clip-Cov / KL-Cov
    selection runs on the device (C++ on CPU, CUDA radix select on GPU) with a seed drawn from
    ``generator``; ``cov_global=True`` all-reduces the covariance means over ``cov_group``.

    Inputs are ``[B, T]`` (advantages may be ``[B]``), fp32/bf16/fp16; math is fp32.

    Returns:
        ``(loss, metrics)``: a 0-dim fp32 loss and a dict of 0-dim fp32 device tensors
        (``clipfrac``, ``clipfrac_lower``, ``approx_kl``, plus ``kl``, ``entropy``,
        ``cov_selected_frac`` when computed). Nothing synchronises with the host.
    """
    # ---------------- host-side validation (shapes, dtypes, options only) ----------------
    if loss_type in PRESETS:
        loss_type, preset_agg = PRESETS[loss_type]
        agg = agg if agg is not None else preset_agg
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES + tuple(PRESETS)}, got {loss_type!r}")
    if loss_type == "gpg":
        loss_type = "reinforce"
    agg = check_agg(agg if agg is not None else "token-mean")
    if loss_type in ("gspo", "gmpo"):
        agg = "seq-mean-token-mean"
    _validate.floating("logprobs", logprobs, dim=2)
    shape = tuple(logprobs.shape)
    _validate.floating("old_logprobs", old_logprobs, dim=2)
    _validate.shape("old_logprobs", old_logprobs, shape, "logprobs.shape")
    _validate.floating("advantages", advantages)
    if advantages.dim() == 1:
        _validate.shape("advantages", advantages, shape[:1], "[B] or logprobs.shape")
        advantages = advantages[:, None].expand(shape)
    _validate.shape("advantages", advantages, shape, "logprobs.shape (or [B])")
    _validate.tensor("response_mask", response_mask, dim=2)
    _validate.shape("response_mask", response_mask, shape, "logprobs.shape")
    for name, t in (("ref_logprobs", ref_logprobs), ("entropy", entropy), ("rollout_logprobs", rollout_logprobs)):
        if t is not None:
            _validate.floating(name, t, dim=2)
            _validate.shape(name, t, shape, "logprobs.shape")
    _validate.same_device(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                          response_mask=response_mask, ref_logprobs=ref_logprobs, entropy=entropy,
                          rollout_logprobs=rollout_logprobs)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if delta is not None and not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    kl_base, kl_straight = canonical_kl(kl_type)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if rollout_correction is not None:
        if rollout_correction not in ROLLOUT_MODES:
            raise ValueError(f"rollout_correction must be one of {ROLLOUT_MODES}, got {rollout_correction!r}")
        if rollout_logprobs is None:
            raise ValueError("rollout_correction needs rollout_logprobs")
    if entropy_quantile is not None:
        if entropy is None:
            raise ValueError("entropy_quantile needs entropy")
        if not 0.0 < entropy_quantile <= 1.0:
            raise ValueError(f"entropy_quantile must lie in (0, 1], got {entropy_quantile}")
    if not (isinstance(dp_size, int) and dp_size >= 1):
        raise ValueError(f"dp_size must be an int >= 1, got {dp_size!r}")
    if loss_type in ("clip_cov", "kl_cov") and not cov_ratio > 0:
        raise ValueError(f"cov_ratio must be > 0, got {cov_ratio}")
    lo, hi = cispo_bounds if cispo_bounds is not None else (1.0 - eps_low, 1.0 + eps_high)

    name = _backend.resolve(logprobs.device, backend)
    if name == "cuda":  # the fused per-token loss is a Triton kernel on the GPU
        name = "triton"

    # ---------------- inputs for the kernels ----------------
    def prep(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        if name == "cpp" and t.dtype != torch.float32:
            t = t.float()
        return t.contiguous()

    mask = _mask_u8(response_mask)
    lp = prep(logprobs)
    old = prep(old_logprobs.detach())
    adv = prep(advantages.detach())
    ref = prep(None if ref_logprobs is None else ref_logprobs.detach())
    ent = prep(entropy)
    roll = prep(None if rollout_logprobs is None else rollout_logprobs.detach())
    keep = None
    if entropy_quantile is not None and logprobs.numel() > 0:
        keep = _entropy_keep(entropy, mask.bool(), float(entropy_quantile))

    offpol = math.inf if offpolicy_threshold is None else float(offpolicy_threshold)
    fparams = [float(eps_low), float(eps_high), float(dual_clip or 0.0), float(delta or 0.0), float(lo), float(hi),
               float(sapo_tau[0]), float(sapo_tau[1]), float(kl_coef), float(entropy_coef), float(rollout_min),
               float(rollout_max), offpol, float(cov_kl_coef)]
    is_cov = loss_type in ("clip_cov", "kl_cov")
    sel = None
    if is_cov:
        seed = torch.randint(0, 2 ** 62, (1,), generator=generator, device=logprobs.device, dtype=torch.int64)
        f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
        cov = sums = n_local = None
        if cov_global or name != "cpp":
            lp_d, adv_d = f32(logprobs), f32(advantages)
        if cov_global:
            import torch.distributed as dist

            sums = _ops.cov_sums(lp_d, adv_d, mask)
            n_local = sums[2:3].clone()
            sums = sums.clone()
            dist.all_reduce(sums, group=cov_group)
            cov = torch.cat([sums, n_local])
    if is_cov and name == "cpp":
        # covariance sums, selection and loss in one compiled call (no selection mask, no key pass)
        want_dlp = torch.is_grad_enabled() and (logprobs.requires_grad or (ent is not None and ent.requires_grad))
        iparams = [_ops.LOSS_CODES[loss_type], _ops.KL_CODES[kl_base], int(kl_straight), int(bool(kl_clamp)),
                   int(bool(kl_rho)), _ops.ROLLOUT_CODES[rollout_correction], int(want_dlp)]
        row, _dlp = _ops.cov_rows(lp, old, adv, mask, ref, ent, roll, keep, cov, seed, iparams,
                                  fparams + [float(cov_ratio), float(cov_lb), float(cov_ub)])
    else:
        if is_cov:
            if sums is None:
                sums = _ops.cov_sums(lp_d, adv_d, mask)
                n_local = sums[2:3].clone()
            sel = _ops.cov_select(lp_d, f32(old_logprobs), adv_d, mask, sums, n_local, seed,
                                  0 if loss_type == "clip_cov" else 1, float(cov_ratio), float(cov_lb),
                                  float(cov_ub), float(eps_low), float(eps_high))
        need_rows = (loss_type in ("gspo", "gmpo") or offpolicy_threshold is not None
                     or rollout_correction in ("sequence_truncate", "sequence_mask"))
        # d(loss)/dH = -entropy_coef * mask is rebuilt in backward from the mask (no [B, T] buffer)
        want_dh = False
        row, _dlp, _dh = _ops.rows(
            lp, old, adv, mask, ref, ent, roll, keep, sel, _ops.LOSS_CODES[loss_type], _ops.KL_CODES[kl_base],
            kl_straight, bool(kl_clamp), bool(kl_rho), _ops.ROLLOUT_CODES[rollout_correction], fparams, need_rows,
            want_dh, name)

    # ---------------- aggregation and metrics on [B] rows (device only) ----------------
    row_n = row[:, 1].detach()
    loss = aggregate_rows(row[:, 0], row_n, agg, shape[1], global_tokens, global_seqs, dp_size, max_len)
    tot = row.detach().sum(0)
    per = (tot / tot[1].clamp(min=1.0)).unbind(0)  # every column over the valid count, one division
    metrics = {"clipfrac": per[2], "clipfrac_lower": per[3], "approx_kl": per[4]}
    if ref_logprobs is not None:
        metrics["kl"] = per[5]
    if entropy is not None:
        metrics["entropy"] = per[6]
    if is_cov:
        metrics["cov_selected_frac"] = per[7]
    return loss, metrics


class PolicyLoss(nn.Module):
    """``fastalign.policy_loss`` with a fixed configuration: ``PolicyLoss(loss_type="grpo", eps_high=0.28)``.

    ``forward(logprobs, old_logprobs, advantages, response_mask, **per_call)`` returns
    ``(loss, metrics)``; per-call keywords (``ref_logprobs``, ``entropy``, ``global_tokens``, ...)
    override the configuration.
    """

    def __init__(self, **config):
        super().__init__()
        self.config = dict(config)
        lt = self.config.get("loss_type", "ppo")
        if lt not in LOSS_TYPES and lt not in PRESETS:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES + tuple(PRESETS)}, got {lt!r}")

    def forward(self, logprobs, old_logprobs, advantages, response_mask, **kwargs):
        return policy_loss(logprobs, old_logprobs, advantages, response_mask, **{**self.config, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items() if not isinstance(v, torch.Tensor))
