"""verl 0.9.1 advantage profile: ``algorithm.adv_estimator`` → fastalign's estimators.

:func:`compute_advantage` takes what verl's ``ray_trainer.compute_advantage`` takes from the
batch (``token_level_rewards``, ``response_mask``, the ``uid`` group ids as strings, a numpy
array or an integer tensor, ``values``, ``reward_baselines``) and the ``algorithm`` config (verl's
``AlgoConfig`` or a dict), and returns ``(advantages, returns)`` ``[B, T]`` as verl's estimator
does, from fastalign's kernels.

Where fastalign's own defaults differ, the profile selects verl's behaviour:

* a group of one has mean 0 and std 1 (``singleton="unit_std"``): ``r / (1 + eps)`` in grpo,
  grpo_vectorized and gdpo's columns, ``alpha r`` in gpg; rloo_vectorized gives it 0
  (``singleton="zero"``), rloo, opo and reinforce_plus_plus_baseline its score; grpo_passk raises
  ``ValueError`` naming ``index`` (pass@k needs at least 2 responses per group, as verl refuses it).
* gdpo: the weighted sum of the group-normalised reward columns is whitened over the valid
  tokens (``batch_normalization="token"``).
* reinforce_plus_plus: the return is carried through masked tokens (multi-turn observation
  spans) without decay — GAE's skipping scan with ``V = 0``, ``lam = 1``.
* verl's trainer passes ``norm_adv_by_std_in_grpo`` to grpo and grpo_passk only; with
  grpo_vectorized or gdpo a ``False`` would be ignored by verl, so it is refused here.

NaN scores (a failed reward, the row sum of ``token_level_rewards``): fastalign's
``group_advantages`` leaves a NaN score out of its group and gives it 0; the profile gives verl's
numbers instead, from device tensor operations (no host read):

* grpo, grpo_vectorized, rloo, rloo_vectorized, opo, gpg: every response of a group holding a NaN
  score gets NaN (on every position of its row, as verl's ``A * mask``); gpg's
  ``alpha = B / count_nonzero(r)`` counts the NaN score, which rescales every other group as in verl.
* grpo_passk: in a group holding a NaN score the NaN response gets NaN and the others 0 (verl's
  ``torch.topk`` ranks NaN first). With several NaN scores in one group, or a non-finite advantage
  shared by responses tied at an infinite top score, which of them ``topk`` returns first is not
  specified; the profile gives NaN to the first in batch order and 0 to the others.
* reinforce_plus_plus_baseline, gdpo: a NaN or infinite score anywhere in the batch makes every
  advantage NaN (verl's batch whitening multiplies by the mask, so ``NaN * 0`` reaches its statistics,
  empty responses included).
* rloo_vectorized: a group of one with an infinite score gets NaN (verl's ``(inf - inf) * 0``).
* gae, reinforce_plus_plus, reinforce_plus_plus_baseline, gdpo: a batch of fewer than two valid tokens
  (mask sum ``0 < N <= 1``), which verl's unbiased whitening refuses (``ValueError``), gets NaN advantages
  on its valid tokens (on their rows for the sequence estimators), never a silent 0.

``response_mask`` with values other than 0 and 1: grpo, grpo_vectorized, rloo, rloo_vectorized, opo, gpg and
grpo_passk give verl's numbers (the mask scales each response's advantage). verl's other estimators weigh a
token by its mask inside their scans and whitening, where fastalign counts any nonzero entry as valid, so
they refuse such a mask: ``ValueError`` naming ``response_mask`` where the mask is on the host (an eager CPU
tensor), otherwise NaN advantages and returns (no host read).

grpo_passk's check that every group has at least 2 responses reads the group sizes on the host when
``index`` is a host object (verl's numpy array of uids, a list); with a device tensor ``index`` the
advantages are NaN instead (no synchronisation), with an eager CPU tensor it raises.

Groups (``index``, verl's ``uid`` array): each estimator groups the uids as verl's own function does.
grpo_vectorized maps them with verl's ``groupwise.as_torch_index``: integers by value, floats within 1e-6 of
an integer rounded and other floats cast to int64 (truncated toward 0), then labels numpy casts to int64
(numeric strings by value: ``"1"``, ``"01"`` and ``1`` are one group), the rest by ``np.unique``.
rloo_vectorized groups equal values (``np.unique``; an object array mixing strings and numbers raises
``TypeError``, as there). The others key a Python dict by the raw uid ``index[i]``: ``"1"`` and ``"01"`` are
two groups, ``1``, ``1.0`` and ``True`` one; a float array groups by its values. A NaN or infinite float uid
raises ``ValueError`` naming ``index`` (verl puts each NaN of a dict apart, ``np.unique`` puts them together,
``as_torch_index`` casts them to an undefined integer). Integer tensors group by value on their device (verl's
dict would put every 0-d tensor in a group of its own, hashing it by identity); a float tensor is read on the
host by grpo_vectorized and rloo_vectorized, as verl does, and refused (``TypeError``) by the others.

Values on masked positions: fastalign gives 0 there; verl leaves whatever its scan holds
(gae's whitened advantages and returns, remax's returns and advantages on interior masked tokens).
Every verl loss masks them out; the parity tests compare the valid tokens of those two estimators.

Known differences (docs/parity-policy.md):

* ``epsilon=0`` and a group of equal scores: verl divides ``0 / (0 + 0)`` (NaN; gdpo's batch whitening
  spreads it to the batch); fastalign gives that group 0 (a zero denominator divides by 1).
* opo with a group whose responses are all empty (length sum 0): verl's ``0 / 0`` gives NaN, fastalign 0.
* dtype: the advantages and returns are float32 (float64 for float64 rewards); verl returns
  ``token_level_rewards``' dtype (bf16 / fp16 rewards: verl's values rounded to that dtype).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.advantages import (gae_advantages, group_advantages, optimal_token_baseline_advantages,
                                  remax_advantages, token_advantages)
from fastalign.advantages._inputs import as_index
from fastalign.advantages.sequence_level import reads_eps
from fastalign.integrations.verl._keys import ALGO, check_keys
from fastalign.integrations.verl._names import unprefixed

try:
    import numpy as np
except ImportError:  # numpy is optional: uids then come as tensors or lists
    np = None

__all__ = ["ALGO_DEFAULTS", "ESTIMATORS", "algo_options", "compute_advantage"]

#: verl 0.9.1's ``AlgoConfig`` defaults for the fields the advantages read.
ALGO_DEFAULTS: Dict[str, Any] = dict(adv_estimator="gae", gamma=1.0, lam=1.0, norm_adv_by_std_in_grpo=True,
                                     gdpo_reward_weights=None, use_pf_ppo=False)

#: verl's sequence-level estimators → ``group_advantages`` options (grpo's std comes from the config).
_GROUPED: Dict[str, Dict[str, Any]] = {
    "grpo": dict(estimator="grpo", singleton="unit_std"),
    "grpo_vectorized": dict(estimator="grpo", singleton="unit_std"),
    "rloo": dict(estimator="rloo"),
    "rloo_vectorized": dict(estimator="rloo", singleton="zero"),
    "opo": dict(estimator="opo"),
    "gpg": dict(estimator="gpg", singleton="unit_std"),
    "grpo_passk": dict(estimator="grpo_passk"),
    "reinforce_plus_plus_baseline": dict(estimator="reinforce_pp_baseline"),
    "gdpo": dict(estimator="gdpo", singleton="unit_std", batch_normalization="token"),
}
_TOKEN_LEVEL = ("gae", "reinforce_plus_plus", "remax")
#: verl's optimal-token-baseline estimators → ``optimal_token_baseline_advantages(align=...)``.
_OPTIMAL_BASELINE = {"optimal_token_baseline": "position", "tir_optimal_token_baseline": "response"}
ESTIMATORS = tuple(_GROUPED) + _TOKEN_LEVEL + tuple(_OPTIMAL_BASELINE)
_STD_FROM_CONFIG = ("grpo", "grpo_passk")  # what verl's trainer passes norm_adv_by_std_in_grpo to
#: the estimators that give verl's numbers with a fractional ``response_mask`` (the others refuse it)
_FRACTIONAL_MASK_AS_VERL = ("grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "opo", "gpg", "grpo_passk")


def algo_options(config=None) -> Dict[str, Any]:
    """The advantage fields of verl's ``AlgoConfig`` (object or dict), verl's defaults for the rest. A dict key
    that is not a field of ``AlgoConfig`` (or of its nested ``kl_ctrl``, ``pf_ppo``, ``filter_groups``,
    ``rollout_correction``) raises ``ValueError`` naming it."""
    if config is None:
        return dict(ALGO_DEFAULTS)
    check_keys(config, ALGO, "algorithm")
    get = config.get if hasattr(config, "get") else (lambda k, d: getattr(config, k, d))
    out = {k: get(k, v) for k, v in ALGO_DEFAULTS.items()}
    est = unprefixed(str(getattr(out["adv_estimator"], "value", out["adv_estimator"])))
    if est not in ESTIMATORS:
        raise ValueError(f"algorithm.adv_estimator {est!r} is not covered: fastalign reproduces {list(ESTIMATORS)}")
    if not out["norm_adv_by_std_in_grpo"] and est in ("grpo_vectorized", "gdpo"):
        raise ValueError(f"norm_adv_by_std_in_grpo=False does not reach adv_estimator {est!r} in verl 0.9.1 "
                         "(its trainer passes it to grpo and grpo_passk only)")
    if out["gdpo_reward_weights"] is not None and est != "gdpo":
        raise ValueError(f"gdpo_reward_weights does not apply to adv_estimator {est!r}")
    if out["use_pf_ppo"] and est == "gae":
        raise ValueError("use_pf_ppo=True does not apply here: after gae, verl's compute_advantage resamples the "
                         "batch by its scores (core_algos.compute_pf_ppo_reweight_data), a step on the batch; these "
                         "are the advantages of the batch as given (resample it with that function)")
    out["adv_estimator"] = est
    return out


def _check_inputs(token_level_rewards, response_mask, *, values, reward_baselines, reward_scores, old_log_probs,
                  sum_pi_squared, rollout_is_weights) -> None:
    """The batch's tensors under verl's names (fastalign's estimators would name their own arguments):
    floating ``token_level_rewards [B, T]``, a real ``response_mask``, ``values`` / ``old_log_probs`` /
    ``sum_pi_squared`` / ``rollout_is_weights`` ``[B, T]``, ``reward_baselines [B]``, ``reward_scores [B, K]``,
    all on one device."""
    _validate.any_float("token_level_rewards", token_level_rewards, dim=2)
    shape = tuple(token_level_rewards.shape)
    dev = dict(device=token_level_rewards.device, device_of="token_level_rewards")
    _validate.like(shape, "token_level_rewards.shape", required=True, kind="real", **dev, response_mask=response_mask)
    _validate.like(shape, "token_level_rewards.shape", **dev, values=values, old_log_probs=old_log_probs,
                   sum_pi_squared=sum_pi_squared, rollout_is_weights=rollout_is_weights)
    _validate.like(shape[:1], "one per response", **dev, reward_baselines=reward_baselines)
    if reward_scores is not None:
        _validate.any_float("reward_scores", reward_scores, dim=2)
        _validate.like((shape[0], reward_scores.shape[1]), "one row per response", **dev, reward_scores=reward_scores)


#: how verl 0.9.1's estimator function groups the responses by ``index`` (the others: a Python dict keyed by each
#: raw uid ``index[i]``): grpo_vectorized maps the uids with ``verl.utils.groupwise.as_torch_index``,
#: rloo_vectorized with ``np.unique(index, return_inverse=True)``
_GROUPING = {"grpo_vectorized": "as_torch_index", "rloo_vectorized": "unique"}


def _numpy():
    """numpy, which verl's uid mappings (``as_torch_index``, ``np.unique``) run on."""
    if np is None:
        raise ImportError("grouping uids as verl's grpo_vectorized / rloo_vectorized do needs numpy (pip install "
                          "numpy), or pass the uids as an integer tensor")
    return np


def _is_ndarray(x) -> bool:
    return np is not None and isinstance(x, np.ndarray)


def _is_non_finite(x) -> bool:
    """``x`` a float (Python, numpy or a one-element tensor) that is NaN or infinite."""
    if isinstance(x, Tensor):
        return x.numel() == 1 and x.is_floating_point() and not bool(torch.isfinite(x).all())
    if np is not None and isinstance(x, np.floating):
        x = float(x)
    return isinstance(x, float) and not math.isfinite(x)


def _refuse_non_finite_uids(index, reads_float_tensors: bool) -> None:
    """A NaN or infinite float uid is refused (``ValueError`` naming ``index``): it has no group (verl's dict
    puts each NaN alone, ``np.unique`` puts them together, ``as_torch_index`` casts them to an undefined integer).
    A float tensor is checked only where it is read (``reads_float_tensors``; a host read, as verl's)."""
    if _is_ndarray(index) and index.dtype.kind in "fc":
        bad = not np.isfinite(index).all()
    elif isinstance(index, Tensor):
        bad = reads_float_tensors and index.is_floating_point() and not bool(torch.isfinite(index).all())
    elif _is_ndarray(index) and index.dtype == object:
        bad = any(_is_non_finite(x) for x in index.tolist())
    elif isinstance(index, (list, tuple)):
        bad = any(_is_non_finite(x) for x in index)
    else:
        bad = False
    if bad:
        raise ValueError("index holds a NaN or infinite uid: a float uid must be finite (it names a group)")


def _factorize(arr: np.ndarray) -> np.ndarray:
    """verl's ``as_torch_index`` fallback: the inverse of ``np.unique`` over the labels, else over their ``str``."""
    np = _numpy()
    try:
        return np.unique(arr, return_inverse=True)[1]
    except Exception:
        return np.unique(np.array([str(x) for x in arr], dtype=object), return_inverse=True)[1]


def _as_torch_index(index, B: int) -> Optional[np.ndarray]:
    """int64 group labels ``[B]`` as verl's ``groupwise.as_torch_index`` gives them, on the host; None for an
    integer or bool tensor (grouped by value on its device). Its steps: integers by value; floats within 1e-6 of
    integers rounded, other floats cast to int64 (truncated toward 0: ``0.5`` and ``0.7`` share group ``0``);
    then any labels that ``astype(np.int64)`` takes (numeric strings by value: ``"1"``, ``"01"`` and ``1`` share a
    group); the rest factorized (``np.unique``, else over ``str(label)``). A float tensor: its values rounded
    when all are within 1e-6 of integers, else factorized over ``str(value)``."""
    if isinstance(index, Tensor):
        if not (index.is_floating_point() or index.is_complex()):
            return None
        if index.dim() != 1 or index.shape[0] != B:
            raise ValueError(f"index must have shape ({B},) (one uid per response), got {tuple(index.shape)}")
        t64 = index.detach().to(torch.float64) if index.is_floating_point() else None
        if t64 is not None and torch.allclose(t64, torch.round(t64), rtol=0.0, atol=1e-6):
            return torch.round(t64).to(torch.int64).cpu().numpy()
        return _factorize(_numpy().array([str(x.item()) for x in index], dtype=object))
    np = _numpy()
    try:
        arr = np.asarray(index)
    except Exception:
        arr = np.array(list(index), dtype=object)
    if arr.ndim != 1 or arr.shape[0] != B:
        raise ValueError(f"index must be 1-D with {B} uids (one per response), got shape {arr.shape}")
    if arr.dtype != object and np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if arr.dtype != object and np.issubdtype(arr.dtype, np.floating):
        arr64 = arr.astype(np.float64)
        if not (np.abs(arr64) < 2.0 ** 63).all():  # beyond int64 the cast would merge uids
            raise ValueError("index holds a float uid beyond the int64 range (verl's as_torch_index casts float "
                             "uids to int64)")
        rounded = np.rint(arr64)
        if np.allclose(arr64, rounded, rtol=0.0, atol=1e-6):
            return rounded.astype(np.int64)
    try:
        return arr.astype(np.int64)
    except Exception:
        pass
    return _factorize(arr if arr.dtype == object else arr.astype(object))


def _unique_inverse(index, B: int) -> Optional[np.ndarray]:
    """The group labels of verl's rloo_vectorized, ``np.unique(index, return_inverse=True)[1]``, on the host
    (equal values share a group; a list mixing strings and numbers is read as strings by numpy); None for an integer
    or bool tensor (grouped by value on its device). Labels numpy cannot sort (an object array mixing strings and
    numbers): ``TypeError`` naming ``index``, as verl's ``np.unique`` raises."""
    if isinstance(index, Tensor):
        if not (index.is_floating_point() or index.is_complex()):
            return None
        index = index.detach().cpu().numpy()
    np = _numpy()
    try:
        arr = np.asarray(index)
    except Exception as e:
        raise TypeError(f"index: the uids are not a 1-D array of labels ({e})") from None
    if arr.ndim != 1 or arr.shape[0] != B:
        raise ValueError(f"index must be 1-D with {B} uids (one per response), got shape {arr.shape}")
    try:
        return np.unique(arr, return_inverse=True)[1].reshape(-1).astype(np.int64)
    except TypeError as e:
        raise TypeError(f"index: verl's rloo_vectorized sorts the uids (np.unique), which these do not allow ({e})") \
            from None


def _group_keys(estimator: str, index, B: int, device: torch.device) -> Tensor:
    """int64 group keys ``[B]`` on ``device`` of the uids ``index``, grouped as verl 0.9.1's estimator function
    ``estimator`` groups them:

    * grpo_vectorized: ``verl.utils.groupwise.as_torch_index`` (numeric strings by value, so ``"1"`` and ``"01"``
      share a group; float uids rounded or truncated to int64);
    * rloo_vectorized: ``np.unique`` (equal values share a group);
    * every other estimator: verl's Python dict keyed by the raw uid ``index[i]`` (``"1"`` and ``"01"`` apart,
      ``1``, ``1.0`` and ``True`` together); a float numpy array is read as its Python floats.

    Integer tensors are grouped by value on their device (no host read; verl's dict would put each 0-d tensor
    apart, hashing it by identity); a float tensor is refused (``TypeError``) but for grpo_vectorized and
    rloo_vectorized, which read it on the host as verl does. A NaN or infinite float uid: ``ValueError`` naming
    ``index``. Host uids (numpy arrays, lists) are mapped on the host."""
    grouping = _GROUPING.get(estimator, "dict")
    _refuse_non_finite_uids(index, reads_float_tensors=grouping != "dict")
    labels = None
    if grouping == "as_torch_index":
        labels = _as_torch_index(index, B)
    elif grouping == "unique":
        labels = _unique_inverse(index, B)
    elif _is_ndarray(index) and index.dtype.kind not in "iuOUS":
        if index.ndim != 1:
            raise ValueError(f"index must be 1-D, got shape {index.shape}")
        index = index.tolist()  # Python floats / bools: the dict keys verl's loop builds from index[i]
    if labels is not None:
        return torch.from_numpy(labels.astype(np.int64).reshape(-1)).to(device)
    if isinstance(index, Tensor) and index.dtype == torch.bool and grouping != "dict":
        index = index.to(torch.int64)  # as_torch_index and np.unique read bools as 0 and 1
    return as_index("index", index, B, device)


def group_keys_on(estimator: str, index, B: int, device: torch.device) -> Tensor:
    """:func:`_group_keys` built where the uids are (host uids mapped once on the CPU, a tensor's on its own
    device), returned on ``device``."""
    host = not isinstance(index, Tensor)
    return _group_keys(estimator, index, B, torch.device("cpu") if host else device).to(device)


def _dense_groups(keys: Tensor) -> Tensor:
    """Dense group ids ``< B`` of the int64 ``keys [B]``, from the sorted keys (device operations, no host read):
    a new id where the sorted key changes."""
    sorted_keys, order = keys.sort(stable=True)
    starts = torch.ones_like(sorted_keys, dtype=torch.int64)
    starts[1:] = (sorted_keys[1:] != sorted_keys[:-1]).to(torch.int64)
    return torch.empty_like(order).scatter_(0, order, starts.cumsum(0) - 1)


def _passk_groups_flag(index, keys: Tensor) -> Optional[Tensor]:
    """verl's grpo_passk refuses a group of fewer than 2 responses: ``ValueError`` naming ``index`` where the
    group keys are on the host (a numpy array or list ``index``, whose ``keys`` are built on the CPU, or an eager
    CPU tensor); otherwise the device flag that makes the advantages NaN (no host read)."""
    if keys.shape[0] == 0:
        return None
    gid = _dense_groups(keys)
    size = torch.zeros_like(gid).scatter_add_(0, gid, torch.ones_like(gid))[gid]

    def message() -> str:
        i = int((size < 2).nonzero()[0, 0])
        uid = index[i]
        uid = uid.item() if hasattr(uid, "item") else uid
        return (f"index: grpo_passk (pass@k) requires at least 2 responses per group, got {int(size[i])} for "
                f"group {uid!r}")

    return _validate.flag_or_raise((size < 2).any(), keys, message)


def _as_verl_on_non_finite(est: str, adv: Tensor, scores: Tensor, keys: Tensor) -> Tensor:
    """The ``[B]`` advantages ``adv`` of ``group_advantages`` (groups: the int64 ``keys``) with verl's values
    where ``scores`` hold NaN (and, for the batch-whitened estimators and rloo_vectorized's groups of one,
    ±inf): see the module docstring. Device tensor operations only; with finite scores ``adv`` comes back
    unchanged."""
    nan = torch.full_like(adv, float("nan"))
    if est in ("reinforce_plus_plus_baseline", "gdpo"):  # verl whitens over the batch: NaN * 0 reaches it
        return torch.where(torch.isfinite(scores).all(), adv, nan)
    B = scores.shape[0]
    if B == 0:
        return adv
    s = scores
    gid = _dense_groups(keys)
    row = torch.arange(B, device=s.device)

    def over_group(x: Tensor, reduce: str = "sum") -> Tensor:  # x reduced over each row's group
        return torch.zeros_like(x).scatter_reduce(0, gid, x, reduce, include_self=False)[gid]

    is_nan = torch.isnan(s)
    group_nan = over_group(is_nan.to(torch.int64)) > 0
    if est == "gpg":  # verl's alpha = B / count_nonzero(r) counts the NaN scores (NaN != 0)
        kept = ((s != 0) & ~is_nan).sum().to(torch.float64)
        adv = adv * (kept.clamp_min(1.0) / (kept + is_nan.sum()).clamp_min(1.0)).to(adv.dtype)
    if est == "grpo_passk":  # topk ranks NaN first and picks one of tied top scores: one response per group
        adv = torch.where(group_nan, torch.where(is_nan, nan, torch.zeros_like(adv)), adv)
        bad = ~torch.isfinite(adv)  # NaN scores, or ties at an infinite top
        first = over_group(torch.where(bad, row, B), "amin")
        return torch.where(bad & (row != first), torch.zeros_like(adv), adv)
    if est == "rloo_vectorized":  # (c r - sum) / max(c - 1, 1) * (c > 1): a lone ±inf gives (inf - inf) * 0
        alone = over_group(torch.ones_like(row)) == 1
        group_nan = group_nan | (alone & ~torch.isfinite(s))
    return torch.where(group_nan, nan, adv)


def compute_advantage(config, token_level_rewards: Tensor, response_mask: Tensor, index=None, *,
                      values: Optional[Tensor] = None, reward_baselines: Optional[Tensor] = None,
                      reward_scores: Optional[Tensor] = None, old_log_probs: Optional[Tensor] = None,
                      sum_pi_squared: Optional[Tensor] = None, rollout_is_weights: Optional[Tensor] = None,
                      epsilon: Optional[float] = None, handle_zero_tail: bool = True) -> Tuple[Tensor, Tensor]:
    """``(advantages, returns)`` ``[B, T]`` of verl 0.9.1's ``algorithm.adv_estimator``.

    Args:
        config: verl's ``AlgoConfig`` (or ``algorithm`` dict): ``adv_estimator``, ``gamma``, ``lam``,
            ``norm_adv_by_std_in_grpo``, ``gdpo_reward_weights``; a dict key that is not a field of
            ``AlgoConfig`` raises ``ValueError``, and so does ``use_pf_ppo=True`` with gae (verl then
            resamples the batch, which is not part of the advantages).
        token_level_rewards: ``[B, T]``; the sequence-level estimators use its row sums.
        response_mask: ``[B, T]``.
        index: the ``uid`` of each response (its prompt group) for the grouped estimators, grouped as verl's
            function for the estimator groups them (the module's docstring says how).
        values: ``[B, T]`` critic values (gae). reward_baselines: ``[B]`` greedy scores (remax).
        reward_scores: ``[B, K]`` gdpo's reward components (verl's ``gdpo_reward_keys``); default
            the row sums of ``token_level_rewards`` as one column.
        old_log_probs, sum_pi_squared: ``[B, T]`` (optimal_token_baseline,
            tir_optimal_token_baseline); rollout_is_weights: ``[B, T]`` or None (they scale the
            path variance by their square).
        epsilon: verl's ``epsilon`` argument (default 1e-6 for the grouped estimators, 1e-8 for the
            optimal-token-baseline ones); gae, reinforce_plus_plus and remax have none. The grouped
            estimators that divide by no std (rloo, rloo_vectorized, opo, gpg,
            reinforce_plus_plus_baseline, grpo and grpo_passk with ``norm_adv_by_std_in_grpo=False``)
            take it and ignore it, as verl's.
        handle_zero_tail: verl's switch of the optimal-token-baseline estimators (default True): when one
            response of a group is strictly the longest, its baseline is 0 from the second-longest length on
            (its advantage there is its return). False keeps the group's baseline ``B_t`` there (where that
            response holds the group's only valid token, ``G_t W_t / (W_t + eps)``). verl's other estimators
            have no such switch: ``False`` raises ``ValueError`` for them.
    """
    _check_inputs(token_level_rewards, response_mask, values=values, reward_baselines=reward_baselines,
                  reward_scores=reward_scores, old_log_probs=old_log_probs, sum_pi_squared=sum_pi_squared,
                  rollout_is_weights=rollout_is_weights)
    opts = algo_options(config)
    est = opts["adv_estimator"]
    mask = response_mask
    if est not in _OPTIMAL_BASELINE and not (old_log_probs is None and sum_pi_squared is None
                                             and rollout_is_weights is None):
        raise ValueError(f"old_log_probs, sum_pi_squared and rollout_is_weights apply to the optimal-token-baseline "
                         f"estimators, not to adv_estimator {est!r}")
    if not _validate.boolean("handle_zero_tail", handle_zero_tail) and est not in _OPTIMAL_BASELINE:
        raise ValueError(f"handle_zero_tail applies to the optimal-token-baseline estimators, not to adv_estimator "
                         f"{est!r}")
    if epsilon is not None and est in _TOKEN_LEVEL:
        raise ValueError(f"epsilon does not apply to adv_estimator {est!r}")
    eps = {} if epsilon is None else {"eps": _validate.finite_number("epsilon", epsilon)}
    # verl weighs a token by a fractional mask in the others; fastalign's estimators count it as valid
    flag = None if est in _FRACTIONAL_MASK_AS_VERL else _validate.zero_one(
        "response_mask", mask, f"hold 0 and 1 only for adv_estimator {est!r} (verl weighs a token by a fractional "
        f"mask inside it, fastalign counts the token or not)")
    adv, returns = _estimate(est, opts, token_level_rewards, mask, index, values, reward_baselines, reward_scores,
                             old_log_probs, sum_pi_squared, rollout_is_weights, eps, handle_zero_tail)
    return _validate.nan_if(flag, adv), _validate.nan_if(flag, returns)


def _estimate(est: str, opts: Dict[str, Any], token_level_rewards: Tensor, mask: Tensor, index, values,
              reward_baselines, reward_scores, old_log_probs, sum_pi_squared, rollout_is_weights,
              eps: Dict[str, float], handle_zero_tail: bool) -> Tuple[Tensor, Tensor]:
    """:func:`compute_advantage` once its inputs are checked."""
    if est == "gae":
        if values is None:
            raise ValueError("adv_estimator 'gae' needs values [B, T]")
        return gae_advantages(token_level_rewards, values, mask, gamma=opts["gamma"], lam=opts["lam"])
    if est == "reinforce_plus_plus":
        # verl carries the running return through masked tokens: GAE's scan with V = 0, lam = 1
        adv, returns = gae_advantages(token_level_rewards, torch.zeros_like(token_level_rewards), mask,
                                      gamma=opts["gamma"], lam=1.0)
        return adv, returns
    if est == "remax":
        if reward_baselines is None:
            raise ValueError("adv_estimator 'remax' needs reward_baselines [B]")
        adv = remax_advantages(token_level_rewards, mask, reward_baselines)
        returns = adv + reward_baselines.to(adv.dtype).unsqueeze(-1) * mask.to(adv.dtype)
        return adv, returns
    if index is None:
        raise ValueError(f"adv_estimator {est!r} needs index (the uid of each response)")
    if est in _OPTIMAL_BASELINE:
        if old_log_probs is None or sum_pi_squared is None:
            raise ValueError(f"adv_estimator {est!r} needs old_log_probs and sum_pi_squared [B, T]")
        keys = group_keys_on(est, index, token_level_rewards.shape[0], token_level_rewards.device)
        return optimal_token_baseline_advantages(token_level_rewards, mask, keys, old_log_probs, sum_pi_squared,
                                                 importance_weights=rollout_is_weights,
                                                 zero_tail=handle_zero_tail, align=_OPTIMAL_BASELINE[est], **eps)
    kw = dict(_GROUPED[est])
    if est in _STD_FROM_CONFIG:
        kw["std"] = "group" if opts["norm_adv_by_std_in_grpo"] else "none"
    if reads_eps(kw["estimator"], kw.get("std", "group"), kw.get("batch_normalization", "sequence")):
        kw.update(eps)  # elsewhere verl's estimator ignores epsilon, and group_advantages refuses an eps
    if est in ("opo", "reinforce_plus_plus_baseline", "gdpo"):
        kw["response_mask"] = mask
    scores = token_level_rewards.sum(dim=-1)
    host = not isinstance(index, Tensor)  # strings are mapped once, on the host
    keys = _group_keys(est, index, scores.shape[0], torch.device("cpu") if host else scores.device)
    small = _passk_groups_flag(index, keys) if est == "grpo_passk" else None
    keys = keys.to(scores.device)
    if est == "gdpo":
        scores = scores.unsqueeze(-1) if reward_scores is None else reward_scores
        if opts["gdpo_reward_weights"] is not None:
            kw["reward_weights"] = list(opts["gdpo_reward_weights"])
    adv = _as_verl_on_non_finite(est, group_advantages(scores, keys, **kw), scores, keys)
    adv = token_advantages(_validate.nan_if(small, adv), mask)
    return adv, adv
