"""Training benchmarks through the real stage (Ray Train + DeepSpeed), printing figures.

1. Memory per rank, ZeRO-3 vs ZeRO-0, 2 workers, full fine-tuning of a small Llama:
   the share of parameters a rank holds, its optimizer-state size and its peak RSS.
2. Throughput of bf16 ORPO with ZeRO-3 on a Llama-shaped model: tokens/s and model
   FLOPs utilisation. On a GPU (``torch.cuda.is_available()``) the model is ~1B
   parameters; on a CPU the same code runs a scaled-down model and the results file
   marks the ~1B figures as pending a GPU.

    python benchmarks/bench_training.py [--steps 8] [--out benchmarks/results/training.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mint_ray.config import load_config  # noqa: E402
from mint_ray.training import run as train_stage  # noqa: E402
from mint_ray.training.config import Config  # noqa: E402
from tests.prefdata import write_text_prefs  # noqa: E402

# bf16 dense peak per device, for MFU (vendor datasheets).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
ONE_B = {"hidden_size": 2048, "intermediate_size": 5632, "num_layers": 16, "num_heads": 32,
         "num_kv_heads": 8, "vocab_size": 32000}
CPU_SMALL = {"hidden_size": 256, "intermediate_size": 688, "num_layers": 4, "num_heads": 8,
             "num_kv_heads": 4, "vocab_size": 2048}


def _train(root: Path, data: str, *overrides: str) -> dict:
    import ray

    cfg = load_config(Config, None, ["task=rare_disease", f"data.uri={data}", f"storage.root={root}",
                                     f"output_uri={root}/student", "tracking.enabled=false",
                                     "storage.overwrite=true", "ray.num_cpus=4", *overrides])
    try:
        return train_stage.run(cfg)
    finally:
        ray.shutdown()


def _sizes(sizes: dict[str, int]) -> list[str]:
    return [f"model.tiny.{k}={v}" for k, v in sizes.items()]


def memory(root: Path, data: str, steps: int) -> list[str]:
    rows = ["| ZeRO stage | params held by rank 0 / 1 | optimizer state numel rank 0 / 1 "
            "| model states MB rank 0 / 1 | peak RSS GB rank 0 / 1 |", "|---|---|---|---|---|"]
    for stage in (0, 3):
        t = _train(root / f"mem{stage}", data, *_sizes({**CPU_SMALL, "hidden_size": 512, "num_layers": 6}),
                   "model.lora.enabled=false", f"deepspeed.zero_stage={stage}", f"optim.max_steps={steps}",
                   "optim.micro_batch_size=2")["training"]
        # fp32 parameters + gradients (8 bytes per held parameter) + Adam moments (4 bytes each).
        states = [(t[f"param_shard_fraction_rank{r}"] * t["total_params"] * 8
                   + t[f"optimizer_state_numel_rank{r}"] * 4) / 2**20 for r in (0, 1)]
        rows.append(f"| {stage} | {t['param_shard_fraction_rank0']:.2f} / {t['param_shard_fraction_rank1']:.2f} "
                    f"| {t['optimizer_state_numel_rank0']:.3g} / {t['optimizer_state_numel_rank1']:.3g} "
                    f"| {states[0]:.0f} / {states[1]:.0f} "
                    f"| {t['peak_rss_gb_rank0']:.2f} / {t['peak_rss_gb_rank1']:.2f} |")
    rows.append("\nAt this size (a few million parameters) peak RSS is dominated by the runtime "
                "(torch, Ray worker, DeepSpeed's communication buffers), so it does not show the "
                "halving; the model states column (what ZeRO partitions) does, and it is what "
                "dominates at 3B/11B (see cluster/README.md).")
    return rows


def throughput(root: Path, data: str, steps: int) -> list[str]:
    gpu = torch.cuda.is_available()
    sizes = ONE_B if gpu else CPU_SMALL
    device = torch.cuda.get_device_name() if gpu else "CPU"
    workers = max(torch.cuda.device_count(), 1) if gpu else 2
    t0 = time.time()
    summary = _train(root / "tput", data, *_sizes(sizes), "model.lora.enabled=false", "deepspeed.zero_stage=3",
                     f"deepspeed.bf16={str(gpu).lower()}", f"optim.max_steps={steps}", "optim.micro_batch_size=4",
                     f"scaling.use_gpu={str(gpu).lower()}", f"scaling.num_workers={workers}",
                     "batching.max_length=1400", "batching.max_prompt_length=700")
    t = summary["training"]
    params = t["total_params"]
    tokens_per_s = t["tokens_per_s"]
    # Forward + backward is ~6 FLOPs per parameter per token (attention term left out).
    achieved = 6 * params * tokens_per_s
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    mfu = f"{achieved / (peak * 1e12 * workers):.1%}" if gpu and peak else "n/a (no GPU peak)"
    rows = ["| device | workers | params | bf16 | tokens/s | MFU | wall s |", "|---|---|---|---|---|---|---|",
            f"| {device} | {workers} | {params / 1e6:.1f} M | {gpu} | {tokens_per_s:.0f} | {mfu} "
            f"| {time.time() - t0:.0f} |"]
    if not gpu:
        rows.append("\n**Pending a GPU:** the ~1B-parameter bf16 ZeRO-3 ORPO run (tokens/s, MFU). "
                    "Run this script unchanged on a GPU node; it picks the ~1B model there.")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/training.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = str(root / "prefs")
        write_text_prefs(data, 64)
        sections = ["# Training benchmarks", "",
                    f"Host: {os.cpu_count()} CPUs, torch {torch.__version__}, "
                    f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}", "",
                    "## Memory per rank, 2 workers, full fine-tuning (hidden 512, 6 layers)", "",
                    *memory(root, data, args.steps), "",
                    "## bf16 ORPO throughput, ZeRO-3 (the paper's 1400/700 token limits)", "",
                    *throughput(root, data, args.steps)]
    text = "\n".join(sections) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
