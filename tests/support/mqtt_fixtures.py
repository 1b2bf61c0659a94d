"""Session fixtures for a real Mosquitto broker (never the system one on 1883) and a plant-style PKI.

Import into ``tests/conftest.py``::

    from mqtt_fixtures import mosquitto_broker, plant_pki, plant_broker  # noqa: F401

``mosquitto_broker``: dev configuration (loopback, anonymous) on a free port, started once per session.
``plant_broker``: TLS + password file + ACL (broker_config/mosquitto-plant.conf and acl.conf) with
certificates and passwords generated into a temporary directory (``plant_pki``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedpeft_edge.central.broker import (
    BrokerHandle,
    PlantOptions,
    die_with_parent,
    find_mosquitto,
    start_local_broker,
)
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig

PLANT_FLEET = "plant"
PLANT_USERS = {"aggregator": "agg-secret", "site-a": "a-secret", "site-b": "b-secret"}


def require_mosquitto() -> str:
    exe = find_mosquitto()
    if exe is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients")
    return exe


@dataclass
class PlantPki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_certs: dict[str, tuple[Path, Path]]  # user -> (cert, key), CN = user name
    password_file: Path
    passwords: dict[str, str]


def _write_key(path: Path, key: object) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    path.chmod(0o600)


def make_test_pki(out: Path, users: dict[str, str] = PLANT_USERS) -> PlantPki:
    """A CA, a server certificate for localhost/127.0.0.1, one client certificate per user, and a
    Mosquitto password file (made with ``mosquitto_passwd -b``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("fedpeft test CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, server: bool) -> tuple[object, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server:
            alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    from cryptography.hazmat.primitives import serialization

    pem = serialization.Encoding.PEM
    (out / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    skey, scert = leaf("localhost", True)
    (out / "server.crt").write_bytes(scert.public_bytes(pem))
    _write_key(out / "server.key", skey)
    clients = {}
    for user in users:
        ckey, ccert = leaf(user, False)
        (out / f"{user}.crt").write_bytes(ccert.public_bytes(pem))
        _write_key(out / f"{user}.key", ckey)
        clients[user] = (out / f"{user}.crt", out / f"{user}.key")

    passwd_tool = shutil.which("mosquitto_passwd")
    if passwd_tool is None:
        pytest.fail("mosquitto_passwd missing: apt-get install -y mosquitto")
    pwfile = out / "passwords.txt"
    pwfile.write_text("")
    for user, pw in users.items():
        subprocess.run([passwd_tool, "-b", str(pwfile), user, pw], check=True, capture_output=True)
    return PlantPki(out, out / "ca.crt", out / "server.crt", out / "server.key", clients, pwfile, dict(users))


def plant_client(broker: BrokerHandle, pki: PlantPki, user: str, *, client_id: str | None = None,
                 password: str | None = None, cert: bool = False, tls: bool = True,
                 clean: bool = True) -> MqttTransport:
    """A client of the plant broker logged in as ``user`` (its password and, with ``cert``, its client
    certificate); ``client_id`` defaults to the user name."""
    cfg = TransportConfig(
        host="localhost", port=broker.port, client_id=client_id or user, username=user,
        password=pki.passwords[user] if password is None else password,
        tls_ca=pki.ca if tls else None,
        tls_cert=pki.client_certs[user][0] if cert else None,
        tls_key=pki.client_certs[user][1] if cert else None,
        clean_start=clean, reconnect_max=2)
    return MqttTransport(cfg)


def drain(t: MqttTransport, seconds: float) -> list[tuple[str, bytes]]:
    """Every (topic, payload) the client receives within ``seconds``."""
    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        m = t.get(0.05)
        if m is not None:
            got.append((m.topic, m.payload))
    return got


def start_plant_broker(pki: PlantPki, *, require_certificate: bool = False, fleet: str = PLANT_FLEET
                       ) -> BrokerHandle:
    require_mosquitto()
    return start_local_broker(prefer="mosquitto", config="plant", plant=PlantOptions(
        cafile=pki.ca, certfile=pki.server_cert, keyfile=pki.server_key, password_file=pki.password_file,
        require_certificate=require_certificate, fleet=fleet))


@pytest.fixture(scope="session")
def mosquitto_broker() -> BrokerHandle:
    """A dev-config Mosquitto on a free port for the whole test session."""
    require_mosquitto()
    handle = start_local_broker(prefer="mosquitto", config="dev")
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def plant_pki(tmp_path_factory: pytest.TempPathFactory) -> PlantPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def plant_broker(plant_pki: PlantPki) -> BrokerHandle:
    """TLS + passwords + ACL Mosquitto (fleet "plant") for the session."""
    handle = start_plant_broker(plant_pki)
    yield handle
    handle.stop()


# --- helpers for service tests that run the CLI as separate processes ---------------------------------
TESTS_DIR = Path(__file__).resolve().parent  # tests/support: the helper modules services import
REPO_DIR = TESTS_DIR.parents[1]


def service_env() -> dict[str, str]:
    """Environment for CLI subprocesses: tests/ importable (the numpy trainer factory), one thread."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_DIR), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def spawn_cli(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m fedpeft_edge.faces.cli ARGS`` with stdout+stderr into ``log_path``."""
    import sys

    with open(log_path, "ab") as fh:  # the child keeps its own copy of the descriptor
        # die_with_parent: a killed test run must not leave services behind.
        return subprocess.Popen([sys.executable, "-m", "fedpeft_edge.faces.cli", *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=service_env(), cwd=str(REPO_DIR),
                                preexec_fn=die_with_parent)


def wait_for(cond, timeout: float, what: str, interval: float = 0.05, procs: list | None = None,
             logs: Path | None = None) -> None:
    """Poll ``cond()`` until true; on timeout fail with ``what``, processes that already died and the
    tails of the ``*.log`` files in ``logs``."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(interval)
    dead = [(p.args[3:5], p.returncode) for p in (procs or []) if p.poll() is not None]
    tails = ""
    if logs is not None:
        for f in sorted(logs.glob("*.log")):
            tails += f"\n--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
    pytest.fail(f"timed out after {timeout}s waiting for {what}; exited processes: {dead}{tails}")


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def sent_updates(agent_state_dir: Path) -> dict[int, bytes]:
    """The exact update envelopes an agent sent (``dump_updates = true``), by round."""
    return {int(f.stem[1:]): f.read_bytes() for f in sorted((agent_state_dir / "sent").glob("r*.msg"))}


def reference_fedavg(initial, rounds: list[list[bytes]]):
    """FedAvg recomputed offline from the sent envelopes: per round ``g += Σ n_i·Δ_i / Σ n_i``
    (float64), decoded with the codec's own decoder."""
    import numpy as np

    from fedpeft_edge.protocol import wire
    from fedpeft_edge.protocol.codec import decode_dense

    g = np.asarray(initial, dtype=np.float64).copy()
    for envelopes in rounds:
        msgs = [wire.decode_update(e) for e in envelopes]
        total = sum(m.num_samples for m in msgs)
        g += sum(m.num_samples * decode_dense(m.update, g.size).astype(np.float64) for m in msgs) / total
    return g


def read_metrics(path: Path) -> list[dict]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def retained_global(broker: BrokerHandle, fleet: str, timeout: float = 5.0):
    """The retained global message of ``fleet`` as the broker holds it now."""
    from fedpeft_edge.protocol import wire
    from fedpeft_edge.protocol.topics import Topics
    from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig

    t = MqttTransport(TransportConfig(host=broker.host, port=broker.port, client_id="test-reader",
                                      clean_start=True))
    t.subscribe(Topics(fleet).global_)
    t.connect(10)
    try:
        msg = t.get(timeout)
        assert msg is not None, "no retained global"
        return wire.decode_global(msg.payload)
    finally:
        t.close()


class TcpProxy:
    """A TCP forwarder between one client and the broker whose link the test can cut and restore,
    like a plant's uplink going down. While cut, open connections are closed and new ones refused."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        import socket
        import threading

        self.target = (target_host, target_port)
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(16)
        self._srv.settimeout(0.2)
        self.port = int(self._srv.getsockname()[1])
        self._up = threading.Event()
        self._up.set()
        self._closed = threading.Event()
        self._conns: list = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        import socket
        import threading

        while not self._closed.is_set():
            try:
                client, _ = self._srv.accept()
            except (TimeoutError, OSError):
                continue
            if not self._up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        import socket

        self._up.clear()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                    c.close()
                except OSError:
                    pass
            self._conns.clear()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self.cut()
        self._closed.set()
        self._srv.close()
        self._thread.join(2)


def wait_aggregator_listening(svc, publisher: MqttTransport, fleet: str, client_id: str,
                              timeout: float = 60.0) -> None:
    """Wait until the aggregator service ``svc`` reads ``publisher``'s messages: CONNACK comes before the
    SUBACKs, so an update published right after ``svc.transport.connected`` may not be delivered. The
    aggregator subscribes to updates before statuses (Mosquitto keeps their order): once it has read a
    status from ``client_id``, its update subscription is in place too. The status is not retained, so a
    copy published before the status subscription existed is lost: it is published again every 0.5 s."""
    import time as _time

    from fedpeft_edge.protocol import notices
    from fedpeft_edge.protocol.topics import Topics

    topic = Topics(fleet).status(client_id)
    end = _time.monotonic() + timeout
    while client_id not in svc.site_states:
        if _time.monotonic() > end:
            pytest.fail(f"timed out after {timeout}s waiting for the aggregator's subscriptions")
        hello = notices.encode_status(notices.StatusMessage(client_id, "online", _time.time()))
        assert publisher.publish(topic, hello).wait(5)
        wait_until = _time.monotonic() + 0.5
        while client_id not in svc.site_states and _time.monotonic() < wait_until:
            _time.sleep(0.02)
