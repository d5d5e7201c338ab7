"""LoRA targets resolved on the real production architectures, built on the meta device (no weights)."""

from __future__ import annotations

import re

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MllamaConfig, MllamaForConditionalGeneration

from mint_ray.students import LoraAdapterConfig, lora_target_modules


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_mllama_11b_targets_include_lm_head_and_projector_not_the_vision_tower() -> None:
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(MllamaConfig())  # the defaults are Llama 3.2-11B-Vision's
    pattern = lora_target_modules(model, LoraAdapterConfig(), "mllama")
    targets = [n for n in linear_names(model) if re.fullmatch(pattern, n)]  # peft matches with fullmatch
    assert "lm_head" in targets  # top level in transformers 5: no dot before it
    assert "model.multi_modal_projector" in targets
    assert not [n for n in targets if "vision_model" in n]
    text_layers = MllamaConfig().text_config.num_hidden_layers
    assert len([n for n in targets if n.endswith(".q_proj")]) == text_layers


def test_llama_3b_all_linear_is_left_to_peft_and_named_targets_must_exist() -> None:
    config = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert lora_target_modules(model, LoraAdapterConfig(), "causal_lm") == "all-linear"
    named = LoraAdapterConfig(target_modules=["q_proj", "v_proj", "lm_head"])
    assert lora_target_modules(model, named, "causal_lm") == ["q_proj", "v_proj", "lm_head"]
