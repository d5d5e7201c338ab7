"""Evaluate a student on a test split: generation, the paper's metrics, a report.

``mint-ray evaluate --task rare_disease --model models:/mint-rare-disease-text@champion --data s3://b/preferences/rare_disease``

The model is a local or ``s3://`` directory, a registered version
(``models:/name/3``, ``models:/name@alias``) or a bare base checkpoint. The
test cases come from the preference dataset (its prompts, images, labels and
the teacher's lists for CAR), rows with ``split == test`` by default. Before
anything is generated the stage checks that the model resolves, that model,
data and ``task`` agree, and that every test case has a label. Answers are
generated with Ray Data (``generate.py``), scored with the task's parser and
the paper's metrics, and written as a report (``report.py``) to ``output_uri``;
metrics and report go to the stage's MLflow run and to the model's own run, and
a registered version gets the metrics as ``eval.*`` tags, which ``mint-ray
promote`` compares. ``retrieval`` turns the run into the RAG baseline (base
model + diseases retrieved from the HPO annotations in the prompt).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from mint_ray import storage, tracking
from mint_ray.config import RayConfig, StorageConfig, StrictModel, TrackingConfig
from mint_ray.errors import ConfigError, MintError
from mint_ray.evaluation import promote, rag
from mint_ray.evaluation.generate import GenerationConfig, Request, generate, local_model_dir
from mint_ray.evaluation.report import Report, metrics_markdown, render_report, write_report
from mint_ray.model_folders import read_metadata
from mint_ray.tasks import Task, get_task

log = logging.getLogger(__name__)

CLI_FLAGS = {"task": "task", "model": "model_uri", "arm": "arm", "data": "data_uri", "split": "split",
             "max-cases": "max_cases", "out": "output_uri", "decoding": "generation.decoding",
             "max-new-tokens": "generation.max_new_tokens", "actors": "generation.actors",
             "gpus-per-actor": "generation.num_gpus_per_actor", "batch-size": "generation.batch_size",
             "register-on": "register_metrics_on", "rag-top-n": "retrieval.top_n",
             "overwrite": "storage.overwrite", "tracking": "tracking.enabled"}

# Columns read from the preference dataset (those present; the first four are required).
REQUIRED_COLUMNS = ("sample_id", "split", "label", "prompt")
OPTIONAL_COLUMNS = ("image_uri", "pair_index", "teacher_ranking", "teacher_top", "teacher_bottom")


class RetrievalConfig(StrictModel):
    """The RAG baseline (text task): candidate diseases retrieved by phenotype overlap."""

    top_n: int = Field(10, gt=0, description="retrieved diseases put in the prompt")
    restrict_to_labels: bool = Field(
        False, description="retrieve among the dataset's labels (the teacher's ranking) instead of "
                           "every disease of the HPO annotations")


class Config(StrictModel):
    """``mint-ray evaluate``: one model on one test split -> report + metrics."""

    task: Literal["rare_disease", "tissue_type"]
    model_uri: str = Field(description="local/s3 directory, models:/name/version, models:/name@alias, "
                                       "or a base checkpoint")
    arm: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                            description="name in the report; default: the model's objective")
    data_uri: str = Field(description="the preference dataset (prompts, labels, teacher lists)")
    split: str = "test"
    max_cases: int | None = Field(None, gt=0, description="the first N test cases by sample_id")
    generation: GenerationConfig = GenerationConfig()
    retrieval: RetrievalConfig | None = None
    output_uri: str | None = Field(None, description="report folder; default <root>/evaluations/<task>-<arm>")
    register_metrics_on: str | None = Field(
        None, description="models:/name/version to tag with the metrics; default: model_uri when it is "
                          "a registered version")
    model_run_id: str | None = Field(None, description="the MLflow run that trained the model (default: "
                                                       "the registered version's run)")
    bootstrap_resamples: int = Field(1000, gt=0)
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()


# ---------------------------------------------------------------- the test set


@dataclass(frozen=True)
class TestCase:
    sample_id: str
    label: str
    prompt: list[dict[str, Any]]
    image_uri: str | None = None
    teacher_ranking: list[str] | None = None
    teacher_top: list[str] | None = None
    teacher_bottom: list[str] | None = None


@dataclass(frozen=True)
class TestSet:
    """The test cases of a preference dataset, one per sample, and the task as its prompts were written."""

    uri: str
    split: str
    task: Task
    n_answers: int
    manifest: storage.Manifest
    cases: list[TestCase]

    def requests(self, retrieval: RetrievalConfig | None = None) -> list[Request]:
        """One generation request per case; with ``retrieval`` the prompts carry retrieved candidates."""
        if retrieval is None:
            return [Request(c.sample_id, c.prompt, c.image_uri) for c in self.cases]
        if self.task.modality != "text":
            raise ConfigError(f"the RAG baseline retrieves diseases from a note; task {self.task.name} "
                              "has no note: drop retrieval")
        labels = None
        if retrieval.restrict_to_labels:
            labels = {name for c in self.cases for name in (c.teacher_ranking or ())}
            if not labels:
                raise MintError(f"{self.uri} has no teacher_ranking to take the labels from: set "
                                "retrieval.restrict_to_labels=false")
        index = rag.hpo_index(labels)
        return [Request(c.sample_id, rag.rag_prompt(self.task, c.prompt, index, retrieval.top_n,
                                                    self.n_answers)[0]) for c in self.cases]

    def teacher_generations(self) -> dict[str, str]:
        """The teacher's answer for each case: its top labels from the recorded ranking,
        written in the task's answer format so that it is scored like any model."""
        missing = [c.sample_id for c in self.cases if not c.teacher_ranking]
        if missing:
            raise MintError(f"{len(missing)} test case(s) of {self.uri} have no teacher_ranking "
                            f"(e.g. {missing[0]}): the teacher arm needs the preference stage's ranking")
        return self.ranking_generations({c.sample_id: list(c.teacher_ranking or ()) for c in self.cases},
                                        "teacher")

    def ranking_generations(self, rankings: dict[str, list[str]], source: str) -> dict[str, str]:
        """Each case's answer from a ranking of labels (its top ``n_answers``), in the task's
        answer format; every test case must have one."""
        missing = [c.sample_id for c in self.cases if not rankings.get(c.sample_id)]
        if missing:
            raise MintError(f"{len(missing)} test case(s) of {self.uri} have no {source} ranking "
                            f"(e.g. {missing[0]}): the {source} arm answers every case from its ranking")
        return {c.sample_id: self.task.format_answer(list(rankings[c.sample_id])[: self.task.n_answers])
                for c in self.cases}

    def records(self, arm: str, generations: dict[str, str]) -> list[dict[str, Any]]:
        """Report records (``tables.score_records`` input) for one arm."""
        return [{"arm": arm, "sample_id": c.sample_id, "label": c.label,
                 "generation": generations.get(c.sample_id),
                 **({"teacher_top": c.teacher_top, "teacher_bottom": c.teacher_bottom}
                    if c.teacher_top is not None and c.teacher_bottom is not None else {})}
                for c in self.cases]


