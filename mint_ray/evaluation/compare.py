"""The paper's comparison in one run: base, SFT, DPO (from SFT), ORPO (MINT), the teacher, RAG.

``mint-ray compare --config jobs/recipes/compare_rare_disease.yaml``

Every arm without a ``model_uri`` of a trained kind is trained with the
training stage (``mint_ray.training.run``) on the ``train_splits`` rows of the
preference data only (never on a test case); DPO starts from the SFT arm's
model, as in the paper. All arms
are then answered with the same generation settings on the same test cases and
scored into one report (``<output>/report``): the metrics table with bootstrap
intervals, each arm's training (data, steps, tokens), the per-label table, the
bar chart and every raw generation.

Per-arm data: an arm's ``train.data`` (the training stage's ``DataConfig``:
``uri``, ``splits``, ``target``, ``filter``) is merged over ``data_uri`` and
``train_splits``, so arms can train on different rows and answers, e.g. SFT on
the ground truth of the labelled cases only (``splits: [train], target:
ground_truth``) beside ORPO on the teacher's pairs over labelled + unlabelled
cases (``splits: [train, validation]``). No arm may train on the test split.
Keys the comparison sets itself (the objective, the start model, where runs are
written...) are refused in ``train`` blocks with their name, never dropped.

Step budget: the shared ``train.optim.max_steps`` (``--max-steps``) is the
budget of every trained arm, counted from the base model: an arm that starts
from another (``init_from``) trains the budget minus that arm's steps, so all
arms train the same number of steps by default. ``budget: own`` gives an arm a
whole budget on top of the arm it starts from (the paper's DPO after SFT), and
an arm's own ``train.optim.max_steps`` sets its steps outright; the report
marks every arm whose total differs. Without a budget the arms train by epochs.

- ``base``: the base checkpoint (``train.model.path``, or a tiny model built
  here from the training texts for local runs); ``rag``: the same model with
  diseases retrieved from the HPO annotations in its prompt (text task);
- ``text_ceiling``: no generation either: a text-only classifier's top labels (TF-IDF +
  logistic regression on the note, fitted on the teacher's labelled split by
  ``mint-ray teacher train``, saved beside the teacher): what the note alone gives;
- ``teacher``: the upper reference, no generation: the teacher's top labels
  from the ranking recorded with each pair, in the task's answer format;
- ``model``: any model given by ``model_uri``; a trained kind with a
  ``model_uri`` reuses that model instead of training.

Arms that differ only in what is compared: the arms trained here must have equal
effective training configs except for their objective (``kind``) and the settings
the recipe lists in ``varied``. Each entry is a dotted path: ``train.<setting>``
(``train.optim.lr``, or a whole section such as ``train.data``, covering everything
under it), ``init_from`` (the arm starts from another arm's model) or ``budget``
(the arm's total optimizer steps from the base model differ: ``budget: own``, or
its own ``train.optim.max_steps``). Any other difference (say one arm's lr, or an
NLL span) is refused when the config is built, with a ``ConfigError`` naming the
arms, the setting and their values; ``allow_confounds: true`` runs anyway and the
report opens with a Confounds section listing every such setting. Without ``arms``
the paper's default arms vary ``init_from`` and ``budget`` (DPO after SFT, on a
budget of its own). Arms given by ``model_uri`` are not checked: their training
is not configured here.

The report's paired differences compare every arm with the SFT arm (the first of
kind ``sft``) and with the base arm: mean differences on the same cases with
paired bootstrap intervals, and McNemar's exact test on top-1
(``evaluation.paired``).

MLflow: each trained arm's training run gets the evaluation metrics
(``eval.<split>.*``) and the report, registered versions get ``eval.*`` tags
(for ``mint-ray promote``), and a comparison run holds every arm's metrics
(``<arm>.<metric>``) and the report. The command's closing summary (``summarize``) shows
the tables; the demo shows them in its own.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from typing import TYPE_CHECKING, Any

from mint_ray import storage, tracking
from mint_ray.errors import MintError
from mint_ray.evaluation import promote

# Config is this stage's config: the CLI and the demo read it from here (``module.Config``).
from mint_ray.evaluation.compare_config import RANKED, TRAINED, ArmConfig, Config, train_config
from mint_ray.evaluation.generate import generate
from mint_ray.evaluation.paired import paired_explanation, paired_markdown
from mint_ray.evaluation.report import render_report, write_report
from mint_ray.evaluation.run import (
    PreparedModel,
    TestSet,
    check_output,
    evaluation_context,
    load_test_set,
    log_evaluation,
    metric_values,
    prepare_model,
)
from mint_ray.evaluation.tables import headline_metrics, metrics_markdown, to_markdown
from mint_ray.evaluation.training_report import ArmTraining, budget_marks, confounds_markdown, training_table
from mint_ray.tasks import Task

if TYPE_CHECKING:
    from mint_ray.training.config import DataConfig

log = logging.getLogger(__name__)

CLI_FLAGS = {"task": "task", "data": "data_uri", "split": "split", "max-cases": "max_cases",
             "out": "output_uri", "decoding": "generation.decoding",
             "max-new-tokens": "generation.max_new_tokens", "actors": "generation.actors",
             "gpus-per-actor": "generation.num_gpus_per_actor", "max-steps": "train.optim.max_steps",
             "overwrite": "storage.overwrite"}


# ---------------------------------------------------------------- training the arms


def check_train_rows(cfg: Config, arms: list[ArmConfig]) -> None:
    """Fail before any training job when an arm's data selects no row."""
    from mint_ray.training.data import read_selection

    for arm in arms:
        data = train_config(cfg, arm, "base").data
        selection = read_selection(data, columns=["split"])
        if not selection.rows:
            raise MintError(f"arm {arm.name}: {data.uri} has no rows to train on in splits {data.splits} "
                            f"({selection.summary()}): build the pairs with those splits, change the arm's "
                            "train.data, or give the arm a model_uri")
        if selection.left_out:
            log.warning("compare: arm %s trains on %s", arm.name, selection.summary())


