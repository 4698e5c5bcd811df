"""The distillation divergence against TRL 1.16's own code: ``_chunked_divergence_loss`` (loss, entropy sum,
token count and gradients) and a tiny ``DistillationTrainer`` run next to the drop-in (loss, logged metrics
and parameters after the steps, same seed)."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the TRL drop-ins need transformers")
trl = pytest.importorskip("trl", reason="TRL is not importable")
datasets = pytest.importorskip("datasets", reason="TRL's trainers need datasets")
pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")

from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: E402

import fastalign  # noqa: E402
from helpers import assert_close  # noqa: E402
from trl_runs import WORDS, assert_same_run, run, tiny_checkpoint  # noqa: E402


def _inputs(seed, B=2, K=6, H=16, Ht=24, V=50):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, K, H, generator=g).requires_grad_()
    ws = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    bs = (torch.randn(V, generator=g) * 0.1).requires_grad_()
    ht = torch.randn(B, K, Ht, generator=g)
    wt = torch.randn(V, Ht, generator=g) * 0.3
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0, 4:] = 0
    return hs, ws, bs, ht, wt, mask


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5, 0.1])
@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, num_items_in_batch=9),
                                     dict(student_logit_scale=1.5, student_final_logit_softcapping=4.0,
                                          teacher_final_logit_softcapping=3.0, teacher_logit_scale=0.5)])
def test_matches_trl_chunked_divergence(beta, options):
    hs, ws, bs, ht, wt, mask = _inputs(0)
    theirs = _chunked_divergence_loss(hs, ht, ws, wt, mask, beta, student_lm_head_bias=bs, **options)
    t_grads = torch.autograd.grad(theirs[0], (hs, ws, bs))
    ours = fastalign.linear_divergence_loss(
        hs, ws, ht, wt, beta=beta, bias=bs, temperature=options.get("temperature", 1.0),
        logit_scale=options.get("student_logit_scale", 1.0), softcap=options.get("student_final_logit_softcapping"),
        teacher_logit_scale=options.get("teacher_logit_scale", 1.0),
        teacher_softcap=options.get("teacher_final_logit_softcapping"), response_mask=mask,
        global_tokens=options.get("num_items_in_batch"))
    o_grads = torch.autograd.grad(ours[0], (hs, ws, bs))
    assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5, what="loss")
    assert_close(ours[1]["entropy_sum"], theirs[1], atol=1e-4, rtol=1e-5, what="entropy_sum")
    assert int(ours[1]["num_tokens"]) == int(theirs[2])
    for name, o, t in zip(("hidden", "weight", "bias"), o_grads, t_grads):
        assert_close(o, t, atol=1e-5, rtol=1e-4, what=name)


# ------------------------------------------------------------------------------------------ trainer

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return (tiny_checkpoint(tmp_path_factory.mktemp("student"), hidden=32, seed=0),
            tiny_checkpoint(tmp_path_factory.mktemp("teacher"), hidden=48, seed=1))


def _trainer(cls, models, tmp_path, options):
    student, teacher = models
    args = trl.DistillationConfig(**{**dict(
        output_dir=str(tmp_path), max_steps=2, report_to="none", seed=0, use_cpu=True, logging_steps=1,
        optim="sgd", learning_rate=0.5, bf16=False, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=4, max_completion_length=5), **options})
    data = datasets.Dataset.from_dict({"prompt": [" ".join(f"w{(3 * i + j) % 50 + 3}" for j in range(2 + i % 3))
                                                  for i in range(8)]})
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(student)
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer)


@pytest.mark.parametrize("options", [dict(beta=0.5), dict(beta=0.0, temperature=0.8, gradient_accumulation_steps=2),
                                     dict(beta=1.0)])
def test_trainer_matches_trl(models, tmp_path, options):
    from fastalign.integrations.trl import DistillationTrainer

    theirs = run(_trainer(trl.DistillationTrainer, models, tmp_path / "trl", options))
    ours = run(_trainer(DistillationTrainer, models, tmp_path / "ours", options))
    assert_same_run(ours, theirs, min_logs=1)


def test_registered_head_transform_reaches_the_teacher(models, tmp_path, monkeypatch):
    """A teacher whose architecture is stated with register_head_transform (its config holds no logit scale or
    softcap) gets that transform: the drop-in's loss equals TRL's on the same teacher whose config states it."""
    import fastalign.integrations.hf as hf
    from fastalign.integrations.hf import head_transforms
    from fastalign.integrations.trl import DistillationTrainer

    monkeypatch.setattr(head_transforms, "HEAD_TRANSFORMS", dict(head_transforms.HEAD_TRANSFORMS))
    trainer = _trainer(DistillationTrainer, models, tmp_path, dict(beta=0.5))
    student = trainer.accelerator.unwrap_model(trainer.model)
    teacher_config = trainer.accelerator.unwrap_model(trainer.teacher_model).config
    g = torch.Generator().manual_seed(3)
    inputs = dict(prompt_ids=torch.randint(3, len(WORDS), (2, 3), generator=g),
                  prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                  completion_ids=torch.randint(3, len(WORDS), (2, 4), generator=g),
                  completion_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with torch.no_grad():
        plain = trl.DistillationTrainer._compute_loss(trainer, student, inputs, None)[0]
        monkeypatch.setattr(teacher_config, "model_type", "qwen2_scaled")
        hf.register_head_transform("qwen2_scaled", logit_scale=0.5, softcap=3.0)
        ours = trainer._compute_loss(student, inputs, None)[0]
        teacher_config.logit_scale, teacher_config.final_logit_softcapping = 0.5, 3.0
        theirs = trl.DistillationTrainer._compute_loss(trainer, student, inputs, None)[0]
    assert_close(ours, theirs, atol=1e-6, rtol=1e-5, what="loss")
    assert abs(float(ours) - float(plain)) > 1e-3


def test_a_padded_teacher_head_scores_its_kept_rows(models, tmp_path, monkeypatch):
    """A teacher whose head is padded past the vocabulary and whose forward keeps its first rows (Inkling's
    ``unpadded_vocab_size``, :data:`fastalign.integrations.hf.HEAD_ROWS`): the drop-in reads those rows, so its loss
    equals the one with the unpadded head (the padding rows drawn large); without the field the vocabularies differ
    and it raises."""
    import fastalign.integrations.hf as hf
    from fastalign.integrations.hf import head_transforms
    from fastalign.integrations.trl import DistillationTrainer

    monkeypatch.setattr(head_transforms, "HEAD_TRANSFORMS", dict(head_transforms.HEAD_TRANSFORMS))
    monkeypatch.setattr(head_transforms, "HEAD_ROWS",
                        {**head_transforms.HEAD_ROWS, "qwen2_padded": "unpadded_vocab_size"})
    trainer = _trainer(DistillationTrainer, models, tmp_path, dict(beta=0.5))
    student = trainer.accelerator.unwrap_model(trainer.model)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    g = torch.Generator().manual_seed(4)
    inputs = dict(prompt_ids=torch.randint(3, len(WORDS), (2, 3), generator=g),
                  prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                  completion_ids=torch.randint(3, len(WORDS), (2, 4), generator=g),
                  completion_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    head = teacher.get_output_embeddings()
    V, H = head.weight.shape
    with torch.no_grad():
        plain = trainer._compute_loss(student, inputs, None)[0]
        padded = torch.nn.Linear(H, V + 3, bias=False)
        padded.weight[:V] = head.weight
        padded.weight[V:] = 30.0
        teacher.set_output_embeddings(padded)
        monkeypatch.setattr(teacher.config, "model_type", "qwen2_padded")
        hf.register_head_transform("qwen2_padded")
        teacher.config.unpadded_vocab_size = V
        ours = trainer._compute_loss(student, inputs, None)[0]
        teacher.config.unpadded_vocab_size = None  # every row: no longer the student's vocabulary
        with pytest.raises(ValueError, match="vocabulary"):
            trainer._compute_loss(student, inputs, None)
    assert_close(ours, plain, atol=1e-6, rtol=1e-5, what="loss")
