"""paho transport against a real Mosquitto: QoS 1, persistent sessions, manual ack, reconnect, limits."""

from __future__ import annotations

import time

import pytest

from fedpeft_edge.central.broker import start_local_broker
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig, TransportError
from fedpeft_edge.runtime.errors import InvalidValueError


def _t(broker, cid: str, **kw) -> MqttTransport:
    kw.setdefault("reconnect_max", 1)
    return MqttTransport(TransportConfig(host=broker.host, port=broker.port, client_id=cid, **kw))


def test_publish_subscribe_roundtrip_and_puback(mosquitto_broker) -> None:
    sub, pub = _t(mosquitto_broker, "rt-sub", clean_start=True), _t(mosquitto_broker, "rt-pub")
    sub.subscribe("rt/+")
    sub.connect(10)
    pub.connect(10)
    try:
        time.sleep(0.2)
        h = pub.publish("rt/a", b"\x00payload\xff")
        assert h.wait(5) and h.is_published()
        m = sub.get(5)
        assert m is not None and (m.topic, m.payload, m.qos) == ("rt/a", b"\x00payload\xff", 1)
        assert pub.protocol_used == "5"
    finally:
        sub.close()
        pub.close()


def test_connack_maximum_packet_size_caps_payload() -> None:
    h = start_local_broker(prefer="mosquitto", max_packet_size=20_000)
    try:
        t = _t(h, "mps")
        t.connect(10)
        assert t.broker_max_packet_size == 20_000
        assert 19_000 < t.max_payload("fedpeft/f/update/x") < 20_000
        with pytest.raises(InvalidValueError, match="chunks"):
            t.publish("fedpeft/f/update/x", b"x" * 20_000)
        t.close()
    finally:
        h.stop()


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_unacked_message_is_redelivered_to_persistent_session(mosquitto_broker) -> None:
    """manual_ack: a consumer that dies before acking gets the message again (at-least-once)."""
    cid = "ack-consumer"
    c1 = _t(mosquitto_broker, cid, manual_ack=True)
    c1.subscribe("ack/topic")
    c1.connect(10)
    pub = _t(mosquitto_broker, "ack-pub")
    pub.connect(10)
    try:
        time.sleep(0.2)
        pub.publish("ack/topic", b"must-survive").wait(5)
        m = c1.get(5)
        assert m is not None and m.payload == b"must-survive"
        # Die without acking: drop the socket abruptly (no DISCONNECT packet).
        c1._client.socket().close()  # type: ignore[union-attr]
        c1._client.loop_stop()  # type: ignore[union-attr]
        c2 = _t(mosquitto_broker, cid, manual_ack=True)
        c2.subscribe("ack/topic")
        c2.connect(10)
        m2 = c2.get(5)
        assert m2 is not None and m2.payload == b"must-survive"
        c2.ack(m2)
        c2.close()
        c3 = _t(mosquitto_broker, cid, manual_ack=True)
        c3.subscribe("ack/topic")
        c3.connect(10)
        assert c3.get(0.5) is None  # acked now: not delivered a third time
        c3.close()
    finally:
        pub.close()


@pytest.mark.slow  # > 1.4 s: the full suite runs it, the fast tier leaves it out
def test_reconnect_after_broker_restart_delivers_queued_publish() -> None:
    h = start_local_broker(prefer="mosquitto")
    try:
        sub, pub = _t(h, "rc-sub"), _t(h, "rc-pub")
        sub.subscribe("rc/t")
        sub.connect(10)
        pub.connect(10)
        time.sleep(0.2)
        h.stop(keep_dir=True)
        time.sleep(0.3)
        assert not pub.connected
        handle = pub.publish("rc/t", b"sent while the broker was down")  # queued by paho
        h.restart()
        assert pub.wait_connected(15) and sub.wait_connected(15)
        assert handle.wait(15)
        m = sub.get(10)
        assert m is not None and m.payload == b"sent while the broker was down"
        assert pub.connect_count == 2 and sub.connect_count == 2
        sub.close()
        pub.close()
    finally:
        h.stop()


@pytest.mark.slow  # several seconds (real broker, TLS or many examples): full suite only
def test_connect_timeout_when_nothing_listens() -> None:
    from fedpeft_edge.central.broker import free_port

    t = MqttTransport(TransportConfig(port=free_port(), client_id="nobody", reconnect_max=1))
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="no connection"):
        t.connect(1.5)
    assert time.monotonic() - t0 < 6


def test_config_validation() -> None:
    with pytest.raises(InvalidValueError):
        TransportConfig(client_id="")
    with pytest.raises(InvalidValueError):
        TransportConfig(client_id="x", protocol="4")
    with pytest.raises(InvalidValueError):
        TransportConfig(client_id="x", tls_cert="a.crt")
