"""End to end through a real Mosquitto: `fedpeft-edge aggregate` + three `fedpeft-edge agent` processes.

The sites train a small numpy softmax regression (tests/support/fed_numpy_trainer.py, a real LocalTrainer) on
their own synthetic data; two send top-k int8 updates, the third sends fp32 updates chunked because its
connection allows only ~1 KB packets. After three rounds the final global must equal FedAvg recomputed
offline from the exact envelopes the agents sent.
"""

from __future__ import annotations

from pathlib import Path

import mqtt_fixtures as mf
import numpy as np
import pytest

from fedpeft_edge.central.store import RoundState
from fedpeft_edge.protocol import notices

FLEET = "e2e"
FEATURES = 100  # 303 parameters: an fp32 update (~1.4 KB) needs two chunks under a 1200-byte packet cap


def common_toml(port: int, tmp: Path) -> str:
    return f"""
[connection]
port = {port}
[fleet]
name = "{FLEET}"
[aggregator]
state_dir = "{tmp}/agg"
max_rounds = 3
quorum = 3
min_clients = 3
round_deadline_s = 60
initial_global = "{tmp}/initial.npy"
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
options = {{ features = {FEATURES}, lr = 0.1 }}
"""


def agent_toml(i: int, tmp: Path, *, codec: str = "topk_int8", packet: int | None = None) -> str:
    conn = f"\n[connection]\nport = {{port}}\nmax_packet_size = {packet}\n" if packet else ""
    return f"""
[agent]
client_id = "site-{i}"
state_dir = "{tmp}/site-{i}"
dump_updates = true
idle_exit_s = 60
exit_after_final = true
[codec]
mode = "{codec}"
topk_ratio = 0.25
block = 32
[data]
client_index = {i}
batch_size = 16
""" + conn


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_three_sites_three_rounds_match_offline_fedavg(mosquitto_broker, tmp_path: Path) -> None:
    initial = (0.01 * np.random.default_rng(7).standard_normal(FEATURES * 3 + 3)).astype(np.float32)
    np.save(tmp_path / "initial.npy", initial)
    base = common_toml(mosquitto_broker.port, tmp_path)
    agg_cfg = mf.write_toml(tmp_path / "agg.toml", base)
    procs = [mf.spawn_cli(["aggregate", "--config", str(agg_cfg)], tmp_path / "agg.log")]
    for i in range(3):
        extra = agent_toml(i, tmp_path, codec="fp32", packet=1200) if i == 2 else agent_toml(i, tmp_path)
        # A TOML table may appear once: the chunking site overrides [connection] in its own file.
        text = base.replace(f"[connection]\nport = {mosquitto_broker.port}\n", "") if i == 2 else base
        cfg = mf.write_toml(tmp_path / f"site-{i}.toml",
                            text + extra.replace("{port}", str(mosquitto_broker.port)))
        procs.append(mf.spawn_cli(["agent", "--config", str(cfg)], tmp_path / f"site-{i}.log"))
    try:
        mf.wait_for(lambda: all(p.poll() is not None for p in procs), 90, "all services to finish",
                    interval=0.2, logs=tmp_path)
    finally:
        mf.stop_all(procs)
    logs = {f.name: f.read_text() for f in tmp_path.glob("*.log")}
    assert [p.returncode for p in procs] == [0, 0, 0, 0], logs

    metrics = mf.read_metrics(tmp_path / "agg" / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(sorted(m["participants"]) == ["site-0", "site-1", "site-2"] for m in metrics)
    assert all(m["bytes_in"] > 0 and m["bytes_out"] > 0 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # the federation actually learns

    sent = {i: mf.sent_updates(tmp_path / f"site-{i}") for i in range(3)}
    assert all(sorted(s) == [0, 1, 2] for s in sent.values())
    assert all(not any((tmp_path / f"site-{i}" / "outbox").iterdir()) for i in range(3))  # all acked
    reference = mf.reference_fedavg(initial, [[sent[i][r] for i in range(3)] for r in range(3)])

    state = RoundState.load(tmp_path / "agg")
    assert state is not None and state.round == 3
    np.testing.assert_allclose(state.global_vec, reference, rtol=1e-5, atol=1e-6)
    assert state.counters.get("accepted") == 9 and not state.counters.get("rejected")

    final = mf.retained_global(mosquitto_broker, FLEET)
    assert final.round == 3 and final.meta["final"] is True
    from fedpeft_edge.protocol.codec import decode_global

    np.testing.assert_array_equal(decode_global(final.vector), state.global_vec)
    # The chunked site really was chunked, and its chunks reassembled.
    assert "2 part(s)" in logs["site-2.log"]
    assert "round 2 closed" in logs["agg.log"] and "global published for round 3" in logs["agg.log"]


# --- agent behaviour against a scripted "aggregator" (a plain client publishing globals) -------------
def _publish_global(broker, fleet: str, rnd: int, vec: np.ndarray, spec: str, final: bool = False) -> None:
    from fedpeft_edge.protocol import wire
    from fedpeft_edge.protocol.codec import encode_global
    from fedpeft_edge.protocol.topics import Topics
    from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig

    t = MqttTransport(TransportConfig(host=broker.host, port=broker.port, client_id=f"pub-{fleet}-{rnd}",
                                      clean_start=True))
    t.connect(10)
    msg = wire.GlobalMessage(fleet, rnd, spec, encode_global(vec), {"final": final})
    assert t.publish(Topics(fleet).global_, wire.encode_global(msg), retain=True).wait(5)
    t.close()


def _update_listener(broker, fleet: str, client_id: str | None = None):
    from fedpeft_edge.protocol.topics import Topics
    from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig

    t = MqttTransport(TransportConfig(host=broker.host, port=broker.port,
                                      client_id=client_id or f"listen-{fleet}", clean_start=True))
    t.subscribe(Topics(fleet).updates_filter)
    t.connect(10)
    return t


def _drain_rounds(t, seconds: float) -> list[int]:
    import time

    from fedpeft_edge.protocol import wire

    rounds, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        m = t.get(0.05)
        if m is not None:
            rounds.append(wire.decode_update(m.payload).round)
    return rounds


def _drain_payloads(t, seconds: float) -> list[bytes]:
    import time

    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        m = t.get(0.05)
        if m is not None:
            got.append(m.payload)
    return got


def _agent(broker, fleet: str, tmp: Path, policy: str = "finish", delay: float = 0.0, **agent_kw):
    import fed_numpy_trainer as fnt

    from fedpeft_edge.site.agent import EdgeAgent
    from fedpeft_edge.site.config import load_agent_config

    extra = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in agent_kw.items())
    cfg = load_agent_config(text=f"""
[connection]
port = {broker.port}
[fleet]
name = "{fleet}"
[agent]
client_id = "site-0"
state_dir = "{tmp}/site-0"
newer_global_policy = "{policy}"
exit_after_final = true
{extra}
[codec]
mode = "fp32"
[trainer]
options = {{ step_delay_s = {delay} }}
""")
    s = fnt.make(cfg)
    return EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn)


