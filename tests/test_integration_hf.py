"""causal_lm_logprobs against the log-softmax of the transformers model's own logits.

Tiny randomly initialised models built from transformers config classes (no downloads).
The reference is the model's own forward (its logits, softcapping and logit scaling
included), log-softmaxed in float64 and gathered at the next token.
"""
import re
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers")
from packaging.version import Version  # noqa: E402

#: the installed transformers: a model's forward (its head transform, its packed-row masks) can change between releases
TRANSFORMERS = Version(transformers.__version__)

from conftest import HAS_TRITON  # noqa: E402
from tiny_configs import DELTANET, MLA, VISION, gemma3_vision, gemma4, gemma_layers  # noqa: E402
from fastalign.integrations.hf import (  # noqa: E402
    HEAD_TRANSFORMS, causal_lm_logprobs, head_transform, known_head_transform)

V = 300
TINY = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)
ARCHS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 3.0, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"final_logit_softcapping": 3.0, "sliding_window": 4}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.4}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 2.5}),
}


def tiny_model(arch, tied=False, head_bias=False, seed=0):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**TINY, **extra, tie_word_embeddings=tied,
                                               attn_implementation="eager")
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # logits of order several units, so softcapping and scaling matter
        model.get_input_embeddings().weight.normal_(0, 1.0)
        if head_bias:
            head = torch.nn.Linear(32, V, bias=True)
            head.bias.normal_(0, 1.0)
            model.set_output_embeddings(head)
        if not tied:
            model.get_output_embeddings().weight.normal_(0, 1.0)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    return model


def reference(model, input_ids, attention_mask=None, position_ids=None, temperature=1.0):
    """(log p(next token), entropy), each [B, T-1], from the model's own logits in float64."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    z = logits[:, :-1].double() / temperature
    logp = torch.log_softmax(z, -1)
    lp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def batch(seed=1, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, V, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, 9:] = 0  # right padding
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :5] = -100  # prompt
    return input_ids, attention_mask, labels


def check(stats_field, ref, scored, atol):
    torch.testing.assert_close(stats_field.double(), torch.where(scored, ref, 0.0), atol=atol, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_matches_model_logits_padded_with_labels(arch, tied):
    model = tiny_model(arch, tied=tied)
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        ref_lp, ref_ent = reference(model, input_ids, attention_mask)
        stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, entropy=True)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    assert stats.logprobs.shape == (3, 11) and stats.logprobs.dtype == torch.float32
    assert ref_lp[scored].std() > 0.5  # the logits are not near-uniform: the head transform matters
    check(stats.logprobs, ref_lp, scored, 1e-5)
    check(stats.entropy, ref_ent, scored, 1e-5)


def test_response_mask_temperature_and_head_bias():
    model = tiny_model("gemma2", head_bias=True)
    input_ids, attention_mask, _ = batch(seed=3)
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, 6:] = 1
    with torch.no_grad():
        ref_lp, ref_ent = reference(model, input_ids, attention_mask, temperature=0.7)
        stats = causal_lm_logprobs(model, input_ids, attention_mask, response_mask=response_mask,
                                   temperature=0.7, entropy=True)
    scored = response_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    check(stats.logprobs, ref_lp, scored, 1e-5)
    check(stats.entropy, ref_ent, scored, 1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_shift_labels_score_every_position_as_given(arch):
    """Pre-shifted labels: entry t scores shift_labels[:, t] from position t's own logits, [B, T] (the last position
    included), 0 and no gradient where the label is -100 or position t is padding; gradients as through the model's
    logits."""
    model = tiny_model(arch)
    input_ids, attention_mask, _ = batch(seed=6)
    g = torch.Generator().manual_seed(7)
    shift_labels = torch.randint(0, V, input_ids.shape, generator=g)  # not the next input ids
    shift_labels[:, :3] = -100
    scored = (shift_labels != -100) & attention_mask.bool()
    assert scored[:, -1].any() and (~scored[:, -1]).any()
    stats = causal_lm_logprobs(model, input_ids, attention_mask, shift_labels=shift_labels, temperature=0.8,
                               entropy=True)
    logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.double() / 0.8, -1)
    ref_lp = logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert stats.logprobs.shape == input_ids.shape
    check(stats.logprobs, ref_lp, scored, 1e-5)
    check(stats.entropy, -(logp.exp() * logp).sum(-1), scored, 1e-5)
    weights = torch.randn(input_ids.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((stats.logprobs.double() * weights).sum(), list(model.parameters()), allow_unused=True)
    want = torch.autograd.grad((torch.where(scored, ref_lp, 0.0) * weights).sum(), list(model.parameters()),
                               allow_unused=True)
    for a, b in zip(got, want):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b.to(a.dtype), atol=1e-5, rtol=1e-4)


def test_sum_p2_and_argmax_of_unscored_entries():
    """Unscored entries are 0 for every statistic and -1 for argmax (it was the padding position's own argmax);
    scored entries are the model's own sum p^2 and argmax."""
    model = tiny_model("qwen2")
    input_ids, attention_mask, labels = batch(seed=4)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
        stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, sum_p2=True, argmax=True)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    check(stats.sum_p2, torch.softmax(logits, -1).pow(2).sum(-1), scored, 1e-5)
    assert torch.equal(stats.argmax, torch.where(scored, logits.argmax(-1), -1))


def test_no_mask_scores_every_position():
    model = tiny_model("llama")
    input_ids = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_lp, _ = reference(model, input_ids)
        stats = causal_lm_logprobs(model, input_ids)
    assert stats.entropy is None
    torch.testing.assert_close(stats.logprobs.double(), ref_lp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head_bias", [False, True])
def test_on_head_sees_the_operands_of_every_position(head_bias):
    """on_head gets the head's operands once, before the vocabulary pass: they give the model's own logits at
    every position (a mean logit from them equals the mean of those logits)."""
    model = tiny_model("qwen2", head_bias=head_bias)
    input_ids = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(6))
    seen = []
    with torch.no_grad():
        causal_lm_logprobs(model, input_ids, on_head=lambda *operands: seen.append(operands))
        logits = model(input_ids=input_ids).logits.double()
    (hidden, weight, bias, low_rank), = seen
    assert hidden.shape[:2] == (2, 7) and low_rank is None and (bias is not None) == head_bias
    z = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    torch.testing.assert_close(z, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start", [0, 1], ids=["from-0", "from-1"])
@pytest.mark.parametrize("arch", ["qwen2", "cohere"])
def test_packed_rows_equal_separate_sequences(arch, start):
    """position_ids restarting at 0 (or at 1, as DataCollatorWithFlattening(position_ids_start=1) writes them:
    transformers splits a row wherever the ids do not step by 1) pack sequences into one row; each equals its own
    unpacked run (rotary positions: a shift changes nothing), and the position predicting the next sequence's first
    token is not scored."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(7)
    lengths = [5, 4, 6]
    seqs = [torch.randint(1, V, (1, n), generator=g) for n in lengths]
    input_ids = torch.cat(seqs, 1)
    position_ids = torch.cat([torch.arange(n) + start for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        stats = causal_lm_logprobs(model, input_ids, position_ids=position_ids, entropy=True)
        expected_lp, expected_ent = [], []
        for s in seqs:
            lp, ent = reference(model, s)
            expected_lp += [lp, torch.zeros(1, 1, dtype=torch.float64)]
            expected_ent += [ent, torch.zeros(1, 1, dtype=torch.float64)]
    expected_lp = torch.cat(expected_lp[:-1], 1)
    expected_ent = torch.cat(expected_ent[:-1], 1)
    torch.testing.assert_close(stats.logprobs.double(), expected_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.entropy.double(), expected_ent, atol=1e-5, rtol=0)


def test_cu_seqlens_packed_row_equals_separate_sequences():
    """cu_seqlens gives the same packed row as position_ids, each sequence equal to its own unpacked
    run; tokens past cu_seqlens[-1] (trailing padding) are not scored."""
    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(8)
    lengths = [5, 4, 6]
    seqs = [torch.randint(1, V, (1, n), generator=g) for n in lengths]
    input_ids = torch.cat(seqs + [torch.zeros(1, 3, dtype=torch.long)], 1)  # 3 padding tokens at the end
    cu_seqlens = torch.tensor([0, 5, 9, 15], dtype=torch.int32)
    with torch.no_grad():
        stats = causal_lm_logprobs(model, input_ids, cu_seqlens=cu_seqlens, entropy=True)
        expected = []
        for s in seqs:
            expected += [reference(model, s)[0], torch.zeros(1, 1, dtype=torch.float64)]
    expected = torch.cat(expected + [torch.zeros(1, 2, dtype=torch.float64)], 1)
    torch.testing.assert_close(stats.logprobs.double(), expected, atol=1e-5, rtol=0)
    assert torch.count_nonzero(stats.entropy[0, 14:]) == 0
    from fastalign.integrations.hf import packed_position_ids

    pos, past_end = packed_position_ids(cu_seqlens, 18)
    assert pos.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8]]  # padding continues the last
    assert past_end[0].tolist() == [False] * 15 + [True] * 3


@pytest.mark.parametrize("kw,err,match", [
    (dict(cu_seqlens=torch.tensor([0, 4, 3])), ValueError, "cu_seqlens must start at 0, never decrease"),
    (dict(cu_seqlens=torch.tensor([1, 6])), ValueError, "cu_seqlens must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 7])), ValueError, "end at most at the 6"),
    (dict(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 6]), position_ids=torch.arange(6)[None]), ValueError, "not both"),
    # a 2-D mask let the packed sequences attend to each other
    (dict(cu_seqlens=torch.tensor([0, 4]), attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])), ValueError,
     "cu_seqlens or attention_mask, not both"),
])
def test_cu_seqlens_refusals(kw, err, match):
    model = tiny_model("qwen2")
    with pytest.raises(err, match=match):
        causal_lm_logprobs(model, torch.ones(1, 6, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match="one packed row"):
        causal_lm_logprobs(model, torch.ones(2, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 6]))


_IDS = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])


@pytest.mark.parametrize("kw, error, name", [
    (dict(labels=_IDS.float()), TypeError, "labels"),  # float / bool labels gave float / bool targets
    (dict(labels=_IDS > 4), TypeError, "labels"),
    (dict(labels=_IDS[0]), ValueError, "labels"),  # [T] labels: IndexError
    (dict(ignore_index=-99.5), TypeError, "ignore_index"),  # ignored nothing
    (dict(response_mask=torch.ones(2, 3)), ValueError, "response_mask"),
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.complex64)), TypeError, "attention_mask"),
    (dict(input_ids=_IDS.float()), TypeError, "input_ids"),
    (dict(input_ids=_IDS.tolist()), TypeError, "input_ids"),
])
def test_next_token_targets_refuses_a_bad_argument_by_name(kw, error, name):
    from fastalign.integrations.hf import next_token_targets

    kw = dict(dict(input_ids=_IDS, labels=_IDS), **kw)
    with pytest.raises(error, match=f"^{name} "):
        next_token_targets(kw.pop("input_ids"), **kw)


@pytest.mark.parametrize("cu_seqlens, total, error, name", [
    ([0, 2, 5], 6, TypeError, "cu_seqlens"),  # a list: AttributeError
    (torch.tensor([], dtype=torch.long), 6, ValueError, "cu_seqlens"),  # IndexError
    (torch.tensor([0.0, 2.0, 5.0]), 6, TypeError, "cu_seqlens"),
    (torch.tensor([[0, 2, 5]]), 6, ValueError, "cu_seqlens"),
    (torch.tensor([0, 2, 5]), 6.0, TypeError, "total"),
    (torch.tensor([0, 2, 5]), -1, ValueError, "total"),
])
def test_packed_position_ids_refuses_a_bad_argument_by_name(cu_seqlens, total, error, name):
    from fastalign.integrations.hf import packed_position_ids

    with pytest.raises(error, match=f"^{name} "):
        packed_position_ids(cu_seqlens, total)


@pytest.mark.parametrize("arch,tied,head_bias", [("gemma2", False, True), ("cohere", True, False),
                                                 ("qwen2", False, False)])
def test_gradients_match_loss_through_model_logits(arch, tied, head_bias):
    """Gradients of every parameter through the log-probs, the entropy and the mean logit (before the temperature:
    a label-smoothing term) equal those through the model's own logits."""
    model = tiny_model(arch, tied=tied, head_bias=head_bias).train()
    input_ids, attention_mask, labels = batch(seed=11)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    w, w_mean = torch.randn(2, *scored.shape, generator=torch.Generator().manual_seed(2))

    def loss_of(lp, ent, mean):
        return (torch.where(scored, lp * w + 0.3 * ent + mean * w_mean, 0.0)).sum()

    z = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logp = torch.log_softmax(z / 0.9, -1)
    ref_lp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    ref_mean = z.mean(-1)
    ref_grads = torch.autograd.grad(loss_of(ref_lp, -(logp.exp() * logp).sum(-1), ref_mean),
                                    list(model.parameters()))

    stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, entropy=True, mean_logit=True,
                               temperature=0.9)
    torch.testing.assert_close(stats.mean_logit, torch.where(scored, ref_mean, 0.0).detach(), atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(loss_of(stats.logprobs, stats.entropy, stats.mean_logit), list(model.parameters()))
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_unscored_rows_have_no_gradient():
    model = tiny_model("llama")
    input_ids, attention_mask, labels = batch(seed=4)
    hidden_grads = []

    def keep_grad(module, args, out):
        out.last_hidden_state.register_hook(hidden_grads.append)

    handle = model.get_decoder().register_forward_hook(keep_grad)
    try:
        stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)
        stats.logprobs.sum().backward()
    finally:
        handle.remove()
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    assert (stats.logprobs[~scored] == 0).all()
    dh = hidden_grads[0][:, :-1]
    assert (dh[~scored] == 0).all() and (dh[scored].abs().sum(-1) > 0).all()


