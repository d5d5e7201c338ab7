"""The CLIP-family teacher (the PLIP role): label prompts scored zero-shot against the image.

Any Hugging Face ``CLIPModel`` / ``SiglipModel`` directory works (loaded with
``AutoModel`` and ``AutoProcessor``; without torchvision the processor falls
back to the PIL image backend). Its image processor is the CPU side
(:class:`~mint_ray.teachers.inputs.ClipInputs`); the model side only scores.
For the local run, :func:`build_tiny_clip` makes a small CLIP from a config
with a tokenizer trained here, which the training job fits contrastively on
the cohort's images and their label captions, so the teacher has real knowledge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from mint_ray.config import StrictModel
from mint_ray.errors import MintError
from mint_ray.images import resize
from mint_ray.teachers.inputs import ClipInputs
from mint_ray.teachers.protocol import Case, TeacherSpec, as_tensor, weights_version

WEIGHTS = "model.safetensors"

# The caption/prompt per task when the config names none (``{label}`` is filled in).
DEFAULT_TEMPLATES = {
    "tissue_type": "an H&E image of {label} tissue nuclei",
    "rare_disease": "a face photo of a patient with {label}",
}


class ClipSettings(StrictModel):
    """Sizes of the tiny CLIP built for local runs, and the prompt template."""

    prompt_template: str | None = Field(
        None, description="caption/prompt with {label}; None = the task's default")
    vocab_size: int = Field(512, ge=300)
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    projection_dim: int = Field(64, ge=8)
    image_size: int = Field(64, ge=8)
    patch_size: int = Field(8, ge=2)
    max_text_tokens: int = Field(32, ge=8)


def prompt_template_for(task: str, template: str | None) -> str:
    """The configured template, else the task's default; it must contain ``{label}``."""
    chosen = template or DEFAULT_TEMPLATES.get(task)
    if not chosen or "{label}" not in chosen:
        raise MintError(f"prompt template {chosen!r} for task {task!r} must contain '{{label}}' "
                        "(set clip.prompt_template, e.g. 'an H&E image of {label} tissue nuclei')")
    return chosen


