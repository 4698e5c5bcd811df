r"""fastalign as the log-prob / entropy path of verl's Megatron engine (tensor-parallel logits).

verl 0.9.1's Megatron engine without fused kernels (``MegatronEngineWithLMHead``,
``actor_rollout_ref.model.use_fused_kernels=False``) hands each tensor-parallel rank its slice of the logits,
``[b, s, V / tp]``, to ``_lm_head_logits_processor``, which divides them by the per-token temperature in place and
then makes up to three passes over them, each with its own all-reduces over the tensor-parallel group, and a copy
of the logits (verl's entropy overwrites its input)::

    sum_pi_squared = vocab_parallel_sum_pi_squared(logits)          sum_j p_j^2     (with the optimal token baseline)
    entropy        = vocab_parallel_entropy(logits.clone())         -sum_j p_j log p_j
    log_probs      = vocab_parallel_log_probs_from_logits(logits, label)    log p_label   (Megatron's cross-entropy)

:func:`lm_head_logits_processor` is that method computed by one fused pass of
:func:`fastalign.token_logprobs` with ``vocab_group`` the tensor-parallel group (docs/math.md
#vocabulary-parallel-logits): no copy of the logits, one backward pass writing d(logits) (over the logits
themselves when nothing else reads them), the same outputs under the same keys and dtypes (log-probs fp32, entropy
and sum p^2 in the logits' dtype, as verl's; the entropy fp32 with ``entropy_from_logits_with_chunking``, as verl's
chunked entropy), computed in fp32 where verl's entropy and sum p^2 compute in the logits' dtype (bf16 logits:
those two are more exact than verl's, to bf16 rounding of the same value). The temperature division and its checks
are verl's own; ``entropy_from_logits_with_chunking`` (a memory option of verl's entropy) has nothing to chunk
here and changes only that dtype. Top-k distillation (``distillation_use_topk``)
calls verl's ``logits_processor_func`` on the same logits, as verl's method does.

Opt in with the environment variable ``FASTALIGN_VERL_MEGATRON=1`` in the processes of verl's workers (for a
local Ray cluster the driver's environment; else ``ray_kwargs.ray_init.runtime_env.env_vars``): the
``verl.plugins`` entry point then installs the method when verl imports its Megatron engine. Or call
:func:`enable` in the worker process. :func:`vocab_parallel_log_probs_from_logits`,
:func:`vocab_parallel_entropy` and :func:`vocab_parallel_sum_pi_squared` are verl's functions of those names
(``verl.utils.megatron.tensor_parallel``; the group is Megatron's tensor-parallel group), each one fused pass,
for code that calls them directly. Nothing here imports Megatron or verl until it is called.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from fastalign.integrations.verl._on_import import patch_modules
from fastalign.logprobs import overwritable, token_logprobs

__all__ = ["ENV", "enable", "lm_head_logits_processor", "vocab_parallel_entropy",
           "vocab_parallel_log_probs_from_logits", "vocab_parallel_sum_pi_squared"]

#: the environment variable that makes the ``verl.plugins`` entry point call :func:`enable`
ENV = "FASTALIGN_VERL_MEGATRON"

_ENGINE_MODULE = "verl.workers.engine.megatron.transformer_impl"


def _tensor_parallel_group():
    """Megatron's tensor-parallel group, or None where it has one rank (nothing to merge)."""
    from megatron.core import parallel_state as mpu

    group = mpu.get_tensor_model_parallel_group()
    return group if torch.distributed.get_world_size(group) > 1 else None


def _stats(logits: Tensor, labels, *, entropy=False, sum_p2=False, inplace_backward=False):
    if labels is None:  # only entropy / sum p^2 asked for: any label in range (its log-prob is dropped)
        labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return token_logprobs(logits, labels, entropy=entropy, sum_p2=sum_p2, inplace_backward=inplace_backward,
                          vocab_group=_tensor_parallel_group())


