"""Local broker launcher: Mosquitto from our templates, the embedded amqtt fallback, restarts."""

from __future__ import annotations

import logging
from pathlib import Path

import mqtt_fixtures
import pytest

from fedpeft_edge.central.broker import (
    BrokerOptions,
    PlantOptions,
    port_accepts,
    render_config,
    start_local_broker,
)
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.runtime.errors import InvalidValueError

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
    with pytest.raises(InvalidValueError, match="does not exist"):
        render_config(BrokerOptions(config="plant", plant=missing), 1, tmp_path)
    with pytest.raises(InvalidValueError, match="PlantOptions"):
        render_config(BrokerOptions(config="plant"), 1, tmp_path)


def test_plant_template_writes_acl_for_fleet(plant_pki, tmp_path: Path) -> None:
    opts = BrokerOptions(config="plant", plant=PlantOptions(
        plant_pki.ca, plant_pki.server_cert, plant_pki.server_key, plant_pki.password_file, fleet="line-3"))
    text = render_config(opts, 8883, tmp_path)
    assert "allow_anonymous false" in text and f"acl_file {tmp_path / 'acl.conf'}" in text
    acl = (tmp_path / "acl.conf").read_text()
    assert "pattern write fedpeft/line-3/update/%u" in acl
    assert "{fleet}" not in acl




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


@pytest.mark.slow  # long end-to-end run; the fast tier leaves it to the full suite
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


@pytest.mark.slow  # a few seconds of concurrent connects; the fast tier leaves it to the full suite
def test_embedded_broker_takes_many_clients_subscribing_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """amqtt 0.12.1 iterates its subscription table across awaits: clients connecting and subscribing
    together made it drop connections with "dictionary changed size during iteration" (7 drops in 36
    connects before the snapshot fix, broker._snapshot_iteration). Every client must now get its retained
    messages on its first connection."""
    import threading
    import time

    h = start_local_broker(prefer="embedded")
    got: dict[str, int] = {}
    try:
        pub = _client(h, "pub", protocol="3.1.1")
        for i in range(20):
            assert pub.publish(f"f/r/{i}", b"x" * 1000, qos=1, retain=True).wait(5)

        def one(name: str) -> None:
            t = MqttTransport(TransportConfig(host=h.host, port=h.port, client_id=name, protocol="3.1.1",
                                              clean_start=False))
            for j in range(6):
                t.subscribe(f"f/{name}/{j}", qos=1)
            t.subscribe("f/r/#", qos=1)
            t.connect(10)
            seen, end = 0, time.monotonic() + 5
            while seen < 20 and time.monotonic() < end:
                seen += t.get(0.2) is not None
            got[name] = seen
            t.close()

        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for rep in range(3):
                threads = [threading.Thread(target=one, args=(f"c{rep}-{i}",)) for i in range(12)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
        pub.close()
    finally:
        h.stop()
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert len(got) == 36 and set(got.values()) == {20}, got


def test_kind_and_port_validation() -> None:
    with pytest.raises(InvalidValueError):
        start_local_broker(prefer="rabbit")  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        start_local_broker(port=70000)


# --- the command line -------------------------------------------------------------------------------
@pytest.mark.slow  # ~1 s: the full suite runs it, the fast tier leaves it out
def test_cli_broker_runs_in_foreground_until_sigterm(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "fedpeft_edge.faces.cli", "broker", "--port", "0",
                             "--data-dir", str(tmp_path / "state")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=mqtt_fixtures.service_env(), text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("BROKER 127.0.0.1:"), line + proc.stderr.read()  # type: ignore[union-attr]
        port = int(line.strip().rsplit(":", 1)[1])
        assert port != 1883 and port_accepts("127.0.0.1", port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        time.sleep(0.1)
        assert not port_accepts("127.0.0.1", port)
        assert (tmp_path / "state" / "mosquitto.conf").exists()  # kept: it was an explicit data dir
        assert "broker running on 127.0.0.1" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_cli_help_explains_topics_and_state() -> None:
    import subprocess
    import sys

    def helptext(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "fedpeft_edge.faces.cli", *args, "--help"], capture_output=True,
                             text=True, env=mqtt_fixtures.service_env(), check=True)
        return out.stdout

    top = helptext()
    for cmd in ("broker", "aggregate", "agent"):
        assert cmd in top
    agent = helptext("agent")
    assert "fedpeft/<fleet>/update/<site>" in agent and "--state-dir" in agent and "outbox" in agent
    agg = helptext("aggregate")
    assert "--rounds" in agg and "resumes" in agg


@pytest.mark.slow  # ~1 s: the full suite runs it, the fast tier leaves it out
def test_cli_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nclient_idd = 'x'\n")
    out = subprocess.run([sys.executable, "-m", "fedpeft_edge.faces.cli", "agent", "--config", str(bad)],
                         capture_output=True, text=True, env=mqtt_fixtures.service_env(), timeout=60)
    assert out.returncode == 2
    assert "unknown key(s) ['client_idd']" in out.stderr and "Traceback" not in out.stderr
    missing = subprocess.run([sys.executable, "-m", "fedpeft_edge.faces.cli", "broker", "--kind", "plant"],
                             capture_output=True, text=True, env=mqtt_fixtures.service_env(), timeout=60)
    assert missing.returncode == 2 and "--cafile" in missing.stderr
