"""Tables and blobs at a URI: a local path or ``s3://bucket/prefix``.

The only module that talks to a filesystem. S3 goes through pyarrow with the
endpoint from ``AWS_ENDPOINT_URL``, so any S3-compatible store works.

A *dataset* is a folder with a ``_manifest.json`` naming the files of its
current version (``<uri>/v-<id>/...``). Writers fill a fresh version folder,
then publish it by writing the manifest (one PUT, atomic on S3), then delete
older versions. Readers only follow the manifest, so a crash mid-write never
shows a half dataset, and a re-run replaces the data instead of adding to it.
``publish`` and ``remove_older`` are the two halves of ``commit``, for writers that
publish several datasets as one.

Files named by data rather than config (a cohort's image URIs) are resolved with
``resolve``, kept inside a folder with ``is_within`` and read with ``read_file``:
regular files only, never blocking, at most a given size.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mint_ray.errors import StorageError

MANIFEST = "_manifest.json"

# Ceph's gateway (and other S3 stores) answer 411 to the AWS SDK's default
# streaming checksums; "when_required" restores plain Content-Length uploads.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")


def redact(message: str) -> str:
    """Remove any credential held in the environment from ``message``."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            message = message.replace(value, "***")
    return re.sub(r"(?i)(secret[_-]?(access[_-]?)?key\s*[=:]\s*)\S+", r"\1***", message)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (also for local paths)."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs.update(endpoint_override=rest or scheme, scheme=scheme if rest else "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                      secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    # Short timeouts and few retries: an unreachable endpoint must fail in
    # seconds with a clear message, not hang a job.
    return pafs.S3FileSystem(connect_timeout=5, request_timeout=60,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
                             **kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    if is_s3(uri):
        return _s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())


# The IAM action S3 checks for each request pyarrow names in its errors ("during X operation").
_OPERATION_ACTIONS = {
    "HeadBucket": "s3:ListBucket", "ListObjects": "s3:ListBucket", "ListObjectsV2": "s3:ListBucket",
    "HeadObject": "s3:GetObject", "GetObject": "s3:GetObject", "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject", "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject", "CopyObject": "s3:GetObject + s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload", "DeleteObject": "s3:DeleteObject",
    "DeleteObjects": "s3:DeleteObject",
}
_BUCKET_ACTIONS = {"s3:ListBucket"}


def credential_source() -> str:
    """Who this process is to S3: an access key from the environment, or a role."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "the access key in AWS_ACCESS_KEY_ID"
    if os.environ.get("AWS_ROLE_ARN"):
        return f"the role {os.environ['AWS_ROLE_ARN']} (service account, IRSA)"
    return "this node's role (instance profile or pod identity)"


def denied_hint(uri: str, text: str, action: str | None = None) -> str:
    """What was refused, on which resource, and for whom: the S3 action and the ARN (from
    pyarrow's message when it names the request), worded for keys or for roles."""
    m = re.search(r"during (\w+) operation", text)
    operation = m.group(1) if m else None
    action = _OPERATION_ACTIONS.get(operation or "", action) or "the request"
    bucket = bucket_of(uri)
    km = re.search(r"key '([^']*)' in bucket '([^']*)'", text)
    key = km.group(1) if km else uri[len("s3://"):].split("/", 1)[1] if "/" in uri[len("s3://"):] else ""
    bucket = km.group(2) if km else bucket
    if action in _BUCKET_ACTIONS:
        resource = f"arn:aws:s3:::{bucket}" + (f" (prefix {key!r})" if key and operation != "HeadBucket" else "")
    else:
        resource = f"arn:aws:s3:::{bucket}/{key}"
    what = f"{action} on {resource}" + (f" ({operation})" if operation else "")
    note = (" (S3 answers 403, not 404, for a missing key where s3:ListBucket is not allowed)"
            if operation == "HeadObject" else "")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return (f"S3 refused the credentials or the permission: {what}, for the access key in "
                "AWS_ACCESS_KEY_ID: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and that the key's "
                f"policy allows {action} there{note}")
    return (f"S3 denied {what} to {credential_source()}: the role's policy must allow {action} there "
            f"(infra/terraform/iam.tf: stage_prefixes read/write, input_prefixes read){note}")


def _explain(uri: str, err: Exception, action: str | None = None) -> StorageError:
    text = str(err)
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
    if "NETWORK_CONNECTION" in text or "Couldn't connect" in text or "curlCode: 7" in text:
        hint = f"cannot reach the S3 endpoint {endpoint}: check AWS_ENDPOINT_URL and that the server is up"
    elif "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text:
        hint = f"bucket {bucket_of(uri)!r} does not exist: create it first"
    elif "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        hint = ("S3 refused the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                if os.environ.get("AWS_ACCESS_KEY_ID") else
                f"S3 refused the credentials of {credential_source()}: check the role and the clock")
    elif "ACCESS_DENIED" in text or "AccessDenied" in text:
        hint = denied_hint(uri, text, action)
    else:
        hint = text.splitlines()[0] if text else type(err).__name__
    return StorageError(redact(f"{uri}: {hint}"))


