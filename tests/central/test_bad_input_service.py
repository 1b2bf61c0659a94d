"""Hostile input through the broker: the aggregator rejects each bad message with a logged, counted
reason, never crashes, and a valid round with two honest sites still completes."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import mqtt_fixtures as mf
import msgpack
import numpy as np
import pytest

from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.protocol import chunking, wire
from fedpeft_edge.protocol.codec import CodecConfig
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.encoder import UpdateEncoder

FLEET = "hostile"
N = 27  # fed_numpy_trainer: 8 features x 3 classes + 3 biases
MAX_UPDATE_BYTES = 64 * 1024


def _toml(port: int, tmp: Path) -> str:
    return f"""
[connection]
port = {port}
[fleet]
name = "{FLEET}"
[aggregator]
state_dir = "{tmp}/agg"
max_rounds = 1
quorum = 2
round_deadline_s = 60
max_update_bytes = {MAX_UPDATE_BYTES}
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
[codec]
mode = "int8"
block = 16
"""


def _hostile_payloads(spec_hash: str) -> dict[str, tuple[bytes, str]]:
    """name -> (payload sent by site "mallory" on its own update topic, expected rejection reason)."""
    enc = UpdateEncoder(CodecConfig(mode="fp32"), N).encode(np.ones(N, np.float32))

    def update(**kw: object) -> bytes:
        fields = {"fleet": FLEET, "round": 0, "client_id": "mallory", "spec_hash": spec_hash,
                  "num_samples": 10, "metrics": {"loss": 1.0}, "update": enc}
        fields.update(kw)
        return wire.encode_update(wire.UpdateMessage(**fields))  # type: ignore[arg-type]

    good = update()
    obj = msgpack.unpackb(good, raw=False)

    def raw(**kw: object) -> bytes:
        return msgpack.packb({**obj, **kw}, use_bin_type=True)

    nan = np.full(N, np.nan, np.float32).tobytes()
    huge_chunk = msgpack.packb({"v": 1, "t": "chunk", "id": "cd" * 16, "i": 0, "n": 10**6, "tl": 2**40,
                                "h": b"\0" * 32, "d": b"x"}, use_bin_type=True)
    return {
        "truncated": (good[: len(good) // 2], "truncated"),
        "empty": (b"", "truncated"),
        "not msgpack": (b"\xc1\xff\x00 definitely not msgpack", "malformed"),
        "oversized": (b"\x00" * (MAX_UPDATE_BYTES + 1), "oversized"),
        "wrong type": (raw(r="0"), "bad_type"),
        "bool as int": (raw(ns=True), "bad_type"),
        "unknown key": (raw(zz=1), "bad_keys"),
        "NaN values": (raw(p=nan, ck=wire.checksum(nan)), "non_finite"),
        "bad checksum": (raw(ck=b"\0" * 8), "checksum"),
        "absurd length": (raw(cd={**obj["cd"], "n": 2**30, "k": 2**30}), "out_of_range"),
        "length mismatch": (raw(cd={**obj["cd"], "n": N - 1, "k": N - 1}), "length_mismatch"),
        "wrong spec hash": (update(spec_hash="ffffffffffffffff"), "spec_hash"),
        "future round": (update(round=7), "future_round"),
        "wrong fleet": (update(fleet="other"), "wrong_fleet"),
        "impersonation": (update(client_id="site-0"), "client_mismatch"),
        "absurd chunk": (huge_chunk, "out_of_range"),
    }


@pytest.mark.slow  # ~1 s: the full suite runs it, the fast tier leaves it out
def test_hostile_messages_are_rejected_and_the_round_completes(mosquitto_broker, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import fed_numpy_trainer as fnt

    caplog.set_level(logging.INFO, logger="fedpeft_edge")
    base = _toml(mosquitto_broker.port, tmp_path)
    svc = AggregatorService(load_aggregator_config(text=base))
    result: list = []
    agg_thread = threading.Thread(target=lambda: result.append(svc.run()), daemon=True)
    agg_thread.start()
    mf.wait_for(lambda: svc.transport is not None and svc.transport.connected, 10, "aggregator")

    mallory = MqttTransport(TransportConfig(host=mosquitto_broker.host, port=mosquitto_broker.port,
                                            client_id="mallory"))
    mallory.connect(10)
    mf.wait_aggregator_listening(svc, mallory, FLEET, "mallory")
    topic = Topics(FLEET).update("mallory")
    cases = _hostile_payloads(svc.spec_hash)
    try:
        for payload, _ in cases.values():
            assert mallory.publish(topic, payload).wait(5)
        # A flood of chunks of never-finished messages: memory stays bounded (oldest evicted).
        for j in range(40):
            part = chunking.split_message(b"y" * 5000, 1000, message_id=f"{j:032x}")[0]
            assert mallory.publish(topic, part).wait(5)
        # A topic level that is no valid client id.
        assert mallory.publish(f"fedpeft/{FLEET}/update/-x", b"x").wait(5)
        expected = {reason for _, reason in cases.values()} | {"bad_topic"}
        mf.wait_for(lambda: expected <= set(svc.rejections) and svc.reassembler.drops.get("evicted", 0) >= 30,
                    15, f"rejections {expected - set(svc.rejections)}")
        assert svc.core.round == 0 and svc.core.accepted_this_round == 0 and agg_thread.is_alive()

        # Two honest sites now complete the round.
        agents, threads = [], []
        for i in range(2):
            cfg = load_agent_config(text=base + f'[agent]\nclient_id = "site-{i}"\n'
                              f'state_dir = "{tmp_path}/site-{i}"\nidle_exit_s = 30\n'
                              'exit_after_final = true\n'
                              f'[data]\nclient_index = {i}\n')
            setup = fnt.make(cfg)
            agent = EdgeAgent(cfg, setup.trainer, setup.train_batches_fn, setup.eval_batches_fn)
            agents.append(agent)
            threads.append(threading.Thread(target=agent.run, daemon=True))
            threads[-1].start()
        agg_thread.join(60)
        for t in threads:
            t.join(30)
    finally:
        svc.stop()
        mallory.close()
    assert not agg_thread.is_alive() and result and result[0].finished
    assert svc.reassembler.pending_messages <= svc.reassembler.max_pending_per_sender
    hist = svc.core.history
    assert len(hist) == 1 and sorted(hist[0]["participants"]) == ["site-0", "site-1"]
    counters = svc.core.counters
    for name, (_, reason) in cases.items():
        assert counters.get(f"rejected:{reason}", 0) >= 1, name
        assert f"rejected ({reason})" in caplog.text, name
    assert sum(v for k, v in counters.items() if k.startswith("rejected:")) == counters["rejected"]
    assert counters["rejected"] >= len(cases)
    assert counters["accepted"] == 2
    metrics = mf.read_metrics(tmp_path / "agg" / "metrics.jsonl")
    assert metrics and metrics[0]["rejected"].get("client_mismatch") == 1


def test_an_account_outside_the_sites_list_is_not_counted(mosquitto_broker, tmp_path: Path) -> None:
    """A well-formed update from a valid account that is no site of the federation: rejected, acked as
    rejected to that account, and the round still waits for its real sites."""
    sites = 'quorum = 2\nsites = ["site-0", "site-1"]\n'
    toml = _toml(mosquitto_broker.port, tmp_path).replace("quorum = 2\n", sites)
    svc = AggregatorService(load_aggregator_config(text=toml))
    agg_thread = threading.Thread(target=svc.run, daemon=True)
    agg_thread.start()
    mf.wait_for(lambda: svc.transport is not None and svc.transport.connected, 10, "aggregator")
    mallory = MqttTransport(TransportConfig(host=mosquitto_broker.host, port=mosquitto_broker.port,
                                            client_id="mallory"))
    mallory.subscribe(Topics(FLEET).ack("mallory"))
    mallory.connect(10)
    mf.wait_aggregator_listening(svc, mallory, FLEET, "mallory")
    try:
        enc = UpdateEncoder(CodecConfig(mode="fp32"), N).encode(np.ones(N, np.float32))
        valid = wire.encode_update(wire.UpdateMessage(FLEET, 0, "mallory", svc.spec_hash, 10, {}, enc))
        assert mallory.publish(Topics(FLEET).update("mallory"), valid).wait(5)
        mf.wait_for(lambda: svc.core.counters.get("rejected:unknown_site", 0) == 1, 15, "the rejection")
        ack = mallory.get(timeout=10)
        assert ack is not None and b"rejected" in ack.payload
        assert svc.core.accepted_this_round == 0 and svc.core.round == 0
    finally:
        svc.stop()
        agg_thread.join(10)
        mallory.close()
