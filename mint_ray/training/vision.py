"""Mllama inputs for a batch: pixel tensors per pair and the cross-attention mask.

Every row of a vision batch carries its image, so every rank runs the vision
tower and the cross-attention layers on every step (ranks that skipped them
would run different ZeRO-3 gathers and hang; see MINT.md's traps), and
``cross_attention_mask`` is always passed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mint_ray.images import to_pil
from mint_ray.training.chunked_logprobs import base_model

PIXEL_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


def pixel_inputs(processor: Any, images: list[bytes]) -> dict[str, Tensor]:
    """Processor outputs for one image per row (leading dim = rows)."""
    pil = [[to_pil(b)] for b in images]
    out = processor.image_processor(pil, return_tensors="pt")
    return {k: out[k] for k in PIXEL_KEYS}


def cross_attention_mask(input_ids: Tensor, aspect_ratio_mask: Tensor, image_token_id: int) -> Tensor:
    """``[N, T, 1, tiles]``: tokens from the image token on see the image's valid tiles."""
    after_image = (input_ids == image_token_id).long().cumsum(-1) > 0
    tiles = aspect_ratio_mask[:, 0, :].bool()  # [N, tiles]
    return (after_image[:, :, None, None] & tiles[:, None, None, :]).long()


class MllamaForward:
    """Calls a Mllama model (or its DeepSpeed engine) with each pair's image encoded once.

    Pixel inputs are one per pair; the rows may be more (the unpacked layout has a
    chosen and a rejected row per pair, pairs first then repeated). The vision tower
    and projector run once on the B images and their cross-attention states are
    repeated over the rows, instead of encoding every image once per row.
    """

    def __init__(self, model: Any, image_token_id: int, dtype: torch.dtype):
        self.model, self.image_token_id, self.dtype = model, image_token_id, dtype

    def encode_images(self, pixel_values: Tensor, aspect_ratio_ids: Tensor,
                      aspect_ratio_mask: Tensor) -> Tensor:
        """Cross-attention states ``[B, image tokens, hidden]``, as ``MllamaModel.forward`` makes them."""
        inner = base_model(self).model  # MllamaModel (under any engine or LoRA wrapper)
        states = inner.vision_model(pixel_values=pixel_values.to(self.dtype), aspect_ratio_ids=aspect_ratio_ids,
                                    aspect_ratio_mask=aspect_ratio_mask).last_hidden_state
        return inner.multi_modal_projector(states).reshape(-1, states.shape[-2], inner.hidden_size)

    def __call__(self, **inputs: Tensor) -> Any:
        pixels = [inputs.pop(k) for k in PIXEL_KEYS]
        rows_per_image = inputs["input_ids"].shape[0] // pixels[0].shape[0]
        states = self.encode_images(*pixels)
        aspect_ratio_mask = torch.cat([pixels[2]] * rows_per_image)
        inputs["cross_attention_states"] = torch.cat([states] * rows_per_image)
        inputs["cross_attention_mask"] = cross_attention_mask(
            inputs["input_ids"], aspect_ratio_mask, self.image_token_id)
        return self.model(**inputs)
