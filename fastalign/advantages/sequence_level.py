r"""Sequence-level advantages (docs/math.md#advantages): one advantage per response from the
statistics of its group (the responses to the same prompt), on the C++ CPU kernels or the CUDA kernels.

Each estimator of :func:`group_advantages` is one row of ``ESTIMATORS`` (a small function), built
from two kernels: segmented group statistics and a per-score normaliser. Groups are an integer
index (any order, any values such as hashed prompt ids; the same results as consecutive blocks)
or a fixed ``group_size``. Nothing on the CUDA path synchronises with the host. Advantages are
targets: no autograd (:func:`group_advantages` runs under ``torch.no_grad()``, so its output never
requires grad, on every backend). The token-level estimators are in :mod:`fastalign.advantages.token_level`.
"""
from __future__ import annotations

import operator
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from fastalign import _backend, _validate
from fastalign.advantages._inputs import WHITEN_EPS, as_index, response_mask_rows
from fastalign.ops.group_stats import MODES, call_group_advantage, group_stats
from fastalign.ops.masked_whiten import weighted_whiten

STD_MODES = ("group", "batch", "none")
#: the estimators that read ``std`` (the others take no std, and refuse one other than the default)
STD_ESTIMATORS = ("grpo", "grpo_passk", "gdpo")
#: the estimators that read the token counts (``response_mask`` or ``lengths``); gdpo reads them for its
#: ``batch_normalization="token"`` only, and the others refuse them
LENGTH_ESTIMATORS = ("opo", "reinforce_pp_baseline")
SINGLETON = ("raw", "zero", "unit_std")
#: ``eps``'s default: an ``eps`` other than this is refused where the estimator divides by no std (:func:`reads_eps`)
DEFAULT_EPS = 1e-6
BATCH_NORMALIZATIONS = ("sequence", "token")
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
    """``1 / (std + eps)`` over the non-NaN scores of the batch, as a float64 [1] device tensor.

    ``std + eps = 0`` (eps 0, every score equal) gives 1: each ``r - mean_g`` is exactly 0 then,
    and ``0 * (1 / 0)`` would be NaN."""
    g = _whole_batch(r)
    _, stats, _ = group_stats(r, g.index, r.new_empty(0, dtype=torch.float64), g.size, c.backend)
    d = stats[:1, 2] + c.eps
    return torch.where(d == 0, 1.0, 1.0 / d)  # empty for an empty batch (no scale)


def _unit_std_singletons(adv: Tensor, r: Tensor, g: _Groups, c: _Ctx, alone_value: Tensor) -> Tensor:
    """``singleton="unit_std"``: a group of one takes ``alone_value``, its estimator's formula
    with mean 0 and std 1 (grpo ``r / (1 + eps)``, gpg ``alpha r``)."""
    gid, stats, _ = group_stats(r, g.index, r.new_empty(0, dtype=torch.float64), g.size, c.backend)
    alone = (stats[gid, 0] == 1) & ~torch.isnan(r)
    return torch.where(alone, alone_value.to(adv.dtype), adv)


