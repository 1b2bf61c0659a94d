"""The aggregator's secure-aggregation driver (central/secure_round.py) in process: phases, deadlines,
dropouts, failed sessions, the kill -9 journal, and the core's exactly-once secure close."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.central.core import AggregatorConfig, AggregatorCore
from fedpeft_edge.central.policy import RoundPolicy
from fedpeft_edge.central.secure_round import SecureRound
from fedpeft_edge.protocol import secagg_wire
from fedpeft_edge.protocol.secagg import (
    ForwardedShares,
    KeyDirectory,
    Phase,
    SecAggClient,
    SecAggParams,
    UnmaskRequest,
    quantize,
)
from fedpeft_edge.protocol.secagg_policy import Publish, SecAggPolicy
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.runtime.errors import InvalidValueError

N = 64
SITES = ["s1", "s2", "s3", "s4", "s5"]
TOPICS = Topics("plant")
LATER = 10_000.0  # seconds added to the monotonic clock: every phase deadline has passed


def make_round(tmp: Path, sites: list[str] = SITES, **kw: object) -> SecureRound:
    pol = SecAggPolicy(enabled=True, sites=list(sites), phase_timeout_s=5.0,
                       **kw)  # type: ignore[arg-type]
    return SecureRound(pol, TOPICS, N, tmp, quorum=len(sites), min_clients=2, round_deadline_s=60.0)


class Fleet:
    """In-process sites driving SecAggClient directly (the site module has its own tests)."""

    def __init__(self, sr: SecureRound, deltas: dict[str, np.ndarray]) -> None:
        self.sr = sr
        self.deltas = deltas
        self.clients: dict[str, SecAggClient] = {}
        self.q: dict[str, np.ndarray] = {}

    @property
    def params(self) -> SecAggParams:
        assert self.sr.params is not None
        return self.sr.params

    def send(self, site: str, msg: object) -> str:
        return self.sr.take(site, secagg_wire.encode_message(msg, self.params))  # type: ignore[arg-type]

    def advertise(self, sites: list[str]) -> None:
        for s in sites:
            self.clients[s] = SecAggClient(self.params, s)
            assert self.send(s, self.clients[s].advertise()) == "accepted"

    def deliver(self, out: list[Publish], sites: list[str]) -> None:
        """Feed the aggregator's publishes to ``sites`` and send their answers; like a real site, a
        message that is not for the client's current phase (a retained copy seen again) is ignored."""
        p = self.params
        for m in out:
            if not m.payload:
                continue
            msg = secagg_wire.decode_message(m.payload, p)
            if isinstance(msg, UnmaskRequest):
                for s in sites:
                    if s in msg.survivors and self.clients[s].phase == Phase.UNMASK:
                        assert self.send(s, self.clients[s].unmask(msg)) == "accepted"
                continue
            site = m.topic.rsplit("/", 1)[1]
            if site not in sites:
                continue
            c = self.clients[site]
            if isinstance(msg, KeyDirectory) and c.phase == Phase.SHARE_KEYS:
                assert self.send(site, c.share_keys(msg)) == "accepted"
            elif isinstance(msg, ForwardedShares) and c.phase == Phase.MASKED_INPUT:
                self.q[site] = quantize(self.deltas[site], p.quant)
                assert self.send(site, c.masked_input(msg, self.q[site])) == "accepted"


def deltas_for(sites: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: rng.uniform(-0.01, 0.01, N).astype(np.float32) for s in sites}


def expected_mean(fleet: Fleet, survivors: list[str]) -> np.ndarray:
    p = fleet.params
    total = sum(fleet.q[s].view(np.int32).astype(np.int64) for s in survivors)
    return (np.asarray(total, dtype=np.float64) * p.quant.scale / len(survivors)).astype(np.float32)


def run_all(tmp: Path, deltas: dict[str, np.ndarray]) -> tuple[SecureRound, Fleet]:
    sr = make_round(tmp)
    out = sr.begin(0)
    assert [m.topic for m in out] == [TOPICS.secagg_params] and out[0].retain
    fleet = Fleet(sr, deltas)
    fleet.advertise(SITES)
    for _ in range(3):
        sr.sync()
        fleet.deliver(sr.tick(), SITES)
    sr.sync()
    assert sr.tick() == [] and sr.result is not None
    return sr, fleet


