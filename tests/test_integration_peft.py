"""PEFT (LoRA) models: causal_lm_logprobs against the PeftModel's own logits, and the TRL drop-ins with
``peft_config`` against TRL's own trainers with the same ``peft_config``.

Tiny randomly initialised models (no downloads). The LoRA weights are random (``init_lora_weights=False``)
so the adapters change the logits, and a ``modules_to_save`` head copy is perturbed away from the
original. The reference is the model's own forward run in float64 (log-softmax of its logits);
gradients are those of the same objective through that float64 model's logits.
"""
import copy
import importlib
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the PEFT tests need transformers")
peft = pytest.importorskip("peft", reason="peft is not importable")

from fastalign.integrations.hf import causal_lm_logprobs  # noqa: E402

V = 97
CASES = {
    "lora_attention": dict(target_modules=["q_proj", "v_proj"]),
    "lora_attention_and_head": dict(target_modules=["q_proj", "v_proj", "lm_head"]),
    "lora_head_with_bias": dict(target_modules=["lm_head"], lora_bias=True),
    "modules_to_save_head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


def peft_model(case, model_type="qwen2", seed=0):
    torch.manual_seed(seed)
    extra = {"cohere": dict(logit_scale=0.5)}.get(model_type, {})
    config_cls, model_cls = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                             "cohere": ("CohereConfig", "CohereForCausalLM")}[model_type]
    config = getattr(transformers, config_cls)(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                               tie_word_embeddings=False, attn_implementation="eager", **extra)
    model = getattr(transformers, model_cls)(config).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **CASES[case]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name or ("lora_" in name and "lm_head" in name):
                p.add_(torch.randn_like(p) * 0.3)  # the adapted head differs visibly from the base head
    return model.eval()


def _batch(seed=1, B=3, T=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    attention = torch.ones_like(ids)
    attention[0, -3:] = 0  # padding (on the right: a float64 eager model gives NaN on fully masked rows)
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :4] = -100  # the prompt is not scored
    return ids, attention, labels


def _reference(model, ids, attention, labels, temperature, **model_kwargs):
    z = model(input_ids=ids, attention_mask=attention, **model_kwargs).logits[:, :-1].double() / temperature
    logp = torch.log_softmax(z, -1)
    y, scored = labels[:, 1:], labels[:, 1:] != -100
    lp = logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(scored, lp, zero), torch.where(scored, ent, zero)


