"""Operator actions, aggregator side: commands from ``fedpeft/{fleet}/control`` (notices.ControlCommand).

The service hands every control message to :meth:`FederationControl.take` (from its message loop, so
nothing here races the core) and asks it three things: whether a round may close now
(:meth:`should_close`), whether an update comes from an excluded site (:meth:`excluded`) and what its
status is (:meth:`status`).

- ``pause`` (site null): no round closes, neither on quorum nor at the deadline. Updates still arrive,
  are counted and acknowledged as usual, so nothing a site sends is lost while paused. The deadline clock
  is *paused*, not extended: on ``resume`` the open round's start moves forward by the paused time, so the
  round gets exactly the time it had left (an operator who paused for an hour should not find the round
  closing the moment they resume, nor get a fresh full deadline it never asked for). After a restart the
  service restarts the round clock anyway (service.py), and the shift counts from then.
- ``pause`` / ``resume`` of one site: the agent obeys (site/control.py); the aggregator records and
  confirms it.
- ``exclude`` / ``include``: while excluded, a site's updates are rejected with reason ``excluded``
  (acknowledged as rejected, so the site drops them from its outbox; a copy of an update already counted
  before the exclusion is still answered ``duplicate``).
- ``close_round``: close the open round at once with what it has, if it has ``min_clients`` accepted
  updates (at least one); otherwise the confirmation says why not. It also works while paused: it is an
  explicit request.

Every command is confirmed on the aggregator's status topic (detail ``... by operator <by> (cmd <id>)``)
and appended to the audit log ``<state_dir>/events.jsonl`` (time, id, by, action, site, result, detail).
Idempotent by id: the ids applied are kept (the newest :data:`SEEN_KEEP`) in ``<state_dir>/control.json``
with the paused/excluded state, written atomically (runtime/durable.py) before the message is
acknowledged to the broker — a redelivered, retained or replayed command is applied once, and the state
survives a restart.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fedpeft_edge.central.store import StateError
from fedpeft_edge.protocol import notices, wire
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.runtime.durable import atomic_file, move_aside

if TYPE_CHECKING:  # the service calls in; no import at run time (no cycle)
    from fedpeft_edge.central.core import AggregatorCore
    from fedpeft_edge.central.service import AggregatorService
    from fedpeft_edge.protocol.transport import MqttTransport

log = logging.getLogger(__name__)

SEEN_KEEP: Final = 1024  # command ids remembered for idempotence (a replay older than this is unlikely)
EXCLUDED_REASON: Final = "excluded"
STATE_FILE: Final = "control.json"
EVENTS_FILE: Final = "events.jsonl"


class FederationControl:
    """The aggregator's operator state: paused, excluded and paused sites, the ids already applied."""

    def __init__(self, state_dir: Path, topics: Topics, client_id: str,
                 limits: wire.WireLimits = wire.DEFAULT_LIMITS) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.events_path = Path(state_dir) / EVENTS_FILE
        self.topics = topics
        self.client_id = client_id
        self.limits = limits
        self.paused: dict[str, Any] | None = None  # {"by", "id", "at"} while the federation is paused
        self.excluded: dict[str, str] = {}  # site -> operator who excluded it
        self.sites_paused: dict[str, str] = {}  # site -> operator (the agent obeys; kept for the record)
        self.seen: list[str] = []
        self.note = ""  # detail of the last confirmation (re-said on reconnect)
        self.close_requested = False  # in memory only: a crash loses it and the operator asks again
        self._load()

    # --- persistence ------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            st = json.loads(self.path.read_text())
            self.paused = st["paused"]
            self.excluded = dict(st["excluded"])
            self.sites_paused = dict(st["sites_paused"])
            self.seen = [str(x) for x in st["seen"]][-SEEN_KEEP:]
            self.note = str(st.get("note", ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable: keep it for inspection and start unpaused (loudly); commands can be given again.
            kept = move_aside(self.path)
            log.error("operator control state %s unreadable (%s); moved to %s, starting unpaused with no "
                      "site excluded", self.path, exc, kept)
            self.paused, self.excluded, self.sites_paused, self.seen = None, {}, {}, []
        if self.paused:
            log.warning("federation paused by operator %s (cmd %s): no round closes until resumed",
                        self.paused["by"], self.paused["id"])
        if self.excluded:
            log.warning("site(s) excluded by an operator: %s", ", ".join(sorted(self.excluded)))

    def _save(self) -> None:
        st = {"paused": self.paused, "excluded": self.excluded, "sites_paused": self.sites_paused,
              "seen": self.seen[-SEEN_KEEP:], "note": self.note}
        # Durable before the broker gets its PUBACK: a crash then redelivers, and the id says "applied".
        try:
            with atomic_file(self.path, "w", encoding="utf-8") as fh:
                json.dump(st, fh, sort_keys=True)
        except OSError as exc:  # a StateError: the service stops without acknowledging (crash-only)
            raise StateError(f"could not persist operator control state {self.path}: {exc}") from exc

    def _audit(self, cmd: notices.ControlCommand, result: str, detail: str, now: float) -> None:
        line = {"time": round(now, 3), "kind": "operator_action", "id": cmd.id, "by": cmd.by,
                "action": cmd.action, "site": cmd.site, "result": result, "detail": detail,
                "sent_at": cmd.time}
        try:
            with open(self.events_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(line, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:  # the action itself is applied and persisted; only the record is missing
            log.error("could not append to the audit log %s: %s", self.events_path, exc)

    # --- what the service asks --------------------------------------------------------------------
    def should_close(self, service: AggregatorService, now: float) -> bool:
        """Whether the service closes the open round now (in place of ``core.ready_to_close``)."""
        core = service.core
        service.paused = self.paused is not None  # what /metrics exports (central/metrics_http.py)
        if self.close_requested:
            self.close_requested = False
            if core.accepted_this_round > 0 and not core.finished:
                return True
        if self.paused is not None:
            return False
        return core.ready_to_close(now)

    def excluded_update(self, core: AggregatorCore, sender: str, upd: wire.UpdateMessage) -> bool:
        """Whether this update must be rejected as ``excluded`` (one already counted stays a duplicate)."""
        return sender in self.excluded and not core.was_counted(sender, upd.round)

    def reject_excluded(self, service: AggregatorService, sender: str, upd: wire.UpdateMessage,
                        nbytes: int) -> str:
        """Count, log and (after the checkpoint, like every decision) acknowledge the rejection."""
        service.core.note_rejected(EXCLUDED_REASON, nbytes, f"{sender} excluded by an operator",
                                   sender=sender)
        service.rejections[EXCLUDED_REASON] += 1
        service.acks.queue(sender, upd.round, "rejected", EXCLUDED_REASON)
        log.warning("update from %s for round %d rejected (excluded by operator %s)", sender, upd.round,
                    self.excluded[sender])
        return "rejected"

    def status(self, rnd: int | None, now: float | None = None) -> notices.StatusMessage:
        """The aggregator's status: ``paused`` (with who paused it) or ``online``, and the last note."""
        now = time.time() if now is None else now
        state = "paused" if self.paused is not None else "online"
        return notices.StatusMessage(self.client_id, state, now, rnd, detail=self.note)

    # --- commands ---------------------------------------------------------------------------------
    def take(self, service: AggregatorService, payload: bytes, now: float) -> str:
        """Apply one control message (from the service's message loop); returns an outcome code."""
        try:
            cmd = notices.decode_control(payload, self.limits)
        except WireFormatError as exc:
            log.warning("unreadable control command ignored (%d bytes): %s", len(payload), exc)
            return "rejected"
        if cmd.id in self.seen:
            log.info("control command %s (%s) already applied; ignoring the copy", cmd.id, cmd.action)
            return "control_duplicate"
        ok, text = self._apply(cmd, service.core, now)
        self.seen.append(cmd.id)
        del self.seen[:-SEEN_KEEP]
        self.note = cmd.note(text)
        self._save()
        self._audit(cmd, "applied" if ok else "refused", text, now)
        (log.info if ok else log.warning)("operator command %s: %s", cmd.id, text)
        if service.transport is not None:
            self._confirm(service.transport, service.core.round, now)
        return "control" if ok else "control_refused"

    def _confirm(self, transport: MqttTransport, rnd: int, now: float) -> None:
        data = notices.encode_status(self.status(rnd, now), self.limits)
        transport.publish(self.topics.status(self.client_id), data, qos=1, retain=True)

    def _apply(self, cmd: notices.ControlCommand, core: AggregatorCore, now: float) -> tuple[bool, str]:
        """Change the state; returns (applied, what happened in words)."""
        who = f"by operator {cmd.by}"
        site, action = cmd.site, cmd.action
        if site is None and action == "pause":
            if self.paused is None:
                self.paused = {"by": cmd.by, "id": cmd.id, "at": now}
            return True, f"paused {who}"
        if site is None and action == "resume":
            if self.paused is not None:
                # The deadline clock stood still while paused (module doc): shift the round's start.
                since = max(float(self.paused["at"]), core.round_started_at)
                core.restart_round_clock(core.round_started_at + max(0.0, now - since))
                self.paused = None
            return True, f"resumed {who}"
        if action == "close_round":
            need = max(1, core.config.min_clients)
            have = core.accepted_this_round
            if core.finished:
                return False, f"close_round refused: the federation is finished (asked {who})"
            if have < need:
                return False, (f"close_round refused: round {core.round} has {have} update(s), min_clients "
                               f"is {need} (asked {who})")
            self.close_requested = True
            return True, f"round {core.round} closing now with {have} update(s) {who}"
        assert site is not None  # decode_control: the other actions name a site or were handled above
        if action == "exclude":
            self.excluded[site] = cmd.by
            return True, f"site {site} excluded {who}"
        if action == "include":
            self.excluded.pop(site, None)
            return True, f"site {site} included {who}"
        if action == "pause":
            self.sites_paused[site] = cmd.by
            return True, f"site {site} paused {who}"
        self.sites_paused.pop(site, None)  # resume
        return True, f"site {site} resumed {who}"


__all__ = ["EVENTS_FILE", "EXCLUDED_REASON", "FederationControl"]
