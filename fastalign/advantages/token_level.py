r"""Token-level advantages (docs/math.md#advantages): ``[B, T]`` token rewards (values, log-probs)
and the response mask in, ``[B, T]`` advantages out; the returns are reverse scans over time on
the C++ CPU kernels or the CUDA kernels. :func:`token_advantages` spreads sequence-level
advantages (:mod:`fastalign.advantages.sequence_level`) over the response tokens. No autograd: the
estimators run under ``torch.no_grad()``, so their outputs never require grad, whatever the inputs do
(critic values, the policy's own log-probs).
"""
from __future__ import annotations

import math

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastalign import _backend, _validate
from fastalign._deprecate import renamed
from fastalign.advantages._inputs import WHITEN_EPS, as_index, response_mask_rows
from fastalign.ops.masked_whiten import masked_whiten as ops_masked_whiten
from fastalign.ops.returns import SCANS, reverse_scan


class AdvantagesAndReturns(NamedTuple):
    """``(advantages, returns)``, both ``[B, T]``: what :func:`gae_advantages` and
    :func:`optimal_token_baseline_advantages` return (it unpacks as a pair)."""
    advantages: Tensor
    returns: Tensor


@renamed(adv="advantages")
def token_advantages(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Spread per-sequence advantages over tokens: ``advantages[:, None] * response_mask`` -> ``[B, T]``."""
    _validate.tensor("advantages", advantages, dim=1)
    if not advantages.dtype.is_floating_point:
        raise TypeError(f"advantages must be a float tensor, got {advantages.dtype}")
    m = response_mask_rows("response_mask", response_mask, advantages.shape[0], advantages.dtype, advantages.device)
    return advantages.unsqueeze(-1) * m


def _eps(eps) -> float:
    eps = _validate.finite_number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


@renamed(mask="response_mask")
def masked_whiten(x: Tensor, response_mask: Tensor, eps: float = WHITEN_EPS, *, unbiased: bool = True) -> Tensor:
    """``(x - mean) * rsqrt(var + eps) * m`` with mean and unbiased var over the tokens of ``response_mask`` ``m``.

    With ``N = sum m``: ``mean = sum m x / N``; ``unbiased=True`` (verl's ``masked_whiten``):
    ``var = sum m (x - mean)^2 / (N - 1)`` and ``rsqrt(var + eps)``, NaN on the valid tokens where
    ``0 < N <= 1`` (verl refuses such a batch); ``unbiased=False`` (OpenRLHF's advantage whitening):
    ``var = sum m (x - mean)^2 / N`` and ``rsqrt(max(var, eps))``.
    Tokens where ``m == 0`` are left out by selection (not multiplied by 0): a NaN or inf there
    changes nothing, and their output is exactly 0."""
    _validate.any_float("x", x)
    _validate.like(tuple(x.shape), "x.shape", required=True, device=x.device, device_of="x", kind="real",
                   response_mask=response_mask)
    eps = _eps(eps)
    _validate.boolean("unbiased", unbiased)
    return ops_masked_whiten(x, response_mask, eps, unbiased)


def _discount(gamma) -> float:
    """``gamma`` in ``[0, inf)``: a negative discount flips the sign of every other step."""
    gamma = _validate.finite_number("gamma", gamma)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return gamma


def _token_inputs(name: str, x, response_mask, others=()):
    """``x`` (float32 or float64), the response mask in its dtype, and the ``others`` shaped like ``x``."""
    _validate.real(name, x, dim=2)
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    x = (x if x.dtype == torch.float64 else x.to(torch.float32)).contiguous()
    m = response_mask_rows("response_mask", response_mask, x.shape[0], x.dtype, x.device)
    _validate.shape("response_mask", m, x.shape, f"like {name}")
    out = []
    for oname, o in others:
        _validate.any_float(oname, o, dim=2)
        _validate.shape(oname, o, x.shape, f"like {name}")
        _validate.same_device(**{name: x, oname: o})
        out.append(o.to(x.dtype).contiguous())
    return x, m, out


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: Tensor, response_mask: Tensor, *, gamma: float = 1.0,
                            whiten: bool = True, unbiased: bool = True, reset_at_masked: bool = True,
                            backend: Optional[str] = None) -> Tensor:
    """REINFORCE++: ``G_t = r_t m_t + gamma G_{t+1}``, whitened over valid tokens.

    Returns ``[B, T]`` (``G m`` whitened, times m). ``reset_at_masked``: ``True`` restarts the return
    after each masked token, so the return of a turn holds the rewards of that turn only;
    ``False`` carries it through masked tokens (multi-turn observation spans), decayed by ``gamma``
    at each of them, ``G_t = sum_{s>=t} gamma^{s-t} r_s m_s`` (OpenRLHF's ``get_cumulative_returns``).
    With one contiguous span of valid tokens per row the two agree. ``unbiased``: the whitening's
    variance (:func:`masked_whiten`): ``True`` as verl, ``False`` as OpenRLHF. In this and the other
    token-level estimators a masked token (``response_mask == 0``) is skipped by selection: whatever
    it holds (NaN, inf) never reaches a valid token or the whitening statistics, and its output is
    exactly 0."""
    gamma = _discount(gamma)
    _validate.boolean("whiten", whiten)
    _validate.boolean("unbiased", unbiased)
    _validate.boolean("reset_at_masked", reset_at_masked)
    x, m, _ = _token_inputs("token_rewards", token_rewards, response_mask)
    mode = SCANS["return"] if reset_at_masked else SCANS["to_go"]
    g, _ = reverse_scan(x, x.new_empty(0), m, gamma, 0.0, mode, _backend.request(x.device, backend))
    return masked_whiten(g, m, unbiased=unbiased) if whiten else g


@torch.no_grad()
def remax_advantages(token_rewards: Tensor, response_mask: Tensor, baseline: Tensor, *,
                     backend: Optional[str] = None) -> Tensor:
    """ReMax: ``A_t = (sum_{s>=t} r_s m_s - b) m_t`` with ``b [B]`` the greedy rollout's score."""
    x, m, _ = _token_inputs("token_rewards", token_rewards, response_mask)
    _validate.any_float("baseline", baseline, dim=1)
    _validate.shape("baseline", baseline, (x.shape[0],), "one score per response")
    _validate.same_device(token_rewards=x, baseline=baseline)
    g, _ = reverse_scan(x, x.new_empty(0), m, 1.0, 0.0, SCANS["to_go"], _backend.request(x.device, backend))
    return torch.where(m != 0, g - baseline.to(x.dtype).unsqueeze(-1) * m, 0.0)


@torch.no_grad()
def gae_advantages(token_rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float = 1.0,
                   lam: float = 1.0, whiten: bool = True, unbiased: bool = True,
                   backend: Optional[str] = None) -> AdvantagesAndReturns:
    """GAE: ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}`` (masked
    tokens are skipped: they carry V and A through). Returns ``(A [B, T], returns = (A + V) m)``,
    A whitened over valid tokens unless ``whiten=False`` (``unbiased``: as in :func:`masked_whiten`).
    ``gamma >= 0`` and ``lam`` in ``[0, 1]``."""
    gamma = _discount(gamma)
    lam = _validate.finite_number("lam", lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    _validate.boolean("whiten", whiten)
    _validate.boolean("unbiased", unbiased)
    x, m, (v,) = _token_inputs("token_rewards", token_rewards, response_mask, [("values", values)])
    a, ret = reverse_scan(x, v, m, gamma, lam, SCANS["gae"], _backend.request(x.device, backend))
    return AdvantagesAndReturns(masked_whiten(a, m, unbiased=unbiased) if whiten else a, ret)


@torch.no_grad()
def implicit_process_advantages(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor,
                                outcome_advantages: Optional[Tensor] = None, *, beta: float = 0.05,
                                gamma: float = 1.0, backend: Optional[str] = None) -> Tensor:
    """PRIME implicit process rewards: token reward ``beta (lp - ref)``, returns
    ``R_t = sum_{s>=t} gamma^{s-t} beta (lp_s - ref_s) m_s`` (reset after masked tokens),
    plus the outcome advantage of the sequence: ``(R_t + A_i) m_t``."""
    beta = _validate.finite_number("beta", beta)
    gamma = _discount(gamma)
    lp, m, (ref,) = _token_inputs("logprobs", logprobs, response_mask, [("ref_logprobs", ref_logprobs)])
    _validate.like((lp.shape[0],), "one advantage per response", device=lp.device, device_of="logprobs",
                   outcome_advantages=outcome_advantages)
    x = (lp - ref) * beta
    r, _ = reverse_scan(x, x.new_empty(0), m, gamma, 0.0, SCANS["return"],
                        _backend.request(x.device, backend))
    if outcome_advantages is not None:
        _validate.tensor("outcome_advantages", outcome_advantages, dim=1)
        _validate.shape("outcome_advantages", outcome_advantages, (x.shape[0],), "one advantage per response")
        r = torch.where(m != 0, r + outcome_advantages.to(x.dtype).unsqueeze(-1) * m, 0.0)
    return r


def iw_opd_terms(teacher_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, gamma: float,
                 eps: float) -> tuple:
    """``(a, w)`` of :func:`iw_opd_advantages` (``A = w a``), its inputs checked."""
    gamma = _validate.finite_number("gamma", gamma)
    eps = _validate.positive("eps", eps)
    lt, m, (lr,) = _token_inputs("teacher_logprobs", teacher_logprobs, response_mask,
                                 [("rollout_logprobs", rollout_logprobs)])
    valid = m != 0  # selection: a masked slot's NaN or -inf never reaches a valid token
    with torch.no_grad():
        a = torch.where(valid, lt.detach() - lr.detach(), 0.0)
        size = a.abs().to(torch.float64)
        before = size.cumsum(-1) - size  # sum_{s<t} |a_s|, in float64
        total = size.sum(-1, keepdim=True).clamp_min(eps)
        w = (1.0 + gamma * (1.0 - before / total)).to(a.dtype)
    return a, w


@torch.no_grad()
def iw_opd_advantages(teacher_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, *,
                      gamma: float = 0.5, eps: float = 1e-8) -> Tensor:
    r"""IW-OPD (importance-weighted on-policy distillation) advantages of the sampled tokens, ``[B, T]``.

    The teacher's log-ratio over the rollout policy at each sampled token, ``a_t = (lt_t - lr_t) m_t``, is
    weighted by the share of its sequence's total discrepancy that lies at or after ``t``:

    .. math::

        w_t = 1 + \gamma \Bigl(1 - \frac{\sum_{s<t} |a_s|}{\max(\sum_s |a_s|, \epsilon)}\Bigr),
        \qquad A_t = w_t a_t

    so a token whose prefix still agrees with the teacher weighs up to ``1 + gamma`` and the last ones about 1
    (the position bias of on-policy distillation). Train with ``loss_type="reinforce"`` (``-A lp``), the
    log-probs at the sampling temperature. ``rollout_logprobs``: the policy's own at rollout (its current
    log-probs, detached, on-policy). ``gamma`` any real number, ``eps > 0``. A masked token is skipped by
    selection (a NaN or ``-inf`` there changes nothing; its output is 0); a non-finite teacher log-prob on a
    valid token gives NaN advantages at that token and after it (a NaN teacher log-prob: the whole row; the tokens
    before an infinite one keep ``w_t = 1 + gamma``, their share of an infinite total being 0). float32 (or
    float64) out, the prefix sums in float64; no autograd."""
    a, w = iw_opd_terms(teacher_logprobs, rollout_logprobs, response_mask, gamma, eps)
    return w * a


# ---------------------------------------------------------------- optimal token baseline
def _group_sums(same: Tensor, x: Tensor) -> Tensor:
    """``sum_j same[i, j] x[j]`` for each row ``i`` of ``x`` ``[B, C]``, in float64 (exact member counts, no
    reduced-precision matmul), with IEEE sums inside each group only: the matrix product takes the finite values,
    and two more columns per entry count the ``+inf`` and ``-inf`` members (a NaN counts as both), so a
    non-finite member never reaches another group (a product ``0 * inf`` would make it NaN)."""
    finite = torch.isfinite(x)
    pos, neg = ~finite & ~(x < 0), ~finite & ~(x > 0)  # NaN: both
    same = same.to(torch.float64)
    total, n_pos, n_neg = (same @ torch.cat([torch.where(finite, x, 0.0), pos, neg], 1).to(torch.float64)).split(
        x.shape[1], 1)
    inf = torch.where(n_pos > 0, math.inf, -math.inf)
    return torch.where((n_pos > 0) & (n_neg > 0), math.nan, torch.where((n_pos > 0) | (n_neg > 0), inf, total))


def optimal_token_baseline_advantages(
    token_rewards: Tensor,
    response_mask: Tensor,
    index,
    old_logprobs: Tensor,
    sum_p2: Tensor,
    *,
    importance_weights: Optional[Tensor] = None,
    zero_tail: bool = True,
    align: str = "position",
    eps: float = 1e-8,
) -> AdvantagesAndReturns:
    r"""Per-token baseline weighted by the cumulative path variance (docs/math.md#token-advantages).

    With ``m`` the mask, ``G_t = sum_{u >= t} m_u r_u`` the return, the per-token variance proxy
    ``w_t = 1 - 2 exp(old_t) + sum_p2_t`` (times ``iw_t ** 2`` with ``importance_weights``) and
    ``W_t = sum_{u <= t} m_u w_u``, each group ``g`` of responses (same ``index``) shares

        B_t = sum_{j in g} G_jt W_jt m_jt / (sum_{j in g} W_jt m_jt + eps)

    and ``A_t = (G_t - B_t) m_t``; a group of one has ``B = 0``. ``zero_tail``: when one
    response of a group is strictly the longest (by ``sum m``), its baseline is 0 from position
    ``L_2`` on, ``L_2`` the second-longest length of the group. ``align``: ``"position"`` sums
    over the responses at the same position ``t``; ``"response"`` (multi-turn responses with masked
    observation spans) at the same response-token rank ``k = sum_{u <= t} m_u - 1``, groups counting
    only non-empty responses (positions of ``zero_tail`` are ranks then). ``sum_p2`` is ``sum_v p_v^2``
    of the old policy (``TokenStats`` / ``SequenceLogprobs`` provide it).

    Returns ``(advantages, returns)`` ``[B, T]`` in the rewards' dtype (float32 or float64); empty
    ones for an empty batch (``B = 0`` or ``T = 0``). Plain tensor operations on the inputs' device,
    group sums as a ``[B, B]`` same-group matrix product in float64: no host synchronisation (string
    ids are mapped on the host, as in :func:`group_advantages`). No autograd.
    """
    extra = [("old_logprobs", old_logprobs), ("sum_p2", sum_p2)]
    if importance_weights is not None:
        extra.append(("importance_weights", importance_weights))
    r, m, (old, p2, *iw) = _token_inputs("token_rewards", token_rewards, response_mask, extra)
    B, T = r.shape
    eps = _eps(eps)
    _validate.boolean("zero_tail", zero_tail)
    if align not in ("position", "response"):
        raise ValueError(f"align must be 'position' or 'response', got {align!r}")
    with torch.no_grad():
        keys = as_index("index", index, B, r.device)
        if B == 0 or T == 0:  # no responses or no tokens: nothing to sum over (as the other estimators)
            return AdvantagesAndReturns(torch.zeros_like(r), torch.zeros_like(r))
        valid = m != 0  # selection, not a product: a masked slot's NaN or inf never reaches a valid token
        returns = torch.where(valid, r * m, 0.0).flip(-1).cumsum(-1).flip(-1)
        w = 1.0 - 2.0 * torch.exp(old) + p2
        if iw:
            w = w * iw[0] * iw[0]
        W = torch.where(valid, w * m, 0.0).cumsum(-1)
        lengths = m.sum(-1)
        same = (keys[:, None] == keys[None, :]).to(r.dtype)  # [B, B]
        GW, Wm = returns * W * m, W * m
        rank = (m.cumsum(-1) - 1.0).clamp_min(0.0).to(torch.int64)  # response-token rank of each position
        if align == "response":  # move every response token to its rank (masked ones add 0)
            same = same * (lengths > 0).to(r.dtype)[None, :]
            GW = torch.zeros_like(GW).scatter_add_(1, rank, GW)
            Wm = torch.zeros_like(Wm).scatter_add_(1, rank, Wm)
        num, den = _group_sums(same, torch.cat([GW, Wm], 1)).to(r.dtype).split(GW.shape[1], 1)
        den = den + eps
        baseline = torch.where(same.sum(-1, keepdim=True) > 1, num / den, 0.0)
        if zero_tail:
            in_group = same > 0
            longest = torch.where(in_group, lengths[None, :], -1.0).amax(-1)
            n_longest = (in_group & (lengths[None, :] == longest[:, None])).sum(-1)
            second = torch.where(in_group & (lengths[None, :] < longest[:, None]), lengths[None, :], -1.0).amax(-1)
            alone_longest = (lengths == longest) & (n_longest == 1) & (second >= 0)
            tail = torch.arange(T, device=r.device)[None, :] >= second[:, None]
            baseline = torch.where(alone_longest[:, None] & tail, 0.0, baseline)
        if align == "response":
            baseline = baseline.gather(1, rank)
        return AdvantagesAndReturns((returns - baseline) * m, returns)
