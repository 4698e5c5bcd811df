"""install_fused_loss / causal_lm_loss against the model's own loss: ``model(**batch).loss`` of a transformers causal
LM, computed from the last hidden states without the logits, gives the model's own loss and gradients (its head
transform, a LoRA head, a MoE model's load-balancing term, ``num_items_in_batch``), and ``transformers.Trainer``
trains it step for step as the model's own forward. Tiny random models from configs (no downloads)."""
import copy
import pickle
import warnings

import pytest
import torch
from packaging.version import Version

transformers = pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers")
from test_integration_hf import (COMPOSITE_ARCHS, TINY, V, _composite_model, _image_inputs, batch,  # noqa: E402
                                 image_model, tiny_model)
from tiny_configs import VISION  # noqa: E402

from fastalign.integrations.hf import causal_lm_loss, install_fused_loss, remove_fused_loss  # noqa: E402


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, torch.autograd.grad(loss, params,
                                                                                                 allow_unused=True))]


def _trainer_dataset(B=3):
    """:func:`batch`'s rows as a ``datasets.Dataset`` for ``transformers.Trainer`` (skips without datasets)."""
    datasets = pytest.importorskip("datasets")
    input_ids, attention_mask, labels = batch(B=B)
    return datasets.Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(),
                                       "labels": labels.tolist()})


def _assert_same_loss_and_grads(model, call, rtol=1e-5):
    own = call()
    assert own.logits is not None
    want = _grads(model, own.loss)
    install_fused_loss(model)
    fused = call()
    assert fused.logits is None  # never built
    got = _grads(model, fused.loss)
    remove_fused_loss(model)
    torch.testing.assert_close(fused.loss, own.loss, atol=1e-5, rtol=rtol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6 + 2e-5 * w.abs().max().item(), rtol=0)
    kept = set(own.keys()) - {"loss", "logits", "past_key_values", "cache"}  # the rest of the model's own output
    assert kept <= set(fused.keys())
    for name in kept - {"aux_loss"}:  # the aux loss: test_a_moe_model_adds_its_load_balancing_loss
        torch.testing.assert_close(fused[name], own[name], atol=1e-5, rtol=1e-5)
    return kept


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "cohere", "granite"])
@pytest.mark.parametrize("items", [None, 7], ids=["mean", "num_items_in_batch"])
def test_the_model_own_loss_and_gradients(arch, items):
    """Softcapping (Gemma 2), logit_scale (Cohere) and logits_scaling (Granite) as the model applies them; padded
    rows (left and right), prompt labels -100; the mean over the scored targets or a sum over num_items_in_batch."""
    model = tiny_model(arch).train()
    input_ids, attention_mask, labels = batch()
    extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    _assert_same_loss_and_grads(model, lambda: model(input_ids=input_ids, attention_mask=attention_mask,
                                                     labels=labels, **extra))


def test_labels_on_padding_are_scored_as_the_model_scores_them():
    """The model's own loss scores every label that is not -100, padding included: so does the fused one."""
    model = tiny_model("qwen2").train()
    input_ids, attention_mask, _ = batch()
    _assert_same_loss_and_grads(model, lambda: model(input_ids=input_ids, attention_mask=attention_mask,
                                                     labels=input_ids))


@pytest.mark.parametrize("asked", [None, True, False], ids=["config", "asked", "not-asked"])
def test_a_moe_model_adds_its_load_balancing_loss(asked):
    """With the config's output_router_logits (also when the call passes None, which the model reads as the
    config's) or the call's; the output carries aux_loss and router_logits as the model's own does."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                                        router_aux_loss_coef=0.05, attn_implementation="eager")
    model = transformers.MixtralForCausalLM(config).train()
    input_ids, attention_mask, labels = batch()

    def call():
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=asked)

    own = call()
    assert (own.aux_loss is not None) == (asked is not False)
    _assert_same_loss_and_grads(model, call)
    install_fused_loss(model)
    fused = call()
    if asked is not False:
        torch.testing.assert_close(fused.aux_loss, own.aux_loss, atol=1e-6, rtol=1e-6)
        assert len(fused.router_logits) == len(own.router_logits)
    else:
        assert fused.aux_loss is None and own.aux_loss is None


_SMALL_MOE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0,
                  moe_intermediate_size=16, num_experts=4, num_local_experts=4, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=1, topk_group=1, output_router_logits=True, router_aux_loss_coef=0.5,
                  aux_loss_coef=0.5, first_k_dense_replace=0, n_shared_experts=1)


@pytest.mark.parametrize("model_type", ["jetmoe", "glm4_moe"])
def test_moe_models_with_another_coefficient_or_no_load_balancing_loss(model_type):
    """JetMoE weighs its load-balancing loss by aux_loss_coef; GLM-4-MoE's forward adds none (its module has no
    load_balancing_loss_func), whatever output_router_logits says: each as the model's own loss."""
    config = transformers.AutoConfig.for_model(model_type)
    for key, value in _SMALL_MOE.items():
        if hasattr(config, key):
            setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().train()
    input_ids, attention_mask, labels = batch()
    _assert_same_loss_and_grads(model, lambda: model(input_ids=input_ids, attention_mask=attention_mask,
                                                     labels=labels))