def test_four_phases_give_the_mean_of_the_quantised_updates(tmp_path: Path) -> None:
    deltas = deltas_for(SITES)
    sr, fleet = run_all(tmp_path, deltas)
    res = sr.result
    assert res is not None and res.survivors == SITES and res.dropped == []
    np.testing.assert_array_equal(res.mean, expected_mean(fleet, SITES))
    plain = np.mean(list(deltas.values()), axis=0)
    assert np.max(np.abs(res.mean - plain)) < 1e-6
    assert set(sr.costs.bytes_in) == {"ADVERTISE", "SHARE_KEYS", "MASKED_INPUT", "UNMASK"}
    assert sr.costs.bytes_in["MASKED_INPUT"] > len(SITES) * 4 * N
    # the round's end clears the per-site and unmask topics (empty retained), keeps the params
    cleared = sr.finish_round()
    assert {m.topic for m in cleared} == {TOPICS.secagg_down(s) for s in SITES} | {TOPICS.secagg_unmask}
    assert all(m.payload == b"" and m.retain for m in cleared)
    assert not (tmp_path / "secagg" / "session.jrn").exists()


def test_phase_zero_waits_for_training_then_closes_at_the_deadline_with_enough(tmp_path: Path) -> None:
    sr = make_round(tmp_path)
    sr.begin(0)
    fleet = Fleet(sr, deltas_for(SITES))
    fleet.advertise(SITES[:3])  # k = 4, t = 3: phase 0 needs t + 1 = 4 sites
    assert sr.tick(round_open_s=61.0) == []  # deadline passed, but too few to mask for each other
    fleet.advertise(["s4"])
    assert sr.tick(round_open_s=10.0) == []  # quorum (5) not reached, deadline (60 s) not passed
    out = sr.tick(round_open_s=61.0)
    assert sorted(m.topic for m in out) == sorted(TOPICS.secagg_down(s) for s in SITES[:4])
    assert fleet.send("s5", SecAggClient(sr.params, "s5").advertise()) == "late"  # type: ignore[arg-type]


def test_dropout_after_sharing_is_unmasked_without_it(tmp_path: Path) -> None:
    sr = make_round(tmp_path)
    sr.begin(0)
    fleet = Fleet(sr, deltas_for(SITES, 1))
    fleet.advertise(SITES)
    fleet.deliver(sr.tick(), SITES)  # directories → shares
    fleet.deliver(sr.tick(), SITES[:-1])  # forwarded shares: s5 never sends its masked input
    assert sr.tick() == []  # waits for s5 until the phase times out
    out = sr.tick(time.monotonic() + LATER)
    req = secagg_wire.decode_message(out[0].payload, fleet.params, expect=UnmaskRequest)
    assert req.dropped == ("s5",)  # type: ignore[union-attr]
    fleet.deliver(out, SITES[:-1])
    sr.tick()
    assert sr.result is not None and sr.result.dropped == ["s5"]
    np.testing.assert_array_equal(sr.result.mean, expected_mean(fleet, SITES[:-1]))


def test_a_session_that_cannot_complete_is_retried_without_those_whose_input_it_holds(tmp_path: Path) -> None:
    sr = make_round(tmp_path, max_attempts=2)
    sr.begin(0)
    first = sr.session
    fleet = Fleet(sr, deltas_for(SITES, 2))
    fleet.advertise(SITES)
    fleet.deliver(sr.tick(), SITES)
    fleet.deliver(sr.tick(), ["s1", "s2"])  # only two masked inputs: phase 2 needs t + 1 = 4
    out = sr.tick(time.monotonic() + LATER)
    assert sr.result is None and sr.give_up is None and sr.session != first and sr.attempt == 2
    # s1 and s2 sent their update masked: it must never enter a second sum of this round
    assert sr.excluded == ["s1", "s2"] and sr.params.sites == ("s3", "s4", "s5")  # type: ignore[union-attr]
    # the failed session's per-site messages are cleared and the new params announced
    assert any(m.topic == TOPICS.secagg_params and m.payload for m in out)
    assert any(m.topic == TOPICS.secagg_down("s1") and m.payload == b"" for m in out)
    sr.tick(time.monotonic() + 1.0, round_open_s=1e9)  # nobody back yet: the retry waits (its own deadline)
    assert sr.give_up is None
    fleet2 = Fleet(sr, deltas_for(SITES, 3))
    fleet2.advertise(["s3", "s4", "s5"])
    fleet2.deliver(sr.tick(), ["s3"])  # all three back; only s3 shares: phase 1 cannot close
    sr.tick(time.monotonic() + LATER)
    assert sr.give_up is not None and "2 secure session(s)" in sr.give_up  # max_attempts used up


