"""``fedpeft-edge status``: the fleet as the broker's retained status topics tell it, for plant staff.

Every agent and the aggregator keep a retained JSON status on ``fedpeft/<fleet>/status/<id>`` (the broker's
last will turns it to ``offline`` when a service vanishes). Reading them needs only a broker login with
read access to that topic, so this works from any machine that may subscribe.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.config import ConnectionSettings, FleetSettings, transport_config
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport

# What a state means to someone whose first concern is the production line.
STATE_WORDS = {
    "online": "connected, waiting for work",
    "waiting": "waiting for the next global adapter",
    "training": "training on local data",
    "uploading": "sending its update",
    "idle": "waiting (no new round)",
    "paused": "paused",
    "done": "federation finished",
    "offline": "not connected",
    "needs_bundle": "needs a new bundle",
}


@dataclass
class StatusConfig:
    """The sections ``status`` reads; any service's TOML (agent or aggregator) has them."""

    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    source: str | None = None


def load_status_config(path: Any = None) -> StatusConfig:
    from fedpeft_edge.protocol.config import load_service_config

    return load_service_config(StatusConfig, path)


def collect(cfg: StatusConfig, *, client_id: str | None = None, wait_s: float = 2.0,
            connect_timeout: float = 10.0) -> tuple[list[notices.StatusMessage], list[str]]:
    """The retained statuses of the fleet (latest per id) and the topics whose payload was malformed."""
    topics = Topics(cfg.fleet.name)
    # A fresh, clean session: a status reader must not leave a persistent session behind at the broker.
    tcfg = transport_config(cfg.connection, client_id or f"status-{secrets.token_hex(4)}")
    tcfg.clean_start = True
    transport = MqttTransport(tcfg)
    transport.subscribe(topics.status_filter, qos=1)
    transport.connect(connect_timeout)
    found: dict[str, notices.StatusMessage] = {}
    bad: list[str] = []
    try:
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            msg = transport.get(timeout=min(left, 0.2))
            if msg is None:
                continue
            try:
                status = notices.decode_status(msg.payload)
            except WireFormatError:
                bad.append(msg.topic)
                continue
            found[status.client_id] = status
    finally:
        transport.close()
    return sorted(found.values(), key=lambda s: s.client_id), bad


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def rows(statuses: list[notices.StatusMessage], now: float | None = None) -> list[list[str]]:
    now = time.time() if now is None else now
    out = []
    for s in statuses:
        meaning = STATE_WORDS.get(s.state, s.state)
        if s.detail:
            meaning = f"{meaning}: {s.detail}"
        out.append([s.client_id, s.state, meaning, "-" if s.round is None else str(s.round),
                    _age(max(0.0, now - s.ts)), s.version])
    return out


HEADERS = ["id", "state", "what it means", "round", "last change", "version"]


def print_table(statuses: list[notices.StatusMessage], fleet: str) -> None:
    from fedpeft_edge.faces import report as rep

    if not statuses:
        print(f"no status on fedpeft/{fleet}/status/+ (no service has connected to this fleet yet?)")
        return
    print(f"fleet {fleet}: {len(statuses)} service(s)")
    print(rep.markdown_table(HEADERS, rows(statuses)))
