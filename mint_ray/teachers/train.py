"""Train a teacher (fusion classifier or tiny CLIP) on a cohort with Ray Train.

``mint-ray teacher train --task rare_disease --kind fusion --cohort URI``: the
driver checks the cohort and builds the untrained teacher (tokenizer trained on
the train notes or label prompts), then a ``TorchTrainer`` runs data-parallel
workers (DDP; gloo on CPU, NCCL on GPU). Each worker reads the cohort's train
split itself and takes its rank's shard, decoding images locally. Rank 0
evaluates held-out top-1/top-k (every ``eval_every`` epochs) and, at the end, saves the
teacher directory to ``output_uri``, where the preference job loads it.

The knowledge-available check (``knowledge_check``; issue 21, SCIENCE.md check A):
before training, the driver fits a text-only ceiling (:mod:`mint_ray.text_baseline`, a
linear classifier on the note) on the train split (L) and scores it on the held-out
split (U) and the test split (T). At the end rank 0 scores the teacher on U with both
inputs, the note only and the image only, and on T; the teacher's top-1 on U minus the
text-only top-1 on U is the knowledge available to transfer. Below ``min_margin`` the
stage fails before saving (``on_fail: error``) or warns. The text-only ceiling's
rankings are saved in the teacher folder (``TEXT_CEILING_FILE``) for a comparison arm.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from mint_ray import console, storage
from mint_ray.config import RayConfig, StorageConfig, StrictModel, TrackingConfig
from mint_ray.errors import MintError
from mint_ray.images import ImageLimits, ImageRejected, decode_rgb
from mint_ray.tasks import get_task
from mint_ray.teachers.clip import ClipSettings
from mint_ray.teachers.fusion import FusionSettings
from mint_ray.teachers.protocol import SPEC_FILE, Case, TeacherSpec, score_all, top_k_accuracy
from mint_ray.text_baseline import DEFAULT_C, fit_text_classifier, knowledge_verdict, ranked_labels

log = logging.getLogger(__name__)

COLUMNS = ("sample_id", "task", "split", "note", "image_uri", "label")
# The text-only ceiling's answers, in the teacher folder: one row per scored case, its k most
# likely labels (k = top_k, the task's answer count: what a comparison arm would answer; the
# full ranking of a 500-label cohort would be 50x larger for nothing the metrics read).
TEXT_CEILING_FILE = "text_ceiling.parquet"
TEXT_CEILING_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),      # the ground truth
    pa.field("ranked_labels", pa.list_(pa.string()), nullable=False),  # the top k, most likely first
    pa.field("probabilities", pa.list_(pa.float32()), nullable=False),  # aligned with ranked_labels
])


class KnowledgeCheck(StrictModel):
    """Whether the teacher knows more than the note: its top-1 on the held-out split minus
    a text-only linear classifier's, both trained on the train split."""

    enabled: bool = Field(True, description="fit the text-only ceiling and compare (needs notes)")
    min_margin: float = Field(0.05, ge=-1, le=1, description="least teacher - text-only top-1")
    on_fail: Literal["error", "warn"] = Field(
        "warn", description="error: refuse to save a teacher below the margin; warn: save and say so")
    text_c: float = Field(DEFAULT_C, gt=0, description="the text classifier's inverse regularisation")


class Config(StrictModel):
    """``mint-ray teacher train``: which teacher, on which cohort, how."""

    task: str
    kind: Literal["fusion", "clip"]
    cohort_uri: str | None = Field(None, description="default <storage.root>/cohorts/<task>")
    output_uri: str | None = Field(None,
                                   description="default <storage.root>/teachers/<task>-<kind>")
    name: str | None = Field(None, description="the teacher's name; default <task>-<kind>")
    fusion: FusionSettings = Field(default_factory=FusionSettings)
    clip: ClipSettings = Field(default_factory=ClipSettings)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1, description="per worker")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = 0
    eval_split: Literal["validation", "test"] = "validation"
    eval_every: int = Field(1, ge=1, description="held-out evaluation every n epochs (and the last)")
    knowledge_check: KnowledgeCheck = Field(default_factory=KnowledgeCheck)
    top_k: int | None = Field(None, ge=1, description="default: the task's answer count")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = Field(False, description="one GPU per worker unless resources_per_worker "
                                            "names another count; NCCL instead of gloo")
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def cohort(self) -> str:
        return storage.absolute(self.cohort_uri or storage.join(self.storage.root, "cohorts", self.task))

    def output(self) -> str:
        return storage.absolute(self.output_uri or storage.join(self.storage.root, "teachers",
                                                         f"{self.task}-{self.kind}"))

    def teacher_name(self) -> str:
        return self.name or f"{self.task}-{self.kind}"