def test_fp32_head_with_bf16_autocast():
    """An fp32 lm_head under a bf16 autocast runs as the model's own nn.Linear does (bf16 inputs)."""
    model = tiny_model("qwen2")
    input_ids, attention_mask, labels = batch(seed=6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)
    assert logits.dtype == torch.bfloat16
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    ref = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    # the model's logits are rounded to bf16 (~0.4% at |z| ~ 8); ours accumulate in fp32
    check(stats.logprobs, ref, scored, 0.15)


def test_fp32_model_under_bf16_autocast_rounds_the_head_operands_to_bf16():
    """An fp32 model under a bf16 autocast: its nn.Linear head multiplies the hidden states and the weight rounded
    to bf16 (accumulating in fp32), so the log-probs equal float64 log-softmax of those rounded operands, not of
    the fp32 ones (which differ by up to ~0.05 nats here)."""
    model = tiny_model("qwen2")
    input_ids, attention_mask, labels = batch(seed=6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)
    h, w = hidden[:, :-1].to(torch.bfloat16).double(), model.lm_head.weight.to(torch.bfloat16).double()
    ref = torch.log_softmax(h @ w.T, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    unrounded = torch.log_softmax(hidden[:, :-1].double() @ model.lm_head.weight.double().T, -1)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    assert (unrounded.gather(-1, input_ids[:, 1:, None])[..., 0] - ref)[scored].abs().max() > 1e-2
    check(stats.logprobs, ref, scored, 1e-4)


def test_head_and_body_dtypes_differing_outside_autocast_raise_naming_the_model():
    """A bf16 body with an fp32 head, outside autocast and without head_dtype: a TypeError naming the model's head
    and hidden states (not the internal arguments of the vocabulary pass), with the two ways out."""
    model = tiny_model("qwen2").to(torch.bfloat16)
    model.lm_head.float()
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(4))
    message = r"^model: the output head weight is torch.float32 but the hidden states are torch.bfloat16; run under"
    with torch.no_grad(), pytest.raises(TypeError, match=message):
        causal_lm_logprobs(model, ids)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-model", "bf16-autocast"])
def test_head_dtype_fp32_runs_the_head_in_fp32(autocast):
    """head_dtype=torch.float32 (TRL's cast_lm_head_to_fp32): the hidden states and the head cast up, whatever the
    body's dtype or the autocast's; equal to float64 log-softmax of the fp32 head on those hidden states, with
    gradients to the head and the bf16 body."""
    model = tiny_model("qwen2")
    if not autocast:
        model = model.to(torch.bfloat16)
        model.lm_head.float()
    input_ids, attention_mask, labels = batch(seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, head_dtype=torch.float32)
    assert hidden.dtype == (torch.float32 if autocast else torch.bfloat16)  # the final norm's output
    logp = torch.log_softmax(hidden[:, :-1].double() @ model.lm_head.weight.double().T, -1)
    ref = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    check(stats.logprobs, ref, scored, 1e-5)
    stats.logprobs.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32 and model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_head_transform_table_and_refusals():
    def cfg(name, **fields):
        return SimpleNamespace(model_type=name, **fields)

    assert head_transform(cfg("gemma2", final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert head_transform(cfg("cohere", logit_scale=0.0625)) == (0.0625, None)
    assert head_transform(cfg("granite", logits_scaling=8.0)) == (0.125, None)
    # Cohere Compass's model scales by 1 where its config leaves logit_scale None (its default)
    assert head_transform(transformers.AutoConfig.for_model("cohere_compass_text")) == (1.0, None)
    assert head_transform(cfg("cohere_compass_text", logit_scale=0.5)) == (0.5, None)
    assert head_transform(cfg("llama")) == (1.0, None)
    assert "gemma3_text" in HEAD_TRANSFORMS
    with pytest.raises(ValueError, match="model_type 'mystery'"):
        head_transform(cfg("mystery"))

    model = tiny_model("llama")
    ids = torch.randint(1, V, (1, 6))
    for given in (dict(labels=ids, response_mask=torch.ones_like(ids)), dict(labels=ids, shift_labels=ids),
                  dict(response_mask=torch.ones_like(ids), shift_labels=ids)):
        with pytest.raises(ValueError, match="one of labels, response_mask and shift_labels"):
            causal_lm_logprobs(model, ids, **given)
    with pytest.raises(ValueError, match="shift_labels must have the shape"):
        causal_lm_logprobs(model, ids, shift_labels=ids[:, 1:])
    with pytest.raises(TypeError, match="shift_labels"):
        causal_lm_logprobs(model, ids, shift_labels=ids.float())
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_logprobs(model, ids, torch.ones(1, 5))
    with pytest.raises(ValueError, match="both or neither"):
        causal_lm_logprobs(model, ids, logit_scale=1.0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        causal_lm_logprobs(model, ids[:, :1])
    with pytest.raises(ValueError, match="logits_to_keep"):
        causal_lm_logprobs(model, ids, logits_to_keep=1)


def test_unknown_architecture_with_stated_head_transform(monkeypatch):
    """An unlisted model_type runs once the caller states its head transform: per call, or once for every call
    with register_head_transform."""
    import fastalign.integrations.hf as hf
    from fastalign.integrations.hf import head_transforms

    monkeypatch.setattr(head_transforms, "HEAD_TRANSFORMS", dict(head_transforms.HEAD_TRANSFORMS))
    monkeypatch.setattr(head_transforms, "_STATED", set())
    model = tiny_model("cohere")
    input_ids, attention_mask, labels = batch(seed=8)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    with torch.no_grad():
        ref_lp, _ = reference(model, input_ids, attention_mask)
        model.config.model_type = "my_cohere"
        with pytest.raises(ValueError, match="my_cohere.*register_head_transform"):
            causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)
        stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, logit_scale=0.4, softcap=None)
        check(stats.logprobs, ref_lp, scored, 1e-5)
        hf.register_head_transform("my_cohere", logit_scale=model.config.logit_scale)
        check(causal_lm_logprobs(model, input_ids, attention_mask, labels=labels).logprobs, ref_lp, scored, 1e-5)
    with pytest.raises(ValueError, match="already has a head transform .read from its config"):
        hf.register_head_transform("llama")
    hf.register_head_transform("my_cohere", logit_scale=0.5)  # stating it again replaces the earlier statement
    assert head_transform(model.config) == (0.5, None)
    with pytest.raises(ValueError, match="softcap"):
        hf.register_head_transform("mine", softcap=0.0)
    with pytest.raises(ValueError, match="model_type must be a non-empty string"):
        hf.register_head_transform("")


_ENCODER_SIZES = dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      is_decoder=True)


@pytest.mark.parametrize("arch", ["roberta", "bert", "electra"])
def test_an_output_head_behind_a_transform_of_its_own_raises(monkeypatch, arch):
    """RoBERTa's and BERT's LM heads run a dense layer, an activation and a norm before the linear layer that
    ``get_output_embeddings()`` returns (ELECTRA's generator a module beside its head): with a stated transform, or
    one registered for the type, they were scored through that layer alone, log-probs off by up to 0.5 with no
    error. Such a model raises, naming the modules beside its body and head."""
    import fastalign.integrations.hf as hf
    from fastalign.integrations.hf import head_transforms

    monkeypatch.setattr(head_transforms, "HEAD_TRANSFORMS", dict(head_transforms.HEAD_TRANSFORMS))
    monkeypatch.setattr(head_transforms, "_STATED", set())
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(arch, **_ENCODER_SIZES, **({"embedding_size": 32} if arch == "electra"
                                                                     else {}))).eval()
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(3))
    beside = {"roberta": r"\['lm_head'\]", "bert": r"\['cls'\]", "electra": r"\['generator_predictions'\]"}[arch]
    with torch.no_grad():
        with pytest.raises(ValueError, match=rf"holds {beside} beside its body and its output head"):
            causal_lm_logprobs(model, ids, logit_scale=1.0, softcap=None)
        hf.register_head_transform(arch)
        with pytest.raises(ValueError, match="cannot score this architecture"):
            causal_lm_logprobs(model, ids)


