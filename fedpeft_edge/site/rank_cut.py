"""A site below the bundle's LoRA rank (``[agent] lora_rank``): what it trains, sends and runs.

peft/rank_slots.py explains the scheme: the site trains the first ``r`` rank slots of the fleet's rank-``R``
adapter with the others frozen at zero, sends the ``size(r)`` coordinates of its slots only, and runs (and
exports) the global cut to its rank, which is what it trained against.
"""

from __future__ import annotations

import logging

import numpy as np

from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.peft.rank_slots import RANK_METRIC, RankSlots
from fedpeft_edge.runtime.errors import InvalidValueError

log = logging.getLogger(__name__)


class RankCut:
    """The rank-``rank`` view of a rank-``R`` adapter vector."""

    def __init__(self, slots: RankSlots, rank: int, layout: FlatLayout) -> None:
        self.slots = slots
        self.rank = slots.check(rank)
        self.keep = slots.keep(self.rank)
        self.indices = np.flatnonzero(self.keep)
        self.segments = slots.segments(self.rank, layout)

    @classmethod
    def for_layout(cls, layout: FlatLayout, rank: object) -> RankCut | None:
        """The cut for ``[agent] lora_rank`` (None: 0 or the bundle's own rank, nothing to cut)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise InvalidValueError(f"agent.lora_rank must be an int >= 0 (0: the bundle's rank), "
                                    f"got {rank!r}")
        if rank == 0:
            return None
        slots = RankSlots.from_layout(layout)
        if slots is None:
            raise InvalidValueError("agent.lora_rank is set but the bundle's adapter has no LoRA factors "
                                    "(a rank applies to a LoRA method only)")
        if rank == slots.max_rank:
            return None
        return cls(slots, slots.check(rank), layout)

    @property
    def size(self) -> int:
        """Values in this site's update."""
        return int(self.indices.size)

    def start_from(self, global_vec: np.ndarray) -> np.ndarray:
        """The global with the slots beyond this rank zeroed: what the site trains from and runs."""
        out = np.array(global_vec, dtype=np.float32, copy=True)
        out[~self.keep] = 0.0
        return out

    def take(self, delta: np.ndarray) -> np.ndarray:
        """The update's values on this site's slots (the coordinates it sends), in rank-``R`` order."""
        frozen_moved = float(np.abs(delta[~self.keep]).max(initial=0.0))
        if frozen_moved:  # the frozen slots are trained by nobody here: a move there is a bug, not data
            raise InvalidValueError(f"rank-{self.rank} update moved frozen rank slots "
                                    f"(max |Δ| {frozen_moved:.3g})")
        return np.ascontiguousarray(delta[self.indices], dtype=np.float32)


__all__ = ["RANK_METRIC", "RankCut"]
