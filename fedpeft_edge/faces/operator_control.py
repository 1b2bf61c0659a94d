"""``fedpeft-edge control``: publish an operator action on ``fedpeft/<fleet>/control`` and wait for the
confirmations (the console calls :func:`send_command` too).

The command (notices.ControlCommand, QoS 1, not retained: a retained command would be replayed to every
new subscriber; ids make a replay harmless anyway) is published as the ``operator`` broker account, the
only one the plant ACL lets write the control topic. The aggregator and the site concerned confirm on
their status topics with a detail ending in ``(cmd <id>)``; this waits (bounded) for the aggregator's
and, for a site pause/resume, that site's.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedpeft_edge.faces.fleet_status import StatusConfig
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.config import transport_config
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport
from fedpeft_edge.runtime.errors import InvalidValueError


@dataclass
class ControlOutcome:
    command: notices.ControlCommand
    confirmations: list[notices.StatusMessage] = field(default_factory=list)
    waiting_for: set[str] = field(default_factory=set)  # who has not confirmed within the wait

    @property
    def refused(self) -> bool:
        return any("refused" in s.detail for s in self.confirmations)

    @property
    def complete(self) -> bool:
        return not self.waiting_for


def make_command(action: str, site: str | None, by: str) -> notices.ControlCommand:
    """A fresh command; raises InvalidValueError for a combination the decoder would refuse."""
    cmd = notices.ControlCommand(secrets.token_hex(16), action, site, by, time.time())
    try:
        notices.encode_control(cmd)
    except WireFormatError as exc:
        raise InvalidValueError(f"control {action}{f' --site {site}' if site else ''}: {exc}") from exc
    return cmd


def send_command(cfg: StatusConfig, cmd: notices.ControlCommand, *, aggregator_id: str = "aggregator",
                 wait_s: float = 10.0, client_id: str | None = None, connect_timeout: float = 10.0,
                 on_confirmation: Callable[[notices.StatusMessage], None] | None = None) -> ControlOutcome:
    """Publish ``cmd`` (QoS 1) and collect the statuses that confirm it, until the aggregator (and for a
    site pause/resume, that site) confirmed or ``wait_s`` passed."""
    topics = Topics(cfg.fleet.name)
    tcfg = transport_config(cfg.connection, client_id or f"control-{secrets.token_hex(4)}")
    tcfg.clean_start = True  # leave no session behind at the broker
    transport = MqttTransport(tcfg)
    transport.subscribe(topics.status_filter, qos=1)  # before publishing: no confirmation can slip by
    transport.connect(connect_timeout)
    out = ControlOutcome(cmd, waiting_for={aggregator_id})
    if cmd.site is not None and cmd.action in ("pause", "resume"):
        out.waiting_for.add(cmd.site)
    try:
        time.sleep(0.2)  # the SUBACK: MQTT has no ordering between our SUBSCRIBE and a fast reply
        if not transport.publish(topics.control, notices.encode_control(cmd), qos=1).wait(connect_timeout):
            raise InvalidValueError("the broker did not acknowledge the control command")
        deadline = time.monotonic() + wait_s
        while out.waiting_for and (left := deadline - time.monotonic()) > 0:
            msg = transport.get(timeout=min(left, 0.2))
            if msg is None or not msg.payload:
                continue
            try:
                st = notices.decode_status(msg.payload)
            except WireFormatError:
                continue
            if notices.command_id_in(st.detail) != cmd.id or topics.client_of(msg.topic) != st.client_id:
                continue
            out.confirmations.append(st)
            out.waiting_for.discard(st.client_id)
            if on_confirmation is not None:
                on_confirmation(st)
    finally:
        transport.close()
    return out


__all__ = ["ControlOutcome", "make_command", "send_command"]
