"""The paper's comparison in one run: base, SFT, DPO (from SFT), ORPO (MINT), the teacher, RAG.

``mint-ray compare --config jobs/recipes/compare_rare_disease.yaml``

Every arm without a ``model_uri`` of a trained kind is trained with the
training stage (``mint_ray.training.run``) on the ``train_splits`` rows of the
preference data only (never on a test case); DPO starts from the SFT arm's
model, as in the paper. All arms
are then answered with the same generation settings on the same test cases and
scored into one report (``<output>/report``): the metrics table with bootstrap
intervals, the per-label table, the bar chart and every raw generation.

- ``base``: the base checkpoint (``train.model.path``, or a tiny model built
  here from the training texts for local runs); ``rag``: the same model with
  diseases retrieved from the HPO annotations in its prompt (text task);
- ``teacher``: the upper reference, no generation: the teacher's top labels
  from the ranking recorded with each pair, in the task's answer format;
- ``model``: any model given by ``model_uri``; a trained kind with a
  ``model_uri`` reuses that model instead of training.

MLflow: each trained arm's training run gets the evaluation metrics
(``eval.<split>.*``) and the report, registered versions get ``eval.*`` tags
(for ``mint-ray promote``), and a comparison run holds every arm's metrics
(``<arm>.<metric>``) and the report. The comparison table is printed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from mint_ray import storage, tracking
from mint_ray.config import RayConfig, StorageConfig, StrictModel, TrackingConfig, build_config, deep_merge
from mint_ray.errors import ConfigError, MintError
from mint_ray.evaluation import promote
from mint_ray.evaluation.generate import GenerationConfig, generate
from mint_ray.evaluation.report import metrics_markdown, render_report, write_report
from mint_ray.evaluation.run import (
    PreparedModel,
    RetrievalConfig,
    TestSet,
    check_output,
    evaluation_context,
    load_test_set,
    log_evaluation,
    metric_values,
    prepare_model,
)
from mint_ray.tasks import Task, get_task

if TYPE_CHECKING:
    from mint_ray.training.config import Config as TrainConfig

log = logging.getLogger(__name__)

ArmKind = Literal["base", "sft", "dpo", "orpo", "teacher", "rag", "model"]
TRAINED = ("sft", "dpo", "orpo")

CLI_FLAGS = {"task": "task", "data": "data_uri", "split": "split", "max-cases": "max_cases",
             "out": "output_uri", "decoding": "generation.decoding",
             "max-new-tokens": "generation.max_new_tokens", "actors": "generation.actors",
             "gpus-per-actor": "generation.num_gpus_per_actor", "max-steps": "train.optim.max_steps",
             "overwrite": "storage.overwrite"}


class ArmConfig(StrictModel):
    """One arm of the comparison."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    kind: ArmKind
    model_uri: str | None = Field(None, description="reuse this model (no training); required for kind model")
    init_from: str | None = Field(None, description="a trained arm whose model this one starts from")
    train: dict[str, Any] = Field(default_factory=dict, description="training config overrides of this arm")

    @model_validator(mode="after")
    def _consistent(self) -> ArmConfig:
        if self.kind == "model" and not self.model_uri:
            raise ValueError(f"arm {self.name}: kind model needs model_uri")
        if self.kind == "teacher" and self.model_uri:
            raise ValueError(f"arm {self.name}: the teacher arm is read from the teacher ranking recorded "
                             "with the pairs; drop model_uri")
        if self.kind in ("base", "rag") and self.model_uri:
            raise ValueError(f"arm {self.name}: the base model of every arm is train.model.path (a tiny one "
                             "is built without it); set that instead of model_uri, or use kind model")
        if (self.init_from or self.train) and self.kind not in TRAINED:
            raise ValueError(f"arm {self.name}: init_from and train apply to trained kinds "
                             f"({', '.join(TRAINED)}), not {self.kind}")
        return self


def default_arms(task: str) -> list[ArmConfig]:
    """The paper's arms; RAG only for the text task."""
    arms = [ArmConfig(name="base", kind="base"), ArmConfig(name="sft", kind="sft"),
            ArmConfig(name="dpo", kind="dpo", init_from="sft"), ArmConfig(name="orpo", kind="orpo"),
            ArmConfig(name="teacher", kind="teacher")]
    return [*arms, ArmConfig(name="rag", kind="rag")] if get_task(task).modality == "text" else arms


