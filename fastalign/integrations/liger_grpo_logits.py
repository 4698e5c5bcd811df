"""Liger-Kernel 0.8's GRPO loss on materialised logits, ``liger_kernel.transformers.grpo_loss.triton_grpo_loss``:
the same signature, defaults and return values, computed by :func:`fastalign.token_logprobs` (the log-probs of the
completion tokens, one pass over each row of the logits, and a fused backward that writes d(logits)),
:func:`fastalign.policy_loss` (the loss, ``reduce=True``) and :func:`fastalign.kl_penalty`. A user swaps the
import::

    from fastalign.integrations.liger import triton_grpo_loss
    # was: from liger_kernel.transformers.grpo_loss import triton_grpo_loss

``logits`` are ``[B, L+1, V]``: position ``t < L`` scores ``completion_ids[:, t]`` (the last position is not
read, and its gradient is 0). With ``lp = log softmax(logits[:, t] / temperature)[completion_ids[:, t]]``, ``old``
= ``old_logp`` (``lp`` itself, detached, when None: a ratio of 1), ``l = lp - old``, ``rho = exp(l)`` per token or,
at ``importance_sampling_level="sequence"``, ``exp(mean_m l)`` per sequence (the gradient through that mean),
``A`` the sequence's advantage, ``m`` the completion mask, the per-token loss is::

    ppo-clip (grpo, bnpo, dr_grpo, dapo, luspo):
        pg = -min(min(rho, delta) A, clip(rho, 1 - eps_low, 1 + eps_high) A)
    cispo:  pg = -sg(min(rho, eps_high)) A lp           (eps_high is the ratio's cap, as Liger's)
    sapo:   pg = -A (4 / tau) sigmoid(tau (rho - 1)),   tau = sapo_temperature_pos if A > 0 else _neg
    vespo:  pg = -sg(phi) A lp,  phi = exp(lambda + k log w - lambda w),  (k, lambda) = vespo_*_pos if A >= 0
            else vespo_*_neg, log w = clamp(sum_m clamp(l, -20, 20) + sum_t clamp(log r_t, log 1e-8, 20),
            log 1e-8, 20) (the ``r`` sum over every position of ``vllm_is_ratio``, when given)
    L = r * pg + beta * KL,   KL = exp(ref - lp) - (ref - lp) - 1   (times rho, with its gradient, with
                                                                      use_bias_correction_kl)

``r`` is ``vllm_is_ratio`` (``[B, L]``, ``[B, 1]`` or ``[B]``; 1 without it and for vespo, which folds it into
``phi``); the KL term is there only with ``beta != 0`` (``ref_logp`` is required then, and not read otherwise).
The ratio has no clamp (``PolicyConfig.log_ratio_cap = inf``), as Liger's. The gradient is the derivative of
``L`` with ``sg`` detached (a clamp passes none where it binds, and at a tie of the two ppo terms the first is
taken), as :func:`fastalign.policy_loss`'s.

``reduce=False`` returns ``(per_token_loss, per_token_kl, is_clipped)``, each ``[B, L]`` fp32 and 0 where
``m = 0``: ``L`` (differentiable; the same formulas, in torch ops on ``lp``, since the fused loss returns its
aggregate only), the ``KL`` (times ``rho`` with ``use_bias_correction_kl``; None at ``beta = 0``) and the clip
flag (ppo rows: ``rho < 1 - eps_low`` with ``A < 0`` or ``rho > 1 + eps_high`` with ``A > 0``, before ``delta``;
cispo: ``rho > eps_high`` with ``A > 0``; sapo, vespo: 0), both detached. ``reduce=True`` returns ``(loss,
metrics)``, ``metrics = [kl_mean, clip_ratio]`` with ``beta != 0``, else ``[clip_ratio]`` (the masked means of
those two, over ``max(sum m, 1)``), the loss by :func:`fastalign.policy_loss`, aggregated as Liger's ``loss_type``:
grpo / sapo ``mean_i(sum_t m L / max(sum_t m, 1))`` over every sequence, bnpo ``sum m L / max(sum m, 1)``,
dr_grpo ``sum m L / (B max_completion_length)`` (the padded length ``L`` when None), dapo / cispo / vespo ``sum
m L / max(N / world, 1)`` (``N`` = ``num_items_in_batch``, else the token count of the batch summed over the
processes), luspo ``sum_i |y_i| sum_t m L / (B L)`` (``|y_i| = sum_t m``: Liger's mean over every position of
``L |y_i|``, whose padding positions are 0 here).

Where Liger's logits version differs from its chunked module (:class:`~fastalign.integrations.liger_grpo.
LigerFusedLinearGRPOLoss`), this function follows the logits version: ``eps_high`` defaults to 0.4 and
``temperature`` to 0.9; dr_grpo takes the padded length without ``max_completion_length``; it returns per-token
outputs by default (``reduce=False``); luspo's padding positions add 0, so every luspo setting with ``beta = 0``
is computed (with ``beta != 0`` and ``reduce=True`` it raises ``ValueError``: Liger's luspo weighs the KL by the
sequence length too, which :func:`fastalign.policy_loss` does not express); a token id outside ``[0, V)`` under
the mask is refused (Liger reads outside the row there; the chunked module drops an id of -100).

Two gradients of Liger's kernel are not the derivative of its own loss; fastalign's are (as Liger's chunked loss
and TRL's): with ``delta < 1 + eps_high``, a token of ``A < 0`` whose ratio lies in ``(delta, 1 + eps_high]``
has the value ``-A rho`` and the gradient ``-A rho`` (Liger's kernel: 0); token-level luspo with ``reduce=True``
weighs each token's gradient by its own sequence's ``|y_i| / (B L)`` (Liger's kernel reads that ``[B, 1]`` weight
with the strides of ``[B, L]``, so a token takes another sequence's).

``inplace=True`` (the default) writes d(logits) over ``logits`` when ``logits`` is an intermediate of the graph,
such as a model's output: the ``[B, L+1, V]`` gradient the graph receives is the logits' own buffer (its last
position zeroed), so none is allocated. Read the logits before the backward; a second backward through a retained
graph raises (torch's check of tensors modified in place). A leaf that requires grad (or a view of one) keeps its
values and gets a new gradient (Liger overwrites it too), as with ``inplace=False``.

Differences from Liger and what raises: options are checked before any work, and a bad one is a ``ValueError`` /
``TypeError`` naming it, as are tensors of the wrong shape, dtype or device, named as Liger names them (Liger
asserts, or reads out of bounds). An option the loss type does not read, given a value other than its default,
raises (sapo_temperature_* but sapo, vespo_* but vespo, delta and eps_low but the ppo rows, eps_high but the ppo
rows and cispo), as does a sequence-level ratio with cispo / sapo / vespo, ``num_items_in_batch`` with a loss type
that does not divide by it (or with ``reduce=False``), and ``beta != 0`` without ``ref_logp``. A completion mask
with values other than 0 and 1 raises where its values are on the host (Liger weighs the tokens by it), else makes
the outputs NaN; so does an id outside ``[0, V)`` under the mask. The logits may be fp32, bf16 or fp16 (the math
is fp32, the gradient in the logits' dtype; float64 logits are computed in fp32), with any strides but a
contiguous last dimension; ``completion_ids`` int64 or int32. A NaN on a scored token reaches the outputs; a
value where the mask is 0 is never read (but vespo's ``vllm_is_ratio``, summed over every position as Liger sums
it), where Liger's sequence ratio and vespo weight take a NaN ``old_logp`` there. Nothing synchronises with the
host (values are checked on the host only where they are there already, on the CPU). Nothing here imports
Liger-Kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.integrations._dtypes import float64_as_float32
from fastalign.integrations._liger_checks import binary_mask
from fastalign.integrations.liger_grpo import (_grpo_inputs, _grpo_loss, _grpo_metrics, _grpo_setup, _grpo_token_stats,
                                               _is_log_sum, _log_ratio, _num_items, _vespo_weight)
from fastalign.kl import kl_penalty
from fastalign.logprobs import overwritable, token_logprobs

__all__ = ["triton_grpo_loss"]

_UNSCORED = -100  # the label of the positions the mask drops: token_logprobs gives them 0 and no gradient


class _ScoredPositions(torch.autograd.Function):
    """``logits[:, :-1]`` whose gradient comes back as the ``[B, L+1, V]`` d(logits), 0 at the last position:
    the logits' own buffer when the gradient of the positions is that buffer (written over it by
    :func:`fastalign.token_logprobs` with ``inplace_backward``), else a new tensor. Without it autograd's slice
    would allocate a new ``[B, L+1, V]`` gradient beside the overwritten buffer."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        ctx.buffer = logits.detach()  # an alias of the buffer, not a saved tensor: the backward writes over it
        return logits[:, :-1]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        buffer = ctx.buffer
        del ctx.buffer  # no reference left behind: a leaf's AccumulateGrad may then keep the buffer as its .grad
        if grad.data_ptr() == buffer.data_ptr() and grad.stride() == buffer[:, :-1].stride():
            buffer[:, -1].zero_()
            return buffer
        out = torch.empty_like(buffer)
        out[:, :-1] = grad
        out[:, -1] = 0
        return out


