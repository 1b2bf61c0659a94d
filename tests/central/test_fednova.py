"""FedNova aggregation (``aggregation = "fednova"``): each update divided by its local steps τ_i, the mean
multiplied back by τ_eff = Σ p_i·τ_i / Σ p_i — on hand-made updates, across a reload mid-round, through
the close-time bounds of the round buffer (central/robust.py), and in the settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.central import core as R
from fedpeft_edge.central.accumulator import RoundAccumulator
from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.robust import MAX_CLAIMED_STEPS, claimed_steps
from fedpeft_edge.central.store import STATE_FILE, RoundState, StateError
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import wire as W

N = 2000
SPEC = "feed0000" * 4
FLEET = "nova"
OFF = {"norm_median_multiplier": 0, "norm_reject_multiplier": 0, "samples_median_multiplier": 0,
       "steps_median_multiplier": 0}


def _config(**kw: object) -> R.AggregatorConfig:
    base: dict[str, object] = {"fleet": FLEET, "n_params": N, "spec_hash": SPEC, "min_clients": 1,
                               "quorum": 100, "max_rounds": None}
    base.update(kw)
    return R.AggregatorConfig(**base)  # type: ignore[arg-type]


def _step(seed: int) -> np.ndarray:
    """One local step's worth of movement (about unit norm)."""
    return (np.random.default_rng(seed).standard_normal(N) / np.sqrt(N)).astype(np.float32)


def _msg(client: str, delta: np.ndarray, steps: float | None, *, samples: int = 100, rnd: int = 0,
         loss: float = 1.0) -> W.UpdateMessage:
    metrics = {"loss": loss} if steps is None else {"loss": loss, "steps": float(steps)}
    return W.UpdateMessage(FLEET, rnd, client, SPEC, samples, metrics, C.encode_global(delta, "fp32"))


def _fednova(deltas: list[np.ndarray], taus: list[float], weights: list[float]) -> np.ndarray:
    """Wang et al. 2020 with vanilla weights p_i: τ_eff · Σ p_i·Δ_i/τ_i / Σ p_i."""
    p = np.asarray(weights, np.float64)
    tau_eff = float(np.dot(p, taus) / p.sum())
    d = sum(w * dl.astype(np.float64) / t for w, dl, t in zip(weights, deltas, taus, strict=True))
    return tau_eff * d / p.sum()


def _heterogeneous(rnd: int = 0) -> tuple[list[W.UpdateMessage], list[np.ndarray], list[float], list[int]]:
    """Three sites doing 12 steps, one doing 3 (a 4× slower CPU in the same time budget)."""
    taus = [12.0, 12.0, 12.0, 3.0]
    samples = [100, 80, 100, 60]  # at most the median claim: the default weight cap does not bind
    deltas = [(t * _step(10 * rnd + i)).astype(np.float32) for i, t in enumerate(taus)]
    msgs = [_msg(f"s{i}", d, t, samples=s, rnd=rnd) for i, (d, t, s) in enumerate(zip(deltas, taus, samples,
                                                                                        strict=True))]
    return msgs, deltas, taus, [float(s) for s in samples]


# ---- the maths ---------------------------------------------------------------------------------------


def test_accumulator_normalises_and_multiplies_back() -> None:
    rng = np.random.default_rng(0)
    vecs = [rng.standard_normal(N).astype(np.float32) for _ in range(3)]
    acc = RoundAccumulator(N)
    for v, w, t in zip(vecs, (1.0, 2.0, 3.0), (4.0, 8.0, 2.0), strict=True):
        acc.accumulate(C.encode_global(v, "fp32"), w, 1.0, t)
    assert acc.steps_weight == 1 * 4 + 2 * 8 + 3 * 2 and acc.effective_steps == pytest.approx(26 / 6)
    np.testing.assert_allclose(acc.normalised_mean(), _fednova(vecs, [4, 8, 2], [1, 2, 3]), rtol=1e-5,
                               atol=1e-6)
    # the running state survives its own arrays; the older two-number meta means τ_i = 1 throughout
    again = RoundAccumulator(N)
    again.load_state_arrays(acc.state_arrays())
    assert again.steps_weight == acc.steps_weight
    old = {"sum": acc.sum.copy(), "meta": np.array([6.0, 3.0])}
    again.load_state_arrays(old)
    assert again.steps_weight == 6.0 and again.effective_steps == 1.0
    with pytest.raises(ValueError):
        acc.accumulate(C.encode_global(vecs[0], "fp32"), 1.0, 1.0, 0.0)


