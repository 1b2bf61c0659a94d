"""The site's outbox: encoded updates kept on disk until the aggregator has decided them (store and forward).

Each update is one file ``<state_dir>/outbox/r<round>.msg`` holding the exact envelope bytes, written
atomically before the first publish, so every resend — after a reconnect, a re-announced global, a timer,
or a restart — carries the very same bytes and chunk message id (the aggregator counts an update for
(client, round) once, whatever the number of copies). A file leaves the outbox only when the aggregator's
acknowledgement for its round arrives (``fedpeft/{fleet}/ack/{client_id}``), never on the broker's PUBACK:
Mosquitto acknowledges a publish once it is in its memory, which a broker crash can lose.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft_edge.protocol.transport import PublishHandle
from fedpeft_edge.runtime.durable import atomic_write_bytes


def message_id(client_id: str, data: bytes) -> str:
    """The chunk message id of an update: a function of its bytes, so every resend reuses it and the
    aggregator's reassembler sees copies of one message, not new messages."""
    return hashlib.sha256(client_id.encode() + data).hexdigest()[:32]


@dataclass
class OutboxEntry:
    """One update waiting for the aggregator's acknowledgement, and the publishes of its last (re)send."""

    round: int
    path: Path
    data: bytes
    handles: list[PublishHandle] = field(default_factory=list)
    sent_at_connect: int = -1  # transport.connect_count when last (re)published; -1: not yet this run
    sent_at: float = 0.0  # time.monotonic() of the last (re)publish
    sends: int = 0  # publishes of this entry in this run (first send included)
    timer_resends: int = 0  # resends by the timer since the last reconnect / re-announced global

    def delivered_to_broker(self) -> bool:
        """Every part of the last send got its PUBACK (the broker holds it in memory; not yet decided)."""
        return bool(self.handles) and all(h.is_published() for h in self.handles)

    def mid(self, client_id: str) -> str:
        return message_id(client_id, self.data)


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


__all__ = ["Outbox", "OutboxEntry", "message_id"]
