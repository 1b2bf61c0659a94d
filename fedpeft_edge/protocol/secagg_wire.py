"""Byte encodings of the secure-aggregation messages (:mod:`fedpeft_edge.protocol.secagg`), decoded as
hostile input with the discipline of :mod:`fedpeft_edge.protocol.wire`.

Every message is a msgpack map ``{"v": 1, "t": kind, "s": session id (32 bytes), ...}`` with short keys:

=============  =================  ===========================================================================
kind           message            other keys
=============  =================  ===========================================================================
``sa_params``  SecAggParams       fl, r, st (array of site ids), k, th, n, qc (float), qb, qm, qs (bool),
                                  rs (bin 32), prg — no ``s``: the session id is computed from these
``sa_adv``     AdvertiseKeys      u, ck (bin 32), mk (bin 32)
``sa_dir``     KeyDirectory       to, keys (map site → bin 64 = channel key · mask key)
``sa_share``   ShareKeys          u, cm (bin 32), sh (map site → bin 125)
``sa_fwd``     ForwardedShares    to, sh (map site → bin 125)
``sa_masked``  MaskedInput        u, y (bin 4·n, little-endian uint32)
``sa_unmask``  UnmaskRequest      sv (array of site ids), dr (array of site ids)
``sa_reveal``  UnmaskResponse     u, b (map site → bin 48), k (map site → bin 48)
=============  =================  ===========================================================================

Decoding order, cheapest first: total size against a cap computed from the round's parameters → msgpack
with every length limit set and ext types refused → version and kind → exact key set → types (``bool``
never passes as ``int``) → lengths and identifier charsets. Failures raise
:class:`~fedpeft_edge.protocol.reasons.WireFormatError` with a ``reason`` code. Semantic checks (session,
membership, phase, thresholds) are the state machines' job and raise :class:`~.secagg.SecAggError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import numpy as np

from fedpeft_edge.protocol.reasons import Reason, WireFormatError
from fedpeft_edge.protocol.secagg_math import (
    COMMIT_BYTES,
    KEY_BYTES,
    MAX_ID_LEN,
    MAX_PARAMS,
    MAX_ROUND,
    MAX_SITES,
    PRGS,
    ROUND_SEED_BYTES,
    SEALED_SHARE_BYTES,
    SESSION_ID_BYTES,
    SHARE_BYTES,
    SITE_ID_RE,
    QuantSpec,
    SecAggParams,
)
from fedpeft_edge.protocol.secagg_messages import (
    AdvertiseKeys,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedpeft_edge.protocol.wire import unpack_map
from fedpeft_edge.runtime.errors import InvalidValueError

WIRE_VERSION: Final = 1

Message = (AdvertiseKeys | KeyDirectory | ShareKeys | ForwardedShares | MaskedInput | UnmaskRequest
           | UnmaskResponse)

_KINDS: Final[dict[type, str]] = {
    AdvertiseKeys: "sa_adv", KeyDirectory: "sa_dir", ShareKeys: "sa_share", ForwardedShares: "sa_fwd",
    MaskedInput: "sa_masked", UnmaskRequest: "sa_unmask", UnmaskResponse: "sa_reveal",
}
_KEYS: Final[dict[str, frozenset[str]]] = {
    "sa_params": frozenset({"v", "t", "fl", "r", "st", "k", "th", "n", "qc", "qb", "qm", "qs", "rs", "prg"}),
    "sa_adv": frozenset({"v", "t", "s", "u", "ck", "mk"}),
    "sa_dir": frozenset({"v", "t", "s", "to", "keys"}),
    "sa_share": frozenset({"v", "t", "s", "u", "cm", "sh"}),
    "sa_fwd": frozenset({"v", "t", "s", "to", "sh"}),
    "sa_masked": frozenset({"v", "t", "s", "u", "y"}),
    "sa_unmask": frozenset({"v", "t", "s", "sv", "dr"}),
    "sa_reveal": frozenset({"v", "t", "s", "u", "b", "k"}),
}
_ENTRY_OVERHEAD: Final = 16  # msgpack headers of one map entry / array item, generously


@dataclass(frozen=True)
class ParamsLimits:
    """Bounds for decoding a round announcement (before any round parameters are known)."""

    max_sites: int = MAX_SITES
    max_params: int = MAX_PARAMS

    def __post_init__(self) -> None:
        for name, hi in (("max_sites", MAX_SITES), ("max_params", MAX_PARAMS)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or not 2 <= val <= hi:
                raise InvalidValueError(f"ParamsLimits.{name} must be an int in [2, {hi}], got {val!r}")


def max_message_bytes(params: SecAggParams) -> int:
    """The largest message any phase of this round can produce (the masked input, or a map over all sites)."""
    per_site = MAX_ID_LEN + max(SEALED_SHARE_BYTES, 2 * KEY_BYTES, 2 * SHARE_BYTES) + 2 * _ENTRY_OVERHEAD
    return 4 * params.n_params + len(params.sites) * per_site + 512


# --------------------------------------------------------------------------------------------------
# Encoding (trusted side: still round-trips through the decoder, so nothing leaves that a peer rejects)


def encode_params(params: SecAggParams, limits: ParamsLimits = ParamsLimits()) -> bytes:
    q = params.quant
    data = _pack({"v": WIRE_VERSION, "t": "sa_params", "fl": params.fleet, "r": params.round,
                  "st": list(params.sites), "k": params.neighbours, "th": params.threshold,
                  "n": params.n_params, "qc": q.clip, "qb": q.bits, "qm": q.max_sites, "qs": q.stochastic,
                  "rs": params.round_seed, "prg": params.prg})
    decode_params(data, limits)
    return data


def encode_message(msg: Message, params: SecAggParams) -> bytes:
    kind = _KINDS.get(type(msg))
    if kind is None:
        raise InvalidValueError(f"not a secure-aggregation message: {type(msg).__name__}")
    obj: dict[str, Any] = {"v": WIRE_VERSION, "t": kind, "s": msg.session}
    try:
        if isinstance(msg, AdvertiseKeys):
            obj |= {"u": msg.site, "ck": msg.channel_public, "mk": msg.mask_public}
        elif isinstance(msg, KeyDirectory):
            obj |= {"to": msg.to, "keys": {v: c + m for v, (c, m) in msg.keys.items()}}
        elif isinstance(msg, ShareKeys):
            obj |= {"u": msg.site, "cm": msg.self_mask_commitment, "sh": dict(msg.sealed)}
        elif isinstance(msg, ForwardedShares):
            obj |= {"to": msg.to, "sh": dict(msg.sealed)}
        elif isinstance(msg, MaskedInput):
            y = msg.masked
            if not isinstance(y, np.ndarray) or y.dtype != np.uint32 or y.ndim != 1:
                raise InvalidValueError("MaskedInput.masked must be a 1-D uint32 array")
            obj |= {"u": msg.site, "y": y.astype("<u4", copy=False).tobytes()}
        elif isinstance(msg, UnmaskRequest):
            obj |= {"sv": list(msg.survivors), "dr": list(msg.dropped)}
        else:
            obj |= {"u": msg.site, "b": dict(msg.self_mask_shares), "k": dict(msg.mask_key_shares)}
        data = _pack(obj)
    except (TypeError, ValueError) as exc:  # InvalidValueError is a ValueError
        raise InvalidValueError(f"cannot encode {type(msg).__name__}: {exc}") from exc
    decode_message(data, params, expect=type(msg))
    return data


def _pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --------------------------------------------------------------------------------------------------
# Decoding (hostile side)


def decode_params(data: bytes | bytearray | memoryview, limits: ParamsLimits = ParamsLimits()
                  ) -> SecAggParams:
    """A round announcement; the parameters are then validated by :class:`SecAggParams` itself."""
    cap = limits.max_sites * (MAX_ID_LEN + 8) + 1024
    obj = _unpack(data, max_bytes=cap, max_bin=ROUND_SEED_BYTES, max_array=limits.max_sites, max_map=16)
    _header(obj, "sa_params")
    sites = _id_list(obj, "st", limits.max_sites)
    clip = obj["qc"]
    if isinstance(clip, bool) or not isinstance(clip, int | float):
        raise WireFormatError(Reason.BAD_TYPE, "qc must be a number")
    if not math.isfinite(float(clip)):
        raise WireFormatError(Reason.NON_FINITE, "qc is not finite")
    if not isinstance(obj["qs"], bool):
        raise WireFormatError(Reason.BAD_TYPE, "qs must be a bool")
    prg = obj["prg"]
    if prg not in PRGS:
        raise WireFormatError(Reason.BAD_MODE, f"unknown PRG {prg!r}")
    try:
        quant = QuantSpec(float(clip), _int(obj, "qb", 2, 31), _int(obj, "qm", 1, MAX_SITES), obj["qs"])
        return SecAggParams(_ident(obj, "fl"), _int(obj, "r", 0, MAX_ROUND), tuple(sites),
                            _int(obj, "k", 1, MAX_SITES), _int(obj, "th", 1, MAX_SITES),
                            _int(obj, "n", 1, limits.max_params), quant, _bin(obj, "rs", ROUND_SEED_BYTES),
                            prg)
    except WireFormatError:
        raise
    except InvalidValueError as exc:  # consistent types, inconsistent values (k odd with n odd, t <= k/2...)
        raise WireFormatError(Reason.OUT_OF_RANGE, str(exc)) from exc


def decode_message(data: bytes | bytearray | memoryview, params: SecAggParams, *,
                   expect: type | None = None) -> Message:
    """One phase message of the round described by ``params``; ``expect`` (a message class) refuses any
    other kind with ``bad_kind``."""
    n_sites = len(params.sites)
    obj = _unpack(data, max_bytes=max_message_bytes(params), max_bin=max(4 * params.n_params, 2 * KEY_BYTES,
                                                                          SEALED_SHARE_BYTES),
                  max_array=n_sites, max_map=max(n_sites, 16))
    kind = obj.get("t")
    if kind not in _KEYS or kind == "sa_params":
        raise WireFormatError(Reason.BAD_KIND, f"unknown secure-aggregation message kind {kind!r}")
    if expect is not None and _KINDS.get(expect) != kind:
        raise WireFormatError(Reason.BAD_KIND, f"expected {expect.__name__}, got {kind!r}")
    _header(obj, kind)
    s = _bin(obj, "s", SESSION_ID_BYTES)
    if kind == "sa_adv":
        return AdvertiseKeys(s, _ident(obj, "u"), _bin(obj, "ck", KEY_BYTES), _bin(obj, "mk", KEY_BYTES))
    if kind == "sa_dir":
        keys = _bin_map(obj, "keys", 2 * KEY_BYTES, n_sites)
        pairs = {v: (b[:KEY_BYTES], b[KEY_BYTES:]) for v, b in keys.items()}
        return KeyDirectory(s, _ident(obj, "to"), pairs)
    if kind == "sa_share":
        return ShareKeys(s, _ident(obj, "u"), _bin(obj, "cm", COMMIT_BYTES),
                         _bin_map(obj, "sh", SEALED_SHARE_BYTES, n_sites))
    if kind == "sa_fwd":
        return ForwardedShares(s, _ident(obj, "to"), _bin_map(obj, "sh", SEALED_SHARE_BYTES, n_sites))
    if kind == "sa_masked":
        y = _bin(obj, "y", 4 * params.n_params)
        return MaskedInput(s, _ident(obj, "u"), np.frombuffer(y, dtype="<u4").astype(np.uint32))
    if kind == "sa_unmask":
        return UnmaskRequest(s, tuple(_id_list(obj, "sv", n_sites)), tuple(_id_list(obj, "dr", n_sites)))
    return UnmaskResponse(s, _ident(obj, "u"), _bin_map(obj, "b", SHARE_BYTES, n_sites),
                          _bin_map(obj, "k", SHARE_BYTES, n_sites))


def _unpack(data: object, *, max_bytes: int, max_bin: int, max_array: int, max_map: int) -> dict[str, Any]:
    return unpack_map(data, max_bytes=max_bytes, max_bin=max_bin, max_str=MAX_ID_LEN, max_array=max_array,
                      max_map=max_map)


def _header(obj: dict[str, Any], kind: str) -> None:
    v = obj.get("v")
    if isinstance(v, bool) or not isinstance(v, int) or v != WIRE_VERSION:
        raise WireFormatError(Reason.BAD_VERSION, f"unsupported secagg wire version {v!r}")
    if obj.get("t") != kind:
        raise WireFormatError(Reason.BAD_KIND, f"expected {kind!r}, got {obj.get('t')!r}")
    want = _KEYS[kind]
    if obj.keys() != want:
        missing = sorted(want - obj.keys())
        unknown = sorted(str(k) for k in obj.keys() - want)
        raise WireFormatError(Reason.BAD_KEYS, f"{kind}: missing {missing}, unknown {unknown[:8]}")


def _int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    val = obj[key]
    if isinstance(val, bool) or not isinstance(val, int):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be int, got {type(val).__name__}")
    if not lo <= val <= hi:
        raise WireFormatError(Reason.OUT_OF_RANGE, f"{key}={val} outside [{lo}, {hi}]")
    return val


def _check_ident(where: str, val: object) -> str:
    if not isinstance(val, str):
        raise WireFormatError(Reason.BAD_TYPE, f"{where} must be str, got {type(val).__name__}")
    if not 1 <= len(val) <= MAX_ID_LEN or not SITE_ID_RE.fullmatch(val):
        raise WireFormatError(Reason.BAD_STRING, f"{where}: {val[:MAX_ID_LEN]!r} is not a valid id")
    return val


def _ident(obj: dict[str, Any], key: str) -> str:
    return _check_ident(key, obj[key])


def _bin(obj: dict[str, Any], key: str, size: int) -> bytes:
    val = obj[key]
    if not isinstance(val, bytes):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be bin, got {type(val).__name__}")
    if len(val) != size:
        raise WireFormatError(Reason.LENGTH_MISMATCH, f"{key} has {len(val)} bytes, expected {size}")
    return val


def _bin_map(obj: dict[str, Any], key: str, size: int, max_entries: int) -> dict[str, bytes]:
    val = obj[key]
    if not isinstance(val, dict):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be a map")
    if len(val) > max_entries:
        raise WireFormatError(Reason.OVERSIZED, f"{key} has {len(val)} entries > {max_entries}")
    out: dict[str, bytes] = {}
    for site, blob in val.items():
        _check_ident(f"{key} key", site)
        if not isinstance(blob, bytes):
            raise WireFormatError(Reason.BAD_TYPE, f"{key}[{site!r}] must be bin, got {type(blob).__name__}")
        if len(blob) != size:
            raise WireFormatError(Reason.LENGTH_MISMATCH, f"{key}[{site!r}] has {len(blob)} bytes, "
                                                          f"expected {size}")
        out[site] = blob
    return out


def _id_list(obj: dict[str, Any], key: str, max_items: int) -> list[str]:
    val = obj[key]
    if not isinstance(val, list):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be an array")
    if len(val) > max_items:
        raise WireFormatError(Reason.OVERSIZED, f"{key} has {len(val)} items > {max_items}")
    out = [_check_ident(f"{key} item", s) for s in val]
    if len(set(out)) != len(out):
        raise WireFormatError(Reason.BAD_INDEX, f"{key} holds duplicate ids")
    return out


__all__ = [
    "WIRE_VERSION",
    "Message",
    "ParamsLimits",
    "decode_message",
    "decode_params",
    "encode_message",
    "encode_params",
    "max_message_bytes",
]