class Config(StrictModel):
    """``mint-ray compare``: train or load every arm, evaluate all on one test split, one report."""

    task: Literal["rare_disease", "tissue_type"]
    data_uri: str = Field(description="the preference dataset (train pairs + test cases)")
    split: str = "test"
    train_splits: list[str] = Field(default_factory=lambda: ["train"], min_length=1)
    max_cases: int | None = Field(None, gt=0)
    arms: list[ArmConfig] | None = Field(None, description="default: base, sft, dpo, orpo, teacher (+ rag)")
    train: dict[str, Any] = Field(default_factory=dict, description=(
        "training config shared by the trained arms (optim, loss, model.lora, scaling...); "
        "model.path is the base checkpoint, without it a tiny base is built from model.tiny"))
    generation: GenerationConfig = GenerationConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    output_uri: str | None = Field(None, description="default <root>/comparisons/<task>")
    bootstrap_resamples: int = Field(1000, gt=0)
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _arms_fit(self) -> Config:
        arms = self.arm_configs
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique: {names}")
        for i, arm in enumerate(arms):
            if arm.init_from is not None and arm.init_from not in {a.name for a in arms[:i] if a.kind in TRAINED}:
                raise ValueError(f"arm {arm.name}: init_from={arm.init_from!r} must name a trained arm listed "
                                 "before it")
            if arm.kind == "rag" and get_task(self.task).modality != "text":
                raise ValueError(f"arm {arm.name}: the RAG baseline needs notes; task {self.task} has none")
        if self.split in self.train_splits:
            raise ValueError(f"split {self.split!r} is also in train_splits: the arms would be trained on "
                             "their test cases")
        return self

    @property
    def arm_configs(self) -> list[ArmConfig]:
        return self.arms if self.arms is not None else default_arms(self.task)

    def output(self) -> str:
        return storage.absolute(self.output_uri or storage.join(self.storage.root, "comparisons", self.task))


# ---------------------------------------------------------------- training the arms


def train_config(cfg: Config, arm: ArmConfig | None, start_uri: str | None = None) -> TrainConfig:
    """The training stage's config for ``arm`` (None: the base model's, to build a tiny base)."""
    from mint_ray.training.config import Config as TrainConfig

    kind = "mllama" if get_task(cfg.task).modality == "image" else "causal_lm"
    fixed: dict[str, Any] = {"task": cfg.task, "data": {"uri": cfg.data_uri, "splits": cfg.train_splits},
                             "model": {"kind": kind},
                             "storage": cfg.storage.model_dump(), "tracking": cfg.tracking.model_dump(),
                             "ray": cfg.ray.model_dump()}
    shared = cfg.train
    if arm is not None:
        shared = deep_merge(shared, arm.train)
        model: dict[str, Any] = {"path": start_uri, "tiny": None}
        full_finetune = not (shared.get("model", {}).get("lora") or {}).get("enabled", True)
        if arm.kind == "dpo" and full_finetune and not shared.get("model", {}).get("reference_path"):
            # The paper's DPO reference is the model it starts from (SFT for DPO-from-SFT);
            # LoRA gets it by switching the adapter off, full fine-tuning needs a frozen copy.
            model["reference_path"] = start_uri
        fixed = deep_merge(fixed, {"objective": arm.kind, "model": model,
                                   "output_uri": storage.join(cfg.output(), "arms", arm.name),
                                   "run_name": f"compare-{cfg.task}-{arm.name}"})
    try:
        return build_config(TrainConfig, deep_merge(shared, fixed))
    except ConfigError as err:
        raise ConfigError(f"train settings{f' of arm {arm.name}' if arm else ''}: {err}") from None


def check_train_rows(cfg: Config) -> None:
    """Fail before any training job when ``train_splits`` select no pair."""
    from mint_ray.training.config import DataConfig
    from mint_ray.training.data import training_rows

    if not training_rows(DataConfig(uri=cfg.data_uri, splits=cfg.train_splits), columns=["split"]):
        raise MintError(f"{cfg.data_uri} has no rows in train_splits {cfg.train_splits}: build the pairs "
                        "with those splits, or give every trained arm a model_uri")


def base_model_uri(cfg: Config) -> str:
    """The base checkpoint: ``train.model.path``, or a tiny model built from the training texts."""
    from mint_ray.training.run import build_tiny_base

    base = train_config(cfg, None)
    if base.model.path:
        return storage.absolute(base.model.path)
    return build_tiny_base(base, storage.join(cfg.output(), "base"))


def _checkpoint(model: PreparedModel) -> str:
    """Where the trainer can load ``model`` from: its own directory (local or s3://, which every
    worker can read), or the driver's copy of a registry model."""
    return str(model.local_dir) if model.uri.startswith("models:/") else model.uri


def _trained(summary: dict[str, Any], task: Task, tracking_uri: str) -> PreparedModel:
    model = prepare_model(summary["model_uri"], task, tracking_uri)
    registered = summary.get("registered") or {}
    return dataclasses.replace(model, run_id=summary.get("mlflow_run_id"),
                               registered=(registered["name"], registered["version"])
                               if registered.get("version") else None)


