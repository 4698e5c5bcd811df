"""Peak CPU memory (and time) of one SFT, DPO, GRPO, RLOO, GKD or Online DPO training step: TRL's trainer against
fastalign's drop-in.

Each trainer runs in its own subprocess (a fresh allocator and a fresh peak) on the same small
randomly initialised Qwen2 with a large vocabulary (default V = 131072), the same prompts, seed and
config, one optimizer step. Reported per trainer: the process's peak resident set size
(``ru_maxrss``), the resident size just before ``train()`` (model, reference and optimizer set up)
and their difference, the step's own peak (generation included, the same for both); then the ratios
TRL / fastalign. On CPU TRL's fused head scores every position in vocabulary chunks (its Triton
kernel, which skips unscored positions, runs on GPUs only). Not part of the tests::

    python benchmarks/trl_peak_memory.py --vocab 131072 --completion-length 256 \
        [--trainer sft|dpo|grpo|rloo|gkd|online_dpo]

GKD (TRL's experimental ``GKDTrainer``) distils into the model from a teacher of the same architecture with other
random weights, off-policy (``lmbda=0``: the dataset's completions, no generation). Online DPO (TRL's
experimental ``OnlineDPOTrainer``) samples two completions per prompt and scores them with a length reward.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def build_checkpoint(path: str, vocab: int, hidden: int) -> None:
    import tokenizers
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=None)
    model = transformers.Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                         unk_token="<unk>").save_pretrained(path)


#: --trainer -> (trainer class, TRL module that defines it: trl or one of trl.experimental's)
TRAINERS = {"sft": ("SFTTrainer", "trl"), "dpo": ("DPOTrainer", "trl"), "grpo": ("GRPOTrainer", "trl"),
            "rloo": ("RLOOTrainer", "trl"), "gkd": ("GKDTrainer", "gkd"),
            "online_dpo": ("OnlineDPOTrainer", "online_dpo")}


def run_one(which: str, checkpoint: str, opts) -> dict:
    """One optimizer step of ``which`` ("trl" or "fastalign"); returns its memory figures (MiB)."""
    import datasets
    import transformers
    import trl

    import fastalign.integrations.trl as fa_trl

    from trl.experimental import gkd, online_dpo

    name, home = TRAINERS[opts.trainer]
    cls = getattr({"trl": trl, "gkd": gkd, "online_dpo": online_dpo}[home] if which == "trl" else fa_trl, name)
    common = dict(output_dir=os.path.join(os.path.dirname(checkpoint), f"out-{which}"), max_steps=1,
                  per_device_train_batch_size=opts.batch, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                  disable_tqdm=True, logging_steps=1, optim="sgd", bf16=False)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint)
    if opts.trainer == "dpo":  # batch pairs: a 16-word prompt, chosen and rejected of completion_length words
        words = lambda i, k: " ".join(f"w{(k * i + 3 * j) % 1000 + 3}" for j in range(opts.completion_length))
        pairs = {"prompt": [" ".join(f"w{(7 * i + j) % 1000 + 3}" for j in range(16)) for i in range(opts.batch)],
                 "chosen": [words(i, 5) for i in range(opts.batch)], "rejected": [words(i, 11) for i in range(opts.batch)]}
        trainer = cls(model=checkpoint, args=trl.DPOConfig(max_length=opts.completion_length + 24, **common),
                      train_dataset=datasets.Dataset.from_dict(pairs), processing_class=tokenizer)
    elif opts.trainer == "sft":  # batch texts of completion_length words, every token scored
        texts = [" ".join(f"w{(7 * i + 3 * j) % 1000 + 3}" for j in range(opts.completion_length))
                 for i in range(opts.batch)]
        trainer = cls(model=checkpoint, args=trl.SFTConfig(max_length=opts.completion_length + 8, **common),
                      train_dataset=datasets.Dataset.from_dict({"text": texts}), processing_class=tokenizer)
    elif opts.trainer == "gkd":  # batch examples: a 16-word prompt and a completion of completion_length words
        ids = [[(7 * i + j) % 1000 + 3 for j in range(16 + opts.completion_length)] for i in range(opts.batch)]
        rows = {"prompt": [" ".join(f"w{t - 3}" for t in row[:16]) for row in ids], "input_ids": ids,
                "completion_mask": [[0] * 16 + [1] * opts.completion_length for _ in ids]}
        import torch

        torch.manual_seed(1)
        teacher = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(checkpoint))
        trainer = cls(model=checkpoint, teacher_model=teacher,
                      args=gkd.GKDConfig(lmbda=0.0, max_length=opts.completion_length + 24, **common),
                      train_dataset=datasets.Dataset.from_dict(rows), processing_class=tokenizer)
    elif opts.trainer == "online_dpo":  # batch prompts, two sampled completions of completion_length tokens each
        prompts = [" ".join(f"w{(7 * i + j) % 1000 + 3}" for j in range(16)) for i in range(opts.batch)]
        args = online_dpo.OnlineDPOConfig(max_new_tokens=opts.completion_length, max_length=opts.completion_length + 24,
                                          **common)
        trainer = cls(model=checkpoint, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                      args=args, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                      processing_class=tokenizer)
    else:
        config = trl.GRPOConfig if opts.trainer == "grpo" else trl.RLOOConfig
        loss = dict(loss_type="dapo") if opts.trainer == "grpo" else {}
        args = config(num_generations=opts.batch, max_completion_length=opts.completion_length, min_p=None,
                      beta=opts.beta, generation_kwargs={"min_new_tokens": opts.completion_length}, **loss, **common)
        prompts = [" ".join(f"w{(7 * i + j) % 1000 + 3}" for j in range(16)) for i in range(opts.batch)]
        trainer = cls(model=checkpoint, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                      args=args, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                      processing_class=tokenizer)
    before = _rss_mib()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = _peak_mib()
    return {"peak_rss_mib": peak, "rss_before_train_mib": before, "step_peak_mib": peak - before,
            "train_s": seconds, "loss": trainer.state.log_history[0]["loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=sorted(TRAINERS), default="grpo")
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8,
                        help="completions (SFT: texts, DPO: pairs, GKD: examples, Online DPO: prompts) per step")
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (adds a reference model)")
    parser.add_argument("--child", choices=["trl", "fastalign"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(run_one(opts.child, opts.checkpoint, opts)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "model")
        build_checkpoint(checkpoint, opts.vocab, opts.hidden)
        results = {}
        for which in ("trl", "fastalign"):
            cmd = [sys.executable, __file__, "--child", which, "--checkpoint", checkpoint, "--vocab", str(opts.vocab),
                   "--hidden", str(opts.hidden), "--batch", str(opts.batch),
                   "--completion-length", str(opts.completion_length), "--beta", str(opts.beta),
                   "--trainer", opts.trainer]
            env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results[which] = json.loads(out.strip().splitlines()[-1])
    # a DPO pair scores its chosen and its rejected completion, an Online DPO prompt its two samples
    per_row = 2 if opts.trainer in ("dpo", "online_dpo") else 1
    tokens = opts.batch * per_row * opts.completion_length
    rows = f"{opts.batch} {'pairs' if opts.trainer == 'dpo' else 'prompts'} x 2" if per_row == 2 else \
        f"{opts.batch} completions"
    print(f"one {opts.trainer.upper()} step, V={opts.vocab}, hidden={opts.hidden}, {rows} x {opts.completion_length} "
          f"tokens ({tokens} scored tokens; full fp32 logits would be {tokens * opts.vocab * 4 / 2**20:.0f} MiB)")
    print(f"{'trainer':<10} {'peak RSS':>10} {'before train':>13} {'step peak':>10} {'train()':>9} {'loss':>12}")
    for which, r in results.items():
        print(f"{which:<10} {r['peak_rss_mib']:>8.0f}Mi {r['rss_before_train_mib']:>11.0f}Mi "
              f"{r['step_peak_mib']:>8.0f}Mi {r['train_s']:>8.2f}s {r['loss']:>12.6g}")
    t, f = results["trl"], results["fastalign"]
    print(f"ratio TRL / fastalign: peak RSS {t['peak_rss_mib'] / f['peak_rss_mib']:.2f}, "
          f"step peak {t['step_peak_mib'] / max(f['step_peak_mib'], 1e-9):.2f}, train() time "
          f"{t['train_s'] / f['train_s']:.2f} (generation included for GRPO, RLOO and Online DPO)")


if __name__ == "__main__":
    main()
