"""The TRL drop-in trainers on batches with images, against TRL 1.16's own trainers.

Tiny vision-language models (Gemma 3: pixel values per image and token types; Qwen2.5-VL: patches per image
grid and multimodal rotary positions; InternVL and LFM2-VL: tiles per image, LFM2-VL's with their patch masks
and shapes) saved with the word-level tokenizer of the trainer tests. Each trainer of
the drop-in and of TRL is built on the same checkpoint; the same batch with images (rows of zero, one and two
images) goes through TRL's methods and the drop-in's: the log-probs and entropies in chunks of rows (the old
policy's and the reference's), the loss with its metrics and every parameter's gradient. Other pixels give other
values, so vision inputs dropped on the way fail.
"""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the TRL drop-ins need transformers")
trl = pytest.importorskip("trl", reason="TRL is not importable")
datasets = pytest.importorskip("datasets", reason="TRL's trainers need datasets")

import fastalign.integrations.trl as fa_trl  # noqa: E402
from fastalign.integrations.trl._vision import row_chunks, vision_inputs  # noqa: E402
from test_integration_trl_trainers import (WORDS, _common, _compare, _config_class, _dpo_dataset,  # noqa: E402
                                           _even_share, _grpo_dataset, _kto_dataset, _reward, _run,
                                           _save_beside_tokenizer, _sft_dataset, _tokenizer, _trl_trainer,
                                           tiny_checkpoint, word_tokenizer)
from tiny_configs import VISION, gemma3_vision  # noqa: E402

V = len(WORDS)
TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
            eos_token_id=1, bos_token_id=None)
#: architecture -> (its config fields: a vision tower and image token ids; its text config's fields); the layout of
#: their pixels: per image (Gemma 3), per patch (Qwen2.5-VL), per tile (InternVL: one token a tile; LFM2-VL: four,
#: with each tile's patch mask and shape)
VLMS = {"gemma3": (gemma3_vision(V), {}),
        "qwen2_5_vl": (dict(VISION["qwen2_5_vl"][0], image_token_id=V - 1, vision_start_token_id=V - 2,
                            vision_end_token_id=V - 3), VISION["qwen2_5_vl"][1]),
        "internvl": (dict(VISION["internvl"][0], image_token_id=V - 1), VISION["internvl"][1]),
        "lfm2_vl": (dict(VISION["lfm2_vl"][0], image_token_id=V - 1), VISION["lfm2_vl"][1])}
#: images of each row of a batch of four (a row without, one with two)
NUM_IMAGES = [1, 0, 2, 1]


@pytest.fixture(scope="module", params=list(VLMS))
def vlm(request, tmp_path_factory):
    """``(arch, checkpoint)``: a tiny vision-language model (its ForConditionalGeneration class) with the word-level
    tokenizer, its head and image projection drawn at unit scale (Gemma 3's projection starts at zero: every image
    would give the same features)."""
    arch = request.param
    tower, text = VLMS[arch]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(arch, text_config={**TEXT, **text}, pad_token_id=0, eos_token_id=1,
                                               tie_word_embeddings=False, **tower)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.3)
        if arch == "gemma3":
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 1.0)
    words = tiny_checkpoint(tmp_path_factory.mktemp("words"))
    return arch, _save_beside_tokenizer(model, tmp_path_factory.mktemp(f"tiny-{arch}"), words)


