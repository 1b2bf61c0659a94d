"""The console's event log: operator actions (who, what, when), logins, rejections, sites joining and
leaving, rounds closing, and alerts — one JSON line each in ``<state_dir>/events.jsonl``.

It is the audit trail plant staff read on the Events page, so an operator action is flushed and fsynced
before the console answers the request. The newest :data:`KEEP_IN_MEMORY` events are also kept in memory
for the page; on start they are read back from the file's tail. The file is rotated to ``events.jsonl.1``
beyond :data:`ROTATE_BYTES` (one old generation kept).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

EVENTS_FILE: Final = "events.jsonl"
KEEP_IN_MEMORY: Final = 2000
ROTATE_BYTES: Final = 16 * 1024 * 1024
TAIL_BYTES: Final = 1024 * 1024  # read back on start

# kind → whether it is written durably before the request that caused it is answered
KINDS: Final = {
    "action": True,  # an operator action sent (by, action, site, command id)
    "action_refused": True,  # a viewer (or a bad form) tried one: 403
    "confirmed": False,  # the aggregator or a site confirmed a command on its status
    "login": True,
    "login_failed": True,
    "logout": False,
    "joined": False,
    "left": False,
    "rejected": False,  # the aggregator rejected updates of a site (reason, how many)
    "round_closed": False,
    "alert": False,
    "alert_cleared": False,
    "federation_started": False,  # the round number went back: a new federation on the same fleet
}


@dataclass(frozen=True)
class Event:
    kind: str
    time: float
    site: str | None = None
    by: str | None = None  # the console user (actions, logins)
    data: dict[str, Any] = field(default_factory=dict)  # kind-specific fields (reason, count, round...)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}


class EventLog:
    def __init__(self, state_dir: str | os.PathLike[str] | None) -> None:
        self.path = Path(state_dir) / EVENTS_FILE if state_dir is not None else None
        self._lock = threading.Lock()
        self._recent: deque[Event] = deque(maxlen=KEEP_IN_MEMORY)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._read_tail()

    def _read_tail(self) -> None:
        assert self.path is not None
        try:
            with open(self.path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - TAIL_BYTES))
                data = fh.read()
        except FileNotFoundError:
            return
        lines = data.splitlines()
        if len(data) >= TAIL_BYTES and lines:
            lines = lines[1:]  # probably cut in the middle
        for raw in lines:
            try:
                obj = json.loads(raw)
                self._recent.append(
                    Event(
                        str(obj["kind"]),
                        float(obj["time"]),
                        obj.get("site"),
                        obj.get("by"),
                        dict(obj.get("data", {})),
                    )
                )
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a kill, or a hand-edited one: skip it

    def add(
        self,
        kind: str,
        *,
        site: str | None = None,
        by: str | None = None,
        now: float | None = None,
        **data: Any,
    ) -> Event:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        ev = Event(kind, time.time() if now is None else now, site, by, data)
        with self._lock:
            self._recent.append(ev)
            if self.path is not None:
                self._append(ev, durable=KINDS[kind])
        return ev

    def _append(self, ev: Event, durable: bool) -> None:
        assert self.path is not None
        line = json.dumps(ev.as_json(), separators=(",", ":"), ensure_ascii=False, default=str) + "\n"
        try:
            if self.path.exists() and self.path.stat().st_size > ROTATE_BYTES:
                os.replace(self.path, self.path.with_name(EVENTS_FILE + ".1"))
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as exc:  # a full disk must not stop the console from showing the fleet
            log.error("could not write the event log %s: %s", self.path, exc)
            if durable:
                raise

    def recent(self, limit: int = 500, kinds: set[str] | None = None) -> list[Event]:
        """The newest events first."""
        with self._lock:
            items = list(self._recent)
        out = [e for e in reversed(items) if kinds is None or e.kind in kinds]
        return out[:limit]


__all__ = ["EVENTS_FILE", "KINDS", "Event", "EventLog"]