@pytest.mark.parametrize("arch", ["gemma3", "qwen2_5_vl"])
def test_a_vision_language_model_with_images(arch):
    """Image tokens with pixel_values (Qwen2.5-VL's image grid too) reach the vision tower through the fused loss as
    through the model's own forward: same loss and gradients, the vision tower's included, and the output keeps the
    body's image features."""
    model = image_model(arch).train()
    input_ids, attention_mask, labels, vision = _image_inputs(arch, model, torch.Generator().manual_seed(0))
    kept = _assert_same_loss_and_grads(model, lambda: model(input_ids=input_ids, attention_mask=attention_mask,
                                                            labels=labels, **vision))
    # the body's image features, as the model's own output has them (Qwen2.5-VL's from transformers 5.24 on)
    assert kept or arch == "qwen2_5_vl" and Version(transformers.__version__) < Version("5.24")


def test_a_vision_language_moe_reads_its_load_balancing_settings_from_its_text_config():
    """Qwen3-VL-MoE's forward reads output_router_logits, router_aux_loss_coef, num_experts and num_experts_per_tok
    from its text config (its top-level config has none): the fused loss adds the same load-balancing term."""
    text = dict(TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, output_router_logits=True,
                router_aux_loss_coef=0.3)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    config = transformers.AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=vision,
                                               image_token_id=V - 1, vision_start_token_id=V - 2,
                                               vision_end_token_id=V - 3)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config).float().train()
    input_ids, attention_mask, labels = batch()
    own = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert own.aux_loss is not None
    _assert_same_loss_and_grads(model, lambda: model(input_ids=input_ids, attention_mask=attention_mask,
                                                     labels=labels))
    fused = install_fused_loss(model)(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(fused.aux_loss, own.aux_loss, atol=1e-6, rtol=1e-6)


def test_calls_the_fused_loss_leaves_to_the_model_own_forward():
    """A loss_function of the caller's (transformers lets a model take one), TRL's own trainers' fused_lm_head calls,
    and shift_labels without labels (the model's own forward computes no loss then)."""
    model = install_fused_loss(tiny_model("qwen2").train())
    input_ids, attention_mask, labels = batch()
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    assert model(input_ids=input_ids, attention_mask=attention_mask, shift_labels=shifted).loss is None
    own_loss_function = model.loss_function
    model.loss_function = lambda logits, labels, **kw: own_loss_function(logits, labels, **kw) + 1.0
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits is not None
    del model._loss_function
    fused = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert fused.logits is None
    torch.testing.assert_close(out.loss, fused.loss + 1.0, atol=1e-5, rtol=1e-5)
    # the model's own forward (which TRL's trainers patch to take it; unpatched it drops the keyword)
    assert model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True).logits \
        is not None


def test_the_output_keeps_the_body_outputs_asked_for():
    model = install_fused_loss(tiny_model("qwen2").train())
    input_ids, attention_mask, labels = batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
    assert out.logits is None and len(out.hidden_states) == model.config.num_hidden_layers + 1
    remove_fused_loss(model)
    own = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
    for got, want in zip(out.hidden_states, own.hidden_states):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_shift_labels_are_taken_over_labels_as_the_model_takes_them():
    """transformers.Trainer passes both under context parallelism; the model's own loss reads shift_labels."""
    model = tiny_model("qwen2").train()
    input_ids, attention_mask, labels = batch()
    shifted = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)  # other targets than the labels'
    _assert_same_loss_and_grads(model, lambda: model(input_ids=input_ids, attention_mask=attention_mask,
                                                     labels=labels, shift_labels=shifted))


