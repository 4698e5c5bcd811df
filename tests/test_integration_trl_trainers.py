"""The TRL drop-in trainers against TRL 1.16's own trainers, one training step each.

A tiny randomly initialised Qwen2 (built from ``transformers.Qwen2Config``, saved to a temporary
directory with a word-level tokenizer so both trainers load the same weights and TRL can build its
reference model) and a tiny in-memory dataset; CPU, ``max_steps=1``, the same seed. TRL's trainer
and the drop-in must log the same loss and metrics and make the same parameter update (plain SGD,
so the update is the gradient itself). GRPO: every ``loss_type`` the profile maps (some with a KL
term, a delta, an entropy bonus or an entropy mask). DPO: a representative subset of the loss types
(sigmoid, ipo, robust, apo_zero, sft, mixed with loss weights; label smoothing, an alpha
f-divergence, LD-DPO, WPO weighting and a precomputed reference). CPO: every loss type (sigmoid,
hinge, ipo, simpo, alphapo), label smoothing, the AlphaPO reward and the BC weight. ORPO: one step.
Two processes (``torch.distributed.run``, gloo on CPU): KTO and GRPO steps whose processes hold
different shares equal TRL's own two-process run (the metrics, KL baseline and entropy quantile are
gathered as TRL gathers them).
"""
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the TRL drop-ins need transformers")
trl = pytest.importorskip("trl", reason="TRL is not importable")
datasets = pytest.importorskip("datasets", reason="TRL's trainers need datasets")
tokenizers = pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")

import fastalign.integrations.trl as fa_trl  # noqa: E402
from tiny_configs import DELTANET, VISION, gemma3_vision, gemma4  # noqa: E402
from trl_runs import tiny_moe_checkpoint  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
          "eval_samples_per_second", "eval_steps_per_second")
ATOL, RTOL = 2e-5, 1e-4


def tiny_checkpoint(path: Path) -> str:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=None)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # logits of order one, so log-probs and ratios vary across tokens
        model.lm_head.weight.normal_(0, 0.3)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    word_tokenizer(WORDS).save_pretrained(path)
    return str(path)


