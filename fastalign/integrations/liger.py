"""Liger-Kernel 0.8 adapters: its chunked fused-linear losses (``liger_kernel.chunked_loss``) with
the same constructors, ``forward`` signatures and return values, computed by fastalign from the
hidden states and the lm_head weight (never the ``[N, V]`` logits), and the losses of ``liger_kernel.transformers``
(the fused linear cross-entropy, JSD and KL divergence; on logits the cross-entropy, the cross-entropy with the
total variation distance and GRPO; the vocabulary-parallel cross-entropies). A user swaps the import::

    from fastalign.integrations.liger import LigerFusedLinearGRPOLoss   # was: from liger_kernel.chunked_loss import ...

Modules: :class:`LigerFusedLinearGRPOLoss`, :class:`LigerFusedLinearDPOLoss`,
:class:`LigerFusedLinearCPOLoss`, :class:`LigerFusedLinearORPOLoss`,
:class:`LigerFusedLinearSimPOLoss`, :class:`LigerFusedLinearKTOLoss`, the distillation losses
:class:`LigerFusedLinearJSDLoss`, :class:`LigerFusedLinearCosineSimilarityLoss`, :class:`LigerFusedLinearJSD` and
:class:`LigerFusedLinearKLDivLoss` (:mod:`fastalign.integrations.liger_distillation`) and the fused linear
cross-entropy :class:`LigerFusedLinearCrossEntropyLoss` and the cross-entropy on materialised logits
:class:`LigerCrossEntropyLoss` (:mod:`fastalign.integrations.liger_cross_entropy`), the per-token cross-entropy
and total variation distance on logits :class:`LigerFusedCETVDLoss`, GRPO on logits :func:`triton_grpo_loss`
(:mod:`fastalign.integrations.liger_grpo`), the vocabulary-parallel cross-entropy on logits
:class:`LigerVocabParallelCrossEntropy` and from a head's vocabulary shard
:func:`liger_fused_linear_scaled_cross_entropy_tp` (:mod:`fastalign.integrations.liger_vocab_parallel`).
Log-probs come from the head
in one pass with the loss when gradients are needed (GRPO: the single pass of
:class:`fastalign.LinearPolicyLoss`; the preference losses: :func:`fastalign.linear_step.separable_step`
over blocks of whole pairs, or KTO's responses; ORPO with ``nll_target`` and the rest: the two passes
of :func:`fastalign.linear_logprobs`), the losses from :func:`fastalign.policy_loss`,
:func:`fastalign.preference_loss` and :func:`fastalign.preference.unpaired_preference_loss`
(docs/math.md#policy-losses, docs/math.md#preference-losses). Gradients flow to the hidden
states, the weight and the bias.

GRPO (with ``l = lp - old``, ``rho = exp(l)`` or, at ``importance_sampling_level="sequence"``,
``exp(mean_m l)``, ``A`` the advantage, ``m`` the attention mask):

    ppo-clip (grpo, bnpo, dr_grpo, dapo, luspo): pg = -min(min(rho, delta) A, clip(rho, 1 - eps_low, 1 + eps_high) A)
    cispo: pg = -sg(min(rho, epsilon_high)) A lp      sapo: pg = -A (4/tau) σ(tau (rho - 1))
    vespo: pg = -sg(phi(w)) A lp, w = exp(sum_m l)    L = w_is pg + beta k3(ref, lp) (* rho with use_bias_correction_kl)

aggregated as grpo / sapo ``sum_i mean_m(L_i) / B``, bnpo ``sum_m L / sum m``, dr_grpo ``sum_m L /
(B max_completion_length)``, dapo / cispo / vespo ``sum_m L / (num_items_in_batch / world)`` (the
token count of the batch, summed over the processes, without ``num_items_in_batch``), luspo
``sum_i |y_i| L_i / B``. ``vllm_is_ratio`` is ``w_is`` (vespo folds it into its weight).
``forward`` returns ``(loss, metrics)``: ``metrics = (kl, clip_ratio)`` with ``beta != 0``, else
``(clip_ratio,)``, each a masked sum over the token count of the batch.

Where Liger's behaviour differs from TRL's, this module follows Liger:

* ``use_bias_correction_kl`` defaults to False (TRL: True); the KL has no clamp.
* luspo: Liger sums ``L * |y_i|`` over every position, padding included, and divides by ``B T``;
  with a per-sequence loss (``importance_sampling_level="sequence"``, ``beta=0``, no per-token
  ``vllm_is_ratio``) that is TRL's ``sum_i |y_i| L_i / B``, which fastalign computes; any other
  luspo setting raises ``ValueError``.
* the clip ratio counts ``rho < 1 - eps_low`` with ``A < 0`` or ``rho > 1 + eps_high`` with ``A > 0``
  (cispo: ``rho > epsilon_high`` with ``A > 0``; sapo, vespo: 0) per token, before ``delta``.

The ratio is ``exp(l)`` (or ``exp(mean_m l)``) with no clamp, as Liger's ``coef_1``
(``PolicyConfig.log_ratio_cap = inf``).

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
and do not change the result. A target equal to ``ignore_index`` (-100 for GRPO) under the GRPO
attention mask is dropped from the mask (Liger would score it as a log-prob of ``-logsumexp``).
An option that does not apply to the chosen loss raises ``ValueError`` naming it; every option is checked at
construction and at each assignment, so a value that fastalign's loss refuses (a negative ``beta``, CPO /
SimPO ``label_smoothing`` outside [0, 1], ...) raises there, naming it. ``beta = 0`` is computed as Liger
computes it (:class:`_LigerPreference`). A GRPO ``attention_mask`` with values other than 0 and 1 (Liger weighs
the tokens by it) raises ``ValueError`` naming it. ``loss_fn.single_pass = False`` takes the two passes through
the head, whose graph can be differentiated again after ``backward(retain_graph=True)``, as Liger's.

The option table and what raises: docs/integrations.md#liger-kernel. Nothing here imports Liger-Kernel.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign.integrations._dtypes import float64_as_float32
from fastalign.integrations._live_options import LiveOptions, SinglePassAttribute
from fastalign.integrations.trl.grpo import GRPO_LOSSES  # Liger's GRPO loss types are TRL's
from fastalign.kl import kl_penalty
from fastalign.linear import check_head, check_second_head, linear_logprobs
from fastalign.linear_policy import policy_step
from fastalign.linear_step import separable_step
from fastalign.policy import policy_loss
from fastalign.policy_config import PolicyConfig, log_ratio_cap_option
from fastalign.preference import check_config, preference_loss, unpaired_preference_loss

__all__ = ["LigerFusedLinearGRPOLoss", "LigerFusedLinearDPOLoss", "LigerFusedLinearCPOLoss",
           "LigerFusedLinearORPOLoss", "LigerFusedLinearSimPOLoss", "LigerFusedLinearKTOLoss",
           "LigerFusedLinearJSDLoss", "LigerFusedLinearCosineSimilarityLoss", "LigerFusedLinearJSD",
           "LigerFusedLinearKLDivLoss", "LigerFusedLinearCrossEntropyLoss", "LigerCrossEntropyLoss",
           "LigerFusedCETVDLoss", "LigerVocabParallelCrossEntropy", "liger_fused_linear_scaled_cross_entropy_tp",
           "triton_grpo_loss"]

_GRPO_IGNORE_INDEX = -100
_VESPO_LOG_MIN = math.log(1e-8)  # Liger's lower bound on vespo's log-weights


def _execution_options(compiled, chunk_size) -> None:
    if not isinstance(compiled, bool):
        raise TypeError(f"compiled must be a bool, got {compiled!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def _check_heads(_input: Tensor, lin_weight: Tensor, bias: Optional[Tensor], labels_name: str, labels: Tensor,
                 ref_input: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                 ref_bias: Optional[Tensor] = None) -> None:
    """The policy head and its labels, and the reference head (when given) against it, named as Liger names them
    (a ``ValueError`` / ``TypeError``): hidden ``[..., H]`` with labels ``[...]``, the reference's hidden states of
    the same leading shape and its weight of the same vocabulary."""
    check_head(_input, lin_weight, bias, names=("_input", "lin_weight", "bias"))
    _validate.integer(labels_name, labels)
    lead = tuple(_input.shape[:-1])
    _validate.shape(labels_name, labels, lead, "_input.shape[:-1]")
    _validate.same_device(_input=_input, lin_weight=lin_weight, bias=bias, **{labels_name: labels})
    if ref_input is None or ref_weight is None:
        return
    check_second_head(_input, lin_weight, ref_input, ref_weight, ref_bias, ("_input", "lin_weight"),
                      ("ref_input", "ref_weight", "ref_bias"))
    _validate.same_device(_input=_input, ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)


def _number_or_tensor(name: str, value, *, shapes, what: str, device=None, kind: str = "real") -> None:
    """A forward argument that Liger takes as a real number (not a bool) or a tensor (``kind``, a key of
    ``fastalign._validate.KINDS``) of one of ``shapes`` (on ``device``, when given: the device of ``_input``);
    anything else is a ``TypeError`` naming it."""
    if isinstance(value, Tensor):
        _validate.like(shapes, what, device=device, device_of="_input", kind=kind, **{name: value})
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a tensor, got {type(value).__name__}")


def _binary_mask(name: str, mask: Tensor) -> Optional[Tensor]:
    """Liger multiplies each token's terms by the GRPO mask (``name``) and divides by its sum, so a fractional mask
    weighs the tokens; fastalign's policy loss counts a token or not. A mask with values other than 0 and 1 is a
    ``ValueError`` naming it where the values are on the host (an eager CPU tensor); elsewhere they are not read
    and the returned flag makes the loss NaN (:func:`fastalign._validate.zero_one`)."""
    return _validate.zero_one(name, mask, "hold 0 and 1 only (Liger would weigh the tokens by a fractional mask; "
                              "fastalign counts a token or not)")


def _not_default(owner: str, loss_type: str, **given) -> None:
    """Options given a non-default value that ``loss_type`` does not read: ``name=(value, default)``."""
    for name, (value, default) in given.items():
        if value != default:
            raise ValueError(f"{name} does not apply to {owner} loss_type {loss_type!r}")


# ------------------------------------------------------------------------------------------------------------ GRPO
class _GRPOSetup(NamedTuple):
    """Liger's GRPO options, checked (:func:`_grpo_setup`), and what both of its GRPO losses (the chunked module and
    ``triton_grpo_loss`` on logits, :mod:`fastalign.integrations.liger_grpo`) read from them."""

    loss_type: str
    row: str  # the policy-loss row: ppo, cispo, sapo or vespo
    level: str  # importance_sampling_level
    beta: float
    eps: tuple  # (low, high) clip bounds as given (cispo: high is the ratio's cap)
    kl: bool  # the KL term is in the loss (beta != 0 with a reference)
    bias_kl: bool  # use_bias_correction_kl
    per_token_count: bool  # dapo / cispo / vespo divide by the batch's token count (num_items_in_batch)
    config: PolicyConfig


def _grpo_setup(options: dict, eps_names: tuple, eps_high_default: float, *, kl: bool = True) -> _GRPOSetup:
    """Check Liger's GRPO options (``options``: their values by Liger's names; the two clip bounds under
    ``eps_names``, the upper one's default ``eps_high_default``; ``kl``: a reference exists, without which Liger's
    KL is against ``lp`` itself: 0, with a zero gradient) and build the
    :class:`~fastalign.PolicyConfig` of the loss. An option the loss type does not read, given a value other
    than its default, raises ``ValueError`` naming it; so does a sequence-level ratio with cispo / sapo / vespo.
    dr_grpo divides by ``max_completion_length`` when given, else by the padded length."""
    beta = _validate.finite_number("beta", options["beta"])
    eps_low, eps_high = (_validate.finite_number(name, options[name]) for name in eps_names)
    for name, eps in zip(eps_names, (eps_low, eps_high)):
        if not eps >= 0:
            raise ValueError(f"{name} must be >= 0, got {eps}")
    for name in ("temperature", "sapo_temperature_pos", "sapo_temperature_neg"):
        _validate.positive(name, options[name])
    vespo = tuple(_validate.finite_number(name, options[name])
                  for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"))
    bias_kl = _validate.boolean("use_bias_correction_kl", options["use_bias_correction_kl"])
    loss_type, level, delta = options["loss_type"], options["importance_sampling_level"], options["delta"]
    max_len = options["max_completion_length"]
    if max_len is not None:
        _validate.at_least("max_completion_length", max_len, 1)
    if delta is not None:
        _validate.positive("delta", delta)
    if not isinstance(loss_type, str) or loss_type not in GRPO_LOSSES:
        raise ValueError(f"loss_type must be one of {tuple(GRPO_LOSSES)}, got {loss_type!r}")
    row, agg, seq_count, per_token_count = GRPO_LOSSES[loss_type]
    sapo_tau = (options["sapo_temperature_pos"], options["sapo_temperature_neg"])
    _not_default("GRPO", loss_type, **({} if row == "sapo" else dict(
        sapo_temperature_pos=(sapo_tau[0], 1.0), sapo_temperature_neg=(sapo_tau[1], 1.05))))
    _not_default("GRPO", loss_type, **({} if row == "vespo" else dict(
        vespo_k_pos=(vespo[0], 2.0), vespo_lambda_pos=(vespo[1], 3.0), vespo_k_neg=(vespo[2], 3.0),
        vespo_lambda_neg=(vespo[3], 2.0))))
    _not_default("GRPO", loss_type, **({} if row == "ppo" else dict(delta=(delta, None))))
    _not_default("GRPO", loss_type, **({} if row in ("ppo", "cispo") else {eps_names[1]: (eps_high, eps_high_default)}))
    _not_default("GRPO", loss_type, **({} if row == "ppo" else {eps_names[0]: (eps_low, 0.2)}))
    if level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}")
    if level == "sequence" and row != "ppo":
        raise ValueError(f"importance_sampling_level='sequence' is not supported for loss_type {loss_type!r}")
    opts: dict = dict(loss_type=row, agg=agg, seq_count=seq_count, importance_sampling_level=level)
    if row == "ppo":
        opts.update(eps_low=eps_low, eps_high=eps_high)
        if delta is not None:
            opts["delta"] = float(delta)
    if loss_type == "dr_grpo" and max_len is not None:
        opts["max_len"] = int(max_len)
    if row == "cispo":
        opts["cispo_bounds"] = (0.0, eps_high)  # an absolute cap, no lower bound
    if row == "sapo":
        opts["sapo_tau"] = tuple(float(t) for t in sapo_tau)
    if row == "vespo":
        opts.update(vespo_k=(vespo[0], vespo[2]), vespo_lambda=(vespo[1], vespo[3]))
    kl = kl and beta != 0.0
    if kl:  # k3 without a clamp, times the ratio with its gradient when bias-corrected
        opts.update(kl_coef=beta, kl_type="k3", kl_clamp=False, kl_rho="grad" if bias_kl else False)
    opts.update(log_ratio_cap_option(row, opts.get("kl_rho", False), math.inf))  # Liger's ratio has no clamp
    return _GRPOSetup(loss_type, row, level, beta, (eps_low, eps_high), kl, bias_kl, per_token_count,
                     PolicyConfig.make(**opts))


def _grpo_inputs(B: int, T: int, shape_of: str, device, device_of: str, *, mask: tuple, logps: dict,
                 advantages: Tensor, vllm_is_ratio: Optional[Tensor]) -> tuple:
    """The per-sequence and per-token inputs of a GRPO call, checked under Liger's names (a ``TypeError`` /
    ``ValueError`` naming the argument): ``mask = (name, tensor)`` ``[B, T]`` real (required), ``logps`` (name:
    tensor or None) ``[B, T]`` float, ``advantages [B]`` float, ``vllm_is_ratio [B]``, ``[B, 1]`` or ``[B, T]``,
    all on ``device``. Returns ``(*logps, advantages, vllm_is_ratio)`` with float64 as float32, as Liger casts
    them."""
    dev = dict(device=device, device_of=device_of)
    _validate.like((B, T), shape_of, required=True, kind="real", **dev, **{mask[0]: mask[1]})
    _validate.like((B, T), shape_of, **dev, **logps)
    _validate.like((B,), "one per sequence", required=True, **dev, advantages=advantages)
    _validate.like([(B,), (B, 1), (B, T)], "one per sequence or per token", **dev, vllm_is_ratio=vllm_is_ratio)
    return tuple(map(float64_as_float32, (*logps.values(), advantages, vllm_is_ratio)))


def _num_items(num_items_in_batch, setup: _GRPOSetup) -> None:
    """``num_items_in_batch``: None, or a finite count (a number or a one-element tensor) for the loss types that
    divide by the batch's token count; anything else raises, naming it."""
    if num_items_in_batch is None:
        return
    _number_or_tensor("num_items_in_batch", num_items_in_batch, shapes=[(), (1,)], what="a count")
    n = torch.as_tensor(num_items_in_batch).detach()
    _validate.flag_or_raise(~torch.isfinite(n).all(), n,
                            lambda: f"num_items_in_batch must be finite, got {n.reshape(-1).tolist()}")
    if not setup.per_token_count:
        raise ValueError(f"num_items_in_batch does not apply to loss_type {setup.loss_type!r}")


