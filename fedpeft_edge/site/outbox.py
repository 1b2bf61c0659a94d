"""The site's outbox: encoded updates kept on disk until their delivery is confirmed (store and forward).

Each update is one file ``<state_dir>/outbox/r<round>.msg`` holding the exact envelope bytes, written
atomically before the first publish, so a restart resends the very same bytes (the aggregator counts an
update for (client, round) once, whatever the number of copies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedpeft_edge.protocol.transport import PublishHandle
from fedpeft_edge.runtime.durable import atomic_write_bytes


@dataclass
class OutboxEntry:
    """One waiting update and the publishes of its last (re)send."""

    round: int
    path: Path
    data: bytes
    handles: list[PublishHandle] = field(default_factory=list)
    sent_at_connect: int = -1  # transport.connect_count when last (re)published

    def acked(self) -> bool:
        return bool(self.handles) and all(h.is_published() for h in self.handles)


class Outbox:
    """The folder of waiting updates, oldest round first."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, rnd: int) -> Path:
        return self.directory / f"r{rnd:08d}.msg"

    def load(self) -> list[OutboxEntry]:
        """Every update a previous run left waiting, oldest first."""
        files = sorted(self.directory.glob("r*.msg"))
        return [OutboxEntry(int(f.stem[1:]), f, f.read_bytes()) for f in files]

    def put(self, rnd: int, data: bytes) -> OutboxEntry:
        """Write the update durably (before anything is published) and return its entry."""
        path = self.path_for(rnd)
        atomic_write_bytes(path, data)
        return OutboxEntry(rnd, path, data)

    def remove(self, entry: OutboxEntry) -> None:
        entry.path.unlink(missing_ok=True)


__all__ = ["Outbox", "OutboxEntry"]
