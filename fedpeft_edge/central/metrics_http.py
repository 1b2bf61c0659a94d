"""The aggregator's Prometheus endpoint: ``/metrics`` over HTTP, off unless ``[aggregator] metrics_port``.

Everything is read from the service at scrape time (a custom collector), so the message loop pays
nothing per update and the values are exactly the persisted counters of the core (cumulative over
restarts, as a Prometheus counter expects): only the bytes of published globals are counted here.
Each service has its own :class:`~prometheus_client.CollectorRegistry`, never the global one, so several
services (tests, a demo) can run in one process.

Exported (prefix ``fedpeft_aggregator_``): ``round``, ``round_participants``, ``accepted_updates_total``,
``bytes_in_total``, ``bytes_rejected_total``, ``bytes_out_total``, ``rejections_total{reason}``,
``last_round_duration_seconds``, ``rounds_closed_total``, ``paused``, ``finished``; and the standard
``process_*`` metrics of this process (``process_start_time_seconds``, CPU, memory; Linux).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fedpeft_edge.central.service import AggregatorService

log = logging.getLogger(__name__)

PREFIX = "fedpeft_aggregator"


def _flag(value: Any) -> float:
    """A pause flag may be a bool or a threading.Event (whoever drives it): 1.0 when set."""
    is_set = getattr(value, "is_set", None)
    return 1.0 if (is_set() if callable(is_set) else bool(value)) else 0.0


class _ServiceCollector(Collector):
    def __init__(self, metrics: AggregatorMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        svc = self.m.service
        core = svc.core
        counters = core.counters  # a copy: safe against the message loop
        history = core.history

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        yield gauge("round", "The open round (rounds start at 0).", core.round)
        yield gauge("round_participants", "Sites with an accepted update in the open round.",
                    len(core.participants))
        yield counter("accepted_updates", "Updates accepted into a round.", counters.get("accepted", 0))
        yield counter("bytes_in", "Bytes of accepted updates.", counters.get("bytes_in", 0))
        yield counter("bytes_rejected", "Bytes of rejected messages.", counters.get("bytes_rejected", 0))
        yield counter("bytes_out", "Bytes of global adapters published by this process.",
                      self.m.bytes_out)
        rej = CounterMetricFamily(f"{PREFIX}_rejections", "Rejected messages by reason.", labels=["reason"])
        for key, value in sorted(counters.items()):
            if key.startswith("rejected:"):
                rej.add_metric([key.split(":", 1)[1]], value)
        yield rej
        last = float(history[-1].get("duration_s", 0.0)) if history else 0.0
        yield gauge("last_round_duration_seconds", "Duration of the last closed round.", last)
        yield counter("rounds_closed", "Rounds closed.", counters.get("rounds_closed", 0))
        yield gauge("paused", "1 while the federation is paused (AggregatorService.paused).",
                    _flag(getattr(svc, "paused", False)))
        yield gauge("finished", "1 once the final round is closed.", 1.0 if core.finished else 0.0)


class AggregatorMetrics:
    """The service's registry and its HTTP server (started by :meth:`start`, only if ``port`` > 0)."""

    def __init__(self, service: AggregatorService, port: int = 0, bind: str = "127.0.0.1") -> None:
        self.service = service
        self.port = int(port)
        self.bind = bind
        self.bytes_out = 0  # globals published by this process (the core does not count them)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_ServiceCollector(self))
        ProcessCollector(registry=self.registry)  # process_start_time_seconds and friends
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def note_published(self, nbytes: int) -> None:
        self.bytes_out += int(nbytes)

    @property
    def enabled(self) -> bool:
        return self.port > 0

    def start(self) -> None:
        """Serve ``/metrics`` on ``bind:port`` in a daemon thread; a busy port fails the start (loudly)."""
        if not self.enabled or self._server is not None:
            return
        self._server, self._thread = start_http_server(self.port, addr=self.bind, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", self.bind, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["AggregatorMetrics"]
