"""What the operator console reads besides statuses: the aggregator's federation report and each site's
info card. Both are retained JSON, decoded as hostile input (size cap first, exact keys, no NaN, bounded
collections, identifiers checked), like every other notice.

``fedpeft/{fleet}/federation`` (retained, aggregator → operators), rewritten when something changed::

    {"v":1,"t":"federation","fleet":"demo","time":1764590000.1,"round":3,"max_rounds":5,
     "finished":false,"paused":false,"pause_detail":"","excluded":["site-4"],
     "round_started_at":1764589990.0,"deadline_s":600.0,"quorum":4,"min_clients":2,
     "late_policy":"drop","accepted":1,"participants":["site-1"],"spec":"4f1c...","bundle":null,
     "version":"0.1.0","n_params":74504,
     "sites":{"site-1":{"rounds":3,"samples":1200,"last_round":2,"last_at":1764589999.0,
                        "rejected":{"excluded":1},"accuracy":0.91}},
     "history":[{"round":2,"participants":4,"loss":0.81,"accuracy":0.72,"eval_accuracy":0.70,
                 "bytes_in":62000,"bytes_out":300000,"duration_s":41.2,"closed_at":1764589990.0,
                 "epsilon":null}]}

``fedpeft/{fleet}/info/{site}`` (retained, site → operators), once per connection::

    {"v":1,"t":"info","site":"site-1","bundle":"ab12...","spec":"4f1c...","runtime":"onnxruntime 1.32.0",
     "version":"0.1.0","platform":"Linux aarch64","python":"3.11.7","time":1764590000.1}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

from fedpeft_edge.protocol.notices import _dump, _load, _text, _time
from fedpeft_edge.protocol.reasons import Reason, WireFormatError
from fedpeft_edge.protocol.wire import DEFAULT_LIMITS, WIRE_VERSION, WireLimits, _check_header, _ident, _int

MAX_REPORT_BYTES: Final = 4 * 1024 * 1024  # ~120 bytes a site: room for 10,000 sites and the history
MAX_REPORT_SITES: Final = 20_000
MAX_REPORT_HISTORY: Final = 100
MAX_REASONS_PER_SITE: Final = 32
MAX_INFO_BYTES: Final = 1024
_HEX64_LEN: Final = 64


def _opt_float(obj: dict[str, Any], key: str) -> float | None:
    val = obj[key]
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(float(val)):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be a finite number or null")
    return float(val)


def _opt_time(obj: dict[str, Any], key: str) -> float | None:
    return None if obj[key] is None else _time(obj, key)


def _bool(obj: dict[str, Any], key: str) -> bool:
    if not isinstance(obj[key], bool):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be true or false")
    return bool(obj[key])


def _count(obj: dict[str, Any], key: str, limits: WireLimits) -> int:
    return _int(obj, key, 0, 2**53)


def _opt_hex64(obj: dict[str, Any], key: str) -> str | None:
    val = obj[key]
    if val is None:
        return None
    if not isinstance(val, str) or len(val) != _HEX64_LEN or any(c not in "0123456789abcdef" for c in val):
        raise WireFormatError(Reason.BAD_STRING, f"{key} must be null or 64 lowercase hex characters")
    return val


def _ident_list(obj: dict[str, Any], key: str, limits: WireLimits, max_len: int) -> tuple[str, ...]:
    val = obj[key]
    if not isinstance(val, list) or len(val) > max_len:
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be a list of at most {max_len} ids")
    return tuple(_ident({"id": x}, "id", limits) for x in val)


def _object(val: Any, what: str, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(val, dict):
        raise WireFormatError(Reason.BAD_TYPE, f"{what} must be an object")
    if set(val) != keys:
        raise WireFormatError(Reason.BAD_KEYS, f"{what} must have exactly the keys {sorted(keys)}")
    return val


# --------------------------------------------------------------------------------------------------
# Federation report (aggregator → operators)

REPORT_KEYS: Final = frozenset({
    "v", "t", "fleet", "time", "round", "max_rounds", "finished", "paused", "pause_detail", "excluded",
    "round_started_at", "deadline_s", "quorum", "min_clients", "late_policy", "accepted", "participants",
    "spec", "bundle", "version", "n_params", "sites", "history", "aggregation"})
MAX_AGGREGATION_TOKENS: Final = 8
SITE_KEYS: Final = frozenset({"rounds", "samples", "last_round", "last_at", "rejected", "accuracy",
                              "lora_rank"})
MAX_LORA_RANK: Final = 4096
ROUND_KEYS: Final = frozenset({"round", "participants", "loss", "accuracy", "eval_accuracy", "bytes_in",
                               "bytes_out", "duration_s", "closed_at", "epsilon"})


@dataclass(frozen=True)
class SiteRecord:
    """What the aggregator counted of one site: rounds it contributed to and samples it claimed (accepted
    updates only), the last round and time it was counted, its rejected updates by reason, and the
    held-out accuracy on its own data it reported with its last accepted update (None: never), and the
    LoRA rank of that update (None: not a LoRA fleet, or the aggregator knows no layout)."""

    rounds: int = 0
    samples: int = 0
    last_round: int | None = None
    last_at: float | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    accuracy: float | None = None
    lora_rank: int | None = None


@dataclass(frozen=True)
class RoundRecord:
    """One closed round as charted: participants, weighted client loss and accuracy (training), the
    sites' held-out accuracy of the global they started from (``eval_accuracy``), bytes, duration."""

    round: int
    participants: int
    loss: float | None = None
    accuracy: float | None = None
    eval_accuracy: float | None = None
    bytes_in: int = 0
    bytes_out: int | None = None
    duration_s: float = 0.0
    closed_at: float | None = None
    epsilon: float | None = None  # differential privacy spent so far, at the configured delta (None: off)