def _per_token_loss(setup, lp: Tensor, old: Tensor, ref: Optional[Tensor], advantages: Tensor, mask: Tensor,
                    vllm_is_ratio: Optional[Tensor]) -> Tensor:
    """``L [B, L]`` of the module doc, fp32, 0 where ``mask`` is False, differentiable in ``lp`` as
    :func:`fastalign.policy_loss` is (cispo's cap and vespo's ``phi`` pass no gradient, nor a clamp where it
    binds)."""
    B = lp.shape[0]
    A = advantages.float().reshape(B, 1)
    rho = _log_ratio(lp, old, mask, setup.level).exp()
    eps_low, eps_high = setup.eps
    cfg = setup.config
    if setup.row == "ppo":
        unclipped = -A * (rho if cfg.delta is None else rho.clamp(max=cfg.delta))
        clipped = -A * rho.clamp(1.0 - eps_low, 1.0 + eps_high)
        pg = torch.where(clipped > unclipped, clipped, unclipped)  # as policy_loss: a tie takes the first
    elif setup.row == "cispo":
        pg = -rho.detach().clamp(max=eps_high) * A * lp
    elif setup.row == "sapo":
        tau = torch.where(A > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg)
        pg = -A * torch.sigmoid(tau * (rho - 1.0)) * 4.0 / tau
    else:  # vespo: vllm_is_ratio enters phi
        is_log_sum = lp.new_zeros(B, 1) if vllm_is_ratio is None else _is_log_sum(vllm_is_ratio)
        pg = -_vespo_weight(cfg, lp, old, advantages, mask, is_log_sum) * A * lp
        vllm_is_ratio = None
    if vllm_is_ratio is not None:
        pg = pg * torch.where(mask, vllm_is_ratio.reshape(B, -1).float(), 0.0)
    if setup.kl:
        kl = kl_penalty(lp, torch.where(mask, ref.float(), lp.detach()), "k3", kl_clamp=False)
        pg = pg + setup.beta * (kl * rho if setup.bias_kl else kl)
    return torch.where(mask, pg, 0.0)


