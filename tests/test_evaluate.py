"""Evaluation: batch generation with Ray Data on tiny untrained students (text and Mllama),
the report, models:/ URIs on a real MLflow server, the one-line errors before generation,
and (slow) the comparison run that trains SFT/DPO/ORPO and writes one report."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray

from mint_ray import storage
from mint_ray.cli import main
from mint_ray.config import build_config, load_config
from mint_ray.errors import MintError
from mint_ray.evaluation import compare, promote, rag
from mint_ray.evaluation import run as evaluate
from mint_ray.evaluation.report import render_report
from mint_ray.evaluation.training_report import Confound
from mint_ray.model_folders import METADATA_FILE
from mint_ray.ray_cluster import worker_env
from mint_ray.registry import log_student
from mint_ray.tasks import get_task
from tests.prefdata import write_text_prefs, write_vision_prefs
from tests.tinymodels import make_student_dir

GENERATION = {"max_new_tokens": 12, "batch_size": 4}


@pytest.fixture(scope="module", autouse=True)
def _ray() -> Any:
    # A private in-process cluster (address="local"), never another session's.
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False,
                 runtime_env={"env_vars": worker_env()})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_student_dir(tmp_path_factory.mktemp("students") / "text", "rare_disease")


def _items(task: str, messages: list[dict[str, Any]]) -> list[str]:
    content = messages[0]["content"]
    return get_task(task).parse_answer(content if isinstance(content, str) else content[0]["text"]).items


def write_prefs(uri: str, task: str, n_test: int, n_train: int = 0, n_validation: int = 0) -> storage.Manifest:
    """A preference dataset with ``n_train`` train, ``n_validation`` validation and ``n_test``
    test rows (ids ``train-s0``, ``test-s0``...) and the teacher's lists, read back from the
    pairs' answers (the prefdata teacher ranks the truth first)."""
    write = write_vision_prefs if task == "tissue_type" else write_text_prefs
    parts = []
    for split, n, seed in (("train", n_train, 0), ("validation", n_validation, 2), ("test", n_test, 1)):
        if n:
            meta = write(f"{uri}-{split}", n, seed=seed, split=split).meta
            table = storage.read_dataset(f"{uri}-{split}")
            parts.append(table.set_column(0, "sample_id", pa.array(
                [f"{split}-{s}" for s in table["sample_id"].to_pylist()])))
    table = pa.concat_tables(parts)
    top = [_items(task, m) for m in table["chosen"].to_pylist()]
    bottom = [_items(task, m) for m in table["rejected"].to_pylist()]
    table = (table.append_column("teacher_top", pa.array(top))
             .append_column("teacher_bottom", pa.array(bottom))
             .append_column("teacher_ranking", pa.array([a + b for a, b in zip(top, bottom, strict=True)])))
    return storage.write_dataset(uri, table, overwrite=True, meta=meta)