def _grads(model, lp, ent, g):
    model.zero_grad()
    ((lp.double() * g).sum() + 0.3 * (ent.double() * g).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_causal_lm_logprobs_on_peft_model_matches_its_logits(case):
    model = peft_model(case)
    ids, attention, labels = _batch()
    g = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stats = causal_lm_logprobs(model, ids, attention, labels=labels, temperature=0.8, entropy=True)
    ours = _grads(model, stats.logprobs, stats.entropy, g)
    model64 = copy.deepcopy(model).double()  # the reference runs the whole model in float64
    ref_lp, ref_ent = _reference(model64, ids, attention, labels, 0.8)
    theirs = _grads(model64, ref_lp, ref_ent, g)
    torch.testing.assert_close(stats.logprobs.double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.entropy.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    assert set(ours) == set(theirs) and any("lora_B" in n for n in ours)
    for name in theirs:  # the adapters' (and a saved head copy's) gradients, through the fused head;
        # fp32 against float64 through the whole model: errors relative to the tensor's largest entry
        scale = theirs[name].abs().max().item()
        torch.testing.assert_close(ours[name].double(), theirs[name], rtol=1e-4, atol=5e-4 * scale,
                                   msg=lambda m: f"{name}: {m}")
    if case != "lora_attention":  # the adapted head is not the base head
        with model.disable_adapter():
            base = causal_lm_logprobs(model, ids, attention, labels=labels, temperature=0.8).logprobs
        assert not torch.allclose(base, stats.logprobs.detach(), atol=1e-3)


@pytest.mark.parametrize("case", ["lora_attention_and_head", "modules_to_save_head"])
def test_disabled_adapters_score_the_base_model(case):
    """Under ``disable_adapter()`` (TRL's reference model for a PEFT policy) the base model is scored."""
    model = peft_model(case, model_type="cohere")  # with a logit_scale between the head and the logits
    ids, attention, labels = _batch(seed=2)
    with torch.no_grad(), model.disable_adapter():
        got = causal_lm_logprobs(model, ids, attention, labels=labels).logprobs
        expected, _ = _reference(model, ids, attention, labels, 1.0)
        base_lp, _ = _reference(model.get_base_model(), ids, attention, labels, 1.0)  # wrappers passing through
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected, base_lp, rtol=0, atol=0)


def test_merged_lora_head_under_disabled_adapters_is_unmerged_as_peft_does():
    """Adapters merged (the head's included), then disabled: PEFT's forward unmerges each layer and scores the base
    model. The merged head raised after the body had run, whose LoRA layers had unmerged themselves, so the model
    was left half merged. The head is unmerged too now (as PEFT's forward does) and the base model scored."""
    model = peft_model("lora_attention_and_head", model_type="cohere")
    ids, attention, labels = _batch(seed=4)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "merged")]
    head = model.get_output_embeddings()
    assert head in layers and len(layers) > 1
    with torch.no_grad():
        base_lp, _ = _reference(model.get_base_model(), ids, attention, labels, 1.0)  # not merged yet: LoRA on
        model.merge_adapter()
        with model.disable_adapter():
            expected, _ = _reference(model, ids, attention, labels, 1.0)  # PEFT's forward: unmerges every layer
        assert not any(m.merged for m in layers)
        model.merge_adapter()
        assert all(m.merged for m in layers)
        with model.disable_adapter():
            got = causal_lm_logprobs(model, ids, attention, labels=labels).logprobs
        assert not any(m.merged for m in layers)  # the state PEFT's own forward leaves
        adapted = causal_lm_logprobs(model, ids, attention, labels=labels).logprobs
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapted.double(), base_lp, rtol=1e-5, atol=1e-5)  # the adapters are intact
    assert not torch.allclose(got, adapted, atol=1e-3)


