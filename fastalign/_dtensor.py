"""DTensor arguments (FSDP2, tensor parallel) as the plain tensors the kernels take.

An FSDP2 model's parameters are DTensors sharded over their first dimension outside its forward (the
lm_head weight that a loss is handed is one). Without a vocabulary group the head is gathered
(differentiable: the ranks' gradients are averaged back onto the shards, as FSDP2 does). With ``vocab_group``, a
``Shard(0)`` DTensor over that group *is* a vocabulary shard: its local rows are used as they are.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate

__all__ = ["full", "head", "is_dtensor"]


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 or tensor-parallel parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def full(t: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor gathered to the full tensor (differentiably); other tensors, and None, as they are.

    Each rank's gradient of the gathered tensor is taken as a partial one, averaged over the mesh on its way
    back to the shards (a reduce-scatter), as FSDP2 averages the gradients of the parameters it gathers: under
    data parallelism each rank scores its own batch, so the gradients differ. Where every rank computes the
    same gradient (tensor parallelism, replicated data) the average is that gradient."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial, Replicate

    n = t.device_mesh.ndim
    return t.redistribute(placements=[Replicate()] * n).to_local(grad_placements=[Partial("avg")] * n)


def _vocab_shard(name: str, t: Optional[Tensor], group) -> Optional[Tensor]:
    """``t``'s local rows when it is a DTensor sharded over its first dimension across exactly ``group``;
    a plain tensor as it is (already this rank's shard); else a ``TypeError`` naming ``name``."""
    if not is_dtensor(t):
        return t
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    if (mesh.ndim == 1 and tuple(t.placements) == (Shard(0),)
            and dist.get_process_group_ranks(mesh.get_group()) == dist.get_process_group_ranks(group)):
        return t.to_local()
    raise TypeError(f"{name} is a DTensor with placements {tuple(t.placements)} on a {mesh.ndim}-D mesh; with "
                    "vocab_group it must be sharded over its first dimension (Shard(0)) across exactly that group, "
                    "or a plain tensor holding this rank's rows")


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None, low_rank=None, vocab_group=None,
         dtype: Optional[torch.dtype] = None):
    """``(hidden, weight, bias, low_rank)`` as plain tensors: the rows (``hidden``, the low-rank term's ``a``)
    gathered; the head (``weight``, ``bias``, ``L``) gathered too, or without a copy its local vocabulary shard
    when ``vocab_group`` is given (which must be a process group). A DTensor head of another kernel dtype than
    ``hidden`` (or than ``dtype``, when given) is cast to it on its shards first, as FSDP2's mixed precision casts
    the head it gathers to its ``param_dtype`` (the body's, which the hidden states have) for the model's forward."""
    _validate.process_group("vocab_group", vocab_group)
    dtype = dtype or getattr(hidden, "dtype", None)

    def of_head(name: str, t):
        if is_dtensor(t) and dtype in _KERNEL_DTYPES and t.dtype in _KERNEL_DTYPES:
            t = t.to(dtype)
        return full(t) if vocab_group is None else _vocab_shard(name, t, vocab_group)

    if isinstance(low_rank, (tuple, list)) and len(low_rank) == 2:  # else check_head_inputs names the mistake
        low_rank = (full(low_rank[0]), of_head("low_rank[1]", low_rank[1]))
    return full(hidden), of_head("weight", weight), of_head("bias", bias), low_rank
