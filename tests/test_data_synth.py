"""Cohort generators (``mint-ray data synth``): contract, determinism, splits, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mint_ray import hpo, storage
from mint_ray.cli import main
from mint_ray.config import build_config, load_config
from mint_ray.data import SAMPLES_SCHEMA, rare_disease, splits, synth
from mint_ray.errors import ConfigError, MintError
from mint_ray.images import ImageLimits, decode_rgb
from mint_ray.tasks import TISSUE_TYPES

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_samples": 240, "n_diseases": 12}


def make_cfg(tmp_path: Path, sizes: dict[str, Any] | None = None,
             **overrides: Any) -> synth.Config:
    """A small, fast config writing under ``tmp_path`` with tracking off."""
    data: dict[str, Any] = {"task": "rare_disease", "image_size": 32, "sizes": sizes or SMALL,
                            "storage": {"root": str(tmp_path)}, "tracking": {"enabled": False},
                            **overrides}
    return build_config(synth.Config, data)


def version_dirs(uri: str) -> list[Path]:
    return sorted(p for p in Path(uri).glob("v-*") if p.is_dir())


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["data", "synth", "--tracking", "false", *args])
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def rd_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[synth.Config, pa.Table]:
    cfg = make_cfg(tmp_path_factory.mktemp("rd"), note_style="mixed")
    synth.run(cfg)
    return cfg, storage.read_dataset(cfg.output())


# ----------------------------------------------------------------- the written dataset


def test_rare_disease_cohort_follows_the_samples_contract(rd_cohort) -> None:
    cfg, table = rd_cohort
    assert table.schema.equals(SAMPLES_SCHEMA)
    rows = table.to_pylist()
    assert len(rows) == 240 and len({r["sample_id"] for r in rows}) == 240
    manifest = storage.read_manifest(cfg.output())
    assert manifest is not None and manifest.num_rows == 240
    catalog = {label["name"]: label["id"] for label in manifest.meta["labels"]}
    assert len(catalog) == 12
    assert manifest.meta["split_counts"] == {"train": 192, "validation": 24, "test": 24}
    styles = set()
    for row in rows:
        meta = json.loads(row["meta"])
        assert row["task"] == "rare_disease" and row["label"] in catalog
        assert meta["label_id"] == catalog[row["label"]]
        assert {"sex", "age_months", "ethnicity", "hpo_ids", "generator"} <= set(meta)
        digest = hashlib.sha256(storage.read_bytes(row["image_uri"])).hexdigest()
        assert row["image_uri"] == storage.join(cfg.output(), "images", f"{digest}.png")
        styles.add(meta["note_style"])
        if meta["note_style"] == "gestalt":
            assert row["note"].startswith(f"Sex {meta['sex']} Age {meta['age']} Ethnicity ")
        names = [hpo.load().names[h] for h in meta["hpo_ids"]]
        note = row["note"].lower()
        assert all(n.lower() in note for n in names)
    assert styles == {"gestalt", "paragraph"}
    pixels = decode_rgb(Path(rows[0]["image_uri"]).read_bytes(), ImageLimits())
    assert pixels.shape == (32, 32, 3)


def test_every_label_is_a_real_hpoa_disease(rd_cohort) -> None:
    cfg, table = rd_cohort
    # Read the annotation file independently of the generator's parser.
    text = (hpo.data_dir() / "phenotype.hpoa").read_text(encoding="utf-8")
    real = {tuple(line.split("\t")[:2]) for line in text.splitlines() if line[:1] not in ("#", "")}
    pairs = {(json.loads(m)["label_id"], name)
             for m, name in zip(table["meta"].to_pylist(), table["label"].to_pylist(), strict=True)}
    assert pairs and pairs <= real
    labels = storage.read_manifest(cfg.output()).meta["labels"]
    assert {(x["id"], x["name"]) for x in labels} <= real


def test_labels_are_distinct_to_a_fuzzy_matcher(rd_cohort) -> None:
    cfg, _ = rd_cohort
    names = [x["name"] for x in storage.read_manifest(cfg.output()).meta["labels"]]
    clashes = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
               if rare_disease.names_clash(a, b)]
    assert clashes == []


def test_splits_are_stratified_by_label(rd_cohort) -> None:
    _, table = rd_cohort
    per_label = Counter(zip(table["label"].to_pylist(), table["split"].to_pylist(), strict=True))
    for label in set(table["label"].to_pylist()):
        # 20 cases per label, split 0.8 / 0.1 / 0.1.
        assert [per_label[(label, s)] for s in splits.SPLITS] == [16, 2, 2]


def test_tissue_type_tiles(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, task="tissue_type", sizes={"n_samples": 95}, image_size=48)
    summary = synth.run(cfg)
    table = storage.read_dataset(cfg.output())
    assert summary["rows"] == 95 and summary["labels"] == len(TISSUE_TYPES)
    assert set(table["label"].to_pylist()) == set(TISSUE_TYPES)
    assert table["note"].null_count == 95
    assert Counter(table["label"].to_pylist()) == dict.fromkeys(TISSUE_TYPES, 5)
    for uri in table["image_uri"].to_pylist()[:5]:
        assert decode_rgb(storage.read_bytes(uri), ImageLimits()).shape == (48, 48, 3)


def test_per_split_counts(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, task="tissue_type",
                   sizes={"per_split": {"train": 50, "validation": 7, "test": 19}})
    assert synth.run(cfg)["splits"] == {"train": 50, "validation": 7, "test": 19}


# ----------------------------------------------------------------- determinism


def relative_table_bytes(uri: str) -> bytes:
    """The table's Parquet bytes with image URIs made relative to their version folder
    (the version folder name is a fresh id per write, by design of ``storage``)."""
    table = storage.read_dataset(uri)
    relative = [u.split("/images/", 1)[1] for u in table["image_uri"].to_pylist()]
    table = table.set_column(table.schema.get_field_index("image_uri"), "image_uri",
                             pa.array(relative, pa.string()))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def image_bytes(uri: str) -> list[bytes]:
    return [storage.read_bytes(u) for u in storage.read_dataset(uri)["image_uri"].to_pylist()]


@pytest.mark.parametrize("task", ["rare_disease", "tissue_type"])
def test_same_seed_gives_identical_bytes(tmp_path: Path, task: str) -> None:
    sizes = {"n_samples": 60, "n_diseases": 6}
    a = make_cfg(tmp_path / "a", task=task, sizes=sizes, seed=7, note_style="mixed")
    b = make_cfg(tmp_path / "b", task=task, sizes=sizes, seed=7, note_style="mixed")
    c = make_cfg(tmp_path / "c", task=task, sizes=sizes, seed=8, note_style="mixed")
    for cfg in (a, b, c):
        synth.run(cfg)
    assert relative_table_bytes(a.output()) == relative_table_bytes(b.output())
    assert image_bytes(a.output()) == image_bytes(b.output())
    assert relative_table_bytes(a.output()) != relative_table_bytes(c.output())


# ----------------------------------------------------------------- pure parts


def test_split_totals_add_up() -> None:
    assert splits.split_totals(10, [0.8, 0.1, 0.1]) == [8, 1, 1]
    assert splits.split_totals(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # largest remainders
    assert sum(splits.split_totals(1001, [0.7, 0.2, 0.1])) == 1001


@pytest.mark.parametrize("seed", range(5))
def test_stratified_assign_is_exact_and_proportional(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = [int(x) for x in rng.integers(0, 9, 500)]
    totals = splits.split_totals(500, [0.7, 0.2, 0.1])
    assigned = splits.stratified_assign(labels, totals, rng)
    assert [assigned.count(s) for s in range(3)] == totals
    for label, n in Counter(labels).items():
        got = Counter(s for s, x in zip(assigned, labels, strict=True) if x == label)
        for s, total in enumerate(totals):
            assert abs(got[s] - n * total / 500) < 2


def test_balanced_labels() -> None:
    labels = splits.balanced_labels(103, 10, np.random.default_rng(0))
    assert sorted(Counter(labels).values()) == [10] * 7 + [11] * 3


@pytest.mark.parametrize(("raw", "expected"), [
    ("HP:0040283", 0.17), ("3/4", 0.75), ("40%", 0.4), ("", hpo.DEFAULT_FREQUENCY),
    ("0/2", 0.0), ("HP:0040285", 0.0)])
def test_parse_frequency(raw: str, expected: float) -> None:
    assert hpo.parse_frequency(raw) == pytest.approx(expected)


def test_parse_hpoa_keeps_observed_phenotypes() -> None:
    names = {"HP:1": "A", "HP:2": "B", "HP:3": "C"}
    text = "\n".join([
        "#description: test", "database_id\tdisease_name\tqualifier\thpo_id\tx\tx\tx\tfrequency",
        "OMIM:1\tD one\t\tHP:1\tr\tPCS\t\t1/2\t\t\tP\tc",
        "OMIM:1\tD one\tNOT\tHP:2\tr\tPCS\t\t\t\t\tP\tc",      # negated
        "OMIM:1\tD one\t\tHP:3\tr\tPCS\t\t0/3\t\t\tP\tc",      # looked for, absent
        "OMIM:1\tD one\t\tHP:2\tr\tPCS\t\t\t\t\tI\tc",         # inheritance, not a phenotype
        "OMIM:1\tD one\t\tHP:9\tr\tPCS\t\t\t\t\tP\tc",         # unknown term
        "ORPHA:2\tD two\t\tHP:2\tr\tPCS\t\tHP:0040281\t\t\tP\tc",
    ])
    diseases = hpo.parse_hpoa(text, names)
    assert diseases["OMIM:1"].annotations == (hpo.Annotation("HP:1", 0.5),)
    assert diseases["ORPHA:2"].annotations == (hpo.Annotation("HP:2", 0.9),)


def test_parse_obo_names_skips_obsolete_and_maps_alt_ids() -> None:
    text = ("format-version: 1.2\n\n[Term]\nid: HP:1\nname: One\nalt_id: HP:7\n\n"
            "[Term]\nid: HP:2\nname: Two\nis_obsolete: true\n\n[Typedef]\nid: part_of\nname: p\n")
    assert hpo.parse_obo_names(text) == {"HP:1": "One", "HP:7": "One"}


def test_hpo_loads_from_the_package_files() -> None:
    data = hpo.load()
    assert data.names["HP:0001250"] == "Seizure"
    assert data.diseases["OMIM:154700"].name == "Marfan syndrome"
    assert len(data.diseases) > 10_000


@pytest.mark.parametrize(("months", "text", "adjective"), [
    (0, "0 months", "newborn"), (1, "1 month", "1-month-old"), (42, "3 years 6 months",
                                                                  "3-year-old"),
    (12, "1 year", "12-month-old"), (300, "25 years", "25-year-old")])
def test_age_wording(months: int, text: str, adjective: str) -> None:
    assert rare_disease.format_age(months) == text
    assert rare_disease.age_adjective(months) == adjective


def test_names_clash() -> None:
    assert rare_disease.names_clash("Noonan syndrome 1", "Noonan syndrome 2")
    assert rare_disease.names_clash("Myhre syndrome", "Myhre Syndrome")
    assert not rare_disease.names_clash("Marfan syndrome", "Costello syndrome")


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(("args", "needle"), [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--n-samples", "0"], "sizes.n_samples"),
    (["--n-samples", "-5"], "sizes.n_samples"),
    (["--set", "sizes.per_split={train: 10, validation: 0, test: 2}"], "sizes.per_split.validation"),
    (["--set", "sizes.fractions.train=0.5"], "add up to 1"),
    (["--n-diseases", "0"], "sizes.n_diseases"),
    (["--image-size", "0"], "image_size"),
    (["--note-style", "haiku"], "note_style"),
    (["--n-samples", "5", "--n-diseases", "10"], "cannot cover 10 labels"),
    (["--bogus", "1"], "unknown option '--bogus'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys, args: list[str],
                                                  needle: str) -> None:
    out = tmp_path / "out"
    code, err = cli(capsys, "--out", str(out), *args)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("mint-ray: error:") and needle in err
    assert not out.exists() or not any(out.rglob("*"))


def image_files(uri: str) -> set[str]:
    return set(storage.list_files(storage.join(uri, synth.IMAGES_DIR)))


def overwriting(cfg: synth.Config, **changes: Any) -> synth.Config:
    """``cfg`` with ``changes``, allowed to replace the cohort already at its output."""
    return cfg.model_copy(update={**changes, "storage": cfg.storage.model_copy(update={"overwrite": True})})


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "tt")
    common = ["--task", "tissue_type", "--out", out, "--n-samples", "40", "--image-size", "24"]
    assert cli(capsys, *common)[0] == 0
    first = storage.read_manifest(out)
    first_images = storage.read_dataset(out)["image_uri"].to_pylist()
    code, err = cli(capsys, *common, "--seed", "3")
    assert code == 2 and len(err.splitlines()) == 1 and "--overwrite" in err
    assert storage.read_manifest(out) == first and [d.name for d in version_dirs(out)] == [
        first.version]
    assert cli(capsys, *common, "--seed", "3", "--overwrite")[0] == 0
    second = storage.read_manifest(out)
    assert second.version != first.version and second.meta["seed"] == 3
    assert [d.name for d in version_dirs(out)] == [second.version]
    # Tables built from the first version (preference sets, evaluations) keep their images.
    second_images = storage.read_dataset(out)["image_uri"].to_pylist()
    assert image_files(out) == set(first_images) | set(second_images)
    assert all(decode_rgb(storage.read_bytes(u), ImageLimits()).shape == (24, 24, 3) for u in first_images)


def test_rerun_with_the_same_seed_uploads_no_image_again(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, task="tissue_type", sizes={"n_samples": 40})
    synth.run(cfg)
    before = {u: Path(u).stat().st_mtime_ns for u in image_files(cfg.output())}
    synth.run(overwriting(cfg))
    assert {u: Path(u).stat().st_mtime_ns for u in image_files(cfg.output())} == before
    assert set(storage.read_dataset(cfg.output())["image_uri"].to_pylist()) == set(before)


def fail_after(monkeypatch: pytest.MonkeyPatch, cases: int) -> Counter[str]:
    """Make tissue-tile rendering raise after ``cases`` cases; clear the counter to re-arm."""
    from mint_ray.data import tissue_type

    real_case = tissue_type.TissueTypeGenerator.case
    calls: Counter[str] = Counter()

    def flaky(self, label_index: int, rng: np.random.Generator):
        calls["n"] += 1
        if calls["n"] > cases:
            raise MintError("boom")
        return real_case(self, label_index, rng)

    monkeypatch.setattr(tissue_type.TissueTypeGenerator, "case", flaky)
    return calls


def test_failure_mid_generation_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    kept = make_cfg(tmp_path, task="tissue_type", sizes={"n_samples": 20}, output_uri=str(tmp_path / "kept"))
    synth.run(kept)
    calls = fail_after(monkeypatch, 20)
    for cfg in (make_cfg(tmp_path, task="tissue_type", sizes={"n_samples": 40}),
                overwriting(kept, seed=5, sizes=synth.Sizes(n_samples=40))):
        calls.clear()
        before = image_files(cfg.output())
        manifest = storage.read_manifest(cfg.output())
        with pytest.raises(MintError, match="boom"):
            synth.run(cfg)
        assert storage.read_manifest(cfg.output()) == manifest
        assert version_dirs(cfg.output()) == ([] if manifest is None else [Path(cfg.output()) / manifest.version])
        assert image_files(cfg.output()) == before  # the images it had added are gone, the others stay
    assert len(before) == 20


def test_impossible_disease_count_is_a_config_error(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, sizes={"n_samples": 100, "n_diseases": 50, "min_phenotypes": 400})
    with pytest.raises(ConfigError, match=r"sizes\.min_phenotypes"):
        synth.run(cfg)
    assert not Path(cfg.output()).exists() or version_dirs(cfg.output()) == []


def test_both_sizes_ways_conflict(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        make_cfg(tmp_path, sizes={"n_samples": 10,
                                  "per_split": {"train": 5, "validation": 1, "test": 1}})


# ----------------------------------------------------------------- entrypoints


def test_local_recipe_is_the_default_design() -> None:
    cfg = load_config(synth.Config, REPO / "jobs" / "recipes" / "synth_local.yaml")
    defaults = synth.Config()
    assert cfg.sizes == defaults.sizes and cfg.rare_disease == defaults.rare_disease
    assert cfg.image_size == defaults.image_size


def test_job_entrypoint_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "synth_data.py"), "--task", "nope",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "unknown task" in done.stderr


# ----------------------------------------------------------------- tracking and S3


def test_run_is_tracked_without_note_text(tmp_path: Path) -> None:
    import mlflow

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg(tmp_path, sizes={"n_samples": 60, "n_diseases": 6},
                   tracking={"enabled": True, "tracking_uri": tracking_uri})
    summary = synth.run(cfg)
    run = mlflow.MlflowClient(tracking_uri).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["rows_train"] == 48 and run.data.metrics["rows_test"] == 6
    assert run.data.tags["output.uri"] == cfg.output()
    assert run.data.tags["output.content_hash"] == summary["content_hash"]
    logged = json.dumps(run.data.params) + json.dumps(run.data.tags)
    for note in storage.read_dataset(cfg.output())["note"].to_pylist():
        assert note not in logged


@pytest.mark.s3
def test_cohort_on_s3_reads_back_with_ray_data(s3_bucket: str, tmp_path: Path) -> None:
    import ray

    uri = f"{s3_bucket}/cohorts/tissue"
    cfg = make_cfg(tmp_path, task="tissue_type", output_uri=uri, sizes={"n_samples": 57})
    synth.run(cfg)
    manifest = storage.read_manifest(uri)
    assert manifest is not None and manifest.num_rows == 57
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False)
    try:
        ds = ray.data.read_parquet(manifest.files)
        assert ds.count() == 57
        assert ds.schema().names == SAMPLES_SCHEMA.names
        row = ds.take(1)[0]
    finally:
        if started:
            ray.shutdown()
    assert row["image_uri"].startswith(f"{uri}/images/")
    assert decode_rgb(storage.read_bytes(row["image_uri"]), ImageLimits()).shape == (32, 32, 3)


def test_s3_cohort_keeps_its_images_through_a_failed_and_a_real_overwrite(
        s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    uri = f"{s3_bucket}/cohorts/kept"
    cfg = make_cfg(tmp_path, task="tissue_type", output_uri=uri, sizes={"n_samples": 30})
    synth.run(cfg)
    first = storage.read_dataset(uri)["image_uri"].to_pylist()
    assert image_files(uri) == set(first) and all(u.startswith(f"{uri}/images/") for u in first)
    again = overwriting(cfg, seed=9)
    calls = fail_after(monkeypatch, 25)
    with pytest.raises(MintError, match="boom"):
        synth.run(again)
    assert image_files(uri) == set(first)
    monkeypatch.undo()
    synth.run(again)
    second = storage.read_dataset(uri)["image_uri"].to_pylist()
    assert calls["n"] == 26 and image_files(uri) == set(first) | set(second)
    assert all(decode_rgb(storage.read_bytes(u), ImageLimits()).shape == (32, 32, 3) for u in first)
