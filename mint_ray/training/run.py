"""Train a student (ORPO / DPO / SimPO / SFT) with Ray Train + DeepSpeed.

Driver side: check the config against the data and the model before any
worker starts, build the tiny base model when asked, launch ``TorchTrainer``
with one worker per GPU (or CPU slot), then log and register the consolidated
model in MLflow.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from mint_ray import console, storage, students, tracking
from mint_ray.errors import ConfigError, MintError
from mint_ray.model_folders import METADATA_FILE, local_copy, publish_dir, read_metadata
from mint_ray.ray_cluster import init_ray
from mint_ray.registry import log_student
from mint_ray.tasks import get_task
from mint_ray.training import chunked_logprobs
from mint_ray.training.config import Config
from mint_ray.training.data import Selection, read_selection, training_rows

CLI_FLAGS = {"task": "task", "objective": "objective", "data": "data.uri", "out": "output_uri",
             "workers": "scaling.num_workers", "max-steps": "optim.max_steps"}


def preflight(cfg: Config) -> storage.Manifest:
    """Fail before any worker starts on configs that cannot work with this data/model."""
    manifest = storage.require_manifest(cfg.data.uri)
    meta = manifest.meta
    if meta.get("task") and meta["task"] != cfg.task:
        raise ConfigError(f"task mismatch: data.uri holds {meta['task']} pairs but task={cfg.task}")
    schema = storage.read_dataset_schema(cfg.data.uri)
    if cfg.model.kind == "mllama" and "image_uri" not in schema.names:
        raise ConfigError("model.kind=mllama needs images but data.uri has no image_uri column "
                          "(a text-only preference set): use model.kind=causal_lm")
    return manifest


def check_rows(cfg: Config) -> Selection:
    """The rows ``cfg.data`` selects (splits, filter, target), refused when none is left;
    rows left out are said, with their reason."""
    # Reading ``chosen`` also writes the ground-truth answers: a target that cannot be
    # written (no task in the manifest, no label column) fails here, not in a worker.
    selection = read_selection(cfg.data, columns=["split", "chosen"])
    if not selection.rows:
        raise MintError(f"{cfg.data.uri} has no rows to train on ({selection.summary()}): check data.splits "
                        f"{cfg.data.splits}, data.filter and data.target")
    if selection.left_out:
        print(f"[train] data: {selection.summary()}", flush=True)
    return selection


def check_model(cfg: Config, base_uri: str) -> None:
    """Config checks that need the student's module tree (built on the meta device: no weights):
    LoRA targets that match, and a head the chunked log-probabilities can serve."""
    if not cfg.model.lora.enabled and not cfg.loss.logits_chunk_tokens:
        return
    with tempfile.TemporaryDirectory(prefix="mint-config-") as tmp:
        config_dir = base_uri
        if storage.is_s3(base_uri):  # fetch config.json alone
            config_dir = tmp
            Path(tmp, "config.json").write_bytes(storage.read_bytes(storage.join(base_uri, "config.json")))
        model = students.meta_model(config_dir, cfg.model.kind)
        if cfg.model.lora.enabled:
            students.lora_target_modules(model, cfg.model.lora, cfg.model.kind)
        if cfg.loss.logits_chunk_tokens:
            chunked_logprobs.output_head(model)


def build_tiny_base(cfg: Config, out_uri: str) -> str:
    """Build the tiny student from the preference texts and store it at ``out_uri``."""
    task = get_task(cfg.task)
    texts = [task.system_prompt, task.instruction, *(task.labels or ())]
    for row in training_rows(cfg.data, columns=["prompt", "chosen", "rejected"]):
        for message in [*row["prompt"], *row["chosen"], *row["rejected"]]:
            content = message["content"]
            texts.append(content if isinstance(content, str)
                         else " ".join(p.get("text") or "" for p in content))
    with tempfile.TemporaryDirectory() as tmp:
        students.build_tiny_student(cfg.model.kind, texts, tmp, cfg.model.tiny)
        publish_dir(tmp, out_uri, marker="config.json", overwrite=True)
    return out_uri


def run(cfg: Config) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from mint_ray.training.worker import train_loop

    t0 = time.time()
    cfg = with_absolute_paths(cfg)
    manifest = preflight(cfg)
    selection = check_rows(cfg)
    output_uri = cfg.output_uri or storage.join(cfg.storage.root, "students", cfg.name)
    model_uri = storage.join(output_uri, "model")
    if storage.exists(storage.join(model_uri, "config.json")) and not cfg.storage.overwrite:
        raise MintError(f"{model_uri} already holds a trained model: pass --set storage.overwrite=true "
                        "or choose another output_uri")
    init_ray(cfg.ray)
    base_uri = cfg.model.path or build_tiny_base(cfg, storage.join(output_uri, "base"))
    check_model(cfg, base_uri)
    base_name = cfg.model.path or f"tiny-{cfg.model.kind}"
    metadata = {"task": cfg.task, "kind": cfg.model.kind, "objective": cfg.objective,
                "base_model": base_name, "data_uri": cfg.data.uri, "data_splits": cfg.data.splits,
                "data_target": cfg.data.target, "data_filter": cfg.data.filter,
                "data_content_hash": manifest.content_hash,
                "teacher": manifest.meta.get("teacher", {}),
                # The prompt the pairs were written with (datasets from before it was
                # recorded: the task's defaults); serving asks the same way.
                "prompt": manifest.meta.get("prompt") or get_task(cfg.task).prompt_record(),
                "nll_over": cfg.nll_span,  # None: the objective has no NLL term (DPO, SimPO)
                "lora": cfg.model.lora.model_dump(), "merged": True,
                "code_version": tracking.code_version()}
    with tracking.stage_run(cfg.tracking, "train", cfg, cfg.storage.root, run_name=cfg.name) as run_:
        run_.set_lineage("data", cfg.data.uri, manifest)
        run_.set_tags({"mint.objective": cfg.objective, "mint.base_model": base_name,
                       "mint.teacher": str(manifest.meta.get("teacher", {}).get("name", "")),
                       "mint.teacher_version": str(manifest.meta.get("teacher", {}).get("version", "")),
                       # What ran: the NLL span of ORPO and SFT; "none" for DPO and SimPO.
                       "mint.nll_over": metadata["nll_over"] or "none", "mint.data.target": cfg.data.target,
                       "mint.data.filter": cfg.data.filter, "mint.data.splits": ",".join(cfg.data.splits)})
        run_.log_dict(selection.as_metrics(), "data_selection.json")
        loop_config = {"config": cfg.model_dump(mode="json"), "base_uri": base_uri,
                       "model_uri": model_uri, "metadata": metadata, "run_id": run_.run_id,
                       "tracking_uri": run_.tracking_uri,
                       # A LoRA run's adapter (PEFT's folder) beside the merged model.
                       "adapter_uri": storage.join(output_uri, "adapter")}
        storage_path, storage_fs = _run_storage(output_uri)
        trainer = TorchTrainer(
            train_loop, train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                placement_strategy=cfg.scaling.placement_strategy,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                      **({"GPU": 1} if cfg.scaling.use_gpu else {})}),
            run_config=ray.train.RunConfig(
                name="checkpoints", storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                logging_config=ray.train.LoggingConfig(log_level=console.ray_train_log_level())))
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        with tempfile.TemporaryDirectory(prefix="mint-metadata-") as tmp:
            local = metadata_folder(model_uri, Path(tmp))
            training = read_metadata(local)["training"]
            run_.log_dict(training, "training_summary.json")
            registered = {}
            if run_.run_id:
                name = (cfg.registry.name or get_task(cfg.task).registered_model) if cfg.registry.enabled else None
                registered = log_student(local, name, model_uri=model_uri, tags={
                    "data.uri": cfg.data.uri, "data.content_hash": manifest.content_hash,
                    "base_model": base_name, "objective": cfg.objective, "task": cfg.task,
                    "teacher": str(metadata["teacher"].get("name", "")),
                    "teacher_version": str(metadata["teacher"].get("version", "")),
                    "code_version": metadata["code_version"]})
    summary = {"model_uri": model_uri, "checkpoint": result.checkpoint.path if result.checkpoint else None,
               "registered": registered, "mlflow_run_id": run_.run_id,
               "seconds": round(time.time() - t0, 1), "training": training,
               "data_selection": selection.as_metrics()}
    print(f"[train] done in {summary['seconds']}s: {model_uri}", flush=True)
    return summary


def metadata_folder(model_uri: str, tmp: Path) -> Path:
    """A folder with the trained model's metadata, what the driver reads (and the registry, for
    an s3:// source): the folder itself when local; from s3:// its metadata file alone, copied
    into ``tmp``, not the GBs of weights beside it."""
    if not storage.is_s3(model_uri):
        return local_copy(model_uri)
    (tmp / METADATA_FILE).write_bytes(storage.read_bytes(storage.join(model_uri, METADATA_FILE)))
    return tmp


def with_absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose local paths are absolute: Ray Train workers do not run in
    the driver's working directory."""
    model = cfg.model.model_copy(update={k: storage.absolute(v) for k, v in
                                         (("path", cfg.model.path), ("reference_path", cfg.model.reference_path))
                                         if v is not None})
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"uri": storage.absolute(cfg.data.uri)}),
        "storage": cfg.storage.model_copy(update={"root": storage.absolute(cfg.storage.root)}),
        "output_uri": storage.absolute(cfg.output_uri) if cfg.output_uri else None, "model": model})


def _run_storage(output_uri: str) -> tuple[str, Any]:
    """Ray Train's storage for checkpoints: our S3 filesystem (custom endpoint) or a local path."""
    fs, path = storage.filesystem(output_uri)
    return (path, fs) if storage.is_s3(output_uri) else (path, None)

