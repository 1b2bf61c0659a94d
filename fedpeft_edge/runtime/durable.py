"""Atomic file writes shared by every component that must never leave a half-written file behind:
aggregator round state, chunk spool log, agent outbox and state, trainer state, model cache, reports.

A file is written to a temp file in the same directory and renamed over the target, so a reader sees
either the whole old file or the whole new one. ``durable=True`` (the default) also fsyncs the data and
the directory entry, so the new file survives kill -9 and power loss too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(directory: Path) -> None:
    """Make renames/creations inside ``directory`` durable (best effort where a platform cannot)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", *, encoding: str | None = None, durable: bool = True,
                file_mode: int | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on a clean exit it replaces ``path``.

    ``file_mode`` sets the permissions (mkstemp creates files readable by the owner only). On an
    exception the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if file_mode is not None:
            os.chmod(tmp, file_mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_file(path) as fh:
        fh.write(data)