CLI_FLAGS = {
    "task": "task", "kind": "kind", "cohort": "cohort_uri", "out": "output_uri", "name": "name",
    "epochs": "epochs", "workers": "num_workers", "gpu": "use_gpu",
    "overwrite": "storage.overwrite",
}


# ---------------------------------------------------------------- cohort checks (pure)


@dataclass(frozen=True)
class CohortPlan:
    """What the driver learned from the cohort before any training."""

    labels: tuple[str, ...]
    train_rows: int
    eval_rows: int
    skipped: dict[str, int]


def label_space(task_name: str, task_labels: tuple[str, ...], catalog: list[Any] | None,
                cohort_labels: list[str]) -> tuple[str, ...]:
    """The labels a teacher scores: the manifest's ``label_catalog``, else the
    task's fixed labels, else the cohort's distinct labels (sorted)."""
    if catalog:
        names = tuple(str(item["name"]) if isinstance(item, dict) else str(item)
                      for item in catalog)
        unknown = sorted(set(names) - set(task_labels)) if task_labels else []
        if unknown:
            raise MintError(f"label_catalog names labels outside task {task_name!r}: "
                            f"{', '.join(unknown[:5])}; fix the cohort or choose the right --task")
        return names
    return task_labels or tuple(sorted(set(cohort_labels)))


def select_rows(rows: dict[str, list[Any]], task: str, split: str, labels: tuple[str, ...],
                need_image: bool) -> tuple[list[int], Counter[str]]:
    """Indices of usable ``split`` rows of ``task``, and why the others were skipped."""
    index = set(labels)
    keep: list[int] = []
    skipped: Counter[str] = Counter()
    for i, (t, s) in enumerate(zip(rows["task"], rows["split"], strict=True)):
        if t != task or s != split:
            continue
        label, note, image = rows["label"][i], rows["note"][i], rows["image_uri"][i]
        if label is None:
            skipped[f"{split}: no label"] += 1
        elif label not in index:
            skipped[f"{split}: label not in the label space"] += 1
        elif need_image and not image:
            skipped[f"{split}: no image"] += 1
        elif not image and not (note and note.strip()):
            skipped[f"{split}: neither note nor image"] += 1
        else:
            keep.append(i)
    return keep, skipped


