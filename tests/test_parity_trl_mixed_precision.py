"""bf16 mixed precision (``bf16=True``: accelerate's autocast over fp32 weights, on the CPU): each drop-in runs
every model's body in the dtype TRL 1.16's own trainer runs it in. The reference and teacher models that TRL
prepares in its constructor (OnlineDPO's ``ref_model``, A2PO's reference, GKD's, GOLD's, IW-OPD's, SDFT's and SDPO's
teachers) run under the autocast like the policy, as TRL's calls of their forward do; DistillationTrainer's teacher,
whose body TRL calls past that wrapper, runs in fp32. A forward hook on the first layer's ``q_proj`` of each model
records the dtypes; with the reference / teacher holding the policy's weights, the first step's KL, margins and
divergences equal TRL's (0 where TRL's are 0, as a bf16 reference that is the policy gives)."""
import pytest

transformers = pytest.importorskip("transformers", reason="the TRL drop-ins need transformers")
trl = pytest.importorskip("trl", reason="TRL is not importable")
datasets = pytest.importorskip("datasets", reason="TRL's trainers need datasets")
pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")

import fastalign.integrations.trl as fa_trl  # noqa: E402
from trl_runs import tiny_checkpoint, tokenized_completions  # noqa: E402

COMMON = dict(max_steps=1, report_to="none", seed=0, use_cpu=True, logging_steps=1, optim="sgd", learning_rate=0.05,
              bf16=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):  # an EOS bias: some completions stop early, padding after their EOS
    return tiny_checkpoint(tmp_path_factory.mktemp("policy"), eos_bias=1.0)


def _prompts(n):
    return [" ".join(f"w{(3 * i + j) % 50}" for j in range(2 + i % 3)) for i in range(n)]


def _messages(n):
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": "w5 w6 w7"}] for p in _prompts(n)]


def _tokenizer(checkpoint, chat=False):
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint)
    if chat:
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def _model(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint)


def _length(completions, **_):
    return [float(len(c)) for c in completions]


def _low_words(completions, **_):
    """1 when the completion holds one of the words w0 .. w29, else 0."""
    return [float(any(w in c.split() for w in [f"w{i}" for i in range(30)])) for c in completions]


def _online_dpo(cls, checkpoint, out):
    from trl.experimental.online_dpo import OnlineDPOConfig
    args = OnlineDPOConfig(output_dir=str(out), per_device_train_batch_size=4, max_new_tokens=5, **COMMON)
    return cls(model=_model(checkpoint), ref_model=_model(checkpoint), reward_funcs=_length, args=args,
               train_dataset=datasets.Dataset.from_dict({"prompt": _prompts(8)}),
               processing_class=_tokenizer(checkpoint))


def _a2po(cls, checkpoint, out):
    from trl.experimental.a2po import A2POConfig
    args = A2POConfig(output_dir=str(out), per_device_train_batch_size=3, max_completion_length=5, num_value_samples=4,
                      beta2=0.5, **COMMON)
    return cls(model=_model(checkpoint), reward_funcs=_low_words, args=args,
               train_dataset=datasets.Dataset.from_dict({"prompt": _prompts(6)}),
               processing_class=_tokenizer(checkpoint))


def _gkd(cls, checkpoint, out):
    from trl.experimental.gkd import GKDConfig
    args = GKDConfig(output_dir=str(out), per_device_train_batch_size=4, lmbda=0.0, beta=0.5, **COMMON)
    return cls(model=_model(checkpoint), teacher_model=_model(checkpoint), args=args,
               train_dataset=datasets.Dataset.from_dict({"messages": _messages(8)}),
               processing_class=_tokenizer(checkpoint, chat=True))


def _gold(cls, checkpoint, out):
    from trl.experimental.gold import GOLDConfig
    args = GOLDConfig(output_dir=str(out), per_device_train_batch_size=4, lmbda=0.0, beta=0.5, max_completion_length=5,
                      **COMMON)
    return cls(model=_model(checkpoint), teacher_model=_model(checkpoint), args=args, train_dataset=tokenized_completions(8),
               processing_class=_tokenizer(checkpoint))


def _iw_opd(cls, checkpoint, out):
    from trl.experimental.iw_opd import IWOPDConfig
    args = IWOPDConfig(output_dir=str(out), per_device_train_batch_size=4, max_completion_length=5, **COMMON)
    return cls(model=checkpoint, teacher_model=checkpoint, args=args,
               train_dataset=datasets.Dataset.from_dict({"messages": _messages(8)}),
               processing_class=_tokenizer(checkpoint, chat=True))


