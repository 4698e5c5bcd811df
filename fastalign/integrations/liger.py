"""Liger-Kernel 0.8 adapters: its chunked fused-linear losses (``liger_kernel.chunked_loss``) with
the same constructors, ``forward`` signatures and return values, computed by fastalign from the
hidden states and the lm_head weight (never the ``[N, V]`` logits), and the losses of ``liger_kernel.transformers``
(the fused linear cross-entropy, JSD and KL divergence; on logits the cross-entropy, the cross-entropy with the
total variation distance and GRPO; the vocabulary-parallel cross-entropies). A user swaps the import::

    from fastalign.integrations.liger import LigerFusedLinearDPOLoss   # was: from liger_kernel.chunked_loss import ...

Liger's losses as functions of positional arguments (``liger_kernel.chunked_loss.functional``,
``liger_kernel.transformers.functional``) are in :mod:`fastalign.integrations.liger_chunked_functional` and
:mod:`fastalign.integrations.liger_functional`, each computed by the module here.

Here: the preference losses :class:`LigerFusedLinearDPOLoss`, :class:`LigerFusedLinearCPOLoss`,
:class:`LigerFusedLinearORPOLoss`, :class:`LigerFusedLinearSimPOLoss` and :class:`LigerFusedLinearKTOLoss`.
Re-exported from their modules: GRPO, :class:`LigerFusedLinearGRPOLoss`
(:mod:`fastalign.integrations.liger_grpo`) and on logits :func:`triton_grpo_loss`
(:mod:`fastalign.integrations.liger_grpo_logits`); the distillation losses :class:`LigerFusedLinearJSDLoss`,
:class:`LigerFusedLinearCosineSimilarityLoss`, :class:`LigerFusedLinearJSD`, :class:`LigerFusedLinearKLDivLoss`
and on logits :class:`LigerFusedCETVDLoss` (:mod:`fastalign.integrations.liger_distillation`); the fused linear
cross-entropy :class:`LigerFusedLinearCrossEntropyLoss` and the cross-entropy on logits
:class:`LigerCrossEntropyLoss` (:mod:`fastalign.integrations.liger_cross_entropy`); the vocabulary-parallel
cross-entropy on logits :class:`LigerVocabParallelCrossEntropy` and from a head's vocabulary shard
:func:`liger_fused_linear_scaled_cross_entropy_tp` (:mod:`fastalign.integrations.liger_vocab_parallel`); the losses
on given (log-)probabilities :class:`LigerJSD`, :class:`LigerKLDIVLoss` and :class:`LigerTVDLoss`
(:mod:`fastalign.integrations.liger_elementwise`).

The preference losses take their log-probs from the head in one pass with the loss when gradients are needed
(:func:`fastalign.linear_step.separable_step` over blocks of whole pairs, or KTO's responses; ORPO with
``nll_target`` and the rest: the two passes of :func:`fastalign.linear_logprobs`), the losses from
:func:`fastalign.preference_loss` and :func:`fastalign.preference.unpaired_preference_loss`
(docs/math.md#preference-losses). Gradients flow to the hidden states, the weight and the bias.

Preference losses (``lc``, ``lr``: the chosen / rejected log-probs, summed over the tokens whose
target is not ``ignore_index``, or averaged with ``average_log_prob``; ``lc0``, ``lr0`` the
reference ones from ``ref_input`` or 0; ``NLL`` the chosen token mean of ``-lp``, 0 without
``compute_nll_loss``): ``loss = mean_pairs(ℓ) + alpha NLL`` with ``ℓ`` the row of
docs/math.md#preference-losses — DPO: its ``loss_type`` on ``d = (lc - lc0) - (lr - lr0)``
(``label_smoothing`` for robust and exo_pair only, as Liger); CPO: the smoothed sigmoid of
``β(lc - lr)``; SimPO: of ``β(l̄c - l̄r) - gamma``; ORPO: ``-β log σ(log-odds)`` (alpha 1).
``forward`` returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean,
rejected_logits_mean, nll_loss, *aux))``, aux ``(chosen_rewards, rejected_rewards)`` per pair
(``β(lc - lc0)``; ORPO adds ``log_odds_ratio``, ``log_odds_chosen``). The logits means are the
mean of ``hidden @ W.T + b`` over every position and the vocabulary, computed as ``h · sum_v W_v``.

KTO: ``loss = mean_i (1 - σ(β s_i (x_i - kl)))``, ``x = lp - lp0``, ``s = ±1`` by
``preference_labels``, ``kl`` as given (no clamp, as Liger); returns ``(loss, (chosen_logps_sum,
rejected_logps_sum, chosen_logits_sum, rejected_logits_sum, chosen_rewards_sum,
rejected_rewards_sum))``.

``compiled`` and ``chunk_size`` choose how Liger runs, not what it computes: they are accepted
and do not change the result. An option that does not apply to the chosen loss raises ``ValueError`` naming it;
every option is checked at construction and at each assignment, so a value that fastalign's loss refuses (a
negative ``beta``, CPO / SimPO ``label_smoothing`` outside [0, 1], ...) raises there, naming it. ``beta = 0`` is
computed as Liger computes it (:class:`_LigerPreference`). ``loss_fn.single_pass = False`` takes the two passes
through the head, whose graph can be differentiated again after ``backward(retain_graph=True)``, as Liger's.

The option table and what raises: docs/integrations.md#liger-kernel. Nothing here imports Liger-Kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign.integrations._dtypes import refuse_out_of_range
from fastalign.integrations._liger_checks import check_heads, execution_options, not_default, number_or_tensor
from fastalign.integrations._live_options import LiveOptions, SinglePassAttribute
from fastalign.linear import linear_logprobs
from fastalign.linear_step import separable_step
from fastalign.preference import check_config, preference_loss, unpaired_preference_loss

__all__ = ["LigerFusedLinearGRPOLoss", "LigerFusedLinearDPOLoss", "LigerFusedLinearCPOLoss",
           "LigerFusedLinearORPOLoss", "LigerFusedLinearSimPOLoss", "LigerFusedLinearKTOLoss",
           "LigerFusedLinearJSDLoss", "LigerFusedLinearCosineSimilarityLoss", "LigerFusedLinearJSD",
           "LigerFusedLinearKLDivLoss", "LigerFusedLinearCrossEntropyLoss", "LigerCrossEntropyLoss",
           "LigerFusedCETVDLoss", "LigerVocabParallelCrossEntropy", "liger_fused_linear_scaled_cross_entropy_tp",
           "triton_grpo_loss", "LigerJSD", "LigerKLDIVLoss", "LigerTVDLoss"]

# ---------------------------------------------------------------------------------------------- preference losses
def _logits_sum(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``sum_{t, v} (hidden @ W.T + b)`` per row of ``hidden [R, T, H]``, as ``h · sum_v W_v`` (no logits). The
    sums accumulate in fp32 inside the reductions (no fp32 copy of the head or of the hidden states)."""
    s = hidden.detach().sum(1, dtype=torch.float32) @ weight.detach().sum(0, dtype=torch.float32)
    if bias is not None:
        s = s + hidden.shape[1] * bias.detach().sum(dtype=torch.float32)
    return s


