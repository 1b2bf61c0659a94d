"""The federation report: what the operator console shows of the aggregator, retained on
``fedpeft/{fleet}/federation`` (wire format: :mod:`fedpeft_edge.protocol.fleet_report`).

:func:`build_report` reads it off the running service: the core's round, policy, open-round progress and
closed-round history, the per-site ledger (:meth:`AggregatorCore.site_records`, persisted with the round
state, so its figures survive a kill -9 without double counting), the operator state (paused, excluded
sites: central/control.py), spec hash, bundle id and version.

:class:`ReportPublisher` publishes it from the service's main loop (never from paho's thread: it reads the
core), retained with QoS 1, when its content changed (everything but ``time``) and at most once per
``min_interval_s``; a forced publish (a round closed, an operator command applied, a reconnect, the final
round) goes out at once, changed or not. A report that cannot be encoded or is larger than the broker
takes is logged once and skipped: the report is for people, it never stops the aggregator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import time
from typing import TYPE_CHECKING, Any, Final

from fedpeft_edge import __version__
from fedpeft_edge.central.policy import RoundPolicy
from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.fleet_report import (
    MAX_REPORT_HISTORY,
    MAX_REPORT_SITES,
    FederationReport,
    RoundRecord,
    SiteRecord,
    encode_report,
)

if TYPE_CHECKING:  # the service builds the publisher; no import at run time (no cycle)
    from fedpeft_edge.central.policy import AggregatorConfig
    from fedpeft_edge.central.service import AggregatorService

log = logging.getLogger(__name__)

CLOSED_KEEP: Final = MAX_REPORT_HISTORY  # rounds whose bytes_out / closed_at this process remembers
_IDENT_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")  # what the report decoder takes as an id
_NOT_PRINTABLE_RE: Final = re.compile(r"[^ -~]")
_TIME_FIELD_RE: Final = re.compile(rb'"time":[-+0-9.eE]+')  # the first one is the report's own


def _is_id(name: str, limits: wire.WireLimits) -> bool:
    return isinstance(name, str) and 1 <= len(name) <= limits.max_str_len and bool(_IDENT_RE.fullmatch(name))


def _printable(text: str, max_len: int) -> str:
    return _NOT_PRINTABLE_RE.sub("?", str(text))[:max_len]


def _finite(val: Any) -> float | None:
    if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val):
        return None
    return float(val)


def _site_for_report(rec: SiteRecord, limits: wire.WireLimits) -> SiteRecord:
    """``rec`` with every reason a valid id (an odd one is counted under ``other``)."""
    if all(_is_id(k, limits) for k in rec.rejected):
        return rec
    rejected: dict[str, int] = {}
    for reason, n in rec.rejected.items():
        key = reason if _is_id(reason, limits) else "other"
        rejected[key] = rejected.get(key, 0) + n
    return dataclasses.replace(rec, rejected=rejected)


def history_records(history: list[dict[str, Any]],
                    closed: dict[int, tuple[int, float]] | None = None) -> tuple[RoundRecord, ...]:
    """The core's closed-round metrics as report rows; ``closed`` maps a round to its (bytes_out,
    closed_at) when this process closed it (None for rounds closed before a restart)."""
    closed = closed or {}
    rows = []
    for m in history[-MAX_REPORT_HISTORY:]:
        rnd = int(m["round"])
        bytes_out, closed_at = closed.get(rnd, (None, None))
        parts = m.get("participants", [])
        rows.append(RoundRecord(
            round=rnd, participants=len(parts) if isinstance(parts, list) else int(parts),
            loss=_finite(m.get("loss")), accuracy=_finite(m.get("accuracy")),
            eval_accuracy=_finite(m.get("global_eval_accuracy")), bytes_in=int(m.get("bytes_in", 0)),
            bytes_out=bytes_out, duration_s=max(0.0, _finite(m.get("duration_s")) or 0.0),
            closed_at=closed_at, epsilon=_finite(m.get("epsilon"))))
    return tuple(rows)


def build_report(service: AggregatorService, now: float | None = None,
                 closed: dict[int, tuple[int, float]] | None = None) -> FederationReport:
    """The federation report of ``service`` as of ``now`` (see the module docstring)."""
    now = time.time() if now is None else now
    core, cfg, control, limits = service.core, service.core_config, service.control, service.limits
    paused = control.paused
    pause_detail = ""
    if paused is not None:
        pause_detail = _printable(f"paused by operator {paused.get('by', '?')} (cmd {paused.get('id', '?')})",
                                  256)
    participants = [p for p in dict.fromkeys(core.participants) if _is_id(p, limits)]
    sites = {name: _site_for_report(rec, limits) for name, rec in core.site_records().items()
             if _is_id(name, limits)}
    if len(sites) > MAX_REPORT_SITES:  # the ledger keeps fewer; older accepted pairs could add some
        sites = dict(sorted(sites.items())[:MAX_REPORT_SITES])
    return FederationReport(
        fleet=service.topics.fleet, time=now, round=core.round, max_rounds=cfg.max_rounds,
        finished=core.finished, paused=paused is not None, pause_detail=pause_detail,
        excluded=tuple(s for s in sorted(control.excluded) if _is_id(s, limits))[:MAX_REPORT_SITES],
        round_started_at=max(0.0, core.round_started_at), deadline_s=float(cfg.round_deadline_s),
        quorum=cfg.quorum, min_clients=cfg.min_clients, late_policy=_printable(cfg.late_policy, 64),
        accepted=core.accepted_this_round, participants=tuple(participants[:MAX_REPORT_SITES]),
        spec=_printable(service.spec_hash, 128), bundle=service.bundle_id, version=__version__,
        n_params=cfg.n_params, sites=sites, history=history_records(core.history, closed),
        aggregation=aggregation_tokens(cfg))


def aggregation_tokens(cfg: AggregatorConfig) -> tuple[str, ...]:
    """How this aggregator combines updates, as the report's tokens (the console translates them)."""
    tokens = ["fedbuff" if cfg.fedbuff else cfg.aggregation]
    if cfg.secure:
        tokens.append("secagg")
    if cfg.privacy.mode != "off":
        tokens.append(f"dp-{cfg.privacy.mode}")
    if cfg.robust_rule != "none":
        tokens.append(f"robust-{cfg.robust_rule}")
    if cfg.gateways:
        tokens.append("gateways")
    if cfg.rank_aggregation != RoundPolicy.rank_aggregation:  # not the default rule for mixed LoRA ranks
        tokens.append(f"ranks-{cfg.rank_aggregation}")
    if cfg.server_optimizer != "fedavg":
        tokens.append(f"server-{cfg.server_optimizer}")
    return tuple(tokens)


