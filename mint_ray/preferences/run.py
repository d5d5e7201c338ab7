"""Build preference pairs from a cohort with a teacher (stage 3).

``mint-ray preferences --task rare_disease --cohort s3://b/cohorts/rd --teacher s3://b/teachers/rd --out s3://b/prefs/rd``

Ray Data streams the cohort through five operators; nothing holds the whole cohort:

1. ``read``     one task streams the ``samples`` table (``storage.iter_batches``) and
                coerces every chunk to the contract's types: a column of the wrong
                type becomes nulls plus a ``wrong_type`` mark, so files with drifting
                schemas never fail the run. One reader sees every ``sample_id``, so it
                also marks repeats (``duplicate_id``).
2. ``prepare``  CPU tasks check each row (``validate.check_row``), fetch its image
                (``io_threads`` threads: S3 GETs are latency-bound) and decode it
                (``validate.decode_checked``) into raw RGB bytes for the teacher.
3. ``score``    the teacher in an actor pool (``ActorPoolStrategy(size=num_actors)``,
                ``num_gpus_per_actor`` each; CPU threads when none) scores every label.
4. ``pairs``    CPU tasks rank, cut pairs (``pairs.build_pairs``) and write the texts
                with the task's own ``prompt_messages`` / ``answer_message``.
5. ``write``    :class:`PreferenceSink` writes pair rows and set-aside rows into two
                version folders and sends counts back to the driver.

Output layout (decided here; the trainer reads ``output_uri`` as a dataset):

- ``<output_uri>/``            the preference dataset: ``_manifest.json`` + ``v-*/part-*.parquet``.
                               Its manifest meta holds the task, the teacher
                               ``{name, version, kind, uri}``, k/q and every option, the
                               counts, the cohort's hash and the quarantine version.
- ``<output_uri>/quarantine/`` the set-aside rows (``sample_id``, ``split``, ``label``,
                               ``image_uri``, ``stage``, ``reason``, ``detail``), its own
                               dataset. ``storage.commit`` deletes only ``v-*`` folders
                               beside a manifest, so the nested dataset survives commits of
                               the outer one, and the two live and go together.

Commit order: quarantine first, then the pairs (the publish point, whose meta names the
quarantine version). A failure before that aborts both version folders, so the previous
output stays complete; a re-run with ``--overwrite`` replaces both, never appends.

Accounting: every cohort row ends as exactly one of a paired case, a quarantined row
(bad input or a teacher failure) or a filtered case (left out by an option). The run
checks ``rows_in == cases_paired + quarantined + filtered`` before publishing.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from ray.data import ActorPoolStrategy

from mint_ray import storage
from mint_ray.config import RayConfig
from mint_ray.errors import ConfigError, MintError, StorageError
from mint_ray.preferences import validate
from mint_ray.preferences.accounting import check_accounting, speed, teacher_identity
from mint_ray.preferences.config import PAIRS_CPUS, READ_CPUS, Config
from mint_ray.preferences.pairs import build_pairs, rank
from mint_ray.preferences.plan import (
    PairPlan,
    TeacherInfo,
    configured_task,
    describe_teacher,
    pair_rule,
    validation_rules,
)
from mint_ray.preferences.schemas import (
    INPUT_FIELDS,
    PREPARED_SCHEMA,
    SCORED_SCHEMA,
    TEXT,
    coerce_chunk,
    image_views,
    pair_schema,
    pixel_column,
    union_schema,
)
from mint_ray.preferences.sink import PreferenceSink

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"

CLI_FLAGS = {
    "task": "task", "cohort": "cohort_uri", "teacher": "teacher.uri", "out": "output_uri",
    "actors": "teacher.num_actors", "batch-size": "teacher.batch_size",
    "gpus-per-actor": "teacher.num_gpus_per_actor", "k": "pairs.k", "q": "pairs.q",
    "pairs-per-case": "pairs.pairs_per_case", "min-margin": "pairs.min_margin",
    "force-truth": "pairs.force_truth", "overwrite": "storage.overwrite",
    "tracking": "tracking.enabled",
}


# ---------------------------------------------------------------- 1. read


def read_cohort(items: pa.Table, chunk_rows: int) -> Iterator[pa.Table]:
    """Stream the cohort at each item's ``uri`` as coerced chunks (a generator UDF)."""
    for uri in items.column("uri").to_pylist():
        seen: set[str] = set()
        for batch in storage.iter_batches(uri, batch_size=chunk_rows):
            table, type_errors = coerce_chunk(batch)
            duplicate = []
            for sid in table.column("sample_id").to_pylist():
                duplicate.append(sid in seen)
                if sid:
                    seen.add(sid)
            yield table.append_column("type_error", pa.array(type_errors, TEXT)).append_column(
                "duplicate", pa.array(duplicate, pa.bool_()))


