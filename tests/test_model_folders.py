"""The one module for model folders: metadata, the node-local cache, publishing."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from mint_ray import model_folders, storage
from mint_ray.errors import MintError
from mint_ray.model_folders import METADATA_FILE


def _build_slowly(tmp: Path, log: str) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)  # long enough for every other process to arrive while this one builds
    (tmp / "weights.bin").write_bytes(b"w" * 1000)


def _cache_from_process(cache: str, log: str, out: multiprocessing.Queue) -> None:
    os.environ["MINT_RAY_CACHE"] = cache
    path = model_folders.cached("models", "k1", lambda tmp: _build_slowly(tmp, log))
    out.put((str(path), (path / "weights.bin").stat().st_size))


def test_four_processes_build_one_entry_once(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_cache_from_process, args=(str(tmp_path / "cache"), str(log), out))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert len(log.read_text().splitlines()) == 1  # built (downloaded) once
    assert {r for r in results} == {(str(tmp_path / "cache" / "models" / "k1"), 1000)}
    entries = [p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")]
    assert entries == ["k1"]
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".tmp-")]


def test_a_failed_build_leaves_no_entry_and_the_next_call_builds(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINT_RAY_CACHE", str(tmp_path))

    def broken(tmp: Path) -> None:
        (tmp / "half").write_bytes(b"x")
        raise OSError("link down")

    with pytest.raises(OSError):
        model_folders.cached("models", "k", broken)
    assert not (tmp_path / "models" / "k").exists()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".tmp-")]
    good = model_folders.cached("models", "k", lambda tmp: (tmp / "w").write_bytes(b"ok"))
    assert (good / "w").read_bytes() == b"ok"


def _model(tmp: Path, weights: bytes) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text('{"model_type": "llama"}')
    (tmp / "sub").mkdir(exist_ok=True)
    (tmp / "sub" / "model.safetensors").write_bytes(weights)
    model_folders.write_metadata(tmp, {"task": "rare_disease", "weights": weights.decode()})
    return tmp


def test_publish_writes_the_marker_last_and_refuses_to_overwrite(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    src = _model(tmp_path / "src", b"v1")
    dest = str(tmp_path / "published")
    written: list[str] = []
    real_upload = storage.upload_file  # streamed, not read whole (shards are GBs)
    monkeypatch.setattr(storage, "upload_file", lambda path, uri: (written.append(uri), real_upload(path, uri)))
    model_folders.publish_dir(src, dest)
    assert written[-1].endswith(METADATA_FILE) and len(written) == 3
    assert model_folders.read_metadata(dest)["weights"] == "v1"
    with pytest.raises(MintError, match="already holds a model"):
        model_folders.publish_dir(src, dest)
    model_folders.publish_dir(_model(tmp_path / "v2", b"v2"), dest, overwrite=True)
    assert model_folders.read_metadata(dest)["weights"] == "v2"


def test_local_paths_are_used_in_place(tmp_path: Path) -> None:
    src = _model(tmp_path / "m", b"v1")
    assert model_folders.local_copy(str(src)) == src
    with pytest.raises(MintError, match="does not exist"):
        model_folders.local_copy(str(tmp_path / "missing"))


@pytest.mark.s3
def test_s3_folder_is_fetched_once_and_again_when_republished(s3_bucket: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINT_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/student"
    model_folders.publish_dir(_model(tmp_path / "v1", b"v1"), uri)
    first = model_folders.local_copy(uri)
    assert (first / "sub" / "model.safetensors").read_bytes() == b"v1"
    stamp = (first / "sub" / "model.safetensors").stat().st_mtime_ns
    assert model_folders.local_copy(uri) == first
    assert (first / "sub" / "model.safetensors").stat().st_mtime_ns == stamp  # not downloaded again
    model_folders.publish_dir(_model(tmp_path / "v2", b"v2"), uri, overwrite=True)
    second = model_folders.local_copy(uri)
    assert second != first and (second / "sub" / "model.safetensors").read_bytes() == b"v2"
    with pytest.raises(MintError, match="no files there"):
        model_folders.local_copy(f"{s3_bucket}/models/none")
