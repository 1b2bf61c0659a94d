"""The console's picture of one fleet, built from what the broker tells it (console/follower.py feeds it):

- every service's retained status (``notices.StatusMessage``): state, round, detail, version, last change;
- every site's retained info card (``fleet_report.SiteInfo``): bundle, spec hash, runtime, platform;
- the aggregator's retained federation report (``fleet_report.FederationReport``): round, deadline,
  policy, paused and excluded sites, per-site contributions and rejections, recent rounds.

From the changes between messages it writes events (sites joining and leaving, rejections, rounds,
confirmations of operator commands) and keeps alerts (a site silent for too many rounds, a site whose
updates are rejected too often). Pages read :meth:`FleetView.snapshot`, a consistent copy made under the
lock the MQTT thread writes under.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final

from fedpeft_edge.console.events import EventLog
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.fleet_report import FederationReport, RoundRecord, SiteInfo, SiteRecord

# A service's status state → what the Fleet page shows (the five the plant cares about, plus two that
# need someone: a finished federation and a site that needs a new bundle).
DISPLAY_STATE: Final = {
    "online": "online",
    "training": "training",
    "uploading": "training",
    "waiting": "waiting",
    "idle": "waiting",
    "paused": "paused",
    "offline": "offline",
    "done": "done",
    "needs_bundle": "needs_bundle",
}
MAX_SITES: Final = 20_000  # statuses/info of more distinct ids are not tracked (a flood, not a fleet)
MAX_HISTORY: Final = 10_000  # rounds kept for the charts


@dataclass(frozen=True)
class AlertSettings:
    silent_rounds: int = 2
    rejection_rate: float = 0.5
    min_updates: int = 3


@dataclass
class SiteRow:
    """One site as the Fleet page shows it."""

    id: str
    state: str = "unknown"  # display state (DISPLAY_STATE), "unknown" before any status
    raw_state: str = ""
    detail: str = ""
    round: int | None = None
    version: str = ""
    last_seen: float | None = None  # time of its newest status (its own clock)
    info: SiteInfo | None = None
    record: SiteRecord | None = None
    excluded: bool = False
    first_round: int | None = None  # the federation's round when the console first saw the site
    alerts: list[str] = field(default_factory=list)

    @property
    def rejected_total(self) -> int:
        return sum(self.record.rejected.values()) if self.record else 0


@dataclass(frozen=True)
class FleetSnapshot:
    fleet: str
    sites: list[SiteRow]
    aggregator: notices.StatusMessage | None
    report: FederationReport | None
    history: list[RoundRecord]
    alerts: list[tuple[str, str]]  # (site, kind) of the alerts now active
    malformed: int
    connected: bool
    taken_at: float

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            out[s.state] = out.get(s.state, 0) + 1
        return out

    @property
    def paused(self) -> bool:
        if self.report is not None:
            return self.report.paused
        return self.aggregator is not None and self.aggregator.state == "paused"


class FleetView:
    def __init__(
        self,
        fleet: str,
        events: EventLog,
        *,
        aggregator_id: str = "aggregator",
        alerts: AlertSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fleet = fleet
        self.events = events
        self.aggregator_id = aggregator_id
        self.alert_settings = alerts or AlertSettings()
        self.clock = clock
        self._lock = threading.Lock()
        self._sites: dict[str, SiteRow] = {}
        self._aggregator: notices.StatusMessage | None = None
        self._report: FederationReport | None = None
        self._history: dict[int, RoundRecord] = {}
        self._alerts: dict[tuple[str, str], float] = {}
        self._confirmed: set[tuple[str, str]] = set()
        self._malformed = 0
        self._synced = False  # the retained burst after connecting is the starting point, not news
        self.connected = False

    # --- inputs (the MQTT thread) -------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        """The retained burst after connecting is over: changes from now on are events."""
        return self._synced

    def end_sync(self) -> None:
        with self._lock:
            self._synced = True

    def on_malformed(self) -> None:
        with self._lock:
            self._malformed += 1

    def _row(self, site: str) -> SiteRow | None:
        row = self._sites.get(site)
        if row is None:
            if len(self._sites) >= MAX_SITES:
                return None
            row = self._sites[site] = SiteRow(site)
            if self._report is not None:
                row.first_round = self._report.round
        return row

    def on_status(self, site: str, st: notices.StatusMessage) -> None:
        with self._lock:
            if site == self.aggregator_id:
                self._aggregator = st
                self._note_confirmation(site, st)
                return
            row = self._row(site)
            if row is None:
                return
            before = row.state
            row.raw_state, row.detail, row.round, row.version = st.state, st.detail, st.round, st.version
            row.state = DISPLAY_STATE.get(st.state, st.state)
            row.last_seen = st.ts
            if self._synced:
                if row.state == "offline" and before not in ("offline", "unknown"):
                    self.events.add("left", site=site, detail=st.detail)
                elif row.state != "offline" and before in ("offline", "unknown"):
                    self.events.add("joined", site=site, state=st.state)
            self._note_confirmation(site, st)
            self._check_alerts(row)

    def _note_confirmation(self, site: str, st: notices.StatusMessage) -> None:
        cmd = notices.command_id_in(st.detail)
        if cmd is None or (site, cmd) in self._confirmed:
            return
        if len(self._confirmed) > 10_000:
            self._confirmed.clear()
        self._confirmed.add((site, cmd))
        if self._synced:
            self.events.add("confirmed", site=site, state=st.state, detail=st.detail, command=cmd)

    def on_info(self, site: str, info: SiteInfo) -> None:
        with self._lock:
            row = self._row(site)
            if row is not None:
                row.info = info

    def on_report(self, rep: FederationReport) -> None:
        with self._lock:
            old = self._report
            if old is not None and rep.round < old.round:
                self._history.clear()  # the round went back: a new federation on this fleet
                self.events.add("federation_started", round=rep.round)
            for h in rep.history:
                if self._synced and h.round not in self._history and (old is None or h.round >= old.round):
                    self.events.add("round_closed", round=h.round, participants=h.participants)
                self._history[h.round] = h
            if len(self._history) > MAX_HISTORY:
                for r in sorted(self._history)[: len(self._history) - MAX_HISTORY]:
                    del self._history[r]
            excluded = set(rep.excluded)
            for site, rec in rep.sites.items():
                row = self._row(site)
                if row is None:
                    continue
                if self._synced and row.record is not None:
                    for reason, n in rec.rejected.items():
                        delta = n - row.record.rejected.get(reason, 0)
                        if delta > 0:
                            self.events.add("rejected", site=site, reason=reason, count=delta)
                elif self._synced and rec.rejected and row.record is None:
                    for reason, n in rec.rejected.items():
                        self.events.add("rejected", site=site, reason=reason, count=n)
                row.record = rec
            for row in self._sites.values():
                row.excluded = row.id in excluded
                if row.first_round is None:
                    row.first_round = rep.round
            self._report = rep
            for row in self._sites.values():
                self._check_alerts(row)

    # --- alerts ------------------------------------------------------------------------------------
    def _check_alerts(self, row: SiteRow) -> None:
        a = self.alert_settings
        rep = self._report
        active: list[str] = []
        if (
            rep is not None
            and not rep.finished
            and not rep.paused
            and not row.excluded
            and row.state not in ("paused", "done")
        ):
            rec = row.record
            since = (
                (rec.last_round + 1) if rec is not None and rec.last_round is not None else row.first_round
            )
            if since is not None and rep.round - since > a.silent_rounds:
                active.append("silent")
        if row.record is not None:
            rejected = row.rejected_total
            sent = rejected + row.record.rounds
            if sent >= a.min_updates and rejected / sent > a.rejection_rate:
                active.append("rejections")
        for kind in ("silent", "rejections"):
            key = (row.id, kind)
            if kind in active and key not in self._alerts:
                self._alerts[key] = self.clock()
                self.events.add("alert", site=row.id, alert=kind, **self._alert_data(row, kind))
            elif kind not in active and key in self._alerts:
                del self._alerts[key]
                self.events.add("alert_cleared", site=row.id, alert=kind)
        row.alerts = active

    def _alert_data(self, row: SiteRow, kind: str) -> dict[str, object]:
        rec = row.record
        if kind == "silent":
            return {
                "last_round": rec.last_round if rec else None,
                "round": self._report.round if self._report else None,
            }
        return {"rejected": row.rejected_total, "accepted": rec.rounds if rec else 0}

    # --- output (page handlers) --------------------------------------------------------------------
    def snapshot(self) -> FleetSnapshot:
        with self._lock:
            sites = [
                replace(r, alerts=list(r.alerts)) for r in sorted(self._sites.values(), key=lambda r: r.id)
            ]
            history = [self._history[r] for r in sorted(self._history)]
            return FleetSnapshot(
                self.fleet,
                sites,
                self._aggregator,
                self._report,
                history,
                sorted(self._alerts),
                self._malformed,
                self.connected,
                self.clock(),
            )


__all__ = ["DISPLAY_STATE", "AlertSettings", "FleetSnapshot", "FleetView", "SiteRow"]
