"""The text-only ceiling and the knowledge-available check, without Ray.

The classifier is fitted on a generated cohort's notes; the verdict and the stage's
decision (``teachers.knowledge.knowledge_summary``) get hand-made numbers on both sides of
the margin. The stage run itself is tested in test_teachers.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mint_ray import storage
from mint_ray.config import build_config
from mint_ray.data import synth
from mint_ray.errors import MintError
from mint_ray.teachers.config import Config
from mint_ray.teachers.knowledge import knowledge_metrics, knowledge_summary
from mint_ray.teachers.protocol import top_k_accuracy
from mint_ray.text_baseline import fit_text_classifier, knowledge_verdict, ranked_labels


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    root = tmp_path_factory.mktemp("cohort")
    cfg = build_config(synth.Config, {
        "task": "rare_disease", "seed": 0, "storage": {"root": str(root)},
        "tracking": {"enabled": False},
        "sizes": {"n_diseases": 20, "per_split": {"train": 400, "validation": 40, "test": 200}},
    })
    synth.run(cfg)
    return storage.read_dataset(cfg.output())


def _split(table: pa.Table, name: str) -> tuple[list[str], list[str]]:
    rows = table.filter(pa.compute.equal(table["split"], name))
    return rows["note"].to_pylist(), rows["label"].to_pylist()


def test_text_classifier_beats_chance_and_is_deterministic(cohort: pa.Table) -> None:
    space = sorted(set(cohort["label"].to_pylist()))
    notes, labels = _split(cohort, "train")
    test_notes, test_labels = _split(cohort, "test")
    truth = np.array([space.index(label) for label in test_labels])
    first = fit_text_classifier(notes, labels, space).probabilities(test_notes)
    second = fit_text_classifier(notes, labels, space).probabilities(test_notes)
    np.testing.assert_array_equal(first, second)
    assert first.shape == (200, 20)
    np.testing.assert_allclose(first.sum(axis=1), 1.0)
    # Chance is 0.05. The note names the look-alike group but, for half the patients, not
    # which of its 4 diseases: well above chance, well below perfect.
    top1 = top_k_accuracy(first, truth, 1)
    assert 0.3 < top1 < 0.95, top1
    assert top_k_accuracy(first, truth, 4) > top1 + 0.1


def test_unseen_labels_rank_last_and_strangers_are_refused() -> None:
    notes = ["seizures hypotonia", "seizures", "cleft palate", "palate cleft short"]
    model = fit_text_classifier(notes, ["A", "A", "B", "B"], ["B", "Z", "A"])
    probs = model.probabilities(["seizures", None])
    assert probs.shape == (2, 3) and (probs[:, 1] == 0).all()
    assert ranked_labels(probs, ["B", "Z", "A"])[0] == ["A", "B", "Z"]
    assert ranked_labels(probs, ["B", "Z", "A"], 2)[0] == ["A", "B"]
    with pytest.raises(ValueError, match="outside the label space"):
        fit_text_classifier(notes, ["A", "A", "B", "C"], ["A", "B"])
    with pytest.raises(ValueError, match="at least 2 labels"):
        fit_text_classifier(notes, ["A"] * 4, ["A", "B"])


def test_verdict_passes_at_the_margin_and_names_the_numbers_below_it() -> None:
    held = knowledge_verdict(0.80, 0.70, 0.05)
    assert held.passed and held.margin == pytest.approx(0.10)
    assert knowledge_verdict(0.75, 0.70, 0.05).passed  # exactly the margin
    short = knowledge_verdict(0.72, 0.70, 0.05)
    assert not short.passed and short.margin == pytest.approx(0.02)
    message = short.message("validation")
    for text in ("0.720", "0.700", "+0.020", "0.050", "face_salience", "on_fail=warn"):
        assert text in message, message


def _config(on_fail: str, enabled: bool = True) -> Config:
    return build_config(Config, {"task": "rare_disease", "kind": "fusion",
                                 "knowledge_check": {"min_margin": 0.05, "on_fail": on_fail,
                                                     "enabled": enabled}})


TEACHER = {"validation": {"top1": 0.72, "topk": 0.95, "note_top1": 0.6, "image_top1": 0.3},
           "test": {"top1": 0.7, "topk": 0.94}}
TEXT = {"validation": {"top1": 0.70, "topk": 0.93}, "test": {"top1": 0.71, "topk": 0.92}}


def test_stage_refuses_a_teacher_without_knowledge_or_warns() -> None:
    with pytest.raises(MintError, match=r"teacher top-1 0\.720 - text-only top-1 0\.700.*Nothing was saved"):
        knowledge_summary(_config("error"), TEACHER, TEXT)
    warned = knowledge_summary(_config("warn"), TEACHER, TEXT)
    assert warned["passed"] is False and warned["margin"] == pytest.approx(0.02)
    strong = {**TEACHER, "validation": {**TEACHER["validation"], "top1": 0.9}}
    passed = knowledge_summary(_config("error"), strong, TEXT)
    assert passed["passed"] is True and passed["margin"] == pytest.approx(0.2)
    flat = knowledge_metrics(passed)
    assert flat["knowledge_margin"] == pytest.approx(0.2)
    assert flat["teacher_image_top1_validation"] == 0.3 and flat["text_top1_test"] == 0.71
    # No notes (an image-only task) or the check turned off: nothing to compare, no error.
    assert knowledge_summary(_config("error"), TEACHER, None)["skipped"] == "no notes in the train split"
    assert knowledge_summary(_config("error", enabled=False), TEACHER, None)["skipped"] == "disabled"
    assert "knowledge_margin" not in knowledge_metrics(knowledge_summary(_config("error"), TEACHER, None))


def test_scarce_recipes_set_up_the_check() -> None:
    from mint_ray.config import load_config

    recipes = Path(__file__).resolve().parents[1] / "jobs" / "recipes"
    teacher = load_config(Config, recipes / "teacher_rare_disease_scarce.yaml")
    assert teacher.knowledge_check.on_fail == "error" and teacher.fusion.text_layers == 0
    cohort = load_config(synth.Config, recipes / "synth_rare_disease_scarce.yaml")
    assert cohort.sizes.split_counts() == [1200, 3000, 400] and cohort.sizes.n_diseases >= 50
    assert cohort.rare_disease.face_salience > 1
