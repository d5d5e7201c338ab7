"""The streaming LoRA merge (training.merge) against PEFT's own merge, on both student kinds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict

from mint_ray import students
from mint_ray.errors import MintError
from mint_ray.training.merge import INDEX_FILE, lora_pairs, merge_lora, peft_adapter_name, read_header
from tests.conftest import REPO
from tests.tinymodels import make_student_dir

KINDS = {"causal_lm": "rare_disease", "mllama": "tissue_type"}


def _trained_peft(base: Path, kind: students.StudentKind, targets: str | list[str] = "all-linear") -> torch.nn.Module:
    """The student with a LoRA adapter as if trained: B is random (PEFT starts it at zero)."""
    model = students.load_student(base, kind, torch.float32)
    lora = students.LoraAdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=targets)
    peft_model = students.apply_lora(model, lora, kind)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    return peft_model.eval()


def _save_adapter(peft_model: torch.nn.Module, out: Path) -> Path:
    """PEFT's own adapter folder: the key names the merge must map onto the base files."""
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    return out


def _ids(vocab: int) -> torch.Tensor:
    return torch.arange(3, 3 + 12)[None] % vocab


@pytest.mark.parametrize("kind", list(KINDS))
def test_merge_equals_peft_merge_and_unload_key_by_key(tmp_path: Path, kind: students.StudentKind) -> None:
    """Every tensor of the merged folder, loaded by transformers, equals PEFT's merge (fp32):
    Mllama's file keys (``language_model.model.layers``) reach its modules (``model.language_model.layers``),
    its top-level lm_head and projector are merged, its vision tower left alone."""
    base = make_student_dir(tmp_path / "base", KINDS[kind])
    peft_model = _trained_peft(base, kind)
    adapter = _save_adapter(peft_model, tmp_path / "adapter")
    targets = {k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for k in get_peft_model_state_dict(peft_model, save_embedding_layers=False) if ".lora_A" in k}
    if kind == "mllama":
        assert {"lm_head", "model.multi_modal_projector"} <= targets
        assert not any("vision_model" in t for t in targets)
    out = merge_lora(base, adapter, tmp_path / "merged", kind, torch.float32)
    merged = students.model_class(kind).from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=_ids(200)).logits
        expected = peft_model.merge_and_unload().state_dict()
        got = merged.state_dict()
        assert sorted(got) == sorted(expected)
        for key, tensor in expected.items():
            torch.testing.assert_close(got[key], tensor, rtol=0, atol=1e-6, msg=key)
        changed = {k.removesuffix(".weight") for k in expected if not torch.equal(
            expected[k], students.load_student(base, kind, torch.float32).state_dict()[k])}
        assert changed == targets
        torch.testing.assert_close(merged(input_ids=_ids(200)).logits, peft_logits, rtol=0, atol=1e-5)