class _LigerPreference(SinglePassAttribute, LiveOptions, nn.Module):
    """What Liger's preference losses share: response log-probs from the hidden states, the chosen NLL and the
    logits means. ``OPTIONS`` are the constructor's arguments: attributes read at each call, as Liger reads them,
    checked again when one is assigned (every value that fastalign's loss refuses raises there, naming the
    option). An option a loss does not take keeps the class default below. ``single_pass``:
    :class:`~fastalign.integrations._live_options.SinglePassAttribute`.

    ``beta = 0``: Liger's pair terms read the log-probs only as ``beta`` times them (``β(lc - lr)``, ``β(lc -
    lc0)``, ``β(x - kl)``), so each is its value at zero log-probs, with no gradient: fastalign's loss with
    ``beta`` 1 on zeros (:meth:`_margins`); ORPO's ``-β log σ(log-odds)`` is 0 (the NLL alone). A negative
    ``beta`` raises ``ValueError``."""

    average_log_prob = False
    alpha = 1.0
    compute_nll_loss = True
    use_ref_model = False

    def _configure(self) -> None:
        """Check the options every Liger preference loss reads."""
        execution_options(self.compiled, self.chunk_size)
        _validate.index_value("ignore_index", self.ignore_index)
        if not _validate.finite_number("beta", self.beta) >= 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta} (Liger's loss with a negative beta prefers the "
                             "rejected responses; fastalign's preference losses take beta >= 0)")
        _validate.finite_number("alpha", self.alpha)
        for name in ("compute_nll_loss", "average_log_prob", "use_ref_model"):
            _validate.boolean(name, getattr(self, name))
        if not self.compute_nll_loss and self.alpha != 1.0:
            raise ValueError("alpha applies only with compute_nll_loss=True")

    def _checked(self, **options) -> dict:
        """The keywords of :func:`fastalign.preference_loss` for ``options`` (``loss_type``, ``label_smoothing``
        and the row's own), with ``beta`` (1 at ``beta = 0``: :meth:`_margins`), checked as that function checks
        them: a value it refuses raises here, at construction or assignment, not at the call."""
        options["beta"] = float(self.beta) or 1.0
        rest = dict(options)
        check_config(type(self).__name__, rest.pop("loss_type"), rest.pop("beta"), rest.pop("label_smoothing", 0.0),
                     rest)
        return options

    def _margins(self, *logps):
        """The log-probs the pair loss reads: as given, or zeros (no gradient) at ``beta = 0``, where fastalign's
        loss runs with ``beta`` 1 (the class docstring)."""
        if self.beta != 0.0:
            return logps
        return tuple(None if x is None else x * 0.0 for x in logps)

    def _summed(self, tok: Tensor, target: Tensor):
        """Per response: (summed or averaged log-prob, token count) of the token log-probs ``tok``."""
        keep = target != self.ignore_index
        count = keep.sum(-1).to(torch.float32)
        total = (tok * keep).sum(-1)
        return (total / count if self.average_log_prob else total), count

    def _response_logprobs(self, hidden, weight, target, bias):
        """The reference's :meth:`_summed` log-probs (no gradient)."""
        with torch.no_grad():
            tok = linear_logprobs(hidden, weight, target, bias=bias, ignore_index=self.ignore_index).logprobs
        return self._summed(tok, target)[0]

    def _chosen_nll(self, tok: Tensor, labels: Tensor) -> Tensor:
        """The chosen token mean of ``-lp`` (``tok``, ``labels``: the chosen rows), 0 without ``compute_nll_loss``."""
        if not self.compute_nll_loss:
            return torch.zeros((), dtype=torch.float32, device=tok.device)
        keep = labels != self.ignore_index
        return -(tok * keep).sum() / keep.sum()

    def _step(self, hidden, weight, target, bias, loss, *, items: str = "pairs", nll_target=None):
        """``(value, logps, count, nll, aux)``: ``loss(logps, count, nll) -> (value, aux)`` of the responses'
        log-probs through the head (:func:`fastalign.linear_step.separable_step`: one pass over blocks of whole
        pairs, or responses, when gradients are needed). With ``nll_target`` (ORPO) the chosen NLL scores other
        labels than the loss: the token log-probs of both come from :func:`fastalign.linear_logprobs`."""
        if nll_target is not None:
            tok = linear_logprobs(hidden, weight, target, bias=bias, ignore_index=self.ignore_index).logprobs
            B = target.shape[0] // 2
            nll_tok = linear_logprobs(hidden[:B], weight, nll_target[:B], bias=bias,
                                      ignore_index=self.ignore_index).logprobs
            logps, count = self._summed(tok, target)
            nll = self._chosen_nll(nll_tok, nll_target[:B])
            value, aux = loss(logps, count, nll)
            # the chosen rows' labels (the NLL's, and all Liger reads of nll_target)
            value = refuse_out_of_range(value, nll_target[:B], weight.shape[0], self.ignore_index, "nll_target")
            return refuse_out_of_range(value, target, weight.shape[0], self.ignore_index, "target"), logps, count, \
                nll, aux

        def response_loss(tok, _sum_p2):
            logps, count = self._summed(tok, target)
            half = tok.shape[0] // 2
            nll = self._chosen_nll(tok[:half], target[:half]) if items == "pairs" else None
            value, aux = loss(logps, count, nll)
            return value, {"logps": logps.detach(), "count": count, "nll": nll, "aux": aux}

        value, out, _ = separable_step(hidden, weight, target, response_loss, bias=bias, items=items,
                                       single_pass=self.single_pass, logit=dict(ignore_index=self.ignore_index))
        if self.average_log_prob:
            # a response with no scored token averages 0 / 0: its NaN loss comes with NaN gradients, as Liger's (the
            # pass skips that response's tokens, ignored rows, where the NaN would reach the gradients)
            value = _validate.nan_if((out["count"] == 0).any(), value)
        # a label past the vocabulary: Liger's loss fails (IndexError); here a ValueError, or NaN off the host
        value = refuse_out_of_range(value, target, weight.shape[0], self.ignore_index, "target")
        return value, out["logps"], out["count"], out["nll"], out["aux"]

    def _reference(self, ref_input, ref_weight, ref_bias, target) -> Optional[Tensor]:
        """The reference model's response log-probs with ``use_ref_model``, else None."""
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError("use_ref_model=True needs ref_input and ref_weight")
            return self._response_logprobs(ref_input, ref_weight, target, ref_bias)
        if ref_input is not None or ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_input / ref_weight / ref_bias are not used with use_ref_model=False")
        return None

    def _pairs(self, weight, hidden, target, bias, loss, ref_input=None, ref_weight=None, ref_bias=None,
               nll_target=None):
        """``(value, logps, nll, logits_means, aux, ref)`` of ``loss(logps, count, nll, ref) -> (value, aux)`` on
        the pairs (chosen rows first), through :meth:`_step`."""
        check_heads(hidden, weight, bias, "target", target, ref_input, ref_weight, ref_bias)
        if hidden.dim() != 3 or hidden.shape[0] % 2:
            raise ValueError(f"_input must be (2B, T, H) with target (2B, T): chosen rows then rejected rows, got "
                             f"{tuple(hidden.shape)} and {tuple(target.shape)}")
        if nll_target is not None:
            _validate.integer("nll_target", nll_target)
            _validate.shape("nll_target", nll_target, tuple(target.shape), "target.shape")
        B = target.shape[0] // 2
        ref = self._reference(ref_input, ref_weight, ref_bias, target)
        value, logps, _, nll, aux = self._step(hidden, weight, target, bias,
                                               lambda lp, count, nll: loss(lp, count, nll, ref), nll_target=nll_target)
        logits_sum = _logits_sum(hidden, weight, bias) / (B * target.shape[1] * weight.shape[0])
        return value, logps, nll, (logits_sum[:B].sum(), logits_sum[B:].sum()), aux, ref

    def _out(self, loss, logps, logits_means, nll, *aux, ref=None):
        """Liger's outputs: the loss, then chosen / rejected log-probs, logits means, the chosen NLL, the chosen /
        rejected rewards ``β (log p - log p_ref)`` (``log p_ref`` 0 without a reference) and ``aux``."""
        B = logps.shape[0] // 2
        with torch.no_grad():
            r = self.beta * (logps.detach().float() - (0.0 if ref is None else ref.float()))
        return loss, (logps[:B].detach(), logps[B:].detach(), *logits_means, nll.detach(), r[:B], r[B:], *aux)


