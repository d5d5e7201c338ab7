"""Generate a synthetic cohort (``samples`` table + images) for a task, deterministic by seed.

``mint-ray data synth --task rare_disease --out s3://bucket/cohorts/rd``

Labels are spread evenly over the cases and each label is split over
train/validation/test in the configured proportions. Every case has its own
random stream (seed, case index), so a case does not change when others are
added, and the same seed gives the same notes, labels, splits and image bytes.
The table is published by ``storage.commit`` only when everything is written.

Images go to ``<out>/images/<sha256>.png``, named by their content and kept outside the
version folders: a commit deletes older versions, and preference sets or evaluations
built from an older version still point at its images. A re-run with the same seed
finds its images already there and uploads nothing; a failed run removes the images it
added. Overwriting with other content leaves the older images in place, for the tables
that use them: delete ``<out>/images`` with the cohort once nothing refers to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from mint_ray import console, storage, tracking
from mint_ray.config import StorageConfig, StrictModel, TrackingConfig
from mint_ray.data import SAMPLES_SCHEMA, Generator, images, splits
from mint_ray.data.rare_disease import NoteStyle, RareDiseaseOptions
from mint_ray.errors import ConfigError
from mint_ray.tasks import TaskName

log = logging.getLogger(__name__)

CLI_FLAGS = {
    "task": "task",
    "out": "output_uri",
    "overwrite": "storage.overwrite",
    "root": "storage.root",
    "seed": "seed",
    "n-samples": "sizes.n_samples",
    "n-diseases": "sizes.n_diseases",
    "image-size": "image_size",
    "note-style": "note_style",
    "tracking": "tracking.enabled",
}

# Independent random streams derived from the seed: which labels (diseases),
# which label and split each case gets, and each case's own content. Separate
# streams keep the picked diseases independent of the cohort size, and a case
# independent of the cases before it.
STREAM_LABELS = 1
STREAM_LAYOUT = 2
STREAM_CASES = 3
# Image uploads in flight: S3 PUTs are latency-bound, so a few threads overlap them.
IO_THREADS = 8
MAX_PENDING = 256
IMAGES_DIR = "images"


class SplitFractions(StrictModel):
    """Shares of the cohort per split; they must add up to 1."""

    train: float = Field(0.8, gt=0)
    validation: float = Field(0.1, gt=0)
    test: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must add up to 1 (got {total:g})")
        return self


class SplitCounts(StrictModel):
    """Exact number of cases per split."""

    train: int = Field(gt=0)
    validation: int = Field(gt=0)
    test: int = Field(gt=0)


class Sizes(StrictModel):
    """How many cases: ``n_samples`` split by ``fractions``, or exact ``per_split`` counts."""

    n_samples: int = Field(2000, gt=0)
    fractions: SplitFractions = SplitFractions()
    per_split: SplitCounts | None = None
    n_diseases: int = Field(40, gt=0, description="rare_disease: labels in the cohort")
    min_phenotypes: int = Field(
        10, gt=0, description="rare_disease: annotated phenotypes a disease needs to be picked")

    @model_validator(mode="after")
    def _one_way_to_size(self) -> Sizes:
        if (self.per_split is not None and "n_samples" in self.model_fields_set
                and self.n_samples != sum(self.split_counts())):
            raise ValueError("set either n_samples (with fractions) or per_split, not both")
        return self

    def split_counts(self) -> list[int]:
        """Cases per split, in ``splits.SPLITS`` order."""
        if self.per_split is not None:
            return [self.per_split.train, self.per_split.validation, self.per_split.test]
        f = self.fractions
        return splits.split_totals(self.n_samples, [f.train, f.validation, f.test])


class Config(StrictModel):
    """``mint-ray data synth``: which task, how many cases, where to write them."""

    task: TaskName = "rare_disease"
    output_uri: str | None = Field(None, description="default: <storage.root>/cohorts/<task>")
    sizes: Sizes = Sizes()
    image_size: int = Field(64, ge=16, le=1024)
    note_style: NoteStyle = "gestalt"
    seed: int = Field(0, ge=0)
    rare_disease: RareDiseaseOptions = RareDiseaseOptions()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()

    def output(self) -> str:
        """The output URI; local paths are made absolute, since ``image_uri`` values
        must resolve from any working directory (Ray workers, other stages)."""
        uri = self.output_uri or storage.join(self.storage.root, "cohorts", self.task)
        return uri if storage.is_s3(uri) else storage.filesystem(uri)[1]


def make_generator(cfg: Config) -> Generator:
    """The task's case generator (imports only what that task needs)."""
    if cfg.task == "rare_disease":
        from mint_ray import hpo
        from mint_ray.data.rare_disease import RareDiseaseGenerator

        return RareDiseaseGenerator(hpo.load(), cfg.sizes.n_diseases, cfg.sizes.min_phenotypes,
                                    cfg.rare_disease, cfg.image_size, cfg.note_style,
                                    np.random.default_rng([cfg.seed, STREAM_LABELS]))
    from mint_ray.data.tissue_type import TissueTypeGenerator

    return TissueTypeGenerator(cfg.image_size)


