"""Preference losses (docs/math.md#preference-losses): the DPO family from sequence log-probs or from hidden states.

Every loss type is one row of ``LOSSES``: a small function of the prepared sequence
quantities (:class:`PairQuantities`) returning a per-pair loss ``[B]``. The math on
``[B]`` values is a few fused torch ops (nothing to gain from a kernel); the
``[2B, T, V]`` part — log-probs from hidden states — is
:class:`fastalign.LinearPreferenceLoss` (``linear_preference.py``), which never builds
the ``[N, V]`` logits.
Nothing here reads a value back to the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastalign import _validate
from fastalign._deprecate import renamed
from fastalign._options import FixedOptions, check_choice, check_names, check_read, did_you_mean, own_copy
from fastalign.sequence import _floating

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: Where the length average of ipo / sigmoid_norm sits relative to the f-divergence score:
#: ``"log_ratio"`` scores the length-averaged log-ratio, ``f(x/|y|)`` (default: a per-token scale
#: whatever the length); ``"score"`` averages the score of the summed log-ratio, ``f(x)/|y|`` (TRL 1.16).
F_LENGTH_AVERAGES = ("log_ratio", "score")


@dataclass
class PairQuantities:
    """What a loss row sees. ``[B]`` tensors in fp32 (fp64 stays fp64); ``dc, dr, d, dc_bar, dr_bar``
    in fp64 under a score that exponentiates the log-ratio (:func:`_exp_score_dtype`), so a row's
    loss may be fp64: :func:`preference_loss` rounds the loss to the working dtype at the end.

    ``lc, lr`` policy log-probs (summed), ``lc0, lr0`` reference ones (0 without a
    reference), ``dc, dr`` the log-ratios after the f-divergence score,
    ``d = dc - dr``, ``dc_bar, dr_bar`` the length-averaged scores
    (``f((lc - lc0)/|yc|)``), ``lc_bar, lr_bar`` length-averaged policy log-probs,
    ``nll`` the chosen NLL (0-dim), ``beta``, ``eps`` label smoothing (0 for a row outside
    ``smoothed_losses``), ``opt`` the options; a row may add its own detached metrics to ``extra``.
    """

    lc: Tensor
    lr: Tensor
    lc0: Tensor
    lr0: Tensor
    dc: Tensor
    dr: Tensor
    d: Tensor
    dc_bar: Optional[Tensor]
    dr_bar: Optional[Tensor]
    lc_bar: Optional[Tensor]
    lr_bar: Optional[Tensor]
    nll: Optional[Tensor]
    beta: float
    eps: float
    opt: dict
    extra: Dict[str, Tensor] = field(default_factory=dict)


def _smoothed(x: Tensor, eps: float) -> Tensor:
    """``-(1-eps) log sigma(x) - eps log sigma(-x)`` (label-smoothed logistic loss)."""
    out = -F.logsigmoid(x)
    if eps:
        out = (1.0 - eps) * out - eps * F.logsigmoid(-x)
    return out


def _exp_score_dtype(kind: str, alpha: float, acc: torch.dtype) -> torch.dtype:
    """The dtype the f-divergence scores are taken in: float64 for those that exponentiate the log-ratio
    (forward KL, the α-divergence with ``α ≠ 0``), else ``acc``.

    ``e^{-αx}`` overflows float32 at ``|αx| ≈ 88.7`` and float64 only at 709.8. The scores, and the
    rows that read them, run in float64 and the loss is rounded to ``acc`` once at the end: the loss and
    its gradient are the float64 formula's, ``inf`` where that overflows ``acc`` (never a finite value
    from a capped exponent, whose gradient would be 0)."""
    if kind == "forward_kl" or (kind == "alpha_divergence" and alpha != 0.0):
        return torch.float64
    return acc


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable on both sides of ``-log 2``. Each form reads its own side only
    (the other side's values replaced by ``-log 2``): the form not taken has a finite derivative, where
    ``log1p(-exp(x))``'s is infinite near 0 and made the selection's gradient NaN (as TRL's ``log1mexp``)."""
    near = x > -math.log(2.0)
    side = torch.full_like(x, -math.log(2.0))
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, side))),
                       torch.log1p(-torch.exp(torch.where(near, side, x))))


def _alphapo_reward(lbar: Tensor, alpha: float) -> Tensor:
    """``(1 - p^(-alpha)) / alpha`` with ``p = exp(lbar)``; ``alpha = 0`` is its limit ``lbar``.

    In float64, as the α-divergence score (:func:`_exp_score_dtype`): the loss of a row that reads it is the
    float64 formula's, rounded to the working dtype at the end."""
    if alpha == 0.0:
        return lbar
    return -torch.expm1(-alpha * lbar.to(torch.float64)) / alpha


def _broadcast(x: Tensor, like: Tensor) -> Tensor:
    return x.expand(like.shape)


def _aot(q: PairQuantities) -> Tensor:
    # sort the policy and reference log-ratio distributions across the batch, compare quantiles
    pol, _ = torch.sort(q.lc - q.lr, dim=0)
    ref, _ = torch.sort(q.lc0 - q.lr0, dim=0)
    return _smoothed(q.beta * (pol - ref), q.eps)


def _aot_unpaired(q: PairQuantities) -> Tensor:
    c, _ = torch.sort(q.lc - q.lc0, dim=0)
    r, _ = torch.sort(q.lr - q.lr0, dim=0)
    return _smoothed(q.beta * (c - r), q.eps)


def _exo(q: PairQuantities) -> Tensor:
    e = q.eps if q.eps > 0 else 1e-3
    x = q.beta * q.d
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-e))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(e)))