def absolute(uri: str) -> str:
    """``uri`` with a local path made absolute (Ray workers run in other directories)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", uri) and not uri.startswith("file:/"):
        return uri  # s3://..., models:/...
    return filesystem(uri)[1]


def bucket_of(uri: str) -> str:
    return uri[len("s3://"):].split("/", 1)[0] if is_s3(uri) else ""


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


# ---------------------------------------------------------------- files named by data


class FileRefused(StorageError):
    """A file named by untrusted data (a cohort's ``image_uri``) that is not read.

    ``kind``: ``missing`` (no such file), ``outside`` (a symlink leads out of the allowed
    folder), ``not_a_file`` (a folder, FIFO, device or socket), ``too_large`` (``size`` is
    set), ``unreadable`` (a symlink loop, a name too long, no permission, a failing GET of
    that object) or ``timeout`` (the store's own request timeout)."""

    def __init__(self, kind: str, detail: str, size: int | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.size = kind, detail, size


def resolve(uri: str, base: str) -> str:
    """``uri`` as an absolute URI without ``.``/``..`` segments: a relative path is taken
    inside the folder ``base`` (a local path or ``s3://``), ``file://`` is dropped, and dot
    segments are folded lexically (symlinks are :func:`read_file`'s concern). A NUL or a
    scheme no store serves is a :class:`StorageError`."""
    if "\x00" in uri:
        raise StorageError("a NUL character in the URI")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri) and not uri.startswith(("s3://", "file://")):
        raise StorageError(f"unsupported URI scheme {uri.split('://', 1)[0]!r}: use a path or s3://bucket/key")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if not is_s3(path) and not path.startswith("/"):
        path = join(base if is_s3(base) else absolute(base), path)
    if is_s3(path):
        bucket, _, key = path[len("s3://"):].partition("/")
        key = posixpath.normpath(key) if key else ""
        return f"s3://{bucket}/{'' if key == '.' else key}"
    return "/" + posixpath.normpath(path).lstrip("/")


def is_within(uri: str, root: str) -> bool:
    """Whether ``uri`` (as :func:`resolve` returns it) lies inside the folder ``root``: the
    same store and bucket, and a path below it (``/a/bc`` is not inside ``/a/b``)."""
    if is_s3(uri) != is_s3(root):
        return False
    top = (resolve(root, "/") if is_s3(root) else "/" + posixpath.normpath(absolute(root)).lstrip("/")).rstrip("/")
    rest = uri[len(top) + 1:]
    # An S3 key may climb out of its bucket ("s3://b/../c"): folded, it starts with "..".
    return uri.startswith(top + "/") and bool(rest) and rest != ".." and not rest.startswith("../")


def read_file(uri: str, max_bytes: int, *, within: str | None = None) -> bytes:
    """The bytes of a file named by untrusted data, or :class:`FileRefused` saying why not.

    Local: symlinks are followed and the real path must stay inside ``within``; the file is
    opened non-blocking, without following a last symlink, and must be a regular file
    (``fstat`` of the open descriptor), so a FIFO or a device never blocks or floods a read;
    at most ``max_bytes`` are read. S3: the object's size is checked before its body is
    read; a missing key is ``missing``, any other failure of that object ``unreadable``.
    The store's own failure (endpoint down, credentials refused) is a :class:`StorageError`:
    it is no row's fault.
    """
    if is_s3(uri):
        return _read_object(uri, max_bytes)
    path = filesystem(uri)[1]
    real = os.path.realpath(path)
    if within is not None and not is_within(real, os.path.realpath(filesystem(within)[1])):
        raise FileRefused("outside", "a symlink leads outside the allowed folder")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise FileRefused("missing", "no file there") from None
    except (OSError, ValueError) as err:
        raise FileRefused("unreadable", _os_reason(err)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused("not_a_file", f"not a regular file but a {_file_type(info.st_mode)}")
        if info.st_size > max_bytes:
            raise FileRefused("too_large", f"{info.st_size} bytes", size=info.st_size)
        chunks, size = [], 0
        while size <= max_bytes and (chunk := os.read(fd, min(8 * 2**20, max_bytes + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:  # grew since fstat
            raise FileRefused("too_large", f"over {max_bytes} bytes", size=size)
        return b"".join(chunks)
    except OSError as err:
        raise FileRefused("unreadable", _os_reason(err)) from None
    finally:
        os.close(fd)


def _os_reason(err: Exception) -> str:
    """An OS error without the path (paths named by data can be long and hostile)."""
    if isinstance(err, OSError) and err.errno is not None:
        return f"{errno.errorcode.get(err.errno, err.errno)}: {os.strerror(err.errno)}"
    return f"{type(err).__name__}: {str(err)[:120]}"


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _store_failure(text: str) -> bool:
    """Errors that say the store cannot be used at all, not that one object is bad."""
    return any(marker in text for marker in ("NETWORK_CONNECTION", "Couldn't connect", "curlCode: 7,",
                                             "InvalidAccessKeyId", "SignatureDoesNotMatch"))


def _read_object(uri: str, max_bytes: int) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            size = f.size()
            if size > max_bytes:
                raise FileRefused("too_large", f"{size} bytes", size=size)
            return f.read()
    except FileRefused:
        raise
    except FileNotFoundError:
        raise FileRefused("missing", "no object there") from None
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
        text = str(err)
        if _store_failure(text):
            raise _explain(uri, err, "s3:GetObject") from None
        if "curlCode: 28" in text or "timed out" in text.lower():
            raise FileRefused("timeout", "the store's request timeout") from None
        reason = _explain(uri, err, "s3:GetObject") if isinstance(err, OSError) else err
        raise FileRefused("unreadable", str(reason)[:300]) from None


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


# ---------------------------------------------------------------- datasets


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
