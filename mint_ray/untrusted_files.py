"""Files named by data rather than config (a cohort's image URIs), which may be hostile.

They are resolved with ``resolve``, kept inside a folder with ``is_within`` and read with
``read_file``: regular files only, never blocking, at most a given size. Callers use
``mint_ray.storage``, which re-exports these.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat

from mint_ray.errors import StorageError
from mint_ray.filesystems import _explain, absolute, filesystem, is_s3, join


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