def test_merged_lora_head_is_scored_once():
    """Adapters merged (merge_adapter(), the head's included) and left enabled: the merged head weight holds
    ``W + s B A`` already, so the low-rank term is not added again; the log-probs equal the model's own logits
    (which merging leaves as they were)."""
    model = peft_model("lora_attention_and_head")
    ids, attention, labels = _batch(seed=5)
    with torch.no_grad():
        unmerged, _ = _reference(model, ids, attention, labels, 1.0)
        model.merge_adapter()
        assert model.get_output_embeddings().merged
        expected, _ = _reference(model, ids, attention, labels, 1.0)
        got = causal_lm_logprobs(model, ids, attention, labels=labels).logprobs
    torch.testing.assert_close(expected, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_active_adapter_absent_from_the_head_leaves_the_base_head():
    """Two adapters, one on the attention and the head, one on the attention alone: with the second one active the
    head's LoRA layer holds no weights for it, and PEFT's forward skips it there (the base head) as the fused head
    does; the log-probs equal the model's own logits."""
    model = peft_model("lora_attention_and_head")
    model.add_adapter("attention_only", peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                        target_modules=["q_proj", "v_proj"]))
    model.set_adapter("attention_only")
    model.eval()
    head = model.get_output_embeddings()
    assert head.active_adapters == ["attention_only"] and "attention_only" not in head.lora_A
    ids, attention, labels = _batch(seed=6)
    with torch.no_grad():
        expected, _ = _reference(model, ids, attention, labels, 1.0)
        got = causal_lm_logprobs(model, ids, attention, labels=labels).logprobs
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_lora_head_dropout_draws_are_peft_own():
    """lora_dropout > 0 on a LoRA lm_head in training mode: from the same random state the fused head
    draws PEFT's dropout masks (its modules, its order, the same shape), so the log-probs equal the
    model's own logits draw for draw, and the random state after the call is the same."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      attn_implementation="eager")
    model = peft.get_peft_model(transformers.Qwen2ForCausalLM(config),
                                peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False,
                                                target_modules=["q_proj", "lm_head"])).train()
    ids, attention, labels = _batch(seed=3)
    torch.manual_seed(11)
    got = causal_lm_logprobs(model, ids, attention, labels=labels).logprobs
    after_ours = torch.rand(4)
    torch.manual_seed(11)
    z = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    after_theirs = torch.rand(4)
    y, scored = labels[:, 1:], labels[:, 1:] != -100
    expected = torch.where(scored, torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(after_ours, after_theirs)
    with torch.no_grad():
        other_draw = causal_lm_logprobs(model, ids, attention, labels=labels).logprobs
    assert not torch.allclose(other_draw, got.detach(), atol=1e-3)  # the dropout is live


def test_lora_head_variant_raises():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = peft.get_peft_model(transformers.Qwen2ForCausalLM(config),
                                peft.LoraConfig(r=4, target_modules=["lm_head"], use_dora=True))
    ids, attention, labels = _batch()
    with pytest.raises(ValueError, match="not a plain LoRA"):
        causal_lm_logprobs(model, ids, attention, labels=labels)


def _tiny_base(seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(config)


def _bf16_model_with_an_fp32_lora_head(**lora):
    """A bf16 model with a LoRA adapter on its head (PEFT keeps the adapter in fp32), random adapter weights."""
    base = _tiny_base().to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["lm_head"], **lora)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    head = model.get_output_embeddings()
    assert head.lora_B["default"].weight.dtype == torch.float32
    assert head.get_base_layer().weight.dtype == torch.bfloat16
    return model, head


def _lora_head_logps(model, head, ids, attention, labels, *, adapter=True):
    """float64 log-probs of the labels through the bf16 base head plus (``adapter``) the fp32 LoRA term."""
    a, b = head.lora_A["default"], head.lora_B["default"]
    with torch.no_grad():
        h = model.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state.double()
        z = h @ head.get_base_layer().weight.double().T
        if adapter:
            low_rank = (h @ a.weight.double().T) @ b.weight.double().T
            z = z + head.scaling["default"] * (low_rank if b.bias is None else low_rank + b.bias.double())
    logp = torch.log_softmax(z[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    return torch.where(labels[:, 1:] != -100, logp, 0.0)


def test_head_dtype_keeps_a_bf16_models_fp32_lora_head_in_fp32():
    """On a bf16 model (PEFT keeps the adapter in fp32), head_dtype=float32 rounded lora_B and its bias to the base
    head's bf16 first: log-probs off by 0.043 from the fp32 head. The adapter is cast to head_dtype directly now."""
    model, head = _bf16_model_with_an_fp32_lora_head(lora_bias=True)
    ids, attention, labels = _batch()
    got = causal_lm_logprobs(model, ids, attention, labels=labels, head_dtype=torch.float32).logprobs
    want = _lora_head_logps(model, head, ids, attention, labels)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_bf16_model_with_an_fp32_lora_head_outside_autocast():
    """A bf16 model whose LoRA head adapter PEFT keeps in fp32, scored without head_dtype or autocast: the hidden
    states are cast to the adapter's dtype before A, as PEFT's forward does (a bf16 input to the fp32 A raised),
    and the log-probs equal float64 ones of the same operands within bf16 rounding, the adapter's part included."""
    model, head = _bf16_model_with_an_fp32_lora_head(init_lora_weights=False)
    ids, attention, labels = _batch()
    with torch.no_grad():
        got = causal_lm_logprobs(model, ids, attention, labels=labels).logprobs
    want = _lora_head_logps(model, head, ids, attention, labels)
    base_only = _lora_head_logps(model, head, ids, attention, labels, adapter=False)
    assert (base_only - want).abs().max() > 1.0  # the adapter's part shows
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=0.1, rtol=0)


