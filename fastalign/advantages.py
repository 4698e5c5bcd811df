r"""Advantage estimators (docs/math.md#advantages): group-normalised sequence advantages and
token-level returns, on the C++ CPU kernels or the CUDA kernels.

Sequence level: :func:`group_advantages` turns one score per response into one
advantage per response, from the statistics of its group (the responses to the
same prompt). Each estimator is one row of ``ESTIMATORS`` (a small function),
built from two kernels: segmented group statistics and a per-score normaliser.
:func:`token_advantages` spreads them over the response tokens.

Token level: :func:`reinforce_pp_advantages`, :func:`remax_advantages`,
:func:`gae_advantages` and :func:`implicit_process_advantages` take ``[B, T]``
token rewards (values, log-probs) and the response mask; their returns are
reverse scans over time in the same kernels.

Groups are an integer index (any order, any values such as hashed prompt ids;
the same results as consecutive blocks) or a fixed ``group_size``. Nothing on
the CUDA path synchronises with the host. Advantages are targets: no autograd.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from fastalign import _backend, _validate
from fastalign.ops.group_stats import MODES, call_group_advantage, group_stats
from fastalign.ops.returns import SCANS, reverse_scan

STD_MODES = ("group", "batch", "none")
SINGLETON = ("raw", "zero", "unit_std")
BATCH_NORMALIZATIONS = ("sequence", "token")
WHITEN_EPS = 1e-8
TOKEN_LEVEL = {
    "reinforce_pp": "reinforce_pp_advantages",
    "remax": "remax_advantages",
    "gae": "gae_advantages",
    "prime": "implicit_process_advantages",
}


class _Groups(NamedTuple):
    index: Tensor  # int64 [B] keys, or empty when group_size is used
    size: int


class _Ctx(NamedTuple):
    eps: float
    std: str
    singleton_zero: bool
    lengths: Optional[Tensor]  # float64 [B] response lengths, when given
    weights: Optional[Union[Tensor, Sequence[float]]]
    backend: str
    singleton_unit_std: bool = False
    batch_normalization: str = "sequence"


# ---------------------------------------------------------------- building blocks
def _normalize(r: Tensor, g: _Groups, c: _Ctx, mode: str, div_std: bool, scale: Optional[Tensor] = None,
               lengths: Optional[Tensor] = None) -> Tensor:
    empty = r.new_empty(0, dtype=torch.float64)
    return call_group_advantage(r, g.index, empty if lengths is None else lengths,
                                empty if scale is None else scale, g.size, MODES[mode], div_std, c.eps,
                                c.singleton_zero, c.backend)


def _whole_batch(r: Tensor) -> _Groups:
    return _Groups(r.new_empty(0, dtype=torch.int64), max(r.shape[0], 1))


def _batch_inv_std(r: Tensor, c: _Ctx) -> Tensor:
    """``1 / (std + eps)`` over the non-NaN scores of the batch, as a float64 [1] device tensor."""
    g = _whole_batch(r)
    _, stats, _ = group_stats(r, g.index, r.new_empty(0, dtype=torch.float64), g.size, c.backend)
    return 1.0 / (stats[:1, 2] + c.eps)  # empty for an empty batch (no scale)


def _unit_std_singletons(adv: Tensor, r: Tensor, g: _Groups, c: _Ctx, alone_value: Tensor) -> Tensor:
    """``singleton="unit_std"``: a group of one takes ``alone_value``, its estimator's formula
    with mean 0 and std 1 (grpo ``r / (1 + eps)``, gpg ``alpha r``)."""
    gid, stats, _ = group_stats(r, g.index, r.new_empty(0, dtype=torch.float64), g.size, c.backend)
    alone = (stats[gid, 0] == 1) & ~torch.isnan(r)
    return torch.where(alone, alone_value.to(adv.dtype), adv)


def _length_weighted_whiten(a: Tensor, r: Tensor, c: _Ctx, name: str) -> Tensor:
    """Whitening of per-sequence values spread over their valid tokens: mean = sum L a / N,
    var = sum L (a - mean)^2 / (N - 1), N = sum L, ``(a - mean) * rsqrt(var + 1e-8)``;
    NaN scores and empty responses are left out and get 0."""
    w = torch.where(torch.isnan(r), 0.0, _need_lengths(c, name))
    a64 = a.to(torch.float64)
    n = w.sum()
    mean = (w * a64).sum() / n.clamp_min(1.0)
    var = (w * (a64 - mean) ** 2).sum() / (n - 1.0).clamp_min(1.0)
    out = (a64 - mean) * torch.rsqrt(var + WHITEN_EPS)
    return torch.where(w > 0, out, 0.0).to(r.dtype)


def _need_lengths(c: _Ctx, name: str) -> Tensor:
    if c.lengths is None:
        raise ValueError(f"estimator {name!r} needs response_mask [B, T] or lengths [B]")
    return c.lengths


# ---------------------------------------------------------------- the table
def _grpo(r, g, c):
    """``(r - mean_g) / (std + eps)``; std of the group, of the batch, or none (Dr. GRPO)."""
    scale = _batch_inv_std(r, c) if c.std == "batch" else None
    adv = _normalize(r, g, c, "center", c.std == "group", scale)
    if c.singleton_unit_std and c.std == "group":
        adv = _unit_std_singletons(adv, r, g, c, r.to(torch.float64) / (1.0 + c.eps))
    return adv


def _rloo(r, g, c):
    """``n/(n-1) (r - mean_g)``: r minus the mean of the other responses."""
    return _normalize(r, g, c, "rloo", False)


def _opo(r, g, c):
    """``r - sum_j L_j r_j / sum_j L_j`` (length-weighted group baseline)."""
    return _normalize(r, g, c, "opo", False, lengths=_need_lengths(c, "opo"))


def _gpg(r, g, c):
    """``alpha (r - mean_g)``, ``alpha = B / max(count_nonzero(r), 1)`` (NaN scores do not count)."""
    nonzero = ((r != 0) & ~torch.isnan(r)).sum().to(torch.float64)
    alpha = (r.shape[0] / nonzero.clamp_min(1.0)).reshape(1)
    adv = _normalize(r, g, c, "center", False, alpha)
    if c.singleton_unit_std:
        adv = _unit_std_singletons(adv, r, g, c, alpha * r.to(torch.float64))
    return adv


def _grpo_passk(r, g, c):
    """The best response gets ``r_max - r_second`` (``/ (std + eps)`` unless std="none"), the others 0."""
    scale = _batch_inv_std(r, c) if c.std == "batch" else None
    return _normalize(r, g, c, "passk", c.std == "group", scale)


def _reinforce_pp_baseline(r, g, c):
    """``r - mean_g`` spread over tokens, whitened over the valid tokens of the batch.

    Token whitening of a per-sequence value is a length-weighted whitening
    (:func:`_length_weighted_whiten`)."""
    a = _normalize(r, g, c, "center", False)
    return _length_weighted_whiten(a, r, c, "reinforce_pp_baseline")


def _gdpo(r, g, c):
    """Each reward column group-normalised (as grpo), weighted sum, then normalised over the batch:
    over the responses, ``(x - mean) / (std + eps)`` (``batch_normalization="sequence"``), or over
    their valid tokens, length-weighted, ``(x - mean) * rsqrt(var + 1e-8)`` (``"token"``, verl).

    A NaN reward only leaves its own column; rows with every reward NaN get 0."""
    K = r.shape[1]
    w = c.weights if c.weights is not None else [1.0] * K
    total = None
    for k in range(K):  # K reward columns: a static Python int
        a = _grpo(r[:, k].contiguous(), g, c) * w[k]
        total = a if total is None else total + a
    total = torch.where(torch.isnan(r).all(dim=1), float("nan"), total)
    if c.batch_normalization == "token":
        return _length_weighted_whiten(torch.nan_to_num(total), total, c, "gdpo")
    return _normalize(total, _whole_batch(total), c, "center", True)


ESTIMATORS: dict[str, Callable[[Tensor, _Groups, _Ctx], Tensor]] = {
    "grpo": _grpo,
    "rloo": _rloo,
    "opo": _opo,
    "gpg": _gpg,
    "grpo_passk": _grpo_passk,
    "reinforce_pp_baseline": _reinforce_pp_baseline,
    "gdpo": _gdpo,
}


# ---------------------------------------------------------------- host-side checks
def _resolve(device: torch.device, backend: Optional[str]) -> str:
    name = _backend.resolve(device, backend)
    if name == "triton":  # no Triton kernels here: the compiled kernels of that device
        name = "cuda" if device.type == "cuda" else "cpp"
    return name


def _as_index(name: str, ids, B: int, device: torch.device) -> Tensor:
    """int64 [B] group keys on ``device``. Integer tensors pass through (on the
    device, no copy to the host). Strings (lists, tuples, numpy arrays of str
    or object) are mapped to 0, 1, ... in order of first appearance on the
    host — a host step, for trainers that keep prompt ids as text."""
    if isinstance(ids, Tensor):
        _validate.tensor(name, ids)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (group keys), got {ids.dtype}")
        if ids.dim() != 1 or ids.shape[0] != B:
            raise ValueError(f"{name} must have shape ({B},) (one group key per score), got {tuple(ids.shape)}")
        if ids.device != device:
            raise ValueError(f"{name} is on {ids.device} but scores are on {device}; use one device")
        return ids.to(torch.int64).contiguous()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None and isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {ids.shape}")
        if ids.dtype.kind in "iu":
            return _as_index(name, torch.from_numpy(ids.astype(np.int64)).to(device), B, device)
        if ids.dtype.kind not in "OUS":
            raise TypeError(f"{name} must hold integers or strings, got numpy dtype {ids.dtype}")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{name} must be an integer tensor, a numpy array or a list of ids, got {type(ids).__name__}")
    if len(ids) != B:
        raise ValueError(f"{name} must have {B} entries (one group key per score), got {len(ids)}")
    table: dict = {}
    try:
        keys = [table.setdefault(k, len(table)) for k in ids]
    except TypeError as e:
        raise TypeError(f"{name} entries must be hashable ids (str or int)") from e
    return torch.tensor(keys, dtype=torch.int64, device=device)


def _groups(name: str, index, group_size, B: int, device) -> _Groups:
    if index is not None and group_size is not None:
        raise ValueError(f"give either {name} or group_size, not both")
    if index is None:
        if group_size is None:
            raise ValueError(f"group_advantages needs {name} (a group key per score) or group_size")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if B % group_size:
            raise ValueError(f"group_size={group_size} must divide the number of scores {B}")
        return _Groups(torch.empty(0, dtype=torch.int64, device=device), group_size)
    return _Groups(_as_index(name, index, B, device), 1)


def _scores(name: str, x, dim: int) -> Tensor:
    _validate.tensor(name, x)
    if x.dim() != dim:
        what = "[B] (one score per response)" if dim == 1 else "[B, K] (K reward columns)"
        raise ValueError(f"{name} must have shape {what}, got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be float32 or float64 (bf16/fp16 are computed in fp32), got {x.dtype}")
    if x.dtype != torch.float64:
        x = x.to(torch.float32)
    return x.contiguous()


def _mask(name: str, mask, B: int, dtype, device) -> Tensor:
    _validate.real(name, mask, dim=2)
    if mask.shape[0] != B:
        raise ValueError(f"{name} must have shape ({B}, T) (one row per response), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the scores are on {device}; use one device")
    return mask.to(dtype).contiguous()


# ---------------------------------------------------------------- public API
def group_advantages(
    scores: Tensor,
    index=None,
    *,
    group_size: Optional[int] = None,
    estimator: str = "grpo",
    eps: float = 1e-6,
    std: str = "group",
    singleton: str = "raw",
    batch_normalization: str = "sequence",
    response_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    reward_weights: Optional[Union[Tensor, Sequence[float]]] = None,
    step_index=None,
    step_scores: Optional[Tensor] = None,
    omega: float = 1.0,
    backend: Optional[str] = None,
) -> Tensor:
    r"""One advantage per response from the statistics of its group (docs/math.md#advantages).

    With ``r`` the score, ``n, mean, std`` (unbiased) the group's count, mean
    and standard deviation over its non-NaN scores:

    ============================  ==========================================================
    ``grpo``                      ``(r - mean) / (std + eps)``; ``std="batch"`` uses the
                                  batch std of the scores, ``std="none"`` divides by nothing
                                  (Dr. GRPO)
    ``rloo``                      ``n/(n-1) (r - mean)`` = r minus the mean of the others
    ``reinforce_pp_baseline``     ``r - mean``, whitened over the valid tokens of the batch
                                  ``(x - mean) * rsqrt(var + 1e-8)``; needs the mask
    ``opo``                       ``r - sum L r / sum L`` (L = response length); needs the mask
    ``gpg``                       ``alpha (r - mean)``, ``alpha = B / max(count_nonzero(r), 1)``
    ``grpo_passk``                the best response gets ``r_max - r_second`` (``/ (std +
                                  eps)`` unless ``std="none"``), the others 0
    ``gdpo``                      ``scores [B, K]``: each column normalised as grpo, summed
                                  with ``reward_weights``, then normalised over the batch
    ============================  ==========================================================

    Step groups (GiGPO): with ``step_index`` (steps sharing an environment
    state) the result is ``A_episode + omega * A_step``, the step term the same
    estimator on ``step_scores`` (default ``scores``) grouped by ``step_index``.

    Edge cases: a NaN score is left out of its group's statistics and gets 0; a
    group of one (one non-NaN score) has mean 0 and std 1, so its raw score
    passes through (``singleton="zero"`` gives 0); a group of equal scores gets
    exactly 0.

    Args:
        scores: ``[B]`` float scores (``[B, K]`` for gdpo); fp64 stays fp64,
            other floats are computed in fp32. Statistics accumulate in fp64.
        index: group key per score: an integer tensor on the scores' device
            (any order, any values, e.g. hashed prompt ids), or a list / numpy
            array of ids such as strings, mapped to integers on the host.
        group_size: instead of ``index``: consecutive blocks of this size.
        eps: added to the std.
        std: ``"group"``, ``"batch"`` or ``"none"`` (grpo, grpo_passk, gdpo's columns).
        singleton: what a group of one gets: ``"raw"`` its score, ``"zero"`` 0, or
            ``"unit_std"`` its estimator's formula with mean 0 and std 1 (verl): grpo and
            gdpo's columns ``r / (1 + eps)`` with ``std="group"``, gpg ``alpha r``, its score
            elsewhere.
        batch_normalization: gdpo's last step: ``"sequence"`` over the responses or
            ``"token"`` over their valid tokens (verl; needs the mask or lengths).
        response_mask: ``[B, T]`` mask, for the token counts of
            reinforce_pp_baseline and opo (or give ``lengths`` ``[B]``).
        reward_weights: gdpo weights, one per reward column (default 1).
        step_index, step_scores, omega: GiGPO step groups.
        backend: ``"cpp"`` (CPU tensors) or ``"cuda"``; default by device.

    Returns:
        ``[B]`` advantages, float64 for float64 scores, else float32.
        Spread them over tokens with :func:`token_advantages`.
    """
    if estimator in TOKEN_LEVEL:
        raise ValueError(f"estimator {estimator!r} is token-level: use fastalign.{TOKEN_LEVEL[estimator]}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
    r = _scores("scores", scores, 2 if estimator == "gdpo" else 1)
    B, device = r.shape[0], r.device
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    if singleton not in SINGLETON:
        raise ValueError(f"singleton must be one of {SINGLETON}, got {singleton!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    _validate.finite(eps=eps, omega=omega)
    g = _groups("index", index, group_size, B, device)
    lens = None
    if lengths is not None:
        _validate.real("lengths", lengths, dim=1)
        _validate.shape("lengths", lengths, (B,), "one length per response")
        _validate.same_device(scores=r, lengths=lengths)
        lens = lengths.to(torch.float64).contiguous()
    elif response_mask is not None:
        lens = _mask("response_mask", response_mask, B, torch.float64, device).sum(dim=1)
    if estimator == "gdpo":
        K = r.shape[1]
        if reward_weights is not None:
            n_w = reward_weights.numel() if isinstance(reward_weights, Tensor) else len(reward_weights)
            if n_w != K:
                raise ValueError(f"reward_weights must have {K} entries (one per reward column), got {n_w}")
            if isinstance(reward_weights, Tensor):
                _validate.real("reward_weights", reward_weights)
                reward_weights = reward_weights.to(device=device, dtype=r.dtype).reshape(K)
    elif reward_weights is not None:
        raise ValueError("reward_weights is for estimator='gdpo' (scores [B, K])")
    if batch_normalization not in BATCH_NORMALIZATIONS:
        raise ValueError(f"batch_normalization must be one of {BATCH_NORMALIZATIONS}, got {batch_normalization!r}")
    if batch_normalization != "sequence" and estimator != "gdpo":
        raise ValueError(f"batch_normalization is gdpo's last step; it does not apply to estimator {estimator!r}")
    c = _Ctx(float(eps), std, singleton == "zero", lens, reward_weights, _resolve(device, backend),
             singleton == "unit_std", batch_normalization)
    row = ESTIMATORS[estimator]
    adv = row(r, g, c)
    if step_index is not None:
        sr = r if step_scores is None else _scores("step_scores", step_scores, r.dim())
        if sr.shape != r.shape:
            raise ValueError(f"step_scores must have shape {tuple(r.shape)}, got {tuple(sr.shape)}")
        _validate.same_device(scores=r, step_scores=sr)
        sg = _groups("step_index", step_index, None, B, device)
        adv = adv + float(omega) * row(sr.to(r.dtype), sg, c)
    elif step_scores is not None:
        raise ValueError("step_scores needs step_index (the step groups)")
    return adv


def token_advantages(adv: Tensor, response_mask: Tensor) -> Tensor:
    """Spread per-sequence advantages over tokens: ``adv[:, None] * mask`` -> ``[B, T]``."""
    _validate.tensor("adv", adv, dim=1)
    if not adv.dtype.is_floating_point:
        raise TypeError(f"adv must be a float tensor, got {adv.dtype}")
    m = _mask("response_mask", response_mask, adv.shape[0], adv.dtype, adv.device)
    return adv.unsqueeze(-1) * m


def masked_whiten(x: Tensor, mask: Tensor, eps: float = WHITEN_EPS) -> Tensor:
    """``(x - mean) * rsqrt(var + eps) * mask`` with mean and unbiased var over the masked tokens.

    Tokens where ``mask == 0`` are left out by selection (not multiplied by 0): a NaN or inf there
    changes nothing, and their output is exactly 0."""
    _validate.any_float("x", x)
    _validate.like(tuple(x.shape), "x.shape", device=x.device, device_of="x", kind="real", mask=mask)
    _validate.finite(eps=eps)
    m = mask.to(torch.float64)
    valid = m != 0
    x64 = torch.where(valid, x.to(torch.float64), 0.0)
    n = m.sum()
    mean = (x64 * m).sum() / n.clamp_min(1.0)
    var = torch.where(valid, m * (x64 - mean) ** 2, 0.0).sum() / (n - 1.0).clamp_min(1.0)
    return torch.where(valid, (x64 - mean) * torch.rsqrt(var + eps) * m, 0.0).to(x.dtype)


def _token_inputs(name: str, x, mask, others=()):
    _validate.real(name, x, dim=2)
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    x = (x if x.dtype == torch.float64 else x.to(torch.float32)).contiguous()
    m = _mask("response_mask", mask, x.shape[0], x.dtype, x.device)
    _validate.shape("response_mask", m, x.shape, f"like {name}")
    out = []
    for oname, o in others:
        _validate.any_float(oname, o, dim=2)
        _validate.shape(oname, o, x.shape, f"like {name}")
        _validate.same_device(**{name: x, oname: o})
        out.append(o.to(x.dtype).contiguous())
    return x, m, out


def reinforce_pp_advantages(token_rewards: Tensor, response_mask: Tensor, *, gamma: float = 1.0,
                            whiten: bool = True, backend: Optional[str] = None) -> Tensor:
    """REINFORCE++: ``G_t = r_t + gamma G_{t+1}`` (reset after each masked token), whitened over valid tokens.

    Returns ``[B, T]`` (``G m`` whitened, times m). In this and the other token-level estimators a
    masked token (``mask == 0``) is skipped by selection: whatever it holds (NaN, inf) never reaches
    a valid token or the whitening statistics, and its output is exactly 0."""
    _validate.finite(gamma=gamma)
    x, m, _ = _token_inputs("token_rewards", token_rewards, response_mask)
    g, _ = reverse_scan(x, x.new_empty(0), m, float(gamma), 0.0, SCANS["return"], _resolve(x.device, backend))
    return masked_whiten(g, m) if whiten else g


def remax_advantages(token_rewards: Tensor, response_mask: Tensor, baseline: Tensor, *,
                     backend: Optional[str] = None) -> Tensor:
    """ReMax: ``A_t = (sum_{s>=t} r_s m_s - b) m_t`` with ``b [B]`` the greedy rollout's score."""
    x, m, _ = _token_inputs("token_rewards", token_rewards, response_mask)
    _validate.real("baseline", baseline, dim=1)
    _validate.shape("baseline", baseline, (x.shape[0],), "one score per response")
    _validate.same_device(token_rewards=x, baseline=baseline)
    g, _ = reverse_scan(x, x.new_empty(0), m, 1.0, 0.0, SCANS["to_go"], _resolve(x.device, backend))
    return torch.where(m != 0, g - baseline.to(x.dtype).unsqueeze(-1) * m, 0.0)


def gae_advantages(token_rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float = 1.0,
                   lam: float = 1.0, whiten: bool = True, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """GAE: ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}`` (masked
    tokens are skipped: they carry V and A through). Returns ``(A [B, T], returns = (A + V) m)``,
    A whitened over valid tokens unless ``whiten=False``."""
    _validate.finite(gamma=gamma, lam=lam)
    x, m, (v,) = _token_inputs("token_rewards", token_rewards, response_mask, [("values", values)])
    a, ret = reverse_scan(x, v, m, float(gamma), float(lam), SCANS["gae"], _resolve(x.device, backend))
    return (masked_whiten(a, m) if whiten else a), ret


def implicit_process_advantages(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor,
                                outcome_advantages: Optional[Tensor] = None, *, beta: float = 0.05,
                                gamma: float = 1.0, backend: Optional[str] = None) -> Tensor:
    """PRIME implicit process rewards: token reward ``beta (lp - ref)``, returns
    ``R_t = sum_{s>=t} gamma^{s-t} beta (lp_s - ref_s) m_s`` (reset after masked tokens),
    plus the outcome advantage of the sequence: ``(R_t + A_i) m_t``."""
    _validate.finite(beta=beta, gamma=gamma)
    lp, m, (ref,) = _token_inputs("logprobs", logprobs, response_mask, [("ref_logprobs", ref_logprobs)])
    _validate.like((lp.shape[0],), "one advantage per response", device=lp.device, device_of="logprobs",
                   outcome_advantages=outcome_advantages)
    x = (lp - ref) * float(beta)
    r, _ = reverse_scan(x, x.new_empty(0), m, float(gamma), 0.0, SCANS["return"], _resolve(x.device, backend))
    if outcome_advantages is not None:
        _validate.tensor("outcome_advantages", outcome_advantages, dim=1)
        _validate.shape("outcome_advantages", outcome_advantages, (x.shape[0],), "one advantage per response")
        r = torch.where(m != 0, r + outcome_advantages.to(x.dtype).unsqueeze(-1) * m, 0.0)
    return r


# ---------------------------------------------------------------- optimal token baseline
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
) -> tuple:
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

    Returns ``(advantages, returns)`` ``[B, T]`` in the rewards' dtype (float32 or float64).
    Plain tensor operations on the inputs' device, group sums as a ``[B, B]`` same-group matrix
    product in float64: no host synchronisation (string ids are mapped on the host, as in
    :func:`group_advantages`). No autograd.
    """
    extra = [("old_logprobs", old_logprobs), ("sum_p2", sum_p2)]
    if importance_weights is not None:
        extra.append(("importance_weights", importance_weights))
    r, m, (old, p2, *iw) = _token_inputs("token_rewards", token_rewards, response_mask, extra)
    B, T = r.shape
    _validate.finite(eps=eps)
    if align not in ("position", "response"):
        raise ValueError(f"align must be 'position' or 'response', got {align!r}")
    with torch.no_grad():
        keys = _as_index("index", index, B, r.device)
        returns = (r * m).flip(-1).cumsum(-1).flip(-1)
        w = 1.0 - 2.0 * torch.exp(old) + p2
        if iw:
            w = w * iw[0] * iw[0]
        W = (w * m).cumsum(-1)
        lengths = m.sum(-1)
        same = (keys[:, None] == keys[None, :]).to(r.dtype)  # [B, B]
        GW, Wm = returns * W * m, W * m
        rank = (m.cumsum(-1) - 1.0).clamp_min(0.0).to(torch.int64)  # response-token rank of each position
        if align == "response":  # move every response token to its rank (masked ones add 0)
            same = same * (lengths > 0).to(r.dtype)[None, :]
            GW = torch.zeros_like(GW).scatter_add_(1, rank, GW)
            Wm = torch.zeros_like(Wm).scatter_add_(1, rank, Wm)
        same64 = same.to(torch.float64)  # float64 group sums: exact member counts, no reduced-precision matmul
        num = (same64 @ GW.to(torch.float64)).to(r.dtype)
        den = (same64 @ Wm.to(torch.float64)).to(r.dtype) + eps
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
        return (returns - baseline) * m, returns
