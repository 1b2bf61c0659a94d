"""The gateway tier: one line's sites counted at the plant, forwarded upstream as one partial aggregate
(``fedpeft-edge gateway``).

Key names: ``service.GatewayService`` (the MQTT loop on the line's broker: the central core per batch,
sealing, resends); ``outbox.PartialOutbox`` (sealed partials on disk until the aggregator's ack);
``config`` (``[gateway]``). The wire format is ``protocol.partial``; the aggregator's side is
``central.core.AggregatorCore.offer_partial``. Submodules are not imported eagerly.
"""

from __future__ import annotations

__all__ = ["config", "outbox", "service"]
