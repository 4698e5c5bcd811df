"""Argument checks shared by the Liger-Kernel adapters (:mod:`fastalign.integrations.liger` and its GRPO and
preference modules): Liger's execution options, the heads and labels under Liger's names, numbers given as
tensors, a 0/1 mask, options that the chosen loss does not read and torch's legacy reduction arguments; and Liger's
reductions of a summed loss."""
from __future__ import annotations

import numbers
from typing import Optional

from torch import Tensor

from fastalign import _validate
from fastalign.linear import check_head, check_second_head


def execution_options(compiled, chunk_size) -> None:
    if not isinstance(compiled, bool):
        raise TypeError(f"compiled must be a bool, got {compiled!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def check_heads(_input: Tensor, lin_weight: Tensor, bias: Optional[Tensor], labels_name: str, labels: Tensor,
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


def number_or_tensor(name: str, value, *, shapes, what: str, device=None, kind: str = "real") -> None:
    """A forward argument that Liger takes as a real number (not a bool) or a tensor (``kind``, a key of
    ``fastalign._validate.KINDS``) of one of ``shapes`` (on ``device``, when given: the device of ``_input``);
    anything else is a ``TypeError`` naming it."""
    if isinstance(value, Tensor):
        _validate.like(shapes, what, device=device, device_of="_input", kind=kind, **{name: value})
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a tensor, got {type(value).__name__}")


def binary_mask(name: str, mask: Tensor) -> Optional[Tensor]:
    """Liger multiplies each token's terms by the GRPO mask (``name``) and divides by its sum, so a fractional mask
    weighs the tokens; fastalign's policy loss counts a token or not. A mask with values other than 0 and 1 is a
    ``ValueError`` naming it where the values are on the host (an eager CPU tensor); elsewhere they are not read
    and the returned flag makes the loss NaN (:func:`fastalign._validate.zero_one`)."""
    return _validate.zero_one(name, mask, "hold 0 and 1 only (Liger would weigh the tokens by a fractional mask; "
                              "fastalign counts a token or not)")


def not_default(owner: str, loss_type: str, **given) -> None:
    """Options given a non-default value that ``loss_type`` does not read: ``name=(value, default)``."""
    for name, (value, default) in given.items():
        if value != default:
            raise ValueError(f"{name} does not apply to {owner} loss_type {loss_type!r}")


def legacy_reduction_arguments(function: str, default, **values) -> None:
    """torch's legacy ``size_average`` / ``reduce`` arguments, which Liger's ``function`` takes and ignores: their
    ``default`` is accepted, any other value a ``ValueError`` naming it (``reduction`` says how to reduce)."""
    for name, value in values.items():
        if value is not default:
            raise ValueError(f"{name} is a legacy argument that Liger's {function} ignores: leave it {default!r} and "
                             f"set reduction, got {value!r}")


def reduced(total: Tensor, reduction: str, rows, V: int) -> Tensor:
    """Liger's reduction of a summed loss ``total`` over ``rows`` scored rows of ``V`` classes: divided by ``rows``
    (``"batchmean"``), by ``rows V`` (``"mean"``), or as it is (``"sum"``); a count below 1 divides by 1, so no row
    scored gives 0. ``rows``: an int, or a device tensor (never read on the host)."""
    if reduction == "sum":
        return total
    divisor = rows * V if reduction == "mean" else rows
    return total / (divisor.clamp(min=1) if isinstance(divisor, Tensor) else max(divisor, 1))
