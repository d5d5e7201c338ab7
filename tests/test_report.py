"""The comparison report: tables, chart and files from per-arm generation records."""

import csv
import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from mint_ray.errors import MintError
from mint_ray.evaluation import (
    ArmTraining,
    bar_chart_png,
    budget_marks,
    metrics_markdown,
    metrics_table,
    per_label_table,
    render_report,
    score_records,
    summarise_arms,
    summary_dict,
    to_csv,
    to_markdown,
    training_table,
    write_report,
)
from mint_ray.evaluation.paired import paired_comparisons, reference_arms
from mint_ray.evaluation.training_report import Confound
from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOP = ["Lung", "Breast", "Kidney", "Liver", "Thyroid"]
BOTTOM = ["Skin", "Testis", "Uterus", "Bladder", "Cervix"]


def disease_answer(*names: str) -> str:
    return "POTENTIAL_DISEASES:\n" + "\n".join(f"{i}. '{n}'" for i, n in enumerate(names, 1))


def tissue_answer(*names: str) -> str:
    return "MOST_LIKELY_TISSUE:\n" + "\n".join(f"{i}. {n}" for i, n in enumerate(names, 1))


def rare_records() -> list[dict]:
    """Two arms on the same four cases; expected metrics worked out by hand below."""
    others = [f"Other {c}" for c in "ABCDEFGHI"]
    base = [
        ("s1", "Marfan syndrome", disease_answer(*others, "Marfan syndrom")),   # rank 10
        ("s2", "Noonan syndrome", disease_answer(*others)),                      # miss
        ("s3", "Trisomy 21; Down syndrome", "Down syndrome, I think."),          # unparseable
        ("s4", "Noonan syndrome", None),                                         # failed
    ]
    orpo = [
        ("s1", "Marfan syndrome", disease_answer("Marfan syndrome", *others)),  # rank 1
        ("s2", "Noonan syndrome", disease_answer("Noonan syndrome", *others)),  # rank 1
        ("s3", "Trisomy 21; Down syndrome", disease_answer("Other A", "Down syndrome")),  # 2
        ("s4", "Noonan syndrome", disease_answer(*others)),                      # miss
    ]
    return [{"arm": arm, "sample_id": sid, "label": label, "generation": gen}
            for arm, rows in (("base", base), ("orpo", orpo)) for sid, label, gen in rows]


def tissue_records() -> list[dict]:
    rows = [
        ("t1", "Breast", tissue_answer("Lung", "Breast", "Colon", "Skin", "Liver")),
        ("t2", "Lung", tissue_answer("Lung", "Breast", "Kidney", "Liver", "Thyroid")),
        ("t3", "Skin", "Probably skin."),
    ]
    return [{"arm": "sft", "sample_id": sid, "label": label, "generation": gen,
             "teacher_top": TOP, "teacher_bottom": BOTTOM} for sid, label, gen in rows]


# ---- scoring and tables ------------------------------------------------------
def test_score_records_keeps_every_record_and_its_parse():
    scored = score_records(RARE_DISEASE, rare_records())
    assert len(scored) == 8
    s3 = scored[2]
    assert (s3.arm, s3.sample_id, s3.score.parseable, s3.score.rank) == ("base", "s3", False, None)
    assert scored[3].generation == ""      # a failed generation stays, as an empty answer
    assert scored[6].items[:2] == ["Other A", "Down syndrome"]


def test_metrics_table_hand_computed():
    summaries = summarise_arms(RARE_DISEASE, score_records(RARE_DISEASE, rare_records()))
    rows = {r["arm"]: r for r in metrics_table(summaries).to_pylist()}
    assert list(rows) == ["base", "orpo"]        # the callers' order, not sorted
    base, orpo = rows["base"], rows["orpo"]
    assert (base["n"], base["n_parseable"], base["n_unparseable"]) == (4, 2, 2)
    assert base["top1"] == 0.0 and base["top10"] == pytest.approx(0.25)
    assert base["parseable"] == pytest.approx(0.5)
    assert base["mrr"] == pytest.approx(0.1 / 4)
    assert (orpo["n"], orpo["n_unparseable"]) == (4, 0)
    assert orpo["top1"] == pytest.approx(0.5) and orpo["top10"] == pytest.approx(0.75)
    assert orpo["mrr"] == pytest.approx((1 + 1 + 0.5) / 4)
    for row in rows.values():
        for m in ("top1", "top10", "mrr", "parseable"):
            assert row[f"{m}_ci_low"] <= row[m] <= row[f"{m}_ci_high"]
    assert "car" not in rows["base"]