def eval_config(tmp_path: Path, **values: Any) -> evaluate.Config:
    base = {"task": "rare_disease", "storage": {"root": str(tmp_path)}, "generation": GENERATION,
            "bootstrap_resamples": 200, "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    return build_config(evaluate.Config, {**base, **values})


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- end to end


def test_text_evaluation_end_to_end_writes_the_report(tmp_path: Path, text_model: Path, capsys) -> None:
    write_prefs(str(tmp_path / "prefs"), "rare_disease", n_test=5, n_train=3)
    out = tmp_path / "report"
    code = main(["evaluate", "--task", "rare_disease", "--model", str(text_model), "--data",
                 str(tmp_path / "prefs"), "--arm", "tiny", "--out", str(out), "--max-new-tokens", "12",
                 "--set", f"storage.root={tmp_path}", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
                 "--set", "bootstrap_resamples=200", "--summary-file", str(tmp_path / "summary.json")])
    assert code == 0
    printed = capsys.readouterr().out  # the closing summary: the table and the report's place
    assert "| tiny | 5 |" in printed and f"report: {out}" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {p.name for p in out.iterdir()} == {"report.md", "metrics.csv", "per_label.csv", "accuracy.png",
                                              "generations.jsonl", "summary.json"}
    assert "| tiny |" in (out / "report.md").read_text()
    rows = _jsonl(out / "generations.jsonl")
    # Only the test split, one generation per case, each kept whatever it says.
    assert sorted(r["sample_id"] for r in rows) == [f"test-s{i}" for i in range(5)]
    metrics = summary["metrics"]
    unparseable = sum(not r["parseable"] for r in rows)
    assert unparseable > 0 and metrics["n_unparseable"] == unparseable and metrics["n"] == 5
    assert {"top1", "top10", "car", "parseable"} <= set(metrics)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["n"] == 5 and run.data.tags["mint.arm"] == "tiny"
    assert "report/report.md" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    with pytest.raises(MintError, match=r"already holds a report"):
        evaluate.run(eval_config(tmp_path, model_uri=str(text_model), data_uri=str(tmp_path / "prefs"),
                                 output_uri=str(out)))


def test_vision_student_reads_images_in_the_actors_and_gets_car(tmp_path: Path) -> None:
    model = make_student_dir(tmp_path / "mllama", "tissue_type")
    write_prefs(str(tmp_path / "prefs"), "tissue_type", n_test=3)
    summary = evaluate.run(eval_config(tmp_path, task="tissue_type", model_uri=str(model),
                                       data_uri=str(tmp_path / "prefs"), tracking={"enabled": False}))
    assert summary["arm"] == "base" and summary["mlflow_run_id"] is None
    assert {"top1", "top5", "car", "coverage", "avoidance"} <= set(summary["metrics"])
    assert len(_jsonl(Path(summary["output_uri"]) / "generations.jsonl")) == 3


def test_teacher_answers_and_rag_prompts_come_from_the_pairs(tmp_path: Path) -> None:
    # The tissue names are far apart for the fuzzy match (the prefdata disease names are not).
    write_prefs(str(tmp_path / "vprefs"), "tissue_type", n_test=4)
    tissue = evaluate.load_test_set(str(tmp_path / "vprefs"), "tissue_type")
    report = render_report(tissue.task, tissue.records("teacher", tissue.teacher_generations()), n_resamples=50)
    teacher = report.summaries[0].metrics
    assert teacher["top1"].value == 1.0 and teacher["car"].value == 1.0
    prefs = str(tmp_path / "prefs")
    write_prefs(prefs, "rare_disease", n_test=4)
    test = evaluate.load_test_set(prefs, "rare_disease")
    plain, retrieved = test.requests(), test.requests(evaluate.RetrievalConfig(top_n=3))
    index = rag.hpo_index()
    for p, r in zip(plain, retrieved, strict=True):
        # The same prompt with three retrieved diseases before the instruction.
        user, with_rag = p.messages[1]["content"], r.messages[1]["content"]
        line = next(part for part in with_rag.split("\n\n") if part.startswith("Candidates: "))
        assert p.sample_id == r.sample_id and with_rag.replace(line + "\n\n", "") == user
        candidates = rag.rag_prompt(test.task, p.messages, index, 3)[1]
        assert len(candidates) == 3 and line == f"Candidates: {', '.join(candidates)}."
        assert r.messages[0] == p.messages[0]
    # The prefdata labels ("Syndrome A0") are no HPO diseases: nothing to retrieve among them.
    with pytest.raises(MintError, match=r"none of the .* labels is a disease"):
        test.requests(evaluate.RetrievalConfig(restrict_to_labels=True))
    storage.write_dataset(str(tmp_path / "bare"), storage.read_dataset(prefs).drop_columns(["teacher_ranking"]),
                          meta={"task": "rare_disease"})
    with pytest.raises(MintError, match=r"no teacher_ranking"):
        evaluate.load_test_set(str(tmp_path / "bare"), "rare_disease").teacher_generations()


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_error_before_generation(tmp_path: Path, text_model: Path, monkeypatch) -> None:
    def no_generation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("generation started despite bad input")

    monkeypatch.setattr(evaluate, "generate", no_generation)
    prefs = str(tmp_path / "prefs")
    write_prefs(prefs, "rare_disease", n_test=2)

    def fails(match: str, **values: Any) -> None:
        with pytest.raises(MintError, match=match):
            evaluate.run(eval_config(tmp_path, **{"model_uri": str(text_model), "data_uri": prefs, **values}))

    fails("model directory '/no/such/model' does not exist", model_uri="/no/such/model")
    fails(r"no rows with split == 'validation' \(splits there: \['test'\]\)", split="validation")
    table = storage.read_dataset(prefs)
    storage.write_dataset(str(tmp_path / "unlabeled"), table.set_column(
        table.column_names.index("label"), "label", pa.array([None, "Syndrome A0"], pa.string())),
        meta={"task": "rare_disease"})
    fails(r"1 of 2 'test' rows .* have no label \(column 'label'\)", data_uri=str(tmp_path / "unlabeled"))
    storage.write_dataset(str(tmp_path / "nolabel"), table.drop_columns(["label"]), meta={"task": "rare_disease"})
    fails(r"lacks column\(s\) label", data_uri=str(tmp_path / "nolabel"))
    write_prefs(str(tmp_path / "vprefs"), "tissue_type", n_test=1)
    fails("task mismatch: data_uri .* holds tissue_type pairs but task=rare_disease", data_uri=str(tmp_path / "vprefs"))
    other = shutil.copytree(text_model, tmp_path / "other")
    meta = json.loads((other / METADATA_FILE).read_text())
    (other / METADATA_FILE).write_text(json.dumps({**meta, "task": "tissue_type"}))
    fails("task mismatch: model .* trained for task 'tissue_type' but task=rare_disease", model_uri=str(other))
    (other / METADATA_FILE).unlink()
    (other / "config.json").unlink()
    fails("neither a mint-ray model .* nor a Hugging Face checkpoint", model_uri=str(other))


# ---------------------------------------------------------------- models:/ on a real server


def register_student(model_dir: Path, name: str, tracking_uri: str) -> tuple[str, str]:
    """Log and register ``model_dir`` as a new version of ``name``; (version, logging run id)."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("mint-eval-tests")
    with mlflow.start_run() as run:
        version = log_student(model_dir, name, {"task": "rare_disease"})["version"]
    return version, run.info.run_id


@pytest.mark.mlflow_server
def test_registered_model_by_alias_is_pinned_evaluated_and_tagged(
        tmp_path: Path, text_model: Path, mlflow_server: str, s3_bucket: str) -> None:
    name = f"eval-test-{uuid.uuid4().hex[:6]}"
    version, model_run = register_student(text_model, name, mlflow_server)
    client = mlflow.MlflowClient(mlflow_server)
    client.set_registered_model_alias(name, "candidate", version)
    data = f"{s3_bucket}/prefs"
    manifest = write_prefs(data, "rare_disease", n_test=3)
    tracking = {"tracking_uri": mlflow_server, "experiment": "mint-eval-tests"}
    summary = evaluate.run(eval_config(tmp_path, model_uri=f"models:/{name}@candidate", data_uri=data,
                                       storage={"root": s3_bucket}, tracking=tracking))
    assert summary["model_uri"] == f"models:/{name}/{version}"
    assert summary["output_uri"].startswith(s3_bucket) and storage.exists(summary["files"][0])
    assert summary["model_run_id"] == model_run and summary["tagged_version"] == f"{name}/{version}"
    tags = client.get_model_version(name, version).tags
    assert tags["eval.data_hash"] == manifest.content_hash and tags["eval.split"] == "test"
    assert float(tags["eval.top1"]) == summary["metrics"]["top1"] and tags["eval.n"] == "3"
    assert tags["eval.run_id"] == summary["mlflow_run_id"] and tags["eval.decoding"] == "greedy"
    trained = client.get_run(model_run)
    assert trained.data.metrics["eval.test.n"] == 3
    assert client.list_artifacts(model_run, "evaluation/base-test")
    for uri, match in ((f"models:/{name}/9", "version 9 of model"),
                       (f"models:/{name}-nope@x", "not in the model registry"),
                       (f"{s3_bucket}/no/model", "no files there; check the URI")):
        with pytest.raises(MintError, match=match):
            evaluate.run(eval_config(tmp_path, model_uri=uri, data_uri=data, tracking=tracking))
    assert promote.get_version(name).version == version


# ---------------------------------------------------------------- the comparison run


@pytest.mark.parametrize(("values", "match"), [
    ({"arms": [{"name": "dpo", "kind": "dpo", "init_from": "sft"}, {"name": "sft", "kind": "sft"}]},
     "init_from='sft' must name a trained arm listed before it"),
    ({"task": "tissue_type", "arms": [{"name": "rag", "kind": "rag"}]}, "RAG baseline needs notes"),
    ({"train_splits": ["train", "test"]}, "trained on their test cases"),
    ({"arms": [{"name": "teacher", "kind": "teacher", "model_uri": "/x"}]}, "drop model_uri"),
    ({"arms": [{"name": "base", "kind": "base", "model_uri": "/x"}]}, "set that instead of model_uri"),
    ({"arms": [{"name": "a", "kind": "model"}, {"name": "a", "kind": "base"}]}, "needs model_uri"),
    ({"arms": [{"name": "a", "kind": "base"}, {"name": "a", "kind": "teacher"}]}, "must be unique"),
    # Keys the comparison sets itself are refused by name, never dropped.
    ({"arms": [{"name": "s", "kind": "sft", "train": {"objective": "orpo", "model": {"path": "/m"}}}]},
     r"arm s: train sets objective \(the arm's kind\); model.path \(an arm starts from the base"),
    ({"train": {"data": {"uri": "/other"}, "tracking": {"enabled": False}}},
     r"train sets tracking \(the comparison's own tracking\); data \(set data_uri and train_splits, or an "),
    ({"arms": [{"name": "s", "kind": "sft", "train": {"data": {"splits": ["train", "test"]}}}]},
     r"arm s: train.data.splits \['train', 'test'\] hold the test split"),
    # Equal budgets: DPO from an SFT arm that already took the whole budget has none left.
    ({"arms": [{"name": "sft", "kind": "sft"}, {"name": "dpo", "kind": "dpo", "init_from": "sft"}],
      "train": {"optim": {"max_steps": 240}}}, "whose 240 steps already use the budget of 240"),
    ({"arms": [{"name": "o", "kind": "orpo", "budget": "own", "train": {"optim": {"max_steps": 5}}}]},
     "budget own and train.optim.max_steps both set"),
    ({"arms": [{"name": "b", "kind": "base", "budget": "own"}]}, "apply to trained kinds"),
    # Trained arms differ only in their kind and what the recipe lists in varied.
    ({"arms": [{"name": "sft", "kind": "sft"}, {"name": "orpo", "kind": "orpo", "train": {"optim": {"lr": 0.01}}}]},
     r"differ in more than their objective: train.optim.lr \(sft 5e-05, orpo 0.01\)\. .*varied: \[train.optim.lr\]"),
    ({"arms": [{"name": "sft", "kind": "sft"},
               {"name": "orpo", "kind": "orpo", "train": {"loss": {"nll_over": "sequence"}}}]},
     r"train.loss.nll_over \(sft response, orpo sequence\)"),
    ({"arms": [{"name": "sft", "kind": "sft"}, {"name": "dpo", "kind": "dpo", "init_from": "sft", "budget": "own"}],
      "train": {"optim": {"max_steps": 10}}},
     r"init_from \(sft none, dpo sft\); budget \(sft 10 steps, dpo 20 steps\)"),
    ({"varied": ["train.optim.lrr"]}, "varied entry 'train.optim.lrr' names no setting"),
    ({"varied": ["train.optim.max_steps"]}, "the arm's steps are budget"),
])
def test_compare_configs_that_cannot_work_are_refused(values: dict[str, Any], match: str) -> None:
    with pytest.raises(MintError, match=match):
        build_config(compare.Config, {"task": "rare_disease", "data_uri": "/d", **values})


def test_compare_checks_training_configs_and_rows_first(tmp_path: Path) -> None:
    prefs = str(tmp_path / "prefs")
    write_prefs(prefs, "rare_disease", n_test=2)
    test = evaluate.load_test_set(prefs, "rare_disease")
    # Every trained arm's training config is built with the comparison's config.
    with pytest.raises(MintError, match=r"train settings of arm sft: .*unknown key 'optim.max_stepz'"):
        build_config(compare.Config, {"task": "rare_disease", "data_uri": prefs, "train": {"optim": {"max_stepz": 1}}})
    cfg = build_config(compare.Config, {"task": "rare_disease", "data_uri": prefs})
    with pytest.raises(MintError, match=r"train settings of arm s: .*unknown key 'data.targt'"):
        compare.prepare_arms(cfg.model_copy(update={"train": {}, "arms": [
            compare.ArmConfig(name="s", kind="sft", train={"data": {"targt": "ground_truth"}})]}), test, "")
    with pytest.raises(MintError, match=r"arm sft: .* no rows to train on in splits \['train'\]"):
        compare.prepare_arms(cfg.model_copy(update={"train": {}}), test, "")
    # An arm's own data is read, not the shared one: no validation rows here either.
    arms = [compare.ArmConfig(name="u", kind="orpo", train={"data": {"splits": ["validation"]}})]
    with pytest.raises(MintError, match=r"arm u: .* no rows to train on in splits \['validation'\]"):
        compare.prepare_arms(cfg.model_copy(update={"train": {}, "arms": arms}), test, "")


SCARCE = Path(__file__).parent.parent / "jobs" / "recipes" / "compare_rare_disease_scarce_labels.yaml"


def test_scarce_labels_recipe_trains_each_arm_on_its_own_data_at_one_budget() -> None:
    cfg = load_config(compare.Config, SCARCE)
    trained = {a.name: compare.train_config(cfg, a, "/base", cfg.own_steps(a, 0))
               for a in cfg.arm_configs if a.kind in compare.TRAINED}
    assert [a.kind for a in cfg.arm_configs] == ["orpo", "sft", "sft", "sft", "teacher", "text_ceiling"]
    data = {name: (t.objective, t.data.splits, t.data.target, t.data.filter) for name, t in trained.items()}
    assert data == {
        "orpo_lu": ("orpo", ["train", "validation"], "chosen", "all"),
        "sft_truth_l": ("sft", ["train"], "ground_truth", "with_ground_truth"),
        "sft_teacher_lu": ("sft", ["train", "validation"], "chosen", "all"),
        "oracle_sft_truth_lu": ("sft", ["train", "validation"], "ground_truth", "all")}
    assert {t.data.uri for t in trained.values()} == {cfg.data_uri}
    assert cfg.budget_steps == 1200 and {t.optim.max_steps for t in trained.values()} == {1200}
    assert {t.nll_span for t in trained.values()} == {"response"}
    assert cfg.varied_settings == ["train.data"] and cfg.confounds() == []
    assert compare.data_text(trained["sft_truth_l"].data) == (
        "./mint-data/preferences/rare_disease_scarce [train], target ground_truth, filter with_ground_truth")


def test_arms_may_differ_in_what_the_recipe_varies_or_report_it_as_a_confound() -> None:
    arms = [{"name": "sft", "kind": "sft"},
            {"name": "orpo", "kind": "orpo", "train": {"optim": {"lr": 0.01}, "data": {"splits": ["train", "x"]}}}]
    base = {"task": "rare_disease", "data_uri": "/d", "arms": arms}
    # A section covers every setting under it.
    assert build_config(compare.Config, {**base, "varied": ["train.optim.lr", "train.data"]}).confounds() == []
    with pytest.raises(MintError, match=r"train.data.splits \(sft \[\"train\"\], orpo \[\"train\", \"x\"\]\)"):
        build_config(compare.Config, {**base, "varied": ["train.optim.lr"]})
    allowed = build_config(compare.Config, {**base, "varied": ["train.data"], "allow_confounds": True})
    assert allowed.confounds() == [Confound("train.optim.lr", {"sft": "5e-05", "orpo": "0.01"})]
    # The local recipes mark what their DPO arm varies; the default arms vary the same.
    for name in ("compare_rare_disease", "compare_tissue_type"):
        cfg = load_config(compare.Config, SCARCE.parent / f"{name}.yaml")
        assert cfg.confounds() == [] and cfg.varied_settings == ["init_from", "budget", "train.optim.lr"]
        assert {compare.train_config(cfg, a, "/b").nll_span for a in cfg.arm_configs if a.kind in ("sft", "orpo")} \
            == {"response"}
    assert build_config(compare.Config, {"task": "rare_disease", "data_uri": "/d"}).varied_settings == [
        "init_from", "budget"]


def test_an_arm_started_from_another_trains_the_rest_of_the_budget() -> None:
    arms = [{"name": "sft", "kind": "sft", "train": {"optim": {"max_steps": 100}}},
            {"name": "dpo", "kind": "dpo", "init_from": "sft"},
            {"name": "dpo2", "kind": "dpo", "init_from": "sft", "budget": "own"},
            {"name": "orpo", "kind": "orpo"}]
    cfg = build_config(compare.Config, {"task": "rare_disease", "data_uri": "/d", "arms": arms,
                                        "train": {"optim": {"max_steps": 240}}, "varied": ["init_from", "budget"]})
    sft, dpo, dpo2, orpo = cfg.arm_configs
    assert [cfg.own_steps(sft, 0), cfg.own_steps(dpo, 100), cfg.own_steps(dpo2, 100), cfg.own_steps(orpo, 0)] \
        == [100, 140, 240, 240]
    # From the steps the starting arm really took (its epochs may end it early).
    assert compare.train_config(cfg, dpo, "/runs/sft", cfg.own_steps(dpo, 90)).optim.max_steps == 150
    with pytest.raises(MintError, match="whose steps are unknown"):
        cfg.own_steps(dpo, None)
    # The paper's default arms: DPO after SFT on a budget of its own (the report marks it).
    default = build_config(compare.Config, {"task": "rare_disease", "data_uri": "/d"})
    assert next(a for a in default.arm_configs if a.kind == "dpo").budget == "own"


@pytest.mark.parametrize(("lora", "reference"), [(True, None), (False, "/runs/sft")])
def test_dpo_arm_is_referenced_to_the_model_it_starts_from(lora: bool, reference: str | None) -> None:
    cfg = build_config(compare.Config, {"task": "rare_disease", "data_uri": "/d",
                                        "train": {"model": {"lora": {"enabled": lora}}}})
    dpo = next(a for a in cfg.arm_configs if a.kind == "dpo")
    train = compare.train_config(cfg, dpo, "/runs/sft")
    assert (train.model.path, train.model.reference_path) == ("/runs/sft", reference)
    orpo = compare.train_config(cfg, next(a for a in cfg.arm_configs if a.kind == "orpo"), "/base")
    assert orpo.model.reference_path is None


def with_text_ceiling(prefs: str, teacher: Path, n_right: int) -> None:
    """Record ``teacher`` as the pairs' teacher and save its text-only rankings of the test
    cases beside it: the truth first for the first ``n_right`` cases, never listed after."""
    import pyarrow.parquet as pq

    from mint_ray.teachers.knowledge import TEXT_CEILING_FILE, TEXT_CEILING_SCHEMA

    manifest = storage.require_manifest(prefs)
    table = storage.read_dataset(prefs)
    storage.write_dataset(prefs, table, overwrite=True, meta={**manifest.meta, "teacher": {"uri": str(teacher)}})
    test = table.filter(pc.equal(table["split"], "test"))
    cases = sorted(set(zip(test["sample_id"].to_pylist(), test["label"].to_pylist(), strict=True)))
    wrong = [f"Unrelated syndrome {'ABCDEFGHIJ'[j]}" for j in range(10)]
    ranked = [[truth, *wrong[:9]] if i < n_right else wrong for i, (_, truth) in enumerate(cases)]
    teacher.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pydict({
        "sample_id": [c for c, _ in cases], "split": ["test"] * len(cases), "label": [t for _, t in cases],
        "ranked_labels": ranked, "probabilities": [[0.1] * 10] * len(cases)}, schema=TEXT_CEILING_SCHEMA),
        teacher / TEXT_CEILING_FILE)


def test_text_ceiling_arm_answers_from_the_rankings_beside_the_teacher(tmp_path: Path) -> None:
    """The text-only ceiling is scored like the teacher: no model, no generation, its rankings
    read from ``<teacher>/text_ceiling.parquet`` (the teacher stage writes it)."""
    from mint_ray.teachers.knowledge import TEXT_CEILING_FILE

    prefs, teacher = str(tmp_path / "prefs"), tmp_path / "teacher"
    write_prefs(prefs, "rare_disease", n_test=4)
    with_text_ceiling(prefs, teacher, n_right=2)
    cfg = build_config(compare.Config, {
        "task": "rare_disease", "data_uri": prefs, "storage": {"root": str(tmp_path)},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}, "bootstrap_resamples": 50,
        "arms": [{"name": "teacher", "kind": "teacher"}, {"name": "text", "kind": "text_ceiling"}]})
    summary = compare.run(cfg)
    assert summary["arms"]["teacher"]["top1"] == 1.0 and summary["arms"]["text"]["top1"] == 0.5
    assert "text-only classifier" in summary["text"]

    (teacher / TEXT_CEILING_FILE).unlink()
    with pytest.raises(MintError, match=r"knowledge_check\.enabled=true"):
        compare.run(cfg.model_copy(update={"output_uri": str(tmp_path / "again")}))


@pytest.mark.slow
def test_compare_trains_the_arms_and_writes_one_report(tmp_path: Path) -> None:
    prefs = str(tmp_path / "prefs")
    write_prefs(prefs, "rare_disease", n_test=4, n_train=6)
    db = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = build_config(compare.Config, {
        "task": "rare_disease", "data_uri": prefs, "generation": {"max_new_tokens": 8, "batch_size": 4},
        "bootstrap_resamples": 100, "storage": {"root": str(tmp_path)}, "tracking": {"tracking_uri": db},
        "retrieval": {"top_n": 5},
        "train": {"model": {"tiny": {"vocab_size": 400}, "lora": {"r": 4, "alpha": 8}},
                  "optim": {"max_steps": 1, "warmup_ratio": 0}, "scaling": {"num_workers": 1},
                  "deepspeed": {"zero_stage": 2}, "registry": {"enabled": False}}})
    summary = compare.run(cfg)
    arms = ["base", "sft", "dpo", "orpo", "teacher", "rag"]
    assert list(summary["arms"]) == arms
    printed = "\n".join(compare.summarize(summary))  # what `mint-ray compare` closes with
    table = printed[printed.index("| arm |"):]
    assert all(f"| {arm} | 4 |" in table for arm in arms) and "Training (budget 1" in printed
    # The printed text has every paired row and how to read them; the demo's headline table
    # only the rows against the first reference (SFT), without the explanation.
    assert "| sft | base |" in printed and "| orpo | sft |" in printed and "McNemar's exact" in printed
    assert "| orpo | sft |" in summary["paired_table"] and "| orpo | base |" not in summary["paired_table"]
    assert "McNemar's exact" not in summary["paired_table"] and "mrr diff" not in summary["paired_table"]
    assert summary["headline_table"].startswith("| arm | n | unparseable | top1 | top10 | mrr |\n")
    # DPO after SFT takes a budget of its own on top: its 2 steps are marked against the budget of 1.
    steps = {arm: (summary["arms"][arm]["steps"], summary["arms"][arm]["budget"]) for arm in arms}
    assert steps == {"base": (0, "n/a"), "sft": (1, "equal"), "orpo": (1, "equal"), "teacher": (None, "n/a"),
                     "dpo": (2, "**differs: 2 steps vs 1 for the budget**"), "rag": (0, "n/a")}
    assert summary["arms"]["dpo"]["tokens"] > summary["arms"]["sft"]["tokens"] > 0
    report = Path(summary["report_uri"])
    assert (report / "accuracy.png").stat().st_size > 0 and "| orpo |" in (report / "report.md").read_text()
    assert len(_jsonl(report / "generations.jsonl")) == 4 * len(arms)
    assert summary["arms"]["teacher"]["top1"] == 1.0
    # Trained on the 6 train rows only (not the 4 test ones); DPO started from the SFT arm's model.
    dpo_meta = json.loads((Path(summary["arms"]["dpo"]["model_uri"]) / METADATA_FILE).read_text())
    assert dpo_meta["base_model"] == summary["arms"]["sft"]["model_uri"]
    assert dpo_meta["training"]["data"]["rows_in"] == 6
    client = mlflow.MlflowClient(db)
    for arm in ("sft", "dpo", "orpo"):
        run_id = summary["arms"][arm]["model_run_id"]
        assert client.get_run(run_id).data.metrics["eval.test.n"] == 4
    comparison = client.get_run(summary["mlflow_run_id"]).data.metrics
    assert comparison["teacher.top1"] == 1.0 and "rag.top10" in comparison


@pytest.mark.slow
def test_scarce_labels_recipe_runs_reduced(tmp_path: Path) -> None:
    """The scarce-labels recipe as written, reduced through overrides to a few cases and steps,
    and to the two trained arms whose data differ most (ORPO and the oracle train what the
    other compare test and the SFT arms here already cover: the teacher's lists, the truth)."""
    prefs = str(tmp_path / "prefs")
    write_prefs(prefs, "rare_disease", n_test=3, n_train=4, n_validation=4)
    with_text_ceiling(prefs, tmp_path / "teacher", n_right=3)
    cfg = load_config(compare.Config, SCARCE, [
        f"data_uri={prefs}", f"output_uri={tmp_path}/compare", f"storage.root={tmp_path}",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "bootstrap_resamples=50",
        "generation={max_new_tokens: 8, batch_size: 4}",
        "train.model.tiny={vocab_size: 400, hidden_size: 32, intermediate_size: 64}",
        "train.optim={max_steps: 2, micro_batch_size: 2}", "train.scaling.num_workers=1",
        "train.deepspeed.zero_stage=2"])
    assert [a.name for a in cfg.arms] == ["orpo_lu", "sft_truth_l", "sft_teacher_lu", "oracle_sft_truth_lu",
                                          "teacher", "text_ceiling"]
    run_arms = ["sft_truth_l", "sft_teacher_lu", "teacher", "text_ceiling"]
    summary = compare.run(cfg.model_copy(update={"arms": [a for a in cfg.arms if a.name in run_arms]}))
    arms = summary["arms"]
    assert list(arms) == run_arms
    assert arms["text_ceiling"]["top1"] == 1.0
    rows = {"sft_truth_l": 4, "sft_teacher_lu": 8}
    for name, rows_in in rows.items():
        assert (arms[name]["steps"], arms[name]["budget"]) == (2, "equal") and arms[name]["tokens"] > 0
        meta = json.loads((Path(arms[name]["model_uri"]) / METADATA_FILE).read_text())
        assert meta["training"]["data"]["rows_in"] == rows_in
    assert arms["sft_truth_l"]["data"].endswith("[train], target ground_truth, filter with_ground_truth")
    assert arms["sft_teacher_lu"]["data"].endswith("[train, validation], target chosen")
    # Both trained 2 steps of 2 rows; a one-item truth is a shorter answer than the teacher's
    # list: fewer tokens over as many rows.
    assert arms["sft_truth_l"]["tokens"] < arms["sft_teacher_lu"]["tokens"]
    md = (Path(summary["report_uri"]) / "report.md").read_text()
    assert "Step budget: 2 optimizer steps per trained arm" in md
    assert "| sft_truth_l | sft |" in md and "| teacher | teacher | the teacher's ranking" in md
