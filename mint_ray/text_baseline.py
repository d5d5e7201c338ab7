"""The text-only ceiling and the knowledge-available check (issue 21, SCIENCE.md check A).

MINT can only pass on what the teacher knows beyond the note. Before any student
trains, a plain linear classifier on the note alone is fitted on the labelled cases
(L) and scored beside the teacher on the cases only the teacher labels (U): the
teacher's top-1 minus the text-only top-1 is the knowledge available to transfer.
When it is absent no objective can show transfer, and the teacher stage says so.

Pure functions: notes and labels in, arrays and verdicts out; no files, no Ray.
Features are TF-IDF word unigrams and bigrams (an HPO term is one or two words), the
model a multinomial logistic regression (lbfgs: deterministic for the same inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

# Inverse regularisation: the best of 1 / 10 / 100 on a 60-disease cohort with 20
# labelled notes a disease (U top-1 0.672 / 0.686 / 0.687), and 10 fits in half the time.
DEFAULT_C = 10.0


@dataclass(frozen=True)
class TextClassifier:
    """A fitted note -> label classifier over a fixed label space."""

    vectorizer: TfidfVectorizer
    model: LogisticRegression
    labels: tuple[str, ...]
    # Column of each of the model's classes in ``labels``.
    columns: np.ndarray

    def probabilities(self, notes: Sequence[str | None]) -> np.ndarray:
        """``[len(notes), len(labels)]`` probabilities; labels never seen in training get 0."""
        out = np.zeros((len(notes), len(self.labels)), dtype=np.float64)
        if len(notes):
            # One BLAS thread: on a few shared cores more threads spin and slow a small fit.
            with threadpool_limits(1):
                out[:, self.columns] = self.model.predict_proba(
                    self.vectorizer.transform([note or "" for note in notes]))
        return out


def fit_text_classifier(notes: Sequence[str | None], labels: Sequence[str],
                        label_space: Sequence[str], c: float = DEFAULT_C) -> TextClassifier:
    """Fit on ``notes`` with their ``labels`` (each one of ``label_space``)."""
    space = tuple(label_space)
    index = {label: i for i, label in enumerate(space)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise ValueError(f"labels outside the label space: {unknown[:5]}")
    if len(set(labels)) < 2:
        raise ValueError("a text classifier needs notes of at least 2 labels")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    features = vectorizer.fit_transform([note or "" for note in notes])
    with threadpool_limits(1):
        model = LogisticRegression(C=c, max_iter=2000).fit(features, list(labels))
    columns = np.array([index[str(label)] for label in model.classes_], dtype=np.int64)
    return TextClassifier(vectorizer, model, space, columns)


def ranked_labels(scores: np.ndarray, labels: Sequence[str], k: int | None = None) -> list[list[str]]:
    """Each row's ``k`` most likely labels (all: None), most likely first; ties keep the
    label order."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[labels[int(j)] for j in row] for row in order]


@dataclass(frozen=True)
class KnowledgeVerdict:
    """The teacher's top-1 on U against the text-only ceiling's, and whether the margin holds."""

    teacher_top1: float
    text_top1: float
    min_margin: float

    @property
    def margin(self) -> float:
        """The knowledge available to transfer: what the teacher gets right beyond the note."""
        return self.teacher_top1 - self.text_top1

    @property
    def passed(self) -> bool:
        return self.margin >= self.min_margin

    def message(self, split: str) -> str:
        head = (f"knowledge available to transfer on {split}: teacher top-1 {self.teacher_top1:.3f} "
                f"- text-only top-1 {self.text_top1:.3f} = {self.margin:+.3f} "
                f"(min_margin {self.min_margin:.3f})")
        if self.passed:
            return head
        return (head + ": the teacher knows no more than the note, so no student objective can "
                "show transfer. Make the image carry its signal (a more salient rendering: "
                "rare_disease.face_salience, a larger fusion.image_size, more epochs) or leave "
                "the text less decisive (rare_disease.shared_terms_only), or lower "
                "knowledge_check.min_margin / set knowledge_check.on_fail=warn to go on anyway")


def knowledge_verdict(teacher_top1: float, text_top1: float, min_margin: float) -> KnowledgeVerdict:
    return KnowledgeVerdict(float(teacher_top1), float(text_top1), float(min_margin))
