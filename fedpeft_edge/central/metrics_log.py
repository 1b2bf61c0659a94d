"""The aggregator's round metrics file (``metrics.jsonl``): one JSON line per closed round, never lost.

A round is closed in the round state (saved atomically) before its line is appended, so a kill between
the two would drop the line. On start, :meth:`MetricsLog.restore` rewrites the missing lines from the
closed-round history the round state keeps (marked ``"restored": true``); a torn last line left by a kill
mid-append is cut off first, so the file stays valid JSON lines.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _valid_prefix(self) -> tuple[int, list[dict[str, Any]]]:
        """(byte length of the complete, parseable lines at the start, those lines)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0, []
        good, rows = 0, []
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break  # torn by a kill mid-append
            try:
                row = json.loads(raw)
            except ValueError:
                break
            if not isinstance(row, dict):
                break
            rows.append(row)
            good += len(raw)
        if good < len(data):
            log.warning("%s: cutting %d byte(s) of a torn or damaged last line", self.path, len(data) - good)
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())
        return good, rows

    def rounds_written(self) -> set[int]:
        _, rows = self._valid_prefix()
        return {int(r["round"]) for r in rows if isinstance(r.get("round"), int)}

    def append(self, line: dict[str, Any]) -> None:
        """Append one line durably (flush + fsync: it is the record operators and reports read)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(line, default=float, separators=(",", ":")) + "\n"
        with open(self.path, "a") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    def restore(self, history: Iterable[dict[str, Any]]) -> int:
        """Append the lines of closed rounds in ``history`` that the file lacks; returns how many."""
        written = self.rounds_written()
        restored = 0
        for metrics in history:
            rnd = metrics.get("round")
            if isinstance(rnd, int) and rnd not in written:
                self.append(dict(metrics, next_round=rnd + 1, restored=True))
                restored += 1
        if restored:
            log.info("%s: restored %d round line(s) from the saved round state", self.path, restored)
        return restored


__all__ = ["MetricsLog"]
