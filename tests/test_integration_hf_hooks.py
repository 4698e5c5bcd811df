"""Module hooks and offloading around causal_lm_logprobs: what the fused head does not run is said, not skipped
without a word.

The fused head reads the output head's weight and applies it to the body's last hidden states; it never calls the
head's forward, so the head's forward hooks do not run. A hook that changes the head's input or output would give
the model's numbers and not fastalign's: such hooks are named in a ``UserWarning`` at the caller's line, except those
of the packages whose hooks leave the outputs as they are (FSDP2's and DeepSpeed's gathering, PEFT's set-up,
accelerate's placement, TRL's activation offloading). A head offloaded by accelerate (its weight on the meta device)
raises naming the offloading.
"""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers")
from test_integration_hf import V, batch, tiny_model  # noqa: E402

from fastalign.integrations.hf import causal_lm_logprobs  # noqa: E402


def _halve(module, inputs, output):
    return output * 0.5


def _score(model):
    input_ids, attention_mask, labels = batch()
    return causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_a_hook_the_fused_head_does_not_run_is_named(kind):
    model = tiny_model("qwen2")
    head = model.get_output_embeddings()
    if kind == "pre":
        handle = head.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    else:
        handle = head.register_forward_hook(_halve)
    with pytest.warns(UserWarning, match=rf"hooks on the output head that fastalign does not run: Linear\.forward_"
                                         rf"{'pre_' if kind == 'pre' else ''}hook") as record:
        _score(model)
    assert record[0].filename == __file__  # at the caller's line
    assert "_halve" in str(record[0].message) or kind == "pre"
    handle.remove()
    model.register_forward_hook(_halve)  # the model's own hooks: not the head's (they run where model(...) is called)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _score(model)


def test_hooks_that_leave_the_outputs_as_they_are_are_not_named():
    """A hook defined by DeepSpeed (ZeRO-3 gathers a module's parameters in its pre-hook; the head is gathered
    around the call) or by torch.distributed (FSDP2) is not warned about."""
    model = tiny_model("qwen2")

    def gather(module, args):
        return None

    def root_post_forward(module, args, output):
        return None

    gather.__module__ = "deepspeed.runtime.zero.parameter_offload"
    root_post_forward.__module__ = "torch.distributed.fsdp._fully_shard._fsdp_state"
    model.get_output_embeddings().register_forward_pre_hook(gather)
    model.register_forward_hook(root_post_forward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _score(model)


def test_an_offloaded_head_raises_naming_the_offloading():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("qwen2")
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.get_output_embeddings().weight.is_meta
    with pytest.raises(ValueError, match="output head's weight is offloaded"):
        _score(model)


def test_the_model_own_logits_still_hold_without_hooks():
    """The warning is the only change: the scores are the model's own (a check of the test's model and batch)."""
    model = tiny_model("qwen2")
    input_ids, attention_mask, labels = batch()
    stats = _score(model)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    want = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    scored = labels[:, 1:] != -100
    torch.testing.assert_close(stats.logprobs.double(), torch.where(scored, want, 0.0), atol=1e-5, rtol=0)
    assert V == model.config.vocab_size
