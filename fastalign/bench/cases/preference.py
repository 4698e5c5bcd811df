"""preference_loss from hidden states: LinearPreferenceLoss vs paths that build the logits.

Sigmoid DPO with a reference model given as hidden states; chosen rows first,
rejected rows second in a ``[2B, T, H]`` batch; ragged responses after a prompt.

Implementations:

* ``fastalign`` — :class:`fastalign.LinearPreferenceLoss` with its defaults (never builds
  ``[N, V]``; with gradients a single pass over blocks of whole pairs, without them the
  statistics pass over the labelled positions only);
* ``fastalign-two-pass`` — the two passes (statistics, then a recomputing backward) also
  with gradients; ``fastalign-whole`` (CPU) — every position, prompt and padding included;
* ``eager``     — what trainers write: ``logits = h @ W.T``, ``log_softmax``, ``gather``;
* ``logits``    — builds the fp32 logits, then the fused :func:`fastalign.token_logprobs`
  row kernel (backward in place into the logits): the leanest path that builds logits;
* ``liger``     — Liger-Kernel's ``LigerFusedLinearDPOLoss`` when ``liger_kernel`` is installed;
* ``torch.compile`` — the eager path compiled.

Each case names its baseline: ``eager`` for the quick shape, ``logits`` for the CPU target
(eager would need ~20 GB) and ``liger`` for the GPU target.
"""
from __future__ import annotations

import torch

import fastalign
from fastalign.bench.core import Case, grad_step
from fastalign.bench.optional import COMPILE, compiled, optional_impl
from fastalign.reference import preference as ref

BETA = 0.1


def make_inputs(B, T, H, V, device, dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, device=device, dtype=dtype, generator=g)
    ref_hidden = hidden + 0.05 * torch.randn(2 * B, T, H, device=device, dtype=dtype, generator=g)
    weight = torch.randn(V, H, device=device, dtype=dtype, generator=g) * H ** -0.5
    labels = torch.randint(0, V, (2 * B, T), device=device, generator=g)
    prompt = T // 4
    lens = torch.randint(T // 4, T - prompt + 1, (2 * B,), device=device, generator=g)
    pos = torch.arange(T, device=device)
    labels[:, :prompt] = -100
    labels[pos[None, :] >= (prompt + lens)[:, None]] = -100
    return hidden, ref_hidden, weight, labels


def _logits_path(h, w, labels, ref_h):
    """Builds the fp32 logits and runs the fused row kernel (d(logits) written in place)."""
    B = h.shape[0] // 2
    with torch.no_grad():
        rz = (ref_h @ w.T).float()
        rlp = fastalign.token_logprobs(rz, labels).logprobs
        del rz
        r = fastalign.sequence_logprobs(rlp, labels=labels)
    z = (h @ w.T).float()
    lp = fastalign.token_logprobs(z, labels, inplace_backward=True).logprobs
    s = fastalign.sequence_logprobs(lp, labels=labels)
    return fastalign.preference_loss(s.sum[:B], s.sum[B:], r.sum[:B], r.sum[B:], beta=BETA,
                                     chosen_lengths=s.count[:B], rejected_lengths=s.count[B:])[0]


def _eager_path(h, w, labels, ref_h):
    return ref.linear_preference_loss(h, w, labels, ref_hidden=ref_h, beta=BETA)[0]


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _liger(device):
    """Liger-Kernel's fused-linear DPO (sigmoid, reference from hidden states), or None."""
    found = optional_impl("liger_kernel.chunked_loss", "LigerFusedLinearDPOLoss")
    if found is None:
        return None
    # the chunked loss is torch code compiled per chunk; compiled=True is how trainers run it
    loss = found[0](beta=BETA, use_ref_model=True, compiled=COMPILE["enabled"])

    def path(h, w, labels, ref_h):
        return loss(w, h, labels, ref_input=ref_h, ref_weight=w)[0]
    return path


IMPLS = ("fastalign", "fastalign-two-pass", "fastalign-whole", "logits", "liger", "eager", "torch.compile")


def make_build(B, T, H, V, dtype=torch.float32, whole=True):
    def build(device, mode):
        hidden, ref_hidden, weight, labels = make_inputs(B, T, H, V, device, dtype)
        backward = mode == "fwd+bwd"
        gpu = device.type == "cuda"

        def fused(**options):
            module = fastalign.LinearPreferenceLoss(loss_type="sigmoid", beta=BETA, **options)
            return lambda h, w, y, rh: module(h, w, y, ref_hidden=rh)[0]

        def wrap(fn):
            return grad_step(fn and (lambda h, w: fn(h, w, labels, ref_hidden)), (hidden, weight), backward)

        # log_softmax path: logits, log-probs and their gradients, ~4 fp32 [N, V] buffers
        eager_ok = device.type != "cpu" or 4 * 4 * 2 * B * T * V * 1.2 < _cpu_available_bytes()
        return {
            "fastalign": wrap(fused()),
            # the variants the defaults do not pick (the two passes are the default without gradients)
            "fastalign-two-pass": wrap(fused(single_pass=False)) if backward else None,
            "fastalign-whole": None if gpu or not whole else wrap(fused(compact=False)),
            "logits": wrap(_logits_path),
            "liger": wrap(_liger(device)),
            "eager": wrap(_eager_path) if eager_ok else None,
            "torch.compile": wrap(compiled(_eager_path)) if eager_ok else None,
        }

    return build


def cases():
    out = []
    # (B pairs, T, H, V, dtype, quick, devices, baseline)
    shapes = [
        (2, 256, 512, 32000, "fp32", True, ("cpu", "cuda"), "eager"),
        # CPU target: eager needs ~20 GB here, so ratios are to the leanest path that builds logits
        (8, 512, 1024, 152064, "fp32", False, ("cpu",), "logits"),
        # GPU target: Llama-3-8B head, bf16, against Liger-Kernel's fused-linear DPO
        (8, 1024, 4096, 128256, "bf16", False, ("cuda",), "liger"),
    ]
    for B, T, H, V, dt, quick, devices, baseline in shapes:
        N = 2 * B * T
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        elem = torch.empty((), dtype=dtype).element_size()
        out.append(Case(
            op="preference_loss",
            label=f"linear sigmoid B{B} T{T} H{H} V{V} {dt}",
            params={"pairs": B, "seq": T, "hidden": H, "vocab": V, "dtype": dt, "loss": "sigmoid"},
            build=make_build(B, T, H, V, dtype, whole=not quick),  # keeps make_bench under 5 minutes
            quick=quick,
            devices=devices,
            baseline=baseline,
            impls=IMPLS,
            warmup=make_build(1, 8, 16, 64, dtype),
            # policy + reference forward matmuls over the labelled rows (make_inputs: a quarter of
            # each row is prompt, responses T/4 to 3T/4 long, so half the rows on average);
            # backward: two more (d hidden, d weight)
            flops=lambda mode, n=N // 2, h=H, v=V: 2 * n * h * v * (2 if mode == "fwd" else 4),
            # d(weight) and d(hidden)
            required_bytes=lambda mode, n=(V + N) * H * elem: 0 if mode == "fwd" else n,
        ))
    return out