@pytest.mark.parametrize("tuner", ["LoHa", "LoKr", "IA3", "AdaLoRA"])
def test_other_tuners_on_the_head_raise(tuner):
    """Non-LoRA adapters on the head were dropped (the base head scored: off by up to 3.4 in log-prob) and
    AdaLoRA crashed; they raise now, and scored once merged into the head."""
    kw = dict(target_modules=["lm_head"], init_weights=False) if tuner in ("LoHa", "LoKr") else \
        dict(target_modules=["lm_head"], feedforward_modules=[]) if tuner == "IA3" else \
        dict(target_modules=["lm_head"], total_step=10, init_r=4)
    config_cls = {"AdaLoRA": "AdaLoraConfig"}.get(tuner, f"{tuner}Config")
    model = peft.get_peft_model(_tiny_base(), getattr(peft, config_cls)(**kw)).eval()
    ids, attention, labels = _batch()
    with pytest.raises(ValueError, match="fused head cannot express"):
        causal_lm_logprobs(model, ids, attention, labels=labels)
    if tuner == "AdaLoRA":
        return
    model.merge_adapter()
    want, _ = _reference(model, ids, attention, labels, 1.0)
    got = causal_lm_logprobs(model, ids, attention, labels=labels).logprobs
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-5, rtol=1e-5)


