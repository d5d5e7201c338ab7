"""Hostile and careless input through the whole preference build, for both tasks (rare
disease with the fusion teacher, tissue type with a CLIP teacher), on a real local Ray.

Each class of bad row is planted into a clean synth cohort: text that is not UTF-8 in
every text column, image URIs that are unreadable (folder, FIFO, symlink loop, a name
over 255 bytes, a NUL, another scheme), that leave the cohort (an absolute path, ``..``,
a symlink out, a sibling folder, another bucket), images of a format serving refuses,
too small or too elongated for the teacher, and a 2 MB note. The run must finish, balance
exactly, quarantine every planted row with its own reason, and pair the good rows exactly
as it does on the clean cohort (some of them now naming their image by a relative or
``file://`` URI). A failure at the publish point keeps the previous output whole.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from mint_ray import storage
from mint_ray.errors import StorageError
from mint_ray.preferences.plan import catalog_names
from mint_ray.preferences.run import QUARANTINE_DIR, run
from mint_ray.tasks import MAX_NOTE_CHARS, TISSUE_TYPES
from tests.prefbuild import encode, local_ray, png_bytes, prefs_config, synth_cohort, tiny_teacher

SIZES = {"rare_disease": 36, "tissue_type": 24}
TEXT_COLUMNS = ("sample_id", "task", "split", "note", "image_uri", "label", "meta")


@pytest.fixture(scope="module", autouse=True)
def _ray() -> Iterator[None]:
    yield from local_ray()


def _plant(root: Path, cohort: Path, good: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Bad rows of every class (values may be bytes that are not UTF-8) and the reason each
    must get; the files they name are made here."""
    planted = cohort / "planted"
    planted.mkdir()
    (root / "outside.png").write_bytes(png_bytes((10, 200, 10)))
    (Path(f"{cohort}-evil")).mkdir()
    (Path(f"{cohort}-evil") / "x.png").write_bytes(png_bytes((10, 200, 10)))
    (planted / "folder.png").mkdir()
    os.mkfifo(planted / "fifo.png")  # a read of it would wait for a writer forever
    os.symlink(planted / "loop-b.png", planted / "loop-a.png")
    os.symlink(planted / "loop-a.png", planted / "loop-b.png")
    os.symlink(root / "outside.png", planted / "escape.png")
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for fmt, suffix in (("TIFF", "tif"), ("BMP", "bmp"), ("GIF", "gif")):
        (planted / f"image.{suffix}").write_bytes(encode(pixels, fmt))
    for name, (height, width) in {"flat": (3, 32), "dot": (1, 1), "strip": (4, 80)}.items():
        (planted / f"{name}.png").write_bytes(png_bytes((200, 30, 90), width, height))

    def bad(sid: str | bytes, **change: Any) -> dict[str, Any]:
        return {**good, "sample_id": sid, **change}

    utf8 = {"sample_id": b"bad-caf\xe9", "task": good["task"].encode() + b"\xed\xa0\x80",
            "split": b"tr\xe9in", "note": (good["note"] or "Seizures").encode() + b" caf\xe9",
            "image_uri": good["image_uri"].encode() + b"\xff", "label": good["label"].encode() + b"\xe9",
            "meta": b'{"origin": "caf\xe9"}'}
    rows = [(bad(b"bad-caf\xe9"), "invalid_utf8")]
    rows += [(bad(f"bad-utf8-{column}", **{column: value}), "invalid_utf8")
             for column, value in utf8.items() if column != "sample_id"]
    uris = {
        "missing": ("planted/nope.png", "missing_image"),
        "folder": ("planted/folder.png", "unreadable_image"),
        "fifo": ("planted/fifo.png", "unreadable_image"),
        "loop": ("planted/loop-a.png", "unreadable_image"),
        "long-name": ("planted/" + "n" * 300 + ".png", "unreadable_image"),
        "nul": ("planted/a\x00.png", "invalid_image_uri"),
        "http": ("http://example.com/face.png", "invalid_image_uri"),
        "etc-passwd": ("/etc/passwd", "image_outside_cohort"),
        "dotdot": ("../../outside.png", "image_outside_cohort"),
        "abs-dotdot": (f"{cohort}/images/../../../outside.png", "image_outside_cohort"),
        "symlink-out": ("planted/escape.png", "image_outside_cohort"),
        "sibling": (f"{cohort}-evil/x.png", "image_outside_cohort"),
        "other-bucket": ("s3://another-bucket/cohorts/x.png", "image_outside_cohort"),
        "tiff": ("planted/image.tif", "unsupported_image_format"),
        "bmp": ("planted/image.bmp", "unsupported_image_format"),
        "gif": ("planted/image.gif", "unsupported_image_format"),
        "3px-high": ("planted/flat.png", "image_too_small"),
        "1px": ("planted/dot.png", "image_too_small"),
        "strip": ("planted/strip.png", "extreme_aspect_ratio"),
    }
    rows += [(bad(f"bad-{name}", image_uri=uri), reason) for name, (uri, reason) in uris.items()]
    rows.append((bad("bad-2mb-note", note="Seizures. " * 200_000), "note_too_long"))
    return rows


