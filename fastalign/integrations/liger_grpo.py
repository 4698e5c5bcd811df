"""Liger-Kernel 0.8's chunked GRPO loss, ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss``, from the hidden
states and the lm_head weight (never the ``[N, V]`` logits), and the option mapping and metrics that it shares with
Liger's GRPO loss on logits (:func:`fastalign.integrations.liger_grpo_logits.triton_grpo_loss`). Re-exported by
:mod:`fastalign.integrations.liger`::

    from fastalign.integrations.liger import LigerFusedLinearGRPOLoss   # was: from liger_kernel.chunked_loss import ...

Log-probs come from the head in one pass with the loss when gradients are needed (the single pass of
:class:`fastalign.LinearPolicyLoss`), the loss from :func:`fastalign.policy_loss` (docs/math.md#policy-losses).

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

``compiled`` and ``chunk_size`` choose how Liger runs, not what it computes: they are accepted and do not change the
result. A target equal to ``ignore_index`` (-100) under the attention mask is dropped from the mask (Liger would
score it as a log-prob of ``-logsumexp``). An ``attention_mask`` with values other than 0 and 1 (Liger weighs the
tokens by it) raises ``ValueError`` naming it. The option table and what raises: docs/integrations.md#liger-kernel.
Nothing here imports Liger-Kernel.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from fastalign import _validate
from fastalign.integrations._dtypes import float64_as_float32
from fastalign.integrations._liger_checks import (binary_mask, check_heads, execution_options, not_default,
                                                  number_or_tensor)
from fastalign.integrations._live_options import LiveOptions, SinglePassAttribute
from fastalign.integrations.trl.grpo import GRPO_LOSSES  # Liger's GRPO loss types are TRL's
from fastalign.kl import kl_penalty
from fastalign.linear import linear_logprobs
from fastalign.linear_policy import policy_step
from fastalign.policy import policy_loss
from fastalign.policy_config import PolicyConfig, log_ratio_cap_option

__all__ = ["LigerFusedLinearGRPOLoss"]

_GRPO_IGNORE_INDEX = -100
_VESPO_LOG_MIN = math.log(1e-8)  # Liger's lower bound on vespo's log-weights


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
    not_default("GRPO", loss_type, **({} if row == "sapo" else dict(
        sapo_temperature_pos=(sapo_tau[0], 1.0), sapo_temperature_neg=(sapo_tau[1], 1.05))))
    not_default("GRPO", loss_type, **({} if row == "vespo" else dict(
        vespo_k_pos=(vespo[0], 2.0), vespo_lambda_pos=(vespo[1], 3.0), vespo_k_neg=(vespo[2], 3.0),
        vespo_lambda_neg=(vespo[3], 2.0))))
    not_default("GRPO", loss_type, **({} if row == "ppo" else dict(delta=(delta, None))))
    not_default("GRPO", loss_type, **({} if row in ("ppo", "cispo") else {eps_names[1]: (eps_high, eps_high_default)}))
    not_default("GRPO", loss_type, **({} if row == "ppo" else {eps_names[0]: (eps_low, 0.2)}))
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
        opts.update(cispo_low=0.0, cispo_high=eps_high)  # an absolute cap, no lower bound
    if row == "sapo":
        opts.update(sapo_tau_pos=float(sapo_tau[0]), sapo_tau_neg=float(sapo_tau[1]))
    if row == "vespo":
        opts.update(vespo_k_pos=vespo[0], vespo_lambda_pos=vespo[1], vespo_k_neg=vespo[2], vespo_lambda_neg=vespo[3])
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
    tensor or None) ``[B, T]`` float, ``advantages [B]`` (or ``[B, 1]``, taken as ``[B]`` as Liger reads it)
    float, ``vllm_is_ratio [B]``, ``[B, 1]`` or ``[B, T]``, all on ``device``. Returns ``(*logps, advantages,
    vllm_is_ratio)`` with float64 as float32, as Liger casts them."""
    dev = dict(device=device, device_of=device_of)
    _validate.like((B, T), shape_of, required=True, kind="real", **dev, **{mask[0]: mask[1]})
    _validate.like((B, T), shape_of, **dev, **logps)
    _validate.like([(B,), (B, 1)], "one per sequence", required=True, **dev, advantages=advantages)
    advantages = advantages.reshape(B)
    _validate.like([(B,), (B, 1), (B, T)], "one per sequence or per token", **dev, vllm_is_ratio=vllm_is_ratio)
    return tuple(map(float64_as_float32, (*logps.values(), advantages, vllm_is_ratio)))


def _in_dtype_of(weight: Optional[Tensor], hidden: Optional[Tensor]) -> Optional[Tensor]:
    """``weight`` cast (differentiably) to the float dtype of ``hidden``, as Liger's GRPO casts each chunk of it;
    anything else as it is (the checks name it)."""
    if weight is None or hidden is None or not (weight.is_floating_point() and hidden.is_floating_point()):
        return weight
    return weight.to(hidden.dtype)


def _num_items(num_items_in_batch, setup: _GRPOSetup) -> None:
    """``num_items_in_batch``: None, or a finite count (a number or a one-element tensor) for the loss types that
    divide by the batch's token count; anything else raises, naming it."""
    if num_items_in_batch is None:
        return
    number_or_tensor("num_items_in_batch", num_items_in_batch, shapes=[(), (1,)], what="a count")
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
    k = torch.where(positive, config.vespo_k_pos, config.vespo_k_neg)
    lam = torch.where(positive, config.vespo_lambda_pos, config.vespo_lambda_neg).clamp(min=1e-4)
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
        cfg = PolicyConfig.make(cfg, loss_type="reinforce", vespo_k_pos=None, vespo_k_neg=None, vespo_lambda_pos=None,
                                vespo_lambda_neg=None)
    weights = vllm_is_ratio if is_log_sum is None else None
    if seq_weights is not None:
        weights = seq_weights if weights is None else seq_weights * weights.reshape(weights.shape[0], -1)
    if weights is not None:
        kw["importance_weights"] = weights

    def loss(lp: Tensor, old: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
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
            kl = kl_penalty(lp, torch.where(mask, ref.float(), lp), "k3", kl_clamp=False)
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
        execution_options(self.compiled, self.chunk_size)
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
        """``(loss, (kl, clip_ratio))`` with ``beta != 0``, else ``(loss, (clip_ratio,))``. A weight of another float
        dtype than its hidden states is computed in theirs, as Liger casts it (its gradient in its own dtype)."""
        lin_weight, ref_weight = _in_dtype_of(lin_weight, _input), _in_dtype_of(ref_weight, ref_input)
        check_heads(_input, lin_weight, bias, "selected_token_ids", selected_token_ids, ref_input, ref_weight,
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
            if ref_per_token_logps is not None and ref_input is not None:  # as Liger: the log-probs win
                warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.",
                              stacklevel=2)
        elif any(t is not None for t in (ref_per_token_logps, ref_input, ref_weight, ref_bias)):
            raise ValueError("ref_per_token_logps / ref_input / ref_weight / ref_bias are not used with "
                             "use_ref_model=False")
        if vllm_is_ratio is not None and self.loss_type == "luspo" and vllm_is_ratio.dim() == 2 \
                and vllm_is_ratio.shape[1] != 1:
            raise ValueError("a per-token vllm_is_ratio is not supported with loss_type 'luspo'")
        setup = self._setup
        _num_items(num_items_in_batch, setup)
        fractional = binary_mask("attention_mask", attention_mask)
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
