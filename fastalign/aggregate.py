"""Loss aggregation over tokens and sequences with global counts (docs/math.md#aggregation)."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from fastalign import _validate
from fastalign._deprecate import renamed
from fastalign._options import check_choice

AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
#: which rows a sequence mean counts without ``global_seqs``: the non-empty ones, or every row
SEQ_COUNTS = ("nonempty", "all")
Count = Union[int, float, Tensor, None]


def check_agg(agg: str) -> str:
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    return agg


def counts_read(agg: str, global_tokens: Count = None, global_seqs: Count = None) -> dict:
    """The global counts ``agg`` divides by, of those given: ``global_tokens`` for token-mean,
    ``global_seqs`` for the seq-mean modes, none for token-sum (a trainer that always has both
    passes them through this)."""
    given = {"global_tokens": global_tokens if agg == "token-mean" else None,
             "global_seqs": global_seqs if agg.startswith("seq-mean") else None}
    return {k: v for k, v in given.items() if v is not None}


def default_seq_count(agg: str) -> str:
    """The rows a sequence mean of ``agg`` counts by default: every row for ``seq-mean-token-sum-norm`` (Dr.
    GRPO's ``B * L_max``, as TRL), the non-empty ones for the other seq-mean modes (as verl)."""
    return "all" if agg == "seq-mean-token-sum-norm" else "nonempty"


def check_counts(agg: str, global_tokens: Count = None, global_seqs: Count = None,
                 max_len: Optional[int] = None) -> None:
    """``ValueError`` naming a global count given to an aggregation that does not divide by it, or a
    ``max_len`` given to one other than ``seq-mean-token-sum-norm``."""
    for name, value in (("global_tokens", global_tokens), ("global_seqs", global_seqs)):
        if value is not None and name not in counts_read(agg, global_tokens, global_seqs):
            raise ValueError(f"{name} does not apply to agg={agg!r} (token-mean divides by global_tokens, "
                             f"the seq-mean modes by global_seqs, token-sum by neither)")
    if max_len is not None and agg != "seq-mean-token-sum-norm":
        raise ValueError(f"max_len applies to agg='seq-mean-token-sum-norm', not to {agg!r}")


def global_divisor(x: Count, like: Tensor, scale: int = 1) -> Tensor:
    """A global count ``x`` (a number, or a one-element tensor of any shape such as an all-reduced ``[1]``) times
    ``scale`` as the 0-dim fp32 divisor of a mean on ``like``'s device: as :func:`divisor` (0 divides as 1, a
    positive count as it is, also below 1), and NaN for a negative, NaN or infinite count, so the loss is NaN,
    never the sum or 0, where the count is not read on the host (an eager CPU one raises first:
    :func:`fastalign._validate.count`). An int's divisor is known on the host and made as one tensor."""
    if isinstance(x, int) and not isinstance(x, bool) and 0 <= x * scale <= 2 ** 127:  # finite in fp32
        return torch.full((), float(max(x * scale, 1)), device=like.device, dtype=torch.float32)
    # a number is filled in on the device: a tensor copied from the host would wait for it
    n = x if isinstance(x, Tensor) else torch.full((), float(x), device=like.device, dtype=torch.float32)
    n = n.to(device=like.device, dtype=torch.float32).reshape(()) * scale
    return torch.where(torch.isfinite(n) & (n >= 0), divisor(n), math.nan)


def divisor(n: Tensor) -> Tensor:
    """A count as the divisor of a mean: a zero count (whose sum is 0 too) divides as 1, so the mean of
    nothing is 0; a positive one as it is, also below 1 (a fractional mask, a count divided by the
    gradient-accumulation steps), as verl's and OpenRLHF's aggregations divide."""
    return torch.where(n > 0, n, torch.ones_like(n))


def whole_divisor(n: Tensor) -> Tensor:
    """:func:`divisor` of counts that are whole numbers >= 0 (of a bool mask, of sequences): the same values,
    in one op."""
    return n.clamp_min(1)


def _local_seqs(row_n: Tensor, every_row: bool, lmax: int = 1):
    """This rank's sequence count (every row, or the rows with a valid token) times ``lmax``, at least 1."""
    if every_row:
        return float(max(row_n.shape[0] * lmax, 1))
    rows = (row_n > 0).sum().float()
    return whole_divisor(rows * lmax if lmax != 1 else rows)  # no op for the sequence means' count


class RowAggregation:
    """:func:`aggregate_rows` for per-row valid counts ``row_n``: ``RowAggregation(row_n, agg, T, ...)(row_loss)``
    is ``aggregate_rows(row_loss, row_n, agg, T, ...)``, and the divisors read from the counts are computed once
    for every quantity of the same rows aggregated with it (a loss and its metric terms). ``whole_counts``:
    ``row_n`` holds whole numbers (the counts of a bool mask), divided by :func:`whole_divisor`. ``seq_count``
    (:data:`SEQ_COUNTS`; None: :func:`default_seq_count`): the rows a sequence mean counts without
    ``global_seqs``."""

    def __init__(self, row_n: Tensor, agg: str, T: int, global_tokens: Count = None, global_seqs: Count = None,
                 dp_size: int = 1, max_len: Optional[int] = None, *, whole_counts: bool = False,
                 seq_count: Optional[str] = None):
        # aggregate(x) = (x / per_row).sum(0) / den * dp_size, each step where it applies
        count_div = whole_divisor if whole_counts else divisor
        every_row = (seq_count or default_seq_count(agg)) == "all"
        self.per_row = self.den = None
        if agg == "token-mean":
            self.den = count_div(row_n.sum()) if global_tokens is None else global_divisor(global_tokens, row_n)
        elif agg == "seq-mean-token-sum-norm":
            lmax = T if max_len is None else int(max_len)
            if global_seqs is None:  # the local count takes no dp factor
                dp_size = 1
                self.den = _local_seqs(row_n, every_row, lmax)
            else:
                self.den = global_divisor(global_seqs, row_n, lmax)
        elif agg != "token-sum":
            if global_seqs is None:
                self.den = _local_seqs(row_n, every_row)
            else:
                self.den = global_divisor(global_seqs, row_n)
            if agg != "seq-mean-token-sum":  # seq-mean-token-mean
                self.per_row = count_div(row_n)
        self.dp_size = dp_size

    def __call__(self, row_loss: Tensor) -> Tensor:
        """``row_loss`` ``[B]``, or ``[B, k]`` (k quantities aggregated the same way; the result is ``[k]``)."""
        if self.per_row is not None:
            row_loss = row_loss / (self.per_row[:, None] if row_loss.dim() == 2 else self.per_row)
        out = row_loss.sum(0)
        if self.den is not None:
            out = out / self.den
        return out * self.dp_size if self.dp_size != 1 else out


def aggregate_rows(row_loss: Tensor, row_n: Tensor, agg: str, T: int, global_tokens: Count = None,
                   global_seqs: Count = None, dp_size: int = 1, max_len: Optional[int] = None) -> Tensor:
    """Aggregate per-row sums ``row_loss[i] = sum_t m L`` with per-row valid counts ``row_n``.

    ``row_loss`` is ``[B]`` or ``[B, k]`` (k quantities aggregated the same way in one pass; the
    result is then ``[k]``). Everything stays on the device: the counts are tensors, nothing is
    read on the host. Several quantities of the same rows: :class:`RowAggregation`.
    """
    return RowAggregation(row_n, agg, T, global_tokens, global_seqs, dp_size, max_len)(row_loss)


@renamed(mask="response_mask")
def aggregate_loss(per_token_loss: Tensor, response_mask: Tensor, agg: str = "token-mean",
                   global_tokens: Count = None, global_seqs: Count = None, dp_size: int = 1, *,
                   max_len: Optional[int] = None, seq_count: Optional[str] = None) -> Tensor:
    r"""Reduce a per-token loss ``L [B, T]`` under ``response_mask`` ``m`` (docs/math.md#aggregation), fp32 0-dim.
    A fractional ``m`` weighs each token (as verl's ``agg_loss`` and :func:`fastalign.sequence_logprobs`); a
    masked token's ``L`` (``m = 0``) never reaches the result, even when it is not finite. A negative ``m`` is
    refused: a ``ValueError`` for a CPU tensor in eager mode, a NaN result elsewhere (not read on the host).

    * ``token-mean``: ``sum(m L) / N_glob * dp``
    * ``token-sum``: ``sum(m L) * dp``
    * ``seq-mean-token-sum``: ``sum_i sum_t m L / B_glob * dp``
    * ``seq-mean-token-mean``: ``sum_i (sum_t m L / sum_t m) / B_glob * dp`` (empty rows give 0)
    * ``seq-mean-token-sum-norm`` (Dr. GRPO): ``sum(m L) / (B * L_max)``, ``L_max`` = ``max_len``
      or the padded length; with ``global_seqs`` it is ``sum(m L) / (B_glob L_max) * dp``.

    ``N_glob`` (``global_tokens``) and ``B_glob`` (``global_seqs``) are the
    counts over the whole optimizer step and all data-parallel ranks (ints or device tensors);
    without them the local counts are used. With them, averaging the gradients of ``dp_size``
    ranks gives exactly the gradient of the global mean. A count the aggregation does not divide by
    raises ``ValueError`` (:func:`counts_read` keeps those it does). ``seq_count``: the rows of the local
    sequence count (without ``global_seqs``; with it, a ``ValueError``), ``"nonempty"`` (``sum_t m > 0``, verl's
    ``agg_loss``) or ``"all"``; by default every row for ``seq-mean-token-sum-norm`` (TRL's Dr. GRPO), the
    non-empty ones for the other seq-mean modes, as :func:`fastalign.policy_loss`.
    """
    _validate.floating("per_token_loss", per_token_loss, dim=2)
    _validate.real("response_mask", response_mask, dim=2)
    _validate.shape("response_mask", response_mask, per_token_loss.shape, "per_token_loss.shape")
    _validate.same_device(per_token_loss=per_token_loss, response_mask=response_mask)
    check_agg(agg)
    check_counts(agg, global_tokens, global_seqs, max_len)
    _validate.counts(global_tokens=global_tokens, global_seqs=global_seqs, dp_size=dp_size, max_len=max_len)
    if seq_count is not None:
        check_choice("seq_count", seq_count, SEQ_COUNTS)
        if not agg.startswith("seq-mean"):
            raise ValueError(f"seq_count applies to the seq-mean aggregations, not to agg={agg!r}")
        if global_seqs is not None:
            raise ValueError("seq_count chooses the local sequence count: it does not apply with global_seqs (the "
                             "count given)")
    negative = None
    if response_mask.dtype.is_signed:  # a bool or unsigned mask is never negative
        negative = _validate.flag_or_raise((response_mask < 0).any(), response_mask, lambda: (
            "response_mask must be >= 0 (each token's weight; 0 leaves it out), got values such as "
            f"{response_mask[response_mask < 0][:3].tolist()}"))
    m = response_mask.to(torch.float32)
    mL = torch.where(m != 0, m * per_token_loss.float(), torch.zeros((), device=m.device))
    aggregate = RowAggregation(m.sum(-1), agg, per_token_loss.shape[1], global_tokens, global_seqs, dp_size, max_len,
                               seq_count=seq_count)
    return _validate.nan_if(negative, aggregate(mL.sum(-1)))
