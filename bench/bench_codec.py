"""Update codec cost and size: a 1M-parameter update at top-1 % + int8 versus dense fp32.

Run: ``pytest bench/bench_codec.py --benchmark-only -p no:cacheprovider`` (about 20 s).
Targets (README): payload <= 1.5 % of dense fp32 bytes, index coding included; encode+decode median
<= 20 ms on one core. ``extra_info`` records bytes, ratios, reconstruction error and the kernel backend.
The delta is heavy-tailed Gaussian noise (a few large coordinates, like adapter deltas); index positions
are therefore spread uniformly, which is the worst case for the varint gaps.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft_edge import kernels
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.site.encoder import UpdateEncoder

N = 1_000_000
DENSE_BYTES = 4 * N


@pytest.fixture(scope="module")
def delta() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal(N) * rng.exponential(1.0, N)).astype(np.float32)


def _envelope(enc: C.EncodedUpdate) -> bytes:
    msg = W.UpdateMessage("fleet", 1, "site-1", "ab" * 16, 1000, {"loss": 0.5}, enc)
    return W.encode_update(msg)


@pytest.mark.parametrize("mode", ["topk_int8", "topk_fp32", "int8", "fp32"])
def test_encode_decode_1m(benchmark, delta: np.ndarray, mode: str) -> None:
    benchmark.group = "codec encode+decode, 1M params"
    encoder = UpdateEncoder(C.CodecConfig(mode=mode, topk_ratio=0.01), N, seed=1)
    acc = np.zeros(N, np.float32)

    def round_trip() -> C.EncodedUpdate:
        enc = encoder.encode(delta)
        acc.fill(0.0)
        C.accumulate_into(enc, acc, 1.0)  # the aggregator's decode path (validate + fused kernel)
        return enc

    enc = benchmark(round_trip)
    encoder.reset_residual()
    enc = encoder.encode(delta)
    dense = C.decode_dense(enc, N)
    # reconstruction error of what was sent, relative to the same coordinates of the input
    sent = dense != 0 if mode.startswith("topk") else np.ones(N, bool)
    rel_sent = float(np.linalg.norm(dense[sent] - delta[sent]) / np.linalg.norm(delta[sent]))
    rel_total = float(np.linalg.norm(dense - delta) / np.linalg.norm(delta))
    env = len(_envelope(enc))
    # error feedback conservation on the measured message
    np.testing.assert_allclose(dense + encoder.residual, delta, atol=1e-6 * float(np.abs(delta).max()))
    benchmark.extra_info.update({
        "backend": kernels.backend, "cpu_path": kernels.backend_info().get("cpu_path"),
        "payload_bytes": enc.nbytes, "envelope_bytes": env, "index_coding": enc.index_coding,
        "index_bytes": enc.index_nbytes, "ratio_vs_fp32_pct": round(100 * env / DENSE_BYTES, 4),
        "rel_err_sent_values": round(rel_sent, 5), "rel_err_whole_update_this_round": round(rel_total, 4),
    })
    if mode == "topk_int8":
        assert env <= 0.015 * DENSE_BYTES, f"{env} bytes is {100 * env / DENSE_BYTES:.3f} % of fp32"


def test_encode_only_topk_int8_1m(benchmark, delta: np.ndarray) -> None:
    benchmark.group = "codec parts, 1M params, top-1% int8"
    encoder = UpdateEncoder(C.CodecConfig(), N, seed=1)
    enc = benchmark(encoder.encode, delta)
    benchmark.extra_info.update({"backend": kernels.backend, "payload_bytes": enc.nbytes})


def test_decode_only_topk_int8_1m(benchmark, delta: np.ndarray) -> None:
    benchmark.group = "codec parts, 1M params, top-1% int8"
    enc = UpdateEncoder(C.CodecConfig(), N, seed=1).encode(delta)
    data = _envelope(enc)
    acc = np.zeros(N, np.float32)

    def ingest() -> None:
        msg = W.decode_update(data)
        C.accumulate_into(msg.update, acc, 1.0)

    benchmark(ingest)
    benchmark.extra_info.update({"backend": kernels.backend, "envelope_bytes": len(data)})