def load_test_set(data_uri: str, task_name: str, split: str = "test", max_cases: int | None = None) -> TestSet:
    """Read and check the test cases (``MintError`` naming the column and the fix)."""
    task = get_task(task_name)
    manifest = storage.require_manifest(data_uri)
    data_task = manifest.meta.get("task")
    if data_task and data_task != task.name:
        raise ConfigError(f"task mismatch: data_uri {data_uri} holds {data_task} pairs but task={task.name}: "
                          "point data_uri at a dataset of this task or fix task")
    names = storage.read_dataset_schema(data_uri).names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise MintError(f"{data_uri} lacks column(s) {', '.join(missing)}: evaluation needs the truth "
                        "('label') and the prompt of every case; build it with `mint-ray preferences` "
                        "from a labelled cohort")
    if task.modality == "image" and "image_uri" not in names:
        raise MintError(f"{data_uri} has no image_uri column: the {task.name} student answers from images")
    table = storage.read_dataset(data_uri, columns=[c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
                                                    if c in names])
    table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        present = sorted(s for s in set(storage.read_dataset(data_uri, columns=["split"])["split"].to_pylist())
                         if s)
        raise MintError(f"{data_uri} has no rows with split == {split!r} (splits there: {present}): choose "
                        "one with --split, or build the pairs with that split included")
    unlabeled = _count_unlabeled(table)
    if unlabeled:
        raise MintError(f"{unlabeled} of {table.num_rows} {split!r} rows of {data_uri} have no label (column "
                        "'label'): every test case is scored against its truth; fill the labels in the "
                        "cohort and rebuild the pairs, or evaluate a labelled split")
    rows = sorted(table.to_pylist(), key=lambda r: (r["sample_id"], r.get("pair_index") or 0))
    cases: dict[str, TestCase] = {}
    for r in rows:
        if r["sample_id"] in cases:  # several pairs per case: one generation per case
            continue
        if task.modality == "image" and not r.get("image_uri"):
            raise MintError(f"test case {r['sample_id']} of {data_uri} has no image_uri: the {task.name} "
                            "student needs an image for every case")
        cases[r["sample_id"]] = TestCase(r["sample_id"], r["label"], r["prompt"], r.get("image_uri"),
                                         r.get("teacher_ranking"), r.get("teacher_top"), r.get("teacher_bottom"))
    selected = list(cases.values())[:max_cases]
    return TestSet(data_uri, split, _prompt_task(task, manifest.meta),
                   int(manifest.meta.get("k") or task.n_answers), manifest, selected)


