"""Distillation of a tiny randomly initialised Qwen2-style teacher into a smaller student, on CPU.

Both models read the same random token sequences (a small fixed data set); the student's last hidden states
and lm_head go through :func:`fastalign.linear_divergence_loss` with the teacher's (a different hidden size,
the same vocabulary), which matches the student's next-token distributions to the teacher's without the
``[batch, tokens, vocabulary]`` logits of either model. ``--divergence`` picks the distance: ``jsd`` (the
generalized JSD at ``--beta``: 0 forward KL, 1 reverse KL), ``tvd`` (total variation) or ``cosine`` (of the
logit rows).

    python examples/distill_tiny.py --steps 30 --divergence jsd --seed 0

Prints the mean per-token divergence of the first and last steps; it falls as the student learns the
teacher's distributions.
"""
from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

import fastalign

from common import positive_float, positive_int, print_summary, seed, tiny_qwen2

VOCAB = 32


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=30)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--sequences", type=positive_int, default=16, help="sequences in the data set")
    parser.add_argument("--batch", type=positive_int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=positive_int, default=16)
    parser.add_argument("--divergence", choices=("jsd", "tvd", "cosine"), default="jsd")
    parser.add_argument("--beta", type=float, default=None, help="the JSD's beta in [0, 1] (default 0.5)")
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    args = parser.parse_args(argv)
    if args.batch > args.sequences:
        parser.error(f"argument --batch: {args.batch} sequences per step is more than the {args.sequences} --sequences")
    if args.beta is not None and (args.divergence != "jsd" or not 0.0 <= args.beta <= 1.0):
        parser.error(f"argument --beta: the jsd's, in [0, 1]; got {args.beta} with --divergence {args.divergence}")

    teacher = tiny_qwen2(args.seed + 1, VOCAB, hidden=96, head_scale=8.0).eval().requires_grad_(False)
    student = tiny_qwen2(args.seed, VOCAB)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, VOCAB, (args.sequences, args.seq_len), generator=gen)
    options = dict(divergence=args.divergence, temperature=args.temperature)
    if args.beta is not None:
        options["beta"] = args.beta

    divergences = []
    bar = tqdm(range(args.steps), desc=f"distill ({args.divergence})", dynamic_ncols=True)
    for _ in bar:
        ids = data[torch.randperm(args.sequences, generator=gen)[: args.batch]]
        hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
        loss, metrics = fastalign.linear_divergence_loss(hidden, student.lm_head.weight, teacher_hidden,
                                                         teacher.lm_head.weight, **options)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        divergences.append(metrics["divergence"].item())
        bar.set_postfix(divergence=f"{divergences[-1]:.4f}", entropy=f"{metrics['entropy'].item():.3f}")
    bar.close()

    return print_summary("divergence", divergences)


if __name__ == "__main__":
    main()
