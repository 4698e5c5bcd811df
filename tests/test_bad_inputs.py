"""Bad and unusual inputs for every public function: a clear error that names the argument,
raised before any kernel runs, or a documented and tested result (docs/bad-inputs.md).

The table is written out by hand: one row per function x argument x input class, with the
error type expected. Rows whose error comes before the backend choice run once; rows of the
ops with Triton kernels (token_logprobs, linear_logprobs, policy_loss and the linear losses)
run on both CPU backends (C++ and the Triton interpreter).
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastalign as fa
from fastalign import aggregate, reference
from conftest import CPU_BACKENDS
from helpers import assert_close

B, T, V, H = 2, 3, 7, 4
pytestmark = pytest.mark.filterwarnings("ignore:.*quantize.*:UserWarning")


def _f(*s):
    return torch.randn(*s)


def _lab(*s):
    return torch.randint(0, V, s)


def _mask(*s):
    return torch.ones(*s, dtype=torch.bool)


_FAKE = FakeTensorMode()


def _fake(t: torch.Tensor, device: str) -> torch.Tensor:
    """A fake tensor standing for ``t`` on ``device`` (metadata only: no such device here)."""
    with _FAKE:
        return torch.empty(t.shape, dtype=t.dtype, device=device)


# ----------------------------------------------------------------------------- input classes
# name -> (make the bad value from a good tensor, expected error type)
CLASSES: dict[str, tuple[Callable, type]] = {
    "not_tensor": (lambda t: t.tolist(), TypeError),
    "meta": (lambda t: t.to("meta"), ValueError),
    "sparse": (lambda t: t.to_sparse(), TypeError),
    "quantized": (lambda t: torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8), TypeError),
    "xpu": (lambda t: _fake(t, "xpu"), ValueError),  # an accelerator without kernels
    "other_device": (lambda t: _fake(t, "cuda"), ValueError),  # device mismatch with the other inputs
    "complex": (lambda t: t.to(torch.complex64), TypeError),
    "int64": (lambda t: t.to(torch.int64), TypeError),
    "bool": (lambda t: t != 0, TypeError),
    "float64": (lambda t: t.to(torch.float64), TypeError),
    "float32": (lambda t: t.to(torch.float32), TypeError),
    "rank_up": (lambda t: t.unsqueeze(0), ValueError),
    "rank_down": (lambda t: t[0], ValueError),
    "mismatch": (lambda t: torch.cat([t, t[..., :1]], -1), ValueError),
    "none": (lambda t: None, TypeError),  # a required argument given None
}

COMMON = ("not_tensor", "meta", "sparse", "quantized", "xpu", "complex")
KIND_CLASSES = {
    "float": COMMON + ("int64", "bool", "float64"),  # fp32 / bf16 / fp16 only
    "any_float": COMMON + ("int64", "bool"),  # float64 accepted
    "int": COMMON + ("float32", "bool"),
    "real": COMMON,  # masks and lengths: bool, integer or float
    "keys": COMMON[1:] + ("float32", "bool"),  # group keys: an integer tensor, or a list of ids
}


@dataclass
class Fn:
    """A public function, a valid call, and how each tensor argument may go wrong."""

    name: str
    good: Callable[[], dict]  # valid keyword arguments
    call: Callable[[dict], object]
    args: dict  # tensor arg -> (kind, extra shape classes)
    backends: bool = False  # run the rows on both CPU backends
    names: dict = field(default_factory=dict)  # arg -> name the message uses, when it differs
    errors: dict = field(default_factory=dict)  # (arg, class) -> error type, where it differs from CLASSES


def _policy_good():
    return dict(logprobs=_f(B, T), old_logprobs=_f(B, T), advantages=_f(B, T), response_mask=_mask(B, T),
                ref_logprobs=_f(B, T), entropy=_f(B, T), rollout_logprobs=_f(B, T))


def _pref_good():
    return dict(chosen_logprobs=_f(B), rejected_logprobs=_f(B), ref_chosen_logprobs=_f(B), ref_rejected_logprobs=_f(B),
                chosen_lengths=torch.full((B,), 3.0), rejected_lengths=torch.full((B,), 2.0), pair_weights=_f(B).abs())


def _lin_policy_good():
    return dict(hidden=_f(B, T, H), weight=_f(V, H), labels=_lab(B, T), old_logprobs=_f(B, T), advantages=_f(B),
                response_mask=_mask(B, T), bias=_f(V), ref_logprobs=_f(B, T), rollout_logprobs=_f(B, T))


def _lin_pref_good():
    return dict(hidden=_f(2 * B, T, H), weight=_f(V, H), labels=_lab(2 * B, T), bias=_f(V),
                ref_chosen_logprobs=_f(B), ref_rejected_logprobs=_f(B), token_weights=_f(2 * B, T))


def _call_lin_policy(a):
    a = dict(a)
    pos = [a.pop(k) for k in ("hidden", "weight", "labels", "old_logprobs", "advantages", "response_mask")]
    return fa.LinearPolicyLoss(loss_type="grpo", kl_coef=0.1, rollout_correction="token_truncate")(*pos, **a)


def _call_lin_pref(a):
    a = dict(a)
    return fa.LinearPreferenceLoss("sigmoid")(a.pop("hidden"), a.pop("weight"), a.pop("labels"), **a)


FNS = [
    Fn("token_logprobs", lambda: dict(logits=_f(B, T, V), labels=_lab(B, T)),
       lambda a: fa.token_logprobs(a["logits"], a["labels"], entropy=True),
       {"logits": ("float", ()), "labels": ("int", ("other_device", "rank_up", "rank_down", "mismatch"))},
       backends=True),
    Fn("linear_logprobs", lambda: dict(hidden=_f(B, T, H), weight=_f(V, H), labels=_lab(B, T), bias=_f(V)),
       lambda a: fa.linear_logprobs(a["hidden"], a["weight"], a["labels"], bias=a["bias"]),
       {"hidden": ("float", ("mismatch",)), "weight": ("float", ("other_device", "rank_up", "rank_down", "mismatch")),
        "labels": ("int", ("other_device", "rank_up", "rank_down", "mismatch")),
        "bias": ("float", ("other_device", "rank_up", "rank_down", "mismatch"))},
       backends=True),
    Fn("linear_divergence_loss",
       lambda: dict(hidden=_f(B, T, H), weight=_f(V, H), teacher_hidden=_f(B, T, H + 2), teacher_weight=_f(V, H + 2),
                    bias=_f(V), teacher_bias=_f(V), response_mask=_mask(B, T), labels=_lab(B, T)),
       lambda a: fa.linear_divergence_loss(**a, hard_weight=0.5),
       {"hidden": ("float", ("mismatch",)), "weight": ("float", ("other_device", "rank_up", "rank_down", "mismatch")),
        "teacher_hidden": ("float", ("other_device", "rank_down", "mismatch")),
        "teacher_weight": ("float", ("other_device", "rank_up", "rank_down", "mismatch")),
        "bias": ("float", ("other_device", "rank_up", "mismatch")),
        "teacher_bias": ("float", ("other_device", "rank_up", "mismatch")),
        "response_mask": ("real", ("other_device", "rank_up", "mismatch")),
        "labels": ("int", ("other_device", "rank_up", "mismatch"))},
       backends=True),
    Fn("policy_loss", _policy_good,
       lambda a: fa.policy_loss(**a, kl_coef=0.1, entropy_coef=0.01, rollout_correction="token_truncate"),
       {"logprobs": ("float", ("rank_up", "rank_down")),
        **{k: ("float", ("other_device", "rank_up", "rank_down", "mismatch"))
           for k in ("old_logprobs", "advantages", "ref_logprobs", "entropy", "rollout_logprobs")},
        "response_mask": ("real", ("other_device", "rank_up", "rank_down", "mismatch"))},
       backends=True),
    Fn("PolicyLoss", _policy_good, lambda a: fa.PolicyLoss(loss_type="dapo", kl_coef=0.1)(
        a["logprobs"], a["old_logprobs"], a["advantages"], a["response_mask"], ref_logprobs=a["ref_logprobs"]),
       {"logprobs": ("float", ("rank_up", "rank_down")),
        "old_logprobs": ("float", ("other_device", "mismatch")), "advantages": ("float", ("other_device",)),
        "response_mask": ("real", ("other_device", "mismatch")), "ref_logprobs": ("float", ("other_device",))},
       backends=True),
    Fn("LinearPolicyLoss", _lin_policy_good, _call_lin_policy,
       {"hidden": ("float", ("rank_up", "rank_down", "mismatch")),
        "weight": ("float", ("other_device", "rank_up", "mismatch")),
        "labels": ("int", ("rank_up", "rank_down", "mismatch")),
        "old_logprobs": ("float", ("other_device", "rank_up", "mismatch")),
        "advantages": ("float", ("other_device", "rank_up", "mismatch")),
        "response_mask": ("real", ("rank_up", "mismatch")),
        "bias": ("float", ("other_device", "mismatch")),
        "ref_logprobs": ("float", ("other_device", "mismatch")),
        "rollout_logprobs": ("float", ("other_device", "mismatch"))},
       backends=True),
    Fn("kl_penalty", lambda: dict(logprobs=_f(B, T), ref_logprobs=_f(B, T)),
       lambda a: fa.kl_penalty(a["logprobs"], a["ref_logprobs"]),
       {"logprobs": ("float", ()), "ref_logprobs": ("float", ("other_device", "rank_up", "rank_down", "mismatch"))}),
    Fn("aggregate_loss", lambda: dict(per_token_loss=_f(B, T), response_mask=_mask(B, T)),
       lambda a: fa.aggregate_loss(a["per_token_loss"], a["response_mask"]),
       {"per_token_loss": ("float", ("rank_up", "rank_down")),
        "response_mask": ("real", ("other_device", "rank_up", "rank_down", "mismatch"))}),
    Fn("sequence_logprobs", lambda: dict(token_logprobs=_f(B, T), response_mask=_mask(B, T),
                                         token_weights=_f(B, T), sum_p2=_f(B, T).sigmoid()),
       lambda a: fa.sequence_logprobs(a["token_logprobs"], a["response_mask"], token_weights=a["token_weights"],
                                      sum_p2=a["sum_p2"]),
       {"token_logprobs": ("any_float", ("rank_up", "rank_down")),
        "response_mask": ("real", ("other_device", "rank_up", "rank_down", "mismatch")),
        "token_weights": ("any_float", ("other_device", "rank_up", "rank_down", "mismatch")),
        "sum_p2": ("any_float", ("other_device", "rank_up", "rank_down", "mismatch"))}),
    Fn("sequence_logprobs_labels", lambda: dict(token_logprobs=_f(B, T), labels=_lab(B, T)),
       lambda a: fa.sequence_logprobs(a["token_logprobs"], labels=a["labels"]),
       {"labels": ("int", ("other_device", "rank_up", "rank_down", "mismatch"))}),
    Fn("sequence_logprobs_packed", lambda: dict(token_logprobs=_f(6), cu_seqlens=torch.tensor([0, 2, 6])),
       lambda a: fa.sequence_logprobs(a["token_logprobs"], cu_seqlens=a["cu_seqlens"]),
       {"token_logprobs": ("any_float", ()),
        "cu_seqlens": ("int", ("other_device", "rank_up", "rank_down"))}),
    Fn("sequence_logprobs_position_ids",
       lambda: dict(token_logprobs=_f(6), position_ids=torch.tensor([0, 1, 0, 1, 2, 3])),
       lambda a: fa.sequence_logprobs(a["token_logprobs"], position_ids=a["position_ids"], num_sequences=2),
       {"position_ids": ("int", ("other_device", "rank_up", "mismatch"))}),
    Fn("preference_loss", _pref_good, lambda a: fa.preference_loss(**a, loss_type=["sigmoid", "ipo"]),
       {"chosen_logprobs": ("any_float", ("rank_up", "rank_down")),
        "rejected_logprobs": ("any_float", ("other_device", "rank_up", "rank_down", "mismatch")),
        **{k: ("real", ("other_device", "rank_up", "rank_down", "mismatch"))
           for k in ("ref_chosen_logprobs", "ref_rejected_logprobs", "chosen_lengths", "rejected_lengths",
                     "pair_weights")}}),
    Fn("PreferenceLoss", _pref_good, lambda a: fa.PreferenceLoss("kto", beta=0.2)(
        a["chosen_logprobs"], a["rejected_logprobs"], a["ref_chosen_logprobs"], a["ref_rejected_logprobs"]),
       {"chosen_logprobs": ("any_float", ("rank_up", "rank_down")),
        "rejected_logprobs": ("any_float", ("other_device", "mismatch")),
        "ref_chosen_logprobs": ("real", ("other_device", "mismatch")),
        "ref_rejected_logprobs": ("real", ("other_device", "mismatch"))}),
    Fn("wpo_weights", lambda: dict(chosen_wpo=_f(B), rejected_wpo=_f(B)),
       lambda a: fa.wpo_weights(a["chosen_wpo"], a["rejected_wpo"]),
       {"chosen_wpo": ("any_float", ("none",)),
        "rejected_wpo": ("any_float", ("other_device", "rank_up", "mismatch", "none"))}),
    Fn("LinearPreferenceLoss", _lin_pref_good, _call_lin_pref,
       {"hidden": ("float", ("rank_down", "mismatch")),
        "weight": ("float", ("other_device", "rank_up", "rank_down", "mismatch")),
        "labels": ("int", ("rank_up", "rank_down", "mismatch")),
        "bias": ("float", ("other_device", "rank_up", "mismatch")),
        "ref_chosen_logprobs": ("real", ("other_device", "rank_up", "mismatch")),
        "ref_rejected_logprobs": ("real", ("other_device",)),
        "token_weights": ("any_float", ("other_device", "rank_up", "mismatch"))},
       backends=True,
       # a list is the (chosen, rejected) layout: a list of 2B rows is a ValueError
       errors={("hidden", "not_tensor"): ValueError, ("labels", "not_tensor"): ValueError,
               ("token_weights", "not_tensor"): ValueError}),
    Fn("group_advantages", lambda: dict(scores=_f(4), index=torch.tensor([0, 0, 1, 1]), lengths=torch.ones(4)),
       lambda a: fa.group_advantages(a["scores"], a["index"], estimator="opo", lengths=a["lengths"]),
       {"scores": ("any_float", ("rank_up", "rank_down")),
        "index": ("keys", ("other_device", "rank_up", "mismatch")),
        "lengths": ("real", ("other_device", "rank_up", "rank_down", "mismatch"))}),
    Fn("group_advantages_mask", lambda: dict(scores=_f(4), response_mask=_mask(4, 3)),
       lambda a: fa.group_advantages(a["scores"], group_size=2, estimator="reinforce_pp_baseline",
                                     response_mask=a["response_mask"]),
       {"response_mask": ("real", ("other_device", "rank_up", "rank_down"))}),
    Fn("group_advantages_steps", lambda: dict(scores=_f(4), step_scores=_f(4)),
       lambda a: fa.group_advantages(a["scores"], group_size=2, step_index=torch.tensor([0, 1, 0, 1]),
                                     step_scores=a["step_scores"]),
       {"step_scores": ("any_float", ("other_device", "rank_up", "rank_down", "mismatch"))}),
    Fn("token_advantages", lambda: dict(advantages=_f(B), response_mask=_mask(B, T)),
       lambda a: fa.token_advantages(a["advantages"], a["response_mask"]),
       {"advantages": ("any_float", ("rank_up", "rank_down")),
        "response_mask": ("real", ("other_device", "rank_up", "rank_down"))}),
    Fn("masked_whiten", lambda: dict(x=_f(B, T), response_mask=_mask(B, T)),
       lambda a: fa.masked_whiten(a["x"], a["response_mask"]),
       {"x": ("any_float", ("none",)),
        "response_mask": ("real", ("other_device", "rank_up", "rank_down", "mismatch", "none"))}),
    Fn("reinforce_pp_advantages", lambda: dict(token_rewards=_f(B, T), response_mask=_mask(B, T)),
       lambda a: fa.reinforce_pp_advantages(a["token_rewards"], a["response_mask"], gamma=0.9),
       {"token_rewards": ("any_float", ("rank_up", "rank_down")),
        "response_mask": ("real", ("other_device", "rank_up", "rank_down", "mismatch"))}),
    Fn("remax_advantages", lambda: dict(token_rewards=_f(B, T), response_mask=_mask(B, T), baseline=_f(B)),
       lambda a: fa.remax_advantages(a["token_rewards"], a["response_mask"], a["baseline"]),
       {"token_rewards": ("any_float", ("rank_up", "rank_down")),
        "response_mask": ("real", ("other_device", "rank_up", "rank_down", "mismatch")),
        "baseline": ("real", ("other_device", "rank_up", "rank_down", "mismatch"))}),
    Fn("gae_advantages", lambda: dict(token_rewards=_f(B, T), values=_f(B, T), response_mask=_mask(B, T)),
       lambda a: fa.gae_advantages(a["token_rewards"], a["values"], a["response_mask"], gamma=0.9, lam=0.95),
       {"token_rewards": ("any_float", ("rank_up", "rank_down")),
        "values": ("any_float", ("other_device", "rank_up", "rank_down", "mismatch")),
        "response_mask": ("real", ("other_device", "rank_up", "rank_down", "mismatch"))}),
    Fn("implicit_process_advantages", lambda: dict(logprobs=_f(B, T), ref_logprobs=_f(B, T),
                                                   response_mask=_mask(B, T), outcome_advantages=_f(B)),
       lambda a: fa.implicit_process_advantages(a["logprobs"], a["ref_logprobs"], a["response_mask"],
                                                a["outcome_advantages"]),
       {"logprobs": ("any_float", ("rank_up", "rank_down")),
        "ref_logprobs": ("any_float", ("other_device", "rank_up", "rank_down", "mismatch")),
        "response_mask": ("real", ("other_device", "rank_up", "rank_down", "mismatch")),
        "outcome_advantages": ("any_float", ("other_device", "rank_up", "rank_down", "mismatch"))}),
]


def _rows():
    for fn in FNS:
        for arg, (kind, extra) in fn.args.items():
            for cls in KIND_CLASSES[kind] + tuple(extra):
                for backend in (CPU_BACKENDS if fn.backends else [None]):
                    yield pytest.param(fn, arg, cls, backend, id=f"{fn.name}-{arg}-{cls}" + (f"-{backend}" if backend
                                                                                               else ""))


ROWS = list(_rows())


def _names(msg: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", msg) is not None


def test_every_good_call_runs():
    """The valid call of each row runs (so that each row's error comes from its bad argument)."""
    for fn in FNS:
        fn.call(fn.good())


@pytest.mark.parametrize("fn, arg, cls, backend", ROWS)
def test_bad_tensor_argument(fn, arg, cls, backend):
    make, err = CLASSES[cls]
    err = fn.errors.get((arg, cls), err)
    a = fn.good()
    a[arg] = make(a[arg])
    if backend is not None:
        with fa.use_backend(backend), pytest.raises(err) as info:
            fn.call(a)
    else:
        with pytest.raises(err) as info:
            fn.call(a)
    name = fn.names.get(arg, arg)
    assert _names(str(info.value), name), f"{err.__name__} does not name {name!r}: {info.value}"


def test_the_table_is_several_hundred_cases():
    assert len(ROWS) + len(OPTION_ROWS) >= 400


# ----------------------------------------------------------------------------- option values
def _tl(**kw):
    return fa.token_logprobs(_f(B, V), _lab(B), **kw)


def _ll(**kw):
    return fa.linear_logprobs(_f(B, H), _f(V, H), _lab(B), **kw)


def _pl(**kw):
    return fa.policy_loss(_f(B, T), _f(B, T), _f(B, T), _mask(B, T), **kw)


def _agg(**kw):
    return fa.aggregate_loss(_f(B, T), _mask(B, T), **kw)


def _pl_seq(**kw):  # an aggregation that divides by global_seqs
    return _pl(agg="seq-mean-token-mean", **kw)


def _agg_seq(**kw):
    return _agg(agg="seq-mean-token-sum", **kw)


def _seq_pos(**kw):
    return fa.sequence_logprobs(_f(6), position_ids=torch.tensor([0, 1, 0, 1, 2, 3]), **kw)


def _seq_cu(cu):
    return fa.sequence_logprobs(_f(6), cu_seqlens=torch.tensor(cu))


def _ga(**kw):
    return fa.group_advantages(_f(4), torch.tensor([0, 0, 1, 1]), **kw)


def _kl(**kw):
    return fa.kl_penalty(_f(B, T), _f(B, T), **kw)


def _gdpo(**kw):
    return fa.group_advantages(_f(4, 2), group_size=2, estimator="gdpo", **kw)


def _seq_ld(**kw):
    return fa.sequence_logprobs(_f(B, T), _mask(B, T), **{"ld_alpha": 0.5, "ld_lengths": torch.tensor([2.0, 1.0]),
                                                         **kw})


def _pl_kl_cov(**kw):
    return _pl(loss_type="kl_cov", **kw)


def _pl_clip_cov(**kw):
    return _pl(loss_type="clip_cov", **kw)


def _simpo(**kw):
    return fa.preference_loss(_f(B), _f(B), loss_type="simpo", chosen_lengths=torch.ones(B),
                              rejected_lengths=torch.ones(B), **kw)


def _simpo_module(**kw):  # validated at construction
    return fa.PreferenceLoss("simpo", **kw)


def _kto(**kw):
    return fa.unpaired_preference_loss(_f(B), _f(B), torch.tensor([True, False]), **kw)


def _gs(group_size):
    return fa.group_advantages(_f(4), group_size=group_size)


def _rpp(**kw):
    return fa.reinforce_pp_advantages(_f(B, T), _mask(B, T), **kw)


def _gae(**kw):
    return fa.gae_advantages(_f(B, T), _f(B, T), _mask(B, T), **kw)


def _ipa(**kw):
    return fa.implicit_process_advantages(_f(B, T), _f(B, T), _mask(B, T), **kw)


def _ld(**kw):
    return fa.linear_divergence_loss(_f(B, H), _f(V, H), _f(B, 2), _f(V, 2), **kw)


def _lm(**kw):
    return fa.linear_mean_logits(_f(B, H), _f(V, H), **kw)


NAN, INF = math.nan, math.inf
# (function, argument, bad values, error); each value is its own row
OPTIONS = [
    # 1e-40: its reciprocal overflows float32, which the kernels multiply by (NaN statistics, where the float64
    # limit is the greedy distribution); 1e300: past float32's range, inf in the kernels (a NaN)
    (_tl, "temperature", (0.0, -1.0, INF, -INF, NAN, 1e-40), ValueError),
    (_tl, "temperature", ("1", None, True), TypeError),
    (lambda **kw: fa.token_divergence(_f(B, V), _f(B, V), **kw), "temperature", (0.0, NAN, 1e-40), ValueError),
    (_tl, "ignore_index", (1.5, "x", None), TypeError),
    (_ll, "temperature", (0.0, -2.0, INF, NAN, 1e-40), ValueError),
    (_ll, "softcap", (0.0, -1.0, INF, NAN, 1e300), ValueError),
    (_ll, "logit_scale", (INF, NAN, -1e300), ValueError),
    (_ld, "teacher_softcap", (0.0, INF, NAN, 1e39), ValueError),
    (_ld, "teacher_logit_scale", (INF, NAN, -1e39), ValueError),
    (_lm, "backend", ("cuda",), ValueError),  # CPU tensors: the plain products' path checks it too
    (_ll, "ignore_index", (2.5,), TypeError),
    (_ll, "grad_skip_threshold", (-1.0, NAN), ValueError),
    (_ll, "grad_skip_threshold", ("x", None), TypeError),
    (_ll, "chunk", ((0, 4), (4, 0), (1,), 5, "ab"), ValueError),
    (_ll, "chunk", ((2.5, 3), (True, 3), (None, 4), ("a", "b")), TypeError),
    (_tl, "ignore_index", (2 ** 70,), ValueError),
    (_ll, "backend", ("tpu",), ValueError),
    (_ll, "vocab_group", ("world", True, 0), TypeError),
    (_tl, "vocab_group", ("world", True, 0), TypeError),
    (_tl, "backend", ("tpu", "cuda"), ValueError),
    (_pl, "dp_size", (0, -1), ValueError),
    (_pl, "dp_size", (1.5, 2.0, True), TypeError),
    (_pl, "global_tokens", (0, -3, NAN, INF), ValueError),
    (_pl, "global_tokens", (torch.tensor(NAN), torch.tensor(-3.0), torch.tensor(-1), torch.tensor([INF])), ValueError),
    (_pl, "global_tokens", (torch.ones(2), torch.ones(1, 2)), ValueError),
    (_pl, "global_tokens", ("8", torch.ones(1, dtype=torch.complex64)), TypeError),
    (_pl_seq, "global_seqs", (0, -1, NAN, INF), ValueError),
    (_pl_seq, "global_seqs", (torch.tensor(NAN), torch.tensor(-1.0), torch.tensor([-INF])), ValueError),
    (_pl, "max_len", (0, -4), ValueError),
    (_pl, "backend", ("tpu",), ValueError),
    (_agg, "dp_size", (0, -2), ValueError),
    (_agg, "dp_size", (2.0, True), TypeError),
    (_agg, "global_tokens", (0, -1, NAN, INF, 0.0), ValueError),
    (_agg, "global_tokens", (torch.ones(3),), ValueError),
    (_agg, "global_tokens", (torch.tensor(NAN), torch.tensor(-0.5), torch.tensor([[INF]])), ValueError),
    (_agg_seq, "global_seqs", (0, -1, NAN, INF), ValueError),
    (_agg_seq, "global_seqs", (torch.tensor(NAN), torch.tensor(-2), torch.tensor(INF)), ValueError),
    (_agg, "max_len", (0, -1), ValueError),
    (_agg, "agg", ("mean", None), ValueError),
    (_seq_pos, "num_sequences", (0, -1), ValueError),
    (_seq_pos, "num_sequences", (1.5, "2"), TypeError),
    (_ga, "eps", (-1.0, NAN, INF), ValueError),
    (_ga, "omega", (NAN, INF), ValueError),
    (_ga, "estimator", ("ppo", "gae"), ValueError),
    (_ga, "std", ("global",), ValueError),
    (_ga, "singleton", ("one",), ValueError),
    (_ga, "backend", ("tpu", "cuda"), ValueError),
    (_gs, "group_size", (0, -2, 3, 1.5, True), ValueError),
    (_kl, "kl_type", ("k4", "", "k3++"), ValueError),
    (_kl, "kl_type", (3, None), TypeError),
    (_gdpo, "reward_weights", ([1.0], torch.ones(3)), ValueError),
    (_gdpo, "reward_weights", (torch.ones(2, device="meta"), torch.ones(1, 2), torch.ones(2, 1)), ValueError),
    (_seq_ld, "ld_alpha", (-1.0, 1.5, NAN, INF), ValueError),
    (_seq_ld, "ld_alpha", ("0.5", True), TypeError),
    (lambda **kw: fa.LinearPreferenceLoss("sigmoid", **kw), "ld_alpha", (-1.0, 1.5, NAN), ValueError),
    (_seq_ld, "ld_lengths", (torch.tensor([NAN, 1.0]), torch.tensor([-3.0, 1.0]), torch.tensor([INF, 1.0])),
     ValueError),
    (_pl, "kl_coef", (None,), TypeError),
    (_pl, "entropy_coef", (None,), TypeError),
    (_pl_kl_cov, "cov_ratio", (1.5, 40.0, 0.0), ValueError),
    (_pl_clip_cov, "cov_ratio", (1.5,), ValueError),
    (_simpo, "simpo_gamma", (None,), TypeError),
    (_simpo, "simpo_gamma", (NAN,), ValueError),
    (_simpo_module, "simpo_gamma", (None,), TypeError),
    (_simpo_module, "cpo_alpha", (None,), TypeError),
    (_kto, "desirable_weight", (None, "1"), TypeError),
    (_kto, "undesirable_weight", (None,), TypeError),
    (_rpp, "gamma", (NAN, INF, -INF), ValueError),
    (_gae, "gamma", (NAN, INF), ValueError),
    (_gae, "lam", (NAN, -INF), ValueError),
    (_ipa, "beta", (NAN, INF), ValueError),
    (_ipa, "gamma", (NAN,), ValueError),
]

OPTION_ROWS = [pytest.param(fn, arg, v, err, id=f"{fn.__name__[1:]}-{arg}-{v!r}")
               for fn, arg, values, err in OPTIONS for v in values]


@pytest.mark.parametrize("fn, arg, value, err", OPTION_ROWS)
def test_bad_option_value(fn, arg, value, err):
    with pytest.raises(err) as info:
        fn(**{arg: value})
    assert _names(str(info.value), arg), f"does not name {arg!r}: {info.value}"


def _sep(**kw):
    from fastalign.linear_step import separable_step

    return separable_step(_f(B, T, H), _f(V, H), _lab(B, T), lambda lp, sp2: (lp.sum(), {}), logit=kw)


@pytest.mark.parametrize("single_pass", ["auto", False, True])
@pytest.mark.parametrize("returns", [lambda lp: lp.sum(), lambda lp: (lp.sum(),), lambda lp: (lp.sum(), {}, 0),
                                     lambda lp: (lp.sum().item(), {})], ids=["tensor", "1-tuple", "3-tuple", "float"])
def test_separable_step_loss_returning_other_than_a_pair_names_loss(returns, single_pass):
    """separable_step's loss returns (value, metrics); a plain tensor (a token-mean NLL) failed inside the step with an
    IndexError (single pass) or a TypeError iterating a 0-d tensor (two passes), naming nothing."""
    from fastalign.linear_step import separable_step

    with pytest.raises(TypeError, match=r"^loss\(lp, aux\) must return \(value, metrics\)"):
        separable_step(_f(B, T, H), _f(V, H), _lab(B, T), lambda lp, aux: returns(lp), single_pass=single_pass)
    with pytest.raises(TypeError, match=r"^loss must be a callable"):
        separable_step(_f(B, T, H), _f(V, H), _lab(B, T), None)


@pytest.mark.parametrize("group", ["world", True, object()], ids=["name", "bool", "object"])
@pytest.mark.parametrize("make, name", [
    (lambda g: fa.LinearPolicyLoss(vocab_group=g), "vocab_group"),
    (lambda g: fa.LinearPolicyLoss()(_f(B, T, H), _f(V, H), _lab(B, T), _f(B, T), _f(B), _mask(B, T), vocab_group=g),
     "vocab_group"),
    (lambda g: fa.LinearPreferenceLoss(vocab_group=g), "vocab_group"),
    (lambda g: _sep(vocab_group=g), "vocab_group"),
    (lambda g: fa.PolicyConfig(loss_type="kl_cov", cov_global=True, cov_group=g), "cov_group"),
    (lambda g: fa.policy_loss(_f(B, T), _f(B, T), _f(B, T), _mask(B, T), loss_type="kl_cov", cov_global=True,
                              cov_group=g), "cov_group"),
], ids=["LinearPolicyLoss", "LinearPolicyLoss-call", "LinearPreferenceLoss", "separable_step", "PolicyConfig",
        "policy_loss"])
def test_a_process_group_option_that_is_not_a_group_names_it(make, name, group):
    """vocab_group / cov_group given as something other than a torch.distributed ProcessGroup (a name such as
    "world", a bool): a TypeError naming the option, at construction where there is one (torch's own error named
    neither, and PolicyConfig took cov_group="world")."""
    with pytest.raises(TypeError) as info:
        make(group)
    assert _names(str(info.value), name) and "ProcessGroup" in str(info.value), str(info.value)


def test_vocab_group_needs_an_initialised_torch_distributed():
    """token_logprobs(vocab_group=) with a process group but torch.distributed not initialised (a group object
    kept past destroy_process_group): a ValueError naming vocab_group, not an error inside a collective."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    group = dist.ProcessGroup(0, 1)
    with pytest.raises(ValueError, match="vocab_group needs torch.distributed to be initialized"):
        fa.token_logprobs(_f(B, T, V), _lab(B, T), vocab_group=group)


CU_SEQLENS = [
    ([0, 4, 2, 6], "decreasing"),
    ([0, 2, 7], "past the end of the 6 packed tokens"),
    ([1, 2, 6], "not starting at 0"),
    ([0], "one entry"),
    ([-1, 2, 6], "negative start"),
]


@pytest.mark.parametrize("cu, why", CU_SEQLENS, ids=[w for _, w in CU_SEQLENS])
def test_malformed_cu_seqlens_raise(cu, why):
    with pytest.raises(ValueError, match="cu_seqlens"):
        _seq_cu(cu)


def test_malformed_cu_seqlens_give_nan_when_not_read_on_the_host():
    """Under tracing (and on a GPU) cu_seqlens is not read on the host: the sums come out NaN."""
    seq = torch.compile(lambda x, cu: fa.sequence_logprobs(x, cu_seqlens=cu).sum, fullgraph=True,
                        backend="aot_eager")
    good = seq(torch.ones(6), torch.tensor([0, 2, 6]))
    assert torch.equal(good, torch.tensor([2.0, 4.0]))
    assert torch.isnan(seq(torch.ones(6), torch.tensor([0, 4, 2]))).all()


def test_bad_ld_lengths_give_nan_when_not_read_on_the_host():
    """Under tracing (and on a GPU) ld_lengths is not read on the host: a NaN or negative length makes the sums
    NaN, never the plausible sums of every token weighted ld_alpha."""
    seq = torch.compile(lambda x, n: fa.sequence_logprobs(x, ld_alpha=0.5, ld_lengths=n).sum, fullgraph=True,
                        backend="aot_eager")
    x = -torch.ones(2, 3)
    assert torch.equal(seq(x, torch.tensor([2.0, 1.0])), torch.tensor([-2.5, -2.0]))
    assert torch.isnan(seq(x, torch.tensor([math.nan, 1.0]))).all()
    assert torch.isnan(seq(x, torch.tensor([-3.0, 1.0]))).all()


@pytest.mark.gpu
def test_cuda_inputs_pass_the_checks_without_host_sync():
    """CUDA tensors pass every check, and a malformed cu_seqlens on the GPU gives NaN sums
    without reading it on the host."""
    dev = "cuda"
    logits, labels, ones = torch.randn(4, V, device=dev), torch.zeros(4, dtype=torch.long, device=dev), \
        torch.ones(6, device=dev)
    # made before the check: a copy from pageable host memory synchronises
    good_cu, bad_cu = torch.tensor([0, 2, 6], device=dev), torch.tensor([0, 4, 2], device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        st = fa.token_logprobs(logits, labels)
        good = fa.sequence_logprobs(ones, cu_seqlens=good_cu).sum
        bad = fa.sequence_logprobs(ones, cu_seqlens=bad_cu).sum
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert st.logprobs.is_cuda
    assert good.tolist() == [2.0, 4.0] and torch.isnan(bad).all()


def test_packed_tokens_past_cu_seqlens_count_nowhere():
    """Documented: tokens after cu_seqlens[-1] (the packed buffer's padding) are in no sequence."""
    out = _seq_cu([0, 2, 4])
    assert out.count.tolist() == [2.0, 2.0]


def test_use_backend_names_the_backend():
    with pytest.raises(ValueError, match="backend"):
        with fa.use_backend("tpu"):
            pass


COUNT_AGGS = [("token-mean", "global_tokens"), ("seq-mean-token-sum", "global_seqs"),
              ("seq-mean-token-mean", "global_seqs"), ("seq-mean-token-sum-norm", "global_seqs")]


@pytest.mark.parametrize("on_host", [True, False], ids=["eager-cpu", "device"])
@pytest.mark.parametrize("agg, name", COUNT_AGGS, ids=[a for a, _ in COUNT_AGGS])
def test_a_global_count_tensor(agg, name, on_host, monkeypatch):
    """A global count given as a tensor: 0 divides as 1 and a positive count as it is, also below 1 (the
    float64 reference); a negative, NaN or infinite one raises naming it where it is read on the host (an
    eager CPU tensor) and makes the loss NaN, never the sum or 0, where it is not (a GPU or tracing: the
    device path, taken here by a CPU tensor)."""
    if not on_host:
        monkeypatch.setattr("fastalign._validate.eager", lambda *t: False)
    g = torch.Generator().manual_seed(11)
    L = torch.randn(B, T, generator=g)
    lp = -torch.rand(B, T, generator=g)
    old, A = lp + 0.3 * torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)

    def losses(count):
        kw = {name: count}
        return fa.aggregate_loss(L, m, agg, **kw), fa.policy_loss(lp, old, A, m, agg=agg, **kw)[0]

    for c in (0.0, 0.5, 7.0):
        got_agg, got_pl = losses(torch.tensor(c))
        want_agg = reference.aggregate_loss(L.double(), m, agg, **{name: c})
        want_pl, _ = reference.policy_loss(lp.double(), old.double(), A.double(), m, agg=agg, **{name: c})
        assert_close(got_agg, want_agg, atol=1e-6, rtol=1e-6, what=f"aggregate_loss, {name}={c}")
        assert_close(got_pl, want_pl, atol=1e-6, rtol=1e-6, what=f"policy_loss, {name}={c}")
    for c in (torch.tensor(NAN), torch.tensor(-1.0), torch.tensor(-0.5), torch.tensor([INF]), torch.tensor(-3)):
        if on_host:
            with pytest.raises(ValueError, match=f"^{name} must be >= 0 and finite"):
                fa.aggregate_loss(L, m, agg, **{name: c})
            with pytest.raises(ValueError, match=f"^{name} must be >= 0 and finite"):
                fa.policy_loss(lp, old, A, m, agg=agg, **{name: c})
        else:
            assert all(torch.isnan(x) for x in losses(c)), c


def test_a_bad_global_count_tensor_gives_nan_under_tracing():
    """Under torch.compile the count is not read on the host: a NaN or negative one makes the loss NaN."""
    m = _mask(B, T)
    agg = torch.compile(lambda L, n: fa.aggregate_loss(L, m, global_tokens=n), fullgraph=True, backend="aot_eager")
    L = torch.randn(B, T)
    assert_close(agg(L, torch.tensor(4.0)), L.double().sum() / 4, atol=1e-6, rtol=1e-6, what="a good count")
    assert torch.isnan(agg(L, torch.tensor(NAN))) and torch.isnan(agg(L, torch.tensor(-6.0)))


# ----------------------------------------------------------------------------- zero-size dimensions
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_size_vocabulary_or_hidden_dimension(backend):
    with fa.use_backend(backend):
        with pytest.raises(ValueError, match="logits"):
            fa.token_logprobs(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="weight"):
            fa.linear_logprobs(torch.randn(3, 4), torch.randn(0, 4), torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="hidden"):
            fa.linear_logprobs(torch.randn(3, 0), torch.randn(5, 0), torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="hidden"):
            fa.LinearPolicyLoss()(torch.randn(1, 3, 0), torch.randn(5, 0), torch.zeros(1, 3, dtype=torch.long),
                                  torch.zeros(1, 3), torch.zeros(1), torch.ones(1, 3))
        for shape in ((3, 0), (0,), (0, 0)):  # element-wise divergences: reshape(-1, 0) raised a RuntimeError
            with pytest.raises(ValueError, match="input must have a non-empty vocabulary"):
                fa.elementwise_divergence(torch.randn(shape), torch.randn(shape))
        with pytest.raises(ValueError, match="student_logits must have a non-empty vocabulary"):
            fa.token_divergence(torch.randn(3, 0), torch.randn(3, 0))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_tokens_give_empty_statistics(backend):
    with fa.use_backend(backend):
        x = torch.randn(0, 5, V, requires_grad=True)
        st = fa.token_logprobs(x, torch.zeros(0, 5, dtype=torch.long), entropy=True)
        assert st.logprobs.shape == (0, 5) and st.entropy.shape == (0, 5)
        st.logprobs.sum().backward()
        assert x.grad.shape == x.shape
        h = torch.randn(0, H, requires_grad=True)
        st = fa.linear_logprobs(h, torch.randn(V, H), torch.zeros(0, dtype=torch.long))
        assert st.logprobs.shape == (0,)
        for divergence in ("jsd", "tvd", "cosine"):  # the C++ backward refused an empty state (a null pointer)
            for shape in ((0, V), (2, 0, V)):
                x = torch.randn(shape, requires_grad=True)
                labels = torch.zeros(shape[:-1], dtype=torch.long)
                out = fa.token_divergence(x, torch.randn(shape), labels, divergence=divergence)
                (out.divergence.sum() + out.nll.sum()).backward()
                assert out.divergence.shape == shape[:-1] and x.grad.shape == shape, (divergence, shape)


def _loss_and_grads(fn, *tensors):
    leaves = [t.requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", ["ppo", "gspo", "cispo", "reinforce"])
def test_empty_batch_gives_zero_policy_loss(backend, loss_type):
    for shape in ((0, 4), (3, 0)):
        loss, (g,) = _loss_and_grads(
            lambda lp: fa.policy_loss(lp, torch.zeros(shape), torch.zeros(shape), torch.ones(shape),
                                      loss_type=loss_type, backend=backend)[0], torch.zeros(shape))
        assert loss.item() == 0.0 and g.shape == shape and not g.any()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
def test_empty_batch_gives_zero_aggregate_loss(agg):
    for shape in ((0, 4), (3, 0), (2, 3)):
        mask = torch.zeros(shape) if shape == (2, 3) else torch.ones(shape)  # (2, 3): every token masked
        loss, (g,) = _loss_and_grads(lambda L: fa.aggregate_loss(L, mask, agg), torch.randn(shape))
        assert loss.item() == 0.0 and not g.any()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "kto", "aot", "simpo", "orpo", "sft",
                                       ["sigmoid", "sft"]])
