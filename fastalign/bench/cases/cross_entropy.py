"""Cross-entropy on a model's logits: Liger-Kernel's ``LigerCrossEntropyLoss`` API.

Per scored token (a quarter of them are ``-100``, a prompt), with ``z = x`` or, softcapped, ``z = c tanh(x / c)``,
the smoothing ``eps`` and the z-loss scale ``s`` (0 in the plain cases)::

    loss = mean_t ((1 - eps) (-log softmax(z_t)_y_t) - (eps / V) sum_j log softmax(z_t)_j + s lse(z_t)^2)

The logits ``x`` are an intermediate of the graph, as a model's are (``leaf + 0``, built before each timed step
and outside it, the same for every candidate), so that a backward may write d(logits) over them. ``fastalign`` is
:class:`fastalign.integrations.liger.LigerCrossEntropyLoss` (:func:`fastalign.token_logprobs` over each row, its
backward written over ``x``); ``eager`` is ``F.cross_entropy`` (the softcap formed first, the z-loss from
``torch.logsumexp``); ``torch.compile``
compiles that; ``liger`` is Liger-Kernel's module where installed (a Triton kernel: on a GPU), which also writes
its gradient over its input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastalign.bench.cases.token_logprobs import rows_case
from fastalign.bench.core import intermediate_step
from fastalign.bench.optional import compiled, optional_impl
from fastalign.integrations.liger import LigerCrossEntropyLoss


def _make_build(N, V, dtype, options):
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        base = torch.randn(N, V, device=device, dtype=dtype, generator=g)
        labels = torch.randint(0, V, (N,), device=device, generator=g)
        labels[: N // 4] = -100

        def wrap(loss):
            return intermediate_step(loss, base, labels, backward=mode == "fwd+bwd")

        cap, eps, s = options.get("softcap"), options.get("label_smoothing", 0.0), options.get("lse_square_scale", 0.0)

        def eager(x, y):
            z = x if cap is None else cap * torch.tanh(x.float() / cap)
            loss = F.cross_entropy(z, y, ignore_index=-100, label_smoothing=eps)
            if s:
                keep = y != -100
                loss = loss + s * (torch.logsumexp(z.float(), -1) ** 2 * keep).sum() / keep.sum()
            return loss

        liger = optional_impl("liger_kernel.transformers.cross_entropy", "LigerCrossEntropyLoss") \
            if device.type == "cuda" else None
        return {"fastalign": wrap(LigerCrossEntropyLoss(**options)), "eager": wrap(eager),
                "torch.compile": wrap(compiled(eager)),
                "liger": None if liger is None else wrap(liger[0](**options))}

    return build


#: (tokens, vocabulary, dtype, options, quick)
SHAPES = [(4096, 32000, "fp32", {}, True), (4096, 32000, "fp32", dict(softcap=30.0), False),
          (4096, 32000, "fp32", dict(label_smoothing=0.1, lse_square_scale=1e-4), False),
          (8192, 151936, "bf16", {}, False), (8192, 151936, "bf16", dict(softcap=30.0), False)]


def _label(options: dict) -> str:
    names = {"softcap": "softcap", "label_smoothing": "smoothing", "lse_square_scale": "z-loss"}
    return "".join(f" {names[k]} {v:g}" for k, v in options.items())


def cases():
    return [rows_case("cross_entropy", _make_build, (N, V), dt, ("fastalign", "eager", "torch.compile", "liger"),
                      quick=quick, options=(options,), label=_label(options), traffic=True, **options)
            for N, V, dt, options, quick in SHAPES]
