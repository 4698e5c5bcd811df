"""Cross-entropy and total variation distance on a student's and a teacher's logits: Liger-Kernel's
``LigerFusedCETVDLoss`` API.

Per token (a quarter of them are ``-100``, a prompt), with ``p``, ``q`` the student's and the teacher's softmax::

    ce = -log p_y,    tvd = 1/2 sum_j |p_j - q_j|,    loss = sum_t (ce_t + tvd_t) / N

The student's logits are an intermediate of the graph, as a model's are (built before each timed step and outside
it); the teacher's are constants. ``fastalign`` is :class:`fastalign.integrations.liger.LigerFusedCETVDLoss`
(:func:`fastalign.token_divergence`: one pass over each pair of rows, its backward written over the student's
logits); ``eager`` forms ``log_softmax`` of both in fp32; ``torch.compile`` compiles that; ``liger`` is Liger-Kernel's
module where installed (a Triton kernel: on a GPU).
"""
from __future__ import annotations

import torch

from fastalign.bench.cases.token_logprobs import rows_case
from fastalign.bench.core import intermediate_step
from fastalign.bench.optional import compiled, optional_impl
from fastalign.integrations.liger import LigerFusedCETVDLoss


def _make_build(N, V, dtype):
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        base = torch.randn(N, V, device=device, dtype=dtype, generator=g)
        teacher = torch.randn(N, V, device=device, dtype=dtype, generator=g)
        labels = torch.randint(0, V, (N,), device=device, generator=g)
        labels[: N // 4] = -100

        def summed(module):
            loss = None if module is None else (lambda x, y: sum(module(x, teacher, y)).sum() / N)  # ce + tvd
            return intermediate_step(loss, base, labels, backward=mode == "fwd+bwd")

        def eager(x, t, y):
            keep = y != -100
            lp = torch.log_softmax(x.float(), -1)
            ce = -lp.gather(-1, y.clamp(min=0)[:, None])[:, 0]
            tvd = 0.5 * (lp.exp() - torch.softmax(t.float(), -1)).abs().sum(-1)
            return torch.where(keep, ce, 0.0), torch.where(keep, tvd, 0.0)

        liger = optional_impl("liger_kernel.transformers.fused_ce_tvd", "LigerFusedCETVDLoss") \
            if device.type == "cuda" else None
        return {"fastalign": summed(LigerFusedCETVDLoss()), "eager": summed(eager),
                "torch.compile": summed(compiled(eager)), "liger": None if liger is None else summed(liger[0]())}

    return build


#: (tokens, vocabulary, dtype)
SHAPES = [(4096, 32000, "fp32"), (8192, 151936, "bf16")]


def cases():
    # both rows read once forward; backward both again and d(first) written
    return [rows_case("ce_tvd", _make_build, (N, V), dt, ("fastalign", "eager", "torch.compile", "liger"), inputs=2)
            for N, V, dt in SHAPES]
