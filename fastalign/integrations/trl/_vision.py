"""Vision-language inputs of TRL's trainers' batches (GRPO, RLOO, GMPO, Distillation): the keywords TRL's log-prob
methods take, those the model's body takes, and the ones of a chunk of rows of a batch.

A batch of ``B`` rows with images holds its vision tensors in one of four layouts, told apart by what is given
beside them: one entry per row of the batch (``token_type_ids``), per image (``image_sizes``; ``num_images``:
the images of each row), per tile (``spatial_shapes``; ``num_tiles``: the tiles of each row) or per patch
(Qwen-VL ``pixel_values``: ``prod(image_grid_thw[i])`` patches for image ``i``).
"""
from __future__ import annotations

import itertools
from typing import Iterator

#: The vision inputs TRL's log-prob methods take (``num_tiles``: bookkeeping of the chunks, not the body's).
VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                 "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
#: The bookkeeping of the chunks beside them: not the body's inputs.
_COUNTS = ("num_images", "num_tiles")


def vision_inputs(given: dict) -> dict:
    """The vision inputs of ``given`` (keywords of TRL's log-prob methods) that are set, with ``num_images``;
    a ``TypeError`` naming any other keyword."""
    unexpected = set(given) - set(VISION_INPUTS) - {"num_images"}
    if unexpected:
        raise TypeError(f"unexpected arguments {sorted(unexpected)}")
    return {k: v for k, v in given.items() if v is not None}


def batch_vision(batch: dict) -> dict:
    """The vision inputs (with ``num_images``) that an online trainer's batch holds."""
    return {k: batch[k] for k in ("num_images", *VISION_INPUTS) if batch.get(k) is not None}


def body_inputs(vision: dict) -> dict:
    """What of :func:`vision_inputs` ``vision`` the model's body takes (all but the counts of the chunks)."""
    return {k: v for k, v in vision.items() if k not in _COUNTS}


def _unit(name: str, vision: dict) -> str:
    """What the first dimension of the vision input ``name`` counts: ``rows``, ``images``, ``tiles`` or ``patches``."""
    if name in ("image_grid_thw", "image_sizes", "image_position_ids"):
        return "images"
    if name == "spatial_shapes" or (name == "pixel_attention_mask" and "spatial_shapes" in vision):
        return "tiles"
    if name != "pixel_values":
        return "rows"
    if "image_grid_thw" in vision:
        return "patches"
    if "num_tiles" in vision:
        return "tiles"
    images = vision.get("num_images")
    if "image_position_ids" in vision or (images is not None and vision[name].size(0) == sum(images)):
        return "images"
    return "rows"


def _offsets(unit: str, vision: dict) -> list:
    """Where each row's entries start in a vision input of ``unit`` (images, tiles or patches), then their total."""
    key = "num_tiles" if unit == "tiles" else "num_images"
    counts = vision.get(key)
    if counts is None:
        raise ValueError(f"{key} is needed to split vision inputs by {unit} into chunks of rows")
    if unit == "patches":  # prod(image_grid_thw[i]) patches for image i, summed over each row's images
        per_image = iter(vision["image_grid_thw"].prod(-1).tolist())
        counts = [sum(itertools.islice(per_image, n)) for n in counts]
    return [0, *itertools.accumulate(counts)]


def row_chunks(vision: dict, rows: int, size: int) -> Iterator[dict]:
    """:func:`body_inputs` of each chunk of ``size`` rows in turn of a batch of ``rows`` rows with the vision
    inputs ``vision`` (all of them when one chunk holds the batch); a chunk without images has no image inputs.
    The bounds of the chunks of images, tiles or patches are read on the host once (patch counts from
    ``image_grid_thw``)."""
    if size >= rows:
        yield body_inputs(vision)
        return
    units = {name: _unit(name, vision) for name in body_inputs(vision)}
    offsets = {unit: list(range(rows + 1)) if unit == "rows" else _offsets(unit, vision) for unit in units.values()}
    for start in range(0, rows, size):
        end = min(start + size, rows)
        chunk = {name: vision[name][offsets[unit][start]:offsets[unit][end]] for name, unit in units.items()}
        if any(chunk[name].size(0) == 0 for name, unit in units.items() if unit != "rows"):  # no image here
            chunk = {name: value for name, value in chunk.items() if units[name] == "rows"}
        yield chunk
