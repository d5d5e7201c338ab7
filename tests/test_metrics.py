"""The paper's metrics on hand-computed cases.

Ratios are worked out by hand as 2*M / (len(a) + len(b)), M the matched
characters of the normalised names.
"""

import numpy as np
import pytest

from mint_ray.errors import MintError
from mint_ray.metrics import (
    CaseScore,
    aggregate,
    bootstrap_ci,
    car,
    coverage_avoidance,
    first_match_rank,
    is_match,
    k_values,
    mcnemar_exact,
    normalise,
    paired_difference,
    score_case,
    similarity,
    summarise_arm,
    synonyms,
)
from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPE

TOP = ["Lung", "Breast", "Kidney", "Liver", "Thyroid"]
BOTTOM = ["Skin", "Testis", "Uterus", "Bladder", "Cervix"]


def tissue_answer(*names: str) -> str:
    return "MOST_LIKELY_TISSUE:\n" + "\n".join(f"{i}. {n}" for i, n in enumerate(names, 1))


def disease_answer(*names: str) -> str:
    return "POTENTIAL_DISEASES:\n" + "\n".join(f"{i}. '{n}'" for i, n in enumerate(names, 1))


# ---- names and matching ------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("Marfan Syndrome", "marfan syndrome"),
    ("  Wilson's   disease. ", "wilsons disease"),
    ("Head & Neck", "head neck"),
    ("Ehlers-Danlos syndrome, type IV", "ehlersdanlos syndrome type iv"),
    ("**Noonan_syndrome**", "noonansyndrome"),
    ("", ""),
])
def test_normalise(raw, expected):
    assert normalise(raw) == expected


def test_synonyms_split_on_semicolons_and_drop_empties():
    assert synonyms("Trisomy 21; Down Syndrome;") == ["trisomy 21", "down syndrome"]


@pytest.mark.parametrize("pred, truth, ratio", [
    ("Marfan syndrome", "Marfan syndrome", 1.0),
    ("MARFAN SYNDROME.", "Marfan syndrome", 1.0),
    ("Marfan syndrom", "Marfan syndrome", 28 / 29),       # 14 of 14+15 characters
    ("Wilson's disease", "Wilson disease", 28 / 29),      # "wilsons disease" vs "wilson disease"
    ("Head and Neck", "Head & Neck", 18 / 22),            # "head " + "neck" match: 9 of 13+9
    ("Noonan syndrome", "Marfan syndrome", 22 / 30),      # only "an syndrome" (11) matches
    ("abcdf", "abcde", 0.8),                              # exactly at the threshold
    ("abce", "abcd", 0.75),
])
def test_similarity_and_threshold(pred, truth, ratio):
    assert similarity(pred, truth) == pytest.approx(ratio)
    assert is_match(pred, truth) == (ratio >= 0.8)


def test_match_any_synonym():
    assert is_match("Down syndrome", "Trisomy 21; Down syndrome")
    assert is_match("trisomy 21", "Trisomy 21; Down syndrome")
    assert not is_match("Edwards syndrome", "Trisomy 21; Down syndrome")


def test_empty_names_never_match():
    assert not is_match("", "Marfan syndrome")
    assert not is_match("...", "Marfan syndrome")
    assert not is_match("Marfan syndrome", " ; ")


def test_threshold_is_a_parameter():
    assert is_match("Noonan syndrome", "Marfan syndrome", threshold=0.7)
    assert not is_match("Marfan syndrom", "Marfan syndrome", threshold=0.99)


def test_known_limit_of_the_authors_metric():
    # "type 1" vs "type 2": 14 of 15+15 characters match (0.93), so they count as
    # the same disease. Kept on purpose: it is how the paper scores.
    assert is_match("Type 1 diabetes", "Type 2 diabetes")


def test_first_match_rank():
    items = ["Noonan syndrome", "Marfan syndrom", "Loeys-Dietz syndrome", "Marfan syndrome"]
    assert first_match_rank(items, "Marfan syndrome") == 2
    assert first_match_rank(items, "Loeys Dietz syndrome") == 3
    assert first_match_rank(items, "Alport syndrome") is None
    assert first_match_rank([], "Marfan syndrome") is None