def _image_tokens(arch, config, grid) -> list:
    """The prompt tokens of one image (Gemma 3: its image tokens; Qwen2.5-VL: one token per 2x2 patches of its
    grid between its vision start and end tokens; InternVL and LFM2-VL: one and four tokens per tile, one tile per
    2x2 patches)."""
    if arch == "gemma3":
        return [config.image_token_id] * config.mm_tokens_per_image
    if arch in ("internvl", "lfm2_vl"):
        return [config.image_token_id] * (int(torch.tensor(grid).prod()) // 4) * (4 if arch == "lfm2_vl" else 1)
    merged = int(torch.tensor(grid).prod()) // 4
    return [config.vision_start_token_id] + [config.image_token_id] * merged + [config.vision_end_token_id]


def _prompts(arch, config, seed, num_images):
    """``(prompt_ids [R, P] left-padded, prompt_mask, vision inputs)`` of ``R`` prompts with ``num_images[r]`` images
    each, words around them, the pixels drawn from ``seed``."""
    pixels = torch.Generator().manual_seed(seed)
    grids = [[1, 2, 2], [1, 2, 4]]
    rows, grid_rows = [], []
    for r, n in enumerate(num_images):
        row = [3 + r, 4 + r]
        for i in range(n):
            grid = grids[(r + i) % 2]
            grid_rows.append(grid)
            row += _image_tokens(arch, config, grid) + [10 + i]
        rows.append(row)
    width = max(map(len, rows))
    prompt_ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    prompt_mask = (torch.arange(width) >= torch.tensor([width - len(row) for row in rows])[:, None]).long()
    if arch == "gemma3":
        vision = dict(pixel_values=torch.randn(sum(num_images), 3, 28, 28, generator=pixels))
    elif arch in ("internvl", "lfm2_vl"):  # its images' tiles, counted per row
        tiles = [int(torch.tensor(grid).prod()) // 4 for grid in grid_rows]
        per_row = [sum(tiles[sum(num_images[:r]):sum(num_images[:r + 1])]) for r in range(len(num_images))]
        if arch == "internvl":
            vision = dict(pixel_values=torch.randn(sum(tiles), 3, 28, 28, generator=pixels), num_tiles=per_row)
        else:  # 4x4 patches of 14 pixels a tile, flattened, with their mask and shape
            vision = dict(pixel_values=torch.randn(sum(tiles), 16, 3 * 14 * 14, generator=pixels),
                          pixel_attention_mask=torch.ones(sum(tiles), 16, dtype=torch.long),
                          spatial_shapes=torch.tensor([[4, 4]] * sum(tiles)), num_tiles=per_row)
    else:
        patch = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2
        grid = torch.tensor(grid_rows)
        vision = dict(pixel_values=torch.randn(int(grid.prod(-1).sum()), patch, generator=pixels), image_grid_thw=grid)
    return prompt_ids, prompt_mask, dict(vision, num_images=list(num_images))


def _rows(arch, config, num_images, completions, seed=0) -> dict:
    """Rows of a prompt with ``num_images[r]`` images and the completion ``completions[r]`` (0: padding): the
    prompts, completions, their concatenation (``input_ids``, ``attention_mask``) and its vision inputs (Gemma 3:
    with its token types: image tokens attend to each other both ways)."""
    prompt_ids, prompt_mask, vision = _prompts(arch, config, seed, num_images)
    completion_ids = torch.tensor(completions)
    completion_mask = (completion_ids != 0).long()
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    if arch == "gemma3":
        vision["token_type_ids"] = (input_ids == config.image_token_id).long()
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, input_ids=input_ids,
                attention_mask=torch.cat([prompt_mask, completion_mask], 1), **vision)


def _online_batch(arch, config, seed=0) -> dict:
    """An online trainer's batch of four completions (one padded) after prompts with NUM_IMAGES images."""
    batch = _rows(arch, config, NUM_IMAGES, [[20, 21, 22, 23, 1], [24, 25, 26, 1, 0], [27, 28, 29, 30, 31],
                                             [32, 1, 0, 0, 0]], seed)
    return dict(batch, advantages=torch.tensor([0.7, -0.4, 1.1, -1.4]),
                old_logps=torch.tensor([-9.0, -7.5, -11.0, -3.0]),
                num_items_in_batch=batch["completion_mask"].sum())


def _close(ours, theirs, what):
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5, msg=lambda m: f"{what}: {m}")


def _metrics(trainer) -> dict:
    """The training metrics a trainer logged (none for the SFT, GOLD and Distillation trainers' losses)."""
    return dict(getattr(trainer, "_metrics", {}).get("train", {}))


def _assert_same_step(theirs, ours, losses) -> None:
    """Ours gives TRL's ``losses``, its logged metrics and the gradient of every parameter (the head's not 0)."""
    _close(losses["ours"], losses["theirs"], "loss")
    t_metrics, o_metrics = _metrics(theirs), _metrics(ours)
    assert sorted(o_metrics) == sorted(t_metrics)
    for name, values in t_metrics.items():
        assert o_metrics[name] == pytest.approx(values, rel=1e-4, abs=2e-5), name
    t_params = dict(theirs.model.named_parameters())
    for name, param in ours.model.named_parameters():
        if t_params[name].grad is None:
            assert param.grad is None or not param.grad.any(), name
        else:
            _close(param.grad, t_params[name].grad, f"gradient of {name}")
    assert ours.model.get_output_embeddings().weight.grad.abs().max() > 0


