"""Tables and blobs at a URI: a local path or ``s3://bucket/prefix``; the one module
callers import for storage.

Its parts, re-exported here: ``filesystems`` (URIs, the pyarrow filesystem that serves
one, S3's errors explained), ``blobs`` (one file's bytes) and ``untrusted_files`` (files
named by data). Only these talk to a filesystem. Datasets are written and read here.

A *dataset* is a folder with a ``_manifest.json`` naming the files of its
current version (``<uri>/v-<id>/...``). Writers fill a fresh version folder,
then publish it by writing the manifest (one PUT, atomic on S3), then delete
older versions. Readers only follow the manifest, so a crash mid-write never
shows a half dataset, and a re-run replaces the data instead of adding to it.
``publish`` and ``remove_older`` are the two halves of ``commit``, for writers that
publish several datasets as one.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mint_ray.blobs import (
    check_reachable,
    delete_file,
    delete_tree,
    download_file,
    exists,
    list_files,
    read_bytes,
    upload_file,
    write_bytes,
)
from mint_ray.errors import StorageError
from mint_ray.filesystems import (
    _explain,
    absolute,
    bucket_of,
    credential_source,
    denied_hint,
    filesystem,
    is_s3,
    join,
    redact,
)
from mint_ray.untrusted_files import FileRefused, is_within, read_file, resolve

# Callers use storage.X for all of these. The dataset functions below call them by their
# names in this module, so a test that patches ``storage.write_bytes`` (say) reaches every
# step of a publish.
__all__ = [
    "MANIFEST",
    "FileRefused",
    "Manifest",
    "abort",
    "absolute",
    "bucket_of",
    "check_reachable",
    "commit",
    "credential_source",
    "delete_file",
    "delete_tree",
    "denied_hint",
    "download_file",
    "exists",
    "filesystem",
    "is_s3",
    "is_within",
    "iter_batches",
    "iter_file_batches",
    "join",
    "list_files",
    "new_version_uri",
    "prepare_output",
    "publish",
    "read_bytes",
    "read_dataset",
    "read_dataset_schema",
    "read_file",
    "read_manifest",
    "redact",
    "remove_older",
    "require_manifest",
    "resolve",
    "restore_manifest",
    "upload_file",
    "write_bytes",
    "write_dataset",
    "write_table",
]

MANIFEST = "_manifest.json"


@dataclass
class Manifest:
    """What a committed dataset holds: the files of its current version and a hash."""

    version: str
    files: list[str]
    num_rows: int
    content_hash: str
    created_at: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def read_manifest(uri: str) -> Manifest | None:
    """The committed manifest at ``uri``, or None when no complete dataset is there."""
    if not exists(join(uri, MANIFEST)):
        return None
    data = json.loads(read_bytes(join(uri, MANIFEST)))
    return Manifest(**data)


def new_version_uri(uri: str) -> str:
    """A fresh folder inside ``uri`` to write the next version into."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return join(uri, f"v-{stamp}-{uuid.uuid4().hex[:8]}")


def prepare_output(uri: str, overwrite: bool) -> str:
    """Check ``uri`` may be written and return a fresh version folder for the writer.

    A complete dataset already there is refused unless ``overwrite``.
    """
    check_reachable(uri)
    if read_manifest(uri) is not None and not overwrite:
        raise StorageError(f"{uri} already holds a complete dataset: pass --overwrite to replace it "
                           "or choose another output URI")
    return new_version_uri(uri)


def _hash_files(files: list[str]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.rsplit("/", 1)[-1].encode())
        digest.update(read_bytes(f))
    return digest.hexdigest()


def commit(uri: str, version_uri: str, meta: dict[str, Any] | None = None,
           hash_suffixes: tuple[str, ...] = (".parquet",)) -> Manifest:
    """Publish the Parquet files written under ``version_uri`` as the dataset at ``uri``.

    Older versions are deleted only after the new manifest is in place.
    """
    manifest = publish(uri, version_uri, meta, hash_suffixes)
    remove_older(uri, manifest.version)
    return manifest


def publish(uri: str, version_uri: str, meta: dict[str, Any] | None = None,
            hash_suffixes: tuple[str, ...] = (".parquet",)) -> Manifest:
    """The first half of :func:`commit`: write the manifest naming the Parquet files under
    ``version_uri`` (the publish point: one PUT on S3, a rename locally), keeping older
    versions, so that several datasets can be published before any old one goes."""
    files = [f for f in list_files(version_uri) if f.endswith(".parquet")]
    num_rows = 0
    for f in files:
        fs, path = filesystem(f)
        num_rows += pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
    manifest = Manifest(version=version_uri.rsplit("/", 1)[-1], files=files, num_rows=num_rows,
                        content_hash=_hash_files([f for f in files if f.endswith(hash_suffixes)]),
                        created_at=time.time(), meta=meta or {})
    _write_manifest(uri, manifest)
    return manifest