def word_tokenizer(words, **special):
    """A tokenizer of ``words`` split at whitespace (pad, EOS and unknown: the first three), with ``special``
    tokens (``PreTrainedTokenizerFast``'s ``extra_special_tokens``)."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", **({"extra_special_tokens": special} if special
                                                                      else {}))


def _tokenizer(checkpoint):
    """The word-level tokenizer (AutoTokenizer would pick the model type's own tokenizer class)."""
    return transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"))


def _common(tmp_path, **overrides):
    """One fp32 step of plain SGD (TRL's configs default to bf16 autocast, whose rounding would dominate)."""
    return {**dict(output_dir=str(tmp_path), max_steps=1, report_to="none", seed=0, use_cpu=True, logging_steps=1,
                   optim="sgd", learning_rate=0.5, bf16=False, save_strategy="no", disable_tqdm=True,
                   dataloader_num_workers=0), **overrides}


def _sharper(checkpoint, factor: float):
    """The checkpoint's model with its lm_head scaled by ``factor``: a reference other than the policy."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        reference.lm_head.weight.mul_(factor)
    return reference


def _eval_dataset(options, make):
    """The evaluation set ``make()`` when ``options`` ask for evaluation, else None."""
    return make() if options.get("eval_strategy", "no") != "no" else None


def _run(trainer):
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    logs = {f"{k}@{i}": v for i, log in enumerate(trainer.state.log_history[:-1])  # each step; not the summary
            for k, v in log.items() if k not in TIMING}
    after = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return logs, before, after


def _assert_same_keys(o_logs, t_logs):
    """The same logged keys; else the ones only ours logs and the ones only TRL logs."""
    assert sorted(o_logs) == sorted(t_logs), (sorted(set(o_logs) - set(t_logs)), sorted(set(t_logs) - set(o_logs)))


def _compare(theirs, ours):
    (t_logs, t_before, t_after), (o_logs, o_before, o_after) = theirs, ours
    _assert_same_keys(o_logs, t_logs)
    for k, v in t_logs.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(o_logs[k]), k
        else:
            assert o_logs[k] == pytest.approx(v, rel=RTOL, abs=ATOL), k
    moved = 0
    for k in t_before:
        torch.testing.assert_close(o_before[k], t_before[k], rtol=0, atol=0)  # the same start
        torch.testing.assert_close(o_after[k] - o_before[k], t_after[k] - t_before[k], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{k}: {m}")
        moved += int(not torch.equal(t_after[k], t_before[k]))
    assert moved > 0  # the step changed the model


# ------------------------------------------------------------------------------------------ head

@pytest.mark.parametrize("model_type", ["qwen2", "cohere", "gemma2"])
def test_head_matches_the_models_own_logits(model_type):
    """The fused head against the model's own logits in float64 (cohere: logit_scale; gemma2: softcapping,
    whose mean logit takes a vocabulary pass): head_outputs' fields, the mean logit from the operands (at every
    position, and at the scored ones alone), the label logit (and the linear heads' smoothing margin) from one head
    row per position, and the statistics of head_separable_loss's pass (items as rows, pairs and tokens; loss and
    gradient too, with the mean logit as the loss's differentiable second argument)."""
    from fastalign.integrations.hf import head_operands, head_transform
    import fastalign
    from fastalign.integrations.trl._head import head_outputs, head_separable_loss, label_logit

    extra = {"cohere": dict(logit_scale=0.5), "gemma2": dict(final_logit_softcapping=3.0, head_dim=8)}
    config_cls = {"qwen2": transformers.Qwen2Config, "cohere": transformers.CohereConfig,
                  "gemma2": transformers.Gemma2Config}[model_type]
    model_cls = {"qwen2": transformers.Qwen2ForCausalLM, "cohere": transformers.CohereForCausalLM,
                 "gemma2": transformers.Gemma2ForCausalLM}[model_type]
    torch.manual_seed(0)
    config = config_cls(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                        attn_implementation="eager", tie_word_embeddings=False, **extra.get(model_type, {}))
    model = model_cls(config).float().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1.0)
    ids = torch.randint(1, 50, (4, 9))
    attention = torch.ones_like(ids)
    attention[0, :2] = 0  # left padding
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :4] = -100  # the prompt is not scored
    out = head_outputs(model, ids, attention, labels, ("log_probs", "entropy"), temperature=0.7)
    with torch.no_grad():
        z_every = model(input_ids=ids, attention_mask=attention).logits.double()
    y, scored = labels[:, 1:], labels[:, 1:] != -100
    zero = torch.zeros((), dtype=torch.float64)

    def expected(z):
        logp = torch.log_softmax(z[:, :-1], -1)
        return {"logprobs": torch.where(scored, logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1), zero),
                "entropy": torch.where(scored, -(logp.exp() * logp).sum(-1), zero),
                "sum_p2": torch.where(scored, logp.exp().pow(2).sum(-1), 1.0),
                "argmax": torch.where(scored, z[:, :-1].argmax(-1), -1)}

    want = expected(z_every / 0.7)
    for name, got in (("logprobs", out.log_probs), ("entropy", out.entropy)):
        torch.testing.assert_close(got.double(), want[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    operands = head_operands(model, ids, attention)
    assert (head_transform(model.config)[1] is not None) == (model_type == "gemma2")
    scale, softcap = (0.5 if model_type == "cohere" else 1.0), (3.0 if model_type == "gemma2" else None)
    # every position, the last and the padded ones included; or the scored ones, the others 0
    hidden, weight, bias, low_rank = operands
    head = dict(bias=bias, low_rank=low_rank, logit_scale=scale, softcap=softcap)
    every_position = fastalign.linear_mean_logits(hidden, weight, **head).double()
    torch.testing.assert_close(every_position, z_every.mean(-1), rtol=1e-5, atol=1e-5)
    positions = torch.nn.functional.pad(scored, (0, 1))
    at_positions = fastalign.linear_mean_logits(hidden, weight, **head, response_mask=positions).double()
    torch.testing.assert_close(at_positions[positions], z_every.mean(-1)[positions], rtol=1e-5, atol=1e-5)
    assert not at_positions[~positions].any()
    z = z_every[:, :-1]  # the label logit z_y, and the linear heads' label-smoothing margin z_y - mean_j z_j
    z_y = torch.where(scored, z.gather(-1, y.clamp(min=0)[..., None])[..., 0], zero)
    targets = y.masked_fill(~scored, -100)
    torch.testing.assert_close(label_logit(operands, targets, scale, softcap).double(), z_y, rtol=1e-5, atol=1e-5)
    if softcap is None:
        torch.testing.assert_close(label_logit(operands, targets, scale, minus_mean=True).double(),
                                   torch.where(scored, z_y - z.mean(-1), zero), rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="minus_mean applies to a linear head"):
            label_logit(operands, targets, scale, softcap, minus_mean=True)

    want = expected(z_every)
    hidden, weight, bias, low_rank = operands
    for items in ("rows", "pairs", "tokens"):
        h = hidden.detach().requires_grad_(True)

        def loss(lp, sum_p2):
            return -(lp * sum_p2).sum(), {}

        value, _, stats = head_separable_loss((h, weight, bias, low_rank), model.config, y.masked_fill(~scored, -100),
                                              loss, items=items, sum_p2=True, extras=("entropy", "argmax"))
        value.backward()
        for name in ("logprobs", "entropy", "sum_p2"):
            torch.testing.assert_close(stats[name].double(), want[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{items} {name}: {m}")
        assert torch.equal(stats["argmax"], want["argmax"]), items
        h64 = hidden.detach().double().requires_grad_(True)

        def logits64():
            z = h64 @ weight.detach().double().T
            if model_type == "cohere":
                z = z * 0.5
            return 3.0 * torch.tanh(z / 3.0) if model_type == "gemma2" else z

        ref = expected(logits64())
        (-(ref["logprobs"] * want["sum_p2"]).sum()).backward()
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{items}: {m}")
        # the mean logit as the loss's differentiable second argument, from the same pass
        h.grad = h64.grad = None
        c = torch.linspace(-1.0, 1.0, y.numel()).view(y.shape)
        value, _, stats = head_separable_loss((h, weight, bias, low_rank), model.config, targets,
                                              lambda lp, mean: ((mean * c - lp).sum(), {}), items=items,
                                              mean_logit=True)
        value.backward()
        z = logits64()
        mean = torch.where(scored, z[:, :-1].mean(-1), zero)
        torch.testing.assert_close(stats["mean_logit"].double(), mean.detach(), rtol=1e-5, atol=1e-5)
        (mean * c - expected(z)["logprobs"]).sum().backward()
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{items}, mean logit: {m}")


# ------------------------------------------------------------------------------------------ SFT

def _sft_dataset(kind):
    if kind == "text":
        return datasets.Dataset.from_dict({"text": [" ".join(f"w{(3 * i + 2 * j) % 55 + 3}" for j in range(4 + i % 5))
                                                    for i in range(8)]})
    return datasets.Dataset.from_dict({  # prompt-completion: completion_only_loss scores the completion only
        "prompt": [" ".join(f"w{(5 * i + j) % 50 + 3}" for j in range(2 + i % 3)) for i in range(8)],
        "completion": [" ".join(f"w{(7 * i + j) % 40 + 10}" for j in range(1 + i % 4)) for i in range(8)]})


SFT_CASES = {
    "nll_padded": (dict(), "text"),
    "dft": (dict(loss_type="dft"), "text"),
    "completion_only": (dict(completion_only_loss=True), "prompt_completion"),
    "packed_padding_free": (dict(packing=True, max_length=16), "text"),
    "packed_wrapped": (dict(packing=True, packing_strategy="wrapped", max_length=16), "text"),
    "packed_dft_completion_only": (dict(packing=True, loss_type="dft", max_length=16), "prompt_completion"),
    # an evaluation after the step: eval_loss, eval_entropy, eval_mean_token_accuracy
    "evaluated": (dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4), "text"),
    # two micro-batches per step: the loss is normalised by the step's token count (num_items_in_batch)
    "accumulated": (dict(gradient_accumulation_steps=2, per_device_train_batch_size=2), "prompt_completion"),
    # label smoothing without the logits: the margin z_y - mean_j z_j from one head row per token
    "label_smoothing": (dict(label_smoothing_factor=0.2), "prompt_completion"),
    "label_smoothing_packed_accumulated": (dict(label_smoothing_factor=0.1, packing=True, max_length=16,
                                                gradient_accumulation_steps=2, per_device_train_batch_size=2),
                                           "text"),
}


def _sft(cls, checkpoint, tmp_path, options, kind):
    args = trl.SFTConfig(**_common(tmp_path, **{"per_device_train_batch_size": 4, **options}))
    return cls(model=checkpoint, args=args, train_dataset=_sft_dataset(kind), processing_class=_tokenizer(checkpoint),
               eval_dataset=_eval_dataset(options, lambda: _sft_dataset(kind)))


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_trainer_matches_trl(checkpoint, tmp_path, case, monkeypatch, item_passes):
    """Loss, entropy, mean_token_accuracy, num_tokens and the update equal TRL's SFTTrainer (which scores
    with its own fused head); the drop-in scores through fastalign's head (packed rows: one row, position_ids,
    no attention mask), the training step in one pass over blocks of tokens."""
    import fastalign.integrations.trl._head as head

    options, kind = SFT_CASES[case]
    theirs = _run(_sft(trl.SFTTrainer, checkpoint, tmp_path / "trl", options, kind))
    calls, operands = [], head.head_operands
    monkeypatch.setattr(head, "head_operands", lambda model, ids, attention=None, **kw: calls.append(
        (ids.shape[0], attention is None, kw.get("position_ids") is not None)) or operands(model, ids, attention, **kw))
    ours = _run(_sft(fa_trl.SFTTrainer, checkpoint, tmp_path / "fa", options, kind))
    padding_free = bool(options.get("packing")) and options.get("packing_strategy") != "wrapped"  # bfd: one row
    assert calls and all(c == (1, True, True) for c in calls) == padding_free
    # one per training micro-batch (evaluation needs no gradient: two passes)
    assert len(item_passes) == options.get("gradient_accumulation_steps", 1)
    if case == "evaluated":
        assert {"eval_loss@1", "eval_entropy@1", "eval_mean_token_accuracy@1"} <= set(ours[0])
    assert {"loss@0", "entropy@0", "mean_token_accuracy@0", "num_tokens@0"} <= set(ours[0])
    _compare(theirs, ours)


def _opt_checkpoint(path):
    """A tiny OPT (whose causal mask ignores the position ids) and a word tokenizer saved at ``path``."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=len(WORDS), hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
                                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                    pad_token_id=0, eos_token_id=1, bos_token_id=2)
    transformers.OPTForCausalLM(config).save_pretrained(path)
    word_tokenizer(WORDS).save_pretrained(path)


@pytest.mark.parametrize("options", [dict(padding_free=True, max_length=None), dict(packing=True, max_length=16)],
                         ids=["padding_free", "packing_bfd"])
def test_sft_packed_rows_of_a_body_that_mixes_them_raise_at_construction(tmp_path, options):
    """OPT builds its causal mask without the position ids, so the rows that padding_free (or bfd packing) makes
    would let each sequence attend to the ones before it: the drop-in refuses them when it is built, naming the
    settings to change (wrapped packing, which packs without restarting positions, is taken)."""
    _opt_checkpoint(tmp_path / "opt")
    with pytest.raises(ValueError, match=r"SFTConfig: padding_free=True .*model_type 'opt' builds its causal mask "
                                         r"without the position ids.*set padding_free=False and packing=False"):
        _sft(fa_trl.SFTTrainer, str(tmp_path / "opt"), tmp_path / "fa", options, "text")
    _sft(fa_trl.SFTTrainer, str(tmp_path / "opt"), tmp_path / "wrapped",
         dict(packing=True, packing_strategy="wrapped", max_length=16), "text")


def test_sft_padding_free_under_flash_attention_matches_trl(tmp_path, monkeypatch):
    """Under flash attention (flash-attn's kernels replaced by references) OPT's padding-free rows (one row, the
    sequence keywords) are split whatever its mask: the drop-in takes them and gives TRL's loss and update."""
    from flash_standin import use_flash_attention

    _opt_checkpoint(tmp_path / "opt")

    def trainer(cls, out):
        model = use_flash_attention(monkeypatch, transformers.OPTForCausalLM.from_pretrained(tmp_path / "opt"))
        args = trl.SFTConfig(**_common(out, per_device_train_batch_size=4, padding_free=True, max_length=None))
        return cls(model=model, args=args, train_dataset=_sft_dataset("text"),
                   processing_class=_tokenizer(str(tmp_path / "opt")))

    _compare(_run(trainer(trl.SFTTrainer, tmp_path / "trl")), _run(trainer(fa_trl.SFTTrainer, tmp_path / "fa")))


def _labels_on_padding_collator(examples):
    """The plain Hugging Face convention: ``labels = input_ids`` with the padding (``<eos>``, attention 0) left
    scored, and a first token at -100; TRL's collators would write -100 on the padding."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [1] * (length - len(e["input_ids"])) for e in examples])
    attention = torch.tensor([[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])) for e in examples])
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


@pytest.mark.parametrize("options", [dict(), dict(loss_type="dft"), dict(label_smoothing_factor=0.2)],
                         ids=["nll", "dft", "label_smoothing"])
def test_sft_collator_labels_on_padding_match_trl(checkpoint, tmp_path, options):
    """A data_collator whose labels keep the padded positions: TRL scores every label that is not -100 (as the
    model's own loss does); the drop-in also dropped the positions with attention_mask 0, so its loss, metrics
    and update differed. They equal TRL's now."""
    data = datasets.Dataset.from_dict({"input_ids": [[3 + (3 * i + 2 * j) % 55 for j in range(3 + i % 5)]
                                                     for i in range(4)]})

    def build(cls, out):
        args = trl.SFTConfig(**_common(out, per_device_train_batch_size=4, remove_unused_columns=False,
                                       dataset_kwargs={"skip_prepare_dataset": True}, **options))
        return cls(model=checkpoint, args=args, train_dataset=data, processing_class=_tokenizer(checkpoint),
                   data_collator=_labels_on_padding_collator)

    batch = _labels_on_padding_collator([data[i] for i in range(4)])
    assert ((batch["attention_mask"][:, 1:] == 0) & (batch["labels"][:, 1:] != -100)).any()  # padding is scored
    theirs = _run(build(trl.SFTTrainer, tmp_path / "trl"))
    ours = _run(build(fa_trl.SFTTrainer, tmp_path / "fa"))
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    if not options:  # TRL's loss is the model's own loss on the batch
        with torch.no_grad():
            assert theirs[0]["loss@0"] == pytest.approx(model(**batch).loss.item(), rel=RTOL)
    _compare(theirs, ours)


@pytest.fixture(scope="module")
def dropout_checkpoint(checkpoint, tmp_path_factory):
    """The tiny Qwen2 with attention dropout 0.3: every training forward draws from the random stream."""
    path = tmp_path_factory.mktemp("tiny-qwen2-dropout")
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    model.config.attention_dropout = 0.3
    model.save_pretrained(path)
    _tokenizer(checkpoint).save_pretrained(path)
    return str(path)


def test_sft_label_smoothing_with_dropout_matches_trl(dropout_checkpoint, tmp_path):
    """With label smoothing TRL logs entropy and mean_token_accuracy from a second forward without gradients;
    the drop-in runs it in training mode too, so with dropout the metrics come from the same draw and the
    second step's masks, loss and update equal TRL's."""
    options = dict(label_smoothing_factor=0.1, max_steps=2)
    theirs = _run(_sft(trl.SFTTrainer, dropout_checkpoint, tmp_path / "trl", options, "text"))
    ours = _run(_sft(fa_trl.SFTTrainer, dropout_checkpoint, tmp_path / "fa", options, "text"))
    assert {"loss@1", "entropy@0", "entropy@1"} <= set(ours[0])
    _compare(theirs, ours)


@pytest.mark.parametrize("options", [dict(label_smoothing_factor=0.1, loss_type="dft"), dict(use_liger_kernel=True)],
                         ids=["label_smoothing_with_dft", "use_liger_kernel"])
def test_sft_unsupported_option_raises(checkpoint, tmp_path, options):
    """label_smoothing_factor with dft (TRL ignores it there) and use_liger_kernel name the field."""
    field = next(iter(options))
    args = trl.SFTConfig(**_common(tmp_path, per_device_train_batch_size=4, **options))
    with pytest.raises(ValueError, match=f"SFTConfig.{field}"):
        fa_trl.SFTTrainer(model=checkpoint, args=args, train_dataset=_sft_dataset("text"),
                          processing_class=_tokenizer(checkpoint))
    with pytest.raises(ValueError, match="compute_loss_func"):
        fa_trl.SFTTrainer(model=checkpoint, args=trl.SFTConfig(**_common(tmp_path, per_device_train_batch_size=4)),
                          train_dataset=_sft_dataset("text"), processing_class=_tokenizer(checkpoint),
                          compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum())


# ------------------------------------------------------------------------------------------ GRPO

def _reward(completions, **kwargs):
    """Share of the word w7 in each completion (a rule-based reward)."""
    return [c.split().count("w7") / max(len(c.split()), 1) for c in completions]


def _grpo_dataset():
    return datasets.Dataset.from_dict({"prompt": [" ".join(f"w{(3 * i + j) % 50 + 3}" for j in range(3 + i % 3))
                                                  for i in range(8)]})


GRPO_CASES = {
    "grpo": dict(loss_type="grpo", beta=0.05),
    "bnpo": dict(loss_type="bnpo", epsilon=0.1, delta=1.3),
    "dr_grpo": dict(loss_type="dr_grpo"),
    # two micro-batches per step; the second step reuses the generation with the old policy's log-probs
    # (which the off-policy mask measures against)
    "dapo": dict(loss_type="dapo", entropy_coef=0.02, top_entropy_quantile=0.5, gradient_accumulation_steps=2,
                 num_iterations=2, max_steps=2, off_policy_mask_threshold=1e-4),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.5, beta=0.02),
    "sapo": dict(loss_type="sapo", sapo_temperature_neg=1.3),
    "vespo": dict(loss_type="vespo"),
}


def _online(cls, config_cls, checkpoint, tmp_path, options):
    """An online trainer (GRPO, RLOO) on the tiny model: four completions of each prompt, one step."""
    args = config_cls(**_common(tmp_path, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                                temperature=1.0, **options))
    return cls(model=checkpoint, reward_funcs=_reward, args=args, train_dataset=_grpo_dataset(),
               eval_dataset=_eval_dataset(options, _grpo_dataset), processing_class=_tokenizer(checkpoint))


def _grpo(cls, checkpoint, tmp_path, options):
    return _online(cls, trl.GRPOConfig, checkpoint, tmp_path, options)


ADAPTIVE_CASES = {
    # entropy under the target: the coefficient applies from the second step and grows
    "rising": dict(loss_type="grpo", entropy_coef=0.01, entropy_coef_delta=0.02, entropy_target=10.0, max_steps=3),
    # over the target (no bonus) and shrinking, two micro-batches per step, the bonus on the top-entropy tokens
    "falling_accumulated": dict(loss_type="dapo", entropy_coef=0.05, entropy_coef_delta=0.02, entropy_target=0.5,
                                entropy_coef_min=0.02, top_entropy_quantile=0.5, gradient_accumulation_steps=2,
                                max_steps=2),
}


@pytest.mark.parametrize("case", list(ADAPTIVE_CASES))
def test_grpo_adaptive_entropy_matches_trl(checkpoint, tmp_path, case):
    """use_adaptive_entropy: TRL's controller of entropy_coef, on the entropies of the drop-in's own pass; the
    coefficient, loss, metrics and updates of every step equal TRL's."""
    options = dict(ADAPTIVE_CASES[case], use_adaptive_entropy=True)
    theirs = _run(_grpo(trl.GRPOTrainer, checkpoint, tmp_path / "trl", options))
    ours = _run(_grpo(fa_trl.GRPOTrainer, checkpoint, tmp_path / "fa", options))
    coefs = [ours[0][f"entropy_coef@{i}"] for i in range(options["max_steps"])]
    assert len(set(coefs)) == len(coefs)  # the controller moved the coefficient every step
    _compare(theirs, ours)


def _save_beside_tokenizer(model, path, checkpoint) -> str:
    """Save ``model`` (pad 0, EOS 1 for generation) under ``path`` with ``checkpoint``'s word-level tokenizer."""
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    _tokenizer(checkpoint).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def moe_checkpoint(checkpoint, tmp_path_factory):
    """A tiny Qwen3-MoE (4 experts, 2 per token) that returns its router logits, with a load-balancing coefficient."""
    return tiny_moe_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-moe"), checkpoint)


@pytest.mark.parametrize("options", [dict(loss_type="grpo", beta=0.04),
                                     dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.02),
                                     dict(loss_type="grpo", beta=0.04, gradient_accumulation_steps=2, steps_per_generation=1)],
                         ids=["single-pass", "entropy-quantile", "accumulated"])
def test_grpo_moe_load_balancing_loss_matches_trl(moe_checkpoint, tmp_path, options):
    """A MoE model's load-balancing loss from the router logits of the same body forward: loss, aux_loss and the
    update (router weights included) equal TRL's (accumulated: each micro-batch's share of it divided by the
    accumulation steps, as TRL's)."""
    theirs = _run(_grpo(trl.GRPOTrainer, moe_checkpoint, tmp_path / "trl", options))
    ours = _run(_grpo(fa_trl.GRPOTrainer, moe_checkpoint, tmp_path / "fa", options))
    assert ours[0]["aux_loss@0"] > 0
    _compare(theirs, ours)


def test_grpo_moe_load_balancing_loss_of_row_chunks_matches_trl(moe_checkpoint, tmp_path):
    """_get_per_token_logps_and_entropies over chunks of rows (batch_size) with compute_aux_loss: the log-probs,
    entropies and load-balancing loss (the mean of the chunks') equal TRL's own method."""
    def build(cls, out):
        return _grpo(cls, moe_checkpoint, out, dict(loss_type="grpo"))

    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [9, 3, 8, 4, 7, 5, 6], [5, 5, 6, 6, 7, 7, 1], [4, 3, 9, 8, 1, 0, 0]])
    attention = (ids != 0).long()
    results = []
    for cls, out in ((trl.GRPOTrainer, tmp_path / "trl"), (fa_trl.GRPOTrainer, tmp_path / "fa")):
        trainer = build(cls, out)
        results.append(trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, 4, batch_size=1,
                                                                   compute_entropy=True, compute_aux_loss=True))
    (t_lp, t_entropy, t_aux), (o_lp, o_entropy, o_aux) = results
    torch.testing.assert_close(o_lp, t_lp, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(o_entropy, t_entropy, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(o_aux, t_aux, rtol=RTOL, atol=ATOL)
    assert t_aux.requires_grad and o_aux.requires_grad


def test_dpo_moe_load_balancing_loss_matches_trl(moe_checkpoint, tmp_path, item_passes):
    """DPO on a MoE model: the load-balancing loss of the policy's forward, its loss through the head's single
    pass; loss, metrics and update equal TRL's."""
    args = trl.DPOConfig(**_common(tmp_path / "args", per_device_train_batch_size=4))
    theirs = _run(trl.DPOTrainer(model=moe_checkpoint, args=args, train_dataset=_dpo_dataset(),
                                 processing_class=_tokenizer(moe_checkpoint)))
    ours = _run(fa_trl.DPOTrainer(model=moe_checkpoint, args=args, train_dataset=_dpo_dataset(),
                                  processing_class=_tokenizer(moe_checkpoint)))
    assert ours[0]["aux_loss@0"] > 0 and item_passes
    _compare(theirs, ours)


#: Current architectures beside Qwen2: Qwen3.5 (Gated DeltaNet layers beside attention) and Gemma 4 (softcapped
#: logits, sliding-window layers), each as the config fields of a tiny model over WORDS.
NEWER_ARCHS = {"qwen3_5_text": DELTANET, "gemma4_text": gemma4(len(WORDS)), "gemma3": {}, "gemma4": gemma4(len(WORDS)),
               "qwen3_5": DELTANET}
#: The vision-language models among them (trained on text) -> their vision towers; their fields go to the text config.
VISION_LANGUAGE = {"gemma3": gemma3_vision(len(WORDS)), "gemma4": {}, "qwen3_5": VISION["qwen3_5"][0]}


@pytest.fixture(scope="module", params=list(NEWER_ARCHS))
def newer_checkpoint(request, checkpoint, tmp_path_factory):
    """A tiny random model of a NEWER_ARCHS architecture with the word-level tokenizer."""
    arch = request.param
    path = tmp_path_factory.mktemp(f"tiny-{arch}")
    torch.manual_seed(0)
    fields = {**dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                     tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None), **NEWER_ARCHS[arch]}
    if arch in VISION_LANGUAGE:  # the ForConditionalGeneration class its checkpoint's architectures name
        config = transformers.AutoConfig.for_model(arch, text_config=fields, pad_token_id=0, eos_token_id=1,
                                                   tie_word_embeddings=False, **VISION_LANGUAGE[arch])
        model = transformers.AutoModelForImageTextToText.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(arch, **fields))
    with torch.no_grad():  # logits of a few units: the softcap matters, and samples still differ
        model.get_output_embeddings().weight.normal_(0, 0.3)
    return _save_beside_tokenizer(model, path, checkpoint)


