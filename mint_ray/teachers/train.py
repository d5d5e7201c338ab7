"""Train a teacher (fusion classifier or tiny CLIP) on a cohort with Ray Train.

``mint-ray teacher train --task rare_disease --kind fusion --cohort URI``: the
driver checks the cohort and builds the untrained teacher (tokenizer trained on
the train notes or label prompts), then a ``TorchTrainer`` runs data-parallel
workers (DDP; gloo on CPU, NCCL on GPU). Each worker reads the cohort's train
split itself and takes its rank's shard, decoding images locally. Rank 0
evaluates held-out top-1/top-k (every ``eval_every`` epochs) and, at the end, saves the
teacher directory to ``output_uri``, where the preference job loads it.

Before training, the driver fits the text-only ceiling of the knowledge-available
check (:mod:`mint_ray.teachers.knowledge`); rank 0 scores the teacher against it at
the end. ``config`` holds the stage's typed config, ``cohort`` its data checks.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mint_ray import console, storage
from mint_ray.errors import MintError
from mint_ray.tasks import get_task
from mint_ray.teachers.cohort import COLUMNS, plan_cohort, read_cases
from mint_ray.teachers.config import Config
from mint_ray.teachers.knowledge import (
    TEXT_CEILING_FILE,
    final_scores,
    knowledge_metrics,
    knowledge_summary,
    text_ceiling,
)
from mint_ray.teachers.protocol import SPEC_FILE, Case, TeacherSpec, score_all, top_k_accuracy

log = logging.getLogger(__name__)

CLI_FLAGS = {
    "task": "task", "kind": "kind", "cohort": "cohort_uri", "out": "output_uri", "name": "name",
    "epochs": "epochs", "workers": "num_workers", "gpu": "use_gpu",
    "overwrite": "storage.overwrite",
}


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: shard, train with DDP, rank 0 evaluates and saves."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    from mint_ray.teachers.loader import save_teacher_dir

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = Config.model_validate(config["cfg"])
    labels: tuple[str, ...] = tuple(config["labels"])
    need_image = cfg.kind == "clip"
    torch.manual_seed(cfg.seed)
    device = get_device()
    teacher = config["teacher"]
    teacher.to(device)

    cases, truth = read_cases(cfg.cohort(), cfg.task, "train", labels, need_image, rank, world)
    per_rank = len(cases)
    inputs = teacher.encode(cases)
    targets = torch.from_numpy(truth)
    del cases
    held_cases: list[Case] = []
    held_truth = np.zeros(0, dtype=np.int64)
    if rank == 0:
        held_cases, held_truth = read_cases(cfg.cohort(), cfg.task, cfg.eval_split, labels,
                                            need_image)

    model = prepare_model(teacher.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    k = config["top_k"]
    history: list[dict[str, float]] = []
    started = time.time()
    progress = console.Progress(f"[teacher {teacher.name}] epoch", cfg.epochs, logger=log,
                                every_n=console.every_n_for(cfg.epochs)) if rank == 0 else None
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(per_rank, generator=generator)
        losses = []
        for start in range(0, per_rank, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            batch = {name: value[idx].to(device) for name, value in inputs.items()}
            loss = teacher.training_loss(model, batch, targets[idx].to(device), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        metrics: dict[str, float] = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if rank == 0 and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            scores = score_all(teacher, held_cases)
            metrics.update(eval_top1=top_k_accuracy(scores, held_truth, 1),
                           eval_topk=top_k_accuracy(scores, held_truth, k),
                           elapsed_s=time.time() - started)
            history.append(metrics)
            progress.update(epoch - progress.done, loss=metrics["train_loss"],
                            **{f"{cfg.eval_split} top1": metrics["eval_top1"], f"top{k}": metrics["eval_topk"]})
            if epoch == cfg.epochs:
                train_seconds = time.time() - started
                ceiling = config["text_ceiling"]
                knowledge = knowledge_summary(
                    cfg, final_scores(teacher, cfg, labels, held_cases, held_truth, k),
                    ceiling["accuracy"] if ceiling else None)
                save_teacher_dir(teacher, cfg.output(), overwrite=cfg.storage.overwrite,
                                 lineage=config["lineage"],
                                 metrics={"eval_split": cfg.eval_split, "k": k,
                                          "eval_rows": len(held_truth),
                                          "train_seconds": train_seconds,
                                          "history": history, "knowledge": knowledge},
                                 extra_files={TEXT_CEILING_FILE: ceiling["predictions"]} if ceiling else None)
    if progress is not None:
        progress.close()
    # Once, at the end, on every rank: a report waits for the controller's next
    # poll (~2 s), so one per epoch would dominate a small run. The per-epoch
    # history travels in the saved teacher's spec instead.
    ray.train.report(metrics)


# ---------------------------------------------------------------- driver


def _user_error(err: Exception) -> MintError | None:
    """The MintError a worker raised, if that is why training failed."""
    for failure in getattr(err, "worker_failures", {}).values():
        cause = getattr(failure, "cause", failure)
        if isinstance(cause, MintError):
            return MintError(str(cause))
    return None


def _build_teacher(cfg: Config, name: str, labels: tuple[str, ...], table: pa.Table) -> Any:
    """The untrained teacher, built once on the driver so every worker starts alike."""
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.kind == "clip":
        from mint_ray.teachers.clip import build_tiny_clip

        return build_tiny_clip(cfg.clip, name=name, task=cfg.task, labels=labels)
    from mint_ray.teachers.fusion import FusionTeacher
    from mint_ray.tokenizer import train_tokenizer

    rows = table.select(["task", "split", "note"]).to_pydict()
    notes = [n for t, s, n in zip(rows["task"], rows["split"], rows["note"], strict=True)
             if t == cfg.task and s == "train" and n and n.strip()]
    tokenizer = train_tokenizer(notes, vocab_size=cfg.fusion.vocab_size)
    return FusionTeacher.build(cfg.fusion, tokenizer, name=name, task=cfg.task, labels=labels)


def run(cfg: Config) -> dict[str, Any]:
    """Train, evaluate and save one teacher; returns a JSON-able summary."""
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mint_ray.ray_cluster import init_ray
    from mint_ray.tracking import stage_run

    task = get_task(cfg.task)
    # Resolved once here, so every worker sees the same absolute URIs.
    cfg = cfg.model_copy(update={"cohort_uri": cfg.cohort(), "output_uri": cfg.output(),
                                 "name": cfg.teacher_name()})
    name, output_uri = cfg.teacher_name(), cfg.output()
    manifest = storage.require_manifest(cfg.cohort())
    table = storage.read_dataset(cfg.cohort())
    plan = plan_cohort(table, manifest, cfg, task.labels)
    storage.check_reachable(output_uri)
    if storage.exists(storage.join(output_uri, SPEC_FILE)) and not cfg.storage.overwrite:
        raise MintError(f"{output_uri} already holds a teacher: pass --overwrite or another --out")
    k = min(cfg.top_k or task.n_answers, len(plan.labels))
    teacher = _build_teacher(cfg, name, plan.labels, table)
    lineage = {"cohort_uri": cfg.cohort(), "cohort_hash": manifest.content_hash,
               "train_rows": plan.train_rows}
    ceiling = (text_ceiling(table.select(list(COLUMNS)).to_pydict(), cfg, plan.labels, k)
               if cfg.knowledge_check.enabled else None)
    if ceiling is not None:
        log.info("[teacher %s] text-only ceiling (trained on train): %s", name,
                 ", ".join(f"{split} top1 {acc['top1']:.3f}" for split, acc in ceiling.accuracy.items()))

    with stage_run(cfg.tracking, "teacher.train", cfg, cfg.storage.root, run_name=f"teacher-{name}",
                   tags={"mint.task": cfg.task, "teacher.kind": cfg.kind}) as tracking:
        tracking.set_lineage("cohort", cfg.cohort(), manifest)
        init_ray(cfg.ray)
        ray_dir = tempfile.mkdtemp(prefix="mint-ray-train-")
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "labels": list(plan.labels),
                               "teacher": teacher, "top_k": k, "lineage": lineage,
                               "text_ceiling": ceiling and {"accuracy": ceiling.accuracy,
                                                            "predictions": ceiling.predictions}},
            # A resource set to 0 (``--set resources_per_worker.GPU=0`` on a CPU cluster) is none.
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={k: v for k, v in cfg.resources_per_worker.items()
                                                               if v}),
            run_config=RunConfig(name=f"teacher-{name}", storage_path=ray_dir,
                                 logging_config=LoggingConfig(log_level=console.ray_train_log_level())))
        started = time.time()
        try:
            trainer.fit()
        except Exception as err:
            user_error = _user_error(err)
            if user_error is not None:
                raise user_error from None
            raise
        finally:
            shutil.rmtree(ray_dir, ignore_errors=True)
        wall = time.time() - started
        spec = TeacherSpec.from_json(storage.read_bytes(storage.join(output_uri, SPEC_FILE))
                                     .decode(), output_uri)
        for row in spec.metrics["history"]:
            tracking.log_metrics({key: value for key, value in row.items() if key != "epoch"},
                                 step=int(row["epoch"]))
        final = spec.metrics["history"][-1]
        knowledge = spec.metrics["knowledge"]
        tracking.log_metrics({"heldout_top1": final["eval_top1"],
                              f"heldout_top{k}": final["eval_topk"], "train_wall_s": wall,
                              **knowledge_metrics(knowledge)})
        if knowledge.get("message"):
            (log.info if knowledge["passed"] else log.warning)("[teacher %s] %s", name, knowledge["message"])
        tracking.set_tags({"teacher.name": spec.name, "teacher.version": spec.version,
                           "teacher.uri": output_uri})
        tracking.log_dict({**json.loads(spec.to_json()), "skipped": plan.skipped},
                          "teacher_spec.json")

    n = len(plan.labels)
    return {
        "teacher_uri": output_uri, "kind": cfg.kind, "task": cfg.task, "name": spec.name,
        "version": spec.version, "labels": n, "train_rows": plan.train_rows,
        "eval_split": cfg.eval_split, "eval_rows": plan.eval_rows, "skipped": plan.skipped,
        "k": k, "top1": final["eval_top1"], "topk": final["eval_topk"],
        "chance_top1": 1 / n, "chance_topk": k / n,
        "train_seconds": spec.metrics["train_seconds"], "wall_seconds": wall,
        # The check's two numbers at the top, where the closing summary shows them in full.
        "text_top1": (knowledge["text_only"] or {}).get(cfg.eval_split, {}).get("top1"),
        "knowledge_margin": knowledge["margin"], "knowledge": knowledge,
        "mlflow_run_id": tracking.run_id,
    }
