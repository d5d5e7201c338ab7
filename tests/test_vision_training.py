"""The vision student's training forward: each pair's image is encoded once, whatever the layout."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mint_ray.training.logprobs import pair_logps, policy_logps
from mint_ray.training.packing import layout_token_logps, packed_layout, unpacked_layout
from mint_ray.training.vision import PIXEL_KEYS, MllamaForward, cross_attention_mask
from tests.test_chunked_logprobs import mllama_batch
from tests.tinymodels import make_student_dir


@pytest.fixture(scope="module")
def mllama(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import MllamaForConditionalGeneration

    folder = make_student_dir(tmp_path_factory.mktemp("mllama"), "tissue_type")
    return MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("packed", [True, False])
def test_vision_tower_runs_once_per_pair_with_the_logps_of_one_image_per_row(mllama: Any, packed: bool) -> None:
    batch = mllama_batch(mllama.config)
    image_id = mllama.config.image_token_index
    encoded: list[int] = []
    hook = mllama.model.vision_model.register_forward_hook(
        lambda _m, _args, kwargs, _out: encoded.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = policy_logps(MllamaForward(mllama, image_id, torch.float32), batch, packed=packed)
            assert encoded == [len(batch)]  # one call, one image per pair

            # The reference: the model's own image path with every row carrying its pair's image.
            layout = packed_layout(batch) if packed else unpacked_layout(batch)
            rows = layout.inputs["input_ids"].shape[0] // len(batch)
            inputs = {**layout.inputs, **{k: torch.cat([layout.inputs[k]] * rows) for k in PIXEL_KEYS}}
            inputs["cross_attention_mask"] = cross_attention_mask(inputs["input_ids"], inputs["aspect_ratio_mask"],
                                                                  image_id)
            ref = pair_logps(layout_token_logps(mllama(**inputs).logits, layout), layout)
    finally:
        hook.remove()
    assert encoded == [len(batch), rows * len(batch)]
    for name in ("chosen", "rejected", "chosen_nll"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-5)
