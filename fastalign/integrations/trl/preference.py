"""TRL 1.16 preference profiles: ``DPOTrainer``, ``CPOTrainer``, ``ORPOTrainer``, ``KTOTrainer``, ``TPOTrainer``.

Each profile reads the loss options of TRL's own config (a ``DPOConfig`` / ``CPOConfig`` /
``ORPOConfig`` / ``KTOConfig`` / ``TPOConfig`` object, or a dict with the same keys; missing keys take TRL 1.16's
defaults) and gives TRL's loss, gradient and metrics (under TRL's names) from the per-token
log-probs that TRL's fused LM head returns (``[rows, T]``, aligned with the shifted completion
mask, chosen rows first for the paired trainers).

Where fastalign's own defaults differ from TRL 1.16, the profile selects TRL's behaviour:

* DPO ``label_smoothing`` reaches only robust, exo_pair, aot and aot_unpaired
  (``smoothed_losses``); TRL ignores it for sigmoid and the rest, so the profile refuses a
  non-zero value with none of those in ``loss_type`` rather than drop it.
* DPO ``discopop_tau`` (read by discopop only), ``f_alpha_divergence_coef`` (alpha_divergence only), CPO
  ``simpo_gamma`` (simpo / alphapo only) and TPO ``tpo_l_gamma`` (tpo-l only), which TRL drops elsewhere, raise
  when set to other than their default with a loss type that does not read them.
* DPO f-divergences: ipo and sigmoid_norm average the score of the summed log-ratio,
  ``f(x)/|y|`` (``f_length_average="score"``); ``f_alpha_divergence_coef`` c is fastalign's
  ``f_alpha = 1 - c`` (c = 1 is reverse KL).
* WPO weights (``use_weighting``) are not capped at 1 (``wpo_cap=None``).
* CPO ``alpha`` (AlphaPO) transforms the log-probs each loss type uses: summed for sigmoid and
  hinge, length-averaged for ipo and simpo; rewards and ``logps/*`` are logged from those.
* ORPO's NLL runs over the prompt and the completion (``nll_mask``); rewards and ``logps/*``
  come from length-averaged log-probs.
* KTO takes unpaired, unbalanced batches (any mix of desirable and undesirable responses).
* TPO (``trl.experimental.tpo``) takes triples, a gold response beside each pair: a reference-free pair
  loss plus ``tpo_alpha`` times the gold responses' NLL; ipo and tpo-l average over
  ``max(|y|, 1)`` (an empty completion scores 0, not CPO's NaN).

The profiles take log-probs only, so they do not give ``entropy``, ``logits/chosen``,
``logits/rejected``, ``mean_token_accuracy``, ``num_tokens`` or ``aux_loss``; the drop-in trainers
log those from the head's own pass. TRL is never imported here except to check a dict's keys
against the config's fields.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign._options import did_you_mean
from fastalign.integrations.trl._config import read_fields
from fastalign.linear_preference import LinearPreferenceLoss
from fastalign.preference import (LOSSES, ROW_OPTIONS, PreferenceLoss, preference_loss, unpaired_terms,
                                  wpo_weights)
from fastalign.sequence import sequence_logprobs

__all__ = [
    "DPO_DEFAULTS", "CPO_DEFAULTS", "ORPO_DEFAULTS", "KTO_DEFAULTS", "TPO_DEFAULTS",
    "dpo_options", "cpo_options", "orpo_options", "kto_options", "tpo_options",
    "DPOLoss", "CPOLoss", "ORPOLoss", "KTOLoss", "TPOLoss", "dpo_linear_loss", "dpo_preference_loss",
]

#: TRL 1.16's defaults for the loss fields of each config (the other fields do not touch the loss).
DPO_DEFAULTS: Dict[str, Any] = dict(loss_type=["sigmoid"], loss_weights=None, beta=0.1, label_smoothing=0.0,
                                    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None,
                                    use_weighting=False, discopop_tau=0.05)
CPO_DEFAULTS: Dict[str, Any] = dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, cpo_alpha=1.0,
                                    simpo_gamma=0.5, alpha=0.0)
ORPO_DEFAULTS: Dict[str, Any] = dict(beta=0.1)
KTO_DEFAULTS: Dict[str, Any] = dict(loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
TPO_DEFAULTS: Dict[str, Any] = dict(loss_type="sigmoid", beta=0.01, label_smoothing=0.0, tpo_alpha=1.0,
                                    tpo_l_gamma=0.5)

#: The DPO loss types TRL 1.16 applies label smoothing to.
DPO_SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")
#: The DPO loss types TRL 1.16 takes an f-divergence with (``DPOTrainer`` refuses any other with one).
DPO_F_DIVERGENCE = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def _check_rows(per_token_logps: Tensor, **like) -> None:
    """``per_token_logps``: a floating ``[rows, T]`` tensor; each tensor in ``like`` (a mask, the
    reference's per-token log-probs: ``name=tensor``) has its shape and device. Errors name the argument."""
    _validate.any_float("per_token_logps", per_token_logps, dim=2)
    masks = {k: v for k, v in like.items() if k.endswith("mask")}
    others = {k: v for k, v in like.items() if not k.endswith("mask")}
    for kind, tensors in (("real", masks), ("any_float", others)):
        _validate.like(tuple(per_token_logps.shape), "like per_token_logps", kind=kind,
                       device=per_token_logps.device, device_of="per_token_logps", **tensors)


def _pair_rows(x: Tensor, name: str, gold: bool = False) -> int:
    """The pair count B of ``x``'s rows: the chosen rows, then the rejected rows (then, with ``gold``, the gold
    rows)."""
    k = 3 if gold else 2
    if x.shape[0] % k:
        raise ValueError(f"{name} holds the chosen rows then the rejected rows{' then the gold rows' if gold else ''}: "
                         f"{'a multiple of 3' if gold else 'an even count'}, got {x.shape[0]}")
    return x.shape[0] // k


def _reward_metrics(beta: float, chosen: Tensor, rejected: Tensor, logps_c: Tensor, logps_r: Tensor) -> Dict:
    """TRL's reward metrics from per-pair scores (``rewards/* = β·score``) and logged log-probs."""
    with torch.no_grad():
        rc, rr = beta * chosen.detach(), beta * rejected.detach()
        return {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
                "rewards/accuracies": (rc > rr).to(rc.dtype).mean(), "rewards/margins": (rc - rr).mean(),
                "logps/chosen": logps_c.detach().mean(), "logps/rejected": logps_r.detach().mean()}


def _averaged_sums(per_token_logps: Tensor, s) -> Tensor:
    """The summed log-probs ``s.sum`` for a length-averaged loss, NaN for a row with no completion token.

    TRL averages ``Σ lp / |y|``, 0/0 = NaN for such a row (a prompt that fills ``max_length``): its loss
    and metrics are NaN. Here too, and the NaN also reaches the gradient of every position of that row
    (``Σ_t lp_t · NaN``), so a NaN loss never comes with a finite gradient; the other rows are unchanged."""
    full = s.count > 0
    nan_rows = per_token_logps.sum(1) * torch.where(full, 0.0, float("nan"))  # no gradient to the other rows
    return torch.where(full, s.sum, nan_rows)


# ------------------------------------------------------------------------------------------ DPO

def dpo_options(config=None) -> Dict[str, Any]:
    """:func:`fastalign.preference_loss` options that give ``DPOTrainer``'s loss (TRL 1.16).

    ``ld_alpha`` and ``use_weighting`` act on the token log-probs: :class:`DPOLoss` and
    :func:`dpo_linear_loss` read them. Raises where ``DPOTrainer`` does (exo_pair without label
    smoothing, an f-divergence on a loss it does not apply to, WPO with aot) and where TRL would
    ignore an option (label smoothing with no loss that takes it)."""
    return _dpo(config)[0]


def _numbers(c: Dict[str, Any], name: str, fields: Tuple[str, ...], optional: Tuple[str, ...] = ()) -> None:
    """Check the number fields of ``c`` (read from config ``name``) in place: each of ``fields`` a finite real
    number, each of ``optional`` one or None, as a float; anything else (a string such as ``"0.1"``, a bool,
    NaN) raises naming ``name.field``. ``beta`` must be > 0 (the preference losses refuse another), so a config
    (or a value assigned on the trainer) is refused when the loss is built, not at the first step."""
    for field in fields + optional:
        if not (field in optional and c[field] is None):
            check = _validate.positive if field == "beta" else _validate.finite_number
            c[field] = check(f"{name}.{field}", c[field])


def _label_smoothing(c: Mapping, loss_type: str, config_name: str) -> float:
    """The config's ``label_smoothing``, in [0, 1]; other than 0 it is refused for hinge and ipo (TRL ignores it)."""
    eps = c["label_smoothing"]
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"{config_name}.label_smoothing must lie in [0, 1], got {eps}")
    if eps and loss_type in ("hinge", "ipo"):
        raise ValueError(f"{config_name}: label_smoothing={eps} does not apply to loss_type {loss_type!r} "
                         "(TRL ignores it)")
    return eps