def data_text(data: DataConfig) -> str:
    """An arm's training data in a few words, for the report."""
    text = f"{data.uri} [{', '.join(data.splits)}], target {data.target}"
    return text + (f", filter {data.filter}" if data.filter != "all" else "")


def _given_training(arm: ArmConfig, model: PreparedModel | None) -> ArmTraining:
    """What the report can say of an arm that trains nothing here."""
    if arm.kind == "teacher":
        return ArmTraining(arm.name, arm.kind, "the teacher's ranking recorded with the pairs", trained=False)
    if arm.kind == "text_ceiling":
        return ArmTraining(arm.name, arm.kind, "a text-only classifier (TF-IDF + logistic regression) fitted "
                           "on the teacher's labelled split", trained=False)
    if arm.kind in ("base", "rag") or model is None:
        return ArmTraining(arm.name, arm.kind, "none (the base model)", trained=False, own_steps=0, steps=0,
                           own_tokens=0, tokens=0)
    meta = model.metadata
    steps = (meta.get("training") or {}).get("steps")
    data = meta.get("data_uri")
    if data and meta.get("data_splits"):
        data += f" [{', '.join(meta['data_splits'])}], target {meta.get('data_target', 'chosen')}"
    return ArmTraining(arm.name, arm.kind, f"given model {model.uri} (trained on {data or 'unknown data'})",
                       trained=arm.kind in TRAINED, nll_over=meta.get("nll_over"), own_steps=steps, steps=steps)


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


