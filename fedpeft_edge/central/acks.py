"""The aggregator's acknowledgements to sites: decisions queued per batch, published once they are durable.

A site deletes an update from its outbox on its ack, so an ack must never go out before the round state
holding its decision is saved: the service queues them while it handles a batch and calls :meth:`send`
after ``core.checkpoint()`` (or :meth:`clear` when the batch is abandoned).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter

from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport
from fedpeft_edge.protocol.wire import WireLimits
from fedpeft_edge.runtime.errors import FedPeftError

log = logging.getLogger(__name__)


class AckQueue:
    def __init__(self, topics: Topics, limits: WireLimits) -> None:
        self.topics, self.limits = topics, limits
        # One ack per update and batch: keyed by (site, round, chunk message id); all chunks of a re-sent
        # multi-part update give one "received" ack.
        self._pending: dict[tuple[str, int | None, str | None], notices.AckMessage] = {}
        self.sent: Counter[str] = Counter()  # by status (logs, tests)

    def queue(self, site: str, rnd: int | None, status: str, reason: str = "",
              msg_id: str | None = None) -> None:
        reason = re.sub(r"[^ -~]", "?", reason)[: notices.MAX_ACK_REASON]  # printable ASCII for the wire
        self._pending[(site, rnd, msg_id)] = notices.AckMessage(self.topics.fleet, site, rnd, status, reason,
                                                                time.time(), msg_id)

    def clear(self) -> None:
        self._pending = {}

    def send(self, transport: MqttTransport | None) -> None:
        """Publish the queued acks. Call only after the state holding their decisions is durable."""
        acks, self._pending = self._pending, {}
        if transport is None:
            return
        for ack in acks.values():
            try:
                transport.publish(self.topics.ack(ack.site), notices.encode_ack(ack, self.limits), qos=1)
            except FedPeftError as exc:  # e.g. an odd site name: that site resends and is acked later
                log.warning("ack to %s for round %s not sent: %s", ack.site, ack.round, exc)
                continue
            self.sent[ack.status] += 1


__all__ = ["AckQueue"]
