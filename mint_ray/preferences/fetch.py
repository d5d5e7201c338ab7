"""A cohort's images, read as untrusted references: resolved against the cohort, kept
inside it, each read under a deadline.

An ``image_uri`` is data, not config: it may be relative (taken inside the cohort's
folder), absolute, ``file://`` or ``s3://``, and it may point anywhere. :class:`ImageSource`
resolves it (:func:`mint_ray.storage.resolve`, dot segments folded), refuses what leaves
the image root (the cohort's folder unless ``image_root`` says otherwise; symlinks are
followed by the read) and reads it with :func:`mint_ray.storage.read_file` (regular files
only, non-blocking opens, the byte limit before the body). :class:`ReadPool` runs the reads
on threads, each under ``image_read_timeout_s``: a read past it is given up and its row
quarantined, and the pool is replaced, so a hung read never holds up the reads after it.

Every failure of one image is that row's verdict (``invalid_image_uri``,
``image_outside_cohort``, ``missing_image``, ``unreadable_image``, ``image_read_timeout``,
``image_too_large``); only the store's own failure (endpoint down, credentials refused)
fails the run. No Ray here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from mint_ray import storage
from mint_ray.errors import StorageError
from mint_ray.preferences import validate

# FileRefused.kind -> the quarantine reason.
_REASONS = {"missing": "missing_image", "outside": "image_outside_cohort", "not_a_file": "unreadable_image",
            "unreadable": "unreadable_image", "timeout": "image_read_timeout"}


@dataclass(frozen=True)
class ImageSource:
    """Where a cohort's images may come from: ``base`` (the cohort's folder; relative URIs
    are taken inside it), ``root`` (every image must lie inside it) and the read deadline."""

    base: str
    root: str
    timeout_s: float

    @classmethod
    def for_cohort(cls, cohort_uri: str, image_root: str | None, timeout_s: float) -> ImageSource:
        base = storage.resolve(cohort_uri, "/") if storage.is_s3(cohort_uri) else storage.absolute(cohort_uri)
        root = image_root or base
        return cls(base, storage.resolve(root, "/") if storage.is_s3(root) else storage.absolute(root), timeout_s)

    def resolve(self, uri: str) -> tuple[str | None, validate.Verdict | None]:
        """The URI to read, or why it is not read (no I/O)."""
        try:
            resolved = storage.resolve(uri.strip(), self.base)
        except StorageError as err:
            return None, validate.Verdict("invalid_image_uri", str(err)[:200])
        if not storage.is_within(resolved, self.root):
            return None, validate.Verdict("image_outside_cohort", f"resolves outside the image root {self.root}")
        return resolved, None

    def read(self, resolved: str, rules: validate.Rules) -> tuple[bytes | None, validate.Verdict | None]:
        """A resolved URI's bytes, or why not (the byte limit checked before reading)."""
        try:
            return storage.read_file(resolved, rules.max_image_bytes, within=self.root), None
        except storage.FileRefused as err:
            if err.kind == "too_large":
                return None, validate.check_image_size(err.size or rules.max_image_bytes + 1, rules)
            return None, validate.Verdict(_REASONS.get(err.kind, "unreadable_image"), err.detail)


class ReadPool:
    """Threads for reads (S3 GETs wait on the network without the GIL), each read under a
    deadline. A read past it is given up: its thread is left to finish or hang, the pool is
    replaced and the reads not started yet move to the new one. More than ``max_hung``
    reads hung at once fail the run (:class:`StorageError`): threads cannot be stopped,
    so they are bounded instead."""

    def __init__(self, threads: int, max_hung: int | None = None) -> None:
        self.threads = threads
        # Python cannot stop a thread: past this many reads still hung, the store itself
        # is down (a dead mount, a stalled endpoint) and the run stops rather than grow.
        self.max_hung = max_hung if max_hung is not None else max(16, 4 * threads)
        self._pool = self._new()
        self.abandoned = 0  # reads given up, whose threads may still be running
        self._hung: set[Future[Any]] = set()

    def _new(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="mint-fetch")

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any], timeout_s: float) -> list[tuple[bool, Any]]:
        """``fn(item)`` for every item: ``(True, result)``, or ``(False, None)`` where the call
        ran past ``timeout_s`` (counted from its start, not from when it was queued)."""
        started: dict[int, float] = {}
        lock = threading.Lock()

        def call(i: int) -> Any:
            with lock:
                started[i] = time.monotonic()
            return fn(items[i])

        index: dict[Future[Any], int] = {self._pool.submit(call, i): i for i in range(len(items))}
        results: list[tuple[bool, Any]] = [(False, None)] * len(items)
        pending = set(index)
        while pending:
            with lock:
                begun = [started[index[f]] for f in pending if index[f] in started]
            wait_s = max(0.0, min(begun) + timeout_s - time.monotonic()) if begun else timeout_s
            done, pending = wait(pending, timeout=wait_s, return_when=FIRST_COMPLETED)
            for future in done:
                results[index[future]] = (True, future.result())
            now = time.monotonic()
            with lock:
                late = {f for f in pending if index[f] in started and now - started[index[f]] >= timeout_s}
            if late:
                pending = self._replace(pending - late, index, call)
                self.abandoned += len(late)
                self._check_hung(late, timeout_s)
        return results

    def _check_hung(self, late: set[Future[Any]], timeout_s: float) -> None:
        self._hung = {f for f in self._hung | late if not f.done()}
        if len(self._hung) > self.max_hung:
            raise StorageError(
                f"{len(self._hung)} image reads have not returned, each given up after "
                f"image_read_timeout_s {timeout_s:g}: the image store is not answering (a hung "
                f"mount or endpoint). Fix the store and run again; published data is unchanged")

    def _replace(self, pending: set[Future[Any]], index: dict[Future[Any], int],
                 call: Callable[[int], Any]) -> set[Future[Any]]:
        """A fresh pool for the reads that have not started; the running ones finish where
        they are."""
        old, self._pool = self._pool, self._new()
        moved = set()
        for future in pending:
            if future.cancel():
                moved.add(future)
        for future in moved:
            i = index.pop(future)
            replacement = self._pool.submit(call, i)
            index[replacement] = i
            pending = (pending - {future}) | {replacement}
        old.shutdown(wait=False)
        return pending


_POOLS: dict[int, ReadPool] = {}


def read_pool(threads: int) -> ReadPool:
    """One read pool per worker process and size, kept across its tasks."""
    if threads not in _POOLS:
        _POOLS[threads] = ReadPool(threads)
    return _POOLS[threads]


def fetch_images(source: ImageSource, uris: Sequence[str], rules: validate.Rules,
                 threads: int) -> list[tuple[bytes | None, validate.Verdict | None]]:
    """Each resolved URI's bytes or the verdict why not, reads overlapping on ``threads``."""
    outcomes = read_pool(threads).run(lambda uri: source.read(uri, rules), uris, source.timeout_s)
    return [result if finished else
            (None, validate.Verdict("image_read_timeout", f"no answer within image_read_timeout_s "
                                                          f"{source.timeout_s:g}"))
            for finished, result in outcomes]
