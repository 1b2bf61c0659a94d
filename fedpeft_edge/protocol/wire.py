"""Wire envelope: versioned msgpack maps with short keys, decoded as hostile input.

Spec: ``docs/wire-format.md``. Three message kinds travel over MQTT:

* ``update`` (site → aggregator): one encoded adapter delta plus who/when/how-much metadata;
* ``global`` (aggregator → sites, retained): the global adapter of a round;
* ``status`` (site → anyone, retained / last will): the agent's state.

A fourth kind, ``ack`` (aggregator → one site), is small JSON rather than msgpack so operators can read it
with ``mosquitto_sub``; it is decoded just as strictly (:func:`decode_ack`).

Decoding order, cheapest check first: total size ≤ ``max_message_bytes`` → msgpack with every length
limit set and ext types refused → exact key set → types (``bool`` never passes as ``int``) → ranges and
charsets → codec fields vs payload length (before anything is allocated from a declared size) →
checksum (blake2b, 8-byte digest, of the payload bytes). Every failure is a
:class:`~fedpeft_edge.protocol.reasons.WireFormatError` with a ``reason`` code.

Codec-level validation of the payload itself (indices, scales) happens in ``codec.parse`` /
``codec.accumulate_into``, which the aggregator runs before touching its accumulator.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from fedpeft_edge.protocol.codec import DENSE_MODES, EncodedUpdate, check_fields
from fedpeft_edge.protocol.reasons import Reason, WireFormatError

WIRE_VERSION: Final = 1
CHECKSUM_BYTES: Final = 8  # blake2b(payload, digest_size=8)

# Identifiers become MQTT topic levels: no '/', '+', '#', no spaces or control characters.
_IDENT_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_HEX_RE: Final = re.compile(r"[0-9a-f]+")
_KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")

# Envelope keys, per kind (exact sets: unknown or missing keys are errors).
UPDATE_KEYS: Final = frozenset({"v", "t", "fl", "r", "c", "sh", "ns", "m", "cd", "p", "ck"})
GLOBAL_KEYS: Final = frozenset({"v", "t", "fl", "r", "sh", "cd", "p", "ck", "meta"})
CODEC_KEYS: Final = frozenset({"mo", "n", "k", "b", "ic", "il"})


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds applied while decoding untrusted bytes (the aggregator picks them per fleet)."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_params: int = 64 * 1024 * 1024
    max_str_len: int = 64  # fleet, client_id, metric keys, status state
    max_metrics: int = 32  # entries in "m" / "meta"
    max_num_samples: int = 10**9
    max_round: int = 2**40
    spec_hash_min_len: int = 8
    spec_hash_max_len: int = 128

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_params", "max_str_len", "max_metrics", "max_num_samples"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"WireLimits.{name} must be a positive int, got {val!r}")


DEFAULT_LIMITS: Final = WireLimits()


@dataclass(frozen=True)
class UpdateMessage:
    """A site's update for ``round`` (the round of the global model it trained from)."""

    fleet: str
    round: int
    client_id: str
    spec_hash: str
    num_samples: int
    metrics: dict[str, float]
    update: EncodedUpdate


@dataclass(frozen=True)
class GlobalMessage:
    """The global adapter for ``round``; sites train from it and answer with ``round`` in their update.

    ``meta`` holds small scalars (participants, loss, server optimiser...), str/int/float/bool only.
    """

    fleet: str
    round: int
    spec_hash: str
    vector: EncodedUpdate
    meta: dict[str, Any] = field(default_factory=dict)


def checksum(payload: bytes | memoryview) -> bytes:
    """8-byte blake2b digest of the payload (integrity, not authentication)."""
    return hashlib.blake2b(payload, digest_size=CHECKSUM_BYTES).digest()


# --------------------------------------------------------------------------------------------------
# Encoding (trusted side: still validates so a bug never puts a message on the wire it would reject)


