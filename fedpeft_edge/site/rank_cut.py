"""A site below the bundle's LoRA rank (``[agent] lora_rank``): what it trains, sends and runs.

peft/rank_slots.py explains the scheme: the site trains the first ``r`` rank slots of the fleet's rank-``R``
adapter with the others frozen at zero, sends the ``size(r)`` coordinates of its slots only, and runs (and
exports) the global cut to its rank, which is what it trained against.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.peft.rank_slots import RANK_METRIC, RankSlots
from fedpeft_edge.protocol.codec import CodecConfig, expected_payload_len
from fedpeft_edge.protocol.indices import MAX_VARINT_BYTES
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
    def for_layout(cls, layout: FlatLayout, rank: object, *, codec: CodecConfig | None = None,
                   budget_bytes: int = 0) -> RankCut | None:
        """The cut for ``[agent] lora_rank`` (None: 0 or the bundle's own rank, nothing to cut); ``"auto"``
        takes the largest rank whose update under ``codec`` fits ``budget_bytes``."""
        auto = rank == "auto"
        if not auto and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise InvalidValueError(f"agent.lora_rank must be an int >= 0 (0: the bundle's rank) or "
                                    f"\"auto\", got {rank!r}")
        if rank == 0:
            return None
        slots = RankSlots.from_layout(layout)
        if slots is None:
            raise InvalidValueError("agent.lora_rank is set but the bundle's adapter has no LoRA factors "
                                    "(a rank applies to a LoRA method only)")
        if auto:
            rank = rank_for_budget(slots, layout, codec or CodecConfig(), budget_bytes)
        assert isinstance(rank, int)
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


def payload_bound(codec: CodecConfig, segments: Sequence[tuple[int, int]]) -> int:
    """The most codec payload bytes one update of a vector of these tensors (offset, size) takes once any
    sparsity warm-up is over (top-k: the larger index coding's bound)."""
    n = sum(size for _, size in segments)
    if codec.mode in ("fp32", "int8"):
        return expected_payload_len(codec.mode, n, n, codec.block, 0)
    if codec.topk_scope == "tensor":
        k = sum(codec.k_for(size) for _, size in segments if size)
    else:
        k = codec.k_for(n)
    return expected_payload_len(codec.mode, n, k, codec.block, min(-(-n // 8), MAX_VARINT_BYTES * k))


def rank_for_budget(slots: RankSlots, layout: FlatLayout, codec: CodecConfig, budget_bytes: int) -> int:
    """The largest rank whose update fits ``budget_bytes`` (``[agent] lora_rank = "auto"``)."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise InvalidValueError("agent.lora_rank = \"auto\" needs agent.update_budget_bytes > 0: the bytes "
                                "this site's link can carry per round")
    for rank in range(slots.max_rank, 0, -1):
        need = payload_bound(codec, slots.segments(rank, layout))
        if need <= budget_bytes:
            log.info("lora_rank auto: rank %d of %d (%d payload bytes per update, budget %d)", rank,
                     slots.max_rank, need, budget_bytes)
            return rank
    raise InvalidValueError(f"agent.update_budget_bytes = {budget_bytes}: even a rank-1 update takes "
                            f"{payload_bound(codec, slots.segments(1, layout))} bytes under [codec] mode "
                            f"{codec.mode!r}; raise the budget or use a sparser codec")


__all__ = ["RANK_METRIC", "RankCut", "payload_bound", "rank_for_budget"]
