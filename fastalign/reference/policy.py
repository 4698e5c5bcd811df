"""Plain PyTorch policy-gradient losses, KL estimators and aggregations (docs/math.md#kl-estimators to #aggregation).

Written straight from the formulas, one tensor op at a time, dtype-preserving
(pass float64 for an oracle). The benchmark baseline and the test oracle of
:func:`fastalign.policy_loss`; never called by the product path.

Tie rules (where two branches are equal the fused kernels pick the same one):
``max(L1, L2)`` takes L1 unless ``L2 > L1``; the dual clip takes ``-c A`` only when
``L > -c A``. Clamps pass the gradient at their boundaries (as ``torch.clamp``). The kernels' ratio
``exp(l)`` may differ by one ulp between backends, so a ratio within one ulp of a clip bound may fall on
either side of it (docs/math.md#policy-losses).
"""
from __future__ import annotations

import math

import torch


def kl_penalty(lp, ref, kind="k3", clamp=True):
    """Per-token KL estimator of docs/math.md#kl-estimators (x = ref - lp)."""
    straight = kind.endswith("+")
    base = kind[:-1] if straight else kind
    base = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}.get(base, base)
    d = lp - ref
    if base == "k1":
        v = d
    elif base == "abs":
        v = d.abs()
    elif base == "k2":
        v = 0.5 * d * d
    elif base == "k3":
        x = ref - lp
        if clamp:
            x = torch.clamp(x, -20.0, 20.0)
        v = torch.expm1(x) - x  # exp(x) - x - 1 without its cancellation near 0 (float64: rel. error ~1e-16 / |x|)
        if clamp:
            v = torch.clamp(v, -10.0, 10.0)
    else:
        raise ValueError(kind)
    if straight:  # k2's gradient; none at an infinite d (the value stays NAME's)
        d_grad = torch.where(torch.isinf(d), 0.0, d)
        k2 = 0.5 * d_grad * d_grad
        v = k2 - k2.detach() + v.detach()
    return v


def _divisor(n):
    """A zero count divides as 1 (the mean of nothing is 0), any positive one as it is."""
    return torch.where(n > 0, n, torch.ones_like(n))


def aggregate_loss(L, m, agg="token-mean", global_tokens=None, global_seqs=None, dp_size=1, max_len=None,
                   seq_count=None):
    """docs/math.md#aggregation aggregations; ``seq_count`` ("all" / "nonempty"; None: "all" for
    seq-mean-token-sum-norm, else "nonempty"): the rows of the local sequence count."""
    m = m.to(L.dtype)
    if seq_count is None:
        seq_count = "all" if agg == "seq-mean-token-sum-norm" else "nonempty"
    if seq_count == "all" and global_seqs is None and agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        global_seqs = L.shape[0]
    if seq_count == "nonempty" and global_seqs is None and agg == "seq-mean-token-sum-norm":
        global_seqs, dp_size = int((m.sum(-1) > 0).sum()), 1  # local rows: no dp factor, as without global_seqs
    if agg == "token-mean":
        n = m.sum() if global_tokens is None else torch.as_tensor(global_tokens, dtype=L.dtype)
        return (m * L).sum() / _divisor(n) * dp_size
    if agg == "token-sum":
        return (m * L).sum() * dp_size
    row_n = m.sum(-1)
    nseq = (row_n > 0).sum().to(L.dtype) if global_seqs is None else torch.as_tensor(global_seqs, dtype=L.dtype)
    nseq = _divisor(nseq)
    if agg == "seq-mean-token-sum":
        return (m * L).sum(-1).sum() / nseq * dp_size
    if agg == "seq-mean-token-mean":
        per = (m * L).sum(-1) / _divisor(row_n)
        return per.sum() / nseq * dp_size
    if agg == "seq-mean-token-sum-norm":
        lmax = L.shape[-1] if max_len is None else max_len
        if global_seqs is None:
            return (m * L).sum() / max(L.shape[0] * lmax, 1)
        return (m * L).sum() / _divisor(torch.as_tensor(float(global_seqs) * lmax, dtype=L.dtype)) * dp_size
    raise ValueError(agg)


def _masked_mean(x, m):
    return (x * m).sum() / _divisor(m.sum())


def _row_mean(x, m):
    return (x * m).sum(-1) / _divisor(m.sum(-1))


