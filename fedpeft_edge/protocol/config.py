"""TOML configuration shared by every service: reaching the broker, the fleet, the bundle, and the loader.

One file may hold every section; each service reads its own sections into ONE dataclass
(:class:`fedpeft_edge.site.config.AgentConfig`, :class:`fedpeft_edge.central.config.AggregatorServiceConfig`,
:class:`fedpeft_edge.central.config.BrokerServiceConfig`) and command-line flags override single values of
that same dataclass. Unknown sections and keys are errors (a typo must not silently fall back to a
default); sections that belong to another service are left to it.

A full example is in :mod:`fedpeft_edge.site.config`; broker_config/README.md shows every service's file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.transport import TransportConfig
from fedpeft_edge.runtime.errors import InvalidValueError, readable_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")

# Every section any service reads: a file may hold them all, and a name outside this list is a typo.
ALL_SECTIONS = ("connection", "fleet", "broker", "aggregator", "agent", "codec", "trainer", "data",
                "governor", "bundle", "console", "gateway", "privacy", "robust", "secagg")


@dataclass
class ConnectionSettings:
    """How a service reaches the broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    password_file: str | None = None  # first line is the password; keeps secrets out of the TOML
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    protocol: str = "auto"
    keepalive: int = 30
    max_packet_size: int = 16 * 1024 * 1024  # largest packet we send (larger updates are chunked)
    max_incoming_packet_size: int | None = None  # MQTT 5: the broker drops messages to us above this
    reconnect_max_s: float = 10.0  # reconnect backoff ceiling after a lost connection

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password
        if self.password_file:
            text = readable_file(self.password_file, "MQTT password file").read_text().splitlines()
            return text[0] if text else ""
        return None


@dataclass
class FleetSettings:
    name: str = "default"


@dataclass
class TrainerSettings:
    # gradient (stock onnxruntime, the default) | ort (ORT Training) | factory; see site/trainer_setup.py
    kind: str = "gradient"
    bundle_dir: str | None = None
    gradient_dir: str | None = None  # a lowered gradient model (kind = "gradient"); else made from bundle_dir
    factory: str | None = None  # "package.module:function" returning (trainer, train_fn, eval_fn)
    options: dict[str, Any] = field(default_factory=dict)
    # FedProx: mu/2 * ||w - global||^2 added to the local loss, anchored to the round's global adapter
    # (0: plain local training, FedAvg). Needs a c_* optimizer (the default).
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        mu = self.prox_mu
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu) or mu < 0:
            raise InvalidValueError(f"[trainer] prox_mu must be a finite number >= 0, got {mu!r}")
        self.prox_mu = float(mu)


def _type_ok(value: object, hint: Any) -> bool:
    """Whether a TOML value fits a simple annotation (int, float, str, bool, X | None, dict, list)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # TOML writes 30 for 30.0
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (dict, list) or hint in (dict, list):
        return isinstance(value, origin or hint)
    return True  # anything richer validates itself (its __post_init__)


def check_types(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse a TOML value of the wrong type before it reaches the service (``port = "1883"``...)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not _type_ok(value, hints[key]):
            raise InvalidValueError(
                f"[{where}] {key} = {value!r} has the wrong type; expected {hints[key]}")


def build_section(cls: type[T], raw: object, where: str) -> T:
    """Build one section dataclass from its TOML table; unknown keys are errors. A class may parse its
    table itself with a ``from_table(raw, where)`` classmethod (e.g. to fill a nested dataclass)."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise InvalidValueError(f"[{where}] must be a table")
    custom = getattr(cls, "from_table", None)
    if custom is not None:
        return custom(raw, where)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidValueError(f"[{where}] unknown key(s) {unknown}; allowed: {sorted(known)}")
    check_types(cls, raw, where)
    try:
        return cls(**raw)
    except (TypeError, ValueError) as exc:
        raise InvalidValueError(f"[{where}] {exc}") from exc


def read_toml(path: str | Path | None = None, text: str | None = None) -> dict[str, Any]:
    """The raw tables of a TOML file (or text); ``{}`` when neither is given."""
    if path is not None:
        try:
            return tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise InvalidValueError(f"cannot read config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidValueError(f"config {path} is not valid TOML: {exc}") from exc
    if text is not None:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidValueError(f"config is not valid TOML: {exc}") from exc
    return {}


def load_service_config(cls: type[T], path: str | Path | None = None, text: str | None = None) -> T:
    """Fill a service's config dataclass (one field per section it reads, plus ``source``) from TOML."""
    raw = read_toml(path, text)
    unknown = sorted(set(raw) - set(ALL_SECTIONS))
    if unknown:
        raise InvalidValueError(f"unknown config section(s) {unknown}; allowed: {list(ALL_SECTIONS)}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name == "source":
            continue
        section_cls = f.default_factory().__class__  # type: ignore[misc]
        kwargs[f.name] = build_section(section_cls, raw.get(f.name), f.name)
    return cls(**kwargs, source=str(path) if path else None)


def override(section: T, **values: object) -> T:
    """The section with the given settings replaced, skipping None (flags the user did not pass).

    Returns a new object for frozen dataclasses (assign it back); mutable ones are changed in place too.
    """
    names = {f.name for f in dataclasses.fields(section)}  # type: ignore[arg-type]
    changes = {k: v for k, v in values.items() if v is not None}
    for key in changes:
        if key not in names:
            raise InvalidValueError(f"{type(section).__name__} has no setting {key!r}")
    if not changes:
        return section
    if type(section).__dataclass_params__.frozen:  # type: ignore[attr-defined]
        return dataclasses.replace(section, **changes)  # type: ignore[type-var]
    for key, val in changes.items():
        setattr(section, key, val)
    return section


def default_spec_hash(n_params: int) -> str:
    """Spec hash used when no PEFT bundle names one: pins only the vector length."""
    return hashlib.sha256(f"fedpeft-flat-vector:{n_params}".encode()).hexdigest()[:16]


def transport_config(connection: ConnectionSettings, client_id: str, *, manual_ack: bool = False
                     ) -> TransportConfig:
    """The transport settings of ``[connection]`` for one MQTT client id."""
    c = connection
    return TransportConfig(host=c.host, port=c.port, client_id=client_id, username=c.username,
                           password=c.resolved_password(), tls_ca=c.tls_ca, tls_cert=c.tls_cert,
                           tls_key=c.tls_key, tls_insecure=c.tls_insecure, protocol=c.protocol,
                           keepalive=c.keepalive, max_packet_size=c.max_packet_size,
                           max_incoming_packet_size=c.max_incoming_packet_size,
                           reconnect_max=c.reconnect_max_s, manual_ack=manual_ack)


__all__ = [
    "ALL_SECTIONS",
    "CodecConfig",
    "ConnectionSettings",
    "FleetSettings",
    "TrainerSettings",
    "build_section",
    "default_spec_hash",
    "load_service_config",
    "override",
    "read_toml",
    "transport_config",
]