class _Acker:
    """A scripted aggregator's acknowledgements: acks every update it sees as accepted."""

    def __init__(self, broker, fleet: str) -> None:
        import threading

        from fedpeft_edge.protocol.topics import Topics

        self.topics = Topics(fleet)
        self.t = _update_listener(broker, fleet, client_id=f"acker-{fleet}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import time

        from fedpeft_edge.protocol import wire

        while not self._stop.is_set():
            m = self.t.get(0.05)
            if m is not None:
                upd = wire.decode_update(m.payload)
                ack = notices.AckMessage(upd.fleet, upd.client_id, upd.round, "accepted", "", time.time())
                self.t.publish(self.topics.ack(upd.client_id), notices.encode_ack(ack))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.t.close()


@pytest.mark.slow  # several seconds (real broker, TLS or many examples): full suite only
def test_agent_restart_resends_unacknowledged_never_retrains(mosquitto_broker, tmp_path: Path) -> None:
    fleet, spec = "skip", "00112233aabbccdd"
    _publish_global(mosquitto_broker, fleet, 0, np.zeros(27, np.float32), spec)
    listener = _update_listener(mosquitto_broker, fleet)
    outbox = tmp_path / "site-0" / "outbox"
    try:
        # No aggregator acknowledges: the update stays in the outbox although the broker took it.
        first = _agent(mosquitto_broker, fleet, tmp_path, max_rounds=1, drain_timeout_s=0.5).run(
            connect_timeout=10)
        assert first.rounds_sent == [0] and [f.name for f in outbox.iterdir()] == ["r00000000.msg"]
        acker = _Acker(mosquitto_broker, fleet)
        try:  # next start: the same bytes again, acknowledged this time, never retrained
            second = _agent(mosquitto_broker, fleet, tmp_path, idle_exit_s=1.0).run(connect_timeout=10)
        finally:
            acker.close()
        assert second.rounds_sent == [] and second.last_global_round == 0  # saw round 0, skipped it
        assert not any(outbox.iterdir())
        third = _agent(mosquitto_broker, fleet, tmp_path, idle_exit_s=0.5).run(connect_timeout=10)
        assert third.rounds_sent == []
        copies = _drain_payloads(listener, 0.5)
        assert len(copies) == 2 and copies[0] == copies[1]  # one update, published once per start
    finally:
        listener.close()


@pytest.mark.slow  # long end-to-end run; the fast tier leaves it to the full suite
def test_newer_global_while_training_abandon_vs_finish(mosquitto_broker, tmp_path: Path) -> None:
    import threading
    import time

    for policy in ("abandon", "finish"):
        fleet, spec = f"newer-{policy}", "00112233aabbccdd"
        _publish_global(mosquitto_broker, fleet, 0, np.zeros(27, np.float32), spec)
        listener = _update_listener(mosquitto_broker, fleet)
        agent = _agent(mosquitto_broker, fleet, tmp_path / policy, policy=policy, delay=0.15, max_rounds=2,
                       idle_exit_s=1.5, drain_timeout_s=0.5)
        runner = threading.Thread(target=agent.run, kwargs={"connect_timeout": 10})
        runner.start()
        try:
            mf.wait_for(lambda a=agent: a.last_global_round == 0, 10, "round 0 to start")
            time.sleep(0.2)  # training round 0 (6 steps x 0.15 s)
            _publish_global(mosquitto_broker, fleet, 1, np.ones(27, np.float32), spec)
            runner.join(30)
            got = _drain_rounds(listener, 0.5)
        finally:
            agent.stop()
            runner.join(10)
            listener.close()
        if policy == "abandon":
            assert got == [1] and agent.rounds_sent == [1]  # round 0 dropped mid-training
        else:
            assert got == [0, 1] and agent.rounds_sent == [0, 1]  # round 0 finished and sent (late)


@pytest.mark.slow  # several seconds (real broker, TLS or many examples): full suite only
def test_ort_lora_sites_through_the_cli(mosquitto_broker, tmp_path: Path) -> None:
    """The same federation with the real ORT Training backend: LoRA on a tiny synthetic transformer,
    spec hash from the artifact bundle, initial global = the bundle's initial adapter."""
    from conftest_models import save, transformer_model

    from fedpeft_edge.peft.artifacts import generate_artifacts
    from fedpeft_edge.peft.spec import PeftSpec
    from fedpeft_edge.protocol import wire

    spec = PeftSpec("lora", targets=[r"attention\.self\.(query|value)"], rank=4, head_classes=3)
    bundle = generate_artifacts(save(transformer_model(), tmp_path / "tf.onnx"), spec, tmp_path / "bundle")
    base = f"""
[connection]
port = {mosquitto_broker.port}
[fleet]
name = "ort"
[aggregator]
state_dir = "{tmp_path}/agg"
max_rounds = 2
quorum = 3
round_deadline_s = 60
[codec]
mode = "topk_int8"
topk_ratio = 0.2
block = 64
[trainer]
kind = "factory"
factory = "fed_ort_trainer:make"
bundle_dir = "{bundle.directory}"
"""
    procs = [mf.spawn_cli(["aggregate", "--config", str(mf.write_toml(tmp_path / "agg.toml", base))],
                          tmp_path / "agg.log")]
    for i in range(3):
        cfg = mf.write_toml(tmp_path / f"site-{i}.toml", base + f"""
[agent]
client_id = "site-{i}"
state_dir = "{tmp_path}/site-{i}"
dump_updates = true
idle_exit_s = 60
exit_after_final = true
[data]
client_index = {i}
""")
        procs.append(mf.spawn_cli(["agent", "--config", str(cfg)], tmp_path / f"site-{i}.log"))
    try:
        mf.wait_for(lambda: all(p.poll() is not None for p in procs), 120, "ORT federation to finish",
                    interval=0.2, logs=tmp_path)
    finally:
        mf.stop_all(procs)
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    sent = {i: mf.sent_updates(tmp_path / f"site-{i}") for i in range(3)}
    envelopes = [wire.decode_update(env) for s in sent.values() for env in s.values()]
    assert len(envelopes) == 6 and all(m.spec_hash == bundle.spec_hash for m in envelopes)
    state = RoundState.load(tmp_path / "agg")
    assert state is not None and state.round == 2 and state.fingerprint["spec_hash"] == bundle.spec_hash
    assert state.fingerprint["n_params"] == bundle.num_trainable
    # Initial global = the bundle's initial trainable parameters (as a fresh trainer holds them).
    import fed_ort_trainer

    from fedpeft_edge.site.config import load_agent_config

    initial = fed_ort_trainer.make(load_agent_config(text=base)).trainer.get_flat()
    ref = mf.reference_fedavg(initial, [[sent[i][r] for i in range(3)] for r in range(2)])
    np.testing.assert_allclose(state.global_vec, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # long end-to-end run; the fast tier leaves it to the full suite
def test_federation_over_embedded_amqtt_broker(tmp_path: Path) -> None:
    """Without Mosquitto: the embedded broker (MQTT 3.1.1) carries the same rounds; every client falls
    back from MQTT 5 on its own."""
    import threading

    import fed_numpy_trainer as fnt

    from fedpeft_edge.central.broker import start_local_broker
    from fedpeft_edge.central.config import load_aggregator_config
    from fedpeft_edge.central.service import AggregatorService
    from fedpeft_edge.site.agent import EdgeAgent
    from fedpeft_edge.site.config import load_agent_config

    broker = start_local_broker(prefer="embedded")
    try:
        base = f'[connection]\nport = {broker.port}\n[fleet]\nname = "amqtt"\n'
        svc = AggregatorService(
            load_aggregator_config(text=base + f'[aggregator]\nstate_dir = "{tmp_path}/agg"\n'
                                            "max_rounds = 2\nquorum = 2\n"),
                                initial_global=np.zeros(27, np.float32))
        agents = []
        for i in range(2):
            cfg = load_agent_config(
                text=base + f'[agent]\nclient_id = "site-{i}"\nstate_dir = "{tmp_path}/s{i}"\n'
                              f"idle_exit_s = 20\n[data]\nclient_index = {i}\n")
            s = fnt.make(cfg)
            agents.append(EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn))
        threads = [threading.Thread(target=svc.run, daemon=True)]
        threads += [threading.Thread(target=a.run, daemon=True) for a in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        assert not any(t.is_alive() for t in threads)
        assert svc.core.finished and svc.core.counters["accepted"] == 4
        used = [svc.transport.protocol_used] + [a.transport.protocol_used for a in agents]  # type: ignore[union-attr]
        assert used == ["3.1.1"] * 3
        assert all(a.rounds_sent == [0, 1] for a in agents)
    finally:
        broker.stop()
