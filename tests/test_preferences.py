"""The preference stage end to end on a real local Ray: planted bad rows of every kind
are all accounted for, re-runs replace instead of adding, the pair text is the task's
format and parses back, the pairs load as a Hugging Face dataset in TRL's
conversational form, the run is tracked with lineage, and both tasks run S3 -> S3.

Teachers are untrained (built from configs): these tests check the plumbing; that a
trained teacher ranks well is the teachers' own test.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mint_ray import storage
from mint_ray.config import build_config
from mint_ray.errors import ConfigError, StorageError
from mint_ray.images import ImageLimits, decode_rgb, resize
from mint_ray.preferences import operators, schemas, validate
from mint_ray.preferences.config import Config
from mint_ray.preferences.fetch import ImageSource
from mint_ray.preferences.operators import TeacherScorer
from mint_ray.preferences.plan import catalog_names
from mint_ray.preferences.run import ray_config, run
from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPE, TISSUE_TYPES
from mint_ray.teachers import Case, load_teacher
from tests.prefbuild import encode, local_ray, prefs_config, synth_cohort, tiny_teacher

LIMITS = {"max_image_bytes": 60_000, "max_image_pixels": 100_000}


@pytest.fixture(scope="module", autouse=True)
def _ray() -> Iterator[None]:
    yield from local_ray()


@pytest.fixture(scope="module")
def rare(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A synth cohort with bad rows of every kind planted, in two files (the second with
    wrong column types), and the reason each bad row must get."""
    root = str(tmp_path_factory.mktemp("rare"))
    clean = synth_cohort(root, "rare_disease", 60)
    table = storage.read_dataset(clean)
    labels = catalog_names(storage.read_manifest(clean).meta)
    teacher = tiny_teacher(root, "rare_disease", labels, table.column("note").to_pylist())
    good = next(row for row in table.to_pylist() if row["split"] == "train")
    real_png = storage.read_bytes(good["image_uri"])
    rng = np.random.default_rng(0)
    files = {"corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 300, dtype=np.uint8)),
             "truncated.png": real_png[: len(real_png) // 2],
             "large.png": encode(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)),  # ~77 kB
             "pixels.png": encode(np.full((400, 400, 3), 200, np.uint8))}  # 160k px, ~1 kB
    for name, data in files.items():
        storage.write_bytes(storage.join(root, "bad", name), data)
    assert len(files["large.png"]) > LIMITS["max_image_bytes"] > len(files["pixels.png"])

    def bad(sid: str, **change: Any) -> dict[str, Any]:
        return {**good, "sample_id": sid, **change}

    img = lambda name: storage.join(root, "bad", name)  # noqa: E731
    planted = {
        "missing_image": bad("bad-missing", image_uri=img("nope.png")),
        "corrupt_image": bad("bad-corrupt", image_uri=img("corrupt.png")),
        "truncated_image": bad("bad-truncated", image_uri=img("truncated.png")),
        "image_too_large": bad("bad-large", image_uri=img("large.png")),
        "too_many_pixels": bad("bad-pixels", image_uri=img("pixels.png")),
        "empty_note": bad("bad-empty-note", note="  "),
        "unknown_label": bad("bad-label", label="Not a disease in the catalog"),
        "wrong_task": bad("bad-task", task="tissue_type"),
        "unknown_split": bad("bad-split", split="dev"),
        "duplicate_id": bad(good["sample_id"]),  # a second row with the first row's id
    }
    rows = [*table.to_pylist(), *planted.values(), bad(None)]  # type: ignore[arg-type]
    uri = storage.join(root, "cohorts", "planted")
    version = storage.prepare_output(uri, overwrite=False)
    nullable = pa.schema([f.with_nullable(True) for f in table.schema])
    storage.write_table(version, pa.Table.from_pylist(rows, schema=nullable), "part-0.parquet")
    # A second file whose label and note columns have the wrong type.
    storage.write_table(version, pa.table({
        "sample_id": ["bad-type-1", "bad-type-2"], "task": ["rare_disease"] * 2, "split": ["train"] * 2,
        "note": [11, 12], "image_uri": [None, None], "label": [1, 2], "meta": ["{}"] * 2}), "part-1.parquet")
    storage.commit(uri, version, meta=storage.read_manifest(clean).meta)
    expected = Counter({reason: 1 for reason in planted})
    expected["wrong_type"] = 3  # the null sample_id and both rows of the second file
    return {"root": root, "cohort": uri, "teacher": teacher, "labels": labels, "good": table,
            "expected": expected, "planted_ids": {r["sample_id"] for r in planted.values()}}


