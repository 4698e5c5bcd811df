"""preference_loss from hidden states: LinearPreferenceLoss vs paths that build the logits.

Sigmoid DPO with a reference model given as hidden states; chosen rows first,
rejected rows second in a ``[2B, T, H]`` batch; ragged responses after a prompt.

Implementations:

* ``fastalign`` — :class:`fastalign.LinearPreferenceLoss` (never builds ``[N, V]``; on the
  CPU only the labelled positions go through the vocabulary);
* ``fastalign-whole`` — the same with ``compact=False``: every position, as a GPU batch runs;
* ``eager``     — what trainers write: ``logits = h @ W.T``, ``log_softmax``, ``gather``;
* ``logits``    — builds the fp32 logits, then the fused :func:`fastalign.token_logprobs`
  row kernel (backward in place into the logits): the leanest path that builds logits;
* ``torch.compile`` — the eager path compiled.
"""
from __future__ import annotations

import torch

import fastalign
from fastalign.bench.core import Case
from fastalign.bench.optional import compiled
from fastalign.reference import preference as ref

BETA = 0.1


def make_inputs(B, T, H, V, device, dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, device=device, dtype=dtype, generator=g)
    ref_hidden = hidden + 0.05 * torch.randn(2 * B, T, H, device=device, dtype=dtype, generator=g)
    weight = torch.randn(V, H, device=device, dtype=dtype, generator=g) * H ** -0.5
    labels = torch.randint(0, V, (2 * B, T), device=device, generator=g)
    prompt = T // 4
    lens = torch.randint(T // 4, T - prompt + 1, (2 * B,), device=device, generator=g)
    pos = torch.arange(T, device=device)
    labels[:, :prompt] = -100
    labels[pos[None, :] >= (prompt + lens)[:, None]] = -100
    return hidden, ref_hidden, weight, labels


def _logits_path(h, w, labels, ref_h):
    """Builds the fp32 logits and runs the fused row kernel (d(logits) written in place)."""
    B = h.shape[0] // 2
    with torch.no_grad():
        rz = (ref_h @ w.T).float()
        rlp = fastalign.token_logprobs(rz, labels).logprobs
        del rz
        r = fastalign.sequence_logprobs(rlp, labels=labels)
    z = (h @ w.T).float()
    lp = fastalign.token_logprobs(z, labels, inplace_backward=True).logprobs
    s = fastalign.sequence_logprobs(lp, labels=labels)
    return fastalign.preference_loss(s.sum[:B], s.sum[B:], r.sum[:B], r.sum[B:], beta=BETA,
                                     chosen_lengths=s.count[:B], rejected_lengths=s.count[B:])[0]


def _eager_path(h, w, labels, ref_h):
    return ref.linear_preference_loss(h, w, labels, ref_hidden=ref_h, beta=BETA)[0]


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def make_build(B, T, H, V, dtype=torch.float32):
    def build(device, mode):
        hidden, ref_hidden, weight, labels = make_inputs(B, T, H, V, device, dtype)
        backward = mode == "fwd+bwd"
        module = fastalign.LinearPreferenceLoss(loss_type="sigmoid", beta=BETA)
        whole = fastalign.LinearPreferenceLoss(loss_type="sigmoid", beta=BETA, compact=False)

        def fused(h, w, y, rh):
            return module(h, w, y, ref_hidden=rh)[0]

        def fused_whole(h, w, y, rh):
            return whole(h, w, y, ref_hidden=rh)[0]

        def wrap(fn):
            if fn is None:
                return None

            def step():
                h = hidden.detach().requires_grad_(backward)
                w = weight.detach().requires_grad_(backward)
                with torch.set_grad_enabled(backward):
                    loss = fn(h, w, labels, ref_hidden)
                    if backward:
                        loss.backward()
                return loss
            return step

        # log_softmax path: logits, log-probs and their gradients, ~4 fp32 [N, V] buffers
        eager_ok = device.type != "cpu" or 4 * 4 * 2 * B * T * V * 1.2 < _cpu_available_bytes()
        return {
            "fastalign": wrap(fused),
            "fastalign-whole": wrap(fused_whole),
            "eager": wrap(_eager_path) if eager_ok else None,
            "logits": wrap(_logits_path),
            "torch.compile": wrap(compiled(_eager_path)) if eager_ok else None,
        }

    return build


def cases():
    out = []
    # (B pairs, T, H, V, quick)
    for B, T, H, V, quick in [(2, 256, 512, 32000, True), (8, 512, 1024, 152064, False)]:
        N = 2 * B * T
        out.append(Case(
            op="preference_loss",
            label=f"linear sigmoid B{B} T{T} H{H} V{V} fp32",
            params={"pairs": B, "seq": T, "hidden": H, "vocab": V, "dtype": "fp32", "loss": "sigmoid"},
            build=make_build(B, T, H, V),
            quick=quick,
            # policy + reference forward matmuls; backward: two more (d hidden, d weight)
            flops=lambda mode, n=N, h=H, v=V: 2 * n * h * v * (2 if mode == "fwd" else 4),
        ))
    return out
