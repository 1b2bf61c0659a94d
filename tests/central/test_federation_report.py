"""The federation report (central/federation_report.py): the per-site ledger of the core (persisted with
the round state, exactly once), the report built from a service, the publisher's throttling, and the
retained report on a real Mosquitto after a federation."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import fed_numpy_trainer as fnt
import mqtt_fixtures as mf
import numpy as np
import pytest

from fedpeft_edge import __version__
from fedpeft_edge.central import core as R
from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.federation_report import (
    ReportPublisher,
    aggregation_tokens,
    build_report,
    content_digest,
)
from fedpeft_edge.central.policy import AggregatorConfig, RoundPolicy
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.central.store import STATE_FILE, RoundState
from fedpeft_edge.protocol import codec as C
from fedpeft_edge.protocol import wire as W
from fedpeft_edge.protocol.fleet_report import (
    FederationReport,
    SiteRecord,
    decode_info,
    decode_report,
    encode_report,
)
from fedpeft_edge.protocol.privacy import PrivacyPolicy
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.encoder import UpdateEncoder

N = 200
SPEC = "feedc0de" * 4
FLEET = "report-a"


def _config(**kw: object) -> R.AggregatorConfig:
    base = {"fleet": FLEET, "n_params": N, "spec_hash": SPEC, "min_clients": 1, "quorum": 3,
            "round_deadline_s": 60.0, "samples_median_multiplier": 0}
    base.update(kw)
    return R.AggregatorConfig(**base)  # type: ignore[arg-type]


def _msg(client: str, rnd: int = 0, *, samples: int = 100, fleet: str = FLEET, spec: str = SPEC,
         metrics: dict[str, float] | None = None) -> W.UpdateMessage:
    rng = np.random.default_rng(abs(hash((client, rnd))) % 2**32)
    enc = UpdateEncoder(C.CodecConfig(mode="topk_int8", topk_ratio=0.1), N).encode(
        rng.standard_normal(N).astype(np.float32))
    return W.UpdateMessage(fleet, rnd, client, spec, samples, metrics or {"loss": 1.0, "accuracy": 0.5}, enc)


# ---- the ledger ------------------------------------------------------------------------------------


def test_ledger_counts_accepted_samples_rounds_and_rejections_by_reason() -> None:
    core = R.AggregatorCore(_config(), now=0.0)
    assert core.offer(_msg("a", samples=100), sender="a", now=1.0).accepted
    assert core.offer(_msg("a", samples=100), sender="a", now=1.5).status == R.DUPLICATE  # not counted
    assert core.offer(_msg("b", samples=30), sender="b", now=2.0).accepted
    assert core.offer(_msg("b", fleet="other"), sender="b", now=2.5).status == R.REJECTED
    assert core.offer(_msg("b", spec="00" * 16), sender="b", now=2.6).reason == "spec_hash"
    assert core.offer(_msg("b", spec="00" * 16), sender="b", now=2.7).reason == "spec_hash"
    assert core.offer(_msg("c"), sender="mallory", now=2.8).reason == "client_mismatch"  # the topic's site
    core.note_rejected("bad_type", 10, "undecodable", sender="a")
    core.note_rejected("bad_topic", 10)  # no sender: in the counters only
    recs = core.site_records()
    assert recs["a"] == SiteRecord(rounds=1, samples=100, last_round=0, last_at=1.0, rejected={"bad_type": 1})
    assert recs["b"] == SiteRecord(rounds=1, samples=30, last_round=0, last_at=2.0,
                                   rejected={"wrong_fleet": 1, "spec_hash": 2})
    assert recs["mallory"] == SiteRecord(rejected={"client_mismatch": 1})
    assert set(recs) == {"a", "b", "mallory"}
    core.close_round(now=10.0)
    assert core.offer(_msg("a", 1, samples=50), now=11.0).accepted  # in-process: the envelope's site
    assert core.offer(_msg("d", 0, samples=70), now=11.5).status == R.LATE  # drop policy: not a rejection
    assert "d" not in core.site_records()
    rec = core.site_records()["a"]
    assert (rec.rounds, rec.samples, rec.last_round, rec.last_at) == (2, 150, 1, 11.0)


def test_a_site_counted_twice_in_one_round_adds_one_round() -> None:
    core = R.AggregatorCore(_config(late_policy="stale_weighted"), now=0.0)
    assert core.offer(_msg("a", 0), now=1.0).accepted
    core.close_round(now=2.0)
    assert core.offer(_msg("b", 0), now=3.0).accepted  # late but counted, into round 1
    assert core.offer(_msg("b", 1), now=4.0).accepted
    rec = core.site_records()["b"]
    assert (rec.rounds, rec.samples, rec.last_round) == (1, 200, 1)


def test_ledger_bounds_sites_and_reasons(monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(R, "MAX_TRACKED_SITES", 2)
    core = R.AggregatorCore(_config(), now=0.0)
    caplog.set_level(logging.WARNING, logger="fedpeft_edge.central.core")
    for site in ("a", "b", "c", "d"):
        core.note_rejected("bad_type", sender=site)
    assert set(core.site_records()) == {"a", "b"}
    assert caplog.text.count("not tracked") == 1  # said once
    assert core.offer(_msg("c"), now=1.0).accepted  # counted all the same, only not in the ledger
    assert core.site_records()["c"] == SiteRecord(rounds=1)  # from the accepted pairs
    for i in range(40):
        core.note_rejected(f"reason_{i:02d}", sender="a")
    rejected = core.site_records()["a"].rejected
    assert len(rejected) == R.MAX_REASONS_PER_SITE and rejected["other"] == 40 - 30
    assert sum(rejected.values()) == 41


def test_ledger_survives_a_reload_and_a_redelivery_is_not_counted_again(tmp_path: Path) -> None:
    core = R.AggregatorCore(_config(), tmp_path, autosave=False, now=0.0)
    m = _msg("a", samples=100)
    assert core.offer(m, sender="a", now=1.0).accepted
    core.note_rejected("bad_type", sender="b")
    # Killed before the checkpoint: nothing of it is on disk, the broker redelivers, counted then.
    lost = R.AggregatorCore(_config(), tmp_path, autosave=False)
    assert lost.site_records() == {}
    core.checkpoint()
    after = R.AggregatorCore(_config(), tmp_path, autosave=False)
    assert after.site_records() == core.site_records()
    assert after.site_records()["a"] == SiteRecord(1, 100, 0, 1.0, {})
    assert after.offer(m, sender="a", now=5.0).status == R.DUPLICATE  # acked copy redelivered
    after.checkpoint()
    again = R.AggregatorCore(_config(), tmp_path, autosave=False)
    assert again.site_records()["a"] == SiteRecord(1, 100, 0, 1.0, {})
    assert again.site_records()["b"].rejected == {"bad_type": 1}


def test_a_state_file_without_the_ledger_loads(tmp_path: Path) -> None:
    core = R.AggregatorCore(_config(), tmp_path, now=0.0)
    assert core.offer(_msg("a"), sender="a", now=1.0).accepted
    path = tmp_path / STATE_FILE
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta_json"]).decode())
    assert meta["sites"]["a"]["samples"] == 100
    del meta["sites"]  # as written before the ledger existed
    arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    st = RoundState.load(tmp_path)
    assert st is not None and st.sites == {}
    old = R.AggregatorCore(_config(), tmp_path)
    assert old.site_records() == {"a": SiteRecord(rounds=1)}  # rounds from the accepted pairs


# ---- the report --------------------------------------------------------------------------------------

NS = fnt.FEATURES * fnt.CLASSES + fnt.CLASSES


def _service(tmp_path: Path, port: int = 1883, fleet: str = FLEET, policy: str = "") -> AggregatorService:
    cfg = load_aggregator_config(text=f'[connection]\nport = {port}\n[fleet]\nname = "{fleet}"\n'
                                      f'[aggregator]\nstate_dir = "{tmp_path}/agg"\n{policy}')
    return AggregatorService(cfg, initial_global=np.zeros(NS, np.float32))


def _svc_msg(svc: AggregatorService, client: str, rnd: int, samples: int, **metrics: float
             ) -> W.UpdateMessage:
    enc = UpdateEncoder(C.CodecConfig(mode="fp32"), NS).encode(np.full(NS, 0.01, np.float32))
    return W.UpdateMessage(svc.topics.fleet, rnd, client, svc.spec_hash, samples, metrics, enc)


def test_report_built_from_the_service(tmp_path: Path) -> None:
    svc = _service(tmp_path, policy="max_rounds = 5\nquorum = 4\nmin_clients = 2\nround_deadline_s = 600\n"
                                     'late_policy = "stale_weighted"\nsamples_median_multiplier = 0\n')
    core = svc.core
    core.restart_round_clock(10.0)
    assert core.offer(_svc_msg(svc, "site-1", 0, 100, loss=1.0, accuracy=0.5, global_eval_accuracy=0.25),
                      sender="site-1", now=10.0).accepted
    assert core.offer(_svc_msg(svc, "site-2", 0, 300, loss=2.0, accuracy=0.7), sender="site-2",
                      now=11.0).accepted
    core.close_round(now=20.0)
    svc.reports.note_closed(0, 4321, 20.5)
    assert core.offer(_svc_msg(svc, "site-1", 1, 100), sender="site-1", now=21.0).accepted
    svc.core.note_rejected("bad_type", 50, sender="site-3")
    svc.control.paused = {"by": "alice", "id": "ab" * 16, "at": 22.0}
    svc.control.excluded = {"site-4": "bob"}
    rep = build_report(svc, 23.0, svc.reports.closed)
    assert (rep.fleet, rep.time, rep.round, rep.max_rounds, rep.finished) == (FLEET, 23.0, 1, 5, False)
    assert rep.paused and rep.pause_detail == f"paused by operator alice (cmd {'ab' * 16})"
    assert rep.excluded == ("site-4",)
    assert (rep.round_started_at, rep.deadline_s, rep.deadline_at) == (20.0, 600.0, 620.0)
    assert (rep.quorum, rep.min_clients, rep.late_policy) == (4, 2, "stale_weighted")
    assert rep.aggregation == ("fedavg",)
    assert rep.accepted == 1 and rep.participants == ("site-1",)
    assert (rep.spec, rep.bundle, rep.version, rep.n_params) == (svc.spec_hash, None, __version__, NS)
    assert rep.sites == {"site-1": SiteRecord(2, 200, 1, 21.0, {}, 0.25),
                         "site-2": SiteRecord(1, 300, 0, 11.0, {}),
                         "site-3": SiteRecord(rejected={"bad_type": 1})}
    (h,) = rep.history
    assert (h.round, h.participants, h.bytes_out, h.closed_at, h.duration_s) == (0, 2, 4321, 20.5, 10.0)
    assert h.loss == pytest.approx(1.75) and h.accuracy == pytest.approx(0.65)
    assert h.eval_accuracy == pytest.approx(0.25) and h.bytes_in > 0
    assert decode_report(encode_report(rep)) == rep
    # After a restart, the closed rounds' bytes_out and closed_at are not known any more.
    (h2,) = build_report(svc, 23.0).history
    assert (h2.bytes_out, h2.closed_at) == (None, None)


class _FakeTransport:
    def __init__(self, limit: int = 1 << 20) -> None:
        self.connected = True
        self.limit = limit
        self.sent: list[tuple[str, bytes, int, bool]] = []

    def max_payload(self, topic: str) -> int:
        return self.limit

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload, qos, retain))


def test_publisher_throttles_skips_unchanged_and_honours_force(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    fake = _FakeTransport()
    svc.transport = fake  # type: ignore[assignment]
    pub = ReportPublisher(svc, min_interval_s=1.0)
    assert pub.maybe_publish(100.0)
    topic, data, qos, retain = fake.sent[0]
    assert (topic, qos, retain) == (f"fedpeft/{FLEET}/federation", 1, True)
    assert decode_report(data).time == 100.0
    assert svc.core.offer(_svc_msg(svc, "site-1", 0, 10), sender="site-1", now=100.2).accepted
    assert not pub.maybe_publish(100.5) and pub.pending  # changed, but within the interval
    assert pub.maybe_publish(101.1) and not pub.pending  # the held-back change goes out
    assert decode_report(fake.sent[-1][1]).sites["site-1"].samples == 10
    assert not pub.maybe_publish(105.0)  # nothing changed but the time
    assert len(fake.sent) == 2
    assert pub.maybe_publish(105.1, force=True)  # e.g. after a reconnect
    pub.request()  # e.g. an operator command applied
    assert pub.maybe_publish(105.2)  # forced: neither the interval nor the content hold it
    assert len(fake.sent) == 4 and pub.published == 4
    assert content_digest(fake.sent[2][1]) == content_digest(fake.sent[3][1])
    fake.connected = False
    assert not pub.maybe_publish(110.0, force=True) and pub.pending and len(fake.sent) == 4


def test_publisher_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    svc = _service(tmp_path)
    fake = _FakeTransport(limit=200)  # smaller than any report
    svc.transport = fake  # type: ignore[assignment]
    pub = ReportPublisher(svc)
    caplog.set_level(logging.WARNING, logger="fedpeft_edge.central.federation_report")
    assert not pub.maybe_publish(1.0, force=True)
    assert not pub.maybe_publish(2.0, force=True)
    assert caplog.text.count("exceeds the broker limit") == 1 and not fake.sent
    fake.limit = 1 << 20
    import fedpeft_edge.central.federation_report as FR

    def broken(*a: object, **k: object) -> None:
        raise ValueError("cannot encode")

    monkeypatch.setattr(FR, "encode_report", broken)
    assert not pub.maybe_publish(3.0, force=True)
    assert not pub.maybe_publish(4.0, force=True)
    assert caplog.text.count("federation report not published: cannot encode") == 1
    svc.transport = None
    assert not pub.maybe_publish(5.0, force=True)


# ---- end to end ------------------------------------------------------------------------------------


def _agent(port: int, fleet: str, tmp: Path, i: int) -> EdgeAgent:
    cfg = load_agent_config(text=f'[connection]\nport = {port}\n[fleet]\nname = "{fleet}"\n'
                            f'[agent]\nclient_id = "site-{i}"\nstate_dir = "{tmp}/site-{i}"\n'
                            f'idle_exit_s = 30\nexit_after_final = true\ndrain_timeout_s = 5\n'
                            f'dump_updates = true\n'
                            f'[data]\nclient_index = {i}\n')
    s = fnt.make(cfg)
    return EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn)


def _retained(port: int, topics: list[str], seconds: float = 1.0) -> dict[str, bytes]:
    t = MqttTransport(TransportConfig(host="127.0.0.1", port=port, client_id="report-reader",
                                      clean_start=True))
    for topic in topics:
        t.subscribe(topic)
    t.connect(10)
    try:
        return dict(mf.drain(t, seconds))
    finally:
        t.close()


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_retained_report_and_info_cards_after_a_federation(mosquitto_broker, tmp_path: Path) -> None:
    port, fleet = mosquitto_broker.port, "report-e2e"
    svc = _service(tmp_path, port, fleet, "max_rounds = 2\nquorum = 2\nmin_clients = 2\n"
                                          "round_deadline_s = 60\nfinal_linger_s = 5\n")
    agents = [_agent(port, fleet, tmp_path, i) for i in range(2)]
    threads = [threading.Thread(target=x.run, daemon=True) for x in (svc, *agents)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert svc.core.finished and all(a.rounds_sent == [0, 1] for a in agents)
        topics = Topics(fleet)
        got = _retained(port, [topics.federation, topics.info_filter])
        rep = decode_report(got[topics.federation])
        assert (rep.fleet, rep.round, rep.max_rounds, rep.finished, rep.paused) == (fleet, 2, 2, True, False)
        assert rep.spec == svc.spec_hash and rep.n_params == NS and rep.accepted == 0
        claimed = {f"site-{i}": sum(W.decode_update(e).num_samples
                                    for e in mf.sent_updates(tmp_path / f"site-{i}").values())
                   for i in range(2)}
        assert {s: (r.rounds, r.samples, r.last_round) for s, r in rep.sites.items()} == {
            s: (2, n, 1) for s, n in claimed.items()}
        assert [(h.round, h.participants) for h in rep.history] == [(0, 2), (1, 2)]
        assert all(h.bytes_out and h.closed_at and h.loss is not None for h in rep.history)
        for i in range(2):
            card = decode_info(got[topics.info(f"site-{i}")])
            assert (card.site, card.spec, card.bundle, card.version) == (f"site-{i}", svc.spec_hash, None,
                                                                       __version__)
    finally:
        svc.stop()
        for a in agents:
            a.stop()


def test_the_report_says_how_rounds_are_aggregated() -> None:
    secure = AggregatorConfig.for_fleet(RoundPolicy(server_optimizer="fedadam"), fleet=FLEET, n_params=NS,
                                        spec_hash="spec-0001", secure=True,
                                        privacy=PrivacyPolicy(mode="distributed"))
    assert aggregation_tokens(secure) == ("fedavg", "secagg", "dp-distributed", "server-fedadam")
    robust = AggregatorConfig.for_fleet(RoundPolicy(round_mode="fedbuff", robust_rule="median"), fleet=FLEET,
                                        n_params=NS, spec_hash="spec-0001")
    assert aggregation_tokens(robust) == ("fedbuff", "robust-median")
    slot = AggregatorConfig(fleet="f", n_params=NS, spec_hash="s", rank_aggregation="slotwise")
    assert aggregation_tokens(slot) == ("fedavg", "ranks-slotwise")  # the default (flexlora) says nothing
    rep = FederationReport(fleet=FLEET, time=1.0, round=0, max_rounds=None, finished=False, paused=False,
                           pause_detail="", excluded=(), round_started_at=0.0, deadline_s=60.0, quorum=2,
                           min_clients=1, late_policy="drop", accepted=0, participants=(), spec="s" * 16,
                           bundle=None, version="0", n_params=NS, aggregation=aggregation_tokens(secure))
    assert decode_report(encode_report(rep)).aggregation == ("fedavg", "secagg", "dp-distributed",
                                                             "server-fedadam")
    bad = encode_report(rep).replace(b'"dp-distributed"', b'"dp distributed"')
    with pytest.raises(WireFormatError):
        decode_report(bad)


def test_a_sites_lora_rank_travels_in_the_report_and_a_bad_one_is_refused() -> None:
    rep = FederationReport(fleet=FLEET, time=1.0, round=1, max_rounds=None, finished=False, paused=False,
                           pause_detail="", excluded=(), round_started_at=0.0, deadline_s=60.0, quorum=2,
                           min_clients=1, late_policy="drop", accepted=0, participants=(), spec="s" * 16,
                           bundle=None, version="0", n_params=NS,
                           sites={"a": SiteRecord(1, 10, 0, 1.0, {}, lora_rank=4), "b": SiteRecord(1, 10)})
    back = decode_report(encode_report(rep))
    assert back.sites["a"].lora_rank == 4 and back.sites["b"].lora_rank is None
    for bad in (b'"lora_rank":0', b'"lora_rank":"4"', b'"lora_rank":4.5', b'"lora_rank":99999'):
        with pytest.raises(WireFormatError):
            decode_report(encode_report(rep).replace(b'"lora_rank":4', bad))
