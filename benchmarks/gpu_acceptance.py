"""GPU acceptance on one GPU node: every accelerated stage of the platform, run for real.

1. The text cohort, the fusion teacher and the preference pairs, the teacher's actor pool
   on a GPU (``teacher.num_gpus_per_actor: 1``).
2. The text ORPO student: a Llama-3.2-1B-shaped model (built from a config with a
   tokenizer trained here; nothing is downloaded), bf16, full fine-tuning, ZeRO-3 then
   ZeRO-2, on 2 workers when the node has 2 GPUs, else 1.
3. A short vision-student run (tiny Mllama, ORPO, the unpacked layout).
4. Evaluation generation of the ZeRO-2 text student on a GPU actor.
5. One Ray Serve request to that student on a GPU replica.

Every figure in ``benchmarks/results/gpu.md`` comes from these runs: tokens/s (the
training summary), MFU = 6 x parameters x tokens/s / (the device's dense bf16 peak x
GPUs), peak GPU memory per rank (``peak_gpu_mem_gb`` of the summary), export time
and size. Without CUDA the script refuses: exit 2, nothing run, nothing written.

    python benchmarks/gpu_acceptance.py [--steps 12] [--out benchmarks/results/gpu.md]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mint_ray import storage  # noqa: E402
from mint_ray.config import load_config  # noqa: E402
from mint_ray.demo import RECIPES, Step  # noqa: E402

NO_GPU = ("gpu_acceptance: no CUDA device here (torch.cuda.is_available() is False). It measures GPU runs "
          "only: run it on a GPU node. Nothing was run and nothing was written.")
# Dense bf16 peak per GPU in TFLOP/s (NVIDIA datasheets, SXM parts), for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
# Llama 3.2-1B's shape (hidden 2048, MLP 8192, 16 layers, 32/8 heads), untied embeddings
# of the tokenizer trained here: ~1.0B parameters.
ONE_B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "num_layers": 16,
         "num_heads": 32, "num_kv_heads": 8}
ONE_B_MFU_GOAL = 0.40


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device named like ``torch.cuda.get_device_name()``; None if unknown."""
    return next((tflops for part, tflops in PEAK_BF16_TFLOPS.items() if part in device_name.upper()), None)


