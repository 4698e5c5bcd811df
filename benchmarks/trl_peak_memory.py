"""Peak CPU memory (and time) of one training step: TRL's trainer against fastalign's drop-in.

Each trainer runs in its own subprocess (a fresh allocator and a fresh peak) on the same small
randomly initialised Qwen2 with a large vocabulary (default V = 131072), the same prompts, seed and
config, one optimizer step. Reported per trainer: the process's peak resident set size
(``ru_maxrss``), the resident size just before ``train()`` (model, reference and optimizer set up)
and their difference, the step's own peak (generation included, the same for both); then the ratios
TRL / fastalign. On CPU TRL's fused head scores every position in vocabulary chunks (its Triton
kernel, which skips unscored positions, runs on GPUs only). Not part of the tests::

    python benchmarks/trl_peak_memory.py --vocab 131072 --completion-length 256 \
        [--trainer sft|dpo|grpo|rloo|gkd|gold|online_dpo|a2po|iw_opd|sdpo|sdft|hf_trainer|hf_evaluate]
        [--distillation-mode full_logits|topk_logits|sampled_token]   (SDPO, SDFT)
        [--iw-opd-jsd-top-k K]   (IW-OPD: the JSD objective, beta 0.5, over a top-k support; 0 the vocabulary)

``--batch`` completions per step: SFT texts, DPO pairs (chosen and rejected), GRPO / RLOO / SDPO / SDFT samples of
one prompt, Online DPO prompts (two samples each), A*-PO prompts (one sample each; its first stage samples two
per prompt for the optimal values), ``hf_trainer`` rows of ``--completion-length`` random tokens
(``transformers.Trainer``: the model's own loss against :func:`fastalign.integrations.hf.install_fused_loss`;
``hf_evaluate`` its ``evaluate()`` on those rows instead of a step, without a ``compute_metrics``, against
``install_fused_loss(evaluation=True)``),
IW-OPD prompts (one on-policy sample each), GKD and GOLD dataset completions (``lmbda=0``, no generation). The
distillation trainers (GKD, GOLD, IW-OPD) take a teacher of the same architecture with other random weights; SDPO
and SDFT distil from the model itself shown a privileged context
(``--distillation-mode``, default ``full_logits``; ``topk_logits`` at TRL's ``distillation_topk=100``).
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


def datasets_from(columns: dict):
    import datasets

    return datasets.Dataset.from_dict(columns)


def _prompts(opts) -> list:
    """``opts.batch`` prompts of 16 words."""
    return [" ".join(f"w{(7 * i + j) % 1000 + 3}" for j in range(16)) for i in range(opts.batch)]


def _length_reward(completions, **_):
    return [float(len(c)) for c in completions]


def _teacher(checkpoint):
    """A teacher of the checkpoint's architecture with other random weights."""
    import torch
    import transformers

    torch.manual_seed(1)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(checkpoint))


def _sft(trl, cls, checkpoint, tokenizer, common, opts):  # batch texts of completion_length words, all scored
    texts = [" ".join(f"w{(7 * i + 3 * j) % 1000 + 3}" for j in range(opts.completion_length))
             for i in range(opts.batch)]
    return cls(model=checkpoint, args=trl.SFTConfig(max_length=opts.completion_length + 8, **common),
               train_dataset=datasets_from({"text": texts}), processing_class=tokenizer)


def _hf_trainer(trl, cls, checkpoint, tokenizer, common, opts):  # transformers.Trainer, random rows, all scored
    import torch
    import transformers

    from fastalign.integrations.hf import install_fused_loss

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    evaluation = opts.trainer == "hf_evaluate"
    if opts.child == "fastalign":
        install_fused_loss(model, evaluation=evaluation)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (opts.batch, opts.completion_length), generator=g).tolist()
    data = datasets_from({"input_ids": ids, "labels": ids})
    args = transformers.TrainingArguments(**common, per_device_eval_batch_size=opts.batch)
    return cls(model=model, args=args, **{"eval_dataset" if evaluation else "train_dataset": data})


def _dpo(trl, cls, checkpoint, tokenizer, common, opts):  # batch pairs: a prompt, chosen and rejected completions
    def words(i, k):
        return " ".join(f"w{(k * i + 3 * j) % 1000 + 3}" for j in range(opts.completion_length))
    pairs = {"prompt": _prompts(opts), "chosen": [words(i, 5) for i in range(opts.batch)],
             "rejected": [words(i, 11) for i in range(opts.batch)]}
    return cls(model=checkpoint, args=trl.DPOConfig(max_length=opts.completion_length + 24, **common),
               train_dataset=datasets_from(pairs), processing_class=tokenizer)


def _grpo_or_rloo(trl, cls, checkpoint, tokenizer, common, opts):  # batch sampled completions of one group
    config = trl.GRPOConfig if opts.trainer == "grpo" else trl.RLOOConfig
    loss = dict(loss_type="dapo") if opts.trainer == "grpo" else {}
    args = config(num_generations=opts.batch, max_completion_length=opts.completion_length, min_p=None,
                  beta=opts.beta, generation_kwargs={"min_new_tokens": opts.completion_length}, **loss, **common)
    return cls(model=checkpoint, reward_funcs=_length_reward, args=args,
               train_dataset=datasets_from({"prompt": _prompts(opts)}), processing_class=tokenizer)


