"""GRPO with TRL's trainer and fastalign's fused log-probs and loss: the one-import swap.

    from fastalign.integrations.trl import GRPOTrainer   # instead of: from trl import GRPOTrainer

A small randomly initialised Qwen2-style model (built from a config, saved with a word-level
tokenizer to a temporary directory: no downloads) learns to emit the word ``w7``; the reward is
its share of the completion words. Runs on CPU in about a minute::

    python examples/trl_grpo.py --steps 20
"""
import argparse
import tempfile

import datasets
import tokenizers
import transformers
from trl import GRPOConfig

from fastalign.integrations.trl import GRPOTrainer
from fastalign.integrations.trl.grpo import GRPO_LOSSES  # the loss types of TRL's GRPOConfig

from common import positive_int, seed, tiny_qwen2

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
TARGET = "w7"


def tiny_checkpoint(path: str, seed: int) -> None:
    """A 2-layer Qwen2 with random weights and a word-level tokenizer, saved to ``path``."""
    model = tiny_qwen2(seed, len(WORDS), pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                         unk_token="<unk>").save_pretrained(path)


def target_share(completions, **kwargs):
    """The reward: the share of the target word among the completion's words."""
    return [c.split().count(TARGET) / max(len(c.split()), 1) for c in completions]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=20, help="optimizer steps")
    parser.add_argument("--loss-type", default="dapo", choices=sorted(GRPO_LOSSES), help="GRPOConfig.loss_type")
    parser.add_argument("--seed", type=seed, default=0)
    opts = parser.parse_args()

    prompts = [" ".join(f"w{(3 * i + j) % 50 + 10}" for j in range(3 + i % 3)) for i in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        tiny_checkpoint(f"{tmp}/model", opts.seed)
        args = GRPOConfig(output_dir=f"{tmp}/out", max_steps=opts.steps, per_device_train_batch_size=16,
                          num_generations=8, max_completion_length=8, learning_rate=1e-2,
                          lr_scheduler_type="constant", loss_type=opts.loss_type,
                          beta=0.0, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                          seed=opts.seed, disable_tqdm=True, bf16=False)
        trainer = GRPOTrainer(model=f"{tmp}/model", reward_funcs=target_share, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                              processing_class=transformers.PreTrainedTokenizerFast.from_pretrained(f"{tmp}/model"))
        trainer.train()
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    for step, reward in enumerate(rewards, 1):
        print(f"step {step:3d}  mean reward {reward:.3f}")
    print(f"mean reward: first step {rewards[0]:.3f}, last step {rewards[-1]:.3f}")


if __name__ == "__main__":
    main()