@pytest.mark.parametrize("bounds", ["off", "default"])
def test_equal_steps_is_fedavg(bounds: str) -> None:
    extra = OFF if bounds == "off" else {}
    nova = R.AggregatorCore(_config(aggregation="fednova", **extra))
    avg = R.AggregatorCore(_config(**extra))
    deltas = [(12 * _step(i)).astype(np.float32) for i in range(4)]
    for i, d in enumerate(deltas):
        assert nova.offer(_msg(f"s{i}", d, 12, samples=50 + 10 * i)).accepted
        assert avg.offer(_msg(f"s{i}", d, 12, samples=50 + 10 * i)).accepted
    g_nova, m_nova = nova.close_round()
    g_avg, m_avg = avg.close_round()
    np.testing.assert_allclose(g_nova, g_avg, rtol=1e-6, atol=1e-7)  # float32 rounding of the 1/τ
    assert m_nova["effective_steps"] == 12.0 and m_nova["aggregation"] == "fednova"
    assert "effective_steps" not in m_avg and m_nova["total_weight"] == m_avg["total_weight"]


@pytest.mark.parametrize("bounds", ["off", "default"])
def test_unequal_steps_give_the_normalised_aggregate(bounds: str) -> None:
    """A slow site's 3 steps weigh per step as much as the others' 12; FedAvg would shrink its say."""
    extra = OFF if bounds == "off" else {}
    msgs, deltas, taus, weights = _heterogeneous()
    nova = R.AggregatorCore(_config(aggregation="fednova", **extra))
    avg = R.AggregatorCore(_config(**extra))
    for m in msgs:
        assert nova.offer(m).accepted and avg.offer(m).accepted
    g, metrics = nova.close_round()
    expect = _fednova(deltas, taus, weights)
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-6)
    assert metrics["effective_steps"] == pytest.approx(np.dot(weights, taus) / sum(weights))
    if bounds == "default":  # per-step norms are alike: no bound binds, the running sum is the answer
        assert metrics["adaptive"] and metrics["adaptive_clipped"] == metrics["steps_capped"] == 0
    g_avg, _ = avg.close_round()
    fedavg = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    np.testing.assert_allclose(g_avg, fedavg, rtol=1e-5, atol=1e-6)
    assert not np.allclose(g, g_avg, rtol=1e-2)  # the two rules really differ here
    # the slow site's share of the aggregate grows from p_i·Δ_i to p_i·(τ_eff/τ_i)·Δ_i
    slow = deltas[3].astype(np.float64) / np.linalg.norm(deltas[3])
    assert np.dot(g, slow) > np.dot(g_avg, slow)


def test_claimed_steps_validation() -> None:
    assert claimed_steps({"steps": 12.0}) == 12.0 and claimed_steps({"steps": 2.5}) == 2.5
    for bad in ({}, {"steps": 0.0}, {"steps": 0.5}, {"steps": float("nan")}, {"steps": float("inf")},
                {"steps": MAX_CLAIMED_STEPS + 1.0}, {"steps": -3.0}):
        assert claimed_steps(bad) is None, bad


# ---- close-time: the round buffer --------------------------------------------------------------------


def test_missing_steps_take_the_round_median() -> None:
    msgs, deltas, taus, weights = _heterogeneous()
    msgs[1] = _msg("s1", deltas[1], None, samples=80)  # an old client: no steps metric
    core = R.AggregatorCore(_config(aggregation="fednova", **OFF))  # FedNova buffers even with bounds off
    for m in msgs:
        assert core.offer(m).accepted
    assert len(core.buffered) == 4 and core.buffered[1].steps == 1.0  # provisional in the running sum
    g, metrics = core.close_round()
    assert metrics["steps_substituted"] == 1 and metrics["steps_median"] == 12.0  # upper median of 12,12,3
    np.testing.assert_allclose(g, _fednova(deltas, taus, weights), rtol=1e-5, atol=1e-6)
    # no valid claim at all: every update counts as one step, which is FedAvg
    core = R.AggregatorCore(_config(aggregation="fednova", **OFF))
    for i, d in enumerate(deltas):
        core.offer(_msg(f"s{i}", d, None, samples=int(weights[i])))
    g, metrics = core.close_round()
    assert metrics["steps_substituted"] == 4 and metrics["effective_steps"] == 1.0
    fedavg = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    np.testing.assert_allclose(g, fedavg, rtol=1e-5, atol=1e-6)


