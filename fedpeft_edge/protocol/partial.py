"""The gateway tier's message: one partial aggregate of a line's site updates, sent upstream once.

A gateway (``fedpeft-edge gateway``, fedpeft_edge/gateway/) counts its line's site updates exactly like
the aggregator would, then seals them into one ``partial`` envelope on ``fedpeft/{fleet}/partial/{gateway}``
that a Mosquitto bridge carries to the central broker::

    {"v":1, "t":"partial", "fl":fleet, "r":round, "g":gateway, "s":seq, "sh":spec_hash,
     "w":Σ w_i, "sw":Σ w_i·τ_i, "m":{metric: weighted mean}, "mb":<member lines>, "dg":<sha256 hex>,
     "cd":{codec}, "p":<payload>, "ck":<checksum>}

* the vector (``cd``/``p``/``ck``, dense ``fp32`` only: it is already a mean, and exactness matters more
  than the bytes of one message per line and round) is ``Σ w_i·d_i / Σ w_i`` with ``d_i`` the clipped,
  step-normalised site updates — the same quantity the aggregator's running sum holds per update, so
  the central sum adds ``w · vector`` and the result equals counting every site directly;
* ``mb`` lists the accepted ``(site, round, samples)`` members, one ``"site round samples"`` line each
  (UTF-8, ``\\n``-separated: wire v1 has no arrays), sorted; ``dg`` is the sha256 of the ``"site round"``
  lines — the digest of the accepted (site, round) set, which the aggregator checks and records;
* ``(g, s)`` names the partial: ``s`` grows by one per sealed partial of that gateway, so a resend after
  a crash or a lost ack is recognised as a duplicate, while a second partial of the same round (sites that
  came after the first was sealed) is counted.

Decoded as hostile input with the same limits as an update (wire.py), plus :data:`MAX_MEMBERS`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import EncodedUpdate
from fedpeft_edge.protocol.reasons import Reason, WireFormatError

MAX_MEMBERS: Final = 100_000  # sites in one partial (a line of a plant; 10,000 sites fit many times)
MAX_WEIGHT: Final = 1e18  # Σ w_i of one partial (10^9 samples per site × MAX_MEMBERS, with headroom)
PARTIAL_KEYS: Final = frozenset(
    {"v", "t", "fl", "r", "g", "s", "sh", "w", "sw", "m", "mb", "dg", "cd", "p", "ck"}
)
PARTIAL_MODES: Final = frozenset({"fp32"})
_MEMBER_RE: Final = re.compile(rb"([A-Za-z0-9][A-Za-z0-9_.\-]{0,63}) ([0-9]{1,13}) ([0-9]{1,10})")


@dataclass(frozen=True)
class Member:
    """One site update inside a partial: who, the round it trained from, the samples it claimed."""

    site: str
    round: int
    samples: int


@dataclass(frozen=True)
class PartialMessage:
    """A gateway's sealed partial aggregate (module docstring)."""

    fleet: str
    round: int
    gateway: str
    seq: int
    spec_hash: str
    total_weight: float
    steps_weight: float
    metrics: dict[str, float]
    members: tuple[Member, ...]
    digest: str
    vector: EncodedUpdate
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def message_id(self) -> str:
        """32 hex characters naming this partial (the aggregator's ack carries it)."""
        return partial_id(self.gateway, self.seq)


def partial_id(gateway: str, seq: int) -> str:
    return hashlib.blake2b(f"{gateway}\n{seq}".encode(), digest_size=16).hexdigest()


def member_digest(members: Iterable[Member]) -> str:
    """sha256 hex of the sorted ``"site round"`` lines: the digest of the accepted (site, round) set."""
    lines = sorted(f"{m.site} {m.round}" for m in members)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _member_blob(members: Sequence[Member]) -> bytes:
    ordered = sorted(members, key=lambda m: (m.site, m.round))
    return "\n".join(f"{m.site} {m.round} {m.samples}" for m in ordered).encode()