def test_a_prefix_in_past_key_values_runs_the_model_own_forward():
    """PEFT prefix tuning passes its prefix as past_key_values to the base model's forward: a fused installed on
    that base model leaves such calls to the model's own forward (the prefix is not lost); on the PEFT model itself
    prompt learning raises at install."""
    peft = pytest.importorskip("peft")
    base = tiny_model("qwen2").train()
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    input_ids, attention_mask, labels = batch()
    want = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    install_fused_loss(model.get_base_model())
    got = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert got.logits is not None  # the model's own forward
    torch.testing.assert_close(got.loss, want.loss, atol=0, rtol=0)
    with pytest.raises(ValueError, match="prompt learning"):
        install_fused_loss(model)


@pytest.mark.parametrize("on", ["peft_model", "base_model"])
def test_a_lora_head_installed_on_the_peft_model_or_its_base(on):
    peft = pytest.importorskip("peft")
    base = tiny_model("qwen2").train()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    input_ids, attention_mask, labels = batch()
    target = model if on == "peft_model" else model.get_base_model()
    want = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    want_grads = _grads(model, want.loss)
    install_fused_loss(target)
    got = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    for g, w in zip(_grads(model, got.loss), want_grads):
        torch.testing.assert_close(g, w, atol=1e-6 + 2e-5 * w.abs().max().item(), rtol=0)


def test_other_calls_run_the_model_own_forward():
    """Evaluation (logits for metrics), a call without labels, inputs_embeds and return_dict=False are the model's
    own forward; remove_fused_loss gives the class's forward back."""
    model = tiny_model("qwen2")
    input_ids, attention_mask, labels = batch()
    install_fused_loss(model)
    model.eval()
    assert model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits.shape == (3, 12, V)
    model.train()
    assert model(input_ids=input_ids, attention_mask=attention_mask).logits is not None
    embeds = model.get_input_embeddings()(input_ids)
    assert model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).logits is not None
    assert model(input_ids=input_ids, labels=labels, return_dict=False)[1].shape == (3, 12, V)
    with pytest.raises(ValueError, match="already applied"):
        install_fused_loss(model)
    remove_fused_loss(model)
    assert "forward" not in vars(model)
    with pytest.raises(ValueError, match="was not applied"):
        remove_fused_loss(model)


def test_evaluation_fuses_the_eval_mode_calls_with_labels_when_asked():
    """evaluation=True: in eval mode (no gradient) a call with labels gives the model's own loss without logits;
    a call without labels is the model's own; the option is a bool."""
    model = tiny_model("qwen2").eval()
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        install_fused_loss(model, evaluation=True)
        got = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        assert got.logits is None and want.logits is not None
        torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
        assert model(input_ids=input_ids, attention_mask=attention_mask).logits is not None
        assert _warnings_of(lambda: model(input_ids=input_ids, attention_mask=attention_mask)) == []  # expected
    with pytest.raises(TypeError, match="evaluation must be a bool"):
        install_fused_loss(tiny_model("qwen2"), evaluation="yes")


def test_trainer_evaluate_with_evaluation_gives_the_model_own_eval_loss(tmp_path):
    """Trainer.evaluate without a compute_metrics reads the loss alone: under evaluation=True its eval_loss is
    the model's own, with no logits built."""
    data = _trainer_dataset(B=4)

    def evaluate(model):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[],
                                              use_cpu=True)
        return transformers.Trainer(model=model, args=args, eval_dataset=data).evaluate()["eval_loss"]

    model = tiny_model("qwen2", seed=3)
    want = evaluate(model)
    logits = []
    install_fused_loss(model, evaluation=True).register_forward_hook(lambda m, a, out: logits.append(out.logits))
    assert evaluate(model) == pytest.approx(want, rel=1e-5)
    assert logits == [None, None]  # two fused batches


