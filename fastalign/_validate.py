"""Host-side argument checks, run by every public function before any kernel.

Tensor checks read only metadata (type, layout, device, dtype, shape), never values, so
they cost nothing and never synchronise with a GPU. Number checks read Python values.
Every error names the argument: ``"<arg> must ..., got ..."``.
"""
from __future__ import annotations

import collections.abc as _abc
import math
import sys
import numbers as _numbers
from typing import Optional

import torch

from fastalign.ops._launch import eager, unrunnable

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int64, torch.int32)


# ----------------------------------------------------------------------------- tensors
def tensor(name: str, x, *, min_dim: int = 0, dim: int | None = None) -> torch.Tensor:
    """``x`` is a tensor some kernel can read (dense, strided, on a CPU or CUDA device)
    with ``dim`` (or at least ``min_dim``) dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    why = unrunnable(x)
    if why is not None:
        err, what = why
        raise err(f"{name} must be a dense CPU or CUDA tensor, got {what}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(x.shape)}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def floating(name: str, x, **kw) -> torch.Tensor:
    """A float32 / bfloat16 / float16 tensor (see :func:`tensor` for ``kw``)."""
    x = tensor(name, x, **kw)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x


def integer(name: str, x, **kw) -> torch.Tensor:
    """An int64 or int32 tensor."""
    x = tensor(name, x, **kw)
    if x.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {x.dtype}")
    return x


def real(name: str, x, **kw) -> torch.Tensor:
    """A tensor of real numbers: bool, integer or floating (a mask, a length), not complex."""
    x = tensor(name, x, **kw)
    if x.dtype.is_complex:
        raise TypeError(f"{name} must hold real numbers (bool, integer or float), got {x.dtype}")
    return x


def any_float(name: str, x, **kw) -> torch.Tensor:
    """A floating tensor of any precision (float64 too: sequence-level math, fp64 oracles)."""
    x = tensor(name, x, **kw)
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {x.dtype}")
    return x


KINDS = {"tensor": tensor, "real": real, "float": floating, "any_float": any_float, "integer": integer}


def like(expected, what: str, *, device=None, device_of: str = "the other inputs", kind: str = "any_float",
         required: bool = False, **tensors) -> None:
    """Each tensor given (None skipped, unless ``required``: then None is a ``TypeError`` naming it) passes the
    check ``kind`` (a key of ``KINDS``), has shape ``expected`` (a tuple, a list of allowed tuples, or None for
    any; ``what`` says why) and sits on ``device`` (when given: the device of the argument ``device_of``)."""
    for name, t in tensors.items():
        if t is None and not required:
            continue
        KINDS[kind](name, t)
        if isinstance(expected, list):
            if tuple(t.shape) not in [tuple(e) for e in expected]:
                raise ValueError(f"{name} must have shape {' or '.join(str(tuple(e)) for e in expected)} ({what}), "
                                 f"got {tuple(t.shape)}")
        elif expected is not None:
            shape(name, t, expected, what)
        if device is not None and t.device != torch.device(device):
            raise ValueError(f"{name} is on {t.device} but {device_of} is on {device}; use one device")


def same_device(**tensors) -> None:
    """Every tensor given (None skipped) is on the device of the first one."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; use one device")


def shape(name: str, x: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(x.shape)}")


