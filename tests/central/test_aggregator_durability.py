"""Aggregator crash safety through a real Mosquitto: what is acknowledged, what survives a kill -9.

- a chunked update half received (its chunks already acknowledged) when the aggregator is kill -9'd
  is completed after the restart and counted exactly once;
- a message that makes processing fail unexpectedly is acknowledged (never redelivered) and
  quarantined, while a failure to persist acknowledges nothing and the next start counts it;
- a resumed round gets its full deadline again.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import mqtt_fixtures as mf
import numpy as np
import pytest

from fedpeft_edge.central.accumulator import RoundAccumulator
from fedpeft_edge.central.broker import BrokerHandle
from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.central.store import RoundState, StateError
from fedpeft_edge.protocol import chunk_spool, chunking, wire
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.config import default_spec_hash
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.site.encoder import UpdateEncoder

N = 2000  # fp32 update of 8 KB: 30+ chunks at a 400-byte payload budget


def _toml(port: int, tmp: Path, fleet: str, *, quorum: int = 2, min_clients: int | None = None,
          deadline: float = 60, rounds: int = 1) -> str:
    return f"""
[connection]
port = {port}
reconnect_max_s = 1
[fleet]
name = "{fleet}"
[aggregator]
client_id = "agg-{fleet}"
state_dir = "{tmp}/agg"
max_rounds = {rounds}
quorum = {quorum}
min_clients = {min_clients or quorum}
round_deadline_s = {deadline}
initial_global = "{tmp}/initial.npy"
"""


def _initial(tmp: Path) -> np.ndarray:
    g = (0.01 * np.random.default_rng(5).standard_normal(N)).astype(np.float32)
    np.save(tmp / "initial.npy", g)
    return g


def _update(fleet: str, client: str, seed: int, samples: int = 10, rnd: int = 0) -> bytes:
    enc = UpdateEncoder(CodecConfig(mode="fp32"), N).encode(
        np.random.default_rng(seed).standard_normal(N).astype(np.float32) * 0.01)
    return wire.encode_update(wire.UpdateMessage(fleet, rnd, client, default_spec_hash(N), samples,
                                                 {"loss": 1.0}, enc))


def _site(broker: BrokerHandle, client: str) -> MqttTransport:
    t = MqttTransport(TransportConfig(host=broker.host, port=broker.port, client_id=client,
                                      clean_start=True, max_packet_size=65536))
    t.connect(10)
    return t


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _spooled_records(spool_dir: Path) -> int:
    files = list(spool_dir.glob("*.spool"))
    return sum(len(parsed[1]) for f in files if (parsed := chunk_spool.read_spool_file(f)) is not None)


@pytest.mark.slow  # several seconds (real broker, TLS or many examples): full suite only
def test_kill9_with_a_half_received_chunked_update(mosquitto_broker: BrokerHandle, tmp_path: Path) -> None:
    fleet = "chunkkill"
    initial = _initial(tmp_path)
    cfg = mf.write_toml(tmp_path / "agg.toml", _toml(mosquitto_broker.port, tmp_path, fleet))
    agg = mf.spawn_cli(["aggregate", "--config", str(cfg)], tmp_path / "agg.log")
    procs = [agg]
    env0, env1 = _update(fleet, "site-0", 1), _update(fleet, "site-1", 2, samples=30)
    parts = chunking.split_message(env1, 400)
    assert len(parts) > 20  # more than Mosquitto's default in-flight window
    topics = Topics(fleet)
    site0, site1 = _site(mosquitto_broker, "site-0"), _site(mosquitto_broker, "site-1")
    acked_before_kill = 12
    try:
        mf.wait_for(lambda: "global published for round 0" in _log(tmp_path / "agg.log"), 30,
                    "the aggregator to start", procs=procs, logs=tmp_path)
        for p in parts[:acked_before_kill]:
            assert site1.publish(topics.update("site-1"), p).wait(5)
        mf.wait_for(lambda: _spooled_records(tmp_path / "agg" / "chunks") >= acked_before_kill, 20,
                    "the first chunks in the aggregator's spool", procs=procs, logs=tmp_path)
        time.sleep(1.0)  # the PUBACKs go out right after the batch is synced and checkpointed
        agg.send_signal(signal.SIGKILL)
        agg.wait(10)
        # The rest (and the other site's update) arrive while the aggregator is down: the broker queues
        # them in its persistent session.
        for p in parts[acked_before_kill:]:
            assert site1.publish(topics.update("site-1"), p).wait(5)
        assert site0.publish(topics.update("site-0"), env0).wait(5)
        agg2 = mf.spawn_cli(["aggregate", "--config", str(cfg)], tmp_path / "agg-restarted.log")
        procs.append(agg2)
        mf.wait_for(lambda: agg2.poll() is not None, 60, "the restarted aggregator to finish", procs=procs,
                    logs=tmp_path)
    finally:
        mf.stop_all(procs)
        site0.close()
        site1.close()
    assert agg2.returncode == 0
    assert "round 0 closed" not in _log(tmp_path / "agg.log")
    restarted = _log(tmp_path / "agg-restarted.log")
    assert "restored" in restarted and "spooled chunk(s) of 1 message(s)" in restarted
    metrics = mf.read_metrics(tmp_path / "agg" / "metrics.jsonl")
    assert len(metrics) == 1 and sorted(metrics[0]["participants"]) == ["site-0", "site-1"]
    # Chunks acknowledged before the kill come back from the spool, not from the broker.
    assert metrics[0]["chunk_drops"].get("duplicate_chunk", 0) < acked_before_kill
    state = RoundState.load(tmp_path / "agg")
    assert state is not None and state.round == 1
    assert state.counters["accepted"] == 2 and state.counters.get("duplicate", 0) == 0
    ref = mf.reference_fedavg(initial, [[env0, env1]])
    np.testing.assert_allclose(state.global_vec, ref, rtol=1e-5, atol=1e-6)
    assert list((tmp_path / "agg" / "chunks").glob("*.spool")) == []  # consumed → forgotten


class _Runner:
    """``svc.run()`` in a thread, keeping its exception."""

    def __init__(self, svc: AggregatorService) -> None:
        self.svc, self.error = svc, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        mf.wait_for(lambda: svc.serving.is_set() or not self.thread.is_alive(), 15, "aggregator")
        time.sleep(0.2)  # subscriptions acknowledged

    def _run(self) -> None:
        try:
            self.svc.run()
        except BaseException as exc:  # the test inspects it
            self.error = exc

    def stop(self) -> None:
        self.svc.stop()
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.mark.slow  # ~1 s: the full suite runs it, the fast tier leaves it out
def test_unexpected_error_is_acknowledged_and_quarantined(mosquitto_broker: BrokerHandle, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = "poison"
    _initial(tmp_path)
    cfg = load_aggregator_config(text=_toml(mosquitto_broker.port, tmp_path, fleet, quorum=3))
    poison, ok1, ok2 = _update(fleet, "mallory", 3), _update(fleet, "site-0", 4), _update(fleet, "site-1", 5)
    real_decode = wire.decode_update

    def buggy_decode(data: bytes, limits: wire.WireLimits | None = None) -> wire.UpdateMessage:
        if b"mallory" in data:  # stands for a bug some specific bytes trigger
            raise RuntimeError("decoder bug")
        return real_decode(data, limits)

    monkeypatch.setattr(wire, "decode_update", buggy_decode)
    topics = Topics(fleet)
    site = _site(mosquitto_broker, "tester")
    try:
        run = _Runner(AggregatorService(cfg))
        assert site.publish(topics.update("mallory"), poison).wait(5)
        assert site.publish(topics.update("site-0"), ok1).wait(5)
        mf.wait_for(lambda: run.svc.core.accepted_this_round == 1, 10, "the good update")
        run.stop()
        assert run.error is None
        assert run.svc.rejections["internal_error"] == 1
        quarantined = list((tmp_path / "agg" / "quarantine").glob("*.msg"))
        assert [q.read_bytes() for q in quarantined] == [poison]
        # Next start: the poison message was acknowledged, so it is not delivered again; a new message
        # published after the start arrives after anything the broker still had queued.
        run2 = _Runner(AggregatorService(cfg))
        assert site.publish(topics.update("site-1"), ok2).wait(5)
        mf.wait_for(lambda: run2.svc.core.accepted_this_round == 2, 10, "the second good update")
        run2.stop()
    finally:
        site.close()
    assert run2.error is None and run2.svc.rejections == {}
    state = RoundState.load(tmp_path / "agg")
    assert state is not None
    assert state.counters["rejected:internal_error"] == 1 and state.counters["accepted"] == 2


@pytest.mark.slow  # ~1 s: the full suite runs it, the fast tier leaves it out
@pytest.mark.parametrize("failing", ["round_state", "chunk_spool", "accumulate"])
def test_persistence_failure_acknowledges_nothing(mosquitto_broker: BrokerHandle, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    fleet = f"nosave-{failing.replace('_', '-')}"
    initial = _initial(tmp_path)
    cfg = load_aggregator_config(text=_toml(mosquitto_broker.port, tmp_path, fleet, quorum=2))
    broken = threading.Event()
    if failing == "round_state":
        real_save = RoundState.save

        def save(self: RoundState, directory: object) -> Path:
            if broken.is_set():
                raise OSError(28, "No space left on device")
            return real_save(self, directory)  # type: ignore[arg-type]

        monkeypatch.setattr(RoundState, "save", save)
    elif failing == "accumulate":  # fails half-way through counting: memory can no longer be trusted
        real_acc = RoundAccumulator.accumulate

        def accumulate(self: RoundAccumulator, *args: object, **kw: object) -> None:
            if broken.is_set():
                raise MemoryError("cannot allocate")
            real_acc(self, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(RoundAccumulator, "accumulate", accumulate)
    else:
        real_sync = chunk_spool.ChunkSpool.sync

        def sync(self: chunk_spool.ChunkSpool) -> None:
            if broken.is_set() and self._dirty:
                raise chunk_spool.SpoolError("fsync failed: I/O error")
            real_sync(self)

        monkeypatch.setattr(chunk_spool.ChunkSpool, "sync", sync)
    topics = Topics(fleet)
    env0, env1 = _update(fleet, "site-0", 6), _update(fleet, "site-1", 7, samples=20)
    site = _site(mosquitto_broker, "tester")
    try:
        run = _Runner(AggregatorService(cfg))
        broken.set()
        for p in chunking.split_message(env1, 400):
            assert site.publish(topics.update("site-1"), p).wait(5)
        assert site.publish(topics.update("site-0"), env0).wait(5)
        run.thread.join(15)
        assert isinstance(run.error, StateError | chunk_spool.SpoolError)  # stopped, nothing acknowledged
        saved = RoundState.load(tmp_path / "agg")
        assert saved is not None and saved.counters.get("accepted", 0) == 0
        broken.clear()
        # The next start gets every message again from the broker and counts each once.
        run2 = _Runner(AggregatorService(cfg))
        run2.thread.join(20)
    finally:
        site.close()
    assert run2.error is None and not run2.thread.is_alive()
    state = RoundState.load(tmp_path / "agg")
    assert state is not None and state.round == 1 and state.counters["accepted"] == 2
    np.testing.assert_allclose(state.global_vec, mf.reference_fedavg(initial, [[env0, env1]]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_resumed_round_gets_its_deadline_again(mosquitto_broker: BrokerHandle, tmp_path: Path) -> None:
    fleet = "outage"
    _initial(tmp_path)
    cfg = load_aggregator_config(text=_toml(mosquitto_broker.port, tmp_path, fleet, quorum=3, min_clients=1,
                                 deadline=60, rounds=2))
    # Before the outage: round 0 open since long ago with one update counted (min_clients = 1).
    first = AggregatorService(cfg)
    first.core.restart_round_clock(now=time.time() - 10_000)
    assert first.core.offer(wire.decode_update(_update(fleet, "site-0", 8))).accepted
    first.core.checkpoint()
    started = time.time()
    run = _Runner(AggregatorService(cfg))
    time.sleep(1.0)  # a few loop turns: with the old clock the deadline has long passed
    run.stop()
    assert run.error is None
    core = run.svc.core
    assert core.round == 0 and core.accepted_this_round == 1  # still open, waiting for the others
    assert core.round_started_at >= started
    saved = RoundState.load(tmp_path / "agg")
    assert saved is not None and saved.round_started_at >= started  # the new clock is persisted
    g = mf.retained_global(mosquitto_broker, fleet)
    assert g.round == 0 and g.meta["final"] is False and g.meta["max_rounds"] == 2
    assert g.meta["server_optimizer"] == "fedavg"  # one builder for the global: the core's