@pytest.mark.parametrize("arch", ["mamba", "falcon_mamba"])
def test_a_body_kept_in_fp32_before_a_bf16_head_is_cast_as_the_model_casts_it(arch):
    """Mamba's body keeps its residual stream in fp32 (``residual_in_fp32``) and its forward casts the last hidden
    states to the bf16 head, ``lm_head(h.to(lm_head.weight.dtype))``: scored so (it raised a TypeError suggesting a
    cast the model already had). Equal to float64 log-softmax of the bf16 head on the bf16 hidden states."""
    model = _auto_model(arch).to(torch.bfloat16)
    input_ids, attention_mask, labels = batch(seed=9)
    attention_mask = torch.ones_like(attention_mask)
    labels = input_ids.clone()
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
        assert hidden.dtype == torch.float32
        stats = causal_lm_logprobs(model, input_ids, labels=labels)
    logp = torch.log_softmax(hidden[:, :-1].bfloat16().double() @ model.lm_head.weight.double().T, -1)
    ref = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(stats.logprobs.double(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config, field", [(transformers.CohereConfig(logit_scale=None), "logit_scale"),
                                           (transformers.Gemma2Config(final_logit_softcapping=0.0),
                                            "final_logit_softcapping"),
                                           (transformers.GraniteConfig(logits_scaling=0.0), "logits_scaling")])
def test_a_head_transform_field_the_forward_cannot_use_is_named(config, field):
    """A config whose transform field would make the model's own forward fail or give NaN (a None scale, a softcap
    of 0, a scaling of 0 divided by) raises naming ``config.<field>``; the errors named an argument the caller never
    passed (``softcap``), or none (``float(None)``)."""
    with pytest.raises(ValueError, match=rf"config\.{field} = "):
        head_transform(config)


_SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, n_embd=32, n_layer=2, n_head=4, d_model=32, ffn_dim=64,
              max_position_embeddings=64, n_positions=64, word_embed_proj_dim=32, pad_token_id=0,
              moe_intermediate_size=16, num_experts=4, num_local_experts=4, num_experts_per_tok=2)
#: Architectures listed with a plain head (logits = lm_head(h)) -> the config fields of a tiny model beside
#: _SMALL; each checked against its own logits, and for packed rows, below.
PLAIN_ARCHS = {
    **{arch: {} for arch in (
        "mistral", "qwen3", "qwen3_moe", "phi3", "gemma", "gpt2", "gpt_neox", "opt", "phi", "phimoe", "olmo", "olmo3",
        "olmoe", "smollm3", "gpt_oss", "stablelm", "glm", "glm4", "exaone4", "seed_oss", "nemotron", "ministral",
        "helium", "internlm3", "persimmon", "jetmoe", "mpt", "bloom", "olmo2", "starcoder2", "mixtral", "qwen2_moe",
        "deepseek_v4", "glm4_moe", "ministral3", "ernie4_5", "ernie4_5_moe", "exaone_moe", "hunyuan_v1_dense",
        "hunyuan_v1_moe", "minimax_m2", "mimo_v2_flash", "solar_open", "apertus", "arcee", "bitnet", "cwm", "diffllama",
        "doge", "flex_olmo", "jais2", "mellum", "gpt_bigcode", "gpt_neo", "mamba", "falcon_mamba", "nemotron_h",
        "afmoe", "falcon", "exaone", "ctrl", "gpt_neox_japanese", "olmo_hybrid", "minicpm5_moe",
        "param2moe", "sarvam_moe", "apertus1p5_text", "aria_text", "minimax_m3_vl_text", "hy_v3", "hy_v4", "laguna",
        "lfm3", "iquestcoder", "ergo", "flint", "hrm_text", "kolibri1", "lara_mini", "biogpt", "cpmant", "gpt-sw3",
        "minimax", "xglm")},
    **{arch: dict(rotary_dim=8) for arch in ("gptj", "codegen")},
    "dots1": dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "bamba": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=8, attn_layer_indices=[1]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=8, mamba_dt_rank=8),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], mamba_d_state=16, mamba_headdim=16, n_mamba_heads=4,
                   num_mem_blocks=1, hybrid_layer_ids=[1]),
    **{arch: MLA for arch in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa",
                               "longcat_flash", "axk1", "axk2", "youtu", "sarvam_mla")},
    "dots3_note_text": dict(num_key_value_heads=4),
    "zaya": dict(num_experts_per_tok=1),
    # linear attention beside latent attention (Kimi-Linear, Bailing hybrid), beside indexed attention (Qwen4-Exp)
    "kimi_linear": dict(MLA, layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                        num_experts_per_token=2),
    "bailing_hybrid": dict(MLA, layer_types=["linear_attention", "full_attention"], num_experts_per_token=2,
                           layer_group_size=2),
    # its sparse layers are "indexed_attention" from transformers 5.18, "qwen_sparse_attention" before
    "qwen4_exp_text": dict(DELTANET, layer_types=["linear_attention", "indexed_attention" if TRANSFORMERS >= Version(
        "5.18") else "qwen_sparse_attention"], indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
                           indexer_budget=4, indexer_compress_ratio=2),
    **{arch: DELTANET for arch in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")},
    "llama4_text": dict(intermediate_size_mlp=64, num_local_experts=2),
    "lfm2": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]),
    "mamba2": dict(num_heads=4, head_dim=16, n_groups=1),
    # Phi-4-multimodal's vision and audio encoders, one tiny layer each (its text model scores text alone)
    "phi4_multimodal": dict(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=28, crop_size=28, patch_size=14,
                                               image_token_id=V - 1),
                            audio_config=dict(hidden_size=16, intermediate_size=32, num_blocks=1, num_attention_heads=2,
                                              ext_pw_out_channel=16, depthwise_separable_out_channel=16,
                                              nemo_conv_channels=16, audio_token_id=V - 2)),
}
#: Inkling's attention and experts, tiny
INKLING = dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=8,
               n_routed_experts=4, rel_extent=16, d_rel=4)
#: Architectures whose head transforms its logits -> (the config fields of a tiny model, the transform's own field
#: off its default, and the (logit_scale, softcap) expected).
TRANSFORM_ARCHS = {
    "gemma3n_text": (dict(gemma_layers(V), final_logit_softcapping=3.0, hidden_size_per_layer_input=8,
                          activation_sparsity_pattern=[0.0, 0.0], laurel_rank=4, altup_num_inputs=2), (1.0, 3.0)),
    "gemma4_text": (gemma4(V), (1.0, 3.0)),
    "gemma4_unified_text": (gemma4(V), (1.0, 3.0)),
    "vaultgemma": (dict(final_logit_softcapping=3.0), (1.0, 3.0)),
    "nanochat": (dict(final_logit_softcapping=3.0), (1.0, 3.0)),
    "recurrent_gemma": (dict(block_types=["recurrent", "attention"], lru_width=32, attention_window_size=16,
                             logits_soft_cap=3.0), (1.0, 3.0)),
    **{arch: (dict(logit_scale=0.4), (0.4, None)) for arch in ("cohere2", "cohere2_moe")},
    **{arch: (dict(logits_scaling=2.5), (0.4, None)) for arch in ("granitemoe", "granitemoeshared", "granite_swa",
                                                                  "granitemoe_swa")},
    "minicpm3": (dict(MLA, dim_model_base=8), (0.25, None)),  # logits_scaling = hidden_size / dim_model_base
    "hyperclovax": (dict(logits_scaling=2.5), (2.5, None)),
    "falcon_h1": (dict(lm_head_multiplier=0.5, mamba_chunk_size=8), (0.5, None)),
    # Inkling: a head padded past the vocabulary (its forward keeps the first unpadded_vocab_size logits), hidden
    # states divided by the muP width multiplier; Inkling 2 softcaps an unpadded head
    "inkling_text": (dict(INKLING, vocab_size=V + 6, unpadded_vocab_size=V, logits_mup_width_multiplier=4.0),
                     (0.25, None)),
    **{arch: (dict(INKLING, unpadded_vocab_size=V, final_logit_softcapping=3.0), (1.0, 3.0))
       for arch in ("inkling2_text", "inkling2_loop_text")},
    "cohere_compass_text": (dict(logit_scale=0.4, rope_parameters={
        layer: dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])  # for a head of 8 (5.17-5.20)
        for layer in ("full_attention", "sliding_attention")}),
        (0.4, None)),
}
#: Vision-language models, as AutoModelForCausalLM builds them (a body with its vision tower, the language model's
#: head) -> (the fields of a tiny text config, the transform expected): Gemma 3's forward applies no softcap
#: whatever its text config says, Gemma 4's applies its text config's.
COMPOSITE_ARCHS = {
    "gemma3": (dict(final_logit_softcapping=3.0), (1.0, None)),
    "gemma4": (gemma4(V), (1.0, 3.0)),
    "gemma4_unified": (gemma4(V), (1.0, 3.0)),
    **{arch: (text, (1.0, None)) for arch, (_, text) in VISION.items()},
    # the text fields of a transform, off their defaults
    "cohere2_vision": (dict(logit_scale=0.4), (1.0, None)),  # its forward ignores the text config's scale
    "aya_vision": (dict(logit_scale=0.4), (0.4, None) if TRANSFORMERS >= Version("5.25") else (1.0, None)),
    # PaliGemma's forward applies its text config's softcap from transformers 5.23, Aya Vision's scale from 5.25
    "paligemma": (dict(final_logit_softcapping=3.0), (1.0, 3.0) if TRANSFORMERS >= Version("5.23") else (1.0, None)),
    "granite_docling": (dict(logits_scaling=4.0), (0.25, None)),  # its text model's 1 / logits_scaling
}
#: Listed bodies that carry a recurrent state (state-space, linear-attention or convolution layers): their packed
#: rows raise. Every other listed body splits packed rows at restarting position ids.
RECURRENT_ARCHS = {"mamba", "mamba2", "falcon_mamba", "nemotron_h", "lfm2", "qwen3_next", "qwen3_5_text",
                   "qwen3_5_moe_text", "falcon_h1", "olmo_hybrid", "lfm3", "lara_mini", "lfm2_moe", "bamba", "jamba",
                   "zamba2", "recurrent_gemma", "qwen3_5", "qwen3_5_moe", "lfm2_vl", "minimax", "zaya",
                   "kimi_linear", "bailing_hybrid", "qwen4_exp_text", "inkling_text", "inkling2_text",
                   "inkling2_loop_text"}
