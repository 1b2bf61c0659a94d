"""The site encoder's top-k tools (issue 13): per-tensor selection, the sparsity warm-up, DGC momentum
correction; their state across restarts; and that the aggregator decodes what they send unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft_edge.protocol.codec import CodecConfig, decode_dense, encode_vector, parse
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.encoder import UpdateEncoder

SEGMENTS = ((0, 1000), (1000, 200), (1200, 50))  # e.g. LoRA A, LoRA B, a head
N = 1250


def _delta(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = rng.normal(0, 0.01, N).astype(np.float32)
    d[1200:] = np.sign(d[1200:]) + d[1200:]  # the "head" dominates: a global top-k spends itself there
    return d


def _per_segment(indices: np.ndarray) -> list[int]:
    return [int(np.count_nonzero((indices >= o) & (indices < o + n))) for o, n in SEGMENTS]


def test_vector_topk_starves_small_tensors_tensor_topk_does_not() -> None:
    d = _delta()
    vec = UpdateEncoder(CodecConfig(mode="topk_fp32", topk_ratio=0.04), N, segments=SEGMENTS)
    ten = UpdateEncoder(
        CodecConfig(mode="topk_fp32", topk_ratio=0.04, topk_scope="tensor"), N, segments=SEGMENTS
    )
    pv = parse(vec.encode(d), n_params=N)
    pt = parse(ten.encode(d), n_params=N)
    assert _per_segment(pv.indices) == [0, 0, 50]
    assert _per_segment(pt.indices) == [40, 8, 2]
    assert np.all(
        np.diff(pt.indices.astype(np.int64)) > 0
    )  # global, strictly increasing: the same wire format
    # within each tensor it keeps the largest values, and error feedback keeps the rest
    for (o, n), k in zip(SEGMENTS, [40, 8, 2], strict=True):
        seg = np.abs(d[o : o + n])
        chosen = pt.indices[(pt.indices >= o) & (pt.indices < o + n)] - o
        assert seg[chosen].min() >= np.sort(seg)[-k]
    sent = np.zeros(N, np.float32)
    sent[pt.indices] = pt.values
    np.testing.assert_allclose(sent + ten.residual, d, atol=1e-7)


def test_tensor_topk_with_int8_decodes_at_the_aggregator() -> None:
    cfg = CodecConfig(mode="topk_int8", topk_ratio=0.05, topk_scope="tensor")
    enc = UpdateEncoder(cfg, N, segments=SEGMENTS).encode(_delta(1))
    dense = decode_dense(enc, N)
    assert dense.shape == (N,) and np.count_nonzero(dense) <= enc.k == 50 + 10 + 2


def test_warmup_schedule_shrinks_to_the_target_and_survives_a_restart() -> None:
    cfg = CodecConfig(mode="topk_fp32", topk_ratio=0.01, warmup_rounds=4, warmup_start_ratio=0.25)
    assert [round(cfg.ratio_at(m), 5) for m in range(6)] == [0.25, 0.11180, 0.05, 0.02236, 0.01, 0.01]
    enc = UpdateEncoder(cfg, N)
    ks = [enc.encode(_delta(i)).k for i in range(2)]
    again = UpdateEncoder(cfg, N)
    again.load_state_arrays(enc.state_arrays())
    ks += [again.encode(_delta(i)).k for i in range(2, 6)]
    assert ks == [round(cfg.ratio_at(m) * N) for m in range(4)] + [12, 12]
    again.reset_residual()  # a new federation starts the warm-up over
    assert again.encode(_delta(9)).k == round(0.25 * N)


def test_old_encoder_state_without_the_new_keys_loads() -> None:
    cfg = CodecConfig(mode="topk_fp32", topk_ratio=0.01, warmup_rounds=2, momentum=0.5)
    enc = UpdateEncoder(cfg, N)
    old = {"residual": np.ones(N, np.float32), "rng": np.array([1, 2], np.uint64)}
    enc.load_state_arrays(old)
    assert enc.residual[0] == 1.0 and enc.encode(_delta()).k == round(0.25 * N)  # warm-up from its start


def test_momentum_correction_accumulates_and_masks_what_was_sent() -> None:
    cfg = CodecConfig(mode="topk_fp32", topk_ratio=0.1, momentum=0.5)
    enc = UpdateEncoder(cfg, N)
    d = _delta(2)
    first = parse(enc.encode(d), n_params=N)
    vel = enc.state_arrays()["velocity"]
    assert np.all(vel[first.indices] == 0)  # momentum factor masking
    rest = np.setdiff1d(np.arange(N), first.indices)
    np.testing.assert_allclose(vel[rest], d[rest])
    second = parse(enc.encode(d), n_params=N)
    # what was not sent grows by v = 0.5·v + d on top of the residual: it is picked now
    assert len(np.intersect1d(second.indices, rest)) > 0
    again = UpdateEncoder(cfg, N)
    again.load_state_arrays(enc.state_arrays())
    np.testing.assert_array_equal(again.state_arrays()["velocity"], enc.state_arrays()["velocity"])


def test_momentum_leaves_dense_modes_alone() -> None:
    enc = UpdateEncoder(CodecConfig(mode="fp32", momentum=0.9), N)
    d = _delta(3)
    np.testing.assert_array_equal(np.frombuffer(enc.encode(d).payload, np.float32), d)


@pytest.mark.parametrize(
    "bad",
    [
        dict(topk_scope="layer"),
        dict(warmup_rounds=-1),
        dict(momentum=1.0),
        dict(warmup_rounds=3, warmup_start_ratio=0.001, topk_ratio=0.01),
    ],
)
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(InvalidValueError):
        CodecConfig(**bad)


def test_segments_must_cover_the_vector() -> None:
    with pytest.raises(InvalidValueError):
        UpdateEncoder(CodecConfig(), N, segments=((0, 10),))
    with pytest.raises(InvalidValueError):
        encode_vector(_delta(), CodecConfig(mode="topk_fp32"), segments=((0, 10), (20, N - 20)))


def test_a_non_finite_delta_leaves_the_state_untouched() -> None:
    enc = UpdateEncoder(
        CodecConfig(mode="topk_fp32", topk_ratio=0.1, topk_scope="tensor", momentum=0.5), N, segments=SEGMENTS
    )
    enc.encode(_delta())
    before = {k: v.copy() for k, v in enc.state_arrays().items()}
    bad = _delta(4)
    bad[1100] = np.nan
    with pytest.raises(Exception, match=r"NaN|Inf|finite"):
        enc.encode(bad)
    after = enc.state_arrays()
    for key in ("residual", "velocity", "encoded"):
        np.testing.assert_array_equal(before[key], after[key])
