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
logits) with the mean KL term over the overlapped ids. ``q`` is fp32 where verl rounds it to the logits' dtype
(float64 logits are computed in fp32); ``use_chunked_topk`` and ``chunked_topk_chunk_size`` change nothing here
(the path is always the lean one). The log-sum-exp is read at the row's largest logit among the ids (a ``-inf``
logit there would leave it undefined); an id given twice in a row gets the sum of its ``g_k``, as verl's gather.

The backward reads the logits, which verl's log-softmax path does not (it keeps its own copy). verl's FSDP engine
computes the policy's log-probs from the same logits after the logits processor, with flash-attn's cross-entropy
writing ``d(logits)`` over them in its backward, which runs before this one: while a backward of this function
is due, the engine's ``logprobs_from_logits`` is called with ``inplace_backward=False`` on those logits.

The mode is registered beside verl's own when verl imports its distillation losses, with verl's
``forward_kl_topk`` function for the final loss and its metrics (it reads what the logits processor returned);
verl's ``compute_topk_loss`` runs :func:`forward_kl_topk` for this mode on the ``fsdp``, ``fsdp2`` and
``veomni`` strategies (VeOmni's fused kernels compute the top-k loss in their own fused head instead, as for
``forward_kl_topk``), and raises ``NotImplementedError`` on Megatron's tensor-parallel logits (use
``forward_kl_topk`` there, or ``FASTALIGN_VERL_MEGATRON=1``, which fuses the log-probs beside it).
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from fastalign import _validate
from fastalign.integrations._dtypes import float64_as_float32
from fastalign.integrations.verl._names import PREFIX
from fastalign.integrations.verl._on_import import patch_modules
from fastalign.logprobs import token_logprobs

__all__ = ["MODE", "forward_kl_topk", "enable"]

#: The ``distillation_loss.loss_mode`` that selects :func:`forward_kl_topk`.
MODE = PREFIX + "forward_kl_topk"
_LOSSES_MODULE = "verl.trainer.distillation.losses"
_FSDP_ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"
#: The storages of the logits that a backward of :class:`_SupportLogprobs` still has to read (data pointer -> its
#: view of them, alive until that backward's graph is freed).
_READ_IN_BACKWARD: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()


def _at_ids(logits: Tensor, ids: Tensor, logprob: Callable[[Tensor], Tensor]) -> Tensor:
    """``q = z[ids] - lse(z)`` (fp32) with ``lse`` read from ``logprob(labels)`` (the log-probs of one id per row) at
    each row's largest logit among ``ids``, finite where any is; ``-inf`` where the logit is."""
    picked = logits.gather(-1, ids).float()
    reference = picked.argmax(-1, keepdim=True)
    lse = picked.gather(-1, reference) - logprob(ids.gather(-1, reference)[:, 0])[:, None]
    return torch.where(picked == float("-inf"), picked, picked - lse)


def _summed_over_repeats(ids: Tensor, values: Tensor) -> Tensor:
    """``values [N, K]`` with each entry replaced by the sum of the row's entries at the same id (the entry itself
    where the ids of the row are distinct), in order, without a host read: the ids sorted, each run's sum from a
    running sum."""
    k = ids.shape[-1]
    sorted_ids, order = ids.sort(dim=-1, stable=True)
    position = torch.arange(k, device=ids.device).expand_as(ids)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    start = torch.where(starts, position, 0).cummax(-1).values
    end = (k - 1) - torch.where(ends, (k - 1) - position, 0).flip(-1).cummax(-1).values.flip(-1)
    ordered = values.gather(-1, order)
    running = ordered.cumsum(-1)
    sums = running.gather(-1, end) - running.gather(-1, start) + ordered.gather(-1, start)
    return torch.empty_like(values).scatter_(-1, order, sums)


