"""Where the time of the LM-head ops goes, kernel by kernel (torch.profiler), forward and backward.

Run: python benchmarks/profile_linear.py [--device cuda] [--tokens 8192] [--hidden 4096] [--vocab 151936]
(``make gpu-check`` runs it on the GPU at these sizes, bf16; ``--device cpu`` with small sizes on a CPU.)

For ``linear_logprobs`` (the two passes: a forward kernel, then the backward's chunks of d(logits) and
their products) and ``LinearPolicyLoss`` (GRPO, its single pass over blocks of the vocabulary when
gradients are needed), one table each: the operators and kernels by total device time over ``--steps``
steps of forward and backward, after two warm-up steps (Triton compiles there).
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fastalign


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=8192, help="rows of hidden states (a multiple of --rows)")
    p.add_argument("--rows", type=int, default=8, help="sequences of the policy loss's batch")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=14, help="rows per table")
    args = p.parse_args(argv)
    if args.tokens % args.rows:
        p.error(f"--tokens ({args.tokens}) must be a multiple of --rows ({args.rows})")
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    N, H, V, B = args.tokens, args.hidden, args.vocab, args.rows
    T = N // B
    torch.manual_seed(0)
    hidden = (torch.randn(N, H, device=dev) * 0.5).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, device=dev) * 0.02).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), device=dev)
    old, advantages = -torch.rand(B, T, device=dev), torch.randn(B, T, device=dev)
    mask = torch.ones(B, T, device=dev)
    policy = fastalign.LinearPolicyLoss(loss_type="grpo")

    def logprobs():
        fastalign.linear_logprobs(hidden, weight, labels).logprobs.sum().backward()

    def policy_loss():
        loss, _ = policy(hidden.view(B, T, H), weight, labels.view(B, T), old, advantages, mask)
        loss.backward()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    for name, step in (("linear_logprobs", logprobs), ("LinearPolicyLoss grpo", policy_loss)):
        for _ in range(2):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        print(f"==== {name} forward + backward: N={N} H={H} V={V} {args.dtype} on {dev}, {args.steps} steps",
              flush=True)
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=70), flush=True)


if __name__ == "__main__":
    main()