def _write_manifest(uri: str, manifest: Manifest) -> None:
    target = join(uri, MANIFEST)
    if is_s3(uri):
        write_bytes(target, manifest.to_json().encode())
        return
    # A local write is not atomic: write beside it, then rename over it.
    temporary = join(uri, f".{MANIFEST}.{uuid.uuid4().hex[:8]}")
    write_bytes(temporary, manifest.to_json().encode())
    try:
        pafs.LocalFileSystem().move(filesystem(temporary)[1], filesystem(target)[1])
    except OSError as err:
        delete_file(temporary)
        raise _explain(target, err) from None


def restore_manifest(uri: str, previous: Manifest | None) -> None:
    """Put back the manifest ``uri`` had before a :func:`publish` (none: remove it)."""
    if previous is None:
        delete_file(join(uri, MANIFEST))
    else:
        _write_manifest(uri, previous)


def remove_older(uri: str, keep: str) -> None:
    """The second half of :func:`commit`: delete every version folder but ``keep``."""
    for old in _version_dirs(uri):
        if old.rstrip("/").rsplit("/", 1)[-1] != keep:
            delete_tree(old)


def abort(version_uri: str) -> None:
    """Remove an unpublished version folder (after a failed write)."""
    delete_tree(version_uri)


def _version_dirs(uri: str) -> list[str]:
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as err:
        raise _explain(uri, err) from None
    prefix = "s3://" if is_s3(uri) else ""
    return [prefix + i.path for i in infos
            if i.type == pafs.FileType.Directory and i.path.rsplit("/", 1)[-1].startswith("v-")]


def write_table(version_uri: str, table: pa.Table, name: str = "part-00000.parquet") -> str:
    """Write one Parquet file into a version folder; returns its URI."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    target = join(version_uri, name)
    write_bytes(target, buf.getvalue())
    return target


def write_dataset(uri: str, table: pa.Table, *, overwrite: bool = False,
                  meta: dict[str, Any] | None = None) -> Manifest:
    """Write ``table`` as the complete dataset at ``uri`` (refuses to replace unless overwrite)."""
    version = prepare_output(uri, overwrite)
    try:
        write_table(version, table)
        return commit(uri, version, meta)
    except BaseException:
        abort(version)
        raise


def require_manifest(uri: str) -> Manifest:
    manifest = read_manifest(uri)
    if manifest is None:
        check_reachable(uri)
        raise StorageError(f"{uri}: no complete dataset here (no {MANIFEST}); "
                           "write it first or check the URI")
    return manifest


def read_dataset(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read the committed dataset at ``uri`` into one table."""
    manifest = require_manifest(uri)
    tables = []
    for f in manifest.files:
        fs, path = filesystem(f)
        try:
            tables.append(pq.read_table(path, filesystem=fs, columns=columns))
        except OSError as err:
            raise _explain(f, err) from None
    return pa.concat_tables(tables) if tables else pa.table({})


def iter_batches(uri: str, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    for _, batch in iter_file_batches(uri, batch_size):
        yield batch


def iter_file_batches(uri: str, batch_size: int = 1024) -> Iterator[tuple[str, pa.RecordBatch]]:
    """The committed dataset's batches, each with the URI of the file it comes from (in
    file order, so a row's position in its file can be counted)."""
    for f in require_manifest(uri).files:
        fs, path = filesystem(f)
        try:
            for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=batch_size):
                yield f, batch
        except FileNotFoundError:
            raise StorageError(f"{f}: named by the manifest of {uri} but missing; re-write the dataset") from None
        except OSError as err:
            raise _explain(f, err) from None
        except pa.ArrowException as err:  # a broken Parquet file: the dataset's fault, said once
            raise StorageError(f"{f}: not readable Parquet ({str(err)[:200]}); re-write the dataset") from None


def read_dataset_schema(uri: str) -> pa.Schema:
    """The schema of a committed dataset (from its first file's footer, no data read)."""
    manifest = require_manifest(uri)
    if not manifest.files:
        return pa.schema([])
    fs, path = filesystem(manifest.files[0])
    return pq.read_schema(fs.open_input_file(path))
