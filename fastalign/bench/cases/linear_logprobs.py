"""linear_logprobs: statistics from hidden states vs logits by matmul + log_softmax + gather + entropy."""
from __future__ import annotations

import torch

import fastalign
from fastalign import reference
from fastalign.bench.core import Case, grad_step, random_head, with_env
from fastalign.bench.optional import optional_impl

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _make_build(N, H, V, dtype, prompt_share=0.0, temperature=1.0, logit_offset=0.0):
    """``logit_offset``: every logit shifted by it (the first hidden feature set to it, its weight column to 1), as
    a trained head's logits sit far from 0; with ``temperature`` < 1, rows of ``|lse| >= 32``."""
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        hidden, weight = random_head(g, (N,), H, V, dtype)
        if logit_offset:
            hidden[:, 0], weight[:, 0] = logit_offset, 1.0
        labels = torch.randint(0, V, (N,), device=device, generator=g)
        if prompt_share:  # sequences of 1024 tokens, each starting with its unscored prompt
            labels.view(-1, 1024)[:, :int(1024 * prompt_share)] = -100
        backward = mode == "fwd+bwd"

        def wrap(fn):
            return grad_step(lambda h, w: fn(h, w, labels), (hidden, weight), backward,
                             loss=lambda out: out[0].sum() + 0.01 * out[1].sum())

        def fused(h, w, y):
            st = fastalign.linear_logprobs(h, w, y, entropy=True, temperature=temperature)
            return st.logprobs, st.entropy

        def eager(h, w, y):  # every position through the vocabulary, the unscored ones zeroed after
            lp, ent = reference.eager_linear_logprobs_entropy(h, w, y.clamp(min=0), temperature)
            keep = y != -100
            return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)

        impls = {"fastalign": wrap(fused), "eager": wrap(eager)}
        if prompt_share and device.type == "cuda":  # the Triton path with every row through the products
            impls["fastalign-all-rows"] = with_env(wrap(fused), FASTALIGN_DEVICE_COMPACTION="0")
        peers = _peers(device) if temperature == 1.0 else {"liger (CE)": None, "cut-cross-entropy": None}
        liger, cce = peers["liger (CE)"], peers["cut-cross-entropy"]
        # the peers return -log p of the labels (no entropy): timed on the log-probs alone
        impls["liger (CE)"] = None if liger is None else grad_step(
            lambda h, w: (-liger(w, h, labels), h.new_zeros(())), (hidden, weight), backward,
            loss=lambda out: out[0].sum())
        impls["cut-cross-entropy"] = None if cce is None else grad_step(
            lambda h, w: (-cce(h, w, labels, reduction="none"), h.new_zeros(())), (hidden, weight), backward,
            loss=lambda out: out[0].sum())
        return impls

    return build


def _make_lora_build(N, H, V, r, dtype):
    """A frozen lm_head with a trainable LoRA adapter: gradients to the hidden states, ``a = s A(h)``
    and ``L = B`` only. ``fastalign`` takes the adapter as its low-rank term; ``widened`` sends
    ``[h, a] [W, L]^T`` through the same kernels (a ``[V, H + r]`` weight per call and its whole
    gradient); ``eager`` builds the logits ``h W^T + a L^T``."""
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        hidden, weight = random_head(g, (N,), H, V, dtype)
        a = torch.randn(N, r, device=device, dtype=dtype, generator=g)
        lw = (torch.randn(V, r, device=device, generator=g) * r ** -0.5).to(dtype)
        labels = torch.randint(0, V, (N,), device=device, generator=g)

        def wrap(fn):
            return grad_step(fn, (hidden, a, lw), mode == "fwd+bwd",
                             loss=lambda out: out[0].sum() + 0.01 * out[1].sum())

        def fused(h, a, lw):
            st = fastalign.linear_logprobs(h, weight, labels, low_rank=(a, lw), entropy=True)
            return st.logprobs, st.entropy

        def widened(h, a, lw):
            st = fastalign.linear_logprobs(torch.cat([h, a], -1), torch.cat([weight, lw], 1), labels, entropy=True)
            return st.logprobs, st.entropy

        def eager(h, a, lw):
            return reference.eager_logprobs_entropy(torch.addmm(h @ weight.T, a, lw.T), labels)

        return {"fastalign": wrap(fused), "widened": wrap(widened), "eager": wrap(eager)}

    return build


def flop_model(N: int, H: int, V: int) -> dict:
    """Matrix FLOPs at N tokens, hidden H, vocabulary V (the dense tensor-core limit) and how the
    "% limit" column is formed. Forward: logits h @ W.T, 2 N H V. Forward+backward: that plus
    d(hidden) = du @ W and d(weight) = du.T @ h, 6 N H V useful FLOPs; the backward also recomputes
    the logits (8 N H V executed), so 75% is the ceiling of a recomputing kernel. The softmax
    statistics (~10 FLOP per logit) and the HBM traffic ((N + V) H elements read, V H written
    in backward) are small beside the products at these shapes."""
    f = 2 * N * H * V
    return {"fwd_flops": f, "fwd+bwd_flops": 3 * f, "fwd+bwd_executed_flops": 4 * f,
            "model": (f"fwd 2*N*H*V = {f / 1e12:.1f} TFLOP; fwd+bwd 6*N*H*V = {3 * f / 1e12:.1f} TFLOP useful "
                      f"({4 * f / 1e12:.1f} executed with the recomputed logits); % limit = (FLOPs / measured "
                      f"time) / measured dense bf16 matmul rate")}


