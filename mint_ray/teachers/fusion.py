"""The fusion teacher (the GestaltMML role): an image + text classifier over a task's labels.

Text: a tokenizer trained on the cohort's train notes, token + position
embeddings, a small Transformer encoder, mean-pooled. Image: a small CNN
(conv-BN-ReLU-pool blocks, then a coarse spatial grid). A missing note or image
is replaced by a learned "missing" vector and flagged, so ``score`` works on
text-only, image-only or (as a prior) empty cases. Training drops each modality
at random (``modality_dropout``): the missing vectors learn, and the CNN cannot
be ignored in favour of the faster-learning text branch (with 0.1 on the synth
rare-disease cohort it stayed at chance; with 0.25 it carries signal alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mint_ray.config import StrictModel
from mint_ray.errors import MintError
from mint_ray.teachers.inputs import POOL_GRID, FusionInputs
from mint_ray.teachers.protocol import Case, TeacherSpec, as_tensor, weights_version

WEIGHTS = "model.safetensors"


class FusionSettings(StrictModel):
    """Sizes of the fusion classifier (kept in the teacher's spec, so it reloads)."""

    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary trained on the notes")
    text_dim: int = Field(64, ge=8)
    text_layers: int = Field(2, ge=0, description="0 = mean-pooled embeddings only")
    text_heads: int = Field(4, ge=1)
    max_text_tokens: int = Field(128, ge=8)
    image_size: int = Field(32, ge=8, description="images are resized to this square")
    cnn_channels: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=1)
    image_dim: int = Field(64, ge=8)
    hidden: int = Field(128, ge=8)
    dropout: float = Field(0.1, ge=0, lt=1)
    modality_dropout: float = Field(0.25, ge=0, lt=1)


