"""Fused policy-gradient loss (docs/math.md#policy-losses with the added terms): one program per sequence.

Per token t of row i (fp32, v = mask), l = lp - old, rho = exp(clamp(l, -20, 20)):

    pg_t, dpg_t         the loss-type row (constexpr LT, same table as csrc/cpu/policy_loss.cpp)
    w_t                 detached weights: rollout correction x keep mask x row weight
    L_t  = w_t pg_t + kl_coef KL_t - ent_coef H_t
    dlp_t = v (w_t dpg_t + kl_coef dKL_t),   dH_t = -v ent_coef

Sequence quantities (gspo's s_i, gmpo's means, sequence rollout weights, the
off-policy mask) come from a first loop over the row (constexpr NEED1). Each
program writes its row sums (fixed order, no atomics)

    row[i] = [sum v L, n, #clipped, #dual-clipped, sum v(-l), sum v KL, sum v H, #selected]

and the per-token d(row loss)/d(lp) (and d/d(H)); the caller aggregates rows.
"""
import math

import triton
import triton.language as tl

PPO, GSPO, CISPO, SAPO, REINFORCE, GMPO, CLIPCOV, KLCOV = range(8)
K1, KABS, K2, K3 = range(4)
ROLL_NONE, TOK_TRUNC, TOK_MASK, SEQ_TRUNC, SEQ_MASK = range(5)
ROW_COLS = 8


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _rollout_weight(r, r_min, r_max, TRUNC: tl.constexpr):
    if TRUNC:
        return tl.minimum(r, r_max)
    else:
        return tl.where((r >= r_min) & (r <= r_max), r, 0.0)


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
def policy_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, roll_ptr, keep_ptr, sel_ptr,
    row_ptr, dlp_ptr, dh_ptr,
    T, el, eh, dual_c, delta, cis_lo, cis_hi, tau_pos, tau_neg,
    kl_coef, ent_coef, r_min, r_max, offpol_thr, cov_kl,
    LT: tl.constexpr, KL_ON: tl.constexpr, KL_TYPE: tl.constexpr, KL_STRAIGHT: tl.constexpr,
    KL_CLAMP: tl.constexpr, KL_RHO: tl.constexpr, ENT_ON: tl.constexpr, DH_ON: tl.constexpr,
    ROLLOUT: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_SEL: tl.constexpr, DUAL_ON: tl.constexpr,
    DELTA_ON: tl.constexpr, OFFPOL_ON: tl.constexpr, NEED1: tl.constexpr, PPO_LIKE: tl.constexpr,
    TOK_ROLL: tl.constexpr, SEQ_ROLL: tl.constexpr, ANY_ROLL: tl.constexpr, TRUNC: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # ROLLOUT (the mode code) is implied by TOK_ROLL / SEQ_ROLL / TRUNC; kept for the cache key.
    i = tl.program_id(0).to(tl.int64)
    base = i * T

    # ---- pass 1: row sums ----
    n1 = tl.zeros([], tl.float32)
    sl = tl.zeros([], tl.float32)
    slr = tl.zeros([], tl.float32)
    sc = tl.zeros([], tl.float32)
    sa = tl.zeros([], tl.float32)
    sw = tl.zeros([], tl.float32)
    if NEED1:
        for start in range(0, T, BLOCK_T):
            cols, inb, v, lp, old, a = _load_tokens(lp_ptr, old_ptr, adv_ptr, mask_ptr, base, start, T, BLOCK_T)
            l = lp - old
            n1 += tl.sum(v.to(tl.float32), 0)
            sl += tl.sum(tl.where(v, l, 0.0), 0)
            sa += tl.sum(tl.where(v, a, 0.0), 0)
            if ANY_ROLL:
                rl = tl.load(roll_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
                lr = old - rl
                slr += tl.sum(tl.where(v, lr, 0.0), 0)
            if LT == 5:
                ct = tl.where(a > 0, tl.minimum(l, eh), tl.where(a < 0, tl.maximum(l, -el), 0.0))
                sc += tl.sum(tl.where(v, ct, 0.0), 0)
                wt = tl.full([BLOCK_T], 1.0, tl.float32)
                if TOK_ROLL:
                    wt = _rollout_weight(tl.exp(_clamp(lr, -20.0, 20.0)), r_min, r_max, TRUNC)
                if HAS_KEEP:
                    wt = wt * tl.load(keep_ptr + base + cols, mask=inb, other=0.0)
                sw += tl.sum(tl.where(v, wt, 0.0), 0)
    inv_n = 1.0 / tl.maximum(n1, 1.0)
    w_row = tl.full([], 1.0, tl.float32)
    if SEQ_ROLL:
        w_row = _rollout_weight(tl.exp(_clamp(slr, -20.0, 20.0)), r_min, r_max, TRUNC)
    if OFFPOL_ON:
        drop = ((sa * inv_n) < 0) & ((-sl * inv_n) > offpol_thr)
        w_row = tl.where(drop, 0.0, w_row)
    gspo_rho = tl.exp(tl.minimum(sl * inv_n, 10.0))
    gmpo_row = tl.where(n1 > 0, w_row * sw * (-tl.exp(sc * inv_n) * (sa * inv_n)), 0.0)
    gmpo_g = gmpo_row * inv_n

    # ---- pass 2: per-token loss, gradient, metric sums ----
    lo = 1.0 - el
    hi = 1.0 + eh
    s_loss = tl.zeros([], tl.float32)
    s_n = tl.zeros([], tl.float32)
    s_clip = tl.zeros([], tl.float32)
    s_low = tl.zeros([], tl.float32)
    s_negl = tl.zeros([], tl.float32)
    s_kl = tl.zeros([], tl.float32)
    s_h = tl.zeros([], tl.float32)
    s_sel = tl.zeros([], tl.float32)
    for start in range(0, T, BLOCK_T):
        cols, inb, v, x_lp, old, a = _load_tokens(lp_ptr, old_ptr, adv_ptr, mask_ptr, base, start, T, BLOCK_T)
        l = x_lp - old
        rho_c = tl.exp(_clamp(l, -20.0, 20.0))
        drho_c = tl.where((l >= -20.0) & (l <= 20.0), rho_c, 0.0)
        picked = tl.zeros([BLOCK_T], tl.int1)
        if HAS_SEL:
            picked = tl.load(sel_ptr + base + cols, mask=inb, other=0) != 0
        zero = tl.zeros([BLOCK_T], tl.float32)
        clip = zero
        low = zero
        if PPO_LIKE:
            rho = rho_c
            drho = drho_c
            if LT == 1:
                rho = zero + gspo_rho
                drho = rho
            if LT == 6:
                rho = tl.exp(l)
                drho = rho
            r1 = rho
            dr1 = drho
            if DELTA_ON:  # ppo only (the launcher turns it off otherwise)
                r1 = tl.where(rho > delta, delta, rho)
                dr1 = tl.where(rho > delta, 0.0, drho)
            L1 = -a * r1
            L2 = -a * _clamp(rho, lo, hi)
            dL2 = tl.where((rho >= lo) & (rho <= hi), -a * drho, 0.0)
            is_clip = L2 > L1
            pg = tl.where(is_clip, L2, L1)
            dpg = tl.where(is_clip, dL2, -a * dr1)
            clip = is_clip.to(tl.float32)
            if DUAL_ON:  # ppo only
                L3 = -dual_c * a
                is_low = (a < 0) & (pg > L3)
                pg = tl.where(is_low, L3, pg)
                dpg = tl.where(is_low, 0.0, dpg)
                low = is_low.to(tl.float32)
            if LT == 6:
                pg = tl.where(picked, 0.0, pg)
                dpg = tl.where(picked, 0.0, dpg)
        elif LT == 7:
            rho = tl.exp(l)
            sgn = tl.where(l > 0, 1.0, tl.where(l < 0, -1.0, 0.0))
            pg = -a * rho + tl.where(picked, cov_kl * tl.abs(l), 0.0)
            dpg = -a * rho + tl.where(picked, cov_kl * sgn, 0.0)
        elif LT == 2:
            w = _clamp(rho_c, cis_lo, cis_hi)
            pg = -w * a * x_lp
            dpg = -w * a
            clip = ((rho_c < cis_lo) | (rho_c > cis_hi)).to(tl.float32)
        elif LT == 3:
            tau = tl.where(a > 0, tau_pos, tau_neg)
            s = 1.0 / (1.0 + tl.exp(-tau * (rho_c - 1.0)))
            pg = -(4.0 / tau) * s * a
            dpg = -4.0 * s * (1.0 - s) * a * drho_c
        elif LT == 4:
            pg = -a * x_lp
            dpg = -a
        else:  # gmpo
            dc = tl.where(a > 0, (l <= eh).to(tl.float32), tl.where(a < 0, (l >= -el).to(tl.float32), 0.0))
            pg = zero
            dpg = gmpo_g * dc
            clip = ((l < -el) | (l > eh)).to(tl.float32)

        w = zero + w_row
        if HAS_KEEP:
            w = w * tl.load(keep_ptr + base + cols, mask=inb, other=0.0)
        if TOK_ROLL:
            rl = tl.load(roll_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            w = w * _rollout_weight(tl.exp(_clamp(old - rl, -20.0, 20.0)), r_min, r_max, TRUNC)
        if LT == 5:
            L = zero
            g = dpg
        else:
            L = w * pg
            g = w * dpg
        klv = zero
        if KL_ON:
            ref = tl.load(ref_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            d = x_lp - ref
            if KL_TYPE == 0:
                klv = d
                dkl = zero + 1.0
            elif KL_TYPE == 1:
                klv = tl.abs(d)
                dkl = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            elif KL_TYPE == 2:
                klv = 0.5 * d * d
                dkl = d
            else:
                x = -d
                if KL_CLAMP:
                    xc = _clamp(x, -20.0, 20.0)
                    e = tl.exp(xc)
                    k3 = e - xc - 1.0
                    klv = _clamp(k3, -10.0, 10.0)
                    live = (x >= -20.0) & (x <= 20.0) & (k3 >= -10.0) & (k3 <= 10.0)
                    dkl = tl.where(live, -(e - 1.0), 0.0)
                else:
                    e = tl.exp(x)
                    klv = e - x - 1.0
                    dkl = -(e - 1.0)
            if KL_STRAIGHT:
                dkl = d
            if KL_RHO:
                L += kl_coef * rho_c * klv
                g += kl_coef * rho_c * dkl
            else:
                L += kl_coef * klv
                g += kl_coef * dkl
        h = zero
        if ENT_ON:
            h = tl.load(ent_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
            L -= ent_coef * h
        tl.store(dlp_ptr + base + cols, tl.where(v, g, 0.0), mask=inb)
        if DH_ON:
            tl.store(dh_ptr + base + cols, tl.where(v, -ent_coef, 0.0), mask=inb)
        s_loss += tl.sum(tl.where(v, L, 0.0), 0)
        s_n += tl.sum(v.to(tl.float32), 0)
        s_clip += tl.sum(tl.where(v, clip, 0.0), 0)
        s_low += tl.sum(tl.where(v, low, 0.0), 0)
        s_negl += tl.sum(tl.where(v, -l, 0.0), 0)
        s_kl += tl.sum(tl.where(v, klv, 0.0), 0)
        s_h += tl.sum(tl.where(v, h, 0.0), 0)
        s_sel += tl.sum((v & picked).to(tl.float32), 0)
    out = row_ptr + i * 8
    tl.store(out + 0, s_loss + gmpo_row)
    tl.store(out + 1, s_n)
    tl.store(out + 2, s_clip)
    tl.store(out + 3, s_low)
    tl.store(out + 4, s_negl)
    tl.store(out + 5, s_kl)
    tl.store(out + 6, s_h)
    tl.store(out + 7, s_sel)


def policy_loss_forward(lp, old, adv, mask, ref, ent, roll, keep, sel, row, dlp, dh, *, loss_type, kl_type,
                        kl_straight, kl_clamp, kl_rho, rollout, f, need1):
    """Launch over rows of contiguous [B, T] inputs (mask/sel uint8); optional ones may be None."""
    B, T = lp.shape
    if B == 0:
        return
    BLOCK_T = min(1024, max(16, triton.next_power_of_2(max(T, 1))))
    dummy = lp
    el, eh, dual_c, delta, cis_lo, cis_hi, tau_pos, tau_neg, kl_coef, ent_coef, r_min, r_max, offpol, cov_kl = f
    policy_loss_fwd_kernel[(B,)](
        lp, old, adv, mask, ref if ref is not None else dummy, ent if ent is not None else dummy,
        roll if roll is not None else dummy, keep if keep is not None else dummy,
        sel if sel is not None else mask, row, dlp, dh if dh is not None else dlp,
        T, el, eh, dual_c, delta, cis_lo, cis_hi, tau_pos, tau_neg, kl_coef, ent_coef, r_min, r_max,
        offpol if math.isfinite(offpol) else 0.0, cov_kl,
        LT=loss_type, KL_ON=ref is not None, KL_TYPE=kl_type, KL_STRAIGHT=bool(kl_straight),
        KL_CLAMP=bool(kl_clamp), KL_RHO=bool(kl_rho), ENT_ON=ent is not None, DH_ON=dh is not None,
        ROLLOUT=rollout, HAS_KEEP=keep is not None, HAS_SEL=sel is not None,
        DUAL_ON=bool(dual_c > 0 and loss_type == PPO), DELTA_ON=bool(delta > 0 and loss_type == PPO),
        OFFPOL_ON=math.isfinite(offpol), NEED1=bool(need1), PPO_LIKE=loss_type in (PPO, GSPO, CLIPCOV),
        TOK_ROLL=rollout in (TOK_TRUNC, TOK_MASK), SEQ_ROLL=rollout in (SEQ_TRUNC, SEQ_MASK),
        ANY_ROLL=rollout != ROLL_NONE, TRUNC=rollout in (TOK_TRUNC, SEQ_TRUNC), BLOCK_T=BLOCK_T,
    )