def test_lying_step_claims_are_bounded() -> None:
    """Claiming 10^5 steps would multiply τ_eff (the whole round's step): the claim is capped at 2 × the
    median. Claiming too few makes the normalised update large: the adaptive norm bound, on normalised
    norms, clips it to 2 × their median."""
    honest = [(10 * _step(i)).astype(np.float32) for i in range(3)]
    core = R.AggregatorCore(_config(aggregation="fednova"))
    for i, d in enumerate(honest):
        core.offer(_msg(f"s{i}", d, 10))
    liar = (10 * _step(9)).astype(np.float32)
    core.offer(_msg("liar", liar, 10**5))
    g, metrics = core.close_round()
    assert metrics["steps_cap"] == 20.0 and metrics["steps_capped"] == 1
    expect = _fednova([*honest, liar], [10, 10, 10, 20], [100] * 4)
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-6)
    assert metrics["effective_steps"] == pytest.approx(12.5)
    unbounded = R.AggregatorCore(_config(aggregation="fednova", steps_median_multiplier=0))
    for i, d in enumerate([*honest, liar]):
        unbounded.offer(_msg(f"s{i}", d, 10 if i < 3 else 10**5))
    g_unbounded, _ = unbounded.close_round()
    assert np.linalg.norm(g_unbounded) > 1000 * np.linalg.norm(g)  # what the cap prevents

    few = R.AggregatorCore(_config(aggregation="fednova"))
    for i, d in enumerate(honest):
        few.offer(_msg(f"s{i}", d, 10))
    few.offer(_msg("liar", liar, 2))  # normalised norm 5× the others
    g, metrics = few.close_round()
    norms = [float(np.linalg.norm(d.astype(np.float64))) / t for d, t in zip([*honest, liar], [10, 10, 10, 2],
                                                                              strict=True)]
    cap = 2 * sorted(norms)[1]
    assert metrics["adaptive_clipped"] == 1 and metrics["norm_cap"] == pytest.approx(cap, rel=1e-5)
    d = [h.astype(np.float64) / 10 for h in honest] + [liar.astype(np.float64) / 2 * cap / norms[3]]
    expect = (10 * 3 + 2) / 4 * sum(d) / 4
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-6)


def test_huge_finite_update_cannot_overflow_the_aggregate() -> None:
    """τ_eff can multiply the mean of the d_i by up to MAX_CLAIMED_STEPS: an update whose norm would then
    leave float32 is refused at offer time (it would otherwise wedge the round at close)."""
    huge = np.full(N, 1e30, np.float32)
    nova = R.AggregatorCore(_config(aggregation="fednova", **OFF))
    d = nova.offer(_msg("big", huge, 1))
    assert d.status == R.REJECTED and d.reason == "overflow"
    assert R.AggregatorCore(_config(**OFF)).offer(_msg("big", huge, 1)).accepted  # FedAvg's bound is looser
    nova.offer(_msg("a", 10 * _step(1), 10**6))
    nova.offer(_msg("b", (1e20 * _step(2)).astype(np.float32), 1))
    g, metrics = nova.close_round()
    assert np.isfinite(g).all() and metrics["effective_steps"] == pytest.approx((10**6 + 1) / 2)


# ---- persistence -------------------------------------------------------------------------------------


def test_reload_mid_round_counts_each_update_once(tmp_path: Path) -> None:
    """A core rebuilt from disk after every offer (kill -9 + restart) ends exactly where one that never
    stopped does; the steps total is in the state file; a redelivery is still a duplicate."""
    cfg = _config(aggregation="fednova")
    steady = R.AggregatorCore(cfg, now=0.0)
    path = tmp_path / "agg"
    restarted = R.AggregatorCore(cfg, path, now=0.0)
    for rnd in range(2):
        msgs, deltas, taus, weights = _heterogeneous(rnd)
        msgs.append(_msg("nosteps", deltas[0], None, rnd=rnd))  # exercises the close-time plan
        for m in msgs:
            assert steady.offer(m, now=1.0).accepted and restarted.offer(m, now=1.0).accepted
            restarted = R.AggregatorCore(cfg, path)
            assert restarted.offer(m).status == R.DUPLICATE
        state = RoundState.load(path)
        assert state is not None and state.acc_steps_weight == pytest.approx(
            np.dot(weights, taus) + 100 * 1.0)  # the provisional τ = 1 of the update without steps
        g1, m1 = steady.close_round(now=2.0)
        g2, m2 = restarted.close_round(now=2.0)
        np.testing.assert_array_equal(g1, g2)
        assert m1 == m2 and m1["steps_substituted"] == 1
        restarted = R.AggregatorCore(cfg, path)
        assert RoundState.load(path).acc_steps_weight == 0.0  # type: ignore[union-attr]
    counters = restarted.counters
    assert counters.pop("duplicate") == 10 and counters == steady.counters


