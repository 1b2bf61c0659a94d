"""The site bundle the fleet trains with, as the aggregator announces it on ``fedpeft/<fleet>/bundle``.

``[aggregator] bundle_file`` (its id is read from the manifest, structure and id checked; the signature
is the sites' business) or ``bundle_id``. The notice is published retained on every (re)connect, before
the global, so a site that subscribes to both gets it first.
"""

from __future__ import annotations

import logging
import re
import time

from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport
from fedpeft_edge.protocol.wire import WireLimits
from fedpeft_edge.runtime.errors import InvalidValueError

log = logging.getLogger(__name__)


def fleet_bundle_id(bundle_file: str | None, bundle_id: str | None) -> str | None:
    """The id to announce (None: announce nothing)."""
    if bundle_file and bundle_id:
        raise InvalidValueError("[aggregator] set bundle_file or bundle_id, not both")
    if bundle_id:
        if not re.fullmatch(r"[0-9a-f]{64}", bundle_id):
            raise InvalidValueError("[aggregator] bundle_id must be 64 lowercase hex characters "
                                    "(`fedpeft-edge bundle inspect FILE` prints it)")
        return bundle_id
    if not bundle_file:
        return None
    from fedpeft_edge.bundle.format import open_bundle

    with open_bundle(bundle_file) as b:
        b.check_id()
        return b.bundle_id


def announce_bundle(transport: MqttTransport, topics: Topics, bundle_id: str | None,
                    limits: WireLimits) -> None:
    """Publish the retained notice (paho's thread, from the connect hook: publish only, never wait)."""
    if bundle_id is None:
        return
    data = notices.encode_bundle_notice(notices.BundleNotice(topics.fleet, bundle_id, time.time()), limits)
    transport.publish(topics.bundle, data, qos=1, retain=True)


__all__ = ["announce_bundle", "fleet_bundle_id"]