class LigerFusedLinearDPOLoss(_LigerPreference):
    """Liger's ``LigerFusedLinearDPOLoss``: :func:`fastalign.preference_loss` on log-probs from
    :func:`fastalign.linear_logprobs`, plus ``alpha`` times the chosen NLL. Its options are attributes, read at each
    call as Liger reads them (an assignment takes effect at the next call)."""

    LOSS_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "discopop")
    OPTIONS = ("ignore_index", "beta", "alpha", "compute_nll_loss", "compiled", "use_ref_model", "average_log_prob",
               "chunk_size", "loss_type", "label_smoothing", "discopop_tau")

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, compute_nll_loss: bool = False,
                 compiled: bool = True, use_ref_model: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 discopop_tau: float = 0.05):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        """Check the options and build the keywords of :func:`fastalign.preference_loss`."""
        super()._configure()
        loss_type = self.loss_type
        if loss_type not in self.LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {self.LOSS_TYPES}, got {loss_type!r}")
        label_smoothing = _validate.finite_number("label_smoothing", self.label_smoothing)
        discopop_tau = _validate.finite_number("discopop_tau", self.discopop_tau)
        if loss_type == "sppo_hard" and self.beta == 0.0:
            raise ValueError("beta must be > 0 for loss_type 'sppo_hard' (its loss reads 0.5 / beta)")
        if loss_type == "exo_pair" and not label_smoothing > 0.0:
            raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair'")
        if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {label_smoothing}")
        not_default("DPO", loss_type, **({} if loss_type in ("robust", "exo_pair") else dict(
            label_smoothing=(label_smoothing, 0.0))))
        not_default("DPO", loss_type, **({} if loss_type == "discopop" else dict(
            discopop_tau=(discopop_tau, 0.05))))
        options = dict(loss_type=loss_type)
        if loss_type in ("robust", "exo_pair"):
            options["label_smoothing"] = label_smoothing
        if loss_type == "discopop":
            options["discopop_tau"] = discopop_tau
        self._options = self._checked(**options)

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        def dpo(logps, _count, nll, ref):
            B = logps.shape[0] // 2
            logps, ref = self._margins(logps, ref)
            ref_c, ref_r = (None, None) if ref is None else (ref[:B], ref[B:])
            pair, _ = preference_loss(logps[:B], logps[B:], ref_c, ref_r, **self._options)
            return pair + self.alpha * nll, ()

        loss, logps, nll, logits_means, _, ref = self._pairs(lin_weight, _input, target, bias, dpo, ref_input,
                                                             ref_weight, ref_bias)
        return self._out(loss, logps, logits_means, nll, ref=ref)


