"""Vocabulary-parallel cross-entropy at one rank: Liger-Kernel's ``LigerVocabParallelCrossEntropy`` API.

Per token of the ``[S, B, V]`` logits (a quarter of the targets ``-100``), with the smoothing ``a`` (0 in the plain
cases)::

    loss_t = (1 - a) (lse_t - x_t,y) + a (lse_t - mean_j x_t,j),    summed over the tokens for the backward

The logits are an intermediate of the graph, as a model's are (built by the step's ``before`` hook outside the timed
region). ``fastalign`` is :class:`fastalign.integrations.liger.LigerVocabParallelCrossEntropy` (one fused
:func:`fastalign.token_logprobs` pass, its backward written over the logits); ``eager`` is ``F.cross_entropy`` with
``reduction="none"``; ``torch.compile`` compiles that; ``liger`` is Liger-Kernel's module where installed (a Triton
kernel: on a GPU). One rank, so no collective: the per-rank work of a tensor-parallel group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastalign.bench.cases.token_logprobs import rows_case
from fastalign.bench.core import intermediate_step
from fastalign.bench.optional import compiled, optional_impl
from fastalign.integrations.liger import LigerVocabParallelCrossEntropy


def _make_build(S, B, V, dtype, smoothing):
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        base = torch.randn(S, B, V, device=device, dtype=dtype, generator=g)
        target = torch.randint(0, V, (S, B), device=device, generator=g)
        target[: S // 4] = -100

        def summed(module):
            loss = None if module is None else (lambda x, y: module(x, y).sum())
            return intermediate_step(loss, base, target, backward=mode == "fwd+bwd")

        def eager(x, y):
            return F.cross_entropy(x.reshape(-1, V).float(), y.reshape(-1), ignore_index=-100,
                                   label_smoothing=smoothing, reduction="none").view(y.shape)

        liger = optional_impl("liger_kernel.transformers.vocab_parallel_cross_entropy",
                              "LigerVocabParallelCrossEntropy") if device.type == "cuda" else None
        return {"fastalign": summed(LigerVocabParallelCrossEntropy(label_smoothing=smoothing)),
                "eager": summed(eager), "torch.compile": summed(compiled(eager)),
                "liger": None if liger is None else summed(liger[0](label_smoothing=smoothing))}

    return build


#: (sequence, batch, vocabulary, dtype, smoothing)
SHAPES = [(1024, 4, 32000, "fp32", 0.0), (1024, 4, 32000, "fp32", 0.1), (2048, 4, 151936, "bf16", 0.0)]


def cases():
    return [rows_case("vocab_parallel_ce", _make_build, (S, B, V), dt, ("fastalign", "eager", "torch.compile", "liger"),
                      lead_names=("seq", "batch"), warmup_lead=(4, 2), options=(smoothing,),
                      label=f" smoothing {smoothing:g}" if smoothing else "", traffic=True, label_smoothing=smoothing)
            for S, B, V, dt, smoothing in SHAPES]
