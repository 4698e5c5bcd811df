"""verl's top-k forward KL of on-policy distillation, as its FSDP engine's logits processor computes it.

Per token of the student's logits ``z [N, V]``, with the teacher's top-k log-probs ``t`` at its ids (k = 128,
verl's default ``topk``)::

    q_k = log softmax(z)[ids_k]        loss = sum over tokens of sum_k exp(t_k) (t_k - q_k)   (t, q clamped at -10)

with the overlap diagnostics (the student's top k). The logits are an intermediate of the graph, as the model's
output is. ``fastalign`` is :func:`fastalign.integrations.verl.distillation.forward_kl_topk`
(``loss_mode=fastalign_forward_kl_topk``: the log-sum-exp from :func:`fastalign.token_logprobs`, d(logits) written
once); ``verl`` and ``verl (chunked)`` are verl 0.9.1's own FSDP ``compute_forward_kl_topk``, its default path
(the log-softmax of the logits) and ``use_chunked_topk=True``, where verl is installed.
"""
from __future__ import annotations

import dataclasses

import torch

from fastalign.bench.cases.token_logprobs import rows_case
from fastalign.bench.core import intermediate_step
from fastalign.bench.optional import optional_impl
from fastalign.integrations.verl.distillation import forward_kl_topk

TOPK = 128


def _make_build(N, V, dtype):
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        base = torch.randn(N, V, device=device, dtype=dtype, generator=g) * 2
        teacher = base.float() + torch.randn(N, V, device=device, generator=g)
        k = min(TOPK, V // 2)
        teacher_lp, teacher_ids = torch.log_softmax(teacher, -1).topk(k, dim=-1)
        offsets = torch.tensor([0, N // 2, N], device=device)  # two sequences, as verl's nested tensors hold them
        lp, ids = (torch.nested.nested_tensor_from_jagged(t, offsets) for t in (teacher_lp, teacher_ids))

        def fastalign(x):
            return forward_kl_topk(x[None], lp, ids)["distillation_losses"].sum()

        steps = {"fastalign": intermediate_step(fastalign, base, backward=mode == "fwd+bwd")}
        verl = optional_impl("verl.trainer.distillation.fsdp.losses", "compute_forward_kl_topk")
        config = optional_impl("verl.workers.config", "DistillationConfig", "DistillationLossConfig")
        for impl, chunked in (("verl", False), ("verl (chunked)", True)):
            fn = None
            if verl is not None and config is not None:
                loss_config = config[1](loss_mode="forward_kl_topk", topk=k, use_chunked_topk=chunked,
                                        use_policy_gradient=False)
                distillation = config[0](distillation_loss=loss_config)

                def fn(x, distillation=distillation):
                    out = verl[0](x[None], lp, ids, distillation, "thd")
                    return out["distillation_losses"].sum()

            steps[impl] = intermediate_step(fn, base, backward=mode == "fwd+bwd")
        return steps

    return build


#: (tokens, vocabulary, dtype)
SHAPES = [(2048, 151936, "fp32"), (4096, 151936, "bf16")]


def cases():
    return [dataclasses.replace(rows_case("verl_distillation", _make_build, (N, V), dt,
                                          ("fastalign", "verl", "verl (chunked)"), warmup_lead=(8,)),
                                baseline="verl")
            for N, V, dt in SHAPES]