def vocab_parallel_log_probs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """``log p_label`` (fp32) of this rank's slice ``logits [..., V / tp]`` of the tensor-parallel logits, labels
    global ids, as verl's function of that name (Megatron's ``vocab_parallel_cross_entropy``, negated). A label
    outside the vocabulary gives NaN and -100 gives 0, where Megatron's gives ``-lse`` (verl's labels are token
    ids)."""
    return _stats(logits, labels).logprobs


def vocab_parallel_entropy(vocab_parallel_logits: Tensor) -> Tensor:
    """``-sum_j p_j log p_j`` over the whole vocabulary from this rank's slice, in the logits' dtype, as verl's
    function of that name (which overwrites its input; this one leaves it)."""
    return _stats(vocab_parallel_logits, None, entropy=True).entropy.to(vocab_parallel_logits.dtype)


def vocab_parallel_sum_pi_squared(vocab_parallel_logits: Tensor) -> Tensor:
    """``sum_j p_j^2`` over the whole vocabulary from this rank's slice, in the logits' dtype, as verl's function
    of that name."""
    return _stats(vocab_parallel_logits, None, sum_p2=True).sum_p2.to(vocab_parallel_logits.dtype)


def lm_head_logits_processor(self, logits: Tensor, label: Tensor, temperature: Tensor, *,
                             calculate_sum_pi_squared: bool, calculate_entropy: bool, distillation_use_topk: bool,
                             distillation_only: bool, logits_processor_func, batch, data_format: str) -> dict:
    """verl's ``MegatronEngineWithLMHead._lm_head_logits_processor`` (same signature, keys, dtypes) in one fused
    pass over the logits (module docstring)."""
    assert logits.shape[:2] == label.shape[:2]
    # verl's: a non-positive temperature (padding) becomes 1e-8, and the logits are divided in place
    temperature[temperature <= 0] = 1e-8
    assert torch.all(temperature > 0).item(), f"temperature tensor must be positive. Got {temperature}"
    logits.div_(temperature.unsqueeze(dim=-1).to(logits.dtype))
    ret = {}
    stats = None
    if calculate_sum_pi_squared or calculate_entropy or not distillation_only:
        # d(logits) written over them unless the distillation function reads them too
        stats = _stats(logits, label, entropy=calculate_entropy, sum_p2=calculate_sum_pi_squared,
                       inplace_backward=not distillation_use_topk and overwritable(logits))
    if calculate_sum_pi_squared:
        ret["sum_pi_squared"] = stats.sum_p2.to(logits.dtype)
    if calculate_entropy:  # verl's chunked entropy fills an fp32 tensor; its plain one is in the logits' dtype
        chunked = self.engine_config.entropy_from_logits_with_chunking
        ret["entropy"] = stats.entropy if chunked else stats.entropy.to(logits.dtype)
    if distillation_use_topk:
        ret.update(logits_processor_func(student_logits=logits, data=batch, data_format=data_format))
    if not distillation_only:
        ret["log_probs"] = stats.logprobs
    return ret


def _patch_engine(module) -> None:
    engine = module.MegatronEngineWithLMHead
    if engine.__dict__.get("_lm_head_logits_processor") is not lm_head_logits_processor:
        engine._lm_head_logits_processor = lm_head_logits_processor


def enable() -> None:
    """Install :func:`lm_head_logits_processor` as the logits processor of verl's Megatron engine, now or when verl
    imports it (idempotent)."""
    patch_modules({_ENGINE_MODULE: _patch_engine})


def enable_from_environment() -> None:
    """:func:`enable` where ``FASTALIGN_VERL_MEGATRON=1`` (called by the ``verl.plugins`` entry point, after it has
    registered the losses and estimators: verl logs a plugin's exception at debug level only, so another value is
    a warning naming the variable, and verl's own processor stays)."""
    value = os.environ.get(ENV, "")
    if value not in ("", "0", "1"):
        warnings.warn(f"{ENV} must be 1 (use fastalign in verl's Megatron engine) or 0, got {value!r}: verl's own "
                      "logits processor stays", stacklevel=2)
    elif value == "1":
        enable()
