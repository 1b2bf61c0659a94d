"""The gateway's sealed partials, on disk until the aggregator acknowledges them.

One file per partial, ``<dir>/<seq>.partial`` (the encoded envelope, written atomically and fsynced), so a
kill -9 at any point leaves each partial either absent (its batch still open in the gateway's round state)
or whole. The file is removed when the aggregator's ack naming the partial's id arrives.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fedpeft_edge.protocol.partial import partial_id
from fedpeft_edge.runtime.durable import atomic_write_bytes, fsync_dir, remove_temp_files

log = logging.getLogger(__name__)
_NAME_RE = re.compile(r"([0-9]{1,16})\.partial")


class PartialOutbox:
    def __init__(self, directory: Path, gateway: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.gateway = gateway
        remove_temp_files(self.dir, ["*.partial"])  # a write a kill interrupted

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq}.partial"

    def put(self, seq: int, data: bytes) -> None:
        atomic_write_bytes(self._path(seq), data)

    def has(self, seq: int) -> bool:
        return self._path(seq).exists()

    def pending(self) -> list[tuple[int, bytes]]:
        """``(seq, envelope)`` of every unacknowledged partial, oldest first."""
        out = []
        for path in self.dir.glob("*.partial"):
            m = _NAME_RE.fullmatch(path.name)
            if m is not None:
                out.append((int(m.group(1)), path.read_bytes()))
        return sorted(out)

    def seq_of(self, message_id: str) -> int | None:
        """The pending partial an ack's message id names, if any."""
        for path in self.dir.glob("*.partial"):
            m = _NAME_RE.fullmatch(path.name)
            if m is not None and partial_id(self.gateway, int(m.group(1))) == message_id:
                return int(m.group(1))
        return None

    def remove(self, seq: int) -> None:
        self._path(seq).unlink(missing_ok=True)
        fsync_dir(self.dir)

    def __len__(self) -> int:
        return sum(1 for p in self.dir.glob("*.partial") if _NAME_RE.fullmatch(p.name))