def _refuse_unread(c: Dict[str, Any], defaults: Dict[str, Any], name: str, field: str, by: str, reader: str) -> None:
    """A field of config ``name`` that the config's ``by`` field does not read (only ``reader`` does) raises when
    set to other than TRL's default (None stands for the default), as an ignored ``label_smoothing`` does: TRL 1.16
    drops it without a word."""
    if c[field] is not None and c[field] != defaults[field]:
        raise ValueError(f"{name}.{field}={c[field]!r} does not apply to {by}={c[by]!r}: TRL 1.16 reads it only "
                         f"with {reader} (leave it at its default, {defaults[field]!r})")


def _dpo(config) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(preference_loss options, token-level options ``ld_alpha`` / ``use_weighting``)."""
    c = read_fields(config, DPO_DEFAULTS, "DPOConfig")
    types = [c["loss_type"]] if isinstance(c["loss_type"], str) else list(c["loss_type"])
    read = ("discopop_tau",) if "discopop" in types else ()  # as TRL: read there only
    if "discopop" not in types:
        _refuse_unread(c, DPO_DEFAULTS, "DPOConfig", "discopop_tau", "loss_type", "loss_type 'discopop'")
    if c["f_divergence_type"] == "alpha_divergence":
        read += ("f_alpha_divergence_coef",)
    else:
        _refuse_unread(c, DPO_DEFAULTS, "DPOConfig", "f_alpha_divergence_coef", "f_divergence_type",
                       "f_divergence_type 'alpha_divergence'")
    _numbers(c, "DPOConfig", ("beta", "label_smoothing") + read, ("ld_alpha",))
    c["use_weighting"] = _validate.boolean("DPOConfig.use_weighting", c["use_weighting"])
    eps = c["label_smoothing"]
    smoothed = [t for t in types if t in DPO_SMOOTHED]
    if "exo_pair" in types and eps == 0.0:
        raise ValueError("DPOConfig: loss_type 'exo_pair' needs label_smoothing > 0 (TRL 1.16 refuses 0)")
    if eps and not smoothed:
        raise ValueError(f"DPOConfig: label_smoothing={eps} does not apply to loss_type {types}: TRL 1.16 uses it "
                         f"only in {list(DPO_SMOOTHED)}")
    if c["use_weighting"] and any(t in ("aot", "aot_unpaired") for t in types):
        raise ValueError("DPOConfig: use_weighting does not apply to 'aot' / 'aot_unpaired' (they sort the batch)")
    f, coef = c["f_divergence_type"], c["f_alpha_divergence_coef"]
    if f != "reverse_kl":  # DPOTrainer refuses it here, whatever the coefficient (before its c = 1 shortcut)
        bad = [t for t in types if isinstance(t, str) and t in LOSSES and t not in DPO_F_DIVERGENCE]
        if bad:
            raise ValueError(f"DPOConfig: f_divergence_type={f!r} does not apply to loss_type {bad[0]!r}: TRL 1.16 "
                             f"takes it with {list(DPO_F_DIVERGENCE)} only")
    opts: Dict[str, Any] = dict(loss_type=types, beta=c["beta"], loss_weights=c["loss_weights"],
                                label_smoothing=eps)
    if eps:  # TRL's rows only
        opts["smoothed_losses"] = smoothed
    if any(t in ROW_OPTIONS["f_length_average"] for t in types):  # ipo / sigmoid_norm: f(x)/|y|
        opts["f_length_average"] = "score"
    if "discopop" in types:  # TRL reads it there only
        opts["discopop_tau"] = c["discopop_tau"]
    if (f == "alpha_divergence" and abs(coef - 1.0) < 1e-6) or set(types) == {"sft"}:
        f = "reverse_kl"  # TRL's limit case: reverse KL; sft alone reads no score (TRL lists it among the f-losses)
    opts["f_divergence"] = f
    if f == "alpha_divergence":
        opts["f_alpha"] = 1.0 - coef
    return opts, dict(ld_alpha=c["ld_alpha"], use_weighting=c["use_weighting"])


class DPOLoss(nn.Module):
    """``DPOTrainer``'s loss and metrics (TRL 1.16) from per-token log-probs.

    ``forward(per_token_logps, completion_mask, ref_per_token_logps=None, *, ref_chosen_logps=None,
    ref_rejected_logps=None, log_sum_sq_probs=None, lengths=None) -> (loss, metrics)``: ``per_token_logps``
    ``[2B, T]`` (chosen rows first) and the completion mask aligned with them; the reference
    either per token (summed the same way, LD-DPO included) or precomputed per sequence.
    ``log_sum_sq_probs`` (``log Σ_j p_j²`` per token) is required with ``use_weighting``.
    The sft term is the token mean of the chosen NLL, unweighted by LD-DPO, as in TRL.

    ``lengths`` ``[2B]``: the per-row lengths that ipo and sigmoid_norm divide their scores by
    (clamped at 1); the other rows do not read them. Default: the count of ``completion_mask``.
    ``DPOTrainer`` divides by its unshifted ``completion_mask.sum(1)``, one more than the scored
    tokens when a completion starts at position 0 (an empty prompt, ``truncation_mode="keep_end"``):
    pass that count for its numbers (the drop-in trainer does).
    """

    def __init__(self, config=None):
        super().__init__()
        self.options, token = _dpo(config)
        self.ld_alpha, self.use_weighting = token["ld_alpha"], token["use_weighting"]
        preference_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1),  # fail early on a bad mix
                        chosen_lengths=torch.ones(1), rejected_lengths=torch.ones(1), **self.options)

    def forward(self, per_token_logps: Tensor, completion_mask: Tensor, ref_per_token_logps: Optional[Tensor] = None,
                *, ref_chosen_logps: Optional[Tensor] = None, ref_rejected_logps: Optional[Tensor] = None,
                log_sum_sq_probs: Optional[Tensor] = None, lengths: Optional[Tensor] = None):
        _check_rows(per_token_logps, completion_mask=completion_mask, ref_per_token_logps=ref_per_token_logps,
                    log_sum_sq_probs=log_sum_sq_probs)
        B = _pair_rows(per_token_logps, "per_token_logps")
        device = dict(device=per_token_logps.device, device_of="per_token_logps")
        _validate.like((2 * B,), "one length per row of per_token_logps", kind="real", **device, lengths=lengths)
        if self.use_weighting and log_sum_sq_probs is None:
            raise ValueError("use_weighting (WPO) needs log_sum_sq_probs, the per-token log Σ_j p_j²")
        if not self.use_weighting and log_sum_sq_probs is not None:
            raise ValueError("log_sum_sq_probs is for use_weighting=True (WPO)")
        if (ref_per_token_logps is None) == (ref_chosen_logps is None):
            raise ValueError("give the reference per token (ref_per_token_logps) or per sequence "
                             "(ref_chosen_logps and ref_rejected_logps), one of the two")
        if ref_per_token_logps is None and ref_rejected_logps is None:
            raise ValueError("give both ref_chosen_logps and ref_rejected_logps")
        _validate.like((B,), "one per pair: per_token_logps holds the chosen rows, then the rejected rows",
                       kind="real", **device, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
        sum_p2 = None if log_sum_sq_probs is None else torch.exp(log_sum_sq_probs.detach())
        s = sequence_logprobs(per_token_logps, completion_mask, ld_alpha=self.ld_alpha, sum_p2=sum_p2)
        if ref_per_token_logps is not None:
            r = sequence_logprobs(ref_per_token_logps.detach(), completion_mask, ld_alpha=self.ld_alpha).sum
            ref_chosen_logps, ref_rejected_logps = r[:B], r[B:]
        kw = {}
        if "sft" in self.options["loss_type"]:
            plain = s.sum if self.ld_alpha is None else sequence_logprobs(per_token_logps, completion_mask).sum
            kw["chosen_nll"] = -plain[:B].sum() / s.count[:B].sum()
        if self.use_weighting:
            kw["pair_weights"] = wpo_weights(s.wpo[:B], s.wpo[B:], cap=None)
        n = s.count if lengths is None else lengths
        loss, metrics = preference_loss(s.sum[:B], s.sum[B:], ref_chosen_logps, ref_rejected_logps,
                                        chosen_lengths=n[:B], rejected_lengths=n[B:], **kw, **self.options)
        metrics.pop("nll", None)  # DPOTrainer does not log it
        return loss, metrics


def dpo_preference_loss(config=None) -> PreferenceLoss:
    """:class:`fastalign.PreferenceLoss` with ``DPOTrainer``'s loss (TRL 1.16), on summed sequence
    log-probs: ``forward(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
    chosen_lengths=..., rejected_lengths=..., chosen_nll=...)``. Its metrics carry TRL's names
    (plus ``nll`` with sft). ``ld_alpha`` and ``use_weighting`` act on the token log-probs: use
    :class:`DPOLoss` or :func:`dpo_linear_loss` for them."""
    opts, token = _dpo(config)
    for name in ("ld_alpha", "use_weighting"):
        if token[name] not in (None, False):
            raise ValueError(f"DPOConfig.{name} acts on the token log-probs: use DPOLoss or dpo_linear_loss")
    return PreferenceLoss(**opts)


def dpo_linear_loss(config=None, **kernel_options) -> LinearPreferenceLoss:
    """:class:`fastalign.LinearPreferenceLoss` with ``DPOTrainer``'s loss (TRL 1.16): from hidden
    states and the LM head, never the logits. ``kernel_options``: ``ignore_index``,
    ``temperature``, ``backend``, ... Its metrics carry TRL's names, plus ``nll`` (the chosen responses'
    NLL, which ``DPOTrainer`` does not log; :class:`DPOLoss` leaves it out)."""
    opts, token = _dpo(config)
    return LinearPreferenceLoss(ld_alpha=token["ld_alpha"], use_weighting=token["use_weighting"],
                                wpo_cap=None if token["use_weighting"] else 1.0, **opts, **kernel_options)


# ------------------------------------------------------------------------------------------ CPO

def cpo_options(config=None) -> Dict[str, Any]:
    """:func:`fastalign.preference_loss` options that give ``CPOTrainer``'s loss (TRL 1.16).

    Reference-free; TRL's loss types map to fastalign rows: sigmoid → sigmoid, hinge → hinge,
    ipo → ipo (length-averaged), simpo → simpo, alphapo → simpo with ``cpo_alpha = 0`` (as
    ``CPOConfig`` does). ``alpha ≠ 0`` (AlphaPO reward ``(1 - p^{-α})/α``) is the alpha score
    without a reference (``f_divergence="alpha_divergence"``, ``f_alpha=alpha``) on the summed
    (sigmoid, hinge) or averaged (ipo) log-probs, and the ``alphapo`` row for simpo. The BC
    term ``cpo_alpha · NLL`` is ``rpo_alpha``."""
    return _cpo(config)[0]


def _cpo(config) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(preference_loss options, the log-probs CPO's metrics use: averaged?, AlphaPO alpha)."""
    c = read_fields(config, CPO_DEFAULTS, "CPOConfig")
    _numbers(c, "CPOConfig", ("beta", "label_smoothing", "cpo_alpha", "alpha")
             + (("simpo_gamma",) if c["loss_type"] in ("simpo", "alphapo") else ()))
    t, cpo_alpha, alpha = c["loss_type"], c["cpo_alpha"], c["alpha"]
    if t not in ("simpo", "alphapo"):
        _refuse_unread(c, CPO_DEFAULTS, "CPOConfig", "simpo_gamma", "loss_type", "loss_type 'simpo' (or 'alphapo')")
    if t == "alphapo":  # CPOConfig.__post_init__'s sugar, applied once to the config (not to a trainer's loss_type)
        if config is not None and not isinstance(config, Mapping):  # a CPOConfig never holds it after __init__
            raise ValueError("loss_type='alphapo' is CPOConfig's shorthand for loss_type='simpo' with cpo_alpha=0, "
                             "applied when the config is built; TRL's trainer refuses it as a loss type (a value "
                             "assigned later): set loss_type='simpo' and cpo_alpha=0.0")
        t, cpo_alpha = "simpo", 0.0
    if t not in ("sigmoid", "hinge", "ipo", "simpo"):
        raise ValueError(f"CPOConfig: loss_type must be one of ['sigmoid', 'hinge', 'ipo', 'simpo', 'alphapo'], "
                         f"got {t!r}")
    eps = _label_smoothing(c, t, "CPOConfig")
    opts: Dict[str, Any] = dict(beta=c["beta"], label_smoothing=eps,
                                rpo_alpha=cpo_alpha if cpo_alpha else None)
    if t == "simpo":
        opts.update(loss_type="alphapo" if alpha else "simpo", simpo_gamma=c["simpo_gamma"])
        if alpha:
            opts["alphapo_alpha"] = alpha
    else:
        opts["loss_type"] = t
        if alpha:
            opts.update(f_divergence="alpha_divergence", f_alpha=alpha)
    return opts, dict(averaged=t in ("ipo", "simpo"), alpha=alpha)


