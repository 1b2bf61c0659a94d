"""TOML configuration of the services (broker launcher, aggregator, edge agent).

One file may hold every section; each command reads the sections it needs and command-line flags
override single values. Unknown keys are errors (a typo must not silently fall back to a default).

Example (agent)::

    [connection]
    host = "broker.plant.local"
    port = 8883
    username = "site-07"
    password_file = "/etc/fedpeft/site-07.pass"
    tls_ca = "/etc/fedpeft/ca.crt"

    [fleet]
    name = "line-3"

    [agent]
    client_id = "site-07"
    state_dir = "/var/lib/fedpeft/agent"
    local_steps = 50

    [codec]
    mode = "topk_int8"
    topk_ratio = 0.01

    [trainer]
    kind = "ort"
    bundle_dir = "/var/lib/fedpeft/bundle"

    [data]
    path = "/var/lib/fedpeft/site-data.jsonl"   # or: dataset = "20newsgroups" + client_index, num_clients
    classes = ["normal", "bearing_fault", "misalignment"]
    options = { prepared_dir = "/var/lib/fedpeft/model", max_len = 64 }
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from fedpeft_edge.data.local_files import LocalDataLimits, check_classes
from fedpeft_edge.protocol.transport import TransportConfig
from fedpeft_edge.runtime.errors import InvalidValueError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")


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
            text = Path(self.password_file).read_text().splitlines()
            return text[0] if text else ""
        return None


@dataclass
class FleetSettings:
    name: str = "default"


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
    """``fedpeft-edge aggregate``: the central aggregation service (names follow AggregatorConfig)."""

    client_id: str = "aggregator"
    state_dir: str = "fedpeft-state/aggregator"
    max_rounds: int = 10
    quorum: int = 2  # close the round as soon as this many updates were accepted ...
    min_clients: int = 1  # ... or at the deadline if at least this many arrived
    round_deadline_s: float = 300.0
    late_policy: str = "drop"  # drop | stale_weighted (updates trained from an older global)
    staleness_alpha: float = 0.5
    max_staleness: int = 4
    norm_bound: float | None = None
    norm_mode: str = "clip"  # clip | reject
    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam | fedyogi
    server_opt_params: dict[str, float] = field(default_factory=dict)  # e.g. {lr = 1.0, momentum = 0.9}
    weighting: str = "samples"  # samples | uniform
    global_mode: str = "fp32"  # fp32 | int8 (downlink encoding of the global adapter)
    initial_global: str | None = None  # .npy float32 vector; else the trainer's initial parameters
    spec_hash: str | None = None  # else the bundle's, else one derived from the vector length
    max_update_bytes: int = 64 * 1024 * 1024
    metrics_file: str | None = None  # default: <state_dir>/metrics.jsonl
    chunk_timeout_s: float = 120.0


@dataclass
class CodecSettings:
    mode: str = "topk_int8"
    topk_ratio: float = 0.01
    block: int = 256
    stochastic_rounding: bool = False
    error_feedback: bool = True


@dataclass
class AgentSettings:
    """``fedpeft-edge agent``: one site's training agent."""

    client_id: str = ""
    state_dir: str = "fedpeft-state/agent"
    local_epochs: int = 1
    local_steps: int | None = None  # cap on optimizer steps per round (None: full epochs)
    threads: int = 1
    max_rounds: int | None = None  # stop after this many rounds even if the aggregator goes on
    newer_global_policy: str = "finish"  # finish | abandon (a newer global arrived while training)
    dump_updates: bool = False  # keep a copy of every sent update in <state_dir>/sent/ (audit, tests)
    evaluate: bool = True
    idle_exit_s: float | None = None  # stop when no new global arrived for this long (tests, demos)


