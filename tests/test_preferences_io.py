"""The preference stage's reads and its publish, without Ray: images named by hostile
data (resolved against the cohort, confined to it, read without blocking, under a
deadline) and a failure injected at every step of publishing pairs and quarantine, on a
local folder and on the S3 gateway.

The planted rows through the whole pipeline are in ``test_preferences_hostile.py``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from mint_ray import storage
from mint_ray.errors import StorageError
from mint_ray.preferences import run as run_module
from mint_ray.preferences import validate
from mint_ray.preferences.fetch import ImageSource, ReadPool, fetch_images
from tests.prefbuild import png_bytes

RULES = validate.Rules(task="tissue_type", labels=frozenset({"A"}), splits=frozenset({"train"}), needs_note=False,
                       needs_image=True, max_image_bytes=10_000, max_image_pixels=10**6)


def _verdict(source: ImageSource, uri: str) -> tuple[str | None, bytes | None]:
    """(reason or None, bytes) of resolving and reading ``uri``, failing the test on a hang."""
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(_read(source, uri)), daemon=True)
    worker.start()
    worker.join(10)
    assert out, f"reading {uri!r} blocked"
    return out[0]


def _read(source: ImageSource, uri: str) -> tuple[str | None, bytes | None]:
    resolved, verdict = source.resolve(uri)
    if verdict is None:
        data, verdict = source.read(resolved, RULES)  # type: ignore[arg-type]
        if verdict is None:
            return None, data
    return verdict.reason, None  # type: ignore[union-attr]


@pytest.fixture
def local_cohort(tmp_path: Path) -> dict[str, Any]:
    cohort = tmp_path / "cohorts" / "tt"
    (cohort / "images").mkdir(parents=True)
    good = png_bytes((20, 120, 200), 16)
    (cohort / "images" / "good.png").write_bytes(good)
    (cohort / "images" / "big.png").write_bytes(b"\x89PNG" + bytes(20_000))
    (cohort / "images" / "folder.png").mkdir()
    os.mkfifo(cohort / "images" / "fifo.png")
    os.symlink(cohort / "images" / "loop-b.png", cohort / "images" / "loop-a.png")
    os.symlink(cohort / "images" / "loop-a.png", cohort / "images" / "loop-b.png")
    (tmp_path / "outside.png").write_bytes(good)
    os.symlink(tmp_path / "outside.png", cohort / "images" / "escape.png")
    os.symlink("/dev/zero", cohort / "images" / "zero.png")
    os.symlink(cohort / "images" / "good.png", cohort / "images" / "alias.png")
    sibling = tmp_path / "cohorts" / "tt-evil"
    sibling.mkdir()
    (sibling / "x.png").write_bytes(good)
    return {"cohort": str(cohort), "good": good, "root": str(tmp_path)}


def test_local_image_uris_are_resolved_confined_and_read_without_blocking(local_cohort: dict[str, Any]) -> None:
    cohort, good = local_cohort["cohort"], local_cohort["good"]
    source = ImageSource.for_cohort(cohort, None, timeout_s=5)
    cases = {
        f"{cohort}/images/good.png": None, "images/good.png": None, "./images/../images/good.png": None,
        f"file://{cohort}/images/good.png": None, "images/alias.png": None,  # a symlink that stays inside
        "images/nope.png": "missing_image", "images/good.png/child": "missing_image",
        "images/folder.png": "unreadable_image", "images/fifo.png": "unreadable_image",
        "images/loop-a.png": "unreadable_image", "images/" + "x" * 300 + ".png": "unreadable_image",
        "images/big.png": "image_too_large",
        "/etc/passwd": "image_outside_cohort", "../../outside.png": "image_outside_cohort",
        f"{cohort}/../tt-evil/x.png": "image_outside_cohort", f"{cohort}-evil/x.png": "image_outside_cohort",
        "images/escape.png": "image_outside_cohort", "images/zero.png": "image_outside_cohort",
        "s3://other-bucket/x.png": "image_outside_cohort", ".": "image_outside_cohort",
        "images": "unreadable_image",
        "images/a\x00.png": "invalid_image_uri", "http://example.com/x.png": "invalid_image_uri",
        "ftp://x/y.png": "invalid_image_uri",
    }
    got = {uri: _verdict(source, uri) for uri in cases}
    assert {uri: reason for uri, (reason, _) in got.items()} == cases
    assert all(data == good for reason, data in got.values() if reason is None)
    # A wider image root lets a cohort use images beside it; relative URIs stay the cohort's.
    wide = ImageSource.for_cohort(cohort, local_cohort["root"], timeout_s=5)
    assert _verdict(wide, "../../outside.png") == (None, good)
    assert _verdict(wide, "/etc/passwd")[0] == "image_outside_cohort"
    assert wide.resolve("images/good.png") == (f"{cohort}/images/good.png", None)


def test_a_special_file_is_refused_before_any_read(tmp_path: Path) -> None:
    """Outside any confinement (no ``within``), a device or FIFO is still never read."""
    os.mkfifo(tmp_path / "fifo")
    for path, kind in (("/dev/zero", "not_a_file"), (str(tmp_path / "fifo"), "not_a_file"),
                       (str(tmp_path), "not_a_file"), (str(tmp_path / "none"), "missing")):
        with pytest.raises(storage.FileRefused) as refused:
            storage.read_file(path, 100)
        assert refused.value.kind == kind
    with pytest.raises(StorageError, match="NUL"):
        storage.resolve("a\x00b", str(tmp_path))


def test_a_hung_read_is_given_up_at_its_deadline_and_the_reads_after_it_go_on() -> None:
    """One thread: the hung read holds it, so the pool is replaced and the rest still run."""
    release = threading.Event()

    def read(item: str) -> str:
        if item == "hang":
            release.wait(30)
        return item.upper()

    pool = ReadPool(1)
    started = time.monotonic()
    try:
        results = pool.run(read, ["a", "hang", "b", "c"], timeout_s=0.5)
        assert results == [(True, "A"), (False, None), (True, "B"), (True, "C")]
        assert time.monotonic() - started < 5 and pool.abandoned == 1
        assert pool.run(read, ["d"], timeout_s=0.5) == [(True, "D")]  # the pool goes on working
    finally:
        release.set()


def test_reads_that_stay_hung_are_bounded_then_fail_the_run_clearly() -> None:
    """A dead store hangs every read: the abandoned threads stop at max_hung, with an
    error that names the setting, instead of growing with every batch."""
    release = threading.Event()
    pool = ReadPool(2, max_hung=3)
    try:
        assert pool.run(lambda item: release.wait(30), ["a", "b"], timeout_s=0.2) == [(False, None)] * 2
        with pytest.raises(StorageError, match=r"image_read_timeout_s 0\.2: the image store is not answering"):
            pool.run(lambda item: release.wait(30), ["c", "d"], timeout_s=0.2)
    finally:
        release.set()
    time.sleep(0.2)
    # Reads that came back no longer count: the same pool works again.
    assert pool.run(str.upper, ["e"], timeout_s=0.5) == [(True, "E")]


def test_fetch_turns_a_timeout_into_the_rows_verdict(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "slow.png").write_bytes(b"x")
    (tmp_path / "fast.png").write_bytes(b"y")
    source = ImageSource.for_cohort(str(tmp_path), None, timeout_s=0.3)
    real = storage.read_file

    def slow(uri: str, max_bytes: int, *, within: str | None = None) -> bytes:
        if uri.endswith("slow.png"):
            time.sleep(2)
        return real(uri, max_bytes, within=within)

    monkeypatch.setattr(storage, "read_file", slow)
    (_, late), (data, ok) = fetch_images(source, [f"{tmp_path}/slow.png", f"{tmp_path}/fast.png"], RULES, 2)
    assert late.reason == "image_read_timeout" and (data, ok) == (b"y", None)  # type: ignore[union-attr]


@pytest.mark.s3
def test_s3_image_uris_stay_in_the_cohorts_bucket_and_prefix(s3_bucket: str) -> None:
    from tests.conftest import make_bucket

    other = f"s3://{make_bucket('other')}"
    cohort = f"{s3_bucket}/cohorts/tt"
    good = png_bytes((20, 120, 200), 16)
    for uri, data in ((f"{cohort}/images/good.png", good), (f"{cohort}/images/big.png", bytes(20_000)),
                      (f"{s3_bucket}/cohorts/tt-evil/x.png", good), (f"{s3_bucket}/elsewhere.png", good),
                      (f"{other}/cohorts/tt/images/good.png", good)):
        storage.write_bytes(uri, data)
    source = ImageSource.for_cohort(cohort, None, timeout_s=30)
    cases = {
        f"{cohort}/images/good.png": None, "images/good.png": None, "images/./good.png": None,
        "images/nope.png": "missing_image", "images/big.png": "image_too_large",
        "images": "missing_image",  # a prefix, not an object
        f"{cohort}/../tt-evil/x.png": "image_outside_cohort", f"{cohort}-evil/x.png": "image_outside_cohort",
        "../../elsewhere.png": "image_outside_cohort", f"{s3_bucket}/../{other[5:]}/x.png": "image_outside_cohort",
        f"{other}/cohorts/tt/images/good.png": "image_outside_cohort", "/etc/passwd": "image_outside_cohort",
        "images/a\x00.png": "invalid_image_uri",
    }
    got = {uri: _verdict(source, uri) for uri in cases}
    assert {uri: reason for uri, (reason, _) in got.items()} == cases
    assert all(data == good for reason, data in got.values() if reason is None)


# ---------------------------------------------------------------- publishing pairs and quarantine as one


STEPS = ("read_manifest", "list_files", "read_bytes", "write_bytes", "exists", "delete_file", "delete_tree",
         "_write_manifest", "_version_dirs")


# The steps that write or delete: where S3 differs from a local folder.
WRITES = ("_write_manifest", "delete_file", "delete_tree")


class _FailAt:
    """Wraps the storage functions a publish uses; the ``n``-th call of any raises."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int, steps: tuple[str, ...]) -> None:
        self.n, self.calls, self.failed = n, 0, False
        for name in steps:
            monkeypatch.setattr(storage, name, self._wrap(name, getattr(storage, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self.n:
                self.failed = True
                raise StorageError(f"injected failure at step {self.n} ({name})")
            return fn(*args, **kwargs)
        return call


def _write_version(uri: str, rows: list[dict[str, Any]], overwrite: bool = True) -> str:
    version = storage.prepare_output(uri, overwrite)
    storage.write_table(version, pa.Table.from_pylist(rows), "part-00000.parquet")
    return version


def _publish(out: str, tag: str, fail_at: int | None = None, steps: tuple[str, ...] = STEPS) -> bool:
    """One run's publish as ``run`` does it (on failure, unnamed version folders go), with
    the ``fail_at``-th storage call of the publish failing; whether that call came."""
    quarantine = storage.join(out, run_module.QUARANTINE_DIR)
    pairs_version = _write_version(out, [{"sample_id": f"{tag}-{i}"} for i in range(3)])
    quarantine_version = _write_version(quarantine, [{"sample_id": f"{tag}-bad", "reason": "missing_image"}])
    with pytest.MonkeyPatch.context() as patch:
        failing = _FailAt(patch, fail_at, steps) if fail_at else None
        try:
            run_module.publish_outputs(out, pairs_version, quarantine, quarantine_version, {"run": tag},
                                       lambda q: {"run": tag, "quarantine": {"version": q.version}})
        except BaseException:
            for uri, version in ((out, pairs_version), (quarantine, quarantine_version)):
                run_module._abort_unless_named(uri, version)
            raise
    return bool(failing and failing.failed)


def _published(out: str) -> tuple[str, str]:
    """The run whose pairs and quarantine are published, checked to be whole and to name each other."""
    quarantine = storage.join(out, run_module.QUARANTINE_DIR)
    pairs, aside = storage.read_manifest(out), storage.read_manifest(quarantine)
    assert pairs is not None and aside is not None
    assert pairs.meta["quarantine"]["version"] == aside.version
    tags = {storage.read_dataset(out).column("sample_id")[0].as_py().split("-")[0],
            storage.read_dataset(quarantine).column("sample_id")[0].as_py().split("-")[0]}
    assert tags == {pairs.meta["run"]} == {aside.meta["run"]}
    return pairs.meta["run"], aside.meta["run"]


def _versions(uri: str) -> set[str]:
    return {f[len(uri) + 1:].split("/")[0] for f in storage.list_files(uri) if f[len(uri) + 1:].startswith("v-")}


def _fail_at_every_step(out: str, steps: tuple[str, ...] = STEPS) -> int:
    _publish(out, "old")
    n = 0
    while True:
        n += 1
        try:
            failed = _publish(out, "new", fail_at=n, steps=steps)
        except StorageError as err:
            assert "injected" in str(err)
            assert _published(out) == ("old", "old"), f"a failure at step {n} changed the published output"
            continue
        assert _published(out) == ("new", "new")
        if not failed:
            break
        _publish(out, "old")  # a failure while deleting old versions: new is published; start again
    # The next clean run leaves one version of each and nothing else.
    _publish(out, "next")
    quarantine = storage.join(out, run_module.QUARANTINE_DIR)
    assert _versions(out) == {storage.read_manifest(out).version}
    assert _versions(quarantine) == {storage.read_manifest(quarantine).version}
    return n


def test_a_failure_at_any_publish_step_leaves_pairs_and_quarantine_whole_and_in_step(tmp_path: Path) -> None:
    steps = _fail_at_every_step(str(tmp_path / "prefs"))
    assert steps > 10  # every manifest write, read and clean-up step had its turn


@pytest.mark.s3
def test_a_failure_at_any_publish_write_on_s3(s3_bucket: str) -> None:
    """The reads fail alike on both stores (above); the writes and deletes on the gateway."""
    assert _fail_at_every_step(f"{s3_bucket}/prefs", WRITES) == 5  # 2 manifests, 2 clean-ups, then none


def test_a_lost_answer_to_the_pairs_write_keeps_what_was_published(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pairs' manifest is written but the store's answer is lost: the run fails, yet
    nothing is rolled back or removed under the published pairs."""
    out = str(tmp_path / "prefs")
    _publish(out, "old")
    real = storage._write_manifest

    def written_then_lost(uri: str, manifest: storage.Manifest) -> None:
        real(uri, manifest)
        if uri == out:
            raise StorageError("connection reset after the PUT")

    monkeypatch.setattr(storage, "_write_manifest", written_then_lost)
    with pytest.raises(StorageError, match="connection reset"):
        _publish(out, "new")
    assert _published(out) == ("new", "new")
