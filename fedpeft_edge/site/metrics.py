"""A site agent's Prometheus metrics, kept local to the device: an HTTP port (``[agent] metrics_port``)
and/or a textfile for node_exporter's textfile collector (``[agent] metrics_textfile``). Both are off
by default.

The textfile is rewritten atomically (``prometheus_client.write_to_textfile``: a temporary file renamed
over it) when a value changed — checked once per pass of the agent's loop, and during training at most
every :data:`STEP_WRITE_INTERVAL_S` — so an idle agent does not wear a device's flash.

Exported (prefix ``fedpeft_agent_``): ``step_seconds`` (histogram of training step times),
``last_step_seconds``, ``rounds_sent_total``, ``outbox_depth`` (updates waiting for the aggregator's
acknowledgement), ``paused`` (1 while the governor or an operator holds training back; the reason is on
the site's MQTT status), ``last_global_round`` (-1: none yet), ``last_train_loss`` (NaN before the
first round), ``heldout_accuracy`` (the site's own held-out accuracy of the model it starts each round
from — the global, with its private tensors when it keeps some; NaN before the first evaluation). Each
agent has its own registry, so several agents can run in one process (tests, the demo).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Histogram, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fedpeft_edge.site.agent import EdgeAgent

log = logging.getLogger(__name__)

PREFIX = "fedpeft_agent"
STEP_WRITE_INTERVAL_S = 5.0  # textfile rewrites while training: a round can last far longer than a step
# Step times from a microcontroller-class gateway (seconds) down to a fast PC (milliseconds).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
T = TypeVar("T")


class _AgentCollector(Collector):
    """The values the agent already keeps, read at scrape (or write) time."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        for name, doc, value, kind in self.m.values():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"{PREFIX}_{name}", doc, value=value)


class AgentMetrics:
    def __init__(self, agent: EdgeAgent, *, port: int = 0, bind: str = "127.0.0.1",
                 textfile: str | None = None) -> None:
        self.agent = agent
        self.port = int(port)
        self.bind = bind
        self.textfile = textfile or None
        self.last_step_s = math.nan
        self.last_loss = math.nan
        self.heldout_accuracy = math.nan
        self.step_count = 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.steps = Histogram(f"{PREFIX}_step_seconds", "Time of one local training step.",
                               buckets=STEP_BUCKETS, registry=self.registry)
        self.registry.register(_AgentCollector(self))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._written: tuple[Any, ...] | None = None  # the values last written to the textfile
        self._written_at = 0.0

    @classmethod
    def for_agent(cls, agent: EdgeAgent) -> AgentMetrics:
        a = agent.cfg.agent
        return cls(agent, port=a.metrics_port, bind=a.metrics_bind, textfile=a.metrics_textfile)

    def values(self) -> list[tuple[str, str, float, str]]:
        """(name, help, value, kind) of the agent's own state; the step histogram comes on top."""
        ag = self.agent
        last_global = ag.last_global_round
        return [
            ("last_step_seconds", "Time of the last local training step.", self.last_step_s, "gauge"),
            ("rounds_sent", "Updates made and sent by this run.", len(ag.rounds_sent), "counter"),
            ("outbox_depth", "Updates waiting for the aggregator's acknowledgement.", len(ag._outgoing),
             "gauge"),
            ("paused", "1 while training is paused (the governor or an operator).",
             1.0 if ag._status_now[0] == "paused" else 0.0, "gauge"),
            ("last_global_round", "Round of the last global adapter received (-1: none).",
             -1 if last_global is None else last_global, "gauge"),
            ("last_train_loss", "Local training loss of the last round.", self.last_loss, "gauge"),
            ("heldout_accuracy", "This site's held-out accuracy of the model it trains from this round.",
             self.heldout_accuracy, "gauge"),
        ]

    # --- hooks called by the agent -----------------------------------------------------------------
    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """Pass the batches through, timing each step: from handing a batch to the trainer until it asks
        for the next one (or stops asking)."""
        for batch in batches:
            t0 = time.perf_counter()
            try:
                yield batch
            finally:  # also when the trainer stops early (max_steps) and the generator is closed
                self.last_step_s = time.perf_counter() - t0
                self.step_count += 1
                self.steps.observe(self.last_step_s)
            if time.monotonic() - self._written_at >= STEP_WRITE_INTERVAL_S:
                self.write()

    def trained(self, loss: float) -> None:
        self.last_loss = float(loss)

    def evaluated(self, accuracy: float) -> None:
        self.heldout_accuracy = float(accuracy)

    def start(self) -> None:
        if self.port > 0 and self._server is None:
            self._server, self._thread = start_http_server(self.port, addr=self.bind,
                                                           registry=self.registry)
            log.info("metrics on http://%s:%d/metrics", self.bind, self.port)
        self.write()

    def write(self, *, force: bool = False) -> None:
        """Rewrite the textfile (atomically) when a value changed since the last write."""
        if self.textfile is None:
            return
        # NaN != NaN: compare None instead, or a fresh agent would rewrite the file on every pass.
        snapshot = (tuple(None if math.isnan(v) else v for _, _, v, _ in self.values()), self.step_count)
        if not force and snapshot == self._written:
            return
        try:
            write_to_textfile(self.textfile, self.registry)
        except OSError as exc:  # a full or read-only disk must not stop training
            log.warning("could not write the metrics textfile %s: %s", self.textfile, exc)
            return
        self._written, self._written_at = snapshot, time.monotonic()

    def close(self) -> None:
        self.write()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["AgentMetrics"]
