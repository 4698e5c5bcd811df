"""Group statistics and group-relative advantages (docs/math.md#advantages) in plain torch on the tensors' device:
the path of CUDA tensors when the CUDA kernels were not compiled. No host synchronisation (every
size is known on the host: B statistics rows with an index, ceil(B / group_size) with blocks) and
deterministic: members are put in group order by a stable sort of the keys, and each group is
reduced by ``torch.segment_reduce`` (no atomics). The formulas are those of
csrc/common/advantage_math.h, in float64, over each group's non-NaN scores:

    n, mean = (max == min ? max : sum / n), std = sqrt(sum (x - mean)^2 / (n - 1)) (0 if n < 2 or all equal),
    max, second (the largest of the rest; a repeated max is its own second), wmean = sum L x / sum L

and the advantage of a score x in a group (NaN score: 0; group of one: x, or 0 with singleton_zero):

    center (x - mean) s,  rloo (x - mean) n / (n - 1) s,  opo (x - wmean) s,  passk x == max ? (max - second) s : 0

with s = scale [/ (std + eps)] (/ 1 where std + eps = 0: equal scores, eps 0). Sums and squares run on x / 2^e per group (2^e about the group's
largest magnitude, at least 1), which is exact scaling, so finite scores near the double range never overflow.
"""
from __future__ import annotations

import torch
from torch import Tensor

CENTER, RLOO, OPO, PASSK = range(4)


def _segments(index: Tensor, B: int, group_size: int, device):
    """(order, seg, lengths, S): members in group order, their dense ids, group sizes, stats rows."""
    if index.numel() == 0:
        order = torch.arange(B, device=device)
        seg = order // group_size
        S = (B + group_size - 1) // group_size
    else:
        keys, order = torch.sort(index, stable=True)
        head = torch.ones(B, dtype=torch.int64, device=device)
        head[1:] = (keys[1:] != keys[:-1]).to(torch.int64)
        seg = torch.cumsum(head, 0) - 1
        S = B
    lengths = torch.zeros(S, dtype=torch.int64, device=device).index_add_(0, seg, torch.ones_like(seg))
    return order, seg, lengths, S


def _reduce(x: Tensor, how: str, lengths: Tensor, initial: float) -> Tensor:
    return torch.segment_reduce(x, how, lengths=lengths, unsafe=True, initial=initial)


def _stats(scores: Tensor, index: Tensor, lengths_in: Tensor, group_size: int):
    """Per-member (gid, order) and per-group [S] float64 tensors (n, mean, sd, max, second, wmean)."""
    B = scores.shape[0]
    dev = scores.device
    order, seg, lengths, S = _segments(index, B, group_size, dev)
    x = scores.double()[order]
    valid = ~torch.isnan(x)
    L = lengths_in.double()[order] if lengths_in.numel() else torch.ones_like(x)
    inf = float("inf")
    n = _reduce(valid.double(), "sum", lengths, 0.0)
    mx = _reduce(torch.where(valid, x, -inf), "max", lengths, -inf)
    mn = _reduce(torch.where(valid, x, inf), "min", lengths, inf)
    # Sums run on x / 2^e, 2^e the group's largest magnitude rounded down to a power of two: exact
    # scaling (the same numbers, bitwise), and no overflow of sums or squares for finite scores. Never
    # scaled up (2^e >= 1): tiny scores are summed as they are, as the C++/CUDA kernels do (a scaled-up std
    # of subnormal scores would be nonzero, and scale / std infinite).
    big = torch.maximum(mx.abs(), mn.abs())
    unit = torch.where(torch.isfinite(big) & (big >= 1),
                       torch.ldexp(torch.ones_like(big), torch.frexp(big)[1] - 1), 1.0)
    xs = x / unit[seg]
    total = _reduce(torch.where(valid, xs, 0.0), "sum", lengths, 0.0)  # in units of 2^e, as the rest
    lsum = _reduce(torch.where(valid, L, 0.0), "sum", lengths, 0.0)
    lxsum = _reduce(torch.where(valid, L * xs, 0.0), "sum", lengths, 0.0)
    at_max = valid & (x == mx[seg])
    repeated = _reduce(at_max.double(), "sum", lengths, 0.0) >= 2
    below = _reduce(torch.where(valid & (x < mx[seg]), x, -inf), "max", lengths, -inf)
    second = torch.where(repeated, mx, below)
    equal = mx == mn
    mean = torch.where(n == 0, 0.0, torch.where(equal, mx, total / torch.clamp(n, min=1.0) * unit))
    m2 = _reduce(torch.where(valid, (xs - (mean / unit)[seg]) ** 2, 0.0), "sum", lengths, 0.0)
    sd = torch.where((n > 1) & ~equal, torch.sqrt(m2 / torch.clamp(n - 1.0, min=1.0)) * unit, 0.0)
    wmean = torch.where((lsum > 0) & ~equal, lxsum / torch.where(lsum > 0, lsum, 1.0) * unit, mean)
    gid = torch.empty(B, dtype=torch.int64, device=dev)
    gid[order] = seg
    ngroups = (seg[-1:] + 1) if B else torch.zeros(1, dtype=torch.int64, device=dev)
    return gid, order, seg, x, (n, mean, sd, mx, second, wmean), ngroups


def group_stats(scores: Tensor, index: Tensor, lengths: Tensor, group_size: int):
    """(gid [B] int64, stats [S, 6] float64, ngroups [1] int64), as ``fastalign::group_stats``."""
    gid, _order, _seg, _x, cols, ngroups = _stats(scores, index, lengths, group_size)
    return gid, torch.stack(cols, 1), ngroups.reshape(1).clone()


def group_advantage(scores: Tensor, index: Tensor, lengths: Tensor, scale: Tensor, group_size: int, mode: int,
                    div_std: bool, eps: float, singleton_zero: bool) -> Tensor:
    """Advantages in the scores dtype, as ``fastalign::group_advantage``."""
    B = scores.shape[0]
    if B == 0:
        return torch.empty_like(scores)
    _gid, order, seg, x, (n, mean, sd, mx, second, wmean), _ng = _stats(scores, index, lengths, group_size)
    s = scale.double().reshape(-1)[0] if scale.numel() else torch.ones((), dtype=torch.float64, device=x.device)
    # std + eps = 0 (eps 0, equal scores): every x - mean is exactly 0, so divide by 1, not 0 (0 * inf = NaN)
    d = sd + eps
    mul = torch.where(d == 0, s, s / d) if div_std else s.expand_as(sd)
    if mode == RLOO:
        adv = (x - mean[seg]) * (mul * n / torch.clamp(n - 1.0, min=1.0))[seg]
    elif mode == OPO:
        adv = (x - wmean[seg]) * mul[seg]
    elif mode == PASSK:
        adv = torch.where(x == mx[seg], ((mx - second) * mul)[seg], 0.0)
    else:
        adv = (x - mean[seg]) * mul[seg]
    single = (n < 2)[seg]
    adv = torch.where(single, 0.0 if singleton_zero else x, adv)
    adv = torch.where(torch.isnan(x), 0.0, adv)
    out = torch.empty_like(scores)
    out[order] = adv.to(scores.dtype)
    return out
