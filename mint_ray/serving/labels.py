"""Label names -> ids, and the ranked labels of an answer.

The ids come from a label catalog: the configured dataset's, the tissue slugs,
or the catalog of the cohort the model was trained from (its lineage).
"""

from __future__ import annotations

import logging
from difflib import SequenceMatcher
from typing import Any

from mint_ray import storage
from mint_ray.errors import MintError
from mint_ray.metrics import THRESHOLD, normalise, synonyms
from mint_ray.serving.schemas import RankedLabel
from mint_ray.tasks import TISSUE_TYPE, TISSUE_TYPES, Task

# Serve routes the "ray.serve" logger into the replica's log file.
log = logging.getLogger("ray.serve")


class LabelIds:
    """Label name -> id, for the names a student writes: exact after normalising
    (as the metrics do), else the closest catalog name at the metrics' fuzzy threshold."""

    def __init__(self, catalog: dict[str, str]) -> None:
        self._exact: dict[str, str] = {}
        self._names: list[tuple[str, str]] = []
        for name, label_id in catalog.items():
            for syn in synonyms(name):
                self._exact.setdefault(syn, label_id)
                self._names.append((syn, label_id))

    def __len__(self) -> int:
        return len(self._exact)

    def lookup(self, item: str) -> str | None:
        wanted = normalise(item)
        if not wanted:
            return None
        if wanted in self._exact:
            return self._exact[wanted]
        best, best_id = THRESHOLD, None
        matcher = SequenceMatcher()
        matcher.set_seq2(wanted)  # SequenceMatcher caches what it learns about seq2
        for name, label_id in self._names:
            matcher.set_seq1(name)
            # The cheap upper bounds first, as difflib.get_close_matches does.
            if matcher.real_quick_ratio() >= best and matcher.quick_ratio() >= best:
                ratio = matcher.ratio()
                if ratio >= best:
                    best, best_id = ratio, label_id
        return best_id


def ranked_labels(task: Task, generation: str, top_k: int, ids: LabelIds) -> tuple[list[RankedLabel], bool]:
    """The first ``top_k`` items of the answer, read with the task's one parser."""
    parsed = task.parse_answer(generation)
    labels = [RankedLabel(rank=i, label=item, id=ids.lookup(item))
              for i, item in enumerate(parsed.items[:top_k], start=1)]
    return labels, parsed.parseable


def read_catalog(uri: str) -> dict[str, str]:
    """``{name: id}`` from a dataset manifest's ``label_catalog`` (or synth's ``labels``)."""
    manifest = storage.read_manifest(uri)
    if manifest is None:
        raise MintError(f"label catalog {uri!r}: no dataset manifest there")
    catalog = manifest.meta.get("label_catalog") or manifest.meta.get("labels") or []
    return {str(item["name"]): str(item["id"]) for item in catalog
            if isinstance(item, dict) and item.get("name") and item.get("id")}


def label_catalog(task: Task, metadata: dict[str, Any], catalog_uri: str | None) -> dict[str, str]:
    """The ids the server can report: the configured catalog, the tissue slugs, or the
    catalog of the cohort the model was trained from (empty when that is unreadable)."""
    if catalog_uri:
        return read_catalog(catalog_uri)
    if task.name == TISSUE_TYPE.name:
        from mint_ray.tasks.tissue_type import tissue_id

        return {name: tissue_id(name) for name in TISSUE_TYPES}
    if not metadata.get("data_uri"):
        return {}
    try:
        prefs = storage.read_manifest(metadata["data_uri"])
        cohort = (prefs.meta.get("cohort") or {}).get("uri") if prefs else None
        return read_catalog(cohort) if cohort else {}
    except Exception as err:  # ids are best effort: answers are served without them
        log.warning("no label ids for %s: %s", task.name, storage.redact(str(err).splitlines()[0]))
        return {}