def _warnings_of(call):
    """The install's warnings of ``call()``, each pointing at the line that called the model (this file)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    ours = [w for w in caught if "install_fused_loss" in str(w.message)]
    assert all(w.filename == __file__ for w in ours), [w.filename for w in ours]
    return [str(w.message) for w in ours]


@pytest.mark.parametrize("case", ["no-labels", "inputs_embeds", "loss_function", "return_dict"])
def test_a_training_call_that_builds_the_logits_warns_once(case):
    """The training calls left to the model's own forward that build the full logits warn (the install saves nothing
    there), once per model; evaluation, generation, logits_to_keep, TRL's fused_lm_head and a fused call do not."""
    model = install_fused_loss(tiny_model("qwen2").train())
    input_ids, attention_mask, labels = batch()
    quiet = [lambda: model(input_ids=input_ids, attention_mask=attention_mask, labels=labels),
             lambda: model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1),
             lambda: model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True),
             lambda: model.generate(input_ids=input_ids[:1, :4], max_new_tokens=3, do_sample=False),
             lambda: model.eval()(input_ids=input_ids, attention_mask=attention_mask)]
    for call in quiet:
        assert _warnings_of(call) == []
    model.train()
    if case == "loss_function":
        own_loss_function = model.loss_function
        model.loss_function = lambda logits, labels, **kw: own_loss_function(logits, labels, **kw)
    call = {"no-labels": lambda: model(input_ids=input_ids, attention_mask=attention_mask),
            "inputs_embeds": lambda: model(inputs_embeds=model.get_input_embeddings()(input_ids), labels=labels),
            "loss_function": lambda: model(input_ids=input_ids, attention_mask=attention_mask, labels=labels),
            "return_dict": lambda: model(input_ids=input_ids, labels=labels, return_dict=False)}[case]
    reason = {"no-labels": "no labels", "inputs_embeds": "inputs_embeds in place of input_ids",
              "loss_function": "a loss_function of the caller's", "return_dict": "return_dict=False"}[case]
    first = _warnings_of(call)
    assert len(first) == 1 and "Qwen2ForCausalLM ran its own forward" in first[0] and reason in first[0]
    assert _warnings_of(call) == []  # once per model


def _packed_row(start=0):
    """One row of three sequences, position_ids restarting at ``start``, labels -100 at each first token (as
    DataCollatorWithFlattening writes them)."""
    g = torch.Generator().manual_seed(11)
    lengths = [5, 1, 6]
    input_ids = torch.randint(1, V - 4, (1, sum(lengths)), generator=g)  # text (image_model's own ids are above)
    position_ids = torch.cat([torch.arange(n) + start for n in lengths])[None]
    labels = input_ids.masked_fill(position_ids == start, -100)
    return input_ids, position_ids, labels


def _each_sequence_alone(model, input_ids, position_ids, labels):
    """The mean loss over the scored labels of a packed row's sequences (``position_ids`` from 0), each run alone."""
    bounds = (position_ids[0] == 0).nonzero().flatten().tolist() + [input_ids.shape[1]]
    total = sum(causal_lm_loss(model, input_ids[:, a:b], labels=labels[:, a:b]) * (labels[:, a + 1:b] != -100).sum()
                for a, b in zip(bounds, bounds[1:]) if (labels[:, a + 1:b] != -100).any())
    return total / (labels[:, 1:] != -100).sum()


@pytest.mark.parametrize("start", [0, 1], ids=["from-0", "from-1"])
def test_packed_rows_are_each_sequence_alone(start):
    """Packed rows (position_ids restarting, no attention_mask, as DataCollatorWithFlattening writes them): the
    fused loss and gradients equal the model's own forward without a cache, and each sequence's loss alone."""
    model = tiny_model("qwen2").train()
    model.config.use_cache = False  # as transformers.Trainer sets it
    input_ids, position_ids, labels = _packed_row(start)
    _assert_same_loss_and_grads(model, lambda: model(input_ids=input_ids, position_ids=position_ids, labels=labels))
    install_fused_loss(model)
    fused = model(input_ids=input_ids, position_ids=position_ids, labels=labels).loss
    torch.testing.assert_close(fused, _each_sequence_alone(model, input_ids, position_ids - start, labels))


