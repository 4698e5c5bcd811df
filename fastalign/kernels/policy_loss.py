"""Fused policy-gradient loss (docs/math.md#policy-losses with the added terms): one program per sequence.

Per token t of row i (fp32, v = mask), l = lp - old, rho = exp(clamp(l, -c, c)) (c = log_ratio_cap, default 20);
at importance_sampling_level = sequence, rho = s_i = exp(clamp(mean_v l, -c, c)) for the row:

    pg_t                the loss-type row: ``_loss_row``, one constexpr branch per LT (the table of
                        csrc/cpu/policy_loss_table.h, loss_row)
    dpg_t = d_own_t + d_rho_t drho_t/dlp_t   (d_rho: derivative of pg in rho)
    w_t                 detached weights: rollout correction x keep mask x row weight
    K_t = KL_t (x rho under kl_rho; the estimator and its gradient: ``kl_estimators.kl_term``)
    L_t  = w_t pg_t + kl_coef K_t - ent_coef H_t   (a term whose coefficient is 0 left out)
    dlp_t = v (w_t dpg_t + kl_coef dK_t/dlp_t)

Token level: drho_t/dlp_t = rho_t. Sequence level: ds_i/dlp_t = s_i v_t / n_i, so a third loop
adds s_i / n_i * sum_u v_u (w_u d_rho_u + kl_coef KL_u [kl_rho = grad]) to every valid token.
Sequence quantities (gspo's and the sequence ratio, gmpo's means, vespo's weight, sequence
rollout weights, the off-policy mask) come from the sums of a first loop over the row (``_row_sums``,
constexpr NEED1).
Each program writes its row sums (fixed order, no atomics)

    row[i] = [sum v L, n, #clipped, #dual-clipped, sum v(-l), sum v K, sum v H, selected or phi,
              #clip_low, #clip_high, vespo phi of the row]

(column 7: the number of tokens Clip-Cov / KL-Cov picked, or vespo's sum v phi_t with (k, lambda) by the
sign of A_t; column 10 picks them by the sign of the row's mean advantage)

and the per-token d(row loss)/d(lp); the caller aggregates rows. Clamps are written with
``tl.where`` so that a NaN passes through them (``tl.minimum`` / ``tl.maximum`` drop it); a NaN
rollout log-prob is a log-ratio of 0.
"""
import math

import triton
import triton.language as tl

from fastalign.kernels.kl_estimators import clamp, kl_term

# loss-type rows and option codes: fastalign.policy_config (LOSS_CODES, ROLLOUT_CODES); the KL estimators' codes
# K1..K3 (kl_estimators.py) are fastalign.ops.kl_penalty.KL_CODES
PPO = tl.constexpr(0)
GSPO = tl.constexpr(1)
CISPO = tl.constexpr(2)
SAPO = tl.constexpr(3)
REINFORCE = tl.constexpr(4)
GMPO = tl.constexpr(5)
CLIPCOV = tl.constexpr(6)
KLCOV = tl.constexpr(7)
VESPO = tl.constexpr(8)
DPPOTV = tl.constexpr(9)
DPPOKL = tl.constexpr(10)
DRO = tl.constexpr(11)
TOK_TRUNC, TOK_MASK, SEQ_TRUNC, SEQ_MASK = 1, 2, 3, 4
KL_RHO_GRAD = 2
# row columns
COL_LOSS = tl.constexpr(0)
COL_N = tl.constexpr(1)
COL_CLIP = tl.constexpr(2)
COL_DUAL = tl.constexpr(3)
COL_NEG_LOG_RATIO = tl.constexpr(4)
COL_KL = tl.constexpr(5)
COL_ENTROPY = tl.constexpr(6)
COL_SELECTED_OR_PHI = tl.constexpr(7)
COL_CLIP_LOW = tl.constexpr(8)
COL_CLIP_HIGH = tl.constexpr(9)
COL_PHI_ROW = tl.constexpr(10)
ROW_COLS = tl.constexpr(11)
LOG_1E8 = tl.constexpr(math.log(1e-8))


@triton.jit
def _rollout_weight(r, r_min, r_max, TRUNC: tl.constexpr):
    if TRUNC:
        return clamp(r, r_min, r_max)
    else:
        return tl.where((r >= r_min) & (r <= r_max), r, 0.0)