def test_per_label_table_hand_computed():
    table = per_label_table(RARE_DISEASE, score_records(RARE_DISEASE, rare_records()))
    rows = {(r["label"], r["arm"]): r for r in table.to_pylist()}
    assert len(rows) == 6                       # 3 labels x 2 arms
    noonan_orpo = rows[("Noonan syndrome", "orpo")]
    assert (noonan_orpo["n"], noonan_orpo["top1"], noonan_orpo["top10"]) == (2, 0.5, 0.5)
    noonan_base = rows[("Noonan syndrome", "base")]
    assert (noonan_base["n_parseable"], noonan_base["parseable"]) == (1, 0.5)
    assert table.column("label").to_pylist()[:2] == ["Marfan syndrome", "Marfan syndrome"]


def test_tissue_tables_report_car():
    scored = score_records(TISSUE_TYPE, tissue_records())
    (summary,) = summarise_arms(TISSUE_TYPE, scored)
    # t1: C 0.6, A 0.8 -> 0.72/1.1; t2: C 1, A 1 -> 1; t3 unparseable -> 0.
    assert summary.metrics["car"].value == pytest.approx((0.72 / 1.1 + 1.0) / 3)
    assert summary.metrics["top1"].value == pytest.approx(1 / 3)
    assert summary.metrics["top5"].value == pytest.approx(2 / 3)
    assert {"car", "coverage", "avoidance"} <= set(per_label_table(TISSUE_TYPE, scored)
                                                   .column_names)


def test_markdown_and_csv():
    summaries = summarise_arms(RARE_DISEASE, score_records(RARE_DISEASE, rare_records()))
    md = metrics_markdown(summaries)
    lines = md.strip().splitlines()
    assert lines[0] == "| arm | n | unparseable | top1 | top10 | mrr | parseable |"
    assert lines[3].startswith("| orpo | 4 | 0 | 0.500 [")
    rows = list(csv.DictReader(io.StringIO(to_csv(metrics_table(summaries)))))
    assert [r["arm"] for r in rows] == ["base", "orpo"]
    assert float(rows[1]["top10"]) == pytest.approx(0.75)


def test_to_markdown_nulls_and_pipes():
    md = to_markdown(pa.table({"name": ["a|b", None], "x": [0.12345, None]}))
    assert md.splitlines()[2] == "| a\\|b | 0.123 |"
    assert md.splitlines()[3] == "| n/a | n/a |"


def test_bar_chart_is_a_png():
    summaries = summarise_arms(TISSUE_TYPE, score_records(TISSUE_TYPE, tissue_records()))
    png = bar_chart_png(summaries, "tissue")
    assert png.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    image.verify()
    assert image.size[0] > 400 and image.size[1] > 300


# ---- the whole report --------------------------------------------------------
def test_render_and_write_report(tmp_path):
    report = render_report(RARE_DISEASE, rare_records(), n_resamples=200, seed=7)
    assert set(report.files) == {"report.md", "metrics.csv", "per_label.csv", "accuracy.png",
                                 "generations.jsonl", "summary.json", "paired_differences.json"}
    uris = write_report(report, str(tmp_path / "out"))
    assert sorted(uris) == sorted(str(tmp_path / "out" / name) for name in report.files)

    out = tmp_path / "out"
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    Image.open(out / "accuracy.png").verify()
    md = (out / "report.md").read_text()
    for arm in ("base", "orpo"):
        assert f"| {arm} |" in md
    assert "200 resamples, seed 7" in md and "accuracy.png" in md
    metrics_rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["arm"] for r in metrics_rows] == ["base", "orpo"]
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text()
                   .splitlines()]
    assert len(generations) == 8                # unparseable ones included
    assert sum(not g["parseable"] for g in generations) == 2
    assert generations[0]["generation"].startswith("POTENTIAL_DISEASES:")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["orpo"]["top1"] == pytest.approx(0.5)
    assert summary == json.loads(json.dumps(summary_dict(report.summaries)))
    assert "Warning" not in md


def arm_trainings() -> list[ArmTraining]:
    """A comparison's arms as trained: DPO took a budget of its own on top of SFT."""
    return [ArmTraining("base", "base", "none (the base model)", trained=False, own_steps=0, steps=0,
                        own_tokens=0, tokens=0),
            ArmTraining("sft", "sft", "p [train], target ground_truth", nll_over="response", own_steps=240,
                        steps=240, own_tokens=9000, tokens=9000),
            ArmTraining("dpo", "dpo", "p [train], target chosen", init_from="sft", own_steps=240,
                        steps=480, own_tokens=20000, tokens=29000),
            ArmTraining("orpo", "orpo", "p [train, validation], target chosen", nll_over="response",
                        own_steps=240, steps=240, own_tokens=21000, tokens=21000),
            ArmTraining("teacher", "teacher", "the teacher's ranking", trained=False)]