# ---- one case ----------------------------------------------------------------
def test_score_case_rank_is_cut_at_the_requested_list_length():
    names = [f"Other disease {c}" for c in "ABCDEFGHIJ"]
    tenth = score_case(RARE_DISEASE, disease_answer(*names[:9], "Marfan syndrom"),
                       "Marfan syndrome")
    assert (tenth.parseable, tenth.rank, tenth.n_items) == (True, 10, 10)
    assert tenth.hit(10) and not tenth.hit(1)
    assert tenth.reciprocal_rank == pytest.approx(0.1)
    eleventh = score_case(RARE_DISEASE, disease_answer(*names, "Marfan syndrome"),
                          "Marfan syndrome")
    assert (eleventh.parseable, eleventh.rank, eleventh.n_items) == (True, None, 11)
    assert eleventh.reciprocal_rank == 0.0


def test_unparseable_answer_is_a_miss_even_when_it_names_the_truth():
    score = score_case(RARE_DISEASE, "1. 'Marfan syndrome'", "Marfan syndrome")
    assert score == CaseScore(parseable=False, rank=None, n_items=1)
    assert not score.hit(10)


def test_score_case_with_synonyms_and_a_near_miss():
    text = disease_answer("Edwards syndrome", "Down syndrom", "Marfan syndrome")
    assert score_case(RARE_DISEASE, text, "Trisomy 21; Down syndrome").rank == 2


# ---- CAR ---------------------------------------------------------------------
@pytest.mark.parametrize("c, a, expected", [
    (1.0, 1.0, 1.0),            # 1.5 / 1.5
    (0.6, 0.8, 0.72 / 1.1),     # 1.5*0.48 / (0.3+0.8)
    (0.4, 1.0, 0.5),            # 1.5*0.4 / (0.2+1.0)
    (0.2, 1.0, 0.3 / 1.1),      # 1.5*0.2 / (0.1+1.0)
    (0.0, 0.0, 0.0),            # no division error
    (0.0, 1.0, 0.0),
    (1.0, 0.0, 0.0),
])
def test_car_formula(c, a, expected):
    assert car(c, a) == pytest.approx(expected)


def test_coverage_avoidance_hand_computed():
    # Lung, Breast, Liver in the teacher's top-5 (3/5); Skin in its bottom-5 (1/5).
    assert coverage_avoidance(["Lung", "Breast", "Colon", "Skin", "Liver"], TOP, BOTTOM,
                              5) == pytest.approx((0.6, 0.8))


def test_short_answer_is_penalised_by_the_fixed_denominator():
    assert coverage_avoidance(["Lung", "Breast"], TOP, BOTTOM, 5) == pytest.approx((0.4, 1.0))


def test_repeated_answer_counts_once():
    c, a = coverage_avoidance(["Lung", "lung", "Lungs", "Lung", "Lung"], TOP, BOTTOM, 5)
    assert (c, a) == pytest.approx((0.2, 1.0))


def test_only_the_first_n_answers_count():
    # The sixth answer (Kidney, in the top-5) is beyond the five asked for.
    c, _ = coverage_avoidance(["Colon", "Skin", "Testis", "Stomach", "Prostate", "Kidney"],
                              TOP, BOTTOM, 5)
    assert c == 0.0


def test_teacher_lists_use_the_fuzzy_match():
    c, a = coverage_avoidance(["Head and Neck", "Lungs"], ["Head & Neck", "Lung"], ["Skin"], 5)
    assert (c, a) == pytest.approx((0.4, 1.0))


def test_score_case_tissue_hand_computed():
    score = score_case(TISSUE_TYPE, tissue_answer("Lung", "Breast", "Colon", "Skin", "Liver"),
                       "Breast", TOP, BOTTOM)
    assert score.rank == 2
    assert (score.c, score.a, score.car) == pytest.approx((0.6, 0.8, 0.72 / 1.1))


def test_unparseable_tissue_answer_scores_zero_car():
    score = score_case(TISSUE_TYPE, "Lung, Breast", "Lung", TOP, BOTTOM)
    assert (score.parseable, score.c, score.a, score.car) == (False, 0.0, 0.0, 0.0)


