"""What the example scripts share: a tiny Qwen2 built from its config, argparse types for their options, and the
summary line each prints at the end. The scripts import it from their own folder (``python examples/NAME.py``)."""
from __future__ import annotations

import argparse

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def tiny_qwen2(seed: int, vocab: int, hidden: int = 64, head_scale: float = 1.0, **config) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 of hidden size ``hidden`` over ``vocab`` tokens with random weights, built from its config
    (nothing downloaded); its lm_head scaled by ``head_scale`` (a teacher with peaked distributions). ``config``:
    more ``Qwen2Config`` fields (token ids)."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        attn_implementation="eager", **config))
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


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
    """An argparse type: a seed in [0, 2**32) (torch.manual_seed's range, numpy's too, which TRL seeds)."""
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**32), got {value}")
    return value


def print_summary(what: str, values: list[float]) -> dict:
    """Print the mean of ``values`` over the first and the last few steps (a quarter of them, 1 to 5), the line
    that shows the run learned; return both with the values."""
    k = max(1, min(5, len(values) // 4))
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    print(f"mean {what}: first {k} steps {first:.4f} -> last {k} steps {last:.4f}")
    return {"first": first, "last": last, "values": values}
