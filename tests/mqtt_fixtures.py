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
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedpeft_edge.federation.broker import BrokerHandle, PlantOptions, find_mosquitto, start_local_broker

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
