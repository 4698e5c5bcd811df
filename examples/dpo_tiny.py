"""DPO on a tiny randomly initialised Qwen2-style model, on CPU, from hidden states.

Preference pairs share a prompt; the chosen completion contains the target token about
half of the time, the rejected one never. Each step runs the policy's body and a frozen
reference copy's body on the concatenated batch (chosen rows first, rejected rows
second) and sends the last hidden states through :class:`fastalign.LinearPreferenceLoss`
with the lm_head weight: token log-probs, per-sequence sums and the sigmoid DPO loss
without the ``[batch, tokens, vocabulary]`` logits.

    python examples/dpo_tiny.py --steps 30 --seed 0

Prints the mean reward margin ``beta * ((pi_c - ref_c) - (pi_r - ref_r))`` of the first
and last steps; it rises from 0 (policy = reference at the start).
"""
from __future__ import annotations

import argparse
import copy

import torch
from tqdm import tqdm

import fastalign

from common import positive_float, positive_int, print_summary, seed, tiny_qwen2

VOCAB = 32
TARGET = 7  # the token the chosen completions carry


def preference_pairs(n: int, prompt_len: int, completion_len: int, generator: torch.Generator):
    """``(chosen, rejected)`` token ids ``[n, P + C]`` each: the same prompt, the chosen completion
    with the target token at about half of its positions, the rejected one without it."""
    prompts = torch.randint(0, VOCAB, (n, prompt_len), generator=generator)
    other = torch.randint(0, VOCAB - 1, (2, n, completion_len), generator=generator)
    other = other + (other >= TARGET).long()  # uniform over every token but the target
    coin = torch.rand(n, completion_len, generator=generator) < 0.5
    chosen = torch.where(coin, torch.full_like(other[0], TARGET), other[0])
    return torch.cat([prompts, chosen], 1), torch.cat([prompts, other[1]], 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=30)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--pairs", type=positive_int, default=64, help="pairs in the data set")
    parser.add_argument("--batch", type=positive_int, default=8, help="pairs per step")
    parser.add_argument("--prompt-len", type=positive_int, default=4)
    parser.add_argument("--completion-len", type=positive_int, default=8)
    parser.add_argument("--beta", type=positive_float, default=0.1)
    parser.add_argument("--lr", type=positive_float, default=5e-3)
    args = parser.parse_args(argv)
    if args.batch > args.pairs:
        parser.error(f"argument --batch: {args.batch} pairs per step is more than the {args.pairs} --pairs")

    policy = tiny_qwen2(args.seed, VOCAB)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    loss_fn = fastalign.LinearPreferenceLoss(loss_type="sigmoid", beta=args.beta)
    gen = torch.Generator().manual_seed(args.seed)
    chosen, rejected = preference_pairs(args.pairs, args.prompt_len, args.completion_len, gen)

    margins = []
    bar = tqdm(range(args.steps), desc="dpo", dynamic_ncols=True)
    for _ in bar:
        pick = torch.randperm(args.pairs, generator=gen)[: args.batch]
        ids = torch.cat([chosen[pick], rejected[pick]], 0)  # [2B, T]: chosen rows first
        # labels aligned with the hidden positions: hidden[:, t] predicts ids[:, t + 1]; the prompt is not scored
        labels = ids[:, 1:].clone()
        labels[:, : args.prompt_len - 1] = -100
        hidden = policy.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        with torch.no_grad():
            ref_hidden = reference.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        loss, metrics = loss_fn(hidden, policy.lm_head.weight, labels, ref_hidden=ref_hidden,
                                ref_weight=reference.lm_head.weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        margins.append(metrics["rewards/margins"].item())
        bar.set_postfix(loss=f"{loss.item():.4f}", margin=f"{margins[-1]:.3f}",
                        accuracy=f"{metrics['rewards/accuracies'].item():.2f}")
    bar.close()

    return print_summary("reward margin", margins)


if __name__ == "__main__":
    main()