def plan_cohort(table: pa.Table, manifest: storage.Manifest, cfg: Config,
                task_labels: tuple[str, ...]) -> CohortPlan:
    """Check the cohort fits the config; one clear error otherwise."""
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise MintError(f"cohort {cfg.cohort()} lacks column(s) {', '.join(missing)}: "
                        "it must be written by `mint-ray data synth` (or follow its schema)")
    rows = table.select(list(COLUMNS)).to_pydict()
    tasks = Counter(rows["task"])
    if tasks[cfg.task] == 0:
        found = ", ".join(sorted(map(str, tasks))) or "no rows"
        raise MintError(f"cohort {cfg.cohort()} holds no rows of task {cfg.task!r} "
                        f"(it has: {found}): check --task or the cohort URI")
    cohort_labels = [lab for t, lab in zip(rows["task"], rows["label"], strict=True)
                     if t == cfg.task and lab is not None]
    # The brief's "label_catalog", or synth's "labels": both are [{"name", "id"}].
    catalog = manifest.meta.get("label_catalog") or manifest.meta.get("labels")
    labels = label_space(cfg.task, task_labels, catalog, cohort_labels)
    if len(labels) < 2:
        raise MintError(f"cohort {cfg.cohort()} gives {len(labels)} label(s) for task "
                        f"{cfg.task!r}: a teacher needs at least 2")
    need_image = cfg.kind == "clip"
    train, skipped = select_rows(rows, cfg.task, "train", labels, need_image)
    held, skipped_eval = select_rows(rows, cfg.task, cfg.eval_split, labels, need_image)
    if not train:
        raise MintError(f"cohort {cfg.cohort()} has no usable train rows for task {cfg.task!r}"
                        f"{' with an image' if need_image else ''} (skipped: {dict(skipped)}); "
                        "regenerate the cohort with a train split")
    if not held:
        other = "test" if cfg.eval_split == "validation" else "validation"
        raise MintError(f"cohort {cfg.cohort()} has no usable {cfg.eval_split} rows for task "
                        f"{cfg.task!r} to evaluate on: pass --set eval_split={other}")
    return CohortPlan(labels=labels, train_rows=len(train), eval_rows=len(held),
                      skipped=dict(skipped + skipped_eval))


# ---------------------------------------------------------------- the text-only ceiling


@dataclass(frozen=True)
class TextCeiling:
    """The text-only classifier's accuracy per scored split and its rankings (Parquet bytes)."""

    accuracy: dict[str, dict[str, float]]
    predictions: bytes


def scored_splits(cfg: Config) -> list[str]:
    """The held-out split (U) and the test split (T), once each."""
    return list(dict.fromkeys([cfg.eval_split, "test"]))


def text_ceiling(rows: dict[str, list[Any]], cfg: Config, labels: tuple[str, ...],
                 k: int) -> TextCeiling | None:
    """Fit the note-only classifier on the train split and score the held-out and test
    splits; None when the train split has no notes (an image-only task)."""
    train, _ = select_rows(rows, cfg.task, "train", labels, need_image=False)
    train = [i for i in train if rows["note"][i] and rows["note"][i].strip()]
    if len({rows["label"][i] for i in train}) < 2:
        return None
    model = fit_text_classifier([rows["note"][i] for i in train], [rows["label"][i] for i in train],
                                labels, c=cfg.knowledge_check.text_c)
    index = {label: i for i, label in enumerate(labels)}
    accuracy: dict[str, dict[str, float]] = {}
    out: dict[str, list[Any]] = {name: [] for name in TEXT_CEILING_SCHEMA.names}
    for split in scored_splits(cfg):
        keep, _ = select_rows(rows, cfg.task, split, labels, need_image=cfg.kind == "clip")
        if not keep:
            continue
        probs = model.probabilities([rows["note"][i] for i in keep])
        truth = np.array([index[rows["label"][i]] for i in keep])
        accuracy[split] = {"top1": top_k_accuracy(probs, truth, 1),
                           "topk": top_k_accuracy(probs, truth, k)}
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out["sample_id"] += [rows["sample_id"][i] for i in keep]
        out["split"] += [split] * len(keep)
        out["label"] += [rows["label"][i] for i in keep]
        out["ranked_labels"] += ranked_labels(probs, labels, k)
        out["probabilities"] += np.take_along_axis(probs, order, axis=1).astype(np.float32).tolist()
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(out, schema=TEXT_CEILING_SCHEMA), buffer)
    return TextCeiling(accuracy, buffer.getvalue())


# ---------------------------------------------------------------- Ray Train worker