def _even_share(completions, **kwargs):
    """Share of even-numbered words in each completion (a conversational one's first message): a reward that varies
    between a random model's samples."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in t.split()) / max(len(t.split()), 1) for t in texts]


@pytest.mark.parametrize("trainer", ["GRPO", "DPO"])
def test_newer_architectures_match_trl(newer_checkpoint, tmp_path, trainer):
    """GRPO (with a KL term) and DPO on Qwen3.5 and Gemma 4 checkpoints, and on Gemma 3, Gemma 4 and Qwen3.5
    vision-language checkpoints trained on text: the head transform read from the config, the body's own layers;
    loss, metrics and update equal TRL's (a softcapped head's logits/chosen and logits/rejected included)."""
    if trainer == "GRPO":
        def build(cls, out):
            args = trl.GRPOConfig(**_common(out, per_device_train_batch_size=4, num_generations=4,
                                            max_completion_length=6, temperature=1.0, loss_type="grpo", beta=0.05))
            return cls(model=newer_checkpoint, reward_funcs=_even_share, args=args, train_dataset=_grpo_dataset(),
                       processing_class=_tokenizer(newer_checkpoint))
    else:
        def build(cls, out):
            return cls(model=newer_checkpoint, args=trl.DPOConfig(**_common(out, per_device_train_batch_size=4)),
                       train_dataset=_dpo_dataset(), processing_class=_tokenizer(newer_checkpoint))
    theirs = _run(build(getattr(trl, f"{trainer}Trainer"), tmp_path / "trl"))
    drop_in = build(getattr(fa_trl, f"{trainer}Trainer"), tmp_path / "fa")
    config = drop_in.model.config
    assert (config.get_text_config() is not config) == (config.model_type in VISION_LANGUAGE)
    _compare(theirs, _run(drop_in))


@pytest.mark.parametrize("newer_checkpoint", ["gemma3"], indirect=True)
def test_fused_head_takes_vision_inputs(newer_checkpoint):
    """Vision inputs reaching the fused head go to the body with the tokens: the log-probs equal those of the
    model's own logits with the same image (tests/test_integration_trl_vision.py: the drop-ins on batches with
    images against TRL's trainers)."""
    from fastalign.integrations.trl._head import install_head

    model = transformers.AutoModelForCausalLM.from_pretrained(newer_checkpoint)
    with torch.no_grad():  # initialised to zeros: every image would give the same features
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 1.0)
    install_head(model)
    ids = torch.full((1, 9), 2)
    ids[0, 2:6] = model.config.image_token_id
    vision = dict(pixel_values=torch.randn(1, 3, 28, 28), token_type_ids=(ids == model.config.image_token_id).long())
    with torch.no_grad():
        log_probs = model(input_ids=ids, labels=ids, fastalign_head=("log_probs",), **vision).log_probs
        logits = model(input_ids=ids, **vision).logits
        text_only = model(input_ids=ids, labels=ids, fastalign_head=("log_probs",)).log_probs
    expected = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(log_probs.double(), expected, rtol=1e-5, atol=1e-5)
    assert (text_only - log_probs)[:, 5:].abs().max() > 1e-3  # the image changes the scores after it


@pytest.mark.parametrize("trainer", ["SFT", "KTO", "RLOO", "CPO", "ORPO"])
def test_moe_load_balancing_loss_matches_trl(moe_checkpoint, tmp_path, trainer):
    """The other drop-ins add a MoE model's load-balancing loss as their TRL trainer does (SFT: over the
    accumulation steps; CPO and ORPO: the config's coefficient, not logged); loss, metrics and update equal."""
    config_cls = _config_class(trainer)
    trl_cls = _trl_trainer(trainer)
    extra = dict(reward_funcs=_reward) if trainer == "RLOO" else {}
    options = dict(num_generations=4, max_completion_length=6, temperature=1.0) if trainer == "RLOO" else {}
    data = {"SFT": lambda: _sft_dataset("text"), "KTO": _kto_dataset, "RLOO": _grpo_dataset, "CPO": _dpo_dataset,
            "ORPO": _dpo_dataset}[trainer]

    def build(cls, out):
        return cls(model=moe_checkpoint, args=config_cls(**_common(out, per_device_train_batch_size=4, **options)),
                   train_dataset=data(), processing_class=_tokenizer(moe_checkpoint), **extra)

    theirs = _run(build(trl_cls, tmp_path / "trl"))
    ours = _run(build(getattr(fa_trl, f"{trainer}Trainer"), tmp_path / "fa"))
    assert ("aux_loss@0" in ours[0]) == (trainer not in ("CPO", "ORPO"))
    _compare(theirs, ours)


def test_sft_vision_language_moe_load_balancing_loss_matches_trl(checkpoint, tmp_path):
    """Qwen3-VL-MoE holds its expert counts and load-balancing coefficient in its text config (its forward reads
    them there): the drop-in's load-balancing term equals TRL's, loss, aux_loss and update (it raised "has no MoE
    load-balancing loss")."""
    text = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
                pad_token_id=0, eos_token_id=1, bos_token_id=None, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=16, output_router_logits=True, router_aux_loss_coef=0.3)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = transformers.AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=vision,
                                               image_token_id=len(WORDS) - 1, vision_start_token_id=len(WORDS) - 2,
                                               vision_end_token_id=len(WORDS) - 3, pad_token_id=0, eos_token_id=1,
                                               tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    path = _save_beside_tokenizer(model, tmp_path / "qwen3-vl-moe", checkpoint)

    def build(cls, out):
        return cls(model=path, args=trl.SFTConfig(**_common(out, per_device_train_batch_size=4)),
                   train_dataset=_sft_dataset("text"), processing_class=_tokenizer(path))

    theirs = _run(build(trl.SFTTrainer, tmp_path / "trl"))
    ours = _run(build(fa_trl.SFTTrainer, tmp_path / "fa"))
    assert ours[0]["aux_loss@0"] > 1.0
    _compare(theirs, ours)


