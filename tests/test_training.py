"""Student training on a real Ray cluster with DeepSpeed (CPU, gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import ray
import torch
from safetensors.torch import load_file

from mint_ray import storage
from mint_ray.config import load_config
from mint_ray.errors import ConfigError
from mint_ray.students import model_class
from mint_ray.training import run as train_stage
from mint_ray.training.config import Config
from mint_ray.training.worker import EXPORT_CHECK
from tests.prefdata import write_text_prefs, write_vision_prefs

pytestmark = pytest.mark.slow

TINY = ["model.tiny.vocab_size=400", "model.lora.r=8", "model.lora.alpha=16", "optim.lr=2e-3",
        "optim.micro_batch_size=2", "optim.warmup_ratio=0", "ray.num_cpus=4"]


@pytest.fixture(autouse=True, scope="module")
def _ray_per_module():
    """One in-process Ray for the module's runs (init_ray reuses it); stopped at the end."""
    yield
    ray.shutdown()


def _config(tmp_path: Path, data: str, *extra: str, task: str = "rare_disease") -> Config:
    return load_config(Config, None, [f"task={task}", f"data.uri={data}", f"storage.root={tmp_path}",
                                      f"output_uri={tmp_path}/student", *TINY, *extra])


def _reload_matches_engine(model_dir: str, kind: str) -> float:
    """Max |logits| difference between the exported model (fresh load) and the training engine."""
    local = Path(model_dir)
    check = load_file(str(local / EXPORT_CHECK))
    expected = check.pop("logits")
    model = model_class(kind).from_pretrained(local, dtype=torch.float32).eval()
    if kind == "mllama":
        from mint_ray.training.vision import cross_attention_mask

        check["cross_attention_mask"] = cross_attention_mask(check["input_ids"], check["aspect_ratio_mask"],
                                                             model.config.image_token_index)
    with torch.no_grad():
        got = model(**check).logits
    return float((got - expected).abs().max())


def _history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def test_zero3_orpo_two_workers_shards_learns_and_exports(tmp_path: Path) -> None:
    write_text_prefs(str(tmp_path / "prefs"), 40)
    cfg = _config(tmp_path, str(tmp_path / "prefs"), "optim.epochs=3", "checkpoint.every_n_steps=10")
    summary = train_stage.run(cfg)
    t = summary["training"]
    assert t["steps"] == 30 and t["world_size"] == 2
    # Each rank holds about half of the parameters and of the optimizer state.
    for rank in (0, 1):
        assert 0.4 < t[f"param_shard_fraction_rank{rank}"] < 0.6
    opt = [t["optimizer_state_numel_rank0"], t["optimizer_state_numel_rank1"]]
    assert min(opt) > 0 and 0.4 < opt[0] / sum(opt) < 0.6
    loss = _history(summary["mlflow_run_id"], "loss")
    assert len(loss) == 30 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5
    assert _reload_matches_engine(summary["model_uri"], "causal_lm") < 1e-4
    assert summary["registered"]["version"] == "1"


