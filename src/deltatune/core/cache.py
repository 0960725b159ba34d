"""Where deltatune keeps things it builds once and reuses: converted models, built data sets.

The root is ``$DELTATUNE_HOME`` (default ``~/.cache/deltatune``). Writers fill a temporary
sibling and rename it into place (see :func:`deltatune.core.io.atomic_directory`), so a
reader never sees half a cache entry; :func:`cache_lock` keeps two processes from doing
the same expensive build at once.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOME_ENV = "DELTATUNE_HOME"


def deltatune_home() -> Path:
    """Return the cache root: ``$DELTATUNE_HOME`` or ``~/.cache/deltatune`` (not created)."""
    value = os.environ.get(HOME_ENV, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "deltatune"


@contextmanager
def cache_lock(entry: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<entry>.lock`` for the duration of the ``with`` block.

    A second process building the same entry waits, then finds it built. The lock is
    advisory (``flock``) and is released when the process dies, so it cannot go stale.
    """
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