# ---------------------------------------------------------------- 2. prepare


def fetch_image(uri: str, rules: validate.Rules) -> tuple[bytes | None, validate.Verdict | None]:
    """Read one image's bytes; a missing or oversized file is a verdict, a store failure an error."""
    try:
        fs, path = storage.filesystem(uri)
    except StorageError as err:  # a scheme no store serves: this row's problem, not the run's
        return None, validate.Verdict("missing_image", str(err))
    try:
        with fs.open_input_file(path) as f:
            too_large = validate.check_image_size(f.size(), rules)
            if too_large:
                return None, too_large
            return f.read(), None
    except FileNotFoundError:
        return None, validate.Verdict("missing_image", "no file at image_uri")
    except IsADirectoryError:
        return None, validate.Verdict("missing_image", "image_uri is a folder")


@functools.lru_cache(maxsize=1)
def _io_pool(threads: int) -> ThreadPoolExecutor:
    """One fetch pool per worker process, kept across its tasks."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mint-fetch")


def _prepare_rows(batch: pa.Table, rules: validate.Rules, io_threads: int) -> pa.Table:
    rows = batch.to_pylist()
    verdicts: list[validate.Verdict | None] = [validate.check_row(row, rules) for row in rows]
    wanted = [i for i, (row, v) in enumerate(zip(rows, verdicts, strict=True))
              if v is None and row["image_uri"]]
    images: list[np.ndarray | None] = [None] * len(rows)
    # Threads only fetch (S3 GETs wait on the network, without the GIL), one slice of rows
    # each; decoding holds the GIL, so it runs here: spread over the threads it cost 3x the
    # CPU in lock contention.
    def fetch_slice(indices: list[int]) -> list[tuple[bytes | None, validate.Verdict | None]]:
        return [fetch_image(rows[j]["image_uri"], rules) for j in indices]

    step = max(1, math.ceil(len(wanted) / io_threads))
    slices = [wanted[i:i + step] for i in range(0, len(wanted), step)]
    fetched = [result for part in _io_pool(io_threads).map(fetch_slice, slices) for result in part]
    for i, (data, verdict) in zip(wanted, fetched, strict=True):
        images[i], verdicts[i] = validate.decode_checked(data, rules) if data is not None else (None, verdict)
    return pa.table({
        **{name: batch.column(name) for name in ("sample_id", "split", "note", "image_uri", "label")},
        "pixels": pixel_column(images),
        "height": pa.array([None if im is None else im.shape[0] for im in images], pa.int32()),
        "width": pa.array([None if im is None else im.shape[1] for im in images], pa.int32()),
        **{name: pa.array([getattr(v, name) if v else None for v in verdicts], TEXT)
           for name in ("stage", "reason", "detail")},
    }, schema=PREPARED_SCHEMA)


def prepare(batch: pa.Table, rules: validate.Rules, io_threads: int, batch_rows: int,
            block_bytes: int) -> Iterator[pa.Table]:
    """Check rows, fetch and decode images (threads overlap the fetches), a teacher batch at a
    time. Yields blocks of whole teacher batches that hold about ``block_bytes`` of pixels:
    large images make small blocks, so they never crowd the object store."""
    pending: list[pa.Table] = []
    size = 0
    for start in range(0, batch.num_rows, batch_rows):
        part = _prepare_rows(batch.slice(start, batch_rows), rules, io_threads)
        pending.append(part)
        size += part.column("pixels").nbytes
        if size >= block_bytes:
            yield pa.concat_tables(pending)
            pending, size = [], 0
    if pending:
        yield pa.concat_tables(pending)


# ---------------------------------------------------------------- 3. score


class TeacherScorer:
    """A Ray Data actor: loads the teacher once, scores the usable rows of each batch."""

    def __init__(self, info: TeacherInfo, device: str, threads: int | None) -> None:
        from mint_ray.teachers.loader import load_teacher

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.teacher = load_teacher(info.uri, device, labels=info.load_labels,
                                    prompt_template=info.prompt_template, task=info.task)
        if tuple(self.teacher.labels) != info.labels:
            raise MintError(f"teacher {info.uri} loaded with labels different from its spec: "
                            "re-save the teacher")

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mint_ray.teachers.protocol import Case

        n, n_labels = batch.num_rows, len(self.teacher.labels)
        usable = np.flatnonzero(np.asarray(batch.column("reason").is_null()))
        notes = batch.column("note").to_pylist()
        images = image_views(batch.column("pixels"), batch.column("height").to_pylist(),
                             batch.column("width").to_pylist())
        cases = [Case(note=notes[i], image=images[i]) for i in usable]
        values = np.zeros((n, n_labels), np.float32)
        scored = np.zeros(n, bool)
        verdicts = {name: batch.column(name).to_pylist() for name in ("stage", "reason", "detail")}
        for i, (row_scores, error) in zip(usable, self._score(cases), strict=True):
            if error is None:
                values[i], scored[i] = row_scores, True
            else:
                verdicts["stage"][i], verdicts["reason"][i], verdicts["detail"][i] = "teacher", "teacher_error", error
        scores = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), n_labels, mask=pa.array(~scored))
        return pa.table({
            **{name: batch.column(name) for name in ("sample_id", "split", "note", "image_uri", "label")},
            **{name: pa.array(v, TEXT) for name, v in verdicts.items()},
            "scores": scores.cast(pa.list_(pa.float32())),
            "teacher_name": pa.repeat(self.teacher.name, n), "teacher_version": pa.repeat(self.teacher.version, n),
            "scored_at": pa.repeat(time.time(), n),
        }, schema=SCORED_SCHEMA)

    def _score(self, cases: list[Any]) -> list[tuple[np.ndarray | None, str | None]]:
        """Scores per case, or the error of a case that fails alone.

        A failing batch is retried case by case so one bad row costs only itself; if
        every case fails alone too, the teacher is broken and the error is raised.
        """
        if not cases:
            return []
        try:
            return self._rows(self.teacher.score(cases), len(cases))
        except Exception as batch_error:
            results: list[tuple[np.ndarray | None, str | None]] = []
            for case in cases:
                try:
                    results.extend(self._rows(self.teacher.score([case]), 1))
                except Exception as err:
                    results.append((None, f"{type(err).__name__}: {str(err)[:200]}"))
            if all(error for _, error in results):
                raise batch_error
            return results

    def _rows(self, scores: np.ndarray, n: int) -> list[tuple[np.ndarray | None, str | None]]:
        values = np.asarray(scores, dtype=np.float32)
        if values.shape != (n, len(self.teacher.labels)):
            raise ValueError(f"teacher returned scores of shape {values.shape}, "
                             f"expected {(n, len(self.teacher.labels))}")
        finite = np.isfinite(values).all(axis=1)
        return [(row, None) if ok else (None, "non-finite scores") for row, ok in zip(values, finite, strict=True)]


# ---------------------------------------------------------------- 4. pairs


def pair_rows(batch: pa.Table, plan: PairPlan) -> pa.Table:
    """Scored rows -> pair rows (TRL conversational) and set-aside rows, one stream."""
    rows: list[dict[str, Any]] = []
    for r in batch.to_pylist():
        if r["reason"] is not None:
            rows.append(_set_aside(r, r["stage"], r["reason"], r["detail"]))
            continue
        ranking = rank(r["scores"], plan.labels)
        kept, dropped = build_pairs(ranking, r["label"], plan.rule)
        if not kept:
            best = max(p.margin for p in dropped)
            rows.append({**_set_aside(r, "filter", "low_margin",
                                      f"best margin {best:.4g} < min_margin {plan.rule.min_margin:g}"),
                         "dropped_pairs": len(dropped)})
            continue
        prompt = plan.prompt(r["note"])
        common = {
            "sample_id": r["sample_id"], "split": r["split"], "label": r["label"],
            "image_uri": r["image_uri"], "prompt": prompt,
            "teacher_ranking": ranking.labels, "teacher_scores": ranking.scores,
            "teacher_top": ranking.top(plan.rule.k), "teacher_bottom": ranking.bottom(plan.rule.q),
            "truth_rank": ranking.rank_of(r["label"]), "teacher_name": r["teacher_name"],
            "teacher_version": r["teacher_version"], "kind": "pair", "scored_at": r["scored_at"],
        }
        for n, pair in enumerate(kept):
            rows.append({**common, "pair_index": pair.pair_index,
                         "chosen": plan.task.answer_message(pair.chosen),
                         "rejected": plan.task.answer_message(pair.rejected),
                         "truth_forced": pair.truth_forced, "margin": pair.margin,
                         "case_paired": n == 0, "dropped_pairs": len(dropped) if n == 0 else 0})
    return pa.Table.from_pylist(rows, schema=plan.union_schema)


def _set_aside(row: dict[str, Any], stage: str, reason: str, detail: str | None) -> dict[str, Any]:
    return {"sample_id": row["sample_id"], "split": row["split"], "label": row["label"],
            "image_uri": row["image_uri"], "stage": stage, "reason": reason, "detail": detail,
            "kind": "set_aside", "dropped_pairs": 0, "scored_at": row["scored_at"]}


# ---------------------------------------------------------------- the run


def cpus_needed(cfg: Config) -> float:
    """Logical CPUs for the actor pool plus one task of every other operator."""
    t = cfg.teacher
    return t.num_actors * t.num_cpus_per_actor + READ_CPUS + cfg.decode_num_cpus + PAIRS_CPUS


def ray_config(cfg: Config) -> RayConfig:
    """An in-process cluster gets enough logical CPUs that the actors cannot starve the
    other operators (the actor-pool stall on small machines); a named one is used as is."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return cfg.ray
    t = cfg.teacher
    needed = math.ceil(cpus_needed(cfg))
    if cfg.ray.num_cpus is not None and cfg.ray.num_cpus < needed:
        raise ConfigError(f"ray.num_cpus={cfg.ray.num_cpus} leaves no CPU beside {t.num_actors} teacher "
                          f"actor(s) x {t.num_cpus_per_actor:g} CPU: the pipeline would stall; set "
                          f"ray.num_cpus>={needed} (logical CPUs may exceed cores) or fewer actors")
    return cfg.ray.model_copy(update={"num_cpus": cfg.ray.num_cpus or max(os.cpu_count() or 1, needed)})


