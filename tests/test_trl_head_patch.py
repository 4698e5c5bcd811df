"""The forward patch the TRL drop-in trainers install (``install_head``) through what users do with a model
afterwards: a pickle or ``torch.save`` round trip (the patch is gone, so the next drop-in installs it again),
accelerate's unwrap (the patch stays) and ``copy.deepcopy`` (the copy computes with its own weights, through
its plain forward and through the fused head). The tiny Qwen2 checkpoint and the comparison
with TRL's trainer are those of ``test_integration_trl_trainers``.
"""
import copy
import io
import pickle

import pytest
import torch

from test_integration_trl_trainers import (_common, _compare, _run, _sft_dataset, _tokenizer, checkpoint,  # noqa: F401
                                           fa_trl, transformers, trl)
from fastalign.integrations.trl._head import HeadOutputs  # noqa: E402 (after the import that skips without TRL)

IDS = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])


def _sft(cls, model, checkpoint, tmp_path, **options):
    args = trl.SFTConfig(**_common(tmp_path, per_device_train_batch_size=4, **options))
    return cls(model=model, args=args, train_dataset=_sft_dataset("text"), processing_class=_tokenizer(checkpoint))


def _pickle(model, checkpoint, tmp_path):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model, checkpoint, tmp_path):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _unwrap(model, checkpoint, tmp_path):
    """A bf16 trainer's autocast wrapper around the forward, removed by accelerate's unwrap, which follows
    ``__wrapped__``: it must stop at the fastalign head, not run past it to the class forward."""
    trainer = _sft(fa_trl.SFTTrainer, model, checkpoint, tmp_path / "bf16", bf16=True)
    prepared = trainer.accelerator.prepare_model(model)
    unwrapped = trainer.accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    out = unwrapped(input_ids=IDS, labels=IDS, fastalign_head=("log_probs",))  # still patched, before any new trainer
    assert isinstance(out, HeadOutputs), type(out)
    return unwrapped


@pytest.mark.parametrize("round_trip", [_pickle, _torch_save, _unwrap], ids=["pickle", "torch_save", "unwrap"])
def test_drop_in_after_a_round_trip_trains_like_trl(checkpoint, tmp_path, round_trip):
    """A patched model that comes back with its plain forward (pickle, torch.save) or whose wrappers accelerate
    removed: the next drop-in trains one step equal to TRL's SFTTrainer (the patch was only marked as installed:
    AttributeError 'operands')."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    _sft(fa_trl.SFTTrainer, model, checkpoint, tmp_path / "first")
    model = round_trip(model, checkpoint, tmp_path)
    theirs = _run(_sft(trl.SFTTrainer, transformers.AutoModelForCausalLM.from_pretrained(checkpoint), checkpoint,
                       tmp_path / "trl"))
    ours = _run(_sft(fa_trl.SFTTrainer, model, checkpoint, tmp_path / "fa"))
    _compare(theirs, ours)


@pytest.mark.parametrize("trainers", [1, 2])
def test_deepcopy_of_a_patched_model_computes_with_its_own_weights(checkpoint, tmp_path, trainers):
    """A deep copy of a model that drop-in trainers patched (TRL's fused head under fastalign's; two trainers:
    TRL's second head over the first fastalign one) is a copy: once the original's weights change, the copy's
    plain forward still equals the unpatched model's logits, and its fused head scores from the copy's weights
    (the copy's plain forward ran the original model)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    for i in range(trainers):
        _sft(fa_trl.SFTTrainer, model, checkpoint, tmp_path / str(i))
    copied = copy.deepcopy(model)
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)(input_ids=IDS).logits
        torch.manual_seed(0)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        logits = copied(input_ids=IDS).logits
        head = copied(input_ids=IDS, labels=IDS, fastalign_head=("log_probs", "entropy"))
        trl_head = copied(input_ids=IDS, labels=IDS, fused_lm_head=True)
        moved = model(input_ids=IDS).logits
    assert not torch.allclose(moved, expected, atol=1e-3)  # the original did change
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    z = torch.log_softmax(expected[0, :-1].double(), -1)  # float64 reference from the copy's (unchanged) weights
    lp = z.gather(-1, IDS[0, 1:, None])[:, 0]
    torch.testing.assert_close(head.log_probs[0].double(), lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.entropy[0].double(), -(z.exp() * z).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trl_head.log_probs[0].double(), lp, rtol=1e-5, atol=1e-5)
