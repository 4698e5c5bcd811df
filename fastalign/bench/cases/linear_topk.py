"""Distillation over the student's top-k support (TRL's ``topk_logits`` self-distillation, SDFT's default): per
token, the student's ``k = 100`` largest logits, both models' log-probs there renormalised over them, and the
generalized JSD (beta 0.5), token mean over the scored tokens.

``fastalign`` is :func:`fastalign.linear_topk_logprobs` renormalised over the support (``renormalize=True``) for
the student (top-k, with gradients: blocks of rows through its head, a backward over the support's rows of the head
only) and the teacher (``k`` dot products per token at the student's ids), then the JSD on the ``[N, k]``
log-probs; ``trl`` is TRL 1.16's ``compute_topk_self_distillation_loss`` on both ``[N, V]`` logits; ``eager``
builds both logits, takes ``torch.topk`` and gathers the log-softmax. An eighth of the tokens are unscored (masked
after the loss in ``trl`` and ``eager``, skipped by ``fastalign``). The teacher is wider than the student.
"""
from __future__ import annotations

import math

import torch

import fastalign
from fastalign.bench.core import grad_step, random_head, student_teacher_cases
from fastalign.bench.optional import optional_impl

BETA, K = 0.5, 100


def _jsd(lps, lpt):
    """The generalized JSD at ``BETA`` over the last dimension of two renormalised log-prob tensors."""
    lps = lps - torch.logsumexp(lps, -1, keepdim=True)
    lpt = lpt - torch.logsumexp(lpt, -1, keepdim=True)
    lm = torch.logaddexp(lps + math.log(1 - BETA), lpt + math.log(BETA))
    return (BETA * lpt.exp() * (lpt - lm) + (1 - BETA) * lps.exp() * (lps - lm)).sum(-1)


def _eager(h, w, ht, wt, mask, k):
    zs, zt = (h @ w.T).float(), (ht @ wt.T).float()
    ids = zs.topk(k, -1).indices
    d = _jsd(zs.log_softmax(-1).gather(-1, ids), zt.log_softmax(-1).gather(-1, ids))
    return (d * mask).sum() / mask.sum()


def _fastalign(h, w, ht, wt, mask, k):
    student = fastalign.linear_topk_logprobs(h, w, k, response_mask=mask, renormalize=True)
    with torch.no_grad():
        teacher = fastalign.linear_topk_logprobs(ht, wt, ids=student.ids, response_mask=mask, renormalize=True).logprobs
    return (_jsd(student.logprobs, teacher) * mask).sum() / mask.sum()


def _make_build(N, H, Ht, V, dtype, k=K):
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        hidden, weight = random_head(g, (N,), H, V, dtype)
        teacher_hidden, teacher_weight = random_head(g, (N,), Ht, V, dtype)
        mask = torch.ones(N, device=device)
        mask[: N // 8] = 0

        def wrap(fn):
            return grad_step(lambda h, w: fn(h, w), (hidden, weight), mode == "fwd+bwd")

        impls = {
            "fastalign": wrap(lambda h, w: _fastalign(h, w, teacher_hidden, teacher_weight, mask, k)),
            "eager": wrap(lambda h, w: _eager(h, w, teacher_hidden, teacher_weight, mask, k)),
        }
        trl = optional_impl("trl.experimental.sdft.loss_utils", "compute_topk_self_distillation_loss")
        impls["trl"] = None if trl is None else wrap(lambda h, w: (trl[0](
            (h @ w.T).float(), (teacher_hidden @ teacher_weight.T).float(), distillation_topk=k,
            distillation_alpha=BETA, distillation_add_tail=False) * mask).sum() / mask.sum())
        return impls

    return build


def cases():
    return student_teacher_cases("linear_topk", _make_build, ("fastalign", "trl", "eager"), 2,
                                 "d hidden, d weight at the support's k rows of the head", label=f" k={K}",
                                 params={"k": K}, warmup_options={"k": 4}, support=K)