def check_cluster(cfg: Config) -> None:
    """Fail fast when the attached cluster can never host the actor pool."""
    import ray

    t = cfg.teacher
    have = ray.cluster_resources()
    if have.get("CPU", 0) < cpus_needed(cfg):
        raise MintError(f"the Ray cluster has {have.get('CPU', 0):g} CPUs: {t.num_actors} actor(s) x "
                        f"{t.num_cpus_per_actor:g} CPU leave too few for reading, decoding and writing "
                        f"(needs {cpus_needed(cfg):g}), so the pipeline would stall; lower "
                        "teacher.num_cpus_per_actor or teacher.num_actors")
    gpus = t.num_actors * t.num_gpus_per_actor
    if gpus and have.get("GPU", 0) < gpus:
        log.warning("the cluster shows %g GPUs, the teacher pool needs %g: actors wait until the "
                    "autoscaler adds GPU nodes", have.get("GPU", 0), gpus)


def build_dataset(cfg: Config, rules: validate.Rules, teacher: TeacherInfo, plan: PairPlan) -> Dataset:
    import ray

    t = cfg.teacher
    threads = None if t.num_gpus_per_actor else max(1, int(t.num_cpus_per_actor))
    ds = ray.data.from_items([{"uri": cfg.cohort_uri}])
    # Ray Data merges a task's outputs up to its own target (128 MiB): blocks of large
    # images would reach the pool as a few huge work units, one actor busy and the other
    # idle, and crowd the object store. This dataset's context only, not the process's.
    ds.context.target_max_block_size = cfg.block_bytes
    ds = ds.map_batches(read_cohort, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                        fn_kwargs={"chunk_rows": cfg.block_rows})
    # Blocks of block_rows (Ray Data would otherwise merge the reader's chunks into one
    # big block), so decode tasks, and then the actors, get many inputs to share.
    ds = ds.repartition(target_num_rows_per_block=cfg.block_rows)
    ds = ds.map_batches(prepare, batch_size=cfg.block_rows, batch_format="pyarrow",
                        num_cpus=cfg.decode_num_cpus,
                        fn_kwargs={"rules": rules, "io_threads": cfg.io_threads, "batch_rows": t.batch_size,
                                   "block_bytes": cfg.block_bytes})
    ds = ds.map_batches(TeacherScorer, batch_size=t.batch_size, batch_format="pyarrow",
                        compute=ActorPoolStrategy(size=t.num_actors),
                        num_cpus=t.num_cpus_per_actor, num_gpus=t.num_gpus_per_actor,
                        fn_constructor_kwargs={"info": teacher, "device": t.device, "threads": threads})
    return ds.map_batches(pair_rows, batch_size=None, batch_format="pyarrow", num_cpus=PAIRS_CPUS,
                          fn_kwargs={"plan": plan})