def _token_count(mask: Tensor, num_items_in_batch):
    """(tokens of the whole batch, processes): ``num_items_in_batch`` or the mask summed over the processes,
    at least the number of processes. The loss is ``sum * processes / count``: Liger's ``sum / clamp(count /
    processes, min=1)``, also when the step scores fewer tokens than there are processes."""
    world = 1
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    if num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device)
    else:
        n = mask.sum().to(torch.float32)
        if world != 1:
            dist.all_reduce(n)
    return n.clamp(min=world), world


@torch.no_grad()
def _vespo_weight(config: PolicyConfig, lp: Tensor, old: Tensor, advantages: Tensor, mask: Tensor,
                  is_log_sum: Tensor) -> Tensor:
    """Liger's vespo weight ``phi(w) = exp(lambda + k log w - lambda w)`` per sequence, ``[B, 1]`` (its
    ``get_gamma_weights``): ``log w = clamp(sum_m clamp(l, -20, 20) + is_log_sum, log 1e-8, 20)``, the
    ``vllm_is_ratio`` term added before the one clamp of the sum; ``(k, lambda)`` of ``config`` by the sign of
    ``A``."""
    l = torch.where(mask, (lp.float() - old.float()).clamp(-20.0, 20.0), 0.0)  # a masked token is not read
    log_w = (l.sum(-1, keepdim=True) + is_log_sum).clamp(_VESPO_LOG_MIN, 20.0)
    positive = advantages.reshape(-1, 1) >= 0
    (k_pos, k_neg), (lambda_pos, lambda_neg) = config.vespo_k, config.vespo_lambda
    k = torch.where(positive, k_pos, k_neg)
    lam = torch.where(positive, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def _is_log_sum(vllm_is_ratio: Tensor) -> Tensor:
    """Liger's ``sum_t clamp(log r_t, log 1e-8, 20)`` of ``vllm_is_ratio`` per sequence, ``[B, 1]``, over every
    position (padding included), in the ratio's dtype: the part of vespo's log-weight the ratio brings."""
    B = vllm_is_ratio.shape[0]
    return vllm_is_ratio.reshape(B, -1).log().clamp(_VESPO_LOG_MIN, 20.0).sum(-1, True).float()


def _grpo_loss(setup: _GRPOSetup, advantages: Tensor, mask: Tensor, ref: Optional[Tensor],
               vllm_is_ratio: Optional[Tensor], num_items_in_batch, seq_weights: Optional[Tensor] = None):
    """``(config, loss)``: ``loss(lp, old)`` is Liger's GRPO loss of the token log-probs ``lp [B, T]``, the pair
    ``(loss, metrics)`` of :func:`fastalign.policy_loss` (``mask``: bool, the scored tokens; ``ref``: the reference
    log-probs of the KL term, None without it); ``config`` the :class:`~fastalign.PolicyConfig` it runs.
    ``vllm_is_ratio`` weighs the policy term (vespo: it enters the sequence weight ``phi``, computed here as Liger
    does, beside which the reinforce row ``-phi A lp`` is vespo's); ``seq_weights`` (``[B, 1]``, not vespo) weighs
    it too."""
    kw: dict = {}
    cfg = setup.config
    if setup.per_token_count:
        kw["global_tokens"], world = _token_count(mask, num_items_in_batch)
        if world != 1:
            cfg = PolicyConfig.make(cfg, dp_size=world)
    is_log_sum = None
    if vllm_is_ratio is not None and setup.row == "vespo":  # the ratio enters the sequence weight phi
        is_log_sum = _is_log_sum(vllm_is_ratio)
        cfg = PolicyConfig.make(cfg, loss_type="reinforce", vespo_k=None, vespo_lambda=None)
    weights = vllm_is_ratio if is_log_sum is None else None
    if seq_weights is not None:
        weights = seq_weights if weights is None else seq_weights * weights.reshape(weights.shape[0], -1)
    if weights is not None:
        kw["importance_weights"] = weights

    def loss(lp: Tensor, old: Tensor) -> Tensor:
        phi = {} if is_log_sum is None else dict(  # vespo as -phi A lp: the reinforce row weighed by Liger's phi
            importance_weights=_vespo_weight(setup.config, lp, old, advantages, mask, is_log_sum))
        return policy_loss(lp, old, advantages, mask, ref_logprobs=ref, config=cfg, **kw, **phi)

    return cfg, loss


def _log_ratio(lp: Tensor, old: Tensor, mask: Tensor, level: str) -> Tensor:
    """``l = lp - old`` per token ``[B, T]`` (0 where ``mask`` is False: those values are not read), or at
    ``level="sequence"`` its mean over each sequence's scored tokens ``[B, 1]``; fp32, differentiable."""
    l = torch.where(mask, lp.float() - old.float(), 0.0)
    if level == "sequence":
        l = l.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return l


@torch.no_grad()
def _grpo_token_stats(setup: _GRPOSetup, lp: Tensor, old: Tensor, ref: Optional[Tensor], advantages: Tensor,
                      mask: Tensor) -> tuple:
    """``(kl, clipped)`` per token ``[B, T]``, fp32, 0 where ``mask`` is False: Liger's KL (k3 of ``ref`` and
    ``lp``, 0 without ``ref``, times the ratio with ``use_bias_correction_kl``; None at ``beta = 0``) and its clip
    flag (ppo rows: ``rho < 1 - eps_low`` with ``A < 0`` or ``rho > 1 + eps_high`` with ``A > 0``, before
    ``delta``; cispo: ``rho > eps_high`` with ``A > 0``; sapo, vespo: 0); ``rho`` the token's or the sequence's
    ratio."""
    lp = lp.detach().float()
    rho = _log_ratio(lp, old, mask, setup.level).exp()
    kl = None
    if setup.beta != 0.0:
        kl = torch.zeros_like(lp)
        if ref is not None:
            kl = kl_penalty(lp, torch.where(mask, ref.float(), lp), "k3", clamp=False)
        if setup.bias_kl:
            kl = kl * rho
        kl = torch.where(mask, kl, 0.0)
    a = advantages.float().reshape(-1, 1)
    eps_low, eps_high = setup.eps
    if setup.row == "ppo":
        clipped = ((rho < 1.0 - eps_low) & (a < 0)) | ((rho > 1.0 + eps_high) & (a > 0))
    elif setup.row == "cispo":
        clipped = (rho > eps_high) & (a > 0)
    else:  # sapo, vespo have no clip
        clipped = torch.zeros_like(rho, dtype=torch.bool)
    return kl, (clipped & mask).to(torch.float32)


def _grpo_metrics(setup: _GRPOSetup, lp: Tensor, old: Tensor, ref: Optional[Tensor], advantages: Tensor,
                  mask: Tensor) -> tuple:
    """Liger's GRPO metrics, ``(kl, clip_ratio)`` with ``beta != 0``, else ``(clip_ratio,)``: the masked sums of
    :func:`_grpo_token_stats` over the token count of the batch (at least 1)."""
    kl, clipped = _grpo_token_stats(setup, lp, old, ref, advantages, mask)
    n = mask.sum().to(torch.float32).clamp(min=1.0)
    return tuple(x.sum() / n for x in (kl, clipped) if x is not None)


class LigerFusedLinearGRPOLoss(SinglePassAttribute, LiveOptions, nn.Module):
    """Liger's ``LigerFusedLinearGRPOLoss`` computed by :func:`fastalign.linear_logprobs` and
    :func:`fastalign.policy_loss` (formulas in the module docstring and docs/integrations.md). Its options are
    attributes, read at each call as Liger reads them (an assignment takes effect at the next call);
    ``single_pass``: :class:`~fastalign.integrations._live_options.SinglePassAttribute`."""

    OPTIONS = ("beta", "compiled", "use_ref_model", "chunk_size", "epsilon_low", "epsilon_high", "loss_type",
               "max_completion_length", "importance_sampling_level", "sapo_temperature_pos", "sapo_temperature_neg",
               "temperature", "delta", "use_bias_correction_kl", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
               "vespo_lambda_neg")

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True, chunk_size: int = 1,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
                 max_completion_length: Optional[int] = None, importance_sampling_level: str = "token",
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: Optional[float] = None, use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0,
                 vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0):
        super().__init__()
        self._configure_options(locals())

    def _configure(self) -> None:
        """Check the options and build the :class:`~fastalign.PolicyConfig` of the call (:func:`_grpo_setup`);
        dr_grpo needs ``max_completion_length`` and luspo a sequence-level ratio without the KL (module doc)."""
        _execution_options(self.compiled, self.chunk_size)
        _validate.boolean("use_ref_model", self.use_ref_model)
        setup = _grpo_setup({name: getattr(self, name) for name in self.OPTIONS}, ("epsilon_low", "epsilon_high"),
                            0.2, kl=self.use_ref_model)
        if setup.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("max_completion_length must be given for loss_type 'dr_grpo'")
        if setup.loss_type == "luspo" and (setup.level != "sequence" or setup.beta != 0.0):
            raise ValueError("loss_type 'luspo' is supported with importance_sampling_level='sequence' and beta=0 "
                             "(Liger's luspo otherwise sums the padding positions too)")
        self._setup, self.config = setup, setup.config

    def forward(self, _input: Tensor, lin_weight: Tensor, selected_token_ids: Tensor, attention_mask: Tensor,
                advantages: Tensor, bias: Optional[Tensor] = None, ref_per_token_logps: Optional[Tensor] = None,
                old_per_token_logps: Optional[Tensor] = None, ref_input: Optional[Tensor] = None,
                ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                vllm_is_ratio: Optional[Tensor] = None, num_items_in_batch=None):
        """``(loss, (kl, clip_ratio))`` with ``beta != 0``, else ``(loss, (clip_ratio,))``."""
        _check_heads(_input, lin_weight, bias, "selected_token_ids", selected_token_ids, ref_input, ref_weight,
                     ref_bias)
        if selected_token_ids.dim() != 2:
            raise ValueError(f"selected_token_ids must be [B, T], got shape {tuple(selected_token_ids.shape)}")
        B, T = selected_token_ids.shape
        old_per_token_logps, ref_per_token_logps, advantages, vllm_is_ratio = _grpo_inputs(
            B, T, "selected_token_ids.shape", _input.device, "_input", mask=("attention_mask", attention_mask),
            logps=dict(old_per_token_logps=old_per_token_logps, ref_per_token_logps=ref_per_token_logps),
            advantages=advantages, vllm_is_ratio=vllm_is_ratio)
        if self.use_ref_model:
            if ref_per_token_logps is None and (ref_input is None or ref_weight is None):
                raise ValueError("use_ref_model=True needs ref_per_token_logps, or ref_input and ref_weight")
        elif any(t is not None for t in (ref_per_token_logps, ref_input, ref_weight, ref_bias)):
            raise ValueError("ref_per_token_logps / ref_input / ref_weight / ref_bias are not used with "
                             "use_ref_model=False")
        if vllm_is_ratio is not None and self.loss_type == "luspo" and vllm_is_ratio.dim() == 2 \
                and vllm_is_ratio.shape[1] != 1:
            raise ValueError("a per-token vllm_is_ratio is not supported with loss_type 'luspo'")
        setup = self._setup
        _num_items(num_items_in_batch, setup)
        fractional = _binary_mask("attention_mask", attention_mask)
        labels = selected_token_ids
        mask = attention_mask.bool() & (labels != _GRPO_IGNORE_INDEX)
        scored = labels.masked_fill(~mask, _GRPO_IGNORE_INDEX)  # unscored positions skip the vocabulary
        ref = None
        if setup.kl:
            if ref_per_token_logps is not None:
                ref = ref_per_token_logps
            else:
                with torch.no_grad():
                    ref = linear_logprobs(ref_input, ref_weight, scored, bias=ref_bias,
                                          temperature=self.temperature).logprobs
        cfg, grpo_loss = _grpo_loss(setup, advantages, mask, ref, vllm_is_ratio, num_items_in_batch)

        # the single pass through the head when gradients are needed (every Liger GRPO loss is separable)
        loss, _, lp, _ = policy_step(_input, lin_weight, scored, old_per_token_logps,
                                     lambda lp, old, _entropy: grpo_loss(lp, old), bias=bias,
                                     single_pass=self.single_pass, token_separable=cfg.token_separable,
                                     logit=dict(temperature=self.temperature))
        loss = _validate.nan_if(fractional, loss)  # a fractional mask not read: NaN, not a binarised mask's loss
        old = lp if old_per_token_logps is None else old_per_token_logps
        return loss, _grpo_metrics(setup, lp, old, ref, advantages, mask)


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
        _execution_options(self.compiled, self.chunk_size)
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
            return value, logps, count, nll, aux

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
        _check_heads(hidden, weight, bias, "target", target, ref_input, ref_weight, ref_bias)
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
        _not_default("DPO", loss_type, **({} if loss_type in ("robust", "exo_pair") else dict(
            label_smoothing=(label_smoothing, 0.0))))
        _not_default("DPO", loss_type, **({} if loss_type == "discopop" else dict(
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
        _check_heads(_input, lin_weight, bias, "target", target, ref_input, ref_weight, ref_bias)
        N = target.shape[0]
        _validate.tensor("preference_labels", preference_labels, dim=1)
        if preference_labels.dtype != torch.bool:
            raise TypeError(f"preference_labels must be a bool tensor, got {preference_labels.dtype}")
        dev = dict(device=_input.device, device_of="_input")
        _validate.like((N,), "one per response (target.shape[0])", kind="real", **dev,
                       preference_labels=preference_labels)
        if kl is not None:
            _number_or_tensor("kl", kl, shapes=[(), (1,), (N,)], what="a scalar or one per response",
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


# the losses of liger_kernel.transformers live in their own modules (GRPO on logits calls the GRPO functions above)
from fastalign.integrations.liger_cross_entropy import (  # noqa: E402
    LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss)
from fastalign.integrations.liger_distillation import (  # noqa: E402
    LigerFusedCETVDLoss, LigerFusedLinearCosineSimilarityLoss, LigerFusedLinearJSD, LigerFusedLinearJSDLoss,
    LigerFusedLinearKLDivLoss)
from fastalign.integrations.liger_grpo import triton_grpo_loss  # noqa: E402
from fastalign.integrations.liger_vocab_parallel import (  # noqa: E402
    LigerVocabParallelCrossEntropy, liger_fused_linear_scaled_cross_entropy_tp)