#: Bodies that split packed rows from a transformers release on (before it their causal mask ignores the restarts).
SPLITS_PACKED_SINCE = {"falcon": "5.24", "doge": "5.18", "llama4_text": "5.23"}
#: Vision-language bodies that do not split packed rows (their rotary positions and mask ignore the restarts).
UNSPLIT_COMPOSITES = {"qwen2_vl", "qwen2_5_vl", "glm4v", "glm4v_moe", "glm46v", "paligemma", "glm_ocr", "paddleocr_vl"}


def _known(arch):
    """Skips where the installed transformers has no ``arch`` (an architecture added in a later release)."""
    if arch not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no model_type {arch!r}")


def _small(config) -> dict:
    """The sizes of _SMALL that ``config`` (an architecture's default config, or its text config) has."""
    fields = config.to_dict()
    return {k: v for k, v in _SMALL.items() if k in fields}


def _built(config, seed, model_class=transformers.AutoModelForCausalLM):
    """``model_class``'s model of ``config`` in fp32, eval mode, its output head drawn at unit scale (``seed``)."""
    torch.manual_seed(seed)
    model = model_class.from_config(config).float().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1.0)
    return model


def _auto_model(arch, seed=0, **extra):
    """A tiny model of any listed architecture from its AutoConfig: the sizes of _SMALL where its config has them,
    and ``extra``, given to the config's constructor (so the fields derived from them follow)."""
    _known(arch)
    small = _small(transformers.AutoConfig.for_model(arch))
    return _built(transformers.AutoConfig.for_model(arch, **{**small, **extra}), seed)


def _composite_model(arch, text_fields, seed=0, **extra):
    """A tiny vision-language model (its ForConditionalGeneration class): the sizes of _SMALL in its text config,
    with ``text_fields``; ``extra`` (a vision tower) given to the config's constructor."""
    _known(arch)
    text_config = transformers.AutoConfig.for_model(arch).get_text_config()
    # its model_type, as a saved config has it (transformers 5.17's Aria config reads a text config dict only so)
    text = {**_small(text_config), **text_fields, "model_type": text_config.model_type}
    config = transformers.AutoConfig.for_model(arch, text_config=text, **extra)
    return _built(config, seed, transformers.AutoModelForImageTextToText)


def _check_own_logits_and_packed_rows(arch, model, transform):
    """The model's padded rows score as its own logits; its packed rows raise where its body is recurrent (or does
    not split them) and otherwise score each sequence as its own run."""
    assert head_transform(model.config) == pytest.approx(transform)
    input_ids, attention_mask, labels = batch(seed=3)
    with torch.no_grad():
        ref_lp, ref_ent = reference(model, input_ids, attention_mask)
        stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, entropy=True)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    check(stats.logprobs, ref_lp, scored, 1e-4)
    check(stats.entropy, ref_ent, scored, 1e-4)
    seqs, input_ids, position_ids = _packed_row([4, 5, 3])
    with torch.no_grad():
        if arch in RECURRENT_ARCHS or arch in UNSPLIT_ARCHS or arch in UNSPLIT_COMPOSITES or (
                TRANSFORMERS < Version(SPLITS_PACKED_SINCE.get(arch, "0"))):
            with pytest.raises(ValueError, match=f"position_ids restart .*model_type '{arch}'"):
                causal_lm_logprobs(model, input_ids, position_ids=position_ids)
            return
        got = causal_lm_logprobs(model, input_ids, position_ids=position_ids).logprobs
        torch.testing.assert_close(got.double(), _separately(model, seqs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", list(PLAIN_ARCHS))
def test_plain_head_architectures_match_their_own_logits(arch):
    _check_own_logits_and_packed_rows(arch, _auto_model(arch, **PLAIN_ARCHS[arch]), (1.0, None))


@pytest.mark.parametrize("arch", list(TRANSFORM_ARCHS))
def test_head_transform_architectures_match_their_own_logits(arch):
    """Each transform's field is set off its default (1.0 or off), so a transform read wrongly, or a plain head
    assumed, fails."""
    fields, transform = TRANSFORM_ARCHS[arch]
    _check_own_logits_and_packed_rows(arch, _auto_model(arch, **fields), transform)


@pytest.mark.parametrize("arch", list(COMPOSITE_ARCHS))
def test_vision_language_architectures_match_their_own_logits(arch):
    """Text-only rows of a vision-language model score as its own logits (its body the module its forward calls),
    with the head transform its forward applies, not the one its text config names."""
    fields, transform = COMPOSITE_ARCHS[arch]
    vision = gemma3_vision(V) if arch == "gemma3" else VISION[arch][0] if arch in VISION else {}
    model = _composite_model(arch, fields, **vision)
    assert model.config.get_text_config() is not model.config
    _check_own_logits_and_packed_rows(arch, model, transform)


def _gemma3n_model(softcap):
    """A tiny Gemma 3n as AutoModelForCausalLM loads it (Gemma3nForConditionalGeneration, audio tower included),
    its vision tower a stub: transformers builds that tower with timm, which text-only rows never reach."""
    _known("gemma3n")
    text = dict(vocab_size=V, vocab_size_per_layer_input=V, hidden_size=32, hidden_size_per_layer_input=8,
                intermediate_size=[64, 64], num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, laurel_rank=4, activation_sparsity_pattern=[0.0, 0.0], num_kv_shared_layers=0,
                layer_types=["sliding_attention", "full_attention"], altup_num_inputs=2, sliding_window=8,
                final_logit_softcapping=softcap, max_position_embeddings=64)
    config = transformers.AutoConfig.for_model(
        "gemma3n", text_config=text, vision_config=dict(hidden_size=16, vocab_size=8, vocab_offset=V),
        audio_config=dict(hidden_size=16, vocab_size=8, vocab_offset=V + 8, conf_num_attention_heads=2,
                          conf_num_hidden_layers=1, sscp_conv_channel_size=(4, 4), input_feat_size=8))
    from_config = transformers.AutoModel.from_config

    def tower(config, *args, **kwargs):
        if config.model_type == "gemma3n_vision":
            stub = torch.nn.Module()
            stub.config = config
            return stub
        return from_config(config, *args, **kwargs)

    with mock.patch.object(transformers.AutoModel, "from_config", side_effect=tower):
        return _built(config, 0, transformers.AutoModelForImageTextToText)


def test_gemma3n_matches_its_own_logits():
    """Gemma 3n as its checkpoints load (model_type "gemma3n", not the text-only "gemma3n_text"): its forward
    applies its text config's softcap. It raised for want of a head transform."""
    model = _gemma3n_model(softcap=3.0)
    assert model.config.model_type == "gemma3n"
    _check_own_logits_and_packed_rows("gemma3n", model, (1.0, 3.0))


def test_vision_language_model_under_peft():
    """A LoRA adapter on a vision-language model's attention and head: its body is found under the PEFT wrapper
    (the base model's, adapters in place), and the log-probs equal the adapted model's own logits."""
    import peft
    model = _composite_model("gemma3", {}, **gemma3_vision(V))
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"],
                                                       init_lora_weights=False)).eval()
    input_ids, attention_mask, labels = batch(seed=6)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    with torch.no_grad():
        ref_lp, _ = reference(model, input_ids, attention_mask)
        with model.disable_adapter():
            base_lp, _ = reference(model, input_ids, attention_mask)
        check(causal_lm_logprobs(model, input_ids, attention_mask, labels=labels).logprobs, ref_lp, scored, 1e-4)
    assert (ref_lp - base_lp)[scored].abs().max() > 1e-2  # the adapters change the scores


def _image_inputs(arch, model, pixels):
    """``(input_ids, attention_mask, labels, vision inputs)``: rows with an image after the left padding of row 1
    (Gemma 3: four image tokens; Qwen2.5-VL: a 2x2 grid of patches merged into one token between its vision
    start and end tokens), the image's pixels ``pixels`` (a generator's draws), the tokens after it scored."""
    input_ids, attention_mask, labels = batch(seed=5)
    config = model.config
    if arch == "gemma3":
        input_ids[:, 5:9] = config.image_token_id
        vision = dict(pixel_values=torch.randn(3, 3, 28, 28, generator=pixels))
    else:
        input_ids[:, 5:8] = torch.tensor([config.vision_start_token_id, config.image_token_id,
                                          config.vision_end_token_id])
        patch = config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2
        vision = dict(pixel_values=torch.randn(3 * 4, 3 * patch, generator=pixels),
                      image_grid_thw=torch.tensor([[1, 2, 2]] * 3))
    labels[:, :9] = -100
    return input_ids, attention_mask, labels, vision


def image_model(arch):
    """A tiny Gemma 3 (its image projection drawn: initialised to zeros, every image would give the same, zero,
    features) or Qwen2.5-VL (image tokens between its vision start and end tokens) for :func:`_image_inputs`."""
    if arch == "gemma3":
        model = _composite_model("gemma3", {}, **gemma3_vision(V))
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 1.0)
        return model
    tower, text = VISION[arch]
    return _composite_model(arch, text, **tower, image_token_id=V - 1, vision_start_token_id=V - 2,
                            vision_end_token_id=V - 3)


@pytest.mark.parametrize("arch", ["gemma3", "qwen2_5_vl"])
def test_vision_inputs_reach_the_vision_tower(arch):
    """Image tokens with pixel_values (and Qwen2.5-VL's image grid, which sets its multimodal rotary positions): the
    body merges the image features as the model's own forward does (other pixels give other log-probs, so vision
    inputs dropped on the way would fail)."""
    model = image_model(arch)
    pixels = torch.Generator().manual_seed(0)
    refs = []
    with torch.no_grad():
        for _ in range(2):
            input_ids, attention_mask, labels, vision = _image_inputs(arch, model, pixels)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, **vision).logits
            logp = torch.log_softmax(logits[:, :-1].double(), -1)
            refs.append(logp.gather(-1, input_ids[:, 1:, None])[..., 0])
            if len(refs) == 1:
                stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, **vision)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    check(stats.logprobs, refs[0], scored, 1e-4)
    assert (refs[0] - refs[1])[scored].abs().max() > 1e-2


def test_every_listed_architecture_is_checked_against_its_own_logits():
    """A model_type added to the table without a tiny model of it here fails (remote-code configs aside)."""
    own = {getattr(transformers, config_cls).model_type for config_cls, _, _ in ARCHS.values()}
    checked = set(PLAIN_ARCHS) | set(TRANSFORM_ARCHS) | set(UNSPLIT_ARCHS) | set(COMPOSITE_ARCHS) | own | {"gemma3n"}
    assert set(HEAD_TRANSFORMS) - checked == set()


