"""The cohort a teacher trains on: its checks before any training (pure), and each
worker's shard of a split, decoded."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mint_ray import storage
from mint_ray.errors import MintError
from mint_ray.images import ImageLimits, ImageRejected, decode_rgb
from mint_ray.teachers.config import Config
from mint_ray.teachers.protocol import Case

COLUMNS = ("sample_id", "task", "split", "note", "image_uri", "label")


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
