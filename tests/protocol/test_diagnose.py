"""First-day connection mistakes are named: host:port, protocol, and the reason a plant engineer can act on.

Each case is a real socket or a real Mosquitto (the session's plant broker: TLS + passwords + ACL, and a
plain dev broker): wrong port, unknown host, untrusted CA, plain MQTT on the TLS port, TLS on the plain
port, a wrong password, and a client that keeps failing (the WARNING after FAILURES_BEFORE_HINT attempts).
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mqtt_fixtures import plant_client

from fedpeft_edge.central.broker import free_port
from fedpeft_edge.protocol.diagnose import Endpoint, connack_advice, describe, diagnose
from fedpeft_edge.protocol.transport import (
    FAILURES_BEFORE_HINT,
    MqttTransport,
    TransportConfig,
    TransportError,
)
from fedpeft_edge.runtime.errors import ConfigFileError


def _other_ca(path: Path) -> Path:
    """A CA that signed nothing the broker holds: verification against it must fail."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the plant CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_refused_port_is_named() -> None:
    why = diagnose(Endpoint("127.0.0.1", free_port()))
    assert why.startswith("connection refused")


def test_unknown_host_is_named() -> None:
    why = diagnose(Endpoint("no-such-broker.invalid", 1883))
    assert "does not resolve" in why and "no-such-broker.invalid" in why


@pytest.mark.slow  # > 1 s: the full suite runs it, the fast tier leaves it out
def test_silent_listener_is_a_timeout_or_no_answer() -> None:
    """A port that accepts TCP and never speaks MQTT (a wrong service, a hung broker)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        why = diagnose(Endpoint("127.0.0.1", srv.getsockname()[1]), timeout=1.0)
    finally:
        stop.set()
        t.join(2)
        for s in held:
            s.close()
        srv.close()
    assert "ended the MQTT session" in why or "TLS" in why


def test_untrusted_ca_is_a_tls_verify_failure(plant_broker, tmp_path: Path) -> None:
    why = diagnose(Endpoint("localhost", plant_broker.port, str(_other_ca(tmp_path / "other.crt"))))
    assert why.startswith("TLS verify failure") and "certificate" in why and "tls_ca" in why


def test_plain_client_on_the_tls_port_is_told_to_set_tls_ca(plant_broker) -> None:
    why = diagnose(Endpoint("localhost", plant_broker.port))
    assert "speaks TLS" in why and "tls_ca" in why


def test_tls_client_on_the_plain_port_is_told_the_port_is_plain(mosquitto_broker, plant_pki) -> None:
    why = diagnose(Endpoint("127.0.0.1", mosquitto_broker.port, str(plant_pki.ca)), timeout=1.5)
    assert "does not speak TLS" in why


def test_good_tls_settings_point_at_the_session_itself(plant_broker, plant_pki) -> None:
    why = diagnose(Endpoint("localhost", plant_broker.port, str(plant_pki.ca)))
    assert why.startswith("TCP and TLS work")


def test_wrong_password_is_not_authorised_with_the_endpoint(plant_broker, plant_pki) -> None:
    t = plant_client(plant_broker, plant_pki, "site-1", password="wrong")
    with pytest.raises(TransportError) as err:
        t.connect(timeout=10)
    message = str(err.value)
    assert f"localhost:{plant_broker.port}" in message and "TLS" in message
    assert "not authorised" in message
    t.close()


def test_connack_advice_covers_the_usual_refusals() -> None:
    assert "not authorised" in connack_advice(135)
    assert "not authorised" in connack_advice(5)
    assert "client id" in connack_advice(133)
    assert "MQTT version" in connack_advice(132)


def test_describe_names_protocol_and_tls() -> None:
    assert describe(Endpoint("gw", 8883, "ca.crt"), "5") == "gw:8883 (MQTT 5, TLS)"
    assert describe(Endpoint("gw", 1883), "3.1.1") == "gw:1883 (MQTT 3.1.1, plain TCP, no TLS)"


def test_missing_ca_file_is_one_line_with_the_file_name(tmp_path: Path) -> None:
    cfg = TransportConfig(host="127.0.0.1", port=free_port(), client_id="s", tls_ca=tmp_path / "nope.crt")
    with pytest.raises(ConfigFileError) as err:
        MqttTransport(cfg).connect(timeout=1)
    assert str(tmp_path / "nope.crt") in str(err.value) and "tls_ca" in str(err.value)


@pytest.mark.slow  # six reconnect attempts at paho's 1 s minimum backoff
def test_repeated_failures_warn_with_the_cause_and_keep_retrying(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    cfg = TransportConfig(host="127.0.0.1", port=port, client_id="site-x", reconnect_min=1, reconnect_max=1,
                          protocol="5")
    t = MqttTransport(cfg)
    caplog.set_level(logging.WARNING, logger="fedpeft_edge.protocol.transport")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            t.connect(timeout=None)
        except BaseException as exc:  # reported below
            errors.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 30
    while t.failures_in_a_row < FAILURES_BEFORE_HINT + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the diagnosis runs in its own thread
    t.close()
    runner.join(5)
    # Only this client's lines: an earlier test's transport may still log its own diagnosis.
    messages = [r.getMessage() for r in caplog.records if f"127.0.0.1:{port} " in r.getMessage()]
    first = [m for m in messages if m.startswith("cannot connect to")]
    assert first and f"127.0.0.1:{port} (MQTT 5, plain TCP, no TLS)" in first[0]
    assert "connection refused" in first[0] and "retrying with backoff" in first[0]
    again = [m for m in messages if f"{FAILURES_BEFORE_HINT} connection attempts in a row" in m]
    assert again and "connection refused" in again[0]
    assert t.failures_in_a_row >= FAILURES_BEFORE_HINT  # it kept trying


@pytest.mark.slow  # > 1 s: the full suite runs it, the fast tier leaves it out
def test_stop_event_ends_connect_at_once() -> None:
    stop = threading.Event()
    t = MqttTransport(TransportConfig(host="127.0.0.1", port=free_port(), client_id="s"), stop=stop)
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    t.connect(timeout=None)  # returns (not connected) once stop is set
    assert time.monotonic() - started < 3
    assert not t.connected
    t.close()