def content_digest(data: bytes) -> bytes:
    """Digest of an encoded report without its ``time`` field: equal when nothing else changed."""
    return hashlib.sha256(_TIME_FIELD_RE.sub(b"", data, count=1)).digest()


class ReportPublisher:
    """Publishes the service's federation report (see the module docstring); main loop only."""

    def __init__(self, service: AggregatorService, min_interval_s: float = 1.0) -> None:
        self.service = service
        self.min_interval_s = float(min_interval_s)
        self.closed: dict[int, tuple[int, float]] = {}  # round -> (bytes_out, closed_at), this process
        self.pending = False  # a publish was held back by the interval (or the link): try again
        self.published = 0  # reports published (tests, logs)
        self.last_payload: bytes | None = None
        self._forced = False
        self._last_digest: bytes | None = None
        self._last_at: float | None = None
        self._warned: set[str] = set()

    def note_closed(self, rnd: int, bytes_out: int, closed_at: float) -> None:
        """Remember what the report's history shows of a round this process closed."""
        self.closed[int(rnd)] = (int(bytes_out), float(closed_at))
        for old in sorted(self.closed)[:-CLOSED_KEEP]:
            del self.closed[old]

    def request(self) -> None:
        """Publish at the next :meth:`maybe_publish`, changed or not (e.g. an operator command applied)."""
        self._forced = True

    def _warn_once(self, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        if key in self._warned:
            log.debug(msg, *args)
            return
        self._warned.add(key)
        log.warning(msg, *args, exc_info=exc_info)

    def maybe_publish(self, now: float | None = None, force: bool = False) -> bool:
        """Publish the report if it changed and ``min_interval_s`` passed since the last one, or at once
        with ``force`` (or after :meth:`request`). Returns whether it was published; never raises."""
        now = time.time() if now is None else now
        force = force or self._forced
        if not force and self._last_at is not None and 0 <= now - self._last_at < self.min_interval_s:
            self.pending = True
            return False
        transport = self.service.transport
        if transport is None or not transport.connected:
            self.pending = True  # a reconnect publishes it (forced), no pile-up of queued copies
            return False
        self.pending = False
        self._forced = False
        topic = self.service.topics.federation
        try:
            data = encode_report(build_report(self.service, now, self.closed), self.service.limits)
        except Exception as exc:  # a report problem must never stop the aggregator
            self._warn_once(f"encode:{type(exc).__name__}", "federation report not published: %s", exc,
                            exc_info=True)
            return False
        digest = content_digest(data)
        if not force and digest == self._last_digest:
            return False
        limit = transport.max_payload(topic)
        if len(data) > limit:
            self._warn_once("size", "federation report of %d bytes exceeds the broker limit %d: not "
                            "published", len(data), limit)
            return False
        try:
            transport.publish(topic, data, qos=1, retain=True)
        except Exception as exc:  # TransportError, a limit that changed: the next change tries again
            self._warn_once(f"publish:{type(exc).__name__}", "federation report not published: %s", exc)
            self.pending = True
            return False
        self._last_digest, self._last_at = digest, now
        self.last_payload = data
        self.published += 1
        log.debug("federation report published (%d bytes, round %d)", len(data), self.service.core.round)
        return True


__all__ = ["ReportPublisher", "build_report", "content_digest", "history_records"]
