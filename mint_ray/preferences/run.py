"""Build preference pairs from a cohort with a teacher (stage 3).

``mint-ray preferences --task rare_disease --cohort s3://b/cohorts/rd --teacher s3://b/teachers/rd --out s3://b/prefs/rd``

Ray Data streams the cohort through the five operators of :mod:`mint_ray.preferences.operators`
(read, prepare, score, pairs, write); nothing holds the whole cohort.

Output layout (decided here; the trainer reads ``output_uri`` as a dataset):

- ``<output_uri>/``            the preference dataset: ``_manifest.json`` + ``v-*/part-*.parquet``.
                               Its manifest meta holds the task, the teacher
                               ``{name, version, kind, uri}``, k/q and every option, the
                               counts, the cohort's hash and the quarantine version.
- ``<output_uri>/quarantine/`` the set-aside rows (``sample_id``, ``split``, ``label``,
                               ``image_uri``, ``stage``, ``reason``, ``detail``, and
                               ``source_file``/``source_row``: where the row sits in the
                               cohort), its own dataset. Old versions are deleted only
                               among ``v-*`` folders beside a manifest, so the nested
                               dataset survives the outer one's, and the two go together.

Publishing (:func:`publish_outputs`) makes the two one step: the quarantine's manifest,
then the pairs' (the publish point, whose meta names the quarantine version), and only
when both are in place are older versions of either deleted. If the pairs' manifest
cannot be written, the quarantine's previous manifest is put back; a failure at any point
leaves either the previous pairs and quarantine, or the new ones, whole and naming each
other. Version folders no manifest names are removed (now, or by the next run's
clean-up). A re-run with ``--overwrite`` replaces both, never appends.

Accounting: every cohort row ends as exactly one of a paired case, a quarantined row
(bad input or a teacher failure) or a filtered case (left out by an option). The run
checks ``rows_in == cases_paired + quarantined + filtered`` before publishing.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ray.data import ActorPoolStrategy

from mint_ray import storage
from mint_ray.config import RayConfig
from mint_ray.errors import ConfigError, MintError, StorageError
from mint_ray.preferences import validate
from mint_ray.preferences.accounting import check_accounting, speed, teacher_identity
from mint_ray.preferences.config import PAIRS_CPUS, READ_CPUS, Config
from mint_ray.preferences.fetch import ImageSource
from mint_ray.preferences.operators import TeacherScorer, pair_rows, prepare, read_cohort
from mint_ray.preferences.plan import (
    PairPlan,
    TeacherInfo,
    configured_task,
    describe_teacher,
    pair_rule,
    validation_rules,
)
from mint_ray.preferences.schemas import INPUT_FIELDS, pair_schema, row_bytes, union_schema
from mint_ray.preferences.sink import PreferenceSink
from mint_ray.teachers.loader import load_preprocessor
from mint_ray.teachers.protocol import Preprocessor

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"

CLI_FLAGS = {
    "task": "task", "cohort": "cohort_uri", "teacher": "teacher.uri", "out": "output_uri",
    "actors": "teacher.num_actors", "batch-size": "teacher.batch_size",
    "gpus-per-actor": "teacher.num_gpus_per_actor", "k": "pairs.k", "q": "pairs.q",
    "pairs-per-case": "pairs.pairs_per_case", "min-margin": "pairs.min_margin",
    "force-truth": "pairs.force_truth", "overwrite": "storage.overwrite", "image-root": "image_root",
    "tracking": "tracking.enabled",
}


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


def block_target(cfg: Config, inputs: Preprocessor) -> int:
    """Ray Data's block size target for the run: ``block_bytes``, or one teacher batch of
    prepared inputs where that is more (prepare yields whole batches; a bigger block would
    be cut, then merged again for the actor)."""
    return max(cfg.block_bytes, row_bytes(inputs.prepare([])) * cfg.teacher.batch_size)


def build_dataset(cfg: Config, rules: validate.Rules, source: ImageSource, teacher: TeacherInfo,
                  inputs: Preprocessor, plan: PairPlan) -> Dataset:
    import ray

    t = cfg.teacher
    threads = None if t.num_gpus_per_actor else max(1, int(t.num_cpus_per_actor))
    ds = ray.data.from_items([{"uri": cfg.cohort_uri}])
    # Ray Data merges a task's outputs up to its own target (128 MiB): blocks of large
    # inputs would reach the pool as a few huge work units, one actor busy and the other
    # idle, and crowd the object store. This dataset's context only, not the process's.
    ds.context.target_max_block_size = block_target(cfg, inputs)
    ds = ds.map_batches(read_cohort, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                        fn_kwargs={"chunk_rows": cfg.block_rows})
    # Blocks of block_rows (Ray Data would otherwise merge the reader's chunks into one
    # big block), so decode tasks, and then the actors, get many inputs to share.
    ds = ds.repartition(target_num_rows_per_block=cfg.block_rows)
    ds = ds.map_batches(prepare, batch_size=cfg.block_rows, batch_format="pyarrow",
                        num_cpus=cfg.decode_num_cpus,
                        fn_kwargs={"rules": rules, "source": source, "inputs": inputs, "io_threads": cfg.io_threads,
                                   "batch_rows": t.batch_size, "block_bytes": cfg.block_bytes})
    ds = ds.map_batches(TeacherScorer, batch_size=t.batch_size, batch_format="pyarrow",
                        compute=ActorPoolStrategy(size=t.num_actors),
                        num_cpus=t.num_cpus_per_actor, num_gpus=t.num_gpus_per_actor,
                        fn_constructor_kwargs={"info": teacher, "device": t.device, "threads": threads})
    return ds.map_batches(pair_rows, batch_size=None, batch_format="pyarrow", num_cpus=PAIRS_CPUS,
                          fn_kwargs={"plan": plan})


def publish_outputs(output_uri: str, pairs_version: str, quarantine_uri: str, quarantine_version: str,
                    quarantine_meta: dict[str, Any],
                    pairs_meta: Callable[[storage.Manifest], dict[str, Any]]) -> tuple[storage.Manifest,
                                                                                       storage.Manifest]:
    """Publish the quarantine and the pairs as one: both manifests, then the clean-up.

    The quarantine's manifest goes first (the pairs' meta names its version), then the
    pairs' (the publish point). Should the pairs' fail, the quarantine's previous manifest
    is put back, so the published pairs and quarantine still name each other; older
    versions of either are deleted only once both manifests are in place, and a failure
    there leaves the new outputs published (the next run deletes what is left)."""
    previous = storage.read_manifest(quarantine_uri)
    try:
        quarantine = storage.publish(quarantine_uri, quarantine_version, meta=quarantine_meta)
        manifest = storage.publish(output_uri, pairs_version, meta=pairs_meta(quarantine))
    except BaseException:
        # Unless the pairs did get published (a lost answer to a write that was done), put
        # back the quarantine the published pairs name.
        if _names(output_uri, pairs_version) is not True and _names(quarantine_uri, quarantine_version) is not False:
            storage.restore_manifest(quarantine_uri, previous)
        raise
    for uri, keep in ((quarantine_uri, quarantine.version), (output_uri, manifest.version)):
        try:
            storage.remove_older(uri, keep)
        except StorageError as err:
            log.warning("published %s; its older versions stay until the next run (%s)", uri, err)
    return manifest, quarantine


def _names(uri: str, version_uri: str) -> bool | None:
    """Whether the manifest at ``uri`` names ``version_uri`` (None: it cannot be read)."""
    try:
        manifest = storage.read_manifest(uri)
    except (StorageError, ValueError, TypeError):
        return None
    return manifest is not None and manifest.version == version_uri.rstrip("/").rsplit("/", 1)[-1]


def _abort_unless_named(uri: str, version_uri: str) -> None:
    """Remove an unpublished version folder, never one a manifest may name."""
    if _names(uri, version_uri) is False:
        try:
            storage.abort(version_uri)
        except StorageError as err:
            log.warning("could not remove the unpublished %s (the next run will): %s", version_uri, err)


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
    # The teacher's CPU side, for the prepare tasks: spec and processor files, no weights.
    inputs = load_preprocessor(teacher.uri)
    rules = validation_rules(cfg, task, teacher, inputs)
    source = ImageSource.for_cohort(cfg.cohort_uri, cfg.image_root, cfg.limits.image_read_timeout_s)
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
        try:
            init_ray(ray_config(cfg))
            check_cluster(cfg)
            sink = PreferenceSink(pairs_version, quarantine_version, pairs, cfg.rows_per_file)
            log.info("preferences %s: %d rows from %s, teacher %s (%s) on %d actor(s)", task.name,
                     cohort.num_rows, cfg.cohort_uri, teacher.name, teacher.kind, cfg.teacher.num_actors)
            started = time.time()
            dataset = build_dataset(cfg, rules, source, teacher, inputs, plan)
            dataset.write_datasink(sink, ray_remote_args={"num_cpus": PAIRS_CPUS})
            totals = sink.totals
            rates = speed(cohort.num_rows, started, time.time(), totals, cfg.teacher.batch_size)
            identity = teacher_identity(teacher, totals)
            counts = check_accounting(cohort.num_rows, totals)
            manifest, quarantine = publish_outputs(
                output_uri, pairs_version, quarantine_uri, quarantine_version,
                {"task": task.name, "pairs_uri": output_uri, **counts},
                lambda q: {"task": task.name, "teacher": identity, **options, "counts": counts,
                           "cohort": {"uri": cfg.cohort_uri, "content_hash": cohort.content_hash},
                           "quarantine": {"uri": quarantine_uri, "version": q.version, "num_rows": q.num_rows,
                                          "content_hash": q.content_hash}})
        except BaseException:
            for uri, version in ((output_uri, pairs_version), (quarantine_uri, quarantine_version)):
                _abort_unless_named(uri, version)
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