def _gkd_or_gold(trl, cls, checkpoint, tokenizer, common, opts):  # batch dataset completions (lmbda=0: no sampling)
    if opts.trainer == "gkd":
        from trl.experimental.gkd import GKDConfig as config
    else:
        from trl.experimental.gold import GOLDConfig as config

    ids = [[(7 * i + j) % 1000 + 3 for j in range(16 + opts.completion_length)] for i in range(opts.batch)]
    rows = {"prompt": [" ".join(f"w{t - 3}" for t in row[:16]) for row in ids], "input_ids": ids,
            "completion_mask": [[0] * 16 + [1] * opts.completion_length for _ in ids]}
    return cls(model=checkpoint, teacher_model=_teacher(checkpoint),
               args=config(lmbda=0.0, max_length=opts.completion_length + 24, **common),
               train_dataset=datasets_from(rows), processing_class=tokenizer)


def _online_dpo(trl, cls, checkpoint, tokenizer, common, opts):  # batch prompts, two samples each
    from trl.experimental.online_dpo import OnlineDPOConfig

    args = OnlineDPOConfig(max_new_tokens=opts.completion_length, max_length=opts.completion_length + 24, **common)
    return cls(model=checkpoint, reward_funcs=_length_reward, args=args,
               train_dataset=datasets_from({"prompt": _prompts(opts)}), processing_class=tokenizer)


def _a2po(trl, cls, checkpoint, tokenizer, common, opts):  # batch prompts, one sample each (stage 1: 2 per prompt)
    from trl.experimental.a2po import A2POConfig

    args = A2POConfig(max_completion_length=opts.completion_length, num_value_samples=2, **common)
    return cls(model=checkpoint, reward_funcs=lambda completions, **kw: [float(len(c) % 2) for c in completions],
               args=args, train_dataset=datasets_from({"prompt": _prompts(opts)}), processing_class=tokenizer)


def _iw_opd(trl, cls, checkpoint, tokenizer, common, opts):  # batch on-policy samples, IW-OPD from a teacher
    from trl.experimental.iw_opd import IWOPDConfig

    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    # a dataset completion of the sampled length: TRL divides by the dataset batch's completion-token count
    completion = " ".join(f"w{j + 3}" for j in range(opts.completion_length))
    messages = [[{"role": "user", "content": p}, {"role": "assistant", "content": completion}] for p in _prompts(opts)]
    jsd = {} if opts.iw_opd_jsd_top_k is None else dict(distillation_objective="jsd", beta=0.5,
                                                        loss_top_k=opts.iw_opd_jsd_top_k)
    args = IWOPDConfig(max_completion_length=opts.completion_length, max_length=opts.completion_length + 24,
                       **jsd, **common)
    return cls(model=checkpoint, teacher_model=_teacher(checkpoint), args=args,
               train_dataset=datasets_from({"messages": messages}), processing_class=tokenizer)


def _distillation(opts) -> dict:
    """The SDPO / SDFT distillation fields of ``--distillation-mode`` (the reverse KL for ``sampled_token``)."""
    mode = opts.distillation_mode
    return dict(distillation_mode=mode, distillation_topk=100 if mode == "topk_logits" else None,
                **(dict(distillation_alpha=1.0) if mode == "sampled_token" else {}))


def _sdpo(trl, cls, checkpoint, tokenizer, common, opts):  # batch samples of one prompt, the privileged teacher
    from trl.experimental.sdpo import SDPOConfig

    args = SDPOConfig(num_generations=opts.batch, max_completion_length=opts.completion_length,
                      **_distillation(opts), **common)
    return cls(model=checkpoint, reward_funcs=lambda completions, **kw: [float(i % 2) for i in range(len(completions))],
               args=args, train_dataset=datasets_from({"prompt": _prompts(opts)}), processing_class=tokenizer)


def _sdft(trl, cls, checkpoint, tokenizer, common, opts):  # batch samples of one prompt, the privileged teacher
    from trl.experimental.sdft import SDFTConfig

    args = SDFTConfig(num_generations=opts.batch, max_completion_length=opts.completion_length,
                      **_distillation(opts), **common)
    rows = {"prompt": _prompts(opts), "privileged_context": _prompts(opts)[::-1]}
    return cls(model=checkpoint, args=args, train_dataset=datasets_from(rows), processing_class=tokenizer)


