"""A hand-written GRPO loop on a tiny randomly initialised Qwen2-style model, on CPU.

The task: make the completions contain a target token. Each step samples several
completions per prompt, scores each by the share of the target token in it (a rule-based
reward), turns the scores into group-relative advantages with
:func:`fastalign.group_advantages`, and updates the policy with the clipped GRPO loss
computed straight from the model's last hidden states and its lm_head weight by
:class:`fastalign.LinearPolicyLoss` (the ``[batch, tokens, vocabulary]`` logits are never
built). The log-probs of the sampling policy come from
:func:`fastalign.integrations.hf.causal_lm_logprobs`.

    python examples/grpo_tiny.py --steps 40 --seed 0

Prints the mean reward of the first and last steps; it rises.
"""
from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

import fastalign
from fastalign.integrations.hf import causal_lm_logprobs

from common import positive_float, positive_int, print_summary, seed, tiny_qwen2

VOCAB = 32
TARGET = 7  # the token the reward asks for


@torch.no_grad()
def sample(model, prompts: torch.Tensor, new_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Ancestral sampling at temperature 1: ``[B, P + new_tokens]`` token ids."""
    ids = prompts
    for _ in range(new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids = torch.cat([ids, nxt], 1)
    return ids


def reward(completions: torch.Tensor) -> torch.Tensor:
    """The share of the target token in each completion, in [0, 1]."""
    return (completions == TARGET).float().mean(1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=40)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--prompts", type=positive_int, default=4, help="prompts per step")
    parser.add_argument("--group", type=positive_int, default=8, help="completions sampled per prompt")
    parser.add_argument("--prompt-len", type=positive_int, default=4)
    parser.add_argument("--completion-len", type=positive_int, default=8)
    parser.add_argument("--lr", type=positive_float, default=1e-2)
    parser.add_argument("--updates", type=positive_int, default=2, help="optimizer steps per sampled batch")
    args = parser.parse_args(argv)

    model = tiny_qwen2(args.seed, VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    loss_fn = fastalign.LinearPolicyLoss(loss_type="grpo", eps_low=0.2, eps_high=0.28)
    gen = torch.Generator().manual_seed(args.seed)
    P, C = args.prompt_len, args.completion_len

    rewards = []
    bar = tqdm(range(args.steps), desc="grpo", dynamic_ncols=True)
    for _ in bar:
        # 1. rollouts: G completions of each prompt, scored by the rule
        prompts = torch.randint(0, VOCAB, (args.prompts, P), generator=gen)
        model.eval()
        ids = sample(model, prompts.repeat_interleave(args.group, 0), C, gen)
        scores = reward(ids[:, P:])
        rewards.append(scores.mean().item())
        advantages = fastalign.group_advantages(scores, group_size=args.group)  # (r - mean) / (std + eps)

        # 2. log-probs of the sampling policy; entry t scores token t + 1 (completion tokens only)
        response_mask = torch.zeros_like(ids)
        response_mask[:, P:] = 1
        with torch.no_grad():
            old_logprobs = causal_lm_logprobs(model, ids, response_mask=response_mask).logprobs

        # 3. policy update from hidden states: no [B, T, V] logits
        model.train()
        labels, mask = ids[:, 1:], response_mask[:, 1:]
        for _ in range(args.updates):
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            loss, metrics = loss_fn(hidden, model.lm_head.weight, labels, old_logprobs, advantages, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        bar.set_postfix(reward=f"{rewards[-1]:.3f}", clipfrac=f"{metrics['clipfrac'].item():.3f}")
    bar.close()

    return print_summary("reward", rewards)


if __name__ == "__main__":
    main()
