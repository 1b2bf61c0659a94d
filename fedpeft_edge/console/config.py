"""``console.toml``: the broker connection (as the ``operator`` account), the fleet, and ``[console]``.

The console is a central-side service like the aggregator: the same ``[connection]`` and ``[fleet]``
sections (protocol/config.py), plus where it listens, whom it lets in and when it raises an alert.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from fedpeft_edge.protocol.config import ConnectionSettings, FleetSettings, load_service_config
from fedpeft_edge.runtime.errors import InvalidValueError


@dataclass
class ConsoleSettings:
    bind: str = "127.0.0.1"
    port: int = 8080
    users_file: str = "console-users.json"  # fedpeft-edge console-user add NAME --role viewer|operator
    state_dir: str = "console-state"  # the audit log (events.jsonl) and the rounds seen
    tls_cert: str | None = None  # HTTPS: serve with this certificate and key (PEM)
    tls_key: str | None = None
    # Plain HTTP on a non-loopback address sends passwords and session cookies in the clear; refused
    # unless asked for (e.g. behind a TLS-terminating reverse proxy on the same host).
    insecure_http: bool = False
    aggregator_id: str = "aggregator"  # its status is the federation's, not a site's
    alert_silent_rounds: int = 2  # alert when a site contributed nothing for more than this many rounds
    alert_rejection_rate: float = 0.5  # alert when more than this share of a site's updates was rejected
    alert_min_updates: int = 3  # ... once it sent at least this many
    session_idle_s: float = 1800.0
    refresh_s: float = 3.0  # how often an open page refreshes its figures

    def __post_init__(self) -> None:
        if not 0 <= int(self.port) <= 65535:
            raise InvalidValueError(f"[console] port must be 0-65535, got {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidValueError("[console] tls_cert and tls_key go together")
        if self.alert_silent_rounds < 1:
            raise InvalidValueError("[console] alert_silent_rounds must be >= 1")
        if not 0 < self.alert_rejection_rate <= 1:
            raise InvalidValueError("[console] alert_rejection_rate must be in (0, 1]")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check_exposure(self) -> None:
        """Refuse plain HTTP beyond this host unless ``insecure_http`` says it is wanted."""
        if self.tls or self.insecure_http or is_loopback(self.bind):
            return
        raise InvalidValueError(
            f"[console] bind = {self.bind!r} serves beyond this host over plain HTTP: passwords and "
            "session cookies would cross the plant network in the clear. Set tls_cert and tls_key, or "
            "insecure_http = true behind a TLS-terminating proxy"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ConsoleConfig:
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    source: str | None = None


def load_console_config(path: Any = None, text: str | None = None) -> ConsoleConfig:
    return load_service_config(ConsoleConfig, path, text)


__all__ = ["ConsoleConfig", "ConsoleSettings", "is_loopback", "load_console_config"]