def _discopop(q: PairQuantities) -> Tensor:
    """``(1-w)(-log σ(x)) + w e^{-x}``, ``w = σ(x/τ)``, ``x = βd``; ``w e^{-x}`` as ``exp(log σ(x/τ) - x)``:
    exact wherever it is finite (it tends to 0 as ``x → -∞`` for ``τ < 1``, where the product ``σ · exp``
    gives ``0 · inf = NaN``), with its exact gradient. In float64, as the scores that exponentiate
    (:func:`_exp_score_dtype`): where the term overflows float32 (``τ > 1``) the loss is ``inf`` and the
    gradient the float64 one, rounded (``-inf``)."""
    tau = q.opt["discopop_tau"]
    x = q.beta * q.d.to(torch.float64)
    w = torch.sigmoid(x / tau)
    return (1.0 - w) * (-F.logsigmoid(x)) + torch.exp(F.logsigmoid(x / tau) - x)


def _simpo_like(q: PairQuantities, c: Tensor, r: Tensor) -> Tensor:
    return _smoothed(q.beta * (c - r) - q.opt["simpo_gamma"], q.eps)


def _kto_terms(x: Tensor, z0: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    """KTO's desirable and undesirable per-response losses of log-ratios ``x`` around ``z0``."""
    return 1.0 - torch.sigmoid(beta * (x - z0)), 1.0 - torch.sigmoid(beta * (z0 - x))


def _apo_zero_terms(x: Tensor, z0: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    """APO-zero's unpaired form: raise the desirable log-ratios, lower the undesirable ones."""
    return 1.0 - torch.sigmoid(beta * x), torch.sigmoid(beta * x)


def _kto(q: PairQuantities) -> Tensor:
    kl = q.opt["kto_kl"]
    if kl is None:
        kl = torch.cat([q.dc, q.dr]).mean()
    else:
        kl = kl.to(q.dc.dtype).mean()
    z0 = kl.clamp(min=0.0).detach()
    good, _ = _kto_terms(q.dc, z0, q.beta)
    _, bad = _kto_terms(q.dr, z0, q.beta)
    # mean over the 2B responses = mean over pairs of the average of the two halves
    return 0.5 * (q.opt["desirable_weight"] * good + q.opt["undesirable_weight"] * bad)


def _orpo(q: PairQuantities) -> Tensor:
    log_odds = (q.lc_bar - q.lr_bar) - (_log1mexp(q.lc_bar) - _log1mexp(q.lr_bar))
    ratio = F.logsigmoid(log_odds)
    q.extra["log_odds_ratio"] = ratio.detach().mean()
    q.extra["log_odds_chosen"] = log_odds.detach().mean()
    # A NaN odds ratio (mean log-probs of 0 on both sides: inf - inf, e.g. a pair of empty responses, which the
    # length clamp counts as one token of log-prob 0) has a NaN gradient w.r.t. lc and lr, but an empty response
    # has no token to carry it back. The NLL, which the chosen tokens feed, carries it too (a factor NaN where
    # the ratio is NaN, exactly 1 elsewhere), so a NaN loss never comes with a finite gradient.
    carry = torch.ones_like(ratio).masked_fill(ratio.detach().isnan(), math.nan)
    return _broadcast(q.nll, q.lc) * carry - q.beta * ratio


class Loss(NamedTuple):
    """One row of the loss table: the per-pair function and what it needs and accepts."""

    fn: Callable[[PairQuantities], Tensor]
    lengths: bool = False  # averages over the response: needs chosen_lengths / rejected_lengths
    nll: bool = False  # uses the chosen NLL
    reference: bool = True  # reads the reference log-probs (False: given ones reach the rewards/* metrics only)
    smoothing: bool = False  # takes label smoothing
    f_score: bool = False  # a function of d = dc - dr (or, sft, of no score): an f-divergence applies
    sorts: bool = False  # sorts the batch's margins: per-pair weights could not follow their pairs


LOSSES: Dict[str, Loss] = {
    "sigmoid": Loss(lambda q: _smoothed(q.beta * q.d, q.eps), smoothing=True, f_score=True),
    "robust": Loss(lambda q: (-(1.0 - q.eps) * F.logsigmoid(q.beta * q.d) + q.eps * F.logsigmoid(-q.beta * q.d))
                   / (1.0 - 2.0 * q.eps), smoothing=True, f_score=True),
    "hinge": Loss(lambda q: torch.relu(1.0 - q.beta * q.d), f_score=True),
    "ipo": Loss(lambda q: (q.dc_bar - q.dr_bar - 1.0 / (2.0 * q.beta)) ** 2, lengths=True, f_score=True),
    "exo_pair": Loss(_exo, smoothing=True, f_score=True),
    "nca_pair": Loss(lambda q: -F.logsigmoid(q.beta * q.dc) - 0.5 * F.logsigmoid(-q.beta * q.dc)
                     - 0.5 * F.logsigmoid(-q.beta * q.dr)),
    "bco_pair": Loss(lambda q: -F.logsigmoid(q.beta * q.dc - q.opt["bco_delta"])
                     - F.logsigmoid(-(q.beta * q.dr - q.opt["bco_delta"]))),
    "sppo_hard": Loss(lambda q: (q.dc - 0.5 / q.beta) ** 2 + (q.dr + 0.5 / q.beta) ** 2),
    "aot": Loss(_aot, smoothing=True, sorts=True),
    "aot_unpaired": Loss(_aot_unpaired, smoothing=True, sorts=True),
    "apo_zero": Loss(lambda q: 1.0 - torch.sigmoid(q.beta * q.dc) + torch.sigmoid(q.beta * q.dr)),
    "apo_down": Loss(lambda q: torch.sigmoid(q.beta * q.dc) + 1.0 - torch.sigmoid(q.beta * q.d)),
    "discopop": Loss(_discopop, f_score=True),
    "sigmoid_norm": Loss(lambda q: _smoothed(q.beta * (q.dc_bar - q.dr_bar), q.eps), lengths=True, smoothing=True,
                         f_score=True),
    "sft": Loss(lambda q: _broadcast(q.nll, q.lc), nll=True, reference=False, f_score=True),
    "simpo": Loss(lambda q: _simpo_like(q, q.lc_bar, q.lr_bar), lengths=True, reference=False, smoothing=True),
    "cpo": Loss(lambda q: _smoothed(q.beta * (q.lc - q.lr), q.eps) + q.opt["cpo_alpha"] * _broadcast(q.nll, q.lc),
                nll=True, reference=False, smoothing=True),
    "orpo": Loss(_orpo, lengths=True, nll=True, reference=False),
    "alphapo": Loss(lambda q: _simpo_like(q, _alphapo_reward(q.lc_bar, q.opt["alphapo_alpha"]),
                                          _alphapo_reward(q.lr_bar, q.opt["alphapo_alpha"])),
                    lengths=True, reference=False, smoothing=True),
    "kto": Loss(_kto),
}

LOSS_TYPES = tuple(LOSSES)
#: every accepted ``loss_type`` of :func:`fastalign.preference_loss` (the public name of LOSS_TYPES)
PREFERENCE_LOSS_TYPES = LOSS_TYPES

#: Unpaired losses (:func:`unpaired_preference_loss`): name -> (per-response terms, takes the KL baseline).
UNPAIRED_LOSSES: Dict[str, Tuple[Callable[[Tensor, Tensor, float], Tuple[Tensor, Tensor]], bool]] = {
    "kto": (_kto_terms, True),
    "apo_zero_unpaired": (_apo_zero_terms, False),
}


#: former argument names of the pair losses (accepted with a deprecation warning)
PAIR_RENAMES = dict(chosen_logps="chosen_logprobs", rejected_logps="rejected_logprobs",
                    ref_chosen_logps="ref_chosen_logprobs", ref_rejected_logps="ref_rejected_logprobs")


def _f_score(x: Tensor, kind: str, alpha: float) -> Tensor:
    """f-divergence score ``f'(u)`` of a log-ratio ``x = log u`` (reverse KL: ``x`` itself).

    forward KL ``1 - e^{-x}``, Jensen-Shannon ``log 2 + log σ(x)``, alpha divergence
    ``(1 - e^{-αx})/α`` (``α = 0``: its limit ``x``). The exponent is not capped: ``x`` comes in the
    dtype of :func:`_exp_score_dtype`, and a score that overflows it is infinite."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and alpha == 0.0):
        return x
    if kind == "forward_kl":
        return -torch.expm1(-x)
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(x)
    return -torch.expm1(-alpha * x) / alpha


def wpo_weights(chosen_wpo: Tensor, rejected_wpo: Tensor, cap: Optional[float] = 1.0) -> Tensor:
    """WPO pair weights ``min(exp(w_c + w_r), cap)`` (detached) from the per-sequence
    log-weights ``w = mean_t(lp_t - log sum_p2_t)`` (:attr:`SequenceLogprobs.wpo`).

    ``cap=None`` leaves them uncapped (TRL 1.16); a weight can exceed 1 when the labels are
    the likeliest tokens (``p_t > sum_j p_j^2``); a cap must be > 0 and finite."""
    if cap is not None:
        cap = _validate.positive("cap", cap)
    _validate.any_float("chosen_wpo", chosen_wpo)
    _validate.like(tuple(chosen_wpo.shape), "like chosen_wpo", required=True, device=chosen_wpo.device,
                   device_of="chosen_wpo", rejected_wpo=rejected_wpo)
    w = torch.exp(chosen_wpo.detach() + rejected_wpo.detach())
    return w if cap is None else w.clamp(max=cap)


def _names(name: str, value) -> Tuple[str, ...]:
    """A loss name or a sequence of them, as a tuple (a ``TypeError`` naming ``name`` otherwise)."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a loss name or a sequence of them, got {type(value).__name__}")
    for t in value:
        if not isinstance(t, str):
            raise TypeError(f"{name} must hold loss names (str), got {type(t).__name__} {t!r}")
    return tuple(value)


def _loss_list(loss_type, loss_weights) -> Tuple[Tuple[str, ...], Tuple[float, ...]]:
    types = _names("loss_type", loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    for t in types:
        if t not in LOSSES:
            raise ValueError(f"loss_type {t!r} is not one of {LOSS_TYPES}{did_you_mean(t, LOSS_TYPES)}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        weights = _validate.finite_numbers("loss_weights", loss_weights)
        if len(weights) != len(types):
            raise ValueError(f"loss_weights has {len(weights)} entries but loss_type names {len(types)} losses")
    return types, weights


@dataclass(frozen=True, eq=False)
class PreferenceOptions:
    """The options of :func:`preference_loss` (every argument but the batch's tensors), each with its default
    once: the function, the modules and the trainer profiles check one record alike."""
    loss_type: Union[str, Sequence[str]] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_weights: Optional[Sequence[float]] = None
    rpo_alpha: Optional[float] = None
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    alphapo_alpha: float = 0.25
    discopop_tau: float = 0.05
    bco_delta: Union[float, Tensor] = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    f_divergence: str = "reverse_kl"
    f_alpha: float = 1.0
    f_length_average: str = "log_ratio"
    smoothed_losses: Optional[Sequence[str]] = None


#: the option names, in :class:`PreferenceOptions` order
#: the option names of :class:`PreferenceOptions`
OPTION_NAMES = tuple(f.name for f in fields(PreferenceOptions))
#: the real-valued options checked finite (besides beta, label_smoothing, f_alpha, discopop_tau)
_COEFFICIENTS = ("rpo_alpha", "cpo_alpha", "simpo_gamma", "alphapo_alpha", "desirable_weight", "undesirable_weight")

#: The options only some loss rows read: name -> those rows. A value other than the default for a loss list
#: with none of those rows raises, as label_smoothing and f_divergence do (``f_length_average``: the rows that
#: average an f-divergence score over the response; ``kto_kl``, a batch tensor, defaults to None).
ROW_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "cpo_alpha": ("cpo",),
    "simpo_gamma": ("simpo", "alphapo"),
    "alphapo_alpha": ("alphapo",),
    "bco_delta": ("bco_pair",),
    "kto_kl": ("kto",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "discopop_tau": ("discopop",),
    "f_length_average": ("ipo", "sigmoid_norm"),
}


def _check_rows_read(types, given: dict) -> None:
    for name, value in given.items():
        default = getattr(PreferenceOptions, name, None)
        unchanged = value is None if default is None else (not isinstance(value, Tensor) and value == default)
        if unchanged:
            continue
        check_read(f"{name}={'a tensor' if isinstance(value, Tensor) else repr(value)}", True, list(types), types,
                   ROW_OPTIONS[name])


def _check_options(types, opts: PreferenceOptions, kto_kl: Optional[Tensor] = None):
    """The option checks of :func:`preference_loss` that need no tensor (the modules run them at
    construction; a ``bco_delta`` tensor is checked against the batch at the call): ``(beta,
    label_smoothing, the smoothed losses)``."""
    beta = _validate.positive("beta", opts.beta)
    _validate.finite(rpo_alpha=opts.rpo_alpha)  # None: no NLL term
    for name in _COEFFICIENTS[1:] + ("discopop_tau",):
        _validate.finite_number(name, getattr(opts, name))
    if not isinstance(opts.bco_delta, Tensor):
        _validate.finite_number("bco_delta", opts.bco_delta)
    f_alpha = _validate.finite_number("f_alpha", opts.f_alpha)
    f_divergence, label_smoothing = opts.f_divergence, opts.label_smoothing
    check_choice("f_length_average", opts.f_length_average, F_LENGTH_AVERAGES)
    _check_rows_read(types, {name: kto_kl if name == "kto_kl" else getattr(opts, name) for name in ROW_OPTIONS})
    eps = _validate.finite_number("label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    smoothed = _smoothed_set(types, opts.smoothed_losses, eps)
    for t, top in (("robust", 0.5), ("exo_pair", 1.0)):  # robust divides by 1 - 2 eps, exo_pair takes log(1 - eps)
        if t in smoothed and eps >= top:
            raise ValueError(f"label_smoothing must lie in [0, {top}) for loss_type {t!r}, got {label_smoothing}")
    check_choice("f_divergence", f_divergence, F_DIVERGENCES)
    if f_divergence != "reverse_kl":
        bad = [t for t in types if not LOSSES[t].f_score]
        if bad:
            raise ValueError(f"f_divergence={f_divergence!r} does not apply to loss_type {bad[0]!r}: only the losses "
                             f"of d = dc - dr take it ({[t for t in LOSS_TYPES if LOSSES[t].f_score]})")
        if set(types) == {"sft"}:
            raise ValueError(f"f_divergence={f_divergence!r} does not apply to loss_type 'sft' alone: it reads no "
                             "score (sft takes it beside a loss of d = dc - dr)")
    if f_divergence != "alpha_divergence" and f_alpha != 1.0:
        raise ValueError(f"f_alpha={f_alpha!r} applies with f_divergence='alpha_divergence' only, got "
                         f"f_divergence={f_divergence!r}")
    _validate.positive("discopop_tau", opts.discopop_tau)
    return beta, eps, smoothed


def check_pair_weights(types: Tuple[str, ...]) -> None:
    """Per-pair weights (WPO's) apply to every loss type but those that sort the batch's margins."""
    bad = [t for t in types if LOSSES[t].sorts]
    if bad:
        raise ValueError(f"per-pair weights do not apply to loss_type {bad[0]!r}: it sorts the batch's margins, so "
                         "a pair's weight would not stay with its pair")


def check_config(owner: str, loss_type, beta, label_smoothing, options: dict,
                 own: Tuple[str, ...] = ()) -> Tuple[str, ...]:
    """Validate a preference module's configuration at construction, as :func:`preference_loss` would
    at the first call (unknown options get a "did you mean" among the options and the module's ``own``
    keywords); returns the loss types."""
    check_names(owner, options, OPTION_NAMES + tuple(own))
    opts = PreferenceOptions(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                             **{k: v for k, v in options.items() if k in OPTION_NAMES[3:]})
    types, _ = _loss_list(opts.loss_type, opts.loss_weights)
    _check_options(types, opts)
    return types


def _checked_batch(batch: Dict[str, Optional[Tensor]], bco_delta) -> list:
    """Check the tensors of one call of :func:`preference_loss` (``batch``: its tensor arguments by name; ``bco_delta``
    when a tensor): their dtypes, shapes (one value per pair) and device. Returns the device flags of lengths that
    are not token counts (the loss is NaN where one is set)."""
    chosen, rejected = batch["chosen_logprobs"], batch["rejected_logprobs"]
    _floating("chosen_logprobs", chosen, dim=1)
    B = chosen.shape[0]
    _floating("rejected_logprobs", rejected)
    _validate.shape("rejected_logprobs", rejected, (B,), "like chosen_logprobs")
    if (batch["ref_chosen_logprobs"] is None) != (batch["ref_rejected_logprobs"] is None):
        raise ValueError("give both ref_chosen_logprobs and ref_rejected_logprobs, or neither (reference-free)")
    named = dict(chosen_logprobs=chosen, rejected_logprobs=rejected)
    for name in ("ref_chosen_logprobs", "ref_rejected_logprobs", "chosen_lengths", "rejected_lengths",
                 "pair_weights"):
        t = batch[name]
        if t is not None:
            _validate.real(name, t)
            _validate.shape(name, t, (B,), "one value per pair")
            named[name] = t
    if batch["chosen_nll"] is not None:
        named["chosen_nll"] = _validate.any_float("chosen_nll", batch["chosen_nll"], dim=0)
    if batch["kto_kl"] is not None:
        named["kto_kl"] = _validate.real("kto_kl", batch["kto_kl"])
        _estimate("kto_kl", named["kto_kl"], B)
    if isinstance(bco_delta, Tensor):
        named["bco_delta"] = _validate.real("bco_delta", bco_delta)
        if tuple(bco_delta.shape) not in ((), (B,)):
            raise ValueError(f"bco_delta must be a number, a 0-dim tensor or one value per pair ({B},), got shape "
                             f"{tuple(bco_delta.shape)}")
    _validate.same_device(**named)
    if (batch["chosen_lengths"] is None) != (batch["rejected_lengths"] is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    # lengths that are not token counts give a NaN loss on a GPU (no host read), never a plausible one
    return [_validate.token_counts(name, named[name]) for name in ("chosen_lengths", "rejected_lengths")
            if name in named]


@renamed(**PAIR_RENAMES, weights="pair_weights")
def preference_loss(
    chosen_logprobs: Tensor,
    rejected_logprobs: Tensor,
    ref_chosen_logprobs: Optional[Tensor] = None,
    ref_rejected_logprobs: Optional[Tensor] = None,
    *,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Optional[Sequence[float]] = None,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    chosen_nll: Optional[Tensor] = None,
    rpo_alpha: Optional[float] = None,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alphapo_alpha: float = 0.25,
    discopop_tau: float = 0.05,
    bco_delta: Union[float, Tensor] = 0.0,
    kto_kl: Optional[Tensor] = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 1.0,
    f_length_average: str = "log_ratio",
    smoothed_losses: Optional[Sequence[str]] = None,
    pair_weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    r"""Preference loss from per-sequence log-probs (docs/math.md#preference-losses) → ``(loss, metrics)``.

    With ``lc, lr`` the summed chosen / rejected policy log-probs, ``lc0, lr0`` the
    reference ones, ``dc = f(lc - lc0)``, ``dr = f(lr - lr0)`` (``f`` the f-divergence
    score, identity for reverse KL), ``d = dc - dr`` and ``eps`` the label smoothing:

    ============  ============================================================
    sigmoid       ``-(1-eps) log σ(βd) - eps log σ(-βd)``  (DPO)
    robust        ``[-(1-eps) log σ(βd) + eps log σ(-βd)] / (1-2eps)``
    hinge         ``relu(1 - βd)``
    ipo           ``(dc̄ - dr̄ - 1/(2β))²``, ``dc̄ = f((lc - lc0)/|yc|)`` (``f_length_average``)
    exo_pair      ``q(log q - log(1-eps)) + (1-q)(log(1-q) - log eps)``, ``q = σ(βd)``, eps 1e-3 when 0
    nca_pair      ``-log σ(βdc) - ½ log σ(-βdc) - ½ log σ(-βdr)``
    bco_pair      ``-log σ(βdc - δ) - log σ(-(βdr - δ))`` (δ = ``bco_delta``, 0 by default)
    sppo_hard     ``(dc - 1/(2β))² + (dr + 1/(2β))²``
    aot           smoothed sigmoid on ``β(sort(lc - lr) - sort(lc0 - lr0))`` (sorted across the batch)
    aot_unpaired  smoothed sigmoid on ``β(sort(lc - lc0) - sort(lr - lr0))``
    apo_zero      ``1 - σ(βdc) + σ(βdr)``
    apo_down      ``σ(βdc) + 1 - σ(βd)``
    discopop      ``(1-w)(-log σ(βd)) + w exp(-βd)``, ``w = σ(βd/τ)`` (``w exp(-βd)`` taken as
                  ``exp(log σ(βd/τ) - βd)``: its exact value, 0 in the limit ``βd → -∞`` for ``τ < 1``)
    sigmoid_norm  smoothed sigmoid on ``β(dc̄ - dr̄)`` (length-averaged scores, as ipo)
    sft           chosen NLL
    simpo         smoothed sigmoid on ``β(l̄c - l̄r) - γ`` (no reference)
    cpo           smoothed sigmoid on ``β(lc - lr)`` + ``cpo_alpha``·NLL (no reference)
    orpo          ``NLL - β log σ((l̄c - l̄r) - (log(1-e^{l̄c}) - log(1-e^{l̄r})))``
    alphapo       simpo with ``l̄ → (1 - e^{-α l̄})/α``
    kto           ``½[w_d (1 - σ(β(dc - z0))) + w_u (1 - σ(β(z0 - dr)))]``,
                  ``z0 = sg(max(mean KL, 0))``, KL from ``kto_kl`` or the batch's log-ratios
    ============  ============================================================

    ``loss = Σ_k w_k mean_i[ω_i L_k,i] + rpo_alpha · NLL`` with ``loss_weights`` ``w_k`` and
    ``pair_weights`` ``ω`` (e.g. :func:`wpo_weights`, detached).

    Args:
        chosen_logprobs, rejected_logprobs: ``[B]`` summed policy log-probs (differentiable).
        ref_chosen_logprobs, ref_rejected_logprobs: ``[B]`` reference log-probs (both or neither;
            without them the reference log-probs are 0 — reference-free), constants: detached, so a reference
            that requires grad gets none (as the trainers' frozen reference model). The reference-free
            rows (sft, simpo, cpo, orpo, alphapo) never read them: given with only those rows,
            the loss and its gradient are the same as without, and they change the
            ``rewards/*`` metrics only (β(lc - lc0) instead of β lc), as TRL's DPOTrainer logs its
            sft rewards against the reference model.
        loss_type: a name or a list of names (summed with ``loss_weights``, finite numbers, one per name).
        chosen_lengths, rejected_lengths: ``[B]`` response lengths; needed by ipo,
            sigmoid_norm, simpo, alphapo, orpo, and for the default NLL.
        chosen_nll: 0-dim chosen NLL; default ``-Σ lc / max(Σ chosen_lengths, 1)`` (the raw lengths, an empty
            response counting 0: the token mean over the batch's scored tokens, as TRL's chosen cross-entropy;
            exact when ``lc`` carries no token weights).
        label_smoothing: ``eps``, for the rows that take it (sigmoid, robust, exo_pair, aot,
            aot_unpaired, sigmoid_norm, simpo, cpo, alphapo); an error when no listed row does.
        smoothed_losses: the listed loss types that ``label_smoothing`` applies to (default: every
            listed row that takes it); naming one with ``label_smoothing = 0`` is an error. TRL 1.16's
            DPOTrainer smooths only robust, exo_pair, aot and aot_unpaired: its profile passes those.
        f_divergence: the score ``f'(u)`` of the log-ratio ``x = log u``: ``reverse_kl`` (``x``) |
            ``forward_kl`` (``1 - e^{-x}``) | ``js_divergence`` (``log 2 + log σ(x)``) |
            ``alpha_divergence`` (``(1 - e^{-αx})/α``, α = ``f_alpha``, any real, 0 gives ``x``;
            TRL's ``f_alpha_divergence_coef`` c is ``α = 1 - c``). Only the rows that are a
            function of ``d`` take it (sigmoid, robust, hinge, ipo, exo_pair, discopop,
            sigmoid_norm, and sft alongside them): elsewhere the partition term of the f-DPO
            reparameterisation does not cancel, and a non-default value is an error. Without a
            reference (``lc0 = 0``) the alpha score is AlphaPO's reward ``(1 - p^{-α})/α``.
            Forward KL and the α-divergence (and the alphapo row's reward) are taken in float64 and the
            loss is rounded to the working dtype at the end: loss and gradient are the float64 formula's,
            ``inf`` where that overflows float32 (a log-ratio below about ``-88.7/α``), never a capped
            finite value.
        f_length_average: for ipo and sigmoid_norm: ``"log_ratio"`` (default) scores the
            length-averaged log-ratio ``dc̄ = f(x/|y|)``; ``"score"`` averages the score of the
            summed one, ``dc̄ = f(x)/|y|`` (TRL 1.16). The two agree for reverse KL. ``"score"``
            with neither row listed is an error.
        bco_delta: δ of bco_pair, a finite number or a real tensor of shape ``()`` or ``[B]``.
        kto_kl: KTO's KL estimate (any shape, averaged; at least one value when ``B > 0``), a constant
            (detached).
        pair_weights: ``[B]`` per-pair weights ``ω`` (WPO's: :func:`wpo_weights`), constants (detached); not
            with aot or aot_unpaired, which sort the batch's margins.

    Returns:
        ``loss`` 0-dim, in the working dtype (the four log-prob inputs given, promoted together as torch's
        arithmetic would, and at least float32; the gradients come back in each input's dtype), and
        ``metrics``: rewards/chosen = mean β(lc - lc0) (``lc0 = 0`` without a
        reference, whatever the loss type), rewards/rejected,
        rewards/accuracies, rewards/margins, logps/chosen, logps/rejected and nll
        (when it is known), all detached 0-dim tensors. The rewards are the raw log-ratios,
        whatever ``f_divergence`` is: margins = mean β((lc - lc0) - (lr - lr0)), accuracies the
        share of pairs with a larger chosen reward.
    """
    types, loss_w = _loss_list(loss_type, loss_weights)
    malformed = _checked_batch(
        dict(chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
             ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
             chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, pair_weights=pair_weights,
             chosen_nll=chosen_nll, kto_kl=kto_kl), bco_delta)
    B = chosen_logprobs.shape[0]
    options = PreferenceOptions(
        loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
        rpo_alpha=rpo_alpha, cpo_alpha=cpo_alpha, simpo_gamma=simpo_gamma, alphapo_alpha=alphapo_alpha,
        discopop_tau=discopop_tau, bco_delta=bco_delta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, f_divergence=f_divergence, f_alpha=f_alpha,
        f_length_average=f_length_average, smoothed_losses=smoothed_losses)
    beta, eps, smoothed = _check_options(types, options, kto_kl)
    if pair_weights is not None:
        check_pair_weights(types)
    has_len = chosen_lengths is not None
    need_nll = any(LOSSES[t].nll for t in types) or rpo_alpha is not None
    for t in types:
        if LOSSES[t].lengths and not has_len:
            raise ValueError(f"loss_type {t!r} averages over the response: give chosen_lengths and rejected_lengths")
    if need_nll and chosen_nll is None and not has_len:
        raise ValueError("this loss needs the chosen NLL: give chosen_nll, or chosen_lengths and rejected_lengths")

    acc = _validate.result_dtype(torch.float32, chosen_logprobs, rejected_logprobs, ref_chosen_logprobs,
                                 ref_rejected_logprobs)  # the log-probs promoted together, at least fp32
    lc, lr = chosen_logprobs.to(acc), rejected_logprobs.to(acc)
    if ref_chosen_logprobs is None:
        lc0 = lr0 = torch.zeros_like(lc)
    else:
        lc0 = ref_chosen_logprobs.detach().to(acc)
        lr0 = ref_rejected_logprobs.detach().to(acc)
    dc_raw, dr_raw = lc - lc0, lr - lr0
    score = _exp_score_dtype(f_divergence, f_alpha, acc)  # float64 for the scores that exponentiate
    xc, xr = (dc_raw, dr_raw) if score == acc else (lc.to(score) - lc0.to(score), lr.to(score) - lr0.to(score))
    dc, dr = _f_score(xc, f_divergence, f_alpha), _f_score(xr, f_divergence, f_alpha)
    dc_bar = dr_bar = lc_bar = lr_bar = None
    if has_len:
        nc = chosen_lengths.to(acc).clamp(min=1.0)
        nr = rejected_lengths.to(acc).clamp(min=1.0)
        lc_bar, lr_bar = lc / nc, lr / nr
        if f_length_average == "score":
            dc_bar, dr_bar = dc / nc, dr / nr
        else:
            dc_bar = _f_score(xc / nc, f_divergence, f_alpha)
            dr_bar = _f_score(xr / nr, f_divergence, f_alpha)
    nll = None
    if chosen_nll is not None:
        nll = chosen_nll.to(acc)
    elif has_len:
        nll = -lc.sum() / chosen_lengths.to(acc).sum().clamp(min=1.0)
    opt = dict(cpo_alpha=float(cpo_alpha), simpo_gamma=float(simpo_gamma), alphapo_alpha=float(alphapo_alpha),
               discopop_tau=float(discopop_tau),
               bco_delta=bco_delta.detach().to(acc) if isinstance(bco_delta, Tensor) else float(bco_delta),
               kto_kl=kto_kl,
               desirable_weight=float(desirable_weight), undesirable_weight=float(undesirable_weight))
    q = PairQuantities(lc, lr, lc0, lr0, dc, dr, dc - dr, dc_bar, dr_bar, lc_bar, lr_bar, nll, beta, eps, opt)

    q_plain = replace(q, eps=0.0) if eps and len(smoothed) < len(types) else q
    per_pair = None
    for t, w in zip(types, loss_w):
        term = LOSSES[t].fn(q if t in smoothed else q_plain)
        term = term if w == 1.0 else w * term
        per_pair = term if per_pair is None else per_pair + term
    if pair_weights is not None:
        per_pair = per_pair * pair_weights.detach().to(acc)
    loss = per_pair.sum() / max(B, 1)  # an empty batch gives 0 (and zero gradients), like policy_loss
    if rpo_alpha is not None:
        loss = loss + float(rpo_alpha) * nll
    loss = loss.to(acc)  # the rows in float64 (discopop, alphapo, a score that exponentiates): rounded once, here
    for flag in malformed:
        loss = _validate.nan_if(flag, loss)

    with torch.no_grad():
        rc, rr = beta * dc_raw.detach(), beta * dr_raw.detach()
        metrics = {
            "rewards/chosen": rc.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracies": (rc > rr).to(acc).mean(),
            "rewards/margins": (rc - rr).mean(),
            "logps/chosen": lc.detach().mean(),
            "logps/rejected": lr.detach().mean(),
        }
        if nll is not None:
            metrics["nll"] = nll.detach()
        metrics.update(q.extra)
        metrics.update(q_plain.extra)
    return loss, metrics


@renamed(logps="logprobs", ref_logps="ref_logprobs", kl="kto_kl")
def unpaired_preference_loss(
    logprobs: Tensor,
    ref_logprobs: Optional[Tensor],
    desirable: Tensor,
    *,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kto_kl: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    r"""Unpaired preference loss (KTO) from one log-prob per response → ``(loss, metrics)``.

    Each response ``i`` is desirable or not (``desirable`` bool ``[N]``, any mix, e.g. 3 : 5);
    with ``x_i = lp_i - lp0_i`` (``lp0`` = ``ref_logprobs``; None: reference-free, ``x_i = lp_i``) and
    ``z0 = sg(max(mean(kl), 0))``:

    =================  ==========================================================
    kto                desirable ``w_d (1 - σ(β(x - z0)))``, undesirable ``w_u (1 - σ(β(z0 - x)))``
    apo_zero_unpaired  desirable ``w_d (1 - σ(βx))``, undesirable ``w_u σ(βx)`` (no KL baseline)
    =================  ==========================================================

    ``loss = mean_i L_i`` over the ``N`` responses (a class-weighted mean, as TRL's KTOTrainer; 0 for
    an empty batch, as :func:`preference_loss`).
    ``kto_kl``: KTO's KL estimate (as :func:`preference_loss`'s), e.g. ``lp - lp0`` of mismatched
    (prompt, completion) pairs, averaged here (at least one value when the batch is not empty); default
    the batch's own mean log-ratio. Formerly ``kl=`` (still accepted, with a deprecation warning).
    ``ref_logprobs`` and ``kto_kl`` are constants (detached: they get no gradient).
    No host synchronisation: the classes are masks. The loss is computed in ``logprobs`` and ``ref_logprobs``
    promoted together, at least float32.

    Metrics: ``kl`` (``z0``; 0 for apo_zero_unpaired), ``rewards/chosen`` = mean of ``βx`` over the
    desirable responses, ``rewards/rejected`` over the undesirable ones, ``rewards/margins`` their
    difference, ``logps/chosen`` / ``logps/rejected`` likewise of ``lp``. A class absent from the
    batch gives NaN for its metrics.
    """
    per, metrics = unpaired_terms(logprobs, ref_logprobs, desirable, loss_type=loss_type, beta=beta,
                                  desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                                  kto_kl=kto_kl)
    return per.sum() / max(per.shape[0], 1), metrics  # an empty batch gives 0 (and zero gradients)


def unpaired_terms(logprobs: Tensor, ref_logprobs: Optional[Tensor], desirable: Tensor, *, loss_type: str,
                   beta: float, desirable_weight: float, undesirable_weight: float, kto_kl: Optional[Tensor],
                   nan_skipping_metrics: bool = False) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`unpaired_preference_loss`'s per-response losses ``L_i`` ``[N]`` (checked as it checks them) and
    its metrics. ``nan_skipping_metrics``: a response whose ``x`` is NaN adds 0 to its class's sums, still
    counted in the class (TRL's ``KTOTrainer``: ``nansum() / count``)."""
    check_choice("loss_type", loss_type, UNPAIRED_LOSSES)
    terms, takes_kl = UNPAIRED_LOSSES[loss_type]
    _floating("logprobs", logprobs, dim=1)
    N = logprobs.shape[0]
    named = dict(logprobs=logprobs)
    if ref_logprobs is not None:
        _floating("ref_logprobs", ref_logprobs)
        _validate.shape("ref_logprobs", ref_logprobs, (N,), "like logprobs")
        named["ref_logprobs"] = ref_logprobs
    _validate.tensor("desirable", desirable)
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor (True for a desirable response), got {desirable.dtype}")
    _validate.shape("desirable", desirable, (N,), "one flag per response")
    named["desirable"] = desirable
    if kto_kl is not None:
        if not takes_kl:
            raise ValueError(f"kto_kl does not apply to loss_type {loss_type!r} (it has no KL baseline)")
        _floating("kto_kl", kto_kl)
        _estimate("kto_kl", kto_kl, N)
        named["kto_kl"] = kto_kl
    _validate.same_device(**named)
    beta = _validate.positive("beta", beta)
    desirable_weight = _validate.finite_number("desirable_weight", desirable_weight)
    undesirable_weight = _validate.finite_number("undesirable_weight", undesirable_weight)

    acc = _validate.result_dtype(torch.float32, logprobs, ref_logprobs)
    lp = logprobs.to(acc)
    x = lp if ref_logprobs is None else lp - ref_logprobs.detach().to(acc)
    if takes_kl:
        z0 = (x.mean() if kto_kl is None else kto_kl.to(acc).mean()).clamp(min=0.0).detach()
    else:
        z0 = torch.zeros((), dtype=acc, device=lp.device)
    good, bad = terms(x, z0, beta)
    per = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)

    with torch.no_grad():
        r, lpd = beta * x.detach(), lp.detach()
        d = desirable.to(acc)
        n_d, n_u = d.sum(), (1.0 - d).sum()
        zero = torch.zeros_like(r)
        if nan_skipping_metrics:
            r, lpd = torch.where(r.isnan(), zero, r), torch.where(lpd.isnan(), zero, lpd)
        rc = torch.where(desirable, r, zero).sum() / n_d
        rr = torch.where(desirable, zero, r).sum() / n_u
        metrics = {
            "kl": z0.detach(),
            "rewards/chosen": rc,
            "rewards/rejected": rr,
            "rewards/margins": rc - rr,
            "logps/chosen": torch.where(desirable, lpd, zero).sum() / n_d,
            "logps/rejected": torch.where(desirable, zero, lpd).sum() / n_u,
        }
    return per, metrics


def _estimate(name: str, kl: Tensor, n: int) -> None:
    """A KL estimate to average: at least one value when the batch (``n`` items) is not empty (the shape only)."""
    if kl.numel() == 0 and n:
        raise ValueError(f"{name} must hold at least one value (a KL estimate, averaged), got shape {tuple(kl.shape)}")


def _smoothed_set(types: Tuple[str, ...], smoothed_losses, eps: float) -> Tuple[str, ...]:
    """The listed loss types that label smoothing applies to (checked against what each row takes)."""
    takes = tuple(t for t in types if LOSSES[t].smoothing)
    if smoothed_losses is None:
        chosen = takes
    else:
        chosen = _names("smoothed_losses", smoothed_losses)
        for t in chosen:
            if t not in types:
                raise ValueError(f"smoothed_losses names {t!r}, which is not in loss_type {list(types)}")
            if t not in takes:
                raise ValueError(f"smoothed_losses names {t!r}, which takes no label smoothing "
                                 f"(those that do: {[n for n in LOSS_TYPES if LOSSES[n].smoothing]})")
    if eps and not chosen:
        raise ValueError(f"label_smoothing={eps} does not apply to loss_type {list(types)}"
                         + ("" if smoothed_losses is None else f" with smoothed_losses={list(chosen)}"))
    if not eps and smoothed_losses is not None and chosen:
        raise ValueError(f"smoothed_losses={list(chosen)} applies with label_smoothing > 0, got label_smoothing=0")
    return chosen


#: The per-batch tensors of :func:`preference_loss`: the keywords of ``PreferenceLoss.forward``.
_BATCH_KEYS = ("chosen_lengths", "rejected_lengths", "chosen_nll", "pair_weights", "kto_kl")


class PreferenceLoss(FixedOptions, nn.Module):
    """:func:`preference_loss` as a module: the options are fixed at construction,
    ``forward(chosen_logprobs, rejected_logprobs, ref_chosen_logprobs=None, ref_rejected_logprobs=None, *,
    chosen_lengths=None, rejected_lengths=None, chosen_nll=None, pair_weights=None, kto_kl=None)`` takes the
    tensors of one batch; an option given to ``forward`` raises ``TypeError``, and one assigned to the module
    (``loss.beta = 0.2``) ``AttributeError`` (set it at construction)."""

    def __init__(self, loss_type="sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, **options):
        super().__init__()
        check_config("PreferenceLoss", loss_type, beta, label_smoothing, options)  # fail here, not at the first call
        self.config = own_copy(dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, **options))
        self._fix_options(OPTION_NAMES)

    @renamed(**PAIR_RENAMES, weights="pair_weights")
    def forward(self, chosen_logprobs: Tensor, rejected_logprobs: Tensor,
                ref_chosen_logprobs: Optional[Tensor] = None, ref_rejected_logprobs: Optional[Tensor] = None, *,
                chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
                chosen_nll: Optional[Tensor] = None, pair_weights: Optional[Tensor] = None,
                kto_kl: Optional[Tensor] = None, **options) -> Tuple[Tensor, Dict[str, Tensor]]:
        for name in options:
            if name in OPTION_NAMES:
                raise TypeError(f"PreferenceLoss.forward got the option {name!r}: the options are fixed at "
                                f"construction, PreferenceLoss({name}=...)")
        check_names("PreferenceLoss.forward", options, _BATCH_KEYS)
        return preference_loss(chosen_logprobs, rejected_logprobs, ref_chosen_logprobs, ref_rejected_logprobs,
                               chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                               chosen_nll=chosen_nll, pair_weights=pair_weights, kto_kl=kto_kl, **self.config)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
