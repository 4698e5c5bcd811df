"""linear_logprobs: statistics from hidden states vs logits by matmul + log_softmax + gather + entropy."""
from __future__ import annotations

import torch

import fastalign
from fastalign import reference
from fastalign.bench.core import Case, grad_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _make_build(N, H, V, dtype):
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(N, H, device=device, dtype=dtype, generator=g)
        weight = (torch.randn(V, H, device=device, generator=g) * H ** -0.5).to(dtype)
        labels = torch.randint(0, V, (N,), device=device, generator=g)
        backward = mode == "fwd+bwd"

        def wrap(fn):
            return grad_step(lambda h, w: fn(h, w, labels), (hidden, weight), backward,
                             loss=lambda out: out[0].sum() + 0.01 * out[1].sum())

        def fused(h, w, y):
            st = fastalign.linear_logprobs(h, w, y, entropy=True)
            return st.logprobs, st.entropy

        return {"fastalign": wrap(fused), "eager": wrap(reference.eager_linear_logprobs_entropy)}

    return build


def cases():
    out = []
    for N, H, V, dt, quick in [(512, 512, 152064, "fp32", True), (1024, 1024, 152064, "fp32", False),
                               (4096, 1024, 152064, "fp32", False),
                               (8192, 4096, 131072, "bf16", False)]:
        out.append(Case(
            op="linear_logprobs",
            label=f"{N}x{H}x{V} {dt}",
            params={"tokens": N, "hidden": H, "vocab": V, "dtype": dt},
            build=_make_build(N, H, V, DTYPES[dt]),
            quick=quick,
            warmup=_make_build(8, 16, 64, DTYPES[dt]),
            impls=("fastalign", "eager"),
            # reads hidden and weight; backward reads them again and writes their gradients
            bytes_moved=lambda mode, n=(N + V) * H * torch.empty((), dtype=DTYPES[dt]).element_size():
                n if mode == "fwd" else 3 * n,
            flops=lambda mode, f=2 * N * H * V: f if mode == "fwd" else 3 * f,
            required_bytes=lambda mode, n=(N + V) * H * torch.empty((), dtype=DTYPES[dt]).element_size():
                0 if mode == "fwd" else n,
        ))
    return out
