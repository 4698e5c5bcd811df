"""The SDPO and SDFT drop-ins against TRL 1.16's own experimental ``SDPOTrainer`` and ``SDFTTrainer``: a tiny
trainer run next to the drop-in from the same seed (the logged metrics and the parameters after the steps) for
every distillation mode (the top-k support with and without its tail bucket), SDPO's policy term mixed in, its
loss types and sequence-level ratio, gradient accumulation (the clipped importance ratio to the rollout's
log-probs), a LoRA adapter on the lm_head with the base weights as the teacher, SDFT's skipped first tokens, the
options assigned on the trainer between steps; and the refusals (SDPO's loss types that TRL refuses)."""
import pytest

transformers = pytest.importorskip("transformers", reason="the TRL drop-ins need transformers")
trl = pytest.importorskip("trl", reason="TRL is not importable")
datasets = pytest.importorskip("datasets", reason="TRL's trainers need datasets")
pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")

from trl.experimental.sdft import SDFTConfig, SDFTTrainer as TRLSDFTTrainer  # noqa: E402
from trl.experimental.sdpo import SDPOConfig, SDPOTrainer as TRLSDPOTrainer  # noqa: E402

from trl_runs import assert_same_run, run, tiny_checkpoint  # noqa: E402

COMMON = dict(max_steps=2, report_to="none", seed=0, use_cpu=True, logging_steps=1, optim="sgd", learning_rate=0.05,
              bf16=False, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, max_completion_length=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):  # an EOS bias: some completions stop early, padding after their EOS
    return tiny_checkpoint(tmp_path_factory.mktemp("policy"), eos_bias=1.0)


def low_words(completions, **_):
    """1 when the completion holds one of the words w0 .. w29, else 0."""
    return [float(any(w in c.split() for w in [f"w{i}" for i in range(30)])) for c in completions]


def _prompts(n):
    return [" ".join(f"w{(3 * i + j) % 50}" for j in range(2 + i % 3)) for i in range(n)]


def _lora(targets):
    if targets is None:
        return {}
    peft = pytest.importorskip("peft")
    # init_lora_weights=False: B is not 0, so the adapter changes the logits from the first step
    return {"peft_config": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)}


def _sdpo(cls, checkpoint, tmp_path, options, lora=None):
    args = SDPOConfig(output_dir=str(tmp_path), **{**COMMON, **dict(per_device_train_batch_size=4, num_generations=4,
                                                                  success_reward_threshold=1.0), **options})
    return cls(model=transformers.AutoModelForCausalLM.from_pretrained(checkpoint), reward_funcs=low_words, args=args,
               train_dataset=datasets.Dataset.from_dict({"prompt": _prompts(8)}),
               processing_class=transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint), **_lora(lora))


def _sdft(cls, checkpoint, tmp_path, options, lora=None):
    args = SDFTConfig(output_dir=str(tmp_path), **{**COMMON, **dict(per_device_train_batch_size=4, num_generations=2),
                                                  **options})
    data = {"prompt": _prompts(8), "privileged_context": [" ".join(f"w{(5 * i + j) % 50}" for j in range(3))
                                                          for i in range(8)]}
    return cls(model=transformers.AutoModelForCausalLM.from_pretrained(checkpoint), args=args,
               train_dataset=datasets.Dataset.from_dict(data),
               processing_class=transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint), **_lora(lora))


@pytest.mark.parametrize("options, lora", [
    (dict(), None),
    # two steps per generation: the second step's rollout log-probs differ, TRL's clipped importance ratio applies
    (dict(distillation_mode="full_logits", distillation_alpha=0.3, temperature=0.8, steps_per_generation=2,
          num_generations=2), None),
    (dict(steps_per_generation=2, distillation_is_clip=1.01, num_generations=2), None),
    (dict(distillation_weight=0.4, loss_type="grpo", gradient_accumulation_steps=2, per_device_train_batch_size=2,
          num_generations=2), None),
    (dict(distillation_weight=0.0, loss_type="dr_grpo", importance_sampling_level="sequence", epsilon_high=0.28),
     None),
    (dict(distillation_mode="full_logits", teacher_model_kind="base"), ["q_proj", "lm_head"]),
    (dict(distillation_mode="topk_logits", distillation_topk=6, distillation_add_tail=True, distillation_alpha=0.0,
          temperature=0.9), None),
])
def test_sdpo_trainer_matches_trl(checkpoint, tmp_path, options, lora):
    from fastalign.integrations.trl import SDPOTrainer

    theirs = run(_sdpo(TRLSDPOTrainer, checkpoint, tmp_path / "trl", options, lora))
    ours = run(_sdpo(SDPOTrainer, checkpoint, tmp_path / "ours", options, lora))
    weight = options.get("distillation_weight", 1.0)
    assert all(("self_distillation/distillation_loss" in log) == (weight != 0.0) for log in ours[0])
    assert all(("self_distillation/policy_loss" in log) == (weight != 1.0) for log in ours[0])
    assert_same_run(ours, theirs)