def _to_format_2(path: Path) -> None:
    """Rewrite the state file as the code before FedNova wrote it (no steps total, no per-update τ)."""
    with np.load(path / STATE_FILE, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta_json"]).decode())
    meta["format"] = 2
    del meta["acc_steps_weight"]
    for e in meta["buffer"]:
        del e["steps"]
    arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path / STATE_FILE, "wb") as fh:
        np.savez(fh, **arrays)


def test_damaged_steps_in_the_buffer_are_refused(tmp_path: Path) -> None:
    core = R.AggregatorCore(_config(aggregation="fednova"), tmp_path)
    core.offer(_heterogeneous()[0][0])
    with np.load(tmp_path / STATE_FILE, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta_json"]).decode())
    meta["buffer"][0]["steps"] = 0.0
    arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(tmp_path / STATE_FILE, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(StateError, match="steps"):
        R.AggregatorCore(_config(aggregation="fednova"), tmp_path)


def test_format_2_state_loads_and_can_switch_to_fednova_mid_round(tmp_path: Path) -> None:
    msgs, deltas, taus, weights = _heterogeneous()
    core = R.AggregatorCore(_config(), tmp_path)  # FedAvg, default bounds: the round is buffered
    for m in msgs[:2]:
        core.offer(m)
    _to_format_2(tmp_path)
    state = RoundState.load(tmp_path)
    assert state is not None and state.acc_steps_weight == state.acc_total_weight == 180.0
    assert [e.steps for e in state.buffer] == [1.0, 1.0]
    same = R.AggregatorCore(_config(), tmp_path)
    for m in msgs[2:]:
        same.offer(m)
    g, _ = same.close_round()
    fedavg = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    np.testing.assert_allclose(g, fedavg, rtol=1e-5, atol=1e-6)

    # the operator switches to FedNova while a round is open: its buffer holds every update, so the
    # close re-aggregates all of them by their claims (the running sum counted the first two as τ = 1)
    other = tmp_path / "switch"
    core = R.AggregatorCore(_config(), other)
    for m in msgs[:2]:
        core.offer(m)
    _to_format_2(other)
    nova = R.AggregatorCore(_config(aggregation="fednova"), other)
    for m in msgs[2:]:
        nova.offer(m)
    g, metrics = nova.close_round()
    np.testing.assert_allclose(g, _fednova(deltas, taus, weights), rtol=1e-5, atol=1e-6)
    assert metrics["adaptive"]


# ---- settings ----------------------------------------------------------------------------------------


def test_policy_validation_and_toml() -> None:
    for bad in ({"aggregation": "fedprox"}, {"aggregation": ""}, {"steps_median_multiplier": 0.5},
                {"steps_median_multiplier": float("inf")}, {"steps_median_multiplier": True}):
        with pytest.raises(ValueError):
            _config(**bad)
    assert _config(aggregation="fednova", **OFF).buffers_updates  # τ is decided at close
    assert not _config(**OFF).buffers_updates and _config().aggregation == "fedavg"
    cfg = load_aggregator_config(text='[aggregator]\naggregation = "fednova"\nsteps_median_multiplier = 3\n')
    policy = cfg.aggregator.policy
    assert policy.aggregation == "fednova" and policy.steps_median_multiplier == 3
    bound = R.AggregatorConfig.for_fleet(policy, fleet=FLEET, n_params=N, spec_hash=SPEC)  # as the service
    assert bound.aggregation == "fednova" and bound.buffers_updates
    with pytest.raises(ValueError, match="aggregation"):
        load_aggregator_config(text='[aggregator]\naggregation = "nova"\n')
