"""Update codec: round trips per mode, error feedback, byte accounting, hostile payloads."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.protocol.indices import (
    decode_bitmap_indices,
    decode_varint_indices,
    encode_bitmap_indices,
    encode_varint_indices,
)
from fedpeft_edge.protocol.reasons import Reason, reason_of
from fedpeft_edge.runtime.errors import NonFiniteError, WireError
from fedpeft_edge.site.encoder import UpdateEncoder

N = 20_000


def _delta(seed: int, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # heavy-tailed like real adapter deltas: a few large coordinates dominate
    return (rng.standard_normal(n) * rng.exponential(1.0, n) ** 2).astype(np.float32)


def _replace(enc: C.EncodedUpdate, **kw: object) -> C.EncodedUpdate:
    fields = {f: getattr(enc, f) for f in ("mode", "n", "k", "block", "index_coding", "index_nbytes",
                                            "payload")}
    fields.update(kw)
    return C.EncodedUpdate(**fields)  # type: ignore[arg-type]


def _reason(exc_info: pytest.ExceptionInfo[BaseException]) -> str:
    return reason_of(exc_info.value)


# ---- round trips ---------------------------------------------------------------------------------


def test_fp32_round_trip_is_exact() -> None:
    d = _delta(0)
    enc = UpdateEncoder(C.CodecConfig(mode="fp32"), N).encode(d)
    assert enc.k == N and enc.nbytes == 4 * N
    np.testing.assert_array_equal(C.decode_dense(enc, N), d)


def test_int8_dense_error_within_half_step_per_block() -> None:
    d = _delta(1)
    cfg = C.CodecConfig(mode="int8", block=128, error_feedback=False)
    enc = UpdateEncoder(cfg, N).encode(d)
    out = C.decode_dense(enc, N)
    scales = np.frombuffer(enc.payload, dtype="<f4", count=-(-N // 128))
    step = np.repeat(scales, 128)[:N]
    assert np.all(np.abs(out - d) <= 0.5 * step * (1 + 1e-5) + 1e-12)
    assert enc.nbytes == 4 * len(scales) + N


@pytest.mark.parametrize("mode", ["topk_fp32", "topk_int8"])
def test_topk_sends_the_k_largest_of_update_plus_residual(mode: str) -> None:
    d = _delta(2)
    cfg = C.CodecConfig(mode=mode, topk_ratio=0.01)
    enc = UpdateEncoder(cfg, N).encode(d)
    assert enc.k == round(0.01 * N)
    dense = C.decode_dense(enc, N)
    sent = np.flatnonzero(dense)
    largest = np.argsort(-np.abs(d), kind="stable")[: enc.k]
    assert set(sent) <= set(largest)
    if mode == "topk_fp32":
        np.testing.assert_array_equal(dense[largest], d[largest])
    else:
        # report the int8 reconstruction error of the sent values (relative L2)
        rel = np.linalg.norm(dense[largest] - d[largest]) / np.linalg.norm(d[largest])
        print(f"top-1% int8 relative reconstruction error of sent values: {rel:.4f}")
        assert rel < 0.01


@pytest.mark.parametrize("mode", ["int8", "topk_fp32", "topk_int8"])
def test_error_feedback_conserves_everything(mode: str) -> None:
    """sent_t + residual_t == delta_t + residual_{t-1} each round, so Σ sent + residual == Σ delta."""
    cfg = C.CodecConfig(mode=mode, topk_ratio=0.02, block=64)
    encoder = UpdateEncoder(cfg, N, seed=7)
    total_delta = np.zeros(N, np.float64)
    total_sent = np.zeros(N, np.float64)
    for t in range(6):
        d = _delta(10 + t)
        before = encoder.residual.copy()
        enc = encoder.encode(d)
        sent = C.decode_dense(enc, N)
        scale = np.abs(d).max()
        np.testing.assert_allclose(sent + encoder.residual, d + before, rtol=0, atol=1e-6 * scale)
        total_delta += d
        total_sent += sent
    np.testing.assert_allclose(total_sent + encoder.residual, total_delta, rtol=0,
                               atol=1e-5 * np.abs(total_delta).max())


def test_without_error_feedback_the_residual_stays_zero() -> None:
    encoder = UpdateEncoder(C.CodecConfig(mode="topk_int8", error_feedback=False), N)
    encoder.encode(_delta(3))
    assert not encoder.residual.any()


def test_residual_view_is_read_only() -> None:
    encoder = UpdateEncoder(C.CodecConfig(), N)
    with pytest.raises(ValueError):
        encoder.residual[0] = 1.0


def test_exact_byte_accounting_payload_and_envelope() -> None:
    for mode in C.MODES:
        encoder = UpdateEncoder(C.CodecConfig(mode=mode), N)
        enc = encoder.encode(_delta(4))
        assert enc.nbytes == len(enc.payload) == C.expected_payload_len(
            enc.mode, enc.n, enc.k, enc.block, enc.index_nbytes)
        msg = W.UpdateMessage("fleet", 3, "site-01", "0123456789abcdef", 128, {"loss": 0.5}, enc)
        data = W.encode_update(msg)
        # the envelope adds a small fixed overhead around the payload
        assert 0 < len(data) - enc.nbytes < 200, (mode, len(data) - enc.nbytes)


def test_index_coding_picks_the_smaller_section() -> None:
    n = 4096
    sparse = UpdateEncoder(C.CodecConfig(topk_ratio=0.01), n).encode(_delta(5, n))
    dense = UpdateEncoder(C.CodecConfig(topk_ratio=0.5), n).encode(_delta(5, n))
    assert sparse.index_coding == "varint" and sparse.index_nbytes < n // 8
    assert dense.index_coding == "bitmap" and dense.index_nbytes == n // 8
    for enc in (sparse, dense):
        idx = C.parse(enc).indices
        assert idx is not None and idx.size == enc.k and np.all(np.diff(idx.astype(np.int64)) > 0)


def test_varint_round_trip_with_extreme_gaps() -> None:
    idx = np.array([0, 1, 127, 128, 16383, 16384, 2**21, 2**28 + 5, 2**31 - 2, 2**31 - 1], np.uint32)
    data = encode_varint_indices(idx)
    np.testing.assert_array_equal(decode_varint_indices(data, idx.size, 2**31), idx)
    rng = np.random.default_rng(0)
    idx = np.unique(rng.integers(0, 10**7, 5000)).astype(np.uint32)
    data = encode_varint_indices(idx)
    np.testing.assert_array_equal(decode_varint_indices(data, idx.size, 10**7), idx)
    bm = encode_bitmap_indices(idx, 10**7)
    np.testing.assert_array_equal(decode_bitmap_indices(bm, idx.size, 10**7), idx)


def test_norm_without_densifying_matches_dense_norm() -> None:
    for mode in C.MODES:
        enc = UpdateEncoder(C.CodecConfig(mode=mode, block=100), N).encode(_delta(6))
        dense = C.decode_dense(enc, N)
        assert C.update_l2_norm(enc) == pytest.approx(float(np.linalg.norm(dense.astype(np.float64))),
                                                      rel=1e-5)


def test_accumulate_into_matches_weighted_dense() -> None:
    acc = np.ones(N, np.float32)
    enc = UpdateEncoder(C.CodecConfig(), N).encode(_delta(7))
    C.accumulate_into(enc, acc, 2.5)
    np.testing.assert_allclose(acc, 1 + 2.5 * C.decode_dense(enc), rtol=1e-6, atol=1e-6)


def test_encoder_state_round_trip_continues_identically(tmp_path) -> None:
    cfg = C.CodecConfig(mode="topk_int8", stochastic_rounding=True)
    a = UpdateEncoder(cfg, N, seed=123)
    a.encode(_delta(8))
    np.savez(tmp_path / "enc.npz", **a.state_arrays())
    b = UpdateEncoder(cfg, N, seed=999)
    with np.load(tmp_path / "enc.npz", allow_pickle=False) as z:
        b.load_state_arrays({k: z[k] for k in z.files})
    assert a.encode(_delta(9)).payload == b.encode(_delta(9)).payload
    np.testing.assert_array_equal(a.residual, b.residual)


def test_load_state_rejects_bad_arrays() -> None:
    enc = UpdateEncoder(C.CodecConfig(), 10)
    with pytest.raises(ValueError):
        enc.load_state_arrays({"residual": np.zeros(9, np.float32), "rng": np.zeros(2, np.uint64)})
    with pytest.raises(ValueError):
        enc.load_state_arrays({"residual": np.full(10, np.nan, np.float32), "rng": np.zeros(2, np.uint64)})


def test_stochastic_rounding_is_unbiased_on_average() -> None:
    x = np.linspace(-1, 1, 256, dtype=np.float32) * 0.37
    x[0] = 1.0  # fix the scale at 1/127
    encoder = UpdateEncoder(C.CodecConfig(mode="int8", stochastic_rounding=True, error_feedback=False),
                              x.size, seed=5)
    mean = np.mean([C.decode_dense(encoder.encode(x)) for _ in range(400)], axis=0)
    deterministic = C.decode_dense(C.encode_global(x, "int8"))
    # the average of stochastic roundings is much closer to x than one deterministic rounding
    assert np.abs(mean - x).mean() < 0.3 * np.abs(deterministic - x).mean()


def test_nonfinite_delta_raises_and_keeps_residual() -> None:
    encoder = UpdateEncoder(C.CodecConfig(), N)
    encoder.encode(_delta(10))
    before = encoder.residual.copy()
    bad = _delta(11)
    bad[5] = np.nan
    for mode in C.MODES:
        e2 = UpdateEncoder(C.CodecConfig(mode=mode), N)
        with pytest.raises(NonFiniteError):
            e2.encode(bad)
    with pytest.raises(NonFiniteError):
        encoder.encode(bad)
    np.testing.assert_array_equal(encoder.residual, before)


def test_config_validation() -> None:
    for bad in ({"mode": "zip"}, {"topk_ratio": 0.0}, {"topk_ratio": 1.5}, {"block": 0}, {"block": True}):
        with pytest.raises(ValueError):
            C.CodecConfig(**bad)  # type: ignore[arg-type]
    assert C.CodecConfig(topk_ratio=1e-9).k_for(100) == 1


def test_global_downlink() -> None:
    g = _delta(12)
    np.testing.assert_array_equal(C.decode_global(C.encode_global(g), N), g)
    approx = C.decode_global(C.encode_global(g, "int8"), N)
    assert np.linalg.norm(approx - g) / np.linalg.norm(g) < 0.05  # heavy-tailed test data, block 256
    sparse = UpdateEncoder(C.CodecConfig(), N).encode(g)
    with pytest.raises(WireError) as ei:
        C.decode_global(sparse, N)
    assert _reason(ei) == Reason.BAD_MODE
    with pytest.raises(ValueError):
        C.encode_global(g, "topk_int8")


# ---- hostile payloads: every violation is a WireError with a reason, acc untouched ---------------------


@pytest.fixture(scope="module")
def topk_enc() -> C.EncodedUpdate:
    return UpdateEncoder(C.CodecConfig(mode="topk_int8", block=32), N).encode(_delta(13))


def _section_offsets(enc: C.EncodedUpdate) -> tuple[int, int]:
    nb = -(-enc.k // enc.block)
    return 4 * nb, 4 * nb + enc.index_nbytes  # index start, q start


def _assert_rejected(enc: C.EncodedUpdate, reason: str, n: int = N) -> None:
    acc = np.arange(n, dtype=np.float32)
    digest = hashlib.sha256(acc.tobytes()).digest()
    with pytest.raises(WireError) as ei:
        C.accumulate_into(enc, acc, 1.0)
    assert _reason(ei) == reason, str(ei.value)
    assert hashlib.sha256(acc.tobytes()).digest() == digest, "accumulator touched by a rejected update"


def test_nan_and_negative_scales_rejected(topk_enc: C.EncodedUpdate) -> None:
    p = bytearray(topk_enc.payload)
    p[0:4] = np.float32(np.nan).tobytes()
    _assert_rejected(_replace(topk_enc, payload=bytes(p)), Reason.NON_FINITE)
    p[0:4] = np.float32(np.inf).tobytes()
    _assert_rejected(_replace(topk_enc, payload=bytes(p)), Reason.NON_FINITE)
    p[0:4] = np.float32(-1.0).tobytes()
    _assert_rejected(_replace(topk_enc, payload=bytes(p)), Reason.OUT_OF_RANGE)


def test_int8_minus_128_rejected(topk_enc: C.EncodedUpdate) -> None:
    _, q0 = _section_offsets(topk_enc)
    p = bytearray(topk_enc.payload)
    p[q0] = 0x80
    _assert_rejected(_replace(topk_enc, payload=bytes(p)), Reason.OUT_OF_RANGE)


def test_payload_length_must_be_exact(topk_enc: C.EncodedUpdate) -> None:
    _assert_rejected(_replace(topk_enc, payload=topk_enc.payload[:-1]), Reason.LENGTH_MISMATCH)
    _assert_rejected(_replace(topk_enc, payload=topk_enc.payload + b"\0"), Reason.LENGTH_MISMATCH)


def test_declared_fields_inconsistent(topk_enc: C.EncodedUpdate) -> None:
    _assert_rejected(_replace(topk_enc, k=N + 1), Reason.OUT_OF_RANGE)
    _assert_rejected(_replace(topk_enc, k=0), Reason.OUT_OF_RANGE)
    _assert_rejected(_replace(topk_enc, mode="topk_int4"), Reason.BAD_MODE)
    _assert_rejected(_replace(topk_enc, index_coding="rle"), Reason.BAD_MODE)
    _assert_rejected(_replace(topk_enc, index_coding="none"), Reason.BAD_MODE)
    _assert_rejected(_replace(topk_enc, block=0), Reason.OUT_OF_RANGE)
    _assert_rejected(_replace(topk_enc, block=True), Reason.BAD_TYPE)
    _assert_rejected(_replace(topk_enc, n=2**40), Reason.OUT_OF_RANGE)
    _assert_rejected(_replace(topk_enc, index_nbytes=topk_enc.k - 1), Reason.LENGTH_MISMATCH)
    # n disagrees with the aggregator's vector
    with pytest.raises(WireError) as ei:
        C.accumulate_into(topk_enc, np.zeros(N + 1, np.float32), 1.0)
    assert _reason(ei) == Reason.OUT_OF_RANGE
    dense = UpdateEncoder(C.CodecConfig(mode="int8"), 100).encode(_delta(14, 100))
    _assert_rejected(_replace(dense, k=99), Reason.BAD_MODE, n=100)
    fp = UpdateEncoder(C.CodecConfig(mode="fp32"), 100).encode(_delta(14, 100))
    _assert_rejected(_replace(fp, block=256), Reason.BAD_MODE, n=100)


def _with_index_bytes(enc: C.EncodedUpdate, index_bytes: bytes) -> C.EncodedUpdate:
    i0, q0 = _section_offsets(enc)
    p = enc.payload[:i0] + index_bytes + enc.payload[q0:]
    return _replace(enc, payload=p, index_nbytes=len(index_bytes))


def test_hostile_varints(topk_enc: C.EncodedUpdate) -> None:
    i0, q0 = _section_offsets(topk_enc)
    good = topk_enc.payload[i0:q0]
    k = topk_enc.k
    # last varint never terminates
    _assert_rejected(_with_index_bytes(topk_enc, good[:-1] + bytes([good[-1] | 0x80])), Reason.TRUNCATED)
    # overlong (6-byte) varint replacing the first
    ends = [i for i, b in enumerate(good) if b < 0x80]
    rest = good[ends[0] + 1 :]
    _assert_rejected(_with_index_bytes(topk_enc, b"\x81\x80\x80\x80\x80\x00" + rest), Reason.VARINT)
    # 5-byte varint whose value exceeds 32 bits
    _assert_rejected(_with_index_bytes(topk_enc, b"\xff\xff\xff\xff\x1f" + rest), Reason.VARINT)
    # non-canonical: 0x80 0x00 encodes 0 in two bytes
    _assert_rejected(_with_index_bytes(topk_enc, b"\x80\x00" + rest), Reason.VARINT)
    # one varint too many / too few for k
    _assert_rejected(_with_index_bytes(topk_enc, good + b"\x00"), Reason.BAD_INDEX)
    _assert_rejected(_with_index_bytes(topk_enc, good[: ends[-2] + 1] + b"\x80\x80"), Reason.TRUNCATED)
    # index out of range: a huge final gap
    _assert_rejected(_with_index_bytes(topk_enc, good[: ends[-2] + 1] + b"\xff\xff\x03"), Reason.BAD_INDEX)
    assert k == len(ends)


def test_hostile_bitmap() -> None:
    n = 1001  # 126 bitmap bytes: bits 1001..1007 are padding
    enc = UpdateEncoder(C.CodecConfig(topk_ratio=0.5, block=16), n).encode(_delta(15, n))
    assert enc.index_coding == "bitmap"
    i0, q0 = _section_offsets(enc)
    bm = bytearray(enc.payload[i0:q0])
    padded = bytearray(bm)
    padded[-1] |= 0x80  # bit 1007 >= n
    _assert_rejected(_with_index_bytes(enc, bytes(padded)), Reason.BAD_INDEX, n=n)
    fewer = bytearray(bm)
    first = next(i for i, b in enumerate(fewer) if b)
    fewer[first] &= fewer[first] - 1  # clear one set bit: count != k
    _assert_rejected(_with_index_bytes(enc, bytes(fewer)), Reason.BAD_INDEX, n=n)
    _assert_rejected(_with_index_bytes(enc, bytes(bm[:-1])), Reason.LENGTH_MISMATCH, n=n)


def test_nan_in_fp32_payloads() -> None:
    for mode in ("fp32", "topk_fp32"):
        enc = UpdateEncoder(C.CodecConfig(mode=mode), 1000).encode(_delta(16, 1000))
        p = bytearray(enc.payload)
        p[4:8] = np.float32(np.inf).tobytes()
        _assert_rejected(_replace(enc, payload=bytes(p)), Reason.NON_FINITE, n=1000)


def test_unaligned_payload_is_copied_not_rejected() -> None:
    enc = UpdateEncoder(C.CodecConfig(mode="fp32"), 100).encode(_delta(17, 100))
    buf = bytearray(b"\0" + enc.payload)
    unaligned = memoryview(buf)[1:]
    out = C.decode_dense(_replace(enc, payload=unaligned), 100)
    np.testing.assert_array_equal(out, C.decode_dense(enc, 100))