def _text_column(values: list[Any]) -> pa.Array:
    """A string column holding whatever bytes it is given, as unchecked writers store them."""
    raw = [v.encode() if isinstance(v, str) else v for v in values]
    return pa.array(raw, pa.binary()).view(pa.string())


def _write_cohort(uri: str, clean: pa.Table, planted: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """The clean rows (a few naming their image relatively) in one file, the planted in a second."""
    version = storage.prepare_output(uri, overwrite=True)
    storage.write_table(version, clean, "part-0.parquet")
    storage.write_table(version, pa.table({c: _text_column([r[c] for r in planted]) for c in TEXT_COLUMNS}),
                        "part-1.parquet")
    storage.commit(uri, version, meta=meta)


def _relative_uris(clean: pa.Table, cohort: str) -> pa.Table:
    """The same cases, three of them naming their image as a relative path, with dot
    segments, or as file://: the pairs must still name the image as the clean run does."""
    uris = clean.column("image_uri").to_pylist()
    for i, form in enumerate(("{rel}", "./images/../{rel}", "file://{abs}")):
        uris[i] = form.format(rel=uris[i][len(cohort) + 1:], abs=uris[i])
    return clean.set_column(clean.schema.get_field_index("image_uri"), "image_uri", pa.array(uris, pa.string()))


@pytest.fixture(scope="module", params=list(SIZES))
def hostile(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    task = request.param
    root = tmp_path_factory.mktemp(task)
    cohort = synth_cohort(str(root), task, SIZES[task])
    clean = storage.read_dataset(cohort)
    meta = storage.read_manifest(cohort).meta
    labels = catalog_names(meta) if task == "rare_disease" else list(TISSUE_TYPES)
    teacher = tiny_teacher(str(root), task, labels, clean.column("note").to_pylist() if task == "rare_disease"
                           else [])
    cfg = prefs_config(task=task, cohort_uri=cohort, teacher={"uri": teacher, "batch_size": 16}, block_rows=32,
                       storage={"root": str(root)})
    before = run(cfg.model_copy(update={"output_uri": str(root / "prefs-clean")}))
    good = next(r for r in clean.to_pylist() if r["split"] == "train")
    planted = _plant(root, Path(cohort), good)
    # The planted cohort replaces the clean one at the same URI: its images stay in place.
    _write_cohort(cohort, _relative_uris(clean, cohort), [row for row, _ in planted], meta)
    after = run(cfg.model_copy(update={"output_uri": str(root / "prefs-planted")}))
    return {"task": task, "root": root, "cfg": cfg, "clean": clean, "before": before, "after": after,
            "planted": planted}


def test_every_planted_row_is_quarantined_with_its_reason(hostile: dict[str, Any]) -> None:
    s, planted, n = hostile["after"], hostile["planted"], hostile["clean"].num_rows
    assert s["rows_in"] == n + len(planted) == s["cases_paired"] + s["quarantined_total"] + s["filtered_total"]
    assert s["filtered_total"] == 0 and s["cases_paired"] == n
    assert s["quarantined"] == dict(sorted(Counter(reason for _, reason in planted).items()))
    quarantine = storage.read_dataset(s["quarantine_uri"]).to_pylist()
    assert len(quarantine) == len(planted)
    by_id = {row["sample_id"]: row for row in quarantine}
    for row, reason in planted:
        if isinstance(row["sample_id"], bytes):  # known by where it sits: the first row of the second file
            got = by_id[None]
            assert (got["source_file"].endswith("part-1.parquet"), got["source_row"]) == (True, 0)
            assert got["detail"] == "not UTF-8: sample_id"
        else:
            got = by_id[row["sample_id"]]
        assert (got["stage"], got["reason"]) == ("validate", reason), row["sample_id"]
        # The quarantine names the image as the cohort does (null where that is not UTF-8).
        assert got["image_uri"] == (row["image_uri"] if isinstance(row["image_uri"], str) else None)
    for column in TEXT_COLUMNS[1:]:
        assert by_id[f"bad-utf8-{column}"]["detail"] == f"not UTF-8: {column}"
    assert by_id["bad-2mb-note"]["detail"] == f"2000000 characters > max_note_chars {MAX_NOTE_CHARS}"
    # Details are short and never quote a note.
    assert max(len(r["detail"]) for r in quarantine) < 400
    assert not any("Seizures" in r["detail"] or "caf" in r["detail"] for r in quarantine)


def test_good_rows_are_paired_exactly_as_on_the_clean_cohort(hostile: dict[str, Any]) -> None:
    before = storage.read_dataset(hostile["before"]["output_uri"]).sort_by("sample_id").to_pylist()
    after = storage.read_dataset(hostile["after"]["output_uri"]).sort_by("sample_id").to_pylist()
    assert [r["sample_id"] for r in after] == [r["sample_id"] for r in before] == \
        sorted(hostile["clean"].column("sample_id").to_pylist())
    for old, new in zip(before, after, strict=True):
        # Scores from batches of other rows may differ in the last bits; the rest is equal.
        np.testing.assert_allclose(new.pop("teacher_scores"), old.pop("teacher_scores"), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.pop("margin"), old.pop("margin"), rtol=1e-5, atol=1e-6)
        assert new == old


def test_a_failure_at_the_publish_point_keeps_the_previous_output(hostile: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The pairs' manifest cannot be written after the quarantine's was: the quarantine's
    previous manifest is put back and the new version folders go (every other step is
    in ``test_preferences_io.py``)."""
    out = hostile["after"]["output_uri"]
    quarantine = storage.join(out, QUARANTINE_DIR)
    published = storage.read_manifest(out), storage.read_manifest(quarantine)
    real = storage.publish

    def refuse_pairs(uri: str, *args: Any, **kwargs: Any) -> storage.Manifest:
        if uri == out:
            raise StorageError(f"{uri}: injected failure at the publish point")
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "publish", refuse_pairs)
    cfg = hostile["cfg"]
    with pytest.raises(StorageError, match="injected failure"):
        run(cfg.model_copy(update={"output_uri": out, "storage": cfg.storage.model_copy(update={"overwrite": True})}))
    pairs, aside = storage.read_manifest(out), storage.read_manifest(quarantine)
    assert (pairs, aside) == published and pairs.meta["quarantine"]["version"] == aside.version
    assert storage.read_dataset(out).num_rows == hostile["after"]["pairs"]
    assert storage.read_dataset(quarantine).num_rows == hostile["after"]["quarantined_total"]
    for uri, manifest in ((out, pairs), (quarantine, aside)):
        folders = {f[len(uri) + 1:].split("/")[0] for f in storage.list_files(uri)}
        assert folders - {"_manifest.json", QUARANTINE_DIR} == {manifest.version}
