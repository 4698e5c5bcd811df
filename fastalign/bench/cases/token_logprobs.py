"""token_logprobs: fused log-prob + entropy vs log_softmax + gather + entropy; on a GPU also flash-attn's and
Liger-Kernel's cross-entropy kernels (the label log-prob alone) where installed."""
from __future__ import annotations

import math

import torch

import fastalign
from fastalign import reference
from fastalign.bench.core import Case, grad_step
from fastalign.bench.optional import compiled, optional_impl

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _loss(lp, ent):
    return lp.sum() + 0.01 * ent.sum()


def _make_build(N, V, dtype):
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(N, V, device=device, dtype=dtype, generator=g)
        labels = torch.randint(0, V, (N,), device=device, generator=g)
        backward = mode == "fwd+bwd"

        def wrap(fn):
            return grad_step(fn and (lambda x: fn(x, labels)), (logits,), backward, loss=lambda out: _loss(*out))

        def fused(x, y):
            st = fastalign.token_logprobs(x, y, entropy=True)
            return st.logprobs, st.entropy

        impls = {
            "fastalign": wrap(fused),
            "eager": wrap(reference.eager_logprobs_entropy),
            "torch.compile": wrap(compiled(reference.eager_logprobs_entropy)),
        }
        trl = optional_impl("trl.trainer.utils", "selective_log_softmax", "entropy_from_logits")
        if trl is not None:
            sel, ent_fn = trl
            impls["trl"] = wrap(lambda x, y: (sel(x, y), ent_fn(x)))
        else:
            impls["trl"] = None
        # flash-attn's Triton cross-entropy (-log p of the label, no entropy): timed on the log-probs
        fa = optional_impl("flash_attn.ops.triton.cross_entropy", "cross_entropy_loss") if device.type == "cuda" \
            else None
        impls["flash-attn (CE)"] = None if fa is None else grad_step(
            lambda x: (-fa[0](x, labels)[0], x.new_zeros(())), (logits,), backward, loss=lambda out: out[0].sum())
        # Liger-Kernel's cross-entropy on logits (a Triton kernel: GPU only), likewise on the log-probs
        liger = optional_impl("liger_kernel.transformers.cross_entropy", "LigerCrossEntropyLoss") \
            if device.type == "cuda" else None
        ce = None if liger is None else liger[0](reduction="none")
        impls["liger (CE)"] = None if ce is None else grad_step(
            lambda x: (-ce(x, labels), x.new_zeros(())), (logits,), backward, loss=lambda out: out[0].sum())
        return impls

    return build


def traffic_model(N: int, V: int, elem: int) -> dict:
    """Bytes each mode must move through HBM at [N x V] logits (the one-read limit) and how the
    "% limit" column is formed: forward reads the logits once; forward+backward reads them twice
    and writes d(logits) once. Per-token outputs (a few floats) are left out."""
    n = N * V * elem
    return {"fwd_bytes": n, "fwd+bwd_bytes": 3 * n,
            "model": (f"fwd reads N*V*{elem} B = {n / 1e9:.2f} GB; fwd+bwd reads twice and writes d(logits) = "
                      f"{3 * n / 1e9:.2f} GB; % limit = (bytes / measured time) / measured copy bandwidth "
                      f"(= one-read time / measured time)")}


def rows_case(op: str, make_build, shape: tuple, dt: str, impls: tuple, *, lead_names: tuple = ("tokens",),
              warmup_lead: tuple = (8,), inputs: int = 1, quick: bool = False, options: tuple = (), label: str = "",
              traffic: bool = False, **params) -> Case:
    """The :class:`Case` ``op`` on ``inputs`` tensors of rows ``shape = (*lead, V)`` (logits, or distributions) of
    dtype ``dt``: forward reads each once; backward reads them again and writes d(first input) (its bytes, where new,
    the memory every implementation needs). ``make_build(*lead, V, dtype, *options)`` at that shape and at a small
    warm-up one (``warmup_lead``, V = 64); the leading sizes are in the params under ``lead_names``; ``traffic``: the
    one-read model of :func:`traffic_model` in the params (one input)."""
    *lead, V = shape
    elem = torch.empty((), dtype=DTYPES[dt]).element_size()
    n = math.prod(lead) * V * elem
    return Case(
        op=op,
        label="x".join(map(str, shape)) + f" {dt}{label}",
        params={**dict(zip(lead_names, lead)), "vocab": V, "dtype": dt, **params,
                **(traffic_model(math.prod(lead), V, elem) if traffic else {})},
        build=make_build(*shape, DTYPES[dt], *options),
        quick=quick,
        warmup=make_build(*warmup_lead, 64, DTYPES[dt], *options),
        impls=impls,
        bytes_moved=lambda mode: inputs * n if mode == "fwd" else (2 * inputs + 1) * n,
        required_bytes=lambda mode: 0 if mode == "fwd" else n,
    )


def cases():
    return [rows_case("token_logprobs", _make_build, (N, V), dt,
                      ("fastalign", "eager", "torch.compile", "trl", "flash-attn (CE)", "liger (CE)"), quick=quick,
                      traffic=True)
            for N, V, dt, quick in [(4096, 32000, "fp32", True), (2048, 152064, "fp32", False),
                                    (8192, 151936, "bf16", False), (16384, 128256, "bf16", False)]]
