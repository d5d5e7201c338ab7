"""The generation component: the configured backend, device and dtype, and unchanged answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mint_ray.generation import GeneratorConfig, HfGenerator, load_generator
from mint_ray.tasks import RARE_DISEASE, render_chat
from tests.tinymodels import make_student_dir

NOTES = ["Sex male Age 3 years. Seizures, hypotonia.", "Sex female Age 12 years. Tall stature, arachnodactyly, "
         "lens dislocation, aortic root dilatation."]


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_student_dir(tmp_path_factory.mktemp("student"), "rare_disease")


@pytest.mark.parametrize(("dtype", "expected"), [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_the_model_is_loaded_in_the_configured_dtype_on_the_configured_device(
        student: Path, dtype: str, expected: torch.dtype) -> None:
    generator = load_generator(student, GeneratorConfig(device="cpu", dtype=dtype))  # type: ignore[arg-type]
    assert isinstance(generator, HfGenerator)
    assert {p.dtype for p in generator.model.parameters()} == {expected}
    assert {p.device.type for p in generator.model.parameters()} == {"cpu"}
    assert generator.context_tokens == generator.model.config.max_position_embeddings


def test_answers_equal_plain_greedy_decoding_without_a_cache(student: Path) -> None:
    generator = load_generator(student, GeneratorConfig(device="cpu"))
    messages = [RARE_DISEASE.prompt_messages(note=n) for n in NOTES]
    answers = generator.generate(messages, max_new_tokens=12)

    # The reference: each prompt alone (no padding), fp32, greedy, no KV cache.
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    tok = generator.tokenizer
    expected = []
    for m in messages:
        ids = tok(render_chat(tok, m, add_generation_prompt=True), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False, use_cache=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        expected.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert answers == expected and all(answers)