def test_mpt_logit_scale_is_read_as_its_model_applies_it():
    """``MptConfig`` documents ``logit_scale`` ("scale the logits by this value"), which transformers'
    ``MptForCausalLM`` ignores (its logits are ``lm_head(h)``): with it set the log-probs still equal that model's
    own logits. MosaicML's original MPT code (``trust_remote_code``: its own config class, the same model_type)
    multiplies its logits by it: such a config with ``logit_scale`` set was scored as a plain head; it raises,
    naming the field (the caller states the scale)."""
    config = transformers.MptConfig(vocab_size=V, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, logit_scale=0.25)
    torch.manual_seed(0)
    model = transformers.MptForCausalLM(config).float().eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # logits of several units: a scale of 0.25 would show
    input_ids, attention_mask, labels = batch(seed=4)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    with torch.no_grad():
        ref_lp, _ = reference(model, input_ids, attention_mask)
        check(causal_lm_logprobs(model, input_ids, attention_mask, labels=labels).logprobs, ref_lp, scored, 1e-5)
        scaled = torch.log_softmax(0.25 * model(input_ids).logits[:, :-1].double(), -1)
        assert (scaled.gather(-1, input_ids[:, 1:, None])[..., 0] - ref_lp)[scored].abs().max() > 1.0

    class MPTConfig(transformers.PretrainedConfig):  # as MosaicML's configuration_mpt.MPTConfig
        model_type = "mpt"

    assert head_transform(MPTConfig()) == (1.0, None)  # no logit_scale: a plain head in either code
    remote = MPTConfig(logit_scale="inv_sqrt_d_model", d_model=32)
    assert known_head_transform(remote) is None
    with pytest.raises(ValueError, match=r"MPTConfig of model_type 'mpt'.*logit_scale='inv_sqrt_d_model'.*softcap=.*"
                                         r"register_head_transform\('mpt'"):
        head_transform(remote)


def test_remote_code_mpt_runs_once_its_transform_is_registered(monkeypatch):
    """A model_type "mpt" model from MosaicML's remote code (its own config class, logits times
    ``config.logit_scale``) raised with no way forward for the trainers, which take no per-call transform:
    ``register_head_transform("mpt", ...)`` refused a listed type. It now states the transform of those configs
    alone: such a model scores as its own logits, transformers' ``MptConfig`` keeps its plain head, ``packed_rows``
    raises and a second registration replaces the first."""
    import fastalign.integrations.hf as hf
    from fastalign.integrations.hf import head_transforms

    monkeypatch.setattr(head_transforms, "_UNDECIDED_STATED", {})
    config = transformers.MptConfig(vocab_size=V, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, logit_scale=0.25)

    class MPTConfig(transformers.PretrainedConfig):  # as MosaicML's configuration_mpt.MPTConfig
        model_type = "mpt"

    class RemoteMPT(transformers.MptForCausalLM):  # as MosaicML's MPTForCausalLM: logits times logit_scale
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * self.config.logit_scale
            return out

    torch.manual_seed(0)
    model = RemoteMPT(config).float().eval()
    remote = MPTConfig.__new__(MPTConfig)  # the same fields in a config class of its own
    remote.__dict__.update(config.__dict__)
    model.config = model.transformer.config = remote
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # logits of several units: a scale of 0.25 shows
    input_ids, attention_mask, labels = batch(seed=4)
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    with pytest.raises(ValueError, match=r"register_head_transform\('mpt'"):
        causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)
    with pytest.raises(ValueError, match="packed_rows"):
        hf.register_head_transform("mpt", logit_scale=0.25, packed_rows=True)
    hf.register_head_transform("mpt", logit_scale=0.25)
    assert head_transform(remote) == (0.25, None)
    assert head_transform(config) == (1.0, None)  # transformers' own MptForCausalLM ignores logit_scale
    with torch.no_grad():
        ref_lp, _ = reference(model, input_ids, attention_mask)
        check(causal_lm_logprobs(model, input_ids, attention_mask, labels=labels).logprobs, ref_lp, scored, 1e-5)
    hf.register_head_transform("mpt", logit_scale=0.5)
    assert head_transform(remote) == (0.5, None) and head_transform(config) == (1.0, None)


def test_dtensor_head_weight_is_gathered(tmp_path):
    """An FSDP2-style DTensor lm_head (sharded over a 1-rank mesh) gives the plain result and a DTensor grad."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    model = tiny_model("gemma2")
    input_ids, attention_mask, labels = batch(seed=9)
    stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)
    (grad_ref,) = torch.autograd.grad(stats.logprobs.sum(), [model.lm_head.weight])
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model.lm_head.weight = torch.nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]))
        sharded = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)
        (grad,) = torch.autograd.grad(sharded.logprobs.sum(), [model.lm_head.weight])
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(sharded.logprobs, stats.logprobs, atol=0, rtol=0)
    assert isinstance(grad, DTensor)
    torch.testing.assert_close(grad.full_tensor(), grad_ref, atol=1e-6, rtol=1e-6)


def test_fsdp2_mixed_precision_head_sharded_apart(tmp_path):
    """FSDP2 with bf16 mixed precision, the head sharded in a unit of its own (as verl and accelerate wrap an
    untied head): inside the root's forward the head is still an fp32 shard, which the fused head gathers and
    multiplies in the body's bf16, as FSDP2 casts it for the model's own forward (it raised TypeError). The
    log-probs and gradients are the model's own within bf16 rounding; the head's gradient reaches its fp32
    shard."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    input_ids, attention_mask, labels = batch(seed=4)
    scored = labels[:, 1:] != -100
    g = torch.randn(scored.shape, generator=torch.Generator().manual_seed(5))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grads, lps = [], []
        for fused in (False, True):
            model = tiny_model("qwen2")
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for unit in (*model.model.layers, model.lm_head, model):
                fully_shard(unit, mp_policy=policy)
            if fused:
                lp = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels).logprobs
            else:
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
                lp = torch.where(scored, logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0], 0.0)
            (lp * g).sum().backward()
            assert isinstance(model.lm_head.weight.grad, DTensor)
            assert model.lm_head.weight.grad.dtype == torch.float32
            lps.append(lp.detach())
            grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(lps[1], lps[0], atol=0.1, rtol=0)  # bf16 logits of order 10 in the model's
    for name in ("lm_head.weight", "model.embed_tokens.weight"):  # the model's own bf16 d(logits): relative norms
        assert (grads[1][name] - grads[0][name]).norm() < 0.02 * grads[0][name].norm(), name


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_backend_forward_and_gradient():
    """The same numbers through the Triton kernels (the GPU path; the interpreter on CPU)."""
    import fastalign

    model = tiny_model("gemma2", head_bias=True).train()
    input_ids, attention_mask, labels = batch(seed=12, T=8)
    expected = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, entropy=True)
    ref_grads = torch.autograd.grad((expected.logprobs + expected.entropy).sum(), list(model.parameters()))
    with fastalign.use_backend("triton"):
        stats = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, entropy=True)
        grads = torch.autograd.grad((stats.logprobs + stats.entropy).sum(), list(model.parameters()))
    torch.testing.assert_close(stats.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.entropy, expected.entropy, atol=1e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


#: Bodies that do not split packed rows: opt, gpt_oss, afmoe, biogpt and xglm build their causal mask without the
#: position ids, bloom, mpt and cpmant take none, granitemoehybrid also carries its Mamba state from one sequence
#: into the next.
UNSPLIT_ARCHS = {
    "opt": {}, "gpt_oss": {}, "afmoe": {}, "bloom": {}, "mpt": {}, "openai-gpt": {}, "rwkv": {}, "biogpt": {},
    "xglm": {}, "cpmant": {},
    # compressed attention over windows of the whole row (windows of 2 here, so that these short rows fill some)
    "deepseek_v4": dict(compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 2}),
    "granitemoehybrid": dict(layer_types=["full_attention", "linear_attention"], mamba_n_heads=4, mamba_d_head=16,
                             mamba_d_state=16, mamba_chunk_size=8, shared_intermediate_size=16, use_cache=False),
}


def _packed_row(lengths, seed=7):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, V, (1, n), generator=g) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return seqs, torch.cat(seqs, 1), position_ids


def _separately(model, seqs):
    """log p of each sequence run on its own, laid out as its packed row ([1, total-1], 0 at each boundary)."""
    parts = []
    for s in seqs:
        parts += [reference(model, s)[0], torch.zeros(1, 1, dtype=torch.float64)]
    return torch.cat(parts[:-1], 1)


#: Config fields that bound what a token sees (windows, chunks, top-k selections, compression windows), set short
#: so that a packed row of short sequences fills them: a body that applied them across the packed restarts would mix
#: the sequences (DeepSeek-V4's compression windows did).
SHORT_WINDOWS = dict(sliding_window=2, attention_chunk_size=2, index_topk=2, sparse_topk=2, window_size=2,
                     compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 2})
SPLITTING_ARCHS = {arch: fields for arch, fields in {**PLAIN_ARCHS, **{a: f for a, (f, _) in TRANSFORM_ARCHS.items()}}
                   .items() if arch not in RECURRENT_ARCHS and arch not in UNSPLIT_ARCHS}


