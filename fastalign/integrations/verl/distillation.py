r"""fastalign's top-k forward KL for verl 0.9.1's on-policy distillation on its FSDP engines::

    distillation.distillation_loss.loss_mode=fastalign_forward_kl_topk

verl's ``forward_kl_topk`` compares the student with the teacher's top-k log-probs ``t [N, K]`` at the teacher's
ids in its engine's logits processor, from the student's logits ``z [1, N, V]``: by default through their
log-softmax, a ``[N, V]`` copy kept for the backward, which allocates two more (``use_chunked_topk`` trades that
memory for time). :func:`forward_kl_topk` computes the same outputs, per token

    q_k  = z[ids_k] - lse(z)                                       (fp32)
    loss = sum_k exp(t_k) (t_k - q_k)      (t, q clamped below at log_prob_min_clamp)
    d(z) = sum_k g_k onehot(ids_k) - (sum_k g_k) softmax(z)        (g_k = d(loss)/d(q_k))

with ``lse`` from :func:`fastalign.token_logprobs` (one pass over each row, no copy of the logits), whose fused
backward writes ``d(z)`` once (in fp32, rounded to the logits' dtype once): one ``[N, V]`` buffer, the gradient
itself, beside the logits, without the time of verl's chunked path. Its other outputs are verl's: the student's and the
teacher's top-k mass, and the overlap of the teacher's ids with the student's top k (``torch.topk`` of the
logits) with the mean KL term over the overlapped ids. ``q`` is fp32 where verl rounds it to the logits' dtype;
``use_chunked_topk`` and ``chunked_topk_chunk_size`` change nothing here (the path is always the lean one).

The mode is registered beside verl's own when verl imports its distillation losses, with verl's
``forward_kl_topk`` function for the final loss and its metrics (it reads what the logits processor returned);
verl's ``compute_topk_loss`` runs :func:`forward_kl_topk` for this mode on the ``fsdp``, ``fsdp2`` and
``veomni`` strategies, and raises ``NotImplementedError`` on Megatron's tensor-parallel logits (use
``forward_kl_topk`` there, or ``FASTALIGN_VERL_MEGATRON=1``, which fuses the log-probs beside it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign.integrations.verl._names import PREFIX
from fastalign.integrations.verl._on_import import patch_modules
from fastalign.logprobs import token_logprobs

__all__ = ["MODE", "forward_kl_topk", "enable"]

#: The ``distillation_loss.loss_mode`` that selects :func:`forward_kl_topk`.
MODE = PREFIX + "forward_kl_topk"
_LOSSES_MODULE = "verl.trainer.distillation.losses"


class _SupportLogprobs(torch.autograd.Function):
    """``q [N, K] = z[ids] - lse(z)`` (fp32) of logits ``z [N, V]`` at distinct ``ids [N, K]`` per row. ``lse`` is
    read from :func:`fastalign.token_logprobs` at ``ids[:, 0]``, whose backward with ``G = sum_k g_k`` writes
    ``G (onehot(ids_0) - softmax(z))``: ``d(z)`` everywhere but at the ids, where it is set to ``g_k - G exp(q_k)``
    (each entry rounded once)."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor) -> Tensor:
        with torch.enable_grad():
            ctx.leaf = logits.detach().requires_grad_()
            ctx.first = token_logprobs(ctx.leaf, ids[:, 0]).logprobs
        picked = logits.gather(-1, ids).float()
        logprobs = picked - (picked[:, :1] - ctx.first.detach()[:, None])
        ctx.save_for_backward(ids, logprobs)
        return logprobs

    @staticmethod
    def backward(ctx, grad: Tensor):
        ids, logprobs = ctx.saved_tensors
        grad = grad.float()
        total = grad.sum(-1)
        (d_logits,) = torch.autograd.grad(ctx.first, ctx.leaf, total)
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        # index_put_, not scatter_: the CPU scatter of a bf16 tensor makes an fp32 copy of all of it
        d_logits.index_put_((rows, ids), (grad - total[:, None] * logprobs.exp()).to(d_logits.dtype))
        return d_logits, None


def _flat(t: Tensor) -> Tensor:
    """A nested ``[B, j, K]`` tensor (verl's teacher outputs) as ``[1, total, K]``; a dense one as it is."""
    return t.values().unsqueeze(0) if t.is_nested else t