def _sdft(cls, checkpoint, out):
    from trl.experimental.sdft import SDFTConfig
    args = SDFTConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=5,
                      distillation_topk=8,
                      **COMMON)
    data = {"prompt": _prompts(8), "privileged_context": [" ".join(f"w{(5 * i + j) % 50}" for j in range(3))
                                                          for i in range(8)]}
    return cls(model=_model(checkpoint), args=args, train_dataset=datasets.Dataset.from_dict(data),
               processing_class=_tokenizer(checkpoint))


def _sdpo(cls, checkpoint, out):
    from trl.experimental.sdpo import SDPOConfig
    args = SDPOConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=4, max_completion_length=5,
                      success_reward_threshold=1.0, **COMMON)
    return cls(model=_model(checkpoint), reward_funcs=_low_words, args=args,
               train_dataset=datasets.Dataset.from_dict({"prompt": _prompts(8)}),
               processing_class=_tokenizer(checkpoint))


def _distillation(cls, checkpoint, out):
    args = trl.DistillationConfig(output_dir=str(out), per_device_train_batch_size=4, max_completion_length=5,
                                  **COMMON)
    return cls(model=checkpoint, teacher_model=checkpoint, args=args,
               train_dataset=datasets.Dataset.from_dict({"prompt": _prompts(8)}),
               processing_class=_tokenizer(checkpoint))


BF16 = ("bfloat16",)
#: trainer -> (builder, TRL's trainer class (module, name), the other model's attribute, the dtypes TRL runs the
#: policy and the other model in, the step-0 metrics compared)
CASES = {
    "OnlineDPO": (_online_dpo, ("trl.experimental.online_dpo", "OnlineDPOTrainer"), "ref_model", (BF16, BF16),
                  ("objective/kl", "rewards/margins", "rewards/accuracies", "loss")),
    "A2PO": (_a2po, ("trl.experimental.a2po", "A2POTrainer"), "ref_model", (BF16, BF16),
             ("implicit_reward", "advantage", "loss")),
    "GKD": (_gkd, ("trl.experimental.gkd", "GKDTrainer"), "teacher_model", (BF16, BF16), ("loss",)),
    "GOLD": (_gold, ("trl.experimental.gold", "GOLDTrainer"), "teacher_model", (BF16, BF16), ("loss",)),
    "IWOPD": (_iw_opd, ("trl.experimental.iw_opd", "IWOPDTrainer"), "teacher_model", (BF16, BF16),
              ("loss", "iw_opd/mean_advantage", "iw_opd/mean_abs_advantage")),
    "SDFT": (_sdft, ("trl.experimental.sdft", "SDFTTrainer"), "teacher_model", (BF16, BF16),
             ("loss", "self_distillation/distillation_loss")),
    "SDPO": (_sdpo, ("trl.experimental.sdpo", "SDPOTrainer"), "teacher_model", (BF16, BF16),
             ("loss", "self_distillation/distillation_loss")),
    # TRL's loss calls both bodies past the autocast wrapper (the student's generation runs under it)
    "Distillation": (_distillation, ("trl", "DistillationTrainer"), "teacher_model",
                     (("bfloat16", "float32"), ("float32",)), ("loss", "entropy")),
}


def _hooked_run(trainer, other: str):
    """``(dtypes, log)``: the output dtypes of the first layer's ``q_proj`` of the policy and of the model
    ``trainer.<other>`` over one step, and the step's log."""
    seen = set()
    for tag, model in (("policy", trainer.model), (other, getattr(trainer, other))):
        body = trainer.accelerator.unwrap_model(model)
        body = body.get_base_model() if hasattr(body, "get_base_model") else body
        body.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda module, args, output, tag=tag: seen.add((tag, str(output.dtype).removeprefix("torch."))))
    trainer.train()
    return sorted(seen), trainer.state.log_history[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_models_run_in_trls_dtypes(checkpoint, tmp_path, name):
    """Under ``bf16=True`` the policy and the reference / teacher run in TRL's dtypes, and with the reference /
    teacher holding the policy's weights the first step's KL, margins and divergences equal TRL's."""
    import importlib

    build, (module, trl_name), other, (policy_dtypes, other_dtypes), keys = CASES[name]
    trl_cls = getattr(importlib.import_module(module), trl_name)
    theirs = _hooked_run(build(trl_cls, checkpoint, tmp_path / "trl"), other)
    ours = _hooked_run(build(getattr(fa_trl, f"{name}Trainer"), checkpoint, tmp_path / "ours"), other)
    assert theirs[0] == sorted([("policy", d) for d in policy_dtypes] + [(other, d) for d in other_dtypes])
    assert ours[0] == theirs[0]
    for key in keys:
        if theirs[1][key] == 0:  # a reference that is the policy, both in bf16: exactly 0
            assert ours[1][key] == 0, key
        else:  # bf16 rounding: TRL's head runs on the logits, ours on the hidden states
            assert ours[1][key] == pytest.approx(theirs[1][key], rel=1e-2, abs=1e-6), key
