"""Merge a LoRA adapter into its base model folder, tensor by tensor, in bounded host memory.

Loading the base and a second copy to merge in memory took ~110 GB of host RAM for the
11B student. Here each base tensor is read alone from its safetensors file, a targeted
weight gets ``scale * B @ A`` added in float32, the result is cast to the output dtype and
written at once: the peak is one tensor, its float32 copy and the (small) adapter,
whatever the model's size. The output keeps the base's files and key names, so it is an
ordinary Hugging Face folder (its tokenizer and processor are the caller's to add).

The adapter folder is PEFT's (``adapter_config.json`` and ``adapter_model.safetensors``
keyed ``base_model.model.<module>.lora_A.weight``): PEFT can load it too.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mint_ray import students
from mint_ray.errors import MintError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PEFT_PREFIX = "base_model.model."
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: its dtype, shape and bytes after the header."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]  # in file order
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> Header:
    """The tensor table of a safetensors file (8-byte length, JSON, then the raw bytes)."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        table = json.loads(handle.read(size))
    metadata = table.pop("__metadata__", None) or {}
    entries = {}
    for name, item in sorted(table.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if item["dtype"] not in _DTYPES:
            raise MintError(f"{path}: tensor {name} has dtype {item['dtype']}, which the merge does not handle")
        entries[name] = Entry(_DTYPES[item["dtype"]], tuple(item["shape"]), *item["data_offsets"])
    return Header(entries, metadata, 8 + size)


def read_tensor(handle: BinaryIO, header: Header, name: str) -> torch.Tensor:
    """One tensor, read with plain file reads (no memory map: its pages would stay resident)."""
    entry = header.entries[name]
    if entry.end == entry.start:
        return torch.empty(entry.shape, dtype=entry.dtype)
    handle.seek(header.data_start + entry.start)
    data = bytearray(entry.end - entry.start)
    handle.readinto(data)
    return torch.frombuffer(data, dtype=entry.dtype).reshape(entry.shape)


def _out_dtype(dtype: torch.dtype, out: torch.dtype) -> torch.dtype:
    return out if dtype.is_floating_point else dtype


def _header_bytes(layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    table: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in layout:
        size = torch.Size(shape).numel() * dtype.itemsize
        table[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def peft_adapter_name(param_name: str, adapter: str = "default") -> str:
    """The name PEFT saves a LoRA parameter under: ``...q_proj.lora_A.default.weight`` ->
    ``...q_proj.lora_A.weight``. Anything else that trains has no place in a LoRA merge."""
    for part in ("lora_A", "lora_B"):
        marker = f".{part}.{adapter}."
        if marker in param_name:
            return param_name.replace(marker, f".{part}.")
    raise MintError(f"{param_name} trains but is not a LoRA weight of adapter {adapter!r}: a LoRA export "
                    "saves the adapter alone; train it without LoRA (model.lora.enabled=false)")


def save_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], peft_config: Any) -> Path:
    """An adapter folder as PEFT writes one: ``tensors`` under PEFT's saved names, its LoRA settings."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    peft_config.save_pretrained(str(out_dir))
    return out_dir


def lora_pairs(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name as the model names it -> (A, B), from PEFT's saved adapter keys."""
    parts: dict[str, set[str]] = {}
    for key in adapter:
        part = next((p for p in ("lora_A", "lora_B") if key.endswith(f".{p}.weight")), None)
        if part is None or not key.startswith(_PEFT_PREFIX):
            raise MintError(f"adapter key {key} is not a PEFT LoRA weight "
                            "(base_model.model.<module>.lora_A.weight / lora_B.weight)")
        parts.setdefault(key[len(_PEFT_PREFIX):-len(f".{part}.weight")], set()).add(part)
    half = sorted(m for m, p in parts.items() if len(p) != 2)
    if half:
        raise MintError(f"the adapter has one of lora_A / lora_B only for {half[:5]}")
    return {m: (adapter[f"{_PEFT_PREFIX}{m}.lora_A.weight"], adapter[f"{_PEFT_PREFIX}{m}.lora_B.weight"])
            for m in parts}


def lora_scale(adapter_config: dict[str, Any]) -> float:
    """PEFT's ``lora_alpha / r``; variants that merge otherwise are refused, not mis-merged."""
    odd = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")
           if adapter_config.get(k)]
    if odd:
        raise MintError(f"{ADAPTER_CONFIG} sets {odd}: the streaming merge handles plain LoRA only")
    return float(adapter_config["lora_alpha"]) / float(adapter_config["r"])