def entropy_quantile_mask(H, m, q, threshold=None):
    """1 where H >= the (1 - q) quantile (linear interpolation) of the valid entropies (or ``threshold``)."""
    if threshold is not None:
        return (H.detach() >= threshold).to(H.dtype)
    vals = H.detach()[m.bool()]
    if vals.numel() == 0:
        return torch.zeros_like(H)
    thr = torch.quantile(vals.double(), 1.0 - q).to(H.dtype)
    return (H.detach() >= thr).to(H.dtype)


def cov_selection(lp, old, A, m, *, loss_type, eps_low, eps_high, ratio, lb, ub, keys=None, means=None):
    """Tokens picked by Clip-Cov / KL-Cov (docs/math.md#clip-cov-and-kl-cov); ``keys`` are the random keys for clip_cov.

    clip_cov: the n candidates with the smallest key (ties: lower index); kl_cov: the
    top-k valid tokens by cov (ties: lower index). Loops are fine here.
    """
    lp, old, A, m = lp.detach().double(), old.detach().double(), A.double(), m.double()
    mask = m > 0
    n_valid = int(mask.sum())
    sel = torch.zeros_like(lp, dtype=torch.bool)
    if n_valid == 0:
        return sel
    if means is None:
        mA = (A * m).sum() / n_valid
        mlp = (lp * m).sum() / n_valid
    else:  # (mean A, mean lp), e.g. over all data-parallel ranks
        mA, mlp = means
    cov = ((A - mA) * (lp - mlp)).flatten()
    k = max(int(math.floor(ratio * n_valid)), 1)
    flat_mask = mask.flatten()
    if loss_type == "clip_cov":
        rho = torch.exp(lp - old)
        L1 = -A * rho
        L2 = -A * torch.clamp(rho, 1 - eps_low, 1 + eps_high)
        cand = flat_mask & (L2 <= L1).flatten() & (cov > lb) & (cov < ub)
        idx = [i for i in range(cov.numel()) if cand[i]]
        if keys is not None:  # without keys only "every candidate picked" is defined
            idx.sort(key=lambda i: (float(keys.flatten()[i]), i))
    else:
        idx = [i for i in range(cov.numel()) if flat_mask[i]]
        idx.sort(key=lambda i: (-float(cov[i]), i))
    sel.view(-1)[idx[:k]] = True
    return sel


def _nan_min(x):
    x = x[~torch.isnan(x)]
    return x.min() if x.numel() else torch.tensor(math.nan, dtype=x.dtype)


