"""Faults through a real Mosquitto with the CLI services as separate processes.

- kill -9 of the aggregator in the middle of a round, then a restart from its state dir;
- the broker stopped and restarted in the middle of a round;
- a site whose uplink is cut while training (its process then killed) and restarted later;
- the same update delivered twice.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import mqtt_fixtures as mf
import numpy as np
import pytest

from fedpeft_edge.central.broker import BrokerHandle, start_local_broker
from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.central.store import RoundState
from fedpeft_edge.protocol import chunking, wire
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.site.encoder import UpdateEncoder

FEATURES = 8
N_PARAMS = FEATURES * 3 + 3


@pytest.fixture
def broker() -> BrokerHandle:
    """A broker of its own per test: some tests stop and restart it."""
    mf.require_mosquitto()
    h = start_local_broker(prefer="mosquitto")
    yield h
    h.stop()


def _base(port: int, tmp: Path, fleet: str, *, rounds: int = 3, quorum: int = 3,
          min_clients: int | None = None, late: str = "drop", deadline: float = 60, delay: float = 0.0,
          proxy_port: int | None = None) -> str:
    return f"""
[connection]
port = {proxy_port or port}
reconnect_max_s = 1
[fleet]
name = "{fleet}"
[aggregator]
state_dir = "{tmp}/agg"
max_rounds = {rounds}
quorum = {quorum}
min_clients = {min_clients or quorum}
round_deadline_s = {deadline}
late_policy = "{late}"
max_staleness = 4
initial_global = "{tmp}/initial.npy"
[codec]
mode = "topk_int8"
topk_ratio = 0.5
block = 16
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
options = {{ features = {FEATURES}, step_delay_s = {delay} }}
"""


def _agent(i: int, tmp: Path) -> str:
    return f"""
