"""Chunking of oversized envelopes and the bounded-memory reassembler."""

from __future__ import annotations

import random

import msgpack
import pytest

from fedpeft_edge.protocol import chunking as CH
from fedpeft_edge.protocol.reasons import Reason, reason_of
from fedpeft_edge.runtime.errors import WireError


def _blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _chunk_obj(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False)


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_small_messages_pass_unchanged() -> None:
    data = _blob(1000)
    assert CH.split_message(data, 1000) == [data]
    assert not CH.is_chunk(data)


def test_split_respects_budget_and_reassembles_in_any_order() -> None:
    data = _blob(100_000, 1)
    budget = CH.payload_budget(10_000, "fedpeft/plant-a/update/gw-01")
    chunks = CH.split_message(data, budget)
    assert len(chunks) > 10 and all(len(c) <= budget for c in chunks)
    assert all(CH.is_chunk(c) for c in chunks)
    random.Random(3).shuffle(chunks)
    r = CH.Reassembler()
    outs = [r.feed("gw-01", c, now=0.0) for c in chunks]
    assert outs[-1] == data and all(o is None for o in outs[:-1])
    assert r.pending_messages == 0 and r.pending_bytes == 0 and r.completed == 1


def test_payload_budget_accounts_for_mqtt_overhead() -> None:
    topic = "fedpeft/f/update/c"
    b5 = CH.payload_budget(1_000_000, topic)
    b3 = CH.payload_budget(1_000_000, topic, mqtt5=False)
    assert b5 < b3 < 1_000_000 - len(topic)
    with pytest.raises(ValueError):
        CH.payload_budget(100, topic)
    with pytest.raises(ValueError):
        CH.split_message(_blob(1000), 100)
    with pytest.raises(ValueError):
        CH.split_message(_blob(100_000), 1000, max_chunks=10)


def test_duplicates_are_tolerated_and_late_chunks_ignored() -> None:
    data = _blob(50_000, 2)
    chunks = CH.split_message(data, 5000)
    r = CH.Reassembler()
    assert r.feed("a", chunks[0], 0.0) is None
    assert r.feed("a", chunks[0], 0.0) is None  # QoS 1 redelivery
    out = None
    for c in chunks[1:]:
        out = r.feed("a", c, 0.0)
    assert out == data
    assert r.feed("a", chunks[3], 0.0) is None  # after completion: no new pending entry
    assert r.pending_messages == 0
    assert r.drops["duplicate_chunk"] == 1 and r.drops["late_chunk"] == 1


def test_same_id_from_two_senders_kept_apart() -> None:
    a, b = _blob(20_000, 3), _blob(20_000, 4)
    mid = "ab" * 16
    ca, cb = CH.split_message(a, 4000, message_id=mid), CH.split_message(b, 4000, message_id=mid)
    r = CH.Reassembler()
    outs = {}
    for x, y in zip(ca, cb, strict=True):
        outs["a"] = r.feed("a", x, 0.0) or outs.get("a")
        outs["b"] = r.feed("b", y, 0.0) or outs.get("b")
    assert outs == {"a": a, "b": b}


def _rejected(r: CH.Reassembler, data: bytes, reason: str, sender: str = "a") -> None:
    with pytest.raises(WireError) as ei:
        r.feed(sender, data, 0.0)
    assert reason_of(ei.value) == reason, str(ei.value)


def test_inconsistent_chunks_are_rejected() -> None:
    data = _blob(30_000, 5)
    chunks = CH.split_message(data, 4000)
    r = CH.Reassembler()
    r.feed("a", chunks[0], 0.0)
    obj = _chunk_obj(chunks[1])
    obj["n"] += 1  # mismatched count drops the whole message
    _rejected(r, _pack(obj), Reason.CHUNK)
    assert r.pending_messages == 0
    r.feed("a", chunks[0], 0.0)
    obj = _chunk_obj(chunks[1])
    obj["tl"] += 1
    _rejected(r, _pack(obj), Reason.CHUNK)
    r.feed("a", chunks[0], 0.0)
    obj = _chunk_obj(chunks[0])
    obj["d"] = b"x" + obj["d"][1:]
    _rejected(r, _pack(obj), Reason.CHUNK)  # same index, other data


def test_corrupted_data_fails_sha256() -> None:
    data = _blob(30_000, 6)
    chunks = CH.split_message(data, 4000)
    obj = _chunk_obj(chunks[2])
    obj["d"] = bytes(b ^ 1 for b in obj["d"])
    chunks[2] = _pack(obj)
    r = CH.Reassembler()
    for c in chunks[:-1]:
        r.feed("a", c, 0.0)
    _rejected(r, chunks[-1], Reason.CHECKSUM)
    assert r.pending_bytes == 0


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("i", -1, Reason.OUT_OF_RANGE),
        ("i", 99, Reason.OUT_OF_RANGE),
        ("n", 1, Reason.OUT_OF_RANGE),
        ("n", 10**6, Reason.OUT_OF_RANGE),
        ("tl", 2**40, Reason.OVERSIZED),
        ("tl", 10, Reason.CHUNK),  # data longer than the declared total
        ("id", "../../etc", Reason.BAD_STRING),
        ("h", b"short", Reason.BAD_TYPE),
        ("d", "text", Reason.BAD_TYPE),
        ("i", True, Reason.BAD_TYPE),
        ("v", 2, Reason.BAD_VERSION),
        ("t", "update", Reason.BAD_KIND),
        ("extra", 1, Reason.MALFORMED),  # 9 keys exceeds max_map_len
    ],
)
def test_hostile_chunk_fields(field: str, value: object, reason: str) -> None:
    chunk = CH.split_message(_blob(30_000, 7), 4000)[1]
    obj = _chunk_obj(chunk)
    obj[field] = value
    r = CH.Reassembler()
    _rejected(r, _pack(obj), reason)
    assert r.drops[reason] == 1