class FusionModel(nn.Module):
    """(token ids, image, presence flags) -> logits over the labels."""

    def __init__(self, settings: FusionSettings, vocab_size: int, n_labels: int,
                 pad_id: int) -> None:
        super().__init__()
        d = settings.text_dim
        self.embed = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        self.position = nn.Embedding(settings.max_text_tokens, d)
        self.encoder: nn.TransformerEncoder | None = None
        if settings.text_layers:
            layer = nn.TransformerEncoderLayer(d, settings.text_heads, 2 * d, settings.dropout,
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, settings.text_layers,
                                                 enable_nested_tensor=False)
        convs: list[nn.Module] = []
        channels = 3
        for out in settings.cnn_channels:
            convs += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                      nn.MaxPool2d(2)]
            channels = out
        # A coarse grid, not a global average: where a feature sits (eye spacing,
        # face width) is part of the signal.
        grid = POOL_GRID * POOL_GRID * channels
        self.cnn = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(POOL_GRID), nn.Flatten(),
                                 nn.Linear(grid, settings.image_dim), nn.ReLU())
        self.missing_text = nn.Parameter(torch.zeros(d))
        self.missing_image = nn.Parameter(torch.zeros(settings.image_dim))
        self.head = nn.Sequential(nn.Linear(d + settings.image_dim + 2, settings.hidden), nn.ReLU(),
                                  nn.Dropout(settings.dropout),
                                  nn.Linear(settings.hidden, n_labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                images: torch.Tensor, text_present: torch.Tensor,
                image_present: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embed(input_ids) + self.position(positions)[None]
        mask = attention_mask.bool()
        if self.encoder is not None:
            h = self.encoder(h, src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        text = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        # uint8 NCHW -> roughly zero-centred floats.
        image = self.cnn((images.to(h.dtype) / 255.0 - 0.5) / 0.25)
        tp = text_present.to(h.dtype).unsqueeze(-1)
        ip = image_present.to(h.dtype).unsqueeze(-1)
        # A blend, not an index: the "missing" vectors stay in every graph, which DDP needs.
        text = tp * text + (1 - tp) * self.missing_text
        image = ip * image + (1 - ip) * self.missing_image
        return self.head(torch.cat([text, image, tp, ip], dim=-1))


def model_inputs(inputs: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Prepared arrays -> the model's tensors. Token ids are cut to the batch's longest note
    (prepared rows are padded to ``max_text_tokens``), as if padded to the batch."""
    mask = inputs["attention_mask"]
    width = int(mask.sum(axis=1).max()) if len(mask) else 1
    return {
        "input_ids": as_tensor(inputs["input_ids"][:, :width]).long(),
        "attention_mask": as_tensor(mask[:, :width]).long(),
        "images": as_tensor(inputs["images"]),
        "text_present": as_tensor(inputs["text_present"]),
        "image_present": as_tensor(inputs["image_present"]),
    }


class FusionTeacher:
    """A trained (or training) fusion classifier behind the ``Teacher`` protocol."""

    kind = "fusion"
    requires: tuple[str, ...] = ()

    def __init__(self, model: FusionModel, tokenizer: PreTrainedTokenizerBase,
                 settings: FusionSettings, *, name: str, version: str, task: str,
                 labels: Sequence[str], device: str = "cpu") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.name, self.version, self.task = name, version, task
        self.labels = tuple(labels)
        self.device = device
        self.model.to(device)
        self.inputs = FusionInputs(tokenizer, max_text_tokens=settings.max_text_tokens,
                                   image_size=settings.image_size)

    @classmethod
    def build(cls, settings: FusionSettings, tokenizer: PreTrainedTokenizerBase, *, name: str,
              task: str, labels: Sequence[str]) -> FusionTeacher:
        """A fresh, untrained teacher (the training job's starting point)."""
        model = FusionModel(settings, len(tokenizer), len(labels), tokenizer.pad_token_id)
        return cls(model, tokenizer, settings, name=name, version="untrained", task=task,
                   labels=labels)

    @classmethod
    def from_pretrained(cls, directory: Path, spec: TeacherSpec, device: str, *,
                        labels: Sequence[str] | None = None,
                        prompt_template: str | None = None) -> FusionTeacher:
        """A directory saved by ``save_teacher_dir``. ``prompt_template`` is unused (no
        prompts); ``labels`` must be the classifier head's own."""
        if labels is not None and tuple(labels) != spec.labels:
            raise MintError(f"{spec.name}: this fusion teacher scores its own {len(spec.labels)} "
                            "labels and cannot be re-targeted; train one on this label set")
        settings = FusionSettings.model_validate(spec.settings)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
        model = FusionModel(settings, len(tokenizer), len(spec.labels), tokenizer.pad_token_id)
        model.load_state_dict(load_file(str(directory / WEIGHTS)))
        model.eval()
        return cls(model, tokenizer, settings, name=spec.name, version=spec.version,
                   task=spec.task, labels=spec.labels, device=device)

    def to(self, device: str | torch.device) -> None:
        self.device = str(device)
        self.model.to(device)

    # ---- inputs -------------------------------------------------------------
    def prepare(self, cases: Sequence[Case]) -> dict[str, np.ndarray]:
        """The CPU step (:class:`~mint_ray.teachers.inputs.FusionInputs`)."""
        return self.inputs.prepare(cases)

    def encode(self, cases: Sequence[Case]) -> dict[str, torch.Tensor]:
        """Cases -> CPU tensors the model takes (images kept uint8 until the forward)."""
        return model_inputs(self.prepare(cases))

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cross-entropy, with each modality dropped at random so the missing vectors learn.

        ``model`` is this teacher's model, possibly wrapped for DDP."""
        p = self.settings.modality_dropout
        keep = torch.rand((2, targets.shape[0]), generator=generator) >= p
        inputs = {**batch,
                  "text_present": batch["text_present"] & keep[0].to(targets.device),
                  "image_present": batch["image_present"] & keep[1].to(targets.device)}
        return F.cross_entropy(model(**inputs), targets)

    # ---- Teacher protocol ---------------------------------------------------
    def score_prepared(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Log-probabilities over ``labels`` from prepared arrays, ``[rows, len(labels)]``."""
        if not len(inputs["input_ids"]):
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        batch = {k: v.to(self.device) for k, v in model_inputs(inputs).items()}
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            scores = F.log_softmax(self.model(**batch).float(), dim=-1).cpu().numpy()
        self.model.train(was_training)
        return scores

    def score(self, cases: Sequence[Case]) -> np.ndarray:
        """Log-probabilities over ``labels``, ``[len(cases), len(labels)]``."""
        return self.score_prepared(self.prepare(cases))

    def save_pretrained(self, directory: Path) -> TeacherSpec:
        """Write weights and tokenizer; the version becomes the weights' hash."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS))
        self.tokenizer.save_pretrained(str(directory))
        self.version = weights_version(directory / WEIGHTS)
        return TeacherSpec(kind=self.kind, name=self.name, version=self.version, task=self.task,
                           labels=self.labels, settings=self.settings.model_dump(mode="json"))