def test_grpo_cast_lm_head_to_fp32_matches_trl(checkpoint, tmp_path, sequence_passes):
    """A bf16 model with TRL's fp32 lm_head: the fused head runs in fp32 (hidden states cast up), as TRL's; the
    loss, metrics and the bf16 update equal TRL's (the update within one bf16 rounding of the parameters)."""
    def build(cls, out):
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
        args = trl.GRPOConfig(**_common(out, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                                        temperature=1.0, loss_type="grpo", beta=0.04, cast_lm_head_to_fp32=True))
        return cls(model=model, reward_funcs=_reward, args=args, train_dataset=_grpo_dataset(),
                   processing_class=_tokenizer(checkpoint))

    theirs = _run(build(trl.GRPOTrainer, tmp_path / "trl"))
    ours = _run(build(fa_trl.GRPOTrainer, tmp_path / "fa"))
    assert sequence_passes  # the head's single pass, in fp32
    (t_logs, t_before, t_after), (o_logs, o_before, o_after) = theirs, ours
    _assert_same_keys(o_logs, t_logs)
    for k, v in t_logs.items():
        assert o_logs[k] == pytest.approx(v, rel=RTOL, abs=ATOL), k
    assert o_after["lm_head.weight"].dtype == torch.float32
    for k in t_before:
        torch.testing.assert_close(o_before[k], t_before[k], rtol=0, atol=0)  # the same start
        step = 2 ** -7 * t_after[k].float().abs() + ATOL  # one bf16 rounding of the updated parameter
        assert ((o_after[k].float() - t_after[k].float()).abs() <= step).all(), k


def test_trainers_sharing_a_model_score_at_their_own_temperature(checkpoint, tmp_path):
    """One model object under several drop-in trainers in turn: each scores (old policy, reference) at its own
    temperature, not at the first trainer's."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        z = model(ids).logits[0, 2:-1].double()
    for i, (config_cls, cls, temperature) in enumerate([(trl.GRPOConfig, fa_trl.GRPOTrainer, 1.0),
                                                         (trl.GRPOConfig, fa_trl.GRPOTrainer, 0.5),
                                                         (trl.RLOOConfig, fa_trl.RLOOTrainer, 1.7)]):
        args = config_cls(**_common(tmp_path / str(i), per_device_train_batch_size=4, num_generations=4,
                                    max_completion_length=6, temperature=temperature))
        trainer = cls(model=model, reward_funcs=_reward, args=args, train_dataset=_grpo_dataset(),
                      processing_class=_tokenizer(checkpoint))
        with torch.no_grad():
            lp, entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 4,
                                                                         compute_entropy=True)
        expected = torch.log_softmax(z / temperature, -1)
        torch.testing.assert_close(lp[0].double(), expected.gather(-1, ids[0, 3:, None])[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy[0].double(), -(expected.exp() * expected).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.fixture
def sequence_passes(monkeypatch):
    """The single passes of the policy losses taken while a test runs: their items' length (1: blocks of any
    tokens; else: of whole completions)."""
    import fastalign.linear_policy as linear_policy

    single, passes = linear_policy._single_pass, []
    monkeypatch.setattr(linear_policy, "_single_pass", lambda *a: passes.append(a[5].shape[1]) or single(*a))
    return passes


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_trainer_matches_trl(checkpoint, tmp_path, case, sequence_passes):
    """Loss, metrics and update equal TRL's. The loss goes through the head in one pass over the completions
    (blocks of whole sequences), except with top_entropy_quantile < 1 (the quantile of every token comes first)."""
    options = GRPO_CASES[case]
    theirs = _run(_grpo(trl.GRPOTrainer, checkpoint, tmp_path / "trl", options))
    assert not sequence_passes
    ours = _run(_grpo(fa_trl.GRPOTrainer, checkpoint, tmp_path / "fa", options))
    assert "entropy@0" in ours[0] and ("kl@0" in ours[0]) == bool(options.get("beta"))
    _compare(theirs, ours)
    assert bool(sequence_passes) == (options.get("top_entropy_quantile", 1.0) == 1.0)
    tokens = fa_trl.grpo_policy_config(trl.GRPOConfig(**_common(tmp_path, **options))).token_separable
    assert tokens == (case in ("grpo", "bnpo", "dr_grpo", "cispo", "sapo"))  # not luspo, vespo, dapo's mask
    assert all((length == 1) == tokens for length in sequence_passes)


def test_sft_moe_label_smoothing_matches_trl(moe_checkpoint, tmp_path):
    """With label smoothing TRL logs a MoE model's load-balancing loss (from its metrics forward) without adding it
    to the loss; the drop-in does the same: loss, aux_loss and the update (router weights included) equal TRL's."""
    options = dict(label_smoothing_factor=0.1)
    theirs = _run(_sft(trl.SFTTrainer, moe_checkpoint, tmp_path / "trl", options, "text"))
    ours = _run(_sft(fa_trl.SFTTrainer, moe_checkpoint, tmp_path / "fa", options, "text"))
    assert ours[0]["aux_loss@0"] > 0
    _compare(theirs, ours)


# ------------------------------------------------------------------------------------------ DPO

def _dpo_dataset():
    prompts = [" ".join(f"w{(5 * i + j) % 50 + 3}" for j in range(2 + i % 3)) for i in range(4)]
    return datasets.Dataset.from_dict({
        "prompt": prompts,
        "chosen": [" ".join(f"w{(7 * i + j) % 40 + 10}" for j in range(2 + i % 2)) for i in range(4)],
        "rejected": [" ".join(f"w{(11 * i + 3 * j) % 45 + 5}" for j in range(3 - i % 2)) for i in range(4)]})


DPO_CASES = {
    "sigmoid_sft_weighted": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "ipo_robust_smoothing": dict(loss_type=["ipo", "robust"], beta=0.5, label_smoothing=0.1),
    "alpha_divergence_ld_alpha": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3,
                                      ld_alpha=0.5),
    "wpo_weighting": dict(loss_type=["sigmoid"], use_weighting=True),
    "apo_zero_precomputed": dict(loss_type=["apo_zero"], precompute_ref_log_probs=True),
    "aot_coupled": dict(loss_type=["aot"]),
}


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """A reference other than the policy, so the log-ratios (and rewards) are not all zero."""
    path = tmp_path_factory.mktemp("tiny-qwen2-ref")
    tiny_checkpoint(path)
    model = transformers.Qwen2ForCausalLM.from_pretrained(path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return str(path)


def _dpo(cls, checkpoint, reference, tmp_path, options):
    args = trl.DPOConfig(**_common(tmp_path, per_device_train_batch_size=4, **options))
    ref = transformers.AutoModelForCausalLM.from_pretrained(reference)
    return cls(model=checkpoint, ref_model=ref, args=args, train_dataset=_dpo_dataset(),
               processing_class=_tokenizer(checkpoint))


@pytest.fixture
def item_passes(monkeypatch):
    """The single passes of ``separable_step`` (blocks of whole pairs, KTO's responses or SFT's tokens) taken
    while a test runs (one per training step)."""
    import fastalign.linear_step as linear_step

    single, passes = linear_step._single_pass, []
    monkeypatch.setattr(linear_step, "_single_pass", lambda *a: passes.append(1) or single(*a))
    return passes


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_trainer_matches_trl(checkpoint, reference_checkpoint, tmp_path, case, item_passes):
    """Loss, metrics and update equal TRL's. The loss, its entropy and accuracy metrics go through the head in
    one pass over blocks of whole pairs, except for a loss that couples the pairs (aot sorts the batch)."""
    options = DPO_CASES[case]
    theirs = _run(_dpo(trl.DPOTrainer, checkpoint, reference_checkpoint, tmp_path / "trl", options))
    ours = _run(_dpo(fa_trl.DPOTrainer, checkpoint, reference_checkpoint, tmp_path / "fa", options))
    assert {"rewards/margins@0", "logits/chosen@0", "mean_token_accuracy@0", "entropy@0"} <= set(ours[0])
    assert ours[0]["rewards/margins@0"] != 0.0  # the reference differs from the policy
    _compare(theirs, ours)
    assert len(item_passes) == (0 if case == "aot_coupled" else 1)


@pytest.mark.parametrize("case", ["empty_prompt-ipo", "empty_prompt-sigmoid_norm", "keep_end-ipo"])
def test_dpo_completion_at_position_zero_matches_trl(checkpoint, reference_checkpoint, tmp_path, case):
    """A completion token at position 0 (an empty prompt; keep_end truncation cutting the prompt away): ipo and
    sigmoid_norm divide by TRL's unshifted completion count, one more than the scored tokens."""
    where, loss_type = case.split("-")
    options = dict(loss_type=[loss_type], beta=0.5)
    data = _dpo_dataset()
    if where == "keep_end":
        options.update(max_length=3, truncation_mode="keep_end")
    else:
        data = data.map(lambda row: {"prompt": ""})

    def build(cls, out):
        args = trl.DPOConfig(**_common(out, per_device_train_batch_size=4, **options))
        return cls(model=checkpoint, ref_model=transformers.AutoModelForCausalLM.from_pretrained(reference_checkpoint),
                   args=args, train_dataset=data, processing_class=_tokenizer(checkpoint))

    _compare(_run(build(trl.DPOTrainer, tmp_path / "trl")), _run(build(fa_trl.DPOTrainer, tmp_path / "fa")))


# ------------------------------------------------------------------------------------------ KTO

def _kto_dataset():
    return datasets.Dataset.from_dict({
        "prompt": [" ".join(f"w{(5 * i + j) % 50 + 3}" for j in range(2 + i % 3)) for i in range(4)],
        "completion": [" ".join(f"w{(7 * i + 2 * j) % 40 + 10}" for j in range(2 + i % 2)) for i in range(4)],
        "label": [True, False, True, True]})


KTO_CASES = {
    "kto": dict(loss_type="kto", desirable_weight=1.5, undesirable_weight=0.7),
    "apo_zero_unpaired_precomputed": dict(loss_type="apo_zero_unpaired", precompute_ref_log_probs=True),
}


@pytest.mark.parametrize("case", list(KTO_CASES))
def test_kto_trainer_matches_trl(checkpoint, tmp_path, case, item_passes):
    """Loss, metrics and update equal TRL's; the loss goes through the head in one pass over whole responses."""
    def build(cls, out):
        args = trl.KTOConfig(**_common(out, per_device_train_batch_size=4, **KTO_CASES[case]))
        # a sharper reference: the mismatched completions are less likely under it (KL > 0)
        return cls(model=checkpoint, ref_model=_sharper(checkpoint, 3.0), args=args, train_dataset=_kto_dataset(),
                   processing_class=_tokenizer(checkpoint))

    theirs = _run(build(trl.KTOTrainer, tmp_path / "trl"))
    ours = _run(build(fa_trl.KTOTrainer, tmp_path / "fa"))
    assert {"rewards/chosen@0", "rewards/rejected@0", "kl@0", "logits/chosen@0", "entropy@0"} <= set(ours[0])
    assert (ours[0]["kl@0"] > 0) == (case == "kto")  # the KL baseline is exercised
    _compare(theirs, ours)
    assert len(item_passes) == 1


class _KLOffAfterFirstStep(transformers.TrainerCallback):
    """Sets the trainer's ``calculate_KL`` to False after the first step (TRL's ``_compute_loss`` reads it at every
    step)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.trainer.calculate_KL = False


@pytest.mark.parametrize("precompute", [False, True], ids=["live-reference", "precomputed-reference"])
def test_kto_calculate_kl_switched_off_between_steps_matches_trl(checkpoint, tmp_path, precompute):
    """``calculate_KL = False`` after step 1: TRL's second step scores no KL completions and takes a KL baseline of
    0; the drop-in's loss, metrics (``kl`` > 0, then 0) and updates over both steps equal TRL's."""
    def build(cls, out):
        args = trl.KTOConfig(**_common(out, per_device_train_batch_size=4, max_steps=2,
                                       precompute_ref_log_probs=precompute))
        trainer = cls(model=checkpoint, ref_model=_sharper(checkpoint, 3.0), args=args, train_dataset=_kto_dataset(),
                      processing_class=_tokenizer(checkpoint))
        trainer.add_callback(_KLOffAfterFirstStep(trainer))
        return trainer

    theirs = _run(build(trl.KTOTrainer, tmp_path / "trl"))
    ours = _run(build(fa_trl.KTOTrainer, tmp_path / "fa"))
    assert ours[0]["kl@0"] > 0 and ours[0]["kl@1"] == 0
    _compare(theirs, ours)


def test_kto_calculate_kl_switched_on_for_apo_zero_unpaired_matches_trl(checkpoint, tmp_path):
    """``apo_zero_unpaired`` with ``calculate_KL = True`` assigned: without KL completions in the batches both
    raise TRL's KeyError; with them (a ``kto`` trainer's dataset) TRL logs the KL, which its loss does not take, and
    the drop-in's loss, metrics and update equal TRL's."""
    def build(cls, out, loss_type="apo_zero_unpaired"):
        args = trl.KTOConfig(**_common(out, per_device_train_batch_size=4, loss_type=loss_type))
        trainer = cls(model=checkpoint, ref_model=_sharper(checkpoint, 3.0), args=args, train_dataset=_kto_dataset(),
                      processing_class=_tokenizer(checkpoint))
        trainer.calculate_KL = True
        return trainer

    for cls in (trl.KTOTrainer, fa_trl.KTOTrainer):
        with pytest.raises(KeyError, match="KL_input_ids"):
            build(cls, tmp_path / "no-kl").train()
    with_kl = build(trl.KTOTrainer, tmp_path / "kto", loss_type="kto").train_dataset  # with KL completions

    def switched(cls, out):
        trainer = build(cls, out)
        trainer.train_dataset = with_kl
        return trainer

    theirs = _run(switched(trl.KTOTrainer, tmp_path / "trl"))
    ours = _run(switched(fa_trl.KTOTrainer, tmp_path / "fa"))
    assert ours[0]["kl@0"] > 0
    _compare(theirs, ours)


# ------------------------------------------------------------------------------------------ CPO and ORPO

CPO_CASES = {
    "sigmoid_smoothing_bc": dict(loss_type="sigmoid", label_smoothing=0.1, cpo_alpha=0.3, beta=0.5),
    "hinge": dict(loss_type="hinge", beta=0.2),
    "ipo_with_eval": dict(loss_type="ipo", beta=0.5, eval_strategy="steps", eval_steps=1,
                          per_device_eval_batch_size=4),
    "simpo_gamma": dict(loss_type="simpo", simpo_gamma=0.8, beta=2.0),
    "alphapo": dict(loss_type="alphapo", alpha=0.1, beta=2.0),
    "sigmoid_alpha_no_bc": dict(loss_type="sigmoid", alpha=-0.2, cpo_alpha=0.0),
}


def _paired(cls, config_cls, checkpoint, tmp_path, options):
    args = config_cls(**_common(tmp_path, per_device_train_batch_size=4, **options))
    evaluation = _dpo_dataset() if "eval_strategy" in options else None  # evaluation predicts logits/*
    return cls(model=checkpoint, args=args, train_dataset=_dpo_dataset(), eval_dataset=evaluation,
               processing_class=_tokenizer(checkpoint))


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_trainer_matches_trl(checkpoint, tmp_path, case, item_passes):
    """Loss, metrics and update equal TRL's; the loss goes through the head in one pass over whole pairs."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    theirs = _run(_paired(CPOTrainer, CPOConfig, checkpoint, tmp_path / "trl", CPO_CASES[case]))
    ours = _run(_paired(fa_trl.CPOTrainer, CPOConfig, checkpoint, tmp_path / "fa", CPO_CASES[case]))
    assert {"rewards/margins@0", "logits/chosen@0", "logits/rejected@0", "nll_loss@0"} <= set(ours[0])
    if "eval_strategy" in CPO_CASES[case]:
        assert {"eval_loss@1", "eval_logits/chosen@1", "eval_rewards/margins@1"} <= set(ours[0])
    assert (ours[0]["nll_loss@0"] > 0) == (CPO_CASES[case].get("cpo_alpha", 1.0) > 0 and case != "alphapo")
    _compare(theirs, ours)
    assert len(item_passes) == 1  # the training step; evaluation needs no gradient (two passes)


