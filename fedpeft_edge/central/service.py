"""Aggregator service: the MQTT loop around :class:`~fedpeft_edge.central.core.AggregatorCore`.

Subscribes to ``fedpeft/{fleet}/update/+`` (QoS 1, persistent session, manual PUBACK) and
``fedpeft/{fleet}/status/+``; publishes the global adapter retained on ``fedpeft/{fleet}/global`` and its
decision on every update to the sending site on ``fedpeft/{fleet}/ack/{site}`` (QoS 1, JSON).

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

End-to-end acknowledgement: the broker's PUBACK to a site only means "in the broker's memory", so
a site keeps each update until this service acknowledges it on the site's ack topic. Acks are published
only after the round state that holds the decision is durable (after ``core.checkpoint()`` in
:meth:`AggregatorService.process_batch` and :meth:`AggregatorService.recover_spooled`), for every update
decided — accepted, duplicate (so a resend of a counted update is acked again), late, or rejected once
its round is known — and for a re-sent chunk of a multi-part update already consumed (``received``,
named by its chunk message id). An update rejected before its round could be read gets no ack.

Re-announcement: after every reconnect (a broker restart may have lost the retained global, or this
client's session with its subscriptions) the main loop republishes the current global, retained; the
transport renews the subscriptions on every connect and the connect hook republishes the status. Sites
take a re-announced global as the sign to resend what is still unacknowledged. The final global is
republished the same way until the broker acknowledged it on the current connection (bounded).

After the final round the service stays up to ``final_linger_s``, until every site it heard from reports
itself done, idle or offline: a site whose last ack (or the final global) a broker crash lost resends,
and only a running aggregator can answer. Such late copies are answered from the final state
(``duplicate`` when counted, else ``late``) without touching the core.

On start the deadline clock of the open round is restarted (a resumed round gets its full deadline
again instead of closing at once with ``min_clients`` after a long outage).

A round closes on quorum or at its deadline (with ``min_clients``); with ``round_mode = "fedbuff"`` as
soon as ``buffer_k`` updates are in, checked after every message, so a batch of messages never puts more
than K into one step (the step's checkpoint comes before the batch's acknowledgements, like every
checkpoint). The server optimiser makes the next global, which is published retained with QoS 1; one
JSON line per round goes to the metrics file (rewritten on the next start from the saved round state if
a kill lost it: ``metrics_log``).
After ``max_rounds`` the final global is published with ``meta.final = true`` and the service exits.
Every rejected message is logged with its reason and counted; nothing a peer sends can crash the loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft_edge.central.acks import AckQueue
from fedpeft_edge.central.config import AggregatorServiceConfig
from fedpeft_edge.central.control import FederationControl
from fedpeft_edge.central.core import AggregatorConfig, AggregatorCore
from fedpeft_edge.central.federation_report import ReportPublisher
from fedpeft_edge.central.fleet_bundle import announce_bundle, fleet_bundle_id
from fedpeft_edge.central.initial_global import adapter_layout, initial_from_trainer, load_vector
from fedpeft_edge.central.metrics_http import AggregatorMetrics
from fedpeft_edge.central.metrics_log import MetricsLog
from fedpeft_edge.central.secure_round import SecureRound
from fedpeft_edge.central.store import StateError
from fedpeft_edge.peft.rank_slots import RankSlots
from fedpeft_edge.protocol import chunk_spool, chunking, notices, partial, wire
from fedpeft_edge.protocol.config import default_spec_hash, transport_config
from fedpeft_edge.protocol.reasons import WireFormatError, reason_of
from fedpeft_edge.protocol.secagg_policy import Publish
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import Message, MqttTransport, PublishHandle, Will
from fedpeft_edge.runtime.errors import InvalidValueError

log = logging.getLogger(__name__)

QUARANTINE_KEEP = 64  # newest messages kept that failed with an unexpected error
FINAL_ANNOUNCE_TIMEOUT_S = 30.0  # how long the final global is republished until the broker has it
# Site states that may still need an answer from us (anything else: done, idle, offline, error...).
ACTIVE_SITE_STATES = frozenset({"online", "training", "uploading"})
# Failures after which memory may be ahead of disk: acknowledge nothing, stop, restart from disk.
PERSISTENCE_FAILURES: tuple[type[BaseException], ...] = (StateError, chunk_spool.SpoolError, MemoryError)


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
        self.metrics_log = MetricsLog(self.metrics_path)
        if initial_global is None and a.initial_global:
            initial_global = load_vector(a.initial_global)
        if initial_global is None:
            initial_global, bundle_hash = initial_from_trainer(config)
            spec_hash = spec_hash or bundle_hash
        n = int(initial_global.size)
        self.spec_hash = a.spec_hash or spec_hash or default_spec_hash(n)
        self.limits = limits or wire.WireLimits(max_message_bytes=int(a.max_update_bytes),
                                                max_params=max(n, 1))
        self.core_config = AggregatorConfig.for_fleet(a.policy, fleet=config.fleet.name, n_params=n,
                                                      spec_hash=self.spec_hash, privacy=config.privacy,
                                                      secure=config.secagg.enabled)
        # State is saved once per batch of messages (then the batch is acknowledged): same exactly-once
        # guarantee as saving per update, without one fsync per update under load.
        layout = adapter_layout(config)  # sites below the bundle's LoRA rank need its slot map
        if layout is not None and layout.total != n:
            raise InvalidValueError(f"[trainer]'s adapter has {layout.total} parameters, the initial "
                                    f"global {n}")
        self.core = AggregatorCore(self.core_config, self.state_dir, initial_global=initial_global,
                                   autosave=False,
                                   rank_slots=RankSlots.from_layout(layout) if layout is not None else None)
        # Chunks are acknowledged as they arrive, so they are journalled on disk first (see module doc).
        self.reassembler = chunking.Reassembler(
            max_message_bytes=int(a.max_update_bytes), timeout_s=float(a.chunk_timeout_s),
            max_pending_bytes=int(a.max_pending_chunk_bytes),
            max_pending_bytes_per_sender=a.max_pending_chunk_bytes_per_site,
            spool=chunk_spool.ChunkSpool(self.state_dir / "chunks"))
        self.rejections: Counter[str] = Counter()  # this process's rejections by reason (logs, tests)
        self.acks = AckQueue(self.topics, self.limits)  # decisions of the current batch, sent once durable
        self._announced_at = -1  # transport.connect_count when the global was last published
        self._global_handle: PublishHandle | None = None
        self.site_states: dict[str, str] = {}  # last status per site (by topic), for the final linger
        self._stale_fleets: set[str] = set()  # fleets whose leftover subscriptions were dropped
        self._stop = threading.Event()
        self.serving = threading.Event()  # set once recovery is done and the message loop runs
        self.transport: MqttTransport | None = None
        self._round_rejections_base = dict(self.core.counters)
        self.bundle_id = fleet_bundle_id(a.bundle_file, a.bundle_id)  # announced on fedpeft/<fleet>/bundle
        self.control = FederationControl(self.state_dir, self.topics, a.client_id, self.limits)  # operator
        self.paused = False  # hook for the federation pause (issue 12): exported as fedpeft_aggregator_paused
        self.metrics = AggregatorMetrics(self, a.metrics_port, a.metrics_bind)  # /metrics (metrics_http.py)
        self.reports = ReportPublisher(self)  # retained on fedpeft/<fleet>/federation (federation_report.py)
        self.rounds_closed = 0  # rounds (FedBuff: server steps) closed by this process
        # [secagg]: every round's updates are summed under masks (central/secure_round.py)
        pol = a.policy
        self.secure = (SecureRound(config.secagg, self.topics, n, self.state_dir, quorum=pol.quorum,
                                   min_clients=pol.min_clients, round_deadline_s=pol.round_deadline_s)
                       if config.secagg.enabled else None)

    # --- helpers ----------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def _global_payload(self) -> bytes:
        return wire.encode_global(self.core.global_message(), self.limits)

    def _publish_global(self, timeout: float = 30.0, why: str = "") -> int:
        assert self.transport is not None
        data = self._global_payload()
        if len(data) > self.transport.max_payload(self.topics.global_):
            raise InvalidValueError(f"global message of {len(data)} bytes exceeds the broker packet limit; "
                             "raise max_packet_size or use global_mode = 'int8'")
        # Read before publishing: a reconnect after this point triggers another announcement.
        self._announced_at = self.transport.connect_count
        handle = self.transport.publish(self.topics.global_, data, qos=1, retain=True)
        self._global_handle = handle
        if timeout > 0 and not handle.wait(timeout):
            log.warning("global for round %d not yet acknowledged by the broker (will be resent)",
                        self.core.round)
        log.info("global %s for round %d (%d bytes%s)", f"re-announced ({why})" if why else "published",
                 self.core.round, len(data), ", final" if self.core.finished else "")
        self.metrics.note_published(len(data))
        return len(data)

    def _reannounce_if_reconnected(self) -> None:
        """After a reconnect the broker may have lost the retained global (crash, no persistence) or our
        session: publish it again. Runs in the main loop — paho's thread must not touch the core."""
        t = self.transport
        if t is not None and t.connected and t.connect_count != self._announced_at:
            self._publish_global(timeout=0, why="after a reconnect")
            if self.secure is not None:  # the session's retained messages may be gone with the broker too
                self._publish_secure(self.secure.announcements())
            self.reports.maybe_publish(time.time(), force=True)  # the broker may have lost it too

    def _announce_final(self, timeout: float = FINAL_ANNOUNCE_TIMEOUT_S) -> None:
        """Nobody republishes the final global after this service exits: make sure the broker took it on
        the current connection (republishing after any reconnect), bounded by ``timeout``."""
        assert self.transport is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            handle = self._global_handle
            if self.transport.connect_count != self._announced_at or handle is None:
                if self.transport.connected:
                    self._publish_global(timeout=0, why="final, after a reconnect")
            elif handle.is_published():
                return
            time.sleep(0.05)
        if not self._stop.is_set():
            log.warning("final global not confirmed by the broker within %.0f s; a restart of this service "
                        "publishes it again", timeout)

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
        self.core.note_rejected(reason, nbytes, sender=sender)
        self.rejections[reason] += 1
        log.warning("update from %s rejected (%s): %s", sender or "?", reason, detail)

    # --- message handling -------------------------------------------------------------------------
    def handle(self, msg: Message, now: float | None = None) -> str:
        """Process one MQTT message; returns a short outcome code. Never raises for bad input; raises
        :data:`PERSISTENCE_FAILURES` when a chunk or the state cannot be made durable."""
        now = time.time() if now is None else now
        sender = self.topics.client_of(msg.topic)
        if self.secure is not None:
            site = self.topics.secagg_sender(msg.topic)
            if site is not None:  # a secure-aggregation phase message (journalled; synced before the ack)
                outcome = self.secure.take(site, msg.payload)
                if outcome == "rejected":  # logged, counted and booked on the site like any update
                    reason, detail = self.secure.last_rejection
                    self._reject(site, f"secagg_{reason}", detail, len(msg.payload))
                return outcome
        if msg.topic.startswith(f"fedpeft/{self.topics.fleet}/status/"):
            self._log_status(sender, msg.payload)
            return "status"
        if msg.topic == self.topics.control:  # operator actions (central/control.py)
            outcome = self.control.take(self, msg.payload, now)
            if outcome == "control":
                self.reports.request()  # the federation report says it, after the batch
            return outcome
        if sender is None:
            if self._drop_stale_subscription(msg.topic):
                return "stale_subscription"
            self._reject(None, "bad_topic", f"topic {msg.topic!r}", len(msg.payload))
            return "rejected"
        size = len(msg.payload)
        try:
            if chunking.is_chunk(msg.payload):
                late_before = self.reassembler.drops["late_chunk"]
                whole = self.reassembler.feed(sender, msg.payload, now)
                if whole is None:
                    if self.reassembler.drops["late_chunk"] > late_before:
                        self._ack_consumed_chunk(sender, msg.payload)
                    return "chunk"
                data = whole
            else:
                if size > self.limits.max_message_bytes:
                    raise WireFormatError("oversized", f"{size} bytes > {self.limits.max_message_bytes}")
                data = msg.payload
        except WireFormatError as exc:
            self._reject(sender, reason_of(exc), str(exc), size)
            return "rejected"
        if self.topics.is_partial(msg.topic):
            return self._handle_partial(sender, data, now, size)
        return self._handle_update(sender, data, now, size)

    def _handle_partial(self, sender: str, data: bytes, now: float, size: int) -> str:
        """Decode a gateway's partial aggregate and offer it to the core; the ack names it by its id."""
        try:
            part = partial.decode_partial(data, self.limits)
        except WireFormatError as exc:
            self._reject(sender, reason_of(exc), str(exc), size)
            return "rejected"
        if self.core.finished:
            status = "duplicate" if self.core.was_counted(f"{sender}#{part.seq}", part.round) else "late"
            self.acks.queue(sender, part.round, status, "federation finished", msg_id=part.message_id)
            return status
        try:
            decision = self.core.offer_partial(part, sender=sender, nbytes=len(data), now=now)
        except PERSISTENCE_FAILURES:
            raise
        except Exception:
            self.acks.queue(sender, part.round, "rejected", "internal_error", msg_id=part.message_id)
            raise
        self.acks.queue(sender, part.round, decision.status, decision.reason, msg_id=part.message_id)
        if decision.status == "rejected":
            self.rejections[decision.reason] += 1
            log.warning("partial %d of gateway %s for round %d rejected (%s): %s", part.seq, sender,
                        part.round, decision.reason, decision.detail or "no detail")
        else:
            log.info("partial %d of gateway %s for round %d (%d sites, weight %.1f) %s; %d/%d this round",
                     part.seq, sender, part.round, len(part.members), part.total_weight, decision.status,
                     self.core.accepted_this_round, self.core_config.quorum)
        return decision.status

    def _ack_consumed_chunk(self, sender: str, payload: bytes) -> None:
        """A chunk of a message this service already reassembled and consumed (a site's resend after a
        lost ack): its decision is on disk, but its round is not known here any more — ack by id."""
        r = self.reassembler
        try:
            chunk = chunking.decode_chunk(payload, max_chunk_bytes=r.max_chunk_bytes, max_chunks=r.max_chunks,
                                          max_total_len=min(r.max_message_bytes, r.max_pending_bytes))
        except WireFormatError:  # cannot happen: feed() parsed it already
            return
        self.acks.queue(sender, None, "received", "already consumed", msg_id=chunk.message_id)

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
        if self.core.finished:
            return self._answer_after_final(sender, upd)
        if self.control.excluded_update(self.core, sender, upd):  # an operator excluded the site
            return self.control.reject_excluded(self, sender, upd, len(data))
        try:
            decision = self.core.offer(upd, sender=sender, nbytes=len(data), now=now)
        except PERSISTENCE_FAILURES:
            raise
        except Exception:
            # Rejected for good by the caller (internal_error): tell the site, or it resends forever.
            self.acks.queue(sender, upd.round, "rejected", "internal_error")
            raise
        # The ack goes to the topic's site (the identity the broker vouches for), after the checkpoint.
        self.acks.queue(sender, upd.round, decision.status, decision.reason)
        if decision.accepted:
            log.info("update from %s for round %d accepted (%d samples, weight %.1f%s); %d/%d this round",
                     sender, upd.round, upd.num_samples, decision.weight,
                     f", {decision.staleness} round(s) late" if decision.staleness else "",
                     self.core.accepted_this_round, self.core_config.quorum)
        elif decision.status == "rejected":
            self.rejections[decision.reason] += 1
            log.warning("update from %s for round %d rejected (%s): %s", sender, upd.round, decision.reason,
                        decision.detail or "no detail")
        else:
            log.info("update from %s for round %d %s (%s)", sender, upd.round, decision.status,
                     decision.reason)
        return decision.status

    def _answer_after_final(self, sender: str, upd: wire.UpdateMessage) -> str:
        """A copy arriving after the final round (a site resending after a lost ack): nothing can change
        any more, so answer from the final state — counted or not — and leave the core alone."""
        status = "duplicate" if self.core.was_counted(sender, upd.round) else "late"
        self.acks.queue(sender, upd.round, status, "federation finished")
        log.info("update from %s for round %d after the final round: %s", sender, upd.round, status)
        return status

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
        self.acks.clear()
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
            self._step_if_buffer_full(now)
        self.reassembler.sync()  # chunks durable before they are acknowledged
        if self.secure is not None:
            self.secure.sync()  # the secure session's journal too
        self.core.checkpoint()  # round state (counts + sum) durable before acknowledging
        self.reassembler.commit()  # consumed messages' chunks are no longer needed
        for msg in batch:
            self.transport.ack(msg)
        self.acks.send(self.transport)  # end to end: the decisions are on disk now

    def recover_spooled(self, now: float) -> int:
        """Reload the chunk spool; updates that were complete on disk are offered again (the core
        recognises one already counted as a duplicate). Returns how many were complete."""
        self.acks.clear()
        recovered = self.reassembler.restore(now)
        for sender, data in recovered:
            try:
                self._handle_update(sender, data, now, len(data))
            except PERSISTENCE_FAILURES:
                raise
            except Exception:
                log.exception("unexpected error on a spooled update from %s; rejected", sender)
                self._reject(sender, "internal_error", "see the traceback above", len(data))
            self._step_if_buffer_full(now)
        self.core.checkpoint()
        self.reassembler.commit()
        self.acks.send(self.transport)
        return len(recovered)

    def _log_status(self, sender: str | None, payload: bytes) -> None:
        if not payload:
            return
        try:
            st = notices.decode_status(payload, self.limits)
        except WireFormatError as exc:
            log.debug("unreadable status from %s: %s", sender, exc)
            return
        if sender is not None and sender != self.cfg.aggregator.client_id:
            self.site_states[sender] = st.state  # keyed by topic: the identity the broker vouches for
        where = f" (round {st.round})" if st.round is not None else ""
        log.info("site %s is %s%s", st.client_id, st.state, where)

    def _active_sites(self) -> list[str]:
        return sorted(s for s, state in self.site_states.items() if state in ACTIVE_SITE_STATES)

    def _serve_after_final(self, linger_s: float) -> None:
        """Keep serving (acks for resends, the final global after reconnects) until no site is active
        any more, or ``linger_s`` passed."""
        deadline = time.monotonic() + linger_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._reannounce_if_reconnected()
            batch = self._next_batch()
            if batch:
                self.process_batch(batch, time.time())
                self.reports.maybe_publish(time.time())
            elif not self._active_sites():
                return  # the queue is empty too: every status that was on its way has been read
        if self._active_sites():
            log.info("stopped waiting after %.0f s for site(s) still active: %s", linger_s,
                     ", ".join(self._active_sites()))

    # --- rounds -----------------------------------------------------------------------------------
    def _step_if_buffer_full(self, now: float) -> None:
        """FedBuff: step the moment the K-th update is in, within a batch (the next message of the batch
        is then one step staler, as it is in the paper's server loop)."""
        if self.core_config.fedbuff and not self.core.finished and self.control.should_close(self, now):
            self._close_round(now)

    def _publish_secure(self, out: list[Publish]) -> None:
        assert self.transport is not None
        for m in out:
            self.transport.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
            self.metrics.note_published(len(m.payload))

    def _secure_step(self, now: float) -> None:
        """Secure aggregation: close the session's phases on time; a completed session closes the round, a
        round that cannot complete is skipped (the global stays), and the next round's session opens."""
        sr = self.secure
        assert sr is not None
        if self.paused or self.core.finished:
            return
        self._publish_secure(sr.tick(round_open_s=now - self.core.round_started_at))
        if sr.result is not None:
            self._close_round(now)
        elif sr.give_up is not None:
            record = self.core.skip_round(sr.give_up, now)
            log.warning("round %d skipped: %s; the global stays", record["round"], sr.give_up)
            self.metrics_log.append(dict(record, closed_at=now, next_round=self.core.round))
            self._publish_secure(sr.finish_round())
            self._publish_global()
            self.reports.maybe_publish(now, force=True)
        else:
            return
        if not self.core.finished:
            self._publish_secure(sr.begin(self.core.round))

    def _close_round(self, now: float) -> None:
        closing = self.core.round
        if self.secure is not None:
            res = self.secure.result
            assert res is not None
            _, metrics = self.core.close_secure_round(res.session, res.survivors, res.mean,
                                                      nbytes=res.bytes_in, dropped=res.dropped, now=now)
            metrics = dict(metrics, secagg_costs=dataclasses.asdict(self.secure.costs))
            self._publish_secure(self.secure.finish_round())
        else:
            _, metrics = self.core.close_round(now)
        self.rounds_closed += 1
        counters = self.core.counters
        rejected = {k.split(":", 1)[1]: v - self._round_rejections_base.get(k, 0)
                    for k, v in counters.items() if k.startswith("rejected:")}
        self._round_rejections_base = counters
        bytes_out = self._publish_global()
        line = dict(metrics, bytes_out=bytes_out, closed_at=now, next_round=self.core.round,
                    rejected={k: v for k, v in rejected.items() if v},
                    chunk_drops=dict(self.reassembler.drops))
        self.metrics_log.append(line)
        self.reports.note_closed(closing, bytes_out, now)
        self.reports.maybe_publish(now, force=True)
        log.info("round %d closed: %d participant(s) %s, %.1f s, mean client loss %s; next round %d",
                 closing, metrics["num_updates"], metrics["participants"], metrics["duration_s"],
                 f"{metrics['loss']:.4f}" if "loss" in metrics else "n/a", self.core.round)

    def run(self, *, connect_timeout: float | None = 60.0) -> AggregatorResult:
        a = self.cfg.aggregator
        tcfg = transport_config(self.cfg.connection, a.client_id, manual_ack=True)
        offline = notices.encode_status(notices.StatusMessage(a.client_id, "offline", time.time(), None),
                                     self.limits)
        status_topic = self.topics.status(a.client_id)

        def announce(t: MqttTransport) -> None:  # paho's thread, on every (re)connect
            online = self.control.status(self.core.round)  # "online", or "paused" by an operator
            t.publish(status_topic, notices.encode_status(online, self.limits), retain=True)
            announce_bundle(t, self.topics, self.bundle_id, self.limits)  # before the global

        self.transport = MqttTransport(tcfg, will=Will(status_topic, offline), on_connect=announce,
                                       stop=self._stop)
        self.transport.subscribe(self.topics.updates_filter, qos=1)
        if self.core_config.gateways:  # the gateway tier's partial aggregates (fedpeft_edge/gateway/)
            self.transport.subscribe(self.topics.partials_filter, qos=1)
        if self.secure is not None:  # the sites' secure-aggregation phase messages
            self.transport.subscribe(self.topics.secagg_up_filter, qos=1)
        self.transport.subscribe(self.topics.status_filter, qos=1)
        self.transport.subscribe(self.topics.control, qos=1)  # operator actions (central/control.py)
        self.transport.connect(connect_timeout)
        c = self.core_config
        steps = (f"FedBuff: a step every {c.buffer_k} updates, max staleness {c.max_staleness}" if c.fedbuff
                 else f"quorum {c.quorum}, deadline {c.round_deadline_s:.0f} s")
        log.info("aggregator for fleet %s: round %d, %d parameters, spec %s, %s, max rounds %s, state in %s",
                 self.topics.fleet, self.core.round, c.n_params, self.spec_hash, steps, c.max_rounds,
                 self.state_dir)
        batch: list[Message] = []
        try:
            self.metrics.start()
            self.recover_spooled(time.time())
            # A kill between saving a closed round and appending its line loses only the line: redo it.
            self.metrics_log.restore(self.core.history)
            # (Re)publish the current global: after a crash between closing a round and publishing,
            # this is what completes the round's hand-over.
            self._publish_global()
            # The sites may only now learn the round (again): its deadline counts from here, not from
            # before an outage, or a resumed round could close at once with just min_clients.
            self.core.restart_round_clock(time.time())
            self.core.checkpoint()
            if self.secure is not None and not self.core.finished:  # resume the journalled session, or open
                self._publish_secure(self.secure.begin(self.core.round))
            self.reports.maybe_publish(time.time(), force=True)
            self.serving.set()
            while not self._stop.is_set() and not self.core.finished:
                self._reannounce_if_reconnected()
                batch = self._next_batch()
                now = time.time()
                if batch:
                    self.process_batch(batch, now)
                    batch = []
                    self.reports.maybe_publish(now)
                elif self.reports.pending:  # a change held back by the interval
                    self.reports.maybe_publish(now)
                now = time.time()  # after the batch: a round's duration and close time include its last batch
                self.reassembler.purge(now)
                if self.secure is not None:
                    self._secure_step(now)
                elif self.control.should_close(self, now):  # ready_to_close unless paused, or asked to
                    self._close_round(now)
            if self.core.finished:
                if self.core.privacy_exhausted:
                    zs = self.core.privacy_ledger.get("multipliers", [])
                    log.warning("privacy budget: one more round would exceed epsilon_budget %g at delta %g; "
                                "the federation stops after %d round(s)", self.cfg.privacy.epsilon_budget,
                                self.cfg.privacy.delta, len(zs))
                self._announce_final()
                self.reports.maybe_publish(time.time(), force=True)
                log.info("all %d rounds done; final global published", self.core_config.max_rounds)
                self._serve_after_final(float(a.final_linger_s))
        except PERSISTENCE_FAILURES as exc:
            log.error("state could not be persisted (%s); stopping with %d message(s) unacknowledged: the "
                      "broker redelivers them to the next start, which resumes from disk", exc, len(batch))
            if isinstance(exc, MemoryError):
                raise StateError(f"out of memory while processing messages: {exc}") from exc
            raise
        finally:
            self.metrics.stop()
            if self.reassembler.spool is not None:
                self.reassembler.spool.close()
            final_state = "done" if self.core.finished else "offline"
            bye = notices.StatusMessage(a.client_id, final_state, time.time(), self.core.round)
            self.transport.close(final=(status_topic, notices.encode_status(bye, self.limits)))
        return AggregatorResult(self.rounds_closed, self.core.round, self.core.finished, self.core.counters,
                                np.array(self.core.global_vector))