@pytest.fixture(scope="module")
def planted_run(rare: dict[str, Any]) -> dict[str, Any]:
    out = storage.join(rare["root"], "prefs")
    cfg = build_config(Config, {
        "task": "rare_disease", "cohort_uri": rare["cohort"], "output_uri": out, "splits": ["train", "test"],
        "teacher": {"uri": rare["teacher"], "batch_size": 16}, "limits": LIMITS, "block_rows": 32,
        "image_root": rare["root"], "storage": {"root": rare["root"]}})  # the images are the clean cohort's
    return {"cfg": cfg, "summary": run(cfg), "out": out}


def test_planted_bad_rows_are_all_accounted_for(rare: dict[str, Any], planted_run: dict[str, Any]) -> None:
    s, out = planted_run["summary"], planted_run["out"]
    good = rare["good"].to_pydict()
    validation = sum(split == "validation" for split in good["split"])
    assert s["quarantined"] == dict(sorted(rare["expected"].items()))
    assert s["filtered"] == {"split_not_selected": validation}
    assert s["rows_in"] == 60 + 11 + 2 == s["cases_paired"] + s["quarantined_total"] + s["filtered_total"]
    assert s["pairs"] == s["cases_paired"] == 60 - validation
    pairs = storage.read_dataset(out).to_pydict()
    quarantine = storage.read_dataset(s["quarantine_uri"]).to_pydict()
    assert quarantine["stage"].count("filter") == validation
    assert Counter(r for r, st in zip(quarantine["reason"], quarantine["stage"], strict=True)
                   if st != "filter") == rare["expected"]
    # Every input id is in exactly one table (the duplicate's id is paired once, quarantined once).
    assert len(set(pairs["sample_id"])) == len(pairs["sample_id"])
    assert set(pairs["sample_id"]) | set(quarantine["sample_id"]) == \
        set(good["sample_id"]) | rare["planted_ids"] | {None, "bad-type-1", "bad-type-2"}
    assert set(pairs["split"]) == {"train", "test"}
    detail = dict(zip(quarantine["sample_id"], quarantine["detail"], strict=True))
    assert "label: int64" in detail["bad-type-1"] and "note: int64" in detail["bad-type-1"]
    assert not any(n and n in " ".join(filter(None, quarantine["detail"])) for n in good["note"])


def test_pair_text_is_the_papers_format_and_parses_back(rare: dict[str, Any],
                                                         planted_run: dict[str, Any]) -> None:
    rows = storage.read_dataset(planted_run["out"]).to_pylist()
    notes = dict(zip(*rare["good"].select(["sample_id", "note"]).to_pydict().values(), strict=True))
    for row in rows:
        assert row["prompt"] == RARE_DISEASE.prompt_messages(note=notes[row["sample_id"]], n_answers=10)
        assert len(row["teacher_top"]) == len(row["teacher_bottom"]) == 10
        assert row["teacher_top"] == row["teacher_ranking"][:10]
        assert row["teacher_bottom"] == row["teacher_ranking"][-10:]
        assert row["teacher_scores"] == sorted(row["teacher_scores"], reverse=True)
        assert sorted(row["teacher_ranking"]) == sorted(rare["labels"])
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert chosen == RARE_DISEASE.format_answer(row["teacher_top"])
        assert rejected == RARE_DISEASE.format_answer(row["teacher_bottom"])
        assert chosen.splitlines()[:2] == ["POTENTIAL_DISEASES:", f"1. '{row['teacher_top'][0]}'"]
        assert RARE_DISEASE.parse_answer(chosen).items == row["teacher_top"]
        assert RARE_DISEASE.parse_answer(rejected).items == row["teacher_bottom"]
        assert row["truth_rank"] == row["teacher_ranking"].index(row["label"]) + 1
        assert row["margin"] > 0 and not row["truth_forced"] and row["pair_index"] == 0