def prepare_arms(cfg: Config, test: TestSet, tracking_uri: str) -> dict[str, PreparedModel]:
    """Every generating arm's model: given ones checked first, then the base built and arms trained."""
    from mint_ray.training.run import run as train

    arms = [a for a in cfg.arm_configs if a.kind != "teacher"]
    models = {a.name: prepare_model(a.model_uri, test.task, tracking_uri) for a in arms if a.model_uri}
    for arm in arms:  # every training config is checked before the first arm trains
        if arm.kind in TRAINED and not arm.model_uri:
            train_config(cfg, arm, "base")
    pending = [a for a in arms if a.name not in models]
    if any(a.kind in TRAINED for a in pending):
        check_train_rows(cfg)
    base_uri = (base_model_uri(cfg) if any(a.kind not in TRAINED or not a.init_from for a in pending)
                else "")
    for arm in pending:
        if arm.kind in TRAINED:
            start = _checkpoint(models[arm.init_from]) if arm.init_from else base_uri
            log.info("compare: training arm %s (%s) from %s", arm.name, arm.kind, start)
            models[arm.name] = _trained(train(train_config(cfg, arm, start)), test.task, tracking_uri)
        else:
            models[arm.name] = prepare_model(base_uri, test.task, tracking_uri)
    return models


# ---------------------------------------------------------------- the stage


def run(cfg: Config) -> dict[str, Any]:
    from mint_ray.ray_cluster import init_ray

    t0 = time.time()
    test = load_test_set(cfg.data_uri, cfg.task, cfg.split, cfg.max_cases)
    tracking_uri = promote.use_tracking(cfg.tracking, cfg.storage.root)
    report_uri = storage.join(cfg.output(), "report")
    check_output(report_uri, cfg.storage.overwrite)
    arms = cfg.arm_configs
    # Prompts first: a RAG or teacher arm that cannot work fails before any training.
    answers: dict[str, dict[str, str]] = {a.name: test.teacher_generations() for a in arms if a.kind == "teacher"}
    requests = {a.name: test.requests(cfg.retrieval if a.kind == "rag" else None)
                for a in arms if a.kind != "teacher"}
    models = prepare_arms(cfg, test, tracking_uri)
    teacher = test.manifest.meta.get("teacher") or {}
    with tracking.stage_run(cfg.tracking, "compare", cfg, cfg.storage.root, run_name=f"compare-{cfg.task}",
                            tags={"mint.task": cfg.task, "mint.arms": ",".join(a.name for a in arms),
                                  "teacher.name": teacher.get("name", ""),
                                  "teacher.version": teacher.get("version", ""),
                                  **{f"arm.{n}.model_uri": m.uri for n, m in models.items()}}) as run_:
        run_.set_lineage("data", cfg.data_uri, test.manifest)
        init_ray(cfg.ray)
        for arm in arms:
            if arm.name in models:
                log.info("compare: generating with arm %s (%s)", arm.name, models[arm.name].uri)
                answers[arm.name] = generate(models[arm.name].uri, test.task, requests[arm.name],
                                             cfg.generation, tracking_uri)
        records = [r for arm in arms for r in test.records(arm.name, answers[arm.name])]
        report = render_report(test.task, records, n_resamples=cfg.bootstrap_resamples,
                               title=f"{cfg.task}: {len(arms)} arms on {cfg.split} ({len(test.cases)} cases)")
        files = write_report(report, report_uri)
        summaries = {s.arm: s.as_dict() for s in report.summaries}
        if run_.run_id:
            log_evaluation(run_.run_id, {k: v for arm, s in summaries.items()
                                         for k, v in metric_values(s, f"{arm}.").items()}, report, "report")
            for arm in arms:
                model = models.get(arm.name)
                if model is None:
                    continue
                if model.run_id:
                    log_evaluation(model.run_id, metric_values(summaries[arm.name], f"eval.{cfg.split}."),
                                   report, f"evaluation/compare-{cfg.split}")
                if model.registered:
                    retrieval = cfg.retrieval if arm.kind == "rag" else None
                    promote.record_evaluation(*model.registered, promote.evaluation_tags(
                        summaries[arm.name], evaluation_context(test, cfg.generation, retrieval, arm=arm.name,
                                                                run_id=run_.run_id, model_uri=model.uri)))
    table = metrics_markdown(report.summaries)
    print(f"\nComparison on {cfg.split} ({len(test.cases)} cases), report at {report_uri}:\n{table}", flush=True)
    return {"task": cfg.task, "output_uri": cfg.output(), "report_uri": report_uri, "files": files,
            "arms": {a.name: {"kind": a.kind, "model_uri": models[a.name].uri if a.name in models else None,
                              "model_run_id": models[a.name].run_id if a.name in models else None,
                              "registered": models[a.name].registered if a.name in models else None,
                              **summaries[a.name]} for a in arms},
            "table": table, "mlflow_run_id": run_.run_id, "seconds": round(time.time() - t0, 1)}