def _build(kind, cls, checkpoint, out):
    args = _config_class(kind)(**_common(out, per_device_train_batch_size=4, num_generations=4,
                                         max_completion_length=5, temperature=0.9))
    return cls(model=checkpoint, reward_funcs=_reward, args=args, train_dataset=_grpo_dataset(),
               processing_class=_tokenizer(checkpoint))


@pytest.mark.parametrize("kind", ["GRPO", "RLOO", "GMPO"])
def test_online_trainers_take_images_as_trl(vlm, kind, tmp_path):
    """GRPO, RLOO and GMPO on a batch with images: the log-probs and entropies in chunks of one to four rows (the
    images of each chunk go with it; a chunk of a row without images has none), the loss, its metrics and every
    gradient equal TRL's."""
    arch, checkpoint = vlm
    theirs = _build(kind, _trl_trainer(kind), checkpoint, tmp_path / "trl")
    ours = _build(kind, getattr(fa_trl, f"{kind}Trainer"), checkpoint, tmp_path / "fa")
    inputs = _online_batch(arch, theirs.model.config)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "token_type_ids", "num_images", "num_tiles",
                                      "pixel_attention_mask", "spatial_shapes") if k in inputs}
    scored = inputs["completion_mask"].bool()
    whole = None
    for size in (None, 3, 2, 1):  # TRL's chunks of one row fail on a row without images: against its whole batch
        with torch.no_grad():
            if size != 1:
                theirs_lp = theirs._get_per_token_logps_and_entropies(theirs.model, ids, attention, 5, batch_size=size,
                                                                       compute_entropy=True, **vision)
                whole = whole or theirs_lp
            o_lp, o_ent, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, attention, 5, batch_size=size,
                                                                      compute_entropy=True, **vision)
        t_lp, t_ent, _ = theirs_lp if size != 1 else whole
        _close(o_lp[scored], t_lp[scored], f"log-probs in chunks of {size}")
        _close(o_ent[scored], t_ent[scored], f"entropies in chunks of {size}")
    with torch.no_grad():  # other pixels, other log-probs: the images reach the vision tower
        other = dict(vision, pixel_values=_online_batch(arch, theirs.model.config, seed=1)["pixel_values"])
        o_other = ours._get_per_token_logps_and_entropies(ours.model, ids, attention, 5, **other)[0]
    assert (o_other - o_lp)[scored].abs().max() > 1e-3
    if kind == "GMPO" and "num_tiles" in inputs:  # TRL's GMPO loss leaves num_tiles out: its tiles do not match
        return
    inputs["old_per_token_logps"] = t_lp + 0.05 * torch.arange(5)  # off the policy: the clip acts
    losses = {}
    for name, trainer in (("theirs", theirs), ("ours", ours)):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop
        losses[name] = trainer._compute_loss(trainer.model, inputs)
        losses[name].backward()
    _assert_same_step(theirs, ours, losses)


def test_chunks_of_rows_take_their_own_images():
    """Each layout of vision inputs split by rows: per row, per image (``num_images``, with rows of none), per tile
    (``num_tiles``) and per patch (``image_grid_thw``); the chunks concatenated give the whole batch back."""
    grid = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 4, 4], [1, 2, 2]])
    images = [1, 0, 2, 1]
    layouts = {  # the inputs (with the counts of each row) -> the entries of each row in each of them
        "rows": (dict(pixel_values=torch.randn(4, 3), token_type_ids=torch.arange(16).view(4, 4),
                      num_images=[1, 1, 1, 2]), {}),
        "images": (dict(pixel_values=torch.randn(4, 3), image_sizes=torch.arange(8).view(4, 2), num_images=images),
                   {"pixel_values": images, "image_sizes": images}),
        "tiles": (dict(pixel_values=torch.randn(6, 3), spatial_shapes=torch.arange(12).view(6, 2),
                       pixel_attention_mask=torch.ones(6, 5), num_tiles=[2, 1, 0, 3], num_images=images),
                  {k: [2, 1, 0, 3] for k in ("pixel_values", "spatial_shapes", "pixel_attention_mask")}),
        "patches": (dict(pixel_values=torch.randn(32, 3), image_grid_thw=grid, num_images=images),
                    {"pixel_values": [4, 0, 24, 4], "image_grid_thw": images}),
    }
    for layout, (given, per_row) in layouts.items():
        vision = vision_inputs(given)
        for size in (1, 2, 3):
            chunks = list(row_chunks(vision, 4, size))
            for name, whole in given.items():
                if name in ("num_images", "num_tiles"):  # the counts: not the body's
                    assert all(name not in chunk for chunk in chunks)
                    continue
                torch.testing.assert_close(torch.cat([chunk[name] for chunk in chunks if name in chunk]), whole)
                counts = per_row.get(name, [1, 1, 1, 1])
                expected = [sum(counts[s:s + size]) for s in range(0, 4, size)]
                # a chunk of rows without images has no image inputs (one of no entries would fail in the body)
                assert [chunk[name].size(0) if name in chunk else 0 for chunk in chunks] == expected, (layout, name)
                assert all((name in chunk) == (n > 0) for chunk, n in zip(chunks, expected)), (layout, name)
    with pytest.raises(ValueError, match="num_images is needed"):
        next(row_chunks(vision_inputs(dict(pixel_values=torch.randn(32, 3), image_grid_thw=grid)), 4, 1))
    with pytest.raises(TypeError, match=r"unexpected arguments \['pixels'\]"):
        vision_inputs(dict(pixels=None))