def prepare_arms(cfg: Config, test: TestSet, tracking_uri: str
                 ) -> tuple[dict[str, PreparedModel], dict[str, ArmTraining]]:
    """Every generating arm's model: given ones checked first, then the base built and arms
    trained; and every arm's training (data, steps, tokens) for the report."""
    from mint_ray.training.budget import trained_tokens
    from mint_ray.training.run import run as train

    arms = [a for a in cfg.arm_configs if a.kind not in RANKED]
    models = {a.name: prepare_model(a.model_uri, test.task, tracking_uri) for a in arms if a.model_uri}
    trainings = {a.name: _given_training(a, models.get(a.name)) for a in cfg.arm_configs
                 if a.kind in RANKED or a.name in models}
    pending = [a for a in arms if a.name not in models]
    to_train = [a for a in pending if a.kind in TRAINED]
    for arm in to_train:  # every training config is checked before the first arm trains
        train_config(cfg, arm, "base")
    if to_train:
        check_train_rows(cfg, to_train)
    base_uri = (base_model_uri(cfg) if any(a.kind not in TRAINED or not a.init_from for a in pending)
                else "")
    for arm in pending:
        if arm.kind not in TRAINED:
            models[arm.name] = prepare_model(base_uri, test.task, tracking_uri)
            trainings[arm.name] = _given_training(arm, None)
            continue
        start = _checkpoint(models[arm.init_from]) if arm.init_from else base_uri
        # The steps the arm it starts from really took (its epochs may have ended it early).
        before = trainings[arm.init_from] if arm.init_from else ArmTraining("", "", "", steps=0, tokens=0)
        arm_cfg = train_config(cfg, arm, start, cfg.own_steps(arm, before.steps))
        log.info("compare: training arm %s (%s) from %s on %s", arm.name, arm.kind, start, data_text(arm_cfg.data))
        summary = train(arm_cfg)
        models[arm.name] = _trained(summary, test.task, tracking_uri)
        steps, world = summary["training"]["steps"], summary["training"]["world_size"]
        tokens = trained_tokens(arm_cfg, models[arm.name].local_dir, steps, world)
        trainings[arm.name] = ArmTraining(
            arm.name, arm.kind, data_text(arm_cfg.data), nll_over=arm_cfg.nll_span, init_from=arm.init_from,
            own_steps=steps,
            steps=None if before.steps is None else before.steps + steps, own_tokens=tokens,
            tokens=None if before.tokens is None else before.tokens + tokens)
    return models, {a.name: trainings[a.name] for a in cfg.arm_configs}


def text_ceiling_rankings(test: TestSet) -> dict[str, list[str]]:
    """The text-only ceiling's rankings of the test cases, saved beside the teacher that made
    the pairs (``mint-ray teacher train`` with its knowledge check on)."""
    from mint_ray.teachers.knowledge import TEXT_CEILING_FILE

    teacher_uri = (test.manifest.meta.get("teacher") or {}).get("uri")
    if not teacher_uri:
        raise MintError(f"{test.uri} does not record its teacher's URI: the text_ceiling arm reads the "
                        "teacher's text_ceiling.parquet; rebuild the pairs with `mint-ray preferences`")
    uri = storage.join(teacher_uri, TEXT_CEILING_FILE)
    if not storage.exists(uri):
        raise MintError(f"{uri} does not exist: train the teacher with knowledge_check.enabled=true (it "
                        "writes the text-only ceiling) or drop the text_ceiling arm")
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["sample_id", "ranked_labels"])
    return dict(zip(table["sample_id"].to_pylist(), table["ranked_labels"].to_pylist(), strict=True))


# ---------------------------------------------------------------- the stage


