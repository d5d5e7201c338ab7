"""Answer generation from a student directory: one code path for evaluation and serving.

Greedy decoding by default (reproducible); the paper's sampling settings are
``SAMPLING_TEXT`` / ``SAMPLING_VISION``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mint_ray.images import to_pil
from mint_ray.model_folders import read_metadata
from mint_ray.tasks import render_chat

SAMPLING_TEXT = {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "top_k": 10,
                 "max_new_tokens": 512}
SAMPLING_VISION = {"do_sample": True, "temperature": 0.7, "top_p": 0.6, "top_k": 10,
                   "max_new_tokens": 100}


class Generator:
    """A loaded student (causal LM or Mllama) that answers chat prompts in batches."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from mint_ray.students import load_student, load_tokenizer_and_processor

        self.metadata = read_metadata(model_dir)
        self.kind = self.metadata.get("kind", "causal_lm")
        self.task = self.metadata.get("task")
        self.tokenizer, self.processor = load_tokenizer_and_processor(model_dir, self.kind)
        self.model = load_student(model_dir, self.kind, dtype).to(device).eval()
        self.device = device

    def generate(self, messages: list[list[dict[str, Any]]], images: list[Any] | None = None,
                 max_new_tokens: int = 128, **sampling: Any) -> list[str]:
        """One answer per conversation; ``images`` (PIL, bytes or None) go with vision students."""
        texts = [render_chat(self.tokenizer, m, add_generation_prompt=True) for m in messages]
        # Left padding so every row's answer starts right after its prompt.
        self.tokenizer.padding_side = "left"
        if self.processor is not None:
            pil = [[_image(img)] for img in (images or [None] * len(texts))]
            inputs = self.processor(images=pil, text=texts, return_tensors="pt", padding=True,
                                    add_special_tokens=False)
        else:
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        sampling.setdefault("do_sample", False)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id, **sampling)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


def _image(image: Any) -> Any:
    if image is None:
        raise ValueError("this student needs an image for every prompt")
    return to_pil(image)


def load_generator(model_dir: str | Path, device: str | None = None) -> Generator:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return Generator(model_dir, device, dtype)
