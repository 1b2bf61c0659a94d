"""MQTT transport: a small wrapper over paho-mqtt 2.x used by the agent and the aggregator.

- MQTT 5 first, falling back to 3.1.1 when the broker refuses it (the embedded amqtt broker does).
- Persistent sessions (clean start off) so QoS 1 messages queue at the broker while we are away.
- Automatic reconnect with exponential backoff (paho's network thread); subscriptions are renewed on
  every (re)connect.
- Incoming messages land in a thread-safe queue; with ``manual_ack`` the PUBACK is sent only when the
  consumer calls :meth:`MqttTransport.ack`, so a crash before the consumer persisted a message makes the
  broker deliver it again.
- The broker's CONNACK Maximum-Packet-Size (MQTT 5) caps :meth:`MqttTransport.max_payload`, the size above
  which callers must split a message into chunks.
- A failed connection is explained (:mod:`.diagnose`: refused, timeout, TLS verify failure and why, plain
  MQTT on a TLS port, not authorised) with host:port and protocol, at the first failure and again after
  every :data:`FAILURES_BEFORE_HINT` in a row; retrying goes on with backoff.
- A ``stop`` event ends :meth:`MqttTransport.connect` at once, so a service stops within a second of
  SIGTERM even while it cannot reach its broker.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedpeft_edge.protocol.diagnose import Endpoint, connack_advice, describe, diagnose
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError, readable_file

log = logging.getLogger(__name__)

# Bytes of a PUBLISH packet that are not payload, beyond the topic: fixed header (5), topic length (2),
# packet id (2), MQTT 5 property block (generous).
_PUBLISH_OVERHEAD = 5 + 2 + 2 + 32
# CONNACK reason codes that mean "this broker does not speak the protocol version you asked for".
_UNSUPPORTED_PROTOCOL = {132, 1}
# Reason codes that retrying cannot fix: bad credentials, not authorised, banned, bad client id.
_FATAL_CONNACK = {4, 5, 2, 133, 134, 135, 138, 140}
# Failed attempts in a row after which the cause is logged again, with the count.
FAILURES_BEFORE_HINT = 5


class TransportError(FedPeftError, ConnectionError):
    """The broker refused us, or did not answer in time."""


@dataclass
class TransportConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    # TLS: set tls_ca (the CA that signed the broker certificate) to enable; cert/key for mutual TLS.
    tls_ca: str | Path | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_insecure: bool = False  # skip host name check (self-signed test brokers on an IP); never on a plant
    protocol: str = "auto"  # "auto" (5, then 3.1.1), "5" or "3.1.1"
    keepalive: int = 30
    clean_start: bool = False  # False: persistent session, the broker queues QoS 1 messages while away
    session_expiry: int = 7 * 24 * 3600  # seconds the broker keeps a persistent MQTT 5 session
    reconnect_min: float = 0.5
    reconnect_max: float = 10.0
    max_packet_size: int = 16 * 1024 * 1024  # cap on what we send; the broker's CONNACK value wins if smaller
    max_incoming_packet_size: int | None = None  # told to the broker (MQTT 5): it drops larger messages
    manual_ack: bool = False
    max_inflight: int = 20

    def __post_init__(self) -> None:
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise InvalidValueError(f"protocol must be auto, 5 or 3.1.1, not {self.protocol!r}")
        if not self.client_id:
            raise InvalidValueError("client_id is required (it names the persistent session at the broker)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidValueError("tls_cert and tls_key go together")


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class PublishHandle:
    """Completion of one publish: QoS 1 is complete when the broker's PUBACK arrived."""

    def __init__(self, info: mqtt.MQTTMessageInfo, topic: str, size: int,
                 stop: threading.Event | None = None) -> None:
        self._info = info
        self.topic = topic
        self.size = size
        self._stop = stop  # a stopping service does not wait for a broker that is not there

    @property
    def mid(self) -> int:
        return int(self._info.mid)

    def is_published(self) -> bool:
        # paho's is_published() raises for a message given while disconnected (rc NO_CONN) even after
        # paho re-sent it on reconnect and got its PUBACK; the completion flag itself is right.
        flag = getattr(self._info, "_published", None)
        if isinstance(flag, bool):
            return flag
        try:
            return bool(self._info.is_published())
        except (RuntimeError, InvalidValueError):
            return False

    def wait(self, timeout: float | None = None, *, even_when_stopping: bool = False) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_published():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self._stop is not None and self._stop.is_set() and not even_when_stopping:
                return False
            time.sleep(0.01)
        return True


