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
from fastalign.ops._launch import kernel_op, stat_outputs


def _outputs(hidden: Tensor, entropy: bool, sum_p2: bool, argmax: bool):
    return stat_outputs(hidden.shape[0], hidden.device, entropy, sum_p2, argmax, argmax_value=True)


@kernel_op("linear_stats", _outputs)
def linear_stats(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, scale: float, softcap: float,
    inv_temperature: float, ignore_index: int, entropy: bool, sum_p2: bool, argmax: bool, backend: str,
    chunk_tokens: int, chunk_vocab: int, skip_threshold: float,
    out: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
) -> None:
    """Returns (logprobs, entropy, sum_p2, argmax, argmax_logit, lse) for ``hidden [N, H]``, ``weight [V, H]``.

    ``softcap`` 0 means off. Unrequested outputs are empty. ``argmax_logit`` is the
    max of ``z / T`` (used to merge argmax across vocabulary shards).
    ``skip_threshold`` only affects the Triton backward.
    """
    if hidden.shape[0] == 0:
        return
    args = (hidden, weight, bias, labels, scale, softcap, inv_temperature, ignore_index, out)
    if backend_for("linear_stats", hidden.device, backend) == "cpp":
        linear_cpu.forward_labelled(*args, chunk_tokens, chunk_vocab)
    else:  # every row: skipping ignored ones would need a bounded gather of the labelled rows (no host sync)
        linear_triton.forward(*args)


def _grad_outputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_hidden: bool, need_weight: bool,
                  need_bias: bool):
    """(d hidden, d weight, d bias) in the input dtypes; a gradient not needed is an empty tensor."""
    dh = hidden.new_empty(hidden.shape if need_hidden else (0,))
    dw = weight.new_empty(weight.shape if need_weight else (0,))
    b_dtype = bias.dtype if bias is not None else weight.dtype
    db = weight.new_empty(bias.shape if (need_bias and bias is not None) else (0,), dtype=b_dtype)
    return dh, dw, db


def _zeroed(out: Tensor, dtype: torch.dtype) -> Tensor:
    """``out`` set to 0 when it has ``dtype``, else a zeroed accumulator of that dtype (copied back once)."""
    return out.zero_() if out.dtype == dtype else torch.zeros(out.shape, dtype=dtype, device=out.device)


@kernel_op("linear_stats_backward", _grad_outputs)
def linear_stats_backward(
    grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor], grad_sum_p2: Optional[Tensor],
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor, entropy: Tensor,
    sum_p2: Tensor, scale: float, softcap: float, inv_temperature: float, ignore_index: int, backend: str,
    chunk_tokens: int, chunk_vocab: int, skip_threshold: float, need_hidden: bool, need_weight: bool,
    need_bias: bool, log_c: Optional[Tensor] = None, out: tuple[Tensor, Tensor, Tensor] = (),
) -> None:
    """(d hidden, d weight, d bias) in the input dtypes; a gradient not needed is an empty tensor.
    ``log_c``: the rows' log mass over the whole vocabulary when ``weight`` is one shard of it.

    Sums run in fp32: d(bias) always, and d(hidden), d(weight) on the CPU, in fp32 accumulators cast
    once at the end (the Triton path accumulates d(weight) in fp32 itself)."""
    dh, dw, db = out
    g = [None if x is None else x.contiguous().float() for x in (grad_logprobs, grad_entropy, grad_sum_p2)]
    if not entropy.numel():
        g[1] = None
    if not sum_p2.numel():
        g[2] = None
    cpp = backend_for("linear_stats_backward", hidden.device, backend) == "cpp"
    acc_dtype = torch.float32 if not hidden.is_cuda else None
    dh_acc = _zeroed(dh, acc_dtype or dh.dtype)
    dw_acc = _zeroed(dw, acc_dtype or dw.dtype)
    db_acc = _zeroed(db, torch.float32)
    if hidden.shape[0] and any(x is not None for x in g):
        args = (hidden, weight, bias, labels, lse, entropy, sum_p2, scale, softcap, inv_temperature, ignore_index)
        grads = (dh_acc if need_hidden else None, dw_acc if need_weight else None, db_acc if db.numel() else None)
        if cpp:
            linear_cpu.backward_labelled(*g, *args, chunk_tokens, chunk_vocab, *grads, log_c)
        else:
            linear_triton.backward(*g, *args, chunk_tokens, skip_threshold, *grads, log_c)
    for result, acc in ((dh, dh_acc), (dw, dw_acc), (db, db_acc)):
        if acc is not result:
            result.copy_(acc)


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, scale, softcap, inv_t, ignore_index, _e, _s, _a, backend, nc, vc,
     skip) = inputs
    _lp, ent, sp2, _amax, _amax_val, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent, sp2)
    ctx.args = (scale, softcap, inv_t, ignore_index, backend, nc, vc, skip)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_lp, g_ent, g_sp2, _g_amax, _g_amax_val, _g_lse):
    hidden, weight, bias, labels, lse, ent, sp2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not (need[0] or need[1] or (bias is not None and need[2])):
        return (None,) * 15
    dh, dw, db = linear_stats_backward(g_lp, g_ent, g_sp2, hidden, weight, bias, labels, lse, ent, sp2,
                                       *ctx.args, bool(need[0]), bool(need[1]), bool(bias is not None and need[2]))
    return ((dh if need[0] else None), (dw if need[1] else None), (db if bias is not None and need[2] else None),
            *((None,) * 12))


linear_stats.register_autograd(_backward, setup_context=_setup_context)