def test_packed_multimodal_position_ids_split_only_with_the_text_positions_first():
    """Qwen2.5-VL's multimodal rotary ids: [3, B, T] (temporal, height, width) of packed rows would let each sequence
    attend to the ones before it (transformers builds the packed mask from [4, B, T] ids alone, text positions
    first), so they raise; [4, B, T] ids give each sequence's loss alone; [3, B, T] ids of one sequence per row are
    scored."""
    model = install_fused_loss(image_model("qwen2_5_vl").train())
    model.config.use_cache = False
    input_ids, position_ids, labels = _packed_row()
    rope = position_ids.expand(3, 1, -1)
    with pytest.raises(ValueError, match=r"position_ids \[3, B, T\] restart within a row"):
        model(input_ids=input_ids, position_ids=rope, labels=labels)
    with pytest.raises(ValueError, match=r"position_ids \[3, B, T\] restart within a row"):
        causal_lm_loss(model, input_ids, labels=labels, position_ids=rope)
    fused = model(input_ids=input_ids, position_ids=torch.cat([position_ids[None], rope]), labels=labels).loss
    torch.testing.assert_close(fused, _each_sequence_alone(model, input_ids, position_ids, labels))
    one = torch.arange(input_ids.shape[1])[None].expand(3, 1, -1)
    assert torch.isfinite(model(input_ids=input_ids, position_ids=one, labels=labels).loss)
    video = one.clone()  # a video's temporal ids jump ahead of the text after it (get_rope_index): one sequence
    video[0, 0, 5:] = torch.tensor([8, 5, 6, 7, 8, 9, 10])
    assert torch.isfinite(model(input_ids=input_ids, position_ids=video, labels=labels).loss)
    opening = one.clone()  # a video opening the row, two frames of 1 x 2 patches at a frame spacing below 1
    opening[:, 0, :4] = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]])
    assert torch.isfinite(model(input_ids=input_ids, position_ids=opening, labels=labels).loss)


def test_packed_multimodal_position_ids_of_a_recurrent_body_raise():
    """Qwen3.5's [4, B, T] ids split its attention at the text positions, but its Gated DeltaNet layers carry their
    state from one packed sequence into the next: packed rows raise, whatever the ids' shape."""
    fields, _ = COMPOSITE_ARCHS["qwen3_5"]
    model = _composite_model("qwen3_5", fields, **VISION["qwen3_5"][0]).train()
    input_ids, position_ids, labels = _packed_row()
    rope = position_ids.expand(3, 1, -1)
    for ids in (position_ids, torch.cat([position_ids[None], rope])):
        with pytest.raises(ValueError, match="carries its recurrent"):
            causal_lm_loss(model, input_ids, labels=labels, position_ids=ids)
    with pytest.raises(ValueError, match=r"position_ids \[3, B, T\] restart within a row"):
        causal_lm_loss(model, input_ids, labels=labels, position_ids=rope)


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_5_vl"])
def test_packed_rows_with_a_cache_on_warn_once(arch):
    """With use_cache on (the text config's, or given) the model's own training forward builds a cache, and
    transformers then lets each packed sequence attend to the ones before it; the fused loss keeps them apart (its
    loss is the model's own without a cache) and warns of the difference once: not for unpacked rows, nor under
    gradient checkpointing, which turns the cache off. A vision-language model's text config keeps its own
    use_cache (transformers.Trainer sets the top config's): the warning names it."""
    model = (tiny_model("qwen2") if arch == "qwen2" else image_model(arch)).train()
    install_fused_loss(model)
    input_ids, position_ids, labels = _packed_row()

    def rotary(ids):  # a vision-language model's [4, B, T] ids, the text positions first
        return ids if arch == "qwen2" else torch.cat([ids[None], ids.expand(3, 1, -1)])

    position_ids = rotary(position_ids)
    model.config.use_cache = False
    model.config.get_text_config().use_cache = True
    call = lambda ids=position_ids, **kw: model(input_ids=input_ids, position_ids=ids, labels=labels,  # noqa: E731
                                                **kw)
    assert _warnings_of(lambda: call(rotary(torch.arange(input_ids.shape[1])[None]))) == []  # unpacked
    first = _warnings_of(call)
    assert len(first) == 1 and "model.config.get_text_config().use_cache = False" in first[0]
    assert _warnings_of(call) == []  # once per model
    model.config.get_text_config().use_cache = False
    fresh = install_fused_loss(remove_fused_loss(model))
    assert _warnings_of(lambda: call(use_cache=False)) == [] and _warnings_of(call) == []
    assert len(_warnings_of(lambda: call(use_cache=True))) == 1  # asked for
    want = remove_fused_loss(fresh)(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False)
    torch.testing.assert_close(install_fused_loss(model)(input_ids=input_ids, position_ids=position_ids,
                                                         labels=labels, use_cache=True).loss,
                               want.loss, atol=1e-5, rtol=1e-5)
    checkpointed = install_fused_loss(remove_fused_loss(model))
    checkpointed.config.get_text_config().use_cache = True
    checkpointed.gradient_checkpointing_enable()
    assert _warnings_of(call) == []


