"""Aggregation maths: accumulator, server optimisers vs hand computation, staleness, norm bound."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedpeft_edge.central import strategy as S
from fedpeft_edge.central.accumulator import RoundAccumulator
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.site.encoder import UpdateEncoder


def _encs(count: int, n: int, mode: str = "topk_int8", seed: int = 0) -> list[C.EncodedUpdate]:
    rng = np.random.default_rng(seed)
    cfg = C.CodecConfig(mode=mode, topk_ratio=0.05, block=64)
    return [UpdateEncoder(cfg, n).encode(rng.standard_normal(n).astype(np.float32)) for _ in range(count)]


def test_accumulator_equals_weighted_mean_of_decoded_updates() -> None:
    n = 3000
    encs = _encs(5, n)
    weights = [10.0, 3.0, 7.5, 1.0, 20.0]
    acc = RoundAccumulator(n)
    for enc, w in zip(encs, weights, strict=True):
        acc.accumulate(enc, w)
    dense = np.stack([C.decode_dense(e).astype(np.float64) for e in encs])
    expect = (np.array(weights)[:, None] * dense).sum(0) / sum(weights)
    np.testing.assert_allclose(acc.mean(), expect, rtol=1e-5, atol=1e-6)
    assert acc.count == 5 and acc.total_weight == sum(weights)


def test_clip_scale_shrinks_update_but_keeps_its_weight() -> None:
    n = 100
    enc = _encs(1, n, "fp32")[0]
    acc = RoundAccumulator(n)
    acc.accumulate(enc, 4.0, scale=0.5)
    np.testing.assert_allclose(acc.sum, 2.0 * C.decode_dense(enc), rtol=1e-6)
    assert acc.total_weight == 4.0


def test_aggregation_is_order_independent() -> None:
    n = 5000
    encs = _encs(6, n, seed=1)
    weights = [1.0, 2.0, 3.0, 50.0, 0.5, 7.0]
    means = []
    for perm in itertools.islice(itertools.permutations(range(6)), 0, 720, 97):
        acc = RoundAccumulator(n)
        for i in perm:
            acc.accumulate(encs[i], weights[i])
        means.append(acc.mean())
    for m in means[1:]:
        np.testing.assert_allclose(m, means[0], rtol=1e-5, atol=1e-6)
    # and the global after a FedAvg step too
    g = [S.FedAvg(n).step(np.ones(n, np.float32), m) for m in means]
    for x in g[1:]:
        np.testing.assert_allclose(x, g[0], rtol=1e-5, atol=1e-6)


def test_accumulator_merge_and_dense_and_state() -> None:
    n = 200
    encs = _encs(4, n, "int8")
    a, b, whole = RoundAccumulator(n), RoundAccumulator(n), RoundAccumulator(n)
    for i, e in enumerate(encs):
        (a if i % 2 else b).accumulate(e, i + 1.0)
        whole.accumulate(e, i + 1.0)
    a.merge(b)
    np.testing.assert_allclose(a.mean(), whole.mean(), rtol=1e-5, atol=1e-7)
    c = RoundAccumulator(n)
    c.load_state_arrays(whole.state_arrays())
    np.testing.assert_array_equal(c.sum, whole.sum)
    assert (c.total_weight, c.count) == (whole.total_weight, whole.count)
    d = RoundAccumulator(n)
    d.accumulate_dense(C.decode_dense(encs[0]), 2.0)
    np.testing.assert_allclose(d.mean(), C.decode_dense(encs[0]), rtol=1e-6)
    with pytest.raises(ValueError):
        d.accumulate_dense(np.full(n, np.nan, np.float32), 1.0)
    with pytest.raises(ValueError):
        d.accumulate(encs[0], 0.0)
    with pytest.raises(ValueError):
        RoundAccumulator(n).mean()


def test_fedavg_by_hand() -> None:
    x = np.array([1.0, -2.0, 0.5], np.float32)
    d = np.array([0.1, 0.2, -0.3], np.float32)
    np.testing.assert_allclose(S.FedAvg(3).step(x, d), [1.1, -1.8, 0.2], rtol=1e-6)
    np.testing.assert_allclose(S.FedAvg(3, lr=0.5).step(x, d), [1.05, -1.9, 0.35], rtol=1e-6)


def test_fedavgm_by_hand() -> None:
    opt = S.FedAvgM(2, lr=1.0, momentum=0.5)
    x = np.zeros(2, np.float32)
    d1, d2 = np.array([1.0, -1.0], np.float32), np.array([2.0, 0.0], np.float32)
    x = opt.step(x, d1)  # m = d1
    np.testing.assert_allclose(x, [1.0, -1.0])
    x = opt.step(x, d2)  # m = 0.5*d1 + d2 = [2.5, -0.5]
    np.testing.assert_allclose(x, [3.5, -1.5])


def test_fedadam_by_hand() -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = S.FedAdam(2, lr=lr, beta1=b1, beta2=b2, tau=tau)
    x = np.array([1.0, 1.0], np.float32)
    m, v, xr = np.zeros(2), np.full(2, tau**2), x.astype(np.float64)
    for d in ([0.5, -0.2], [0.1, 0.3]):
        dd = np.array(d)
        m = b1 * m + (1 - b1) * dd
        v = b2 * v + (1 - b2) * dd**2
        xr = xr + lr * m / (np.sqrt(v) + tau)
        x = opt.step(x, np.array(d, np.float32))
        np.testing.assert_allclose(x, xr, rtol=1e-5)


def test_fedyogi_by_hand() -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = S.FedYogi(2, lr=lr, beta1=b1, beta2=b2, tau=tau)
    x = np.zeros(2, np.float32)
    m, v, xr = np.zeros(2), np.full(2, tau**2), np.zeros(2)
    for d in ([0.5, -0.2], [0.1, 0.3], [0.0, 0.0]):
        dd = np.array(d)
        m = b1 * m + (1 - b1) * dd
        v = v - (1 - b2) * dd**2 * np.sign(v - dd**2)
        xr = xr + lr * m / (np.sqrt(v) + tau)
        x = opt.step(x, np.array(d, np.float32))
        np.testing.assert_allclose(x, xr, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(S.SERVER_OPTIMIZERS))
def test_optimizer_state_round_trip_continues_identically(name: str, tmp_path) -> None:
    n = 50
    rng = np.random.default_rng(2)
    deltas = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    a = S.make_server_optimizer(name, n, lr=0.05)
    x = np.zeros(n, np.float32)
    for d in deltas[:2]:
        x = a.step(x, d)
    np.savez(tmp_path / "opt.npz", **a.state_arrays())
    b = S.make_server_optimizer(name, n, lr=0.05)
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as z:
        b.load_state_arrays({k: z[k] for k in z.files})
    xa, xb = x, x.copy()
    for d in deltas[2:]:
        xa, xb = a.step(xa, d), b.step(xb, d)
    np.testing.assert_array_equal(xa, xb)
    assert a.steps == b.steps == 4


def test_optimizer_validation() -> None:
    with pytest.raises(ValueError):
        S.make_server_optimizer("sgd", 3)
    with pytest.raises(ValueError):
        S.make_server_optimizer("fedadam", 3, nonsense=1.0)
    with pytest.raises(ValueError):
        S.FedAvgM(3, momentum=1.0)
    with pytest.raises(ValueError):
        S.FedAdam(3, tau=0.0)
    with pytest.raises(ValueError):
        S.FedAvg(3).step(np.zeros(3, np.float32), np.array([np.nan, 0, 0], np.float32))
    opt = S.FedAdam(3)
    with pytest.raises(ValueError):
        opt.load_state_arrays({"steps": np.array([1]), "m": np.zeros(3, np.float32),
                               "v": np.full(3, -1.0, np.float32)})
    with pytest.raises(ValueError):
        opt.load_state_arrays({"steps": np.array([1]), "m": np.zeros(4, np.float32),
                               "v": np.zeros(3, np.float32)})


def test_staleness_weight() -> None:
    assert S.staleness_weight(0, 0.5) == 1.0
    assert S.staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert S.staleness_weight(1, 1.0) == pytest.approx(0.5)
    assert S.staleness_weight(5, 0.0) == 1.0
    with pytest.raises(ValueError):
        S.staleness_weight(-1, 0.5)
    with pytest.raises(ValueError):
        S.staleness_weight(1, -0.5)


def test_norm_bound() -> None:
    clip, reject = S.NormBound(2.0, "clip"), S.NormBound(2.0, "reject")
    assert clip.scale_for(1.0) == 1.0 and clip.scale_for(8.0) == 0.25
    assert reject.scale_for(1.5) == 1.0 and reject.scale_for(2.5) is None
    assert clip.scale_for(float("inf")) is None
    with pytest.raises(ValueError):
        S.NormBound(0.0)
    with pytest.raises(ValueError):
        S.NormBound(1.0, "shrink")
