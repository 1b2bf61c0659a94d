"""A site's info card (site/info_card.py): its fields, and the agent publishing it retained on
``fedpeft/<fleet>/info/<site>`` on connect (and again once it adopts the aggregator's spec hash),
through a real Mosquitto."""

from __future__ import annotations

import logging
import platform
import threading
from pathlib import Path

import fed_numpy_trainer as fnt
import numpy as np
import pytest
from mqtt_fixtures import drain

from fedpeft_edge import __version__
from fedpeft_edge.central.broker import BrokerHandle
from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import encode_global
from fedpeft_edge.protocol.fleet_report import decode_info, encode_info
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.runtime.ort_import import runtime_label
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.info_card import InfoCard, runtime_description, site_info

BUNDLE = "ab" * 32
SPEC = "4f1c" * 8


def test_site_info_fields_and_round_trip() -> None:
    info = site_info("site-1", bundle=BUNDLE, spec=SPEC, now=5.0)
    assert (info.site, info.bundle, info.spec, info.time) == ("site-1", BUNDLE, SPEC, 5.0)
    assert info.runtime == runtime_label() == runtime_description()
    assert info.version == __version__ and info.python == platform.python_version()
    assert info.platform == f"{platform.system()} {platform.machine()}"
    assert decode_info(encode_info(info)) == info
    bare = site_info("site-1", bundle=None, spec=None)
    assert bare.bundle is None and bare.spec == "" and bare.time > 0
    assert site_info("site-1", bundle="not-a-bundle-id", spec=SPEC).bundle is None


class _BrokenTransport:
    def publish(self, *a: object, **k: object) -> None:
        raise RuntimeError("link down")


def test_publishing_the_card_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fedpeft_edge.site.info_card")
    InfoCard("site-1", None).publish(_BrokenTransport(), Topics("f"), SPEC)  # type: ignore[arg-type]
    assert "site info card not published: link down" in caplog.text


def _agent(broker: BrokerHandle, fleet: str, tmp_path: Path, **kw: object) -> EdgeAgent:
    cfg = load_agent_config(text=f"""
[connection]
port = {broker.port}
[fleet]
name = "{fleet}"
[agent]
client_id = "site-0"
state_dir = "{tmp_path}/site-0"
idle_exit_s = 0.5
exit_after_final = true
drain_timeout_s = 1
""")
    s = fnt.make(cfg)
    return EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn, **kw)  # type: ignore[arg-type]


def _reader(broker: BrokerHandle, topic: str) -> MqttTransport:
    t = MqttTransport(TransportConfig(host=broker.host, port=broker.port, client_id="info-reader",
                                      clean_start=True))
    t.subscribe(topic)
    t.connect(10)
    return t


@pytest.mark.slow  # > 1 s: the full suite runs it, the fast tier leaves it out
def test_agent_publishes_its_card_retained_on_connect(mosquitto_broker: BrokerHandle, tmp_path: Path) -> None:
    topics = Topics("info-card")
    agent = _agent(mosquitto_broker, topics.fleet, tmp_path, spec_hash=SPEC, bundle_id=BUNDLE)
    runner = threading.Thread(target=lambda: agent.run(connect_timeout=10), daemon=True)
    runner.start()
    runner.join(15)
    assert not runner.is_alive()
    reader = _reader(mosquitto_broker, topics.info_filter)  # after the agent left: the card is retained
    try:
        got = drain(reader, 0.5)
        assert [t for t, _ in got] == [topics.info("site-0")]
        card = decode_info(got[0][1])
        assert (card.site, card.bundle, card.spec, card.version) == ("site-0", BUNDLE, SPEC, __version__)
        assert card.runtime == runtime_description()
    finally:
        reader.publish(topics.info("site-0"), b"", retain=True).wait(5)
        reader.close()


@pytest.mark.slow  # ~1 s: the full suite runs it, the fast tier leaves it out
def test_the_card_says_the_spec_hash_once_adopted_from_the_aggregator(mosquitto_broker: BrokerHandle,
                                                                     tmp_path: Path) -> None:
    topics = Topics("info-adopt")
    agg = _reader(mosquitto_broker, topics.info("site-0"))
    g = wire.GlobalMessage(topics.fleet, 0, SPEC, encode_global(np.zeros(27, np.float32)), {"final": True})
    assert agg.publish(topics.global_, wire.encode_global(g), retain=True).wait(5)
    agent = _agent(mosquitto_broker, topics.fleet, tmp_path)  # no spec hash of its own
    try:
        result = agent.run(connect_timeout=10)
        assert result.reason == "final round announced" and agent.spec_hash == SPEC
        cards = [decode_info(p) for _, p in drain(agg, 0.5)]
        assert [c.spec for c in cards] == ["", SPEC]  # on connect, then once it knew
    finally:
        agg.publish(topics.global_, b"", retain=True).wait(5)
        agg.publish(topics.info("site-0"), b"", retain=True).wait(5)
        agg.close()
