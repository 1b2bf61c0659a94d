"""Close-time defences (central/robust.py) through the core: adaptive norm bound, weight cap, the round
buffer and its persistence, on dense and sparse (top-k) updates."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.central import core as R
from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.robust import BufferedUpdate, lower_median, plan_round, upper_median
from fedpeft_edge.central.store import STATE_FILE, RoundState, StateError
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.site.encoder import UpdateEncoder

N = 3000
SPEC = "c0ffee00" * 4
FLEET = "robust"
OFF = {"norm_median_multiplier": 0, "samples_median_multiplier": 0}


def _config(**kw: object) -> R.AggregatorConfig:
    base: dict[str, object] = {"fleet": FLEET, "n_params": N, "spec_hash": SPEC, "min_clients": 1,
                               "quorum": 100, "max_rounds": None}
    base.update(kw)
    return R.AggregatorConfig(**base)  # type: ignore[arg-type]


def _vec(seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(N)).astype(np.float32)


def _enc(vec: np.ndarray, mode: str = "topk_int8") -> C.EncodedUpdate:
    return UpdateEncoder(C.CodecConfig(mode=mode, topk_ratio=0.05, block=64), N).encode(vec)


def _msg(client: str, enc: C.EncodedUpdate, *, rnd: int = 0, samples: int = 100,
         metrics: dict[str, float] | None = None) -> W.UpdateMessage:
    return W.UpdateMessage(FLEET, rnd, client, SPEC, samples, metrics or {"loss": 1.0}, enc)


def _dense(enc: C.EncodedUpdate) -> np.ndarray:
    return C.decode_dense(enc).astype(np.float64)


# ---- the rules -------------------------------------------------------------------------------------


def test_medians() -> None:
    assert lower_median([5.0]) == upper_median([5.0]) == 5.0
    assert (lower_median([3.0, 1.0]), upper_median([3.0, 1.0])) == (1.0, 3.0)
    assert (lower_median([4.0, 1e9, 2.0, 3.0]), upper_median([4.0, 1e9, 2.0, 3.0])) == (3.0, 4.0)
    with pytest.raises(ValueError):
        lower_median([])


def _entry(norm: float, samples: int = 10, scale: float = 1.0, stale: float = 1.0) -> BufferedUpdate:
    enc = C.EncodedUpdate("fp32", 1, 1, 0, "none", 0, np.float32(norm).tobytes())
    return BufferedUpdate("c", 0, enc, samples, stale, samples * stale, scale, norm)


def test_plan_clip_reject_band_and_weight_cap() -> None:
    entries = [_entry(1.0), _entry(1.5), _entry(3.0), _entry(30.0, samples=10**6), _entry(0.0)]
    plan = plan_round(entries, norm_multiplier=2.0, norm_mode="clip", samples_multiplier=1.0,
                      weighting="samples", norm_reject_multiplier=10.0)
    assert plan.norm_median == 1.5  # lower median of the non-zero norms 1, 1.5, 3, 30
    assert plan.norm_cap == 3.0 and plan.samples_cap == 10.0
    assert plan.scales == [1.0, 1.0, 1.0, 1.0, 1.0]  # 3.0 is at the cap, not above it
    assert plan.included == [True, True, True, False, True]  # 30 > 10 × 1.5: left out even in clip mode
    assert plan.weights[3] == 10.0 and plan.weight_capped == 1 and plan.excluded == 1
    assert plan.binds(entries)
    clip = plan_round([_entry(1.0), _entry(2.0), _entry(7.0)], norm_multiplier=2.0, norm_mode="clip",
                      samples_multiplier=0, weighting="samples", norm_reject_multiplier=10.0)
    assert clip.scales == pytest.approx([1.0, 1.0, 4.0 / 7.0]) and clip.clipped == 1
    rej = plan_round([_entry(1.0), _entry(2.0), _entry(7.0)], norm_multiplier=2.0, norm_mode="reject",
                     samples_multiplier=0, weighting="samples")
    assert rej.included == [True, True, False]
    honest = [_entry(1.0), _entry(1.2), _entry(0.9)]
    assert not plan_round(honest, norm_multiplier=2.0, norm_mode="clip", samples_multiplier=1.0,
                          weighting="samples").binds(honest)


def test_plan_bounds_what_the_fixed_bound_left_and_keeps_staleness() -> None:
    # norm 8 already clipped ×0.25 by the fixed bound weighs 2: within 2 × median
    entries = [_entry(1.0), _entry(1.0), _entry(8.0, scale=0.25), _entry(1.0, samples=1000, stale=0.5)]
    plan = plan_round(entries, norm_multiplier=2.0, norm_mode="clip", samples_multiplier=1.0,
                      weighting="samples")
    assert plan.scales == [1.0, 1.0, 0.25, 1.0]
    assert plan.weights[3] == 10.0 * 0.5  # capped claim, still discounted for staleness
    uniform = [_entry(1.0, samples=1), _entry(1.0, samples=10**6)]
    assert plan_round(uniform, norm_multiplier=0, norm_mode="clip", samples_multiplier=1.0,
                      weighting="uniform").weight_capped == 0


# ---- through the core ------------------------------------------------------------------------------


def test_honest_round_is_plain_fedavg_bit_for_bit() -> None:
    """Similar norms and claims at most the median one: nothing binds, the running sum is the answer."""
    msgs = [_msg(f"s{i}", _enc(_vec(i)), samples=(120, 100, 120, 90)[i]) for i in range(4)]
    defended, plain = R.AggregatorCore(_config()), R.AggregatorCore(_config(**OFF))
    for m in msgs:
        assert defended.offer(m).accepted and plain.offer(m).accepted
    assert len(defended.buffered) == 4 and plain.buffered == [] and plain.buffer_nbytes == 0
    g1, m1 = defended.close_round()
    g2, m2 = plain.close_round()
    np.testing.assert_array_equal(g1, g2)
    assert m1["adaptive"] and not m2["adaptive"]
    assert m1["clipped"] == m1["excluded"] == m1["weight_capped"] == 0
    assert m1["loss"] == m2["loss"] and m1["total_weight"] == m2["total_weight"]


@pytest.mark.parametrize("mode", ["topk_int8", "topk_fp32", "int8", "fp32"])
def test_adaptive_clip_of_sparse_and_dense_updates(mode: str) -> None:
    """One update 5× the others: clipped to 2 × the round's median norm, computed from the encoded form."""
    encs = [_enc(_vec(i), mode) for i in range(3)] + [_enc(_vec(9, scale=5.0), mode)]
    norms = [C.update_l2_norm(e) for e in encs]
    np.testing.assert_allclose(norms, [np.linalg.norm(_dense(e)) for e in encs], rtol=1e-5)
    core = R.AggregatorCore(_config())
    for i, e in enumerate(encs):
        assert core.offer(_msg(f"s{i}", e)).accepted
    g, metrics = core.close_round()
    cap = 2.0 * sorted(norms)[1]
    assert norms[3] > cap and metrics["norm_cap"] == pytest.approx(cap)
    expect = (sum(_dense(e) for e in encs[:3]) + _dense(encs[3]) * cap / norms[3]) / 4
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-6)
    assert metrics["clipped"] == metrics["adaptive_clipped"] == 1 and core.counters["clipped"] == 1
    assert metrics["update_norm"] == pytest.approx(float(np.linalg.norm(expect)), rel=1e-5)