def shard_positions(n: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of ``n`` rows, the same length on every rank (the
    first rows repeat to fill): DDP needs the same number of steps everywhere,
    or the last all-reduce hangs."""
    return [(rank + j * world) % n for j in range(math.ceil(n / world))]


def read_cases(cohort_uri: str, task: str, split: str, labels: tuple[str, ...],
               need_image: bool, rank: int = 0, world: int = 1) -> tuple[list[Case], np.ndarray]:
    """Rank ``rank``'s shard of the usable rows of one split (all of them when
    ``world`` is 1) as decoded cases and label indices. Only the shard's
    images are read."""
    rows = storage.read_dataset(cohort_uri, columns=list(COLUMNS)).to_pydict()
    keep, _ = select_rows(rows, task, split, labels, need_image)
    index = {label: i for i, label in enumerate(labels)}
    chosen = [keep[p] for p in shard_positions(len(keep), rank, world)] if keep else []
    decoded: dict[int, Case] = {}
    for i in chosen:
        if i in decoded:
            continue
        uri = rows["image_uri"][i]
        try:
            image = decode_rgb(storage.read_bytes(uri), ImageLimits()) if uri else None
        except ImageRejected as err:
            raise MintError(f"sample {rows['sample_id'][i]}: image {uri} cannot be decoded "
                            f"({err}); fix or regenerate the cohort") from None
        decoded[i] = Case(note=rows["note"][i], image=image)
    return ([decoded[i] for i in chosen],
            np.array([index[rows["label"][i]] for i in chosen], dtype=np.int64))


def final_scores(teacher: Any, cfg: Config, labels: tuple[str, ...], held: list[Case],
                 held_truth: np.ndarray, k: int) -> dict[str, dict[str, float]]:
    """The trained teacher's top-1/top-k per scored split; on the held-out split also with
    the note only and the image only (fusion), which says where its knowledge comes from."""
    need_image = cfg.kind == "clip"
    out: dict[str, dict[str, float]] = {}
    for split in scored_splits(cfg):
        cases, truth = ((held, held_truth) if split == cfg.eval_split else
                        read_cases(cfg.cohort(), cfg.task, split, labels, need_image))
        if not cases:
            continue
        scores = score_all(teacher, cases)
        out[split] = {"top1": top_k_accuracy(scores, truth, 1), "topk": top_k_accuracy(scores, truth, k)}
        if split == cfg.eval_split and cfg.kind == "fusion":
            for only, kept in (("note_top1", [Case(note=c.note, image=None) for c in cases]),
                               ("image_top1", [Case(note=None, image=c.image) for c in cases])):
                out[split][only] = top_k_accuracy(score_all(teacher, kept), truth, 1)
    return out


def knowledge_summary(cfg: Config, teacher_scores: dict[str, dict[str, float]],
                      text: dict[str, dict[str, float]] | None) -> dict[str, Any]:
    """What the teacher knows beyond the note, for the spec, the result and MLflow; raises
    (``on_fail: error``) when the margin is absent."""
    check = cfg.knowledge_check
    summary: dict[str, Any] = {"split": cfg.eval_split, "teacher": teacher_scores, "text_only": text,
                               "min_margin": check.min_margin, "on_fail": check.on_fail}
    if text is None or cfg.eval_split not in text:
        return {**summary, "margin": None, "passed": None,
                "skipped": "disabled" if not check.enabled else "no notes in the train split"}
    verdict = knowledge_verdict(teacher_scores[cfg.eval_split]["top1"], text[cfg.eval_split]["top1"],
                                check.min_margin)
    if not verdict.passed and check.on_fail == "error":
        raise MintError(f"{verdict.message(cfg.eval_split)}. Nothing was saved.")
    return {**summary, "margin": verdict.margin, "passed": verdict.passed,
            "message": verdict.message(cfg.eval_split), "text_ceiling_file": TEXT_CEILING_FILE}


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


def knowledge_metrics(knowledge: dict[str, Any]) -> dict[str, float]:
    """The check's numbers as flat MLflow metrics: ``knowledge_margin``,
    ``teacher_top1_validation``, ``teacher_image_top1_validation``, ``text_top1_test``, ..."""
    flat = {"knowledge_margin": knowledge["margin"]} if knowledge["margin"] is not None else {}
    for who, per_split in (("teacher", knowledge["teacher"]), ("text", knowledge["text_only"] or {})):
        for split, values in per_split.items():
            flat.update({f"{who}_{name}_{split}": value for name, value in values.items()})
    return flat


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
