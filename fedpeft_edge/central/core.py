"""Aggregator round state, persisted crash-safely, and the transport-free aggregation core.

:class:`RoundState` is everything an aggregator must not lose: round number, global vector, the
running weighted sum of the open round, the accepted ``(client_id, round)`` pairs, the server
optimiser state and counters. It lives in ONE file, ``<dir>/round_state.npz`` (``np.savez``, loaded
with ``allow_pickle=False``; non-array fields as JSON stored in a uint8 array), replaced atomically:
write ``.round_state.npz.tmp-*`` in the same directory, flush + fsync, ``os.replace``, fsync the
directory. A reader sees the old file or the new one, never a mix; stray temp files are ignored.

Exactly-once counting with an MQTT QoS 1 subscriber: the accumulator sum and the accepted pair set are
written in the same atomic file, so

* crash after ``offer`` but before the save → neither the sum nor the pair contain the update; the
  broker redelivers (not yet acknowledged) and it is counted then;
* crash after the save but before the acknowledgement → the redelivery is recognised as a duplicate.

So: persist (``autosave=True`` does it inside :meth:`AggregatorCore.offer`, or call
:meth:`AggregatorCore.checkpoint` after a batch) BEFORE acknowledging the MQTT message (paho 2.x:
``Client(manual_ack=True)`` + ``client.ack(mid, qos)``).

Safe by default against a lying site: the round's accepted updates are also kept in their encoded form
(the round buffer, in the same atomic file as the pairs and the sum) and, when the round closes, each is
clipped to a multiple of the round's median update norm and its claimed samples capped at a multiple of
the round's median claim (:mod:`fedpeft_edge.central.robust` explains the design). Weights reported at
offer time (``Decision.weight``, :attr:`AggregatorCore.round_sum`) are therefore provisional.

With ``aggregation = "fednova"`` the running sum holds each update divided by its claimed local steps τ_i
(read from the update's own ``steps`` metric, so the factor is fixed by the message itself and a
redelivery changes nothing) and the state adds ``Σ w_i·τ_i`` beside ``Σ w_i``, in the same atomic file;
at close the mean is multiplied by ``τ_eff`` (central/accumulator.py, central/policy.py).

With ``round_mode = "fedbuff"`` (central/policy.py) a "round" is one server step of FedBuff: it is ready as
soon as ``buffer_k`` updates are in, whatever global each came from; an update ``τ`` steps behind (up to
``max_staleness``) is summed as ``w·s(τ)·Δ`` with ``w`` alone in ``Σ w``, and its buffered entry says so
(``stale_on_update``), so a resumed buffer is re-aggregated the way it was summed. The accepted pairs,
the running sum and the buffer stay in the one atomic file: a buffer resumes after a restart as it was.

:class:`AggregatorCore` applies the policy of an :class:`AggregatorConfig`; the MQTT service loop
drives it: ``offer(decoded_update)`` per message, ``ready_to_close(now)`` on a timer,
``close_round(now)`` → publish the new global. Two parts of it live in their own files on the same state:
the gateway tier's partial aggregates (core_gateway.py) and secure aggregation's close (core_secure.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from fedpeft_edge import kernels
from fedpeft_edge.central.accumulator import RoundAccumulator
from fedpeft_edge.central.core_gateway import GatewayTierMethods
from fedpeft_edge.central.core_ranks import CUT_WEIGHTS, RankMethods, RankRefused
from fedpeft_edge.central.core_secure import SecureRoundMethods
from fedpeft_edge.central.decision import (
    ACCEPTED,
    BUFFER_FULL,
    DUPLICATE,
    LATE,
    MAX_WEIGHTED_NORM,
    REJECTED,
    Decision,
)
from fedpeft_edge.central.policy import ADAPTER_RULES, AggregatorConfig, RoundPolicy
from fedpeft_edge.central.privacy import private_round
from fedpeft_edge.central.robust import (
    MAX_CLAIMED_STEPS,
    BufferedUpdate,
    RoundPlan,
    claimed_steps,
    plan_round,
    weighted_metrics,
)
from fedpeft_edge.central.robust_rules import robust_aggregate
from fedpeft_edge.central.store import HISTORY_KEEP, RoundState, StateError, new_round_stats
from fedpeft_edge.central.strategy import (
    NormBound,
    ServerOptimizer,
    make_server_optimizer,
    staleness_weight,
)
from fedpeft_edge.peft.rank_slots import RANK_METRIC, RankSlots
from fedpeft_edge.protocol.codec import EncodedUpdate, encode_global, parse, update_l2_norm
from fedpeft_edge.protocol.fleet_report import MAX_REASONS_PER_SITE, SiteRecord
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.protocol.wire import GlobalMessage, UpdateMessage
from fedpeft_edge.runtime.errors import InvalidValueError

MIN_WEIGHT: Final = 1e-9  # below this a stale update is treated as late (its weight would vanish)
MAX_TRACKED_SITES: Final = 10_000  # sites in the per-site ledger (the federation report); beyond: not tracked
OTHER_REASON: Final = "other"  # a site's rejections beyond MAX_REASONS_PER_SITE distinct reasons

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# The core


def _immutable(enc: EncodedUpdate) -> EncodedUpdate:
    """``enc`` with its payload as bytes: the buffer must not change if an in-process caller reuses it."""
    if isinstance(enc.payload, bytes):
        return enc  # what the wire decoder gives: no copy
    return replace(enc, payload=bytes(memoryview(enc.payload).cast("B")))


class AggregatorCore(GatewayTierMethods, SecureRoundMethods, RankMethods):
    """Round logic over :class:`RoundState`: validation, dedup, lateness, norm bound, weighted sum,
    server optimiser, round closing. No I/O except the state file in ``state_dir``.

    ``state_dir=None`` keeps everything in memory (tests, simulations). With a directory, an existing
    state is resumed if its fingerprint (fleet, n_params, spec_hash, server_optimizer) matches the
    config, else :class:`StateError`.

    Not thread-safe: call it from one thread (e.g. a worker fed by paho's ``on_message`` through a
    queue). Persistence costs one atomic npz write + fsync (~3-12 ms for 100k params here, plus the
    round buffer's bytes); to ingest faster, use ``autosave=False``, offer a batch, :meth:`checkpoint`
    once, then acknowledge the batch.
    """

    def __init__(self, config: AggregatorConfig, state_dir: str | os.PathLike[str] | None = None, *,
                 initial_global: np.ndarray | None = None, autosave: bool = True,
                 now: float | None = None, rank_slots: RankSlots | None = None) -> None:
        self.config = config
        self._init_ranks(rank_slots)  # sites below the LoRA rank R (central/core_ranks.py); None: refused
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.autosave = autosave
        self._norm = NormBound(config.norm_bound, config.norm_mode) if config.norm_bound is not None else None
        now = time.time() if now is None else now
        loaded = RoundState.load(self.state_dir) if self.state_dir is not None else None
        if loaded is None:
            self._state = RoundState.fresh(config, initial_global, now)
            self._optimizer = make_server_optimizer(config.server_optimizer, config.n_params,
                                                    **config.server_opt_params)
            self._store_optimizer()
            if self.state_dir is not None:
                self._state.save(self.state_dir)
        else:
            if loaded.fingerprint != config.fingerprint():
                raise StateError(f"state in {self.state_dir} belongs to {loaded.fingerprint}, "
                                 f"not {config.fingerprint()}")
            self._state = loaded
            self._optimizer = self._restore_optimizer(loaded)
            self._check_buffered_ranks()
        self._poisoned = False  # set when a mutation failed half-way; nothing may be saved after that
        self._acc = RoundAccumulator(config.n_params)
        self._acc.sum = self._state.acc_sum  # shared buffer: the state always holds the live sum
        self._acc.total_weight, self._acc.count = self._state.acc_total_weight, self._state.acc_count
        self._acc.steps_weight = self._state.acc_steps_weight
        self._buffer_nbytes = self._state.buffer_nbytes  # running total: the cap is checked per offer
        self._untracked_logged = False  # the per-site ledger is full: said once

    # ---- read-only views -----------------------------------------------------------------------------

    @property
    def round(self) -> int:
        """The open round: sites train from ``global_vector`` and send updates tagged with this round."""
        return self._state.round

    @property
    def global_vector(self) -> np.ndarray:
        view = self._state.global_vec.view()
        view.flags.writeable = False
        return view

    @property
    def finished(self) -> bool:
        """All ``max_rounds`` rounds closed, or the privacy budget allows no further round."""
        if self.privacy_exhausted:
            return True
        return self.config.max_rounds is not None and self._state.round >= self.config.max_rounds

    @property
    def privacy_exhausted(self) -> bool:
        """The ``[privacy] epsilon_budget`` would be exceeded by one more round: the federation is over."""
        return bool(self._state.privacy.get("exhausted", False))

    @property
    def privacy_ledger(self) -> dict[str, Any]:
        """The accountant's record: current clip norm, every closed round's noise multiplier."""
        return dict(self._state.privacy)

    @property
    def counters(self) -> dict[str, int]:
        """Cumulative counts: accepted, duplicate, late, late_accepted, clipped, bytes_in,
        ``rejected`` and ``rejected:<reason>``."""
        return dict(self._state.counters)

    @property
    def round_sum(self) -> np.ndarray:
        """Read-only view of the open round's running weighted sum ``Σ w_i·update_i`` (what has been
        counted so far, with the provisional weights; a rejected update leaves it untouched). The
        close-time bounds may still clip or re-weight some of it (see :meth:`close_round`)."""
        view = self._acc.sum.view()
        view.flags.writeable = False
        return view

    def was_counted(self, client_id: str, rnd: int) -> bool:
        """Whether the update of ``client_id`` trained from round ``rnd`` is in some global (pairs older
        than ``max_staleness`` rounds are forgotten; such an update would be late anyway)."""
        return (client_id, rnd) in self._state.accepted

    @property
    def accepted_this_round(self) -> int:
        return self._acc.count

    @property
    def buffered(self) -> list[BufferedUpdate]:
        """The open round's buffered updates, in acceptance order (empty when the policy needs none)."""
        return list(self._state.buffer)

    @property
    def buffer_nbytes(self) -> int:
        """Payload bytes held in the round buffer (bounded by ``max_round_buffer_bytes``)."""
        return self._buffer_nbytes

    @property
    def participants(self) -> list[str]:
        return list(self._state.stats["participants"])

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self._state.history)

    @property
    def optimizer(self) -> ServerOptimizer:
        return self._optimizer

    @property
    def round_started_at(self) -> float:
        return self._state.round_started_at

    # ---- ingest --------------------------------------------------------------------------------------

    def _count(self, key: str, amount: int = 1) -> None:
        self._state.counters[key] = self._state.counters.get(key, 0) + amount

    def note_rejected(self, reason: str, nbytes: int = 0, detail: str = "",
                      sender: str | None = None) -> Decision:
        """Count a message rejected before it reached :meth:`offer` (e.g. wire decoding failed); with
        ``sender`` (the site the transport vouches for) also in that site's ledger."""
        self._count("rejected")
        self._count(f"rejected:{reason}")
        if nbytes:
            self._count("bytes_rejected", int(nbytes))
        if sender is not None:
            entry = self._ledger(sender)
            if entry is not None:
                rejected = entry["rejected"]
                if reason not in rejected and len(rejected) >= MAX_REASONS_PER_SITE - 1:
                    reason_key = OTHER_REASON  # bounded: the last slot takes every further reason
                else:
                    reason_key = reason
                rejected[reason_key] = rejected.get(reason_key, 0) + 1
        return Decision(REJECTED, reason, detail=detail)

    def _ledger(self, site: str) -> dict[str, Any] | None:
        """The ledger entry of ``site`` (created on first use); None once :data:`MAX_TRACKED_SITES` are
        tracked and it is not one of them."""
        sites = self._state.sites
        entry = sites.get(site)
        if entry is None:
            if len(sites) >= MAX_TRACKED_SITES:
                if not self._untracked_logged:
                    self._untracked_logged = True
                    log.warning("per-site ledger holds %d sites: %r and further new sites are not tracked "
                                "in the federation report", len(sites), site)
                return None
            entry = sites[site] = {"samples": 0, "rounds": 0, "last_round": None, "last_at": None,
                                   "rejected": {}}
        return entry

    def site_records(self) -> dict[str, SiteRecord]:
        """What was counted of each site (the federation report): accepted samples and rounds, last
        round and time counted, rejections by reason. ``rounds`` is the ledger's count, or the rounds the
        persisted accepted pairs show when that is more (a state written before the ledger)."""
        counted: dict[str, set[int]] = {}
        for (client, _rnd), at in self._state.accepted.items():
            counted.setdefault(client, set()).add(at)
        out: dict[str, SiteRecord] = {}
        for name in sorted(set(self._state.sites) | set(counted)):
            e = self._state.sites.get(name)
            rounds = len(counted.get(name, ()))
            if e is None:
                out[name] = SiteRecord(rounds=rounds)
                continue
            out[name] = SiteRecord(rounds=max(int(e["rounds"]), rounds), samples=int(e["samples"]),
                                   last_round=e["last_round"], last_at=e["last_at"],
                                   rejected=dict(e["rejected"]), accuracy=e.get("accuracy"),
                                   lora_rank=e.get("lora_rank"))
        return out

    def offer(self, msg: UpdateMessage, *, sender: str | None = None, nbytes: int | None = None,
              now: float | None = None) -> Decision:
        """Validate and (maybe) accumulate one decoded update; persists when ``autosave``.

        ``sender`` is the client id the transport vouches for (MQTT topic level); a different
        ``msg.client_id`` is rejected. ``nbytes`` is the envelope size for byte accounting.

        Exception contract (the service decides acknowledgement on it): :class:`StateError` means the
        state could not be persisted or may be inconsistent — do NOT acknowledge, restart from disk.
        Any other exception comes from the validation part, before anything was accumulated, so the
        state is unchanged and the message may be rejected for good.
        """
        cfg, st = self.config, self._state
        now = time.time() if now is None else now
        who = sender if sender is not None else msg.client_id  # whose ledger a rejection goes to
        if self.finished:
            return self.note_rejected("finished", nbytes or 0,
                                      f"all {cfg.max_rounds} rounds are done", who)
        if cfg.secure:  # a site without [secagg] enabled: its plain update must not be counted (nor kept)
            return self.note_rejected("secure_aggregation", nbytes or 0, "this federation takes updates "
                                      "only through secure aggregation: set [secagg] enabled = true", who)
        if sender is not None and sender != msg.client_id:
            return self.note_rejected("client_mismatch", nbytes or 0,
                                      f"envelope site {msg.client_id!r} sent on {sender!r}'s topic", who)
        if cfg.sites is not None and msg.client_id not in cfg.sites:
            return self.note_rejected("unknown_site", nbytes or 0,
                                      f"{msg.client_id!r} is not one of the federation's sites", who)
        if msg.fleet != cfg.fleet:
            return self.note_rejected("wrong_fleet", nbytes or 0,
                                      f"fleet {msg.fleet!r}, expected {cfg.fleet!r}", who)
        if msg.spec_hash != cfg.spec_hash:
            return self.note_rejected("spec_hash", nbytes or 0,
                                      f"spec hash {msg.spec_hash}, expected {cfg.spec_hash} (other bundle?)",
                                      who)
        if msg.round > st.round:
            return self.note_rejected("future_round", nbytes or 0,
                                      f"round {msg.round}, open round {st.round}", who)
        ns = msg.num_samples
        if isinstance(ns, bool) or not isinstance(ns, int) or ns < 1:  # the wire checks it; in-process not
            return self.note_rejected("bad_samples", nbytes or 0, f"num_samples {ns!r}", who)
        key = (msg.client_id, msg.round)
        if key in st.accepted:
            self._count("duplicate")
            return Decision(DUPLICATE, "already counted")
        staleness = st.round - msg.round
        counts_stale = cfg.fedbuff or cfg.late_policy == "stale_weighted"  # FedBuff: late_policy n/a
        if staleness > 0 and (not counts_stale or staleness > cfg.max_staleness):
            self._count("late")
            return Decision(LATE, f"{staleness} round(s) behind", staleness=staleness)
        try:
            rank = self.update_rank(msg)  # None: the full rank (central/core_ranks.py)
        except RankRefused as exc:
            return self.note_rejected(exc.reason, nbytes or 0, exc.detail, who)
        try:
            parsed = parse(msg.update, n_params=self._params_of_rank(rank))
            norm = update_l2_norm(parsed)
        except WireFormatError as exc:
            return self.note_rejected(exc.reason, nbytes or 0, str(exc), who)
        scale = 1.0
        if self._norm is not None:
            s = self._norm.scale_for(norm)
            if s is None:
                return self.note_rejected("norm_bound", nbytes or 0, f"update norm {norm:.4g} over the bound",
                                          who)
            scale = s
        elif not math.isfinite(norm):
            return self.note_rejected("non_finite", nbytes or 0, "update norm is not finite", who)
        samples = min(msg.num_samples, cfg.max_samples_weight)
        stale_factor = staleness_weight(staleness, cfg.staleness_alpha) if staleness else 1.0
        # DP bounds each site's say by C with equal weights: a claimed sample count must not scale it
        weight = float(samples) if cfg.weighting == "samples" and not cfg.privacy.enabled else 1.0
        # FedBuff discounts the update itself (its say in the mean stays): Σ w·s(τ)·Δ / Σ w (policy.py)
        update_factor = stale_factor if cfg.fedbuff else 1.0
        if staleness:
            if not cfg.fedbuff:
                weight *= stale_factor
            if weight * update_factor < MIN_WEIGHT:
                self._count("late")
                return Decision(LATE, "staleness weight negligible", staleness=staleness)
        # Every |sum element| <= Σ weight·scale·norm; keeping that below float32 range means no hostile
        # (finite but huge) update can overflow the round's sum to Inf and wedge the round.
        mass = weight * scale * update_factor * norm
        if not math.isfinite(mass) or st.stats.get("weighted_norm_sum", 0.0) + mass > MAX_WEIGHTED_NORM:
            return self.note_rejected("overflow", nbytes or 0,
                                      f"weight x norm {mass:.4g} would overflow the sum", who)
        if cfg.aggregation == "fednova" and scale * norm * MAX_CLAIMED_STEPS > MAX_WEIGHTED_NORM:
            # FedNova's mean is at most τ_max × the largest norm/τ_i: this keeps it inside float32 too
            return self.note_rejected("overflow", nbytes or 0,
                                      f"norm {scale * norm:.4g} would overflow FedNova's aggregate", who)
        steps = 1.0  # τ_i: FedAvg counts every update as one unit of work
        if cfg.aggregation == "fednova":
            claim = claimed_steps(msg.metrics)
            if claim is None:  # provisional: the close-time plan gives it the round's median claim
                log.info("update of %s for round %d has no valid step count (%r): counted as 1 step for now, "
                         "as the round's median at close", msg.client_id, msg.round, msg.metrics.get("steps"))
            steps = 1.0 if claim is None else claim
        entry = None
        if cfg.buffers_updates:
            if self._buffer_nbytes + msg.update.nbytes > cfg.max_round_buffer_bytes:
                st.stats["buffer_full"] = True  # nothing more fits: the round is ready to close
                return self.note_rejected(BUFFER_FULL, nbytes or 0,
                                          f"round buffer holds {self._buffer_nbytes} bytes, cap "
                                          f"{cfg.max_round_buffer_bytes}", who)
            finite = {k: float(v) for k, v in msg.metrics.items() if math.isfinite(v)}
            entry = BufferedUpdate(msg.client_id, msg.round, _immutable(msg.update), samples, stale_factor,
                                   weight, scale, norm, finite, steps, stale_on_update=cfg.fedbuff)

        with self._all_or_poisoned():
            self._commit_offer(msg, key, parsed, weight, scale, steps, mass, staleness, nbytes, entry, now,
                               update_factor, rank)
        if self.autosave:
            self.checkpoint()
        return Decision(ACCEPTED, "", weight * update_factor, staleness)

    @contextlib.contextmanager
    def _all_or_poisoned(self) -> Iterator[None]:
        """Around a mutation of the round state: if it fails half-way, memory no longer matches any
        consistent state, so nothing may be persisted any more; the caller must not acknowledge and should
        restart from disk (the broker redelivers)."""
        self._ensure_usable()
        try:
            yield
        except BaseException as exc:
            self._poisoned = True
            if isinstance(exc, Exception):
                raise StateError(f"in-memory round state may be inconsistent after {exc!r}; "
                                 "restart from the persisted state") from exc
            raise

    def _ensure_usable(self) -> None:
        if self._poisoned:
            raise StateError("round state was left inconsistent by an earlier failure; restart from disk")

    def _commit_offer(self, msg: UpdateMessage, key: tuple[str, int], parsed: Any, weight: float,
                      scale: float, steps: float, mass: float, staleness: int, nbytes: int | None,
                      entry: BufferedUpdate | None, now: float, update_factor: float = 1.0,
                      rank: int | None = None) -> None:
        """The mutating part of :meth:`offer` (everything before it only validates)."""
        st = self._state
        site = self._ledger(msg.client_id)  # saved with the pairs and the sum: counted exactly once
        if site is not None:
            site["samples"] += int(msg.num_samples)  # as claimed (the weight may be capped)
            if msg.client_id not in st.stats["participants"]:
                site["rounds"] += 1  # a site counted twice in one round (stale_weighted) adds one round
            site["last_round"], site["last_at"] = msg.round, now
            acc = msg.metrics.get("global_eval_accuracy")  # the site's held-out accuracy (wire: finite)
            if acc is not None and 0.0 <= acc <= 1.0:
                site["accuracy"] = float(acc)
            if self._rank_slots is not None:  # the rank it trains, for the operators' fleet page
                site["lora_rank"] = rank if rank is not None else self._rank_slots.max_rank
        self._add_update(self._acc, parsed, rank, weight, scale * update_factor, steps)
        self._book_rank(rank, weight)
        st.acc_total_weight, st.acc_count = self._acc.total_weight, self._acc.count
        st.acc_steps_weight = self._acc.steps_weight
        if entry is not None:
            st.buffer.append(entry)
            self._buffer_nbytes += entry.nbytes
        st.accepted[key] = st.round
        stats = st.stats
        stats["participants"].append(msg.client_id)
        stats["bytes_in"] += int(nbytes or msg.update.nbytes)
        stats["weighted_norm_sum"] = stats.get("weighted_norm_sum", 0.0) + mass
        if self.config.fedbuff:
            stats.setdefault("staleness", []).append(staleness)  # the step's metrics report them
        for name, val in msg.metrics.items():
            wsum = stats["metric_wsum"].get(name, 0.0) + weight * val
            if not math.isfinite(wsum):  # absurd metric values must not poison the JSON state
                self._count("metric_ignored")
                continue
            stats["metric_wsum"][name] = wsum
            stats["metric_w"][name] = stats["metric_w"].get(name, 0.0) + weight
        self._count("accepted")
        self._count("bytes_in", int(nbytes or msg.update.nbytes))
        if staleness:
            stats["late_accepted"] += 1
            self._count("late_accepted")
        if scale < 1.0:
            stats["clipped"] += 1
            self._count("clipped")

    # ---- round control -----------------------------------------------------------------------------

    def deadline_passed(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return now - self._state.round_started_at >= self.config.round_deadline_s

    def ready_to_close(self, now: float | None = None) -> bool:
        """Quorum reached, or deadline passed with at least ``min_clients`` accepted updates, or the round
        buffer is full (nothing more can be counted in this round). FedBuff: ``buffer_k`` updates are in
        (or the buffer is full); no deadline."""
        if self.finished or self._acc.count == 0:
            return False
        full = bool(self._state.stats.get("buffer_full", False))
        if self.config.fedbuff:
            return self._acc.count >= self.config.buffer_k or full
        if self._acc.count >= self.config.quorum or self._state.stats.get("buffer_full", False):
            return True
        return self._acc.count >= self.config.min_clients and self.deadline_passed(now)

    def restart_round_clock(self, now: float | None = None) -> None:
        """Start the deadline again (e.g. after the global was (re)published following a restart)."""
        self._state.round_started_at = time.time() if now is None else now
        if self.autosave:
            self.checkpoint()

    def _plan(self) -> RoundPlan | None:
        """The close-time bounds of the open round; None when off or the buffer does not hold every
        counted update (a round resumed from a state written without one)."""
        cfg, buf = self.config, self._state.buffer
        if not cfg.buffers_updates or len(buf) != self._acc.count:
            return None
        if cfg.privacy.mode == "central":
            return None  # the DP clip to C replaces the median-relative bounds (not private figures)
        return plan_round(buf, norm_multiplier=cfg.norm_median_multiplier, norm_mode=cfg.norm_mode,
                          samples_multiplier=cfg.samples_median_multiplier, weighting=cfg.weighting,
                          norm_reject_multiplier=cfg.norm_reject_multiplier, aggregation=cfg.aggregation,
                          steps_multiplier=cfg.steps_median_multiplier)

    def _round_mean(self, plan: RoundPlan | None) -> tuple[np.ndarray, float, float]:
        """The round's aggregate update (FedAvg's weighted mean, or FedNova's ``τ_eff·Σ p_i·d_i/Σ p_i``),
        its total weight and τ_eff, under ``plan``."""
        if plan is None or not plan.binds(self._state.buffer):
            acc = self._acc  # the running sum is already the answer
            cut = self._cut_weights()
        else:
            acc = RoundAccumulator(self.config.n_params)
            cut = {}
            for e, w, s, inc, t in zip(self._state.buffer, plan.weights, plan.scales, plan.included,
                                       plan.steps, strict=True):
                if inc:
                    rank = self.rank_of_entry(e)
                    self._add_update(acc, e.update, rank, w, s * e.update_factor, t)
                    if rank is not None:
                        cut[rank] = cut.get(rank, 0.0) + w
        # sites below the LoRA rank: each slot averaged over the sites that trained it (core_ranks.py)
        mean = self._rank_aware(acc.normalised_mean(), cut, acc.total_weight)
        return mean, acc.total_weight, acc.effective_steps

    def _robust_mean(self, plan: RoundPlan | None, tau_eff: float
                     ) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The round's aggregate under ``robust_rule`` (central/robust_rules.py) and its figures; None when
        the rule is off or cannot run this round (then the figures say why)."""
        cfg = self.config
        if cfg.robust_rule == "none":
            return None, {}
        if plan is None:
            return None, {"robust_rule": cfg.robust_rule,
                          "robust_rule_skipped": "not every update of the round is buffered (a gateway's "
                                                 "partial, or a round resumed from an older state)"}
        # FedBuff's staleness damping is on the update (rows d_i), as in the weighted mean (_round_mean)
        scales = [s * e.update_factor for s, e in zip(plan.scales, self._state.buffer, strict=True)]
        got = robust_aggregate(self._state.buffer, weights=plan.weights, scales=scales, steps=plan.steps,
                               included=plan.included, n_params=cfg.n_params, rule=cfg.robust_rule,
                               trim_fraction=cfg.trim_fraction, krum_byzantine=cfg.krum_byzantine,
                               krum_select=cfg.krum_select)
        if got is None:
            log.warning("round %d: %d updates x %d parameters is too much to decode at once; the weighted "
                        "mean replaces %s", self._state.round, len(plan.weights), cfg.n_params,
                        cfg.robust_rule)
            return None, {"robust_rule": cfg.robust_rule, "robust_rule_skipped": "too many updates"}
        vec, info = got
        if tau_eff != 1.0:
            vec *= np.float32(tau_eff)
        return vec, info

    def close_round(self, now: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Apply the close-time bounds and the server optimiser to the round's weighted mean, open the
        next round, persist.

        Returns ``(new_global, metrics)``; metrics: round, participants, num_updates, total_weight,
        bytes_in, duration_s, update_norm, late_accepted, clipped (fixed and adaptive bound), the weighted
        mean of every client metric (loss, accuracy, train_seconds, ...; final weights), server_optimizer,
        and the close-time bounds: adaptive (whether they ran), norm_median, norm_cap, samples_median,
        samples_cap, adaptive_clipped, excluded, weight_capped.
        """
        if self._acc.count == 0:
            raise InvalidValueError("cannot close a round without accepted updates")
        now = time.time() if now is None else now
        st = self._state
        plan = self._plan()
        mean, total_weight, tau_eff = self._round_mean(plan)
        robust_mean, robust_stats = self._robust_mean(plan, tau_eff)
        if robust_mean is not None:
            mean = robust_mean
        rank_stats: dict[str, Any] = {}
        if self.config.rank_aggregation in ADAPTER_RULES and self._cut_weights():  # a round mixing ranks
            mean, rank_stats = self._combine_adapters(plan, mean)
        dp_stats: dict[str, Any] = {}
        dp_ledger = st.privacy
        if self.config.privacy.enabled:  # central/privacy.py: clip + noise (central), accounting (both)
            mean, dp_stats, dp_ledger = private_round(
                self.config.privacy, st.privacy, entries=st.buffer, mean=mean, count=self._acc.count,
                quorum=self.config.buffer_k if self.config.fedbuff else self.config.quorum,  # next step's
                n_params=self.config.n_params)
        before = self._optimizer.state_arrays()
        new_global = self._optimizer.step(st.global_vec, mean)
        if not kernels.all_finite(new_global):
            self._optimizer.load_state_arrays(before)
            raise InvalidValueError("server optimizer produced NaN/Inf; round left open")
        stats = st.stats
        metrics: dict[str, Any] = {
            "round": st.round,
            "participants": list(stats["participants"]),
            "num_updates": self._acc.count,
            "total_weight": total_weight,
            "bytes_in": stats["bytes_in"],
            "duration_s": max(0.0, now - st.round_started_at),
            "update_norm": float(kernels.l2_norm(mean)),
            "late_accepted": stats["late_accepted"],
            "clipped": stats["clipped"] + (plan.clipped if plan is not None else 0),
            "server_optimizer": self._optimizer.name,
            "adaptive": plan is not None,
        }
        if self.config.aggregation == "fednova":
            metrics.update(aggregation="fednova", effective_steps=tau_eff)
        metrics.update(robust_stats)
        metrics.update(dp_stats)
        metrics.update(rank_stats)
        if CUT_WEIGHTS in stats:  # the weight of the sites below the LoRA rank, per rank
            metrics[CUT_WEIGHTS] = dict(stats[CUT_WEIGHTS])
        if self.config.fedbuff:
            taus = [int(t) for t in stats.get("staleness", [])]
            metrics.update(round_mode="fedbuff", staleness=taus, staleness_max=max(taus, default=0),
                           staleness_mean=sum(taus) / len(taus) if taus else 0.0)
        if plan is not None:
            metrics.update(plan.stats())
            # a liar's claimed samples must not dominate the reported loss/accuracy either
            metrics.update(weighted_metrics(st.buffer, plan.weights, plan.included))
            for key, count in (("clipped", plan.clipped), ("excluded", plan.excluded),
                               ("weight_capped", plan.weight_capped)):
                if count:
                    self._count(key, count)
        else:
            for name, wsum in stats["metric_wsum"].items():
                metrics[name] = wsum / stats["metric_w"][name]
        metrics.pop(RANK_METRIC, None)  # only cut sites send it: its mean says nothing; the weights above do
        metrics.update(stats.get("secure", {}))  # a secure aggregation's session, survivors, dropped
        st.global_vec = new_global
        st.privacy = dp_ledger
        self._open_next_round(now, metrics)
        self._count("rounds_closed")
        self.checkpoint()  # always, whatever autosave: a closed round must never be re-closed after a crash
        return new_global.copy(), metrics

    def _open_next_round(self, now: float, metrics: dict[str, Any]) -> None:
        """The open round's record goes to the history and round + 1 opens empty (the caller persists)."""
        st = self._state
        st.round += 1
        self._acc.reset()
        st.acc_total_weight, st.acc_count, st.acc_steps_weight = 0.0, 0, 0.0
        st.buffer = []
        self._buffer_nbytes = 0
        st.stats = new_round_stats()
        st.round_started_at = now
        keep_from = st.round - self.config.max_staleness - 1
        st.accepted = {k: at for k, at in st.accepted.items() if k[1] >= keep_from}
        st.history.append(metrics)
        del st.history[:-HISTORY_KEEP]
        self._store_optimizer()

    def checkpoint(self) -> None:
        """Persist the state now (no-op without ``state_dir``). On failure the in-memory state is
        rolled back to the last persisted one, so memory never runs ahead of disk, and
        :class:`StateError` is raised (the caller must then NOT acknowledge the message)."""
        self._ensure_usable()
        if self.state_dir is None:
            return
        try:
            self._state.save(self.state_dir)
        except OSError as exc:
            self._reload()
            # A FedPeftError, so a service loop can tell "not persisted: do not acknowledge" apart.
            raise StateError(f"could not persist round state in {self.state_dir}: {exc}") from exc
        except BaseException:
            self._reload()
            raise

    def _reload(self) -> None:
        assert self.state_dir is not None
        loaded = RoundState.load(self.state_dir)
        if loaded is None:
            raise StateError("state vanished from disk")
        self._state = loaded
        self._optimizer = self._restore_optimizer(loaded)
        self._acc.sum = loaded.acc_sum
        self._acc.total_weight, self._acc.count = loaded.acc_total_weight, loaded.acc_count
        self._acc.steps_weight = loaded.acc_steps_weight
        self._buffer_nbytes = loaded.buffer_nbytes

    def _store_optimizer(self) -> None:
        self._state.optimizer_state = self._optimizer.state_arrays()

    def _restore_optimizer(self, st: RoundState) -> ServerOptimizer:
        opt = make_server_optimizer(self.config.server_optimizer, self.config.n_params,
                                    **self.config.server_opt_params)
        try:
            opt.load_state_arrays(st.optimizer_state)
        except (KeyError, InvalidValueError) as exc:
            raise StateError(f"server optimizer state unusable: {exc}") from exc
        return opt

    def global_message(self, extra_meta: dict[str, Any] | None = None) -> GlobalMessage:
        """The retained ``global`` message for the open round (downlink codec ``config.global_mode``).

        ``meta``: ``final`` (no more rounds: sites stop), ``max_rounds`` (0 = unbounded),
        ``server_optimizer``, and ``participants``/``loss``/``accuracy`` of the round that produced this
        global (absent for round 0); ``extra_meta`` is merged on top.
        """
        meta: dict[str, Any] = {"final": self.finished, "max_rounds": int(self.config.max_rounds or 0),
                                "server_optimizer": self._optimizer.name}
        if self._state.history:
            last = self._state.history[-1]
            meta["participants"] = len(last["participants"])
            for key in ("loss", "accuracy"):
                if key in last and math.isfinite(last[key]):
                    meta[key] = float(last[key])
            if "secagg_session" in last:  # a secure round: sites learn whether their masked input counted
                meta["secagg_session"] = str(last["secagg_session"])
        meta.update(extra_meta or {})
        vec = encode_global(self._state.global_vec, self.config.global_mode)
        return GlobalMessage(self.config.fleet, self._state.round, self.config.spec_hash, vec, meta)

    def summary(self) -> dict[str, Any]:
        """Small JSON-able snapshot for logs and status pages."""
        return {"round": self.round, "accepted_this_round": self._acc.count, "finished": self.finished,
                "buffer_nbytes": self._buffer_nbytes,
                "participants": self.participants, "counters": self.counters,
                "config": {k: v for k, v in asdict(self.config).items() if k != "server_opt_params"}}


__all__ = ["AggregatorConfig", "AggregatorCore", "RoundPolicy"]
