"""MQTT topic names for one fleet (ACL rules in broker_config/acl.conf follow the same shape).

- ``fedpeft/{fleet}/global``             retained, QoS 1: the newest global adapter and its round.
- ``fedpeft/{fleet}/update/{client_id}`` QoS 1: a site's update for a round; chunks of a large update
  travel on the same topic (the envelope says whether a payload is a whole update or a chunk).
- ``fedpeft/{fleet}/status/{client_id}`` retained: online/offline (offline is the last will).
- ``fedpeft/{fleet}/ack/{client_id}``    QoS 1, aggregator → that site only: the aggregator's durable
  decision on one of its updates (JSON); the site keeps an update in its outbox until then.
- ``fedpeft/{fleet}/bundle``             retained, aggregator → sites: the id of the site bundle the fleet
  trains with (JSON, ``notices.BundleNotice``); a site holding another bundle waits (``needs_bundle``).
- ``fedpeft/{fleet}/control``            QoS 1, operator → aggregator and sites: an operator action (JSON,
  ``notices.ControlCommand``); only the ``operator`` account may publish it (broker ACL).
- ``fedpeft/{fleet}/federation``         retained, aggregator → operators: the federation report the console
  shows (round, deadline, policy, per-site counts, recent rounds; ``fleet_report.FederationReport``).
- ``fedpeft/{fleet}/info/{client_id}``   retained, site → operators: what the site runs (bundle, spec hash,
  runtime, platform; ``fleet_report.SiteInfo``).
- ``fedpeft/{fleet}/secagg/params``     retained, aggregator → sites: the open secure-aggregation session's
  public parameters (``secagg_wire.encode_params``); a new one (fresh seed) replaces a failed session.
- ``fedpeft/{fleet}/secagg/up/{site}``  QoS 1, site → aggregator: the site's message of the current phase
  (advertised keys, encrypted shares, masked input, unmasking shares).
- ``fedpeft/{fleet}/secagg/down/{site}`` retained, aggregator → that site only: its key directory, then
  the shares forwarded to it.
- ``fedpeft/{fleet}/secagg/unmask``     retained, aggregator → sites: the survivors and dropped sites
  whose shares phase 3 asks for.
Metadata (round, spec hash, sender) lives in the msgpack envelope, so MQTT 3.1.1 brokers serve too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedpeft_edge.runtime.errors import InvalidValueError

ROOT = "fedpeft"
# One topic level: no MQTT wildcards or separators, nothing Mosquitto's %c/%u substitution would mangle.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidValueError(f"{kind} {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-'"
                         " (no '/', '+', '#')")
    return name


@dataclass(frozen=True)
class Topics:
    fleet: str

    def __post_init__(self) -> None:
        check_name("fleet name", self.fleet)

    @property
    def global_(self) -> str:
        return f"{ROOT}/{self.fleet}/global"

    def update(self, client_id: str) -> str:
        return f"{ROOT}/{self.fleet}/update/{check_name('client id', client_id)}"

    @property
    def updates_filter(self) -> str:
        return f"{ROOT}/{self.fleet}/update/+"

    def status(self, client_id: str) -> str:
        return f"{ROOT}/{self.fleet}/status/{check_name('client id', client_id)}"

    @property
    def status_filter(self) -> str:
        return f"{ROOT}/{self.fleet}/status/+"

    def ack(self, client_id: str) -> str:
        return f"{ROOT}/{self.fleet}/ack/{check_name('client id', client_id)}"

    @property
    def acks_filter(self) -> str:
        return f"{ROOT}/{self.fleet}/ack/+"

    @property
    def bundle(self) -> str:
        return f"{ROOT}/{self.fleet}/bundle"

    @property
    def control(self) -> str:
        return f"{ROOT}/{self.fleet}/control"

    @property
    def federation(self) -> str:
        return f"{ROOT}/{self.fleet}/federation"

    def info(self, client_id: str) -> str:
        return f"{ROOT}/{self.fleet}/info/{check_name('client id', client_id)}"

    @property
    def info_filter(self) -> str:
        return f"{ROOT}/{self.fleet}/info/+"

    def partial(self, gateway: str) -> str:
        """A gateway's sealed partial aggregates (protocol/partial.py), bridged to the central broker."""
        return f"{ROOT}/{self.fleet}/partial/{check_name('gateway id', gateway)}"

    @property
    def partials_filter(self) -> str:
        return f"{ROOT}/{self.fleet}/partial/+"

    def is_partial(self, topic: str) -> bool:
        return topic.startswith(f"{ROOT}/{self.fleet}/partial/")

    # --- secure aggregation (protocol/secagg.py; central/secure_round.py, site/secure_sum.py) ---------
    @property
    def secagg_params(self) -> str:
        return f"{ROOT}/{self.fleet}/secagg/params"

    def secagg_up(self, site: str) -> str:
        return f"{ROOT}/{self.fleet}/secagg/up/{check_name('client id', site)}"

    @property
    def secagg_up_filter(self) -> str:
        return f"{ROOT}/{self.fleet}/secagg/up/+"

    def secagg_down(self, site: str) -> str:
        return f"{ROOT}/{self.fleet}/secagg/down/{check_name('client id', site)}"

    @property
    def secagg_unmask(self) -> str:
        return f"{ROOT}/{self.fleet}/secagg/unmask"

    def secagg_sender(self, topic: str) -> str | None:
        """The site of a ``secagg/up/<site>`` topic of this fleet (the identity the broker's ACL vouches
        for), else None."""
        parts = topic.split("/")
        if (len(parts) == 5 and parts[0] == ROOT and parts[1] == self.fleet and parts[2] == "secagg"
                and parts[3] == "up"):
            return parts[4] if _NAME_RE.match(parts[4]) else None
        return None

    def client_of(self, topic: str) -> str | None:
        """The client id of an update/status/partial topic of this fleet, else None."""
        parts = topic.split("/")
        if (len(parts) == 4 and parts[0] == ROOT and parts[1] == self.fleet
                and parts[2] in ("update", "status", "partial")):
            return parts[3] if _NAME_RE.match(parts[3]) else None
        return None

    def other_fleet_of(self, topic: str) -> str | None:
        """The fleet of an update/status topic of another (validly named) fleet, else None."""
        parts = topic.split("/")
        if (len(parts) == 4 and parts[0] == ROOT and parts[1] != self.fleet
                and parts[2] in ("update", "status") and _NAME_RE.match(parts[1])):
            return parts[1]
        return None