def test_too_few_sites_left_gives_the_round_up(tmp_path: Path) -> None:
    sr = make_round(tmp_path)
    sr.begin(0)
    fleet = Fleet(sr, deltas_for(SITES, 2))
    fleet.advertise(SITES)
    fleet.deliver(sr.tick(), SITES)
    fleet.deliver(sr.tick(), SITES)
    fleet.deliver(sr.tick(), ["s1"])  # one unmask answer: the secrets stay short of t shares
    sr.tick(time.monotonic() + LATER)
    assert sr.result is None and sr.give_up is not None and "only 0 site(s)" in sr.give_up


@pytest.mark.parametrize("kill_after", ["advertise", "directories", "shares", "masked", "unmask"])
def test_a_restart_resumes_the_journalled_session(tmp_path: Path, kill_after: str) -> None:
    deltas = deltas_for(SITES, 4)
    sr = make_round(tmp_path)
    sr.begin(0)
    fleet = Fleet(sr, deltas)
    fleet.advertise(SITES)
    steps = ["directories", "shares", "masked", "unmask"]
    out: list[Publish] = []
    for step in ["advertise", *steps]:
        if step != "advertise":
            fleet.deliver(out, SITES)
        sr.sync()
        if step == kill_after:
            break
        out = sr.tick()
    before = {m.topic: m.payload for m in sr.announcements()}
    session = sr.session
    sr.journal.close()  # kill -9: the object is gone; only what was synced is on disk
    again = make_round(tmp_path)
    again.begin(0)
    assert again.session == session
    assert {m.topic: m.payload for m in again.announcements()} == before
    fleet.sr = again
    for _ in range(4):
        if again.result is not None:
            break
        fleet.deliver(out, SITES)
        again.sync()
        out = again.tick()
    assert again.result is not None and again.result.survivors == SITES
    np.testing.assert_array_equal(again.result.mean, expected_mean(fleet, SITES))


