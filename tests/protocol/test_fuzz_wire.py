"""Hypothesis fuzzing of everything that reads network bytes: only WireError may come out.

A decoded message that passes the envelope checks must also either accumulate cleanly or raise
WireError in codec.accumulate_into (the aggregator's path), never anything else.
"""

from __future__ import annotations

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft_edge.protocol import chunking as CH
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.protocol.indices import decode_bitmap_indices, decode_varint_indices
from fedpeft_edge.runtime.errors import WireError
from fedpeft_edge.site.encoder import UpdateEncoder

N = 700
LIMITS = W.WireLimits(max_message_bytes=1 << 20, max_params=1 << 16)


def _valid_messages() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for mode in C.MODES:
        for ratio in (0.01, 0.6):
            enc = UpdateEncoder(C.CodecConfig(mode=mode, topk_ratio=ratio, block=64), N).encode(
                rng.standard_normal(N).astype(np.float32))
            msg = W.UpdateMessage("f", 1, "c-1", "00ff" * 4, 10, {"loss": 1.0}, enc)
            out.append(W.encode_update(msg))
    return out


VALID = _valid_messages()


def _ingest(data: bytes) -> None:
    """The aggregator's path: envelope, then payload validation + accumulation."""
    try:
        msg = W.decode_update(data, LIMITS)
    except WireError:
        return
    acc = np.zeros(msg.update.n, np.float32)
    before = acc.copy()
    try:
        C.accumulate_into(msg.update, acc, 1.0)
        C.update_l2_norm(msg.update)
    except WireError:
        assert np.array_equal(acc, before), "rejected update touched the accumulator"


@given(st.binary(max_size=4096))
def test_random_bytes_only_raise_wire_error(data: bytes) -> None:
    _ingest(data)
    for decode in (W.decode_global, notices.decode_status):
        try:
            decode(data, LIMITS)
        except WireError:
            pass


EDITS = st.tuples(st.integers(0, 10**6), st.integers(0, 255),
                  st.sampled_from(["flip", "set", "insert", "delete"]))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(VALID))), st.lists(EDITS, min_size=1, max_size=6))
def test_mutated_valid_messages(which: int, edits: list[tuple[int, int, str]]) -> None:
    data = bytearray(VALID[which])
    for pos, byte, op in edits:
        i = pos % max(1, len(data))
        if op == "flip" and data:
            data[i] ^= 1 << (byte % 8)
        elif op == "set" and data:
            data[i] = byte
        elif op == "insert":
            data.insert(i, byte)
        elif op == "delete" and data:
            del data[i]
    _ingest(bytes(data))


def _recompute_checksum(obj: dict) -> dict:
    if isinstance(obj.get("p"), bytes):
        obj["ck"] = W.checksum(obj["p"])
    return obj


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=40))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(VALID))),
       st.sampled_from(["v", "t", "fl", "r", "c", "sh", "ns", "m", "p", "cd.mo", "cd.n", "cd.k", "cd.b",
                        "cd.ic", "cd.il", "m.loss"]),
       scalars)
def test_structured_field_fuzz_with_valid_checksum(which: int, path: str, value: object) -> None:
    """Replace one field with an arbitrary value and fix the checksum, so deeper checks are reached."""
    obj = msgpack.unpackb(VALID[which], raw=False)
    target = obj
    parts = path.split(".")
    for p in parts[:-1]:
        target = target[p]
    target[parts[-1]] = value
    data = msgpack.packb(_recompute_checksum(obj), use_bin_type=True)
    _ingest(data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3000), st.binary(min_size=0, max_size=200))
def test_varint_and_bitmap_decoders_on_random_bytes(n: int, data: bytes) -> None:
    for k in (1, max(1, len(data) // 2), len(data) or 1):
        if k > n:
            continue
        for decode in (decode_varint_indices, decode_bitmap_indices):
            try:
                idx = decode(data, k, n)
            except WireError:
                continue
            assert idx.dtype == np.uint32 and idx.size == k
            assert np.all(np.diff(idx.astype(np.int64)) > 0) and int(idx[-1]) < n


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_reassembler_never_crashes(blobs: list[bytes]) -> None:
    r = CH.Reassembler(max_pending_bytes=10_000, max_pending_messages=4, max_chunks=64)
    valid = CH.split_message(bytes(range(256)) * 8, 600)
    for i, b in enumerate(blobs):
        data = valid[i % len(valid)][: len(b)] + b if i % 2 else b
        try:
            r.feed(f"s{i % 3}", data, float(i))
        except WireError:
            pass
        assert r.pending_bytes <= 10_000 and r.pending_messages <= 4
