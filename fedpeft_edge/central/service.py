"""Aggregator service: the MQTT loop around :class:`~fedpeft_edge.central.core.AggregatorCore`.

Subscribes to ``fedpeft/{fleet}/update/+`` (QoS 1, persistent session, manual PUBACK) and
``fedpeft/{fleet}/status/+``; publishes the global adapter retained on ``fedpeft/{fleet}/global``.

Per incoming update: size cap → chunk reassembly (per sender = topic level) → wire decoding (hostile
input, typed reasons) → ``core.offer`` (sender must match the envelope, spec hash, round, dedup by
(client, round), late policy, norm bound). Per batch of messages, in this order: the chunks received
are fsynced to the chunk spool (``<state_dir>/chunks``), the core persists its state atomically, the
spool forgets the chunks of messages that were consumed, and only then the batch is acknowledged
(PUBACK). A kill -9 at any point therefore loses nothing and counts nothing twice: a message not yet
persisted is redelivered by the broker, one already persisted is recognised as a duplicate, and the
acknowledged chunks of a half-received multi-part update are reloaded from the spool on restart.

What gets acknowledged (the broker redelivers whatever is not):

* a message rejected for its content (wire decoding, policy, or an unexpected exception while
  processing it, which is deterministic in the bytes: ``internal_error``, a copy is kept in
  ``<state_dir>/quarantine``) is acknowledged, or it would come back forever;
* a failure to persist (round state or chunk spool, :class:`StateError` / :class:`SpoolError`, or
  ``MemoryError``) acknowledges nothing of the batch: ``run()`` stops with the error (crash-only: the
  next start reloads the persisted state and the broker redelivers the batch).

On start the deadline clock of the open round is restarted (a resumed round gets its full deadline
again instead of closing at once with ``min_clients`` after a long outage).

A round closes on quorum or at its deadline (with ``min_clients``); the server optimiser makes the
next global, which is published retained with QoS 1; one JSON line per round goes to the metrics file.
After ``max_rounds`` the final global is published with ``meta.final = true`` and the service exits.
Every rejected message is logged with its reason and counted; nothing a peer sends can crash the loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft_edge.central.config import AggregatorServiceConfig
from fedpeft_edge.central.core import AggregatorConfig, AggregatorCore
from fedpeft_edge.central.store import StateError
from fedpeft_edge.protocol import chunk_spool, chunking, wire
from fedpeft_edge.protocol.config import default_spec_hash, transport_config
from fedpeft_edge.protocol.reasons import WireFormatError, reason_of
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import Message, MqttTransport, Will
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError

log = logging.getLogger(__name__)

QUARANTINE_KEEP = 64  # newest messages kept that failed with an unexpected error
# Failures after which memory may be ahead of disk: acknowledge nothing, stop, restart from disk.
PERSISTENCE_FAILURES: tuple[type[BaseException], ...] = (StateError, chunk_spool.SpoolError, MemoryError)


def load_vector(path: str | Path) -> np.ndarray:
    """A 1-D float32 vector from a .npy file (no pickles)."""
    try:
        arr = np.load(Path(path), allow_pickle=False)
    except (OSError, InvalidValueError) as exc:
        raise InvalidValueError(f"cannot read initial global {path}: {exc}") from exc
    if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.size == 0:
        raise InvalidValueError(f"initial global {path} must be a non-empty 1-D array")
    if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)):
        raise InvalidValueError(f"initial global {path} must hold finite floats")
    return arr.astype(np.float32)


@dataclass
class AggregatorResult:
    rounds_closed: int
    final_round: int
    finished: bool
    counters: dict[str, int]
    global_vector: np.ndarray


class AggregatorService:
    """``run()`` serves rounds until ``max_rounds`` is reached or ``stop()`` is called."""

    def __init__(self, config: AggregatorServiceConfig, *, initial_global: np.ndarray | None = None,
                 spec_hash: str | None = None, limits: wire.WireLimits | None = None) -> None:
        a = config.aggregator
        self.cfg = config
        self.topics = Topics(config.fleet.name)
        self.state_dir = Path(a.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = Path(a.metrics_file) if a.metrics_file else self.state_dir / "metrics.jsonl"
        if initial_global is None and a.initial_global:
            initial_global = load_vector(a.initial_global)
        if initial_global is None:
            initial_global, bundle_hash = _initial_from_trainer(config)
            spec_hash = spec_hash or bundle_hash
        n = int(initial_global.size)
        self.spec_hash = a.spec_hash or spec_hash or default_spec_hash(n)
        self.limits = limits or wire.WireLimits(max_message_bytes=int(a.max_update_bytes),
                                                max_params=max(n, 1))
        self.core_config = AggregatorConfig.for_fleet(a.policy, fleet=config.fleet.name, n_params=n,
                                                      spec_hash=self.spec_hash)
        # State is saved once per batch of messages (then the batch is acknowledged): same exactly-once
        # guarantee as saving per update, without one fsync per update under load.
        self.core = AggregatorCore(self.core_config, self.state_dir, initial_global=initial_global,
                                   autosave=False)
        # Chunks are acknowledged as they arrive, so they are journalled on disk first (see module doc).
        self.reassembler = chunking.Reassembler(
            max_message_bytes=int(a.max_update_bytes), timeout_s=float(a.chunk_timeout_s),
            spool=chunk_spool.ChunkSpool(self.state_dir / "chunks"))
        self.rejections: Counter[str] = Counter()  # this process's rejections by reason (logs, tests)
        self._stale_fleets: set[str] = set()  # fleets whose leftover subscriptions were dropped
        self._stop = threading.Event()
        self.serving = threading.Event()  # set once recovery is done and the message loop runs
        self.transport: MqttTransport | None = None
        self._round_rejections_base = dict(self.core.counters)

    # --- helpers ----------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def _global_payload(self) -> bytes:
        return wire.encode_global(self.core.global_message(), self.limits)

    def _publish_global(self, timeout: float = 30.0) -> int:
        assert self.transport is not None
        data = self._global_payload()
        if len(data) > self.transport.max_payload(self.topics.global_):
            raise InvalidValueError(f"global message of {len(data)} bytes exceeds the broker packet limit; "
                             "raise max_packet_size or use global_mode = 'int8'")
        handle = self.transport.publish(self.topics.global_, data, qos=1, retain=True)
        if not handle.wait(timeout):
            log.warning("global for round %d not yet acknowledged by the broker (will be resent)",
                        self.core.round)
        log.info("global published for round %d (%d bytes%s)", self.core.round, len(data),
                 ", final" if self.core.finished else "")
        return len(data)

    def _next_batch(self, max_messages: int = 256) -> list[Message]:
        assert self.transport is not None
        first = self.transport.get(0.1)
        if first is None:
            return []
        batch = [first]
        while len(batch) < max_messages:
            nxt = self.transport.get(0.0)
            if nxt is None:
                break
            batch.append(nxt)
        return batch

    def _reject(self, sender: str | None, reason: str, detail: str, nbytes: int) -> None:
        self.core.note_rejected(reason, nbytes)
        self.rejections[reason] += 1
        log.warning("update from %s rejected (%s): %s", sender or "?", reason, detail)

    # --- message handling -------------------------------------------------------------------------
    def handle(self, msg: Message, now: float | None = None) -> str:
        """Process one MQTT message; returns a short outcome code. Never raises for bad input; raises
        :data:`PERSISTENCE_FAILURES` when a chunk or the state cannot be made durable."""
        now = time.time() if now is None else now
        sender = self.topics.client_of(msg.topic)
        if msg.topic.startswith(f"fedpeft/{self.topics.fleet}/status/"):
            self._log_status(sender, msg.payload)
            return "status"
        if sender is None:
            if self._drop_stale_subscription(msg.topic):
                return "stale_subscription"
            self._reject(None, "bad_topic", f"topic {msg.topic!r}", len(msg.payload))
            return "rejected"
        size = len(msg.payload)
        try:
            if chunking.is_chunk(msg.payload):
                whole = self.reassembler.feed(sender, msg.payload, now)
                if whole is None:
                    return "chunk"
                data = whole
            else:
                if size > self.limits.max_message_bytes:
                    raise WireFormatError("oversized", f"{size} bytes > {self.limits.max_message_bytes}")
                data = msg.payload
        except WireFormatError as exc:
            self._reject(sender, reason_of(exc), str(exc), size)
            return "rejected"
        return self._handle_update(sender, data, now, size)

    def _drop_stale_subscription(self, topic: str) -> bool:
        """A message of another fleet reaches us only through a subscription that the broker kept in
        this client id's persistent session from an earlier run (e.g. before the fleet was renamed).
        It is nobody's bad input: unsubscribe that fleet's filters once and ignore the message."""
        fleet = self.topics.other_fleet_of(topic)
        if fleet is None:
            return False
        if fleet not in self._stale_fleets:
            self._stale_fleets.add(fleet)
            log.info("ignoring messages of fleet %r (a subscription left in this client's broker session "
                     "by an earlier run); unsubscribing", fleet)
            if self.transport is not None:
                stale = Topics(fleet)
                self.transport.unsubscribe(stale.updates_filter)
                self.transport.unsubscribe(stale.status_filter)
        return True

    def _handle_update(self, sender: str, data: bytes, now: float, size: int) -> str:
        """Decode a whole (reassembled) update and offer it to the core."""
        try:
            upd = wire.decode_update(data, self.limits)
        except WireFormatError as exc:
            self._reject(sender, reason_of(exc), str(exc), size)
            return "rejected"
        decision = self.core.offer(upd, sender=sender, nbytes=len(data), now=now)
        if decision.accepted:
            log.info("update from %s for round %d accepted (%d samples, weight %.1f%s); %d/%d this round",
                     sender, upd.round, upd.num_samples, decision.weight,
                     f", {decision.staleness} round(s) late" if decision.staleness else "",
                     self.core.accepted_this_round, self.core_config.quorum)
        elif decision.status == "rejected":
            self.rejections[decision.reason] += 1
            log.warning("update from %s for round %d rejected (%s)", sender, upd.round, decision.reason)
        else:
            log.info("update from %s for round %d %s (%s)", sender, upd.round, decision.status,
                     decision.reason)
        return decision.status

    def _quarantine(self, msg: Message, now: float) -> None:
        """Keep a copy of a message that failed unexpectedly (it is acknowledged, so the broker
        forgets it): an operator can inspect or re-inject it. Bounded to the newest few."""
        qdir = self.state_dir / "quarantine"
        try:
            qdir.mkdir(exist_ok=True)
            level = msg.topic.replace("/", "_")[-80:]
            digest = hashlib.sha256(msg.payload).hexdigest()[:16]
            (qdir / f"{int(now * 1000):015d}-{level}-{digest}.msg").write_bytes(msg.payload)
            for old in sorted(qdir.glob("*.msg"))[:-QUARANTINE_KEEP]:
                old.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not quarantine a message from %s: %s", msg.topic, exc)

    def process_batch(self, batch: list[Message], now: float) -> None:
        """Handle a batch, persist (chunk spool, then round state), then acknowledge it.

        Raises (acknowledging nothing) on a persistence failure, see :data:`PERSISTENCE_FAILURES`.
        """
        assert self.transport is not None
        for msg in batch:
            try:
                self.handle(msg, now)
            except PERSISTENCE_FAILURES:
                raise
            except Exception:
                # Not a persistence problem, so it is a function of this message's bytes (the core
                # raises StateError if it may have changed state half-way): retrying can only fail
                # again, so reject it for good, with a copy kept for the operator.
                log.exception("unexpected error on a message from %s (%d bytes); rejected as "
                              "internal_error, copy in %s", msg.topic, len(msg.payload),
                              self.state_dir / "quarantine")
                self._quarantine(msg, now)
                self._reject(self.topics.client_of(msg.topic), "internal_error", "see the traceback above",
                             len(msg.payload))
        self.reassembler.sync()  # chunks durable before they are acknowledged
        self.core.checkpoint()  # round state (counts + sum) durable before acknowledging
        self.reassembler.commit()  # consumed messages' chunks are no longer needed
        for msg in batch:
            self.transport.ack(msg)

    def recover_spooled(self, now: float) -> int:
        """Reload the chunk spool; updates that were complete on disk are offered again (the core
        recognises one already counted as a duplicate). Returns how many were complete."""
        recovered = self.reassembler.restore(now)
        for sender, data in recovered:
            try:
                self._handle_update(sender, data, now, len(data))
            except PERSISTENCE_FAILURES:
                raise
            except Exception:
                log.exception("unexpected error on a spooled update from %s; rejected", sender)
                self._reject(sender, "internal_error", "see the traceback above", len(data))
        self.core.checkpoint()
        self.reassembler.commit()
        return len(recovered)

    def _log_status(self, sender: str | None, payload: bytes) -> None:
        if not payload:
            return
        try:
            st = wire.decode_status(payload, self.limits)
        except WireFormatError as exc:
            log.debug("unreadable status from %s: %s", sender, exc)
            return
        where = f" (round {st.round})" if st.round is not None else ""
        log.info("site %s is %s%s", st.client_id, st.state, where)

    # --- rounds -----------------------------------------------------------------------------------
    def _close_round(self, now: float) -> None:
        closing = self.core.round
        _, metrics = self.core.close_round(now)
        counters = self.core.counters
        rejected = {k.split(":", 1)[1]: v - self._round_rejections_base.get(k, 0)
                    for k, v in counters.items() if k.startswith("rejected:")}
        self._round_rejections_base = counters
        bytes_out = self._publish_global()
        line = dict(metrics, bytes_out=bytes_out, closed_at=now, next_round=self.core.round,
                    rejected={k: v for k, v in rejected.items() if v},
                    chunk_drops=dict(self.reassembler.drops))
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(line, default=float) + "\n")
        log.info("round %d closed: %d participant(s) %s, %.1f s, mean client loss %s; next round %d",
                 closing, metrics["num_updates"], metrics["participants"], metrics["duration_s"],
                 f"{metrics['loss']:.4f}" if "loss" in metrics else "n/a", self.core.round)

    def run(self, *, connect_timeout: float | None = 60.0) -> AggregatorResult:
        a = self.cfg.aggregator
        tcfg = transport_config(self.cfg.connection, a.client_id, manual_ack=True)
        offline = wire.encode_status(wire.StatusMessage(a.client_id, "offline", time.time(), None),
                                     self.limits)
        status_topic = self.topics.status(a.client_id)

        def announce(t: MqttTransport) -> None:  # paho's thread, on every (re)connect
            online = wire.StatusMessage(a.client_id, "online", time.time(), self.core.round)
            t.publish(status_topic, wire.encode_status(online, self.limits), retain=True)

        self.transport = MqttTransport(tcfg, will=Will(status_topic, offline), on_connect=announce)
        self.transport.subscribe(self.topics.updates_filter, qos=1)
        self.transport.subscribe(self.topics.status_filter, qos=1)
        self.transport.connect(connect_timeout)
        log.info("aggregator for fleet %s: round %d, %d parameters, spec %s, quorum %d, deadline %.0f s, "
                 "max rounds %s, state in %s", self.topics.fleet, self.core.round, self.core_config.n_params,
                 self.spec_hash, self.core_config.quorum, self.core_config.round_deadline_s,
                 self.core_config.max_rounds, self.state_dir)
        closed = 0
        batch: list[Message] = []
        try:
            self.recover_spooled(time.time())
            # (Re)publish the current global: after a crash between closing a round and publishing,
            # this is what completes the round's hand-over.
            self._publish_global()
            # The sites may only now learn the round (again): its deadline counts from here, not from
            # before an outage, or a resumed round could close at once with just min_clients.
            self.core.restart_round_clock(time.time())
            self.core.checkpoint()
            self.serving.set()
            while not self._stop.is_set() and not self.core.finished:
                batch = self._next_batch()
                now = time.time()
                if batch:
                    self.process_batch(batch, now)
                    batch = []
                self.reassembler.purge(now)
                if self.core.ready_to_close(now):
                    self._close_round(now)
                    closed += 1
            if self.core.finished:
                log.info("all %d rounds done; final global published", self.core_config.max_rounds)
        except PERSISTENCE_FAILURES as exc:
            log.error("state could not be persisted (%s); stopping with %d message(s) unacknowledged: the "
                      "broker redelivers them to the next start, which resumes from disk", exc, len(batch))
            if isinstance(exc, MemoryError):
                raise StateError(f"out of memory while processing messages: {exc}") from exc
            raise
        finally:
            if self.reassembler.spool is not None:
                self.reassembler.spool.close()
            final_state = "done" if self.core.finished else "offline"
            bye = wire.StatusMessage(a.client_id, final_state, time.time(), self.core.round)
            self.transport.close(final=(status_topic, wire.encode_status(bye, self.limits)))
        return AggregatorResult(closed, self.core.round, self.core.finished, self.core.counters,
                                np.array(self.core.global_vector))


def _initial_from_trainer(cfg: AggregatorServiceConfig) -> tuple[np.ndarray, str | None]:
    """The first global from ``[trainer]``: the bundle's starting adapter (no trainer or data is built),
    or, for ``kind = "factory"`` (tests, simulations), the factory's trainer."""
    t = cfg.trainer
    if t.kind == "ort" and t.bundle_dir:
        from fedpeft_edge.peft.artifacts import ArtifactBundle

        try:
            bundle = ArtifactBundle.load(t.bundle_dir)
        except (OSError, FedPeftError) as exc:
            raise InvalidValueError(f"aggregator cannot read the bundle {t.bundle_dir}: {exc}") from exc
        return bundle.initial_vector(), bundle.spec_hash
    if t.kind == "factory" and t.factory and ":" in t.factory:
        import importlib

        mod_name, func_name = t.factory.split(":", 1)
        setup = getattr(importlib.import_module(mod_name), func_name)(cfg)
        return np.asarray(setup.trainer.get_flat(), dtype=np.float32), setup.spec_hash
    raise InvalidValueError(
        "aggregator needs an initial global: set aggregator.initial_global (.npy), or a [trainer] section "
        "with kind = 'ort' + bundle_dir (or kind = 'factory' + factory)")