def mfu(params: int, tokens_per_s: float, gpus: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: forward + backward is ~6 FLOPs per parameter per token
    (attention's own FLOPs left out, so this slightly understates it)."""
    return 6 * params * tokens_per_s / (peak_tflops * 1e12 * gpus)


def per_rank(training: dict[str, Any], key: str) -> list[float]:
    """``key_rank0``, ``key_rank1``, ... of a training summary."""
    return [training[f"{key}_rank{r}"] for r in range(training["world_size"])]


def training_row(name: str, summary: dict[str, Any], zero: int, device_name: str) -> dict[str, str]:
    """One results row from a train stage's summary and its output folder on this node."""
    t = summary["training"]
    peak = peak_bf16_tflops(device_name)
    model_dir = Path(summary["model_uri"])
    # The export runs after the last checkpoint is written and ends with the model folder.
    checkpoint = Path(summary["checkpoint"])
    export_s = max(f.stat().st_mtime for f in model_dir.iterdir()) - checkpoint.stat().st_mtime
    return {"run": name, "GPUs": str(t["world_size"]), "ZeRO": str(zero), "params": f"{t['total_params'] / 1e9:.2f} B",
            "tokens/s": f"{t['tokens_per_s']:.0f}",
            "MFU": f"{mfu(t['total_params'], t['tokens_per_s'], t['world_size'], peak):.1%}" if peak else "n/a",
            "peak GPU GB per rank": " / ".join(f"{g:.1f}" for g in per_rank(t, "peak_gpu_mem_gb")),
            "export s": f"{export_s:.0f}",
            "export GB": f"{sum(f.stat().st_size for f in model_dir.rglob('*') if f.is_file()) / 1e9:.2f}"}


def markdown_table(rows: list[dict[str, str]]) -> list[str]:
    """``rows`` (same keys, in order) as a Markdown table."""
    keys = list(rows[0])
    return [f"| {' | '.join(keys)} |", f"|{'---|' * len(keys)}",
            *(f"| {' | '.join(row[k] for k in keys)} |" for row in rows)]


def step_config(step: Step) -> tuple[Any, Any]:
    """The stage module (``Config``, ``run``) of ``step`` and its validated config."""
    module = importlib.import_module(step.module)
    return module, load_config(module.Config, RECIPES / step.recipe, list(step.overrides))


def plan(root: Path, steps: int, workers: int) -> list[Step]:
    """Every stage run, in order; each writes under ``root`` where the next one reads."""
    common = (f"storage.root={root}", "storage.overwrite=true", "tracking.enabled=false")
    cohort, teacher, pairs = root / "cohort", root / "teacher", root / "pairs"
    gpu_training = ("deepspeed.bf16=true", "scaling.use_gpu=true", "scaling.cpus_per_worker=2", "ray.num_cpus=12",
                    f"optim.max_steps={steps}", "optim.epochs=1000", f"checkpoint.every_n_steps={steps}")
    text = [Step(f"text ORPO ~1B, ZeRO-{zero}", "mint_ray.training.run", "train_text_orpo_local.yaml", (
        *common, f"data.uri={pairs}", f"output_uri={root / f'text-zero{zero}'}",
        *(f"model.tiny.{k}={v}" for k, v in ONE_B.items()), "model.lora.enabled=false",
        f"deepspeed.zero_stage={zero}", f"scaling.num_workers={workers}", "optim.micro_batch_size=4",
        *gpu_training)) for zero in (3, 2)]
    return [
        Step("text cohort", "mint_ray.data.synth", "synth_local.yaml", (
            *common, "task=rare_disease", f"output_uri={cohort}", "sizes.n_samples=300", "sizes.n_diseases=20")),
        Step("fusion teacher", "mint_ray.teachers.train", "teacher_rare_disease_fusion.yaml", (
            *common, f"cohort_uri={cohort}", f"output_uri={teacher}", "epochs=3")),
        Step("preferences (teacher pool, 1 GPU per actor)", "mint_ray.preferences.run",
             "preferences_rare_disease.yaml", (*common, f"cohort_uri={cohort}", f"teacher.uri={teacher}",
                                                f"output_uri={pairs}", "teacher.num_gpus_per_actor=1")),
        *text,
        Step("vision ORPO, tiny Mllama", "mint_ray.training.run", "train_vision_orpo_local.yaml", (
            *common, f"data.uri={root / 'vision-pairs'}", f"output_uri={root / 'vision'}", "scaling.num_workers=1",
            *gpu_training)),
        Step("evaluation generation (1 GPU actor)", "mint_ray.evaluation.run", "evaluate_rare_disease.yaml", (
            *common, f"model_uri={root / 'text-zero2' / 'model'}", f"data_uri={pairs}", "max_cases=32",
            "generation.num_gpus_per_actor=1", "generation.max_new_tokens=64",
            f"output_uri={root / 'evaluation'}")),
    ]


def run_all(root: Path, steps: int) -> list[str]:
    import ray

    from tests.prefdata import write_vision_prefs

    device_name = torch.cuda.get_device_name()
    write_vision_prefs(str(root / "vision-pairs"), 16)
    results: dict[str, dict[str, Any]] = {}
    timings: list[dict[str, str]] = []
    for step in plan(root, steps, workers=min(torch.cuda.device_count(), 2)):
        module, cfg = step_config(step)
        t0 = time.time()
        try:
            results[step.name] = module.run(cfg)
        finally:
            ray.shutdown()  # each stage sizes its own in-process Ray
        timings.append({"stage": step.name, "seconds": f"{time.time() - t0:.0f}"})
    t0 = time.time()
    serve_ms = serve_one_request(str(root / "text-zero2" / "model"), root / "cohort")
    timings.append({"stage": "Serve: deploy on a GPU replica + one request", "seconds": f"{time.time() - t0:.0f}"})

    rows = [training_row(name, summary, zero, device_name) for name, summary, zero in (
        ("text ORPO ~1B", results["text ORPO ~1B, ZeRO-3"], 3), ("text ORPO ~1B", results["text ORPO ~1B, ZeRO-2"], 2),
        ("vision ORPO, tiny Mllama", results["vision ORPO, tiny Mllama"], 3))]
    one_b = [r for r in rows[:2] if r["MFU"] != "n/a"]
    goal = bool(one_b) and all(float(r["MFU"].rstrip("%")) / 100 >= ONE_B_MFU_GOAL for r in one_b)
    evaluation = results["evaluation generation (1 GPU actor)"]
    return ["# GPU acceptance", "",
            f"Device: {torch.cuda.device_count()} x {device_name}, torch {torch.__version__}, "
            f"{steps} training steps per run (the first left out of tokens/s). Written by "
            "`benchmarks/gpu_acceptance.py` from its own runs.", "",
            "## Training", "", *markdown_table(rows), "",
            f"MFU goal for the ~1B text student: >= {ONE_B_MFU_GOAL:.0%}: {'met' if goal else 'NOT met'}. "
            "Export: from the last checkpoint's write to the model folder's last file; size: the model folder.", "",
            "## Evaluation and serving", "",
            f"- evaluation of the ZeRO-2 student: {evaluation['metrics']['n']} test cases in "
            f"{evaluation['seconds']:.0f} s (1 GPU actor, up to 64 new tokens, the stage's own wall time)",
            f"- one Serve request (GPU replica, bf16): {serve_ms:.0f} ms end to end", "",
            "## Stage wall times", "", *markdown_table(timings)]


def serve_one_request(model_dir: str, cohort: Path) -> float:
    """Serve the student on a GPU replica, ask one test case, return the latency in ms."""
    import pyarrow.compute as pc
    import ray
    from ray import serve

    from mint_ray.serving.client import ask
    from mint_ray.serving.config import DeploymentConfig, HttpConfig, ServeConfig
    from mint_ray.serving.run import deploy

    table = storage.read_dataset(str(cohort), columns=["split", "note"])
    note = table.filter(pc.equal(table["split"], "test")).slice(0, 1).to_pylist()[0]["note"]
    app = ServeConfig(model_uri=model_dir, task="rare_disease", deployment=DeploymentConfig(num_gpus=1))
    try:
        base = deploy({"mint-gpu": (app, "/rare_disease")}, HttpConfig(port=8000))
        t0 = time.time()
        ask(f"{base}/rare_disease", "rare_disease", note=note)  # the answer is not printed: a clinical note's
        return (time.time() - t0) * 1000
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/gpu.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mint-gpu-") as tmp:
        text = "\n".join(run_all(Path(tmp), args.steps)) + "\n"
    Path(args.out).write_text(text)  # only once every run has finished
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