@pytest.mark.parametrize("arch", list(SPLITTING_ARCHS))
def test_packed_rows_split_with_short_windows(arch):
    """Every listed body that splits packed rows still does when its windows, chunks and top-k selections are
    shorter than the sequences: each packed sequence scores as it does alone."""
    _known(arch)
    fields = SPLITTING_ARCHS[arch]
    if TRANSFORMERS < Version(SPLITS_PACKED_SINCE.get(arch, "0")):
        pytest.skip(f"{arch} splits packed rows from transformers {SPLITS_PACKED_SINCE[arch]}")
    defaults = transformers.AutoConfig.for_model(arch).to_dict()
    model = _auto_model(arch, **{**{k: v for k, v in SHORT_WINDOWS.items() if k in defaults}, **fields})
    seqs, input_ids, position_ids = _packed_row([6, 9, 7])
    with torch.no_grad():
        got = causal_lm_logprobs(model, input_ids, position_ids=position_ids).logprobs
        torch.testing.assert_close(got.double(), _separately(model, seqs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", list(UNSPLIT_ARCHS))
def test_packed_rows_refused_where_the_body_does_not_split_them(arch):
    """These bodies let each packed sequence attend to the ones before it (the model's own forward does too): the
    packed log-probs differed from the sequences scored alone by up to 0.13. Packed rows (cu_seqlens, or
    position_ids that restart, without an attention mask) raise now, before the body runs; position ids that
    do not restart, and padded rows, are scored as before."""
    model = _auto_model(arch, **UNSPLIT_ARCHS[arch])
    seqs, input_ids, position_ids = _packed_row([4, 5, 3])
    with torch.no_grad():
        assert not torch.allclose(reference(model, input_ids, position_ids=position_ids)[0][:, 4:8],
                                  _separately(model, seqs)[:, 4:8], atol=1e-4)  # the model's forward leaks
        with pytest.raises(ValueError, match=f"cu_seqlens: .*model_type '{arch}'"):
            causal_lm_logprobs(model, input_ids, cu_seqlens=torch.tensor([0, 4, 9, 12]))
        with pytest.raises(ValueError, match=f"position_ids restart .*model_type '{arch}'"):
            causal_lm_logprobs(model, input_ids, position_ids=position_ids)
        ids = seqs[1]
        ref_lp, _ = reference(model, ids)
        got = causal_lm_logprobs(model, ids, position_ids=torch.arange(ids.shape[1])[None]).logprobs
        torch.testing.assert_close(got.double(), ref_lp, atol=1e-4, rtol=0)
        input_ids, attention_mask, labels = batch(seed=3)
        ref_lp, _ = reference(model, input_ids, attention_mask)
        got = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels).logprobs
    check(got, ref_lp, (labels[:, 1:] != -100) & attention_mask[:, 1:].bool(), 1e-4)


@pytest.mark.parametrize("arch", ["opt", "gpt_oss", "afmoe"])
def test_padded_rows_with_position_ids_of_an_unsplit_body_are_scored(arch):
    """Only packed rows without an attention mask are refused for a body that does not split them: left- and
    right-padded rows with an attention mask and the position ids a trainer builds from it (``cumsum - 1``, which
    repeat over the padding) score as the model's own logits on the same inputs."""
    model = _auto_model(arch, **UNSPLIT_ARCHS[arch])
    input_ids, attention_mask, labels = batch(seed=3)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    assert (position_ids[:, 1:] - position_ids[:, :-1] != 1).any()
    with torch.no_grad():
        ref_lp, _ = reference(model, input_ids, attention_mask, position_ids=position_ids)
        got = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, position_ids=position_ids).logprobs
    check(got, ref_lp, (labels[:, 1:] != -100) & attention_mask[:, 1:].bool(), 1e-4)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_left_padding_with_generate_s_position_ids_scores_the_first_real_token(arch):
    """The position ids ``generate`` builds restart at 0 at a left-padded row's first real token: that restart
    follows padding, not another packed sequence, so the entry predicting it is scored when the labels say so
    (it was left at 0, without gradient), as without position ids."""
    model = _auto_model(arch, **UNSPLIT_ARCHS.get(arch, {}))
    input_ids, attention_mask, _ = batch(seed=3)
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # every real token scored, the first included
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    with torch.no_grad():
        ref_lp, _ = reference(model, input_ids, attention_mask, position_ids=position_ids)
        got = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, position_ids=position_ids).logprobs
    scored = (labels[:, 1:] != -100) & attention_mask[:, 1:].bool()
    assert scored[1, 3] and not attention_mask[1, 3]  # the left-padded row: padding predicts its first token
    check(got, ref_lp, scored, 1e-4)


def test_position_ids_with_a_gap_and_an_attention_mask_are_scored_as_the_model_scores_them():
    """With an attention_mask transformers attends across the whole row, whatever the position ids: ids that skip
    ahead (0, 1, 2, 5, 6, ...) start no sequence there, and every entry is scored as the model's own logits score it
    (without a mask the same ids would split the row, transformers' rule)."""
    model = tiny_model("qwen2")
    input_ids = torch.randint(1, V, (1, 8), generator=torch.Generator().manual_seed(4))
    attention_mask = torch.ones_like(input_ids)
    position_ids = torch.tensor([[0, 1, 2, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        ref_lp, _ = reference(model, input_ids, attention_mask, position_ids=position_ids)
        got = causal_lm_logprobs(model, input_ids, attention_mask, position_ids=position_ids).logprobs
        split = causal_lm_logprobs(model, input_ids, position_ids=position_ids).logprobs
    check(got, ref_lp, torch.ones_like(got, dtype=torch.bool), 1e-4)
    assert split[0, 2] == 0 and (split[0, 3:] != 0).all()  # no mask: a sequence starts at the skip


def test_one_row_of_position_ids_serves_every_row():
    """``position_ids [1, T]`` (transformers broadcasts it over the batch) was refused for its shape: it scores as
    the same ids repeated for every row, and as without position ids for right-padded rows."""
    model = tiny_model("llama")
    input_ids, attention_mask, labels = batch(seed=5)
    attention_mask[1, :4] = 1  # right padding only: arange is every row's position ids
    one_row = torch.arange(input_ids.shape[1])[None]
    with torch.no_grad():
        got = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, position_ids=one_row).logprobs
        every_row = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels,
                                       position_ids=one_row.expand(input_ids.shape[0], -1)).logprobs
        plain = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels).logprobs
    assert torch.equal(got, every_row)
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=0)


def test_packed_rows_refused_on_device_give_nan(monkeypatch):
    """Position ids not read on the host (a GPU tensor) are not refused with an error: every statistic is NaN."""
    import fastalign._validate as validate

    monkeypatch.setattr(validate, "eager", lambda x: False)  # take the device path
    model = _auto_model("opt")
    _, input_ids, position_ids = _packed_row([4, 5, 3])
    with torch.no_grad():
        stats = causal_lm_logprobs(model, input_ids, position_ids=position_ids)
        plain = causal_lm_logprobs(model, input_ids, position_ids=torch.arange(12)[None])
    assert torch.isnan(stats.logprobs[position_ids[:, 1:] != 0]).all()
    assert torch.isfinite(plain.logprobs).all()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_packed_rows_of_other_bodies_equal_separate_sequences(arch):
    """Bodies that do split packed rows (beside the llama-like ones) are not refused and score each sequence as
    its own run."""
    model = _auto_model(arch)
    seqs, input_ids, position_ids = _packed_row([4, 5, 3])
    with torch.no_grad():
        expected = _separately(model, seqs)
        by_pos = causal_lm_logprobs(model, input_ids, position_ids=position_ids).logprobs
        by_cu = causal_lm_logprobs(model, input_ids, cu_seqlens=torch.tensor([0, 4, 9, 12])).logprobs
    torch.testing.assert_close(by_pos.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_cu.double(), expected, atol=1e-5, rtol=0)


def test_packed_rows_of_an_unlisted_architecture_need_packed_rows_stated(monkeypatch):
    """beam's body takes position_ids but lets each packed sequence see the ones before it (the packed log-probs
    differ from the sequences scored alone): an architecture outside the checked table has its packed rows
    refused, with a stated transform or a registered one, unless registered with packed_rows=True."""
    import fastalign.integrations.hf as hf
    from fastalign.integrations.hf import head_transforms

    monkeypatch.setattr(head_transforms, "HEAD_TRANSFORMS", dict(head_transforms.HEAD_TRANSFORMS))
    monkeypatch.setattr(head_transforms, "_PACKED_ROWS_STATED", set())
    monkeypatch.setattr(head_transforms, "_STATED", set())
    seqs, input_ids, position_ids = _packed_row([4, 5, 3])
    cu = torch.tensor([0, 4, 9, 12])
    leaky = _auto_model("beam")
    with torch.no_grad():
        assert not torch.allclose(reference(leaky, input_ids, position_ids=position_ids)[0][:, 4:8],
                                  _separately(leaky, seqs)[:, 4:8], atol=1e-4)
        with pytest.raises(ValueError, match="position_ids restart .*'beam' is not among .*packed_rows=True"):
            causal_lm_logprobs(leaky, input_ids, position_ids=position_ids, logit_scale=1.0, softcap=None)
        hf.register_head_transform("beam")
        with pytest.raises(ValueError, match="cu_seqlens: model_type 'beam' is not among"):
            causal_lm_logprobs(leaky, input_ids, cu_seqlens=cu)

    model = tiny_model("qwen2")
    model.config.model_type = "my_qwen2"
    with torch.no_grad():
        expected = _separately(model, seqs)
        hf.register_head_transform("my_qwen2")
        with pytest.raises(ValueError, match="'my_qwen2' is not among"):
            causal_lm_logprobs(model, input_ids, cu_seqlens=cu)
        hf.register_head_transform("my_qwen2", packed_rows=True)  # stated again, as the refusal says
        got = causal_lm_logprobs(model, input_ids, cu_seqlens=cu).logprobs
        hf.register_head_transform("my_qwen2")  # and once more without: refused again
        with pytest.raises(ValueError, match="'my_qwen2' is not among"):
            causal_lm_logprobs(model, input_ids, cu_seqlens=cu)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="packed_rows"):
        hf.register_head_transform("other", packed_rows="yes")


def test_body_found_past_get_decoder():
    """Llama4ForCausalLM's get_decoder() is the model itself and its body sits at .model (not at its
    base_model_prefix): found there, its plain head scores as its own logits. ModernBERT-decoder's get_decoder()
    is its output head: a ValueError saying so (it was a TypeError from Linear.forward)."""
    llama4 = _auto_model("llama4_text", intermediate_size_mlp=64, num_local_experts=2)
    input_ids, attention_mask, labels = batch(seed=3)
    with torch.no_grad():
        ref_lp, _ = reference(llama4, input_ids, attention_mask)
        got = causal_lm_logprobs(llama4, input_ids, attention_mask, labels=labels, logit_scale=1.0,
                                 softcap=None).logprobs
    check(got, ref_lp, (labels[:, 1:] != -100) & attention_mask[:, 1:].bool(), 1e-4)
    modernbert = _auto_model("modernbert-decoder", sep_token_id=3, cls_token_id=4, bos_token_id=1, eos_token_id=2)
    with pytest.raises(ValueError, match="get_decoder.. of ModernBertDecoderForCausalLM returns its output head"):
        causal_lm_logprobs(modernbert, input_ids, logit_scale=1.0, softcap=None)


def test_stated_transform_dtype_and_return_dict_refusals():
    """logit_scale=0 per call gave uniform log-probs while register_head_transform refused it; a float64 model
    raised about an argument named `hidden`; return_dict=False raised a long duplicate-keyword TypeError."""
    model = tiny_model("llama")
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="logit_scale must be finite and non-zero"):
        causal_lm_logprobs(model, ids, logit_scale=0.0, softcap=None)
    with pytest.raises(ValueError, match="softcap"):
        causal_lm_logprobs(model, ids, logit_scale=1.0, softcap=0.0)
    with pytest.raises(ValueError, match="return_dict does not apply"):
        causal_lm_logprobs(model, ids, return_dict=False)
    with pytest.raises(TypeError, match="head_dtype must be"):
        causal_lm_logprobs(model, ids, head_dtype=torch.float64)
    model64 = tiny_model("llama").double()
    with torch.no_grad():
        with pytest.raises(TypeError, match="model: its dtype is torch.float64.*head_dtype=torch.float32"):
            causal_lm_logprobs(model64, ids)
        ref_lp, _ = reference(model64, ids)
        got = causal_lm_logprobs(model64, ids, head_dtype=torch.float32).logprobs
    torch.testing.assert_close(got.double(), ref_lp, atol=1e-4, rtol=0)