def test_teacher_lists_go_together():
    with pytest.raises(MintError, match="teacher_top and teacher_bottom"):
        score_case(TISSUE_TYPE, tissue_answer("Lung"), "Lung", TOP, None)


# ---- aggregates --------------------------------------------------------------
def test_k_values():
    assert k_values(RARE_DISEASE) == (1, 10)
    assert k_values(TISSUE_TYPE) == (1, 5)


def test_aggregate_hand_computed():
    scores = [CaseScore(True, 1, 10), CaseScore(True, 3, 10), CaseScore(True, None, 10),
              CaseScore(False, None, 0)]
    assert aggregate(scores, (1, 10)) == pytest.approx(
        {"parseable": 0.75, "top1": 0.25, "top10": 0.5, "mrr": (1 + 1 / 3) / 4})


def test_aggregate_with_car():
    scores = [CaseScore(True, 1, 5, 1.0, 1.0, 1.0), CaseScore(False, None, 0, 0.0, 0.0, 0.0)]
    means = aggregate(scores, (1, 5))
    assert (means["car"], means["coverage"], means["avoidance"]) == pytest.approx((0.5,) * 3)


def test_mixed_teacher_lists_in_one_arm_are_an_error():
    scores = [CaseScore(True, 1, 5, 1.0, 1.0, 1.0), CaseScore(True, 1, 5)]
    with pytest.raises(MintError, match="1 of 2 cases lack teacher_top"):
        aggregate(scores, (1, 5))


# ---- bootstrap ---------------------------------------------------------------
def test_bootstrap_is_deterministic_and_seeded():
    values = np.random.default_rng(1).random(40)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


@pytest.mark.parametrize("values", [
    [0.0, 1.0] * 10, [1.0] * 3 + [0.0] * 27, list(np.linspace(0, 1, 17)), [0.2, 0.9, 0.4],
])
def test_bootstrap_interval_contains_the_point_estimate(values):
    low, high = bootstrap_ci(values)
    assert low <= float(np.mean(values)) <= high


def test_bootstrap_interval_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.integers(0, 2, 20), rng.integers(0, 2, 500)
    w_small = np.subtract(*bootstrap_ci(small)[::-1])
    w_large = np.subtract(*bootstrap_ci(large)[::-1])
    # Width ~ 2 * 1.96 * sqrt(p(1-p)/n): about 0.44 for n=20, 0.09 for n=500.
    assert 0.3 < w_small < 0.6
    assert 0.06 < w_large < 0.12


def test_bootstrap_matches_the_normal_approximation():
    low, high = bootstrap_ci([0.0, 1.0] * 50, n_resamples=4000)
    # 0.5 +- 1.96 * sqrt(0.25 / 100) = [0.402, 0.598]
    assert low == pytest.approx(0.402, abs=0.02)
    assert high == pytest.approx(0.598, abs=0.02)


def test_bootstrap_edge_cases():
    assert bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    assert bootstrap_ci([0.3]) == pytest.approx((0.3, 0.3))
    assert bootstrap_ci([1.0, 2.0, 3.0, 100.0], stat=np.median)[1] <= 100.0
    for bad in ({"values": []}, {"values": [1.0], "alpha": 1.5},
                {"values": [1.0], "n_resamples": 0}):
        with pytest.raises(ValueError):
            bootstrap_ci(**bad)


def test_summarise_arm_rare_disease():
    names = [f"Other {c}" for c in "ABCDEFGHI"]
    gens = [disease_answer("Marfan syndrome", *names), disease_answer(*names, "Marfan syndrom"),
            disease_answer(*names), "I cannot say."]
    cases = [score_case(RARE_DISEASE, g, "Marfan syndrome") for g in gens]
    summary = summarise_arm(RARE_DISEASE, cases, arm="sft", n_resamples=500, seed=1)
    assert (summary.arm, summary.n, summary.n_parseable, summary.n_unparseable) == (
        "sft", 4, 3, 1)
    assert set(summary.metrics) == {"parseable", "top1", "top10", "mrr"}
    expected = {"parseable": 0.75, "top1": 0.25, "top10": 0.5, "mrr": (1 + 0.1) / 4}
    for name, value in expected.items():
        est = summary.metrics[name]
        assert est.value == pytest.approx(value)
        assert est.low <= est.value <= est.high
    flat = summary.as_dict()
    assert flat["top10"] == pytest.approx(0.5) and "top10_ci_low" in flat
    assert flat["n_unparseable"] == 1