def test_garbage_and_truncation() -> None:
    chunk = CH.split_message(_blob(30_000, 8), 4000)[0]
    r = CH.Reassembler()
    _rejected(r, chunk[:-10], Reason.TRUNCATED)
    _rejected(r, chunk + b"\0", Reason.TRAILING)
    _rejected(r, b"\xc1\xc1", Reason.MALFORMED)
    small = CH.Reassembler(max_chunk_bytes=100)
    _rejected(small, chunk, Reason.OVERSIZED)


def test_timeout_purges_incomplete_messages() -> None:
    chunks = CH.split_message(_blob(30_000, 9), 4000)
    r = CH.Reassembler(timeout_s=10.0)
    r.feed("a", chunks[0], now=0.0)
    assert r.pending_messages == 1
    assert r.purge(now=5.0) == 0
    assert r.purge(now=11.0) == 1
    assert r.pending_messages == 0 and r.pending_bytes == 0 and r.drops["timeout"] == 1


def test_flood_from_one_sender_is_bounded_per_sender() -> None:
    r = CH.Reassembler(max_pending_per_sender=3, max_pending_messages=100)
    victim = CH.split_message(_blob(20_000, 10), 4000)
    r.feed("victim", victim[0], 0.0)
    for i in range(50):  # first chunks of 50 different messages, never completed
        r.feed("flooder", CH.split_message(_blob(20_000, 100 + i), 4000)[0], 0.0)
    assert r.pending_messages == 4  # 3 of the flooder's + the victim's
    assert r.drops["evicted"] == 47
    out = None
    for c in victim[1:]:
        out = r.feed("victim", c, 0.0)
    assert out is not None


def test_global_message_cap_evicts_oldest() -> None:
    r = CH.Reassembler(max_pending_messages=5, max_pending_per_sender=5)
    for i in range(8):
        r.feed(f"s{i}", CH.split_message(_blob(10_000, i), 4000)[0], float(i))
    assert r.pending_messages == 5 and r.drops["evicted"] == 3


def test_byte_cap_drops_the_flooder_not_the_others() -> None:
    r = CH.Reassembler(max_pending_bytes=40_000, max_pending_per_sender=10)
    honest = CH.split_message(_blob(30_000, 20), 10_000)
    r.feed("honest", honest[0], 0.0)
    held_before = r.pending_bytes
    # two messages of the flooder: the second pushes pending bytes over the cap, its own older goes
    r.feed("flooder", CH.split_message(_blob(30_000, 21), 20_000)[0], 0.0)
    r.feed("flooder", CH.split_message(_blob(30_000, 22), 20_000)[0], 0.0)
    assert r.drops["evicted"] == 1 and r.pending_messages == 2
    # one big message of the flooder that alone overflows: it is dropped, the honest one stays
    r2 = CH.Reassembler(max_pending_bytes=40_000, max_pending_per_sender=10)
    r2.feed("honest", honest[0], 0.0)
    big = CH.split_message(_blob(39_000, 23), 20_000)
    r2.feed("flooder", big[0], 0.0)
    r2.feed("flooder", big[1], 0.0)
    assert r2.drops["over_capacity"] == 1
    assert r2.pending_bytes == held_before
    r = r2
    out = None
    for c in honest[1:]:
        out = r.feed("honest", c, 0.0)
    assert out is not None
    assert r.pending_bytes == 0


def test_one_sender_cannot_hold_the_whole_budget() -> None:
    """The per-sender byte cap: a site with several half-sent messages keeps at most its share, so the
    budget left over stays free for the others (without the share, the same flood starves them)."""
    def run(share: int) -> tuple[CH.Reassembler, bytes | None]:
        r = CH.Reassembler(max_pending_bytes=100_000, max_pending_per_sender=10,
                           max_pending_bytes_per_sender=share)
        for i in range(4):  # four 40 kB messages, of each only the first 20 kB chunk arrives
            r.feed("greedy", CH.split_message(_blob(40_000, 40 + i), 20_000)[0], 0.0)
        out = None
        for c in CH.split_message(_blob(40_000, 50), 20_000):
            out = r.feed("honest", c, 0.0)
        return r, out

    r, out = run(share=40_000)
    assert out == _blob(40_000, 50) and r.drops["evicted"] >= 2
    r, out = run(share=100_000)  # no per-sender share: the flood holds 80 kB and the honest site loses
    assert out is None and r.drops["over_capacity"] == 1
    # the default share is one whole message: min(max_pending_bytes, max_message_bytes)
    assert CH.Reassembler(max_pending_bytes=100, max_message_bytes=40).max_pending_bytes_per_sender == 40


def test_message_larger_than_the_pending_cap_is_refused() -> None:
    r = CH.Reassembler(max_pending_bytes=10_000)
    chunk = CH.split_message(_blob(30_000, 22), 4000)[0]
    _rejected(r, chunk, Reason.OVERSIZED)
