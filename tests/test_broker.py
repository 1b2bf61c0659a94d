"""Local broker launcher: Mosquitto from our templates, the embedded amqtt fallback, restarts."""

from __future__ import annotations

from pathlib import Path

import mqtt_fixtures
import pytest

from fedpeft_edge.errors import ValueError as FpeValueError
from fedpeft_edge.federation.broker import (
    BrokerOptions,
    PlantOptions,
    port_accepts,
    render_config,
    start_local_broker,
)
from fedpeft_edge.federation.transport import MqttTransport, TransportConfig

mqtt_fixtures.require_mosquitto()


def _client(handle, cid: str, **kw) -> MqttTransport:
    t = MqttTransport(TransportConfig(host=handle.host, port=handle.port, client_id=cid, reconnect_max=1,
                                      **kw))
    t.connect(10)
    return t


def test_dev_template_fills_every_placeholder(tmp_path: Path) -> None:
    text = render_config(BrokerOptions(max_packet_size=12345), 4242, tmp_path)
    assert "listener 4242 127.0.0.1" in text
    assert "max_packet_size 12345" in text
    assert f"persistence_location {tmp_path}/" in text
    assert "allow_anonymous true" in text
    assert not [ln for ln in text.splitlines() if "{" in ln and not ln.lstrip().startswith("#")]


def test_plant_template_needs_existing_files(tmp_path: Path) -> None:
    missing = PlantOptions(tmp_path / "ca.crt", tmp_path / "s.crt", tmp_path / "s.key", tmp_path / "pw")
    with pytest.raises(FpeValueError, match="does not exist"):
        render_config(BrokerOptions(config="plant", plant=missing), 1, tmp_path)
    with pytest.raises(FpeValueError, match="PlantOptions"):
        render_config(BrokerOptions(config="plant"), 1, tmp_path)


def test_plant_template_writes_acl_for_fleet(plant_pki, tmp_path: Path) -> None:
    opts = BrokerOptions(config="plant", plant=PlantOptions(
        plant_pki.ca, plant_pki.server_cert, plant_pki.server_key, plant_pki.password_file, fleet="line-3"))
    text = render_config(opts, 8883, tmp_path)
    assert "allow_anonymous false" in text and f"acl_file {tmp_path / 'acl.conf'}" in text
    acl = (tmp_path / "acl.conf").read_text()
    assert "pattern write fedpeft/line-3/update/%u" in acl
    assert "{fleet}" not in acl


plant_pki = mqtt_fixtures.plant_pki


def test_mosquitto_start_restart_keeps_port_and_retained_messages() -> None:
    h = start_local_broker(prefer="mosquitto")
    try:
        assert h.kind == "mosquitto" and h.port not in (0, 1883) and h.is_running()
        pub = _client(h, "pub")
        assert pub.publish("fedpeft/x/global", b"kept", retain=True).wait(5)
        pub.close()
        old_pid, port = h.pid, h.port
        h.restart()
        assert h.port == port and h.pid != old_pid and h.is_running()
        sub = _client(h, "sub", clean_start=True)
        sub.subscribe("fedpeft/x/global")
        msg = sub.get(5)
        sub.close()
        assert msg is not None and msg.payload == b"kept" and msg.retain  # survived via persistence
        assert "mosquitto version" in h.log_text()
    finally:
        h.stop()
    assert not port_accepts(h.host, h.port)
    assert not h.data_dir.exists()  # temporary state dir removed


def test_embedded_broker_serves_mqtt311_clients() -> None:
    h = start_local_broker(prefer="embedded")
    try:
        assert h.kind == "embedded"
        sub = _client(h, "sub")
        sub.subscribe("t/#")
        pub = _client(h, "pub", protocol="3.1.1")
        assert sub.protocol_used == "3.1.1"  # asked for MQTT 5 ("auto"), fell back
        import time

        time.sleep(0.2)
        assert pub.publish("t/a", b"x" * 100_000).wait(10)
        msg = sub.get(10)
        assert msg is not None and msg.payload == b"x" * 100_000
        sub.close()
        pub.close()
    finally:
        h.stop()
    assert not port_accepts(h.host, h.port)


def test_kind_and_port_validation() -> None:
    with pytest.raises(FpeValueError):
        start_local_broker(prefer="rabbit")  # type: ignore[arg-type]
    with pytest.raises(FpeValueError):
        start_local_broker(port=70000)