def run(cfg: Config) -> dict[str, Any]:
    from mint_ray.ray_cluster import init_ray

    t0 = time.time()
    test = load_test_set(cfg.data_uri, cfg.task, cfg.split, cfg.max_cases)
    tracking_uri = promote.use_tracking(cfg.tracking, cfg.storage.root)
    report_uri = storage.join(cfg.output(), "report")
    check_output(report_uri, cfg.storage.overwrite)
    arms = cfg.arm_configs
    confounds = cfg.confounds()  # allowed by the recipe, else the config was refused
    # Prompts first: a RAG or teacher arm that cannot work fails before any training.
    answers: dict[str, dict[str, str]] = {a.name: test.teacher_generations() for a in arms if a.kind == "teacher"}
    answers |= {a.name: test.ranking_generations(text_ceiling_rankings(test), "text_ceiling")
                for a in arms if a.kind == "text_ceiling"}
    requests = {a.name: test.requests(cfg.retrieval if a.kind == "rag" else None)
                for a in arms if a.kind not in RANKED}
    models, trainings = prepare_arms(cfg, test, tracking_uri)
    training = [trainings[a.name] for a in arms]
    marks = budget_marks(training, cfg.budget_steps)
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
                               title=f"{cfg.task}: {len(arms)} arms on {cfg.split} ({len(test.cases)} cases)",
                               training=training, budget_steps=cfg.budget_steps, varied=cfg.varied_settings,
                               confounds=confounds)
        files = write_report(report, report_uri)
        summaries = {s.arm: s.as_dict() for s in report.summaries}
        paired = [p.as_dict() for p in report.paired]
        if run_.run_id:
            budget = {f"{t.arm}.train_{name}": float(value) for t in training
                      for name, value in (("steps", t.steps), ("tokens", t.tokens)) if value is not None}
            differences = {k: v for p in paired
                           for k, v in metric_values(p, f"{p['arm']}-vs-{p['reference']}.").items()}
            log_evaluation(run_.run_id, {**budget, **differences,
                                         **{k: v for arm, s in summaries.items()
                                            for k, v in metric_values(s, f"{arm}.").items()}},
                           report, "report")
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
    # The demo's closing summary: the headline metrics, and the paired rows against the first
    # reference (SFT where it trained) without MRR; the report and `text` have them all.
    headline = headline_metrics(test.task)
    headline_paired = [p for p in report.paired if p.reference == report.paired[0].reference]
    text = (f"Comparison on {cfg.split} ({len(test.cases)} cases), report at {report_uri}:\n{table}\n"
            + (f"Paired differences:\n{paired_explanation(report.paired[0].alpha, cfg.bootstrap_resamples)}"
               f"\n\n{paired_markdown(report.paired)}\n" if report.paired else "")
            + (f"CONFOUNDS:\n{confounds_markdown(confounds)}\n" if confounds else "")
            + f"Training (budget {cfg.budget_steps or 'none'}; varied: "
            f"{', '.join(cfg.varied_settings) or 'nothing'}):\n"
            + to_markdown(training_table(training, cfg.budget_steps)))
    return {"task": cfg.task, "output_uri": cfg.output(), "report_uri": report_uri, "files": files,
            "arms": {a.name: {"kind": a.kind, "model_uri": models[a.name].uri if a.name in models else None,
                              "model_run_id": models[a.name].run_id if a.name in models else None,
                              "registered": models[a.name].registered if a.name in models else None,
                              "data": trainings[a.name].data, "steps": trainings[a.name].steps,
                              "tokens": trainings[a.name].tokens, "budget": marks[a.name],
                              "nll_over": trainings[a.name].nll_over, **summaries[a.name]} for a in arms},
            "paired_differences": paired, "varied": cfg.varied_settings,
            "confounds": [dataclasses.asdict(c) for c in confounds],
            "table": table, "headline_table": metrics_markdown(report.summaries, metrics=headline),
            "paired_table": paired_markdown(headline_paired, metrics=[m for m in headline if m != "mrr"]), "text": text,
            "mlflow_run_id": run_.run_id,
            "seconds": round(time.time() - t0, 1)}


def summarize(result: dict[str, Any]) -> list[str]:
    """``mint-ray compare``'s closing summary: the tables a person came for."""
    return ["", *result["text"].splitlines()]