def policy_loss(
    lp, old, A, m, *, loss_type="ppo", eps_low=0.2, eps_high=0.2, dual_clip=None, delta=None,
    agg=None, importance_sampling_level="token", ref_logprobs=None, kl_type="k3", kl_coef=0.0,
    kl_clamp=True, kl_rho=False, entropy=None, entropy_coef=0.0, entropy_agg="loss", rollout_logprobs=None,
    rollout_correction=None, rollout_min=None, rollout_max=2.0, entropy_quantile=None, offpolicy_threshold=None,
    importance_weights=None, cispo_low=None, cispo_high=None, sapo_tau_pos=None, sapo_tau_neg=None,
    vespo_k_pos=None, vespo_k_neg=None, vespo_lambda_pos=None, vespo_lambda_neg=None, cov_selected=None,
    cov_kl_coef=1.0, seq_count=None, global_tokens=None, global_seqs=None, dp_size=1, max_len=None, dro_beta=None,
    entropy_threshold=None, log_ratio_cap=20.0,
):
    """(loss, metrics) of docs/math.md#policy-losses with the added terms and the aggregation.

    ``loss_type`` is a row (ppo, gspo, cispo, sapo, reinforce, gmpo, clip_cov, kl_cov, vespo, dppo_tv,
    dppo_kl, dro); for dppo ``delta`` is the detached truncation of the ratio and ``clipfrac_lower``
    the fraction of kept tokens it truncates;
    ``cov_selected`` (bool [B, T]) are the Clip-Cov / KL-Cov picks (see :func:`cov_selection`).
    ``importance_sampling_level="sequence"``: the ratio is ``exp(mean_m l)`` per sequence, with
    its gradient through every token of the sequence. The ratio's log (the token's, or the sequence mean)
    is clamped to ``[-log_ratio_cap, log_ratio_cap]`` (``math.inf``: not clamped). The row options left None
    take ``fastalign.PolicyConfig``'s defaults: ``cispo_low`` / ``cispo_high`` ``1 - eps_low`` / ``1 + eps_high``,
    ``sapo_tau_pos`` / ``sapo_tau_neg`` 1.0 / 1.05, ``vespo_k_pos`` / ``vespo_k_neg`` 2 / 3,
    ``vespo_lambda_pos`` / ``vespo_lambda_neg`` 3 / 2.
    """
    pick = lambda v, d: d if v is None else v  # noqa: E731
    sapo_tau = (pick(sapo_tau_pos, 1.0), pick(sapo_tau_neg, 1.05))  # (A > 0, otherwise)
    vespo_k = (pick(vespo_k_pos, 2.0), pick(vespo_k_neg, 3.0))  # (A >= 0, otherwise)
    vespo_lambda = (pick(vespo_lambda_pos, 3.0), pick(vespo_lambda_neg, 2.0))
    m = m.to(lp.dtype)
    A = A.to(lp.dtype)
    per_sequence_advantages = A.dim() == 1
    if A.dim() == 1:
        A = A[:, None].expand_as(lp)
    old = old.to(lp.dtype)
    l = lp - old
    B = lp.shape[0]
    metrics = {}
    zero = torch.zeros((), dtype=lp.dtype)
    clipped = torch.zeros_like(lp)
    lower = torch.zeros_like(lp)
    clip_low = torch.zeros_like(lp)
    clip_high = torch.zeros_like(lp)
    row_n = m.sum(-1)
    seq_level = importance_sampling_level == "sequence"
    if seq_level:
        rho_is = torch.exp(torch.clamp(_row_mean(l, m), -log_ratio_cap, log_ratio_cap))[:, None].expand_as(lp)
    else:
        rho_is = torch.exp(torch.clamp(l, -log_ratio_cap, log_ratio_cap))
    iw = None
    if importance_weights is not None:
        iw = importance_weights.to(lp.dtype).detach()
        iw = iw[:, None] if iw.dim() == 1 else iw
        iw = iw.expand_as(lp)
    phi_row = None

    if loss_type in ("ppo", "clip_cov", "gspo"):
        if loss_type == "gspo":
            log_s = ((m * l).sum(-1) / torch.clamp(row_n, min=1)).detach()
            rho = torch.exp(torch.clamp(lp - lp.detach() + log_s[:, None], max=10.0))  # no gradient past the cap
        elif loss_type == "ppo":
            rho = rho_is
        elif cov_selected is None:
            rho = torch.exp(l)
        else:  # a picked token passes no gradient, even where exp(l) overflows (0 * inf)
            picked = cov_selected.to(torch.bool)
            rho = torch.where(picked, torch.exp(l.detach()), torch.exp(l.masked_fill(picked, 0.0)))
        rho_1 = torch.where(rho > delta, torch.full_like(rho, delta), rho) if delta is not None else rho
        L1 = -A * rho_1
        L2 = -A * torch.clamp(rho, 1 - eps_low, 1 + eps_high)
        pg = torch.where(L2 > L1, L2, L1)
        clipped = (L2 > L1).to(lp.dtype)
        clip_low = ((A < 0) & (rho_1 < 1 - eps_low)).to(lp.dtype)
        clip_high = ((A > 0) & (rho_1 > 1 + eps_high)).to(lp.dtype)
        if loss_type == "ppo" and dual_clip is not None:
            L3 = -dual_clip * A
            lower = ((A < 0) & (pg > L3)).to(lp.dtype)
            pg = torch.where((A < 0) & (pg > L3), L3, pg)
        if loss_type == "clip_cov" and cov_selected is not None:
            pg = torch.where(cov_selected.to(torch.bool), zero, pg)
    elif loss_type == "kl_cov":
        rho = torch.exp(l)
        pg = -A * rho
        if cov_selected is not None:
            pg = pg + cov_kl_coef * l.abs() * cov_selected.to(lp.dtype)
    elif loss_type == "cispo":
        lo, hi = pick(cispo_low, 1 - eps_low), pick(cispo_high, 1 + eps_high)
        rho = rho_is.detach()
        w = torch.clamp(rho, lo, hi)
        clipped = ((rho < lo) | (rho > hi)).to(lp.dtype)
        clip_low = ((A < 0) & (rho < lo)).to(lp.dtype)
        clip_high = ((A > 0) & (rho > hi)).to(lp.dtype)
        pg = -w * A * lp
    elif loss_type == "sapo":
        tau = torch.where(A > 0, torch.full_like(A, sapo_tau[0]), torch.full_like(A, sapo_tau[1]))
        pg = -(4.0 / tau) * torch.sigmoid(tau * (rho_is - 1.0)) * A
    elif loss_type in ("reinforce", "gpg"):
        pg = -A * lp
    elif loss_type == "vespo":
        log_lo = math.log(1e-8)
        log_w = (m * torch.clamp(l, -20.0, 20.0)).sum(-1)
        if iw is not None:
            log_w = log_w + (m * torch.clamp(torch.log(iw), log_lo, 20.0)).sum(-1)
        log_w = torch.clamp(log_w, log_lo, 20.0).detach()[:, None]

        def phi_of(pos):
            k = torch.where(pos, torch.full_like(pos, vespo_k[0], dtype=lp.dtype),
                            torch.full_like(pos, vespo_k[1], dtype=lp.dtype))
            lam = torch.where(pos, torch.full_like(pos, vespo_lambda[0], dtype=lp.dtype),
                              torch.full_like(pos, vespo_lambda[1], dtype=lp.dtype)).clamp(min=1e-4)
            return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

        phi = phi_of(A >= 0)
        phi_row = phi_of((_row_mean(A, m) >= 0)[:, None])[:, 0]
        pg = -phi * A * lp
    elif loss_type in ("dppo_tv", "dppo_kl"):
        p, p_old = torch.exp(lp.detach()), torch.exp(old)
        if loss_type == "dppo_tv":
            ok_pos, ok_neg = p - p_old <= eps_high, p - p_old >= -eps_low
        else:
            d = p_old * (old - lp.detach()) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
            ok_pos, ok_neg = (d <= eps_high) | (p <= p_old), (d <= eps_low) | (p >= p_old)
        keep_t = torch.where(A > 0, ok_pos, ok_neg).to(lp.dtype)
        rho = rho_is.detach()
        truncated = rho > delta if delta is not None else torch.zeros_like(rho, dtype=torch.bool)
        clipped = 1.0 - keep_t
        lower = truncated.to(lp.dtype) * keep_t
        pg = -torch.where(truncated, torch.full_like(rho, delta or 0.0), rho) * keep_t * A * lp
    elif loss_type == "dro":
        pg = -A * lp + 0.5 * dro_beta * l.square()
    elif loss_type == "gmpo":
        sgn = torch.sign(A)
        c = sgn * torch.minimum(sgn * l, sgn * torch.clamp(l, -eps_low, eps_high))
        out = (l < -eps_low) | (l > eps_high)
        clipped = out.to(lp.dtype)
        clip_low = (out & (A < 0)).to(lp.dtype)
        clip_high = (out & (A > 0)).to(lp.dtype)
        seq = -torch.exp(_row_mean(c, m)) * _row_mean(A, m)
        if iw is not None:
            seq = seq * torch.exp(_row_mean(torch.log(iw + 1e-10), m))
        pg = seq[:, None].expand_as(lp)
    else:
        raise ValueError(loss_type)

    # multiplicative, detached weights on the policy-gradient term
    w = torch.ones_like(lp)
    if rollout_correction is not None:
        log_r = torch.nan_to_num(old - rollout_logprobs.to(lp.dtype), nan=0.0).detach()
        if rollout_correction.startswith("token") or rollout_correction == "icepop":
            r = torch.exp(torch.clamp(log_r, -20.0, 20.0))
        else:
            r = torch.exp(torch.clamp((m * log_r).sum(-1), -20.0, 20.0))[:, None].expand_as(lp)
        if rollout_correction.endswith("truncate"):
            w = w * torch.clamp(r, min=0.0 if rollout_min is None else rollout_min, max=rollout_max)
        else:
            lo_r = 0.5 if rollout_min is None else rollout_min
            w = w * r * ((r >= lo_r) & (r <= rollout_max)).to(lp.dtype)
    if iw is not None and loss_type not in ("gmpo", "vespo"):
        w = w * iw
    keep = None
    if entropy_quantile is not None:
        keep = entropy_quantile_mask(entropy, m, entropy_quantile, entropy_threshold)
        w = w * keep
    if offpolicy_threshold is not None:
        sampling = old if rollout_logprobs is None else rollout_logprobs.to(lp.dtype)
        kd = torch.nan_to_num(sampling - lp.detach(), nan=0.0)
        far = (_row_mean(kd, m) > offpolicy_threshold)[:, None]
        # a far row drops its tokens of negative advantage; gmpo (one loss per row) the row, by its mean advantage
        negative = (_row_mean(A, m) < 0)[:, None] if loss_type == "gmpo" else A < 0
        w = w * (~(far & negative)).to(lp.dtype)
    L = pg * w

    if ref_logprobs is not None:
        kl = kl_penalty(lp, ref_logprobs.to(lp.dtype), kl_type, kl_clamp)
        if kl_rho:
            kl = kl * (rho_is if kl_rho == "grad" else rho_is.detach())
        metrics["kl"] = _masked_mean(kl.detach(), m)
        if kl_coef != 0:  # a term whose coefficient is 0 is left out (no 0 * inf)
            L = L + kl_coef * kl
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy.detach().to(lp.dtype), m)
        if entropy_agg == "loss" and entropy_coef != 0:
            L = L - entropy_coef * entropy.to(lp.dtype)

    if loss_type == "gmpo" or (loss_type == "gspo" and agg is None):
        agg = "seq-mean-token-mean"
    agg = "token-mean" if agg is None else agg
    if seq_count is None and loss_type == "gmpo":
        seq_count = "all"
    loss = aggregate_loss(L, m, agg, global_tokens, global_seqs, dp_size, max_len, seq_count)
    if entropy is not None and entropy_agg == "token-mean" and entropy_coef != 0:
        kept = m if keep is None else m * keep
        loss = loss - entropy_coef * (entropy.to(lp.dtype) * kept).sum() / torch.clamp(kept.sum(), min=1)
    metrics["clipfrac"] = _masked_mean(clipped, m)
    has_lower = dual_clip is not None or (loss_type in ("dppo_tv", "dppo_kl") and delta is not None)
    metrics["clipfrac_lower"] = _masked_mean(lower, m) if has_lower else zero
    metrics["approx_kl"] = _masked_mean((-l).detach(), m)
    if loss_type in ("ppo", "gspo", "clip_cov", "cispo", "gmpo"):
        if seq_level and per_sequence_advantages:  # one flag per sequence (its first token's), every one counts
            lo_row, hi_row = clip_low[:, 0], clip_high[:, 0]
            metrics["clip_low"], metrics["clip_high"] = lo_row.mean(), hi_row.mean()
            metrics["clip_low_min"], metrics["clip_high_max"] = lo_row.min(), hi_row.max()
        else:
            metrics["clip_low"], metrics["clip_high"] = _masked_mean(clip_low, m), _masked_mean(clip_high, m)
            metrics["clip_low_min"] = _nan_min((clip_low * m).sum(-1) / row_n)
            metrics["clip_high_max"] = -_nan_min(-(clip_high * m).sum(-1) / row_n)
        metrics["clip_region"] = metrics["clip_low"] + metrics["clip_high"]
    if cov_selected is not None:
        metrics["cov_selected_frac"] = _masked_mean(cov_selected.to(lp.dtype), m)
    if phi_row is not None:  # [B] advantages: over sequences; [B, T]: over valid tokens of phi_t
        metrics["phi_mean"] = phi_row.mean() if per_sequence_advantages else _masked_mean(phi, m)
    return loss, {k: v.detach() for k, v in metrics.items()}


