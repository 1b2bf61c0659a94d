"""What the aggregator core decided about an offered update: the :class:`Decision` and its status codes.

:meth:`~fedpeft_edge.central.core.AggregatorCore.offer` returns one :class:`Decision` per update; its
``status`` is one of :data:`ACCEPTED`, :data:`DUPLICATE`, :data:`LATE`, :data:`REJECTED`, and ``reason``
a short code (e.g. :data:`BUFFER_FULL`) the service logs and acknowledges with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

BUFFER_FULL: Final = "round_buffer_full"  # rejection reason: the round buffer's byte cap is reached
MAX_WEIGHTED_NORM: Final = 1e36  # bound on Σ weight·norm per round (float32 max is 3.4e38): "overflow"

ACCEPTED: Final = "accepted"
DUPLICATE: Final = "duplicate"
LATE: Final = "late"
REJECTED: Final = "rejected"


@dataclass(frozen=True)
class Decision:
    """What happened to an offered update. ``reason`` is a short code ("" when accepted); ``weight`` is
    the provisional one (the close-time weight cap may lower it)."""

    status: str  # accepted | duplicate | late | rejected
    reason: str = ""
    weight: float = 0.0
    staleness: int = 0
    detail: str = ""  # for the log: what exactly was wrong (a rejection's values, expected vs got)

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED


__all__ = ["ACCEPTED", "BUFFER_FULL", "DUPLICATE", "LATE", "REJECTED", "Decision"]
