"""One file at a URI (local or S3): its bytes read, written, streamed, listed and deleted,
every failure a ``StorageError`` that says why. Callers use ``mint_ray.storage``, which
re-exports these.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from mint_ray.errors import StorageError
from mint_ray.filesystems import _explain, bucket_of, filesystem, is_s3


def check_reachable(uri: str) -> None:
    """Fail fast (before any work) if ``uri``'s store or bucket cannot be used."""
    if not is_s3(uri):
        return
    fs, _ = filesystem(uri)
    bucket = bucket_of(uri)
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise _explain(uri, err, "s3:ListBucket") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist: create it first "
                           "(or fix the bucket name in the URI)")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise _explain(uri, err) from None


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    try:
        parent = path.rsplit("/", 1)[0]
        if not is_s3(uri):
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(data)
    except OSError as err:
        raise _explain(uri, err, "s3:PutObject") from None


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as err:
        raise _explain(uri, err, "s3:GetObject") from None


def upload_file(local_path: str | Path, uri: str) -> None:
    """Stream a local file to ``uri`` (multipart on S3): model shards of several GB never
    sit in memory whole."""
    fs, path = filesystem(uri)
    try:
        if not is_s3(uri):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(Path(local_path).absolute()), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs, chunk_size=8 * 2**20)
    except OSError as err:
        raise _explain(uri, err, "s3:PutObject") from None


def download_file(uri: str, local_path: str | Path) -> None:
    """Stream ``uri`` into a local file (parents created)."""
    fs, path = filesystem(uri)
    target = Path(local_path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                        chunk_size=8 * 2**20)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as err:
        raise _explain(uri, err, "s3:GetObject") from None


def delete_file(uri: str) -> None:
    """Remove one file; a file already gone is fine."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise _explain(uri, err, "s3:DeleteObject") from None


def delete_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except OSError as err:
        raise _explain(uri, err, "s3:DeleteObject") from None


def list_files(uri: str) -> list[str]:
    """Every file under ``uri`` as a full URI, sorted."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as err:
        raise _explain(uri, err, "s3:ListBucket") from None
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)
