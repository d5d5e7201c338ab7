"""The GPU acceptance script's arithmetic and table, and its refusal where there is no GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def acceptance() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mfu_is_six_flops_per_parameter_per_token_over_the_devices_peak(acceptance: ModuleType) -> None:
    assert acceptance.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert acceptance.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert acceptance.peak_bf16_tflops("Tesla T4") is None
    # 1B parameters at 50k tokens/s on 2 H100s: 3e14 of 1.978e15 FLOP/s.
    assert acceptance.mfu(10**9, 50_000, 2, 989.0) == pytest.approx(6e9 * 5e4 / (2 * 989e12))


def test_a_training_row_reads_the_summary_and_the_output_folder(acceptance: ModuleType, tmp_path: Path) -> None:
    checkpoint, model = tmp_path / "checkpoint_step000012", tmp_path / "model"
    checkpoint.mkdir()
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 2_000_000)
    (model / "mint_model.json").write_text("{}")
    os.utime(checkpoint, (1000, 1000))
    os.utime(model / "model.safetensors", (1030, 1030))
    os.utime(model / "mint_model.json", (1042, 1042))
    summary = {"model_uri": str(model), "checkpoint": str(checkpoint), "training": {
        "world_size": 2, "total_params": 10**9, "tokens_per_s": 50_000.0,
        "peak_gpu_mem_gb_rank0": 30.25, "peak_gpu_mem_gb_rank1": 29.5}}
    row = acceptance.training_row("text ORPO ~1B", summary, 3, "NVIDIA H100 80GB HBM3")
    assert row == {"run": "text ORPO ~1B", "GPUs": "2", "ZeRO": "3", "params": "1.00 B", "tokens/s": "50000",
                   "MFU": "15.2%", "peak GPU GB per rank": "30.2 / 29.5", "export s": "42", "export GB": "0.00"}
    assert acceptance.markdown_table([row, row])[:2] == [
        "| run | GPUs | ZeRO | params | tokens/s | MFU | peak GPU GB per rank | export s | export GB |",
        "|---|---|---|---|---|---|---|---|---|"]


def test_without_a_gpu_it_refuses_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "nothing was written" in done.stderr
    assert not out.exists()


def test_every_planned_stage_config_is_valid(acceptance: ModuleType, tmp_path: Path) -> None:
    steps = acceptance.plan(tmp_path, steps=12, workers=2)
    configs = {step.name: acceptance.step_config(step)[1] for step in steps}
    one_b = configs["text ORPO ~1B, ZeRO-2"]
    assert (one_b.deepspeed.bf16, one_b.scaling.use_gpu, one_b.scaling.num_workers, one_b.model.lora.enabled) == \
        (True, True, 2, False)
    assert configs["text ORPO ~1B, ZeRO-3"].deepspeed.zero_stage == 3
    assert configs["preferences (teacher pool, 1 GPU per actor)"].teacher.num_gpus_per_actor == 1
    assert configs["evaluation generation (1 GPU actor)"].generation.num_gpus_per_actor == 1
    assert configs["vision ORPO, tiny Mllama"].model.kind == "mllama"