class CPOLoss(nn.Module):
    """``CPOTrainer``'s loss and metrics (TRL 1.16) from per-token log-probs ``[2B, T]`` (chosen
    rows first) and their completion mask: ``forward(per_token_logps, completion_mask)``.

    Metrics: ``rewards/*`` = β times the (AlphaPO-transformed) log-probs the loss compares,
    ``logps/*`` those log-probs (length-averaged for ipo and simpo), ``nll_loss`` (0 when
    ``cpo_alpha = 0``).

    A pair with no completion token in a row (ipo, simpo, alphapo: the length average is 0/0) gives
    TRL's NaN loss and NaN ``rewards/*`` / ``logps/*``, with a NaN gradient on that pair's rows;
    sigmoid and hinge sum an empty row to 0, as TRL. With ``cpo_alpha ≠ 0``, a batch none of whose
    chosen rows has a completion token has TRL's NLL, a token mean over zero tokens: 0/0, so
    ``nll_loss`` and the loss are NaN while the gradient stays TRL's (the NLL passes none: it has no
    token to reach)."""

    def __init__(self, config=None):
        super().__init__()
        self.options, token = _cpo(config)
        self.averaged, self.alpha = token["averaged"], token["alpha"]

    def forward(self, per_token_logps: Tensor, completion_mask: Tensor):
        _check_rows(per_token_logps, completion_mask=completion_mask)
        B = _pair_rows(per_token_logps, "per_token_logps")
        s = sequence_logprobs(per_token_logps, completion_mask)
        sums = _averaged_sums(per_token_logps, s) if self.averaged else s.sum
        # the token mean over the chosen rows; 0/0 = NaN (no gradient) when none has a token, as TRL's
        nll = -s.sum[:B].sum() / s.count[:B].sum()
        loss, core = preference_loss(sums[:B], sums[B:], chosen_lengths=s.count[:B], rejected_lengths=s.count[B:],
                                     chosen_nll=nll, **self.options)
        logps = sums / s.count.clamp(min=1.0) if self.averaged else s.sum
        score = logps if self.alpha == 0.0 else (1.0 - torch.exp(-self.alpha * logps)) / self.alpha
        metrics = _reward_metrics(self.options["beta"], score[:B], score[B:], logps[:B], logps[B:])
        metrics["nll_loss"] = core["nll"] if self.options["rpo_alpha"] is not None else torch.zeros_like(loss).detach()
        return loss, metrics


