"""The small JSON messages people read: a service's status and the aggregator's acknowledgements.

Updates and globals stay binary msgpack (``wire``); these two are JSON so that an operator watching
``mosquitto_sub -v -t 'fedpeft/#'`` reads them as they are. Decoded as hostile input like everything else:
a size cap before parsing, exact keys, no duplicate keys, no NaN, identifiers checked.

``fedpeft/{fleet}/status/{site}`` (retained; also the last will)::

    {"v":1,"t":"status","site":"site-07","state":"training","round":4,"time":1764590000.1,
     "version":"0.1.0","detail":""}

``fedpeft/{fleet}/ack/{site}`` (QoS 1, after the aggregator saved its decision)::

    {"v":1,"t":"ack","fleet":"line-3","site":"site-07","round":4,"msg":null,"status":"accepted",
     "reason":"","time":1764590000.2}

``fedpeft/{fleet}/control`` (QoS 1, only the ``operator`` account may publish it)::

    {"v":1,"t":"control","id":"3f2a...","action":"pause","site":null,"by":"alice","time":1764590000.3}
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final

from fedpeft_edge import __version__
from fedpeft_edge.protocol.reasons import Reason, WireFormatError
from fedpeft_edge.protocol.wire import DEFAULT_LIMITS, WIRE_VERSION, WireLimits, _check_header, _ident, _int

_PRINTABLE_RE: Final = re.compile(r"[ -~]*")  # printable ASCII: safe in logs, no control characters
_STATE_RE: Final = re.compile(r"[a-z][a-z_]*")
_VERSION_RE: Final = re.compile(r"[0-9A-Za-z.+\-]{1,32}")


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in pairs:
        if key in out:  # json.loads would silently keep the last copy
            raise WireFormatError(Reason.BAD_KEYS, f"duplicate key {key[:16]!r}")
        out[key] = val
    return out


def _json_constant(name: str) -> Any:
    raise WireFormatError(Reason.NON_FINITE, f"{name} is not allowed")


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode("ascii")


def _load(data: bytes | bytearray | memoryview, max_bytes: int, kind: str) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireFormatError(Reason.BAD_TYPE, f"message must be bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise WireFormatError(Reason.OVERSIZED, f"{kind} of {size} bytes > {max_bytes}")
    if size == 0:
        raise WireFormatError(Reason.TRUNCATED, "empty message")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_json_pairs,
                         parse_constant=_json_constant)
    except WireFormatError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WireFormatError(Reason.MALFORMED, f"invalid JSON: {type(exc).__name__}") from exc
    if not isinstance(obj, dict):
        raise WireFormatError(Reason.MALFORMED, f"top level must be an object, got {type(obj).__name__}")
    return obj


def _time(obj: dict[str, Any], key: str) -> float:
    ts = obj[key]
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be a number")
    if not math.isfinite(float(ts)) or float(ts) < 0:
        raise WireFormatError(Reason.OUT_OF_RANGE, f"{key} must be finite and >= 0")
    return float(ts)


def _text(obj: dict[str, Any], key: str, max_len: int) -> str:
    val = obj[key]
    if not isinstance(val, str):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be str")
    if len(val) > max_len or not _PRINTABLE_RE.fullmatch(val):
        raise WireFormatError(Reason.BAD_STRING, f"{key} must be printable ASCII, <= {max_len} chars")
    return val


# --------------------------------------------------------------------------------------------------
# Status (every service → operators, the aggregator's log, the console)


STATUS_KEYS: Final = frozenset({"v", "t", "site", "state", "round", "time", "version", "detail"})
MAX_STATUS_BYTES: Final = 1024
MAX_STATUS_DETAIL: Final = 256


@dataclass(frozen=True)
class StatusMessage:
    """A service's state ("online", "offline", "training", "uploading", "idle", "done", ...), the round it
    is at, when, which runtime version it runs, and a free detail (e.g. why it is paused)."""

    client_id: str
    state: str
    ts: float
    round: int | None = None
    version: str = field(default=__version__)
    detail: str = ""


def encode_status(msg: StatusMessage, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    obj = {"v": WIRE_VERSION, "t": "status", "site": msg.client_id, "state": msg.state, "round": msg.round,
           "time": round(float(msg.ts), 3), "version": msg.version, "detail": msg.detail[:MAX_STATUS_DETAIL]}
    data = _dump(obj)
    decode_status(data, limits)  # refuse to emit what a peer with the same limits would reject
    return data


def decode_status(data: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> StatusMessage:
    """Parse and validate a ``status`` (JSON object with exactly :data:`STATUS_KEYS`)."""
    obj = _load(data, MAX_STATUS_BYTES, "status")
    _check_header(obj, "status", STATUS_KEYS)
    site = _ident(obj, "site", limits)
    state = obj["state"]
    if not isinstance(state, str):
        raise WireFormatError(Reason.BAD_TYPE, "state must be str")
    if not 1 <= len(state) <= limits.max_str_len or not _STATE_RE.fullmatch(state):
        raise WireFormatError(Reason.BAD_STRING, "state must match [a-z][a-z_]*")
    rnd = None if obj["round"] is None else _int(obj, "round", 0, limits.max_round)
    version = obj["version"]
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise WireFormatError(Reason.BAD_STRING, "version must be 1-32 characters of [0-9A-Za-z.+-]")
    detail = _text(obj, "detail", MAX_STATUS_DETAIL)
    return StatusMessage(site, state, _time(obj, "time"), rnd, version, detail)


# --------------------------------------------------------------------------------------------------
# Acknowledgement (aggregator → site)

ACK_KEYS: Final = frozenset({"v", "t", "fleet", "site", "round", "msg", "status", "reason", "time"})
# accepted / duplicate / late / rejected: the core's decision on the update of (site, round);
# received: a re-sent chunk of a multi-part update the aggregator had already consumed (round unknown
# to it then, so "msg" names the chunk message id instead).
ACK_STATUSES: Final = ("accepted", "duplicate", "late", "rejected", "received")
MAX_ACK_BYTES: Final = 512  # a real ack is ~150 bytes; anything larger is refused before parsing
MAX_ACK_REASON: Final = 128
_MSG_ID_RE: Final = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class AckMessage:
    """The aggregator's durable decision on one update, sent on ``fedpeft/{fleet}/ack/{site}``.

    Sent only after the decision is in the aggregator's persisted round state, so a site may then
    delete the update from its outbox. ``round`` names the update (a site sends one per round);
    ``msg`` (a chunk message id) replaces it when only the chunks of an already consumed update came in.
    """

    fleet: str
    site: str
    round: int | None
    status: str
    reason: str = ""
    time: float = 0.0
    msg: str | None = None


def encode_ack(msg: AckMessage, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    obj = {"v": WIRE_VERSION, "t": "ack", "fleet": msg.fleet, "site": msg.site, "round": msg.round,
           "msg": msg.msg, "status": msg.status, "reason": msg.reason[:MAX_ACK_REASON],
           "time": round(float(msg.time), 3)}
    data = _dump(obj)
    decode_ack(data, limits)
    return data


def decode_ack(data: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> AckMessage:
    """Parse and validate an ``ack`` (JSON object with exactly :data:`ACK_KEYS`)."""
    obj = _load(data, MAX_ACK_BYTES, "ack")
    _check_header(obj, "ack", ACK_KEYS)
    fleet = _ident(obj, "fleet", limits)
    site = _ident(obj, "site", limits)
    rnd = None if obj["round"] is None else _int(obj, "round", 0, limits.max_round)
    mid = obj["msg"]
    if mid is not None and (not isinstance(mid, str) or not _MSG_ID_RE.fullmatch(mid)):
        raise WireFormatError(Reason.BAD_STRING, "msg must be null or 32 lowercase hex characters")
    if rnd is None and mid is None:
        raise WireFormatError(Reason.BAD_KEYS, "an ack names a round or a message id")
    status = obj["status"]
    if status not in ACK_STATUSES:  # also refuses non-strings (never equal to a listed str)
        raise WireFormatError(Reason.BAD_STRING, f"status must be one of {ACK_STATUSES}")
    reason = _text(obj, "reason", MAX_ACK_REASON)
    return AckMessage(fleet, site, rnd, status, reason, _time(obj, "time"), mid)


# --------------------------------------------------------------------------------------------------
# Bundle notice (aggregator → sites, retained on fedpeft/{fleet}/bundle)

BUNDLE_KEYS: Final = frozenset({"v", "t", "fleet", "bundle", "time"})
MAX_BUNDLE_NOTICE_BYTES: Final = 512
_BUNDLE_ID_RE: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BundleNotice:
    """The id (sha256 of the manifest content, bundle/format.py) of the site bundle the fleet trains with;
    a site holding another bundle reports ``needs_bundle`` instead of training."""

    fleet: str
    bundle_id: str
    time: float = 0.0


def encode_bundle_notice(msg: BundleNotice, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    obj = {"v": WIRE_VERSION, "t": "bundle", "fleet": msg.fleet, "bundle": msg.bundle_id,
           "time": round(float(msg.time), 3)}
    data = _dump(obj)
    decode_bundle_notice(data, limits)
    return data


def decode_bundle_notice(data: bytes | bytearray | memoryview,
                         limits: WireLimits = DEFAULT_LIMITS) -> BundleNotice:
    """Parse and validate a ``bundle`` notice (JSON object with exactly :data:`BUNDLE_KEYS`)."""
    obj = _load(data, MAX_BUNDLE_NOTICE_BYTES, "bundle notice")
    _check_header(obj, "bundle", BUNDLE_KEYS)
    fleet = _ident(obj, "fleet", limits)
    bid = obj["bundle"]
    if not isinstance(bid, str) or not _BUNDLE_ID_RE.fullmatch(bid):
        raise WireFormatError(Reason.BAD_STRING, "bundle must be 64 lowercase hex characters")
    return BundleNotice(fleet, bid, _time(obj, "time"))


# --------------------------------------------------------------------------------------------------
# Control command (operator → aggregator and sites, on fedpeft/{fleet}/control)

CONTROL_KEYS: Final = frozenset({"v", "t", "id", "action", "site", "by", "time"})
CONTROL_ACTIONS: Final = ("pause", "resume", "exclude", "include", "close_round")
SITE_ACTIONS: Final = frozenset({"exclude", "include"})  # name one site
FLEET_ACTIONS: Final = frozenset({"close_round"})  # never name a site
MAX_CONTROL_BYTES: Final = 512  # a real command is ~130 bytes
_CMD_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{7,63}")  # e.g. uuid4().hex


@dataclass(frozen=True)
class ControlCommand:
    """An operator action. ``id`` makes it idempotent (a redelivered or retained copy is applied once);
    ``site`` is None for the whole federation; ``by`` is the operator's name (the broker ACL, not this
    field, is what vouches that an operator sent it)."""

    id: str
    action: str
    site: str | None
    by: str
    time: float = 0.0

    def note(self, text: str) -> str:
        """A status detail confirming this command, e.g. ``paused by operator alice (cmd 3f2a...)``: the
        command id lets ``fedpeft-edge control`` find the confirmation among other statuses."""
        return f"{text} (cmd {self.id})"


def encode_control(msg: ControlCommand, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    obj = {"v": WIRE_VERSION, "t": "control", "id": msg.id, "action": msg.action, "site": msg.site,
           "by": msg.by, "time": round(float(msg.time), 3)}
    data = _dump(obj)
    decode_control(data, limits)
    return data


def decode_control(data: bytes | bytearray | memoryview,
                   limits: WireLimits = DEFAULT_LIMITS) -> ControlCommand:
    """Parse and validate a ``control`` command (JSON object with exactly :data:`CONTROL_KEYS`)."""
    obj = _load(data, MAX_CONTROL_BYTES, "control command")
    _check_header(obj, "control", CONTROL_KEYS)
    cid = obj["id"]
    if not isinstance(cid, str) or not _CMD_ID_RE.fullmatch(cid):
        raise WireFormatError(Reason.BAD_STRING, "id must be 8-64 characters of [A-Za-z0-9_-]")
    action = obj["action"]
    if action not in CONTROL_ACTIONS:
        raise WireFormatError(Reason.BAD_STRING, f"action must be one of {CONTROL_ACTIONS}")
    site = None if obj["site"] is None else _ident(obj, "site", limits)
    if action in SITE_ACTIONS and site is None:
        raise WireFormatError(Reason.BAD_KEYS, f"{action} names a site")
    if action in FLEET_ACTIONS and site is not None:
        raise WireFormatError(Reason.BAD_KEYS, f"{action} acts on the whole federation (site must be null)")
    by = _ident(obj, "by", limits)
    return ControlCommand(cid, action, site, by, _time(obj, "time"))


def command_id_in(detail: str) -> str | None:
    """The command id a status detail confirms (see :meth:`ControlCommand.note`), else None."""
    m = re.search(r"\(cmd ([A-Za-z0-9_\-]{8,64})\)$", detail)
    return m.group(1) if m else None




__all__ = [
    "ACK_KEYS",
    "ACK_STATUSES",
    "BUNDLE_KEYS",
    "CONTROL_ACTIONS",
    "CONTROL_KEYS",
    "MAX_ACK_BYTES",
    "MAX_BUNDLE_NOTICE_BYTES",
    "MAX_CONTROL_BYTES",
    "MAX_STATUS_BYTES",
    "STATUS_KEYS",
    "AckMessage",
    "BundleNotice",
    "ControlCommand",
    "StatusMessage",
    "command_id_in",
    "decode_ack",
    "decode_bundle_notice",
    "decode_control",
    "decode_status",
    "encode_ack",
    "encode_bundle_notice",
    "encode_control",
    "encode_status",
]
