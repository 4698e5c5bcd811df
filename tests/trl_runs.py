"""Running a TRL trainer and fastalign's drop-in side by side: a tiny random Qwen2 checkpoint with a word-level
tokenizer (no downloads), a run that records the logs and the parameters around ``train()``, and the comparison
of two runs (same logged keys and values, same parameters before, same update)."""
import math

import pytest
import torch

#: the test vocabulary: pad, eos, unk, then words w0, w1, ...
WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(60)]


def tiny_checkpoint(path, *, hidden: int = 32, seed: int = 0, eos_bias: float = 0.0) -> str:
    """Save a one-layer Qwen2 over :data:`WORDS` (untied head drawn at scale 0.3; ``eos_bias`` added to the EOS
    row, so that sampled completions stop early) and its left-padding tokenizer under ``path``."""
    import tokenizers
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=None)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
        model.lm_head.weight[1] += eos_bias
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                         unk_token="<unk>", padding_side="left").save_pretrained(path)
    return str(path)


def tokenized_completions(n: int):
    """``n`` pre-tokenized examples of :data:`WORDS` ids (prompt text, ids and completion mask, as TRL's GKD / GOLD
    collator reads them), each completion ending in the EOS id."""
    import datasets

    rows = {"prompt": [], "input_ids": [], "completion_mask": []}
    for i in range(n):
        prompt = [(3 * i + j) % 50 + 3 for j in range(2 + i % 3)]
        completion = [(7 * i + 5 * j) % 50 + 3 for j in range(1 + i % 4)] + [1]
        rows["prompt"].append(" ".join(WORDS[t] for t in prompt))
        rows["input_ids"].append(prompt + completion)
        rows["completion_mask"].append([0] * len(prompt) + [1] * len(completion))
    return datasets.Dataset.from_dict(rows)


def tiny_moe_checkpoint(path, tokenizer_checkpoint) -> str:
    """Save a tiny Qwen3-MoE (two layers of 4 experts, 2 per token) that returns its router logits, with a
    load-balancing coefficient, under ``path`` beside the tokenizer of ``tokenizer_checkpoint`` (its vocabulary)."""
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tokenizer_checkpoint)
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                         max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                                         eos_token_id=1, bos_token_id=None, output_router_logits=True,
                                         router_aux_loss_coef=0.02)
    model = transformers.Qwen3MoeForCausalLM(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run(trainer):
    """``(logs, before, after)``: ``trainer.train()``'s logs (the final summary and timings left out) and its
    trainable parameters before and after."""
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    logs = [{k: v for k, v in log.items() if "time" not in k and "per_second" not in k}
            for log in trainer.state.log_history[:-1]]
    after = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    return logs, before, after


def assert_same_run(ours, theirs, *, min_logs: int = 2) -> None:
    """Two :func:`run` results agree: the same logged keys and values (NaN where TRL's is NaN), the same
    parameters before, the same update (to 1e-4), and some parameter moved."""
    (o_logs, o_before, o_after), (t_logs, t_before, t_after) = ours, theirs
    assert len(o_logs) == len(t_logs) >= min_logs
    for t, o in zip(t_logs, o_logs):
        assert sorted(o) == sorted(t)
        for k, v in t.items():
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(o[k]), k
            elif isinstance(v, float):
                assert o[k] == pytest.approx(v, rel=1e-4, abs=2e-5), k
    assert sorted(o_before) == sorted(t_before)
    moved = 0
    for k in t_before:
        torch.testing.assert_close(o_before[k], t_before[k], rtol=0, atol=0)
        torch.testing.assert_close(o_after[k] - o_before[k], t_after[k] - t_before[k], rtol=1e-4, atol=2e-5,
                                   msg=lambda m: f"{k}: {m}")
        moved += int(not torch.equal(t_after[k], t_before[k]))
    assert moved > 0