def eager_cov_loss(lp, old, A, m, *, loss_type, eps_low=0.2, eps_high=0.2, ratio=2e-4, lb=1.0, ub=5.0,
                   kl_coef=1.0, generator=None):
    """Clip-Cov / KL-Cov the way eager trainers write it (nonzero, randperm, topk): the
    benchmark baseline for the fused path (token-mean aggregation)."""
    mf = m.to(lp.dtype)
    mb = m.bool()
    l = lp - old
    rho = torch.exp(l)
    n_valid = mf.sum()
    lpd = lp.detach()
    cov = (A - (A * mf).sum() / n_valid) * (lpd - (lpd * mf).sum() / n_valid)
    k = max(int(ratio * int(n_valid.item())), 1)
    if loss_type == "clip_cov":
        L1 = -A * rho
        L2 = -A * torch.clamp(rho, 1 - eps_low, 1 + eps_high)
        pg = torch.maximum(L1, L2)
        cand = mb & (L2 <= L1) & (cov > lb) & (cov < ub)
        idx = torch.nonzero(cand.flatten()).flatten()
        if idx.numel() > 0:
            pick = idx[torch.randperm(idx.numel(), generator=generator)[:k]]
            corr = torch.ones_like(pg).flatten()
            corr[pick] = 0.0
            pg = pg * corr.view_as(pg)
    else:
        pg = -A * rho
        flat = torch.where(mb, cov, torch.full_like(cov, -math.inf)).flatten()
        top = torch.topk(flat, k).indices
        extra = torch.zeros_like(pg).flatten()
        extra[top] = 1.0
        pg = pg + kl_coef * l.abs() * extra.view_as(pg)
    return (pg * mf).sum() / n_valid
