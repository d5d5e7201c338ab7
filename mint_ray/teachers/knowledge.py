"""The knowledge-available check (issue 21, SCIENCE.md check A): what the teacher knows
beyond the note.

Before training, the driver fits a text-only ceiling (:mod:`mint_ray.text_baseline`, a
linear classifier on the note) on the train split (L) and scores it on the held-out
split (U) and the test split (T). At the end rank 0 scores the teacher on U with both
inputs, the note only and the image only, and on T; the teacher's top-1 on U minus the
text-only top-1 on U is the knowledge available to transfer. Below ``min_margin`` the
stage fails before saving (``on_fail: error``) or warns. The text-only ceiling's
rankings are saved in the teacher folder (``TEXT_CEILING_FILE``) for a comparison arm.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mint_ray.errors import MintError
from mint_ray.teachers.cohort import read_cases, select_rows
from mint_ray.teachers.config import Config
from mint_ray.teachers.protocol import Case, score_all, top_k_accuracy
from mint_ray.text_baseline import fit_text_classifier, knowledge_verdict, ranked_labels

# The text-only ceiling's answers, in the teacher folder: one row per scored case, its k most
# likely labels (k = top_k, the task's answer count: what a comparison arm would answer; the
# full ranking of a 500-label cohort would be 50x larger for nothing the metrics read).
TEXT_CEILING_FILE = "text_ceiling.parquet"
TEXT_CEILING_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),      # the ground truth
    pa.field("ranked_labels", pa.list_(pa.string()), nullable=False),  # the top k, most likely first
    pa.field("probabilities", pa.list_(pa.float32()), nullable=False),  # aligned with ranked_labels
])


@dataclass(frozen=True)
class TextCeiling:
    """The text-only classifier's accuracy per scored split and its rankings (Parquet bytes)."""

    accuracy: dict[str, dict[str, float]]
    predictions: bytes


def scored_splits(cfg: Config) -> list[str]:
    """The held-out split (U) and the test split (T), once each."""
    return list(dict.fromkeys([cfg.eval_split, "test"]))


def text_ceiling(rows: dict[str, list[Any]], cfg: Config, labels: tuple[str, ...],
                 k: int) -> TextCeiling | None:
    """Fit the note-only classifier on the train split and score the held-out and test
    splits; None when the train split has no notes (an image-only task)."""
    train, _ = select_rows(rows, cfg.task, "train", labels, need_image=False)
    train = [i for i in train if rows["note"][i] and rows["note"][i].strip()]
    if len({rows["label"][i] for i in train}) < 2:
        return None
    model = fit_text_classifier([rows["note"][i] for i in train], [rows["label"][i] for i in train],
                                labels, c=cfg.knowledge_check.text_c)
    index = {label: i for i, label in enumerate(labels)}
    accuracy: dict[str, dict[str, float]] = {}
    out: dict[str, list[Any]] = {name: [] for name in TEXT_CEILING_SCHEMA.names}
    for split in scored_splits(cfg):
        keep, _ = select_rows(rows, cfg.task, split, labels, need_image=cfg.kind == "clip")
        if not keep:
            continue
        probs = model.probabilities([rows["note"][i] for i in keep])
        truth = np.array([index[rows["label"][i]] for i in keep])
        accuracy[split] = {"top1": top_k_accuracy(probs, truth, 1),
                           "topk": top_k_accuracy(probs, truth, k)}
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out["sample_id"] += [rows["sample_id"][i] for i in keep]
        out["split"] += [split] * len(keep)
        out["label"] += [rows["label"][i] for i in keep]
        out["ranked_labels"] += ranked_labels(probs, labels, k)
        out["probabilities"] += np.take_along_axis(probs, order, axis=1).astype(np.float32).tolist()
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(out, schema=TEXT_CEILING_SCHEMA), buffer)
    return TextCeiling(accuracy, buffer.getvalue())


def final_scores(teacher: Any, cfg: Config, labels: tuple[str, ...], held: list[Case],
                 held_truth: np.ndarray, k: int) -> dict[str, dict[str, float]]:
    """The trained teacher's top-1/top-k per scored split; on the held-out split also with
    the note only and the image only (fusion), which says where its knowledge comes from."""
    need_image = cfg.kind == "clip"
    out: dict[str, dict[str, float]] = {}
    for split in scored_splits(cfg):
        cases, truth = ((held, held_truth) if split == cfg.eval_split else
                        read_cases(cfg.cohort(), cfg.task, split, labels, need_image))
        if not cases:
            continue
        scores = score_all(teacher, cases)
        out[split] = {"top1": top_k_accuracy(scores, truth, 1), "topk": top_k_accuracy(scores, truth, k)}
        if split == cfg.eval_split and cfg.kind == "fusion":
            for only, kept in (("note_top1", [Case(note=c.note, image=None) for c in cases]),
                               ("image_top1", [Case(note=None, image=c.image) for c in cases])):
                out[split][only] = top_k_accuracy(score_all(teacher, kept), truth, 1)
    return out


def knowledge_summary(cfg: Config, teacher_scores: dict[str, dict[str, float]],
                      text: dict[str, dict[str, float]] | None) -> dict[str, Any]:
    """What the teacher knows beyond the note, for the spec, the result and MLflow; raises
    (``on_fail: error``) when the margin is absent."""
    check = cfg.knowledge_check
    summary: dict[str, Any] = {"split": cfg.eval_split, "teacher": teacher_scores, "text_only": text,
                               "min_margin": check.min_margin, "on_fail": check.on_fail}
    if text is None or cfg.eval_split not in text:
        return {**summary, "margin": None, "passed": None,
                "skipped": "disabled" if not check.enabled else "no notes in the train split"}
    verdict = knowledge_verdict(teacher_scores[cfg.eval_split]["top1"], text[cfg.eval_split]["top1"],
                                check.min_margin)
    if not verdict.passed and check.on_fail == "error":
        raise MintError(f"{verdict.message(cfg.eval_split)}. Nothing was saved.")
    return {**summary, "margin": verdict.margin, "passed": verdict.passed,
            "message": verdict.message(cfg.eval_split), "text_ceiling_file": TEXT_CEILING_FILE}


def knowledge_metrics(knowledge: dict[str, Any]) -> dict[str, float]:
    """The check's numbers as flat MLflow metrics: ``knowledge_margin``,
    ``teacher_top1_validation``, ``teacher_image_top1_validation``, ``text_top1_test``, ..."""
    flat = {"knowledge_margin": knowledge["margin"]} if knowledge["margin"] is not None else {}
    for who, per_split in (("teacher", knowledge["teacher"]), ("text", knowledge["text_only"] or {})):
        for split, values in per_split.items():
            flat.update({f"{who}_{name}_{split}": value for name, value in values.items()})
    return flat