@dataclass(frozen=True)
class FederationReport:
    fleet: str
    time: float
    round: int
    max_rounds: int | None
    finished: bool
    paused: bool
    pause_detail: str
    excluded: tuple[str, ...]
    round_started_at: float
    deadline_s: float
    quorum: int
    min_clients: int
    late_policy: str
    accepted: int
    participants: tuple[str, ...]
    spec: str
    bundle: str | None
    version: str
    n_params: int
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    history: tuple[RoundRecord, ...] = ()
    # How rounds are aggregated, as tokens (central/federation_report.py: fedavg | fednova | fedbuff, then
    # secagg, dp-central | dp-distributed, robust-<rule>, gateways, server-<optimizer>)
    aggregation: tuple[str, ...] = ()

    @property
    def deadline_at(self) -> float:
        return self.round_started_at + self.deadline_s


def encode_report(rep: FederationReport, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    obj = {
        "v": WIRE_VERSION, "t": "federation", "fleet": rep.fleet, "time": round(rep.time, 3),
        "round": rep.round, "max_rounds": rep.max_rounds, "finished": rep.finished, "paused": rep.paused,
        "pause_detail": rep.pause_detail[:256], "excluded": list(rep.excluded),
        "round_started_at": round(rep.round_started_at, 3), "deadline_s": float(rep.deadline_s),
        "quorum": rep.quorum, "min_clients": rep.min_clients, "late_policy": rep.late_policy,
        "accepted": rep.accepted, "participants": list(rep.participants), "spec": rep.spec,
        "bundle": rep.bundle, "version": rep.version, "n_params": rep.n_params,
        "sites": {name: {"rounds": s.rounds, "samples": s.samples, "last_round": s.last_round,
                         "last_at": None if s.last_at is None else round(s.last_at, 3),
                         "rejected": dict(sorted(s.rejected.items())[:MAX_REASONS_PER_SITE]),
                         "accuracy": None if s.accuracy is None else round(float(s.accuracy), 4),
                         "lora_rank": s.lora_rank}
                  for name, s in sorted(rep.sites.items())[:MAX_REPORT_SITES]},
        "history": [{"round": h.round, "participants": h.participants, "loss": h.loss,
                     "accuracy": h.accuracy, "eval_accuracy": h.eval_accuracy, "bytes_in": h.bytes_in,
                     "bytes_out": h.bytes_out, "duration_s": round(h.duration_s, 3),
                     "closed_at": None if h.closed_at is None else round(h.closed_at, 3),
                     "epsilon": h.epsilon}
                    for h in rep.history[-MAX_REPORT_HISTORY:]],
        "aggregation": list(rep.aggregation[:MAX_AGGREGATION_TOKENS]),
    }
    data = _dump(obj)
    decode_report(data, limits)  # refuse to emit what a reader with the same limits would reject
    return data


def _site_record(val: Any, limits: WireLimits) -> SiteRecord:
    obj = _object(val, "a site record", SITE_KEYS)
    rej = obj["rejected"]
    if not isinstance(rej, dict) or len(rej) > MAX_REASONS_PER_SITE:
        raise WireFormatError(Reason.BAD_TYPE, f"rejected must map at most {MAX_REASONS_PER_SITE} reasons")
    rejected = {_ident({"r": k}, "r", limits): _count(rej, k, limits) for k in rej}
    last_round = None if obj["last_round"] is None else _int(obj, "last_round", 0, limits.max_round)
    accuracy = _opt_float(obj, "accuracy")
    if accuracy is not None and not 0.0 <= accuracy <= 1.0:
        raise WireFormatError(Reason.OUT_OF_RANGE, "accuracy must be in [0, 1]")
    lora_rank = None if obj["lora_rank"] is None else _int(obj, "lora_rank", 1, MAX_LORA_RANK)
    return SiteRecord(_count(obj, "rounds", limits), _count(obj, "samples", limits), last_round,
                      _opt_time(obj, "last_at"), rejected, accuracy, lora_rank)


def _round_record(val: Any, limits: WireLimits) -> RoundRecord:
    obj = _object(val, "a round record", ROUND_KEYS)
    bytes_out = None if obj["bytes_out"] is None else _count(obj, "bytes_out", limits)
    duration = _opt_float(obj, "duration_s")
    if duration is None or duration < 0:
        raise WireFormatError(Reason.OUT_OF_RANGE, "duration_s must be >= 0")
    epsilon = _opt_float(obj, "epsilon")
    if epsilon is not None and epsilon < 0:
        raise WireFormatError(Reason.OUT_OF_RANGE, "epsilon must be >= 0")
    return RoundRecord(_int(obj, "round", 0, limits.max_round), _count(obj, "participants", limits),
                       _opt_float(obj, "loss"), _opt_float(obj, "accuracy"), _opt_float(obj, "eval_accuracy"),
                       _count(obj, "bytes_in", limits), bytes_out, duration, _opt_time(obj, "closed_at"),
                       epsilon)


def decode_report(data: bytes | bytearray | memoryview,
                  limits: WireLimits = DEFAULT_LIMITS) -> FederationReport:
    """Parse and validate a ``federation`` report (JSON object with exactly :data:`REPORT_KEYS`)."""
    obj = _load(data, MAX_REPORT_BYTES, "federation report")
    _check_header(obj, "federation", REPORT_KEYS)
    sites_raw = obj["sites"]
    if not isinstance(sites_raw, dict) or len(sites_raw) > MAX_REPORT_SITES:
        raise WireFormatError(Reason.BAD_TYPE, f"sites must map at most {MAX_REPORT_SITES} site ids")
    sites = {_ident({"s": k}, "s", limits): _site_record(v, limits) for k, v in sites_raw.items()}
    hist_raw = obj["history"]
    if not isinstance(hist_raw, list) or len(hist_raw) > MAX_REPORT_HISTORY:
        raise WireFormatError(Reason.BAD_TYPE, f"history must be a list of at most {MAX_REPORT_HISTORY}")
    deadline = _opt_float(obj, "deadline_s")
    if deadline is None or deadline <= 0:
        raise WireFormatError(Reason.OUT_OF_RANGE, "deadline_s must be > 0")
    return FederationReport(
        fleet=_ident(obj, "fleet", limits), time=_time(obj, "time"),
        round=_int(obj, "round", 0, limits.max_round),
        max_rounds=None if obj["max_rounds"] is None else _int(obj, "max_rounds", 1, limits.max_round),
        finished=_bool(obj, "finished"), paused=_bool(obj, "paused"),
        pause_detail=_text(obj, "pause_detail", 256),
        excluded=_ident_list(obj, "excluded", limits, MAX_REPORT_SITES),
        round_started_at=_time(obj, "round_started_at"), deadline_s=deadline,
        quorum=_int(obj, "quorum", 1, 2**31), min_clients=_int(obj, "min_clients", 1, 2**31),
        late_policy=_text(obj, "late_policy", 64), accepted=_count(obj, "accepted", limits),
        participants=_ident_list(obj, "participants", limits, MAX_REPORT_SITES),
        spec=_text(obj, "spec", 128), bundle=_opt_hex64(obj, "bundle"), version=_text(obj, "version", 32),
        n_params=_count(obj, "n_params", limits), sites=sites,
        history=tuple(_round_record(h, limits) for h in hist_raw),
        aggregation=_ident_list(obj, "aggregation", limits, MAX_AGGREGATION_TOKENS),
    )


# --------------------------------------------------------------------------------------------------
# Site info card (site → operators)

INFO_KEYS: Final = frozenset({"v", "t", "site", "bundle", "spec", "runtime", "version", "platform", "python",
                              "time"})


@dataclass(frozen=True)
class SiteInfo:
    """What a site runs: its bundle id (None without a signed bundle), the spec hash of its adapter, its
    training runtime, this package's version, its platform and Python."""

    site: str
    bundle: str | None
    spec: str
    runtime: str
    version: str
    platform: str
    python: str
    time: float = 0.0


def encode_info(info: SiteInfo, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    obj = {"v": WIRE_VERSION, "t": "info", "site": info.site, "bundle": info.bundle, "spec": info.spec[:128],
           "runtime": info.runtime[:64], "version": info.version[:32], "platform": info.platform[:64],
           "python": info.python[:32], "time": round(info.time, 3)}
    data = _dump(obj)
    decode_info(data, limits)
    return data


def decode_info(data: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> SiteInfo:
    """Parse and validate a site ``info`` card (JSON object with exactly :data:`INFO_KEYS`)."""
    obj = _load(data, MAX_INFO_BYTES, "site info")
    _check_header(obj, "info", INFO_KEYS)
    return SiteInfo(_ident(obj, "site", limits), _opt_hex64(obj, "bundle"), _text(obj, "spec", 128),
                    _text(obj, "runtime", 64), _text(obj, "version", 32), _text(obj, "platform", 64),
                    _text(obj, "python", 32), _time(obj, "time"))


__all__ = [
    "INFO_KEYS",
    "MAX_REPORT_BYTES",
    "REPORT_KEYS",
    "FederationReport",
    "RoundRecord",
    "SiteInfo",
    "SiteRecord",
    "decode_info",
    "decode_report",
    "encode_info",
    "encode_report",
]