def check_cohort(uri: str) -> storage.Manifest:
    manifest = storage.require_manifest(uri)
    if manifest.num_rows == 0:
        raise MintError(f"cohort {uri} has no rows: nothing to build pairs from")
    names = storage.read_dataset_schema(uri).names
    missing = [name for name in INPUT_FIELDS if name not in names]
    if missing:
        raise MintError(f"cohort {uri} lacks column(s) {', '.join(missing)}: it must follow the samples "
                        "contract (write it with `mint-ray data synth`)")
    return manifest


def run(cfg: Config) -> dict[str, Any]:
    """Build and publish the preference dataset; returns a JSON-able summary."""
    from mint_ray.ray_cluster import init_ray
    from mint_ray.tracking import stage_run

    task = configured_task(cfg)
    cohort = check_cohort(cfg.cohort_uri)
    teacher = describe_teacher(cfg, task, cohort.meta)
    rule = pair_rule(cfg, task, len(teacher.labels))
    rules = validation_rules(cfg, task, teacher)
    pairs = pair_schema(task)
    plan = PairPlan(task, teacher.labels, rule, pairs, union_schema(pairs))
    output_uri = cfg.output()
    quarantine_uri = storage.join(output_uri, QUARANTINE_DIR)
    pairs_version = storage.prepare_output(output_uri, cfg.storage.overwrite)
    # The quarantine belongs to the output: replacing the output replaces it.
    quarantine_version = storage.prepare_output(quarantine_uri, overwrite=True)
    options = {"k": rule.k, "q": rule.q, "pairs_per_case": rule.pairs_per_case,
               "min_margin": rule.min_margin, "force_truth": rule.force_truth, "splits": cfg.splits,
               "system_prompt": task.system_prompt, "instruction": task.instruction,
               # Students record this with their weights, so serving prompts as training did.
               "prompt": task.prompt_record(rule.k, list(teacher.labels) if task.modality == "image" else None)}

    with stage_run(cfg.tracking, "preferences", cfg, cfg.storage.root, run_name=f"preferences-{task.name}",
                   tags={"mint.task": task.name, "teacher.uri": teacher.uri,
                         "teacher.kind": teacher.kind}) as tracked:
        tracked.set_lineage("cohort", cfg.cohort_uri, cohort)
        published: list[str] = []
        try:
            init_ray(ray_config(cfg))
            check_cluster(cfg)
            sink = PreferenceSink(pairs_version, quarantine_version, pairs, cfg.rows_per_file)
            log.info("preferences %s: %d rows from %s, teacher %s (%s) on %d actor(s)", task.name,
                     cohort.num_rows, cfg.cohort_uri, teacher.name, teacher.kind, cfg.teacher.num_actors)
            started = time.time()
            build_dataset(cfg, rules, teacher, plan).write_datasink(sink, ray_remote_args={"num_cpus": PAIRS_CPUS})
            totals = sink.totals
            rates = speed(cohort.num_rows, started, time.time(), totals, cfg.teacher.batch_size)
            identity = teacher_identity(teacher, totals)
            counts = check_accounting(cohort.num_rows, totals)
            quarantine = storage.commit(quarantine_uri, quarantine_version,
                                        meta={"task": task.name, "pairs_uri": output_uri, **counts})
            published.append(quarantine_version)
            manifest = storage.commit(output_uri, pairs_version, meta={
                "task": task.name, "teacher": identity, **options, "counts": counts,
                "cohort": {"uri": cfg.cohort_uri, "content_hash": cohort.content_hash},
                "quarantine": {"uri": quarantine_uri, "version": quarantine.version,
                               "num_rows": quarantine.num_rows, "content_hash": quarantine.content_hash}})
        except BaseException:
            for version in (pairs_version, quarantine_version):
                if version not in published:
                    storage.abort(version)
            raise
        tracked.set_tags({"teacher.name": identity["name"], "teacher.version": identity["version"]})
        tracked.set_lineage("output", output_uri, manifest)
        tracked.set_lineage("quarantine", quarantine_uri, quarantine)
        tracked.log_metrics({"rows_in": cohort.num_rows, "pairs": totals.pairs,
                             "cases_paired": totals.cases_paired, "quarantined": counts["quarantined_total"],
                             "filtered": counts["filtered_total"], "pairs_dropped_low_margin": totals.dropped_pairs,
                             **rates, **{f"quarantine.{r}": n for r, n in totals.quarantined.items()},
                             **{f"filtered.{r}": n for r, n in totals.filtered.items()}})
        summary = {
            "task": task.name, "output_uri": output_uri, "version": manifest.version,
            "content_hash": manifest.content_hash, "quarantine_uri": quarantine_uri,
            "quarantine_version": quarantine.version, "teacher": identity, "options": options,
            **counts, **{k: round(v, 2) for k, v in rates.items()}, "mlflow_run_id": tracked.run_id,
        }
        tracked.log_dict({k: v for k, v in summary.items() if k != "options"}, "preferences_summary.json")
    log.info("preferences %s: %s", task.name, counts["accounting"])
    return summary
