"""The Online DPO drop-in against TRL 1.16's own experimental ``OnlineDPOTrainer``: its ``_forward`` on the same
completions (log-probs at every completion position, padding included, and their gradients), and a tiny
trainer run next to the drop-in from the same seed (the logged metrics and the parameters after the steps):
sigmoid and IPO, beta, the missing-EOS penalty, left truncation to ``max_length``, gradient
accumulation, and a LoRA adapter on the body and the lm_head (its reference the disabled adapter)."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the TRL drop-ins need transformers")
trl = pytest.importorskip("trl", reason="TRL is not importable")
datasets = pytest.importorskip("datasets", reason="TRL's trainers need datasets")
pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")

from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer as TRLOnlineDPOTrainer  # noqa: E402

from helpers import assert_close  # noqa: E402
from trl_runs import WORDS, assert_same_run, run, tiny_checkpoint  # noqa: E402

TARGET = WORDS.index("w7")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):  # an EOS bias: some completions stop early, padding after their EOS
    return tiny_checkpoint(tmp_path_factory.mktemp("policy"), eos_bias=0.4)


def target_share(completion_ids, **_):
    """The reward: the share of the target token in the completion."""
    return [sum(t == TARGET for t in ids) / max(len(ids), 1) for ids in completion_ids]


def _trainer(cls, checkpoint, tmp_path, options, **kwargs):
    args = OnlineDPOConfig(**{**dict(
        output_dir=str(tmp_path), max_steps=2, report_to="none", seed=0, use_cpu=True, logging_steps=1,
        optim="sgd", learning_rate=0.5, bf16=False, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=3, max_new_tokens=5), **options})
    prompts = [" ".join(f"w{(3 * i + j) % 50}" for j in range(2 + i % 4)) for i in range(8)]
    return cls(model=transformers.AutoModelForCausalLM.from_pretrained(checkpoint), reward_funcs=target_share,
               args=args, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
               processing_class=transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint), **kwargs)


@pytest.mark.parametrize("options", [
    dict(),
    dict(loss_type="ipo", beta=0.2, per_device_train_batch_size=4),
    dict(missing_eos_penalty=1.0, max_length=6, gradient_accumulation_steps=2),
])
def test_trainer_matches_trl(checkpoint, tmp_path, options):
    from fastalign.integrations.trl import OnlineDPOTrainer

    theirs = run(_trainer(TRLOnlineDPOTrainer, checkpoint, tmp_path / "trl", options))
    ours = run(_trainer(OnlineDPOTrainer, checkpoint, tmp_path / "ours", options))
    assert_same_run(ours, theirs)


def _completions(g, B=4, P=3, C=5):
    prompt_ids = torch.randint(3, len(WORDS), (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(3, len(WORDS), (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_ids[1, 2], completion_ids[1, 3:] = 1, 0  # an EOS, then padding (scored as TRL scores it)
    completion_mask[1, 3:] = 0
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@pytest.mark.parametrize("lora", [None, ["q_proj", "lm_head"]])
@pytest.mark.parametrize("max_length", [512, 6])
def test_forward_matches_trl(checkpoint, tmp_path, lora, max_length):
    from fastalign.integrations.trl import OnlineDPOTrainer

    kwargs = {}
    if lora:
        peft = pytest.importorskip("peft")
        kwargs["peft_config"] = peft.LoraConfig(r=4, lora_alpha=8, target_modules=lora, init_lora_weights=False)
    trainer = _trainer(OnlineDPOTrainer, checkpoint, tmp_path, dict(max_length=max_length), **kwargs)
    inputs = _completions(torch.Generator().manual_seed(3))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    ours = trainer._forward(trainer.model, *inputs)
    o_grads = torch.autograd.grad(ours.sum(), params)
    theirs = TRLOnlineDPOTrainer._forward(trainer, trainer.model, *inputs)
    t_grads = torch.autograd.grad(theirs.sum(), params)
    assert ours.shape == theirs.shape == inputs[2].shape
    assert_close(ours, theirs, atol=1e-5, rtol=1e-5, what="logprobs")
    for o, t in zip(o_grads, t_grads):
        assert_close(o, t, atol=1e-5, rtol=1e-4, what="gradient")
    if lora:  # the reference: the adapter disabled
        with torch.no_grad(), trainer.model.disable_adapter():
            ref = trainer._forward(trainer.model, *inputs)
            t_ref = TRLOnlineDPOTrainer._forward(trainer, trainer.model, *inputs)
        assert_close(ref, t_ref, atol=1e-5, rtol=1e-5, what="reference")
        assert (ref - ours).abs().max() > 1e-3


def test_explicit_reference_model_matches_trl(checkpoint, tmp_path):
    """A reference model passed by the user (its own fused head installed) gives TRL's numbers too."""
    from fastalign.integrations.trl import OnlineDPOTrainer

    def trainer(cls, path):
        torch.manual_seed(7)
        reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
        with torch.no_grad():
            reference.lm_head.weight.add_(0.05 * torch.randn_like(reference.lm_head.weight))
        return _trainer(cls, checkpoint, path, {}, ref_model=reference)

    ours = run(trainer(OnlineDPOTrainer, tmp_path / "ours"))
    assert_same_run(ours, run(trainer(TRLOnlineDPOTrainer, tmp_path / "trl")))
    assert all(abs(log["objective/kl"]) > 0 for log in ours[0])  # the reference differs from the policy