# ------------------------------------------------------------------------------------------ ORPO

def orpo_options(config=None) -> Dict[str, Any]:
    """:func:`fastalign.preference_loss` options that give ``ORPOTrainer``'s loss (TRL 1.16)."""
    c = read_fields(config, ORPO_DEFAULTS, "ORPOConfig")
    _numbers(c, "ORPOConfig", ("beta",))
    return dict(loss_type="orpo", beta=c["beta"])


class ORPOLoss(nn.Module):
    """``ORPOTrainer``'s loss and metrics (TRL 1.16).

    ``forward(per_token_logps, completion_mask, nll_mask)``: per-token log-probs ``[2B, T]``
    (chosen rows first) over the prompt and the completion, the completion mask (the odds
    ratio's length-averaged log-probs) and ``nll_mask`` — TRL's NLL runs over every attended
    token of the chosen rows, prompt included (the shifted attention mask).

    Metrics: ``rewards/*`` = β times the length-averaged log-probs, ``logps/*`` those,
    ``nll_loss``, ``log_odds_ratio`` = mean log σ(log odds), ``log_odds_chosen`` = mean log odds.

    A pair with no completion token in a row (its length average is 0/0) gives TRL's NaN loss and
    NaN ``rewards/*``, ``logps/*`` and ``log_odds_*``, with a NaN gradient on that pair's rows (and,
    through the NLL, on the chosen rows: :func:`fastalign.preference_loss`'s orpo row)."""

    averaged = True  # the odds ratio reads length-averaged log-probs (as CPOLoss.averaged)

    def __init__(self, config=None):
        super().__init__()
        self.options = orpo_options(config)

    def forward(self, per_token_logps: Tensor, completion_mask: Tensor, nll_mask: Tensor):
        _check_rows(per_token_logps, completion_mask=completion_mask, nll_mask=nll_mask)
        B = _pair_rows(per_token_logps, "per_token_logps")
        s = sequence_logprobs(per_token_logps, completion_mask)
        full = sequence_logprobs(per_token_logps[:B], nll_mask[:B])
        nll = -full.sum.sum() / full.count.sum()
        sums = _averaged_sums(per_token_logps, s)
        loss, core = preference_loss(sums[:B], sums[B:], chosen_lengths=s.count[:B], rejected_lengths=s.count[B:],
                                     chosen_nll=nll, **self.options)
        mean = sums / s.count.clamp(min=1.0)
        metrics = _reward_metrics(self.options["beta"], mean[:B], mean[B:], mean[:B], mean[B:])
        metrics.update({"nll_loss": core["nll"], "log_odds_ratio": core["log_odds_ratio"],
                        "log_odds_chosen": core["log_odds_chosen"]})
        return loss, metrics


