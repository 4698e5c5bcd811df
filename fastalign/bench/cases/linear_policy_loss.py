"""GRPO from hidden states: :class:`fastalign.LinearPolicyLoss` vs logits by matmul and Liger-Kernel's
chunked ``LigerFusedLinearGRPOLoss``.

The loss (bnpo): ``sum_m L / sum m`` with ``L = -min(rho A, clip(rho, 0.8, 1.28) A) + 0.04 k3(ref, lp)``
(the KL unclamped, as Liger), ``lp`` the log-prob of each completion token from ``hidden @ W.T``.
``fastalign`` takes its default path (the single pass when gradients are needed; bnpo is separable
over tokens, so its blocks hold any tokens the block budget allows), ``fastalign-two-pass`` the statistics pass and a recomputing backward; ``eager`` builds
the ``[B, T, V]`` logits; ``liger`` is Liger-Kernel's own module where installed. The prompt-share
cases start each sequence with an unscored prompt (its mask 0): fastalign sends only the scored
tokens through the head; on a GPU ``fastalign-all-rows`` turns the device compaction off
(``FASTALIGN_DEVICE_COMPACTION=0``), every row through the products.
"""
from __future__ import annotations

import torch

import fastalign
from fastalign.bench.core import Case, grad_step, random_head, with_env
from fastalign.bench.optional import optional_impl

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPTIONS = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="bnpo", use_ref_model=True)


def _eager(h, w, labels, mask, advantages, ref, old):
    """Liger's bnpo GRPO on materialised logits (fp32 log-softmax, as trainers write it)."""
    lp = torch.log_softmax((h @ w.T).float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    rho = torch.exp(lp - old)
    a = advantages[:, None]
    pg = -torch.minimum(rho * a, rho.clamp(1 - OPTIONS["epsilon_low"], 1 + OPTIONS["epsilon_high"]) * a)
    x = ref - lp
    per_token = pg + OPTIONS["beta"] * (torch.exp(x) - x - 1)
    m = mask.float()
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def _make_build(B, T, H, V, dtype, prompt_share=0.0):
    def build(device, mode):
        g = torch.Generator(device=device).manual_seed(0)
        hidden, weight = random_head(g, (B, T), H, V, dtype)
        labels = torch.randint(0, V, (B, T), device=device, generator=g)
        lengths = torch.randint(T // 2, T + 1, (B, 1), device=device, generator=g)
        position = torch.arange(T, device=device)[None, :]
        mask = ((position < lengths) & (position >= int(T * prompt_share))).long()
        advantages = torch.randn(B, device=device, generator=g)
        with torch.no_grad():  # reference and old log-probs near the policy's own
            lp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, labels[..., None]).squeeze(-1)
        ref = lp + 0.1 * torch.randn(B, T, device=device, generator=g)
        old = lp + 0.1 * torch.randn(B, T, device=device, generator=g)
        backward = mode == "fwd+bwd"

        def wrap(fn):
            return grad_step(fn and (lambda h, w: fn(h, w, labels, mask, advantages, ref, old)), (hidden, weight),
                             backward)

        def fastalign_step(single_pass):
            module = fastalign.LinearPolicyLoss(loss_type="bnpo", eps_low=OPTIONS["epsilon_low"],
                                                eps_high=OPTIONS["epsilon_high"], kl_coef=OPTIONS["beta"],
                                                kl_clamp=False, single_pass=single_pass)
            return lambda h, w, y, m, a, r, o: module(h, w, y, o, a, m, ref_logprobs=r)[0]

        impls = {"fastalign": wrap(fastalign_step("auto")), "fastalign-two-pass": wrap(fastalign_step(False)),
                 "eager": wrap(_eager)}
        if device.type == "cuda":
            impls["fastalign-all-rows"] = with_env(impls["fastalign"], FASTALIGN_DEVICE_COMPACTION="0")
        liger = optional_impl("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
        # Liger compiles its chunk function with torch.compile on a GPU; on the CPU it runs eagerly
        impls["liger"] = None if liger is None else wrap(
            lambda h, w, y, m, a, r, o, module=liger[0](**OPTIONS, compiled=device.type == "cuda"):
            module(h, w, y, m, a, ref_per_token_logps=r, old_per_token_logps=o)[0])
        return impls

    return build


def cases():
    out = []
    for B, T, H, V, dt, prompt in [(8, 256, 1024, 32000, "fp32", 0.0), (8, 256, 1024, 32000, "fp32", 0.5),
                                   (8, 1024, 4096, 151936, "bf16", 0.0), (8, 1024, 4096, 151936, "bf16", 0.5)]:
        elem = torch.empty((), dtype=DTYPES[dt]).element_size()
        N = B * T
        out.append(Case(
            op="linear_policy_loss",
            label=f"grpo B={B} T={T} H={H} V={V} {dt}" + (f" {prompt:.0%} prompt" if prompt else ""),
            params={"B": B, "T": T, "hidden": H, "vocab": V, "dtype": dt, "prompt_share": prompt},
            build=_make_build(B, T, H, V, DTYPES[dt], prompt),
            quick=False,
            warmup=_make_build(2, 8, 16, 64, DTYPES[dt]),
            impls=("fastalign", "fastalign-all-rows", "fastalign-two-pass", "eager", "liger"),
            # reads hidden and weight; backward reads them again and writes their gradients
            bytes_moved=lambda mode, n=(N + V) * H * elem: n if mode == "fwd" else 3 * n,
            flops=lambda mode, f=2 * N * H * V: f if mode == "fwd" else 3 * f,
            required_bytes=lambda mode, n=(N + V) * H * elem: 0 if mode == "fwd" else n,
        ))
    return out