def test_prompt_learning_and_per_row_adapters_raise():
    """Prompt tuning was scored without its virtual tokens, and adapter_names (one adapter per row) was passed
    to the body, which dropped it: each row got the active adapter. Both raise now."""
    ids, attention, labels = _batch()
    prompt = peft.get_peft_model(_tiny_base(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="prompt learning"):
        causal_lm_logprobs(prompt, ids, attention, labels=labels)
    lora = peft_model("lora_head_with_bias")
    with pytest.raises(ValueError, match="adapter_names"):
        causal_lm_logprobs(lora, ids, attention, labels=labels, adapter_names=["default"] * ids.shape[0])


def test_head_dtype_runs_the_lora_head_in_it_under_autocast():
    """head_dtype=float32 under a bf16 autocast ran the LoRA head's A(h) in bf16 (off by 0.036); the whole head
    runs in fp32 on the body's hidden states now."""
    model = peft_model("lora_head_with_bias")
    ids, attention, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = causal_lm_logprobs(model, ids, attention, labels=labels, head_dtype=torch.float32).logprobs
        hidden = model.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state
    head = model.get_output_embeddings()
    with torch.no_grad():
        h = hidden.double()
        z = head.get_base_layer()(h.float()).double() + sum(
            head.scaling[a] * head.lora_B[a](head.lora_A[a](h.float())).double() for a in head.active_adapters)
    logp = torch.log_softmax(z[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    want = torch.where(labels[:, 1:] != -100, logp, 0.0)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tuner", ["XLoRA", "Shadow"])
def test_whole_model_tuners_raise(tuner, tmp_path):
    """X-LoRA (its scalings come from a pass of the whole model) and ShadowPEFT (its state is seeded by a hook on
    the whole model's forward) were scored through the body alone: the base model's numbers, or a stale state's
    from the previous forward. They raise now."""
    if tuner == "XLoRA":
        adapters = {}
        for k in range(2):
            lora = peft.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                                   task_type="CAUSAL_LM")
            lora = peft.get_peft_model(_tiny_base(), lora)
            lora.save_pretrained(tmp_path / f"a{k}")
            adapters[str(k)] = str(tmp_path / f"a{k}")
        config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=adapters, xlora_depth=1)
    else:
        config = peft.ShadowConfig(task_type="CAUSAL_LM", init_weights=False)
    base = _tiny_base()
    base.config.use_cache = False
    model = peft.get_peft_model(base, config).eval()
    ids, attention, labels = _batch()
    with pytest.raises(ValueError, match=f"PEFT {type(config).__name__} adapters are set up by hooks"):
        causal_lm_logprobs(model, ids, attention, labels=labels)


INVOCATION = (5, 6)  # the aLoRA invocation sequence of the tests


def _alora_model(seed=0):
    """aLoRA (``alora_invocation_tokens``) on the attention, random weights: PEFT's forward finds the invocation
    sequence in input_ids and the adapters act from it on, each row at its own offset."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      attn_implementation="eager")
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                           alora_invocation_tokens=list(INVOCATION), task_type="CAUSAL_LM")
    model = peft.get_peft_model(transformers.Qwen2ForCausalLM(config), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    return model.eval()


def _alora_batch():
    """Rows invoking the adapter at different positions, and one without the invocation (scored as the base)."""
    ids, attention, labels = _batch(seed=6, B=4)
    ids = ids.masked_fill((ids == INVOCATION[0]) | (ids == INVOCATION[1]), 7)
    for row, start in ((0, 2), (1, 5), (3, 3)):
        ids[row, start:start + 2] = torch.tensor(INVOCATION)
    return ids, attention, labels


@pytest.mark.parametrize("checkpointing", [False, True])
def test_alora_adapters_score_as_peft_forward(checkpointing):
    """aLoRA adapters were scored as the base model, with no gradient: PeftModelForCausalLM.forward computes
    the invocation offsets from input_ids and injects them into the LoRA layers through its forward hooks,
    which the body alone does not run. The body runs inside the same hooks now (with gradient checkpointing
    too, whose recomputation PEFT hooks as well)."""
    model = _alora_model()
    model64 = copy.deepcopy(model).double()
    ids, attention, labels = _alora_batch()
    g = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # no dropout in this model: the same function as in eval mode
    stats = causal_lm_logprobs(model, ids, attention, labels=labels, entropy=True)
    ours = _grads(model, stats.logprobs, stats.entropy, g)
    ref_lp, ref_ent = _reference(model64, ids, attention, labels, 1.0)
    theirs = _grads(model64, ref_lp, ref_ent, g)
    torch.testing.assert_close(stats.logprobs.double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.entropy.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    assert set(ours) == set(theirs) and sum("lora_B" in n for n in theirs) == 4
    for name in theirs:
        scale = theirs[name].abs().max().item()
        assert scale > 0  # the adapters are trained
        torch.testing.assert_close(ours[name].double(), theirs[name], rtol=1e-4, atol=5e-4 * scale,
                                   msg=lambda m: f"{name}: {m}")
    with torch.no_grad(), model.disable_adapter():
        base = causal_lm_logprobs(model, ids, attention, labels=labels).logprobs
    assert not torch.allclose(base[:2], stats.logprobs[:2].detach(), atol=1e-3)  # the invoked rows are adapted
    torch.testing.assert_close(base[2], stats.logprobs[2].detach(), rtol=1e-5, atol=1e-5)  # no invocation: base


def test_poly_adapters_take_task_ids_as_peft_forward():
    """Poly adapters raised PEFT's "task_ids should not be None" although task_ids= was passed: PEFT's forward
    hands them to the Poly layers through pre-hooks, the body alone dropped them. The body runs inside
    the Poly model's hooks now; without task_ids it raises as the model's own forward does."""
    torch.manual_seed(0)
    poly = peft.PolyConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], n_tasks=3, n_skills=2, r=4)
    model = peft.get_peft_model(_tiny_base(), poly).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)  # B starts at 0: the adapters would not change the logits
    ids, attention, labels = _batch()
    task_ids = torch.tensor([0, 2, 1])
    g = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stats = causal_lm_logprobs(model, ids, attention, labels=labels, entropy=True, task_ids=task_ids)
    ours = _grads(model, stats.logprobs, stats.entropy, g)
    model64 = copy.deepcopy(model).double()
    ref_lp, ref_ent = _reference(model64, ids, attention, labels, 1.0, task_ids=task_ids)
    theirs = _grads(model64, ref_lp, ref_ent, g)
    torch.testing.assert_close(stats.logprobs.double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.entropy.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    assert set(ours) == set(theirs) and any("poly_lora_B" in n for n in ours)
    for name in theirs:
        scale = theirs[name].abs().max().item()
        torch.testing.assert_close(ours[name].double(), theirs[name], rtol=1e-4, atol=5e-4 * scale,
                                   msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        other = causal_lm_logprobs(model, ids, attention, labels=labels, task_ids=torch.tensor([1, 0, 2])).logprobs
    assert not torch.allclose(other, stats.logprobs.detach(), atol=1e-3)  # each row's task reaches the layers
    with pytest.raises(ValueError, match="task_ids"):
        causal_lm_logprobs(model, ids, attention, labels=labels)


# ------------------------------------------------------------------------------------------ TRL drop-ins

trl = pytest.importorskip("trl", reason="TRL is not importable")
pytest.importorskip("datasets", reason="TRL's trainers need datasets")
pytest.importorskip("tokenizers", reason="the test tokenizer needs tokenizers")

import fastalign.integrations.trl as fa_trl  # noqa: E402
from test_integration_trl_trainers import (_common, _compare, _config_class, _dpo_dataset,  # noqa: E402
                                           _grpo_dataset, _kto_dataset, _reward, _run, _sft_dataset, _tokenizer,
                                           checkpoint)  # noqa: F401  (checkpoint: a fixture)


def _lora(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **kw)


def _seeded(build):
    torch.manual_seed(0)  # the LoRA weights are drawn when the trainer wraps the model
    return build()


@pytest.mark.parametrize("trainer", ["GRPO", "RLOO"])
def test_online_trainers_with_peft_match_trl(checkpoint, tmp_path, trainer):
    """LoRA on attention with a trained copy of the lm_head (modules_to_save; TRL's GRPOTrainer refuses a
    LoRA adapter on the lm_head); the KL reference is the adapter-disabled model."""
    options = dict(beta=0.05, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                   temperature=1.0, **(dict(loss_type="bnpo") if trainer == "GRPO" else {}))
    config = getattr(trl, f"{trainer}Config")

    def build(cls, out):
        return cls(model=checkpoint, reward_funcs=_reward, args=config(**_common(out, **options)),
                   train_dataset=_grpo_dataset(), processing_class=_tokenizer(checkpoint),
                   peft_config=_lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))

    theirs = _run(_seeded(lambda: build(getattr(trl, f"{trainer}Trainer"), tmp_path / "trl")))
    ours = _run(_seeded(lambda: build(getattr(fa_trl, f"{trainer}Trainer"), tmp_path / "fa")))
    assert any("lm_head.modules_to_save" in k for k in ours[1]) and any("lora_B" in k for k in ours[1])
    assert ours[0]["kl@0"] != 0  # the adapters move the policy away from the adapter-disabled reference
    _compare(theirs, ours)


def test_sft_trainer_with_peft_matches_trl(checkpoint, tmp_path):
    """LoRA on attention with a trained copy of the lm_head (modules_to_save; TRL's SFTTrainer refuses a LoRA
    adapter on the lm_head, and so does the drop-in, which runs TRL's constructor)."""
    def build(cls, out):
        return cls(model=checkpoint, args=trl.SFTConfig(**_common(out, per_device_train_batch_size=4)),
                   train_dataset=_sft_dataset("text"), processing_class=_tokenizer(checkpoint),
                   peft_config=_lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))

    theirs = _run(_seeded(lambda: build(trl.SFTTrainer, tmp_path / "trl")))
    ours = _run(_seeded(lambda: build(fa_trl.SFTTrainer, tmp_path / "fa")))
    assert any("lm_head.modules_to_save" in k for k in ours[1]) and any("lora_B" in k for k in ours[1])
    _compare(theirs, ours)


def _invoked_sft_dataset():
    """SFT rows invoking the aLoRA adapter (word w60, token 63) at different positions, and rows without."""
    import datasets

    rows = [[f"w{(3 * i + 2 * j) % 55 + 3}" for j in range(4 + i % 5)] for i in range(8)]
    return datasets.Dataset.from_dict({"text": [" ".join(r[:1 + i % 3] + ["w60"] * (i % 4 != 3) + r[1 + i % 3:])
                                                for i, r in enumerate(rows)]})


@pytest.mark.parametrize("case", ["lora", "alora"])
def test_sft_trainer_with_causal_lm_peft_config_matches_trl(checkpoint, tmp_path, case):
    """A peft_config with task_type="CAUSAL_LM" wraps the model in PeftModelForCausalLM, whose forward passes
    return_dict=None on to the fused head, which raised; aLoRA adapters (their offsets set by that forward)
    are scored and trained as TRL's own forward does."""
    extra = dict(alora_invocation_tokens=[63]) if case == "alora" else dict(modules_to_save=["lm_head"])

    def build(cls, out):
        return cls(model=checkpoint, args=trl.SFTConfig(**_common(out, per_device_train_batch_size=4)),
                   train_dataset=_invoked_sft_dataset(), processing_class=_tokenizer(checkpoint),
                   peft_config=_lora(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **extra))

    theirs = _run(_seeded(lambda: build(trl.SFTTrainer, tmp_path / "trl")))
    ours = _run(_seeded(lambda: build(fa_trl.SFTTrainer, tmp_path / "fa")))
    moved = [k for k in ours[1] if "lora_B" in k and not torch.equal(ours[1][k], ours[2][k])]
    assert len(moved) == 4  # every adapter is trained
    _compare(theirs, ours)


def test_dpo_trainer_with_peft_matches_trl(checkpoint, tmp_path):
    """LoRA on attention with a trained copy of the lm_head (modules_to_save); no ref_model: the
    reference is the adapter-disabled model."""
    def build(cls, out):
        return cls(model=checkpoint, args=trl.DPOConfig(**_common(out, per_device_train_batch_size=4)),
                   train_dataset=_dpo_dataset(), processing_class=_tokenizer(checkpoint),
                   peft_config=_lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))

    theirs = _run(_seeded(lambda: build(trl.DPOTrainer, tmp_path / "trl")))
    ours = _run(_seeded(lambda: build(fa_trl.DPOTrainer, tmp_path / "fa")))
    assert any("modules_to_save" in k for k in ours[1])
    assert not math.isclose(ours[0]["rewards/margins@0"], 0.0, abs_tol=1e-7)  # policy differs from the reference
    _compare(theirs, ours)