def checkpoint_to_model_keys(meta: torch.nn.Module, keys: list[str]) -> dict[str, str]:
    """The model state-dict key each checkpoint key loads into, by transformers' own renames
    (Mllama's files say ``language_model.model.layers...``, its modules ``model.language_model.layers...``).
    ``meta`` is the model without weights."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(meta)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    state = meta.state_dict()
    out = {}
    for key in keys:
        renamed, converter = rename_source_key(key, renamings, converters, meta.base_model_prefix, state)
        # A converted key (e.g. experts fused at load) is not one weight of the model: no place for a delta.
        out[key] = renamed if converter is None else ""
    return out


def _tied_sources(meta: Any) -> dict[str, str]:
    """Model key -> the key it is tied to (``lm_head.weight`` -> the input embeddings), when tied."""
    tied = getattr(meta, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict) or not getattr(meta.config.get_text_config(), "tie_word_embeddings", False):
        return {}
    return dict(tied)


def base_files(base_dir: Path) -> list[str]:
    """The safetensors files of a model folder: the index's, or the one ``model.safetensors``."""
    index = base_dir / INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (base_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise MintError(f"{base_dir} holds no {SINGLE_FILE} or {INDEX_FILE}: the merge reads safetensors weights")


def _config_for(config: dict[str, Any], dtype: torch.dtype, untie: bool) -> dict[str, Any]:
    """``config.json`` with the output dtype (every sub-config saying one too) and, when a tied
    head was split off, no tie."""
    name = str(dtype).removeprefix("torch.")
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            value = _config_for(value, dtype, untie)
        elif key in ("dtype", "torch_dtype"):
            value = name
        elif key == "tie_word_embeddings" and untie:
            value = False
        out[key] = value
    return out


def merge_lora(base_dir: Path, adapter_dir: Path, out_dir: Path, kind: students.StudentKind,
               dtype: torch.dtype) -> Path:
    """Write ``base + adapter`` to ``out_dir`` in ``dtype``: weights, ``config.json``, generation config.

    A targeted head tied to the input embeddings (no key of its own in the base) is written
    untied: the adapter changed the output projection only, so the embeddings stay the base's.
    """
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    scale = lora_scale(config)
    pairs = lora_pairs(load_file(str(adapter_dir / ADAPTER_WEIGHTS)))
    files = base_files(base_dir)
    headers = {f: read_header(base_dir / f) for f in files}
    meta = students.meta_model(base_dir, kind)
    to_model = checkpoint_to_model_keys(meta, [k for h in headers.values() for k in h.entries])
    from_model = {m: c for c, m in to_model.items() if m}
    tied = _tied_sources(meta)
    # checkpoint key -> module whose delta it takes; extra keys per file for untied heads
    targets: dict[str, str] = {}
    untied: dict[str, dict[str, str]] = {f: {} for f in files}  # file -> {new key: source key}
    for module in pairs:
        weight = f"{module}.weight"
        if weight in from_model:
            targets[from_model[weight]] = module
        elif tied.get(weight) in from_model and checkpoint_to_model_keys(meta, [weight])[weight] == weight:
            # Written under the model's own key, which loads as it is.
            source = from_model[tied[weight]]
            untied[next(f for f in files if source in headers[f].entries)][weight] = source
            targets[weight] = module
        else:
            raise MintError(f"the adapter targets {module}, whose weight the base folder {base_dir} does not hold")
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for name in files:
        header = headers[name]
        layout = [(k, _out_dtype(e.dtype, dtype), e.shape) for k, e in header.entries.items()]
        layout += [(k, _out_dtype(header.entries[s].dtype, dtype), header.entries[s].shape)
                   for k, s in untied[name].items()]
        sources = {k: k for k in header.entries} | untied[name]
        with open(base_dir / name, "rb") as src, open(out_dir / name, "wb") as dst:
            dst.write(_header_bytes(layout, {**header.metadata, "format": "pt"}))
            for key, out_dtype, _ in layout:
                tensor = read_tensor(src, header, sources[key])
                if key in targets:
                    a, b = pairs[targets[key]]
                    tensor = tensor.float()  # float32 once; the delta is added in place
                    tensor.addmm_(b.float(), a.float(), alpha=scale)
                tensor = tensor.to(out_dtype).contiguous()
                dst.write(tensor.reshape(-1).view(torch.uint8).numpy())
                weight_map[key] = name
                total += tensor.numel() * tensor.itemsize
                del tensor  # before the next read: one tensor alive at a time
    if (base_dir / INDEX_FILE).is_file():
        (out_dir / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    model_config = json.loads((base_dir / "config.json").read_text())
    untie = any(untied.values())
    (out_dir / "config.json").write_text(json.dumps(_config_for(model_config, dtype, untie), indent=2))
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", out_dir / "generation_config.json")
    return out_dir