def test_adaptive_reject_mode_and_far_outliers_are_left_out() -> None:
    encs = [_enc(_vec(i)) for i in range(3)]
    for cfg, outlier in ((_config(norm_mode="reject"), 3.0), (_config(), 20.0)):
        core = R.AggregatorCore(cfg)
        for i, e in enumerate(encs):
            core.offer(_msg(f"s{i}", e))
        d = core.offer(_msg("liar", _enc(_vec(9, scale=outlier)), samples=100))
        assert d.accepted  # counted (its pair is done with) but left out of the mean at close
        g, metrics = core.close_round()
        np.testing.assert_allclose(g, sum(_dense(e) for e in encs) / 3, rtol=1e-5, atol=1e-6)
        assert metrics["excluded"] == 1 and metrics["num_updates"] == 4 and metrics["total_weight"] == 300
        assert core.counters["excluded"] == 1


def test_weight_cap_to_the_median_claim_also_for_reported_metrics() -> None:
    encs = [_enc(_vec(i)) for i in range(4)]
    core = R.AggregatorCore(_config())
    for i in range(3):
        core.offer(_msg(f"s{i}", encs[i], samples=100, metrics={"loss": 2.0}))
    d = core.offer(_msg("liar", encs[3], samples=10**9, metrics={"loss": 0.0}))
    assert d.weight == 1_000_000.0  # provisional: the absolute max_samples_weight
    g, metrics = core.close_round()
    np.testing.assert_allclose(g, sum(_dense(e) for e in encs) / 4, rtol=1e-5, atol=1e-6)
    assert metrics["weight_capped"] == 1 and metrics["samples_cap"] == 100.0
    assert metrics["total_weight"] == 400.0 and metrics["loss"] == pytest.approx(1.5)
    # a looser multiplier lets a site weigh up to that many median claims
    loose = R.AggregatorCore(_config(samples_median_multiplier=3))
    for i in range(3):
        loose.offer(_msg(f"s{i}", encs[i], samples=100))
    loose.offer(_msg("liar", encs[3], samples=10**9))
    g3, _ = loose.close_round()
    np.testing.assert_allclose(g3, (sum(_dense(e) for e in encs[:3]) * 100 + _dense(encs[3]) * 300) / 600,
                               rtol=1e-5, atol=1e-6)