def test_beta_per_epoch(checkpoint, tmp_path):
    """A list beta gives one beta per epoch (TRL 1.16's own property fails to index it with the fractional epoch)."""
    from fastalign.integrations.trl import OnlineDPOTrainer

    options = dict(beta=[0.2, 0.05], num_train_epochs=3, max_steps=-1, per_device_train_batch_size=4)
    trainer = _trainer(OnlineDPOTrainer, checkpoint, tmp_path, options)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "beta" in log]
    want = [(1, 0.2)] * 2 + [(2, 0.05)] * 2 + [(3, 0.05)] * 2
    assert [(math.ceil(log["epoch"]), log["beta"]) for log in logs] == want


def test_refusals(checkpoint, tmp_path):
    from fastalign.integrations.trl import OnlineDPOTrainer

    with pytest.raises(ValueError, match="use_liger_kernel"):
        _trainer(OnlineDPOTrainer, checkpoint, tmp_path, dict(use_liger_kernel=True))
    with pytest.raises(TypeError, match="model: its dtype is torch.float64"):
        OnlineDPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(checkpoint).double(),
                         reward_funcs=target_share,
                         args=OnlineDPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False),
                         train_dataset=datasets.Dataset.from_dict({"prompt": ["w1 w2"]}),
                         processing_class=transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint))
    # a DoRA adapter on the head (TRL's Online DPO takes head adapters): refused when the trainer is built, not at
    # its first step
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match=r"^model: the output head's LoRA adapter 'default' is not a plain LoRA"):
        _trainer(OnlineDPOTrainer, checkpoint, tmp_path, {},
                 peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], use_dora=True))


def test_bf16_mixed_precision_matches_trl_to_bf16_precision(checkpoint, tmp_path):
    """Under the trainer's bf16 autocast the head runs in bf16 (fp32 accumulation here, bf16 logits in TRL): the
    logged metrics of a step agree to bf16 precision."""
    from fastalign.integrations.trl import OnlineDPOTrainer

    options = dict(bf16=True, max_steps=1)
    (t_log,), _, _ = run(_trainer(TRLOnlineDPOTrainer, checkpoint, tmp_path / "trl", options))
    (o_log,), _, _ = run(_trainer(OnlineDPOTrainer, checkpoint, tmp_path / "ours", options))
    for key in ("loss", "logps/chosen", "logps/rejected", "objective/kl", "objective/entropy"):
        assert o_log[key] == pytest.approx(t_log[key], rel=2e-2, abs=2e-2), key