def _codec_map(enc: EncodedUpdate) -> dict[str, Any]:
    return {"mo": enc.mode, "n": enc.n, "k": enc.k, "b": enc.block, "ic": enc.index_coding,
            "il": enc.index_nbytes}


def _pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode_update(msg: UpdateMessage, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    obj = {"v": WIRE_VERSION, "t": "update", "fl": msg.fleet, "r": msg.round, "c": msg.client_id,
           "sh": msg.spec_hash, "ns": msg.num_samples, "m": {k: float(v) for k, v in msg.metrics.items()},
           "cd": _codec_map(msg.update), "p": bytes(msg.update.payload), "ck": checksum(msg.update.payload)}
    data = _pack(obj)
    decode_update(data, limits)  # refuse to emit what a peer with the same limits would reject
    return data


def encode_global(msg: GlobalMessage, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    obj = {"v": WIRE_VERSION, "t": "global", "fl": msg.fleet, "r": msg.round, "sh": msg.spec_hash,
           "cd": _codec_map(msg.vector), "p": bytes(msg.vector.payload), "ck": checksum(msg.vector.payload),
           "meta": dict(msg.meta)}
    data = _pack(obj)
    decode_global(data, limits)
    return data


# --------------------------------------------------------------------------------------------------
# Decoding (hostile side)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireFormatError(Reason.MALFORMED, f"msgpack ext type {code} is not allowed")


def _unpack(data: bytes | bytearray | memoryview, limits: WireLimits, kind: str) -> dict[str, Any]:
    return unpack_map(data, max_bytes=limits.max_message_bytes, max_bin=limits.max_message_bytes,
                      max_str=max(4 * limits.max_str_len, 256), max_array=0,  # no arrays anywhere in v1
                      max_map=max(limits.max_metrics, 16))


def unpack_map(data: object, *, max_bytes: int, max_bin: int, max_str: int, max_array: int,
               max_map: int) -> dict[str, Any]:
    """Strict msgpack decoding of one top-level map (hostile input): size cap before parsing, no ext
    types, per-container length limits, one typed reason per failure. ``max_array = 0`` refuses arrays."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireFormatError(Reason.BAD_TYPE, f"message must be bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise WireFormatError(Reason.OVERSIZED, f"{size} bytes > limit {max_bytes}")
    if size == 0:
        raise WireFormatError(Reason.TRUNCATED, "empty message")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext,
            max_bin_len=max_bin, max_str_len=max_str, max_array_len=max_array, max_map_len=max_map,
            max_ext_len=0,
        )
    except WireFormatError:
        raise
    except msgpack.ExtraData as exc:
        raise WireFormatError(Reason.TRAILING, "bytes after the message") from exc
    except msgpack.StackError as exc:
        raise WireFormatError(Reason.MALFORMED, "nesting too deep") from exc
    except ValueError as exc:  # incomplete input, or a length above one of the limits
        text = str(exc)
        if "incomplete" in text:
            raise WireFormatError(Reason.TRUNCATED, "message ends early") from exc
        if "max_ext_len" in text:
            raise WireFormatError(Reason.MALFORMED, "msgpack ext types are not allowed") from exc
        if max_array == 0 and "max_array_len" in text:
            raise WireFormatError(Reason.BAD_TYPE, "arrays are not part of wire v1") from exc
        if "exceeds" in text or "max_" in text:
            raise WireFormatError(Reason.OVERSIZED, text) from exc
        raise WireFormatError(Reason.MALFORMED, f"invalid msgpack: {text}") from exc
    except Exception as exc:  # FormatError, UnicodeDecodeError, TypeError (unhashable key)...
        raise WireFormatError(Reason.MALFORMED, f"invalid msgpack: {type(exc).__name__}") from exc
    if not isinstance(obj, dict):
        raise WireFormatError(Reason.MALFORMED, f"top level must be a map, got {type(obj).__name__}")
    return obj


def _check_header(obj: dict[str, Any], kind: str, keys: frozenset[str]) -> None:
    v = obj.get("v")
    if isinstance(v, bool) or not isinstance(v, int) or v != WIRE_VERSION:
        raise WireFormatError(Reason.BAD_VERSION, f"unsupported wire version {v!r} (want {WIRE_VERSION})")
    if obj.get("t") != kind:
        raise WireFormatError(Reason.BAD_KIND, f"expected a {kind!r} message, got {obj.get('t')!r}")
    _exact_keys(obj, keys, kind)


def _exact_keys(obj: dict[str, Any], keys: frozenset[str], where: str) -> None:
    got = obj.keys()
    if got != keys:
        missing = sorted(keys - got)
        unknown = sorted(str(k) for k in got - keys)
        raise WireFormatError(Reason.BAD_KEYS, f"{where}: missing {missing}, unknown {unknown[:8]}")


def _int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    val = obj[key]
    if isinstance(val, bool) or not isinstance(val, int):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be int, got {type(val).__name__}")
    if not lo <= val <= hi:
        raise WireFormatError(Reason.OUT_OF_RANGE, f"{key}={val} outside [{lo}, {hi}]")
    return val


def _ident(obj: dict[str, Any], key: str, limits: WireLimits) -> str:
    val = obj[key]
    if not isinstance(val, str):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be str, got {type(val).__name__}")
    if not 1 <= len(val) <= limits.max_str_len or not _IDENT_RE.fullmatch(val):
        raise WireFormatError(Reason.BAD_STRING, f"{key} must match [A-Za-z0-9][A-Za-z0-9_.-]* "
                                                 f"with 1..{limits.max_str_len} chars")
    return val


def _spec_hash(obj: dict[str, Any], limits: WireLimits) -> str:
    val = obj["sh"]
    if not isinstance(val, str):
        raise WireFormatError(Reason.BAD_TYPE, f"sh must be str, got {type(val).__name__}")
    if not limits.spec_hash_min_len <= len(val) <= limits.spec_hash_max_len or not _HEX_RE.fullmatch(val):
        raise WireFormatError(Reason.BAD_STRING, f"sh must be {limits.spec_hash_min_len}.."
                                                 f"{limits.spec_hash_max_len} lowercase hex chars")
    return val


def _float_map(obj: dict[str, Any], key: str, limits: WireLimits) -> dict[str, float]:
    val = obj[key]
    if not isinstance(val, dict):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be a map")
    if len(val) > limits.max_metrics:
        raise WireFormatError(Reason.OVERSIZED, f"{key} has {len(val)} entries > {limits.max_metrics}")
    out: dict[str, float] = {}
    for name, x in val.items():
        _check_key(key, name, limits)
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise WireFormatError(Reason.BAD_TYPE, f"{key}.{name} must be a number")
        fx = float(x)
        if not math.isfinite(fx):
            raise WireFormatError(Reason.NON_FINITE, f"{key}.{name} is not finite")
        out[name] = fx
    return out


def _check_key(where: str, name: object, limits: WireLimits) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= limits.max_str_len or not _KEY_RE.fullmatch(name):
        raise WireFormatError(Reason.BAD_STRING, f"{where} key {name!r} is not a valid name")


def _meta_map(obj: dict[str, Any], limits: WireLimits) -> dict[str, Any]:
    val = obj["meta"]
    if not isinstance(val, dict):
        raise WireFormatError(Reason.BAD_TYPE, "meta must be a map")
    if len(val) > limits.max_metrics:
        raise WireFormatError(Reason.OVERSIZED, f"meta has {len(val)} entries > {limits.max_metrics}")
    for name, x in val.items():
        _check_key("meta", name, limits)
        if isinstance(x, float) and not math.isfinite(x):
            raise WireFormatError(Reason.NON_FINITE, f"meta.{name} is not finite")
        if isinstance(x, str):
            if len(x) > limits.max_str_len * 4:
                raise WireFormatError(Reason.OVERSIZED, f"meta.{name} string too long")
        elif not isinstance(x, bool | int | float):
            raise WireFormatError(Reason.BAD_TYPE, f"meta.{name} must be str/int/float/bool")
    return dict(val)


def _encoded(obj: dict[str, Any], limits: WireLimits) -> EncodedUpdate:
    cd, payload = obj["cd"], obj["p"]
    if not isinstance(cd, dict):
        raise WireFormatError(Reason.BAD_TYPE, "cd must be a map")
    _exact_keys(cd, CODEC_KEYS, "cd")
    if not isinstance(payload, bytes):
        raise WireFormatError(Reason.BAD_TYPE, f"p must be bin, got {type(payload).__name__}")
    for key in ("mo", "ic"):
        if not isinstance(cd[key], str):
            raise WireFormatError(Reason.BAD_TYPE, f"cd.{key} must be str")
    # Declared sizes are checked against each other and len(payload) before any allocation.
    check_fields(cd["mo"], cd["n"], cd["k"], cd["b"], cd["ic"], cd["il"], len(payload),
                 max_params=limits.max_params)
    ck = obj["ck"]
    if not isinstance(ck, bytes):
        raise WireFormatError(Reason.BAD_TYPE, "ck must be bin")
    if len(ck) != CHECKSUM_BYTES or ck != checksum(payload):
        raise WireFormatError(Reason.CHECKSUM, "payload checksum mismatch")
    return EncodedUpdate(cd["mo"], cd["n"], cd["k"], cd["b"], cd["ic"], cd["il"], payload)


def decode_update(data: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> UpdateMessage:
    """Parse and validate an ``update`` envelope. Raises WireFormatError (a WireError) with ``reason``."""
    obj = _unpack(data, limits, "update")
    _check_header(obj, "update", UPDATE_KEYS)
    fleet = _ident(obj, "fl", limits)
    rnd = _int(obj, "r", 0, limits.max_round)
    client = _ident(obj, "c", limits)
    spec = _spec_hash(obj, limits)
    ns = _int(obj, "ns", 1, limits.max_num_samples)
    metrics = _float_map(obj, "m", limits)
    enc = _encoded(obj, limits)
    return UpdateMessage(fleet, rnd, client, spec, ns, metrics, enc)


def decode_global(data: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> GlobalMessage:
    obj = _unpack(data, limits, "global")
    _check_header(obj, "global", GLOBAL_KEYS)
    fleet = _ident(obj, "fl", limits)
    rnd = _int(obj, "r", 0, limits.max_round)
    spec = _spec_hash(obj, limits)
    meta = _meta_map(obj, limits)
    enc = _encoded(obj, limits)
    if enc.mode not in DENSE_MODES:
        raise WireFormatError(Reason.BAD_MODE, f"global vector must be dense, got {enc.mode!r}")
    return GlobalMessage(fleet, rnd, spec, enc, meta)


def message_kind(data: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> str:
    """The ``t`` field of an envelope ("update", "global", "chunk"), fully unpacked and checked
    for version; use it to route when one topic carries several kinds."""
    obj = _unpack(data, limits, "any")
    v = obj.get("v")
    if isinstance(v, bool) or v != WIRE_VERSION:
        raise WireFormatError(Reason.BAD_VERSION, f"unsupported wire version {v!r}")
    kind = obj.get("t")
    if kind not in ("update", "global", "chunk"):
        raise WireFormatError(Reason.BAD_KIND, f"unknown message kind {kind!r}")
    return kind



__all__ = [
    "CHECKSUM_BYTES",
    "DEFAULT_LIMITS",
    "WIRE_VERSION",
    "GlobalMessage",
    "UpdateMessage",
    "WireFormatError",
    "WireLimits",
    "checksum",
    "decode_global",
    "decode_update",
    "encode_global",
    "encode_update",
    "message_kind",
    "unpack_map",
]