def _pairs_batch(arch, config) -> dict:
    """DPO's batch of two pairs: the chosen completions, then the rejected ones, after the same two prompts (one and
    two images; each row holds its prompt's images), ``completion_mask`` over the whole rows."""
    rows = _rows(arch, config, [1, 2, 1, 2], [[20, 21, 22, 1], [23, 24, 1, 0], [25, 26, 1, 0], [27, 28, 29, 1]])
    rows["completion_mask"] = torch.cat([torch.zeros_like(rows["prompt_mask"]), rows["completion_mask"]], 1)
    return _batch_of(rows)


def _batch_of(rows: dict, *leave_out) -> dict:
    """What of :func:`_rows` an offline trainer's batch holds (no prompts and completions apart, no image counts),
    without ``leave_out``."""
    return {k: v for k, v in rows.items()
            if k not in ("prompt_ids", "prompt_mask", "completion_ids", "num_images", "num_tiles", *leave_out)}


def _kto_batch(arch, config) -> dict:
    """KTO's batch: two prompts (one and two images) with a desirable and an undesirable completion, and the KL
    completions (each prompt with the other's completion; their own token types)."""
    completions = [[20, 21, 22, 1], [23, 24, 1, 0]]
    rows, kl = (_rows(arch, config, [1, 2], c) for c in (completions, completions[::-1]))
    batch = _batch_of(rows)
    batch["completion_mask"] = torch.cat([torch.zeros_like(rows["prompt_mask"]), rows["completion_mask"]], 1)
    batch.update(KL_input_ids=kl["input_ids"], KL_attention_mask=kl["attention_mask"],
                 label=torch.tensor([True, False]),
                 KL_completion_mask=torch.cat([torch.zeros_like(kl["prompt_mask"]), kl["completion_mask"]], 1))
    if "token_type_ids" in kl:
        batch["KL_token_type_ids"] = kl["token_type_ids"]
    return batch


def _text_batch(arch, config) -> dict:
    """SFT's and GOLD's batch: rows with zero, one and two images, every token after the images a label."""
    rows = _rows(arch, config, [1, 0, 2], [[20, 21, 22, 1], [23, 24, 1, 0], [25, 26, 27, 28]])
    labels = rows["input_ids"].masked_fill(rows["attention_mask"] == 0, -100)
    labels[:, :rows["prompt_ids"].size(1)] = -100
    return dict(_batch_of(rows, "completion_mask"), labels=labels)


def _completions_batch(arch, config) -> dict:
    """DistillationTrainer's batch: prompts with zero, one and two images and their completions."""
    rows = _rows(arch, config, [1, 0, 2], [[20, 21, 22, 1], [23, 24, 1, 0], [25, 26, 27, 28]])
    return dict(rows, num_items_in_batch=rows["completion_mask"].sum().float())


