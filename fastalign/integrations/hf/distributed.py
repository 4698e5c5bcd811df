"""DDP and FSDP2: the models whose statistics are computed inside their own forward call (:func:`_forward_route`:
a ``DistributedDataParallel`` wrapper, a sharded FSDP2 root) and that call (:func:`_inside_forward`)."""
from __future__ import annotations

import torch
from torch import Tensor

from fastalign.logprobs import TokenStats


def _forward_route(model):
    """``(outer, inner)`` when the statistics must be computed inside ``outer``'s own forward call, else None:
    a ``DistributedDataParallel`` wrapper (its forward prepares the gradient all-reduce of the backward;
    ``inner`` is its ``module``), or an FSDP2 root whose own unit is sharded now (``fully_shard`` on its layers,
    then on the model: the root's forward hooks gather the embedding, final norm and head, and reduce their
    gradients). Inside that forward (a wrapper's forward that calls this one included) they are gathered: None."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model, model.module
    return (model, model) if _sharded_fsdp2_unit(model) else None


def _sharded_fsdp2_unit(model) -> bool:
    """Whether ``model`` is an FSDP2 module one of whose own parameters (those outside the units of its sharded
    submodules) is a shard now (a ``DTensor``: gathered into a plain tensor by its forward's hooks)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(model, FSDPModule):
        return False
    unit = [model]
    while unit:
        module = unit.pop()
        if any(isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            return True
        unit.extend(child for child in module.children() if not isinstance(child, FSDPModule))
    return False


def _inside_forward(outer, inner, compute) -> TokenStats:
    """``compute()`` (statistics) run as ``inner``'s forward inside ``outer()``: the wrappers' forwards and the
    module hooks run around it as around the model's own forward; ``inner``'s forward is restored after."""
    previous = inner.__dict__.get("forward")

    def forward(*_args, **_kwargs):  # views of larger outputs come back as tensors of their own: an in-place op
        # on a view of an FSDP2 module's output would drop its pre-backward hook (torch warns of it)
        return TokenStats(*(t.clone() if isinstance(t, Tensor) and t._is_view() else t for t in compute()))

    inner.forward = forward
    try:
        return outer()
    finally:
        if previous is None:
            del inner.forward
        else:
            inner.forward = previous