def test_kto_trainer_with_peft_matches_trl(checkpoint, tmp_path):
    """LoRA on attention with a trained copy of the lm_head (modules_to_save; TRL's KTOTrainer refuses a
    LoRA adapter on the lm_head); no ref_model: the reference, and that of the KL completions, is the
    adapter-disabled model."""
    def build(cls, out):
        args = trl.KTOConfig(**_common(out, per_device_train_batch_size=4, loss_type="kto", desirable_weight=1.5,
                                       undesirable_weight=0.7))
        return cls(model=checkpoint, args=args, train_dataset=_kto_dataset(), processing_class=_tokenizer(checkpoint),
                   peft_config=_lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))

    theirs = _run(_seeded(lambda: build(trl.KTOTrainer, tmp_path / "trl")))
    ours = _run(_seeded(lambda: build(fa_trl.KTOTrainer, tmp_path / "fa")))
    assert any("lm_head.modules_to_save" in k for k in ours[1]) and any("lora_B" in k for k in ours[1])
    assert ours[0]["kl@0"] > 0  # the adapters move the policy away from the adapter-disabled reference
    assert not math.isclose(ours[0]["rewards/chosen@0"], 0.0, abs_tol=1e-7)
    _compare(theirs, ours)


@pytest.mark.parametrize("trainer", ["DPO", "KTO"])
def test_reference_trainers_with_dropout_draw_as_trl(checkpoint, tmp_path, trainer):
    """Attention dropout and LoRA dropout on, reference the adapter-disabled model in training mode: its
    forward draws dropout masks too, so the policy's forward must come first, as in TRL, for the same
    masks (hence the same loss and update) from the same seed."""
    options = dict(loss_type="kto") if trainer == "KTO" else {}
    dataset = _kto_dataset if trainer == "KTO" else _dpo_dataset

    def build(cls, out):
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.3
        args = getattr(trl, f"{trainer}Config")(**_common(out, per_device_train_batch_size=4, **options))
        lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False,
                               target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
        return cls(model=model, args=args, train_dataset=dataset(), processing_class=_tokenizer(checkpoint),
                   peft_config=lora)

    theirs = _run(_seeded(lambda: build(getattr(trl, f"{trainer}Trainer"), tmp_path / "trl")))
    ours = _run(_seeded(lambda: build(getattr(fa_trl, f"{trainer}Trainer"), tmp_path / "fa")))
    _compare(theirs, ours)


