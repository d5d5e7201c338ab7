"""Model folders: the metadata file, a node-local cache, publishing.

A model folder (a student, a teacher, a base checkpoint) is a Hugging Face
style directory, local or under ``s3://``. Training, evaluation, serving and
the teachers all read remote ones through :func:`local_copy`, which keeps one
copy per node:

- the entry is keyed by the URI and what identifies its content (the file
  listing and a small key file such as the metadata or ``config.json``), so a
  model re-published to the same URI is fetched again;
- the first process on the node takes a file lock and downloads into a
  private temporary folder that is renamed into place when complete; the
  others wait on the lock and then read the finished copy (8 ranks of a node
  download once, and nobody loads a half-written file);
- the cache root is ``MINT_RAY_CACHE`` (a mounted volume on a cluster),
  else ``~/.cache/mint-ray``.

Publishing writes the marker file (the metadata) last, so a reader that sees
the marker sees a complete folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mint_ray import storage
from mint_ray.errors import MintError

# A student's description (task, kind, objective, base model, training summary, prompt).
METADATA_FILE = "mint_model.json"
# Written inside a cache entry once it is complete.
_COMPLETE = ".complete"


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise MintError(f"{model_dir} is not a mint-ray model directory (no {METADATA_FILE})")
    return json.loads(path.read_text())


def write_metadata(model_dir: str | Path, metadata: dict[str, Any]) -> None:
    Path(model_dir, METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))


# ---------------------------------------------------------------- node-local cache


def cache_root() -> Path:
    return Path(os.environ.get("MINT_RAY_CACHE") or "~/.cache/mint-ray").expanduser()


def cache_key(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:24]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """``<cache root>/<kind>/<key>``, built once per node by ``build(folder)``.

    ``build`` fills a private folder; it becomes the entry only when complete,
    under a lock, so concurrent callers build it once and never see it half-made.
    """
    root = cache_root() / kind
    final = root / key
    if (final / _COMPLETE).exists():
        return final
    with _locked(root / f".{key}.lock"):
        if (final / _COMPLETE).exists():
            return final
        shutil.rmtree(final, ignore_errors=True)  # an entry left incomplete by a killed process
        tmp = root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            (tmp / _COMPLETE).write_text(key)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def download_dir(uri: str, target: str | Path) -> Path:
    """Copy every file under ``uri`` (s3:// or local) into ``target``."""
    files = storage.list_files(uri)
    if not files:
        raise MintError(f"{uri}: no files there; check the URI")
    prefix = _listing_prefix(uri)
    out = Path(target)
    for file_uri in files:
        storage.download_file(file_uri, out / file_uri[len(prefix):])  # streamed: shards are GBs
    return out


def _listing_prefix(uri: str) -> str:
    """What :func:`storage.list_files` puts before a file's path inside ``uri``."""
    root = uri.rstrip("/")
    return (root if storage.is_s3(root) else str(Path(root).absolute())) + "/"


def local_copy(uri: str, key_file: str = METADATA_FILE) -> Path:
    """A local folder holding the model folder at ``uri``.

    A local path is used in place. An ``s3://`` folder is downloaded once per
    node into the cache; the entry is keyed by the URI, the file names and the
    content of ``key_file`` (falling back to ``config.json``), so re-published
    weights are fetched again.
    """
    if not storage.is_s3(uri):
        path = Path(storage.filesystem(uri)[1])
        if not path.is_dir():
            raise MintError(f"model directory {uri!r} does not exist")
        return path
    files = storage.list_files(uri)
    if not files:
        raise MintError(f"{uri}: no files there; check the URI")
    prefix = _listing_prefix(uri)
    names = [f[len(prefix):] for f in files]
    marker = next((name for name in (key_file, "config.json") if name in names), None)
    if marker is None:
        raise MintError(f"{uri}: neither {key_file} nor config.json there; check the URI")
    key = cache_key(uri, *names, storage.read_bytes(prefix + marker))
    return cached("models", key, lambda tmp: download_dir(uri, tmp))


# ---------------------------------------------------------------- publishing


def publish_dir(local_dir: str | Path, uri: str, *, marker: str = METADATA_FILE,
                overwrite: bool = False) -> str:
    """Copy a local folder to ``uri`` with ``marker`` written last.

    A folder already at ``uri`` (its marker exists) is refused unless
    ``overwrite``; its old files are then removed first.
    """
    storage.check_reachable(uri)
    if storage.exists(storage.join(uri, marker)):
        if not overwrite:
            raise MintError(f"{uri} already holds a model: pass --overwrite "
                            "(storage.overwrite=true) or choose another output URI")
        storage.delete_tree(uri)
    base = Path(local_dir)
    files = sorted((p for p in base.rglob("*") if p.is_file()), key=lambda p: (p.name == marker, str(p)))
    for path in files:  # streamed (multipart on S3): a shard of several GB never sits in memory
        storage.upload_file(path, storage.join(uri, path.relative_to(base).as_posix()))
    return uri