def _prompt_task(task: Task, meta: dict[str, Any]) -> Task:
    """``task`` with the prompt wording the preference stage used (its manifest records overrides)."""
    changes = {k: meta[k] for k in ("system_prompt", "instruction") if meta.get(k)}
    return replace(task, **changes) if changes else task


def _count_unlabeled(table: pa.Table) -> int:
    labels = pc.utf8_trim_whitespace(pc.fill_null(table["label"], ""))
    return int(pc.sum(pc.equal(labels, "")).as_py() or 0)


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class PreparedModel:
    """A model checked against the task: its pinned URI, a local copy and where it came from."""

    uri: str  # an alias or "latest" is pinned to its version, so every actor loads the same one
    local_dir: Path
    metadata: dict[str, Any]
    registered: tuple[str, str] | None = None  # (name, version)
    run_id: str | None = None  # the MLflow run that logged it

    @property
    def default_arm(self) -> str:
        objective = self.metadata.get("objective")
        return objective if objective and objective != "none" else "base"


def prepare_model(uri: str, task: Task, tracking_uri: str) -> PreparedModel:
    """Resolve ``uri`` and check it is a student of ``task`` (``MintError`` otherwise).
    ``models:/`` URIs are looked up in the registry MLflow points at (``promote.use_tracking``)."""
    registered = run_id = None
    if uri.startswith("models:/"):
        version = promote.pin_version(uri)
        if version is not None:
            registered = (str(version.name), str(version.version))
            uri, run_id = f"models:/{version.name}/{version.version}", version.run_id
    else:
        uri = storage.absolute(uri)
    local = local_model_dir(uri, task, tracking_uri)
    metadata = read_metadata(local)
    if metadata.get("task") != task.name:
        raise ConfigError(f"task mismatch: model {uri} was trained for task {metadata.get('task')!r} but "
                          f"task={task.name}: evaluate it on data of its task or choose a {task.name} model")
    kind, expected = metadata.get("kind", "causal_lm"), "mllama" if task.modality == "image" else "causal_lm"
    if kind != expected:
        raise ConfigError(f"model {uri} is a {kind} student but task {task.name} needs a {expected} one")
    return PreparedModel(uri, local, metadata, registered, run_id)


# ---------------------------------------------------------------- MLflow


def metric_values(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of ``ArmSummary.as_dict()`` as MLflow metrics (NaN left out)."""
    return {f"{prefix}{k}": float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not math.isnan(v)}


def log_evaluation(run_id: str, metrics: dict[str, float], report: Report, artifact_path: str) -> None:
    """Metrics and the report's files on an MLflow run (open or finished: a model's training run)."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        write_report(report, tmp)
        client.log_artifacts(run_id, tmp, artifact_path)