# ------------------------------------------------------------------------------------------ TPO

def tpo_options(config=None) -> Dict[str, Any]:
    """:func:`fastalign.preference_loss` options that give ``TPOTrainer``'s loss (TRL 1.16,
    ``trl.experimental.tpo``).

    Reference-free, like CPO; TRL's loss types map to fastalign rows: sigmoid → sigmoid, hinge → hinge (summed
    log-probs), ipo → ipo, tpo-l → simpo with ``simpo_gamma = tpo_l_gamma`` (both on log-probs averaged over
    ``max(|y|, 1)``: :class:`TPOLoss` passes the clamped lengths). The gold responses' NLL weighted by
    ``tpo_alpha`` is ``rpo_alpha`` (None when 0: TRL then drops the gold rows from the batch). Label smoothing
    with hinge or ipo, which TRL ignores, raises."""
    c = read_fields(config, TPO_DEFAULTS, "TPOConfig")
    t = c["loss_type"]
    if t not in ("sigmoid", "hinge", "ipo", "tpo-l"):
        raise ValueError(f"TPOConfig: loss_type must be one of ['sigmoid', 'hinge', 'ipo', 'tpo-l'], got {t!r}"
                         f"{did_you_mean(t, ('sigmoid', 'hinge', 'ipo', 'tpo-l')) if isinstance(t, str) else ''}")
    _numbers(c, "TPOConfig", ("beta", "label_smoothing", "tpo_alpha") + (("tpo_l_gamma",) if t == "tpo-l" else ()))
    if t != "tpo-l":
        _refuse_unread(c, TPO_DEFAULTS, "TPOConfig", "tpo_l_gamma", "loss_type", "loss_type 'tpo-l'")
    eps = _label_smoothing(c, t, "TPOConfig")
    opts: Dict[str, Any] = dict(loss_type="simpo" if t == "tpo-l" else t, beta=c["beta"], label_smoothing=eps,
                                rpo_alpha=c["tpo_alpha"] if c["tpo_alpha"] else None)
    if t == "tpo-l":
        opts["simpo_gamma"] = c["tpo_l_gamma"]
    return opts