def test_orpo_trainer_matches_trl(checkpoint, tmp_path, item_passes):
    """Loss, metrics and update equal TRL's; the loss goes through the head in one pass over whole pairs."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    theirs = _run(_paired(ORPOTrainer, ORPOConfig, checkpoint, tmp_path / "trl", dict(beta=0.5)))
    ours = _run(_paired(fa_trl.ORPOTrainer, ORPOConfig, checkpoint, tmp_path / "fa", dict(beta=0.5)))
    assert {"log_odds_ratio@0", "log_odds_chosen@0", "logits/chosen@0", "nll_loss@0"} <= set(ours[0])
    _compare(theirs, ours)
    assert len(item_passes) == 1


@pytest.mark.parametrize("trainer, options", [("CPO", dict(loss_type="simpo")), ("CPO", dict(loss_type="ipo")),
                                              ("ORPO", {}), ("CPO", dict(loss_type="sigmoid"))],
                         ids=["cpo-simpo", "cpo-ipo", "orpo", "cpo-sigmoid"])
def test_paired_prompt_filling_max_length(checkpoint, tmp_path, trainer, options):
    """A prompt that fills max_length leaves its pair no completion token. The length-averaged losses are 0/0
    there: TRL's step gives NaN metrics and gradients (and NaN weights); the drop-in raises a ValueError naming
    max_length instead. CPO's sigmoid sums the empty completion to 0 and matches TRL."""
    config_cls = _config_class(trainer)
    trl_cls = _trl_trainer(trainer)
    data = _dpo_dataset().map(lambda row, i: {"prompt": " ".join(f"w{j + 3}" for j in range(10))} if i == 1 else {},
                              with_indices=True)

    def build(cls, out):
        args = config_cls(**_common(out, per_device_train_batch_size=4, max_length=8, **options))
        return cls(model=checkpoint, args=args, train_dataset=data, processing_class=_tokenizer(checkpoint))

    theirs = _run(build(trl_cls, tmp_path / "trl"))
    ours = build(getattr(fa_trl, f"{trainer}Trainer"), tmp_path / "fa")
    if options.get("loss_type") == "sigmoid":
        _compare(theirs, _run(ours))
        return
    assert math.isnan(theirs[0]["grad_norm@0"]) and math.isnan(theirs[0]["logps/chosen@0"])
    with pytest.raises(ValueError, match=f"{trainer}Config.max_length"):
        ours.train()


@pytest.mark.parametrize("loss_type, nan_filter", [("sigmoid", True), ("hinge", False)])
def test_cpo_micro_batch_without_chosen_tokens_matches_trl(checkpoint, tmp_path, loss_type, nan_filter,
                                                          item_passes):
    """With cpo_alpha > 0, a micro-batch none of whose chosen rows has a completion token (its prompt fills
    max_length): TRL's NLL is a token mean over zero tokens, 0/0, so that micro-batch's loss and nll_loss are
    NaN (Trainer's logging_nan_inf_filter leaves the NaN loss out of the logged one), while the NLL passes no
    gradient: the update is the other micro-batch's. The drop-in gives the same loss, metrics and update."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    data = datasets.Dataset.from_dict({"prompt": [" ".join(f"w{j + 3}" for j in range(10)), "w3 w4"],
                                       "chosen": ["w10 w11", "w20 w21"], "rejected": ["w12 w13 w14", "w30"]})

    def build(cls, out):
        args = CPOConfig(**_common(out, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_length=8,
                                   loss_type=loss_type, cpo_alpha=0.7, logging_nan_inf_filter=nan_filter))
        return cls(model=checkpoint, args=args, train_dataset=data, processing_class=_tokenizer(checkpoint))

    theirs = _run(build(CPOTrainer, tmp_path / "trl"))
    ours = _run(build(fa_trl.CPOTrainer, tmp_path / "fa"))
    assert math.isnan(theirs[0]["nll_loss@0"]) and math.isnan(theirs[0]["loss@0"]) != nan_filter
    assert math.isfinite(theirs[0]["grad_norm@0"])
    _compare(theirs, ours)
    assert len(item_passes) == 2  # one per micro-batch


# ------------------------------------------------------------------------------------------ TPO

def _tpo_dataset(checkpoint):
    """Triples: a chosen, a rejected and a gold (``reference``) completion per prompt. The chosen completions are
    the model's own greedy continuations, so ``mean_token_accuracy`` is not 0 (each completion starts with a
    space: TRL joins prompt and completion texts as they are)."""
    data = _dpo_dataset()
    tokenizer, model = _tokenizer(checkpoint), transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    ids = [tokenizer(p, return_tensors="pt").input_ids for p in data["prompt"]]
    with torch.no_grad():
        greedy = [model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3,
                                 do_sample=False)[0, x.shape[1]:] for x in ids]
    chosen = [" " + tokenizer.decode(g, skip_special_tokens=True) for g in greedy]
    gold = [" " + " ".join(f"w{(13 * i + 2 * j) % 45 + 4}" for j in range(1 + i % 3)) for i in range(len(chosen))]
    return data.map(lambda row, i: {"chosen": chosen[i], "rejected": " " + row["rejected"], "reference": gold[i]},
                    with_indices=True)


TPO_CASES = {
    "sigmoid_smoothing": dict(loss_type="sigmoid", label_smoothing=0.1, beta=0.5),
    "hinge_gold_weight": dict(loss_type="hinge", beta=0.2, tpo_alpha=0.3),
    "ipo_no_gold_with_eval": dict(loss_type="ipo", beta=0.5, tpo_alpha=0.0, eval_strategy="steps", eval_steps=1,
                                  per_device_eval_batch_size=4),
    "tpo_l": dict(loss_type="tpo-l", beta=2.0, tpo_l_gamma=0.8),
}


def _tpo(cls, checkpoint, tmp_path, options, data):
    from trl.experimental.tpo import TPOConfig
    args = TPOConfig(**_common(tmp_path, per_device_train_batch_size=4, **options))
    return cls(model=checkpoint, args=args, train_dataset=data, eval_dataset=_eval_dataset(options, lambda: data),
               processing_class=_tokenizer(checkpoint))


@pytest.fixture(scope="module")
def tpo_data(checkpoint):
    return _tpo_dataset(checkpoint)


@pytest.mark.parametrize("case", list(TPO_CASES))
def test_tpo_trainer_matches_trl(checkpoint, tmp_path, case, item_passes, tpo_data):
    """Loss, metrics and update equal TRL's; the loss goes through the head in one pass over whole triples (whole
    pairs without the gold NLL, whose rows TRL's batch then leaves out)."""
    from trl.experimental.tpo import TPOTrainer

    options = TPO_CASES[case]
    theirs = _run(_tpo(TPOTrainer, checkpoint, tmp_path / "trl", options, tpo_data))
    ours = _run(_tpo(fa_trl.TPOTrainer, checkpoint, tmp_path / "fa", options, tpo_data))
    assert {"rewards/margins@0", "logits/chosen@0", "logits/rejected@0", "entropy@0", "num_tokens@0"} <= set(ours[0])
    assert ours[0]["mean_token_accuracy@0"] > 0.5  # the chosen completions are the model's greedy ones
    if "eval_strategy" in options:
        assert {"eval_loss@1", "eval_logits/chosen@1", "eval_rewards/margins@1"} <= set(ours[0])
    _compare(theirs, ours)
    assert len(item_passes) == 1  # the training step; evaluation needs no gradient (two passes)