def evaluation_context(test: TestSet, generation: GenerationConfig, retrieval: RetrievalConfig | None,
                       **extra: str) -> dict[str, str]:
    """What makes two evaluations comparable (see ``promote.SAME_EVALUATION``), plus ``extra``."""
    return {"data_uri": test.uri, "data_hash": test.manifest.content_hash, "split": test.split,
            "decoding": generation.decoding,
            "prompt": f"rag-top{retrieval.top_n}" if retrieval else "plain", **extra}


def check_output(uri: str, overwrite: bool) -> None:
    storage.check_reachable(uri)
    if storage.exists(storage.join(uri, "report.md")) and not overwrite:
        raise MintError(f"{uri} already holds a report: pass --overwrite (storage.overwrite=true) or "
                        "choose another output_uri")


# ---------------------------------------------------------------- the stage


def run(cfg: Config) -> dict[str, Any]:
    from mint_ray.ray_cluster import init_ray

    t0 = time.time()
    test = load_test_set(cfg.data_uri, cfg.task, cfg.split, cfg.max_cases)
    tracking_uri = promote.use_tracking(cfg.tracking, cfg.storage.root)
    model = prepare_model(cfg.model_uri, test.task, tracking_uri)
    target = model.registered
    if cfg.register_metrics_on:
        version = promote.pin_version(cfg.register_metrics_on)
        if version is None:
            raise ConfigError(f"register_metrics_on={cfg.register_metrics_on!r} is not a registered model "
                              "version: use models:/<name>/<version>")
        target = (str(version.name), str(version.version))
    arm = cfg.arm or ("rag" if cfg.retrieval else model.default_arm)
    output_uri = cfg.output_uri or storage.join(cfg.storage.root, "evaluations", f"{cfg.task}-{arm}")
    check_output(output_uri, cfg.storage.overwrite)
    requests = test.requests(cfg.retrieval)
    log.info("evaluate %s (%s): %d %s cases of %s", arm, model.uri, len(requests), cfg.split, cfg.data_uri)
    with tracking.stage_run(cfg.tracking, "evaluate", cfg, cfg.storage.root, run_name=f"evaluate-{arm}",
                            tags={"mint.task": cfg.task, "mint.arm": arm, "model.uri": model.uri}) as run_:
        run_.set_lineage("data", cfg.data_uri, test.manifest)
        init_ray(cfg.ray)
        generations = generate(model.uri, test.task, requests, cfg.generation, tracking_uri)
        report = render_report(test.task, test.records(arm, generations),
                               title=f"{cfg.task}: {arm} on {cfg.split} ({len(test.cases)} cases)",
                               n_resamples=cfg.bootstrap_resamples)
        files = write_report(report, output_uri)
        summary = report.summaries[0].as_dict()
        model_run = cfg.model_run_id or model.run_id
        if run_.run_id:
            log_evaluation(run_.run_id, metric_values(summary), report, "report")
            if model_run:
                log_evaluation(model_run, metric_values(summary, f"eval.{cfg.split}."), report,
                               f"evaluation/{arm}-{cfg.split}")
            if target:
                promote.record_evaluation(*target, promote.evaluation_tags(summary, evaluation_context(
                    test, cfg.generation, cfg.retrieval, arm=arm, run_id=run_.run_id, model_uri=model.uri)))
    table = metrics_markdown(report.summaries)
    return {"arm": arm, "model_uri": model.uri, "data_uri": cfg.data_uri, "split": cfg.split,
            "output_uri": output_uri, "files": files, "metrics": summary, "table": table,
            "mlflow_run_id": run_.run_id, "model_run_id": model_run,
            "tagged_version": "/".join(target) if target and run_.run_id else None,
            "seconds": round(time.time() - t0, 1)}


def summarize(result: dict[str, Any]) -> list[str]:
    """``mint-ray evaluate``'s closing summary: the metrics table and where the report is."""
    return ["", result["table"].rstrip(), f"report: {result['output_uri']}",
            f"model: {result['model_uri']}" + (f" (tagged {result['tagged_version']})"
                                                 if result["tagged_version"] else "")]