class LigerFusedLinearCPOLoss(_LigerPreference):
    """Liger's ``LigerFusedLinearCPOLoss``: fastalign's ``cpo`` row, ``-(1-eps) log σ(β(lc - lr)) - eps log σ(-β(lc
    - lr)) + alpha NLL``. Its options are attributes, read at each call as Liger reads them."""

    OPTIONS = ("ignore_index", "beta", "alpha", "label_smoothing", "compute_nll_loss", "compiled", "average_log_prob",
               "chunk_size")

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        """Check the options (``label_smoothing`` in [0, 1]) and build the keywords of
        :func:`fastalign.preference_loss`."""
        super()._configure()
        self._options = self._checked(loss_type="cpo", cpo_alpha=float(self.alpha), label_smoothing=(
            _validate.finite_number("label_smoothing", self.label_smoothing)))

    def forward(self, lin_weight, _input, target, bias=None):
        def cpo(logps, _count, nll, _ref):
            B = logps.shape[0] // 2
            (logps,) = self._margins(logps)
            return preference_loss(logps[:B], logps[B:], chosen_nll=nll, **self._options)[0], ()

        loss, logps, nll, logits_means, _, _ = self._pairs(lin_weight, _input, target, bias, cpo)
        return self._out(loss, logps, logits_means, nll)


