"""The head's products at a support of ``K`` ids per row, never over the whole vocabulary.

For rows ``h [n, H]``, the head ``W [V, H]`` and the ids ``[n, K]`` (each in the vocabulary):

    dots      z[r, k] = h[r] . W[ids[r, k]]                               K dot products per row
    combine   d[r]    = sum_k g[r, k] W[ids[r, k]]                        K rows of the head per row
    scatter   D[v]    = sum over (r, k) with ids[r, k] = v of g[r, k] x[r]  into the rows of [V, C]

``2 n K H`` FLOPs each, against ``2 n V H`` for a product over the vocabulary; results in fp32. On the CPU they
are products with the support as a sparse CSR matrix ``S [n, V]`` (``sampled_addmm``, ``S @ W``, ``S^T @ x``:
multithreaded, deterministic; a support longer than the vocabulary takes the gathered form). On a GPU (and under
``torch.compile``) the support's rows of the head are gathered into fp32 a block of rows at a time
(``FASTALIGN_BLOCK_MIB``) for the first two, and the scatter is torch's embedding backward (it sorts the ids:
deterministic, no atomics), a slice of ``x``'s columns at a time.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastalign.ops.linear_block import row_blocks
from fastalign.ops.single_pass import block_budget_rows


def _eager_cpu(t: Tensor) -> bool:
    """Whether ``t`` is a CPU tensor outside ``torch.compile``'s tracing (the CPU's own forms of the products)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def sparse_form(t: Tensor, ids: Tensor, vocab: int) -> bool:
    """Whether the products take the sparse CSR form (eager CPU tensors, a support of at most ``vocab`` ids per
    row: torch's CSR products refuse more stored entries than the matrix has) or the gathered one."""
    return _eager_cpu(t) and ids.shape[-1] <= vocab


def _consume_beta_notice() -> None:
    """torch warns once per process, at the first sparse CSR tensor, that its CSR support is in beta: that tensor is
    made here, at import, with the notice ignored. So no call swaps the process's warning filters (a
    ``warnings.catch_warnings()`` around each call did, which is not thread-safe: calls from several threads left
    its "ignore" installed), and a caller's ``-W error`` does not turn the notice into an error inside a call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0]), (1, 1),
                                check_invariants=False)


_consume_beta_notice()


def _csr(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple) -> Tensor:
    """A CSR matrix of these parts."""
    return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _support_matrix(ids: Tensor, values: Tensor, vocab: int) -> Tensor:
    """``S [n, V]`` with ``values[r, k]`` at ``(r, ids[r, k])`` (repeated ids add up)."""
    n, K = ids.shape
    crow = torch.arange(0, n * K + 1, K, device=ids.device)
    return _csr(crow, ids.reshape(-1), values.reshape(-1), (n, vocab))


def _gathered_blocks(ids: Tensor, weight: Tensor):
    """``(block, rows [b, K, H] fp32)``: the head's rows at the ids of each block of rows, within the budget
    (each row's ``K x H`` in fp32 and in the head's dtype)."""
    per_block = block_budget_rows(ids.shape[1] * weight.shape[1], weight.new_empty(0, dtype=torch.float32), tiles=2)
    for block in row_blocks(ids.shape[0], per_block):
        yield block, F.embedding(block.take(ids), weight).float()


def dots(h: Tensor, weight: Tensor, ids: Tensor) -> Tensor:
    """``z [n, K]`` fp32: ``h[r] . W[ids[r, k]]``."""
    if sparse_form(h, ids, weight.shape[0]):
        zeros = torch.zeros(ids.shape, dtype=torch.float32, device=h.device)
        return torch.sparse.sampled_addmm(_support_matrix(ids, zeros, weight.shape[0]), h.float(), weight.float().t(),
                                          beta=0.0).values().view(ids.shape)
    z = torch.empty(ids.shape, dtype=torch.float32, device=h.device)
    for block, rows in _gathered_blocks(ids, weight):
        block.put(z, torch.bmm(rows, block.take(h).float().unsqueeze(-1)).squeeze(-1))
    return z


def combine(g: Tensor, weight: Tensor, ids: Tensor) -> Tensor:
    """``d [n, H]`` fp32: ``sum_k g[r, k] W[ids[r, k]]``."""
    if sparse_form(g, ids, weight.shape[0]):
        return _support_matrix(ids, g.float(), weight.shape[0]) @ weight.float()
    d = torch.empty(ids.shape[0], weight.shape[1], dtype=torch.float32, device=g.device)
    for block, rows in _gathered_blocks(ids, weight):
        block.put(d, torch.bmm(block.take(g).float().unsqueeze(1), rows).squeeze(1))
    return d


def scatter(g: Tensor, ids: Tensor, x: Optional[Tensor], vocab: int) -> Tensor:
    """``D [vocab, C]`` fp32 for ``x [n, C]`` (``[vocab]`` for ``x`` None, as if 1): row ``v`` sums
    ``g[r, k] x[r]`` over the ``(r, k)`` with ``ids[r, k] = v``."""
    flat = ids.reshape(-1)
    if _eager_cpu(g) and x is None:  # a sum per id: one sequential pass on the CPU
        return torch.bincount(flat, weights=g.float().reshape(-1), minlength=vocab).float()
    if sparse_form(g, ids, vocab):
        order = flat.argsort(stable=True)  # S^T row by row: the ids ascending, the rows ascending within one
        crow = torch.zeros(vocab + 1, dtype=torch.int64, device=g.device)
        crow[1:] = torch.bincount(flat, minlength=vocab).cumsum(0)
        transposed = _csr(crow, order // ids.shape[1], g.float().reshape(-1)[order], (vocab, ids.shape[0]))
        return transposed @ x.float()
    if x is None:
        return torch.ops.aten.embedding_dense_backward(g.float().reshape(-1, 1), flat, vocab, -1, False).squeeze(1)
    out = torch.empty(vocab, x.shape[1], dtype=torch.float32, device=g.device)
    cols = block_budget_rows(flat.numel() + vocab, out)
    for c0 in range(0, x.shape[1], cols):
        part = g.float().unsqueeze(-1) * x[:, None, c0:c0 + cols].float()
        out[:, c0:c0 + cols] = torch.ops.aten.embedding_dense_backward(part.reshape(flat.numel(), part.shape[-1]),
                                                                       flat, vocab, -1, False)
    return out
