"""On-disk journal of a receiver's pending chunks (``ChunkSpool``): appended, fsynced before acknowledging.

The :class:`~fedpeft_edge.protocol.chunking.Reassembler` writes every chunk it stores through a spool, so a
crash while a multi-part message is half received loses nothing that was acknowledged; see the
``chunking`` module docstring for the sync → persist → commit order.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import struct
from pathlib import Path
from typing import BinaryIO, Final

from fedpeft_edge.runtime.durable import atomic_file, fsync_dir
from fedpeft_edge.runtime.errors import FedPeftError

# A chunked message's id: 16 random bytes as 32 lowercase hex characters (also checked by ``chunking``).
MESSAGE_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
SPOOL_MAGIC: Final = b"FPCHUNK1"
SPOOL_SUFFIX: Final = ".spool"
COMPLETED_LOG: Final = "completed.log"

log = logging.getLogger(__name__)


class SpoolError(FedPeftError):
    """Chunks could not be made durable: the caller must NOT acknowledge them."""


_LEN: Final = struct.Struct("<I")


class ChunkSpool:
    """On-disk journal of the chunks a :class:`Reassembler` holds (one file per pending message).

    File ``<sha256(sender, id)[:32]>.spool``: ``SPOOL_MAGIC``, then length-prefixed (u32 LE) records:
    the sender (UTF-8), the message id, then each raw chunk message as received. Records are appended
    without fsync; :meth:`sync` fsyncs every file written since the last sync (and the directory when
    files were created). A torn tail (crash during an append, i.e. of a chunk never acknowledged) is
    cut off on load; chunks are re-validated when replayed. ``completed.log`` lists consumed message
    ids, one ``sender id`` line each, compacted to the newest ``remember`` entries.
    """

    def __init__(self, directory: str | os.PathLike[str], *, remember: int = 4096) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.remember = remember
        self._files: dict[tuple[str, str], BinaryIO] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._dir_dirty = False
        self._done: list[tuple[str, str]] = []
        self._log_lines = 0

    def path_of(self, key: tuple[str, str]) -> Path:
        """The spool file of one (sender, message id)."""
        name = hashlib.sha256(f"{key[0]}\0{key[1]}".encode()).hexdigest()[:32]
        return self.dir / f"{name}{SPOOL_SUFFIX}"

    def append(self, key: tuple[str, str], raw: bytes) -> None:
        try:
            fh = self._files.get(key)
            if fh is None:
                fh = open(self.path_of(key), "ab")  # kept open while the message is pending
                self._files[key] = fh
                if fh.tell() == 0:
                    sender, mid = key[0].encode("utf-8"), key[1].encode("ascii")
                    fh.write(SPOOL_MAGIC + _LEN.pack(len(sender)) + sender + _LEN.pack(len(mid)) + mid)
                    self._dir_dirty = True
            fh.write(_LEN.pack(len(raw)) + raw)
        except OSError as exc:
            raise SpoolError(f"cannot spool a chunk in {self.dir}: {exc}") from exc
        self._dirty.add(key)

    def sync(self) -> None:
        try:
            for key in self._dirty:
                fh = self._files.get(key)
                if fh is not None:
                    fh.flush()
                    os.fsync(fh.fileno())
            if self._dir_dirty:
                fsync_dir(self.dir)
        except OSError as exc:
            raise SpoolError(f"cannot sync spooled chunks in {self.dir}: {exc}") from exc
        self._dirty.clear()
        self._dir_dirty = False

    def discard(self, key: tuple[str, str]) -> None:
        """Forget a message now (dropped by policy, or already consumed)."""
        fh = self._files.pop(key, None)
        self._dirty.discard(key)
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        with contextlib.suppress(OSError):
            self.path_of(key).unlink(missing_ok=True)

    def complete(self, key: tuple[str, str]) -> None:
        """The message was reassembled; its file goes at the next :meth:`commit`."""
        self._done.append(key)

    def commit(self) -> None:
        """Record the completed ids (fsynced), then remove their files. Failures only cost redelivery
        noise later (a consumer that dedups sees a duplicate), so they are logged, not raised."""
        if not self._done:
            return
        done, self._done = self._done, []
        try:
            with open(self.dir / COMPLETED_LOG, "a", encoding="utf-8") as fh:
                fh.writelines(f"{s} {m}\n" for s, m in done)
                fh.flush()
                os.fsync(fh.fileno())
            self._log_lines += len(done)
            if self._log_lines > 2 * self.remember:
                self._compact()
        except OSError as exc:
            log.warning("could not record completed chunked messages in %s: %s", self.dir, exc)
        for key in done:
            self.discard(key)

    def _read_completed(self) -> list[tuple[str, str]]:
        path = self.dir / COMPLETED_LOG
        if not path.exists():
            return []
        keys = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.rsplit(" ", 1)
            # a torn last line is skipped
            if len(parts) == 2 and parts[0] and MESSAGE_ID_RE.fullmatch(parts[1]):
                keys.append((parts[0], parts[1]))
        return keys[-self.remember :]

    def _compact(self) -> None:
        keys = self._read_completed()
        with atomic_file(self.dir / COMPLETED_LOG, "w", encoding="utf-8") as fh:
            fh.writelines(f"{s} {m}\n" for s, m in keys)
        self._log_lines = len(keys)

    def load(self) -> tuple[list[tuple[str, str]], list[tuple[tuple[str, str], list[bytes]]]]:
        """``(completed ids, [(key, raw chunks)])``, oldest file first. Unreadable files are removed."""
        completed = self._read_completed()
        self._log_lines = len(completed)
        for stray in self.dir.glob(f".{COMPLETED_LOG}.tmp-*"):
            stray.unlink(missing_ok=True)
        messages = []
        files = sorted(self.dir.glob(f"*{SPOOL_SUFFIX}"), key=lambda f: (f.stat().st_mtime_ns, f.name))
        for path in files:
            parsed = read_spool_file(path)
            if parsed is None:
                log.warning("removing unreadable chunk spool file %s", path)
                path.unlink(missing_ok=True)
                continue
            key, records, good_len = parsed
            if path.name != self.path_of(key).name:
                path.unlink(missing_ok=True)
                continue
            if good_len != path.stat().st_size:  # torn tail: cut it so later appends stay parseable
                with open(path, "r+b") as fh:
                    fh.truncate(good_len)
            messages.append((key, records))
        return completed, messages

    def close(self) -> None:
        for fh in self._files.values():
            with contextlib.suppress(OSError):
                fh.close()
        self._files.clear()


def read_spool_file(path: Path) -> tuple[tuple[str, str], list[bytes], int] | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(SPOOL_MAGIC):
        return None
    pos = len(SPOOL_MAGIC)
    fields: list[bytes] = []
    records: list[bytes] = []
    good = pos
    while pos + _LEN.size <= len(data):
        (size,) = _LEN.unpack_from(data, pos)
        end = pos + _LEN.size + size
        if end > len(data):
            break
        item = data[pos + _LEN.size : end]
        if len(fields) < 2:
            fields.append(item)
        else:
            records.append(item)
        pos = good = end
    if len(fields) < 2:
        return None
    try:
        sender, mid = fields[0].decode("utf-8"), fields[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    if not sender or not MESSAGE_ID_RE.fullmatch(mid):
        return None
    return (sender, mid), records, good


__all__ = ["COMPLETED_LOG", "MESSAGE_ID_RE", "SPOOL_MAGIC", "SPOOL_SUFFIX", "ChunkSpool", "SpoolError"]