PAIRED_PEFT_CASES = {  # CPO and ORPO have no reference model; TRL's trainers score a LoRA lm_head through its forward
    "lora_attention_and_head": dict(target_modules=["q_proj", "v_proj", "lm_head"]),
    "modules_to_save_head": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("trainer", ["CPO", "ORPO"])
@pytest.mark.parametrize("case", list(PAIRED_PEFT_CASES))
def test_paired_trainers_with_peft_match_trl(checkpoint, tmp_path, trainer, case):
    module = importlib.import_module(f"trl.experimental.{trainer.lower()}")
    config_cls, trl_cls = getattr(module, f"{trainer}Config"), getattr(module, f"{trainer}Trainer")
    options = dict(loss_type="sigmoid", cpo_alpha=0.3) if trainer == "CPO" else {}

    def build(cls, out):
        args = config_cls(**_common(out, per_device_train_batch_size=4, beta=0.5, **options))
        return cls(model=checkpoint, args=args, train_dataset=_dpo_dataset(), processing_class=_tokenizer(checkpoint),
                   peft_config=_lora(**PAIRED_PEFT_CASES[case]))

    theirs = _run(_seeded(lambda: build(trl_cls, tmp_path / "trl")))
    ours = _run(_seeded(lambda: build(getattr(fa_trl, f"{trainer}Trainer"), tmp_path / "fa")))
    head = "lm_head.lora_B" if case == "lora_attention_and_head" else "lm_head.modules_to_save"
    assert any(head in k for k in ours[1]) and any("q_proj.lora_B" in k for k in ours[1])
    assert {"rewards/margins@0", "logits/chosen@0", "nll_loss@0"} <= set(ours[0])
    _compare(theirs, ours)


PROMPT_LEARNING = {"prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                   "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)}