def encode_partial(msg: PartialMessage, limits: wire.WireLimits = wire.DEFAULT_LIMITS) -> bytes:
    obj = {
        "v": wire.WIRE_VERSION,
        "t": "partial",
        "fl": msg.fleet,
        "r": msg.round,
        "g": msg.gateway,
        "s": msg.seq,
        "sh": msg.spec_hash,
        "w": float(msg.total_weight),
        "sw": float(msg.steps_weight),
        "m": {k: float(v) for k, v in msg.metrics.items()},
        "mb": _member_blob(msg.members),
        "dg": msg.digest,
        "cd": wire._codec_map(msg.vector),
        "p": bytes(msg.vector.payload),
        "ck": wire.checksum(msg.vector.payload),
    }
    data = wire._pack(obj)
    decode_partial(data, limits)  # refuse to emit what a peer with the same limits would reject
    return data


def _positive_float(obj: dict[str, Any], key: str) -> float:
    val = obj[key]
    if isinstance(val, bool) or not isinstance(val, int | float):
        raise WireFormatError(Reason.BAD_TYPE, f"{key} must be a number")
    fval = float(val)
    if not 0.0 < fval <= MAX_WEIGHT:  # also refuses NaN and Inf
        raise WireFormatError(Reason.OUT_OF_RANGE, f"{key}={val!r} outside (0, {MAX_WEIGHT:g}]")
    return fval


def _members(obj: dict[str, Any], limits: wire.WireLimits) -> tuple[Member, ...]:
    blob = obj["mb"]
    if not isinstance(blob, bytes):
        raise WireFormatError(Reason.BAD_TYPE, "mb must be bin")
    lines = blob.split(b"\n") if blob else []
    if not 1 <= len(lines) <= MAX_MEMBERS:
        raise WireFormatError(
            Reason.OUT_OF_RANGE, f"a partial has 1..{MAX_MEMBERS} members, got {len(lines)}"
        )
    out: list[Member] = []
    seen: set[tuple[str, int]] = set()
    for line in lines:
        m = _MEMBER_RE.fullmatch(line)
        if m is None:
            raise WireFormatError(Reason.BAD_STRING, f"member line {line[:80]!r} is not 'site round samples'")
        site, rnd, samples = m.group(1).decode(), int(m.group(2)), int(m.group(3))
        too_big = rnd > limits.max_round or not 1 <= samples <= limits.max_num_samples
        if len(site) > limits.max_str_len or too_big:
            raise WireFormatError(Reason.OUT_OF_RANGE, f"member {site!r} round {rnd} samples {samples}")
        if (site, rnd) in seen:
            raise WireFormatError(Reason.BAD_KEYS, f"member {site!r} round {rnd} listed twice")
        seen.add((site, rnd))
        out.append(Member(site, rnd, samples))
    return tuple(out)


def decode_partial(
    data: bytes | bytearray | memoryview, limits: wire.WireLimits = wire.DEFAULT_LIMITS
) -> PartialMessage:
    """Parse and validate a ``partial`` envelope; raises WireFormatError with a ``reason``."""
    obj = wire._unpack(data, limits, "partial")
    wire._check_header(obj, "partial", PARTIAL_KEYS)
    fleet = wire._ident(obj, "fl", limits)
    rnd = wire._int(obj, "r", 0, limits.max_round)
    gateway = wire._ident(obj, "g", limits)
    seq = wire._int(obj, "s", 0, 2**53)
    spec = wire._spec_hash(obj, limits)
    weight = _positive_float(obj, "w")
    steps_weight = _positive_float(obj, "sw")
    metrics = wire._float_map(obj, "m", limits)
    members = _members(obj, limits)
    digest = obj["dg"]
    if not isinstance(digest, str) or len(digest) != 64 or not wire._HEX_RE.fullmatch(digest):
        raise WireFormatError(Reason.BAD_STRING, "dg must be 64 lowercase hex characters")
    if digest != member_digest(members):
        raise WireFormatError(Reason.CHECKSUM, "member digest does not match the member list")
    if any(m.round > rnd for m in members):
        raise WireFormatError(Reason.OUT_OF_RANGE, f"a member trained from a round after the partial's {rnd}")
    enc = wire._encoded(obj, limits)
    if enc.mode not in PARTIAL_MODES:
        raise WireFormatError(Reason.BAD_MODE, f"a partial's vector must be fp32, got {enc.mode!r}")
    return PartialMessage(fleet, rnd, gateway, seq, spec, weight, steps_weight, metrics, members, digest, enc)


__all__ = [
    "MAX_MEMBERS",
    "Member",
    "PartialMessage",
    "decode_partial",
    "encode_partial",
    "member_digest",
    "partial_id",
]