def test_trainer_label_smoothing_warns_that_the_install_saves_nothing(tmp_path):
    """transformers.Trainer's label smoothing takes the labels out of the batch and smooths the model's logits: its
    steps run the model's own forward, and the install says so."""
    data = _trainer_dataset()
    model = install_fused_loss(tiny_model("qwen2"))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                                          label_smoothing_factor=0.1, report_to=[], use_cpu=True,
                                          save_strategy="no")
    with pytest.warns(UserWarning, match="no labels: the loss is computed outside the model"):
        transformers.Trainer(model=model, args=args, train_dataset=data).train()


def test_a_copy_computes_with_its_own_weights():
    """A deep copy (a frozen reference model) and an unpickled model run the fused loss of their own weights."""
    model = install_fused_loss(tiny_model("qwen2").train())
    input_ids, attention_mask, labels = batch()

    def loss(m):
        return m(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    before = loss(model)
    copied, unpickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(loss(unpickled), before, atol=0, rtol=0)
    with torch.no_grad():
        copied.get_output_embeddings().weight.mul_(2.0)
    assert not torch.equal(loss(copied), before)
    torch.testing.assert_close(loss(model), before, atol=0, rtol=0)


def test_causal_lm_loss_takes_shift_labels_and_checks_its_inputs():
    model = tiny_model("qwen2").train()
    input_ids, attention_mask, labels = batch()
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    want = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    got = causal_lm_loss(model, input_ids, attention_mask, shift_labels=shifted)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="labels or shift_labels"):
        causal_lm_loss(model, input_ids, attention_mask)
    with pytest.raises(ValueError, match="labels must have the shape"):
        causal_lm_loss(model, input_ids, attention_mask, labels=labels[:, 1:])


def test_an_architecture_without_a_known_head_transform_raises_at_install():
    model = tiny_model("qwen2")
    model.config.model_type = "my_own_lm"
    with pytest.raises(ValueError, match="my_own_lm"):
        install_fused_loss(model)


@pytest.mark.parametrize("model_class", ["LlamaForSequenceClassification", "LlamaForTokenClassification",
                                         "LlamaModel", "GPT2DoubleHeadsModel"])
def test_a_model_that_is_not_a_causal_lm_raises_at_install(model_class):
    """A classifier, a bare body or a second head would fail (or score the wrong head) at the first training step:
    refused at install, naming the class."""
    config_class = transformers.GPT2Config if model_class.startswith("GPT2") else transformers.LlamaConfig
    config = config_class(vocab_size=V, hidden_size=32, n_embd=32, intermediate_size=64, num_hidden_layers=1,
                          n_layer=1, num_attention_heads=4, n_head=4, num_key_value_heads=4, pad_token_id=0)
    model = getattr(transformers, model_class)(config)
    with pytest.raises(ValueError, match=f"{model_class} is not a causal LM"):
        install_fused_loss(model)


@pytest.mark.parametrize("under_peft", [False, True], ids=["model", "peft_model"])
def test_a_wrapped_model_raises_naming_the_order(under_peft):
    """Installed on torch.compile's module (or DDP's) rather than on the model it wraps, a PEFT model too (the
    compiled module hands get_base_model through): raises, saying to install first (install, then wrap, is what
    the distributed test and Trainer's torch_compile run)."""
    model = tiny_model("qwen2")
    if under_peft:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="OptimizedModule wraps the model .*before wrapping"):
        install_fused_loss(torch.compile(model))


