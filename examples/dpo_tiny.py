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
from transformers import Qwen2Config, Qwen2ForCausalLM

import fastalign

VOCAB = 32
TARGET = 7  # the token the chosen completions carry


def tiny_qwen2(seed: int) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 with a 32-token vocabulary, built from its config (nothing downloaded)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="eager")
    return Qwen2ForCausalLM(config)


def preference_pairs(n: int, prompt_len: int, completion_len: int, generator: torch.Generator):
    """``(chosen, rejected)`` token ids ``[n, P + C]`` each: the same prompt, the chosen completion
    with the target token at about half of its positions, the rejected one without it."""
    prompts = torch.randint(0, VOCAB, (n, prompt_len), generator=generator)
    other = torch.randint(0, VOCAB - 1, (2, n, completion_len), generator=generator)
    other = other + (other >= TARGET).long()  # uniform over every token but the target
    coin = torch.rand(n, completion_len, generator=generator) < 0.5
    chosen = torch.where(coin, torch.full_like(other[0], TARGET), other[0])
    return torch.cat([prompts, chosen], 1), torch.cat([prompts, other[1]], 1)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of steps, prompts, tokens)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a learning rate, a temperature)."""
    value = float(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def seed(text: str) -> int:
    """An argparse type: a seed in [0, 2**32) (torch.manual_seed's range, numpy's too)."""
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**32), got {value}")
    return value


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

    policy = tiny_qwen2(args.seed)
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

    k = max(1, min(5, len(margins) // 4))
    first, last = sum(margins[:k]) / k, sum(margins[-k:]) / k
    print(f"mean reward margin: first {k} steps {first:.4f} -> last {k} steps {last:.4f}")
    return {"first": first, "last": last, "margins": margins}


if __name__ == "__main__":
    main()