def _peers(device):
    """Installed third-party fused linear + log-prob implementations for tensors on ``device``: None when
    absent or, off CUDA, always (Liger's fused cross-entropy and cut-cross-entropy's default kernel are
    Triton GPU kernels)."""
    gpu = device.type == "cuda"
    liger = optional_impl("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss") if gpu else None
    cce = optional_impl("cut_cross_entropy", "linear_cross_entropy") if gpu else None
    return {"liger (CE)": None if liger is None else liger[0](reduction="none"),
            "cut-cross-entropy": None if cce is None else cce[0]}


def cases():
    out = []
    # the prompt-share case: half of each 1024-token sequence is an unscored prompt, which fused
    # kernels need not send through the vocabulary (its % limit counts the full FLOPs); on a GPU
    # "fastalign-all-rows" turns device compaction off (FASTALIGN_DEVICE_COMPACTION=0)
    for N, H, V, dt, quick, prompt in [(512, 512, 152064, "fp32", True, 0.0), (1024, 1024, 152064, "fp32", False, 0.0),
                                       (4096, 1024, 152064, "fp32", False, 0.0),
                                       (8192, 4096, 151936, "bf16", False, 0.0),
                                       (8192, 4096, 151936, "bf16", False, 0.5)]:
        out.append(Case(
            op="linear_logprobs",
            label=f"{N}x{H}x{V} {dt}" + (f" {prompt:.0%} prompt" if prompt else ""),
            params={"tokens": N, "hidden": H, "vocab": V, "dtype": dt, "prompt_share": prompt,
                    **flop_model(N, H, V)},
            build=_make_build(N, H, V, DTYPES[dt], prompt),
            quick=quick,
            warmup=_make_build(8, 16, 64, DTYPES[dt]),
            impls=("fastalign", *(("fastalign-all-rows",) if prompt else ()), "eager", "liger (CE)",
                   "cut-cross-entropy"),
            # reads hidden and weight; backward reads them again and writes their gradients
            bytes_moved=lambda mode, n=(N + V) * H * torch.empty((), dtype=DTYPES[dt]).element_size():
                n if mode == "fwd" else 3 * n,
            flops=lambda mode, f=2 * N * H * V: f if mode == "fwd" else 3 * f,
            required_bytes=lambda mode, n=(N + V) * H * torch.empty((), dtype=DTYPES[dt]).element_size():
                0 if mode == "fwd" else n,
        ))
    # logits far from 0 at a sampling temperature, as a trained head's (|lse| of 60-70: the rows whose fp32 lse's
    # rounding the backward removes, with the forward's log c)
    N, H, V = 512, 512, 32000
    out.append(Case(
        op="linear_logprobs",
        label=f"{N}x{H}x{V} fp32 logits +40 at T=0.7",
        params={"tokens": N, "hidden": H, "vocab": V, "dtype": "fp32", "temperature": 0.7, "logit_offset": 40.0,
                **flop_model(N, H, V)},
        build=_make_build(N, H, V, torch.float32, temperature=0.7, logit_offset=40.0),
        quick=False,
        warmup=_make_build(8, 16, 64, torch.float32, temperature=0.7, logit_offset=40.0),
        impls=("fastalign", "eager"),
        bytes_moved=lambda mode, n=(N + V) * H * 4: n if mode == "fwd" else 3 * n,
        flops=lambda mode, f=2 * N * H * V: f if mode == "fwd" else 3 * f,
        required_bytes=lambda mode, n=(N + V) * H * 4: 0 if mode == "fwd" else n,
    ))
    # a LoRA adapter (rank 16) on a frozen lm_head
    for N, H, V, dt, quick in [(1024, 1024, 32000, "fp32", False), (8192, 4096, 151936, "bf16", False)]:
        elem = torch.empty((), dtype=DTYPES[dt]).element_size()
        out.append(Case(
            op="linear_logprobs",
            label=f"{N}x{H}x{V} {dt} LoRA r=16 head",
            params={"tokens": N, "hidden": H, "vocab": V, "dtype": dt, "lora_rank": 16},
            build=_make_lora_build(N, H, V, 16, DTYPES[dt]),
            quick=quick,
            warmup=_make_lora_build(8, 16, 64, 4, DTYPES[dt]),
            impls=("fastalign", "widened", "eager"),
            bytes_moved=lambda mode, n=(N + V) * (H + 16) * elem: n if mode == "fwd" else 2 * n,
            flops=lambda mode, f=2 * N * (H + 16) * V: f if mode == "fwd" else 2 * f,
            required_bytes=lambda mode, n=(N + V) * 16 * elem + N * H * elem: 0 if mode == "fwd" else n,
        ))
    return out