class LigerFusedLinearSimPOLoss(_LigerPreference):
    """Liger's ``LigerFusedLinearSimPOLoss``: fastalign's ``simpo`` row (``simpo_gamma = gamma``) on the
    token-averaged log-probs, plus ``alpha`` times the chosen NLL. Its options are attributes, read at each call as
    Liger reads them."""

    average_log_prob = True
    OPTIONS = ("ignore_index", "beta", "alpha", "label_smoothing", "compute_nll_loss", "compiled", "gamma",
               "chunk_size")

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, gamma: float = 0.5, chunk_size: int = 1):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        """Check the options (``label_smoothing`` in [0, 1], ``gamma`` finite) and build the keywords of
        :func:`fastalign.preference_loss`."""
        super()._configure()
        self._options = self._checked(
            loss_type="simpo", label_smoothing=_validate.finite_number("label_smoothing", self.label_smoothing),
            simpo_gamma=_validate.finite_number("gamma", self.gamma))

    def forward(self, lin_weight, _input, target, bias=None):
        def simpo(logps, count, nll, _ref):
            B = logps.shape[0] // 2
            (total,) = self._margins(logps * count)  # the summed log-probs, with their lengths: the row averages
            pair, _ = preference_loss(total[:B], total[B:], chosen_lengths=count[:B], rejected_lengths=count[B:],
                                      **self._options)
            return pair + self.alpha * nll, ()

        loss, logps, nll, logits_means, _, _ = self._pairs(lin_weight, _input, target, bias, simpo)
        return self._out(loss, logps, logits_means, nll)


class LigerFusedLinearORPOLoss(_LigerPreference):
    """Liger's ``LigerFusedLinearORPOLoss``: fastalign's ``orpo`` row, ``NLL - β log σ((l̄c - l̄r) - (log(1 -
    e^{l̄c}) - log(1 - e^{l̄r})))`` on the token-averaged log-probs. Its options are attributes, read at each call as
    Liger reads them."""

    average_log_prob = True
    OPTIONS = ("ignore_index", "beta", "compute_nll_loss", "compiled", "chunk_size")

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
                 compiled: bool = True, chunk_size: int = 1):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        """Check the options and build the keywords of :func:`fastalign.preference_loss`."""
        super()._configure()
        self._options = self._checked(loss_type="orpo")

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        if nll_target is not None and not self.compute_nll_loss:  # Liger scores no NLL then: it would be ignored
            raise ValueError("nll_target applies only with compute_nll_loss=True (the labels of the chosen NLL)")

        def orpo(logps, count, nll, _ref):
            B = logps.shape[0] // 2
            total = logps * count
            loss, met = preference_loss(total[:B], total[B:], chosen_nll=nll, chosen_lengths=count[:B],
                                        rejected_lengths=count[B:], **self._options)
            if self.beta == 0.0:  # Liger's NLL - 0 * sum(log σ(log-odds)) / B: the loss at beta 1, times 0, keeps
                loss = nll + 0.0 * loss  # its NaN where that sum is not finite, and the graph
            return loss, (met["log_odds_ratio"], met["log_odds_chosen"])

        loss, logps, nll, logits_means, odds, _ = self._pairs(lin_weight, _input, target, bias, orpo,
                                                              nll_target=nll_target)
        return self._out(loss, logps, logits_means, nll, *odds)