class TPOLoss(nn.Module):
    r"""``TPOTrainer``'s loss and metrics (TRL 1.16, ``trl.experimental.tpo``) from per-token log-probs and
    their completion mask: ``forward(per_token_logps, completion_mask)``, ``[3B, T]`` (the chosen rows, the
    rejected rows, then the gold rows; ``[2B, T]`` without gold rows when ``tpo_alpha = 0``, TRL's batch then).

    With ``l`` the chosen / rejected log-probs (summed for sigmoid and hinge, averaged over ``max(|y|, 1)`` for
    ipo and tpo-l) and ``d = l_c - l_r``: sigmoid ``-(1-ε) log σ(βd) - ε log σ(-βd)``, hinge ``relu(1 - βd)``,
    ipo ``(d - 1/(2β))²``, tpo-l the sigmoid of ``βd - γ``; the loss is their mean over pairs plus
    ``tpo_alpha · NLL``, the token mean of ``-log p`` over every gold completion token of the batch.

    Metrics: ``rewards/*`` = β times those log-probs, ``logps/*`` the log-probs (TRL's names; TRL logs no
    separate NLL). A batch without a gold completion token gives TRL's NaN NLL and loss (the NLL passes no
    gradient: it has no token to reach)."""

    def __init__(self, config=None):
        super().__init__()
        self.options = tpo_options(config)
        self.averaged = self.options["loss_type"] in ("ipo", "simpo")

    @property
    def gold(self) -> bool:
        """Whether the batch holds the gold rows (``tpo_alpha ≠ 0``)."""
        return self.options["rpo_alpha"] is not None

    def forward(self, per_token_logps: Tensor, completion_mask: Tensor):
        _check_rows(per_token_logps, completion_mask=completion_mask)
        B = _pair_rows(per_token_logps, "per_token_logps", gold=self.gold)
        s = sequence_logprobs(per_token_logps, completion_mask)
        lengths = s.count.clamp(min=1.0)
        nll = -s.sum[2 * B:].sum() / s.count[2 * B:].sum() if self.gold else None
        loss, _ = preference_loss(s.sum[:B], s.sum[B:2 * B], chosen_lengths=lengths[:B],
                                  rejected_lengths=lengths[B:2 * B], chosen_nll=nll, **self.options)
        logps = s.sum[:2 * B] / lengths[:2 * B] if self.averaged else s.sum[:2 * B]
        return loss, _reward_metrics(self.options["beta"], logps[:B], logps[B:], logps[:B], logps[B:])


