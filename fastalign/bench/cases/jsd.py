"""The generalized JSD of given log-probabilities, differentiated element by element: Liger-Kernel's ``LigerJSD``
API (distillation on log-probs a model has already formed).

Per token, ``x = log q`` (the student's, an intermediate of the graph as a model's are, built before each timed step
and outside it), ``y = log p`` (the teacher's, constants), ``m = beta p + (1 - beta) q``, ``beta = 0.5``::

    loss = sum_t sum_j [beta p (y - log m) + (1 - beta) q (x - log m)] / N

``fastalign`` is :class:`fastalign.integrations.liger.LigerJSD` (:func:`fastalign.elementwise_divergence`: one pass
forward, one backward); ``eager`` writes the terms in fp32 with torch; ``torch.compile`` compiles that; ``liger`` is
Liger-Kernel's module where installed (a Triton kernel: on a GPU).
"""
from __future__ import annotations

import math

import torch

from fastalign.bench.cases.token_logprobs import rows_case
from fastalign.bench.core import intermediate_step
from fastalign.bench.optional import compiled, optional_impl
from fastalign.integrations.liger import LigerJSD

BETA = 0.5


def _make_build(N, V, dtype):
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        base = torch.randn(N, V, device=device, dtype=torch.float32, generator=g).log_softmax(-1).to(dtype)
        teacher = torch.randn(N, V, device=device, dtype=torch.float32, generator=g).log_softmax(-1).to(dtype)

        def step(fn):
            return intermediate_step(None if fn is None else (lambda x: fn(x, teacher)), base,
                                     backward=mode == "fwd+bwd")

        def eager(x, y):
            x, y = x.float(), y.float()
            lm = torch.logaddexp(y + math.log(BETA), x + math.log(1 - BETA))
            terms = BETA * y.exp() * (y - lm) + (1 - BETA) * x.exp() * (x - lm)
            return terms.sum() / x.shape[0]

        liger = optional_impl("liger_kernel.transformers", "LigerJSD") if device.type == "cuda" else None
        return {"fastalign": step(LigerJSD(beta=BETA)), "eager": step(eager), "torch.compile": step(compiled(eager)),
                "liger": None if liger is None else step(liger[0](beta=BETA))}

    return build


#: (tokens, vocabulary, dtype)
SHAPES = [(4096, 32000, "fp32"), (8192, 151936, "bf16")]


def cases():
    # both rows read once forward; backward both again and d(first) written
    return [rows_case("jsd", _make_build, (N, V), dt, ("fastalign", "eager", "torch.compile", "liger"), inputs=2)
            for N, V, dt in SHAPES]