def contrastive_loss(logits_per_image: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss when several images share a caption.

    ``logits_per_image`` is ``[B, U]`` (images x the batch's distinct captions)
    and ``targets[i]`` the caption of image ``i``. Image -> text is plain
    cross-entropy; text -> image spreads each caption's target evenly over its
    images (CLIP's diagonal assumes one image per caption).
    """
    loss_image = F.cross_entropy(logits_per_image, targets)
    positives = F.one_hot(targets, logits_per_image.shape[1]).T.to(logits_per_image.dtype)
    positives = positives / positives.sum(dim=1, keepdim=True).clamp(min=1.0)
    loss_text = -(positives * F.log_softmax(logits_per_image.T, dim=1)).sum(dim=1).mean()
    return (loss_image + loss_text) / 2


class ClipTeacher:
    """A CLIP/SigLIP model scoring ``prompt_template.format(label=...)`` for each label."""

    kind = "clip"
    requires: tuple[str, ...] = ("image",)

    def __init__(self, model: nn.Module, processor: Any, *, name: str, version: str, task: str,
                 labels: Sequence[str], prompt_template: str, device: str = "cpu",
                 settings: dict[str, Any] | None = None) -> None:
        self.model = model
        self.processor = processor
        self.name, self.version, self.task = name, version, task
        self.labels = tuple(labels)
        self.prompt_template = prompt_template_for(task, prompt_template)
        self.settings = dict(settings or {})
        self.device = device
        self.model.to(device)
        self._text_embeds: torch.Tensor | None = None
        vision = model.config.vision_config
        self.inputs = ClipInputs(processor.image_processor, max(1, vision.image_size // vision.patch_size))

    # ---- construction ---------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, directory: Path, *, name: str, task: str, labels: Sequence[str],
                    prompt_template: str, device: str) -> ClipTeacher:
        """A bare Hugging Face CLIP/SigLIP directory; version = the weights' hash."""
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(str(directory)).eval()
        processor = AutoProcessor.from_pretrained(str(directory))
        weights = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
        version = weights_version(*weights) if weights else "unknown"
        return cls(model, processor, name=name, version=version, task=task, labels=labels,
                   prompt_template=prompt_template, device=device)

    @classmethod
    def from_pretrained(cls, directory: Path, spec: TeacherSpec, device: str, *,
                        labels: Sequence[str] | None = None,
                        prompt_template: str | None = None) -> ClipTeacher:
        """A directory saved by ``save_teacher_dir``; ``labels`` and
        ``prompt_template`` re-target it."""
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(str(directory)).eval()
        processor = AutoProcessor.from_pretrained(str(directory))
        return cls(model, processor, name=spec.name, version=spec.version, task=spec.task,
                   labels=labels or spec.labels,
                   prompt_template=prompt_template or spec.settings.get("prompt_template"),
                   device=device, settings=spec.settings)

    def to(self, device: str | torch.device) -> None:
        self.device = str(device)
        self.model.to(device)
        self._text_embeds = None

    # ---- inputs ---------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        return [self.prompt_template.format(label=label) for label in self.labels]

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        # SigLIP was trained on max_length padding and pools the last position.
        siglip = self.model.config.model_type == "siglip"
        max_len = self.model.config.text_config.max_position_embeddings
        out = self.processor.tokenizer(list(prompts), padding="max_length" if siglip else True,
                                       truncation=True, max_length=max_len, return_tensors="pt")
        return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask")}

    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(self.inputs.pixel_values(images))

    def prepare(self, cases: Sequence[Case]) -> dict[str, np.ndarray]:
        """The CPU step (:class:`~mint_ray.teachers.inputs.ClipInputs`): the images' pixel values."""
        return self.inputs.prepare(cases)

    def encode(self, cases: Sequence[Case]) -> dict[str, torch.Tensor]:
        """Training inputs: images resized to the model's input size, kept uint8 (NHWC)."""
        size = int(self.model.config.vision_config.image_size)
        if any(c.image is None for c in cases):
            raise MintError("the CLIP teacher trains on images: every case needs one")
        images = np.stack([resize(c.image, size) for c in cases])  # type: ignore[arg-type]
        return {"images": torch.from_numpy(images)}

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Contrastive loss of the batch's images against their distinct label captions.

        ``model`` is this teacher's model, possibly wrapped for DDP; ``generator``
        is unused (kept for the common signature)."""
        del generator
        self._text_embeds = None  # the text tower is about to change
        present, caption_of = torch.unique(targets, return_inverse=True)
        text = self.encode_prompts([self.prompts[i] for i in present.tolist()])
        pixels = self.pixel_values(list(batch["images"].cpu().numpy()))
        out = model(input_ids=text["input_ids"].to(targets.device),
                    attention_mask=text["attention_mask"].to(targets.device),
                    pixel_values=pixels.to(targets.device))
        return contrastive_loss(out.logits_per_image, caption_of)

    # ---- Teacher protocol -------------------------------------------------------
    def _label_embeddings(self) -> torch.Tensor:
        if self._text_embeds is None:
            text = {k: v.to(self.device) for k, v in self.encode_prompts(self.prompts).items()}
            feats = self.model.get_text_features(**text).pooler_output
            self._text_embeds = F.normalize(feats.float(), dim=-1)
        return self._text_embeds

    def score_prepared(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model's image-text logits for each label prompt, ``[rows, len(labels)]``."""
        if not len(inputs["pixel_values"]):
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            text = self._label_embeddings()
            pixels = as_tensor(inputs["pixel_values"]).to(self.device)
            image = F.normalize(self.model.get_image_features(pixel_values=pixels)
                                .pooler_output.float(), dim=-1)
            logits = image @ text.T * self.model.logit_scale.exp().float()
            if getattr(self.model, "logit_bias", None) is not None:
                logits = logits + self.model.logit_bias.float()
        self.model.train(was_training)
        return logits.cpu().numpy()

    def score(self, cases: Sequence[Case]) -> np.ndarray:
        """``score_prepared(prepare(cases))``; a case without an image is an error."""
        return self.score_prepared(self.prepare(cases))

    def save_pretrained(self, directory: Path) -> TeacherSpec:
        """Write model, processor and tokenizer; the version becomes the weights' hash."""
        self.model.save_pretrained(str(directory))
        self.processor.save_pretrained(str(directory))
        self.version = weights_version(directory / WEIGHTS)
        return TeacherSpec(kind=self.kind, name=self.name, version=self.version, task=self.task,
                           labels=self.labels,
                           settings={**self.settings, "prompt_template": self.prompt_template})


def build_tiny_clip(settings: ClipSettings, *, name: str, task: str,
                    labels: Sequence[str]) -> ClipTeacher:
    """A small untrained CLIP with a BPE tokenizer trained on the label prompts.

    The tokenizer wraps every text in BOS ... EOS, as CLIP's does: the text
    tower pools the hidden state at the first EOS.
    """
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from mint_ray.tokenizer import BOS, EOS, train_tokenizer

    template = prompt_template_for(task, settings.prompt_template)
    prompts = [template.format(label=label) for label in labels]
    tokenizer = train_tokenizer(prompts, vocab_size=settings.vocab_size)
    bos, eos = tokenizer.convert_tokens_to_ids(BOS), tokenizer.convert_tokens_to_ids(EOS)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)])
    size = settings.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size},
                                              crop_size={"height": size, "width": size}),
        tokenizer=tokenizer)
    common = {"hidden_size": settings.hidden_size, "intermediate_size": settings.intermediate_size,
              "num_hidden_layers": settings.layers, "num_attention_heads": settings.heads}
    config = CLIPConfig(
        text_config={**common, "vocab_size": len(tokenizer),
                     "max_position_embeddings": settings.max_text_tokens,
                     "bos_token_id": bos, "eos_token_id": eos,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**common, "image_size": size, "patch_size": settings.patch_size},
        projection_dim=settings.projection_dim)
    return ClipTeacher(CLIPModel(config), processor, name=name, version="untrained", task=task,
                       labels=labels, prompt_template=template,
                       settings=settings.model_dump(mode="json"))