def test_pair_scores_are_what_the_teacher_scores_alone(rare: dict[str, Any], planted_run: dict[str, Any]) -> None:
    """The CPU tasks prepared each row's inputs and the actors ran only the model: every
    row got the scores the teacher gives its case directly (up to the batch's padding)."""
    teacher = load_teacher(rare["teacher"], device="cpu")
    def case(row: dict[str, Any]) -> Case:
        uri = row["image_uri"]
        return Case(note=row["note"], image=decode_rgb(storage.read_bytes(uri), ImageLimits()) if uri else None)

    cases = {r["sample_id"]: case(r) for r in rare["good"].to_pylist()}
    rows = storage.read_dataset(planted_run["out"]).to_pylist()
    direct = teacher.score([cases[r["sample_id"]] for r in rows])
    for row, expected in zip(rows, direct, strict=True):
        got = dict(zip(row["teacher_ranking"], row["teacher_scores"], strict=True))
        np.testing.assert_allclose([got[label] for label in teacher.labels], expected, rtol=1e-5, atol=1e-6)


def test_run_is_published_and_tracked_with_lineage(rare: dict[str, Any], planted_run: dict[str, Any]) -> None:
    import mlflow

    s, out = planted_run["summary"], planted_run["out"]
    manifest = storage.read_manifest(out)
    meta = manifest.meta
    assert meta["task"] == "rare_disease" and meta["teacher"]["kind"] == "fusion"
    assert meta["teacher"]["name"] == "rd-test" and len(meta["teacher"]["version"]) == 16
    assert (meta["k"], meta["q"], meta["pairs_per_case"], meta["force_truth"]) == (10, 10, 1, False)
    assert meta["quarantine"]["version"] == storage.read_manifest(s["quarantine_uri"]).version
    assert meta["counts"]["accounting"] == s["accounting"]
    mlflow.set_tracking_uri(f"sqlite:///{Path(rare['root']) / 'mlflow.db'}")
    tracked = mlflow.get_run(s["mlflow_run_id"])
    metrics, tags = tracked.data.metrics, tracked.data.tags
    assert metrics["rows_in"] == 73 and metrics["pairs"] == s["pairs"] and metrics["rows_per_s"] > 0
    assert metrics["quarantine.missing_image"] == 1 and metrics["quarantine.wrong_type"] == 3
    assert tags["teacher.version"] == meta["teacher"]["version"] and tags["teacher.name"] == "rd-test"
    assert tags["output.uri"] == out and tags["output.content_hash"] == manifest.content_hash
    assert tags["cohort.content_hash"] == storage.read_manifest(rare["cohort"]).content_hash
    logged = json.dumps([tracked.data.params, tags])
    assert not any(note in logged for note in rare["good"].column("note").to_pylist())


