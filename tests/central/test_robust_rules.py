"""Byzantine-robust rules at close (``robust_rule``): coordinate-wise median, trimmed mean, multi-Krum —
by hand, with sparse top-k updates, and through the core against sign-flipped and scaled liars."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft_edge.central import core as R
from fedpeft_edge.central import robust_rules as RR
from fedpeft_edge.central.robust import BufferedUpdate
from fedpeft_edge.gateway.config import load_gateway_config
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.encoder import UpdateEncoder

N = 1000
SPEC = "0123abcd" * 4
FLEET = "robust"


def _cfg(**kw: object) -> R.AggregatorConfig:
    base: dict[str, object] = {
        "fleet": FLEET,
        "n_params": N,
        "spec_hash": SPEC,
        "min_clients": 1,
        "quorum": 100,
        "max_rounds": None,
    }
    base.update(kw)
    return R.AggregatorConfig(**base)  # type: ignore[arg-type]


def test_median_and_trimmed_mean_by_hand() -> None:
    rows = np.array([[1, 10, -3], [2, 20, 0], [3, -1000, 3], [4, 30, 6], [1000, 40, 9]], np.float32)
    np.testing.assert_array_equal(RR.median(rows), [3, 20, 3])
    np.testing.assert_allclose(RR.trimmed_mean(rows, 0.2), [3, 20, 3])  # drops one value at each end
    np.testing.assert_allclose(RR.trimmed_mean(rows, 0.0), rows.mean(axis=0), rtol=1e-6)
    with pytest.raises(InvalidValueError):
        RR.trimmed_mean(rows[:2], 0.5)  # one from each end of two: nothing left


def test_multi_krum_keeps_the_central_rows() -> None:
    rng = np.random.default_rng(0)
    honest = rng.standard_normal((6, 50)).astype(np.float32) * 0.1 + 1.0
    rows = np.vstack([honest, -10 * honest[:1], honest[1:2] * 50])
    mean, chosen = RR.multi_krum(rows, [1.0] * 8, byzantine=2, select=0)
    assert chosen == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose(mean, honest.mean(axis=0), rtol=1e-5)
    scores = RR.krum_scores(rows, 2)
    assert scores[6] > scores[:6].max() and scores[7] > scores[:6].max()


def test_a_sparse_update_gives_the_row_of_its_dense_form() -> None:
    delta = np.random.default_rng(3).standard_normal(N).astype(np.float32)
    sparse = UpdateEncoder(CodecConfig(mode="topk_fp32", topk_ratio=0.05), N).encode(delta)
    dense = C.encode_global(C.decode_dense(sparse, N), "fp32")
    entries = [
        BufferedUpdate("a", 0, sparse, 10, 1.0, 10.0, 1.0, 1.0),
        BufferedUpdate("b", 0, dense, 10, 1.0, 10.0, 1.0, 1.0),
    ]
    rows = RR._rows(entries, [0.5, 0.5], [2.0, 2.0], N)
    np.testing.assert_array_equal(rows[0], rows[1])
    assert np.count_nonzero(rows[0]) == 50  # not-sent coordinates are zeros of the update, not gaps


def _round(rule: str, liars: dict[str, float], **kw: object) -> tuple[np.ndarray, dict, np.ndarray]:
    """5 honest sites around one direction + liars sending ``factor × honest``; top-k 10 % + int8."""
    rng = np.random.default_rng(11)
    direction = rng.standard_normal(N).astype(np.float32) * np.float32(0.01)
    core = R.AggregatorCore(_cfg(robust_rule=rule, **kw))
    honest = []
    for i in range(5):
        d = direction + rng.standard_normal(N).astype(np.float32) * np.float32(0.002)
        honest.append(d)
        enc = UpdateEncoder(CodecConfig(mode="topk_int8", topk_ratio=0.1), N, seed=i).encode(d)
        assert core.offer(W.UpdateMessage(FLEET, 0, f"site-{i}", SPEC, 100, {"loss": 1.0}, enc)).accepted
    for name, factor in liars.items():
        enc = UpdateEncoder(CodecConfig(mode="topk_int8", topk_ratio=0.1), N).encode(
            direction * np.float32(factor)
        )
        assert core.offer(W.UpdateMessage(FLEET, 0, name, SPEC, 100, {"loss": 1.0}, enc)).accepted
    new, metrics = core.close_round()
    return new, metrics, direction


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


OFF = {"norm_median_multiplier": 0.0, "norm_reject_multiplier": 0.0, "samples_median_multiplier": 0.0}


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "multi_krum"])
def test_two_sign_flipping_liars_do_not_turn_the_round(rule: str) -> None:
    liars = {"mallory": -10.0, "trudy": -10.0}
    plain, _, direction = _round("none", liars, **OFF)
    assert _cos(plain, direction) < 0  # plain FedAvg with every bound off: the liars win
    robust, metrics, _ = _round(rule, liars, krum_byzantine=2, trim_fraction=0.3, **OFF)
    assert _cos(robust, direction) > 0.5, metrics
    assert metrics["robust_rule"] == rule and metrics["robust_rows"] == 7
    if rule == "multi_krum":
        assert "mallory" not in metrics["krum_selected"] and "trudy" not in metrics["krum_selected"]
        assert metrics["krum_guarantee"] is True


def test_rules_follow_the_round_buffer_and_say_when_they_cannot_run() -> None:
    cfg = _cfg(robust_rule="median", **OFF)
    assert cfg.buffers_updates  # a rule needs every update of the round at close
    with pytest.raises(InvalidValueError):
        _cfg(robust_rule="mean-ish")
    with pytest.raises(InvalidValueError):
        _cfg(trim_fraction=0.5)
    with pytest.raises(InvalidValueError):
        _cfg(krum_byzantine=-1)
    with pytest.raises(InvalidValueError, match="robust_rule"):
        load_gateway_config(text='[gateway]\nrobust_rule = "median"\n')