#: --trainer -> (trainer class, TRL module that defines it, builder of the trainer)
TRAINERS = {"sft": ("SFTTrainer", "trl", _sft), "dpo": ("DPOTrainer", "trl", _dpo),
            "grpo": ("GRPOTrainer", "trl", _grpo_or_rloo), "rloo": ("RLOOTrainer", "trl", _grpo_or_rloo),
            "gkd": ("GKDTrainer", "trl.experimental.gkd", _gkd_or_gold),
            "gold": ("GOLDTrainer", "trl.experimental.gold", _gkd_or_gold),
            "online_dpo": ("OnlineDPOTrainer", "trl.experimental.online_dpo", _online_dpo),
            "a2po": ("A2POTrainer", "trl.experimental.a2po", _a2po),
            "iw_opd": ("IWOPDTrainer", "trl.experimental.iw_opd", _iw_opd),
            "sdpo": ("SDPOTrainer", "trl.experimental.sdpo", _sdpo),
            "sdft": ("SDFTTrainer", "trl.experimental.sdft", _sdft),
            "hf_trainer": ("Trainer", "transformers", _hf_trainer),  # both: install_fused_loss for fastalign
            "hf_evaluate": ("Trainer", "transformers", _hf_trainer)}


def run_one(which: str, checkpoint: str, opts) -> dict:
    """One optimizer step of ``which`` ("trl" or "fastalign"); returns its memory figures (MiB)."""
    import importlib

    import transformers
    import trl

    import fastalign.integrations.trl as fa_trl

    name, home, build = TRAINERS[opts.trainer]
    cls = getattr(importlib.import_module(home) if which == "trl" or home == "transformers" else fa_trl, name)
    common = dict(output_dir=os.path.join(os.path.dirname(checkpoint), f"out-{which}"), max_steps=1,
                  per_device_train_batch_size=opts.batch, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                  disable_tqdm=True, logging_steps=1, optim="sgd", bf16=False)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint)
    trainer = build(trl, cls, checkpoint, tokenizer, common, opts)
    before = _rss_mib()
    start = time.perf_counter()
    if opts.trainer == "hf_evaluate":
        loss = trainer.evaluate()["eval_loss"]
    else:
        trainer.train()
        loss = trainer.state.log_history[0]["loss"]
    seconds = time.perf_counter() - start
    peak = _peak_mib()
    return {"peak_rss_mib": peak, "rss_before_train_mib": before, "step_peak_mib": peak - before,
            "train_s": seconds, "loss": loss}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=sorted(TRAINERS), default="grpo")
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="completions per step (see the module doc)")
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (adds a reference model)")
    parser.add_argument("--distillation-mode", choices=["full_logits", "topk_logits", "sampled_token"],
                        default="full_logits", help="SDPO / SDFT: the distillation loss")
    parser.add_argument("--iw-opd-jsd-top-k", type=int, metavar="K",
                        help="IW-OPD: the JSD objective (beta 0.5) over a top-k support of K (0: the vocabulary); "
                             "default the IW-OPD objective")
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
                   "--trainer", opts.trainer, "--distillation-mode", opts.distillation_mode]
            if opts.iw_opd_jsd_top_k is not None:
                cmd += ["--iw-opd-jsd-top-k", str(opts.iw_opd_jsd_top_k)]
            env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results[which] = json.loads(out.strip().splitlines()[-1])
    # a DPO pair scores its chosen and its rejected completion, an Online DPO prompt its two samples
    per_row = 2 if opts.trainer in ("dpo", "online_dpo") else 1
    tokens = opts.batch * per_row * opts.completion_length
    rows = f"{opts.batch} {'pairs' if opts.trainer == 'dpo' else 'prompts'} x 2" if per_row == 2 else \
        f"{opts.batch} completions"
    mode = f" ({opts.distillation_mode})" if opts.trainer in ("sdpo", "sdft") else ""
    if opts.trainer == "iw_opd" and opts.iw_opd_jsd_top_k is not None:
        mode = f" (jsd, loss_top_k={opts.iw_opd_jsd_top_k})"
    run = "Trainer.evaluate()" if opts.trainer == "hf_evaluate" else f"one {opts.trainer.upper()} step{mode}"
    call = "evaluate()" if opts.trainer == "hf_evaluate" else "train()"
    print(f"{run}, V={opts.vocab}, hidden={opts.hidden}, {rows} x {opts.completion_length} "
          f"tokens ({tokens} scored tokens; full fp32 logits would be {tokens * opts.vocab * 4 / 2**20:.0f} MiB)")
    baseline = "transformers" if opts.trainer.startswith("hf_") else "TRL"  # the model's own loss, or TRL's trainer
    print(f"{'trainer':<12} {'peak RSS':>10} {'before train':>13} {'step peak':>10} {call:>10} {'loss':>12}")
    for which, r in results.items():
        print(f"{baseline if which == 'trl' else which:<12} {r['peak_rss_mib']:>8.0f}Mi "
              f"{r['rss_before_train_mib']:>11.0f}Mi {r['step_peak_mib']:>8.0f}Mi {r['train_s']:>9.2f}s "
              f"{r['loss']:>12.6g}")
    t, f = results["trl"], results["fastalign"]
    print(f"ratio {baseline} / fastalign: peak RSS {t['peak_rss_mib'] / f['peak_rss_mib']:.2f}, "
          f"step peak {t['step_peak_mib'] / max(f['step_peak_mib'], 1e-9):.2f}, {call} time "
          f"{t['train_s'] / f['train_s']:.2f} (generation included where the trainer samples)")


if __name__ == "__main__":
    main()
