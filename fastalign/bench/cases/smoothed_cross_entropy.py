"""Label-smoothed cross-entropy on a softcapped head (Gemma 2/3), from hidden states.

With ``z = c tanh(h W^T / c)``, ``lp = log softmax(z)_y`` and the smoothing ``eps``, per scored token::

    loss_t = (1 - eps) (-lp_t) + eps (lse_t - (1/V) sum_j z_tj)        (lse_t = z_ty - lp_t)

The mean logit is not linear in ``h`` under a softcap, so it takes the vocabulary. ``fastalign`` is
:func:`fastalign.linear_step.separable_step` with the mean logit as the loss's differentiable second argument
(what the SFT drop-in runs: one pass through the head in blocks of tokens, the mean logit's gradient ``g / V`` in
the same d(logits)); ``fastalign-two-pass`` is :func:`fastalign.linear_logprobs` with ``mean_logit=True`` (what
the Liger cross-entropy drop-in runs: a statistics pass and a recomputing backward); ``separate-mean`` is
``linear_logprobs`` beside :func:`fastalign.linear_mean_logits`, the mean in passes of its own, forward and
backward (the composition these replace); ``eager`` builds the ``[N, V]`` logits for ``F.cross_entropy(...,
label_smoothing=eps)``; ``liger`` is Liger-Kernel's fused linear cross-entropy with ``softcap`` and
``label_smoothing`` where installed (on a GPU). A quarter of the tokens are unscored (-100, a prompt).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastalign
from fastalign.bench.cases.linear_cross_entropy import head_loss_case, scored_head
from fastalign.bench.core import grad_step
from fastalign.bench.optional import optional_impl
from fastalign.linear_step import separable_step

SOFTCAP, EPS = 30.0, 0.1


def _make_build(N, H, V, dtype):
    def build(device, mode):
        hidden, weight, labels, count = scored_head(device, N, H, V, dtype)
        head = dict(softcap=SOFTCAP)

        def wrap(fn):
            return grad_step(lambda h, w: fn(h, w), (hidden, weight), mode == "fwd+bwd")

        def smoothed(lp, mean, z_y):  # the loss above from lp, the mean logit and the label logit (0 where unscored)
            return ((1 - EPS) * -lp + EPS * (z_y - lp - mean)).sum() / count

        def label_logit(h, w):  # one head row per token
            z_y = SOFTCAP * torch.tanh((h.float() * w[labels.clamp(min=0)].float()).sum(-1) / SOFTCAP)
            return torch.where(labels != -100, z_y, 0.0)

        def single(h, w):
            def loss(lp, mean):
                return ((1 - EPS) * -lp - EPS * (lp + mean)).sum() / count, {}
            value = separable_step(h[:, None], w, labels[:, None], loss, mean_logit=True, logit=head)[0]
            return value + EPS * label_logit(h, w).sum() / count

        def two_pass(h, w):
            st = fastalign.linear_logprobs(h, w, labels, mean_logit=True, **head)
            return smoothed(st.logprobs, st.mean_logit, label_logit(h, w))

        def separate_mean(h, w):
            lp = fastalign.linear_logprobs(h, w, labels, **head).logprobs
            mean = fastalign.linear_mean_logits(h, w, response_mask=labels != -100, **head)
            return smoothed(lp, mean, label_logit(h, w))

        def eager(h, w):
            z = SOFTCAP * torch.tanh((h @ w.T).float() / SOFTCAP)
            return F.cross_entropy(z, labels, ignore_index=-100, label_smoothing=EPS)

        impls = {"fastalign": wrap(single), "fastalign-two-pass": wrap(two_pass),
                 "separate-mean": wrap(separate_mean), "eager": wrap(eager)}
        # the peer's fused kernel is a Triton GPU kernel: skipped on the CPU
        liger = (optional_impl("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")
                 if device.type == "cuda" else None)
        impls["liger"] = None if liger is None else wrap(
            lambda h, w, loss=liger[0](softcap=SOFTCAP, label_smoothing=EPS): loss(w, h, labels))
        return impls

    return build


def cases():
    return [head_loss_case("smoothed_cross_entropy", _make_build, shape,
                           ("fastalign", "fastalign-two-pass", "separate-mean", "eager", "liger"),
                           "the single pass executes that, the two passes 8*n*H*V, a separate mean's passes "
                           "8*n*H*V more", softcap=SOFTCAP, label_smoothing=EPS)
            for shape in [(1024, 1024, 32000, "fp32", False), (8192, 4096, 151936, "bf16", False)]]