def test_empty_batch_gives_zero_preference_loss(loss_type):
    z = torch.zeros(0)
    kw = dict(chosen_lengths=z, rejected_lengths=z)
    loss, grads = _loss_and_grads(lambda c, r: fa.preference_loss(c, r, z, z, loss_type=loss_type, **kw)[0],
                                  torch.zeros(0), torch.zeros(0))
    assert loss.item() == 0.0 and all(g is None or g.shape == (0,) for g in grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_gives_zero_linear_losses(backend):
    h, w = torch.randn(0, 3, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    y = torch.zeros(0, 3, dtype=torch.long)
    loss, _ = fa.LinearPreferenceLoss("sigmoid", backend=backend)(h, w, y)
    loss.backward()
    assert loss.item() == 0.0 and not w.grad.any()
    w.grad = None
    loss, _ = fa.LinearPolicyLoss(backend=backend)(h, w, y, torch.zeros(0, 3), torch.zeros(0), torch.ones(0, 3))
    loss.backward()
    assert loss.item() == 0.0 and not w.grad.any()


def test_token_level_estimators_with_no_sequences_or_no_tokens():
    for shape in ((0, 4), (3, 0)):
        r, m = torch.randn(shape), torch.ones(shape)
        a, ret = fa.gae_advantages(r, torch.randn(shape), m)
        assert a.shape == shape and ret.shape == shape
        assert fa.reinforce_pp_advantages(r, m).shape == shape
        assert fa.remax_advantages(r, m, torch.zeros(shape[0])).shape == shape
        assert fa.implicit_process_advantages(r, r, m, torch.zeros(shape[0])).shape == shape
        assert fa.iw_opd_advantages(r, r, m).shape == shape
        assert fa.masked_whiten(r, m).shape == shape


def test_sequence_logprobs_with_no_sequences():
    out = fa.sequence_logprobs(torch.zeros(0, 5))
    assert out.sum.shape == (0,) and out.mean.shape == (0,)
    with pytest.raises(ValueError, match="num_sequences"):
        fa.sequence_logprobs(torch.zeros(4), position_ids=torch.tensor([0, 1, 0, 1]), num_sequences=0)


def test_group_advantages_with_no_scores():
    assert fa.group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert fa.group_advantages(torch.zeros(0), group_size=4).shape == (0,)


# ----------------------------------------------------------------------------- meta, fake, compile
def test_meta_tensor_is_refused_not_a_crash():
    with pytest.raises(ValueError, match="scores"):
        fa.group_advantages(torch.zeros(4, device="meta"), group_size=2)
    with pytest.raises(ValueError, match="logits"):
        fa.token_logprobs(torch.zeros(2, 5, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="logprobs"):
        z = torch.zeros(2, 3, device="meta")
        fa.policy_loss(z, z, z, z)


def test_fake_tensors_still_trace():
    """FakeTensorMode reports the device a fake tensor stands for: the checks pass and the fake
    implementations give the output shapes."""
    with FakeTensorMode():
        st = fa.token_logprobs(torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long), entropy=True)
        loss, _ = fa.policy_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2), torch.ones(2, 3))
        adv = fa.group_advantages(torch.randn(4), group_size=2)
        st2 = fa.linear_logprobs(torch.randn(3, H), torch.randn(V, H), torch.zeros(3, dtype=torch.long))
        div, _ = fa.linear_divergence_loss(torch.randn(3, H), torch.randn(V, H), torch.randn(3, 2), torch.randn(V, 2))
        # a fake CUDA tensor stands for a CUDA tensor: accepted (the Triton path's fake implementation)
        cu = fa.token_logprobs(torch.randn(2, V, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda"))
    assert st.logprobs.shape == (2, 3) and st.entropy.shape == (2, 3)
    assert loss.shape == () and adv.shape == (4,) and st2.logprobs.shape == (3,) and div.shape == ()
    assert cu.logprobs.device.type == "cuda"


def test_torch_compile_fullgraph_traces():
    def step(logits, labels, old, adv, mask, scores):
        lp = fa.token_logprobs(logits, labels).logprobs
        loss, _ = fa.policy_loss(lp, old, adv, mask, loss_type="grpo")
        return loss, fa.group_advantages(scores, group_size=2)

    args = (torch.randn(2, 3, V), _lab(2, 3), torch.randn(2, 3), torch.randn(2), _mask(2, 3), torch.randn(4))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(*args), step(*args)
    assert_close(got[0], want[0], atol=0, what="loss")
    assert_close(got[1], want[1], atol=0, what="advantages")


# ----------------------------------------------------------------------------- documented results
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs_give_the_contiguous_result(backend):
    big = torch.randn(4, 6, 2 * V)
    x = big[:, ::2, ::2]  # strided in every dim, last dim not contiguous
    y = _lab(4, 3)
    with fa.use_backend(backend):
        assert torch.equal(fa.token_logprobs(x, y).logprobs, fa.token_logprobs(x.contiguous(), y).logprobs)
        h = torch.randn(6, 2 * H)[::2, ::2]
        w = torch.randn(V, 2 * H)[:, ::2]
        lab = _lab(3)
        assert torch.equal(fa.linear_logprobs(h, w, lab).logprobs,
                           fa.linear_logprobs(h.contiguous(), w.contiguous(), lab).logprobs)
        lp, old, adv = (torch.randn(3, 10)[:, ::2] for _ in range(3))
        m = torch.ones(3, 10, dtype=torch.bool)[:, ::2]
        a, _ = fa.policy_loss(lp, old, adv, m)
        b, _ = fa.policy_loss(lp.contiguous(), old.contiguous(), adv.contiguous(), m.contiguous())
        assert torch.equal(a, b)
    r = torch.randn(8, 2)[:, 0]
    assert torch.equal(fa.group_advantages(r, group_size=2), fa.group_advantages(r.contiguous(), group_size=2))
    rr, vv = torch.randn(2, 8)[:, ::2], torch.randn(2, 8)[:, ::2]
    mm = torch.ones(2, 8)[:, ::2]
    assert torch.equal(fa.gae_advantages(rr, vv, mm)[0], fa.gae_advantages(rr.contiguous(), vv.contiguous(), mm)[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bool_int_and_float_masks_agree(backend):
    lp, old, adv = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    m = torch.rand(3, 5) > 0.3
    with fa.use_backend(backend):
        want, _ = fa.policy_loss(lp, old, adv, m)
        for mm in (m.float(), m.to(torch.int32), m.to(torch.uint8), m.to(torch.float16)):
            assert torch.equal(fa.policy_loss(lp, old, adv, mm)[0], want)
    L = torch.randn(3, 5)
    want = fa.aggregate_loss(L, m, "seq-mean-token-mean")
    for mm in (m.float(), m.to(torch.int64)):
        assert torch.equal(fa.aggregate_loss(L, mm, "seq-mean-token-mean"), want)
    s = fa.sequence_logprobs(lp, m)
    for mm in (m.float(), m.to(torch.int64)):
        assert torch.equal(fa.sequence_logprobs(lp, mm).sum, s.sum)
    r = torch.randn(3, 5)
    want = fa.gae_advantages(r, r, m)[0]
    assert torch.equal(fa.gae_advantages(r, r, m.float())[0], want)


def test_a_fractional_mask_weighs_its_tokens():
    """aggregate_loss summed L over the nonzero entries but divided by the mask's sum (a mask of 0.5 doubled the
    loss); it is sum(m L) / sum(m) now, as verl's agg_loss and the float64 formula, and a masked NaN stays out."""
    agg_loss = pytest.importorskip("verl.trainer.ppo.core_algos", reason="compared with verl's agg_loss").agg_loss

    g = torch.Generator().manual_seed(0)
    L = torch.randn(3, 5, generator=g, dtype=torch.float64)
    m = torch.rand(3, 5, generator=g, dtype=torch.float64) * (torch.rand(3, 5, generator=g) > 0.3)
    m[1] = 0.0  # an empty row
    L_nan = torch.where(m != 0, L, float("nan"))
    row_sum = (m * L).sum(-1)
    want = {"token-mean": row_sum.sum() / m.sum(), "token-sum": row_sum.sum(),
            "seq-mean-token-sum": row_sum.sum() / 2,  # the two non-empty rows
            "seq-mean-token-mean": (row_sum / m.sum(-1).clamp(min=1.0)).sum() / 2,
            "seq-mean-token-sum-norm": row_sum.sum() / (3 * 5)}
    for agg, value in want.items():
        got = fa.aggregate_loss(L_nan.float(), m.float(), agg)
        torch.testing.assert_close(got.double(), value, rtol=1e-5, atol=1e-6, msg=agg)
        if agg in ("token-mean", "seq-mean-token-mean"):
            theirs = agg_loss(L.float(), m.float(), agg)
            torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-6, msg=f"verl {agg}")


def _fractional_policy_batch():
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(3, 5, generator=g)
    old, A = lp + 0.1 * torch.randn(3, 5, generator=g), torch.randn(3, generator=g)
    m = torch.ones(3, 5)
    m[0, 1] = 0.5  # a weight verl, TRL and OpenRLHF would apply; the policy kernels count a token or not
    return lp, old, A, m


def test_a_fractional_mask_is_refused_by_the_policy_losses():
    """policy_loss took any nonzero entry as 1: a mask of 0.5 gave the loss of a mask of 1 (where the trainers
    weigh the token). It is a ValueError naming the caller's argument now, on every policy entry point."""
    from fastalign.integrations import openrlhf, verl
    from fastalign.integrations.trl import GRPOLoss

    lp, old, A, m = _fractional_policy_batch()
    with pytest.raises(ValueError, match=r"response_mask must hold 0 and 1 only .*got values such as \[0\.5\]"):
        fa.policy_loss(lp, old, A, m)
    with pytest.raises(ValueError, match="completion_mask must hold 0 and 1 only"):
        GRPOLoss(dict(loss_type="grpo"))(lp, old, A, m, entropy=torch.rand(3, 5), num_items_in_batch=15)
    with pytest.raises(ValueError, match="action_mask must hold 0 and 1 only"):
        openrlhf.PolicyLoss()(lp, old, A[:, None].expand(3, 5), action_mask=m)
    with pytest.raises(ValueError, match="response_mask must hold 0 and 1 only"):
        verl.VerlPolicyLoss({})(lp, old, A[:, None].expand(3, 5), m)
    h, w = torch.randn(3, 5, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (3, 5))
    with pytest.raises(ValueError, match="response_mask must hold 0 and 1 only"):
        fa.LinearPolicyLoss(loss_type="grpo")(h, w, labels, old, A, m)
    assert torch.isfinite(fa.policy_loss(lp, old, A, (m != 0).to(torch.int64))[0])  # 0/1 integers are fine


def test_a_fractional_mask_not_read_on_the_host_gives_nan(monkeypatch):
    """Where the mask's values are not read (a GPU tensor, here the device path forced), the loss is NaN."""
    import fastalign._validate as validate

    lp, old, A, m = _fractional_policy_batch()
    monkeypatch.setattr(validate, "eager", lambda x: False)
    lp.requires_grad_(True)
    loss = fa.policy_loss(lp, old, A, m)[0]
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(lp.grad).all()  # NaN gradients too: an optimizer step sees them
    h, w = torch.randn(3, 5, 8, requires_grad=True), torch.randn(11, 8)
    loss = fa.LinearPolicyLoss(loss_type="grpo")(h, w, torch.randint(0, 11, (3, 5)), old, A, m)[0]
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(h.grad).all()
    assert torch.isfinite(fa.policy_loss(lp, old, A, m.ceil())[0])


@pytest.mark.parametrize("agg", aggregate.AGGS)
def test_aggregate_loss_refuses_a_negative_mask(agg, monkeypatch):
    """A negative token weight (float or int mask) raises naming ``response_mask`` where the values are on the
    host; where they are not read (the device path forced) the loss and its gradient are NaN; 0/1 and fractional
    masks, bool and uint8 ones, are taken."""
    import fastalign._validate as validate

    L = torch.randn(3, 4, requires_grad=True)
    m = torch.tensor([[1.0, 0.5, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    for bad in (m, m.long()):
        with pytest.raises(ValueError, match=r"response_mask must be >= 0.*\[-1"):
            fa.aggregate_loss(L, bad, agg)
    for good in (m.abs(), m.abs().long(), m != 0, (m != 0).to(torch.uint8)):
        assert torch.isfinite(fa.aggregate_loss(L, good, agg))
    monkeypatch.setattr(validate, "eager", lambda x: False)
    loss = fa.aggregate_loss(L, m, agg)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(L.grad[m != 0]).all()  # NaN on every token the loss reads
    assert torch.isfinite(fa.aggregate_loss(L, m.abs(), agg))


def test_aggregate_loss_refuses_max_len_where_it_does_not_apply():
    L, m = torch.randn(2, 4), torch.ones(2, 4)
    for agg in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean"):
        with pytest.raises(ValueError, match="max_len applies to agg='seq-mean-token-sum-norm'"):
            fa.aggregate_loss(L, m, agg, max_len=8)
    fa.aggregate_loss(L, m, "seq-mean-token-sum-norm", max_len=8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_backward_refuses_a_leaf_that_requires_grad(backend):
    """Backward would write d(logits) over a leaf's own values and hand that storage back as its .grad (PyTorch
    refuses an in-place write to such a leaf); a computed tensor, or a leaf without grad, is fine."""
    y = _lab(4)
    leaf = torch.randn(4, V, requires_grad=True)
    for x in (leaf, leaf[:, :]):
        with pytest.raises(ValueError, match="inplace_backward=True .* leaf"):
            fa.token_logprobs(x, y, inplace_backward=True, backend=backend)
    fa.token_logprobs(leaf * 1.0, y, inplace_backward=True, backend=backend).logprobs.sum().backward()
    assert leaf.grad.data_ptr() != leaf.data_ptr()
    fa.token_logprobs(torch.randn(4, V), y, inplace_backward=True, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_backward_refuses_shared_memory(backend):
    """inplace_backward writes d(logits) over the logits: an expanded or overlapping view would
    overwrite one element with the gradient of another."""
    y = _lab(4)
    base = torch.randn(1, V, requires_grad=True)
    for x in (base.expand(4, V), torch.randn(4 * V).as_strided((4, V), (2, 1))):
        with pytest.raises(ValueError, match="logits"):
            fa.token_logprobs(x, y, inplace_backward=True, backend=backend)
    ok = torch.randn(4, 2 * V)[:, ::2]  # strided but no shared memory: the gradient is exact
    r = ok.clone().requires_grad_()
    fa.token_logprobs(r, y, backend=backend).logprobs.sum().backward()
    want = r.grad
    x = ok.clone().requires_grad_()
    fa.token_logprobs(x * 1.0, y, inplace_backward=True, backend=backend).logprobs.sum().backward()
    assert_close(x.grad, want, atol=1e-6, what="d logits")


def test_other_layouts_are_refused():
    with pytest.raises(TypeError, match="logits"):
        fa.token_logprobs(torch.nested.nested_tensor([torch.randn(2, V), torch.randn(3, V)]), _lab(2))
    with pytest.raises(TypeError, match="logprobs"):
        fa.policy_loss(torch.randn(2, 3).to_mkldnn(), _f(2, 3), _f(2, 3), _mask(2, 3))
    with pytest.raises(TypeError, match="mask"):
        fa.aggregate_loss(_f(2, 3), torch.ones(2, 3).to_sparse_csr())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int32_labels_equal_int64_labels(backend):
    x, y = torch.randn(4, V), _lab(4)
    with fa.use_backend(backend):
        assert torch.equal(fa.token_logprobs(x, y).logprobs, fa.token_logprobs(x, y.int()).logprobs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_of_range_labels_give_nan_rows_and_check_raises(backend):
    x = torch.randn(4, V)
    y = torch.tensor([1, V, -5, -100])
    with fa.use_backend(backend):
        xg = x.clone().requires_grad_(True)
        lp = fa.token_logprobs(xg, y).logprobs
        assert not torch.isnan(lp[0]) and torch.isnan(lp[1]) and torch.isnan(lp[2]) and lp[3] == 0
        lp.backward(torch.full((4,), 2.0))  # an out-of-range row's gradient: that of -lse, -g p (documented)
        assert_close(xg.grad[1:3], -2.0 * torch.softmax(x[1:3].double(), -1), atol=1e-6, what="d logits")
        with pytest.raises(ValueError, match="labels"):
            fa.token_logprobs(x, y, check=True)
        lp = fa.linear_logprobs(torch.randn(4, H), torch.randn(V, H), y).logprobs
        assert not torch.isnan(lp[0]) and torch.isnan(lp[1]) and torch.isnan(lp[2]) and lp[3] == 0


def _made_in_inference_mode(t):
    with torch.inference_mode():
        return t.clone()


_INFERENCE_INPUTS = {  # the inputs that take no gradient, as an inference pass (a teacher, a rollout) makes them
    "token_logprobs": lambda x, h, w, y, t, idx: fa.token_logprobs(x, y, entropy=True).logprobs,
    "linear_logprobs": lambda x, h, w, y, t, idx: fa.linear_logprobs(h, w, y, entropy=True).logprobs,
    "token_divergence": lambda x, h, w, y, t, idx: fa.token_divergence(x, t, y, beta=0.0).divergence,
    "elementwise_divergence": lambda x, h, w, y, t, idx: fa.elementwise_divergence(x.log_softmax(-1), t),
    "linear_topk_logprobs": lambda x, h, w, y, t, idx: fa.linear_topk_logprobs(h, w, ids=idx).logprobs,
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fn", sorted(_INFERENCE_INPUTS))
def test_inputs_made_in_inference_mode(backend, fn):
    """Labels, a teacher's logits or a support made under ``torch.inference_mode`` (which autograd cannot save):
    the ops that keep them for the backward copy them, so the loss and its gradients equal those of ordinary
    tensors (PyTorch's own error otherwise: "Inference tensors cannot be saved for backward")."""
    g = torch.Generator().manual_seed(3)
    x, h, w = torch.randn(4, V, generator=g), torch.randn(4, H, generator=g), torch.randn(V, H, generator=g)
    y, t, idx = _lab(4), torch.randn(4, V, generator=g).log_softmax(-1), torch.randint(0, V, (4, 3), generator=g)
    results = []
    for make in (lambda a: a, _made_in_inference_mode):
        leaves = [a.clone().requires_grad_(True) for a in (x, h, w)]
        with fa.use_backend(backend):
            out = _INFERENCE_INPUTS[fn](*leaves, make(y), make(t), make(idx))
            out.sum().backward()
        results.append((out.detach(), *(a.grad for a in leaves)))
    for got, want in zip(results[1], results[0]):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


def test_same_results_from_four_threads():
    """The C++ kernels from 4 Python threads at once. (The Triton interpreter used for CPU tests
    is not thread-safe, so each call names its backend.)"""
    backend = "cpp"
    torch.manual_seed(0)
    inputs = [(torch.randn(6, 33), torch.randint(0, 33, (6,)), torch.randn(3, 17), torch.randn(3, 17),
               torch.randn(3), torch.rand(3, 17) > 0.2) for _ in range(4)]

    def work(i):
        x, y, lp, old, adv, m = inputs[i]
        a = fa.token_logprobs(x, y, entropy=True, backend=backend)
        lp = lp.clone().requires_grad_()
        loss, _ = fa.policy_loss(lp, old, adv, m, loss_type="grpo", backend=backend)
        loss.backward()
        return a.logprobs, a.entropy, loss.detach(), lp.grad

    want = [work(i) for i in range(4)]
    got = [None] * 4

    def run(i):
        for _ in range(3):
            got[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            assert torch.equal(a, b)


def test_a_junk_token_weight_in_a_masked_slot_has_no_gradient():
    """sequence_logprobs multiplied the weights into the masked slots before masking: an inf weight there left the
    sums finite but made d(logits) NaN. Against float64 with the masked weights set to 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 4), generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]])
    weights = torch.tensor([[math.inf, 1.0, 0.5, 2.0], [1.5, 0.5, math.nan, 1.0]], dtype=torch.float64)
    x = logits.float().requires_grad_(True)
    out = fa.sequence_logprobs(fa.token_logprobs(x, labels).logprobs, mask, token_weights=weights.float())
    out.sum.sum().backward()
    x64 = logits.clone().requires_grad_(True)
    lp64 = torch.log_softmax(x64, -1).gather(-1, labels[..., None])[..., 0]
    ref = (torch.where(mask != 0, weights, 0.0) * lp64).sum(-1)
    ref.sum().backward()
    torch.testing.assert_close(out.sum.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_sequence_logprobs_refuses_options_it_would_drop():
    lp, m = torch.randn(4, 3), torch.ones(4, 3)
    with pytest.raises(ValueError, match="ld_lengths applies with ld_alpha"):
        fa.sequence_logprobs(lp, m, ld_lengths=torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="num_sequences=7 but the padded batch holds 4"):
        fa.sequence_logprobs(lp, m, num_sequences=7)
    assert fa.sequence_logprobs(lp, m, num_sequences=4).sum.shape == (4,)


@pytest.mark.parametrize("kl_type", ["k1+", "abs+", "k2+", "k3+"])
def test_straight_through_kl_at_an_infinite_logprob(kl_type):
    """NAME+ is NAME's value with k2's gradient; at lp = -inf it was NaN (inf - inf). Now NAME's value, a gradient of
    0 there and d = lp - ref at the finite tokens (float64)."""
    lp = torch.tensor([[-math.inf, -1.0, -2.5]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.2, -0.5]])
    v = fa.kl_penalty(lp, ref, kl_type)
    torch.testing.assert_close(v, fa.kl_penalty(lp.detach(), ref, kl_type[:-1]))
    (g,) = torch.autograd.grad(v.sum(), lp)
    want = torch.tensor([[0.0, -1.0 + 1.2, -2.5 + 0.5]], dtype=torch.float64)
    torch.testing.assert_close(g.double(), want, rtol=1e-6, atol=1e-6)


def test_switches_are_bools():
    """token_logprobs' switches and kl_penalty's clamp went through bool(): "no" turned a statistic on."""
    logits, labels = torch.randn(2, 5), torch.tensor([1, 2])
    for name in ("entropy", "sum_p2", "argmax", "check", "inplace_backward"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            fa.token_logprobs(logits, labels, **{name: "no"})
    with pytest.raises(TypeError, match="kl_clamp must be a bool"):
        fa.kl_penalty(torch.zeros(2), torch.zeros(2), kl_clamp="False")
    hidden, weight = torch.randn(2, 4), torch.randn(5, 4)
    for name in ("entropy", "sum_p2", "argmax"):  # linear_logprobs computed them for "no"
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            fa.linear_logprobs(hidden, weight, labels, **{name: "no"})
    r, m = torch.randn(2, 3), torch.ones(2, 3)
    with pytest.raises(TypeError, match="whiten must be a bool"):  # "false" whitened
        fa.reinforce_pp_advantages(r, m, whiten="false")
    with pytest.raises(TypeError, match="whiten must be a bool"):
        fa.gae_advantages(r, torch.zeros(2, 3), m, whiten="false")
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fa.token_logprobs(logits, labels, ignore_index=2 ** 70)


def test_linear_policy_loss_entropy_metric_is_a_bool():
    """LinearPolicyLoss took bool(entropy_metric): "no" turned the metric on, a tensor raised torch's message."""
    with pytest.raises(TypeError, match="entropy_metric must be a bool"):
        fa.LinearPolicyLoss(entropy_metric="no")
    h, w = torch.randn(1, 3, 4), torch.randn(5, 4)
    labels, zeros, mask = torch.tensor([[1, 2, 3]]), torch.zeros(1, 3), torch.ones(1, 3)
    for value in ("no", None, torch.tensor([True, False])):
        with pytest.raises(TypeError, match="entropy_metric must be a bool"):
            fa.LinearPolicyLoss()(h, w, labels, zeros, zeros, mask, entropy_metric=value)


def test_linear_preference_token_weights_shape_is_named_whole():
    """A [2B, T + 1] token_weights was reported with each half's shapes: "(2, 4) (token_logprobs.shape)"."""
    h, w, labels = torch.randn(4, 4, 8), torch.randn(11, 8), torch.randint(0, 11, (4, 4))
    with pytest.raises(ValueError, match=r"token_weights must have shape \(4, 4\) \(like labels\), got \(4, 5\)"):
        fa.LinearPreferenceLoss()(h, w, labels, token_weights=torch.ones(4, 5))


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
@pytest.mark.parametrize("bad", [-3.0, -1e6, math.inf, math.nan])
def test_preference_lengths_are_token_counts(loss_type, bad):
    """preference_loss clamped its lengths to 1: a negative or infinite length gave a plausible loss."""
    lp = torch.tensor([-4.0, -5.0, -6.0])
    good = torch.tensor([4.0, 5.0, 6.0])
    for name in ("chosen_lengths", "rejected_lengths"):
        lengths = dict(chosen_lengths=good, rejected_lengths=good)
        lengths[name] = torch.tensor([bad, 5.0, 6.0])
        with pytest.raises(ValueError, match=f"{name} must be finite and >= 0"):
            fa.preference_loss(lp, lp - 1.0, loss_type=loss_type, **lengths)
    zero = torch.tensor([0.0, 5.0, 6.0])  # an empty response counts as one token, as before
    fa.preference_loss(lp, lp - 1.0, loss_type=loss_type, chosen_lengths=zero, rejected_lengths=good)


def test_use_backend_is_per_thread():
    """use_backend was one process-wide value: a thread that never entered a block ran another thread's
    backend, and two blocks exiting out of order left a backend forced after both had ended. Each thread has
    its own setting now, and it is restored exactly."""
    from fastalign import _backend
    inside, seen, done = threading.Event(), [], threading.Event()

    def forcing(name, wait):
        with fa.use_backend(name):
            inside.set()
            wait.wait(5)

    release = threading.Event()
    t = threading.Thread(target=forcing, args=("triton", release))
    t.start()
    inside.wait(5)
    other = threading.Thread(target=lambda: (seen.append(_backend.current()), done.set()))
    other.start()
    other.join()
    with fa.use_backend("cpp"):
        release.set()
        t.join()
        assert _backend.current() == "cpp"
    assert seen == ["auto"] and _backend.current() == "auto"


# ------------------------------------------------------------------ tuning environment variables

def _linear_case():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, 3, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g)
    lab = torch.randint(0, V, (1, 3), generator=g)
    return h, w, lab


def _block_budget_read():  # the single pass of the linear losses reads FASTALIGN_BLOCK_MIB
    h, w, lab = _linear_case()
    zeros, ones = torch.zeros(1, 3), torch.ones(1, 3)
    loss, _ = fa.LinearPolicyLoss(loss_type="reinforce", single_pass=True)(h, w, lab, zeros, ones, ones)
    loss.backward()
    return h.grad


def _chunk_budget_read():  # linear_logprobs's chunks read FASTALIGN_LINEAR_CHUNK_MIB
    h, w, lab = _linear_case()
    return fa.linear_logprobs(h[0].detach(), w, lab[0], backend="cpp").logprobs


@pytest.mark.parametrize("var,read", [("FASTALIGN_BLOCK_MIB", _block_budget_read),
                                      ("FASTALIGN_PAIR_BLOCK_MIB", _block_budget_read),
                                      ("FASTALIGN_LINEAR_CHUNK_MIB", _chunk_budget_read)])
@pytest.mark.parametrize("value", ["abc", "", "inf", "-inf", "nan", "0", "-5", "1e400"])
def test_bad_memory_budget_variables_raise_naming_them(monkeypatch, var, read, value):
    for name in ("FASTALIGN_BLOCK_MIB", "FASTALIGN_PAIR_BLOCK_MIB", "FASTALIGN_LINEAR_CHUNK_MIB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=rf"^{var} must be a positive number of MiB, got {re.escape(repr(value))}$"):
        read()


@pytest.mark.parametrize("var,read", [("FASTALIGN_BLOCK_MIB", _block_budget_read),
                                      ("FASTALIGN_LINEAR_CHUNK_MIB", _chunk_budget_read)])
@pytest.mark.parametrize("value", ["1e-9", "0.5", " 64 ", "1e300"])
def test_good_memory_budget_variables_are_taken(monkeypatch, var, read, value):
    monkeypatch.setenv(var, value)
    got = read()
    h, w, lab = _linear_case()
    if read is _chunk_budget_read:  # float64 log-softmax
        want = torch.log_softmax(h[0].detach().double() @ w.double().T, -1).gather(-1, lab[0, :, None])[:, 0]
        assert_close(got.double(), want, atol=1e-5, rtol=1e-5, what=f"{var}={value!r}")
    else:  # reinforce, A = 1: d token-mean(-lp) / dh from the float64 log-softmax
        x = h.detach().double().requires_grad_(True)
        lp = torch.log_softmax(x @ w.double().T, -1).gather(-1, lab[..., None])[..., 0]
        (-lp.mean()).backward()
        assert_close(got.double(), x.grad, atol=1e-5, rtol=1e-5, what=f"{var}={value!r}")


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values in the transposed memory layout (a time-major buffer's view): dense, not contiguous."""
    out = t.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(out, t) and not out.is_contiguous()
    return out


def _each_input_column_major(fn, *args, **kwargs):
    """``fn`` with every 2-D tensor argument in turn, then all of them, column-major, against ``fn`` on the
    contiguous ones (to rounding: torch's own reductions sum in memory order; a mis-read layout is far off)."""
    def call(swap):
        a = [_column_major(x) if i in swap else x for i, x in enumerate(args)]
        k = {n: _column_major(x) if n in swap else x for n, x in kwargs.items()}
        out = fn(*a, **k)
        return out if isinstance(out, tuple) else (out,)

    two_d = [i for i, x in enumerate(args) if isinstance(x, torch.Tensor) and x.dim() == 2]
    two_d += [n for n, x in kwargs.items() if isinstance(x, torch.Tensor) and x.dim() == 2]
    want = call(())
    for swap in [(p,) for p in two_d] + [tuple(two_d)]:
        for w, g in zip(want, call(swap)):
            if isinstance(w, dict):
                w, g = list(w.values()), list(g.values())
            for wi, gi in zip(w if isinstance(w, list) else [w], g if isinstance(g, list) else [g]):
                torch.testing.assert_close(gi, wi, rtol=1e-6, atol=1e-6, equal_nan=True,
                                           msg=f"{getattr(fn, '__name__', fn)} with {swap} column-major")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_column_major_inputs_give_the_contiguous_result(backend):
    """A transposed (dense, column-major) response_mask was read row-major by the policy kernels: a wrong loss.
    Every [B, T] input of each op, column-major, gives the contiguous result."""
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    lp, old, adv, ref, ent, roll = (torch.randn(B, T, generator=g) * 0.3 - 1 for _ in range(6))
    ent = ent.abs()
    m = torch.rand(B, T, generator=g) > 0.3
    m[:, 0] = True
    with fa.use_backend(backend):
        for loss_type in ("ppo", "gspo", "kl_cov", "clip_cov"):
            def loss(*a, **k):
                torch.manual_seed(1)  # clip_cov's draw
                return fa.policy_loss(*a, loss_type=loss_type, **k)
            _each_input_column_major(loss, lp, old, adv, m, ref_logprobs=ref, entropy=ent,
                                     importance_weights=roll.exp(), kl_coef=0.1, entropy_coef=0.01)
        _each_input_column_major(fa.policy_loss, lp, old, adv, m.float(), rollout_logprobs=roll,
                                 rollout_correction="sequence_mask", rollout_max=2.0)
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            _each_input_column_major(fa.aggregate_loss, lp, m, agg)
        _each_input_column_major(fa.sequence_logprobs, lp, m)
        _each_input_column_major(fa.gae_advantages, roll, ref, m)
        _each_input_column_major(fa.reinforce_pp_advantages, roll, m)
        _each_input_column_major(fa.remax_advantages, roll, m, torch.randn(B, generator=g))
        _each_input_column_major(fa.masked_whiten, roll, m)
        _each_input_column_major(fa.implicit_process_advantages, lp, ref, m)
        _each_input_column_major(fa.iw_opd_advantages, lp, roll, m)
        _each_input_column_major(fa.kl_penalty, lp, ref)
        hidden, weight = torch.randn(B, T, 8, generator=g), torch.randn(11, 8, generator=g)
        labels = torch.randint(0, 11, (B, T), generator=g)
        _each_input_column_major(lambda y, mask: fa.linear_logprobs(hidden, weight, y).logprobs * mask, labels, m)
        _each_input_column_major(lambda mask: fa.linear_mean_logits(hidden, weight, response_mask=mask), m)
        _each_input_column_major(lambda y: fa.token_logprobs(hidden @ weight.T, y).logprobs, labels)
        policy = fa.LinearPolicyLoss(loss_type="grpo")
        _each_input_column_major(lambda y, o, a, mask: policy(hidden, weight, y, o, a, mask), labels, old, adv, m)
