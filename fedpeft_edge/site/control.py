"""Operator pause on the site side: ``pause`` / ``resume`` commands from ``fedpeft/{fleet}/control``.

A ``pause`` of the whole federation (site null) or of this site makes the agent pause exactly like its
resource governor does (site/governor.py, ``EdgeAgent._governed``): asked between training steps, a
round paused after some steps ends with them and its update goes through the crash-safe commit, a round
paused before its first step waits — nothing is lost. The status is ``paused`` with the detail
``paused by operator <by> (cmd <id>)``; a ``resume`` that lifts the last operator pause says
``resumed by operator <by> (cmd <id>)`` (the governor may still hold the site, and then says why).

The two pauses are kept apart (a federation resume does not lift a pause of this one site, and the
other way round) and persisted atomically in ``<state_dir>/operator.json`` with the ids already
applied, so a restart stays paused and a redelivered command is applied once. Other actions (exclude,
include, close_round) concern the aggregator and are ignored here.

While training, :meth:`OperatorPause.check` reads the transport's queue now and then (at most every
:data:`POLL_INTERVAL_S`), so a pause given mid-round takes effect at the next step, as the governor's does.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.runtime.durable import atomic_file, move_aside

if TYPE_CHECKING:
    from fedpeft_edge.site.agent import EdgeAgent

log = logging.getLogger(__name__)

STATE_FILE: Final = "operator.json"
SEEN_KEEP: Final = 256
POLL_INTERVAL_S: Final = 0.5  # how often a training step looks for a control command


class OperatorPause:
    """The operator's hold on this site; :meth:`check` answers like ``Governor.check``."""

    def __init__(self, agent: EdgeAgent) -> None:
        self.agent = agent
        self.path = Path(agent.state_dir) / STATE_FILE
        self.federation: dict[str, Any] | None = None  # {"by", "id", "at"} while the federation is paused
        self.site: dict[str, Any] | None = None  # the same for a pause of this site alone
        self.seen: list[str] = []
        self._polled_at = 0.0
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            st = json.loads(self.path.read_text())
            self.federation, self.site = st["federation"], st["site"]
            self.seen = [str(x) for x in st["seen"]][-SEEN_KEEP:]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            kept = move_aside(self.path)
            log.error("operator pause state %s unreadable (%s); moved to %s, starting unpaused", self.path,
                      exc, kept)
            self.federation, self.site, self.seen = None, None, []
        if self.reason():
            log.warning("%s: staying paused until an operator resumes", self.reason())

    def _save(self) -> None:
        with atomic_file(self.path, "w", encoding="utf-8") as fh:
            json.dump({"federation": self.federation, "site": self.site, "seen": self.seen[-SEEN_KEEP:]}, fh)

    def reason(self) -> str | None:
        """Why the operator holds this site (the newer of the two pauses), or None."""
        holds = [p for p in (self.federation, self.site) if p is not None]
        if not holds:
            return None
        p = max(holds, key=lambda h: float(h["at"]))
        return f"paused by operator {p['by']} (cmd {p['id']})"

    def check(self) -> str | None:
        """Like ``Governor.check``; first reads queued messages (a control command among them) when
        called during a training step and none were read for :data:`POLL_INTERVAL_S`."""
        now = time.monotonic()
        t = self.agent.transport
        # A publish-only transport (test doubles) has no queue to read.
        if t is not None and callable(getattr(t, "get", None)) and now - self._polled_at >= POLL_INTERVAL_S:
            self._polled_at = now
            self.agent._poll(0.0)  # the agent's own dispatch: globals, acks and commands alike
        return self.reason()

    def take(self, payload: bytes) -> None:
        """A message from the control topic (the agent's message loop)."""
        try:
            cmd = notices.decode_control(payload, self.agent.limits)
        except WireFormatError as exc:
            log.warning("unreadable control command ignored (%d bytes): %s", len(payload), exc)
            return
        if cmd.action not in ("pause", "resume") or cmd.site not in (None, self.agent.client_id):
            return  # the aggregator's business, or another site's
        if cmd.id in self.seen:
            log.info("control command %s already applied; ignoring the copy", cmd.id)
            return
        was = self.reason()
        hold = {"by": cmd.by, "id": cmd.id, "at": time.time()}
        scope = "federation" if cmd.site is None else "site"
        setattr(self, scope, hold if cmd.action == "pause" else None)
        self.seen.append(cmd.id)
        del self.seen[:-SEEN_KEEP]
        try:
            self._save()  # before anything is said: a restart must find what was confirmed
        except OSError as exc:  # the pause still holds in memory; only a restart would forget it
            log.error("could not persist the operator pause in %s: %s", self.path, exc)
        log.info("operator %s: %s of the %s (cmd %s)", cmd.by, cmd.action, scope, cmd.id)
        if was is not None and self.reason() is None:
            self._confirm_resume(cmd)
        # A pause is confirmed by the agent's loop (_governed) as it parks: status paused + reason().

    def _confirm_resume(self, cmd: notices.ControlCommand) -> None:
        a = self.agent
        done = a._final_round is not None and a._final_round == a.last_global_round
        # Published as the new state, so _governed does not say a bare "online" over the confirmation;
        # if the governor still holds the site, _governed says "paused" with its reason next.
        a._publish_status("done" if done else "online", a.last_global_round,
                          cmd.note(f"resumed by operator {cmd.by}"))


__all__ = ["OperatorPause"]
