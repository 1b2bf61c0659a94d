"""``fedpeft-edge gateway``'s configuration: ``[connection]`` (the line's local broker), ``[fleet]`` and
``[gateway]`` (its own keys beside the round-policy keys that decide when a batch is sealed)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedpeft_edge.central.policy import RoundPolicy
from fedpeft_edge.protocol.config import ConnectionSettings, FleetSettings, check_types, load_service_config
from fedpeft_edge.runtime.errors import InvalidValueError

# A gateway seals its batch once every site of its line is in, or after a short local deadline with at
# least one: the central deadline is what waits for slow lines, the gateway should not add to it.
DEFAULT_GATEWAY_POLICY = RoundPolicy(quorum=1_000_000, min_clients=1, round_deadline_s=30.0, max_rounds=None)


@dataclass
class GatewaySettings:
    """The gateway's own keys; the :class:`RoundPolicy` keys fill ``policy`` (``quorum`` = the line's sites,
    ``round_deadline_s`` = how long a batch may wait for them, the close-time bounds per update)."""

    client_id: str = "gateway"
    state_dir: str = "fedpeft-state/gateway"
    max_update_bytes: int = 64 * 1024 * 1024
    chunk_timeout_s: float = 120.0
    max_pending_chunk_bytes: int = 256 * 1024 * 1024
    # Unacknowledged partials are published again after every reconnect and this often.
    resend_s: float = 30.0
    # After the final global, keep serving (acks, resends) at most this long once the outbox is empty.
    final_linger_s: float = 5.0
    policy: RoundPolicy = field(default_factory=lambda: DEFAULT_GATEWAY_POLICY)

    @classmethod
    def from_table(cls, raw: dict[str, Any], where: str) -> GatewaySettings:
        own = {f.name for f in fields(cls)} - {"policy"}
        policy_keys = {f.name for f in fields(RoundPolicy)}
        unknown = sorted(set(raw) - own - policy_keys)
        if unknown:
            raise InvalidValueError(
                f"[{where}] unknown key(s) {unknown}; allowed: {sorted(own | policy_keys)}"
            )
        mine = {k: v for k, v in raw.items() if k in own}
        check_types(cls, mine, where)
        base = DEFAULT_GATEWAY_POLICY.as_kwargs()
        base.update({k: v for k, v in raw.items() if k in policy_keys})
        try:
            settings = cls(**mine, policy=RoundPolicy(**base))
        except TypeError as exc:
            raise InvalidValueError(f"[{where}] {exc}") from exc
        settings.check()
        return settings

    def check(self) -> None:
        if not self.policy.buffers_updates:
            raise InvalidValueError(
                "a gateway keeps its line's updates to bound them: leave a close-time "
                "bound on (norm_median_multiplier or samples_median_multiplier > 0, "
                "or fednova)"
            )
        if self.policy.robust_rule != "none":
            raise InvalidValueError("robust_rule applies where a round closes: set it on the aggregator for "
                                    "directly connected sites (a gateway's partial is its line's bounded "
                                    "mean)")
        if not (self.resend_s > 0 and self.final_linger_s >= 0):
            raise InvalidValueError("resend_s must be > 0 and final_linger_s >= 0")


@dataclass
class GatewayServiceConfig:
    """Everything ``fedpeft-edge gateway`` reads."""

    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    source: str | None = None


def load_gateway_config(path: str | Path | None = None, text: str | None = None) -> GatewayServiceConfig:
    return load_service_config(GatewayServiceConfig, path, text)


__all__ = ["GatewayServiceConfig", "GatewaySettings", "load_gateway_config"]
