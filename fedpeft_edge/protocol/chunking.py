"""Split envelopes larger than the broker's packet limit into chunk messages, and put them back together.

A chunk is a wire-v1 msgpack map (``docs/wire-format.md``)::

    {"v": 1, "t": "chunk", "id": <32 lowercase hex: random 16-byte message id>, "i": index, "n": count,
     "tl": total length of the whole message, "h": sha256(whole message) (32-byte bin), "d": bin}

Messages that fit are sent unchanged; a receiver routes with :func:`is_chunk` (a fixed byte prefix:
the sender always writes "v" then "t" first) and hands chunks to a :class:`Reassembler`, which
returns the original bytes once every chunk arrived and the sha256 matches. The reassembler keeps
memory bounded against floods: per-sender and global caps on pending messages and bytes, evicting the
oldest incomplete message; incomplete messages time out.

Durability: a receiver that acknowledges (PUBACKs) chunks as they arrive must not hold them only in
memory, or a crash while a multi-part message is half received loses it (the sender already has its
acknowledgements and never resends). A ``ChunkSpool`` (``fedpeft_edge.protocol.chunk_spool``) gives the
reassembler an on-disk journal: every stored chunk is appended to one file per pending message,
:meth:`Reassembler.sync` fsyncs them (call it BEFORE acknowledging), files of dropped messages are
removed at once, files of completed messages only at :meth:`Reassembler.commit` (call it AFTER whatever
consumed the message was persisted), and :meth:`Reassembler.restore` reloads everything after a restart.
Completed message ids are kept in a small log so a redelivered chunk of an already-consumed message is
recognised.

MQTT packet budget: :func:`payload_budget` subtracts the PUBLISH header, topic, packet id and a
property allowance from the broker's maximum packet size (MQTT 5 CONNACK Maximum-Packet-Size, or
the configured ``max_packet_size`` of a 3.1.1 broker, which silently disconnects on overflow).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from fedpeft_edge.protocol.chunk_spool import MESSAGE_ID_RE, ChunkSpool
from fedpeft_edge.protocol.reasons import Reason, WireFormatError
from fedpeft_edge.runtime.errors import InvalidValueError

CHUNK_KEYS: Final = frozenset({"v", "t", "id", "i", "n", "tl", "h", "d"})
# msgpack of {"v": 1, "t": "chunk", ...}: fixmap(8), "v", 1, "t", "chunk"
CHUNK_PREFIX: Final = b"\x88\xa1v\x01\xa1t\xa5chunk"
# Upper bound of a chunk's envelope around its data (keys, id, ints up to 2**32, sha256, bin header).
CHUNK_OVERHEAD: Final = 128
MQTT_MAX_PACKET: Final = 268_435_455 + 5  # protocol ceiling on remaining length + fixed header

log = logging.getLogger(__name__)


def payload_budget(max_packet_size: int, topic: str, *, mqtt5: bool = True,
                   properties_allowance: int = 64) -> int:
    """Largest PUBLISH payload that keeps the whole packet within ``max_packet_size`` bytes.

    Packet = fixed header (1 + up to 4 bytes remaining length) + topic (2 + utf-8 length) + packet id
    (2, QoS > 0) + [MQTT 5: property length varint + properties] + payload.
    """
    if isinstance(max_packet_size, bool) or not isinstance(max_packet_size, int) or max_packet_size < 64:
        raise InvalidValueError(f"max_packet_size must be an int >= 64, got {max_packet_size!r}")
    overhead = 5 + 2 + len(topic.encode("utf-8")) + 2 + ((4 + properties_allowance) if mqtt5 else 0)
    budget = min(max_packet_size, MQTT_MAX_PACKET) - overhead
    if budget <= CHUNK_OVERHEAD:
        raise InvalidValueError(
            f"max_packet_size {max_packet_size} leaves no room for a payload on {topic!r}")
    return budget


def is_chunk(data: bytes | bytearray | memoryview) -> bool:
    """Cheap routing test: does this payload start like a chunk message? (Decoding still validates.)"""
    return bytes(memoryview(data)[: len(CHUNK_PREFIX)]) == CHUNK_PREFIX


def split_message(data: bytes, max_payload: int, *, message_id: str | None = None,
                  max_chunks: int = 4096) -> list[bytes]:
    """``[data]`` when it fits in ``max_payload`` bytes, else chunk messages each ``<= max_payload``."""
    data = bytes(data)
    if isinstance(max_payload, bool) or not isinstance(max_payload, int):
        raise InvalidValueError("max_payload must be an int")
    if len(data) <= max_payload:
        return [data]
    step = max_payload - CHUNK_OVERHEAD
    if step < 1:
        raise InvalidValueError(
            f"max_payload {max_payload} too small for chunking (overhead {CHUNK_OVERHEAD})")
    count = -(-len(data) // step)
    if count > max_chunks:
        raise InvalidValueError(f"{len(data)} bytes need {count} chunks > max_chunks {max_chunks}")
    mid = message_id or secrets.token_hex(16)
    if not MESSAGE_ID_RE.fullmatch(mid):
        raise InvalidValueError("message_id must be 32 lowercase hex characters")
    digest = hashlib.sha256(data).digest()
    chunks = []
    for i in range(count):
        obj = {"v": 1, "t": "chunk", "id": mid, "i": i, "n": count, "tl": len(data), "h": digest,
               "d": data[i * step : (i + 1) * step]}
        packed = msgpack.packb(obj, use_bin_type=True)
        assert len(packed) <= max_payload, "CHUNK_OVERHEAD too small"
        chunks.append(packed)
    return chunks


@dataclass(frozen=True)
class Chunk:
    message_id: str
    index: int
    count: int
    total_len: int
    sha256: bytes
    data: bytes


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireFormatError(Reason.MALFORMED, "msgpack ext types are not allowed")


def decode_chunk(data: bytes | bytearray | memoryview, *, max_chunk_bytes: int, max_chunks: int,
                 max_total_len: int) -> Chunk:
    """Strictly parse one chunk message (hostile bytes → WireFormatError with a reason)."""
    size = memoryview(data).nbytes
    if size > max_chunk_bytes + CHUNK_OVERHEAD:
        raise WireFormatError(Reason.OVERSIZED, f"chunk of {size} bytes > {max_chunk_bytes + CHUNK_OVERHEAD}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext, max_array_len=0,
                              max_map_len=8, max_str_len=64, max_bin_len=max_chunk_bytes, max_ext_len=0)
    except WireFormatError:
        raise
    except msgpack.ExtraData as exc:
        raise WireFormatError(Reason.TRAILING, "bytes after the chunk") from exc
    except ValueError as exc:
        reason = Reason.TRUNCATED if "incomplete" in str(exc) else Reason.MALFORMED
        raise WireFormatError(reason, f"invalid chunk: {exc}") from exc
    except Exception as exc:
        raise WireFormatError(Reason.MALFORMED, f"invalid chunk: {type(exc).__name__}") from exc
    if not isinstance(obj, dict):
        raise WireFormatError(Reason.MALFORMED, "chunk must be a map")
    if obj.get("v") != 1 or isinstance(obj.get("v"), bool):
        raise WireFormatError(Reason.BAD_VERSION, f"unsupported chunk version {obj.get('v')!r}")
    if obj.get("t") != "chunk":
        raise WireFormatError(Reason.BAD_KIND, "not a chunk message")
    if obj.keys() != CHUNK_KEYS:
        raise WireFormatError(Reason.BAD_KEYS, f"chunk keys {sorted(map(str, obj.keys()))}")
    mid, digest, payload = obj["id"], obj["h"], obj["d"]
    if not isinstance(mid, str) or not MESSAGE_ID_RE.fullmatch(mid):
        raise WireFormatError(Reason.BAD_STRING, "chunk id must be 32 lowercase hex characters")
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise WireFormatError(Reason.BAD_TYPE, "chunk h must be a 32-byte sha256 digest")
    if not isinstance(payload, bytes):
        raise WireFormatError(Reason.BAD_TYPE, "chunk d must be bin")
    ints = {}
    for key in ("i", "n", "tl"):
        val = obj[key]
        if isinstance(val, bool) or not isinstance(val, int):
            raise WireFormatError(Reason.BAD_TYPE, f"chunk {key} must be int")
        ints[key] = val
    i, n, tl = ints["i"], ints["n"], ints["tl"]
    if not 2 <= n <= max_chunks:
        raise WireFormatError(Reason.OUT_OF_RANGE, f"chunk count {n} outside [2, {max_chunks}]")
    if not 0 <= i < n:
        raise WireFormatError(Reason.OUT_OF_RANGE, f"chunk index {i} outside [0, {n})")
    if not 1 <= tl <= max_total_len:
        raise WireFormatError(Reason.OVERSIZED, f"total length {tl} outside [1, {max_total_len}]")
    if not 1 <= len(payload) <= tl:
        raise WireFormatError(Reason.CHUNK, f"chunk data of {len(payload)} bytes for a {tl}-byte message")
    return Chunk(mid, i, n, tl, digest, payload)


@dataclass
class _Pending:
    count: int
    total_len: int
    sha256: bytes
    first_seen: float
    parts: dict[int, bytes] = field(default_factory=dict)
    held: int = 0


class Reassembler:
    """Collects chunks per ``(sender, message id)`` with bounded memory.

    ``feed(sender, data, now)`` returns the whole message when its last chunk arrives (sha256 checked),
    else ``None``. Malformed or inconsistent chunks raise :class:`WireFormatError` (counted in
    ``drops`` by reason); duplicate chunks (QoS 1 redelivery) are ignored. Incomplete messages older
    than ``timeout_s`` are purged. Caps: a new message beyond ``max_pending_per_sender`` evicts that
    sender's oldest incomplete one, beyond ``max_pending_messages`` the oldest overall; going over
    ``max_pending_bytes`` (all senders) or ``max_pending_bytes_per_sender`` (default: one whole message,
    ``min(max_pending_bytes, max_message_bytes)``) evicts the same sender's older messages, then drops the
    current one (``over_capacity``) — one flooding sender can neither push out the others' bytes nor hold
    the whole budget. ``drops`` counts
    everything dropped, by reason (``evicted``, ``over_capacity``, ``timeout``, ``duplicate_chunk``,
    ``late_chunk`` and the WireFormatError reasons).

    ``sender`` should be a trusted identity (the MQTT topic's client id level, enforced by broker ACLs).

    With a ``spool`` every stored chunk is also journalled on disk (same caps: a message dropped from
    memory is dropped from disk); see the module docstring for the sync → persist → commit order.
    """

    def __init__(self, *, max_pending_bytes: int = 256 * 1024 * 1024, max_pending_messages: int = 256,
                 max_pending_per_sender: int = 4, timeout_s: float = 120.0, max_chunks: int = 4096,
                 max_message_bytes: int = 256 * 1024 * 1024, max_chunk_bytes: int = 268_435_455,
                 remember_completed: int = 4096, spool: ChunkSpool | None = None,
                 max_pending_bytes_per_sender: int | None = None) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_bytes_per_sender = (min(max_pending_bytes, max_message_bytes)
                                             if max_pending_bytes_per_sender is None
                                             else max_pending_bytes_per_sender)
        self.max_pending_messages = max_pending_messages
        self.max_pending_per_sender = max_pending_per_sender
        self.timeout_s = timeout_s
        self.max_chunks = max_chunks
        self.max_message_bytes = max_message_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self._pending: OrderedDict[tuple[str, str], _Pending] = OrderedDict()  # insertion = age order
        self._completed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remember = remember_completed
        self.pending_bytes = 0
        self.drops: Counter[str] = Counter()
        self.completed = 0
        self.spool = spool
        self._replaying = False  # restore(): chunks come from the spool, do not journal them again

    @property
    def pending_messages(self) -> int:
        return len(self._pending)

    # ---- durability (no-ops without a spool) ------------------------------------------------------

    def sync(self) -> None:
        """Make every chunk stored so far durable (fsync). Call before acknowledging them."""
        if self.spool is not None:
            self.spool.sync()

    def commit(self) -> None:
        """Forget the on-disk chunks of messages completed since the last commit. Call only after the
        completed messages' effects were persisted (until then a restart replays them)."""
        if self.spool is not None:
            self.spool.commit()

    def restore(self, now: float) -> list[tuple[str, bytes]]:
        """Reload the spool after a restart; returns ``(sender, whole message)`` for every message
        whose chunks were all on disk (complete before the crash but not yet committed: the caller
        processes them again, so it must recognise an already-counted one). Incomplete messages are
        pending again with a fresh timeout (the outage must not expire chunks that were acknowledged)."""
        if self.spool is None:
            return []
        completed, messages = self.spool.load()
        for key in completed:
            self._completed[key] = None
        while len(self._completed) > self._remember:
            self._completed.popitem(last=False)
        whole: list[tuple[str, bytes]] = []
        chunks = 0
        self._replaying = True
        try:
            for key, records in messages:
                if key in self._completed:  # consumed and committed; only the unlink was missed
                    self.spool.discard(key)
                    continue
                for raw in records:
                    chunks += 1
                    try:
                        out = self.feed(key[0], raw, now)
                    except WireFormatError as exc:  # damaged on disk: that message is gone
                        log.warning("spooled message %s/%s unusable: %s", key[0], key[1], exc)
                        self.spool.discard(key)
                        break
                    if out is not None:
                        whole.append((key[0], out))
                        break
                    if key not in self._pending:  # dropped by a cap while replaying (file removed)
                        break
        finally:
            self._replaying = False
        if messages:
            log.info("restored %d spooled chunk(s) of %d message(s): %d complete, %d still pending",
                     chunks, len(messages), len(whole), len(self._pending))
        return whole

    def purge(self, now: float) -> int:
        """Drop incomplete messages older than ``timeout_s``; returns how many were dropped."""
        stale = [key for key, p in self._pending.items() if now - p.first_seen > self.timeout_s]
        for key in stale:
            self._drop(key, "timeout")
        return len(stale)

    def _drop(self, key: tuple[str, str], reason: str) -> None:
        p = self._pending.pop(key)
        self.pending_bytes -= p.held
        self.drops[reason] += 1
        if self.spool is not None:
            self.spool.discard(key)

    def _reject(self, reason: str, message: str, key: tuple[str, str] | None = None) -> WireFormatError:
        if key is not None and key in self._pending:
            p = self._pending.pop(key)
            self.pending_bytes -= p.held
            if self.spool is not None:
                self.spool.discard(key)
        self.drops[reason] += 1
        return WireFormatError(reason, message)

    def feed(self, sender: str, data: bytes | bytearray | memoryview, now: float) -> bytes | None:
        self.purge(now)
        try:
            chunk = decode_chunk(data, max_chunk_bytes=self.max_chunk_bytes, max_chunks=self.max_chunks,
                                 max_total_len=min(self.max_message_bytes, self.max_pending_bytes))
        except WireFormatError as exc:
            self.drops[exc.reason] += 1
            raise
        key = (sender, chunk.message_id)
        if key in self._completed:
            self.drops["late_chunk"] += 1
            return None
        p = self._pending.get(key)
        if p is None:
            self._make_room(sender)
            p = _Pending(chunk.count, chunk.total_len, chunk.sha256, now)
            self._pending[key] = p
        elif (p.count, p.total_len, p.sha256) != (chunk.count, chunk.total_len, chunk.sha256):
            raise self._reject(Reason.CHUNK, "chunk disagrees with earlier chunks of its message", key)
        old = p.parts.get(chunk.index)
        if old is not None:
            if old != chunk.data:
                raise self._reject(Reason.CHUNK, f"chunk {chunk.index} re-sent with different data", key)
            self.drops["duplicate_chunk"] += 1
            return None
        if p.held + len(chunk.data) > p.total_len:
            raise self._reject(Reason.CHUNK, "chunks exceed the declared total length", key)
        p.parts[chunk.index] = chunk.data
        p.held += len(chunk.data)
        self.pending_bytes += len(chunk.data)
        if self.spool is not None and not self._replaying:
            self.spool.append(key, bytes(memoryview(data)))
        self._enforce_byte_cap(key)
        if key not in self._pending:  # dropped for capacity
            return None
        if len(p.parts) < p.count:
            return None
        # Complete: order, length and digest must all match.
        del self._pending[key]
        self.pending_bytes -= p.held
        whole = b"".join(p.parts[i] for i in range(p.count))
        if len(whole) != p.total_len:
            self.drops[Reason.CHUNK] += 1
            if self.spool is not None:
                self.spool.discard(key)
            raise WireFormatError(Reason.CHUNK, f"reassembled {len(whole)} bytes, declared {p.total_len}")
        if hashlib.sha256(whole).digest() != p.sha256:
            self.drops[Reason.CHECKSUM] += 1
            if self.spool is not None:
                self.spool.discard(key)
            raise WireFormatError(Reason.CHECKSUM, "reassembled message fails its sha256")
        if self.spool is not None:
            self.spool.complete(key)
        self._completed[key] = None
        while len(self._completed) > self._remember:
            self._completed.popitem(last=False)
        self.completed += 1
        return whole

    def _make_room(self, sender: str) -> None:
        mine = [key for key in self._pending if key[0] == sender]
        while len(mine) >= self.max_pending_per_sender:
            self._drop(mine.pop(0), "evicted")
        while len(self._pending) >= self.max_pending_messages:
            self._drop(next(iter(self._pending)), "evicted")

    def _enforce_byte_cap(self, current: tuple[str, str]) -> None:
        # A sender over the byte cap pays first: its own older messages go, then the current one. Other
        # senders' in-flight messages are never evicted for bytes (they time out if they stall).
        def within_caps() -> bool:
            mine = sum(p.held for k, p in self._pending.items() if k[0] == current[0])
            return self.pending_bytes <= self.max_pending_bytes and mine <= self.max_pending_bytes_per_sender

        if within_caps():
            return
        for key in [k for k in self._pending if k[0] == current[0] and k != current]:
            self._drop(key, "evicted")
            if within_caps():
                return
        self._drop(current, "over_capacity")



__all__ = [
    "CHUNK_OVERHEAD",
    "CHUNK_PREFIX",
    "Chunk",
    "Reassembler",
    "decode_chunk",
    "is_chunk",
    "payload_budget",
    "split_message",
]
