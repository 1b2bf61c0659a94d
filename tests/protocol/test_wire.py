"""Wire envelope v1: round trips and every class of hostile input → WireError with a reason."""

from __future__ import annotations

import json
import tracemalloc

import msgpack
import numpy as np
import pytest

import fedpeft_edge
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.protocol.reasons import Reason, reason_of
from fedpeft_edge.runtime.errors import WireError
from fedpeft_edge.site.encoder import UpdateEncoder

N = 5000
SPEC = "0123456789abcdef0123456789abcdef"


def _update(mode: str = "topk_int8", **kw: object) -> W.UpdateMessage:
    rng = np.random.default_rng(0)
    enc = UpdateEncoder(C.CodecConfig(mode=mode), N).encode(rng.standard_normal(N).astype(np.float32))
    fields = {"fleet": "plant-a", "round": 7, "client_id": "gw-01", "spec_hash": SPEC, "num_samples": 640,
              "metrics": {"loss": 0.42, "accuracy": 0.9, "train_seconds": 12.5}, "update": enc}
    fields.update(kw)
    return W.UpdateMessage(**fields)  # type: ignore[arg-type]


def _raw(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _obj(msg: W.UpdateMessage | None = None) -> dict:
    return msgpack.unpackb(W.encode_update(msg or _update()), raw=False)


def _reason_of_decode(data: bytes, limits: W.WireLimits = W.DEFAULT_LIMITS, kind: str = "update") -> str:
    decode = {"update": W.decode_update, "global": W.decode_global, "status": notices.decode_status}[kind]
    with pytest.raises(WireError) as ei:
        decode(data, limits)
    return reason_of(ei.value)


# ---- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", C.MODES)
def test_update_round_trip(mode: str) -> None:
    msg = _update(mode)
    back = W.decode_update(W.encode_update(msg))
    assert back == msg


def test_global_and_status_round_trip() -> None:
    vec = np.linspace(-1, 1, N, dtype=np.float32)
    g = W.GlobalMessage("plant-a", 3, SPEC, C.encode_global(vec), {"participants": 5, "loss": 0.3,
                                                                   "optimizer": "fedadam", "final": False})
    back = W.decode_global(W.encode_global(g))
    assert back == g
    np.testing.assert_array_equal(C.decode_global(back.vector, N), vec)
    s = notices.StatusMessage("gw-01", "training", 1_700_000_000.5, 4)
    assert notices.decode_status(notices.encode_status(s)) == s
    s2 = notices.StatusMessage("gw-01", "offline", 0.0, None)
    assert notices.decode_status(notices.encode_status(s2)) == s2


def test_message_kind_routes() -> None:
    assert W.message_kind(W.encode_update(_update())) == "update"
    with pytest.raises(WireError):  # status is JSON now (operators read it), never a msgpack envelope
        W.message_kind(notices.encode_status(notices.StatusMessage("a", "online", 1.0)))
    with pytest.raises(WireError):
        W.message_kind(_raw({"v": 1, "t": "exploit"}))


def test_int_metrics_become_floats_and_checksum_is_blake2b_8() -> None:
    obj = _obj()
    obj["m"] = {"loss": 1}
    obj_bytes = _raw(obj)
    assert W.decode_update(obj_bytes).metrics == {"loss": 1.0}
    assert len(obj["ck"]) == 8
    import hashlib

    assert obj["ck"] == hashlib.blake2b(obj["p"], digest_size=8).digest()


def test_encoder_refuses_what_decoder_would_reject() -> None:
    with pytest.raises(WireError):
        W.encode_update(_update(client_id="a/b"))
    with pytest.raises(WireError):
        W.encode_update(_update(metrics={"loss": float("nan")}))


# ---- hostile bytes ---------------------------------------------------------------------------------


def test_oversized_rejected_before_parsing() -> None:
    data = W.encode_update(_update("fp32"))
    limits = W.WireLimits(max_message_bytes=len(data) - 1)
    assert _reason_of_decode(data, limits) == Reason.OVERSIZED


def test_every_truncation_is_a_wire_error() -> None:
    data = W.encode_update(_update())
    reasons = set()
    for cut in range(0, len(data)):
        with pytest.raises(WireError) as ei:
            W.decode_update(data[:cut])
        reasons.add(reason_of(ei.value))
    assert Reason.TRUNCATED in reasons


def test_trailing_bytes_and_garbage() -> None:
    data = W.encode_update(_update())
    assert _reason_of_decode(data + b"\x00") == Reason.TRAILING
    assert _reason_of_decode(b"\xc1") == Reason.MALFORMED
    assert _reason_of_decode(_raw([1, 2, 3])) == Reason.BAD_TYPE  # arrays are not part of v1
    assert _reason_of_decode(_raw(5)) == Reason.MALFORMED
    assert _reason_of_decode(msgpack.packb(msgpack.ExtType(1, b"x"))) == Reason.MALFORMED
    assert _reason_of_decode(b"") == Reason.TRUNCATED
    # int and bin map keys are refused by strict_map_key / the exact key set
    assert _reason_of_decode(b"\x81\x01\x01") == Reason.MALFORMED
    with pytest.raises(WireError):
        W.decode_update("not bytes")  # type: ignore[arg-type]


def test_invalid_utf8_in_string() -> None:
    data = W.encode_update(_update())
    bad = data.replace(b"gw-01", b"gw-\xff1")
    assert _reason_of_decode(bad) == Reason.MALFORMED


def test_deep_nesting_is_rejected() -> None:
    nested = b"\x81\xa1m" * 2000 + b"\xc0"
    with pytest.raises(WireError):
        W.decode_update(nested)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("v", 2, Reason.BAD_VERSION),
        ("v", True, Reason.BAD_VERSION),
        ("t", "global", Reason.BAD_KIND),
        ("r", True, Reason.BAD_TYPE),
        ("r", -1, Reason.OUT_OF_RANGE),
        ("r", 1.0, Reason.BAD_TYPE),
        ("ns", 0, Reason.OUT_OF_RANGE),
        ("ns", False, Reason.BAD_TYPE),
        ("ns", 10**12, Reason.OUT_OF_RANGE),
        ("c", "", Reason.BAD_STRING),
        ("c", "gw/01", Reason.BAD_STRING),
        ("c", "gw+#", Reason.BAD_STRING),
        ("c", "x" * 65, Reason.BAD_STRING),
        ("c", 5, Reason.BAD_TYPE),
        ("fl", "plant a", Reason.BAD_STRING),
        ("sh", "ABCDEF0123456789", Reason.BAD_STRING),
        ("sh", "abc", Reason.BAD_STRING),
        ("sh", b"0123456789abcdef", Reason.BAD_TYPE),
        ("m", {"loss": float("nan")}, Reason.NON_FINITE),
        ("m", {"loss": float("inf")}, Reason.NON_FINITE),
        ("m", {"loss": True}, Reason.BAD_TYPE),
        ("m", {"loss": "0.1"}, Reason.BAD_TYPE),
        ("m", {"bad key": 1.0}, Reason.BAD_STRING),
        ("m", {f"k{i}": 1.0 for i in range(33)}, Reason.OVERSIZED),
        ("m", [1.0], Reason.BAD_TYPE),
        ("p", "text", Reason.BAD_TYPE),
        ("ck", b"\0" * 8, Reason.CHECKSUM),
        ("ck", b"\0" * 4, Reason.CHECKSUM),
        ("cd", 5, Reason.BAD_TYPE),
    ],
)
def test_field_violations(key: str, value: object, reason: str) -> None:
    obj = _obj()
    obj[key] = value
    assert _reason_of_decode(_raw(obj)) == reason


