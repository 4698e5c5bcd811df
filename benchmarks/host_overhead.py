"""Per-call host time of the ops on tiny CPU inputs (B=4, T=16, V=64), next to the eager PyTorch formula.

Run: .venv/bin/python benchmarks/host_overhead.py [N]   (N calls per case; thread CPU time per call, in us)
At this size the kernels take a few microseconds: what is measured is the Python and dispatch work around
them, which is what a GPU training step waits on when its kernels are short.
"""
import sys
import time

import torch

torch.set_num_threads(1)
import fastalign as fa  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
B, T, V = 4, 16, 64
g = torch.Generator().manual_seed(0)
lp = torch.randn(B, T, generator=g).requires_grad_(True)
old, adv, ref = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
ent = torch.rand(B, T, generator=g).requires_grad_(True)
m = torch.ones(B, T)
logits = torch.randn(B, T, V, generator=g).requires_grad_(True)
labels = torch.randint(0, V, (B, T), generator=g)
scores = torch.randn(B * 4, generator=g)
module = fa.PolicyLoss(loss_type="grpo")


def eager_ppo(x):
    ratio = torch.exp(x - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    return (pg * m).sum() / m.sum()


def eager_logprobs(z):
    return torch.log_softmax(z.float(), -1).gather(-1, labels[..., None]).squeeze(-1)


def bwd(f, x):
    def step():
        out = f()
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        x.grad = None
    return step


CASES = {
    "policy_loss ppo": lambda: fa.policy_loss(lp, old, adv, m, loss_type="ppo"),
    "policy_loss grpo": lambda: fa.policy_loss(lp, old, adv, m, loss_type="grpo"),
    "policy_loss ppo kl": lambda: fa.policy_loss(lp, old, adv, m, loss_type="ppo", ref_logprobs=ref, kl_coef=0.01),
    "policy_loss ppo kl+entropy": lambda: fa.policy_loss(lp, old, adv, m, loss_type="ppo", ref_logprobs=ref,
                                                         kl_coef=0.01, entropy=ent, entropy_coef=0.01),
    "PolicyLoss(grpo)": lambda: module(lp, old, adv, m),
    "eager ppo": lambda: eager_ppo(lp),
    "token_logprobs": lambda: fa.token_logprobs(logits, labels).logprobs,
    "token_logprobs entropy": lambda: fa.token_logprobs(logits, labels, entropy=True).logprobs,
    "eager log_softmax+gather": lambda: eager_logprobs(logits),
    "kl_penalty k3": lambda: fa.kl_penalty(lp, ref),
    "aggregate_loss token-mean": lambda: fa.aggregate_loss(lp, m),
    "aggregate_loss seq-mean-token-mean": lambda: fa.aggregate_loss(lp, m, "seq-mean-token-mean"),
    "sequence_logprobs": lambda: fa.sequence_logprobs(lp, m).sum,
}
BWD = {"policy_loss ppo": lp, "policy_loss grpo": lp, "policy_loss ppo kl": lp, "policy_loss ppo kl+entropy": lp,
       "PolicyLoss(grpo)": lp, "eager ppo": lp, "token_logprobs": logits, "eager log_softmax+gather": logits,
       "kl_penalty k3": lp}
NO_GRAD = {"group_advantages grpo": lambda: fa.group_advantages(scores, group_size=4)}


def median_us(step, n=N, batches=10):
    """CPU time of this thread per call (time on a core: waits for a busy machine's cores do not count), the
    lowest mean of ``batches`` batches of ``n // batches`` calls."""
    for _ in range(max(n // 10, 20)):
        step()
    k = max(n // batches, 1)
    means = []
    for _ in range(batches):
        t0 = time.thread_time()
        for _ in range(k):
            step()
        means.append((time.thread_time() - t0) / k)
    return min(means) * 1e6


print(f"{'case':40s} {'fwd us':>9s} {'fwd+bwd us':>11s}")
for name, f in {**CASES, **NO_GRAD}.items():
    fwd = median_us(f)
    both = f"{median_us(bwd(f, BWD[name])):11.1f}" if name in BWD else f"{'':11s}"
    print(f"{name:40s} {fwd:9.1f} {both}")
