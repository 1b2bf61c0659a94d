"""The aggregator core's gateway-tier methods (protocol/partial.py; the gateway side is
fedpeft_edge/gateway/): counting a gateway's partial aggregate as its members, exactly once, and the
calls a gateway's own core makes to seal, reset and follow the upper tier.

:class:`GatewayTierMethods` is a part of :class:`~fedpeft_edge.central.core.AggregatorCore` kept in its own
file; it works on the core's round state and shares its exception contract (core.py's docstring).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np

from fedpeft_edge import kernels
from fedpeft_edge.central.accumulator import RoundAccumulator
from fedpeft_edge.central.decision import ACCEPTED, DUPLICATE, LATE, MAX_WEIGHTED_NORM, Decision
from fedpeft_edge.central.robust import MAX_CLAIMED_STEPS, BufferedUpdate, weighted_metrics
from fedpeft_edge.central.store import new_round_stats
from fedpeft_edge.central.strategy import staleness_weight
from fedpeft_edge.protocol.codec import parse, update_l2_norm
from fedpeft_edge.protocol.partial import PartialMessage
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.runtime.errors import InvalidValueError

if TYPE_CHECKING:
    from fedpeft_edge.central.core import AggregatorCore


class GatewayTierMethods:
    """Gateway-tier part of :class:`AggregatorCore` (a mixin: every attribute is the core's)."""

    def offer_partial(self: AggregatorCore, msg: PartialMessage, *, sender: str | None = None,
                      nbytes: int | None = None, now: float | None = None) -> Decision:
        """Count a gateway's partial aggregate as the members it holds, exactly once per ``(gateway, seq)``,
        and never a member ``(site, round)`` already counted here (directly or through another partial).

        The gateway held the members' individual updates and applied the close-time bounds to them; here a
        partial is bounded as a whole: only listed gateway accounts, weight at most its members' capped
        samples, finite. A round that counted a partial closes on the running sum (the per-update bounds
        need every update, ``adaptive: false``). Same exception contract as :meth:`offer`.
        """
        cfg, st = self.config, self._state
        now = time.time() if now is None else now
        who, size = (sender if sender is not None else msg.gateway), nbytes or 0
        if self.finished:
            return self.note_rejected("finished", size, f"all {cfg.max_rounds} rounds are done", who)
        if sender is not None and sender != msg.gateway:
            return self.note_rejected("client_mismatch", size,
                                      f"partial of {msg.gateway!r} sent on {sender!r}'s topic", who)
        if msg.gateway not in cfg.gateways:
            return self.note_rejected("not_a_gateway", size, f"{msg.gateway!r} is not one of the "
                                      f"federation's gateways {list(cfg.gateways)}", who)
        if msg.fleet != cfg.fleet:
            return self.note_rejected("wrong_fleet", size, f"fleet {msg.fleet!r}, expected {cfg.fleet!r}",
                                      who)
        if msg.spec_hash != cfg.spec_hash:
            return self.note_rejected("spec_hash", size,
                                      f"spec hash {msg.spec_hash}, expected {cfg.spec_hash}", who)
        if msg.round > st.round:
            return self.note_rejected("future_round", size, f"round {msg.round}, open round {st.round}", who)
        key = (f"{msg.gateway}#{msg.seq}", msg.round)  # '#' is in no valid site name: no collision
        if key in st.accepted:
            self._count("duplicate")
            return Decision(DUPLICATE, "already counted")
        staleness = st.round - msg.round
        if staleness > 0 and (cfg.late_policy == "drop" or staleness > cfg.max_staleness):
            self._count("late")
            return Decision(LATE, f"{staleness} round(s) behind", staleness=staleness)
        if cfg.sites is not None:
            unknown = sorted({m.site for m in msg.members} - set(cfg.sites))
            if unknown:
                return self.note_rejected("unknown_site", size, f"members {unknown[:5]} are not sites", who)
        overlap = [f"{m.site}@{m.round}" for m in msg.members if (m.site, m.round) in st.accepted]
        if overlap:
            return self.note_rejected("overlap", size, f"{len(overlap)} member(s) already counted, e.g. "
                                      f"{overlap[:3]}", who)
        cap = (sum(min(m.samples, cfg.max_samples_weight) for m in msg.members) if cfg.weighting == "samples"
               else len(msg.members))
        if msg.total_weight > cap * (1 + 1e-6):
            return self.note_rejected("bad_weight", size, f"weight {msg.total_weight:.6g} > its members' "
                                      f"{cap}", who)
        steps_weight = msg.total_weight  # FedAvg: every τ_i is 1, whatever the gateway says
        if cfg.aggregation == "fednova":
            steps_weight = msg.steps_weight
            if not msg.total_weight * (1 - 1e-6) <= steps_weight <= msg.total_weight * MAX_CLAIMED_STEPS:
                return self.note_rejected("bad_steps", size, f"steps weight {steps_weight:.6g} for weight "
                                          f"{msg.total_weight:.6g}", who)
        try:
            parsed = parse(msg.vector, n_params=cfg.n_params)
            norm = update_l2_norm(parsed)
        except WireFormatError as exc:
            return self.note_rejected(exc.reason, size, str(exc), who)
        stale_factor = staleness_weight(staleness, cfg.staleness_alpha) if staleness else 1.0
        weight = msg.total_weight * stale_factor
        mass = weight * norm
        if not math.isfinite(mass) or st.stats.get("weighted_norm_sum", 0.0) + mass > MAX_WEIGHTED_NORM:
            return self.note_rejected("overflow", size, f"weight x norm {mass:.4g} would overflow the sum",
                                      who)
        with self._all_or_poisoned():
            for m in msg.members:
                entry = self._ledger(m.site)
                if entry is not None:
                    entry["samples"] += m.samples
                    entry["rounds"] += 1
                    entry["last_round"], entry["last_at"] = m.round, now
                st.accepted[(m.site, m.round)] = st.round
            self._acc.accumulate_partial(parsed, weight, steps_weight * stale_factor, len(msg.members))
            st.acc_total_weight, st.acc_count = self._acc.total_weight, self._acc.count
            st.acc_steps_weight = self._acc.steps_weight
            st.accepted[key] = st.round
            stats = st.stats
            stats["participants"].extend(m.site for m in msg.members)
            stats["bytes_in"] += int(nbytes or msg.vector.nbytes)
            stats["weighted_norm_sum"] = stats.get("weighted_norm_sum", 0.0) + mass
            stats["partials"] = stats.get("partials", 0) + 1
            for name, val in msg.metrics.items():
                wsum = stats["metric_wsum"].get(name, 0.0) + weight * val
                if math.isfinite(wsum):
                    stats["metric_wsum"][name] = wsum
                    stats["metric_w"][name] = stats["metric_w"].get(name, 0.0) + weight
            self._count("accepted", len(msg.members))
            self._count("partials_accepted")
            self._count("bytes_in", int(nbytes or msg.vector.nbytes))
            if staleness:
                stats["late_accepted"] += len(msg.members)
                self._count("late_accepted", len(msg.members))
        if self.autosave:
            self.checkpoint()
        return Decision(ACCEPTED, "", weight, staleness)

    @property
    def sealed_batches(self: AggregatorCore) -> int:
        """How many partials this core (as a gateway's) has sealed: the next one's sequence number."""
        return int(self._state.counters.get("partials_sealed", 0))

    def open_batch_partial(self: AggregatorCore
                           ) -> tuple[np.ndarray, float, float, dict[str, float], list[BufferedUpdate]]:
        """The open batch as a gateway's partial, under the close-time bounds: ``(Σ w_i·d_i / Σ w_i, Σ w_i,
        Σ w_i·τ_i, weighted metrics, members)``. Needs a buffering policy (every member's update kept)."""
        if self._acc.count == 0:
            raise InvalidValueError("no accepted updates to seal")
        plan = self._plan()
        if plan is None:
            raise InvalidValueError("a gateway needs the round buffer (a close-time bound or FedNova on)")
        acc = self._acc
        if plan.binds(self._state.buffer):
            acc = RoundAccumulator(self.config.n_params)
            for e, w, sc, inc, t in zip(self._state.buffer, plan.weights, plan.scales, plan.included,
                                        plan.steps, strict=True):
                if inc:
                    acc.accumulate(e.update, w, sc * e.update_factor, t)
        metrics = weighted_metrics(self._state.buffer, plan.weights, plan.included)
        return acc.mean(), acc.total_weight, acc.steps_weight, metrics, list(self._state.buffer)

    def reset_batch(self: AggregatorCore, now: float | None = None) -> None:
        """Forget the open batch after it was sealed elsewhere (a gateway's outbox) and count the seal; the
        accepted pairs stay, so a resent member update is still a duplicate. Persists."""
        st = self._state
        self._acc.reset()
        st.acc_total_weight, st.acc_count, st.acc_steps_weight = 0.0, 0, 0.0
        st.buffer = []
        self._buffer_nbytes = 0
        st.stats = new_round_stats()
        st.round_started_at = time.time() if now is None else now
        self._count("partials_sealed")
        self.checkpoint()

    def adopt_global(self: AggregatorCore, rnd: int, vector: np.ndarray, now: float | None = None) -> None:
        """Follow the upper tier: round ``rnd`` with its global ``vector`` becomes the open round. The open
        batch must be empty (sealed first). Persists."""
        st = self._state
        if self._acc.count:
            raise InvalidValueError("seal the open batch before adopting a new global")
        vec = np.array(vector, dtype=np.float32, copy=True)
        if vec.shape != (self.config.n_params,) or not kernels.all_finite(vec):
            raise InvalidValueError(f"global must be finite float32[{self.config.n_params}]")
        st.global_vec, st.round = vec, int(rnd)
        st.round_started_at = time.time() if now is None else now
        keep_from = st.round - self.config.max_staleness - 1
        st.accepted = {k: at for k, at in st.accepted.items() if k[1] >= keep_from}
        self.checkpoint()
