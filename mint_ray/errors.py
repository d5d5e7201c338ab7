"""User-facing errors: one clear line that names the problem and the fix."""

from __future__ import annotations

import re
from collections.abc import Iterator


class MintError(Exception):
    """An error caused by input or configuration, shown to the user as one line.

    The CLI prints ``str(err)`` and exits with code 2; no traceback, since the
    message already says what to change.
    """


class ConfigError(MintError):
    """A recipe or override that does not fit the stage's typed config."""


class StorageError(MintError):
    """A URI that cannot be read or written (missing bucket, bad credentials...)."""


# How a MintError's class and message end a Ray traceback's text.
_MINT_ERROR_LINE = re.compile(r"^mint_ray\.errors\.\w+: (.+)$", re.MULTILINE)


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and what caused it: a Ray task error's ``cause``, else ``__cause__``."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__


def user_message(err: BaseException) -> str | None:
    """The line a person reads for ``err``; None when it is not mint-ray's (a bug: its
    traceback is what helps).

    A MintError raised in a Ray task reaches the driver wrapped (``RayTaskError(StorageError)``:
    still a StorageError, but its text starts with Ray's task header and ends with Ray's retry
    advice): the message is its cause's. One raised in an actor's constructor arrives as an
    ``ActorDiedError`` that keeps only the error's text: the message is its last
    ``mint_ray.errors`` line."""
    for e in _chain(err):
        if isinstance(e, MintError) and not isinstance(getattr(e, "cause", None), MintError):
            return str(e)
    for e in _chain(err):
        found = _MINT_ERROR_LINE.findall(str(e)) if type(e).__module__.startswith("ray.") else []
        if found:
            return found[-1]
    return None
