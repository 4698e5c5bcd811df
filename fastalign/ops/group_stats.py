"""``fastalign::group_stats`` and ``fastalign::group_normalize``: segmented
statistics of sequence scores and the per-score advantage built from them
(SPEC §5), on the C++ CPU kernels or the CUDA kernels.

``group_stats(scores[B], index[B] | empty, lengths[B] | empty, group_size)``
returns dense group ids ``gid[B]`` (int64), statistics ``[6, B]`` float64
(rows: count, mean, std, max, second max, length-weighted mean; one column per
group, columns past the number of groups are empty groups) and ``ngroups[1]``.
Every output is sized by ``B`` so nothing depends on a device value: the CUDA
path never synchronises with the host. Dense ids are in order of first
appearance on the CPU and in sorted key order on CUDA; they only index the
statistics.

Groups: ``index`` (int64, any order, any values) or, when ``index`` is empty,
consecutive blocks of ``group_size``. On CUDA the keys are sorted stably with
``torch.sort`` (members stay in batch order) and the segments are numbered by a
cumulative sum of key changes; on the CPU a hash table assigns the ids.

No autograd: advantages are targets, computed under ``no_grad``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastalign import _backend
from fastalign.ops._launch import ptr

STATS = ("count", "mean", "std", "max", "second", "wmean")
MODES = {"center": 0, "rloo": 1, "opo": 2, "passk": 3}


def _hash_capacity(B: int) -> int:
    return 1 << max(1, (2 * B - 1).bit_length())  # power of two >= 2B


def _stats_outputs(scores: Tensor):
    B = scores.shape[0]
    dev = scores.device
    return (
        torch.empty(B, dtype=torch.int64, device=dev),
        torch.empty(len(STATS), B, dtype=torch.float64, device=dev),
        torch.zeros(1, dtype=torch.int64, device=dev),
    )


@torch.library.custom_op("fastalign::group_stats", mutates_args=())
def group_stats(scores: Tensor, index: Tensor, lengths: Tensor, group_size: int, backend: str
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(gid [B] int64, stats [6, B] float64, ngroups [1] int64) of fp32/fp64 ``scores``.

    ``index``: int64 [B] group keys, or empty to use ``group_size`` blocks.
    ``lengths``: float64 [B] weights of the weighted mean, or empty (all 1).
    """
    gid, stats, ngroups = out = _stats_outputs(scores)
    B = scores.shape[0]
    f64 = scores.dtype == torch.float64
    has_index = index.numel() > 0
    if backend == "cuda":
        perm = seg = start = None
        if has_index:
            keys, perm = torch.sort(index, stable=True)
            head = torch.ones(B, dtype=torch.int64, device=scores.device)
            head[1:] = keys[1:] != keys[:-1]
            seg = torch.cumsum(head, 0) - 1
            start = torch.empty(B, dtype=torch.int64, device=scores.device)
        _backend.compiled().group_stats_cuda(
            scores.data_ptr(), f64, B, ptr(perm), ptr(seg), group_size, ptr(lengths),
            ptr(gid), ptr(stats), ngroups.data_ptr(), ptr(start), _backend.cuda_stream(scores))
    elif backend == "cpp":
        cap = _hash_capacity(B) if has_index else 0
        work = torch.empty(2 * cap + 3 * B + 2 if has_index else 0, dtype=torch.int64)
        _backend.compiled().group_stats_cpu(
            scores.data_ptr(), f64, B, ptr(index), group_size, ptr(lengths),
            ptr(gid), ptr(stats), ngroups.data_ptr(), ptr(work), cap)
    else:
        raise ValueError(f"group_stats runs on the 'cpp' or 'cuda' backend, got {backend!r}")
    return out


@group_stats.register_fake
def _(scores, index, lengths, group_size, backend):
    return _stats_outputs(scores)


@torch.library.custom_op("fastalign::group_normalize", mutates_args=())
def group_normalize(scores: Tensor, gid: Tensor, stats: Tensor, scale: Tensor, mode: int, div_std: bool,
                    eps: float, singleton_zero: bool, backend: str) -> Tensor:
    """Advantage of each score from its group's statistics (``MODES``), in the scores dtype.

    NaN scores give 0; groups of one give the raw score (or 0 with
    ``singleton_zero``); otherwise ``base(mode) [/ (std + eps)] * scale`` where
    ``scale`` is a float64 [1] tensor or empty (1).
    """
    out = torch.empty_like(scores)
    B = scores.shape[0]
    args = (scores.data_ptr(), scores.dtype == torch.float64, B, gid.data_ptr(), stats.data_ptr(), int(mode),
            bool(div_std), float(eps), bool(singleton_zero), ptr(scale), out.data_ptr())
    if backend == "cuda":
        _backend.compiled().group_normalize_cuda(*args, _backend.cuda_stream(scores))
    elif backend == "cpp":
        _backend.compiled().group_normalize_cpu(*args)
    else:
        raise ValueError(f"group_normalize runs on the 'cpp' or 'cuda' backend, got {backend!r}")
    return out


@group_normalize.register_fake
def _(scores, gid, stats, scale, mode, div_std, eps, singleton_zero, backend):
    return torch.empty_like(scores)
