"""Edge agent: one site's side of federated training over MQTT.

Loop: wait for the retained global adapter on ``fedpeft/{fleet}/global`` → load it into the trainer →
train on local data → ``delta = trained - global`` → encode (top-k / int8 with error feedback, residual
kept on disk) → publish on ``fedpeft/{fleet}/update/{client_id}`` with QoS 1 → repeat for the next global.
Only the encoded delta and a few scalars (sample count, loss, accuracy) ever leave the site.

Running for months: after the aggregator's final round (global ``meta["final"]``) the agent stays, says
``done`` ("waiting for a new federation") and joins what comes next — a global above the final round (the
aggregator went on) or a non-final one below it (a new federation, whose rounds start again at 0: the
finished one's waiting updates, ``sent/`` and residual are forgotten, crash-safely). ``exit_after_final =
true`` (demos, tests) returns at the final round instead; ``max_rounds`` and ``idle_exit_s`` also end it.
The outbox and ``sent/`` are capped (``max_outbox_updates``, ``max_sent_updates``). The resource governor
(``[governor]``, site/governor.py) is asked before every training step: while it says no, the status is
``paused`` with its reason; see ``_governed`` for what happens to a round it interrupts.

Store and forward, end to end: the encoded update is written to ``<state_dir>/outbox/`` before it is
published and removed only when the aggregator acknowledges it on ``fedpeft/{fleet}/ack/{client_id}``,
which it does after its decision (accepted, duplicate, late, rejected) is in its persisted round state.
The broker's PUBACK is not enough: Mosquitto acknowledges a publish once it is in memory, and a broker
crash loses what it had not yet saved. Until acknowledged, an update is published again — same bytes,
same chunk message id — at the start of a run, after every reconnect, when a global the agent already
knows is announced again (the aggregator re-announces after each of its reconnects: its subscription is
back) and on a timer (``resend_after_s``, doubling per timer resend up to 8x). The aggregator counts an
update for (client, round) once, so copies are harmless. The final drain waits ``drain_timeout_s`` for
acknowledgements; what is still waiting stays in the outbox for the next start.

Local work per round: ``local_steps`` / ``local_epochs`` (a fixed amount), or ``time_budget_s``: train
until that many seconds are used (checked between steps; the data is cycled, ``local_epochs`` does not
apply), at least ``min_local_steps`` and at most ``local_steps`` if set. A slow device then does fewer
steps rather than holding its round back; the steps done travel in the update's ``steps`` metric, which
the aggregator's ``aggregation = "fednova"`` normalises by.

A newer global arriving while training: ``newer_global_policy = "finish"`` (default) completes the
round and sends the update (the aggregator applies its late-update policy), then moves to the newest
global; ``"abandon"`` stops training at the next batch and moves on without sending.

State directory layout::

    state.json          last round sent, last global seen, spec hash, final round (atomic rewrite)
    encoder.npz         error-feedback residual and the round it belongs to (np.savez, no pickles)
    encoder.next.npz    the pending residual while an update is being committed
    trainer.state       trainer.save_state() (adapter + optimizer state)
    outbox/r<round>.msg encoded update envelope waiting for the aggregator's acknowledgement
    sent/r<round>.msg   copy of every sent update when ``dump_updates`` (audit, tests)
    sent/r<round>.secagg.npy  with [secagg]: the plain update put into the secure sum (``dump_updates``)
    sent.previous/      the sent/ of the federation before the current one
    secagg/             with ``[secagg] enabled``: the update waiting for a secure session and the markers
                        that keep a restart from joining a session twice (site/secure_sum.py)

Secure aggregation (``[secagg] enabled``, dense codecs only): the round's delta is not encoded and has no
outbox entry nor acknowledgement; site/secure_sum.py keeps it on disk and takes part in the aggregator's
session of its round over the ``secagg/`` topics. The final drain waits (``drain_timeout_s``) while that
update still needs messages from the site.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft_edge.protocol import chunking, notices, wire
from fedpeft_edge.protocol.codec import decode_global
from fedpeft_edge.protocol.config import transport_config
from fedpeft_edge.protocol.secagg_policy import SECAGG_CODECS
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, Will
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError, WireError
from fedpeft_edge.runtime.names import NEWER_GLOBAL_POLICIES
from fedpeft_edge.site.bundle_setup import BundleGate
from fedpeft_edge.site.config import AgentConfig, AgentSettings
from fedpeft_edge.site.control import OperatorPause
from fedpeft_edge.site.encoder import UpdateEncoder
from fedpeft_edge.site.governor import Governor
from fedpeft_edge.site.info_card import InfoCard
from fedpeft_edge.site.metrics import AgentMetrics
from fedpeft_edge.site.model_export import export_global
from fedpeft_edge.site.outbox import Outbox, OutboxEntry
from fedpeft_edge.site.personal import PrivateParts, train_fedrep
from fedpeft_edge.site.privacy import SiteNoise
from fedpeft_edge.site.rank_cut import RANK_METRIC, RankCut
from fedpeft_edge.site.secure_sum import Publish, SecureContribution
from fedpeft_edge.site.state import SiteStateFiles, prune_updates, update_rounds, write_file
from fedpeft_edge.training.base import LocalTrainer

log = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]
BatchesFn = Callable[[], Iterable[Batch]]
WAITING_DETAIL = "waiting for a new federation"  # status detail after the final round (exit_after_final off)






def check_local_work(a: AgentSettings) -> None:
    """``[agent]`` local work keys: ``time_budget_s`` None or finite > 0, ``min_local_steps`` >= 1 and, with
    a budget, at most ``local_steps``."""
    budget = a.time_budget_s
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)
                               or not math.isfinite(budget) or budget <= 0):
        raise InvalidValueError(
            f"agent.time_budget_s must be a finite number > 0 (or left out), got {budget!r}")
    mls = a.min_local_steps
    if isinstance(mls, bool) or not isinstance(mls, int) or mls < 1:
        raise InvalidValueError(f"agent.min_local_steps must be an int >= 1, got {mls!r}")
    steps = a.local_steps
    if budget is not None and steps is not None and steps < mls:
        raise InvalidValueError(f"agent.local_steps ({steps}) must be >= min_local_steps ({mls})")


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
                 limits: wire.WireLimits | None = None, bundle_id: str | None = None) -> None:
        a = config.agent
        if not a.client_id:
            raise InvalidValueError("agent.client_id is required (it is the site's MQTT identity)")
        if a.newer_global_policy not in NEWER_GLOBAL_POLICIES:
            raise InvalidValueError(f"agent.newer_global_policy must be one of {NEWER_GLOBAL_POLICIES}")
        for key in ("resend_after_s", "drain_timeout_s"):
            val = getattr(a, key)
            if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val) or val < 0:
                raise InvalidValueError(f"agent.{key} must be a finite number >= 0, got {val!r}")
        if a.resend_after_s <= 0:
            raise InvalidValueError("agent.resend_after_s must be > 0")
        check_local_work(a)
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
        # [agent] lora_rank below the bundle's: train, send and run only the first slots (site/rank_cut.py)
        self.rank_cut = RankCut.for_layout(trainer.layout, a.lora_rank, codec=config.codec,
                                           budget_bytes=a.update_budget_bytes)
        if self.rank_cut is None:
            self.encoder = UpdateEncoder(config.codec, self.n_params, segments=trainer.layout.segments)
        else:
            self._check_rank_cut(config)
            trainer.set_always_frozen(~self.rank_cut.keep)  # type: ignore[attr-defined]
            self.encoder = UpdateEncoder(config.codec, self.rank_cut.size, segments=self.rank_cut.segments)
        self.noise = SiteNoise(config.privacy) if config.privacy.mode == "distributed" else None
        self.personal = PrivateParts(trainer.layout, config.agent.private_tensors, self.state_dir)
        head_steps = a.fedrep_head_steps
        if isinstance(head_steps, bool) or not isinstance(head_steps, int) or head_steps < 0:
            raise InvalidValueError(f"agent.fedrep_head_steps must be an int >= 0, got {head_steps!r}")
        if head_steps and not self.personal.active:
            raise InvalidValueError("agent.fedrep_head_steps (FedRep) needs private_tensors: the head it "
                                    "trains first, e.g. [\"head.*\"]")
        if head_steps and not hasattr(trainer, "set_frozen"):
            raise InvalidValueError("agent.fedrep_head_steps (FedRep) needs a trainer that can freeze "
                                    "parameters (kind = gradient or ort)")
        self.last_sent_round = -1
        self._heldout: tuple[int, float] | None = None  # (round, held-out accuracy at its start)
        self.last_global_round: int | None = None
        self.rounds_sent: list[int] = []
        self._outgoing: list[OutboxEntry] = []
        self._latest_global: wire.GlobalMessage | None = None
        self._reannounced = False  # a known global came again: resend what is waiting (see module doc)
        self.resends = 0  # publishes of an update beyond its first (this run; tests, logs)
        self.ack_counts: Counter[str] = Counter()  # acknowledgements taken, by status
        self._stop = threading.Event()
        self.clock: Callable[[], float] = time.monotonic  # measures time_budget_s (tests replace it)
        self.governor = Governor.from_settings(config.governor)  # when training may run (site/governor.py)
        self.operator = OperatorPause(self)  # an operator's pause, asked first (site/control.py)
        self._status_now = ("", "")  # (state, detail) last published: "paused" is re-said after others
        self._final_round: int | None = None  # a finished federation's final round (exit_after_final off)
        self.transport: MqttTransport | None = None
        self.bundle_gate = BundleGate(bundle_id)  # the fleet's bundle against ours (site/bundle_setup.py)
        self.info_card = InfoCard(self.client_id, bundle_id)  # retained on info/<site> (site/info_card.py)
        self.metrics = AgentMetrics.for_agent(self)  # local Prometheus: HTTP, textfile (site/metrics.py)
        self.secure: SecureContribution | None = None  # [secagg] enabled: site/secure_sum.py
        self._secure_connect = -1  # transport.connect_count of the last secure resend
        if config.secagg.enabled:
            if config.codec.mode not in SECAGG_CODECS:
                raise InvalidValueError(
                    f"[secagg] enabled: secure aggregation masks dense vectors only, so [codec] mode must be "
                    f"one of {SECAGG_CODECS}, got {config.codec.mode!r} (the site lifts its float update to "
                    "the round's fixed-point grid; the codec itself is then unused)")
            # Loads an update pending from before a restart (it is not trained again).
            self.secure = SecureContribution(self.client_id, self.topics, self.n_params, self.state_dir)
        self._load_state()
        pending = self.secure.pending_round if self.secure is not None else None
        if pending is not None and pending > self.last_sent_round:
            # Killed between making the update durable and committing state.json: it was made.
            log.info("round %d: update pending for secure aggregation since an earlier run", pending)
            self.last_sent_round = pending
            self._save_state()

    def _check_rank_cut(self, config: AgentConfig) -> None:
        assert self.rank_cut is not None
        clashes = [what for what, on in (
            ("[secagg] enabled", config.secagg.enabled),
            ("[privacy] mode = 'distributed'", config.privacy.mode == "distributed"),
            ("a trainer that cannot freeze parameters (use kind gradient or ort)",
             not hasattr(self.trainer, "set_always_frozen"))) if on]
        if clashes:
            raise InvalidValueError(f"agent.lora_rank = {self.rank_cut.rank} (below the bundle's rank "
                                    f"{self.rank_cut.slots.max_rank}) cannot be combined with "
                                    + ", ".join(clashes))
        log.info("LoRA rank %d of the bundle's %d: %d of %d parameters trained and sent", self.rank_cut.rank,
                 self.rank_cut.slots.max_rank, self.rank_cut.size, self.n_params)

    # --- persistence ------------------------------------------------------------------------------
    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _load_state(self) -> None:
        # Each piece loads on its own; a damaged one is set aside and starts fresh (see site/state.py).
        self._files = SiteStateFiles(self.state_dir)
        self._outgoing.extend(self.outbox.load())
        if self.cfg.agent.dump_updates:
            # sent/ is written just after the outbox entry: a kill in between leaves a gap to fill.
            for entry in self._outgoing:
                if not (self.sent_dir / entry.path.name).exists():
                    self.sent_dir.mkdir(exist_ok=True)
                    write_file(self.sent_dir / entry.path.name, entry.data)
        # An outbox (or sent/) entry newer than state.json means we crashed between writing the update and
        # committing the state: the update counts as made, and its residual is the pending one.
        made = [e.round for e in self._outgoing] + update_rounds(self.sent_dir)
        resumed = self._files.resume(self.encoder, self.trainer, made)
        self.last_sent_round = resumed.last_sent_round
        self.last_global_round = resumed.last_global_round
        self._final_round = resumed.final_round
        if self.spec_hash is None and resumed.spec_hash:
            self.spec_hash = resumed.spec_hash
        if resumed.repaired:
            self._save_state()  # commit what was re-derived, so the next start finds it directly
        if self.last_sent_round >= 0:
            log.info("resuming: last update sent for round %d, %d update(s) waiting in the outbox",
                     self.last_sent_round, len(self._outgoing))

    def _save_state(self) -> None:
        st = {"last_sent_round": self.last_sent_round, "last_global_round": self.last_global_round,
              "spec_hash": self.spec_hash, "client_id": self.client_id, "saved_at": time.time(),
              "final_round": self._final_round}
        self._files.write_state(st)

    # --- messaging --------------------------------------------------------------------------------
    def _status(self, state: str, rnd: int | None = None, detail: str = "") -> bytes:
        status = notices.StatusMessage(self.client_id, state, time.time(), rnd, detail=detail)
        return notices.encode_status(status, self.limits)

    def _publish_status(self, state: str, rnd: int | None = None, detail: str = "") -> None:
        self._status_now = (state, detail)
        if self.transport is not None and self.transport.connected:
            self.transport.publish(self.topics.status(self.client_id), self._status(state, rnd, detail),
                                   retain=True)

    def _on_connect(self, transport: MqttTransport) -> None:
        # Runs in paho's network thread: publish only (never block here). Paused or done stays so.
        state, detail = self._status_now if self._status_now[0] in ("paused", "done") else ("online", "")
        transport.publish(self.topics.status(self.client_id),
                          self._status(state, self.last_global_round, detail), retain=True)
        self.info_card.publish(transport, self.topics, self.spec_hash, self.limits)

    def _send(self, out: OutboxEntry, why: str = "new") -> None:
        assert self.transport is not None
        topic = self.topics.update(self.client_id)
        budget = self.transport.max_payload(topic)
        # Same message id on every resend so the aggregator's reassembler sees duplicates, not a new message.
        parts = chunking.split_message(out.data, budget, message_id=out.mid(self.client_id))
        out.handles = [self.transport.publish(topic, p, qos=1) for p in parts]
        out.sent_at_connect = self.transport.connect_count
        out.sent_at = time.monotonic()
        out.sends += 1
        if why != "new":
            self.resends += 1
        log.info("update for round %d queued for sending (%d bytes, %d part(s)%s)", out.round, len(out.data),
                 len(parts), "" if why == "new" else f"; resent: {why}")

    def _pump_outbox(self) -> None:
        """Publish waiting updates again where a copy may have been lost (rules in the module doc)."""
        t = self.transport
        reannounced, self._reannounced = self._reannounced, False
        if t is None or not t.connected:
            return  # paho would only pile up copies while offline; the reconnect resends anyway
        if self.secure is not None and self._secure_connect != t.connect_count:
            # A new connection: the broker may have lost our last secure-aggregation message.
            self._secure_connect = t.connect_count
            self._publish_secure(self.secure.resend())
        now = time.monotonic()
        base = float(self.cfg.agent.resend_after_s)
        for out in list(self._outgoing):
            if out.sent_at_connect != t.connect_count:
                # A new connection (or this run's first): the broker may have lost the last copy.
                out.timer_resends = 0
                self._send(out, "reconnected" if out.sends else "waiting since an earlier run")
            elif not out.delivered_to_broker():
                continue  # still on its way to the broker
            elif reannounced:
                out.timer_resends = 0
                self._send(out, "global announced again")
            elif now - out.sent_at >= base * min(2 ** out.timer_resends, 8):
                out.timer_resends += 1
                self._send(out, f"no acknowledgement after {now - out.sent_at:.1f} s")

    def _on_ack(self, payload: bytes) -> None:
        """The aggregator decided one of our updates (durably): it leaves the outbox. A bad ack is
        ignored with a log line; the update then simply stays and is resent."""
        try:
            ack = notices.decode_ack(payload, self.limits)
        except WireError as exc:
            log.warning("ignoring an unreadable acknowledgement (%d bytes): %s", len(payload), exc)
            return
        if ack.fleet != self.topics.fleet or ack.site != self.client_id:
            log.warning("ignoring an acknowledgement addressed to %s/%s", ack.fleet, ack.site)
            return
        for out in self._outgoing:
            if out.round == ack.round or (ack.msg is not None and ack.msg == out.mid(self.client_id)):
                break
        else:
            log.debug("acknowledgement for round %s (%s) matches nothing waiting", ack.round, ack.status)
            return
        self.outbox.remove(out)
        self._outgoing.remove(out)
        self.ack_counts[ack.status] += 1
        detail = f" ({ack.reason})" if ack.reason else ""
        if ack.status == "rejected":
            log.warning("update for round %d rejected by the aggregator%s; removed from the outbox (a resend "
                        "would be rejected again)", out.round, detail)
        else:
            log.info("update for round %d acknowledged by the aggregator: %s%s", out.round, ack.status,
                     detail)

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
            if msg.topic == self.topics.ack(self.client_id):
                self._on_ack(msg.payload)
                continue
            if msg.topic == self.topics.bundle:
                self.bundle_gate.take(msg.payload, self.topics.fleet, self.limits)
                continue
            if msg.topic == self.topics.control:  # operator pause/resume (site/control.py)
                self.operator.take(msg.payload)
                continue
            if self.secure is not None and self._take_secure(msg.topic, msg.payload):
                continue
            if msg.topic != self.topics.global_:
                continue
            try:
                g = wire.decode_global(msg.payload, self.limits)
                self._check_global(g)
            except (WireError, FedPeftError) as exc:
                log.warning("ignoring global message: %s", exc)
                continue
            if self._latest_global is not None and g.round <= self._latest_global.round:
                # A round we know, announced again: the aggregator (re)connected, or we did.
                self._reannounced = True
            newest = self._latest_global is None or g.round >= self._latest_global.round
            if newest or self._opens_federation(g):
                self._latest_global = g

    def _take_secure(self, topic: str, payload: bytes) -> bool:
        """Route a secure-aggregation topic to the state machine and publish its answer; False: not one."""
        assert self.secure is not None
        if topic == self.topics.secagg_params:  # the same params again: our last message is resent
            out = self.secure.take_params(payload)
        elif topic == self.topics.secagg_down(self.client_id):
            out = self.secure.take_down(payload)
        elif topic == self.topics.secagg_unmask:
            out = self.secure.take_unmask(payload)
        else:
            return False
        self._publish_secure(out)
        return True

    def _publish_secure(self, out: list[Publish]) -> None:
        if self.transport is None:
            return
        for p in out:
            try:
                self.transport.publish(p.topic, p.payload, qos=p.qos, retain=p.retain)
            except InvalidValueError as exc:  # over the broker's packet limit: this site drops out
                log.error("secure-aggregation message of %d bytes not sent: %s", len(p.payload), exc)

    def _secure_outstanding(self) -> bool:
        """Whether the pending secure update still needs messages from us (a global may close it)."""
        if self.secure is None:
            return False
        g = self._latest_global
        if g is not None:
            self.secure.on_global(g.round, g.meta)
        return self.secure.outstanding

    def _check_global(self, g: wire.GlobalMessage) -> None:
        if g.fleet != self.topics.fleet:
            raise InvalidValueError(f"global is for fleet {g.fleet!r}, not {self.topics.fleet!r}")
        if g.vector.n != self.n_params:
            raise InvalidValueError(f"global has {g.vector.n} parameters, this trainer has {self.n_params}")
        if self.spec_hash is None:
            self.spec_hash = g.spec_hash  # no bundle told us: adopt the aggregator's and pin it
            log.info("adopting spec hash %s from the aggregator", g.spec_hash)
            if self.transport is not None:  # the card said no spec yet
                self.info_card.publish(self.transport, self.topics, self.spec_hash, self.limits)
        elif g.spec_hash != self.spec_hash:
            raise InvalidValueError(f"global spec hash {g.spec_hash} differs from ours {self.spec_hash}")

    # --- training ---------------------------------------------------------------------------------
    def _batches_until_newer(self, rnd: int) -> Iterator[Batch]:
        """The local batches, stopping early if a newer global arrives and the policy is 'abandon'.

        With ``time_budget_s``: cycled until the budget (counted from the first batch asked for) is used,
        checked before each step after the first ``min_local_steps`` (so the last step may overrun it by
        up to one step's time); the trainer's ``max_steps`` (``local_steps``) still caps. A pause or stop
        ends the round as without a budget, also below ``min_local_steps``."""
        a = self.cfg.agent
        abandon = a.newer_global_policy == "abandon"
        budget = a.time_budget_s
        started = self.clock()
        given = 0
        epochs: Iterable[int] = (itertools.count() if budget is not None
                                 else range(max(1, int(a.local_epochs))))
        for _ in epochs:
            empty = True
            for batch in self.train_batches_fn():
                empty = False
                if abandon:
                    self._poll()
                    if self._latest_global is not None and self._latest_global.round > rnd:
                        self._abandoned = True
                        return
                if self._stop.is_set():
                    self._abandoned = True
                    return
                if budget is not None and given >= a.min_local_steps and self.clock() - started >= budget:
                    log.info("round %d: time budget of %g s used after %d step(s)", rnd, budget, given)
                    return
                pause = self.operator.check() or self.governor.check()  # between steps; governor cached
                if pause is not None:
                    # Steps done: the round ends with them (its update is committed before the site sits
                    # paused); none yet: the round waits for the governor (see _governed).
                    self._abandoned = given == 0
                    log.info("pausing round %d after %d step(s): %s", rnd, given, pause)
                    return
                given += 1
                yield batch
            if empty:
                return  # no data at all: nothing to cycle (the round reports no samples)

    def _train_round(self, g: wire.GlobalMessage) -> None:
        rnd = g.round
        # With private tensors (site/personal.py) the site starts from the global plus its own values of them.
        global_vec = self.personal.start_from(decode_global(g.vector, self.n_params))
        if self.rank_cut is not None:  # a site below the bundle's rank trains the global cut to its slots
            global_vec = self.rank_cut.start_from(global_vec)
        self.trainer.set_flat(global_vec)
        anchor = getattr(self.trainer, "set_prox_reference", None)
        if anchor is not None and getattr(self.trainer, "prox_mu", 0.0):
            anchor(global_vec)  # FedProx ([trainer] prox_mu) pulls toward this global, also after a restart
        self._publish_status("training", rnd)
        log.info("round %d started: training from the global adapter (%d parameters)", rnd, self.n_params)
        metrics: dict[str, float] = {}
        if self.cfg.agent.evaluate and self.eval_batches_fn is not None:
            ev = self.trainer.evaluate(self.eval_batches_fn())
            metrics.update(global_eval_loss=float(ev.loss), global_eval_accuracy=float(ev.accuracy))
            self.metrics.evaluated(float(ev.accuracy))  # this site's held-out accuracy of the model it uses
            self._heldout = (rnd, float(ev.accuracy))
        self._abandoned = False
        if self.cfg.agent.fedrep_head_steps:  # FedRep: the private head alone, then the shared body alone
            head, tm = train_fedrep(self.trainer, self.personal,
                                    self.metrics.timed(self._batches_until_newer(rnd)),
                                    self.metrics.timed(self._batches_until_newer(rnd)),
                                    head_steps=self.cfg.agent.fedrep_head_steps,
                                    body_steps=self.cfg.agent.local_steps)
            metrics["head_steps"] = float(head.steps)
        else:
            tm = self.trainer.train(self.metrics.timed(self._batches_until_newer(rnd)),
                                    max_steps=self.cfg.agent.local_steps)
        if self._abandoned:
            newer = self._latest_global.round if self._latest_global else rnd
            log.info("round %d abandoned (newer global %d arrived, stopping or paused)", rnd, newer)
            return
        if tm.samples <= 0:
            raise InvalidValueError("local training saw no samples; check the data configuration")
        metrics.update(loss=float(tm.loss), train_seconds=float(tm.seconds), steps=float(tm.steps))
        self.metrics.trained(tm.loss)
        if tm.accuracy is not None:
            metrics["accuracy"] = float(tm.accuracy)
        metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}
        trained = self.trainer.get_flat()
        delta = self.personal.shared_delta(trained - global_vec)  # private tensors never leave the site
        if self.noise is not None:  # distributed DP: clipped and noised before anything is encoded
            delta = self.noise.apply(delta)
        if self.secure is not None:
            self._contribute_secure(rnd, delta, trained, tm.samples, tm.steps, tm.loss)
            return
        if self.rank_cut is not None:
            delta = self.rank_cut.take(delta)
            metrics[RANK_METRIC] = float(self.rank_cut.rank)
        enc = self.encoder.encode(delta)
        assert self.spec_hash is not None
        data = wire.encode_update(wire.UpdateMessage(self.topics.fleet, rnd, self.client_id, self.spec_hash,
                                                     int(tm.samples), metrics, enc), self.limits)
        # Crash safety order: pending residual, then the outbox entry, then commit both (site/state.py).
        self._files.write_encoder_pending(self.encoder, rnd)  # durable before the outbox entry relying on it
        out = self.outbox.put(rnd, data)
        path = out.path
        if self.cfg.agent.dump_updates:
            self.sent_dir.mkdir(exist_ok=True)
            write_file(self.sent_dir / path.name, data)
        self._files.commit_encoder()
        self._round_made(rnd, trained)
        self._outgoing.append(out)
        self._bound_disk()
        self._say_uploading(rnd)
        self._send(out)
        log.info("round %d trained: %d samples, %d steps, loss %.4f; update %d bytes (%s, k=%d of %d)",
                 rnd, tm.samples, tm.steps, tm.loss, len(data), enc.mode, enc.k, enc.n)

    def _contribute_secure(self, rnd: int, delta: np.ndarray, trained: np.ndarray, samples: int, steps: int,
                           loss: float) -> None:
        """The secure path of a round (site/secure_sum.py): no outbox and no acknowledgement; the update
        waits on disk for a session of its round, which the state machine joins."""
        assert self.secure is not None
        if self.cfg.agent.dump_updates:  # audit: the plain update this site puts into the sum (stays here);
            self.sent_dir.mkdir(exist_ok=True)  # before it is pending, so a kill between them retrains both
            buf = io.BytesIO()
            np.save(buf, np.asarray(delta, dtype=np.float32), allow_pickle=False)
            write_file(self.sent_dir / f"r{rnd}.secagg.npy", buf.getvalue())
        out = self.secure.contribute(rnd, delta)  # durable before state.json says the round was sent
        # A zero residual recorded for this round: resume() then finds the encoder state it expects.
        self._files.write_encoder_pending(self.encoder, rnd)
        self._files.commit_encoder()
        self._round_made(rnd, trained)
        self._say_uploading(rnd)
        self._publish_secure(out)
        log.info("round %d trained: %d samples, %d steps, loss %.4f; update pending for secure aggregation "
                 "(%s)", rnd, samples, steps, loss, self.secure.phase)

    def _round_made(self, rnd: int, trained: np.ndarray) -> None:
        """Commit that round ``rnd`` was made (its update is durable): never trained again."""
        self.last_sent_round = rnd
        self.rounds_sent.append(rnd)
        self._save_state()
        self._files.save_trainer(self.trainer)  # last: a stale trainer.state only resets optimizer moments
        self.personal.keep(trained)  # a kill before this retrains from the previous private values: harmless

    def _say_uploading(self, rnd: int) -> None:
        """Status ``uploading``, with the held-out accuracy measured at the start of this round."""
        ho = self._heldout
        heldout = f"held-out accuracy {ho[1]:.3f}" if ho is not None and ho[0] == rnd else ""
        self._publish_status("uploading", rnd, heldout)

    # --- running for months: the governor, federations that end and start, bounded disk -----------------
    def _governed(self, rnd: int | None) -> bool:
        """Whether the governor (site/governor.py) holds training back now; the status says why.

        No work is parked in memory while paused: a round paused after some steps ended with them
        (_batches_until_newer; FedAvg weighs it by its samples) and its update went through the crash-safe
        commit before the site sits here, and a round paused before its first step simply waits. So a
        kill -9 while paused loses nothing, and a closed window (hours) does not hold an update back until
        its round's deadline has passed."""
        reason = self.operator.check() or self.governor.check()  # an operator's pause first
        if reason is not None and self._status_now != ("paused", reason):
            if self._status_now[0] != "paused":
                log.info("paused: %s", reason)
            self._publish_status("paused", rnd, reason)
        elif reason is None and self._status_now[0] == "paused":
            log.info("resuming: the governor allows training again")
            done = self._final_round is not None and self._final_round == self.last_global_round
            state, detail = ("done", WAITING_DETAIL) if done else ("online", "")
            self._publish_status(state, rnd, detail)
        return reason is not None

    def _federation_done(self, g: wire.GlobalMessage) -> None:
        """The final round came and ``exit_after_final`` is off: note it (durably) once, and wait."""
        if self._final_round == g.round and self._status_now[0] in ("done", "paused"):
            return
        if self._final_round != g.round:
            log.info("federation finished at round %d; waiting for a new federation", g.round)
            self._final_round = g.round
            self._save_state()
            self._reannounced = True  # one still waiting lost its ack: resend it now (see _drain_outbox)
        self._publish_status("done", g.round, WAITING_DETAIL)

    def _opens_federation(self, g: wire.GlobalMessage) -> bool:
        """A non-final global below the final round of a finished federation opens a new one (a fresh
        aggregator run starts again at round 0). MQTT delivers one topic's QoS 1 messages in order, so an
        older global of the finished run does not come after its final."""
        return self._final_round is not None and not g.meta.get("final") and g.round < self._final_round

    def _start_federation(self, g: wire.GlobalMessage) -> None:
        """Forget the finished federation's rounds (they start again at 0) and join the new one."""
        dropped = self._files.forget_federation(self.outbox_dir, self.sent_dir)
        self._outgoing.clear()
        if self.secure is not None:
            self.secure.discard()  # the finished federation's pending secure update means nothing now
        self.encoder.reset_residual()  # the old adapter's unsent remainder means nothing to the new run
        self.personal.forget()
        log.warning("a new federation starts at round %d (the last one ended at round %s): %d waiting "
                    "update(s) of the finished one dropped, error-feedback residual reset", g.round,
                    self._final_round, dropped)
        self.last_sent_round, self._final_round = -1, None
        self._save_state()  # last: until here a restart still sees the finished federation and redoes this

    def _bound_disk(self) -> None:
        """Disk use stays bounded over months: beyond ``max_outbox_updates`` the oldest waiting update is
        dropped (an aggregator that never acknowledges must not fill the disk), and ``sent/`` keeps its
        newest ``max_sent_updates``. The newest file stays, so the last round sent derived from them
        after a restart is unchanged."""
        a = self.cfg.agent
        while len(self._outgoing) > max(1, int(a.max_outbox_updates)):
            oldest = min(self._outgoing, key=lambda e: e.round)
            self.outbox.remove(oldest)
            self._outgoing.remove(oldest)
            log.warning("outbox holds more than %d unacknowledged updates: the update of round %d is dropped",
                        a.max_outbox_updates, oldest.round)
        if a.dump_updates:
            prune_updates(self.sent_dir, int(a.max_sent_updates))

    # --- main loop --------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self, *, connect_timeout: float | None = None) -> AgentResult:
        a = self.cfg.agent
        self.transport = MqttTransport(
            transport_config(self.cfg.connection, self.client_id),
            will=Will(self.topics.status(self.client_id), self._status("offline")),
            on_connect=self._on_connect, stop=self._stop)
        if self.bundle_gate.active:  # before the global: its retained notice is delivered first
            self.transport.subscribe(self.topics.bundle, qos=1)
        self.transport.subscribe(self.topics.global_, qos=1)
        self.transport.subscribe(self.topics.ack(self.client_id), qos=1)
        self.transport.subscribe(self.topics.control, qos=1)  # operator actions (site/control.py)
        if self.secure is not None:  # secure aggregation: the session, our messages, the unmask request
            for topic in (self.topics.secagg_params, self.topics.secagg_down(self.client_id),
                          self.topics.secagg_unmask):
                self.transport.subscribe(topic, qos=1)
        self.transport.connect(connect_timeout)
        self._pump_outbox()  # store and forward: what a previous run left waiting goes out now
        final_seen, reason = False, "stopped"
        last_activity = time.monotonic()
        try:
            self.metrics.start()
            while not self._stop.is_set():
                self._poll(0.2)
                self._pump_outbox()
                self.metrics.write()  # the textfile, only when a value changed
                g = self._latest_global
                if self.secure is not None and g is not None:
                    self.secure.on_global(g.round, g.meta)  # a no-op unless g closes our pending round
                if g is not None and g.round != self.last_global_round:
                    if self._opens_federation(g):
                        self._start_federation(g)
                    self.last_global_round = g.round
                    self._save_state()
                    last_activity = time.monotonic()
                    final_note = " (final)" if g.meta.get("final") else ""
                    log.info("global for round %d received%s", g.round, final_note)
                    export_global(self, g)  # merged inference model to <state>/model; never raises
                final = g is not None and bool(g.meta.get("final"))
                if final:
                    final_seen = True
                    if a.exit_after_final:
                        reason = "final round announced"
                        break
                    self._federation_done(g)  # a service stays: a new federation may come
                if a.max_rounds is not None and len(self.rounds_sent) >= a.max_rounds:
                    reason = "max_rounds reached"
                    break
                paused = self._governed(g.round if g is not None else self.last_global_round)
                if self.bundle_gate.blocks(self._publish_status, self.transport.connect_count,
                                           self.last_global_round):
                    paused = True  # the fleet trains another bundle: needs_bundle is on the status
                if g is not None and not final and not paused and g.round > self.last_sent_round:
                    self._train_round(g)
                    last_activity = time.monotonic()
                    continue
                if a.idle_exit_s is not None and time.monotonic() - last_activity > a.idle_exit_s:
                    reason = "idle timeout"
                    break
            self._drain_outbox(timeout=float(a.drain_timeout_s), resend_now=final_seen)
            self._publish_status("done" if final_seen else "idle", self.last_global_round)
        finally:
            self.metrics.close()
            self.transport.close(final=(self.topics.status(self.client_id),
                                        self._status("offline", self.last_global_round)))
        log.info("agent %s finished: %s; rounds sent %s", self.client_id, reason, self.rounds_sent)
        return AgentResult(list(self.rounds_sent), self.last_global_round, final_seen, reason)

    def _drain_outbox(self, timeout: float, *, resend_now: bool = False) -> None:
        """Wait (bounded) until the aggregator has acknowledged every waiting update."""
        deadline = time.monotonic() + timeout
        # After the final global: the aggregator acks every decided update before it publishes the global
        # that follows, so one still waiting lost its ack (or never arrived) — send it again at once
        # (the aggregator stays a while to answer) rather than on the timer.
        self._reannounced = resend_now
        # A secure update has no acknowledgement; the drain waits (bounded) while it still needs our messages.
        while ((self._outgoing or self._secure_outstanding()) and time.monotonic() < deadline
               and not self._stop.is_set()):
            self._pump_outbox()
            self._poll(0.05)
        if self._outgoing:
            log.warning("%d update(s) not acknowledged by the aggregator; they stay in %s for the next start",
                        len(self._outgoing), self.outbox_dir)
        if self.secure is not None and self.secure.outstanding:
            log.warning("the secure-aggregation update of round %s is unfinished (%s); it stays pending for "
                        "the next start", self.secure.pending_round, self.secure.phase)










