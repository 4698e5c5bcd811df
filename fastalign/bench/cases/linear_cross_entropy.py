"""The SFT loss from hidden states: token-mean cross-entropy ``-mean_t log p(y_t)`` with ``p = softmax(h W^T)``.

``fastalign`` is :func:`fastalign.linear_step.separable_step` with every token its own item (what the
SFT drop-in runs): when gradients are needed, one pass through the head in blocks of tokens, three
matrix products; ``fastalign-two-pass`` is :func:`fastalign.linear_logprobs` (the statistics pass and
a backward that recomputes the logits, four products); ``eager`` builds the ``[N, V]`` logits for
``F.cross_entropy``; ``liger`` and ``cut-cross-entropy`` are those projects' fused linear
cross-entropy, where installed (on a GPU). A quarter of the tokens are unscored (-100, a prompt): the
FLOP model counts the scored ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastalign
from fastalign.bench.core import Case, grad_step, random_head
from fastalign.bench.optional import optional_impl
from fastalign.linear_step import separable_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def scored_head(device, N, H, V, dtype) -> tuple:
    """``(hidden [N, H], weight [V, H], labels [N], count)`` of a fixed seed: the first quarter of the labels -100
    (a prompt), ``count`` the scored ones (a device tensor)."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden, weight = random_head(g, (N,), H, V, dtype)
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    labels[: N // 4] = -100
    return hidden, weight, labels, (labels != -100).sum()


def _make_build(N, H, V, dtype):
    def build(device, mode):
        hidden, weight, labels, count = scored_head(device, N, H, V, dtype)

        def wrap(fn):
            return grad_step(lambda h, w: fn(h, w), (hidden, weight), mode == "fwd+bwd")

        def single(h, w):
            def nll(lp, _sum_p2):
                return -lp.sum() / count, {}
            return separable_step(h[:, None], w, labels[:, None], nll)[0]

        def two_pass(h, w):
            return -fastalign.linear_logprobs(h, w, labels).logprobs.sum() / count

        def eager(h, w):
            return F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100)

        impls = {"fastalign": wrap(single), "fastalign-two-pass": wrap(two_pass), "eager": wrap(eager)}
        # the peers' fused kernels are Triton GPU kernels: skipped on the CPU
        gpu = device.type == "cuda"
        liger = optional_impl("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss") if gpu else None
        impls["liger"] = None if liger is None else wrap(lambda h, w, loss=liger[0](): loss(w, h, labels))
        cce = optional_impl("cut_cross_entropy", "linear_cross_entropy") if gpu else None
        impls["cut-cross-entropy"] = None if cce is None else wrap(lambda h, w: cce[0](h, w, labels))
        return impls

    return build


def head_loss_case(op: str, make_build, shape: tuple, impls: tuple, executed: str, **params) -> Case:
    """The :class:`Case` ``op`` of a loss from hidden states ``[N, H]`` and a head ``[V, H]`` over the tokens of
    ``shape = (N, H, V, dtype name, quick)``, a quarter of them unscored: its traffic and FLOP model (the scored
    tokens' products; ``executed``: what the implementations run beyond that), ``make_build(N, H, V, dtype)``
    at that shape and at a small warm-up one."""
    N, H, V, dt, quick = shape
    elem = torch.empty((), dtype=DTYPES[dt]).element_size()
    f = 2 * (N - N // 4) * H * V  # the scored tokens' products: the useful work
    return Case(
        op=op,
        label=f"{N}x{H}x{V} {dt}",
        params={"tokens": N, "hidden": H, "vocab": V, "dtype": dt, **params,
                "model": (f"fwd 2*n*H*V = {f / 1e12:.2f} TFLOP over the n = 3N/4 scored tokens; fwd+bwd "
                          f"6*n*H*V useful ({executed})")},
        build=make_build(N, H, V, DTYPES[dt]),
        quick=quick,
        warmup=make_build(8, 16, 64, DTYPES[dt]),
        impls=impls,
        bytes_moved=lambda mode, n=(N + V) * H * elem: n if mode == "fwd" else 3 * n,
        flops=lambda mode, f=f: f if mode == "fwd" else 3 * f,
        required_bytes=lambda mode, n=(N + V) * H * elem: 0 if mode == "fwd" else n,
    )


def cases():
    return [head_loss_case("linear_cross_entropy", _make_build, shape,
                           ("fastalign", "fastalign-two-pass", "eager", "liger", "cut-cross-entropy"),
                           "the single pass executes that, the two passes 8*n*H*V")
            for shape in [(1024, 1024, 32000, "fp32", False), (4096, 1024, 152064, "fp32", False),
                          (8192, 4096, 151936, "bf16", False)]]