def nonempty(name: str, x: torch.Tensor, dim: int, what: str) -> None:
    """Dimension ``dim`` of ``x`` is not 0 (a vocabulary, a hidden size)."""
    if x.shape[dim] == 0:
        raise ValueError(f"{name} must have a non-empty {what} dimension, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- numbers
def number(name: str, value) -> float:
    """``value`` as a float: a real number (not a bool), else a ``TypeError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, _numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def unit_interval(name: str, value) -> float:
    """A real number in ``[0, 1]`` (a ``TypeError`` / ``ValueError`` naming ``name``; NaN is outside), as a float."""
    v = number(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return v


_FLOAT_MAX = sys.float_info.max


def _finite(v: float) -> bool:
    """``math.isfinite(v)`` in a form torch.compile guards on for the symbolic floats of ``dynamic=True`` (it
    takes a symbolic float for a finite one, so ``abs(v) != inf`` would pass an infinite value)."""
    return v == v and -_FLOAT_MAX <= v <= _FLOAT_MAX


def finite(**values) -> None:
    """Every value given is a finite real number (not NaN, not +-inf); None is skipped."""
    for name, value in values.items():
        if value is not None and not _finite(number(name, value)):
            raise ValueError(f"{name} must be finite, got {float(value)}")


def finite_number(name: str, value) -> float:
    """A finite real number (None, a string or a bool is a ``TypeError``), as a float."""
    v = number(name, value)
    if not _finite(v):
        raise ValueError(f"{name} must be finite, got {float(value)}")
    return v


def positive(name: str, value) -> float:
    """A finite real number > 0, as a float."""
    v = number(name, value)
    if not (_finite(v) and v > 0):
        raise ValueError(f"{name} must be > 0 and finite, got {float(value)}")
    return v


_FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def fp32_number(name: str, value: float) -> float:
    """A checked number option the kernels take in fp32 (``softcap``, ``logit_scale``): past fp32's range it would
    reach them as inf (a NaN result where float64 gives a number), so it raises."""
    if abs(value) > _FP32_MAX:
        raise ValueError(f"{name} must be at most {_FP32_MAX:.4g} in magnitude (the kernels take it in float32), "
                         f"got {value}")
    return value


def inverse_temperature(temperature) -> float:
    """``1 / temperature`` for a finite ``temperature > 0`` whose reciprocal fp32 represents (the kernels multiply
    by it in float32; an inf there gave NaN statistics)."""
    inv_t = 1.0 / positive("temperature", temperature)
    if inv_t > _FP32_MAX:
        raise ValueError(f"temperature must be at least {1 / _FP32_MAX:.4g} (the kernels multiply by its reciprocal "
                         f"in float32), got {float(temperature)}")
    return inv_t


def boolean(name: str, value) -> bool:
    """A switch, as a Python bool: a bool or a numpy ``bool_`` (a value read from a config array). Anything
    else (``"no"``, ``1``, a tensor) is a ``TypeError`` naming its qualified type, not a truthy value."""
    if isinstance(value, bool):
        return value
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):  # numpy.bool_ (named bool in numpy 2)
        return bool(value)
    qualified = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    raise TypeError(f"{name} must be a bool, got {qualified}")


def process_group(name: str, group) -> None:
    """None or a ``torch.distributed`` process group (``dist.group.WORLD``, ``dist.new_group(...)``, a device
    mesh's ``mesh.get_group()``); anything else (a name such as ``"world"``, a bool, a mesh) is a ``TypeError``."""
    if group is None:
        return
    dist = torch.distributed
    if dist.is_available() and type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{name} is dist.GroupMember.NON_GROUP_MEMBER, what dist.new_group returns to the ranks "
                         "outside the group: this process is not a member of it")
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup (dist.group.WORLD, dist.new_group(...), "
                        f"mesh.get_group()) or None, got {type(group).__name__} {group!r}")


def finite_numbers(name: str, values) -> tuple:
    """A sequence (list, tuple, ...) of finite real numbers, as a tuple of floats; ``name[i]`` names a bad entry."""
    if isinstance(values, (str, bytes)) or not isinstance(values, _abc.Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    return tuple(finite_number(f"{name}[{i}]", v) for i, v in enumerate(values))


def index_value(name: str, value) -> int:
    """A Python integer that fits int64 (a label value such as ``ignore_index``)."""
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, _numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -2 ** 63 <= int(value) < 2 ** 63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return int(value)


def at_least(name: str, value, minimum: int = 1) -> int:
    """A Python integer >= ``minimum`` (a size such as ``dp_size`` or ``num_sequences``)."""
    v = index_value(name, value)
    if v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return v


def count(name: str, value) -> None:
    """A global count (``global_tokens``, ``global_seqs``): None, a finite number > 0, or a
    real tensor with one element, finite and >= 0 (the aggregation divides a count of 0 as 1:
    :func:`fastalign.aggregate.global_divisor`). A tensor's value is read on the host only for an
    eager CPU tensor (:func:`flag_or_raise`: a negative, NaN or infinite one raises); elsewhere it is
    not read (that would synchronise with a GPU) and the aggregation makes the loss NaN for it."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        real(name, value)
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        v = value.detach().reshape(())
        flag_or_raise(~(torch.isfinite(v) & (v >= 0)), v, lambda: f"{name} must be >= 0 and finite, got {v.item()}")
        return
    positive(name, value)


def counts(*, global_tokens=None, global_seqs=None, dp_size=1, max_len: Optional[int] = None) -> None:
    """The aggregation counts of docs/math.md#aggregation (see :func:`count`)."""
    count("global_tokens", global_tokens)
    count("global_seqs", global_seqs)
    at_least("dp_size", dp_size, 1)
    if max_len is not None:
        at_least("max_len", max_len, 1)


def flag_or_raise(bad: torch.Tensor, x: torch.Tensor, message) -> Optional[torch.Tensor]:
    """A malformed-input flag ``bad`` (0-dim bool, computed from ``x``): on an eager CPU tensor it is read here
    (free) and a True flag raises ``ValueError(message())``; other tensors (CUDA, fake) are not read on the host,
    and the flag is returned for the caller to turn its outputs into NaN without a synchronisation."""
    if x.device.type != "cpu" or not eager(x):
        return bad
    if bool(bad):
        raise ValueError(message())
    return None


def token_counts(name: str, counts: torch.Tensor) -> Optional[torch.Tensor]:
    """Lengths ``counts`` (token counts, any real dtype) must be finite and >= 0: :func:`flag_or_raise` of that, a
    ``ValueError`` naming ``name`` on an eager CPU tensor, else the device flag (None: nothing to refuse)."""
    ok = torch.isfinite(counts) & (counts >= 0)
    return flag_or_raise(~ok.all(), counts, lambda: f"{name} must be finite and >= 0 (token counts), got "
                                                    f"{int((~ok).sum())} entries that are not")


def nan_if(flag: Optional[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """``loss``, NaN where the device flag ``flag`` (of :func:`flag_or_raise`; None: nothing to refuse) is set,
    with NaN gradients too: a product, not a selection (whose gradient would be 0 and pass a finiteness check)."""
    return loss if flag is None else loss * torch.where(flag, math.nan, 1.0)


def result_dtype(*operands) -> Optional[torch.dtype]:
    """The dtype torch's arithmetic gives a result from these operands: their promoted dtype
    (``torch.promote_types``). An operand is a tensor or a dtype (a constant dtype of the arithmetic, such as a
    ``.float()`` mask); anything else (None, a Python number) changes nothing, as a Python number changes no
    tensor's dtype. None when no operand has a dtype."""
    out = None
    for t in operands:
        d = t.dtype if isinstance(t, torch.Tensor) else t if isinstance(t, torch.dtype) else None
        if d is not None:
            out = d if out is None else torch.promote_types(out, d)
    return out


def zero_one(name: str, x: torch.Tensor, rule: str, as_bool: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Flags: a bool tensor, or numbers that are 0 or 1. Another value is a ``ValueError`` (``"{name} must
    {rule}; got values such as [...]"``) where the values are on the host; else the device flag
    (:func:`flag_or_raise`). None for a bool tensor. ``as_bool``: ``x.bool()`` when the caller has it (one
    comparison: a value other than 0 and 1, NaN too, differs from its bool)."""
    if x.dtype == torch.bool:
        return None
    bad = (x != 0) & (x != 1) if as_bool is None else x != as_bool
    return flag_or_raise(bad.any(), x, lambda: f"{name} must {rule}; got values such as {x[bad][:3].tolist()}")


#: why the policy losses refuse a mask value other than 0 and 1
BINARY_MASK_RULE = ("hold 0 and 1 only (the policy loss counts a token or not, where a trainer would weigh it by a "
                    "fractional mask; weigh tokens with importance_weights)")


def binary_mask(name: str, mask: torch.Tensor, as_bool: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """:func:`zero_one` of a policy loss's token mask (:data:`BINARY_MASK_RULE`): a ``ValueError`` naming ``name``
    on the host, else the device flag that makes the loss NaN."""
    return zero_one(name, mask, BINARY_MASK_RULE, as_bool)


def host_binary_mask(name: str, mask: torch.Tensor) -> None:
    """:func:`binary_mask` where the values are on the host (an eager CPU tensor), so an adapter names its own
    argument; elsewhere nothing is computed (the policy loss's own flag makes its loss NaN)."""
    if mask.device.type == "cpu" and eager(mask):
        binary_mask(name, mask)


def offsets(name: str, cu: torch.Tensor, total: int, device=None) -> Optional[torch.Tensor]:
    """Cumulative sequence offsets ``cu [S+1]`` into ``total`` packed tokens: start at 0,
    never decrease, end at most at ``total``. Returns None, raises, or the device flag
    (:func:`flag_or_raise`)."""
    integer(name, cu, dim=1)
    if device is not None and cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the tokens are on {device}; use one device")
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 entries ([S+1], starting at 0), got shape {tuple(cu.shape)}")
    decreasing = (cu[1:] < cu[:-1]).any()
    return flag_or_raise(
        (cu[0] != 0) | decreasing | (cu[-1] > total), cu,
        lambda: (f"{name} must start at 0, never decrease and end at most at the {total} packed tokens, got "
                 f"first={int(cu[0])}, last={int(cu[-1])}{', decreasing' if bool(decreasing) else ''}"))


def position_starts(name: str, position_ids: torch.Tensor, count_name: str, count: int) -> Optional[torch.Tensor]:
    """Packed ``position_ids [N]`` that start ``count`` sequences: the first token at position 0, and ``count``
    positions 0 in all (a sequence starts where the position is 0, so none is empty). Returns None, raises
    (naming ``name`` or ``count_name``), or the device flag (:func:`flag_or_raise`)."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).sum()
    first_off = (pos[:1] != 0).any()

    def message() -> str:
        if bool(first_off):
            return (f"{name} must start at 0 (the first packed token starts a sequence), got {int(pos[0])} at the "
                    "first token")
        return f"{count_name}={count} but {name} describes {int(starts)} sequences (one per position 0)"
    return flag_or_raise(first_off | (starts != count), pos, message)