@pytest.mark.parametrize("options, lora", [
    (dict(distillation_topk=8), None),  # SDFT's default mode, topk_logits, at a k below the test vocabulary
    # TRL leaves the first completion tokens out of the distillation loss
    (dict(distillation_topk=8, num_loss_tokens_to_skip=2), None),
    (dict(distillation_topk=5, distillation_add_tail=True, distillation_alpha=1.0, steps_per_generation=2), None),
    (dict(distillation_topk=12, gradient_accumulation_steps=2, per_device_train_batch_size=2), ["q_proj", "lm_head"]),
    (dict(distillation_mode="sampled_token", distillation_alpha=1.0), None),
    (dict(distillation_mode="full_logits", gradient_accumulation_steps=2, per_device_train_batch_size=2), None),
    (dict(distillation_mode="full_logits", steps_per_generation=2, distillation_is_clip=1.01), None),
    (dict(distillation_mode="full_logits", distillation_alpha=0.0, temperature=0.7), ["q_proj", "lm_head"]),
])
def test_sdft_trainer_matches_trl(checkpoint, tmp_path, options, lora):
    from fastalign.integrations.trl import SDFTTrainer

    theirs = run(_sdft(TRLSDFTTrainer, checkpoint, tmp_path / "trl", options, lora))
    ours = run(_sdft(SDFTTrainer, checkpoint, tmp_path / "ours", options, lora))
    assert all("self_distillation/distillation_loss" in log for log in ours[0])
    assert_same_run(ours, theirs)


def test_refusals(checkpoint, tmp_path):
    from fastalign.integrations.trl import SDFTTrainer, SDPOTrainer

    with pytest.raises(ValueError, match="SDFTConfig.distillation_topk must be set"):
        _sdft(SDFTTrainer, checkpoint, tmp_path, dict(distillation_topk=None))
    with pytest.raises(ValueError, match="use_liger_kernel"):
        _sdpo(SDPOTrainer, checkpoint, tmp_path, dict(use_liger_kernel=True))
    with pytest.raises(ValueError, match="does not support returning outputs"):
        _sdpo(SDPOTrainer, checkpoint, tmp_path, {}).compute_loss(None, {}, return_outputs=True)


class _Assign(transformers.TrainerCallback):
    """Assigns attributes on the trainer at the end of the first step (a schedule): the second step reads them."""

    def __init__(self, trainer, values):
        self.trainer, self.values = trainer, values

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            for name, value in self.values.items():
                setattr(self.trainer, name, value)


@pytest.mark.parametrize("build, options, assigned", [
    # TRL's _forward_logits divides both models' logits by self.temperature at every step
    ("sdft", dict(distillation_mode="full_logits"), dict(temperature=0.5)),
    # TRL's SDFT reads self.num_loss_tokens_to_skip at every step
    ("sdft", dict(distillation_topk=8), dict(num_loss_tokens_to_skip=2)),
    # both of SDPO's terms at the assigned temperature
    ("sdpo", dict(distillation_mode="full_logits", distillation_weight=0.5, loss_type="grpo"), dict(temperature=0.5)),
])
def test_options_assigned_on_the_trainer_match_trl(checkpoint, tmp_path, build, options, assigned):
    from fastalign.integrations.trl import SDFTTrainer, SDPOTrainer

    make, classes = ((_sdft, (TRLSDFTTrainer, SDFTTrainer)) if build == "sdft"
                     else (_sdpo, (TRLSDPOTrainer, SDPOTrainer)))

    def scheduled(cls, out):
        trainer = make(cls, checkpoint, out, options)
        trainer.add_callback(_Assign(trainer, assigned))
        return run(trainer)

    theirs, ours = (scheduled(cls, tmp_path / cls.__module__.split(".")[0]) for cls in classes)
    assert_same_run(ours, theirs)


def test_sdpo_refuses_the_loss_types_trl_refuses(checkpoint, tmp_path):
    """TRL's SDPOTrainer computes its policy term for grpo, bnpo, dr_grpo and dapo only and raises
    ``Unsupported loss_type`` at the first step for another: the drop-in raises the same error when it is built
    (or at the step, for a loss_type assigned later). Without a policy term TRL never reads loss_type: both train."""
    from fastalign.integrations.trl import SDPOTrainer

    for loss_type in ("cispo", "sapo"):
        options = dict(distillation_weight=0.0, loss_type=loss_type, max_steps=1)
        with pytest.raises(ValueError, match="Unsupported loss_type") as theirs:
            _sdpo(TRLSDPOTrainer, checkpoint, tmp_path / "trl", options).train()
        with pytest.raises(ValueError, match="SDPOConfig.loss_type") as ours:
            _sdpo(SDPOTrainer, checkpoint, tmp_path / "ours", options)
        assert str(ours.value).startswith(str(theirs.value))
    trainer = _sdpo(SDPOTrainer, checkpoint, tmp_path / "ours", dict(distillation_weight=0.5, loss_type="grpo"))
    trainer.loss_type = "cispo"
    with pytest.raises(ValueError, match="Unsupported loss_type: cispo"):
        trainer.train()
    options = dict(loss_type="cispo")  # distillation_weight 1: the policy term is never computed
    assert_same_run(run(_sdpo(SDPOTrainer, checkpoint, tmp_path / "ours", options)),
                    run(_sdpo(TRLSDPOTrainer, checkpoint, tmp_path / "trl", options)))


def test_an_assigned_value_the_loss_refuses_raises_naming_it(checkpoint, tmp_path):
    from fastalign.integrations.trl import SDFTTrainer

    trainer = _sdft(SDFTTrainer, checkpoint, tmp_path, dict(distillation_topk=8))
    trainer.temperature = 0.0
    with pytest.raises(ValueError, match="SDFTTrainer.temperature=0.0: SDFTConfig.temperature"):
        trainer.fastalign_loss