def test_training_table_marks_arms_whose_steps_differ():
    training = arm_trainings()
    assert budget_marks(training, 240) == {
        "base": "n/a", "sft": "equal", "dpo": "**differs: 480 steps vs 240 for the budget**",
        "orpo": "equal", "teacher": "n/a"}
    # No budget (epochs): held to the total most trained arms share.
    assert budget_marks(training, None)["dpo"] == "**differs: 480 steps vs 240 for the other arms**"
    given = ArmTraining("given", "orpo", "given model m", own_steps=None, steps=None)
    assert budget_marks([*training, given], 240)["given"] == "**unknown**"
    rows = {r["arm"]: r for r in training_table(training, 240).to_pylist()}
    assert (rows["dpo"]["starts_from"], rows["dpo"]["own_steps"], rows["dpo"]["steps"],
            rows["dpo"]["tokens"]) == ("sft", 240, 480, 29000)
    assert rows["teacher"]["steps"] is None and rows["base"]["tokens"] == 0


def test_report_shows_each_arm_data_steps_and_tokens(tmp_path):
    records = [r for r in rare_records() if r["arm"] == "orpo"]
    records += [{**r, "arm": arm} for arm in ("base", "sft", "dpo", "teacher") for r in records]
    report = render_report(RARE_DISEASE, records, n_resamples=50, training=arm_trainings(), budget_steps=240)
    md = report.files["report.md"].decode()
    section = md[md.index("## Training"):md.index("## Per label")]
    assert "Step budget: 240 optimizer steps per trained arm" in section
    assert "| dpo | dpo | p [train], target chosen | n/a | sft | 240 | 480 | 20000 | 29000 | **differs" in section
    assert "| orpo | orpo | p [train, validation], target chosen | response | n/a | 240 | 240 | 21000 | 21000 | " \
        "equal |" in section
    assert "`nll_over`: the span of the arm's NLL term" in section and "NLL spans differ" not in section
    rows = list(csv.DictReader(io.StringIO(report.files["training.csv"].decode())))
    assert [r["arm"] for r in rows] == ["base", "sft", "dpo", "orpo", "teacher"]
    assert rows[1]["data"] == "p [train], target ground_truth" and rows[1]["tokens"] == "9000"
    assert [r["nll_over"] for r in rows] == ["", "response", "", "response", ""]


def test_report_is_deterministic():
    a = render_report(TISSUE_TYPE, tissue_records(), seed=3)
    b = render_report(TISSUE_TYPE, tissue_records(), seed=3)
    assert a.files["metrics.csv"] == b.files["metrics.csv"]
    assert a.files["report.md"] == b.files["report.md"]


def test_report_warns_when_arms_saw_different_cases():
    records = [r for r in rare_records() if not (r["arm"] == "orpo" and r["sample_id"] == "s4")]
    md = render_report(RARE_DISEASE, records, n_resamples=50, references=()).files["report.md"].decode()
    assert "different cases (3 shared; base (1 extra))" in md
    # Paired differences need the same cases: the arm that lacks one is named.
    with pytest.raises(MintError, match=r"arm 'orpo' lacks 1 of the cases of arm 'base' \(e.g. 's4'\)"):
        render_report(RARE_DISEASE, records, n_resamples=50)


def test_arm_without_teacher_lists_gets_no_car_bar():
    base = {"arm": "base", "sample_id": "t1", "label": "Breast",
            "generation": tissue_answer("Breast")}
    records = [*tissue_records(), base]
    report = render_report(TISSUE_TYPE, records, n_resamples=50, references=())
    rows = {r["arm"]: r for r in metrics_table(report.summaries).to_pylist()}
    assert rows["base"]["car"] is None and rows["sft"]["car"] is not None
    assert report.files["accuracy.png"].startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("records, message", [
    ([{"arm": "a", "sample_id": 1, "label": "X"}], "record 0 lacks generation"),
    ([{"arm": "a", "sample_id": 1, "label": " ", "generation": ""}], "empty label"),
    ([{"arm": "a", "sample_id": 1, "label": "X", "generation": ""}] * 2, "sample '1' twice"),
    ([], "no generations"),
])
def test_bad_records_are_clear_errors(records, message):
    with pytest.raises(MintError, match=message):
        render_report(RARE_DISEASE, records)


# ---- paired differences and confounds ----------------------------------------
def three_arm_records() -> list[dict]:
    """base and orpo of ``rare_records``, and an sft arm that answers as base does."""
    records = rare_records()
    return [*records, *({**r, "arm": "sft"} for r in records if r["arm"] == "base")]


KINDS = [ArmTraining("base", "base", "none", trained=False), ArmTraining("sft", "sft", "p", nll_over="response"),
         ArmTraining("orpo", "orpo", "p", nll_over="response")]


def test_reference_arms_are_sft_then_base():
    assert reference_arms(["base", "sft", "orpo"], {"base": "base", "sft": "sft", "orpo": "orpo"}) == ["sft", "base"]
    assert reference_arms(["a", "b"], {}) == ["a"]                  # no SFT arm: the first arm
    assert reference_arms(["base", "orpo"], {"base": "base", "orpo": "orpo"}) == ["base"]


