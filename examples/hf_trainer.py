"""Language-model training with ``transformers.Trainer`` on a tiny randomly initialised Qwen2, on CPU, with the
model's own loss computed without its logits.

:func:`fastalign.integrations.hf.install_fused_loss` makes the model's forward, in training with labels, return
the loss of its labels from the last hidden states through the lm_head a block of rows at a time: the same loss
and gradients as the model's own forward, never the ``[batch, tokens, vocabulary]`` logits. The data is a small
learnable language (arithmetic sequences over the vocabulary, each from a random start with a random step of
1 to 3); the first token of each sequence is not scored (its label is -100), as a prompt's would not be. With
``evaluation=True`` the evaluation on held-out sequences (``Trainer.evaluate()``, its ``eval_loss``) runs without
the logits too.

    python examples/hf_trainer.py --steps 40 --seed 0

Prints the mean training loss of the first and the last steps, and the held-out loss before and after training;
both fall as the model learns the sequences.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import transformers

from fastalign.integrations.hf import install_fused_loss

from common import positive_float, positive_int, print_summary, seed, tiny_qwen2

VOCAB = 64


class Sequences(torch.utils.data.Dataset):
    """``n`` arithmetic sequences of ``length`` tokens modulo the vocabulary, their first token unscored."""

    def __init__(self, n: int, length: int, generator: torch.Generator):
        start = torch.randint(0, VOCAB, (n, 1), generator=generator)
        step = torch.randint(1, 4, (n, 1), generator=generator)
        self.ids = (start + step * torch.arange(length)) % VOCAB
        self.labels = self.ids.clone()
        self.labels[:, 0] = -100

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=40)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--sequences", type=positive_int, default=256, help="sequences in the data set")
    parser.add_argument("--batch", type=positive_int, default=16, help="sequences per micro-batch")
    parser.add_argument("--accumulation", type=positive_int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--seq-len", type=positive_int, default=16)
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    args = parser.parse_args(argv)

    model = install_fused_loss(tiny_qwen2(args.seed, VOCAB), evaluation=True)
    generator = torch.Generator().manual_seed(args.seed)
    data = Sequences(args.sequences, args.seq_len, generator)
    held_out = Sequences(args.batch, args.seq_len, generator)
    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(
            output_dir=os.path.join(out, "run"), max_steps=args.steps, per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accumulation, learning_rate=args.lr, lr_scheduler_type="constant",
            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=args.seed, data_seed=args.seed,
            per_device_eval_batch_size=args.batch)
        trainer = transformers.Trainer(model=model, args=training, train_dataset=data, eval_dataset=held_out)
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss: {before:.4f} before training, {after:.4f} after")
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return print_summary("loss", losses)


if __name__ == "__main__":
    main()
