"""Why a broker connection fails, in words a plant engineer can act on.

paho reports a failed attempt without its cause, and a broker that closes the socket before its CONNACK
(plain MQTT sent to a TLS port, say) looks like any other lost connection. :func:`diagnose` repeats the
attempt step by step — name lookup, TCP, TLS with the configured CA, and a TLS probe of a plain
configuration — and returns one sentence: what failed and what to check.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    """What the client is configured to reach (the transport's settings, without credentials)."""

    host: str
    port: int
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None


def describe(endpoint: Endpoint, protocol: str) -> str:
    """``127.0.0.1:8883 (MQTT 5, TLS)``: where and how, for every connection message."""
    version = {"auto": "MQTT 5 or 3.1.1", "5": "MQTT 5", "3.1.1": "MQTT 3.1.1"}.get(protocol, protocol)
    return f"{endpoint.host}:{endpoint.port} ({version}, {'TLS' if endpoint.tls else 'plain TCP, no TLS'})"


def _tls_context(endpoint: Endpoint) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=endpoint.tls_ca)
    ctx.check_hostname = not endpoint.tls_insecure
    if endpoint.tls_cert and endpoint.tls_key:
        ctx.load_cert_chain(endpoint.tls_cert, endpoint.tls_key)
    return ctx


def _speaks_tls(sock: socket.socket, host: str) -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.wrap_socket(sock, server_hostname=host).close()
        return True
    except (ssl.SSLError, OSError):
        return False


# An MQTT 3.1.1 CONNECT (clean session, keepalive 10 s, client id "fedpeft-probe"): a plain broker answers
# it with a CONNACK (first byte 0x20), whatever it then decides about the session.
_PROBE_CONNECT = bytes([0x10, 25, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 13]) + b"fedpeft-probe"


def _speaks_plain_mqtt(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_PROBE_CONNECT)
            return sock.recv(1)[:1] == b"\x20"
    except OSError:
        return False


def diagnose(endpoint: Endpoint, timeout: float = 3.0) -> str:
    """One sentence: why a connection to ``endpoint`` fails (or that TCP and TLS work and the broker
    itself ended the session)."""
    host, port = endpoint.host, int(endpoint.port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        return f"host name {host!r} does not resolve ({exc.strerror}): check [connection] host"
    except ConnectionRefusedError:
        return ("connection refused: nothing listens on that port (broker not running, or the wrong "
                "port), or a firewall rejects it")
    except TimeoutError:
        return (f"no answer within {timeout:.0f} s: the host is down or unreachable, the address is wrong, "
                "or a firewall drops the packets")
    except OSError as exc:
        return f"network error: {exc.strerror or exc}: check the address and the route to the broker"
    with sock:
        if endpoint.tls:
            try:
                ctx = _tls_context(endpoint)
            except (ssl.SSLError, OSError) as exc:
                return f"the TLS files cannot be loaded: {exc}"
            try:
                ctx.wrap_socket(sock, server_hostname=host).close()
            except ssl.SSLCertVerificationError as exc:
                return (f"TLS verify failure: {exc.verify_message}: is tls_ca the CA that signed the broker "
                        f"certificate, and does that certificate name {host!r}?")
            except ssl.SSLError as exc:
                text = f"{exc.reason or ''} {exc}".lower()
                if "wrong version" in text or "record layer" in text or "packet length" in text:
                    return ("the port does not speak TLS (a plain MQTT listener?): use the broker's TLS "
                            "port, or leave tls_ca unset for a plain listener")
                return f"TLS handshake failed: {exc.reason or exc}"
            except TimeoutError:
                return (f"the TLS handshake got no answer within {timeout:.0f} s: the port does not speak "
                        "TLS (a plain MQTT listener?): use the broker's TLS port, or leave tls_ca unset")
            except OSError as exc:
                if _speaks_plain_mqtt(host, port, timeout):
                    return ("the port does not speak TLS (it answers plain MQTT): use the broker's TLS port, "
                            "or leave tls_ca unset for a plain listener")
                return (f"the broker closed the connection during the TLS handshake ({exc.strerror or exc}): "
                        "it may require a client certificate (tls_cert, tls_key)")
            return ("TCP and TLS work; the broker ended the MQTT session itself: check the user name, the "
                    "password, the client id and the broker's log")
        if _speaks_tls(sock, host):
            return ("the port speaks TLS but this client connects without it: set [connection] tls_ca to the "
                    "CA that signed the broker certificate, or use the broker's plain port")
        return ("TCP works; the broker ended the MQTT session without an answer: check the user name, the "
                "password, the client id and the broker's log")


def connack_advice(reason_code: int) -> str:
    """What to check for a CONNACK refusal (MQTT 5 and 3.1.1 codes)."""
    if reason_code in (4, 5, 134, 135):
        return "not authorised: check the user name, the password file and the broker's password file"
    if reason_code in (2, 133):
        return "client id refused: give this service a client id equal to its user name"
    if reason_code == 138:
        return "this client is banned at the broker"
    if reason_code in (1, 132):
        return "the broker does not speak this MQTT version: set [connection] protocol"
    if reason_code in (3, 136, 137):
        return "the broker is unavailable or busy: it will be retried"
    return "see the broker's log"


__all__ = ["Endpoint", "connack_advice", "describe", "diagnose"]
