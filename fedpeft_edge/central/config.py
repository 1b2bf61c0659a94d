"""The central services' configuration: ONE dataclass per service, filled from TOML and the CLI alike.

:class:`AggregatorServiceConfig` for ``fedpeft-edge aggregate`` (``[connection] [fleet] [aggregator]
[trainer] [privacy] [robust] [secagg]``) and :class:`BrokerServiceConfig` for ``fedpeft-edge broker``
(``[connection] [broker]``).
The ``[aggregator]`` table holds the service's own keys and the :class:`RoundPolicy` keys side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedpeft_edge.central.policy import RoundPolicy
from fedpeft_edge.protocol.config import (
    ConnectionSettings,
    FleetSettings,
    TrainerSettings,
    check_types,
    load_service_config,
)
from fedpeft_edge.protocol.privacy import PrivacyPolicy
from fedpeft_edge.protocol.secagg_policy import SecAggPolicy
from fedpeft_edge.runtime.errors import InvalidValueError


@dataclass
class BrokerSettings:
    """``fedpeft-edge broker``: the local broker launcher."""

    port: int = 1883
    bind: str = "127.0.0.1"
    prefer: str = "auto"  # mosquitto | embedded | auto
    kind: str = "dev"  # dev (loopback, anonymous) | plant (TLS, passwords, ACL)
    data_dir: str | None = None
    max_packet_size: int = 16 * 1024 * 1024
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    password_file: str | None = None
    acl_file: str | None = None
    require_certificate: bool = False


@dataclass
class AggregatorSettings:
    """``fedpeft-edge aggregate``: the service's own keys; the round policy keys fill ``policy``."""

    client_id: str = "aggregator"
    state_dir: str = "fedpeft-state/aggregator"
    initial_global: str | None = None  # .npy float32 vector; else the bundle's initial parameters
    spec_hash: str | None = None  # else the bundle's, else one derived from the vector length
    max_update_bytes: int = 64 * 1024 * 1024
    metrics_file: str | None = None  # default: <state_dir>/metrics.jsonl
    chunk_timeout_s: float = 120.0
    # Memory for half-received multi-part updates: all sites together, and one site's share (default: one
    # whole update, max_update_bytes), so one site cannot hold the whole budget.
    max_pending_chunk_bytes: int = 256 * 1024 * 1024
    max_pending_chunk_bytes_per_site: int | None = None
    # After the final round, keep answering resends (acks) and re-announcing the final global until every
    # site heard from reports it is done (or went offline), at most this long; 0: exit at once.
    final_linger_s: float = 30.0
    # The site bundle the fleet trains with, announced retained on fedpeft/<fleet>/bundle (sites holding
    # another one report needs_bundle): the bundle file (its id is read from its manifest) or the id.
    bundle_file: str | None = None
    bundle_id: str | None = None
    # Prometheus /metrics (central/metrics_http.py) on metrics_bind:metrics_port; 0: off.
    metrics_port: int = 0
    metrics_bind: str = "127.0.0.1"
    policy: RoundPolicy = field(default_factory=RoundPolicy)

    @classmethod
    def from_table(cls, raw: dict[str, Any], where: str) -> AggregatorSettings:
        own = {f.name for f in fields(cls)} - {"policy"}
        policy_keys = {f.name for f in fields(RoundPolicy)}
        unknown = sorted(set(raw) - own - policy_keys)
        if unknown:
            raise InvalidValueError(
                f"[{where}] unknown key(s) {unknown}; allowed: {sorted(own | policy_keys)}")
        mine = {k: v for k, v in raw.items() if k in own}
        check_types(cls, mine, where)
        try:
            policy = RoundPolicy(**{k: v for k, v in raw.items() if k in policy_keys})
            return cls(**mine, policy=policy)
        except TypeError as exc:
            raise InvalidValueError(f"[{where}] {exc}") from exc


@dataclass
class RobustSettings:
    """``[robust]``: the Byzantine-robust rule that replaces the weighted mean when a round closes
    (central/robust_rules.py). The same keys may stand in ``[aggregator]`` as ``robust_rule``,
    ``trim_fraction``, ``krum_byzantine``, ``krum_select``; a ``[robust]`` table wins."""

    rule: str | None = None  # none | median | trimmed_mean | multi_krum
    trim_fraction: float | None = None
    krum_byzantine: int | None = None
    krum_select: int | None = None

    def apply(self, aggregator: AggregatorSettings) -> None:
        changes = {"robust_rule": self.rule, "trim_fraction": self.trim_fraction,
                   "krum_byzantine": self.krum_byzantine, "krum_select": self.krum_select}
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:
            aggregator.policy = replace(aggregator.policy, **changes)


@dataclass
class AggregatorServiceConfig:
    """Everything ``fedpeft-edge aggregate`` reads."""

    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    aggregator: AggregatorSettings = field(default_factory=AggregatorSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)  # the bundle holds the first global
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)  # client-level DP (central/privacy.py)
    robust: RobustSettings = field(default_factory=RobustSettings)  # Byzantine-robust rule at close
    secagg: SecAggPolicy = field(default_factory=SecAggPolicy)  # secure aggregation (central/secure_round.py)
    source: str | None = None


@dataclass
class BrokerServiceConfig:
    """Everything ``fedpeft-edge broker`` reads."""

    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    source: str | None = None


def load_aggregator_config(
    path: str | Path | None = None, text: str | None = None) -> AggregatorServiceConfig:
    cfg = load_service_config(AggregatorServiceConfig, path, text)
    cfg.robust.apply(cfg.aggregator)
    return cfg


def load_broker_config(path: str | Path | None = None, text: str | None = None) -> BrokerServiceConfig:
    return load_service_config(BrokerServiceConfig, path, text)


__all__ = [
    "AggregatorServiceConfig",
    "AggregatorSettings",
    "BrokerServiceConfig",
    "BrokerSettings",
    "load_aggregator_config",
    "load_broker_config",
]