def test_a_torn_journal_tail_is_cut_and_its_message_taken_again(tmp_path: Path) -> None:
    sr = make_round(tmp_path)
    sr.begin(0)
    fleet = Fleet(sr, deltas_for(SITES))
    fleet.advertise(SITES[:4])
    sr.sync()
    jrn = tmp_path / "secagg" / "session.jrn"
    size = jrn.stat().st_size
    last = SecAggClient(sr.params, "s5")  # type: ignore[arg-type]
    payload = secagg_wire.encode_message(last.advertise(), fleet.params)
    assert sr.take("s5", payload) == "accepted"
    sr.sync()
    with open(jrn, "r+b") as fh:  # the kill hit mid-write: half the record is there
        fh.truncate(size + (jrn.stat().st_size - size) // 2)
    sr.journal.close()
    again = make_round(tmp_path)
    again.begin(0)
    assert jrn.stat().st_size == size and again.server.progress() == (4, 5)  # type: ignore[union-attr]
    assert again.take("s5", payload) == "accepted"  # the broker's redelivery


def test_hostile_messages_are_rejected_and_change_nothing(tmp_path: Path) -> None:
    sr = make_round(tmp_path)
    sr.begin(0)
    fleet = Fleet(sr, deltas_for(SITES))
    fleet.advertise(["s1"])
    for junk in (b"", b"\x00" * 10, b"\xc1", b"\x81\xa1t\xa6sa_adv", bytes(range(256)) * 50):
        assert sr.take("s2", junk) == "rejected"
    c = SecAggClient(sr.params, "s2")  # type: ignore[arg-type]
    adv = secagg_wire.encode_message(c.advertise(), fleet.params)
    assert sr.take("s3", adv) == "rejected"  # s2's keys on s3's topic
    assert sr.take("s2", adv) == "accepted" and sr.take("s2", adv) == "duplicate"
    other = secagg_wire.encode_message(SecAggClient(sr.params, "s2").advertise(), fleet.params)  # type: ignore[arg-type]
    assert sr.take("s2", other) == "rejected"  # new keys in the same session: refused
    assert sr.server.progress() == (2, 5)  # type: ignore[union-attr]
    assert sr.rejections["client_mismatch"] == 1 and sr.rejections["conflicting_message"] == 1
    assert sr.last_rejection[0] == "conflicting_message"


def test_a_closed_rounds_journal_is_discarded(tmp_path: Path) -> None:
    sr = make_round(tmp_path)
    sr.begin(3)
    first = sr.session
    sr.journal.close()
    again = make_round(tmp_path)
    again.begin(4)  # the core moved on: round 3's session must not be resumed
    assert again.session != first and again.params.round == 4  # type: ignore[union-attr]


def test_policy_refuses_too_few_sites_and_bad_thresholds() -> None:
    with pytest.raises(InvalidValueError, match="at least 2"):
        SecAggPolicy(enabled=True, sites=["a"]).check_aggregator()
    with pytest.raises(InvalidValueError, match="threshold"):
        SecAggPolicy(enabled=True, sites=["a", "b", "c", "d", "e"], threshold=2).check_aggregator()
    with pytest.raises(InvalidValueError, match="twice"):
        SecAggPolicy(enabled=True, sites=["a", "a"])
    with pytest.raises(InvalidValueError, match="prg"):
        SecAggPolicy(prg="rot13")


def core_for(tmp: Path | None, **policy: object) -> AggregatorCore:
    cfg = AggregatorConfig.for_fleet(RoundPolicy(**policy), fleet="plant", n_params=N,  # type: ignore[arg-type]
                                     spec_hash="spec-0001", secure=True)
    return AggregatorCore(cfg, tmp, initial_global=np.zeros(N, np.float32))


def test_core_closes_a_secure_round_once_and_refuses_plain_updates(tmp_path: Path) -> None:
    core = core_for(tmp_path, quorum=3)
    mean = np.full(N, 0.01, np.float32)
    new, metrics = core.close_secure_round("ab" * 8, ["s1", "s2", "s3"], mean, nbytes=999, dropped=["s4"])
    assert core.round == 1 and metrics["secagg_session"] == "ab" * 8 and metrics["secagg_dropped"] == ["s4"]
    assert metrics["num_updates"] == 3 and metrics["participants"] == ["s1", "s2", "s3"]
    np.testing.assert_allclose(new, mean, rtol=1e-6)  # FedAvg with server lr 1: global += mean
    assert core.global_message().meta["secagg_session"] == "ab" * 8
    reloaded = core_for(tmp_path, quorum=3)  # after a kill -9: the round is closed on disk
    assert reloaded.round == 1 and reloaded.was_counted("s2", 0)
    rec = reloaded.skip_round("too few sites")
    assert reloaded.round == 2 and rec["skipped"] == "too few sites" and rec["num_updates"] == 0
    np.testing.assert_array_equal(reloaded.global_vector, new)


def test_secure_config_refuses_what_needs_individual_updates() -> None:
    for policy in ({"norm_bound": 1.0}, {"robust_rule": "median"}, {"aggregation": "fednova"},
                   {"round_mode": "fedbuff"}):
        with pytest.raises(InvalidValueError, match=r"\[secagg\]"):
            core_for(None, **policy)


def test_a_retry_whose_sites_never_come_back_fails_at_its_deadline(tmp_path: Path) -> None:
    sr = make_round(tmp_path, max_attempts=2)
    sr.begin(0)
    fleet = Fleet(sr, deltas_for(SITES, 5))
    fleet.advertise(SITES)
    fleet.deliver(sr.tick(), SITES)
    fleet.deliver(sr.tick(), ["s1", "s2"])  # two masked inputs only: the session fails
    sr.tick(time.monotonic() + LATER)
    assert sr.attempt == 2 and sr.params.sites == ("s3", "s4", "s5")  # type: ignore[union-attr]
    assert sr.tick(time.monotonic() + 1.0) == [] and sr.give_up is None  # waiting for them, for now
    sr.tick(time.monotonic() + LATER)  # the retry's deadline passed with nobody back: given up
    assert sr.give_up is not None and "2 secure session(s)" in sr.give_up