def test_paired_differences_hand_computed():
    report = render_report(RARE_DISEASE, three_arm_records(), n_resamples=300, training=KINDS)
    pairs = [(p.arm, p.reference) for p in report.paired]
    # Against SFT, then against the base, arms in their order; SFT - base once, never base - SFT.
    assert pairs == [("orpo", "sft"), ("orpo", "base"), ("sft", "base")]
    orpo_sft = report.paired[0]
    # top-1: orpo right on s1, s2, base/sft on none; top-10: orpo s1-s3, base s1; MRR (1+1+.5)/4 - .1/4.
    assert orpo_sft.differences["top1"].value == pytest.approx(0.5)
    assert orpo_sft.differences["top10"].value == pytest.approx(0.5)
    assert orpo_sft.differences["mrr"].value == pytest.approx(0.6)
    assert (orpo_sft.top1.only_a, orpo_sft.top1.only_b, orpo_sft.top1.p_value) == (2, 0, 0.5)
    assert not orpo_sft.significant
    same = report.paired[2]
    assert {name: (e.value, e.low, e.high) for name, e in same.differences.items()} == {
        "top1": (0, 0, 0), "top10": (0, 0, 0), "mrr": (0, 0, 0)}
    md = report.files["report.md"].decode()
    section = md[md.index("## Paired differences"):md.index("## Training")]
    assert "| orpo | sft | 4 | +0.500 [" in section and "| 2 / 0 | 0.5 | no |" in section
    assert "| sft | base | 4 | +0.000 [+0.000, +0.000] |" in section
    assert section.index("| orpo | sft |") < section.index("| orpo | base |") and "95% paired bootstrap" in section
    saved = json.loads(report.files["paired_differences.json"])
    assert saved[0] == json.loads(json.dumps(orpo_sft.as_dict()))
    assert (saved[0]["top1_diff"], saved[0]["top1_mcnemar_p"], saved[0]["top1_significant"]) == (0.5, 0.5, False)
    # The chart gains a panel: wider than the bars alone.
    alone = Image.open(io.BytesIO(bar_chart_png(report.summaries, "t")))
    both = Image.open(io.BytesIO(report.files["accuracy.png"]))
    assert both.size[0] > alone.size[0] + 200


def test_paired_cases_are_matched_by_case_id_not_position():
    records = three_arm_records()
    shuffled = [r for r in records if r["arm"] != "orpo"] + [r for r in reversed(records) if r["arm"] == "orpo"]
    scored, scored_shuffled = (score_records(RARE_DISEASE, rs) for rs in (records, shuffled))
    assert paired_comparisons(RARE_DISEASE, scored, ["sft"], 200) == \
        paired_comparisons(RARE_DISEASE, scored_shuffled, ["sft"], 200)


def test_a_clearly_better_arm_is_significant():
    others = [f"Other {c}" for c in "ABCDEFGHI"]
    records = [{"arm": arm, "sample_id": f"c{i}", "label": "Marfan syndrome",
                "generation": disease_answer(*(["Marfan syndrome", *others] if arm == "orpo" or i < 10 else others))}
               for arm in ("sft", "orpo") for i in range(40)]
    (p,) = render_report(RARE_DISEASE, records, n_resamples=300, training=KINDS[1:]).paired
    assert (p.arm, p.reference, p.top1.only_a, p.top1.only_b) == ("orpo", "sft", 30, 0)
    assert p.significant and p.top1.p_value == pytest.approx(2 / 2**30)
    assert p.differences["top1"].low > 0


def test_confounds_open_the_report():
    confound = Confound("train.optim.lr", {"sft": "0.005", "orpo": "0.01"})
    md = render_report(RARE_DISEASE, three_arm_records(), n_resamples=50, training=KINDS,
                       varied=["train.data"], confounds=[confound]).files["report.md"].decode()
    section = md[md.index("## Confounds"):md.index("## Metrics")]
    assert "**Warning: the trained arms differ in more than their objective.**" in section
    assert "| train.optim.lr | sft: 0.005; orpo: 0.01 |" in section
    assert "Settings the recipe varies between arms (`varied`): `train.data`." in md
    assert "## Confounds" not in render_report(RARE_DISEASE, three_arm_records(), n_resamples=50,
                                               training=KINDS).files["report.md"].decode()


def test_training_section_warns_when_nll_spans_differ():
    training = [KINDS[0], KINDS[1], ArmTraining("orpo", "orpo", "p", nll_over="sequence")]
    md = render_report(RARE_DISEASE, three_arm_records(), n_resamples=50, training=training).files["report.md"]
    assert "**Warning: the arms' NLL spans differ (response, sequence)**" in md.decode()
