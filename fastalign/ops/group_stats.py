"""``fastalign::group_stats`` and ``fastalign::group_advantage``: segmented
statistics of sequence scores and the per-score advantages built from them
(docs/math.md#advantages), on the C++ CPU kernels or the CUDA kernels; on CUDA tensors of an
install built without the CUDA kernels (or with ``backend="triton"``) the plain-torch
on-device path of ``ops/group_fallback.py`` (same formulas, no host sync).

``group_stats(scores[B], index[B] | empty, lengths[B] | empty, group_size)``
returns dense group ids ``gid[B]`` (int64), statistics ``[S, 6]`` float64
(columns: count, mean, std, max, second max, length-weighted mean; one row per
group; ``S = B`` with an index, rows past the number of groups are empty
groups; ``S = ceil(B / group_size)`` with blocks) and ``ngroups[1]``. Every
size is known on the host, so the CUDA path never synchronises. Dense ids are
in order of first appearance on the CPU and in sorted key order on CUDA; they
only index the statistics.

``group_advantage`` fuses the statistics (kept per group, never stored) with
the per-score formula of ``MODES``; it is what the estimators call.

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
from fastalign._backend import backend_for
from fastalign.ops import group_fallback
from fastalign.ops._launch import kernel_op, ptr, runs_directly

STATS = ("count", "mean", "std", "max", "second", "wmean")
MODES = {"center": 0, "rloo": 1, "opo": 2, "passk": 3}


def _stat_rows(B: int, has_index: bool, group_size: int) -> int:
    return B if has_index else (B + group_size - 1) // group_size


def _stats_outputs(scores: Tensor, index: Tensor, group_size: int):
    B = scores.shape[0]
    dev = scores.device
    rows = _stat_rows(B, index.numel() > 0, group_size)
    return (
        torch.empty(B, dtype=torch.int64, device=dev),
        torch.empty(rows, len(STATS), dtype=torch.float64, device=dev),
        torch.zeros(1, dtype=torch.int64, device=dev),
    )


def _cuda_segments(index: Tensor):
    """(perm, seg, start) of stably sorted keys, all on the device; Nones for fixed blocks."""
    if index.numel() == 0:
        return None, None, None
    B = index.shape[0]
    keys, perm = torch.sort(index, stable=True)
    head = torch.ones(B, dtype=torch.int64, device=index.device)
    head[1:] = keys[1:] != keys[:-1]
    seg = torch.cumsum(head, 0) - 1
    return perm, seg, torch.empty(B, dtype=torch.int64, device=index.device)


@kernel_op("group_stats", _stats_outputs)
def group_stats(scores: Tensor, index: Tensor, lengths: Tensor, group_size: int, backend: str,
                out: tuple[Tensor, Tensor, Tensor]) -> None:
    """(gid [B] int64, stats [S, 6] float64, ngroups [1] int64) of fp32/fp64 ``scores``.

    ``index``: int64 [B] group keys, or empty to use ``group_size`` blocks.
    ``lengths``: float64 [B] weights of the weighted mean, or empty (all 1).
    """
    gid, stats, ngroups = out
    backend = backend_for("group_stats", scores.device, backend)
    if backend == "torch":
        for o, r in zip(out, group_fallback.group_stats(scores, index, lengths, group_size)):
            o.copy_(r)
        return
    B = scores.shape[0]
    f64 = scores.dtype == torch.float64
    if backend == "cuda":
        perm, seg, start = _cuda_segments(index)
        _backend.compiled().group_stats_cuda(
            scores.data_ptr(), f64, B, ptr(perm), ptr(seg), group_size, ptr(lengths),
            ptr(gid), ptr(stats), stats.shape[0], ngroups.data_ptr(), ptr(start), _backend.cuda_stream(scores))
    else:  # scratch (hash table, CSR) is kept in the C++ core
        _backend.compiled().group_stats_cpu(
            scores.data_ptr(), f64, B, ptr(index), group_size, ptr(lengths),
            ptr(gid), ptr(stats), stats.shape[0], ngroups.data_ptr())


def _advantage_outputs(scores: Tensor):
    return torch.empty_like(scores)


@kernel_op("group_advantage", _advantage_outputs)
def group_advantage(scores: Tensor, index: Tensor, lengths: Tensor, scale: Tensor, group_size: int, mode: int,
                    div_std: bool, eps: float, singleton_zero: bool, backend: str, out: Tensor) -> None:
    """Advantage of each score from its group's statistics (``MODES``), in the scores dtype.

    NaN scores give 0 and stay out of the statistics; groups of one give the raw
    score (or 0 with ``singleton_zero``); otherwise ``base(mode) [/ (std + eps)]
    * scale``, ``scale`` a float64 [1] tensor or empty (1).
    """
    backend = backend_for("group_advantage", scores.device, backend)
    if backend == "torch":
        out.copy_(group_fallback.group_advantage(scores, index, lengths, scale, group_size, mode, div_std, eps,
                                                 singleton_zero))
        return
    B = scores.shape[0]
    f64 = scores.dtype == torch.float64
    tail = (int(mode), bool(div_std), float(eps), bool(singleton_zero), ptr(scale), out.data_ptr())
    if backend == "cuda":
        perm, seg, start = _cuda_segments(index)
        ngroups = torch.empty(1 if perm is not None else 0, dtype=torch.int64, device=scores.device)
        _backend.compiled().group_advantage_cuda(
            scores.data_ptr(), f64, B, ptr(perm), ptr(seg), group_size, ptr(lengths), ptr(ngroups), ptr(start),
            *tail, _backend.cuda_stream(scores))
    else:  # the hot path: one call, scratch kept in the C++ core
        _backend.compiled().group_advantage_cpu(
            scores.data_ptr(), f64, B, ptr(index), group_size, ptr(lengths), *tail)


def call_group_advantage(scores: Tensor, index: Tensor, lengths: Tensor, scale: Tensor, group_size: int, mode: int,
                         div_std: bool, eps: float, singleton_zero: bool, backend: str) -> Tensor:
    """``group_advantage``; plain eager CPU calls skip the dispatcher round trip (~8 us of a call
    that is otherwise ~0.1 ms at 64K scores) and run the op's implementation directly
    (:func:`~fastalign.ops._launch.runs_directly`)."""
    args = (scores, index, lengths, scale, group_size, mode, div_std, eps, singleton_zero, backend)
    if runs_directly(backend_for("group_advantage", scores.device, backend), scores, index, lengths, scale):
        return group_advantage.direct(*args)
    return group_advantage(*args)