def test_tpo_options_assigned_on_the_trainer_match_trl(checkpoint, tmp_path, tpo_data):
    """TRL's TPOTrainer reads beta, loss_type, label_smoothing, tpo_alpha and tpo_l_gamma from its attributes at
    every step: assigned after construction, they change the loss, as in TRL. Moving tpo_alpha to 0 would change
    the batch layout TRL's collator was built for: the drop-in raises naming it."""
    from trl.experimental.tpo import TPOTrainer

    options = dict(beta=0.7, loss_type="tpo-l", tpo_l_gamma=0.3, tpo_alpha=0.4)
    theirs = _run(_assigned(_tpo(TPOTrainer, checkpoint, tmp_path / "trl", {}, tpo_data), options))
    ours = _run(_assigned(_tpo(fa_trl.TPOTrainer, checkpoint, tmp_path / "fa", {}, tpo_data), options))
    _compare(theirs, ours)
    trainer = _assigned(_tpo(fa_trl.TPOTrainer, checkpoint, tmp_path / "off", {}, tpo_data), dict(tpo_alpha=0.0))
    with pytest.raises(ValueError, match="TPOTrainer.tpo_alpha=0.0"):
        trainer.train()


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid"])
def test_tpo_micro_batch_without_gold_tokens_matches_trl(checkpoint, tmp_path, loss_type, item_passes):
    """A micro-batch whose prompt fills max_length leaves its triple no completion token: TRL's TPO averages the
    empty chosen and rejected rows over max(|y|, 1) (log-prob 0, finite) and its gold NLL is a token mean over
    zero tokens, 0/0, so that micro-batch's loss is NaN (left out of the logged loss) while the NLL passes no
    gradient: the update is the other micro-batch's. The drop-in gives the same loss, metrics and update."""
    from trl.experimental.tpo import TPOConfig, TPOTrainer

    data = datasets.Dataset.from_dict({"prompt": [" ".join(f"w{j + 3}" for j in range(10)), "w3 w4"],
                                       "chosen": [" w10 w11", " w20 w21"], "rejected": [" w12 w13 w14", " w30"],
                                       "reference": [" w40", " w41 w42"]})

    def build(cls, out):
        args = TPOConfig(**_common(out, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_length=8,
                                   loss_type=loss_type, beta=0.5))
        return cls(model=checkpoint, args=args, train_dataset=data, processing_class=_tokenizer(checkpoint))

    theirs = _run(build(TPOTrainer, tmp_path / "trl"))
    ours = _run(build(fa_trl.TPOTrainer, tmp_path / "fa"))
    assert math.isfinite(theirs[0]["grad_norm@0"]) and math.isfinite(theirs[0]["loss@0"])
    _compare(theirs, ours)
    assert len(item_passes) == 2  # one per micro-batch


def test_tpo_unsupported_option_raises(checkpoint, tmp_path, tpo_data):
    with pytest.raises(ValueError, match="label_smoothing"):
        _tpo(fa_trl.TPOTrainer, checkpoint, tmp_path, dict(loss_type="hinge", label_smoothing=0.1), tpo_data)


# ------------------------------------------------------------------------------------------ two processes

def _kto_two_process(cls, checkpoint, out):
    """Two responses per process; one process holds both classes, the other only desirable ones."""
    args = trl.KTOConfig(**_common(out, per_device_train_batch_size=2, loss_type="kto"))
    return cls(model=checkpoint, ref_model=_sharper(checkpoint, 3.0), args=args, train_dataset=_kto_dataset(),
               processing_class=_tokenizer(checkpoint))


def _grpo_two_process(cls, checkpoint, out):
    """Four completions per process, of sampled lengths (the token counts differ between processes);
    the entropy mask keeps the tokens at or above the median entropy of both processes' tokens; the adaptive
    entropy controller reads the entropy of both processes' masked tokens at each of two steps."""
    return _grpo(cls, checkpoint, out, dict(loss_type="bnpo", beta=0.05, top_entropy_quantile=0.5,
                                            entropy_coef=0.02, use_adaptive_entropy=True, entropy_target=10.0,
                                            entropy_coef_delta=0.01, max_steps=2))


def _dpo_two_process(cls, checkpoint, out):
    """Two pairs per process through the head's single pass: per-pair and token-weighted metrics over both."""
    args = trl.DPOConfig(**_common(out, per_device_train_batch_size=2, loss_type=["sigmoid", "sft"]))
    return cls(model=checkpoint, ref_model=_sharper(checkpoint, 1.5), args=args, train_dataset=_dpo_dataset(),
               processing_class=_tokenizer(checkpoint))


def _rloo_two_process(cls, checkpoint, out):
    """Four completions per process (one group each): entropy over both processes' tokens, clip ratios over
    their completions, the min / max over both."""
    return _rloo(cls, checkpoint, out, dict(beta=0.05, epsilon=0.05))


def _sft_two_process(cls, checkpoint, out):
    """Four prompt-completion pairs per process, of different token counts: the loss is normalised by both
    processes' tokens (num_items_in_batch, average_tokens_across_devices)."""
    return _sft(cls, checkpoint, out, dict(), "prompt_completion")


TWO_PROCESS_RUNS = {"kto": _kto_two_process, "grpo": _grpo_two_process, "rloo": _rloo_two_process,
                    "sft": _sft_two_process, "dpo": _dpo_two_process}


def _two_process_worker(checkpoint: str, out_dir: str) -> None:
    """Run under ``torch.distributed.run`` with two CPU processes (gloo): each case with TRL's trainer and
    the drop-in; rank 0 saves the logs and the parameters before and after the step."""
    results = {}
    for case, build in TWO_PROCESS_RUNS.items():
        for side, cls in (("trl", getattr(trl, f"{case.upper()}Trainer")),
                          ("fa", getattr(fa_trl, f"{case.upper()}Trainer"))):
            trainer = build(cls, checkpoint, Path(out_dir) / f"{case}-{side}")
            assert trainer.accelerator.num_processes == 2
            results[f"{case}/{side}"] = _run(trainer)
    if int(os.environ["RANK"]) == 0:
        torch.save(results, Path(out_dir) / "results.pt")


def test_two_processes_match_trl(checkpoint, tmp_path):
    """KTO's KL baseline and per-class rewards, GRPO's token-mean metrics, entropy mask (the quantile over
    both processes' tokens) and adaptive entropy coefficient, RLOO's, SFT's and DPO's metrics and token
    normalisation, over two processes whose shares differ (classes, completion lengths) equal TRL's own
    two-process run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           checkpoint, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    results = torch.load(tmp_path / "results.pt")
    for case in TWO_PROCESS_RUNS:
        _compare(results[f"{case}/trl"], results[f"{case}/fa"])
    kto_logs = results["kto/fa"][0]
    assert {"kl@0", "rewards/chosen@0", "rewards/rejected@0"} <= set(kto_logs) and kto_logs["kl@0"] > 0
    grpo_logs = results["grpo/fa"][0]
    assert grpo_logs["entropy_coef@1"] != grpo_logs["entropy_coef@0"]  # the controller moved it


# ------------------------------------------------------------------------------------------ RLOO

RLOO_CASES = {
    "kl": dict(beta=0.05),
    "no_kl_asymmetric_clip": dict(beta=0.0, epsilon=0.1, epsilon_high=0.28),
    "normalized": dict(beta=0.02, normalize_advantages=True),
    # two micro-batches per step; the second step reuses the generation with the old policy's log-probs
    "reused": dict(beta=0.0, gradient_accumulation_steps=2, num_iterations=2, max_steps=2, epsilon=0.05),
    # an evaluation after the step: the loss and metrics in eval mode
    "evaluated": dict(beta=0.02, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4),
}


def _rloo(cls, checkpoint, tmp_path, options):
    return _online(cls, trl.RLOOConfig, checkpoint, tmp_path, options)


@pytest.mark.parametrize("case", list(RLOO_CASES))
def test_rloo_trainer_matches_trl(checkpoint, tmp_path, case, sequence_passes):
    """Loss, metrics (entropy, clip ratios, rewards, KL) and the update equal TRL's RLOOTrainer; the loss goes
    through the head in one pass over blocks of whole completions."""
    options = RLOO_CASES[case]
    theirs = _run(_rloo(trl.RLOOTrainer, checkpoint, tmp_path / "trl", options))
    ours = _run(_rloo(fa_trl.RLOOTrainer, checkpoint, tmp_path / "fa", options))
    assert "entropy@0" in ours[0] and "clip_ratio/region_mean@0" in ours[0]
    _compare(theirs, ours)
    assert sequence_passes


@pytest.mark.parametrize("field", ["use_liger_kernel"])  # RLOOConfig has no cast_lm_head_to_fp32
def test_rloo_unsupported_option_raises(checkpoint, tmp_path, field):
    args = trl.RLOOConfig(**_common(tmp_path, per_device_train_batch_size=4, num_generations=4, **{field: True}))
    with pytest.raises(ValueError, match=f"RLOOConfig.{field}"):
        fa_trl.RLOOTrainer(model=checkpoint, reward_funcs=_reward, args=args, train_dataset=_grpo_dataset(),
                           processing_class=_tokenizer(checkpoint))


# ------------------------------------------------------------------------------------------ assigned options

def _assigned(trainer, options: dict):
    """``trainer`` with ``options`` assigned as attributes after construction (a schedule or a callback would)."""
    for name, value in options.items():
        setattr(trainer, name, value)
    return trainer


DPO_ASSIGNED = {
    "beta": dict(beta=0.5),
    # LD-DPO reaches the reference's log-probs and the policy's alike
    "ld_alpha": dict(ld_alpha=0.3),
    "loss_types_and_weights": dict(loss_types=["sigmoid", "sft"], loss_weights=[3.0, 0.5]),
    "label_smoothing": dict(loss_types=["robust"], label_smoothing=0.2),
    "f_divergence": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
}


@pytest.mark.parametrize("case", list(DPO_ASSIGNED))
def test_dpo_options_assigned_on_the_trainer_match_trl(checkpoint, reference_checkpoint, tmp_path, case):
    """TRL's DPOTrainer reads beta, loss_types, loss_weights, ld_alpha, label_smoothing and the f-divergence from
    its attributes at every step: assigned after construction, they change the loss. The drop-in's loss, metrics
    and update equal TRL's."""
    options = DPO_ASSIGNED[case]
    theirs = _run(_assigned(_dpo(trl.DPOTrainer, checkpoint, reference_checkpoint, tmp_path / "trl", {}), options))
    ours = _run(_assigned(_dpo(fa_trl.DPOTrainer, checkpoint, reference_checkpoint, tmp_path / "fa", {}), options))
    _compare(theirs, ours)


