"""The aggregator core's secure-aggregation methods: closing a round on a secure session's masked sum
(central/secure_round.py drives the sessions over MQTT), exactly once, and skipping a round that could
not complete.

:class:`SecureRoundMethods` is a part of :class:`~fedpeft_edge.central.core.AggregatorCore` kept in its own
file; it works on the core's round state.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft_edge.runtime.errors import InvalidValueError

if TYPE_CHECKING:
    from fedpeft_edge.central.core import AggregatorCore


class SecureRoundMethods:
    """Secure-aggregation part of :class:`AggregatorCore` (a mixin: every attribute is the core's)."""

    def close_secure_round(self: AggregatorCore, session: str, survivors: list[str], mean: np.ndarray, *,
                           nbytes: int = 0, dropped: list[str] | None = None, now: float | None = None
                           ) -> tuple[np.ndarray, dict[str, Any]]:
        """Close the open round on a secure aggregation's result: ``mean``, the unweighted mean of the
        ``survivors``' updates, is all the aggregator learns. Exactly once: the session's key, the
        survivors' (site, round) pairs and the round's advance land in one atomic write (close_round's)."""
        cfg, st = self.config, self._state
        if not cfg.secure:
            raise InvalidValueError("close_secure_round needs a secure-aggregation config ([secagg] enabled)")
        if self._acc.count:
            raise InvalidValueError("a secure round holds no individual updates")
        key = (f"secagg#{session}", st.round)  # '#' is in no valid site name: no collision
        if key in st.accepted or not survivors:
            raise InvalidValueError(f"secure session {session} already counted, or no survivors")
        counted = [s for s in survivors if (s, st.round) in st.accepted]
        if counted:
            raise InvalidValueError(f"sites {counted[:5]} already counted in round {st.round}")
        now = time.time() if now is None else now
        with self._all_or_poisoned():
            self._acc.accumulate_dense(mean, float(len(survivors)), count=len(survivors))
            st.acc_total_weight, st.acc_count = self._acc.total_weight, self._acc.count
            st.acc_steps_weight = self._acc.steps_weight
            for site in survivors:
                entry = self._ledger(site)
                if entry is not None:
                    entry["rounds"] += 1
                    entry["last_round"], entry["last_at"] = st.round, now
                st.accepted[(site, st.round)] = st.round
            st.accepted[key] = st.round
            st.stats["participants"].extend(survivors)
            st.stats["bytes_in"] += int(nbytes)
            st.stats["secure"] = {"secagg_session": session, "secagg_dropped": sorted(dropped or [])}
            self._count("accepted", len(survivors))
            self._count("bytes_in", int(nbytes))
        return self.close_round(now)

    def skip_round(self: AggregatorCore, reason: str, now: float | None = None) -> dict[str, Any]:
        """Open the next round with the global unchanged (a secure round that could not complete: too few
        sites left to mask for each other). Persists; returns the skipped round's record."""
        if self._acc.count:
            raise InvalidValueError("skip_round: the round holds accepted updates; close it instead")
        now = time.time() if now is None else now
        st = self._state
        record: dict[str, Any] = {"round": st.round, "participants": [], "num_updates": 0,
                                  "total_weight": 0.0, "bytes_in": st.stats["bytes_in"],
                                  "duration_s": max(0.0, now - st.round_started_at), "skipped": reason,
                                  "server_optimizer": self._optimizer.name, "adaptive": False}
        self._open_next_round(now, record)
        self._count("rounds_skipped")
        self.checkpoint()
        return record
