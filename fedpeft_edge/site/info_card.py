"""A site's info card: what it runs, retained on ``fedpeft/{fleet}/info/{site}`` for the operator console
(wire format: :class:`fedpeft_edge.protocol.fleet_report.SiteInfo`).

The agent publishes it on every (re)connect, from the same connect hook as its status (paho's thread:
publish only, never block), and again when it adopts the aggregator's spec hash. What does not change
while the process runs (training runtime, version, platform, Python) is read once, when the card is made:
the runtime label imports onnxruntime, which must not happen in paho's thread.
"""

from __future__ import annotations

import functools
import logging
import platform
import re
import time

from fedpeft_edge import __version__
from fedpeft_edge.protocol.fleet_report import SiteInfo, encode_info
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport
from fedpeft_edge.protocol.wire import DEFAULT_LIMITS, WireLimits

log = logging.getLogger(__name__)

_NOT_PRINTABLE_RE = re.compile(r"[^ -~]")
_BUNDLE_ID_RE = re.compile(r"[0-9a-f]{64}")


def _printable(text: str, max_len: int) -> str:
    return _NOT_PRINTABLE_RE.sub("?", str(text))[:max_len]


@functools.lru_cache(maxsize=1)
def runtime_description() -> str:
    """``runtime.ort_import.runtime_label()`` (``"onnxruntime 1.19.2"``), or ``"unknown"`` when
    onnxruntime cannot be imported (a numpy test trainer needs none). Read once per process."""
    try:
        from fedpeft_edge.runtime.ort_import import runtime_label

        return runtime_label()
    except Exception as exc:  # MissingDependencyError, a broken install: the card still goes out
        log.debug("no training runtime to report: %s", exc)
        return "unknown"


def site_info(site: str, *, bundle: str | None, spec: str | None, now: float | None = None) -> SiteInfo:
    """The card of ``site``: its signed bundle's id (None without a bundle), the spec hash it trains
    (``""`` while it has not learnt one), runtime, version, platform and Python."""
    return SiteInfo(
        site=site, bundle=bundle if bundle and _BUNDLE_ID_RE.fullmatch(bundle) else None,
        spec=_printable(spec or "", 128), runtime=_printable(runtime_description(), 64),
        version=_printable(__version__, 32),
        platform=_printable(f"{platform.system()} {platform.machine()}", 64),
        python=_printable(platform.python_version(), 32), time=time.time() if now is None else now)


class InfoCard:
    """The agent's card: :meth:`publish` it on every (re)connect. Made once (reads the runtime)."""

    def __init__(self, site: str, bundle: str | None) -> None:
        self.site = site
        self.bundle = bundle
        runtime_description()  # warm the cache here, not in paho's thread

    def publish(self, transport: MqttTransport, topics: Topics, spec: str | None,
                limits: WireLimits = DEFAULT_LIMITS) -> None:
        """Publish the card retained, QoS 1; never raises (the card is informative only)."""
        try:
            data = encode_info(site_info(self.site, bundle=self.bundle, spec=spec), limits)
            transport.publish(topics.info(self.site), data, qos=1, retain=True)
        except Exception as exc:
            log.warning("site info card not published: %s", exc)


__all__ = ["InfoCard", "runtime_description", "site_info"]
