"""Pure pieces of the preference stage: pairing rules, answer format, row validation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mint_ray.preferences.pairs import PairRule, build_pairs, rank
from mint_ray.preferences.validate import Rules, Verdict, check_row, decode_checked
from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPE, TISSUE_TYPES

LABELS = [f"D{i}" for i in range(12)]
# D0 best ... D11 worst, except D5 and D6 tie (the label order breaks the tie).
SCORES = np.array([12, 11, 10, 9, 8, 6, 6, 5, 4, 3, 2, 1], dtype=np.float32)


def test_rank_is_descending_and_ties_keep_label_order() -> None:
    shuffled = [7, 2, 11, 0, 6, 9, 1, 5, 3, 10, 4, 8]
    ranking = rank(SCORES[shuffled], [LABELS[i] for i in shuffled])
    assert ranking.labels[:5] == ["D0", "D1", "D2", "D3", "D4"]
    assert ranking.labels[5:7] == ["D6", "D5"]  # tie: D6 comes first in the shuffled label order
    assert ranking.scores == sorted(ranking.scores, reverse=True)
    assert ranking.rank_of("D11") == 12 and ranking.rank_of("nope") is None and ranking.rank_of(None) is None


def test_default_pair_is_top_k_against_bottom_q() -> None:
    kept, dropped = build_pairs(rank(SCORES, LABELS), "D1", PairRule(k=3, q=4))
    assert dropped == [] and len(kept) == 1
    pair = kept[0]
    assert pair.chosen == ["D0", "D1", "D2"]
    assert pair.rejected == ["D8", "D9", "D10", "D11"]  # teacher order, most likely first
    assert pair.margin == pytest.approx(10 - 4) and not pair.truth_forced


def test_several_pairs_take_disjoint_slices_from_the_bottom() -> None:
    kept, _ = build_pairs(rank(SCORES, LABELS), None, PairRule(k=3, q=3, pairs_per_case=3))
    assert [p.pair_index for p in kept] == [0, 1, 2]
    assert [p.rejected for p in kept] == [["D9", "D10", "D11"], ["D6", "D7", "D8"], ["D3", "D4", "D5"]]
    assert all(p.chosen == ["D0", "D1", "D2"] for p in kept)
    assert [p.margin for p in kept] == pytest.approx([10 - 3, 10 - 6, 10 - 9])
    with pytest.raises(ValueError, match="need 13 distinct labels but the teacher scores 12"):
        PairRule(k=4, q=3, pairs_per_case=3).check(12)


def test_min_margin_drops_only_the_close_pairs() -> None:
    rule = PairRule(k=3, q=3, pairs_per_case=3, min_margin=4.0)
    kept, dropped = build_pairs(rank(SCORES, LABELS), None, rule)
    assert [p.pair_index for p in kept] == [0, 1] and [p.pair_index for p in dropped] == [2]
    _, all_dropped = build_pairs(rank(SCORES, LABELS), None, PairRule(k=3, q=3, min_margin=100))
    assert len(all_dropped) == 1


def test_force_truth_replaces_the_last_chosen_and_leaves_rejected() -> None:
    ranking = rank(SCORES, LABELS)
    rule = PairRule(k=3, q=3, pairs_per_case=2, force_truth=True)
    kept, _ = build_pairs(ranking, "D10", rule)
    assert kept[0].chosen == ["D0", "D1", "D10"] and kept[0].truth_forced
    # The truth left the ranking's tail, so the bottom slices move up by one.
    assert kept[0].rejected == ["D8", "D9", "D11"] and kept[1].rejected == ["D5", "D6", "D7"]
    assert kept[0].margin == pytest.approx(10 - 4)  # the teacher's margin, not the forced label's
    hit, _ = build_pairs(ranking, "D1", rule)  # truth already chosen: nothing changes
    assert hit[0].chosen == ["D0", "D1", "D2"] and not hit[0].truth_forced
    unknown, _ = build_pairs(ranking, None, rule)
    assert unknown[0].chosen == ["D0", "D1", "D2"] and not unknown[0].truth_forced
    without, _ = build_pairs(ranking, "D10", PairRule(k=3, q=3))
    assert without[0].chosen == ["D0", "D1", "D2"] and "D10" in without[0].rejected


@pytest.mark.parametrize(("task", "labels"), [
    (RARE_DISEASE, ["Wilson's disease", "Marfan syndrome", "Noonan syndrome 1", "Fragile X syndrome"]),
    (TISSUE_TYPE, list(TISSUE_TYPES[:5])),
])
def test_answer_text_is_the_papers_format_and_parses_back(task, labels) -> None:
    kept, _ = build_pairs(rank(np.arange(len(labels) * 2, 0, -1), [*labels, *"ABCDEFGHIJ"[:len(labels)]]),
                          None, PairRule(k=len(labels), q=2))
    text = task.answer_message(kept[0].chosen)[0]["content"]
    text = text if isinstance(text, str) else text[0]["text"]
    lines = text.splitlines()
    assert lines[0] == task.header
    quote = "'" if task.quote_items else ""
    assert lines[1:] == [f"{i}. {quote}{label}{quote}" for i, label in enumerate(labels, 1)]
    parsed = task.parse_answer(text)
    assert parsed.header_found and parsed.items == labels


# ---------------------------------------------------------------- validation

RULES = Rules(task="rare_disease", labels=frozenset(LABELS), splits=frozenset({"train", "test"}),
              needs_note=True, needs_image=False, max_image_bytes=20_000, max_image_pixels=64 * 64)
GOOD = {"sample_id": "s1", "task": "rare_disease", "split": "train", "note": "Seizures",
        "image_uri": None, "label": "D3", "type_error": None, "duplicate": False}


@pytest.mark.parametrize(("change", "reason"), [
    ({}, None),
    ({"label": None}, None),  # the truth may be unknown
    ({"type_error": "label: int64"}, "wrong_type"),
    ({"note": 7}, "wrong_type"),
    ({"sample_id": ""}, "wrong_type"),
    ({"duplicate": True}, "duplicate_id"),
    ({"task": "tissue_type"}, "wrong_task"),
    ({"split": "dev"}, "unknown_split"),
    ({"split": "validation"}, "split_not_selected"),
    ({"label": "D99"}, "unknown_label"),
    ({"note": "   "}, "empty_note"),
    ({"note": None}, "empty_note"),
])
def test_check_row_gives_one_reason(change, reason) -> None:
    verdict = check_row({**GOOD, **change}, RULES)
    assert (verdict.reason if verdict else None) == reason
    if reason == "split_not_selected":
        assert verdict.stage == "filter"


def test_image_is_required_only_when_the_task_or_teacher_needs_it() -> None:
    needs = Rules(**{**RULES.__dict__, "needs_image": True})
    assert check_row(GOOD, needs) == Verdict("missing_image", "no image_uri")
    assert check_row(GOOD, RULES) is None


def _png(size: tuple[int, int], noise: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8) if noise else \
        np.full((size[1], size[0], 3), 128, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_checked_reasons() -> None:
    good = _png((32, 24), noise=True)
    image, verdict = decode_checked(good, RULES)
    assert verdict is None and image.shape == (24, 32, 3) and image.dtype == np.uint8
    grey = io.BytesIO()
    Image.new("L", (8, 8), 50).save(grey, format="PNG")
    assert decode_checked(grey.getvalue(), RULES)[0].shape == (8, 8, 3)  # converted to RGB
    cases = {
        "corrupt_image": b"\x89PNG not really",
        "truncated_image": good[: len(good) // 2],
        "too_many_pixels": _png((100, 100)),  # small file, too many pixels: refused from the header
    }
    for reason, data in cases.items():
        image, verdict = decode_checked(data, RULES)
        assert image is None and verdict.reason == reason, (reason, verdict)
    # Only the trailer missing: PIL alone would decode it.
    assert decode_checked(good[:-5], RULES)[1].reason == "truncated_image"
    jpeg = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(jpeg, format="JPEG")
    assert decode_checked(jpeg.getvalue()[:-30], RULES)[1].reason == "truncated_image"
