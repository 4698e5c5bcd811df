"""Clip-Cov / KL-Cov selection (docs/math.md#clip-cov-and-kl-cov) in plain torch on the tensors' device: the path of
CUDA tensors when the CUDA kernels were not compiled. No host synchronisation (k stays a device
tensor; the selection is a sort and a rank comparison), deterministic, and the same selection as
the C++ / CUDA kernels: the same 64-bit keys (csrc/common/cov_select_keys.h),

    cov_t = (A_t - mean A) (lp_t - mean lp),   means = sums[0:2] / max(sums[2], 1)  (fp32)
    key_t = (order_t << 32) | t      for candidates, none otherwise
    clip_cov: candidates valid, L2 <= L1, lb < cov_t < ub; order = hash32(hash32(t ^ s_lo) + s_hi)
    kl_cov:   candidates valid, cov_t not NaN;              order = ~orderable_bits(cov_t)

and the k = max(floor(ratio * n_local), 1) smallest keys are picked. Unsigned 64-bit keys are kept
in int64 as (order - 2^31) * 2^32 + t, which sorts the same way.
"""
from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_NO_KEY = torch.iinfo(torch.int64).max


def _srl(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _u64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def splitmix64(x: Tensor) -> Tensor:
    x = x + _u64(0x9E3779B97F4A7C15)
    x = (x ^ _srl(x, 30)) * _u64(0xBF58476D1CE4E5B9)
    x = (x ^ _srl(x, 27)) * _u64(0x94D049BB133111EB)
    return x ^ _srl(x, 31)


def hash32(x: Tensor) -> Tensor:
    """lowbias32 on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def float_order_bits(f: Tensor) -> Tensor:
    """Monotone uint32 image of fp32 values (a < b <=> bits(a) < bits(b)), in int64; -0 and +0 share a key."""
    f = torch.where(f == 0, 0.0, f)
    u = f.contiguous().view(torch.int32).to(torch.int64) & _M32
    return torch.where((u & 0x80000000) != 0, (~u) & _M32, u | 0x80000000)


def cov_sums(lp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """[sum_v A, sum_v lp, n_valid] (fp32) of [B, T] rows; rows summed in fp64, then in order."""
    v = mask != 0
    rows = torch.stack([torch.where(v, adv, 0.0).double().sum(1), torch.where(v, lp, 0.0).double().sum(1),
                        v.double().sum(1)], 1)
    return rows.sum(0).float()


def cov_select(lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, sums: Tensor, n_local: Tensor, seed: Tensor,
               mode: int, ratio: float, lb: float, ub: float, eps_low: float, eps_high: float) -> Tensor:
    """uint8 [B, T] of the picked tokens (see the module docstring)."""
    N = lp.numel()
    lp_f, old_f, a_f = (t.reshape(-1).float() for t in (lp, old, adv))
    valid = mask.reshape(-1) != 0
    n = torch.clamp(sums[2], min=1.0)
    mean_a, mean_lp = sums[0] / n, sums[1] / n
    cov = (a_f - mean_a) * (lp_f - mean_lp)
    idx = torch.arange(N, device=lp.device, dtype=torch.int64)
    if mode == 0:
        rho = torch.exp(lp_f - old_f)
        L1 = -a_f * rho
        lo, hi = torch.tensor(1.0 - eps_low, dtype=torch.float32), torch.tensor(1.0 + eps_high, dtype=torch.float32)
        L2 = -a_f * torch.where(rho < lo, lo, torch.where(rho > hi, hi, rho))
        cand = valid & (L2 <= L1) & (cov > torch.tensor(lb, dtype=torch.float32)) & (
            cov < torch.tensor(ub, dtype=torch.float32))
        sm = splitmix64(seed.reshape(1).to(torch.int64))
        s_lo, s_hi = sm & _M32, _srl(sm, 32)
        order = hash32((hash32((idx & _M32) ^ s_lo) + s_hi) & _M32)
    else:
        cand = valid & (cov == cov)
        order = (~float_order_bits(cov)) & _M32
    key = torch.where(cand, (order - (1 << 31)) * (1 << 32) + (idx & _M32), _NO_KEY)
    k = torch.clamp(torch.floor(ratio * n_local.reshape(1).double()), min=1.0)
    ordered, perm = torch.sort(key)
    picked = (idx.double() < k) & (ordered != _NO_KEY)
    sel = torch.zeros(N, dtype=torch.uint8, device=lp.device)
    sel[perm] = picked.to(torch.uint8)
    return sel.view(lp.shape)
