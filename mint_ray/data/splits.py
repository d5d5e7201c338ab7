"""Stratified train/validation/test assignment: pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")


def split_totals(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items by ``fractions`` into integers summing to ``n`` (largest remainder)."""
    total = float(sum(fractions))
    quotas = [n * f / total for f in fractions]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_assign(labels: Sequence[Hashable], totals: Sequence[int],
                      rng: np.random.Generator) -> list[int]:
    """The split index of each item, with exactly ``totals[s]`` items in split ``s``.

    Each label is spread over the splits in the overall proportions: every
    label first gets the floor of its quota per split, then the leftover items
    go, label by label in random order, to the split where that label is
    furthest below its quota among splits that still have room. Which items of
    a label land where is random.
    """
    n = len(labels)
    if sum(totals) != n:
        raise ValueError(f"split totals {list(totals)} do not add up to {n} items")
    groups: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    keys = list(groups)
    fractions = np.asarray(totals, dtype=float) / max(n, 1)
    quotas = np.array([[len(groups[k]) * f for f in fractions] for k in keys]).reshape(
        len(keys), len(totals))
    counts = np.floor(quotas).astype(int)
    room = np.asarray(totals) - counts.sum(axis=0)
    for row in rng.permutation(len(keys)):
        for _ in range(len(groups[keys[row]]) - counts[row].sum()):
            deficit = np.where(room > 0, quotas[row] - counts[row], -np.inf)
            split = int(np.argmax(deficit))
            counts[row, split] += 1
            room[split] -= 1
    assignment = [0] * n
    for row, key in enumerate(keys):
        members = rng.permutation(groups[key])
        start = 0
        for split, count in enumerate(counts[row]):
            for i in members[start:start + count]:
                assignment[int(i)] = split
            start += count
    return assignment


def balanced_labels(n: int, n_labels: int, rng: np.random.Generator) -> list[int]:
    """``n`` label indices as even as possible over ``n_labels``, in random order."""
    return [int(x) for x in rng.permutation(np.arange(n) % n_labels)]
