"""Host-side input checks shared by the sequence-level and the token-level advantage estimators."""
from __future__ import annotations

import torch
from torch import Tensor

from fastalign import _validate

#: the epsilon of every whitening ``(x - mean) * rsqrt(var + eps)`` (verl's)
WHITEN_EPS = 1e-8


def _host_key(k):
    """A list entry as a hashable Python value. A 0-d tensor hashes by identity, so two equal ids
    (``list(prompt_ids)``) would never meet in one group; it and numpy scalars give their value."""
    if isinstance(k, Tensor):
        if k.numel() != 1:
            raise TypeError(f"entries must be single ids, got a tensor of shape {tuple(k.shape)}")
        return k.item()
    if type(k).__module__ == "numpy" and getattr(k, "ndim", None) == 0:  # np.int64(3), np.str_("a"), np.array(3)
        return k.item()
    return k


def as_index(name: str, ids, B: int, device: torch.device) -> Tensor:
    """int64 [B] group keys on ``device``. Integer tensors pass through (on the
    device, no copy to the host). Strings (lists, tuples, numpy arrays of str
    or object) are mapped to 0, 1, ... in order of first appearance on the
    host — a host step, for trainers that keep prompt ids as text. List entries that are 0-d
    tensors or numpy scalars count by value (``list(ids)`` groups as ``ids``)."""
    if isinstance(ids, Tensor):
        _validate.tensor(name, ids)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (group keys), got {ids.dtype}")
        if ids.dim() != 1 or ids.shape[0] != B:
            raise ValueError(f"{name} must have shape ({B},) (one group key per score), got {tuple(ids.shape)}")
        if ids.device != device:
            raise ValueError(f"{name} is on {ids.device} but scores are on {device}; use one device")
        return ids.to(torch.int64).contiguous()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None and isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {ids.shape}")
        if ids.dtype.kind in "iu":
            return as_index(name, torch.from_numpy(ids.astype(np.int64)).to(device), B, device)
        if ids.dtype.kind not in "OUS":
            raise TypeError(f"{name} must hold integers or strings, got numpy dtype {ids.dtype}")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{name} must be an integer tensor, a numpy array or a list of ids, got {type(ids).__name__}")
    if len(ids) != B:
        raise ValueError(f"{name} must have {B} entries (one group key per score), got {len(ids)}")
    table: dict = {}
    try:
        keys = [table.setdefault(_host_key(k), len(table)) for k in ids]
    except TypeError as e:
        raise TypeError(f"{name} entries must be hashable ids (str or int): {e}") from e
    return torch.tensor(keys, dtype=torch.int64, device=device)


def response_mask_rows(name: str, mask, B: int, dtype, device) -> Tensor:
    """A ``[B, T]`` mask (one row per response) checked against the scores' ``B`` and device, in ``dtype``."""
    _validate.real(name, mask, dim=2)
    if mask.shape[0] != B:
        raise ValueError(f"{name} must have shape ({B}, T) (one row per response), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the scores are on {device}; use one device")
    return mask.to(dtype).contiguous()
