"""The CPU side of each teacher kind: cases -> the fixed-size arrays its model takes.

Everything before the model (tokenising notes, resizing and normalising images) lives
here, with no weights and no torch model, so it can run apart from the model: the
preference stage runs it in its CPU tasks and its teacher actors only score. A kind's
teacher holds the same preprocessor it would load from its folder
(:func:`mint_ray.teachers.loader.load_preprocessor`), and its ``score(cases)`` is
``score_prepared(prepare(cases))``.

``prepare`` returns one row per case in every array, with the same row shape and dtype
on every call (an empty call included), so prepared rows travel as fixed-shape tensor
columns and any slice of them is a valid batch. This module imports no torch (the
fusion kind's CPU side never needs it; a CLIP image processor may import it itself).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mint_ray.errors import MintError
from mint_ray.images import resize
from mint_ray.teachers.protocol import Case, TeacherSpec

# The fusion CNN pools its features to this grid (cells a side, wherever the image's size).
POOL_GRID = 4
# The most one image side may exceed the other: a CLIP processor scales the short side to
# its input size and keeps the centre square, so an image 16 times wider than high loses
# 15/16 of itself and costs 16 squares of memory first; the fusion side squashes it 16-fold.
MAX_IMAGE_ASPECT = 16.0


class FusionInputs:
    """The fusion classifier's inputs: notes as token ids padded to ``max_text_tokens``,
    images as ``image_size`` squares (uint8, NCHW), and which of the two each case has.

    Ids are padded to the full width here; the model side trims a batch to its longest
    note (:func:`mint_ray.teachers.fusion.model_inputs`), so scores do not depend on it.
    An image must have a pixel for each cell of the CNN's pooling grid.
    """

    kind = "fusion"
    min_image_side = POOL_GRID
    max_image_aspect: float | None = MAX_IMAGE_ASPECT

    def __init__(self, tokenizer: Any, *, max_text_tokens: int, image_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens
        self.image_size = image_size

    @classmethod
    def from_pretrained(cls, directory: Path, spec: TeacherSpec) -> FusionInputs:
        """The tokenizer files of a saved fusion teacher and its spec's sizes (no weights)."""
        from transformers import PreTrainedTokenizerFast

        try:
            sizes = {name: int(spec.settings[name]) for name in ("max_text_tokens", "image_size")}
        except (KeyError, TypeError, ValueError) as err:
            raise MintError(f"{spec.name}: the fusion teacher's spec lacks a valid {err} setting; "
                            "re-save the teacher with `mint-ray teacher train`") from None
        return cls(PreTrainedTokenizerFast.from_pretrained(str(directory)), **sizes)

    def prepare(self, cases: Sequence[Case]) -> dict[str, np.ndarray]:
        n, width, size = len(cases), self.max_text_tokens, self.image_size
        notes = [c.note.strip() if c.note and c.note.strip() else "" for c in cases]
        ids = self.tokenizer(notes, add_special_tokens=False, truncation=True,
                             max_length=width)["input_ids"] if cases else []
        input_ids = np.full((n, width), self.tokenizer.pad_token_id, dtype=np.int32)
        # uint8, not bool: Arrow's tensor columns hold no booleans.
        attention_mask = np.zeros((n, width), dtype=np.uint8)
        for i, row in enumerate(ids):
            input_ids[i, :len(row)] = row
            attention_mask[i, :len(row)] = 1
        # An empty note still attends to one (pad) position: a fully masked row
        # would give NaN in attention, and its features are replaced anyway.
        attention_mask[:, 0] = 1
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        for i, c in enumerate(cases):
            if c.image is not None:
                images[i] = resize(c.image, size)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "images": np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
            "text_present": np.array([bool(note) for note in notes], dtype=np.bool_),
            "image_present": np.array([c.image is not None for c in cases], dtype=np.bool_),
        }


def patch_grid(directory: Path) -> int:
    """Patches a side of the CLIP/SigLIP vision model in ``directory`` (1 when its config
    does not say)."""
    try:
        vision = json.loads((directory / "config.json").read_text()).get("vision_config") or {}
        return max(1, int(vision["image_size"]) // int(vision["patch_size"]))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 1


def load_image_processor(directory: Path) -> Any:
    """The image processor of a CLIP/SigLIP folder, loaded as the teacher loads it (the
    folder's processor), so the CPU side and the model side pick the same class."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(directory)).image_processor


class ClipInputs:
    """A CLIP-family model's image input: the checkpoint's own image processor (resize,
    crop, rescale, normalise) -> float32 ``pixel_values`` (NCHW). The label prompts are
    the model side's: they are encoded once per teacher, not per case.

    ``min_image_side`` is the vision model's patch grid (input size / patch size, from the
    folder's ``config.json``): an image with fewer pixels a side than the model has patches
    is only blur once scaled up (a 3-pixel-high tile for a 7x7 grid)."""

    kind = "clip"
    max_image_aspect: float | None = MAX_IMAGE_ASPECT

    def __init__(self, image_processor: Any, min_image_side: int = 1) -> None:
        self.image_processor = image_processor
        self.min_image_side = min_image_side

    @classmethod
    def from_pretrained(cls, directory: Path, spec: TeacherSpec | None = None) -> ClipInputs:
        del spec  # everything is in the folder's processor and config files
        return cls(load_image_processor(directory), patch_grid(directory))

    def pixel_values(self, images: Sequence[np.ndarray]) -> np.ndarray:
        # Decoded images are HxWx3; said explicitly, so an image 3 pixels high is not
        # taken for channels-first.
        return self.image_processor(images=list(images), return_tensors="np",
                                    input_data_format="channels_last")["pixel_values"]

    @functools.cached_property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one image's pixel values (fixed by the processor's settings)."""
        return tuple(self.pixel_values([np.zeros((32, 32, 3), np.uint8)]).shape[1:])

    def prepare(self, cases: Sequence[Case]) -> dict[str, np.ndarray]:
        missing = [i for i, c in enumerate(cases) if c.image is None]
        if missing:
            raise MintError(f"the CLIP teacher scores images: case {missing[0]} has none "
                            "(the caller must quarantine cases without an image)")
        if not cases:
            return {"pixel_values": np.zeros((0, *self.row_shape), np.float32)}
        pixels = self.pixel_values([c.image for c in cases])  # type: ignore[misc]
        if pixels.shape[1:] != self.row_shape:
            raise MintError(f"the image processor made pixel values of shape {pixels.shape[1:]}, "
                            f"not {self.row_shape}: only processors with a fixed output size are supported")
        return {"pixel_values": pixels}


PREPROCESSORS: dict[str, Any] = {"fusion": FusionInputs, "clip": ClipInputs}