def test_dpo_beta_schedule_takes_effect_at_the_next_step(checkpoint, reference_checkpoint, tmp_path, monkeypatch):
    """A callback that assigns trainer.beta at the end of each step: the next step's loss and update use it, in TRL
    and in the drop-in; the drop-in rebuilds its loss once per change, not at every step."""
    from fastalign.integrations.trl._live_loss import LiveLoss

    builds, build = [], LiveLoss._build
    monkeypatch.setattr(LiveLoss, "_build", lambda self, *a: builds.append(1) or build(self, *a))

    class Schedule(transformers.TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.trainer.beta = 0.6

    def run(cls, out):
        trainer = _dpo(cls, checkpoint, reference_checkpoint, out, dict(max_steps=3))
        trainer.add_callback(Schedule(trainer))
        return _run(trainer)

    theirs = run(trl.DPOTrainer, tmp_path / "trl")
    ours = run(fa_trl.DPOTrainer, tmp_path / "fa")
    assert len(builds) == 2  # at construction, then once for the new beta
    _compare(theirs, ours)


GRPO_ASSIGNED = {
    # the second step's policy differs from the reference: a KL term and its gradient
    "beta": (dict(loss_type="grpo", beta=0.04, max_steps=2), dict(beta=0.2)),
    # cispo caps the ratio at epsilon_high (0.5 < 1 scales the on-policy loss) and sums over the tokens
    "loss_type_and_epsilon": (dict(loss_type="grpo"), dict(loss_type="cispo", epsilon_high=0.5)),
    "entropy_bonus_and_mask": (dict(loss_type="dapo", entropy_coef=0.01), dict(entropy_coef=0.05,
                                                                               top_entropy_quantile=0.5)),
    # TRL applies no bonus when its constructor had none (entropy_coef 0): the assignment changes nothing
    "entropy_coef_without_bonus": (dict(loss_type="grpo"), dict(entropy_coef=0.05)),
    # a bonus on at construction stays on at 0: TRL still logs policy_loss and entropy_coef
    "entropy_coef_to_zero": (dict(loss_type="dapo", entropy_coef=0.01), dict(entropy_coef=0.0)),
    # the sampling temperature: TRL's fused head keeps the one it was built with for the log-probs
    "temperature": (dict(loss_type="grpo", beta=0.04), dict(temperature=0.6)),
}


@pytest.mark.parametrize("case", list(GRPO_ASSIGNED))
def test_grpo_options_assigned_on_the_trainer_match_trl(checkpoint, tmp_path, case):
    """TRL's GRPOTrainer reads beta, loss_type, the clip epsilons, the entropy bonus and mask (and the vLLM
    importance-sampling options) from its attributes at every step; the drop-in's loss, metrics and update
    equal TRL's after such assignments."""
    config, options = GRPO_ASSIGNED[case]
    theirs = _run(_assigned(_grpo(trl.GRPOTrainer, checkpoint, tmp_path / "trl", config), options))
    ours = _run(_assigned(_grpo(fa_trl.GRPOTrainer, checkpoint, tmp_path / "fa", config), options))
    _compare(theirs, ours)


class _ArgsSchedule(transformers.TrainerCallback):
    """Sets config fields on the ``args`` a callback receives, at the start of the second step."""

    def __init__(self, fields: dict):
        self.fields = fields

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            for name, value in self.fields.items():
                setattr(args, name, value)


ARGS_CHANGED = {
    # GRPO's loss reads args.delta at every step: on-policy the ratio is 1, above 0.8, so the clamp binds
    "grpo_delta": ("GRPO", dict(loss_type="grpo"), dict(delta=0.8)),
    # Trainer builds its label_smoother from label_smoothing_factor at construction: TRL keeps its epsilon
    "sft_label_smoothing_factor": ("SFT", dict(label_smoothing_factor=0.1), dict(label_smoothing_factor=0.3)),
    # TRL's smoothing applies while args.loss_type is "nll", read at every step
    "sft_loss_type": ("SFT", dict(label_smoothing_factor=0.1), dict(loss_type="dft")),
}


@pytest.mark.parametrize("case", list(ARGS_CHANGED))
def test_config_fields_changed_by_a_callback_match_trl(checkpoint, tmp_path, case):
    """A TrainerCallback that changes config fields on ``args`` before the second step: the drop-in's loss follows
    the fields TRL reads from ``self.args`` at every step (GRPO's delta: it kept the constructed one) and keeps
    what TRL's constructor fixed (SFT's label smoother: it read label_smoothing_factor at every step); the logged
    values and updates of both steps equal TRL's."""
    trainer, config, fields = ARGS_CHANGED[case]

    def run(cls, out):
        if trainer == "GRPO":
            built = _grpo(cls, checkpoint, out, {**config, "max_steps": 2})
        else:
            built = _sft(cls, checkpoint, out, {**config, "max_steps": 2}, "prompt_completion")
        built.add_callback(_ArgsSchedule(fields))
        return _run(built)

    theirs = run(getattr(trl, f"{trainer}Trainer"), tmp_path / "trl")
    ours = run(getattr(fa_trl, f"{trainer}Trainer"), tmp_path / "fa")
    _compare(theirs, ours)


@pytest.mark.parametrize("trainer, config, options", [
    ("KTO", {}, dict(beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)),
    ("KTO", {}, dict(loss_type="apo_zero_unpaired")),  # the KL completions still scored and logged, as TRL
    ("KTO", dict(loss_type="apo_zero_unpaired"), dict(loss_type="kto")),  # no KL completions: a baseline of 0
    ("CPO", {}, dict(beta=0.5, cpo_alpha=0.2, label_smoothing=0.1)),
    ("ORPO", {}, dict(beta=0.7))], ids=["KTO", "KTO-to-apo_zero_unpaired", "KTO-apo_zero_unpaired-to-kto", "CPO",
                                        "ORPO"])
def test_preference_options_assigned_on_the_trainer_match_trl(checkpoint, tmp_path, trainer, config, options):
    """KTO's beta, class weights and loss type (an assignment the drop-in refused), CPO's beta, BC weight and label
    smoothing, ORPO's beta: read from the trainer at every step by TRL, and by the drop-in; loss, metrics and update
    equal TRL's."""
    config_cls = _config_class(trainer)
    trl_cls = _trl_trainer(trainer)

    def build(cls, out):
        args = config_cls(**_common(out, per_device_train_batch_size=4, **config))
        extra = dict(ref_model=_sharper(checkpoint, 3.0)) if trainer == "KTO" else {}
        return _assigned(cls(model=checkpoint, args=args, train_dataset=_kto_dataset() if trainer == "KTO"
                             else _dpo_dataset(), processing_class=_tokenizer(checkpoint), **extra), options)

    _compare(_run(build(trl_cls, tmp_path / "trl")), _run(build(getattr(fa_trl, f"{trainer}Trainer"), tmp_path / "fa")))


@pytest.mark.parametrize("trainer, options, error, message", [
    ("DPO", dict(beta="0.5"), TypeError, r"DPOTrainer.beta='0.5': DPOConfig.beta must be a real number"),
    ("DPO", dict(use_weighting="false"), TypeError, r"DPOTrainer.use_weighting='false': .*must be a bool"),
    ("DPO", dict(beta=-1.0), ValueError, r"DPOTrainer.beta=-1.0: "),
    ("DPO", dict(loss_types=["sigmoid", "sft"]), ValueError, r"DPOTrainer.loss_types=\['sigmoid', 'sft'\]: "),
    ("KTO", dict(loss_type="sigmoid"), ValueError, r"KTOTrainer.loss_type='sigmoid': .*'kto' or 'apo_zero_unpaired'"),
    ("CPO", dict(loss_type="hinge"), ValueError, r"CPOTrainer.loss_type='hinge': .*label_smoothing"),
    ("ORPO", dict(beta=float("nan")), ValueError, r"ORPOTrainer.beta=nan: ORPOConfig.beta must be"),
    ("CPO", dict(beta=-1.0), ValueError, r"CPOTrainer.beta=-1.0: CPOConfig.beta must be > 0"),
    ("CPO", dict(loss_type="alphapo"), ValueError, r"CPOTrainer.loss_type='alphapo': .*shorthand"),
], ids=["dpo-beta-str", "dpo-use_weighting-str", "dpo-beta-negative", "dpo-loss_types-without-weights",
        "kto-loss_type", "cpo-hinge-with-smoothing", "orpo-beta-nan", "cpo-beta-negative", "cpo-alphapo"])
def test_refused_assigned_option_names_the_attribute(checkpoint, tmp_path, trainer, options, error, message):
    """An option assigned on the trainer that the loss refuses raises at the next step, naming the attribute and
    its value, before any model work; the trainer keeps its last good options."""
    config = dict(label_smoothing=0.1) if trainer == "CPO" else {}
    args = _config_class(trainer)(**_common(tmp_path, per_device_train_batch_size=4, **config))
    built = getattr(fa_trl, f"{trainer}Trainer")(model=checkpoint, args=args, processing_class=_tokenizer(checkpoint),
                                                 train_dataset=_kto_dataset() if trainer == "KTO" else _dpo_dataset())
    loss = built.fastalign_loss
    _assigned(built, options)
    with pytest.raises(error, match=message):
        built.train()
    assert built.state.global_step == 0
    with pytest.raises(error, match=message):  # still refused; the loss stays the last good one
        built.fastalign_loss
    for name in options:
        setattr(built, name, getattr(args, {"loss_types": "loss_type"}.get(name, name)))
    if trainer == "DPO" and "loss_types" in options:
        built.loss_weights = [1.0]
    assert built.fastalign_loss is loss  # the constructed options again: no rebuild


@pytest.mark.parametrize("trainer, config, message", [
    ("CPO", dict(beta=0.0), r"CPOConfig.beta must be > 0"),
    ("CPO", dict(label_smoothing=1.5), r"CPOConfig.label_smoothing must lie in \[0, 1\]"),
    ("ORPO", dict(beta=-0.1), r"ORPOConfig.beta must be > 0"),
    ("KTO", dict(beta=0.0), r"KTOConfig.beta must be > 0"),
])
def test_a_refused_beta_raises_when_the_trainer_is_built(checkpoint, tmp_path, trainer, config, message):
    """CPO, ORPO and KTO took a beta (or CPO label smoothing) their loss refuses, and raised a bare 'beta must be
    > 0' inside the first step, after the model's forward; the config field is named at construction now."""
    args = _config_class(trainer)(**_common(tmp_path, per_device_train_batch_size=4, **config))
    with pytest.raises(ValueError, match=message):
        getattr(fa_trl, f"{trainer}Trainer")(model=checkpoint, args=args, processing_class=_tokenizer(checkpoint),
                                             train_dataset=_kto_dataset() if trainer == "KTO" else _dpo_dataset())


# ------------------------------------------------------------------------------------------ float64 models

def _float64(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)


@pytest.mark.parametrize("trainer", ["SFT", "GRPO", "RLOO", "DPO", "KTO", "CPO", "ORPO", "TPO", "Distillation"])
def test_float64_model_is_refused_at_construction(checkpoint, tmp_path, trainer):
    """TRL's trainers train a float64 model; the fused head runs in float32, bfloat16 or float16, so each drop-in
    refuses it when built (not at the first step), telling the user to cast the model."""
    config_cls = _config_class(trainer)
    options = dict(num_generations=4, max_completion_length=6) if trainer in ("GRPO", "RLOO") else {}
    extra = {"GRPO": dict(reward_funcs=_reward), "RLOO": dict(reward_funcs=_reward),
             "Distillation": dict(teacher_model=checkpoint)}.get(trainer, {})
    data = {"SFT": lambda: _sft_dataset("text"), "KTO": _kto_dataset, "GRPO": _grpo_dataset, "RLOO": _grpo_dataset,
            "Distillation": _grpo_dataset, "TPO": lambda: _tpo_dataset(checkpoint)}.get(trainer, _dpo_dataset)
    args = config_cls(**_common(tmp_path, per_device_train_batch_size=4, **options))
    with pytest.raises(TypeError, match=r"^model: its dtype is torch.float64, .*cast the model to float32, "
                                        r"bfloat16 or float16"):
        getattr(fa_trl, f"{trainer}Trainer")(model=_float64(checkpoint), args=args, train_dataset=data(),
                                             processing_class=_tokenizer(checkpoint), **extra)


@pytest.mark.parametrize("precompute", [False, True], ids=["live", "precomputed"])
def test_float64_reference_is_refused_at_construction(checkpoint, tmp_path, precompute):
    """A float64 reference next to a float32 policy names ref_model, also when the reference log-probs are
    precomputed inside the constructor. Under bf16 mixed precision the head runs in bf16 (autocast) and a float64
    model is accepted, as it trains there."""
    args = trl.DPOConfig(**_common(tmp_path, per_device_train_batch_size=4, precompute_ref_log_probs=precompute))
    with pytest.raises(TypeError, match=r"^ref_model: its dtype is torch.float64"):
        fa_trl.DPOTrainer(model=checkpoint, ref_model=_float64(checkpoint), args=args, train_dataset=_dpo_dataset(),
                          processing_class=_tokenizer(checkpoint))
    mixed = trl.DPOConfig(**_common(tmp_path, per_device_train_batch_size=4, bf16=True))
    fa_trl.DPOTrainer(model=_float64(checkpoint), ref_model=_float64(checkpoint), args=mixed,
                      train_dataset=_dpo_dataset(), processing_class=_tokenizer(checkpoint))


@pytest.mark.parametrize("case", ["prompt_learning", "float64"])
@pytest.mark.parametrize("trainer", ["DPO", "KTO"])
def test_refused_model_raises_before_the_reference_is_precomputed(checkpoint, tmp_path, monkeypatch, trainer, case):
    """With precompute_ref_log_probs=True TRL runs the reference over the whole dataset inside the constructor.
    The drop-ins refused a PEFT prompt-learning policy only after that pass, and a float64 one at its first batch;
    the model checks run before it: no reference batch is computed."""
    cls = getattr(fa_trl, f"{trainer}Trainer")
    batches = []
    compute = cls.compute_ref_log_probs
    monkeypatch.setattr(cls, "compute_ref_log_probs", lambda self, *a: batches.append(1) or compute(self, *a))
    args = _config_class(trainer)(**_common(tmp_path, per_device_train_batch_size=4, precompute_ref_log_probs=True))
    if case == "float64":
        model, extra, error, message = _float64(checkpoint), {}, TypeError, r"^model: its dtype is torch.float64"
    else:
        peft = pytest.importorskip("peft")
        model, error, message = checkpoint, ValueError, r"^model: PEFT prompt learning \(PromptTuningConfig\)"
        extra = dict(peft_config=peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(error, match=message):
        cls(model=model, args=args, train_dataset=_kto_dataset() if trainer == "KTO" else _dpo_dataset(),
            processing_class=_tokenizer(checkpoint), **extra)
    assert batches == []


# ------------------------------------------------------------------------------------------ options

def test_grpo_vespo_at_sequence_level_names_grpo_loss_types():
    """The refusal of vespo with importance_sampling_level="sequence" (with TRL's bias-corrected KL, which it
    weighs by the sequence ratio) lists GRPOConfig.loss_type values."""
    with pytest.raises(ValueError, match=r"GRPOConfig\.importance_sampling_level='sequence' applies to loss_type "
                                         r"\('grpo', .*'sapo'\), not to 'vespo'") as error:
        fa_trl.GRPOLoss(dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.04))
    assert "'ppo'" not in str(error.value)


@pytest.mark.parametrize("field, value", [("use_liger_kernel", True), ("loss_type", "not_a_loss")])
def test_grpo_unsupported_option_raises(checkpoint, tmp_path, field, value):
    if field == "loss_type":  # GRPOConfig itself accepts any string here
        args = trl.GRPOConfig(**_common(tmp_path, per_device_train_batch_size=4, num_generations=4))
        args.loss_type = value
    else:
        args = trl.GRPOConfig(**_common(tmp_path, per_device_train_batch_size=4, num_generations=4,
                                        **{field: value}))
    with pytest.raises(ValueError, match=field):
        fa_trl.GRPOTrainer(model=checkpoint, reward_funcs=_reward, args=args, train_dataset=_grpo_dataset(),
                           processing_class=_tokenizer(checkpoint))


def _config_class(trainer):
    if trainer in ("CPO", "ORPO", "TPO", "GMPO", "GOLD", "OnlineDPO"):
        module = {"OnlineDPO": "online_dpo"}.get(trainer, trainer.lower())
        return getattr(importlib.import_module(f"trl.experimental.{module}"), f"{trainer}Config")
    return getattr(trl, f"{trainer}Config")


def _trl_trainer(trainer):
    """TRL's trainer class of the drop-in named ``trainer`` (beside its config class)."""
    config_cls = _config_class(trainer)
    return getattr(importlib.import_module(config_cls.__module__.rsplit(".", 1)[0]), f"{trainer}Trainer")


@pytest.mark.parametrize("trainer", ["DPO", "KTO", "CPO", "ORPO", "TPO"])
def test_preference_unsupported_option_raises(checkpoint, tmp_path, trainer):
    config = _config_class(trainer)(**_common(tmp_path, per_device_train_batch_size=4, use_liger_kernel=True))
    dataset = {"KTO": _kto_dataset, "TPO": lambda: _tpo_dataset(checkpoint)}.get(trainer, _dpo_dataset)()
    with pytest.raises(ValueError, match=f"{trainer}Config.use_liger_kernel"):
        getattr(fa_trl, f"{trainer}Trainer")(model=checkpoint, args=config, train_dataset=dataset,
                                             processing_class=_tokenizer(checkpoint))


def test_cpo_refuses_label_smoothing_trl_would_ignore(checkpoint, tmp_path):
    config = _config_class("CPO")(**_common(tmp_path, per_device_train_batch_size=4, loss_type="hinge",
                                            label_smoothing=0.1))
    with pytest.raises(ValueError, match="label_smoothing"):
        fa_trl.CPOTrainer(model=checkpoint, args=config, train_dataset=_dpo_dataset(),
                          processing_class=_tokenizer(checkpoint))


@pytest.mark.parametrize("scale_rewards", ["none", "batch", False])
def test_grpo_refuses_a_scale_rewards_trl_ignores_with_normalize_then_sum(checkpoint, tmp_path, scale_rewards):
    """TRL 1.16 normalises GDPO's columns by their group std and the sum by the batch std whatever scale_rewards
    says: the drop-in raised nothing (the advantage profile already refused it); the default "group" trains."""
    options = dict(multi_objective_aggregation="normalize_then_sum", scale_rewards=scale_rewards)
    with pytest.raises(ValueError, match="scale_rewards=.* does not apply with multi_objective_aggregation"):
        _grpo(fa_trl.GRPOTrainer, checkpoint, tmp_path, options)
    _grpo(fa_trl.GRPOTrainer, checkpoint, tmp_path, dict(options, scale_rewards="group"))


@pytest.fixture(scope="module")
def gemma2_checkpoint(checkpoint, tmp_path_factory):
    """A tiny Gemma 2 (softcapped head, logits of a few units so that the cap bends them) with the tokenizer."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                       final_logit_softcapping=3.0)
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return _save_beside_tokenizer(model, tmp_path_factory.mktemp("tiny-gemma2"), checkpoint)


@pytest.mark.parametrize("trainer", ["KTO", "CPO", "ORPO", "TPO"])
def test_softcapped_head_logits_metrics_match_trl(gemma2_checkpoint, tmp_path, trainer, monkeypatch):
    """A softcapped head's logits/chosen and logits/rejected (its mean logit takes a vocabulary pass: KTO's and TPO's,
    over the scored positions, the loss's own; CPO's and ORPO's, over every position, one without gradients): loss,
    metrics and update equal TRL's, and CPO's evaluation with compute_metrics (which predicts logits/*) too."""
    import fastalign.integrations.trl._head as head

    separate = []  # the mean-logit passes of their own
    mean_logits = head.linear_mean_logits
    monkeypatch.setattr(head, "linear_mean_logits", lambda *a, **k: separate.append(1) or mean_logits(*a, **k))
    config_cls = _config_class(trainer)
    trl_cls = _trl_trainer(trainer)
    data = {"KTO": _kto_dataset, "TPO": lambda: _tpo_dataset(gemma2_checkpoint)}.get(trainer, _dpo_dataset)
    evaluation = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4) if trainer == "CPO" else {}

    def metrics(prediction):  # CPO's predictions: the evaluation batches' logits/chosen and logits/rejected
        return {"mean_prediction": float(np.mean(prediction.predictions))}

    def build(cls, out):
        args = config_cls(**_common(out, per_device_train_batch_size=4, **evaluation))
        return cls(model=gemma2_checkpoint, args=args, train_dataset=data(),
                   eval_dataset=data() if evaluation else None, compute_metrics=metrics if evaluation else None,
                   processing_class=_tokenizer(gemma2_checkpoint))

    theirs = _run(build(trl_cls, tmp_path / "trl"))
    ours = _run(build(getattr(fa_trl, f"{trainer}Trainer"), tmp_path / "fa"))
    assert {"logits/chosen@0", "logits/rejected@0"} <= set(ours[0])
    if evaluation:
        assert {"eval_logits/chosen@1", "eval_mean_prediction@1"} <= set(ours[0])
    assert bool(separate) == (trainer in ("CPO", "ORPO"))
    _compare(theirs, ours)


def test_sft_label_smoothing_on_a_softcapped_head_matches_trl(gemma2_checkpoint, tmp_path, item_passes,
                                                              monkeypatch):
    """Label smoothing on a Gemma 2 head: its mean logit (not linear in the hidden states) a statistic of the loss's
    own single pass through the vocabulary, with its gradient (no vocabulary pass of its own); loss, metrics and
    update equal TRL's, which smooths its full logits."""
    from fastalign.ops.mean_logits import SoftcappedMeanLogits

    own_passes, apply = [], SoftcappedMeanLogits.apply
    monkeypatch.setattr(SoftcappedMeanLogits, "apply", lambda *a: own_passes.append(1) or apply(*a))
    options = dict(label_smoothing_factor=0.2, max_steps=2)
    theirs = _run(_sft(trl.SFTTrainer, gemma2_checkpoint, tmp_path / "trl", options, "text"))
    ours = _run(_sft(fa_trl.SFTTrainer, gemma2_checkpoint, tmp_path / "fa", options, "text"))
    assert {"loss@1", "entropy@0", "mean_token_accuracy@1"} <= set(ours[0])
    assert len(item_passes) == 2 and not own_passes
    _compare(theirs, ours)


def test_example_trl_grpo_runs():
    example = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo.py"
    out = subprocess.run([sys.executable, str(example), "--steps", "1"], check=True, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TQDM_DISABLE": "1"}).stdout
    assert "step   1  mean reward" in out and "mean reward: first step" in out


@pytest.mark.parametrize("name", sorted(fa_trl._TRAINERS))
def test_an_unknown_constructor_keyword_names_the_trainer(name):
    """A misspelled keyword raises TRL's TypeError with the trainer's name (the drop-in's own signature check
    raised the bare ``got an unexpected keyword argument``); GMPO's takes ``**kwargs``, so its missing
    ``reward_funcs`` is what Python names first there, as for TRL's own."""
    unknown = "missing 1 required positional argument: 'reward_funcs'" if name == "GMPOTrainer" else (
        "got an unexpected keyword argument 'ref_modle'")
    with pytest.raises(TypeError, match=rf"^{name}.__init__\(\) {unknown}$"):
        getattr(fa_trl, name)(model="unused", ref_modle=None)


def test_import_does_not_import_trl():
    code = "import sys; import fastalign.integrations.trl; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


if __name__ == "__main__":  # the two-process worker (see test_two_processes_match_trl)
    from helpers import rank_body

    with rank_body():
        _two_process_worker(*sys.argv[1:])
