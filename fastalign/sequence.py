"""Per-sequence sums and means of token log-probs (padded ``[B, T]`` or packed batches).

Everything here is a handful of fused elementwise/reduction ops over ``[B, T]``
(or ``[N]`` packed) values: one pass, no Python loop over sequences and no
host synchronisation, so it is safe inside ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastalign import _validate
from fastalign._deprecate import renamed
from fastalign.aggregate import divisor


_floating = _validate.any_float  # float64 is accepted too (sequence-level math, fp64 oracles)


class SequenceLogprobs(NamedTuple):
    """Per-sequence statistics, each ``[S]`` (S sequences).

    * ``sum``   — ``sum_t w_t m_t lp_t`` (``w`` token weights and LD-DPO weights, 1 when absent)
    * ``mean``  — ``sum / count`` (length-averaged log-prob; 0 where ``count`` is 0, a fractional count below 1
      as it is)
    * ``count`` — ``sum_t m_t`` (response length ``|y|``, float)
    * ``wpo``   — ``mean_t m_t (lp_t - log sum_p2_t)`` when ``sum_p2`` was given (detached), else None
    """

    sum: Tensor
    mean: Tensor
    count: Tensor
    wpo: Optional[Tensor] = None


def segment_ids(n: int, device, cu_seqlens: Optional[Tensor], position_ids: Optional[Tensor]) -> Tensor:
    """Segment id of every packed token, computed on the device."""
    if cu_seqlens is not None:
        pos = torch.arange(n, device=device, dtype=cu_seqlens.dtype)
        # token j belongs to segment s with cu[s] <= j < cu[s+1]
        return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)
    starts = (position_ids.reshape(-1) == 0).to(torch.int64)
    return torch.cumsum(starts, 0) - 1


def check_ld_alpha(ld_alpha: Optional[float]) -> None:
    """LD-DPO's ``ld_alpha``: None (off) or a number in ``[0, 1]`` (TRL's ``DPOConfig.ld_alpha`` range)."""
    if ld_alpha is not None and not 0.0 <= _validate.finite_number("ld_alpha", ld_alpha) <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1] (the LD-DPO weight past the shared length), "
                         f"got {float(ld_alpha)}")


@renamed(token_logps="token_logprobs", mask="response_mask")
def sequence_logprobs(
    token_logprobs: Tensor,
    response_mask: Optional[Tensor] = None,
    *,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    cu_seqlens: Optional[Tensor] = None,
    position_ids: Optional[Tensor] = None,
    num_sequences: Optional[int] = None,
    token_weights: Optional[Tensor] = None,
    ld_alpha: Optional[float] = None,
    ld_lengths: Optional[Tensor] = None,
    sum_p2: Optional[Tensor] = None,
) -> SequenceLogprobs:
    r"""Sum and mean of token log-probs per sequence, with masks, token weights and LD-DPO.

    Layouts:

    * **padded** — ``token_logprobs`` ``[S, T]``; ``response_mask`` ``[S, T]`` (bool or 0/1 float), or
      ``labels`` with ``ignore_index`` (mask = labels != ignore_index; an ``ignore_index`` other than
      -100 without ``labels`` raises ``ValueError``), or nothing (all valid).
    * **packed** — ``token_logprobs`` ``[N]`` (or ``[1, N]``) holding the sequences back to back,
      with ``cu_seqlens`` ``[S+1]`` (cumulative lengths, starts at 0) or ``position_ids``
      (a sequence starts where the position is 0; pass ``num_sequences`` — the count of
      sequences is needed as a shape and is never read from the device).

    Malformed offsets (``cu_seqlens`` not starting at 0, decreasing or past the tokens;
    ``position_ids`` not starting at 0 or with another count of 0s than ``num_sequences``)
    raise a ``ValueError`` for eager CPU tensors; elsewhere they are not read on the host and
    every sum is NaN.

    Per sequence ``i``: ``sum_i = sum_t w_t m_t lp_t``, ``count_i = sum_t m_t``,
    ``mean_i = sum_i / count_i`` (0 for a sequence with ``count_i = 0``; a fractional mask's count below 1
    as it is).

    ``token_weights`` (TGDPO / SparsePO style) multiply each token log-prob before the sum.
    Apply the same weights to the reference log-probs, so that the weighted log-ratio is
    ``sum_t w_t (lp_t - ref_t)``.

    LD-DPO (``ld_alpha``): with ``r_t`` the 1-based rank of token ``t`` among the valid tokens
    of its sequence and ``ℓ_i`` the public length, token ``t`` gets weight 1 if ``r_t <= ℓ_i``
    else ``ld_alpha`` (in ``[0, 1]``). ``ld_lengths`` (finite, ``>= 0``) gives ``ℓ`` per sequence; by
    default the sequences are paired — the first half chosen, the second half rejected — and
    ``ℓ = min(|y_chosen|, |y_rejected|)`` for both members of a pair.

    ``sum_p2`` (per-token :math:`\sum_j p_j^2`, e.g. ``TokenStats.sum_p2``) adds the detached
    WPO log-weight ``wpo_i = sum_t m_t (lp_t - log sum_p2_t) / count_i`` (the mean over the valid tokens,
    weighted as the sums by a fractional mask).
    """
    _floating("token_logprobs", token_logprobs, min_dim=1)
    packed = cu_seqlens is not None or position_ids is not None
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError("give cu_seqlens or position_ids, not both")
    if response_mask is not None and labels is not None:
        raise ValueError("give response_mask or labels (with ignore_index), not both")
    if not packed and token_logprobs.dim() != 2:
        raise ValueError(f"token_logprobs must be [S, T] for a padded batch (or give cu_seqlens / position_ids), "
                         f"got shape {tuple(token_logprobs.shape)}")
    if packed and not (token_logprobs.dim() == 1 or (token_logprobs.dim() == 2 and token_logprobs.shape[0] == 1)):
        raise ValueError(f"packed token_logprobs must be [N] or [1, N], got shape {tuple(token_logprobs.shape)}")
    for name, t in (("response_mask", response_mask), ("labels", labels), ("token_weights", token_weights),
                    ("sum_p2", sum_p2), ("position_ids", position_ids)):
        if t is not None:
            _validate.real(name, t)
            _validate.shape(name, t, token_logprobs.shape, "token_logprobs.shape")
            _validate.same_device(token_logprobs=token_logprobs, **{name: t})
    check_ld_alpha(ld_alpha)
    if ld_lengths is not None and ld_alpha is None:
        raise ValueError("ld_lengths applies with ld_alpha (the LD-DPO weight past each length); give ld_alpha or "
                         "leave ld_lengths None")
    if num_sequences is not None:
        _validate.at_least("num_sequences", num_sequences, 1)
    if labels is not None:
        _validate.integer("labels", labels)
        response_mask = labels != _validate.index_value("ignore_index", ignore_index)
    elif ignore_index != -100:
        raise ValueError(f"ignore_index applies with labels (mask = labels != ignore_index), got "
                         f"ignore_index={ignore_index!r} without labels; give labels or leave ignore_index -100")
    if token_weights is not None:
        _floating("token_weights", token_weights)
    if sum_p2 is not None:
        _floating("sum_p2", sum_p2)

    acc = torch.promote_types(token_logprobs.dtype, torch.float32)
    lp = token_logprobs.to(acc)
    m = torch.ones_like(lp) if response_mask is None else response_mask.to(acc)
    # the scored slots (None: every slot), whose values alone are read: masked slots may hold junk (NaN, inf)
    keep = None if response_mask is None else response_mask if response_mask.dtype == torch.bool else m != 0
    unit = response_mask is None or response_mask.dtype == torch.bool  # weights of 0 and 1 only

    if packed:
        lp, m = lp.reshape(-1), m.reshape(-1)
        n = lp.shape[0]
        malformed = None
        if cu_seqlens is not None:
            malformed = _validate.offsets("cu_seqlens", cu_seqlens, n, device=token_logprobs.device)
            S = cu_seqlens.shape[0] - 1
            if num_sequences is not None and int(num_sequences) != S:
                raise ValueError(f"num_sequences={num_sequences} but cu_seqlens describes {S} sequences")
        else:
            _validate.integer("position_ids", position_ids)
            if num_sequences is None:
                raise ValueError("num_sequences is required with position_ids (the count of sequences is a shape)")
            S = int(num_sequences)
            malformed = _validate.position_starts("position_ids", position_ids, "num_sequences", S)
        seg = segment_ids(n, lp.device, cu_seqlens, position_ids)
        # tokens outside every sequence (trailing padding of the packed buffer) count nowhere
        inside = (seg >= 0) & (seg < S)
        m = torch.where(inside, m, 0.0)
        keep = inside if keep is None else keep.reshape(-1) & inside
        seg = seg.clamp(0, S - 1)

        def reduce(x: Tensor) -> Tensor:
            return torch.zeros(S, dtype=x.dtype, device=x.device).index_add(0, seg, x)  # out of place: vmap takes it
    else:
        S = lp.shape[0]
        seg = malformed = None
        if num_sequences is not None and int(num_sequences) != S:
            raise ValueError(f"num_sequences={num_sequences} but the padded batch holds {S} sequences (its rows)")

        def reduce(x: Tensor) -> Tensor:
            return x.sum(-1)

    count = reduce(m)
    w = m
    if token_weights is not None:  # 0 in masked slots before any product: a junk weight there has no gradient either
        w = w * token_weights.reshape(m.shape).to(acc)
        w = w if keep is None else torch.where(keep, w, 0.0)
    if ld_alpha is not None:
        if ld_lengths is None:
            if S % 2:
                raise ValueError(f"LD-DPO pairs the first half (chosen) with the second half (rejected); "
                                 f"got an odd number of sequences {S}")
            public = torch.minimum(count[: S // 2], count[S // 2:]).repeat(2)
        else:
            _validate.real("ld_lengths", ld_lengths, dim=1)
            _validate.shape("ld_lengths", ld_lengths, (S,), "one length per sequence")
            public = ld_lengths.to(acc)
            bad = _validate.token_counts("ld_lengths", public)  # NaN sums off the host, never plausible ones
            if bad is not None:
                malformed = bad if malformed is None else malformed | bad
        # 1-based rank of each valid token inside its own sequence
        if packed:
            incl = torch.cumsum(m, 0)
            before = torch.zeros(S, dtype=acc, device=m.device).index_add(0, seg, m)
            start = torch.cumsum(before, 0) - before  # valid tokens before each sequence
            rank = incl - start[seg]
            lim = public[seg]
        else:
            rank = torch.cumsum(m, -1)
            lim = public.unsqueeze(-1)
        w = w * torch.where(rank <= lim, torch.ones_like(rank), torch.full_like(rank, float(ld_alpha)))
    scored = lp if unit and token_weights is None and ld_alpha is None else w * lp  # w = m = 1 where kept
    total = reduce(scored if keep is None else torch.where(keep, scored, 0.0))
    if malformed is not None:  # offsets or lengths not read on the host: NaN sums, never wrong ones
        total = _validate.nan_if(malformed, total)
    denom = divisor(count)
    wpo = None
    if sum_p2 is not None:
        adj = lp.detach() - torch.log(sum_p2.reshape(lp.shape).to(acc).detach().clamp(min=1e-30))
        adj = adj if unit else m * adj  # weighted as the sums, by a fractional mask
        adj = adj if keep is None else torch.where(keep, adj, 0.0)
        wpo = reduce(adj) / denom
    return SequenceLogprobs(total, total / denom, count, wpo)