def test_two_honest_sites_of_different_size_keep_fedavg() -> None:
    """The weight cap uses the upper median: two claims (10 and 30) are never cut."""
    a, b = _enc(_vec(1)), _enc(_vec(2))
    core = R.AggregatorCore(_config())
    core.offer(_msg("a", a, samples=10))
    core.offer(_msg("b", b, samples=30))
    g, metrics = core.close_round()
    np.testing.assert_allclose(g, (10 * _dense(a) + 30 * _dense(b)) / 40, rtol=1e-5, atol=1e-6)
    assert metrics["weight_capped"] == 0


def test_stale_update_capped_and_discounted() -> None:
    core = R.AggregatorCore(_config(late_policy="stale_weighted", staleness_alpha=1.0))
    core.offer(_msg("x", _enc(_vec(0))))
    core.close_round()
    encs = [_enc(_vec(i)) for i in range(1, 4)]
    core.offer(_msg("a", encs[0], rnd=1, samples=100))
    core.offer(_msg("b", encs[1], rnd=1, samples=100))
    d = core.offer(_msg("late", encs[2], rnd=0, samples=10**6))
    assert d.accepted and d.staleness == 1 and d.weight == pytest.approx(5e5)
    g0 = core.global_vector.astype(np.float64)
    g, metrics = core.close_round()
    expect = g0 + (100 * _dense(encs[0]) + 100 * _dense(encs[1]) + 50 * _dense(encs[2])) / 250
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-5)
    assert metrics["weight_capped"] == 1


def test_buffer_cap_refuses_and_closes_the_round() -> None:
    encs = [_enc(_vec(i)) for i in range(3)]
    core = R.AggregatorCore(_config(min_clients=5, max_round_buffer_bytes=2 * encs[0].nbytes + 10))
    assert core.offer(_msg("a", encs[0])).accepted and core.offer(_msg("b", encs[1])).accepted
    assert not core.ready_to_close(now=0.0)
    d = core.offer(_msg("c", encs[2]))
    assert d.status == R.REJECTED and d.reason == R.BUFFER_FULL
    assert core.counters[f"rejected:{R.BUFFER_FULL}"] == 1 and core.accepted_this_round == 2
    assert core.ready_to_close(now=0.0)  # below min_clients, but nothing more fits this round
    core.close_round()
    assert core.buffer_nbytes == 0 and not core.ready_to_close(now=0.0)
    assert core.offer(_msg("c", encs[2], rnd=1)).accepted
    # with every bound off nothing is buffered, so the cap does not apply
    off = R.AggregatorCore(_config(max_round_buffer_bytes=1, **OFF))
    assert all(off.offer(_msg(f"s{i}", e)).accepted for i, e in enumerate(encs))