def _offline(kind, checkpoint, out, ours):
    """A DPO, KTO, SFT or GOLD trainer (the drop-in with ``ours``, else TRL's) on ``checkpoint``, and its loss of a
    batch: ``compute_loss``'s (its metrics to the trainer's log)."""
    common = _common(out, per_device_train_batch_size=2)
    tokenizer = _tokenizer(checkpoint)
    cls = getattr(fa_trl, f"{kind}Trainer") if ours else _trl_trainer(kind)
    if kind in ("GOLD", "Distillation"):
        teacher = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint)
        with torch.no_grad():  # sharper than the student: a divergence of order one
            teacher.get_output_embeddings().weight.mul_(2.0)
        if kind == "Distillation":
            args, data = _config_class(kind)(**common, max_completion_length=4, beta=0.5), _grpo_dataset()
        else:
            from trl_runs import tokenized_completions
            args = _config_class(kind)(**common, max_completion_length=4, lmbda=0.0, beta=0.5, temperature=0.8)
            data = tokenized_completions(4)
        return cls(model=checkpoint, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer)
    data = {"DPO": _dpo_dataset, "KTO": _kto_dataset, "SFT": lambda: _sft_dataset("text")}[kind]
    return cls(model=checkpoint, args=_config_class(kind)(**common), train_dataset=data(), processing_class=tokenizer)


@pytest.mark.parametrize("kind", ["DPO", "KTO", "SFT", "GOLD", "Distillation"])
def test_offline_trainers_take_images_as_trl(vlm, kind, tmp_path):
    """DPO (pairs of completions after one prompt), KTO (with its KL completions and their reference), SFT, GOLD
    and Distillation (the teacher takes the student's images) on batches with images: the loss, its metrics and
    every gradient equal TRL's, and other pixels change the loss."""
    arch, checkpoint = vlm
    theirs, ours = (_offline(kind, checkpoint, tmp_path / name, name == "fa") for name in ("trl", "fa"))
    make = {"DPO": _pairs_batch, "KTO": _kto_batch, "Distillation": _completions_batch}.get(kind, _text_batch)
    inputs = make(arch, theirs.model.config)
    losses = {}
    for name, trainer in (("theirs", theirs), ("ours", ours)):
        trainer.model.train()
        batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        losses[name] = trainer.compute_loss(trainer.model, batch)
        losses[name].backward()
    _assert_same_step(theirs, ours, losses)
    with torch.no_grad():  # other pixels, another loss or log-probs: the images reach the vision tower
        other = dict(inputs, pixel_values=inputs["pixel_values"] + 1.0)
        changed = abs(float(ours.compute_loss(ours.model, other)) - float(losses["ours"]))
    for values in _metrics(ours).values():
        changed = max(changed, abs(values[-1] - values[0]))
    assert changed > 1e-4


# not LFM2-VL: TRL's Online DPO leaves its spatial_shapes out of the forward, where its own vision tower fails
@pytest.mark.parametrize("vlm", ["gemma3", "qwen2_5_vl", "internvl"], indirect=True)
def test_online_dpo_scores_completions_after_images_as_trl(vlm, tmp_path):
    """Online DPO's completions after prompts with images (no truncation of the prompt, as TRL's): the log-probs and
    their gradients equal TRL's ``_forward``."""
    arch, checkpoint = vlm
    trainers = [cls(model=transformers.AutoModelForImageTextToText.from_pretrained(checkpoint), reward_funcs=_reward,
                    train_dataset=_grpo_dataset(),
                    args=_config_class("OnlineDPO")(**_common(tmp_path / str(i), per_device_train_batch_size=2,
                                                              max_new_tokens=4, max_length=8)),
                    processing_class=_tokenizer(checkpoint))
                for i, cls in enumerate((_trl_trainer("OnlineDPO"), fa_trl.OnlineDPOTrainer))]
    rows = _rows(arch, trainers[0].model.config, [1, 2, 1, 2], [[20, 21, 1], [23, 1, 0], [25, 26, 27], [28, 0, 0]])
    vision = {k: v for k, v in rows.items() if k in ("pixel_values", "image_grid_thw")}
    scored = rows["completion_mask"].bool()
    results = []
    for trainer in trainers:
        trainer.model.eval()  # Gemma 3 asks for token types in training, which TRL's _forward does not pass
        lp = trainer._forward(trainer.model, rows["prompt_ids"], rows["prompt_mask"], rows["completion_ids"],
                              rows["completion_mask"], vision)
        lp[scored].sum().backward()
        results.append((lp, {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}))
    (t_lp, t_grads), (o_lp, o_grads) = results
    assert rows["input_ids"].size(1) > 8  # longer than max_length: not truncated with images
    _close(o_lp[scored], t_lp[scored], "log-probs")
    assert sorted(o_grads) == sorted(t_grads)
    for name, grad in t_grads.items():
        _close(o_grads[name], grad, f"gradient of {name}")