@pytest.mark.parametrize("trainer, case", [(t, "prompt_tuning") for t in ("SFT", "GRPO", "RLOO", "DPO", "KTO", "CPO",
                                                                          "ORPO")] + [("SFT", "prefix_tuning")])
def test_prompt_learning_is_refused_by_the_trainers_at_construction(checkpoint, tmp_path, trainer, case):
    """PEFT prompt learning (its virtual tokens reach the body as inputs_embeds) was accepted by the drop-ins,
    whose first step died with KeyError 'input_ids'; each drop-in refuses it when built, naming the config type.
    TRL's own trainers take it, and train it."""
    options = dict(num_generations=4, max_completion_length=6) if trainer in ("GRPO", "RLOO") else {}
    extra = dict(reward_funcs=_reward) if trainer in ("GRPO", "RLOO") else {}
    data = {"SFT": lambda: _sft_dataset("text"), "KTO": _kto_dataset, "GRPO": _grpo_dataset,
            "RLOO": _grpo_dataset}.get(trainer, _dpo_dataset)
    args = _config_class(trainer)(**_common(tmp_path, per_device_train_batch_size=4, **options))
    name = type(PROMPT_LEARNING[case]()).__name__
    with pytest.raises(ValueError, match=rf"^model: PEFT prompt learning \({name}\)"):
        getattr(fa_trl, f"{trainer}Trainer")(model=checkpoint, args=args, train_dataset=data(),
                                             processing_class=_tokenizer(checkpoint), **extra,
                                             peft_config=PROMPT_LEARNING[case]())


def test_fused_head_called_with_inputs_embeds_raises_value_error():
    """A prompt-learning PeftModel's forward hands the base model inputs_embeds (virtual tokens prepended), no
    input_ids: the fused head's forward raised KeyError 'input_ids'; it raises a ValueError saying so."""
    from fastalign.integrations.trl._head import install_head

    ids, attention, labels = _batch()
    model = peft.get_peft_model(_tiny_base(), PROMPT_LEARNING["prompt_tuning"]())
    install_head(model)
    with pytest.raises(ValueError, match="inputs_embeds without input_ids.*prompt learning"):
        model(input_ids=ids, attention_mask=attention, labels=labels, fastalign_head=("log_probs",))
