"""``fastalign::linear_stats``: docs/math.md#token-statistics statistics straight from hidden states.

Logits ``z = softcap(scale * (h @ W.T + b)) / T`` are never stored for all tokens at once. Forward
and backward are custom ops (outputs declared once, fakes from them) with autograd, so
``torch.compile(fullgraph=True)`` sees one node each. The paths live beside this glue:

* ``cpp`` (CPU tensors): ``ops/linear_cpu.py``, BLAS products and the C++ row kernels;
* ``triton`` (CUDA tensors; CPU tensors in the interpreter): ``ops/linear_triton.py``;
* vocabulary pieces (chunks, splits, shards) are merged by ``ops/vocab_pieces.py``, and
  ``ops/vocab_parallel.py`` runs these ops on one shard of the vocabulary per rank.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastalign._backend import backend_for
from fastalign.ops import linear_cpu, linear_triton
from fastalign.ops._launch import check_rows, kernel_op, linear_outputs, save_for_backward


def _outputs(hidden: Tensor, labels: Tensor, entropy: bool, sum_p2: bool, argmax: bool, mean_logit: bool):
    """The statistics of the rows of ``hidden``; ``labels`` checked first (the kernels read them by pointer)."""
    check_rows("labels", labels, hidden.shape[0], torch.int64)
    return linear_outputs(hidden.shape[0], hidden.device, entropy, sum_p2, argmax, mean_logit)


@kernel_op("linear_stats", _outputs)
def linear_stats(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], low_rank_hidden: Optional[Tensor],
    low_rank_weight: Optional[Tensor], labels: Tensor, scale: float, softcap: float,
    inv_temperature: float, ignore_index: int, entropy: bool, sum_p2: bool, argmax: bool, backend: str,
    chunk_tokens: int, chunk_vocab: int, skip_threshold: float, mean_logit: bool = False,
    out: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor] = (),
) -> None:
    """Returns (logprobs, entropy, sum_p2, argmax, argmax_logit, lse, mean_logit, log_c) for ``hidden [N, H]``,
    ``weight [V, H]`` and, optional, a low-rank term ``low_rank_hidden [N, r] @ low_rank_weight[V, r].T`` added to
    the logits.

    ``softcap`` 0 means off. Unrequested outputs are empty. ``argmax``: the first index of the largest logit ``z``
    (before the temperature: two logits may round to one ``z / T``; a NaN passed over), ``argmax_logit`` that
    logit (used to merge argmax across vocabulary shards); ``mean_logit`` the mean of ``z`` over this
    weight's vocabulary, before the temperature (differentiable); ``log_c`` the rounding error of the fp32 lse at
    the rows with ``|lse| >= 32`` (0 elsewhere), which backward removes from ``log p``
    (:func:`~fastalign.ops.vocab_pieces.log_mass`).
    ``skip_threshold`` only affects the Triton backward.
    """
    if hidden.shape[0] == 0:
        return
    args = (hidden, weight, bias, _pair(low_rank_hidden, low_rank_weight), labels, scale, softcap, inv_temperature,
            ignore_index, out)
    if backend_for("linear_stats", hidden.device, backend) == "cpp":
        linear_cpu.forward_labelled(*args, chunk_tokens, chunk_vocab)
    else:  # the labelled rows put first on the device (ops/device_compaction.py)
        linear_triton.forward(*args)


def _pair(low_rank_hidden: Optional[Tensor], low_rank_weight: Optional[Tensor]):
    """The low-rank term ``(a, L)`` as the paths take it, or None."""
    return None if low_rank_hidden is None else (low_rank_hidden, low_rank_weight)


def _grad_outputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], low_rank_hidden: Optional[Tensor],
                  low_rank_weight: Optional[Tensor], labels: Tensor, need_hidden: bool, need_weight: bool,
                  need_bias: bool, need_low_rank: bool):
    """(d hidden, d weight, d bias, d low_rank_hidden, d low_rank_weight) in the input dtypes; a gradient not
    needed is an empty tensor. ``labels`` checked first (the kernels read them by pointer)."""
    check_rows("labels", labels, hidden.shape[0], torch.int64)
    def grad(t: Optional[Tensor], need: bool) -> Tensor:
        if t is None or not need:
            return weight.new_empty((0,), dtype=weight.dtype if t is None else t.dtype)
        return t.new_empty(t.shape)

    return (grad(hidden, need_hidden), grad(weight, need_weight), grad(bias, need_bias),
            grad(low_rank_hidden, need_low_rank), grad(low_rank_weight, need_low_rank))


def _zeroed(out: Tensor, dtype: torch.dtype) -> Tensor:
    """``out`` set to 0 when it has ``dtype``, else a zeroed accumulator of that dtype (copied back once)."""
    return out.zero_() if out.dtype == dtype else torch.zeros(out.shape, dtype=dtype, device=out.device)


@kernel_op("linear_stats_backward", _grad_outputs)
def linear_stats_backward(
    grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor], grad_sum_p2: Optional[Tensor],
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], low_rank_hidden: Optional[Tensor],
    low_rank_weight: Optional[Tensor], labels: Tensor, lse: Tensor, entropy: Tensor,
    sum_p2: Tensor, scale: float, softcap: float, inv_temperature: float, ignore_index: int, backend: str,
    chunk_tokens: int, chunk_vocab: int, skip_threshold: float, need_hidden: bool, need_weight: bool,
    need_bias: bool, need_low_rank: bool, log_c: Tensor, grad_mean_logit: Optional[Tensor] = None,
    out: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] = (),
) -> None:
    """(d hidden, d weight, d bias, d low_rank_hidden, d low_rank_weight) in the input dtypes; a gradient not
    needed is an empty tensor.
    ``log_c``: the forward's (or, for a shard of the vocabulary, the merged) correction of each row's
    ``log p = z / T - lse - log c``.
    ``grad_mean_logit``: the gradient of the mean logit over this weight's vocabulary (none at ignored rows).

    Sums run in fp32: d(bias) always, and the others on the CPU, in fp32 accumulators cast once at the
    end (the Triton path accumulates d(weight) and d(low_rank_weight) in fp32 itself)."""
    g = [None if x is None else x.contiguous().float() for x in (grad_logprobs, grad_entropy, grad_sum_p2)]
    g_mean = None
    if grad_mean_logit is not None:  # d mean / d z_j = 1 / V at every labelled row, none at an ignored one
        g_mean = torch.where(labels != ignore_index, grad_mean_logit.float(), 0.0).contiguous()
    if not entropy.numel():
        g[1] = None
    if not sum_p2.numel():
        g[2] = None
    cpp = backend_for("linear_stats_backward", hidden.device, backend) == "cpp"
    acc_dtype = torch.float32 if not hidden.is_cuda else None
    accs = [_zeroed(t, torch.float32 if t is out[2] else acc_dtype or t.dtype) for t in out]
    if hidden.shape[0] and any(x is not None for x in (*g, g_mean)):
        args = (hidden, weight, bias, _pair(low_rank_hidden, low_rank_weight), labels, lse, entropy, sum_p2, scale,
                softcap, inv_temperature, ignore_index)
        dh, dw, db, da, dl = (acc if result.numel() else None for result, acc in zip(out, accs))
        if cpp:
            linear_cpu.backward_labelled(*g, *args, chunk_tokens, chunk_vocab, dh, dw, db, (da, dl), log_c, g_mean)
        else:
            linear_triton.backward(*g, *args, chunk_tokens, skip_threshold, dh, dw, db, (da, dl), log_c, g_mean)
    for result, acc in zip(out, accs):
        if acc is not result:
            result.copy_(acc)


_TENSOR_INPUTS = 5  # hidden, weight, bias, low_rank_hidden, low_rank_weight: the differentiable inputs
_OTHER_INPUTS = 13


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, a, lw, labels, scale, softcap, inv_t, ignore_index, _e, _s, _a, backend, nc, vc,
     skip, *_mean) = inputs
    _lp, ent, sp2, _amax, _amax_val, lse, _m, log_c = output
    save_for_backward(ctx, hidden, weight, bias, a, lw, labels, lse, ent, sp2, log_c)
    ctx.args = (scale, softcap, inv_t, ignore_index, backend, nc, vc, skip)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_lp, g_ent, g_sp2, _g_amax, _g_amax_val, _g_lse, g_mean, _g_log_c):
    hidden, weight, bias, a, lw, labels, lse, ent, sp2, log_c = ctx.saved_tensors
    present = (True, True, bias is not None, a is not None, a is not None)
    need = [bool(n and p) for n, p in zip(ctx.needs_input_grad[:_TENSOR_INPUTS], present)]
    if not any(need):
        return (None,) * (_TENSOR_INPUTS + _OTHER_INPUTS)
    grads = linear_stats_backward(g_lp, g_ent, g_sp2, hidden, weight, bias, a, lw, labels, lse, ent, sp2, *ctx.args,
                                  need[0], need[1], need[2], need[3] or need[4], log_c, g_mean)
    return (*(gr if n else None for gr, n in zip(grads, need)), *((None,) * _OTHER_INPUTS))


linear_stats.register_autograd(_backward, setup_context=_setup_context)