def test_multi_node_two_raylets_on_s3(tmp_path: Path, s3_bucket: str) -> None:
    """Two raylets on this machine; the driver is a separate `mint-ray train` process that
    attaches to the cluster (as a user's would), so the cluster's teardown never touches
    this test process's own Ray."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        data = f"{s3_bucket}/prefs"
        write_text_prefs(data, 12)
        out = subprocess.run(
            [sys.executable, "-m", "mint_ray.cli", "train", "--task", "rare_disease", "--data", data,
             "--out", f"{s3_bucket}/student", *(a for o in [*TINY, f"storage.root={tmp_path}",
                                                            f"ray.address={cluster.address}",
                                                            "scaling.placement_strategy=STRICT_SPREAD",
                                                            "optim.max_steps=2"] for a in ("--set", o))],
            capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        # The CLI prints the run's summary as JSON (Ray may log more lines after it).
        start = out.stdout.index('{\n  "model_uri"')
        summary, _ = json.JSONDecoder().raw_decode(out.stdout[start:])
        assert len(set(summary["training"]["node_ids"])) == 2  # one worker per node
        assert storage.exists(f"{s3_bucket}/student/model/config.json")
        assert summary["checkpoint"].startswith(s3_bucket[len("s3://"):])
    finally:
        cluster.shutdown()


def _train_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


def test_killed_worker_resumes_from_latest_checkpoint(tmp_path: Path) -> None:
    write_text_prefs(str(tmp_path / "prefs"), 80)
    cfg = _config(tmp_path, str(tmp_path / "prefs"), "optim.micro_batch_size=1", "optim.epochs=2",
                  "checkpoint.every_n_steps=5", "checkpoint.max_failures=2", "model.lora.r=64")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(train_stage.run(cfg)))
    thread.start()
    checkpoints = tmp_path / "student" / "checkpoints"
    deadline = time.time() + 300
    # The controller lists a checkpoint in its snapshot once it is registered.
    snapshot = checkpoints / "checkpoint_manager_snapshot.json"
    while time.time() < deadline and not (
            snapshot.exists() and json.loads(snapshot.read_text() or "{}").get("checkpoint_results")):
        time.sleep(0.1)
    victims = _train_workers()
    assert victims, "no Ray Train worker process found"
    victims[-1].kill()
    thread.join(timeout=600)
    training = result["training"]
    assert training["steps"] == 80
    assert 0 < training["resumed_from_step"] < 80


def test_resume_on_request_from_an_earlier_run(tmp_path: Path) -> None:
    write_text_prefs(str(tmp_path / "prefs"), 16)
    first = train_stage.run(_config(tmp_path, str(tmp_path / "prefs"), "optim.max_steps=2",
                                    "tracking.enabled=false"))
    resumed = train_stage.run(_config(
        tmp_path, str(tmp_path / "prefs"), "optim.max_steps=4", "tracking.enabled=false",
        f"output_uri={tmp_path}/student2", f"checkpoint.resume_from={first['checkpoint']}"))
    assert resumed["training"]["resumed_from_step"] == 2 and resumed["training"]["steps"] == 4


def test_mllama_zero3_with_images(tmp_path: Path) -> None:
    write_vision_prefs(str(tmp_path / "prefs"), 8)
    cfg = _config(tmp_path, str(tmp_path / "prefs"), "model.kind=mllama", "optim.max_steps=2",
                  task="tissue_type")
    summary = train_stage.run(cfg)
    assert summary["training"]["steps"] == 2
    assert _reload_matches_engine(summary["model_uri"], "mllama") < 1e-4


@pytest.mark.parametrize("objective", ["dpo", "sft", "simpo"])
def test_other_objectives_run(tmp_path: Path, objective: str) -> None:
    write_text_prefs(str(tmp_path / "prefs"), 8)
    cfg = _config(tmp_path, str(tmp_path / "prefs"), f"objective={objective}", "optim.max_steps=2",
                  "deepspeed.zero_stage=2", "tracking.enabled=false")
    assert train_stage.run(cfg)["training"]["steps"] == 2


@pytest.mark.parametrize(("overrides", "needle"), [
    (["objective=dpo", "model.lora.enabled=false"], "needs model.reference_path"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["optim.global_batch_size=7"], "does not equal"),
    (["model.kind=mllama"], "rare_disease is text-only"),
])
def test_contradictory_configs_fail_before_workers(tmp_path: Path, overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        _config(tmp_path, str(tmp_path / "prefs"), *overrides)


def test_preflight_errors_name_the_field(tmp_path: Path) -> None:
    write_text_prefs(str(tmp_path / "prefs"), 4)
    # A text-only table labelled as the vision task: the vision student must refuse it.
    text_only = storage.read_dataset(str(tmp_path / "prefs"))
    storage.write_dataset(str(tmp_path / "textonly"), text_only, meta={"task": "tissue_type"})
    with pytest.raises(ConfigError, match="no image_uri column"):
        train_stage.preflight(_config(tmp_path, str(tmp_path / "textonly"), "model.kind=mllama",
                                      task="tissue_type"))
    with pytest.raises(ConfigError, match="task mismatch"):
        write_vision_prefs(str(tmp_path / "vprefs"), 2)
        train_stage.preflight(_config(tmp_path, str(tmp_path / "vprefs")))
    cfg = _config(tmp_path, str(tmp_path / "prefs"), "model.lora.target_modules=[nope_proj]")
    with pytest.raises(ConfigError, match="match no linear module"):
        train_stage.run(cfg)


def test_training_reads_only_its_splits(tmp_path: Path) -> None:
    import pyarrow as pa

    from mint_ray.training.config import DataConfig
    from mint_ray.training.data import training_rows

    write_text_prefs(str(tmp_path / "prefs"), 6)
    table = storage.read_dataset(str(tmp_path / "prefs"))
    split = pa.array(["train", "train", "validation", "test", "test", "train"])
    storage.write_dataset(str(tmp_path / "mixed"), table.set_column(table.schema.get_field_index("split"),
                                                                    "split", split))
    rows = training_rows(DataConfig(uri=str(tmp_path / "mixed")))
    assert sorted(r["sample_id"] for r in rows) == ["s0", "s1", "s5"]
    held_out = training_rows(DataConfig(uri=str(tmp_path / "mixed"), splits=["test"]), columns=["prompt"])
    assert len(held_out) == 2 and "chosen" not in held_out[0]