@triton.jit
def _rollout_log_ratio(old, rl):
    """old - rollout; an unscorable rollout token (NaN) counts as 0."""
    return tl.where(rl == rl, old - rl, 0.0)


@triton.jit
def _vespo_phi(pos, logw, w, k_pos, lam_pos, k_neg, lam_neg):
    k = tl.where(pos, k_pos, k_neg)
    lam = tl.where(pos, lam_pos, lam_neg)
    lam = tl.where(lam < 1e-4, 1e-4, lam)
    lphi = lam + k * logw - lam * w
    return tl.where((lphi == lphi) & (lphi < 88.0), tl.exp(tl.where(lphi < 88.0, lphi, 0.0)), 0.0)


@triton.jit
def _load_tokens(lp_ptr, old_ptr, adv_ptr, mask_ptr, base, start, T, BLOCK_T: tl.constexpr):
    """One block of a row: (cols, in bounds, valid, lp, old, adv), fp32."""
    cols = start + tl.arange(0, BLOCK_T)
    inb = cols < T
    v = (tl.load(mask_ptr + base + cols, mask=inb, other=0) != 0) & inb
    lp = tl.load(lp_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
    a = tl.load(adv_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
    return cols, inb, v, lp, old, a


@triton.jit
def _row_sums(lp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, keep_ptr, iw_ptr, base, T, eps_low, eps_high,
              rollout_min, rollout_max, LT: tl.constexpr, NEED1: tl.constexpr, HAS_ROLL: tl.constexpr,
              HAS_IW: tl.constexpr, HAS_KEEP: tl.constexpr, TOK_ROLL: tl.constexpr, TRUNC: tl.constexpr,
              BLOCK_T: tl.constexpr):
    """Pass 1 over the row, sums over valid tokens (all 0 without NEED1):

        n = sum v, sl = sum v l, sa = sum v A, slr = sum v (old - rollout), skd = sum v kd (off-policy KL
        evidence kd = rollout - lp, or old - lp; a NaN is none); vespo: slc = sum v clamp(l, -20, 20),
        sli = sum v clamp(log iw, log 1e-8, 20); gmpo: sc = sum v c_t (c_t = min(l, eh) for A > 0,
        max(l, -el) for A < 0, else 0), sw = sum v w_tok, sli = sum v log(iw + 1e-10).

    Returns (n, sl, slr, sc, sa, sw, skd, slc, sli).
    """
    n1 = tl.zeros([], tl.float32)
    sl = tl.zeros([], tl.float32)
    slr = tl.zeros([], tl.float32)
    sc = tl.zeros([], tl.float32)
    sa = tl.zeros([], tl.float32)
    sw = tl.zeros([], tl.float32)
    skd = tl.zeros([], tl.float32)
    slc = tl.zeros([], tl.float32)
    sli = tl.zeros([], tl.float32)
    if NEED1:
        for start in range(0, T, BLOCK_T):
            cols, inb, v, lp, old, a = _load_tokens(lp_ptr, old_ptr, adv_ptr, mask_ptr, base, start, T, BLOCK_T)
            l = lp - old
            n1 += tl.sum(v.to(tl.float32), 0)
            sl += tl.sum(tl.where(v, l, 0.0), 0)
            sa += tl.sum(tl.where(v, a, 0.0), 0)
            if HAS_ROLL:
                rl = tl.load(roll_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
                lr = _rollout_log_ratio(old, rl)
                slr += tl.sum(tl.where(v, lr, 0.0), 0)
                kd = rl - lp  # off-policy KL evidence against the rollout
            else:
                kd = old - lp
            skd += tl.sum(tl.where(v & (kd == kd), kd, 0.0), 0)  # a NaN (either side) is no evidence, as TRL
            if LT == VESPO:
                slc += tl.sum(tl.where(v, clamp(l, -20.0, 20.0), 0.0), 0)
                if HAS_IW:
                    iw = tl.load(iw_ptr + base + cols, mask=inb, other=1.0).to(tl.float32)
                    sli += tl.sum(tl.where(v, clamp(tl.log(iw), LOG_1E8, 20.0), 0.0), 0)
            if LT == GMPO:
                ct = tl.where(a > 0, tl.where(l > eps_high, eps_high, l),
                              tl.where(a < 0, tl.where(l < -eps_low, -eps_low, l), 0.0))
                sc += tl.sum(tl.where(v, ct, 0.0), 0)
                wt = tl.full([BLOCK_T], 1.0, tl.float32)
                if TOK_ROLL:
                    wt = _rollout_weight(tl.exp(clamp(lr, -20.0, 20.0)), rollout_min, rollout_max, TRUNC)
                if HAS_KEEP:
                    wt = wt * tl.load(keep_ptr + base + cols, mask=inb, other=0.0)
                sw += tl.sum(tl.where(v, wt, 0.0), 0)
                if HAS_IW:
                    iw = tl.load(iw_ptr + base + cols, mask=inb, other=1.0).to(tl.float32)
                    sli += tl.sum(tl.where(v, tl.log(iw + 1e-10), 0.0), 0)
    return n1, sl, slr, sc, sa, sw, skd, slc, sli


@triton.jit
def _loss_row(x_lp, old, l, a, picked, rho_c, rho_is, drho_is, rho_row, drho_row, gmpo_g, vespo_logw, vespo_w,
              lo, hi, eps_low, eps_high, dual_clip, delta, cispo_lo, cispo_hi, tau_pos, tau_neg, vespo_k_pos,
              vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, cov_kl_coef, dro_beta,
              LT: tl.constexpr, PPO_ROW: tl.constexpr, DUAL_ON: tl.constexpr, DELTA_ON: tl.constexpr):
    """One block's loss-type row (csrc/cpu/policy_loss_table.h loss_row), per token:
    (pg, d_own, d_rho, drho, clip, low, clo, chi, sel_phi), with dpg = d_own + d_rho drho.

    d_own: d pg / d lp through lp itself; d_rho: d pg / d rho and drho the ratio's own d/d(lp) (drho_is:
    0 at sequence level, where the gradient through s_i comes in pass 3); clip, low (dual clip), clo, chi:
    the clip metrics; sel_phi: the metric of row column 7 (1 for a picked token, vespo's phi_t).
    r1 = min(rho, delta) (delta off: rho).
    """
    sel_phi = picked.to(tl.float32)
    zero = tl.zeros_like(l)
    clip = zero
    low = zero
    clo = zero
    chi = zero
    d_own = zero
    d_rho = zero
    drho = zero
    if PPO_ROW:  # ppo, gspo (rho = s_i), clip_cov (rho = exp(l)): max(-A r1, -A clip(rho, lo, hi)), dual min(., -cA)
        rho = rho_is
        drho = drho_is
        if LT == GSPO:  # the token's ratio exp(lp - sg(lp) + sg(log s_i)): NaN at a non-finite lp
            rho = rho_row + (x_lp - x_lp)
            drho = zero + drho_row
        if LT == CLIPCOV:
            rho = tl.exp(l)
            drho = rho
        r1 = rho
        dr1 = zero + 1.0
        if DELTA_ON:
            r1 = tl.where(rho > delta, delta, rho)
            dr1 = tl.where(rho > delta, 0.0, 1.0)
        L1 = -a * r1
        L2 = -a * clamp(rho, lo, hi)
        dL2 = tl.where((rho >= lo) & (rho <= hi), -a, 0.0)
        is_clip = L2 > L1
        pg = tl.where(is_clip, L2, L1)
        d_rho = tl.where(is_clip, dL2, -a * dr1)
        clip = is_clip.to(tl.float32)
        clo = ((a < 0) & (r1 < lo)).to(tl.float32)
        chi = ((a > 0) & (r1 > hi)).to(tl.float32)
        if DUAL_ON:
            L3 = -dual_clip * a
            is_low = (a < 0) & (pg > L3)
            pg = tl.where(is_low, L3, pg)
            d_rho = tl.where(is_low, 0.0, d_rho)
            low = is_low.to(tl.float32)
        if LT == CLIPCOV:
            pg = tl.where(picked, 0.0, pg)  # a picked token passes no gradient, even where exp(l) overflows
            d_rho = tl.where(picked, 0.0, d_rho)
            drho = tl.where(picked, 0.0, drho)
    elif LT == KLCOV:  # -A exp(l) + cov_kl_coef |l| on picked tokens
        rho = tl.exp(l)
        sgn = tl.where(l > 0, 1.0, tl.where(l < 0, -1.0, 0.0))
        pg = -a * rho + tl.where(picked, cov_kl_coef * tl.abs(l), 0.0)
        d_own = -a * rho + tl.where(picked, cov_kl_coef * sgn, 0.0)
    elif LT == CISPO:  # -sg(clip(rho, cispo_lo, cispo_hi)) A lp
        w = clamp(rho_is, cispo_lo, cispo_hi)
        pg = -w * a * x_lp
        d_own = -w * a
        clip = ((rho_is < cispo_lo) | (rho_is > cispo_hi)).to(tl.float32)
        clo = ((a < 0) & (rho_is < cispo_lo)).to(tl.float32)
        chi = ((a > 0) & (rho_is > cispo_hi)).to(tl.float32)
    elif LT == SAPO:  # -(4/tau) sigmoid(tau (rho - 1)) A, tau = tau_pos if A > 0 else tau_neg
        tau = tl.where(a > 0, tau_pos, tau_neg)
        s = 1.0 / (1.0 + tl.exp(-tau * (rho_is - 1.0)))
        pg = -(4.0 / tau) * s * a
        d_rho = -4.0 * s * (1.0 - s) * a
        drho = drho_is
    elif LT == REINFORCE:  # -A lp
        pg = -a * x_lp
        d_own = -a
    elif LT == VESPO:  # -sg(phi_t) A lp, log phi_t = lam + k log W - lam W, (k, lam) by the sign of A_t
        phi = _vespo_phi(a >= 0, vespo_logw, vespo_w, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
                         vespo_lambda_neg)
        pg = -phi * a * x_lp
        d_own = -phi * a
        sel_phi = phi
    elif (LT == DPPOTV) or (LT == DPPOKL):  # -sg(min(rho, delta) k) A lp
        # keep k: the token's probability moved within the divergence bound; weight sg(min(rho, delta) k)
        p = tl.exp(x_lp)
        p_old = tl.exp(old)
        if LT == DPPOTV:
            ok_pos = (p - p_old) <= eps_high
            ok_neg = (p - p_old) >= -eps_low
        else:
            bkl = p_old * (old - x_lp) + (1.0 - p_old) * tl.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
            ok_pos = (bkl <= eps_high) | (p <= p_old)
            ok_neg = (bkl <= eps_low) | (p >= p_old)
        k = tl.where(a > 0, ok_pos, ok_neg).to(tl.float32)
        rho_t = rho_c
        if DELTA_ON:
            rho_t = tl.where(rho_c > delta, delta, rho_c)
            low = tl.where(rho_c > delta, k, 0.0)
        wt = rho_t * k
        pg = -wt * a * x_lp
        d_own = -wt * a
        clip = 1.0 - k
    elif LT == DRO:  # -A lp + beta/2 l^2
        pg = -a * x_lp + 0.5 * dro_beta * l * l
        d_own = -a + dro_beta * l
    else:  # gmpo: the row's loss comes from pass 1; d_own = gmpo_g [l inside the clip on the side of A]
        dc = tl.where(a > 0, (l <= eps_high).to(tl.float32), tl.where(a < 0, (l >= -eps_low).to(tl.float32), 0.0))
        pg = zero
        d_own = gmpo_g * dc
        out = (l < -eps_low) | (l > eps_high)
        clip = out.to(tl.float32)
        clo = (out & (a < 0)).to(tl.float32)
        chi = (out & (a > 0)).to(tl.float32)
    return pg, d_own, d_rho, drho, clip, low, clo, chi, sel_phi


@triton.jit
def policy_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, roll_ptr, keep_ptr, iw_ptr, sel_ptr,
    row_ptr, dlp_ptr,
    T, eps_low, eps_high, dual_clip, delta, cispo_lo, cispo_hi, tau_pos, tau_neg,
    vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
    kl_coef, entropy_coef, rollout_min, rollout_max, offpolicy_threshold, cov_kl_coef, dro_beta, log_ratio_cap,
    LT: tl.constexpr, SEQ: tl.constexpr, KL_ON: tl.constexpr, KL_TYPE: tl.constexpr,
    KL_STRAIGHT: tl.constexpr, KL_CLAMP: tl.constexpr, KL_RHO: tl.constexpr, KL_RHO_GRAD_ON: tl.constexpr,
    ENT_ON: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_IW: tl.constexpr, HAS_ROLL: tl.constexpr,
    HAS_SEL: tl.constexpr, DUAL_ON: tl.constexpr, DELTA_ON: tl.constexpr, OFFPOL_ON: tl.constexpr,
    NEED1: tl.constexpr, TOK_ROLL: tl.constexpr, SEQ_ROLL: tl.constexpr, TRUNC: tl.constexpr,
    PPO_ROW: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # PPO_ROW: LT is ppo, gspo or clip_cov (the rows with the ppo clip)
    i = tl.program_id(0).to(tl.int64)
    base = i * T

    # ---- pass 1: row sums, then the row's quantities ----
    n1, sl, slr, sc, sa, sw, skd, slc, sli = _row_sums(
        lp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, keep_ptr, iw_ptr, base, T, eps_low, eps_high, rollout_min,
        rollout_max, LT, NEED1, HAS_ROLL, HAS_IW, HAS_KEEP, TOK_ROLL, TRUNC, BLOCK_T)
    inv_n = 1.0 / tl.maximum(n1, 1.0)
    w_row = tl.full([], 1.0, tl.float32)
    if SEQ_ROLL:
        w_row = _rollout_weight(tl.exp(clamp(slr, -20.0, 20.0)), rollout_min, rollout_max, TRUNC)
    # off-policy mask: a row whose mean KL exceeds the threshold drops its tokens of negative advantage
    # (gmpo, one loss per row: the whole row when its mean advantage is negative)
    w_row_neg = w_row
    if OFFPOL_ON:
        far = (skd * inv_n) > offpolicy_threshold
        if LT == GMPO:
            w_row = tl.where(far & ((sa * inv_n) < 0), 0.0, w_row)
            w_row_neg = w_row
        else:
            w_row_neg = tl.where(far, 0.0, w_row)
    rho_row = tl.zeros([], tl.float32)
    drho_row = tl.zeros([], tl.float32)
    if LT == GSPO:
        m_l = sl * inv_n
        rho_row = tl.exp(tl.where(m_l > 10.0, 10.0, m_l))
        drho_row = tl.where(m_l <= 10.0, rho_row, 0.0)  # torch.clamp(max=10): none above the cap (or at NaN)
    if SEQ:  # no gradient where the cap binds (and none for a NaN mean), as torch.clamp
        m_l = sl * inv_n
        rho_row = tl.exp(clamp(m_l, -log_ratio_cap, log_ratio_cap))
        drho_row = tl.where((m_l >= -log_ratio_cap) & (m_l <= log_ratio_cap), rho_row, 0.0)
    gmpo_row = tl.zeros([], tl.float32)
    if LT == GMPO:  # -exp(mean_v c) mean_v A, times sum_v w_tok and the geometric mean of iw
        geo = tl.full([], 1.0, tl.float32)
        if HAS_IW:
            geo = tl.exp(sli * inv_n)
        gmpo_row = tl.where(n1 > 0, w_row * sw * (-tl.exp(sc * inv_n) * (sa * inv_n)) * geo, 0.0)
    gmpo_g = gmpo_row * inv_n
    vespo_logw = clamp(slc + sli, LOG_1E8, 20.0)
    vespo_w = tl.exp(vespo_logw)
    phi_row = tl.zeros([], tl.float32)
    if LT == VESPO:
        phi_row = _vespo_phi((sa * inv_n) >= 0, vespo_logw, vespo_w, vespo_k_pos, vespo_lambda_pos,
                             vespo_k_neg, vespo_lambda_neg)

    # ---- pass 2: per token, L = w pg + kl_coef K - ent_coef H and dlp = v (w dpg + kl_coef dK), metric sums ----
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    s_loss = tl.zeros([], tl.float32)
    s_n = tl.zeros([], tl.float32)
    s_clip = tl.zeros([], tl.float32)
    s_low = tl.zeros([], tl.float32)
    s_negl = tl.zeros([], tl.float32)
    s_kl = tl.zeros([], tl.float32)
    s_h = tl.zeros([], tl.float32)
    s_sel_phi = tl.zeros([], tl.float32)
    s_clo = tl.zeros([], tl.float32)
    s_chi = tl.zeros([], tl.float32)
    s_grow = tl.zeros([], tl.float32)
    for start in range(0, T, BLOCK_T):
        cols, inb, v, x_lp, old, a = _load_tokens(lp_ptr, old_ptr, adv_ptr, mask_ptr, base, start, T, BLOCK_T)
        l = x_lp - old
        rho_c = tl.exp(clamp(l, -log_ratio_cap, log_ratio_cap))
        # 0 where the cap binds or for a NaN log-ratio, as torch.clamp
        drho_c = tl.where((l >= -log_ratio_cap) & (l <= log_ratio_cap), rho_c, 0.0)
        zero = tl.zeros([BLOCK_T], tl.float32)
        if SEQ:  # the row's ratio; its gradient comes in pass 3
            rho_is = zero + rho_row
            drho_is = zero
        else:
            rho_is = rho_c
            drho_is = drho_c
        picked = tl.zeros([BLOCK_T], tl.int1)
        if HAS_SEL:
            picked = tl.load(sel_ptr + base + cols, mask=inb, other=0) != 0
        pg, d_own, d_rho, drho, clip, low, clo, chi, sel_phi = _loss_row(
            x_lp, old, l, a, picked, rho_c, rho_is, drho_is, rho_row, drho_row, gmpo_g, vespo_logw, vespo_w,
            lo, hi, eps_low, eps_high, dual_clip, delta, cispo_lo, cispo_hi, tau_pos, tau_neg, vespo_k_pos,
            vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, cov_kl_coef, dro_beta, LT, PPO_ROW, DUAL_ON, DELTA_ON)

        w = tl.where(a < 0, w_row_neg, w_row)
        if HAS_KEEP:
            w = w * tl.load(keep_ptr + base + cols, mask=inb, other=0.0)
        if TOK_ROLL:
            rl = tl.load(roll_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            w = w * _rollout_weight(tl.exp(clamp(_rollout_log_ratio(old, rl), -20.0, 20.0)), rollout_min,
                                    rollout_max, TRUNC)
        if LT == GMPO:
            L = zero
            g = d_own
        else:
            L = w * pg
            # a ratio that passes no gradient (clamped, or a NaN log-ratio) stops d_rho too, as torch.clamp does
            g = w * (d_own + tl.where(drho != 0.0, d_rho * drho, 0.0))
        grow = w * d_rho
        klv = zero
        if KL_ON:
            ref = tl.load(ref_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            kv, dkl = kl_term(x_lp - ref, KL_TYPE, KL_CLAMP, KL_STRAIGHT)
            # a coefficient of 0 leaves the term out (exactly 0 at an infinite or NaN KL); the metric keeps it
            kl_on = kl_coef != 0.0
            if KL_RHO:
                klv = rho_is * kv
                g += tl.where(kl_on, kl_coef * rho_is * dkl, 0.0)
                if KL_RHO_GRAD_ON:
                    g += tl.where(kl_on, kl_coef * drho_is * kv, 0.0)
                    grow += tl.where(kl_on, kl_coef * kv, 0.0)
            else:
                klv = kv
                g += tl.where(kl_on, kl_coef * dkl, 0.0)
            L += tl.where(kl_on, kl_coef * klv, 0.0)
        h = zero
        if ENT_ON:
            h = tl.load(ent_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            L -= tl.where(entropy_coef != 0.0, entropy_coef * h, 0.0)
        tl.store(dlp_ptr + base + cols, tl.where(v, g, 0.0), mask=inb)
        s_loss += tl.sum(tl.where(v, L, 0.0), 0)
        s_n += tl.sum(v.to(tl.float32), 0)
        s_clip += tl.sum(tl.where(v, clip, 0.0), 0)
        s_low += tl.sum(tl.where(v, low, 0.0), 0)
        s_negl += tl.sum(tl.where(v, -l, 0.0), 0)
        s_kl += tl.sum(tl.where(v, klv, 0.0), 0)
        s_h += tl.sum(tl.where(v, h, 0.0), 0)
        s_sel_phi += tl.sum(tl.where(v, sel_phi, 0.0), 0)
        s_clo += tl.sum(tl.where(v, clo, 0.0), 0)
        s_chi += tl.sum(tl.where(v, chi, 0.0), 0)
        if SEQ:
            s_grow += tl.sum(tl.where(v, grow, 0.0), 0)

    # ---- pass 3 (sequence level): the gradient through s_i, the same for every valid token ----
    if SEQ:
        add = tl.where(drho_row != 0.0, s_grow * drho_row * inv_n, 0.0)  # a ratio that passes no gradient
        for start in range(0, T, BLOCK_T):
            cols = start + tl.arange(0, BLOCK_T)
            inb = cols < T
            v = (tl.load(mask_ptr + base + cols, mask=inb, other=0) != 0) & inb
            g = tl.load(dlp_ptr + base + cols, mask=inb, other=0.0)
            tl.store(dlp_ptr + base + cols, g + tl.where(v, add, 0.0), mask=inb)
    out = row_ptr + i * ROW_COLS
    tl.store(out + COL_LOSS, s_loss + gmpo_row)
    tl.store(out + COL_N, s_n)
    tl.store(out + COL_CLIP, s_clip)
    tl.store(out + COL_DUAL, s_low)
    tl.store(out + COL_NEG_LOG_RATIO, s_negl)
    tl.store(out + COL_KL, s_kl)
    tl.store(out + COL_ENTROPY, s_h)
    tl.store(out + COL_SELECTED_OR_PHI, s_sel_phi)
    tl.store(out + COL_CLIP_LOW, s_clo)
    tl.store(out + COL_CLIP_HIGH, s_chi)
    tl.store(out + COL_PHI_ROW, phi_row)


def policy_loss_forward(lp, old, adv, mask, ref, ent, roll, keep, iw, sel, row, dlp, *, loss_type, is_level, kl_type,
                        kl_straight, kl_clamp, kl_rho, rollout, eps_low, eps_high, dual_clip, delta, cispo_lo,
                        cispo_hi, tau_pos, tau_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
                        kl_coef, entropy_coef, rollout_min, rollout_max, offpolicy_threshold, cov_kl_coef,
                        dro_beta, log_ratio_cap, cov_ratio=None, cov_lb=None, cov_ub=None):
    """Launch over rows of contiguous [B, T] inputs (mask/sel uint8); optional ones may be None.

    Keywords: the fields of ``fastalign.ops.policy_params.KernelParams`` (``**params._asdict()``);
    the Clip-Cov selection bounds are used by the selection op, not here.
    """
    B, T = lp.shape
    if B == 0:
        return
    BLOCK_T = min(1024, max(16, triton.next_power_of_2(max(T, 1))))
    dummy = lp
    offpol_on = math.isfinite(offpolicy_threshold)
    seq = bool(is_level) and loss_type in (PPO, CISPO, SAPO)
    seq_roll = rollout in (SEQ_TRUNC, SEQ_MASK)
    policy_loss_fwd_kernel[(B,)](
        lp, old, adv, mask, ref if ref is not None else dummy, ent if ent is not None else dummy,
        roll if roll is not None else dummy, keep if keep is not None else dummy, iw if iw is not None else dummy,
        sel if sel is not None else mask, row, dlp,
        T, eps_low, eps_high, dual_clip, delta, cispo_lo, cispo_hi, tau_pos, tau_neg,
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, kl_coef, entropy_coef, rollout_min,
        rollout_max, offpolicy_threshold if offpol_on else 0.0, cov_kl_coef, dro_beta, log_ratio_cap,
        LT=loss_type, SEQ=seq, KL_ON=ref is not None, KL_TYPE=kl_type, KL_STRAIGHT=bool(kl_straight),
        KL_CLAMP=bool(kl_clamp), KL_RHO=bool(kl_rho), KL_RHO_GRAD_ON=kl_rho == KL_RHO_GRAD,
        ENT_ON=ent is not None, HAS_KEEP=keep is not None, HAS_IW=iw is not None, HAS_ROLL=roll is not None,
        HAS_SEL=sel is not None, DUAL_ON=bool(dual_clip > 0 and loss_type == PPO),
        DELTA_ON=bool(delta > 0 and loss_type in (PPO, GSPO, DPPOTV, DPPOKL)), OFFPOL_ON=offpol_on,
        NEED1=bool(loss_type in (GSPO, GMPO, VESPO) or seq_roll or offpol_on or seq),
        TOK_ROLL=rollout in (TOK_TRUNC, TOK_MASK), SEQ_ROLL=seq_roll, TRUNC=rollout in (TOK_TRUNC, SEQ_TRUNC),
        PPO_ROW=loss_type in (PPO, GSPO, CLIPCOV), BLOCK_T=BLOCK_T,
    )