def test_rerun_replaces_the_output_and_records_the_options(rare: dict[str, Any],
                                                           planted_run: dict[str, Any]) -> None:
    cfg, out = planted_run["cfg"], planted_run["out"]
    with pytest.raises(StorageError, match="already holds a complete dataset"):
        run(cfg)
    first = storage.read_dataset(out).to_pydict()
    threshold = statistics.median(first["margin"])
    again = run(cfg.model_copy(update={
        "storage": cfg.storage.model_copy(update={"overwrite": True}),
        "pairs": cfg.pairs.model_copy(update={"pairs_per_case": 2, "min_margin": threshold,
                                              "force_truth": True})}))
    rows = storage.read_dataset(out).to_pylist()
    keys = [(r["sample_id"], r["pair_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == again["pairs"]
    for uri in (out, again["quarantine_uri"]):  # one version each: the old ones are gone
        folders = {f[len(uri) + 1:].split("/")[0] for f in storage.list_files(uri)}
        assert folders - {"_manifest.json", "quarantine"} == {storage.read_manifest(uri).version}
    assert again["filtered"]["low_margin"] > 0 and again["pairs_dropped_low_margin"] > 0
    assert again["rows_in"] == again["cases_paired"] + again["quarantined_total"] + again["filtered_total"]
    assert all(r["margin"] >= threshold for r in rows)
    for r in rows:
        chosen = RARE_DISEASE.parse_answer(r["chosen"][0]["content"]).items
        rejected = RARE_DISEASE.parse_answer(r["rejected"][0]["content"]).items
        assert r["label"] in chosen and not set(chosen) & set(rejected)
        assert r["truth_forced"] == (r["label"] not in r["teacher_top"])
    meta = storage.read_manifest(out).meta
    assert (meta["pairs_per_case"], meta["min_margin"], meta["force_truth"]) == (2, threshold, True)
    assert meta["counts"]["filtered"]["low_margin"] == again["filtered"]["low_margin"]


def _is_conversational(row: dict[str, Any]) -> bool:
    """TRL's check, when TRL is not installed: messages are dicts with role and content."""
    try:
        from trl.data_utils import is_conversational
    except ImportError:
        return all(isinstance(row[key], list) and row[key] and
                   all({"role", "content"} <= set(m) for m in row[key])
                   for key in ("prompt", "chosen", "rejected"))
    return bool(is_conversational(row))


def test_tissue_pairs_load_as_a_trl_preference_dataset(tmp_path: Path) -> None:
    import datasets

    root = str(tmp_path)
    clean = synth_cohort(root, "tissue_type", 24)
    table = storage.read_dataset(clean)
    no_image = table.slice(0, 1).to_pylist()[0] | {"sample_id": "no-image", "image_uri": None}
    # A new cohort beside it: the images are the clean cohort's, inside the image root.
    cohort = storage.join(root, "cohorts", "with-gap")
    storage.write_dataset(cohort, pa.concat_tables([table, pa.Table.from_pylist([no_image], table.schema)]),
                          meta=storage.read_manifest(clean).meta)
    teacher = tiny_teacher(root, "tissue_type", list(TISSUE_TYPES), [])
    s = run(prefs_config(task="tissue_type", cohort_uri=cohort, teacher={"uri": teacher, "batch_size": 8},
                         block_rows=8, image_root=storage.join(root, "cohorts"), storage={"root": root}))
    assert (s["rows_in"], s["pairs"], s["quarantined"]) == (25, 24, {"missing_image": 1})
    ds = datasets.Dataset(storage.read_dataset(s["output_uri"]))
    assert {"prompt", "chosen", "rejected", "sample_id", "image_uri", "label", "teacher_ranking",
            "teacher_scores", "teacher_name", "teacher_version"} <= set(ds.column_names)
    row = ds[0]
    assert _is_conversational(row)
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["prompt"] == TISSUE_TYPE.prompt_messages(candidates=list(TISSUE_TYPES), n_answers=5)
    assert row["prompt"][1]["content"][0] == {"type": "image", "text": None}
    text = row["chosen"][0]["content"][0]["text"]
    assert text == TISSUE_TYPE.format_answer(row["teacher_top"]) and text.startswith("MOST_LIKELY_TISSUE:\n1. ")
    assert TISSUE_TYPE.parse_answer(text).items == row["teacher_top"] and len(row["teacher_top"]) == 5
    assert TISSUE_TYPE.parse_answer(row["rejected"][0]["content"][0]["text"]).items == row["teacher_bottom"]
    assert row["image_uri"].endswith(".png") and row["teacher_name"] == "tt-test"


class _FlakyTeacher:
    labels = ("a", "b", "c")

    def score_prepared(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if "boom" in inputs["note"]:
            raise ValueError("cannot score this one")
        return np.array([[np.nan, 0, 0] if note == "nan" else [3, 2, 1] for note in inputs["note"]], np.float32)


class _Thumbnails:
    """A teacher's CPU side for the test: every image as a 26x26 thumbnail (2028 bytes)."""

    kind = "test"

    def prepare(self, cases: list[Case]) -> dict[str, np.ndarray]:
        return {"image": np.stack([resize(c.image, 26) for c in cases]) if cases  # type: ignore[arg-type]
                else np.zeros((0, 26, 26, 3), np.uint8)}


def test_decoded_blocks_hold_whole_batches_and_about_block_bytes(tmp_path: Path) -> None:
    """Large inputs make blocks of fewer rows (never over-filling the object store), in
    whole teacher batches; every row comes out once, in order, with its own inputs."""
    rng = np.random.default_rng(0)
    pictures, rows = [], []
    for i in range(10):
        picture = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
        path = tmp_path / f"{i}.png"
        Image.fromarray(picture).save(path)
        pictures.append(picture)
        rows.append({"sample_id": f"s{i}", "task": "tissue_type", "split": "train", "note": None,
                     "image_uri": path.name if i != 3 else str(tmp_path / "gone.png"),  # relative or not
                     "label": TISSUE_TYPES[0], "source_file": "part-0.parquet", "source_row": i,
                     "invalid_utf8": None, "type_error": None, "duplicate": False})
    rules = validate.Rules(task="tissue_type", labels=frozenset(TISSUE_TYPES), splits=frozenset(["train"]),
                           needs_note=False, needs_image=True, max_image_bytes=10**6, max_image_pixels=10**6)
    source = ImageSource.for_cohort(str(tmp_path), None, timeout_s=30)
    blocks = list(operators.prepare(pa.Table.from_pylist(rows), rules, source, _Thumbnails(), io_threads=4,
                                    batch_rows=2, block_bytes=5000))
    # Rows of 2028 bytes: two batches of 2 pass 5000 bytes; the last batch alone does.
    assert [b.num_rows for b in blocks] == [4, 4, 2]
    table = pa.concat_tables(blocks)
    assert table.column("sample_id").to_pylist() == [f"s{i}" for i in range(10)]
    assert table.column("image_uri").to_pylist()[:2] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    images = schemas.input_arrays(table)["image"]
    assert table.column("reason")[3].as_py() == "missing_image" and not images[3].any()
    assert all(np.array_equal(images[i], resize(pictures[i], 26)) for i in range(10) if i != 3)


def test_the_teacher_pool_gets_blocks_of_about_block_bytes(tmp_path: Path) -> None:
    """Ray Data merges a task's outputs up to its own 128 MiB unless told otherwise; the
    pool would then get one big work unit and leave the second actor idle. With
    ``rows_per_file=1`` every block that reached the pool becomes its own file."""
    import pyarrow.parquet as pq

    root = str(tmp_path)
    cohort = synth_cohort(root, "tissue_type", 24)
    teacher = tiny_teacher(root, "tissue_type", list(TISSUE_TYPES), [])
    # The CLIP teacher's pixel values, 3x32x32 float32 = 12 288 bytes a row: batches of 4
    # rows, so 2 batches pass 80 000 bytes.
    s = run(prefs_config(task="tissue_type", cohort_uri=cohort, block_rows=24, block_bytes=80_000, rows_per_file=1,
                         teacher={"uri": teacher, "batch_size": 4, "num_actors": 2}, storage={"root": root}))
    files = storage.read_manifest(s["output_uri"]).files
    sizes = sorted(pq.read_metadata(f).num_rows for f in files)
    assert (s["rows_in"], sizes) == (24, [8, 8, 8])


def test_a_failing_row_costs_only_itself() -> None:
    scorer = TeacherScorer.__new__(TeacherScorer)
    scorer.teacher = _FlakyTeacher()  # type: ignore[assignment]
    (ok, no_error), *failed = scorer._score({"note": np.array(["ok", "boom", "nan"])}, 3)
    assert ok.tolist() == [3.0, 2.0, 1.0] and no_error is None
    assert failed == [(None, "ValueError: cannot score this one"), (None, "non-finite scores")]
    with pytest.raises(ValueError, match="cannot score"):  # fails alone on every row: a broken teacher
        scorer._score({"note": np.array(["boom", "boom"])}, 2)


def test_config_errors_name_the_fix(rare: dict[str, Any], tmp_path: Path) -> None:
    base = {"task": "rare_disease", "cohort_uri": rare["cohort"], "teacher": {"uri": rare["teacher"]},
            "output_uri": str(tmp_path / "never")}
    with pytest.raises(ConfigError, match="decode_num_cpus"):
        prefs_config(**base, decode_num_cpus=1)
    with pytest.raises(ConfigError, match="unknown split"):
        prefs_config(**base, splits=["train", "dev"])
    with pytest.raises(ConfigError, match=r"must contain \{n\}"):
        prefs_config(**base, prompt={"instruction": "List diseases."})
    with pytest.raises(ConfigError, match="need 40 distinct labels but the teacher scores 30"):
        run(prefs_config(**base, pairs={"pairs_per_case": 3}))
    with pytest.raises(ConfigError, match="trained for task 'rare_disease'"):
        run(prefs_config(**{**base, "task": "tissue_type"}))
    with pytest.raises(ConfigError, match=r"ray\.num_cpus=2 leaves no CPU"):
        ray_config(prefs_config(**{**base, "teacher": {"uri": rare["teacher"], "num_actors": 2}},
                                ray={"num_cpus": 2}))
    assert not storage.exists(str(tmp_path / "never"))


@pytest.mark.s3
def test_both_tasks_build_from_s3_to_s3(s3_bucket: str, tmp_path: Path) -> None:
    """Cohorts, teachers and outputs all on the Ceph gateway (Ray restarted with its keys)."""
    import datasets
    import ray

    from mint_ray.ray_cluster import worker_env

    ray.shutdown()  # the module's Ray started before the S3 keys were in the environment
    ray.init(address="local", num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=False,
             runtime_env={"env_vars": worker_env()})
    for task, n in (("rare_disease", 40), ("tissue_type", 30)):
        cohort = synth_cohort(s3_bucket, task, n)
        table = storage.read_dataset(cohort)
        labels = catalog_names(storage.read_manifest(cohort).meta)
        teacher = tiny_teacher(s3_bucket, task, labels, table.column("note").to_pylist() if task == "rare_disease"
                           else [])
        out = f"{s3_bucket}/preferences/{task}"
        s = run(prefs_config(task=task, cohort_uri=cohort, teacher={"uri": teacher, "batch_size": 16},
                             output_uri=out, pairs={"k": 5, "q": 5}, storage={"root": str(tmp_path)}))
        assert (s["rows_in"], s["pairs"], s["quarantined"]) == (n, n, {})
        manifest = storage.read_manifest(out)
        assert all(f.startswith(f"{out}/v-") for f in manifest.files)
        assert manifest.meta["task"] == task and manifest.meta["teacher"]["name"].endswith("-test")
        ds = datasets.Dataset(storage.read_dataset(out))
        assert len(ds) == n and _is_conversational(ds[0])
        task_def = RARE_DISEASE if task == "rare_disease" else TISSUE_TYPE
        chosen = ds[0]["chosen"][0]["content"]
        text = chosen if isinstance(chosen, str) else chosen[0]["text"]
        assert task_def.parse_answer(text).items == ds[0]["teacher_top"]