[agent]
client_id = "site-{i}"
state_dir = "{tmp}/site-{i}"
dump_updates = true
idle_exit_s = 40
exit_after_final = true
[data]
client_index = {i}
batch_size = 16
"""


def _initial(tmp: Path) -> np.ndarray:
    initial = (0.01 * np.random.default_rng(3).standard_normal(N_PARAMS)).astype(np.float32)
    np.save(tmp / "initial.npy", initial)
    return initial


def _spawn_agent(tmp: Path, i: int, base: str) -> object:
    cfg = mf.write_toml(tmp / f"site-{i}.toml", base + _agent(i, tmp))
    return mf.spawn_cli(["agent", "--config", str(cfg)], tmp / f"site-{i}.log")


def _log(tmp: Path, name: str) -> str:
    p = tmp / f"{name}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def _finish(procs: list, tmp: Path, timeout: float = 60) -> None:
    try:
        mf.wait_for(lambda: all(p.poll() is not None for p in procs), timeout, "services to finish",
                    interval=0.2, logs=tmp)
    finally:
        mf.stop_all(procs)


def _assert_matches_reference(tmp: Path, initial: np.ndarray, rounds: int, sites: int = 3) -> RoundState:
    sent = {i: mf.sent_updates(tmp / f"site-{i}") for i in range(sites)}
    ref = mf.reference_fedavg(initial, [[sent[i][r] for i in range(sites)] for r in range(rounds)])
    state = RoundState.load(tmp / "agg")
    assert state is not None and state.round == rounds
    np.testing.assert_allclose(state.global_vec, ref, rtol=1e-5, atol=1e-6)
    return state


@pytest.mark.slow  # long end-to-end run; the fast tier leaves it to the full suite
def test_aggregator_kill9_mid_round_resumes_without_double_counting(broker: BrokerHandle,
                                                                   tmp_path: Path) -> None:
    initial = _initial(tmp_path)
    base = _base(broker.port, tmp_path, "kill9", delay=0.02)
    agg_cfg = mf.write_toml(tmp_path / "agg.toml", base)
    agg = mf.spawn_cli(["aggregate", "--config", str(agg_cfg)], tmp_path / "agg.log")
    # site-2 trains slowly: round 1 is open with some updates in when the aggregator dies.
    slow = base.replace("step_delay_s = 0.02", "step_delay_s = 0.25")
    agents = [_spawn_agent(tmp_path, 0, base), _spawn_agent(tmp_path, 1, base),
              _spawn_agent(tmp_path, 2, slow)]
    procs = [agg, *agents]
    try:
        mf.wait_for(lambda: "for round 1 accepted" in _log(tmp_path, "agg"), 40, "a round-1 update",
                    procs=procs, logs=tmp_path)
        agg.send_signal(signal.SIGKILL)
        agg.wait(10)
        assert "round 1 closed" not in _log(tmp_path, "agg")  # it really died mid-round
        time.sleep(0.5)  # updates published now wait in the broker's queue for the aggregator's session
        agg2 = mf.spawn_cli(["aggregate", "--config", str(agg_cfg)], tmp_path / "agg-restarted.log")
        procs.append(agg2)
        _finish([agg2, *agents], tmp_path)
    finally:
        mf.stop_all(procs)
    assert [p.returncode for p in (agg2, *agents)] == [0, 0, 0, 0]
    restarted = _log(tmp_path, "agg-restarted")
    assert "aggregator for fleet kill9: round 1" in restarted  # resumed, not started over
    state = _assert_matches_reference(tmp_path, initial, rounds=3)
    assert state.counters["accepted"] == 9  # 3 sites x 3 rounds, each exactly once
    assert len(state.history) == 3


@pytest.mark.slow  # long end-to-end run; the fast tier leaves it to the full suite
def test_broker_restart_mid_round_everyone_reconnects(broker: BrokerHandle, tmp_path: Path) -> None:
    initial = _initial(tmp_path)
    base = _base(broker.port, tmp_path, "brk", delay=0.1)
    agg_cfg = mf.write_toml(tmp_path / "agg.toml", base)
    procs = [mf.spawn_cli(["aggregate", "--config", str(agg_cfg)], tmp_path / "agg.log")]
    procs += [_spawn_agent(tmp_path, i, base) for i in range(3)]
    try:
        mf.wait_for(lambda: "round 1 started" in _log(tmp_path, "site-0"), 40, "round 1 to start",
                    procs=procs, logs=tmp_path)
        broker.stop(keep_dir=True)  # mid-round: sites are training round 1
        time.sleep(1.5)
        broker.restart()
        _finish(procs, tmp_path)
    finally:
        mf.stop_all(procs)
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    for name in ("agg", "site-0", "site-1", "site-2"):
        assert "disconnected from broker" in _log(tmp_path, name), name
    state = _assert_matches_reference(tmp_path, initial, rounds=3)
    assert state.counters["accepted"] == 9


@pytest.mark.slow  # long end-to-end run; the fast tier leaves it to the full suite
def test_offline_site_stores_update_and_delivers_it_late(broker: BrokerHandle, tmp_path: Path) -> None:
    """site-2's uplink is cut while it trains round 0; its update waits in the outbox; the process is
    killed; after restart (uplink back) the stored update is sent and counted under the late policy."""
    _initial(tmp_path)
    proxy = mf.TcpProxy(broker.port)
    # Sites 0 and 1 keep rounds 1-4 going for ~6 s: time for site-2 to come back before the end.
    base = _base(broker.port, tmp_path, "late", rounds=5, quorum=2, late="stale_weighted", delay=0.25)
    via_proxy = base.replace(f"port = {broker.port}\n", f"port = {proxy.port}\n", 1)
    via_proxy = via_proxy.replace("step_delay_s = 0.25", "step_delay_s = 0.4")
    agg_cfg = mf.write_toml(tmp_path / "agg.toml", base)
    procs = [mf.spawn_cli(["aggregate", "--config", str(agg_cfg)], tmp_path / "agg.log"),
             _spawn_agent(tmp_path, 0, base), _spawn_agent(tmp_path, 1, base)]
    site2 = _spawn_agent(tmp_path, 2, via_proxy)
    outbox = tmp_path / "site-2" / "outbox" / "r00000000.msg"
    try:
        mf.wait_for(lambda: "round 0 started" in _log(tmp_path, "site-2"), 30, "site-2 to start training",
                    procs=[*procs, site2], logs=tmp_path)
        proxy.cut()
        mf.wait_for(outbox.exists, 30, "site-2's update in its outbox", procs=[site2], logs=tmp_path)
        time.sleep(0.3)
        site2.send_signal(signal.SIGKILL)  # the update was never acknowledged: it must survive on disk
        site2.wait(10)
        assert outbox.exists()
        mf.wait_for(lambda: "round 0 closed" in _log(tmp_path, "agg"), 30, "round 0 to close without site-2",
                    procs=procs, logs=tmp_path)
        proxy.restore()
        site2b = _spawn_agent(tmp_path, 2, via_proxy)
        procs.append(site2b)
        _finish(procs, tmp_path, timeout=60)
    finally:
        mf.stop_all([*procs, site2])
        proxy.close()
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [p.returncode for p in procs]
    resumed = "resuming: last update sent for round 0, 1 update(s) waiting in the outbox"
    assert resumed in _log(tmp_path, "site-2")
    state = RoundState.load(tmp_path / "agg")
    assert state is not None and state.round == 5
    assert ("site-2", 0) in state.accepted and state.accepted[("site-2", 0)] >= 1  # counted in a later round
    assert state.counters.get("late_accepted", 0) >= 1
    assert sum(m["late_accepted"] for m in state.history) == state.counters["late_accepted"]
    assert not outbox.exists()  # acknowledged this time, so removed
    # Nothing twice, nothing invented: each counted (site, round) is an update that site really made.
    made = {(f"site-{i}", r) for i in range(3) for r in mf.sent_updates(tmp_path / f"site-{i}")}
    assert state.counters["accepted"] == len(state.accepted)
    assert set(state.accepted) <= made


def test_duplicate_delivery_counts_once(broker: BrokerHandle, tmp_path: Path) -> None:
    cfg = load_aggregator_config(text=_base(broker.port, tmp_path, "dup", quorum=3))
    svc = AggregatorService(cfg, initial_global=np.zeros(N_PARAMS, np.float32))
    runner = threading.Thread(target=svc.run, daemon=True)
    runner.start()
    topics = Topics("dup")
    pub = MqttTransport(TransportConfig(host=broker.host, port=broker.port, client_id="site-0",
                                        max_packet_size=1200))
    pub.connect(10)
    try:
        rng = np.random.default_rng(0)
        enc = UpdateEncoder(CodecConfig(mode="fp32"), N_PARAMS).encode(rng.standard_normal(N_PARAMS))
        msg = wire.UpdateMessage("dup", 0, "site-0", svc.spec_hash, 10, {"loss": 1.0}, enc)
        data = wire.encode_update(msg)
        mf.wait_for(lambda: svc.transport is not None and svc.transport.connected, 10, "aggregator")
        # else the first copy may be published before the aggregator's SUBACK, and never counted
        mf.wait_aggregator_listening(svc, pub, "dup", "site-0")
        for _ in range(2):
            assert pub.publish(topics.update("site-0"), data).wait(5)
        # The same chunked message twice (same message id, as an agent's resend does).
        enc2 = UpdateEncoder(CodecConfig(mode="fp32"), N_PARAMS).encode(rng.standard_normal(N_PARAMS))
        big = wire.encode_update(wire.UpdateMessage("dup", 0, "site-1", svc.spec_hash, 10, {}, enc2))
        parts = chunking.split_message(big, 200, message_id="ab" * 16)
        assert len(parts) > 1
        for _ in range(2):
            for p in parts:
                assert pub.publish(topics.update("site-1"), p).wait(5)
        mf.wait_for(lambda: svc.core.accepted_this_round == 2 and svc.core.counters.get("duplicate", 0) >= 1
                    and svc.reassembler.drops.get("late_chunk", 0) == len(parts), 30, "both copies")
    finally:
        svc.stop()
        runner.join(10)
        pub.close()
    c = svc.core.counters
    assert c["accepted"] == 2 and c["duplicate"] == 1
    assert svc.core.round == 0  # quorum 3 not reached: the duplicate did not count as a third update