def test_unknown_and_missing_keys() -> None:
    obj = _obj()
    obj["extra"] = 1
    assert _reason_of_decode(_raw(obj)) == Reason.BAD_KEYS
    obj = _obj()
    del obj["ns"]
    assert _reason_of_decode(_raw(obj)) == Reason.BAD_KEYS
    obj = _obj()
    obj["cd"]["zz"] = 1
    assert _reason_of_decode(_raw(obj)) == Reason.BAD_KEYS


def test_payload_bit_flip_fails_checksum() -> None:
    obj = _obj()
    p = bytearray(obj["p"])
    p[len(p) // 2] ^= 0x01
    obj["p"] = bytes(p)
    assert _reason_of_decode(_raw(obj)) == Reason.CHECKSUM


def test_absurd_declared_lengths_rejected_before_allocation() -> None:
    obj = _obj()
    obj["cd"]["n"] = 2**40
    obj["cd"]["k"] = 2**39
    data = _raw(obj)
    tracemalloc.start()
    try:
        assert _reason_of_decode(data) == Reason.OUT_OF_RANGE
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    obj = _obj()
    obj["cd"]["n"] = W.DEFAULT_LIMITS.max_params + 1
    assert _reason_of_decode(_raw(obj)) == Reason.OUT_OF_RANGE
    obj = _obj()
    obj["cd"]["k"] = obj["cd"]["k"] + 1  # declared sizes no longer match the payload
    assert _reason_of_decode(_raw(obj)) == Reason.LENGTH_MISMATCH
    obj = _obj()
    obj["cd"]["il"] = -5
    assert _reason_of_decode(_raw(obj)) == Reason.LENGTH_MISMATCH


def test_global_rejects_sparse_vectors_and_bad_meta() -> None:
    msg = _update()
    g = {"v": 1, "t": "global", "fl": "plant-a", "r": 0, "sh": SPEC,
         "cd": {"mo": msg.update.mode, "n": N, "k": msg.update.k, "b": msg.update.block,
                "ic": msg.update.index_coding, "il": msg.update.index_nbytes},
         "p": msg.update.payload, "ck": W.checksum(msg.update.payload), "meta": {}}
    assert _reason_of_decode(_raw(g), kind="global") == Reason.BAD_MODE
    dense = C.encode_global(np.ones(10, np.float32))
    g.update({"cd": {"mo": "fp32", "n": 10, "k": 10, "b": 0, "ic": "none", "il": 0}, "p": dense.payload,
              "ck": W.checksum(dense.payload)})
    assert W.decode_global(_raw(g)).round == 0
    g["meta"] = {"x": float("nan")}
    assert _reason_of_decode(_raw(g), kind="global") == Reason.NON_FINITE
    g["meta"] = {"x": {"nested": 1}}
    assert _reason_of_decode(_raw(g), kind="global") == Reason.BAD_TYPE


def test_status_is_readable_json() -> None:
    """What an operator sees with mosquitto_sub: one line of JSON with site, state, round, time, version."""
    status = notices.StatusMessage("gw-01", "paused", 1_700_000_000.25, 7, detail="cpu busy")
    data = notices.encode_status(status)
    obj = json.loads(data)
    assert obj == {"v": 1, "t": "status", "site": "gw-01", "state": "paused", "round": 7,
                   "time": 1_700_000_000.25, "version": fedpeft_edge.__version__, "detail": "cpu busy"}


def test_status_violations() -> None:
    good = {"v": 1, "t": "status", "site": "gw-01", "state": "online", "round": None, "time": 1.0,
            "version": "0.1.0", "detail": ""}
    assert notices.decode_status(json.dumps(good).encode()).state == "online"
    for key, value, reason in [("state", "Online!", Reason.BAD_STRING),
                               ("time", -1.0, Reason.OUT_OF_RANGE), ("time", True, Reason.BAD_TYPE),
                               ("round", -2, Reason.OUT_OF_RANGE), ("site", "a b", Reason.BAD_STRING),
                               ("version", "1.0; rm -rf", Reason.BAD_STRING),
                               ("detail", "x\n" * 3, Reason.BAD_STRING),
                               ("detail", "x" * 300, Reason.BAD_STRING)]:
        bad = dict(good)
        bad[key] = value
        assert _reason_of_decode(json.dumps(bad).encode(), kind="status") == reason, key
    assert _reason_of_decode(b'{"v":1,"v":1}', kind="status") == Reason.BAD_KEYS  # duplicate keys
    assert _reason_of_decode(json.dumps({**good, "time": "NaN"}).replace('"NaN"', "NaN").encode(),
                             kind="status") == Reason.NON_FINITE
    assert _reason_of_decode(b" " * 2000, kind="status") == Reason.OVERSIZED
    assert _reason_of_decode(_raw({"v": 1, "t": "status"}), kind="status") == Reason.MALFORMED  # msgpack


def test_limits_validate_themselves() -> None:
    with pytest.raises(ValueError):
        W.WireLimits(max_message_bytes=0)
    with pytest.raises(ValueError):
        W.WireLimits(max_params=True)