def test_buffer_keeps_its_own_copy_of_a_reused_payload() -> None:
    """An in-process caller may hand a bytearray and reuse it; the buffered update must not change."""
    encs = [_enc(_vec(i)) for i in range(3)] + [_enc(_vec(9, scale=5.0))]  # the last is clipped at close
    core = R.AggregatorCore(_config())
    for i, e in enumerate(encs):
        raw = bytearray(e.payload)
        mutable = C.EncodedUpdate(e.mode, e.n, e.k, e.block, e.index_coding, e.index_nbytes, raw)
        assert core.offer(_msg(f"s{i}", mutable)).accepted
        raw[:] = bytes(len(raw))  # reused by the caller
    assert [e.update for e in core.buffered] == encs
    g, metrics = core.close_round()
    assert metrics["clipped"] == 1 and np.isfinite(g).all() and np.abs(g).max() > 0


def test_non_positive_samples_rejected() -> None:
    core = R.AggregatorCore(_config())
    assert core.offer(_msg("a", _enc(_vec(0)), samples=0)).reason == "bad_samples"
    assert core.accepted_this_round == 0


# ---- persistence -----------------------------------------------------------------------------------


def _round_msgs(rnd: int) -> list[W.UpdateMessage]:
    """Three honest sparse updates, one 6× too large (clipped) and a liar claiming 10^9 samples."""
    msgs = [_msg(f"s{i}", _enc(_vec(10 * rnd + i)), rnd=rnd, samples=80 + 10 * i,
                 metrics={"loss": 1.0 + i}) for i in range(3)]
    msgs.append(_msg("big", _enc(_vec(10 * rnd + 7, scale=6.0)), rnd=rnd))
    msgs.append(_msg("liar", _enc(_vec(10 * rnd + 8)), rnd=rnd, samples=10**9, metrics={"loss": 0.0}))
    return msgs


def test_reloaded_core_continues_identically(tmp_path: Path) -> None:
    """A core rebuilt from disk after every offer (as after kill -9 + restart) ends where one that never
    stopped does: same globals, metrics, counters and optimiser state; redeliveries stay duplicates."""
    opts = {"server_optimizer": "fedavgm", "server_opt_params": {"lr": 1.0, "momentum": 0.5}}
    steady = R.AggregatorCore(_config(**opts), now=0.0)
    path = tmp_path / "agg"
    restarted = R.AggregatorCore(_config(**opts), path, now=0.0)
    for rnd in range(3):
        for m in _round_msgs(rnd):
            assert steady.offer(m, now=1.0).accepted
            assert restarted.offer(m, now=1.0).accepted
            restarted = R.AggregatorCore(_config(**opts), path)
            assert restarted.offer(m).status == R.DUPLICATE
        assert [e.client_id for e in restarted.buffered] == [e.client_id for e in steady.buffered]
        assert [e.update for e in restarted.buffered] == [e.update for e in steady.buffered]
        assert restarted.buffer_nbytes == steady.buffer_nbytes > 0
        g1, m1 = steady.close_round(now=2.0)
        g2, m2 = restarted.close_round(now=2.0)
        np.testing.assert_array_equal(g1, g2)
        assert m1 == m2 and m1["clipped"] == 1 and m1["weight_capped"] == 1
        restarted = R.AggregatorCore(_config(**opts), path)
        assert restarted.buffered == [] and restarted.round == rnd + 1
    redelivered = restarted.counters
    assert redelivered.pop("duplicate") == 15 and steady.counters == redelivered
    np.testing.assert_array_equal(steady.optimizer.state_arrays()["m"],
                                  restarted.optimizer.state_arrays()["m"])


