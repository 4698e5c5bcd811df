"""Distillation from a teacher's cached probabilities: ``KL(q || softmax(h W^T))`` averaged over the scored rows, from
hidden states and targets ``q [N, V]`` (of the head's dtype), as Liger's ``LigerFusedLinearKLDivLoss`` computes it.

``fastalign`` is :class:`fastalign.integrations.liger.LigerFusedLinearKLDivLoss`:
:func:`fastalign.linear_soft_cross_entropy` (its single pass: gradients in the forward, three products per scored
row) plus the targets' constant ``sum_j q_j log q_j``, a block of rows at a time; ``fastalign-two-pass`` the same
with ``single_pass = False`` (the logits recomputed in the backward); ``eager`` builds the ``[N, V]`` logits of
every row for ``F.kl_div``, masked; ``liger`` is Liger-Kernel's module where installed (on a GPU). A quarter of the rows are unscored (a prompt).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastalign.bench.cases.linear_cross_entropy import head_loss_case, scored_head
from fastalign.bench.core import grad_step
from fastalign.bench.optional import optional_impl
from fastalign.integrations.liger import LigerFusedLinearKLDivLoss


def _make_build(N, H, V, dtype):
    def build(device, mode):
        hidden, weight, labels, count = scored_head(device, N, H, V, dtype)
        g = torch.Generator(device=device).manual_seed(1)
        target = torch.softmax(torch.randn(N, V, device=device, generator=g), -1).to(dtype)
        scored = labels != -100
        shift_labels = torch.where(scored, 0, -100)  # the adapters read the mask of the labels alone

        def wrap(fn):
            return grad_step(lambda h, w: fn(h, w), (hidden, weight), mode == "fwd+bwd")

        def ours(single_pass):
            loss = LigerFusedLinearKLDivLoss()
            loss.single_pass = single_pass
            return lambda h, w: loss(h, w, target, shift_labels)

        def eager(h, w):
            kl = F.kl_div(torch.log_softmax((h @ w.T).float(), -1), target.float(), reduction="none").sum(-1)
            return torch.where(scored, kl, 0.0).sum() / count

        impls = {"fastalign": wrap(ours("auto")), "fastalign-two-pass": wrap(ours(False)), "eager": wrap(eager)}
        # the peer's fused kernel is a Triton GPU kernel: skipped on the CPU
        liger = (optional_impl("liger_kernel.transformers", "LigerFusedLinearKLDivLoss")
                 if device.type == "cuda" else None)
        impls["liger"] = None if liger is None else wrap(
            lambda h, w, loss=liger[0](): loss(h, w, target, shift_labels))
        return impls

    return build


def cases():
    return [head_loss_case("soft_cross_entropy", _make_build, shape,
                           ("fastalign", "fastalign-two-pass", "eager", "liger"),
                           "the single pass executes that, the two passes 8*n*H*V")
            for shape in [(1024, 1024, 32000, "fp32", False), (8192, 4096, 151936, "bf16", False)]]