#: A vocabulary whose last three words are Gemma 3's image markers (its image token the last id, as gemma3_vision).
IMAGE_WORDS = WORDS[:-3] + ["<eoi>", "<boi>", "<img>"]
#: A chat template of plain words: each image part is ``<boi>``, which Gemma 3's processor expands to its image
#: tokens between its markers.
TEMPLATE = ("{%- for m in messages -%}{%- if m['content'] is string -%}{{ m['content'] }} {% else -%}"
            "{%- for p in m['content'] -%}{%- if p['type'] == 'image' -%}<boi> {% elif p['type'] == 'text' -%}"
            "{{ p['text'] }} {% endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}")


@pytest.fixture(scope="module")
def processor_checkpoint(tmp_path_factory):
    """A tiny Gemma 3 vision-language checkpoint with a processor (the word-level tokenizer with the image markers,
    a 28-pixel image processor, four tokens per image), as TRL's trainers load one from a model's name."""
    path = tmp_path_factory.mktemp("tiny-gemma3-processor")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("gemma3", text_config=TEXT, pad_token_id=0, eos_token_id=1,
                                               tie_word_embeddings=False, **gemma3_vision(V))
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.3)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 1.0)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    tokenizer = word_tokenizer(IMAGE_WORDS, boi_token="<boi>", image_token="<img>", eoi_token="<eoi>")
    transformers.Gemma3Processor(image_processor=transformers.Gemma3ImageProcessorPil(size={"height": 28, "width": 28}),
                                 tokenizer=tokenizer, chat_template=TEMPLATE, image_seq_length=4).save_pretrained(path)
    return str(path)


def _images(n, seed):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(seed)
    return [image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["GRPO", "GRPO-accumulated", "DPO", "KTO", "SFT"])
def test_training_on_images_matches_trl(processor_checkpoint, kind, tmp_path):
    """A training step on a dataset of prompts with images, through the model's processor as TRL reads it (GRPO:
    the completions generated after each image, a KL term; accumulated: two micro-batches of one generation, whose
    reference log-probs are taken in chunks of rows with their images; DPO: chosen and rejected completions of each
    image; KTO: desirable and undesirable completions, with the KL completions; SFT: conversations about an image):
    loss, metrics and update equal TRL's trainer's."""
    user = [[{"role": "user", "content": " ".join(f"w{(3 * i + j) % 50 + 3}" for j in range(2 + i % 3))}]
            for i in range(8)]
    if kind.startswith("GRPO"):
        data = datasets.Dataset.from_dict({"prompt": user, "image": _images(8, 0)})
        options = dict(num_generations=4, max_completion_length=5, temperature=1.0, beta=0.05)
        if kind == "GRPO-accumulated":
            options.update(gradient_accumulation_steps=2, per_device_train_batch_size=2)
        extra = dict(reward_funcs=_even_share)
    else:
        def said(words):
            return [{"role": "assistant", "content": words}]
        chosen = [said("w10 w11"), said("w12"), said("w20 w22"), said("w14")]
        if kind == "DPO":
            data = {"prompt": user[:4], "chosen": chosen,
                    "rejected": [said("w13"), said("w15 w16"), said("w17"), said("w18 w19")]}
        elif kind == "KTO":
            data = {"prompt": user[:4], "completion": chosen, "label": [True, False, True, False]}
        else:  # SFT: whole conversations
            data = {"messages": [u + c for u, c in zip(user[:4], chosen)]}
        data = datasets.Dataset.from_dict({**data, "image" if kind != "SFT" else "images": (
            _images(4, 1) if kind != "SFT" else [[image] for image in _images(4, 1)])})
        options, extra = {}, {}

    trainer = kind.split("-")[0]

    def build(cls, out):
        args = _config_class(trainer)(**_common(out, **{"per_device_train_batch_size": 4, **options}))
        processor = transformers.AutoProcessor.from_pretrained(processor_checkpoint)
        return cls(model=processor_checkpoint, args=args, train_dataset=data, processing_class=processor, **extra)

    theirs = _run(build(_trl_trainer(trainer), tmp_path / "trl"))
    ours = _run(build(getattr(fa_trl, f"{trainer}Trainer"), tmp_path / "fa"))
    assert theirs[0]["num_tokens@0"] > 4 * 4  # four image tokens a prompt
    _compare(theirs, ours)