def _length_weighted_whiten(a: Tensor, r: Tensor, c: _Ctx, name: str) -> Tensor:
    """Whitening of per-sequence values spread over their valid tokens (:func:`weighted_whiten` with the
    lengths ``L`` as weights: mean = sum L a / N, var = sum L (a - mean)^2 / (N - 1), N = sum L,
    ``(a - mean) * rsqrt(var + 1e-8)``); NaN scores and empty responses are left out and get 0."""
    w = torch.where(torch.isnan(r), 0.0, _need_lengths(c, name)).to(torch.float64)
    return weighted_whiten(a, w, WHITEN_EPS).to(r.dtype)


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

    A NaN reward only leaves its own column; rows with every reward NaN get 0. An infinite reward
    follows IEEE arithmetic: its group's column is NaN (as grpo's), and the batch normalisation
    spreads that NaN to every response (as verl's gdpo, and the batch statistics of
    ``reinforce_pp_baseline``)."""
    K = r.shape[1]  # >= 1 (checked)
    w = c.weights if c.weights is not None else [1.0] * K
    total = None
    for k in range(K):  # K reward columns: a static Python int
        a = _grpo(r[:, k].contiguous(), g, c) * w[k]
        total = a if total is None else total + a
    missing = torch.isnan(r).all(dim=1)
    # a non-finite sum of a scored row comes from an infinite reward: it reaches the batch statistics
    poisoned = (~torch.isfinite(total) & ~missing).any()
    total = torch.where(missing, float("nan"), total)
    if c.batch_normalization == "token":
        out = _length_weighted_whiten(torch.nan_to_num(total), total, c, "gdpo")
    else:
        out = _normalize(total, _whole_batch(total), c, "center", True)
    return torch.where(poisoned, float("nan"), out)


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
def reads_eps(estimator: str, std: str = "group", batch_normalization: str = "sequence") -> bool:
    """Whether ``group_advantages`` reads ``eps`` for these options: only where it divides by a std, that
    is grpo and grpo_passk with ``std`` "group" or "batch", and gdpo unless ``std="none"`` with
    ``batch_normalization="token"`` (its columns then divide by no std, and the token whitening adds 1e-8
    to the variance instead). rloo, opo, gpg and reinforce_pp_baseline never read it."""
    if estimator in ("grpo", "grpo_passk"):
        return std != "none"
    if estimator == "gdpo":
        return std != "none" or batch_normalization == "sequence"
    return False


def _groups(name: str, index, group_size, B: int, device) -> _Groups:
    if index is not None and group_size is not None:
        raise ValueError(f"give either {name} or group_size, not both")
    if index is None:
        if group_size is None:
            raise ValueError(f"group_advantages needs {name} (a group key per score) or group_size")
        if isinstance(group_size, bool):
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        try:  # a Python or numpy integer
            group_size = operator.index(group_size)
        except TypeError:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}") from None
        if group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if B % group_size:
            raise ValueError(f"group_size={group_size} must divide the number of scores {B}")
        return _Groups(torch.empty(0, dtype=torch.int64, device=device), group_size)
    return _Groups(as_index(name, index, B, device), 1)


def _check_token_counts_apply(estimator: str, batch_normalization: str, response_mask, lengths) -> None:
    """``response_mask`` / ``lengths`` only for the estimators that read them (``LENGTH_ESTIMATORS``, gdpo with
    ``batch_normalization="token"``): elsewhere they would be ignored, as ``std`` or ``reward_weights``."""
    if estimator in LENGTH_ESTIMATORS or (estimator == "gdpo" and batch_normalization == "token"):
        return
    given = [name for name, v in (("response_mask", response_mask), ("lengths", lengths)) if v is not None]
    if given:
        where = f"estimator {estimator!r}" + (" with batch_normalization='sequence'" if estimator == "gdpo" else "")
        verb = "do" if len(given) > 1 else "does"
        raise ValueError(f"{' and '.join(given)} {verb} not apply to {where}: only {LENGTH_ESTIMATORS} and gdpo "
                         "with batch_normalization='token' read the token counts")


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


# ---------------------------------------------------------------- public API
@torch.no_grad()
def group_advantages(
    scores: Tensor,
    index=None,
    *,
    group_size: Optional[int] = None,
    estimator: str = "grpo",
    eps: float = DEFAULT_EPS,
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
            array of ids such as strings, mapped to integers on the host (entries that
            are 0-d tensors or numpy scalars count by their value).
        group_size: instead of ``index``: consecutive blocks of this size (a Python or numpy integer).
        eps: added to the std (>= 0). With ``eps=0`` a group whose std is 0 (equal
            scores) still gets exactly 0. Read only where a std divides: grpo and
            grpo_passk with ``std`` "group" or "batch", gdpo unless ``std="none"`` with
            ``batch_normalization="token"``; elsewhere (rloo, opo, gpg,
            reinforce_pp_baseline, ``std="none"``) a value other than the default raises
            ``ValueError``, as ``std`` where it does not apply.
        std: ``"group"``, ``"batch"`` or ``"none"`` (grpo, grpo_passk, gdpo's columns).
        singleton: what a group of one gets: ``"raw"`` its score, ``"zero"`` 0, or
            ``"unit_std"`` its estimator's formula with mean 0 and std 1 (verl): grpo and
            gdpo's columns ``r / (1 + eps)`` with ``std="group"``, gpg ``alpha r``, its score
            elsewhere.
        batch_normalization: gdpo's last step: ``"sequence"`` over the responses or
            ``"token"`` over their valid tokens (verl; needs the mask or lengths).
        response_mask: ``[B, T]`` mask, for the token counts of reinforce_pp_baseline,
            opo and gdpo's ``"token"`` normalisation; or give ``lengths`` ``[B]`` (finite and
            >= 0) instead, not both. The other estimators refuse both (``ValueError``), as
            ``std`` where it does not apply.
        reward_weights: gdpo weights, one finite number per reward column (default 1).
        step_index, step_scores, omega: GiGPO step groups; ``step_scores`` and an
            ``omega`` other than 1 without ``step_index`` raise ``ValueError``.
        backend: a kernel family (docs/backends.md); default by device.

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
    if std != "group" and estimator not in STD_ESTIMATORS:
        raise ValueError(f"std={std!r} does not apply to estimator {estimator!r}: only {STD_ESTIMATORS} divide by a std")
    if singleton not in SINGLETON:
        raise ValueError(f"singleton must be one of {SINGLETON}, got {singleton!r}")
    eps = _validate.finite_number("eps", eps)  # the type first: eps="a" is a TypeError naming eps
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    omega = _validate.finite_number("omega", omega)
    if omega != 1.0 and step_index is None:
        raise ValueError(f"omega={omega} needs step_index: it weights the step groups' term")
    g = _groups("index", index, group_size, B, device)
    if batch_normalization not in BATCH_NORMALIZATIONS:
        raise ValueError(f"batch_normalization must be one of {BATCH_NORMALIZATIONS}, got {batch_normalization!r}")
    if batch_normalization != "sequence" and estimator != "gdpo":
        raise ValueError(f"batch_normalization is gdpo's last step; it does not apply to estimator {estimator!r}")
    if eps != DEFAULT_EPS and not reads_eps(estimator, std, batch_normalization):
        where = f"estimator {estimator!r}" + (f" with std={std!r}" if estimator in STD_ESTIMATORS else "")
        if estimator == "gdpo":
            where += f" and batch_normalization={batch_normalization!r}"
        raise ValueError(f"eps={eps} does not apply to {where}: it divides by no std, so eps is never read")
    _check_token_counts_apply(estimator, batch_normalization, response_mask, lengths)
    if lengths is not None and response_mask is not None:
        raise ValueError("give either response_mask or lengths (the token counts), not both")
    lens = None
    bad = []  # malformed-input flags not read on the host (CUDA, tracing): they make the output NaN
    if lengths is not None:
        _validate.real("lengths", lengths, dim=1)
        _validate.shape("lengths", lengths, (B,), "one length per response")
        _validate.same_device(scores=r, lengths=lengths)
        lens = lengths.to(torch.float64).contiguous()
        bad.append(_validate.token_counts("lengths", lens))
    elif response_mask is not None:
        lens = response_mask_rows("response_mask", response_mask, B, torch.float64, device).sum(dim=1)
    if estimator == "gdpo":
        K = r.shape[1]
        if K == 0:
            raise ValueError(f"scores must have at least one reward column for gdpo, got shape {tuple(r.shape)}")
        if reward_weights is not None:
            if isinstance(reward_weights, Tensor):
                _validate.real("reward_weights", reward_weights, dim=1)  # [K]: not [1, K] or [K, 1]
                _validate.shape("reward_weights", reward_weights, (K,), "one weight per reward column")
                reward_weights = reward_weights.to(device=device, dtype=r.dtype)
                bad.append(_validate.flag_or_raise(
                    ~torch.isfinite(reward_weights).all(), reward_weights,
                    lambda: f"reward_weights must be finite, got {reward_weights.tolist()}"))
            else:  # a NaN or inf weight would turn every advantage into 0 or NaN
                if hasattr(reward_weights, "tolist") and not isinstance(reward_weights, (list, tuple)):
                    reward_weights = reward_weights.tolist()  # a numpy array
                reward_weights = _validate.finite_numbers("reward_weights", reward_weights)
                if len(reward_weights) != K:
                    raise ValueError(f"reward_weights must have {K} entries (one per reward column), "
                                     f"got {len(reward_weights)}")
    elif reward_weights is not None:
        raise ValueError("reward_weights is for estimator='gdpo' (scores [B, K])")
    c = _Ctx(eps, std, singleton == "zero", lens, reward_weights, _backend.request(device, backend),
             singleton == "unit_std", batch_normalization)
    row = ESTIMATORS[estimator]
    adv = row(r, g, c)
    if step_index is not None:
        sr = r if step_scores is None else _scores("step_scores", step_scores, r.dim())
        if sr.shape != r.shape:
            raise ValueError(f"step_scores must have shape {tuple(r.shape)}, got {tuple(sr.shape)}")
        _validate.same_device(scores=r, step_scores=sr)
        sg = _groups("step_index", step_index, None, B, device)
        adv = adv + omega * row(sr.to(r.dtype), sg, c)
    elif step_scores is not None:
        raise ValueError("step_scores needs step_index (the step groups)")
    for flag in bad:
        if flag is not None:
            adv = torch.where(flag, float("nan"), adv)
    return adv
