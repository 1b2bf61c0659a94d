"""The console's one MQTT connection: it follows the fleet's retained topics into the :class:`FleetView`
and publishes operator commands on the control topic.

It logs in as the broker's ``operator`` account, the only one the plant ACL lets write
``fedpeft/<fleet>/control``; it reads ``status/+``, ``info/+`` and ``federation``. Everything received
is decoded as hostile input: a message that does not decode is counted and dropped, never shown.
A clean session: the console needs the retained messages, not a backlog, after a reconnect.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Final

from fedpeft_edge.console.fleet_view import FleetView
from fedpeft_edge.protocol import fleet_report, notices
from fedpeft_edge.protocol.config import ConnectionSettings, transport_config
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.protocol.topics import ROOT, Topics, check_name
from fedpeft_edge.protocol.transport import MqttTransport
from fedpeft_edge.runtime.errors import InvalidValueError

log = logging.getLogger(__name__)

SYNC_S: Final = 2.0  # after (re)connecting, retained messages for this long are the baseline, not events
PUBLISH_TIMEOUT_S: Final = 10.0


class FleetFollower:
    def __init__(
        self,
        connection: ConnectionSettings,
        view: FleetView,
        *,
        client_id: str | None = None,
        sync_s: float = SYNC_S,
    ) -> None:
        self.view = view
        self.sync_s = sync_s
        self.topics = Topics(view.fleet)
        # Mosquitto's plant config sets use_username_as_clientid; elsewhere a random id avoids taking over
        # another console's (or `fedpeft-edge control`'s) session.
        tcfg = transport_config(connection, client_id or f"console-{secrets.token_hex(4)}")
        tcfg.clean_start = True
        self.transport = MqttTransport(tcfg)
        for topic in (self.topics.status_filter, self.topics.info_filter, self.topics.federation):
            self.transport.subscribe(topic, qos=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prefix = f"{ROOT}/{self.topics.fleet}/"

    def start(self, connect_timeout: float | None = 30.0) -> None:
        self.transport.connect(connect_timeout)
        self._thread = threading.Thread(target=self._loop, name="console-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.transport.close()

    def _loop(self) -> None:
        synced_at = time.monotonic() + self.sync_s
        while not self._stop.is_set():
            # After a reconnect the retained set comes again; the view only writes events on changes.
            self.view.connected = self.transport.connected
            if synced_at and time.monotonic() >= synced_at:
                self.view.end_sync()
                synced_at = 0.0
            msg = self.transport.get(timeout=0.2)
            if msg is None or not msg.payload:
                continue
            try:
                self.dispatch(msg.topic, msg.payload)
            except WireFormatError as exc:
                self.view.on_malformed()
                log.warning("malformed message on %s dropped: %s", msg.topic, exc)
            except Exception:  # a bug here must not stop the console from following the fleet
                log.exception("unexpected error on a message from %s", msg.topic)

    def dispatch(self, topic: str, payload: bytes) -> None:
        """Decode one message by its topic and hand it to the view."""
        if not topic.startswith(self._prefix):
            return
        rest = topic[len(self._prefix) :].split("/")
        if rest == ["federation"]:
            rep = fleet_report.decode_report(payload)
            if rep.fleet != self.topics.fleet:
                raise WireFormatError("bad_string", f"a report of fleet {rep.fleet!r} on this fleet's topic")
            self.view.on_report(rep)
        elif len(rest) == 2 and rest[0] in ("status", "info"):
            site = check_name("client id", rest[1])
            if rest[0] == "status":
                st = notices.decode_status(payload)
                if st.client_id != site:  # the topic is the identity the broker vouches for
                    raise WireFormatError("bad_string", f"status of {st.client_id!r} on {site}'s topic")
                self.view.on_status(site, st)
            else:
                info = fleet_report.decode_info(payload)
                if info.site != site:
                    raise WireFormatError("bad_string", f"info of {info.site!r} on {site}'s topic")
                self.view.on_info(site, info)

    def send(self, cmd: notices.ControlCommand) -> None:
        """Publish one operator command (QoS 1, not retained: a retained command would be replayed to
        every new subscriber) and wait until the broker has it."""
        data = notices.encode_control(cmd)
        if not self.transport.connected:
            raise InvalidValueError("the console is not connected to the broker; the command was not sent")
        if not self.transport.publish(self.topics.control, data, qos=1).wait(PUBLISH_TIMEOUT_S):
            raise InvalidValueError(
                "the broker did not acknowledge the command within "
                f"{PUBLISH_TIMEOUT_S:.0f} s; it may not have been sent"
            )


def new_command(action: str, site: str | None, by: str, now: float | None = None) -> notices.ControlCommand:
    """A command with a fresh id; InvalidValueError for a combination the decoder would refuse."""
    cmd = notices.ControlCommand(secrets.token_hex(16), action, site, by, time.time() if now is None else now)
    try:
        notices.encode_control(cmd)
    except WireFormatError as exc:
        raise InvalidValueError(f"{action}{f' {site}' if site else ''}: {exc}") from exc
    return cmd


__all__ = ["FleetFollower", "new_command"]
