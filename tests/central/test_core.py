"""AggregatorCore policy and RoundState persistence, including real process crashes."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import child_kill
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft_edge.central import core as R
from fedpeft_edge.central.store import STATE_FILE, RoundState, StateError
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.protocol.reasons import Reason
from fedpeft_edge.site.encoder import UpdateEncoder

N = 2000
SPEC = "feedc0de" * 4
FLEET = "plant-a"


def _config(**kw: object) -> R.AggregatorConfig:
    base = {"fleet": FLEET, "n_params": N, "spec_hash": SPEC, "min_clients": 2, "quorum": 3,
            "round_deadline_s": 60.0}
    base.update(kw)
    return R.AggregatorConfig(**base)  # type: ignore[arg-type]


def _msg(client: str, rnd: int = 0, *, samples: int = 100, loss: float = 1.0, seed: int | None = None,
         mode: str = "topk_int8", scale: float = 1.0, **kw: object) -> W.UpdateMessage:
    rng = np.random.default_rng(seed if seed is not None else abs(hash(client)) % 2**32)
    enc = UpdateEncoder(C.CodecConfig(mode=mode, topk_ratio=0.05), N).encode(
        (scale * rng.standard_normal(N)).astype(np.float32))
    fields = {"fleet": FLEET, "round": rnd, "client_id": client, "spec_hash": SPEC, "num_samples": samples,
              "metrics": {"loss": loss, "accuracy": 0.5}, "update": enc}
    fields.update(kw)
    return W.UpdateMessage(**fields)  # type: ignore[arg-type]


# ---- policy ----------------------------------------------------------------------------------------


def test_accept_duplicate_and_close_round_with_weighted_metrics() -> None:
    # FedAvg's sample weighting itself: the weight cap (at the median claim by default) would cut 300
    core = R.AggregatorCore(_config(samples_median_multiplier=0), now=0.0)
    m1, m2, m3 = _msg("a", samples=100, loss=1.0), _msg("b", samples=300, loss=2.0), _msg("c", samples=100)
    assert core.offer(m1, now=1.0).accepted
    assert core.offer(m1, now=1.5).status == R.DUPLICATE
    assert core.offer(m2, now=2.0).accepted
    assert not core.ready_to_close(now=3.0)
    assert core.offer(m3, nbytes=1234, now=3.0).accepted
    assert core.ready_to_close(now=3.0)
    dense = [C.decode_dense(m.update) for m in (m1, m2, m3)]
    expect = (100 * dense[0] + 300 * dense[1] + 100 * dense[2]) / 500
    g, metrics = core.close_round(now=10.0)
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-6)
    assert metrics["round"] == 0 and metrics["participants"] == ["a", "b", "c"]
    assert metrics["loss"] == pytest.approx((100 * 1.0 + 300 * 2.0 + 100 * 1.0) / 500)
    assert metrics["duration_s"] == 10.0 and metrics["num_updates"] == 3
    assert metrics["bytes_in"] == m1.update.nbytes + m2.update.nbytes + 1234
    assert core.round == 1 and core.accepted_this_round == 0
    assert core.counters["accepted"] == 3 and core.counters["duplicate"] == 1
    # a round-0 update now is late (drop policy); a redelivery of a counted one is a duplicate
    assert core.offer(_msg("d", 0)).status == R.LATE
    assert core.offer(m1).status == R.DUPLICATE


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"fleet": "plant-b"}, "wrong_fleet"),
        ({"spec_hash": "00" * 16}, "spec_hash"),
        ({"round": 5}, "future_round"),
    ],
)
def test_rejections_by_reason(change: dict, reason: str) -> None:
    core = R.AggregatorCore(_config())
    d = core.offer(_msg("a", **change))
    assert d.status == R.REJECTED and d.reason == reason
    assert core.counters[f"rejected:{reason}"] == 1 and core.accepted_this_round == 0


def test_sender_must_match_client_id() -> None:
    core = R.AggregatorCore(_config())
    assert core.offer(_msg("a"), sender="b").reason == "client_mismatch"
    assert core.offer(_msg("a"), sender="a").accepted


def test_wrong_n_and_hostile_payload_rejected_without_touching_the_sum() -> None:
    core = R.AggregatorCore(_config())
    core.offer(_msg("a"))
    before = core.round_sum.copy()
    small = UpdateEncoder(C.CodecConfig(), N - 1).encode(np.ones(N - 1, np.float32))
    assert core.offer(_msg("b", update=small)).reason == Reason.OUT_OF_RANGE
    enc = _msg("c").update
    bad = bytearray(enc.payload)
    bad[0:4] = np.float32(np.nan).tobytes()
    hostile = C.EncodedUpdate(enc.mode, enc.n, enc.k, enc.block, enc.index_coding, enc.index_nbytes,
                              bytes(bad))
    assert core.offer(_msg("c", update=hostile)).reason == Reason.NON_FINITE
    np.testing.assert_array_equal(core.round_sum, before)
    assert core.accepted_this_round == 1 and core.counters["rejected"] == 2
    # and the client may still send a valid one for this round
    assert core.offer(_msg("c")).accepted


def test_note_rejected_counts_upstream_failures() -> None:
    core = R.AggregatorCore(_config())
    d = core.note_rejected(Reason.CHECKSUM, nbytes=50)
    assert d.status == R.REJECTED
    assert core.counters == {"rejected": 1, f"rejected:{Reason.CHECKSUM}": 1, "bytes_rejected": 50}


def test_stale_weighted_late_updates() -> None:
    core = R.AggregatorCore(_config(late_policy="stale_weighted", staleness_alpha=1.0, max_staleness=2,
                                    quorum=1, min_clients=1))
    core.offer(_msg("a"))
    core.close_round()
    core.offer(_msg("b", 1))
    core.close_round()
    assert core.round == 2
    d = core.offer(_msg("c", 1, samples=100))
    assert d.accepted and d.staleness == 1 and d.weight == pytest.approx(50.0)
    d = core.offer(_msg("d", 0, samples=90))
    assert d.accepted and d.staleness == 2 and d.weight == pytest.approx(30.0)
    assert core.offer(_msg("e", 0)).status == R.ACCEPTED  # still within max_staleness 2
    core.close_round()
    assert core.offer(_msg("f", 0)).status == R.LATE  # 3 behind
    assert core.counters["late_accepted"] == 3


def test_norm_bound_clip_and_reject() -> None:
    big = _msg("a", mode="fp32", scale=10.0, seed=1)
    norm = C.update_l2_norm(big.update)
    clip = R.AggregatorCore(_config(norm_bound=norm / 4, quorum=1, min_clients=1))
    assert clip.offer(big).accepted
    g, metrics = clip.close_round()
    assert float(np.linalg.norm(g)) == pytest.approx(norm / 4, rel=1e-5)
    assert metrics["clipped"] == 1
    rej = R.AggregatorCore(_config(norm_bound=norm / 4, norm_mode="reject"))
    assert rej.offer(big).reason == "norm_bound"
    assert rej.offer(_msg("b", mode="fp32", scale=0.01, seed=2)).accepted


def test_deadline_and_min_clients() -> None:
    core = R.AggregatorCore(_config(round_deadline_s=30.0), now=100.0)
    assert not core.ready_to_close(now=1000.0)  # nothing accepted
    core.offer(_msg("a"), now=101.0)
    assert not core.ready_to_close(now=200.0)  # deadline passed but 1 < min_clients
    core.offer(_msg("b"), now=102.0)
    assert not core.ready_to_close(now=120.0)
    assert core.ready_to_close(now=130.0)
    core.restart_round_clock(now=130.0)
    assert not core.ready_to_close(now=140.0)
    with pytest.raises(ValueError):
        R.AggregatorCore(_config()).close_round()


def test_max_rounds_finishes() -> None:
    core = R.AggregatorCore(_config(max_rounds=1, quorum=1, min_clients=1))
    core.offer(_msg("a"))
    core.close_round()
    assert core.finished and not core.ready_to_close()
    assert core.offer(_msg("b", 1)).reason == "finished"


def test_uniform_weighting_and_sample_cap() -> None:
    core = R.AggregatorCore(_config(weighting="uniform"))
    assert core.offer(_msg("a", samples=10**6)).weight == 1.0
    capped = R.AggregatorCore(_config(max_samples_weight=500))
    assert capped.offer(_msg("a", samples=10**6)).weight == 500.0


def test_config_validation() -> None:
    for bad in ({"quorum": 1, "min_clients": 2}, {"late_policy": "keep"}, {"n_params": 0},
                {"server_optimizer": "sgd"}, {"norm_bound": -1.0}, {"round_deadline_s": float("nan")},
                {"max_staleness": -1}, {"staleness_alpha": -1.0}, {"min_clients": True}):
        with pytest.raises(ValueError):
            _config(**bad)


# ---- persistence -----------------------------------------------------------------------------------


def test_state_survives_restart_and_continues_identically(tmp_path: Path) -> None:
    opts = {"server_optimizer": "fedadam", "server_opt_params": {"lr": 0.05}, "quorum": 2}
    a = R.AggregatorCore(_config(**opts), tmp_path / "a", now=0.0)
    b = R.AggregatorCore(_config(**opts), tmp_path / "b", now=0.0)
    for rnd in range(3):
        for core_name in ("a", "b"):
            core = a if core_name == "a" else b
            core.offer(_msg("x", rnd, seed=10 * rnd), now=1.0)
            if core_name == "b":  # b restarts from disk between every update
                b = R.AggregatorCore(_config(**opts), tmp_path / "b")
                core = b
            core.offer(_msg("y", rnd, seed=10 * rnd + 1), now=2.0)
            core.close_round(now=3.0)
            if core_name == "b":
                b = R.AggregatorCore(_config(**opts), tmp_path / "b")
    np.testing.assert_array_equal(a.global_vector, b.global_vector)
    assert a.round == b.round == 3 and len(b.history) == 3
    np.testing.assert_array_equal(a.optimizer.state_arrays()["v"], b.optimizer.state_arrays()["v"])
    assert a.counters == b.counters


def test_no_pickle_and_temp_files_ignored(tmp_path: Path) -> None:
    core = R.AggregatorCore(_config(), tmp_path)
    core.offer(_msg("a"))
    (tmp_path / f".{STATE_FILE}.tmp-garbage").write_bytes(b"PK\x03\x04 half written")
    with np.load(tmp_path / STATE_FILE, allow_pickle=False) as z:  # would raise on object arrays
        assert z["meta_json"].dtype == np.uint8
    again = R.AggregatorCore(_config(), tmp_path)
    assert again.accepted_this_round == 1 and again.participants == ["a"]
    np.testing.assert_array_equal(again.round_sum, core.round_sum)


def test_corrupt_or_foreign_state_is_refused(tmp_path: Path) -> None:
    R.AggregatorCore(_config(), tmp_path)
    with pytest.raises(StateError):
        R.AggregatorCore(_config(spec_hash="ab" * 16), tmp_path)
    (tmp_path / STATE_FILE).write_bytes(b"not a zip")
    with pytest.raises(StateError):
        R.AggregatorCore(_config(), tmp_path)


def test_failed_save_rolls_memory_back_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    core = R.AggregatorCore(_config(), tmp_path)
    core.offer(_msg("a"))

    def boom(*args: object, **kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(R.os, "replace", boom)
    with pytest.raises(StateError):
        core.offer(_msg("b"))
    monkeypatch.undo()
    assert core.participants == ["a"] and core.accepted_this_round == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # temp file cleaned up
    assert core.offer(_msg("b")).accepted  # the redelivery is counted (once)


_CHILD = textwrap.dedent(
    """
    import os, sys, numpy as np
    sys.path[:0] = [{tests!r}, {support!r}]  # test_core imports tests/support's child_kill
    from test_core import _config, _msg
    from fedpeft_edge.central import core as R
    mode, state_dir = sys.argv[1], sys.argv[2]
    core = R.AggregatorCore(_config(quorum=10_000), state_dir)
    if mode == "crash_before_rename":
        core.offer(_msg("c0", seed=0))
        os.replace = lambda *a, **k: os._exit(9)   # dies with the new state only in a temp file
        core.offer(_msg("c1", seed=1))
    elif mode == "crash_before_ack":
        core.offer(_msg("c0", seed=0))
        os._exit(9)                                  # saved, but the broker never got the ACK
    else:
        i = 0
        while True:
            core.offer(_msg(f"c{{i}}", seed=i))
            print(i, flush=True)
            i += 1
    """
)


def _run_child(mode: str, state_dir: Path, kill_after_lines: int | None = None) -> None:
    here = Path(__file__).parent
    code = _CHILD.format(tests=str(here), support=str(here.parent / "support"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the 3 ms land the kill somewhere inside the next offer/save
    child_kill.kill_after_lines([sys.executable, "-c", code, mode, str(state_dir)], kill_after_lines,
                                delay_s=0.003, env=env)


def test_crash_before_rename_does_not_count_the_update(tmp_path: Path) -> None:
    _run_child("crash_before_rename", tmp_path)
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "the crash left its temp file behind"
    core = R.AggregatorCore(_config(quorum=10_000), tmp_path)
    assert core.participants == ["c0"] and [e.client_id for e in core.buffered] == ["c0"]
    assert core.offer(_msg("c1", seed=1)).accepted  # broker redelivery: counted now, exactly once
    assert core.offer(_msg("c0", seed=0)).status == R.DUPLICATE


def test_crash_after_save_before_ack_gives_duplicate(tmp_path: Path) -> None:
    _run_child("crash_before_ack", tmp_path)
    core = R.AggregatorCore(_config(quorum=10_000), tmp_path)
    assert core.offer(_msg("c0", seed=0)).status == R.DUPLICATE
    assert core.accepted_this_round == 1


def test_sigkill_at_a_random_moment_keeps_sum_and_set_consistent(tmp_path: Path) -> None:
    _run_child("loop", tmp_path, kill_after_lines=15)
    core = R.AggregatorCore(_config(quorum=10_000), tmp_path)
    got = core.participants
    assert len(got) >= 15 and got == [f"c{i}" for i in range(len(got))]
    # the persisted sum is exactly the sum of the persisted participants' updates
    expect = np.zeros(N, np.float32)
    for i in range(len(got)):
        C.accumulate_into(_msg(f"c{i}", seed=i).update, expect, 100.0)
    np.testing.assert_allclose(core.round_sum, expect, rtol=1e-6, atol=1e-5)
    # ... and the round buffer holds exactly those updates, as sent (the close-time bounds read it)
    assert [e.client_id for e in core.buffered] == got
    assert [e.update for e in core.buffered] == [_msg(f"c{i}", seed=i).update for i in range(len(got))]
    # redeliver everything the child might have received: each update counts exactly once
    for i in range(len(got) + 3):
        core.offer(_msg(f"c{i}", seed=i))
    assert core.accepted_this_round == len(got) + 3 == len(core.buffered)


def test_huge_finite_update_cannot_overflow_the_round() -> None:
    core = R.AggregatorCore(_config(quorum=2))
    assert core.offer(_msg("a")).accepted
    huge = np.zeros(N, np.float32)
    huge[:10] = 3e38
    enc = UpdateEncoder(C.CodecConfig(mode="fp32"), N).encode(huge)
    d = core.offer(_msg("b", update=enc, samples=10**6))
    assert d.status == R.REJECTED and d.reason == "overflow"
    assert core.offer(_msg("c")).accepted
    g, _ = core.close_round()
    assert np.isfinite(g).all()


def test_absurd_metric_values_are_ignored_not_persisted(tmp_path: Path) -> None:
    core = R.AggregatorCore(_config(quorum=2), tmp_path)
    assert core.offer(_msg("a", metrics={"loss": 1e308, "accuracy": 0.5}, samples=1000)).accepted
    assert core.counters["metric_ignored"] == 1
    assert core.offer(_msg("b", metrics={"loss": 2.0}, samples=1000)).accepted
    _, metrics = core.close_round()
    assert metrics["loss"] == 2.0 and metrics["accuracy"] == 0.5
    assert R.AggregatorCore(_config(quorum=2), tmp_path).round == 1


def test_global_message_round_trips_through_the_wire() -> None:
    core = R.AggregatorCore(_config(quorum=1, min_clients=1, global_mode="int8"))
    first = W.decode_global(W.encode_global(core.global_message()))
    assert first.round == 0 and "participants" not in first.meta and first.meta["final"] is False
    core.offer(_msg("a", loss=0.25))
    g, _ = core.close_round()
    msg = W.decode_global(W.encode_global(core.global_message({"note": "pilot"})))
    assert msg.round == 1 and msg.spec_hash == SPEC and msg.vector.mode == "int8"
    assert msg.meta["participants"] == 1 and msg.meta["loss"] == 0.25 and msg.meta["note"] == "pilot"
    np.testing.assert_allclose(C.decode_global(msg.vector, N), g, atol=float(np.abs(g).max()) / 127)


_POOL = [_msg(f"s{i}", r, seed=100 * i + r, samples=10 + i) for i in range(4) for r in range(3)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_POOL) - 1), st.booleans()), max_size=25),
       st.sampled_from(["drop", "stale_weighted"]))
def test_offer_sequences_keep_the_books_straight(ops: list[tuple[int, bool]], policy: str) -> None:
    """Any sequence of offers/round closes: sum == Σ weight·update over exactly the accepted ones."""
    core = R.AggregatorCore(_config(quorum=100, min_clients=1, late_policy=policy, max_staleness=1))
    expect = np.zeros(N, np.float64)
    seen: set[tuple[str, int]] = set()
    for idx, close in ops:
        m = _POOL[idx]
        d = core.offer(m)
        if d.accepted:
            assert (m.client_id, m.round) not in seen
            seen.add((m.client_id, m.round))
            expect += d.weight * C.decode_dense(m.update).astype(np.float64)
        elif (m.client_id, m.round) in seen:
            assert d.status in (R.DUPLICATE, R.LATE)
        if close and core.accepted_this_round:
            core.close_round()
            expect[:] = 0
    np.testing.assert_allclose(core.round_sum, expect, rtol=1e-5, atol=1e-4)
    assert core.accepted_this_round == len(core.participants)
    assert core.counters.get("accepted", 0) == len(seen)


def test_failure_half_way_through_counting_refuses_to_persist(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception while the sum is being updated leaves memory untrustworthy: StateError (so the
    service does not acknowledge), and nothing more is ever saved from that core."""
    core = R.AggregatorCore(_config(), tmp_path)
    assert core.offer(_msg("a")).accepted
    before = RoundState.load(tmp_path)
    assert before is not None

    def broken(self: object, *args: object, **kw: object) -> None:
        raise RuntimeError("kernel failed half-way")

    monkeypatch.setattr(R.RoundAccumulator, "accumulate", broken)
    with pytest.raises(StateError):
        core.offer(_msg("b"))
    monkeypatch.undo()
    with pytest.raises(StateError):
        core.checkpoint()
    with pytest.raises(StateError):
        core.offer(_msg("c"))
    after = RoundState.load(tmp_path)
    assert after is not None and set(after.accepted) == {("a", 0)}
    np.testing.assert_array_equal(after.acc_sum, before.acc_sum)
    resumed = R.AggregatorCore(_config(), tmp_path)  # a restart from disk is usable again
    assert resumed.offer(_msg("b")).accepted and resumed.accepted_this_round == 2


def test_only_the_listed_sites_count() -> None:
    """`sites`: a valid update from an account outside the list (a service account, say: ACL patterns give
    every account its own update topic) is rejected before it is parsed; the listed sites count."""
    core = R.AggregatorCore(_config(sites=("a", "b")))
    d = core.offer(_msg("operator"), sender="operator")
    assert d.status == R.REJECTED and d.reason == "unknown_site"
    assert core.counters["rejected:unknown_site"] == 1 and core.accepted_this_round == 0
    assert core.offer(_msg("a"), sender="a").accepted
    with pytest.raises(ValueError, match="sites"):
        _config(sites=())
    with pytest.raises(ValueError, match="sites"):
        _config(sites=("a", ""))
