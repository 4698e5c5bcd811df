"""The GKD and GOLD drop-ins against TRL 1.16's own experimental ``GKDTrainer`` and ``GOLDTrainer``: GKD's
``generalized_jsd_loss`` on the logits of the same hidden states (loss and gradients), and tiny trainer runs next to
the drop-ins (logged metrics and parameters after the steps, same seed): off-policy, on-policy student
generations, sequence-level KD from the teacher's generations, gradient accumulation, evaluation, LoRA adapters and
GOLD's temperature."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the TRL drop-ins need transformers")
trl = pytest.importorskip("trl", reason="TRL is not importable")
datasets = pytest.importorskip("datasets", reason="TRL's trainers need datasets")
pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")

from trl.experimental.gkd import GKDConfig, GKDTrainer as TRLGKDTrainer  # noqa: E402
from trl.experimental.gold import GOLDConfig, GOLDTrainer as TRLGOLDTrainer  # noqa: E402

import fastalign  # noqa: E402
from helpers import assert_close  # noqa: E402
from trl_runs import assert_same_run, run, tiny_checkpoint, tokenized_completions  # noqa: E402


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5, 0.1])
@pytest.mark.parametrize("num_items_in_batch", [None, 7, "tensor"])
def test_loss_matches_generalized_jsd_loss(beta, num_items_in_batch):
    g = torch.Generator().manual_seed(0)
    B, T, H, Ht, V = 3, 6, 16, 24, 40
    hs = torch.randn(B, T, H, generator=g, dtype=torch.float64).requires_grad_()
    ws = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    bs = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    ht = torch.randn(B, T, Ht, generator=g, dtype=torch.float64)
    wt = torch.randn(V, Ht, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[2] = -100  # a row without a scored token
    n = torch.tensor(7) if num_items_in_batch == "tensor" else num_items_in_batch
    theirs = TRLGKDTrainer.generalized_jsd_loss(hs @ ws.T + bs, ht @ wt.T, labels, beta=beta, num_items_in_batch=n)
    t_grads = torch.autograd.grad(theirs, (hs, ws, bs))
    ours, _ = fastalign.linear_divergence_loss(hs.float(), ws.float(), ht.float(), wt.float(), beta=beta,
                                               bias=bs.float(), response_mask=labels != -100, global_tokens=n)
    o_grads = torch.autograd.grad(ours, (hs, ws, bs))
    assert_close(ours, theirs, atol=1e-6, rtol=1e-5, what="loss")
    for name, o, t in zip(("hidden", "weight", "bias"), o_grads, t_grads):
        assert_close(o, t, atol=1e-6, rtol=1e-4, what=name)


def test_no_scored_token_gives_zero_as_trl():
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(2, 3, 8, generator=g).requires_grad_()
    ws, wt = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.full((2, 3), -100)
    theirs = TRLGKDTrainer.generalized_jsd_loss(hs @ ws.T, hs.detach() @ wt.T, labels)
    ours, _ = fastalign.linear_divergence_loss(hs, ws, hs.detach(), wt, beta=0.5, response_mask=labels != -100)
    assert float(theirs) == float(ours) == 0.0
    ours.backward()
    assert torch.equal(hs.grad, torch.zeros_like(hs))


# ------------------------------------------------------------------------------------------ trainer

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return (tiny_checkpoint(tmp_path_factory.mktemp("student"), hidden=32, seed=0),
            tiny_checkpoint(tmp_path_factory.mktemp("teacher"), hidden=48, seed=1))


def _trainer(cls, models, tmp_path, options, config=None, **kwargs):
    student, teacher = models
    args = (config or GKDConfig)(**{**dict(
        output_dir=str(tmp_path), max_steps=2, report_to="none", seed=0, use_cpu=True, logging_steps=1,
        optim="sgd", learning_rate=0.5, bf16=False, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=4), **{"max_completion_length" if config is GOLDConfig else "max_new_tokens": 4},
        **options})
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(student)
    model = transformers.AutoModelForCausalLM.from_pretrained(student)
    teacher_model = transformers.AutoModelForCausalLM.from_pretrained(teacher)
    return cls(model=model, teacher_model=teacher_model, args=args, train_dataset=tokenized_completions(8),
               processing_class=tokenizer, **kwargs)


def _run(cls, models, tmp_path, options, **kwargs):
    return run(_trainer(cls, models, tmp_path, options, **kwargs))


@pytest.mark.parametrize("options", [
    dict(lmbda=0.0, beta=0.5),
    dict(lmbda=1.0, beta=0.0, gradient_accumulation_steps=2),
    dict(lmbda=0.0, seq_kd=True, beta=1.0),
    dict(lmbda=0.5, beta=0.1, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=3),
    dict(lmbda=1.0, gradient_checkpointing=True),
])
def test_trainer_matches_trl(models, tmp_path, options):
    from fastalign.integrations.trl import GKDTrainer

    extra = {"eval_dataset": tokenized_completions(5)} if "eval_strategy" in options else {}
    theirs = _run(TRLGKDTrainer, models, tmp_path / "trl", options, **extra)
    ours = _run(GKDTrainer, models, tmp_path / "ours", options, **extra)
    if extra:
        assert any("eval_loss" in log for log in ours[0])
    assert_same_run(ours, theirs)


def test_lora_matches_trl(models, tmp_path):
    peft = pytest.importorskip("peft")
    from fastalign.integrations.trl import GKDTrainer

    def config():  # init_lora_weights=False: B is not 0, so the adapter changes the logits from the first step
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    torch.manual_seed(5)
    theirs = _run(TRLGKDTrainer, models, tmp_path / "trl", dict(lmbda=0.0), peft_config=config())
    torch.manual_seed(5)
    ours = _run(GKDTrainer, models, tmp_path / "ours", dict(lmbda=0.0), peft_config=config())
    assert sorted(ours[1]) and all("lora_" in k for k in ours[1])
    assert_same_run(ours, theirs)


def test_refusals(models, tmp_path):
    from fastalign.integrations.trl import GKDTrainer

    with pytest.raises(ValueError, match="use_liger_kernel"):
        _trainer(GKDTrainer, models, tmp_path, dict(use_liger_kernel=True))
    student, teacher = models
    trainer_args = GKDConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_new_tokens=4)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(student)
    with pytest.raises(TypeError, match="teacher_model: its dtype is torch.float64"):
        GKDTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(student),
                   teacher_model=transformers.AutoModelForCausalLM.from_pretrained(teacher).double(),
                   args=trainer_args, train_dataset=tokenized_completions(4), processing_class=tokenizer)


def test_return_outputs_gives_the_students_logits(models, tmp_path):
    """compute_loss(return_outputs=True), as an evaluation with compute_metrics asks: TRL's loss and the student's
    own outputs (one more forward, with a warning)."""
    from fastalign.integrations.trl import GKDTrainer

    trainer = _trainer(GKDTrainer, models, tmp_path, dict(lmbda=0.0))
    inputs = trainer.data_collator([tokenized_completions(3)[i] for i in range(3)])
    with pytest.warns(UserWarning, match="return_outputs=True"):
        loss, outputs = trainer.compute_loss(trainer.model, inputs, return_outputs=True)
    t_loss, t_outputs = TRLGKDTrainer.compute_loss(trainer, trainer.model, inputs, return_outputs=True)
    assert_close(loss, t_loss, atol=1e-6, rtol=1e-5, what="loss")
    assert_close(outputs.logits, t_outputs.logits, atol=1e-6, rtol=1e-6, what="logits")


# ------------------------------------------------------------------------------------------ GOLD (same tokenizer)

@pytest.mark.parametrize("options", [
    dict(lmbda=0.0, beta=0.5, temperature=0.8),
    dict(lmbda=1.0, beta=0.0, temperature=1.3, gradient_accumulation_steps=2),
    dict(lmbda=0.0, seq_kd=True, beta=1.0),
])
def test_gold_trainer_matches_trl(models, tmp_path, options):
    """GOLD's same-tokenizer JSD at its config's temperature (GKD's is 1)."""
    from fastalign.integrations.trl import GOLDTrainer

    theirs = _run(TRLGOLDTrainer, models, tmp_path / "trl", options, config=GOLDConfig)
    ours = _run(GOLDTrainer, models, tmp_path / "ours", options, config=GOLDConfig)
    assert_same_run(ours, theirs)


def test_gold_refuses_the_cross_tokenizer_loss(models, tmp_path):
    from fastalign.integrations.trl import GOLDTrainer

    with pytest.raises(ValueError, match="use_uld_loss"):
        _trainer(GOLDTrainer, models, tmp_path, dict(use_uld_loss=True), config=GOLDConfig)


def test_bf16_mixed_precision_matches_trl_to_bf16_precision(models, tmp_path):
    """Under the trainer's bf16 autocast both heads run in bf16 (fp32 accumulation here, bf16 logits in TRL): the
    loss and the gradient norm of a step agree to bf16 precision."""
    from fastalign.integrations.trl import GKDTrainer

    options = dict(lmbda=0.0, bf16=True, max_steps=1)
    (t_log,), _, _ = run(_trainer(TRLGKDTrainer, models, tmp_path / "trl", options))
    (o_log,), _, _ = run(_trainer(GKDTrainer, models, tmp_path / "ours", options))
    assert o_log["loss"] == pytest.approx(t_log["loss"], rel=1e-2)
    assert o_log["grad_norm"] == pytest.approx(t_log["grad_norm"], rel=2e-2)