def test_a_causal_lm_of_its_own_installs_once_its_head_transform_is_stated(monkeypatch):
    """A remote-code causal LM whose class is named like none of transformers' (MiniCPM-V's, InternVL-Chat's) is
    the caller's to state: refused until its head transform is registered, then the model's own loss."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from fastalign.integrations.hf import head_transforms, register_head_transform

    monkeypatch.setattr(head_transforms, "HEAD_TRANSFORMS", dict(head_transforms.HEAD_TRANSFORMS))
    monkeypatch.setattr(head_transforms, "_STATED", set())

    class ChatModel(transformers.Qwen2PreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.model = transformers.Qwen2Model(config)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            logits = self.lm_head(self.model(input_ids, attention_mask=attention_mask).last_hidden_state)
            loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**TINY, attn_implementation="eager")
    config.model_type = "chat_of_its_own"
    model = ChatModel(config).train()
    with pytest.raises(ValueError, match="ChatModel is not a causal LM.*register_head_transform"):
        install_fused_loss(model)
    register_head_transform("chat_of_its_own")
    input_ids, attention_mask, labels = batch()
    _assert_same_loss_and_grads(model, lambda: model(input_ids=input_ids, attention_mask=attention_mask,
                                                     labels=labels))


def test_a_partitioned_head_weight_raises_naming_the_gather():
    """DeepSpeed ZeRO-3 leaves an empty tensor in a partitioned parameter outside its module's forward, which the
    fused loss does not call: the step raises naming GatheredParameters, not a shape error deep in a kernel."""
    model = install_fused_loss(tiny_model("qwen2").train())
    model.lm_head.weight.data = torch.empty(0)  # what ZeRO-3 leaves between gathers
    input_ids, attention_mask, labels = batch()
    with pytest.raises(ValueError, match="GatheredParameters"):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@pytest.fixture
def accelerate():
    """accelerate, its process-wide state cleared before and after (a Trainer of another test sets it up without
    mixed precision, which a bf16 Accelerator may not change), as accelerate's own tests clear it."""
    accelerate = pytest.importorskip("accelerate")
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    yield accelerate
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_mixed_precision_wraps_the_fused_forward_not_the_other_way(accelerate):
    """accelerate's prepare(bf16) wraps the model's forward in its autocast: installed first, the fused loss runs
    under it, as the model's own loss would; installed after, the autocast would not reach it, so that raises, and
    so do a second install and a removal through the wrapper (unwrap_model(keep_fp32_wrapper=False) first)."""
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    input_ids, attention_mask, labels = batch()
    own, fused = tiny_model("qwen2").train(), install_fused_loss(tiny_model("qwen2").train())
    own, fused = accelerator.prepare(own), accelerator.prepare(fused)
    want = own(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    dtypes = []
    fused.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    got = fused(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert got.logits is None and dtypes == [torch.bfloat16]  # the body ran under the autocast
    torch.testing.assert_close(got.loss, want, atol=2e-2, rtol=0)  # both bf16 bodies
    with pytest.raises(ValueError, match="already applied"):
        install_fused_loss(fused)
    with pytest.raises(ValueError, match="keep_fp32_wrapper=False"):
        remove_fused_loss(fused)
    with pytest.raises(ValueError, match="mixed-precision wrapper"):
        install_fused_loss(own)
    remove_fused_loss(accelerator.unwrap_model(fused, keep_fp32_wrapper=False))
    assert fused(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits is not None


def test_trainer_steps_equal_the_model_own_forward(tmp_path):
    """transformers.Trainer, two optimizer steps of two accumulated micro-batches (num_items_in_batch): the logged
    losses and the trained weights equal those of the model's own forward (SGD: Adam's first steps would magnify
    the float rounding of the gradients into its step size)."""
    data = _trainer_dataset(B=8)

    def train(fused):
        model = tiny_model("qwen2", seed=3)
        if fused:
            install_fused_loss(model)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(fused)), per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, max_steps=2, learning_rate=0.1,
                                              optim="sgd", logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                              save_strategy="no", dataloader_drop_last=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return losses, [p.detach().clone() for p in model.parameters()]

    own_losses, own_weights = train(False)
    fused_losses, fused_weights = train(True)
    assert len(own_losses) == 2
    assert fused_losses == pytest.approx(own_losses, rel=1e-5)
    for got, want in zip(fused_weights, own_weights):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
