"""The preference stage's pure parts, without Ray: the Arrow schemas and table builders.

The end-to-end runs on a real local Ray are in ``test_preferences.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mint_ray.config import build_config
from mint_ray.errors import ConfigError, MintError
from mint_ray.preferences import accounting, operators, plan, schemas, validate
from mint_ray.preferences.config import Config
from mint_ray.preferences.pairs import PairRule
from mint_ray.preferences.validate import Verdict
from mint_ray.tasks import MAX_NOTE_CHARS, RARE_DISEASE, TISSUE_TYPE
from mint_ray.teachers.protocol import Case

_RULES = validate.Rules(task="rare_disease", labels=frozenset({"A", "B"}), splits=frozenset({"train"}),
                        needs_note=True, needs_image=False, max_image_bytes=100, max_image_pixels=100,
                        max_note_chars=10, min_image_side=4, max_image_aspect=16)


def _cfg(**values: object) -> Config:
    return build_config(Config, {"task": "rare_disease", "cohort_uri": "/nowhere", "teacher": {"uri": "/t"},
                                 "tracking": {"enabled": False}, **values})

# ---------------------------------------------------------------- schemas and builders


def test_coerce_chunk_turns_wrong_types_into_marked_nulls() -> None:
    batch = pa.table({
        "sample_id": pa.array(["a", "b", "c"]).dictionary_encode(),
        "task": pa.array(["rare_disease"] * 3, pa.large_string()),
        "split": pa.array([None, None, None], pa.null()),
        "label": pa.array([1, None, 3], pa.int64()),
        "extra": [1, 2, 3],
    })  # no note, no image_uri
    table, bad_text, errors = schemas.coerce_chunk(batch)
    assert table.schema == pa.schema([(name, pa.string()) for name in schemas.INPUT_FIELDS])
    assert table.column("sample_id").to_pylist() == ["a", "b", "c"]
    assert table.column("task").to_pylist() == ["rare_disease"] * 3
    assert table.column("label").to_pylist() == table.column("note").to_pylist() == [None] * 3
    # Only the rows that had a value in the wrong-typed column are marked.
    assert errors == ["label: int64", None, "label: int64"] and bad_text == [None] * 3


def _not_utf8(values: list[bytes | None]) -> pa.Array:
    """Bytes in a string column, as a Parquet file written without checks holds them."""
    return pa.array(values, pa.binary()).view(pa.string())


@pytest.mark.parametrize("column", ["sample_id", "task", "split", "note", "image_uri", "label", "meta"])
def test_text_that_is_not_utf8_is_a_marked_null_in_any_column(column: str) -> None:
    """Latin-1 (caf\xe9), a CESU-8 surrogate, a lone continuation byte and a truncated
    sequence, in every text column, plain, large or dictionary-encoded: marked by column
    name, the value read as null, the other rows untouched."""
    bad = [b"caf\xe9", b"ok", b"\xed\xa0\x80", None, b"\x80", "é".encode()[:1]]
    rows = len(bad)
    good = {name: pa.array([f"{name}-{i}" for i in range(rows)]) for name in validate.TEXT_COLUMNS}
    for encode in (lambda a: a, lambda a: a.cast(pa.large_string()), lambda a: a.dictionary_encode()):
        batch = pa.table({**good, column: encode(_not_utf8(bad))})
        table, bad_text, errors = schemas.coerce_chunk(batch)
        assert bad_text == [column, None, column, None, column, column] and errors == [None] * rows
        if column in schemas.INPUT_FIELDS:
            assert table.column(column).to_pylist() == [None, "ok", None, None, None, None]
        table.to_pylist()  # nothing left that Python cannot decode
        assert table.column("split" if column != "split" else "task").to_pylist()[1].endswith("-1")


def test_a_row_bad_in_several_columns_names_each_never_the_text() -> None:
    batch = pa.table({"sample_id": _not_utf8([b"\xff"]), "note": _not_utf8([b"secret \xe9"]), "label": [3]})
    _, bad_text, errors = schemas.coerce_chunk(batch)
    assert bad_text == ["sample_id, note"] and errors == ["label: int64"]
    verdict = validate.check_row({"invalid_utf8": bad_text[0], "type_error": errors[0]}, _RULES)
    assert verdict == Verdict("invalid_utf8", "not UTF-8: sample_id, note") and "secret" not in verdict.detail


def test_tensor_columns_round_trip_as_views() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.random((4, 3, 2, 2), dtype=np.float32)
    column = schemas.tensor_column(pixels)
    assert column.type == pa.fixed_shape_tensor(pa.float32(), [3, 2, 2]) and column.nbytes == pixels.nbytes
    back = schemas.column_array(pa.chunked_array([column]))
    assert np.array_equal(back, pixels) and np.shares_memory(back, pixels)  # no copy either way
    assert np.array_equal(schemas.column_array(column.slice(1, 2)), pixels[1:3])
    joined = schemas.column_array(pa.chunked_array([column.slice(0, 1), column.slice(1)]))
    assert np.array_equal(joined, pixels)
    flags = schemas.column_array(schemas.tensor_column(np.array([True, False])))
    assert flags.dtype == np.bool_ and flags.tolist() == [True, False]
    empty = schemas.column_array(schemas.tensor_column(np.zeros((0, 5), np.int32)))
    assert (empty.shape, empty.dtype) == ((0, 5), np.int32)
    with pytest.raises(TypeError, match="uint8"):
        schemas.tensor_column(np.ones((2, 3), np.bool_))


def test_prepared_tables_carry_rows_verdicts_and_teacher_inputs() -> None:
    rows = pa.table({"sample_id": ["a", "b"], "split": ["train"] * 2, "note": ["x", None],
                     "image_uri": [None, "/i.png"], "label": [None, "A"], "source_file": ["/c/p.parquet"] * 2,
                     "source_row": [0, 1], "other": [1, 2]})
    inputs = {"input_ids": np.arange(8, dtype=np.int32).reshape(2, 4), "present": np.array([True, False]),
              "pixels": np.ones((2, 3, 2, 2), np.float32)}
    table = schemas.prepared_table(rows, [None, Verdict("missing_image", "no file")], inputs)
    assert table.column_names == [*schemas.ROW_NAMES, *schemas.VERDICT_NAMES, "input.input_ids",
                                  "input.present", "input.pixels"]
    assert table.column("reason").to_pylist() == [None, "missing_image"]
    assert table.column("stage").to_pylist() == [None, "validate"]
    back = schemas.input_arrays(table)
    assert back.keys() == inputs.keys() and all(np.array_equal(back[k], v) for k, v in inputs.items())
    assert schemas.row_bytes(inputs) == 4 * 4 + 1 + 12 * 4
    assert schemas.input_bytes(table) == 2 * (4 * 4 + 12 * 4) + 1  # the flags are bits: 1 byte


def test_pair_schema_follows_the_task_modality() -> None:
    text, image = schemas.pair_schema(RARE_DISEASE), schemas.pair_schema(TISSUE_TYPE)
    assert text.names == image.names
    assert text.field("prompt").type.value_type.field("content").type == pa.string()
    content = image.field("prompt").type.value_type.field("content").type
    assert content == pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
    union = schemas.union_schema(text)
    assert union.names[:len(text.names)] == text.names
    assert {"stage", "reason", "detail", "kind", "case_paired", "dropped_pairs", "scored_at"} <= set(union.names)
    assert set(schemas.QUARANTINE_SCHEMA.names) <= set(union.names)


# ---------------------------------------------------------------- row checks


def _row(**change: object) -> dict[str, object]:
    return {"sample_id": "a", "task": "rare_disease", "split": "train", "note": "Seizures", "image_uri": None,
            "label": "A", "invalid_utf8": None, "type_error": None, "duplicate": False, **change}


def test_row_checks_quote_values_briefly_and_limit_notes() -> None:
    assert validate.check_row(_row(), _RULES) is None
    assert validate.check_row(_row(note="x" * 10), _RULES) is None
    too_long = validate.check_row(_row(note="Seizures " * 2), _RULES)
    assert too_long == Verdict("note_too_long", "18 characters > max_note_chars 10")
    # Over the limit in a task that does not read notes too: the contract's notes are bounded.
    assert validate.check_row(_row(note="x" * 11), validate.Rules(**{**_RULES.__dict__, "needs_note": False}))
    huge = "t" * 100_000
    for field, reason in (("task", "wrong_task"), ("split", "unknown_split"), ("label", "unknown_label")):
        verdict = validate.check_row(_row(**{field: huge}), _RULES)
        assert verdict.reason == reason and len(verdict.detail) < 200 and "100000 chars" in verdict.detail
    assert validate.check_row(_row(invalid_utf8="note"), _RULES).reason == "invalid_utf8"  # first of all
    assert set(validate.QUARANTINE_REASONS) >= {"invalid_utf8", "note_too_long", "invalid_image_uri",
                                                "image_outside_cohort", "unreadable_image", "image_read_timeout",
                                                "image_too_small", "extreme_aspect_ratio"}


def test_image_shape_checks_follow_the_teachers_needs() -> None:
    assert validate.check_image_shape(4, 4, _RULES) is None and validate.check_image_shape(4, 64, _RULES) is None
    assert validate.check_image_shape(3, 64, _RULES).reason == "image_too_small"
    assert validate.check_image_shape(64, 1, _RULES).reason == "image_too_small"
    assert validate.check_image_shape(4, 65, _RULES).reason == "extreme_aspect_ratio"
    anything = validate.Rules(**{**_RULES.__dict__, "min_image_side": 1, "max_image_aspect": None})
    assert validate.check_image_shape(1, 10_000, anything) is None


# ---------------------------------------------------------------- the plan


def test_catalog_names_read_either_manifest_form() -> None:
    assert plan.catalog_names({"label_catalog": [{"name": "A", "id": "X:1"}, "B"]}) == ["A", "B"]
    assert plan.catalog_names({"labels": ["C"]}) == ["C"] and plan.catalog_names({}) == []


def test_configured_task_overrides_only_what_is_set() -> None:
    assert plan.configured_task(_cfg()) is RARE_DISEASE
    task = plan.configured_task(_cfg(prompt={"system_prompt": "Be brief."}))
    assert task.system_prompt == "Be brief." and task.instruction == RARE_DISEASE.instruction


def test_pair_rule_defaults_to_the_task_and_names_the_fix() -> None:
    rule = plan.pair_rule(_cfg(pairs={"q": 4}), RARE_DISEASE, 30)
    assert (rule.k, rule.q, rule.pairs_per_case) == (RARE_DISEASE.n_answers, 4, 1)
    with pytest.raises(ConfigError, match=r"lower pairs\.k"):
        plan.pair_rule(_cfg(pairs={"pairs_per_case": 3}), RARE_DISEASE, 30)


def test_validation_rules_need_what_the_task_or_teacher_reads() -> None:
    info = plan.TeacherInfo("/t", "tissue_type", "clip", "t", "v", ("a", "b"), ("image",), None, None)
    rules = plan.validation_rules(_cfg(task="tissue_type", splits=["train"], limits={"max_image_bytes": 9}),
                                  TISSUE_TYPE, info)
    assert (rules.needs_image, rules.needs_note, rules.max_image_bytes) == (True, False, 9)
    assert rules.labels == {"a", "b"} and rules.splits == {"train"}
    text = plan.validation_rules(_cfg(), RARE_DISEASE, info)
    assert text.needs_note and text.needs_image  # the teacher requires images
    assert (text.max_note_chars, text.min_image_side, text.max_image_aspect) == (MAX_NOTE_CHARS, 1, None)

    class Inputs:
        kind, min_image_side, max_image_aspect = "test", 7, 16.0

    sized = plan.validation_rules(_cfg(limits={"max_note_chars": 99}), RARE_DISEASE, info, Inputs())
    assert (sized.max_note_chars, sized.min_image_side, sized.max_image_aspect) == (99, 7, 16.0)


# ---------------------------------------------------------------- accounting


def _union(*rows: dict[str, object]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=schemas.union_schema(schemas.pair_schema(RARE_DISEASE)))


def _pair(sid: str, index: int, scored_at: float, **extra: object) -> dict[str, object]:
    return {"sample_id": sid, "pair_index": index, "kind": "pair", "teacher_name": "t", "teacher_version": "v1",
            "case_paired": index == 0, "dropped_pairs": 0, "scored_at": scored_at, **extra}


def _aside(sid: str, stage: str, reason: str, scored_at: float | None, dropped: int = 0) -> dict[str, object]:
    return {"sample_id": sid, "kind": "set_aside", "stage": stage, "reason": reason, "dropped_pairs": dropped,
            "scored_at": scored_at}


def test_part_counts_split_pairs_from_set_aside_rows() -> None:
    table = _union(_pair("a", 0, 5.0, dropped_pairs=1), _pair("a", 1, 5.0), _pair("b", 0, 7.0),
                   _aside("c", "validate", "missing_image", None), _aside("d", "teacher", "teacher_error", 9.0),
                   _aside("e", "filter", "low_margin", 4.0, dropped=2), _aside("f", "filter", "low_margin", 6.0))
    pairs, rest = accounting.split_union(table)
    assert (pairs.num_rows, rest.num_rows) == (3, 4)
    part = accounting.part_counts(pairs, rest)
    assert part == {"pairs": 3, "cases_paired": 2, "dropped_pairs": 3,
                    "quarantined": {"missing_image": 1, "teacher_error": 1}, "filtered": {"low_margin": 2},
                    "teachers": [("t", "v1")], "scored": (4.0, 9.0)}
    empty = accounting.part_counts(*accounting.split_union(table.slice(0, 0)))
    assert empty == accounting.empty_part()


def _totals(*parts: dict[str, object]) -> accounting.Totals:
    totals = accounting.Totals()
    for part in parts:
        totals.add({**accounting.empty_part(), **part})
    return totals


def test_accounting_balances_every_row_or_refuses() -> None:
    totals = _totals({"pairs": 3, "cases_paired": 2, "quarantined": {"missing_image": 1}, "scored": (4.0, 9.0)},
                     {"pairs": 1, "cases_paired": 1, "filtered": {"low_margin": 2}, "dropped_pairs": 2,
                      "teachers": [["t", "v1"]], "scored": (1.0, 6.0)})
    assert (totals.first_scored, totals.last_scored, totals.teachers) == (1.0, 9.0, {("t", "v1")})
    counts = accounting.check_accounting(6, totals)
    assert counts["accounting"] == "rows_in 6 = cases_paired 3 + quarantined 1 + filtered 2; pairs 4"
    assert (counts["quarantined_total"], counts["filtered_total"], counts["pairs_dropped_low_margin"]) == (1, 2, 2)
    with pytest.raises(MintError, match="rows unaccounted for"):
        accounting.check_accounting(7, totals)
    with pytest.raises(MintError, match=r"no pairs built: every row was set aside \(missing_image: 2\)"):
        accounting.check_accounting(2, _totals({"quarantined": {"missing_image": 2}}))


def test_speed_leaves_out_the_steady_rate_of_short_runs() -> None:
    totals = _totals({"scored": (12.0, 30.0)})
    rates = accounting.speed(1000, 10.0, 35.0, totals, batch_size=10)
    assert rates == {"seconds": 25.0, "rows_per_s": 40.0, "startup_s": 2.0, "steady_rows_per_s": 990 / 18}
    assert "steady_rows_per_s" not in accounting.speed(99, 10.0, 35.0, totals, batch_size=10)
    assert accounting.speed(5, 0.0, 1.0, accounting.Totals(), batch_size=10) == {"seconds": 1.0, "rows_per_s": 5.0}


def test_teacher_identity_is_one_stable_teacher() -> None:
    info = plan.TeacherInfo("/t", "rare_disease", "fusion", "t", "v1", ("a", "b"), (), None, None)
    assert accounting.teacher_identity(info, _totals({"teachers": [("t", "v1")]})) == \
        {"name": "t", "version": "v1", "kind": "fusion", "uri": "/t"}
    with pytest.raises(MintError, match="changed during the run"):
        accounting.teacher_identity(info, _totals({"teachers": [("t", "v1"), ("t", "v2")]}))
    with pytest.raises(MintError, match="actors loaded version v2"):
        accounting.teacher_identity(info, _totals({"teachers": [("t", "v2")]}))
    bare = plan.TeacherInfo("/clip", "tissue_type", "clip", "clip", None, ("a", "b"), ("image",), None, None)
    assert accounting.teacher_identity(bare, accounting.Totals())["version"] == "unknown"


# ---------------------------------------------------------------- the pair operator (pure)


def test_pair_rows_write_pairs_and_set_aside_rows_in_one_stream() -> None:
    labels = ("A", "B", "C", "D", "E")
    pairs_schema = schemas.pair_schema(RARE_DISEASE)
    pair_plan = plan.PairPlan(RARE_DISEASE, labels, PairRule(k=2, q=2, pairs_per_case=1, min_margin=0.5),
                              pairs_schema, schemas.union_schema(pairs_schema))
    common = {"split": "train", "image_uri": None, "teacher_name": "t", "teacher_version": "v1", "scored_at": 3.0,
              "stage": None, "reason": None, "detail": None}
    scored = pa.Table.from_pylist([
        {**common, "sample_id": "ok", "note": "Seizures", "label": "B", "scores": [5.0, 4.0, 3.0, 2.0, 1.0]},
        {**common, "sample_id": "close", "note": "Ptosis", "label": "A", "scores": [1.0, 1.0, 1.0, 1.0, 0.9]},
        {**common, "sample_id": "bad", "note": None, "label": "A", "scores": None,
         "stage": "validate", "reason": "empty_note", "detail": "no note text"},
    ], schema=schemas.SCORED_SCHEMA)
    out = operators.pair_rows(scored, pair_plan)
    assert out.schema == pair_plan.union_schema
    rows = {r["sample_id"]: r for r in out.to_pylist()}
    ok = rows["ok"]
    assert (ok["kind"], ok["case_paired"], ok["teacher_top"], ok["teacher_bottom"]) == ("pair", True, ["A", "B"],
                                                                                        ["D", "E"])
    assert ok["prompt"] == RARE_DISEASE.prompt_messages(note="Seizures", n_answers=2)
    assert ok["chosen"] == RARE_DISEASE.answer_message(["A", "B"]) and ok["truth_rank"] == 2
    assert (rows["close"]["kind"], rows["close"]["stage"], rows["close"]["reason"]) == ("set_aside", "filter",
                                                                                       "low_margin")
    assert rows["close"]["dropped_pairs"] == 1
    assert (rows["bad"]["stage"], rows["bad"]["reason"], rows["bad"]["prompt"]) == ("validate", "empty_note", None)
    counts = accounting.part_counts(*accounting.split_union(out))
    assert (counts["pairs"], counts["quarantined"], counts["filtered"]) == (1, {"empty_note": 1}, {"low_margin": 1})


# ---------------------------------------------------------------- the teacher's CPU step in the prepare tasks


class _NoteLengths:
    """A teacher's CPU side for the test: each note's length; a note "boom" cannot be prepared."""

    kind = "test"

    def prepare(self, cases: list[Case]) -> dict[str, np.ndarray]:
        if any(c.note == "boom" for c in cases):
            raise ValueError("cannot prepare this one")
        return {"length": np.array([len(c.note or "") for c in cases], np.int32).reshape(-1, 1)}


def test_teacher_inputs_fill_usable_rows_and_let_a_bad_case_cost_only_itself() -> None:
    cases = [Case(note="abc"), Case(note="boom"), Case(note="hello")]
    arrays, errors = operators.teacher_inputs(_NoteLengths(), cases, rows=[0, 2, 3], n=5)
    assert arrays["length"].tolist() == [[3], [0], [0], [5], [0]]  # zeros: unusable rows and failures
    assert errors == [None, "ValueError: cannot prepare this one", None]
    with pytest.raises(ValueError, match="cannot prepare"):  # every case fails alone: a broken step
        operators.teacher_inputs(_NoteLengths(), [Case(note="boom")] * 2, rows=[0, 1], n=2)
    arrays, errors = operators.teacher_inputs(_NoteLengths(), [], rows=[], n=2)
    assert arrays["length"].shape == (2, 1) and errors == []


def test_the_teachers_cpu_side_says_which_images_it_can_use(tmp_path: Path) -> None:
    """A CLIP side needs a pixel per patch a side (32 px input, 8 px patches: 4), read from
    the folder's config without weights; the fusion side a pixel per pooling cell."""
    from mint_ray.teachers import save_teacher_dir
    from mint_ray.teachers.clip import ClipSettings, build_tiny_clip
    from mint_ray.teachers.inputs import MAX_IMAGE_ASPECT, POOL_GRID, FusionInputs
    from mint_ray.teachers.loader import load_preprocessor

    clip = build_tiny_clip(ClipSettings(vocab_size=300, hidden_size=32, intermediate_size=64, layers=1,
                                        projection_dim=32, image_size=32, patch_size=8),
                           name="t", task="tissue_type", labels=["a", "b"])
    save_teacher_dir(clip, str(tmp_path / "clip"))
    cpu_side = load_preprocessor(str(tmp_path / "clip"))
    assert (cpu_side.min_image_side, cpu_side.max_image_aspect) == (4, MAX_IMAGE_ASPECT) == \
        (clip.inputs.min_image_side, clip.inputs.max_image_aspect)
    assert (FusionInputs.min_image_side, FusionInputs.max_image_aspect) == (POOL_GRID, MAX_IMAGE_ASPECT)
    (tmp_path / "clip" / "config.json").write_text("{}")  # a config that does not say: no minimum
    assert load_preprocessor(str(tmp_path / "clip")).min_image_side == 1
