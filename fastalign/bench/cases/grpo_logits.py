"""GRPO on a model's logits: Liger-Kernel's ``triton_grpo_loss`` API (loss type ``dapo``, ``reduce=True``).

The logits are ``[B, L+1, V]``; position ``t < L`` scores completion token ``y_t``. With the temperature ``T``, the
old and reference log-probs ``old``, ``ref``, the sequence's advantage ``A`` and the completion mask ``m`` (a quarter
of it 0: each sequence padded at its end, from none of it to half of it)::

    lp_t = log softmax(x_t / T)_y_t,   rho_t = exp(lp_t - old_t)
    L_t  = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta (exp(ref_t - lp_t) - (ref_t - lp_t) - 1)
    loss = sum_t m_t L_t / max(sum_t m_t, 1)

The logits ``x`` are an intermediate of the graph, as a model's are (``leaf + 0``, built before each timed step and
outside it, the same for every candidate), so that a backward may write d(logits) over them. ``fastalign`` is
:func:`fastalign.integrations.liger.triton_grpo_loss` with ``reduce=True`` (:func:`fastalign.token_logprobs` over
each scored row, its backward written over ``x``, then :func:`fastalign.policy_loss`; it also returns the KL and
clip-ratio metrics, as Liger's does); ``eager`` is what a trainer writes by hand, as TRL's ``GRPOTrainer`` computes
it: ``log_softmax`` of ``x[:, :-1]`` in fp32 over ``T``, a gather of the completion ids, the clipped ratio, the k3 KL
and the masked token sum over the token count; ``torch.compile`` compiles that; ``liger`` is Liger-Kernel's own
``triton_grpo_loss`` where installed (a Triton kernel: on a GPU), which also writes its gradient over its input.
"""
from __future__ import annotations

import torch

from fastalign.bench.cases.token_logprobs import DTYPES, traffic_model
from fastalign.bench.core import Case, intermediate_step
from fastalign.bench.optional import compiled, optional_impl
from fastalign.integrations.liger import triton_grpo_loss

#: the loss's options, as a DAPO run sets them (Liger's default temperature)
OPTIONS = dict(temperature=0.9, beta=0.04, eps_low=0.2, eps_high=0.28, loss_type="dapo")


def _inputs(B, L, V, dtype, device):
    """``(base [B, L+1, V], ids, old, ref, advantages, mask)``: unit-scale logits, ``old`` / ``ref`` the logits'
    own log-probs of the ids plus noise (ratios near 1, some of them clipped), ``mask`` int32 with sequence ``i``
    padded over its last ``i L / (2 (B - 1))`` positions (a quarter of the tokens over the batch)."""
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(B, L + 1, V, device=device, dtype=dtype, generator=g)
    ids = torch.randint(0, V, (B, L), device=device, generator=g)
    with torch.no_grad():  # a sequence at a time: the build's peak stays at one sequence's fp32 log-probs
        lp = torch.stack([torch.log_softmax(base[i, :-1].float() / OPTIONS["temperature"], -1)
                          .gather(-1, ids[i, :, None])[:, 0] for i in range(B)])
    old = lp + 0.1 * torch.randn(B, L, device=device, generator=g)
    ref = lp + 0.2 * torch.randn(B, L, device=device, generator=g)
    advantages = torch.randn(B, device=device, generator=g)
    pad = [(L * i) // (2 * max(B - 1, 1)) for i in range(B)]
    mask = (torch.arange(L, device=device)[None, :] < torch.tensor([L - p for p in pad], device=device)[:, None])
    return base, ids, old, ref, advantages, mask.to(torch.int32)


def _eager(x, ids, old, ref, advantages, mask):
    """The dapo loss a trainer writes by hand (the module doc), in fp32."""
    T, beta, eps_low, eps_high = (OPTIONS[k] for k in ("temperature", "beta", "eps_low", "eps_high"))
    logp = torch.log_softmax(x[:, :-1].float() / T, -1)
    lp = logp.gather(-1, ids[..., None]).squeeze(-1)
    ratio = torch.exp(lp - old)
    A = advantages[:, None]
    pg = -torch.min(ratio * A, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * A)
    d = ref - lp
    per_token = pg + beta * (torch.exp(d) - d - 1.0)
    m = mask.float()
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def _make_build(B, L, V, dtype):
    def build(device, mode):
        base, ids, old, ref, advantages, mask = _inputs(B, L, V, dtype, device)

        def wrap(fn):
            return intermediate_step(fn, base, ids, backward=mode == "fwd+bwd")

        def dropin(impl):
            if impl is None:
                return None

            def loss(x, y):
                return impl(x, old, ref, y, advantages, mask, inplace=True, reduce=True, **OPTIONS)[0]

            return wrap(loss)

        def by_hand(fn):
            return None if fn is None else wrap(lambda x, y: fn(x, y, old, ref, advantages, mask))

        liger = optional_impl("liger_kernel.transformers.grpo_loss", "triton_grpo_loss") \
            if device.type == "cuda" else None
        return {"fastalign": dropin(triton_grpo_loss), "eager": by_hand(_eager),
                "torch.compile": by_hand(compiled(_eager)), "liger": dropin(None if liger is None else liger[0])}

    return build


#: (sequences, completion tokens, vocabulary, dtype, quick)
SHAPES = [(8, 512, 32000, "fp32", False), (16, 512, 151936, "bf16", False)]


def cases():
    out = []
    for B, L, V, dt, quick in SHAPES:
        elem = torch.empty((), dtype=DTYPES[dt]).element_size()
        N = B * L  # the scored positions (the last of each sequence is not read)
        out.append(Case(
            op="grpo_logits",
            label=f"{B}x{L}x{V} {dt}",
            params={"sequences": B, "completion_tokens": L, "tokens": N, "vocab": V, "dtype": dt,
                    "scored_tokens": N - sum((L * i) // (2 * max(B - 1, 1)) for i in range(B)), **OPTIONS,
                    **traffic_model(N, V, elem)},
            build=_make_build(B, L, V, DTYPES[dt]),
            quick=quick,
            warmup=_make_build(2, 8, 64, DTYPES[dt]),
            impls=("fastalign", "eager", "torch.compile", "liger"),
            # forward reads the logits once; backward reads them again and writes d(logits)
            bytes_moved=lambda mode, n=N * V * elem: n if mode == "fwd" else 3 * n,
            # d(logits) [B, L+1, V], where it is new
            required_bytes=lambda mode, n=B * (L + 1) * V * elem: 0 if mode == "fwd" else n,
        ))
    return out