# ------------------------------------------------------------------------------------------ KTO

def kto_options(config=None) -> Dict[str, Any]:
    """:func:`fastalign.preference.unpaired_preference_loss` options that give ``KTOTrainer``'s
    loss (TRL 1.16): ``kto`` (with the KL baseline) or ``apo_zero_unpaired``."""
    c = read_fields(config, KTO_DEFAULTS, "KTOConfig")
    if c["loss_type"] not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"KTOConfig: loss_type must be 'kto' or 'apo_zero_unpaired', got {c['loss_type']!r}")
    _numbers(c, "KTOConfig", ("beta", "desirable_weight", "undesirable_weight"))
    return dict(loss_type=c["loss_type"], beta=c["beta"], desirable_weight=c["desirable_weight"],
                undesirable_weight=c["undesirable_weight"])


class KTOLoss(nn.Module):
    """``KTOTrainer``'s loss and metrics (TRL 1.16) on an unpaired batch.

    ``forward(per_token_logps, completion_mask, label, ref_logps, kl_logps=None, ref_kl_logps=None)``:
    per-token log-probs ``[N, T]`` of N responses in any order and mix, ``label`` ``[N]`` bool (or 0/1
    integers; True: desirable), ``ref_logps`` ``[N]`` the reference's summed log-probs, and for ``kto``
    the summed log-probs of the mismatched KL completions under the policy and the reference
    (``[M]`` each, the same shape, at least one value; ``M = N``, or the KL completions of every
    process; KL = their mean difference, clamped at 0, detached).

    An integer ``label`` other than 0/1 raises a ``ValueError`` when it is read on the host for free (a
    list, a CPU tensor); on a GPU its values are not read (that would synchronise) and a nonzero value
    counts as desirable, as ``KTOTrainer``'s cast to bool does.

    The loss is the mean of the weighted per-response losses over those that are not NaN (TRL's ``nanmean``:
    a response with a NaN log-prob drops out of the value; its gradient stays NaN, as TRL's).

    Metrics: ``kl``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected`` (NaN where TRL logs nothing: a class absent from the
    batch); a NaN response adds 0 to its class's sum and still counts in it (TRL's ``nansum() / count``)."""

    def __init__(self, config=None):
        super().__init__()
        self.options = kto_options(config)

    def forward(self, per_token_logps: Tensor, completion_mask: Tensor, label: Tensor, ref_logps: Tensor,
                kl_logps: Optional[Tensor] = None, ref_kl_logps: Optional[Tensor] = None):
        _check_rows(per_token_logps, completion_mask=completion_mask)
        N = per_token_logps.shape[0]
        device = dict(device=per_token_logps.device, device_of="per_token_logps")
        kto = self.options["loss_type"] == "kto"
        if kto and (kl_logps is None or ref_kl_logps is None):
            raise ValueError("loss_type 'kto' needs kl_logps and ref_kl_logps (the KL completions' summed log-probs)")
        if not kto and (kl_logps is not None or ref_kl_logps is not None):
            raise ValueError("kl_logps / ref_kl_logps do not apply to loss_type 'apo_zero_unpaired' (no KL term)")
        _validate.like((N,), "one per row of per_token_logps", required=True, **device, ref_logps=ref_logps)
        if kto:
            _validate.any_float("kl_logps", kl_logps, dim=1)
            _validate.like(tuple(kl_logps.shape), "like kl_logps", **device, kl_logps=kl_logps,
                           ref_kl_logps=ref_kl_logps)
            if N and kl_logps.shape[0] == 0:
                raise ValueError("kl_logps must hold at least one value (the KL completions' summed log-probs), got "
                                 "shape (0,)")
        label = _label(label, N)
        s = sequence_logprobs(per_token_logps, completion_mask)
        kl = (kl_logps.detach() - ref_kl_logps.detach()) if kto else None
        per, metrics = unpaired_terms(s.sum, ref_logps, label.to(per_token_logps.device) != 0, kto_kl=kl,
                                      nan_skipping_metrics=True, **self.options)
        return (per.nanmean() if N else per.sum()), metrics  # TRL's nanmean; an empty batch gives 0


def _label(label, n: int) -> Tensor:
    """``KTOLoss``'s ``label``: a bool or integer ``[n]`` tensor (or a list of them). Integers other than 0/1
    raise where the values are on the host (a list, an eager CPU tensor: free to read); a GPU tensor's are
    not read."""
    if not isinstance(label, Tensor):
        try:
            label = torch.as_tensor(label)
        except (TypeError, ValueError, RuntimeError) as e:  # a string, ragged lists, ...
            raise TypeError(f"label must be a bool tensor (or a list of bools / 0-1 integers), one per response, "
                            f"got {type(label).__name__} {label!r:.40}") from e
    _validate.tensor("label", label)
    if label.dtype.is_floating_point or label.dtype.is_complex:
        raise TypeError(f"label must be bool (or 0/1 integers) per response, True for a desirable one; "
                        f"got {label.dtype}")
    _validate.shape("label", label, (n,), "one per row of per_token_logps")
    # raises for a CPU tensor; a GPU's values are not read (the flag is dropped)
    _validate.zero_one("label", label, "be bool (or 0/1 integers) per response, True for a desirable one")
    return label