class LigerFusedLinearKTOLoss(_LigerPreference):
    """Liger's ``LigerFusedLinearKTOLoss``: :func:`fastalign.preference.unpaired_preference_loss` (kto) with
    Liger's ``kl`` used as given (moved into the reference log-probs, so no clamp applies). Its options are
    attributes, read at each call as Liger reads them."""

    compute_nll_loss = False
    OPTIONS = ("ignore_index", "beta", "compiled", "use_ref_model", "average_log_prob", "chunk_size")

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compiled: bool = True,
                 use_ref_model: bool = False, average_log_prob: bool = False, chunk_size: int = 1):
        super().__init__()
        self._configure_options(locals())

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None, ref_weight=None,
                ref_bias=None, kl=None):
        if preference_labels is None:
            raise ValueError("preference_labels (bool, one per response) is required")
        check_heads(_input, lin_weight, bias, "target", target, ref_input, ref_weight, ref_bias)
        N = target.shape[0]
        _validate.tensor("preference_labels", preference_labels, dim=1)
        if preference_labels.dtype != torch.bool:
            raise TypeError(f"preference_labels must be a bool tensor, got {preference_labels.dtype}")
        dev = dict(device=_input.device, device_of="_input")
        _validate.like((N,), "one per response (target.shape[0])", kind="real", **dev,
                       preference_labels=preference_labels)
        if kl is not None:
            number_or_tensor("kl", kl, shapes=[(), (1,), (N,)], what="a scalar or one per response",
                              device=_input.device, kind="any_float")
        ref = self._reference(ref_input, ref_weight, ref_bias, target)
        if ref is None:
            ref = torch.zeros(target.shape[0], dtype=torch.float32, device=target.device)
        # 1 - σ(β s (lp - lp0 - kl)): kl joins the reference, fastalign's own baseline is 0
        shifted = ref if kl is None else ref + kl

        def kto(logps, _count, _nll):
            logps, baseline = self._margins(logps, shifted)
            return unpaired_preference_loss(logps, baseline, preference_labels, loss_type="kto",
                                            beta=float(self.beta) or 1.0,
                                            kto_kl=torch.zeros(1, device=logps.device))[0], ()

        loss, logps, _, _, _ = self._step(_input, lin_weight, target, bias, kto, items="rows")
        good = preference_labels.to(torch.float32)
        with torch.no_grad():
            rewards = self.beta * (logps.detach().float() - ref.float())
            lsum = _logits_sum(_input, lin_weight, bias)
            x = logps.detach().float()
        return loss, ((x * good).sum(), (x * (1 - good)).sum(), (lsum * good).sum(), (lsum * (1 - good)).sum(),
                      (rewards * good).sum(), (rewards * (1 - good)).sum())


# the GRPO, distillation and cross-entropy losses live in their own modules
from fastalign.integrations.liger_cross_entropy import (  # noqa: E402
    LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss)
from fastalign.integrations.liger_elementwise import LigerJSD, LigerKLDIVLoss, LigerTVDLoss  # noqa: E402
from fastalign.integrations.liger_distillation import (  # noqa: E402
    LigerFusedCETVDLoss, LigerFusedLinearCosineSimilarityLoss, LigerFusedLinearJSD, LigerFusedLinearJSDLoss,
    LigerFusedLinearKLDivLoss)
from fastalign.integrations.liger_grpo import LigerFusedLinearGRPOLoss  # noqa: E402
from fastalign.integrations.liger_grpo_logits import triton_grpo_loss  # noqa: E402
from fastalign.integrations.liger_vocab_parallel import (  # noqa: E402
    LigerVocabParallelCrossEntropy, liger_fused_linear_scaled_cross_entropy_tp)