def _this_rank(t: Tensor) -> Tensor:
    """This rank's slice of the sequence ``t [1, N, K]`` under verl's Ulysses sequence parallelism (all of it
    without, or outside verl)."""
    try:
        from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor
    except ImportError:
        return t
    return slice_input_tensor(t, dim=1) if get_ulysses_sequence_parallel_world_size() > 1 else t


def forward_kl_topk(student_logits: Tensor, teacher_topk_log_probs: Tensor, teacher_topk_ids: Tensor,
                    log_prob_min_clamp: Optional[float] = -10.0) -> dict:
    """verl's FSDP ``compute_forward_kl_topk`` outputs (``distillation_losses``, ``student_mass``,
    ``teacher_mass``, ``overlap_count``, ``overlap_token_advantage``, each ``[1, N]``) for the student's logits
    ``[1, N, V]`` (this rank's slice of the sequence under Ulysses sequence parallelism, as verl's) and the
    teacher's top-k log-probs and ids ``[1, N, K]`` (nested ``[B, j, K]`` as verl hands them; sliced for this rank
    here); the module docstring has the formulas."""
    teacher_lp, teacher_ids = _this_rank(_flat(teacher_topk_log_probs)), _this_rank(_flat(teacher_topk_ids))
    if student_logits.dim() != 3 or teacher_lp.shape != teacher_ids.shape or (
            teacher_lp.shape[:2] != student_logits.shape[:2]):
        raise ValueError(f"student_logits [1, N, V] and the teacher's top-k log-probs and ids [1, N, K] must agree, "
                         f"got {tuple(student_logits.shape)}, {tuple(teacher_lp.shape)}, {tuple(teacher_ids.shape)}")
    vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
    ids = teacher_ids.reshape(-1, k).to(torch.int64)
    student_lp = _SupportLogprobs.apply(student_logits.reshape(-1, vocab), ids).view(teacher_lp.shape)
    student_mass = student_lp.exp().sum(-1)
    teacher_mass = teacher_lp.exp().sum(-1)
    if log_prob_min_clamp is not None:
        student_lp, teacher_lp = student_lp.clamp_min(log_prob_min_clamp), teacher_lp.clamp_min(log_prob_min_clamp)
    teacher_lp = teacher_lp.float()
    token_kl = teacher_lp.exp() * (teacher_lp - student_lp)
    with torch.no_grad():  # diagnostics: the teacher's ids among the student's top k, their mean -KL term
        student_ids = torch.topk(student_logits.detach(), k=k, dim=-1).indices
        overlap = (teacher_ids.unsqueeze(-1) == student_ids.unsqueeze(-2)).any(-1)
        overlap_count = overlap.sum(-1)
        overlap_sum = (-token_kl.detach() * overlap).sum(-1)
        overlap_token_advantage = torch.where(overlap_count > 0, overlap_sum / overlap_count.clamp_min(1), 0.0)
    return {"distillation_losses": token_kl.sum(-1), "student_mass": student_mass, "teacher_mass": teacher_mass,
            "overlap_count": overlap_count, "overlap_token_advantage": overlap_token_advantage}


def _fsdp_topk_loss(verl_topk_loss):
    """verl's ``compute_topk_loss`` with :data:`MODE` computed by :func:`forward_kl_topk`."""

    def compute_topk_loss(config, distillation_config, data, student_logits, data_format):
        loss_config = distillation_config.distillation_loss
        if loss_config.loss_mode != MODE:
            return verl_topk_loss(config, distillation_config, data, student_logits, data_format)
        if config.strategy not in ("fsdp", "fsdp2", "veomni"):
            raise NotImplementedError(f"distillation loss_mode={MODE} runs on verl's FSDP engines (strategy fsdp, "
                                      f"fsdp2 or veomni), not {config.strategy!r}: use forward_kl_topk")
        return forward_kl_topk(student_logits, data["teacher_logprobs"], data["teacher_ids"],
                               loss_config.log_prob_min_clamp)

    compute_topk_loss.fastalign = True
    return compute_topk_loss


def _patch_losses(module) -> None:
    if MODE not in module.DISTILLATION_LOSS_REGISTRY:
        settings = module.DistillationLossSettings(names=[MODE], use_topk=True)
        module.register_distillation_loss(settings)(module.compute_forward_kl_topk)
    if not getattr(module.compute_topk_loss, "fastalign", False):
        module.compute_topk_loss = _fsdp_topk_loss(module.compute_topk_loss)


def enable() -> None:
    """Register :data:`MODE` among verl's distillation losses, now or when verl imports them (idempotent)."""
    patch_modules({_LOSSES_MODULE: _patch_losses})
