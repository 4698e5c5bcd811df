"""flash-attn's kernels in plain torch, so that transformers' own flash-attention path runs on the CPU.

``transformers`` sends every ``flash_attention_*`` call (and a hub kernel's) through
``_flash_attention_forward``, which decides from the attention mask, the position ids and any
``cu_seq_lens_*`` keywords whether a batch is padded, packed into one row, or plain, and calls a
flash-attn entry point accordingly. :func:`use_flash_attention` leaves that decision to
transformers and swaps only the entry points for these references: :func:`flash_attn_func`
(``[B, T, H, D]`` rows, each one sequence) and :func:`flash_attn_varlen_func` (a flattened batch,
one sequence between consecutive ``cu_seqlens``).
"""
import math

import torch


def _attend(q, k, v, causal, softmax_scale, window_size, softcap):
    """Softmax attention of ``q [T, Hq, D]`` over ``k, v [S, Hk, D]`` (grouped heads), the last query aligned with the
    last key, in at least fp32."""
    heads, dim = q.shape[1], q.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    k = k.repeat_interleave(heads // k.shape[1], 1).to(dtype)
    v = v.repeat_interleave(heads // v.shape[1], 1).to(dtype)
    scores = torch.einsum("thd,shd->hts", q.to(dtype), k) * (dim ** -0.5 if softmax_scale is None else softmax_scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    query = torch.arange(q.shape[0])[:, None] + (k.shape[0] - q.shape[0])
    key = torch.arange(k.shape[0])[None]
    seen = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool)
    if causal:
        seen &= key <= query
    if window_size is not None and window_size[0] >= 0:
        seen &= key >= query - window_size[0]
    weights = scores.masked_fill(~seen, -math.inf).softmax(-1)
    return torch.einsum("hts,shd->thd", weights, v).to(q.dtype)


class OutOfBounds(ValueError):
    """``cu_seqlens`` that reach past the tokens: flash-attn would read memory outside q, k and v."""


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    if int(cu_seqlens_q[-1]) > q.shape[0] or int(cu_seqlens_k[-1]) > k.shape[0]:
        raise OutOfBounds(f"cu_seqlens end at {int(cu_seqlens_q[-1])} / {int(cu_seqlens_k[-1])} for {q.shape[0]} "
                          f"queries and {k.shape[0]} keys")
    out = torch.full_like(q, math.nan)  # tokens outside every sequence are left unwritten, as by flash-attn
    bounds = zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(),
                 cu_seqlens_k[:-1].tolist(), cu_seqlens_k[1:].tolist())
    for q0, q1, k0, k1 in bounds:
        out[q0:q1] = _attend(q[q0:q1], k[k0:k1], v[k0:k1], causal, softmax_scale, window_size, softcap)
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False):
    return torch.stack([_attend(q[b], k[b], v[b], causal, softmax_scale, window_size, softcap)
                        for b in range(q.shape[0])])


def use_flash_attention(monkeypatch, model, implementation="flash_attention_2"):
    """Runs ``model`` (its text config too) through transformers' flash-attention path with these kernels."""
    import transformers.integrations.flash_attention as flash_attention
    import transformers.modeling_flash_attention_utils as utils

    kernels = (flash_attn_func, flash_attn_varlen_func, None, utils._pad_input, utils._unpad_input)
    monkeypatch.setattr(utils, "_lazy_imports", lambda *args, **kwargs: kernels)
    monkeypatch.setattr(utils, "_loaded_implementation", None)
    for loaded in ("_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn", "_unpad_fn",
                   "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):  # restored after the test
        monkeypatch.setattr(utils, loaded, getattr(utils, loaded, None), raising=False)
    # flash-attn takes half precision: transformers casts fp32 queries to the dtype of the layer's first nn.Linear,
    # which GPT-2's Conv1D projections do not have; these kernels take fp32 as it is
    monkeypatch.setattr(flash_attention, "get_target_dtype", lambda query, module: query.dtype)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config._attn_implementation = implementation
    return model
