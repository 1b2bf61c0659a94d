"""The aggregator's acknowledgement (JSON on fedpeft/{fleet}/ack/{site}): round trip and hostile bytes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedpeft_edge.protocol import notices, wire
from fedpeft_edge.protocol.reasons import Reason

GOOD = {"v": 1, "t": "ack", "fleet": "line-3", "site": "site-07", "round": 12, "msg": None,
        "status": "accepted", "reason": "", "time": 1764590000.5}


def _bytes(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _reason(data: bytes) -> str:
    with pytest.raises(wire.WireFormatError) as info:
        notices.decode_ack(data)
    return info.value.reason


def test_round_trip_is_small_readable_json() -> None:
    ack = notices.AckMessage("line-3", "site-07", 12, "duplicate", "already counted", 1764590000.123456)
    data = notices.encode_ack(ack)
    assert len(data) < 200 and json.loads(data)["status"] == "duplicate"
    back = notices.decode_ack(data)
    assert (back.fleet, back.site, back.round, back.status, back.reason, back.msg) == (
        "line-3", "site-07", 12, "duplicate", "already counted", None)
    assert back.time == pytest.approx(1764590000.123, abs=1e-3)
    by_id = notices.AckMessage("line-3", "site-07", None, "received", "already consumed", 1.0, "ab" * 16)
    assert notices.decode_ack(notices.encode_ack(by_id)).msg == "ab" * 16


@pytest.mark.parametrize(("change", "reason"), [
    ({"v": 2}, Reason.BAD_VERSION),
    ({"v": True}, Reason.BAD_VERSION),
    ({"v": 1.0}, Reason.BAD_VERSION),
    ({"t": "update"}, Reason.BAD_KIND),
    ({"extra": 1}, Reason.BAD_KEYS),
    ({"round": True}, Reason.BAD_TYPE),
    ({"round": 3.0}, Reason.BAD_TYPE),
    ({"round": -1}, Reason.OUT_OF_RANGE),
    ({"round": 2**41}, Reason.OUT_OF_RANGE),
    ({"round": None}, Reason.BAD_KEYS),  # neither a round nor a message id
    ({"msg": "AB" * 16}, Reason.BAD_STRING),
    ({"msg": 5}, Reason.BAD_STRING),
    ({"site": "a/b"}, Reason.BAD_STRING),
    ({"site": "x" * 65}, Reason.BAD_STRING),
    ({"fleet": 7}, Reason.BAD_TYPE),
    ({"status": "ok"}, Reason.BAD_STRING),
    ({"status": ["accepted"]}, Reason.BAD_STRING),
    ({"reason": "line\nbreak"}, Reason.BAD_STRING),
    ({"reason": "é"}, Reason.BAD_STRING),
    ({"reason": 3}, Reason.BAD_TYPE),
    ({"time": -1}, Reason.OUT_OF_RANGE),
    ({"time": "now"}, Reason.BAD_TYPE),
    ({"time": False}, Reason.BAD_TYPE),
])
def test_fields_are_checked(change: dict, reason: str) -> None:
    assert _reason(_bytes({**GOOD, **change})) == reason


def test_missing_key() -> None:
    obj = dict(GOOD)
    del obj["time"]
    assert _reason(_bytes(obj)) == Reason.BAD_KEYS


@pytest.mark.parametrize(("data", "reason"), [
    (b"", Reason.TRUNCATED),
    (b"{", Reason.MALFORMED),
    (b"\xff\xfe{}", Reason.MALFORMED),
    (b"[1, 2]", Reason.MALFORMED),
    (b'"ack"', Reason.MALFORMED),
    (b"[" * 400 + b"]" * 400, Reason.OVERSIZED),
    (b"[" * 250 + b"]" * 250, Reason.MALFORMED),
    (b" " * (notices.MAX_ACK_BYTES + 1), Reason.OVERSIZED),
    (_bytes(GOOD).replace(b"1764590000.5", b"NaN"), Reason.NON_FINITE),
    (_bytes(GOOD).replace(b"1764590000.5", b"Infinity"), Reason.NON_FINITE),
    (_bytes(GOOD)[:-1] + b', "round": 13}', Reason.BAD_KEYS),  # duplicate key: never "last one wins"
    (_bytes(GOOD) + b"x", Reason.MALFORMED),
])
def test_hostile_bytes(data: bytes, reason: str) -> None:
    assert _reason(data) == reason


def test_not_bytes() -> None:
    with pytest.raises(wire.WireFormatError):
        notices.decode_ack("{}")  # type: ignore[arg-type]


@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_wire_errors(data: bytes) -> None:
    try:
        notices.decode_ack(data)
    except wire.WireFormatError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@given(st.dictionaries(st.sampled_from([*sorted(notices.ACK_KEYS), "x"]), json_values, max_size=10))
def test_arbitrary_objects_raise_only_wire_errors(obj: dict) -> None:
    try:
        data = json.dumps({**GOOD, **obj}).encode()
    except ValueError:
        return
    try:
        ack = notices.decode_ack(data)
    except wire.WireFormatError:
        return
    assert ack.status in notices.ACK_STATUSES and (ack.round is not None or ack.msg is not None)