def test_packed_rows_refused_on_a_transformers_that_does_not_split_them(monkeypatch):
    """A transformers older than 4.54 builds the causal mask without splitting packed rows (its log-probs of a
    packed row differed by 0.075 from the sequences scored alone): packed rows raise there, naming the version."""
    from fastalign.integrations.hf import packing

    monkeypatch.setattr(packing, "_masks_split_packed_rows", lambda: False)
    model = _auto_model("llama")
    _, input_ids, position_ids = _packed_row([4, 5, 3])
    with torch.no_grad(), pytest.raises(ValueError, match=r"position_ids restart .*transformers .* without splitting"):
        causal_lm_logprobs(model, input_ids, position_ids=position_ids)


@pytest.mark.parametrize("cache", [dict(use_cache=True), dict(past_key_values="cache")])
def test_packed_rows_with_a_kv_cache_raise(cache):
    """transformers splits packed rows only without a KV cache: use_cache=True let each packed sequence attend to
    the ones before it (log-probs off by up to 7 nats, no error). Position ids without an attention mask (and
    cu_seqlens) refuse a cache now."""
    model = tiny_model("qwen2")
    _, input_ids, position_ids = _packed_row([4, 5, 3])
    if "past_key_values" in cache:
        cache = dict(past_key_values=transformers.DynamicCache())
    with torch.no_grad():
        with pytest.raises(ValueError, match="KV cache"):
            causal_lm_logprobs(model, input_ids, position_ids=position_ids, **cache)
        with pytest.raises(ValueError, match="KV cache"):
            causal_lm_logprobs(model, input_ids, cu_seqlens=torch.tensor([0, 4, 9, 12]), **cache)


def test_a_stated_transform_must_equal_a_listed_architectures_own():
    """logit_scale / softcap are for architectures outside the table; for gemma2 a stated (1.0, None) silently
    replaced its config's softcap of 3 (31.9 nats off its own logits). A different one raises; the same is taken."""
    model = tiny_model("gemma2")
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        with pytest.raises(ValueError, match="differ from the head transform .*'gemma2'"):
            causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, logit_scale=1.0, softcap=None)
        same = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, logit_scale=1.0, softcap=3.0)
        auto = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)
    assert torch.equal(same.logprobs, auto.logprobs)


def test_transforms_and_packed_rows_follow_the_installed_transformers(monkeypatch):
    """PaliGemma's forward applies its text config's softcap from transformers 5.23 on, Falcon's body splits
    packed rows from 5.24 on and Llama 4's chunked attention from 5.23 on (each checked against those releases' own
    logits): with an older release the softcap is not applied and their packed rows raise, naming the release."""
    from fastalign.integrations.hf import head_transforms

    paligemma = transformers.AutoConfig.for_model("paligemma", text_config=dict(final_logit_softcapping=3.0))
    falcon = _auto_model("falcon")
    llama4 = _auto_model("llama4_text", attention_chunk_size=2)  # its chunked attention: 5.23 on
    seqs, input_ids, position_ids = _packed_row([4, 5, 3])
    installed = sys.modules["transformers"]  # what an import finds (transformers may rebind it after its first import)
    monkeypatch.setattr(installed, "__version__", "5.22.0")
    head_transforms._transformers_at_least.cache_clear()
    try:
        assert head_transform(paligemma) == (1.0, None)
        with pytest.raises(ValueError, match=r"model_type 'falcon' .* before transformers 5\.24 \(this is 5\.22\.0\)"):
            causal_lm_logprobs(falcon, input_ids, position_ids=position_ids)
        with pytest.raises(ValueError, match=r"model_type 'llama4_text' .* before transformers 5\.23"):
            causal_lm_logprobs(llama4, input_ids, position_ids=position_ids)
        monkeypatch.setattr(installed, "__version__", "5.24.0")
        head_transforms._transformers_at_least.cache_clear()
        assert head_transform(paligemma) == (1.0, 3.0)
        with torch.no_grad():
            got = causal_lm_logprobs(falcon, input_ids, position_ids=position_ids).logprobs
        if TRANSFORMERS >= Version("5.24"):  # the installed release's body splits them: each sequence as alone
            torch.testing.assert_close(got.double(), _separately(falcon, seqs), atol=1e-4, rtol=0)
            got = causal_lm_logprobs(llama4, input_ids, position_ids=position_ids).logprobs
            torch.testing.assert_close(got.double(), _separately(llama4, seqs), atol=1e-4, rtol=0)
    finally:
        monkeypatch.undo()
        head_transforms._transformers_at_least.cache_clear()


@pytest.mark.parametrize("typo, option", [("temprature", "temperature"), ("label", "labels"),
                                          ("entropie", "entropy"), ("response_masks", "response_mask")])
def test_a_misspelled_option_raises_naming_it(typo, option):
    """A misspelled option went to the body in **model_kwargs, which drops keywords it does not know: the option
    was lost without a word (``label=`` scored every token). It raises a TypeError naming both spellings; a keyword
    the model names still reaches it."""
    model = tiny_model("llama")
    input_ids, attention_mask, labels = batch()
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{typo}': did you mean '{option}'"):
        causal_lm_logprobs(model, input_ids, attention_mask, **{typo: labels if "label" in typo else 0.5})
    with torch.no_grad():
        got = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, output_attentions=False)
        want = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)
        # the flash-attention keywords bodies take through **kwargs (near cu_seqlens, but transformers' own)
        causal_lm_logprobs(model, input_ids, cu_seq_lens_q=torch.tensor([0, 12]), max_length_q=12)
    torch.testing.assert_close(got.logprobs, want.logprobs)


# ----------------------------------------------------------------------------- packed rows under flash attention

#: Listed architectures whose transformers flash-attention path fails on a packed row: a projection sized for another
#: attention (MiMo-V2-Flash); GLM-4.5V hands flash attention its rotary ids [3, B, T], which it reads as three
#: sequences per row, past the tokens (flash-attn would read outside q, k and v, even for one sequence alone). Falcon's
#: flash attention class before transformers 5.25 adds a mask it was not given.
FLASH_RAISES = {"mimo_v2_flash", "glm4v_moe",
                *(() if Version(transformers.__version__) >= Version("5.25") else ("falcon",))}


def _composite(arch) -> bool:
    return arch in COMPOSITE_ARCHS and arch not in SPLITTING_ARCHS


def _runs_flash_attention(arch) -> bool:
    """Whether the installed transformers has ``arch`` and runs its model class with flash attention."""
    if arch not in transformers.CONFIG_MAPPING:
        return False
    config = transformers.AutoConfig.for_model(arch)
    auto = transformers.AutoModelForImageTextToText if _composite(arch) else transformers.AutoModelForCausalLM
    try:
        config._attn_implementation = "flash_attention_2"  # refused by some configs (HRM's prefix LM)
    except ValueError:
        return False
    return auto._model_mapping[type(config)]._supports_flash_attn


FLASH_ARCHS = [arch for arch in (*SPLITTING_ARCHS, *UNSPLIT_ARCHS, *filter(_composite, COMPOSITE_ARCHS))
               if _runs_flash_attention(arch)]


def _flash_model(arch):
    """The tiny model of ``arch``, a vision-language one as AutoModelForImageTextToText builds it."""
    if _composite(arch):
        fields, _ = COMPOSITE_ARCHS[arch]
        return _composite_model(arch, fields, **(gemma3_vision(V) if arch == "gemma3" else VISION.get(arch, ({},))[0]))
    return _auto_model(arch, **{**SPLITTING_ARCHS, **UNSPLIT_ARCHS}.get(arch, {}))


@pytest.mark.parametrize("arch", FLASH_ARCHS)
def test_one_packed_row_under_flash_attention_is_split_or_refused(arch, monkeypatch):
    """transformers' flash path (flash-attn's kernels replaced by references) ignores the causal mask a body builds
    and splits a one-row packed batch where the position ids reach the attention: OPT's, gpt-oss's, AFMoE's and
    BioGPT's packed rows, refused under eager and SDPA attention, are each sequence alone there; GPT-Neo's,
    GPTBigCode's, CTRL's, Persimmon's and Fuyu's, split under SDPA, were silently mixed, as were the 2-D ids of
    Qwen2-VL's family. With the cu_seq_lens / max_length keywords every body but GPT-Neo's splits them. A packed
    row is refused exactly where the model's own forward mixes its sequences."""
    from fastalign.integrations.hf import packing, packed_rows_refusal
    from flash_standin import OutOfBounds, use_flash_attention

    model = use_flash_attention(monkeypatch, _flash_model(arch))
    seqs, input_ids, position_ids = _packed_row([4, 5, 3])
    if arch in FLASH_RAISES:
        with pytest.raises(Exception):
            reference(model, input_ids, position_ids=position_ids)
        return

    def splits(rows, **kwargs):
        """Whether the model's own forward scores each of ``rows`` copies of the packed row as its sequences
        alone (boundaries read past the tokens, GLM-4.5V's from its [3, B, T] rotary ids, are not a split)."""
        ids = input_ids.expand(rows, -1)
        try:
            logits = model(input_ids=ids, position_ids=position_ids.expand(rows, -1), **kwargs).logits
        except OutOfBounds:
            return False
        own = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        return torch.allclose(own[:, inside[0]], separately[:, inside[0]].expand(rows, -1), atol=1e-4)

    with torch.no_grad():
        separately = _separately(model, seqs)
        inside = separately != 0  # not the entries predicting the next sequence's first token
        mixed = not splits(1)
        refusal = packed_rows_refusal(model)
        if packing._is_recurrent(model, packing._body(model)):  # refused whatever the attention (tested above)
            assert refusal is not None
            return
        assert (refusal is not None) == mixed, refusal
        if refusal is None:
            got = causal_lm_logprobs(model, input_ids, position_ids=position_ids).logprobs
            torch.testing.assert_close(got.double(), separately, atol=1e-4, rtol=0)
        else:
            with pytest.raises(ValueError, match=f"model_type '{arch}' hands its flash attention"):
                causal_lm_logprobs(model, input_ids, position_ids=position_ids)
        # with the sequence keywords of TRL's padding-free collator, which flash attention splits at, over one row
        # and over two (the keywords span the flattened batch)
        for rows in (1, 2):
            cu = torch.tensor([0, 4, 9, 12] if rows == 1 else [0, 4, 9, 12, 16, 21, 24], dtype=torch.int32)
            varlen = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
            mixed = not splits(rows, **varlen)
            assert (packed_rows_refusal(model, rows=rows, varlen=True) is not None) == mixed, rows
            if not mixed:
                got = causal_lm_logprobs(model, input_ids.expand(rows, -1), position_ids=position_ids.expand(rows, -1),
                                         **varlen).logprobs
                torch.testing.assert_close(got.double(), separately.expand(rows, -1), atol=1e-4, rtol=0)
            if rows == 1:  # cu_seqlens= hands the keywords on, refused exactly where the keywords and ids mix the row
                by_keywords = not mixed
        if by_keywords:
            got = causal_lm_logprobs(model, input_ids, cu_seqlens=torch.tensor([0, 4, 9, 12])).logprobs
            torch.testing.assert_close(got.double(), separately, atol=1e-4, rtol=0)
        else:
            with pytest.raises(ValueError, match=f"cu_seqlens: .*model_type '{arch}'"):
                causal_lm_logprobs(model, input_ids, cu_seqlens=torch.tensor([0, 4, 9, 12]))


