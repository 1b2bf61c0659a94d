"""Edge agent: one site's side of federated training over MQTT.

Loop: wait for the retained global adapter on ``fedpeft/{fleet}/global`` → load it into the trainer →
train on local data → ``delta = trained - global`` → encode (top-k / int8 with error feedback, residual
kept on disk) → publish on ``fedpeft/{fleet}/update/{client_id}`` with QoS 1 → repeat for the next global,
until the aggregator announces the final round (global ``meta["final"]``) or ``max_rounds`` is reached.
Only the encoded delta and a few scalars (sample count, loss, accuracy) ever leave the site.

Store and forward: the encoded update is written to ``<state_dir>/outbox/`` before it is published and
removed only when the broker acknowledged every part (PUBACK). On restart, and after every reconnect,
unacknowledged updates are sent again; the aggregator counts an update for (client, round) once.

A newer global arriving while training: ``newer_global_policy = "finish"`` (default) completes the
round and sends the update (the aggregator applies its late-update policy), then moves to the newest
global; ``"abandon"`` stops training at the next batch and moves on without sending.

State directory layout::

    state.json          last round sent, last global seen, spec hash (atomic rewrite)
    encoder.npz         error-feedback residual (np.savez, loaded with allow_pickle=False)
    trainer.state       trainer.save_state() (adapter + optimizer state)
    outbox/r<round>.msg encoded update envelope waiting for its PUBACK
    sent/r<round>.msg   copy of every sent update when ``dump_updates`` (audit, tests)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft_edge.protocol import chunking, wire
from fedpeft_edge.protocol.codec import decode_global
from fedpeft_edge.protocol.config import transport_config
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, Will
from fedpeft_edge.runtime.durable import atomic_file, atomic_write_bytes
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError, WireError
from fedpeft_edge.runtime.names import NEWER_GLOBAL_POLICIES
from fedpeft_edge.site.config import AgentConfig
from fedpeft_edge.site.encoder import UpdateEncoder
from fedpeft_edge.site.outbox import Outbox, OutboxEntry
from fedpeft_edge.training.base import LocalTrainer

log = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]
BatchesFn = Callable[[], Iterable[Batch]]






@dataclass
class AgentResult:
    rounds_sent: list[int]
    last_global_round: int | None
    final_seen: bool
    reason: str  # why run() returned


class EdgeAgent:
    """Drives a :class:`LocalTrainer` through federated rounds. ``run()`` blocks until done."""

    def __init__(self, config: AgentConfig, trainer: LocalTrainer, train_batches_fn: BatchesFn,
                 eval_batches_fn: BatchesFn | None = None, *, spec_hash: str | None = None,
                 limits: wire.WireLimits | None = None) -> None:
        a = config.agent
        if not a.client_id:
            raise InvalidValueError("agent.client_id is required (it is the site's MQTT identity)")
        if a.newer_global_policy not in NEWER_GLOBAL_POLICIES:
            raise InvalidValueError(f"agent.newer_global_policy must be one of {NEWER_GLOBAL_POLICIES}")
        self.cfg = config
        self.client_id = a.client_id
        self.trainer = trainer
        self.train_batches_fn = train_batches_fn
        self.eval_batches_fn = eval_batches_fn
        self.topics = Topics(config.fleet.name)
        self.n_params = int(trainer.layout.total)
        self.spec_hash = spec_hash
        self.limits = limits or wire.WireLimits()
        self.state_dir = Path(a.state_dir)
        self.outbox = Outbox(self.state_dir / "outbox")
        self.outbox_dir = self.outbox.directory
        self.sent_dir = self.state_dir / "sent"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.encoder = UpdateEncoder(config.codec, self.n_params)
        self.last_sent_round = -1
        self.last_global_round: int | None = None
        self.rounds_sent: list[int] = []
        self._outgoing: list[OutboxEntry] = []
        self._latest_global: wire.GlobalMessage | None = None
        self._stop = threading.Event()
        self.transport: MqttTransport | None = None
        self._load_state()

    # --- persistence ------------------------------------------------------------------------------
    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _load_state(self) -> None:
        if self._state_file.exists():
            st = json.loads(self._state_file.read_text())
            self.last_sent_round = int(st.get("last_sent_round", -1))
            lg = st.get("last_global_round")
            self.last_global_round = None if lg is None else int(lg)
            if self.spec_hash is None and st.get("spec_hash"):
                self.spec_hash = str(st["spec_hash"])
        enc_tmp = self.state_dir / "encoder.next.npz"
        enc_file = self.state_dir / "encoder.npz"
        for entry in self.outbox.load():
            # An outbox entry newer than state.json means we crashed between writing the update and
            # committing the state: the update counts as made, and its residual is the pending one.
            if entry.round > self.last_sent_round:
                self.last_sent_round = entry.round
                if enc_tmp.exists():
                    os.replace(enc_tmp, enc_file)
            self._outgoing.append(entry)
        enc_tmp.unlink(missing_ok=True)
        if enc_file.exists():
            with np.load(enc_file, allow_pickle=False) as z:
                self.encoder.load_state_arrays({k: z[k] for k in z.files})
        tstate = self.state_dir / "trainer.state"
        if tstate.exists():
            try:
                self.trainer.load_state(tstate)
            except (FedPeftError, OSError, KeyError) as exc:
                log.warning("ignoring trainer state %s: %s", tstate, exc)
        if self.last_sent_round >= 0:
            log.info("resuming: last update sent for round %d, %d update(s) waiting in the outbox",
                     self.last_sent_round, len(self._outgoing))

    def _save_state(self) -> None:
        st = {"last_sent_round": self.last_sent_round, "last_global_round": self.last_global_round,
              "spec_hash": self.spec_hash, "client_id": self.client_id, "saved_at": time.time()}
        atomic_write_bytes(self._state_file, json.dumps(st).encode())

    # --- messaging --------------------------------------------------------------------------------
    def _status(self, state: str, rnd: int | None = None) -> bytes:
        return wire.encode_status(wire.StatusMessage(self.client_id, state, time.time(), rnd), self.limits)

    def _publish_status(self, state: str, rnd: int | None = None) -> None:
        if self.transport is not None and self.transport.connected:
            self.transport.publish(self.topics.status(self.client_id), self._status(state, rnd), retain=True)

    def _on_connect(self, transport: MqttTransport) -> None:
        # Runs in paho's network thread: publish only (never block here).
        transport.publish(self.topics.status(self.client_id), self._status("online", self.last_global_round),
                          retain=True)

    def _send(self, out: OutboxEntry) -> None:
        assert self.transport is not None
        topic = self.topics.update(self.client_id)
        budget = self.transport.max_payload(topic)
        # Same message id on every resend so the aggregator's reassembler sees duplicates, not a new message.
        mid = hashlib.sha256(self.client_id.encode() + out.data).hexdigest()[:32]
        parts = chunking.split_message(out.data, budget, message_id=mid)
        out.handles = [self.transport.publish(topic, p, qos=1) for p in parts]
        out.sent_at_connect = self.transport.connect_count
        log.info("update for round %d queued for sending (%d bytes, %d part(s))", out.round, len(out.data),
                 len(parts))

    def _pump_outbox(self) -> None:
        """Drop acknowledged updates from disk; resend the others after a reconnect."""
        t = self.transport
        for out in list(self._outgoing):
            if out.acked():
                self.outbox.remove(out)
                self._outgoing.remove(out)
                log.info("update for round %d acknowledged by the broker", out.round)
            elif t is not None and t.connected and out.sent_at_connect != t.connect_count:
                self._send(out)

    def _poll(self, timeout: float = 0.0) -> None:
        """Take messages from the transport (waiting up to ``timeout`` for the first); keep the newest
        valid global."""
        assert self.transport is not None
        wait = timeout
        while True:
            msg = self.transport.get(wait)
            wait = 0.0
            if msg is None:
                return
            if msg.topic != self.topics.global_:
                continue
            try:
                g = wire.decode_global(msg.payload, self.limits)
                self._check_global(g)
            except (WireError, FedPeftError) as exc:
                log.warning("ignoring global message: %s", exc)
                continue
            if self._latest_global is None or g.round >= self._latest_global.round:
                self._latest_global = g

    def _check_global(self, g: wire.GlobalMessage) -> None:
        if g.fleet != self.topics.fleet:
            raise InvalidValueError(f"global is for fleet {g.fleet!r}, not {self.topics.fleet!r}")
        if g.vector.n != self.n_params:
            raise InvalidValueError(f"global has {g.vector.n} parameters, this trainer has {self.n_params}")
        if self.spec_hash is None:
            self.spec_hash = g.spec_hash  # no bundle told us: adopt the aggregator's and pin it
            log.info("adopting spec hash %s from the aggregator", g.spec_hash)
        elif g.spec_hash != self.spec_hash:
            raise InvalidValueError(f"global spec hash {g.spec_hash} differs from ours {self.spec_hash}")

    # --- training ---------------------------------------------------------------------------------
    def _batches_until_newer(self, rnd: int) -> Iterator[Batch]:
        """The local batches, stopping early if a newer global arrives and the policy is 'abandon'."""
        abandon = self.cfg.agent.newer_global_policy == "abandon"
        for _ in range(max(1, int(self.cfg.agent.local_epochs))):
            for batch in self.train_batches_fn():
                if abandon:
                    self._poll()
                    if self._latest_global is not None and self._latest_global.round > rnd:
                        self._abandoned = True
                        return
                if self._stop.is_set():
                    self._abandoned = True
                    return
                yield batch

    def _train_round(self, g: wire.GlobalMessage) -> None:
        rnd = g.round
        global_vec = decode_global(g.vector, self.n_params)
        self.trainer.set_flat(global_vec)
        self._publish_status("training", rnd)
        log.info("round %d started: training from the global adapter (%d parameters)", rnd, self.n_params)
        metrics: dict[str, float] = {}
        if self.cfg.agent.evaluate and self.eval_batches_fn is not None:
            ev = self.trainer.evaluate(self.eval_batches_fn())
            metrics.update(global_eval_loss=float(ev.loss), global_eval_accuracy=float(ev.accuracy))
        self._abandoned = False
        tm = self.trainer.train(self._batches_until_newer(rnd), max_steps=self.cfg.agent.local_steps)
        if self._abandoned:
            newer = self._latest_global.round if self._latest_global else rnd
            log.info("round %d abandoned (newer global %d arrived or stopping)", rnd, newer)
            return
        if tm.samples <= 0:
            raise InvalidValueError("local training saw no samples; check the data configuration")
        metrics.update(loss=float(tm.loss), train_seconds=float(tm.seconds), steps=float(tm.steps))
        if tm.accuracy is not None:
            metrics["accuracy"] = float(tm.accuracy)
        metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}
        delta = self.trainer.get_flat() - global_vec
        enc = self.encoder.encode(delta)
        assert self.spec_hash is not None
        data = wire.encode_update(wire.UpdateMessage(self.topics.fleet, rnd, self.client_id, self.spec_hash,
                                                     int(tm.samples), metrics, enc), self.limits)
        # Crash safety order: pending residual, then the outbox entry, then commit both (see _load_state).
        enc_tmp = self.state_dir / "encoder.next.npz"
        with atomic_file(enc_tmp) as fh:  # durable before the outbox entry that relies on it
            np.savez(fh, **self.encoder.state_arrays())
        out = self.outbox.put(rnd, data)
        path = out.path
        if self.cfg.agent.dump_updates:
            self.sent_dir.mkdir(exist_ok=True)
            atomic_write_bytes(self.sent_dir / path.name, data)
        os.replace(enc_tmp, self.state_dir / "encoder.npz")
        self.last_sent_round = rnd
        self.rounds_sent.append(rnd)
        self._save_state()
        try:
            self.trainer.save_state(self.state_dir / "trainer.state")
        except (FedPeftError, OSError) as exc:
            log.warning("trainer state not saved: %s", exc)
        self._outgoing.append(out)
        self._publish_status("uploading", rnd)
        self._send(out)
        log.info("round %d trained: %d samples, %d steps, loss %.4f; update %d bytes (%s, k=%d of %d)",
                 rnd, tm.samples, tm.steps, tm.loss, len(data), enc.mode, enc.k, enc.n)

    # --- main loop --------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self, *, connect_timeout: float | None = None) -> AgentResult:
        a = self.cfg.agent
        self.transport = MqttTransport(
            transport_config(self.cfg.connection, self.client_id),
            will=Will(self.topics.status(self.client_id), self._status("offline")),
            on_connect=self._on_connect)
        self.transport.subscribe(self.topics.global_, qos=1)
        self.transport.connect(connect_timeout)
        for out in self._outgoing:  # store-and-forward: resend what a previous run could not deliver
            self._send(out)
        final_seen, reason = False, "stopped"
        last_activity = time.monotonic()
        try:
            while not self._stop.is_set():
                self._poll(0.2)
                self._pump_outbox()
                g = self._latest_global
                if g is not None and g.round != self.last_global_round:
                    self.last_global_round = g.round
                    self._save_state()
                    last_activity = time.monotonic()
                    final_note = " (final)" if g.meta.get("final") else ""
                    log.info("global for round %d received%s", g.round, final_note)
                if g is not None and g.meta.get("final"):
                    final_seen, reason = True, "final round announced"
                    break
                if a.max_rounds is not None and len(self.rounds_sent) >= a.max_rounds:
                    reason = "max_rounds reached"
                    break
                if g is not None and g.round > self.last_sent_round:
                    self._train_round(g)
                    last_activity = time.monotonic()
                    continue
                if a.idle_exit_s is not None and time.monotonic() - last_activity > a.idle_exit_s:
                    reason = "idle timeout"
                    break
            self._drain_outbox(timeout=30.0)
            self._publish_status("done" if final_seen else "idle", self.last_global_round)
        finally:
            self.transport.close(final=(self.topics.status(self.client_id),
                                        self._status("offline", self.last_global_round)))
        log.info("agent %s finished: %s; rounds sent %s", self.client_id, reason, self.rounds_sent)
        return AgentResult(list(self.rounds_sent), self.last_global_round, final_seen, reason)

    def _drain_outbox(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._outgoing and time.monotonic() < deadline and not self._stop.is_set():
            self._pump_outbox()
            time.sleep(0.05)
        if self._outgoing:
            log.warning("%d update(s) still unacknowledged; they stay in %s for the next start",
                        len(self._outgoing), self.outbox_dir)