class _Clock:
    """One log line per phase with the time since the stage started: the intermediate
    phases at DEBUG (``--verbose``), the commit at INFO."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def phase(self, what: str, level: int = logging.DEBUG) -> None:
        log.log(level, "data synth %s: %s (%.1fs)", self.task, what, self.elapsed)


def plan_cases(n_labels: int, totals: list[int], seed: int) -> tuple[list[int], list[str]]:
    """Each case's label index and split name: balanced labels, stratified splits."""
    n = sum(totals)
    if n < n_labels:
        raise ConfigError(f"{n} cases cannot cover {n_labels} labels: raise sizes.n_samples "
                          "(or sizes.per_split) or lower sizes.n_diseases")
    rng = np.random.default_rng([seed, STREAM_LAYOUT])
    labels = splits.balanced_labels(n, n_labels, rng)
    assigned = splits.stratified_assign(labels, totals, rng)
    return labels, [splits.SPLITS[s] for s in assigned]


def sample_ids(task: str, n: int) -> list[str]:
    width = max(6, len(str(n - 1)))
    return [f"{task}-{i:0{width}d}" for i in range(n)]


class ImageFolder:
    """The cohort's content-addressed images: what was there before this run, and what it added."""

    def __init__(self, uri: str) -> None:
        self.folder = storage.join(uri, IMAGES_DIR)
        self._present = set(storage.list_files(self.folder))
        self._added: list[str] = []
        self._lock = threading.Lock()

    def put(self, pixels: np.ndarray) -> str:
        """Encode and upload one image unless the same bytes are there; returns its URI.
        Runs on the upload threads."""
        data = images.encode_png(pixels)
        uri = storage.join(self.folder, f"{hashlib.sha256(data).hexdigest()}.png")
        with self._lock:
            if uri in self._present:
                return uri
            self._present.add(uri)
            self._added.append(uri)  # before the upload: a failed run removes partial files too
        storage.write_bytes(uri, data)
        return uri

    def remove_added(self) -> None:
        for uri in self._added:
            storage.delete_file(uri)


def write_cases(cfg: Config, generator: Generator, folder: ImageFolder, clock: _Clock,
                labels: list[int], split_names: list[str]) -> list[dict[str, Any]]:
    """Render every case and upload its image; returns the table rows in case order."""
    n = len(labels)
    rows: list[dict[str, Any]] = []
    progress = console.Progress(f"data synth {cfg.task}: rendered", n, logger=log, every_n=max(1, n // 4))
    pending: deque[tuple[dict[str, Any], Future[str]]] = deque()
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        for i, (sample_id, label, split) in enumerate(
                zip(sample_ids(cfg.task, n), labels, split_names, strict=True)):
            case = generator.case(label, np.random.default_rng([cfg.seed, STREAM_CASES, i]))
            rows.append({"sample_id": sample_id, "task": cfg.task, "split": split,
                         "note": case.note, "image_uri": None, "label": case.label.name,
                         "meta": json.dumps(case.meta, sort_keys=True, separators=(",", ":"))})
            pending.append((rows[-1], pool.submit(folder.put, case.image)))
            while len(pending) > MAX_PENDING:
                row, upload = pending.popleft()
                row["image_uri"] = upload.result()
            progress.update(1)
        for row, upload in pending:
            row["image_uri"] = upload.result()
    progress.close()
    return rows


def _generate(cfg: Config, uri: str, version: str, folder: ImageFolder,
              clock: _Clock) -> tuple[storage.Manifest, dict[str, int]]:
    """Pick labels, plan, render and upload, write the table, publish."""
    generator = make_generator(cfg)
    catalog = generator.catalog
    clock.phase(f"picked {len(catalog)} labels")
    totals = cfg.sizes.split_counts()
    labels, split_names = plan_cases(len(catalog), totals, cfg.seed)
    counts = dict(zip(splits.SPLITS, totals, strict=True))
    clock.phase(f"planned {sum(totals)} cases {counts}")
    rows = write_cases(cfg, generator, folder, clock, labels, split_names)
    storage.write_table(version, pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA))
    clock.phase("wrote the samples table")
    meta = {"task": cfg.task, "seed": cfg.seed, "image_size": cfg.image_size,
            "note_style": cfg.note_style if cfg.task == "rare_disease" else None,
            "split_counts": counts, "labels": [label.to_dict() for label in catalog],
            **generator.describe()}
    manifest = storage.commit(uri, version, meta=meta)
    clock.phase(f"committed {uri} ({manifest.num_rows} rows)", logging.INFO)
    return manifest, counts


def run(cfg: Config) -> dict[str, Any]:
    """Write the cohort to ``cfg.output()``; nothing is published unless all of it is written."""
    clock = _Clock(cfg.task)
    uri = cfg.output()
    version = storage.prepare_output(uri, cfg.storage.overwrite)
    clock.phase(f"writing to {uri}")
    with tracking.stage_run(cfg.tracking, "data.synth", cfg, cfg.storage.root,
                            tags={"mint.task": cfg.task}) as tracked:
        folder = ImageFolder(uri)
        try:
            manifest, counts = _generate(cfg, uri, version, folder, clock)
        except BaseException:
            storage.abort(version)
            folder.remove_added()
            raise
        tracked.log_metrics({"rows": manifest.num_rows, "seconds": clock.elapsed,
                             **{f"rows_{split}": count for split, count in counts.items()}})
        tracked.set_lineage("output", uri, manifest)
    return {"task": cfg.task, "output_uri": uri, "version": manifest.version,
            "rows": manifest.num_rows, "splits": counts, "labels": len(manifest.meta["labels"]),
            "content_hash": manifest.content_hash, "seconds": round(clock.elapsed, 2),
            "mlflow_run_id": tracked.run_id}