def test_flash_attention_of_older_bodies_is_read_by_release(monkeypatch):
    """Before transformers 5.23 (Ministral 3), 5.24 (GPT-J) and 5.25 (Cohere Compass) these bodies ran flash attention
    through classes of their own that hand it no position ids (each release from 5.13 on checked with the test above):
    their one-row packed batches were mixed, and scored as split. Such a release refuses them (the cu_seq_lens
    keywords still split Ministral 3's and Cohere Compass's rows, not GPT-J's); a newer one scores them."""
    from fastalign.integrations.hf import head_transforms, packed_rows_refusal
    from flash_standin import use_flash_attention

    models = {arch: use_flash_attention(monkeypatch, _flash_model(arch))
              for arch in ("ministral3", "gptj", "cohere_compass_text")}
    installed = sys.modules["transformers"]
    try:
        monkeypatch.setattr(installed, "__version__", "5.22.0")
        head_transforms._transformers_at_least.cache_clear()
        for arch, model in models.items():
            assert re.search(r"no position ids before transformers 5\.2[345] \(this is 5\.22\.0\)",
                             packed_rows_refusal(model)), arch
            assert (packed_rows_refusal(model, varlen=True) is None) == (arch != "gptj"), arch
        monkeypatch.setattr(installed, "__version__", "5.25.0")
        head_transforms._transformers_at_least.cache_clear()
        for arch, model in models.items():
            assert packed_rows_refusal(model) is None and packed_rows_refusal(model, varlen=True) is None, arch
    finally:
        monkeypatch.undo()
        head_transforms._transformers_at_least.cache_clear()


@pytest.mark.parametrize("arch", ["llama", "gpt_bigcode"])
def test_cu_seqlens_under_flash_attention_are_its_keywords(arch, monkeypatch):
    """Under flash attention causal_lm_logprobs(cu_seqlens=) hands the body the cu_seq_lens / max_length keywords:
    transformers derives no offsets from the position ids (a host read in every layer), GPTBigCode's packed row
    (whose body hands flash attention no position ids, refused before) is each sequence alone, and the padding past
    cu_seqlens[-1] joins the last sequence (flash attention leaves tokens outside every sequence unwritten: NaN
    gradients). Keywords given beside cu_seqlens raise."""
    import transformers.modeling_flash_attention_utils as utils
    from flash_standin import use_flash_attention

    def never(*args, **kwargs):
        raise AssertionError("offsets derived from the position ids")

    model = use_flash_attention(monkeypatch, _flash_model(arch))
    seqs, input_ids, _ = _packed_row([4, 5, 3])
    padded = torch.cat([input_ids, torch.full((1, 2), 3)], 1)
    with torch.no_grad():
        separately = _separately(model, seqs)
    monkeypatch.setattr(utils, "_prepare_from_posids", never)
    stats = causal_lm_logprobs(model, padded, cu_seqlens=torch.tensor([0, 4, 9, 12]), entropy=True)
    torch.testing.assert_close(stats.logprobs[:, :11].double(), separately, atol=1e-4, rtol=0)
    assert (stats.logprobs[:, 11:] == 0).all()
    (stats.logprobs.sum() + stats.entropy.sum()).backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
    with pytest.raises(ValueError, match="give cu_seqlens or max_length_q, not both"):
        causal_lm_logprobs(model, padded, cu_seqlens=torch.tensor([0, 4, 9, 12]), max_length_q=5)


@pytest.mark.parametrize("arch", ["qwen2_vl", "glm4v"])
def test_text_positions_first_split_packed_rows_under_flash_attention(arch, monkeypatch):
    """Multimodal rotary ids [4, B, T], the text positions first, reach the flash attention of Qwen2-VL's family,
    which splits a one-row packed batch at them: the loss is each sequence's alone (its [B, T] ids are refused)."""
    from fastalign.integrations.hf import causal_lm_loss
    from flash_standin import use_flash_attention

    model = use_flash_attention(monkeypatch, _flash_model(arch))
    seqs, input_ids, position_ids = _packed_row([4, 5, 3])
    rotary = torch.cat([position_ids[None], position_ids[None].expand(3, 1, -1)])
    with torch.no_grad():
        labels = input_ids.masked_fill(position_ids == 0, -100)  # no target across a boundary, as collators write
        got = causal_lm_loss(model, input_ids, labels=labels, position_ids=rotary)
        alone = sum(causal_lm_loss(model, s, labels=s) * (s.shape[1] - 1) for s in seqs) / (input_ids.shape[1] - 3)
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="hands its flash attention"):
            causal_lm_logprobs(model, input_ids, position_ids=position_ids)


def test_a_batch_of_packed_rows_under_flash_attention_is_refused(monkeypatch):
    """Flash attention splits packed sequences in a batch of one row only: two packed rows attend across their
    sequences in the model's own forward (Llama's, which SDPA splits), so they raise (NaN where the ids are not read
    on the host); two rows of one sequence each are scored as the model scores them."""
    import fastalign._validate as validate
    from flash_standin import use_flash_attention

    model = use_flash_attention(monkeypatch, tiny_model("llama"))
    seqs, input_ids, position_ids = _packed_row([4, 5, 3])
    two_rows, two_ids = input_ids.expand(2, -1), position_ids.expand(2, -1)
    with torch.no_grad():
        own, separately = reference(model, two_rows, position_ids=two_ids)[0][:1], _separately(model, seqs)
        inside = separately != 0
        assert not torch.allclose(own[inside], separately[inside], atol=1e-2)  # the model's forward mixes them
        one_row_only = r"batch of one row only \(or given the cu_seq_lens .*\), and this batch has 2"
        with pytest.raises(ValueError, match=one_row_only):
            causal_lm_logprobs(model, two_rows, position_ids=two_ids)
        with pytest.raises(ValueError, match=one_row_only):
            causal_lm_logprobs(model, two_rows, position_ids=position_ids)  # one row of ids for both
        plain = torch.arange(12).expand(2, -1)
        got = causal_lm_logprobs(model, two_rows, position_ids=plain).logprobs
        torch.testing.assert_close(got.double(), reference(model, two_rows, position_ids=plain)[0], atol=1e-4,
                                   rtol=0)
        monkeypatch.setattr(validate, "eager", lambda x: False)  # the device path
        on_device = causal_lm_logprobs(model, two_rows, position_ids=two_ids).logprobs
    assert torch.isnan(on_device[two_ids[:, 1:] != 0]).all()


def test_packed_ids_restarting_off_their_least_under_flash_attention_are_refused(monkeypatch):
    """Flash attention starts a packed sequence only where the ids equal the row's least: a sequence restarting at
    1 after one from 0 is attended as part of it (by the model's own forward too), so it raises; so does a row
    opening with a sequence continued from an earlier row (5, 6, 7, 8, 0, ...), which flash attention does not
    attend at all (the model's own outputs there are memory it never wrote: they changed from call to call, or were
    NaN); every sequence from 1 splits, each scored as alone."""
    from flash_standin import use_flash_attention

    model = use_flash_attention(monkeypatch, tiny_model("llama"))
    seqs, input_ids, _ = _packed_row([4, 5, 3])
    off = torch.tensor([[0, 1, 2, 3, 1, 2, 3, 4, 5, 0, 1, 2]])
    from_one = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 5, 1, 2, 3]])
    with torch.no_grad():
        own, separately = reference(model, input_ids, position_ids=off)[0], _separately(model, seqs)
        inside = separately != 0
        assert not torch.allclose(own[inside], separately[inside], atol=1e-2)  # the sequence from 1 sees the first
        for ids in (off, torch.tensor([[5, 6, 7, 8, 0, 1, 2, 3, 4, 0, 1, 2]])):
            with pytest.raises(ValueError, match="start a sequence at a value other than the row's least"):
                causal_lm_logprobs(model, input_ids, position_ids=ids)
        got = causal_lm_logprobs(model, input_ids, position_ids=from_one).logprobs
    torch.testing.assert_close(got.double(), _separately(model, seqs), atol=1e-4, rtol=0)
    # StableLM's body drops the cu_seq_lens / max_length keywords: its ids split the row whatever the call gives
    stablelm = use_flash_attention(monkeypatch, _flash_model("stablelm"))
    cu = torch.tensor([0, 4, 9, 12], dtype=torch.int32)
    with torch.no_grad(), pytest.raises(ValueError, match="start a sequence at a value other than the row's least"):
        causal_lm_logprobs(stablelm, input_ids, position_ids=off, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5,
                           max_length_k=5)


def test_packed_rows_with_a_new_cache_under_flash_attention_are_split(monkeypatch):
    """Flash attention splits a one-row packed batch from its position ids whether or not the forward builds a KV
    cache (the mask's rule, no cache, is not its rule): use_cache=True is scored as each sequence alone, and the
    fused loss on such rows neither warns nor differs from the model's own loss; a cache already given still
    raises."""
    import warnings

    from fastalign.integrations.hf import install_fused_loss
    from flash_standin import use_flash_attention

    model = use_flash_attention(monkeypatch, tiny_model("llama"))
    seqs, input_ids, position_ids = _packed_row([4, 5, 3])
    labels = input_ids.masked_fill(position_ids == 0, -100)
    with torch.no_grad():
        got = causal_lm_logprobs(model, input_ids, position_ids=position_ids, use_cache=True).logprobs
        torch.testing.assert_close(got.double(), _separately(model, seqs), atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="KV cache"):
            causal_lm_logprobs(model, input_ids, position_ids=position_ids,
                               past_key_values=transformers.DynamicCache())
        own = model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=True).loss
        install_fused_loss(model.train())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fused = model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=True).loss
    torch.testing.assert_close(fused, own, atol=1e-5, rtol=1e-5)