class _SupportLogprobs(torch.autograd.Function):
    """:func:`_at_ids` with ``lse`` from :func:`fastalign.token_logprobs`, whose backward with ``G = sum_k g_k``
    writes ``G (onehot(label) - softmax(z))``: ``d(z)`` everywhere but at the ids, where it is set to ``sum of g at
    the id - G exp(q_k)`` (each entry rounded once)."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor) -> Tensor:
        ctx.leaf = logits.detach().requires_grad_()

        def logprob(labels: Tensor) -> Tensor:
            with torch.enable_grad():
                ctx.reference = token_logprobs(ctx.leaf, labels).logprobs
            return ctx.reference.detach()

        logprobs = _at_ids(logits, ids, logprob)
        _READ_IN_BACKWARD[logits.untyped_storage().data_ptr()] = ctx.leaf
        ctx.save_for_backward(ids, logprobs)
        return logprobs

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative was asked for
            raise RuntimeError(f"{MODE}: the top-k forward KL has no second derivative (create_graph=True)")
        ids, logprobs = ctx.saved_tensors
        grad = grad.float()
        total = grad.sum(-1)
        # the graph of the reference log-prob stays while this one does (a retain_graph backward comes back)
        (d_logits,) = torch.autograd.grad(ctx.reference, ctx.leaf, total, retain_graph=True)
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        at_ids = _summed_over_repeats(ids, grad) - total[:, None] * logprobs.exp()
        # index_put_, not scatter_: the CPU scatter of a bf16 tensor makes an fp32 copy of all of it
        d_logits.index_put_((rows, ids), at_ids.to(d_logits.dtype))
        return d_logits, None


def _support_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """``q [N, K]`` of logits ``[N, V]`` at ``ids [N, K]``: through :class:`_SupportLogprobs` where a gradient is
    due, else :func:`_at_ids` alone (no graph, as under ``torch.inference_mode``)."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SupportLogprobs.apply(logits, ids)
    return _at_ids(logits, ids, lambda labels: token_logprobs(logits, labels).logprobs)


def _read_in_backward(logits: Tensor) -> bool:
    """Whether a backward of :class:`_SupportLogprobs` still has to read the storage of ``logits``."""
    return _READ_IN_BACKWARD.get(logits.untyped_storage().data_ptr()) is not None


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
    _validate.any_float("student_logits", student_logits)
    teacher_lp, teacher_ids = _this_rank(_flat(teacher_topk_log_probs)), _this_rank(_flat(teacher_topk_ids))
    _validate.any_float("teacher_topk_log_probs", teacher_lp)
    _validate.integer("teacher_topk_ids", teacher_ids)
    if log_prob_min_clamp is not None:
        _validate.number("log_prob_min_clamp", log_prob_min_clamp)
    student_logits = float64_as_float32(student_logits)  # the gradient goes back as float64
    if student_logits.dim() != 3 or teacher_lp.shape != teacher_ids.shape or (
            teacher_lp.shape[:2] != student_logits.shape[:2]):
        raise ValueError(f"student_logits [1, N, V] and the teacher's top-k log-probs and ids [1, N, K] must agree, "
                         f"got {tuple(student_logits.shape)}, {tuple(teacher_lp.shape)}, {tuple(teacher_ids.shape)}")
    vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
    ids = teacher_ids.reshape(-1, k).to(torch.int64)
    student_lp = _support_logprobs(student_logits.reshape(-1, vocab), ids).view(teacher_lp.shape)
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


def _keep_logits(verl_logprobs_from_logits):
    """verl's ``logprobs_from_logits`` with ``inplace_backward=False`` on logits that a backward of
    :class:`_SupportLogprobs` still has to read (the module docstring)."""

    def logprobs_from_logits(logits, labels, inplace_backward=True):
        if inplace_backward and _read_in_backward(logits):
            inplace_backward = False
        return verl_logprobs_from_logits(logits, labels, inplace_backward=inplace_backward)

    logprobs_from_logits.fastalign = True
    return logprobs_from_logits


def _patch_engine(module) -> None:
    if not getattr(module.logprobs_from_logits, "fastalign", False):
        module.logprobs_from_logits = _keep_logits(module.logprobs_from_logits)


def _patch_losses(module) -> None:
    if MODE not in module.DISTILLATION_LOSS_REGISTRY:
        settings = module.DistillationLossSettings(names=[MODE], use_topk=True)
        module.register_distillation_loss(settings)(module.compute_forward_kl_topk)
    if not getattr(module.compute_topk_loss, "fastalign", False):
        module.compute_topk_loss = _fsdp_topk_loss(module.compute_topk_loss)


def enable() -> None:
    """Register :data:`MODE` among verl's distillation losses, and keep the logits it reads in backward from verl's
    FSDP engine's in-place log-prob backward, now or when verl imports them (idempotent)."""
    patch_modules({_LOSSES_MODULE: _patch_losses, _FSDP_ENGINE_MODULE: _patch_engine})