def test_summarise_arm_tissue_reports_car():
    cases = [score_case(TISSUE_TYPE, tissue_answer("Lung", "Breast", "Colon", "Skin", "Liver"),
                        "Breast", TOP, BOTTOM),
             score_case(TISSUE_TYPE, "no idea", "Lung", TOP, BOTTOM)]
    summary = summarise_arm(TISSUE_TYPE, cases, arm="orpo")
    assert set(summary.metrics) == {"parseable", "top1", "top5", "mrr", "car", "coverage",
                                    "avoidance"}
    assert summary.metrics["car"].value == pytest.approx(0.72 / 1.1 / 2)
    assert summary.metrics["top5"].value == pytest.approx(0.5)


def test_summarise_arm_without_cases_is_an_error():
    with pytest.raises(MintError, match="no cases"):
        summarise_arm(RARE_DISEASE, [], arm="base")


# ---- paired comparisons of two arms on the same cases -------------------------
def test_paired_difference_of_identical_arms_is_zero():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 200).astype(float)
    est = paired_difference(a, a, n_resamples=500, seed=3)
    assert (est.value, est.low, est.high) == (0.0, 0.0, 0.0)


def test_paired_difference_of_a_clearly_better_arm_is_above_zero():
    rng = np.random.default_rng(2)
    b = rng.integers(0, 2, 200).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:40]] = 1.0          # right on 40 more cases, wrong on none
    est = paired_difference(a, b, n_resamples=1000, seed=0)
    assert est.value == pytest.approx(0.2)
    assert 0 < est.low < est.value < est.high
    # Paired, the shared difficulty of the cases cancels: tighter than two per-arm intervals.
    per_arm = [bootstrap_ci(x, np.mean, 1000, 0) for x in (a, b)]
    assert est.high - est.low < min(high - low for low, high in per_arm)


def test_paired_difference_resamples_cases_once_for_both_arms():
    # Equal on every case but one: a per-arm resampling would scatter the difference,
    # a paired one keeps it near 1/n.
    b = np.array([1.0, 0.0] * 50)
    a = b.copy()
    a[1] = 1.0
    est = paired_difference(a, b, n_resamples=2000, seed=5)
    assert est.value == pytest.approx(0.01) and 0.0 <= est.low <= est.high <= 0.04
    assert paired_difference(a, b, 200, seed=9) == paired_difference(a, b, 200, seed=9)   # seedable
    with pytest.raises(ValueError, match="same cases"):
        paired_difference(a, b[:-1])


def test_mcnemar_exact_hand_computed():
    # 1 case only arm A got right, 6 only arm B: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 16/128.
    a = np.array([True] + [False] * 6 + [True] * 5 + [False] * 3)
    b = np.array([False] + [True] * 6 + [True] * 5 + [False] * 3)
    result = mcnemar_exact(a, b)
    assert (result.only_a, result.only_b, result.p_value) == (1, 6, 0.125)
    assert mcnemar_exact(b, a).p_value == 0.125                     # two-sided: symmetric
    # 0 vs 12 discordant: 2 / 2^12; no discordant case: no evidence, p = 1.
    assert mcnemar_exact([False] * 12, [True] * 12).p_value == pytest.approx(2 / 4096)
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0
    # Balanced discordance: 5 vs 5 is p = 1 (capped), never above.
    assert mcnemar_exact([True] * 5 + [False] * 5, [False] * 5 + [True] * 5).p_value == 1.0


def test_mcnemar_exact_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    for only_a, only_b in [(3, 10), (40, 60), (17, 17), (0, 30)]:
        a = [True] * only_a + [False] * only_b + [True] * 4
        b = [False] * only_a + [True] * only_b + [True] * 4
        expected = stats.binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
        assert mcnemar_exact(a, b).p_value == pytest.approx(expected, rel=1e-9)
