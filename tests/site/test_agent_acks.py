"""An agent keeps its update until the aggregator acknowledges it, through a real Mosquitto.

A scripted aggregator (plain clients) publishes the global and plays with the acknowledgements: none
for a while (the agent resends on its timer, same bytes each time), then bad ones (unreadable, too
large, for another site or fleet, for another round — each ignored with a log line, never a crash),
then a good one, after which the update leaves the outbox and the agent's final drain ends at once.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import fed_numpy_trainer as fnt
import numpy as np
import pytest

from fedpeft_edge.central.broker import BrokerHandle
from fedpeft_edge.protocol import notices, wire
from fedpeft_edge.protocol.codec import encode_global
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config

FLEET, SPEC = "acks", "00112233aabbccdd"


def _client(broker: BrokerHandle, name: str) -> MqttTransport:
    return MqttTransport(TransportConfig(host=broker.host, port=broker.port, client_id=name,
                                         clean_start=True))


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_update_stays_until_a_valid_ack_and_bad_acks_are_ignored(mosquitto_broker: BrokerHandle,
                                                                 tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    topics = Topics(FLEET)
    agg = _client(mosquitto_broker, "acks-aggregator")
    agg.subscribe(topics.updates_filter)
    agg.connect(10)
    g = wire.GlobalMessage(FLEET, 0, SPEC, encode_global(np.zeros(27, np.float32)), {"final": False})
    assert agg.publish(topics.global_, wire.encode_global(g), retain=True).wait(5)
    cfg = load_agent_config(text=f"""
[connection]
port = {mosquitto_broker.port}
[fleet]
name = "{FLEET}"
[agent]
client_id = "site-0"
state_dir = "{tmp_path}/site-0"
max_rounds = 1
resend_after_s = 0.3
drain_timeout_s = 30
""")
    s = fnt.make(cfg)
    agent = EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn)
    result: list[object] = []
    runner = threading.Thread(target=lambda: result.append(agent.run(connect_timeout=10)), daemon=True)
    outbox = tmp_path / "site-0" / "outbox" / "r00000000.msg"
    caplog.set_level(logging.INFO, logger="fedpeft_edge.site.agent")
    runner.start()
    try:
        first = agg.get(10)
        assert first is not None and wire.decode_update(first.payload).round == 0
        # No ack: the timer resends (0.3 s, then 0.6 s...), always the same bytes.
        copies = [first.payload]
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            m = agg.get(0.05)
            if m is not None:
                copies.append(m.payload)
        assert len(copies) >= 3 and len(set(copies)) == 1
        assert outbox.exists() and runner.is_alive()

        def ack(**kw: object) -> bytes:
            fields = {"fleet": FLEET, "site": "site-0", "round": 0, "status": "accepted", "reason": "",
                      "time": time.time()} | kw
            return notices.encode_ack(notices.AckMessage(**fields))  # type: ignore[arg-type]

        bad = [b"", b"not json", b"{" * 600, b'{"v":1,"t":"ack"}', ack(site="site-1"), ack(fleet="other"),
               ack(round=7), ack(round=None, msg="cd" * 16)]
        for payload in bad:
            assert agg.publish(topics.ack("site-0"), payload).wait(5)
        time.sleep(0.5)
        assert outbox.exists() and runner.is_alive(), "a bad ack removed the update or stopped the agent"
        t_ack = time.monotonic()
        assert agg.publish(topics.ack("site-0"), ack(status="duplicate", reason="already counted")).wait(5)
        runner.join(10)
        assert not runner.is_alive() and time.monotonic() - t_ack < 5  # the drain ended on the ack
    finally:
        agent.stop()
        runner.join(10)
        agg.publish(topics.global_, b"", retain=True).wait(5)  # clear the retained global
        agg.close()
    assert result and result[0].rounds_sent == [0]  # type: ignore[attr-defined]
    assert not outbox.exists() and agent.ack_counts == {"duplicate": 1} and agent.resends >= 2
    text = caplog.text
    assert text.count("ignoring an unreadable acknowledgement") == 4
    assert text.count("ignoring an acknowledgement addressed to") == 2
    assert "acknowledged by the aggregator: duplicate (already counted)" in text