def test_bf16_output_from_an_fp32_sharded_base(tmp_path: Path) -> None:
    """The recipe's dtype is written (bf16 here, from an fp32 base); a sharded base keeps its
    files, and the index names the merged ones."""
    single = make_student_dir(tmp_path / "single")
    base = tmp_path / "base"
    students.load_student(single, "causal_lm", torch.float32).save_pretrained(base, max_shard_size="200KB")
    peft_model = _trained_peft(base, "causal_lm")
    out = merge_lora(base, _save_adapter(peft_model, tmp_path / "adapter"), tmp_path / "merged", "causal_lm",
                     torch.bfloat16)
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["weight_map"] == json.loads((base / INDEX_FILE).read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum((out / f).stat().st_size - read_header(out / f).data_start
                                                  for f in set(index["weight_map"].values()))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = students.model_class("causal_lm").from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16
    with torch.no_grad():
        expected = peft_model(input_ids=_ids(200)).logits
        got = merged(input_ids=_ids(200)).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_a_targeted_head_tied_to_the_embeddings_is_written_untied(tmp_path: Path) -> None:
    """A tied base holds no lm_head key (Llama 3.2 1B/3B, SmolLM2). The adapter changed the output
    projection only, so the merge writes an own head and keeps the input embeddings as they were
    (PEFT's merge_and_unload would change both through the shared tensor)."""
    single = make_student_dir(tmp_path / "single")
    config = json.loads((single / "config.json").read_text())
    (single / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    base = tmp_path / "base"
    tied = students.load_student(single, "causal_lm", torch.float32)
    tied.tie_weights()
    tied.save_pretrained(base)
    assert "lm_head.weight" not in read_header(base / "model.safetensors").entries
    peft_model = _trained_peft(base, "causal_lm", ["q_proj", "lm_head"])
    out = merge_lora(base, _save_adapter(peft_model, tmp_path / "adapter"), tmp_path / "merged", "causal_lm",
                     torch.float32)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = students.model_class("causal_lm").from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(merged.model.embed_tokens.weight, tied.model.embed_tokens.weight, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=_ids(200)).logits, peft_model(input_ids=_ids(200)).logits,
                                   rtol=0, atol=1e-5)


def test_adapter_names_from_trainable_parameters_are_peft_saved_names(tmp_path: Path) -> None:
    """The export names the gathered LoRA parameters itself (the ZeRO-3 module cannot be saved by
    PEFT): the names are PEFT's, on both kinds."""
    for kind, task in KINDS.items():
        peft_model = _trained_peft(make_student_dir(tmp_path / kind, task), kind)
        ours = {peft_adapter_name(n) for n, p in peft_model.named_parameters() if p.requires_grad}
        assert ours == set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    with pytest.raises(MintError, match="not a LoRA weight"):
        peft_adapter_name("base_model.model.model.norm.weight")
    with pytest.raises(MintError, match=r"one of lora_A / lora_B only for \['q'\]"):
        lora_pairs({"base_model.model.q.lora_A.weight": torch.zeros(1, 1)})
    with pytest.raises(MintError, match="not a PEFT LoRA weight"):
        lora_pairs({"base_model.model.lm_head.weight": torch.zeros(1, 1)})


# About 100M parameters: vocabulary 16k, hidden 768, 11 layers (Llama layout, untied head).
HUNDRED_M = {"vocab_size": 16000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 11,
             "num_attention_heads": 12, "num_key_value_heads": 12, "tie_word_embeddings": False}
# Runs in a fresh interpreter. The baseline is that process's resident memory after importing
# everything the merge uses (torch, safetensors, transformers' Llama code, mint_ray), measured
# before any weight is touched. The peak is VmHWM, the high-water mark of this address space:
# it also covers the imports, so peak - baseline can only overstate what the merge took.
# (Not ru_maxrss: Linux carries it over fork and exec, so it would report the pytest parent.)
MEASURE = """
import json, sys
from pathlib import Path
import psutil, torch
from transformers import LlamaForCausalLM  # noqa: F401  (the merge builds this class on meta)
from mint_ray.training.merge import merge_lora
baseline = psutil.Process().memory_info().rss
merge_lora(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), "causal_lm", torch.bfloat16)
status = Path("/proc/self/status").read_text().splitlines()
peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024
print(json.dumps({"baseline": baseline, "peak": peak}))
"""


def test_merge_of_a_100m_model_stays_under_one_and_a_half_bf16_models(tmp_path: Path) -> None:
    """The base is one fp32 file (400 MB, the worst layout: no shard bounds a reader that
    loads whole files); the merge's growth stays under 1.5x the bf16 model (~205 MB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HUNDRED_M))
    params = sum(p.numel() for p in model.parameters())
    assert 95e6 < params < 110e6
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="2GB")
    peft_model = students.apply_lora(model, students.LoraAdapterConfig(r=8, alpha=16, dropout=0.0), "causal_lm")
    adapter = _save_adapter(peft_model, tmp_path / "adapter")
    del model, peft_model
    done = subprocess.run([sys.executable, "-c", MEASURE, str(base), str(adapter), str(tmp_path / "merged")],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    bf16_bytes = 2 * params
    grown = figures["peak"] - figures["baseline"]
    print(f"merge of {params / 1e6:.1f}M params: baseline {figures['baseline'] / 2**20:.0f} MiB, peak "
          f"{figures['peak'] / 2**20:.0f} MiB, grew {grown / 2**20:.0f} MiB = {grown / bf16_bytes:.2f}x bf16")
    assert grown < 1.5 * bf16_bytes
    merged_size = (tmp_path / "merged" / "model.safetensors").stat().st_size
    assert merged_size < 0.51 * (base / "model.safetensors").stat().st_size  # bf16 from fp32
