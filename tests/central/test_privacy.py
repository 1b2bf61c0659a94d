"""Differential privacy, the parts without a round: the [privacy] table, the accountant (against known
values of the Gaussian mechanism), noise calibration, adaptive clipping and a site's clip + noise."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.central import core as R
from fedpeft_edge.central import privacy as DP
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.protocol.privacy import PrivacyPolicy
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.privacy import SiteNoise


def test_the_table_refuses_what_cannot_give_privacy() -> None:
    for bad in (
        {"mode": "local"},
        {"clip_norm": 0},
        {"noise_multiplier": -1},
        {"delta": 1.0},
        {"sampling_rate": 0.0},
        {"target_quantile": 1.0},
        {"expected_sites": 0},
        {"mode": "distributed", "adaptive_clip": True},
        {"mode": "central", "noise_multiplier": 0, "epsilon_budget": 1.0},
        {"accountant": "moments"},
    ):
        with pytest.raises(InvalidValueError):
            PrivacyPolicy(**bad)  # type: ignore[arg-type]
    assert not PrivacyPolicy().enabled and PrivacyPolicy(mode="central").enabled


@pytest.mark.slow  # pays the accountant's import (scipy): about 2 s
def test_accountant_grows_with_rounds_and_shrinks_with_noise() -> None:
    e1 = DP.epsilon_of([1.0], sampling_rate=1.0, delta=1e-5)
    e10 = DP.epsilon_of([1.0] * 10, sampling_rate=1.0, delta=1e-5)
    e10_quiet = DP.epsilon_of([4.0] * 10, sampling_rate=1.0, delta=1e-5)
    e10_sampled = DP.epsilon_of([1.0] * 10, sampling_rate=0.1, delta=1e-5)
    assert e1 < e10 and e10_quiet < e10 and e10_sampled < e10
    assert DP.epsilon_of([], sampling_rate=1.0, delta=1e-5) == 0.0
    assert DP.epsilon_of([0.0], sampling_rate=1.0, delta=1e-5) == math.inf


@pytest.mark.slow
def test_pld_is_tighter_than_rdp_around_the_known_value() -> None:
    # one Gaussian mechanism with z = 1 at δ = 1e-5: the analytic Gaussian mechanism gives ε ≈ 4.4; RDP
    # (an upper bound) a little more, PLD (numerically near exact) tighter than RDP
    rdp = DP.epsilon_of([1.0], sampling_rate=1.0, delta=1e-5)
    pld = DP.epsilon_of([1.0], sampling_rate=1.0, delta=1e-5, accountant="pld")
    assert 4.0 < pld <= rdp < 6.0


@pytest.mark.parametrize("eps", [1.0, 4.0, 8.0])
def test_calibrated_noise_meets_the_budget_and_barely(eps: float) -> None:
    z = DP.calibrate_noise(eps, rounds=10, delta=1e-5)
    assert DP.epsilon_of([z] * 10, sampling_rate=1.0, delta=1e-5) <= eps
    assert DP.epsilon_of([z * 0.97] * 10, sampling_rate=1.0, delta=1e-5) > eps


def test_round_multiplier_per_mode() -> None:
    assert PrivacyPolicy(mode="central", noise_multiplier=2.0).round_multiplier(8) == 2.0
    # adaptive clipping pays for the noised count (Andrew et al., Theorem 1)
    adaptive = PrivacyPolicy(mode="central", noise_multiplier=2.0, adaptive_clip=True, clip_count_stddev=4.0)
    assert adaptive.round_multiplier(8) == pytest.approx((2.0**-2 - 8.0**-2) ** -0.5)
    with pytest.raises(InvalidValueError, match="too small"):
        PrivacyPolicy(
            mode="central", noise_multiplier=2.0, adaptive_clip=True, clip_count_stddev=0.5
        ).round_multiplier(8)
    # distributed: fewer sites than expected sum to less noise
    dist = PrivacyPolicy(mode="distributed", noise_multiplier=2.0, expected_sites=8)
    assert dist.round_multiplier(8) == pytest.approx(2.0)
    assert dist.round_multiplier(2) == pytest.approx(1.0)
    assert dist.site_noise_std() == pytest.approx(2.0 * 0.1 / math.sqrt(8))


def test_adaptive_clip_moves_toward_the_target_quantile() -> None:
    policy = PrivacyPolicy(
        mode="central", adaptive_clip=True, target_quantile=0.5, clip_lr=0.2, clip_count_stddev=1e-9
    )
    rng = np.random.default_rng(0)
    norms = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    c = 0.1
    for _ in range(60):
        c, frac = DP.adapted_clip(c, norms, policy, rng)
    assert 1.5 <= c <= 2.5  # the median of the norms
    up, frac = DP.adapted_clip(0.1, norms, policy, rng)
    assert frac == pytest.approx(0.0, abs=1e-6) and up == pytest.approx(0.1 * math.exp(0.2 * 0.5))


def test_a_site_clips_with_the_c_core_and_adds_its_share_of_noise() -> None:
    policy = PrivacyPolicy(mode="distributed", clip_norm=1.0, noise_multiplier=0.0, expected_sites=4)
    big = np.full(10_000, 0.1, np.float32)  # norm 10
    out = SiteNoise(policy).apply(big)
    assert np.linalg.norm(out) == pytest.approx(1.0, rel=1e-5) and big[0] == np.float32(
        0.1
    )  # input untouched
    noisy = SiteNoise(
        PrivacyPolicy(mode="distributed", clip_norm=1.0, noise_multiplier=2.0, expected_sites=4),
        np.random.default_rng(1),
    ).apply(np.zeros(100_000, np.float32))
    assert float(np.std(noisy)) == pytest.approx(2.0 * 1.0 / 2.0, rel=0.02)
    with pytest.raises(InvalidValueError):
        SiteNoise(PrivacyPolicy(mode="central"))


# --- through the core -------------------------------------------------------------------------------

N = 20_000
SPEC = "d1ff00aa" * 4


def _core(privacy: PrivacyPolicy, state_dir: Path | None = None, **kw: object) -> R.AggregatorCore:
    base: dict[str, object] = {
        "fleet": "dp",
        "n_params": N,
        "spec_hash": SPEC,
        "min_clients": 1,
        "quorum": 4,
        "max_rounds": 50,
        "privacy": privacy,
    }
    base.update(kw)
    return R.AggregatorCore(R.AggregatorConfig(**base), state_dir)  # type: ignore[arg-type]


def _offer(core: R.AggregatorCore, site: str, delta: np.ndarray, samples: int = 100) -> None:
    msg = W.UpdateMessage(
        "dp", core.round, site, SPEC, samples, {"loss": 1.0}, C.encode_global(delta, "fp32")
    )
    assert core.offer(msg).accepted


def _deltas(scale: list[float]) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    out = []
    for s in scale:
        v = rng.standard_normal(N).astype(np.float32)
        out.append(v / np.float32(np.linalg.norm(v)) * np.float32(s))  # norm exactly s
    return out


def test_central_dp_clips_each_site_to_c_weights_them_equally_and_adds_calibrated_noise() -> None:
    deltas = _deltas([0.5, 1.0, 4.0, 10.0])
    quiet = _core(PrivacyPolicy(mode="central", clip_norm=1.0, noise_multiplier=0.0))
    for i, (d, n) in enumerate(zip(deltas, [10, 100, 1000, 10_000], strict=True)):
        _offer(quiet, f"s{i}", d, samples=n)  # claimed samples must not matter under DP
    g, metrics = quiet.close_round()
    want = (deltas[0] + deltas[1] + deltas[2] / 4 + deltas[3] / 10) / 4
    np.testing.assert_allclose(g, want, atol=1e-6)
    assert metrics["dp_clipped"] == 2 and metrics["epsilon"] is None and metrics["dp_mode"] == "central"
    assert "norm_median" not in metrics  # the median-relative bounds are off: their figures are not private
    noisy = _core(PrivacyPolicy(mode="central", clip_norm=1.0, noise_multiplier=2.0))
    for i, d in enumerate(deltas):
        _offer(noisy, f"s{i}", d)
    g2, m2 = noisy.close_round()
    # the noise on the mean: N(0, (z·C/m)^2) per coordinate
    assert float(np.std(g2 - want)) == pytest.approx(2.0 * 1.0 / 4, rel=0.03)
    assert m2["noise_multiplier"] == 2.0
    assert m2["epsilon"] == pytest.approx(DP.epsilon_of([2.0], sampling_rate=1.0, delta=1e-5))


def test_no_noise_is_saved_as_no_epsilon(tmp_path: Path) -> None:
    core = _core(PrivacyPolicy(mode="central", clip_norm=1.0, noise_multiplier=0.0), tmp_path)
    for i, d in enumerate(_deltas([0.5] * 4)):
        _offer(core, f"s{i}", d)
    _, m = core.close_round()  # persisted: strict JSON must hold the round's metrics
    assert m["epsilon"] is None and core.round == 1


def test_the_budget_stops_the_federation_and_survives_a_restart(tmp_path: Path) -> None:
    policy = PrivacyPolicy(mode="central", clip_norm=1.0, noise_multiplier=2.0, epsilon_budget=5.0)
    core = _core(policy, tmp_path)
    eps = []
    while not core.finished:
        for i, d in enumerate(_deltas([0.5] * 4)):
            _offer(core, f"s{i}", d)
        _, m = core.close_round()
        eps.append(m["epsilon"])
        assert core.round < 50, "the budget never stopped the federation"
    assert eps[-1] <= 5.0 and core.privacy_exhausted
    assert DP.epsilon_of([2.0] * (len(eps) + 1), sampling_rate=1.0, delta=1e-5) > 5.0  # one more would exceed
    assert core.global_message().meta["final"] is True
    resumed = _core(policy, tmp_path)
    assert resumed.finished and resumed.privacy_ledger["multipliers"] == [2.0] * len(eps)


def test_adaptive_clip_follows_the_norms_and_is_persisted(tmp_path: Path) -> None:
    # little noise on the count (2σ_b > z still holds), so the walk of C is nearly deterministic
    policy = PrivacyPolicy(
        mode="central",
        clip_norm=0.01,
        noise_multiplier=0.1,
        adaptive_clip=True,
        clip_count_stddev=0.06,
        clip_lr=0.5,
    )
    core = _core(policy, tmp_path)
    clips = []
    for _ in range(8):
        for i, d in enumerate(_deltas([1.0, 1.0, 1.0, 1.0])):
            _offer(core, f"s{i}", d)
        _, m = core.close_round()
        clips.append(m["clip_norm"])
    assert clips[-1] > clips[0] * 5  # every norm (1.0) is above C: C grows toward them
    assert _core(policy, tmp_path).privacy_ledger["clip"] > clips[-1]  # the next round's C, reloaded


def test_distributed_dp_weights_equally_and_accounts_the_sites_that_came() -> None:
    policy = PrivacyPolicy(mode="distributed", clip_norm=1.0, noise_multiplier=2.0, expected_sites=4)
    core = _core(
        policy, norm_median_multiplier=0.0, samples_median_multiplier=0.0, norm_reject_multiplier=0.0
    )
    deltas = _deltas([1.0, 1.0])
    _offer(core, "a", deltas[0], samples=10)
    _offer(core, "b", deltas[1], samples=1000)
    g, m = core.close_round()
    np.testing.assert_allclose(g, (deltas[0] + deltas[1]) / 2, atol=1e-6)  # no server noise, equal weights
    assert m["noise_multiplier"] == pytest.approx(2.0 * math.sqrt(2 / 4))  # half the expected sites came


def test_privacy_refuses_what_would_break_its_bound() -> None:
    for kw in ({"aggregation": "fednova"}, {"robust_rule": "median"}, {"gateways": ("gw",)}):
        with pytest.raises(InvalidValueError, match="privacy"):
            _core(PrivacyPolicy(mode="central"), **kw)