def test_failed_save_rolls_the_buffer_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    core = R.AggregatorCore(_config(), tmp_path)
    msgs = _round_msgs(0)
    core.offer(msgs[0])

    def boom(*args: object, **kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(R.os, "replace", boom)
    with pytest.raises(StateError):
        core.offer(msgs[1])
    monkeypatch.undo()
    assert [e.client_id for e in core.buffered] == ["s0"] and core.buffer_nbytes == msgs[0].update.nbytes
    assert core.offer(msgs[1]).accepted and len(core.buffered) == 2


def _rewrite_meta(path: Path, edit: object, drop: tuple[str, ...] = ()) -> None:
    """Rewrite the state file's JSON (and drop arrays) the way another writer would have left it."""
    with np.load(path / STATE_FILE, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    meta = json.loads(bytes(arrays["meta_json"]).decode())
    edit(meta)  # type: ignore[operator]
    arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path / STATE_FILE, "wb") as fh:
        np.savez(fh, **arrays)


def test_format_1_state_resumes_on_the_running_sum(tmp_path: Path) -> None:
    """A state written before the buffer existed: its open round closes as before (bounds skipped)."""
    msgs = _round_msgs(0)[:3]
    core = R.AggregatorCore(_config(), tmp_path)
    for m in msgs:
        core.offer(m)

    def to_v1(meta: dict) -> None:
        meta["format"] = 1
        del meta["buffer"]

    _rewrite_meta(tmp_path, to_v1, drop=("buffer_payload",))
    resumed = R.AggregatorCore(_config(), tmp_path)
    assert resumed.buffered == [] and resumed.accepted_this_round == 3
    big = _round_msgs(0)[3]
    resumed.offer(big)  # buffered, but the round's buffer is incomplete: plain FedAvg, big one unclipped
    g, metrics = resumed.close_round()
    assert metrics["adaptive"] is False and "norm_cap" not in metrics
    everyone = [*msgs, big]
    expect = sum(m.num_samples * _dense(m.update) for m in everyone) / sum(m.num_samples for m in everyone)
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-5)
    assert resumed.offer(_round_msgs(1)[0]).accepted and len(resumed.buffered) == 1


@pytest.mark.parametrize("damage", ["short_payload", "bad_update", "too_many"])
def test_damaged_buffer_is_refused(tmp_path: Path, damage: str) -> None:
    core = R.AggregatorCore(_config(), tmp_path)
    for m in _round_msgs(0)[:2]:
        core.offer(m)

    def edit(meta: dict) -> None:
        if damage == "short_payload":
            meta["buffer"][0]["nbytes"] += 1
        elif damage == "bad_update":
            meta["buffer"][0]["k"] += 1
        else:
            meta["acc_count"] = 1

    _rewrite_meta(tmp_path, edit)
    with pytest.raises(StateError):
        R.AggregatorCore(_config(), tmp_path)


def test_state_file_holds_buffer_without_pickle(tmp_path: Path) -> None:
    core = R.AggregatorCore(_config(), tmp_path)
    msgs = _round_msgs(0)
    for m in msgs:
        core.offer(m)
    with zipfile.ZipFile(tmp_path / STATE_FILE) as z:
        assert "buffer_payload.npy" in z.namelist()
    state = RoundState.load(tmp_path)
    assert state is not None and state.buffer_nbytes == sum(m.update.nbytes for m in msgs)
    assert [e.update.payload for e in state.buffer] == [m.update.payload for m in msgs]


# ---- settings --------------------------------------------------------------------------------------


def test_policy_validation() -> None:
    for bad in ({"norm_median_multiplier": 0.5}, {"norm_median_multiplier": float("nan")},
                {"samples_median_multiplier": -1}, {"samples_median_multiplier": True},
                {"norm_reject_multiplier": 1.5}, {"max_round_buffer_bytes": 0},
                {"max_round_buffer_bytes": 1.5}):
        with pytest.raises(ValueError):
            _config(**bad)
    assert not _config(**OFF).buffers_updates
    assert not _config(norm_median_multiplier=0, weighting="uniform").buffers_updates
    assert _config().buffers_updates and _config(norm_median_multiplier=3, norm_reject_multiplier=0)


def test_limits_from_toml() -> None:
    cfg = load_aggregator_config(text="""
[aggregator]
norm_median_multiplier = 3
norm_reject_multiplier = 0
samples_median_multiplier = 2.5
max_round_buffer_bytes = 1_000_000
max_samples_weight = 5000
norm_mode = "reject"
""")
    p = cfg.aggregator.policy
    assert (p.norm_median_multiplier, p.norm_reject_multiplier, p.samples_median_multiplier) == (3, 0, 2.5)
    assert (p.max_round_buffer_bytes, p.max_samples_weight, p.norm_mode) == (1_000_000, 5000, "reject")
    with pytest.raises(ValueError):
        load_aggregator_config(text="[aggregator]\nsamples_median_multiplier = 0.5\n")
