"""Answer generation from a student directory: one code path for evaluation and serving.

``Generator`` is the interface both stages use; ``load_generator`` picks the backend
named by ``GeneratorConfig.backend``. ``hf`` (the only one so far) is Hugging Face
``generate``: the whole batch left-padded and decoded together with the KV cache,
the weights loaded in their serving dtype straight onto the device (bf16 on CUDA:
an 11B never sits on the host in fp32 first). A vLLM backend for the text student
would be a second class with the same methods (vLLM no longer serves Mllama).

Greedy decoding by default (reproducible); the paper's sampling settings are
``SAMPLING_TEXT`` / ``SAMPLING_VISION``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import Field

from mint_ray.config import StrictModel
from mint_ray.images import to_pil
from mint_ray.model_folders import read_metadata
from mint_ray.tasks import render_chat

if TYPE_CHECKING:
    import torch

SAMPLING_TEXT = {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "top_k": 10,
                 "max_new_tokens": 512}
SAMPLING_VISION = {"do_sample": True, "temperature": 0.7, "top_p": 0.6, "top_k": 10,
                   "max_new_tokens": 100}


class GeneratorConfig(StrictModel):
    """Which backend answers, on which device, in which dtype (torch is imported only to
    resolve them: a config is read where no model is loaded)."""

    backend: Literal["hf"] = "hf"
    device: str | None = Field(None, description="None: cuda when there is a GPU, else cpu")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on the CPU (bf16 matmuls are slow there)")

    def resolved_device(self) -> str:
        import torch

        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def resolved_dtype(self) -> torch.dtype:
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32


class Generator(Protocol):
    """A loaded student (causal LM or Mllama) that answers chat prompts in batches."""

    metadata: dict[str, Any]  # the model folder's mint_model.json
    kind: str
    task: str | None
    tokenizer: Any
    processor: Any | None  # set for a vision student: prompts then need images
    # The positions the model has (prompt and answer together); None: not recorded.
    context_tokens: int | None

    def generate(self, messages: list[list[dict[str, Any]]], images: list[Any] | None = None,
                 max_new_tokens: int = 128, **sampling: Any) -> list[str]:
        """One answer per conversation; ``images`` (PIL, bytes or None) go with vision students."""
        ...

    def close(self) -> None:
        """Free the weights now, not when the last reference goes (a replica making room
        for the next version); the tokenizer and metadata stay usable."""
        ...


class HfGenerator:
    """``Generator`` on Hugging Face ``generate`` (static batch, KV cache)."""

    def __init__(self, model_dir: str | Path, device: str, dtype: torch.dtype):
        from mint_ray.students import load_student, load_tokenizer_and_processor

        self.metadata = read_metadata(model_dir)
        self.kind = self.metadata.get("kind", "causal_lm")
        self.task = self.metadata.get("task")
        self.tokenizer, self.processor = load_tokenizer_and_processor(model_dir, self.kind)
        self.model = load_student(model_dir, self.kind, dtype, device=device).eval()
        self.device = device
        text_config = self.model.config.get_text_config()
        self.context_tokens = getattr(text_config, "max_position_embeddings", None)

    def generate(self, messages: list[list[dict[str, Any]]], images: list[Any] | None = None,
                 max_new_tokens: int = 128, **sampling: Any) -> list[str]:
        import torch

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
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True,
                                      pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id, **sampling)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _image(image: Any) -> Any:
    if image is None:
        raise ValueError("this student needs an image for every prompt")
    return to_pil(image)


def load_generator(model_dir: str | Path, cfg: GeneratorConfig | None = None) -> Generator:
    """The configured backend holding the student at ``model_dir``."""
    cfg = cfg or GeneratorConfig()
    return HfGenerator(model_dir, cfg.resolved_device(), cfg.resolved_dtype())