class MqttTransport:
    """One MQTT connection. Create, ``connect()``, ``subscribe()``/``publish()``, ``close()``."""

    def __init__(self, cfg: TransportConfig, *, will: Will | None = None,
                 on_connect: Callable[[MqttTransport], None] | None = None,
                 stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self._stop = stop
        self.failures_in_a_row = 0
        self.last_diagnosis: str | None = None
        self.will = will
        self._on_connect_hook = on_connect
        self._queue: queue.Queue[Message] = queue.Queue()
        self._subs: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._first_result = threading.Event()
        self._first_reason: mqtt.ReasonCode | None = None
        self._client: mqtt.Client | None = None
        self.protocol_used: str | None = None
        self.broker_max_packet_size: int | None = None
        self.connect_count = 0
        self._closing = False
        self._silent = False
        self._socket_opened_at: float | None = None

    # --- connection -------------------------------------------------------------------------------
    def _make_client(self, proto: int) -> mqtt.Client:
        c = self.cfg
        v5 = proto == mqtt.MQTTv5
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=c.client_id, protocol=proto,
                             clean_session=None if v5 else c.clean_start)
        paho_log = logging.getLogger(__name__ + ".paho")
        if paho_log.level == logging.NOTSET:
            # paho logs socket errors around every reconnect at ERROR; our own log says what happened.
            paho_log.setLevel(logging.CRITICAL)
        client.enable_logger(paho_log)
        if c.username is not None:
            client.username_pw_set(c.username, c.password)
        if c.tls_ca is not None:
            # Named here: ssl's own FileNotFoundError carries no file name.
            readable_file(c.tls_ca, "TLS CA file ([connection] tls_ca)")
            if c.tls_cert is not None:
                readable_file(c.tls_cert, "TLS client certificate ([connection] tls_cert)")
                readable_file(c.tls_key, "TLS client key ([connection] tls_key)")  # type: ignore[arg-type]
            client.tls_set(ca_certs=str(c.tls_ca), certfile=str(c.tls_cert) if c.tls_cert else None,
                           keyfile=str(c.tls_key) if c.tls_key else None, cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
            client.tls_insecure_set(c.tls_insecure)
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        client.reconnect_delay_set(min_delay=max(1, round(c.reconnect_min)),
                                   max_delay=max(1, round(c.reconnect_max)))
        client.max_inflight_messages_set(c.max_inflight)
        client.manual_ack_set(c.manual_ack)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        client.on_socket_open = self._on_socket_open
        return client

    def connect(self, timeout: float | None = 30.0) -> None:
        """Connect and start the network thread. Waits (retrying) until connected or ``timeout``.

        Raises :class:`TransportError` at once when the broker refuses the credentials or client id.
        """
        protos = {"auto": [mqtt.MQTTv5, mqtt.MQTTv311], "5": [mqtt.MQTTv5], "3.1.1": [mqtt.MQTTv311]}
        candidates = protos[self.cfg.protocol]
        for i, proto in enumerate(candidates):
            self._first_result.clear()
            self._first_reason = None
            self._socket_opened_at = None  # reset before the network thread can open the socket
            client = self._make_client(proto)
            self._client = client
            kwargs: dict[str, object] = {}
            if proto == mqtt.MQTTv5:
                props = Properties(PacketTypes.CONNECT)
                if not self.cfg.clean_start:
                    props.SessionExpiryInterval = int(self.cfg.session_expiry)
                if self.cfg.max_incoming_packet_size:
                    # MQTT 5 brokers silently drop (never deliver) messages larger than this.
                    props.MaximumPacketSize = int(self.cfg.max_incoming_packet_size)
                kwargs = {"clean_start": self.cfg.clean_start, "properties": props}
            client.connect_async(self.cfg.host, int(self.cfg.port), keepalive=int(self.cfg.keepalive),
                                 **kwargs)  # type: ignore[arg-type]
            client.loop_start()
            silent_after = 2.0 if (proto == mqtt.MQTTv5 and i + 1 < len(candidates)) else None
            if self._wait_first_connack(timeout, silent_after):
                return
            if self.stopping:
                log.info("stopped while connecting to %s", self.where)
                return  # the caller's stop path closes the client
            reason = self._first_reason
            if reason is None and self._silent:
                # Some 3.1.1-only brokers (amqtt) never answer an MQTT 5 CONNECT that has properties.
                log.info("no CONNACK to MQTT 5 CONNECT; falling back to MQTT 3.1.1")
                client.loop_stop()
                continue
            client.loop_stop()
            try:
                client.disconnect()
            except Exception:
                pass
            code = int(reason.value) if reason is not None else -1
            if code in _UNSUPPORTED_PROTOCOL and i + 1 < len(candidates):
                log.info("broker refused MQTT 5, falling back to MQTT 3.1.1")
                continue
            if reason is None:
                raise TransportError(f"no connection to {self.where} within {timeout}s: "
                                     f"{diagnose(self.endpoint)}")
            raise TransportError(f"broker {self.where} refused client {self.cfg.client_id!r}: {reason}: "
                                 f"{connack_advice(code)}")

    @property
    def endpoint(self) -> Endpoint:
        c = self.cfg
        return Endpoint(c.host, int(c.port), None if c.tls_ca is None else str(c.tls_ca),
                        None if c.tls_cert is None else str(c.tls_cert),
                        None if c.tls_key is None else str(c.tls_key), c.tls_insecure)

    @property
    def where(self) -> str:
        """``host:port (MQTT 5, TLS)``: named in every connection message."""
        return describe(self.endpoint, self.protocol_used or self.cfg.protocol)

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _note_failure(self, cause: str | None = None) -> None:
        """Count a failed attempt; explain it at the first and after every FAILURES_BEFORE_HINT in a row."""
        if self._closing or self.stopping:
            return
        self.failures_in_a_row += 1
        n = self.failures_in_a_row
        if n != 1 and n % FAILURES_BEFORE_HINT:
            log.debug("connection attempt %d to %s failed", n, self.where)
            return
        # The probe opens its own sockets (up to a few seconds): off paho's network thread.
        threading.Thread(target=self._explain, args=(n, cause), name="mqtt-diagnose", daemon=True).start()

    def _explain(self, n: int, cause: str | None) -> None:
        why = cause or diagnose(self.endpoint)
        self.last_diagnosis = why
        retry = f"retrying with backoff (at most {self.cfg.reconnect_max:.0f} s apart)"
        if n == 1:
            log.warning("cannot connect to %s as %s: %s; %s", self.where, self.cfg.client_id, why, retry)
        else:
            log.warning("%d connection attempts in a row to %s have failed: %s; still %s", n, self.where,
                        why, retry)

    def _wait_first_connack(self, timeout: float | None, silent_after: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._silent = False
        while True:
            if self._connected.is_set():
                return True
            if self.stopping:
                return False
            opened = self._socket_opened_at
            if silent_after is not None and opened is not None and time.monotonic() - opened > silent_after:
                self._silent = True
                return False
            reason = self._first_reason
            if reason is not None and (int(reason.value) in _FATAL_CONNACK | _UNSUPPORTED_PROTOCOL):
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._first_result.wait(0.05)
            self._first_result.clear()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason: mqtt.ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            expected = int(reason.value) in _UNSUPPORTED_PROTOCOL and self.cfg.protocol == "auto"
            if expected:
                log.debug("broker refused MQTT 5 for %s: %s", self.cfg.client_id, reason)
            else:
                self._note_failure(f"the broker refused {self.cfg.client_id!r}: {reason}: "
                                   f"{connack_advice(int(reason.value))}")
            self._first_reason = reason
            self._first_result.set()
            if int(reason.value) in _FATAL_CONNACK:
                # Retrying bad credentials forever only fills the broker log.
                client.disconnect()
            return
        self.protocol_used = "5" if client.protocol == mqtt.MQTTv5 else "3.1.1"
        mps = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self.broker_max_packet_size = int(mps) if mps else None
        self.connect_count += 1
        if self.failures_in_a_row:
            log.info("connected after %d failed attempts", self.failures_in_a_row)
        self.failures_in_a_row = 0
        with self._lock:
            subs = list(self._subs.items())
        for topic, qos in subs:
            client.subscribe(topic, qos)
        self._connected.set()
        self._first_result.set()
        log.info("connected to %s:%d as %s (MQTT %s%s)", self.cfg.host, self.cfg.port, self.cfg.client_id,
                 self.protocol_used, f", broker max packet {mps}" if mps else "")
        if self._on_connect_hook is not None:
            try:
                self._on_connect_hook(self)
            except Exception:
                log.exception("on_connect hook failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason: mqtt.ReasonCode, properties: Properties | None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._first_result.set()
        if was and not self._closing:
            log.warning("disconnected from broker %s (%s); reconnecting with backoff", self.where, reason)
        elif not was and not self._first_reason:
            # Closed before any CONNACK: e.g. plain MQTT sent to a TLS port; the probe tells.
            self._note_failure()

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._first_result.set()
        self._note_failure()

    def _on_socket_open(self, client: mqtt.Client, userdata: object, sock: object) -> None:
        self._socket_opened_at = time.monotonic()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self._queue.put(Message(msg.topic, bytes(msg.payload), int(msg.qos), bool(msg.retain), int(msg.mid)))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    # --- messaging --------------------------------------------------------------------------------
    def max_payload(self, topic: str) -> int:
        """Largest payload one PUBLISH on ``topic`` may carry at this broker."""
        limit = self.cfg.max_packet_size
        if self.broker_max_packet_size:
            limit = min(limit, self.broker_max_packet_size)
        return max(1024, limit - _PUBLISH_OVERHEAD - len(topic.encode()))

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic] = qos
        if self._client is not None and self.connected:
            self._client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription, including one a persistent session kept from an earlier run."""
        with self._lock:
            self._subs.pop(topic, None)
        if self._client is not None and self.connected:
            self._client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishHandle:
        """Queue a publish. QoS 1 messages given while disconnected are sent after the reconnect."""
        if self._client is None:
            raise TransportError("publish before connect()")
        if len(payload) > self.max_payload(topic):
            raise InvalidValueError(f"payload of {len(payload)} bytes exceeds the broker limit "
                             f"{self.max_payload(topic)}; split it into chunks")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return PublishHandle(info, topic, len(payload), self._stop)

    def get(self, timeout: float | None = None) -> Message | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def ack(self, msg: Message) -> None:
        """Send the PUBACK for ``msg`` (only with ``manual_ack``; no-op for QoS 0)."""
        if self.cfg.manual_ack and msg.qos > 0 and self._client is not None:
            self._client.ack(msg.mid, msg.qos)

    def close(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker then does not send the last will).

        ``final``: a retained (topic, payload) to publish first, e.g. an "offline" status.
        """
        client = self._client
        if client is None:
            return
        self._closing = True
        if final is not None and self.connected:
            try:
                # The last status goes out even when stopping: it is how the fleet learns we left.
                self.publish(final[0], final[1], qos=1, retain=True).wait(timeout, even_when_stopping=True)
            except FedPeftError:
                pass
        try:
            client.disconnect()
        finally:
            client.loop_stop()
            self._connected.clear()
            self._client = None

    def __enter__(self) -> MqttTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