def triton_grpo_loss(logits, old_logp, ref_logp, completion_ids, advantages, completion_mask=None, temperature=0.9,
                     beta=0.04, eps_low=0.2, eps_high=0.4, inplace=True, loss_type="dapo", max_completion_length=None,
                     importance_sampling_level="token", reduce=False, sapo_temperature_pos=1.0,
                     sapo_temperature_neg=1.05, vllm_is_ratio=None, delta=None, use_bias_correction_kl=False,
                     num_items_in_batch=None, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                     vespo_lambda_neg=2.0):
    """Liger's ``triton_grpo_loss`` (the module doc): ``logits [B, L+1, V]``, ``old_logp`` / ``ref_logp`` ``[B, L]``
    or None, ``completion_ids [B, L]``, ``advantages [B]`` (or ``[B, 1]``), ``completion_mask [B, L]`` or None
    (every token).

    Returns ``(per_token_loss, per_token_kl, is_clipped)`` (``[B, L]`` fp32; ``per_token_kl`` None at ``beta = 0``)
    with ``reduce=False``, ``(loss, metrics)`` with ``reduce=True``."""
    setup = _grpo_setup(dict(
        beta=beta, eps_low=eps_low, eps_high=eps_high, loss_type=loss_type,
        max_completion_length=max_completion_length, importance_sampling_level=importance_sampling_level,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg, temperature=temperature,
        delta=delta, use_bias_correction_kl=use_bias_correction_kl, vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg),
        ("eps_low", "eps_high"), 0.4)
    inplace = _validate.boolean("inplace", inplace)
    reduce = _validate.boolean("reduce", reduce)
    if reduce and setup.loss_type == "luspo" and setup.beta != 0.0:
        raise ValueError("loss_type 'luspo' with reduce=True is supported with beta=0 (Liger's luspo weighs the KL "
                         "term by the sequence length too)")
    if num_items_in_batch is not None and not reduce:
        raise ValueError("num_items_in_batch applies only with reduce=True (the per-token outputs are not divided)")

    logits = float64_as_float32(logits)
    _validate.floating("logits", logits, dim=3)
    _validate.integer("completion_ids", completion_ids, dim=2)
    B, L = completion_ids.shape
    if logits.shape[0] != B or logits.shape[1] != L + 1 or logits.shape[2] == 0:
        raise ValueError(f"logits must have shape ({B}, {L + 1}, V) with V >= 1 (completion_ids is ({B}, {L}): one "
                         f"more position than completion tokens), got {tuple(logits.shape)}")
    _validate.same_device(logits=logits, completion_ids=completion_ids)
    mask_given = completion_mask is not None
    if not mask_given:
        completion_mask = torch.ones(B, L, dtype=torch.bool, device=logits.device)
    old, ref, advantages, vllm_is_ratio = _grpo_inputs(
        B, L, "completion_ids.shape", logits.device, "logits", mask=("completion_mask", completion_mask),
        logps=dict(old_logp=old_logp, ref_logp=ref_logp), advantages=advantages, vllm_is_ratio=vllm_is_ratio)
    if setup.kl and ref is None:
        raise ValueError(f"ref_logp is required with beta != 0 (the KL term's reference), got beta={setup.beta}")
    _num_items(num_items_in_batch, setup)

    V = logits.shape[2]
    mask = completion_mask.bool()
    flags = [binary_mask("completion_mask", completion_mask) if mask_given else None,
             _validate.flag_or_raise((mask & ((completion_ids < 0) | (completion_ids >= V))).any(), completion_ids,
                                     lambda: f"completion_ids must lie in [0, {V}) where completion_mask is not 0")]
    labels = completion_ids.masked_fill(~mask, _UNSCORED)  # unscored positions skip the vocabulary
    in_place = inplace and overwritable(logits)
    scored = _ScoredPositions.apply(logits) if in_place else logits[:, :-1]
    lp = token_logprobs(scored, labels, temperature=temperature, ignore_index=_UNSCORED,
                        inplace_backward=in_place).logprobs
    old = lp.detach() if old is None else old
    ref = ref if setup.kl else None

    def refused(t: Optional[Tensor]) -> Optional[Tensor]:  # NaN where a value could not be refused on the host
        for flag in flags:
            t = t if t is None else _validate.nan_if(flag, t)
        return t

    if reduce:
        luspo = mask.sum(-1, keepdim=True).to(torch.float32) / max(L, 1) if setup.loss_type == "luspo" else None
        _, loss = _grpo_loss(setup, advantages, mask, ref, vllm_is_ratio, num_items_in_batch, luspo)
        metrics = _grpo_metrics(setup, lp, old, ref, advantages, mask)
        return refused(loss(lp, old)[0]), [refused(m) for m in metrics]
    kl, clipped = _grpo_token_stats(setup, lp, old, ref, advantages, mask)
    per_token = _per_token_loss(setup, lp, old, ref, advantages, mask, vllm_is_ratio)
    return refused(per_token), refused(kl), refused(clipped)