@dataclass
class TrainerSettings:
    kind: str = "ort"  # ort | factory
    bundle_dir: str | None = None
    factory: str | None = None  # "package.module:function" returning (trainer, train_fn, eval_fn)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSettings:
    """The site's data: either its own file (``path`` + ``classes``) or a share of a benchmark dataset
    (``dataset`` + partition keys, for demos). ``options``: model input settings (``prepared_dir``, ...)."""

    dataset: str | None = None  # benchmark dataset name (exclusive with path)
    path: str | None = None  # the site's own .jsonl / .csv / .npz file (fedpeft_edge/data/local_files.py)
    classes: list[str] = field(default_factory=list)  # with path: label names in the head's output order
    eval_fraction: float = 0.2  # with path: held-out local test part (fixed by seed)
    max_file_bytes: int = 512 * 1024 * 1024  # with path: limits checked while reading the file
    max_rows: int = 200_000
    max_text_chars: int = 20_000
    split: str = "train"
    client_index: int = 0
    num_clients: int = 1
    partition: str = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    max_samples: int | None = None
    batch_size: int = 16
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Source keys must agree (also re-checked after command-line overrides)."""
        if self.dataset and self.path:
            raise InvalidValueError("[data] set either dataset (a benchmark share) or path (the site's own file), "
                             "not both")
        if self.path:
            check_classes(self.classes)
            self.limits()
        elif self.classes:
            raise InvalidValueError("[data] classes applies to path only (a named dataset has its own classes)")
        if not (isinstance(self.eval_fraction, (int, float)) and 0.0 <= self.eval_fraction < 1.0):
            raise InvalidValueError(f"[data] eval_fraction must be in [0, 1), got {self.eval_fraction!r}")

    def limits(self) -> LocalDataLimits:
        return LocalDataLimits(max_file_bytes=self.max_file_bytes, max_rows=self.max_rows,
                               max_text_chars=self.max_text_chars)


@dataclass
class ServiceConfig:
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    aggregator: AggregatorSettings = field(default_factory=AggregatorSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    codec: CodecSettings = field(default_factory=CodecSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    data: DataSettings = field(default_factory=DataSettings)
    source: str | None = None  # the file it came from (for log messages)


def _build(cls: type[T], raw: object, where: str) -> T:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise InvalidValueError(f"[{where}] must be a table")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InvalidValueError(f"[{where}] unknown key(s) {unknown}; allowed: {sorted(known)}")
    return cls(**raw)


def load_config(path: str | Path | None = None, text: str | None = None) -> ServiceConfig:
    """Read a TOML file (or text); missing sections take their defaults."""
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise InvalidValueError(f"cannot read config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidValueError(f"config {path} is not valid TOML: {exc}") from exc
    elif text is not None:
        raw = tomllib.loads(text)
    else:
        raw = {}
    sections = {f.name: f for f in fields(ServiceConfig) if f.name != "source"}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise InvalidValueError(f"unknown config section(s) {unknown}; allowed: {sorted(sections)}")
    kwargs = {name: _build(f.default_factory().__class__, raw.get(name), name)  # type: ignore[misc]
              for name, f in sections.items()}
    return ServiceConfig(**kwargs, source=str(path) if path else None)


def override(section: object, **values: object) -> None:
    """Set the given attributes of a settings object, skipping None (flags the user did not pass)."""
    names = {f.name for f in dataclasses.fields(section)}  # type: ignore[arg-type]
    for key, val in values.items():
        if val is None:
            continue
        if key not in names:
            raise InvalidValueError(f"{type(section).__name__} has no setting {key!r}")
        setattr(section, key, val)


def default_spec_hash(n_params: int) -> str:
    """Spec hash used when no PEFT bundle names one: pins only the vector length."""
    return hashlib.sha256(f"fedpeft-flat-vector:{n_params}".encode()).hexdigest()[:16]


def transport_config(cfg: ServiceConfig, client_id: str, *, manual_ack: bool = False) -> TransportConfig:
    """The transport settings of ``[connection]`` for one MQTT client id."""
    c = cfg.connection
    return TransportConfig(host=c.host, port=c.port, client_id=client_id, username=c.username,
                           password=c.resolved_password(), tls_ca=c.tls_ca, tls_cert=c.tls_cert,
                           tls_key=c.tls_key, tls_insecure=c.tls_insecure, protocol=c.protocol,
                           keepalive=c.keepalive, max_packet_size=c.max_packet_size,
                           max_incoming_packet_size=c.max_incoming_packet_size,
                           reconnect_max=c.reconnect_max_s, manual_ack=manual_ack)
