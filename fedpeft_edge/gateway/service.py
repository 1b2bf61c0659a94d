"""``fedpeft-edge gateway``: a line's sites aggregated on the plant broker, one partial sent upstream.

Many devices behind one gateway, and only the gateway's broker may talk to the central one: the sites
publish their updates to the line's local broker exactly as they would to the aggregator (same topics,
same acks), and this service counts them with the aggregator's own core (:class:`AggregatorCore`:
validation, dedup by (site, round), lateness, the close-time bounds over the individual updates). When its
batch is complete (every site of the line, ``quorum``; or ``round_deadline_s`` with ``min_clients``) or a
new global arrives, it seals the batch into one partial (protocol/partial.py: the bounded weighted mean, the
total weight, the members and the digest of the accepted (site, round) set) and publishes it on
``fedpeft/{fleet}/partial/{gateway}``; a Mosquitto bridge (broker_config/bridge-gateway-to-central.conf)
carries it to the central broker and brings the global, the bundle, control and the aggregator's acks
back. The gateway never talks to the central broker itself.

Exactly once, end to end, through kill -9 of the gateway at any point:

* **site → gateway** as site → aggregator: the round state (sum, buffer, accepted pairs) is persisted
  before the MQTT message is acknowledged and before the site's ack goes out; a redelivery is a duplicate.
* **sealing** writes the partial to the outbox (``<state_dir>/outbox/<seq>.partial``, atomic) *then*
  resets the batch and counts the seal in the round state (atomic). A kill between the two leaves the
  outbox holding partial ``seq`` while the state's next sequence number is still ``seq``: the restart
  sees that and finishes the reset, so the batch is sent once, never twice, never lost.
* **gateway → aggregator**: a partial stays in the outbox until the aggregator's ack naming its id arrives
  (accepted, duplicate, late or rejected: all final), and is published again after every reconnect and
  every ``resend_s``. The aggregator counts ``(gateway, seq)`` once and refuses a partial holding a
  (site, round) it already counted.

A site's ack from the gateway means "held durably by the gateway", not "in a global": the central round
may close without it (late), exactly as it may for an update still on its way to the aggregator.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft_edge.central.acks import AckQueue
from fedpeft_edge.central.core import AggregatorConfig, AggregatorCore
from fedpeft_edge.central.store import RoundState, StateError
from fedpeft_edge.gateway.config import GatewayServiceConfig
from fedpeft_edge.gateway.outbox import PartialOutbox
from fedpeft_edge.protocol import chunk_spool, chunking, notices, wire
from fedpeft_edge.protocol.codec import decode_global, encode_global
from fedpeft_edge.protocol.config import transport_config
from fedpeft_edge.protocol.partial import Member, PartialMessage, encode_partial, member_digest
from fedpeft_edge.protocol.reasons import WireFormatError, reason_of
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import Message, MqttTransport, Will
from fedpeft_edge.runtime.errors import InvalidValueError

log = logging.getLogger(__name__)

MAX_EARLY = 10_000  # updates held for a global not yet read; beyond, rejected as future_round
PERSISTENCE_FAILURES: tuple[type[BaseException], ...] = (
    StateError,
    chunk_spool.SpoolError,
    MemoryError,
    OSError,
)


@dataclass
class GatewayResult:
    sealed: int
    final_round: int
    finished: bool
    counters: dict[str, int]


class GatewayService:
    """``run()`` serves until the final global was seen and every partial is acknowledged, or ``stop()``."""

    def __init__(self, config: GatewayServiceConfig) -> None:
        g = config.gateway
        g.check()
        self.cfg = config
        self.client_id = g.client_id
        self.topics = Topics(config.fleet.name)
        self.topics.partial(g.client_id)  # validates the name now, not at the first seal
        self.state_dir = Path(g.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.limits = wire.WireLimits(max_message_bytes=int(g.max_update_bytes))
        self.outbox = PartialOutbox(self.state_dir / "outbox", g.client_id)
        self.reassembler = chunking.Reassembler(
            max_message_bytes=int(g.max_update_bytes),
            timeout_s=float(g.chunk_timeout_s),
            max_pending_bytes=int(g.max_pending_chunk_bytes),
            spool=chunk_spool.ChunkSpool(self.state_dir / "chunks"),
        )
        self.acks = AckQueue(self.topics, self.limits)
        self.core: AggregatorCore | None = None
        self.final = False  # the upper tier's global said so: no more rounds
        self.sealed = 0  # partials sealed by this process
        self._early: list[Message] = []  # updates for a round whose global is still on its way
        self.upstream: dict[str, int] = {}  # the aggregator's answers to our partials, by status
        self._stop = threading.Event()
        self.serving = threading.Event()
        self.transport: MqttTransport | None = None
        self._resent_at = 0.0
        self._resent_connect = -1
        self._published: dict[int, tuple[int, float]] = {}  # seq -> (connection count, monotonic time)
        saved = RoundState.load(self.state_dir)
        if saved is not None:  # a restart: the upper tier's fleet, vector length and spec are in the state
            fp = saved.fingerprint
            self._make_core(int(fp["n_params"]), str(fp["spec_hash"]), None)
            self._finish_interrupted_seal()

    def stop(self) -> None:
        self._stop.set()

    # --- the core and sealing ------------------------------------------------------------------------

    def _make_core(self, n_params: int, spec_hash: str, initial: np.ndarray | None) -> AggregatorCore:
        policy = self.cfg.gateway.policy
        config = AggregatorConfig.for_fleet(
            policy, fleet=self.topics.fleet, n_params=n_params, spec_hash=spec_hash
        )
        self.limits = wire.WireLimits(max_message_bytes=self.limits.max_message_bytes, max_params=n_params)
        self.core = AggregatorCore(config, self.state_dir, initial_global=initial, autosave=False)
        return self.core

    def _finish_interrupted_seal(self) -> None:
        """A kill between writing partial ``seq`` and resetting its batch: the batch is in the outbox."""
        core = self.core
        assert core is not None
        if core.accepted_this_round and self.outbox.has(core.sealed_batches):
            log.info(
                "partial %d was sealed before a restart; its batch is forgotten now", core.sealed_batches
            )
            core.reset_batch()

    def seal(self, now: float) -> PartialMessage:
        """Seal the open batch into the outbox (durable first), forget it, publish it."""
        core = self.core
        assert core is not None
        mean, weight, steps_weight, metrics, buffered = core.open_batch_partial()
        members = tuple(Member(e.client_id, e.round, e.samples) for e in buffered)
        msg = PartialMessage(
            self.topics.fleet,
            core.round,
            self.client_id,
            core.sealed_batches,
            core.config.spec_hash,
            weight,
            steps_weight,
            metrics,
            members,
            member_digest(members),
            encode_global(mean, "fp32"),
        )
        data = encode_partial(msg, self.limits)
        self.outbox.put(msg.seq, data)
        core.reset_batch(now)
        self.sealed += 1
        log.info(
            "sealed partial %d for round %d: %d site(s), weight %.1f, %d bytes",
            msg.seq,
            msg.round,
            len(members),
            weight,
            len(data),
        )
        self._publish(msg.seq, data)
        return msg

    def _publish(self, seq: int, data: bytes) -> None:
        t = self.transport
        if t is None or not t.connected:
            return  # resent after the (re)connect
        if len(data) > t.max_payload(self.topics.partial(self.client_id)):
            log.error(
                "partial %d of %d bytes exceeds the broker packet limit; raise max_packet_size",
                seq,
                len(data),
            )
            return
        t.publish(self.topics.partial(self.client_id), data, qos=1)
        self._published[seq] = (t.connect_count, time.monotonic())

    def _resend_if_due(self, now: float) -> None:
        """Publish again each unacknowledged partial not yet published on this connection, or published
        more than ``resend_s`` ago (a broker crash may have lost it after its PUBACK)."""
        t = self.transport
        if t is None or not t.connected:
            return
        mono = time.monotonic()
        if t.connect_count == self._resent_connect and mono - self._resent_at < 1.0:
            return  # the outbox directory is listed at most once a second
        self._resent_connect, self._resent_at = t.connect_count, mono
        for seq, data in self.outbox.pending():
            conn, at = self._published.get(seq, (-1, 0.0))
            if conn != t.connect_count or mono - at >= self.cfg.gateway.resend_s:
                log.info("publishing unacknowledged partial %d", seq)
                self._publish(seq, data)

    # --- messages ------------------------------------------------------------------------------------

    def handle(self, msg: Message, now: float) -> str:
        if msg.topic == self.topics.global_:
            return self._handle_global(msg.payload, now)
        if msg.topic == self.topics.ack(self.client_id):
            return self._handle_ack(msg.payload)
        sender = self.topics.client_of(msg.topic)
        if sender is None or not msg.topic.startswith(f"fedpeft/{self.topics.fleet}/update/"):
            log.warning("ignoring a message on %s", msg.topic)
            return "ignored"
        size = len(msg.payload)
        try:
            if chunking.is_chunk(msg.payload):
                data = self.reassembler.feed(sender, msg.payload, now)
                if data is None:
                    return "chunk"
            else:
                if size > self.limits.max_message_bytes:
                    raise WireFormatError("oversized", f"{size} bytes > {self.limits.max_message_bytes}")
                data = msg.payload
            upd = wire.decode_update(data, self.limits)
        except WireFormatError as exc:
            return self._reject(sender, reason_of(exc), str(exc), size)
        if self.core is None or upd.round > self.core.round:
            # Trained from a global this gateway has not read yet (it races the site's update on another
            # topic): hold it, unacknowledged (a kill makes the broker redeliver it), until that global.
            if len(self._early) < MAX_EARLY and not chunking.is_chunk(msg.payload):
                self._early.append(msg)
                return "early"
            return self._reject(sender, "future_round", f"round {upd.round} before its global", size)
        decision = self.core.offer(upd, sender=sender, nbytes=len(data), now=now)
        self.acks.queue(sender, upd.round, decision.status, decision.reason)
        level = logging.WARNING if decision.status == "rejected" else logging.INFO
        log.log(
            level,
            "update from %s for round %d %s%s; %d in the batch",
            sender,
            upd.round,
            decision.status,
            f" ({decision.reason})" if decision.reason else "",
            self.core.accepted_this_round,
        )
        return decision.status

    def _reject(self, sender: str, reason: str, detail: str, size: int) -> str:
        if self.core is not None:
            self.core.note_rejected(reason, size, detail, sender)
        log.warning("update from %s rejected (%s): %s", sender, reason, detail)
        return "rejected"

    def _handle_global(self, payload: bytes, now: float) -> str:
        if not payload:
            return "ignored"
        try:
            g = wire.decode_global(payload, wire.WireLimits(max_message_bytes=self.limits.max_message_bytes))
            vec = decode_global(g.vector)
        except (WireFormatError, InvalidValueError) as exc:
            log.warning("unreadable global: %s", exc)
            return "ignored"
        if g.fleet != self.topics.fleet:
            log.warning("global of fleet %r ignored", g.fleet)
            return "ignored"
        self.final = bool(g.meta.get("final", False))
        core = self.core
        if core is None:
            core = self._make_core(int(vec.size), g.spec_hash, vec)
            core.adopt_global(g.round, vec, now)
            log.info(
                "following the aggregator from round %d (%d parameters, spec %s)",
                g.round,
                vec.size,
                g.spec_hash,
            )
            return "global"
        if g.spec_hash != core.config.spec_hash or vec.size != core.config.n_params:
            log.error(
                "the fleet moved to spec %s / %d parameters; this gateway's state is for %s / %d: "
                "start it with a new state_dir",
                g.spec_hash,
                vec.size,
                core.config.spec_hash,
                core.config.n_params,
            )
            return "ignored"
        if g.round <= core.round:
            return "global"  # a re-announcement of what we follow already
        if core.accepted_this_round:
            self.seal(now)  # the upper tier moved on: send what we have (it may count it as late)
        core.adopt_global(g.round, vec, now)
        log.info("round %d opened upstream", g.round)
        return "global"

    def _handle_ack(self, payload: bytes) -> str:
        try:
            ack = notices.decode_ack(payload, self.limits)
        except WireFormatError as exc:
            log.warning("unreadable ack: %s", exc)
            return "ignored"
        seq = self.outbox.seq_of(ack.msg) if ack.msg else None
        if seq is None:
            return "ignored"  # an ack we already took (resend answered twice)
        self.outbox.remove(seq)
        self._published.pop(seq, None)
        self.upstream[ack.status] = self.upstream.get(ack.status, 0) + 1
        level = logging.INFO if ack.status in ("accepted", "duplicate") else logging.WARNING
        log.log(
            level,
            "partial %d for round %s: %s%s",
            seq,
            ack.round,
            ack.status,
            f" ({ack.reason})" if ack.reason else "",
        )
        return "ack"

    def process_batch(self, batch: list[Message], now: float) -> None:
        """Handle a batch, persist (chunks, round state), then acknowledge it and answer the sites."""
        assert self.transport is not None
        self.acks.clear()
        # globals first: an update trained from a global in the same batch is then not held back
        ordered = sorted(batch, key=lambda m: m.topic != self.topics.global_)
        held = self._early
        if held and self.core is not None:  # after a new global, what was held may be decided now
            ordered = (
                [m for m in ordered if m.topic == self.topics.global_]
                + held
                + [m for m in ordered if m.topic != self.topics.global_]
            )
        self._early = []
        for msg in ordered:
            try:
                self.handle(msg, now)
            except PERSISTENCE_FAILURES:
                raise
            except Exception:
                log.exception("unexpected error on a message from %s; rejected", msg.topic)
                sender = self.topics.client_of(msg.topic)
                if sender is not None:
                    self._reject(sender, "internal_error", "see the traceback above", len(msg.payload))
        self.reassembler.sync()
        if self.core is not None:
            self.core.checkpoint()
        self.reassembler.commit()
        early = {id(m) for m in self._early}
        for msg in ordered:
            if id(msg) not in early:
                self.transport.ack(msg)
        self.acks.send(self.transport)

    # --- the loop ------------------------------------------------------------------------------------

    def _next_batch(self, max_messages: int = 256) -> list[Message]:
        assert self.transport is not None
        first = self.transport.get(0.1)
        if first is None:
            return []
        batch = [first]
        while len(batch) < max_messages and (nxt := self.transport.get(0.0)) is not None:
            batch.append(nxt)
        return batch

    def run(self, *, connect_timeout: float | None = 60.0) -> GatewayResult:
        g = self.cfg.gateway
        tcfg = transport_config(self.cfg.connection, self.client_id, manual_ack=True)
        status_topic = self.topics.status(self.client_id)
        offline = notices.encode_status(
            notices.StatusMessage(self.client_id, "offline", time.time(), None), self.limits
        )

        def announce(t: MqttTransport) -> None:  # paho's thread, on every (re)connect
            rnd = self.core.round if self.core is not None else None
            online = notices.StatusMessage(self.client_id, "online", time.time(), rnd, detail="gateway")
            t.publish(status_topic, notices.encode_status(online, self.limits), retain=True)

        self.transport = MqttTransport(
            tcfg, will=Will(status_topic, offline), on_connect=announce, stop=self._stop
        )
        self.transport.subscribe(self.topics.updates_filter, qos=1)
        self.transport.subscribe(self.topics.global_, qos=1)
        self.transport.subscribe(self.topics.ack(self.client_id), qos=1)
        self.transport.connect(connect_timeout)
        recovered = self.reassembler.restore(time.time())
        if recovered:  # whole updates whose chunks were on disk: offered again (a counted one is a duplicate)
            for sender, data in recovered:
                if self.core is not None:
                    try:
                        self.core.offer(wire.decode_update(data, self.limits), sender=sender, now=time.time())
                    except WireFormatError as exc:
                        self._reject(sender, reason_of(exc), str(exc), len(data))
            if self.core is not None:
                self.core.checkpoint()
            self.reassembler.commit()
        if self.core is not None:
            self.core.restart_round_clock(time.time())
            self.core.checkpoint()
        self.serving.set()
        final_since: float | None = None
        try:
            while not self._stop.is_set():
                batch = self._next_batch()
                now = time.time()
                if batch:
                    self.process_batch(batch, now)
                now = time.time()
                self.reassembler.purge(now)
                core = self.core
                if core is not None and not self.final and core.ready_to_close(now):
                    self.seal(now)
                self._resend_if_due(now)
                if self.final and core is not None and core.accepted_this_round == 0 and not len(self.outbox):
                    final_since = now if final_since is None else final_since
                    if now - final_since >= g.final_linger_s:
                        break
                else:
                    final_since = None
        finally:
            if self.reassembler.spool is not None:
                self.reassembler.spool.close()
            state = "done" if self.final else "offline"
            bye = notices.StatusMessage(
                self.client_id, state, time.time(), self.core.round if self.core is not None else None
            )
            self.transport.close(final=(status_topic, notices.encode_status(bye, self.limits)))
        return GatewayResult(
            self.sealed,
            self.core.round if self.core else 0,
            self.final,
            self.core.counters if self.core else {},
        )


__all__ = ["GatewayResult", "GatewayService"]
