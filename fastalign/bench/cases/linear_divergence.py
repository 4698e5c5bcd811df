"""The distillation loss from hidden states: the generalized JSD (beta 0.5) between a student's and a teacher's
next-token distributions, token mean over the scored tokens.

``fastalign`` is :func:`fastalign.linear_divergence_loss` (with gradients, one pass over blocks of tokens: both
heads' logits, then d(hidden) and d(weight) of the student, four matrix products per token);
``trl`` is TRL 1.16's ``_chunked_divergence_loss`` (tiles of both heads in the forward, recomputed in its
backward); ``liger`` is Liger-Kernel 0.8's ``LigerFusedLinearJSDLoss`` (``compiled=False``, soft loss only,
chunks of 1024 tokens); ``eager`` builds both ``[N, V]`` logits. An eighth of the tokens are unscored.
The teacher is wider than the student (hidden 1.5x).
"""
from __future__ import annotations

import math

import torch

import fastalign
from fastalign.bench.core import grad_step, random_head, student_teacher_cases
from fastalign.bench.optional import optional_impl

BETA = 0.5


def _eager(h, w, ht, wt, mask):
    lps = torch.log_softmax((h @ w.T).float(), -1)
    lpt = torch.log_softmax((ht @ wt.T).float(), -1)
    lm = torch.logaddexp(lps + math.log(1 - BETA), lpt + math.log(BETA))
    d = (BETA * lpt.exp() * (lpt - lm) + (1 - BETA) * lps.exp() * (lps - lm)).sum(-1)
    return (d * mask).sum() / mask.sum()


def _make_build(N, H, Ht, V, dtype):
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        hidden, weight = random_head(g, (N,), H, V, dtype)
        teacher_hidden, teacher_weight = random_head(g, (N,), Ht, V, dtype)
        mask = torch.ones(N, device=device)
        mask[: N // 8] = 0
        labels = torch.where(mask != 0, 0, -100).long()

        def wrap(fn):
            return grad_step(lambda h, w: fn(h, w), (hidden, weight), mode == "fwd+bwd")

        impls = {
            "fastalign": wrap(lambda h, w: fastalign.linear_divergence_loss(
                h, w, teacher_hidden, teacher_weight, beta=BETA, response_mask=mask)[0]),
            "eager": wrap(lambda h, w: _eager(h, w, teacher_hidden, teacher_weight, mask)),
        }
        trl = optional_impl("trl.trainer.distillation_trainer", "_chunked_divergence_loss")
        impls["trl"] = None if trl is None else wrap(
            lambda h, w: trl[0](h[None], teacher_hidden[None], w, teacher_weight, mask[None], BETA)[0])
        liger = optional_impl("liger_kernel.chunked_loss", "LigerFusedLinearJSDLoss")
        if liger is not None:
            loss = liger[0](weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, compiled=False)
            impls["liger"] = wrap(lambda h, w: loss(h, w, teacher_hidden, teacher_weight, labels))
        else:
            impls["liger"] = None
        return impls

    return build


def cases():
    return student_teacher_cases("linear_divergence", _make_build, ("fastalign", "trl", "liger", "eager"), 2,
                                 "d hidden, d weight of the student")
