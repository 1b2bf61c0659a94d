"""Which rank slot every coordinate of a LoRA adapter's flat vector belongs to: live mixed ranks.

A fleet trains one gradient model of LoRA rank ``R`` (the bundle's). A site of rank ``r < R`` (``[agent]
lora_rank``) trains only the first ``r`` rank slots of it — columns ``0..r-1`` of every ``A``, rows of every
``B`` — and holds the others at zero. Slots whose A and B are both zero get an exactly zero gradient
(each factor's gradient is the other factor times the upstream gradient), and the site also freezes them,
so its update is zero there and it sends only the coordinates of its ``r`` slots: the update is a
``size(r)``-long sub-vector of the rank-``R`` vector, in the same order (:meth:`RankSlots.indices`).

One graph for every rank keeps the bundle, the trainer and the wire as they are; what a smaller rank
saves is uplink bytes and the site's share of the optimiser's work, not graph compute (the LoRA branch is
a small part of a frozen encoder's forward and backward: bench/RESULTS.md §10 measured a gradient model
built for rank 2 or 4 within 4 % of the rank-8 one, which is noise). Its branch
scale is the bundle's ``alpha/R`` at every rank, so no rescaling is needed between ranks (the in-process
study, ``central/hetero_rank.py``, builds one graph per rank and rescales instead).

The aggregator (``central/core_ranks.py``) scatters a rank-``r`` update back into rank ``R`` and averages
each slot over the sites whose rank covers it, or combines the sites' own adapters as HetLoRA or FlexLoRA
do; both sides read the slot map from the same :class:`FlatLayout`.

Naming (peft/surgery.py): the factors of weight ``W`` are ``W.lora_A`` and ``W.lora_B``. MatMul/Gemm
sites: ``A`` is ``(d_in, r)``, ``B`` is ``(r, d_out)``; 1×1 Conv sites: ``A`` is ``(r, c_in, 1, 1)``, ``B``
is ``(c_out, r, 1, 1)``. Every other tensor (a head, biases) has slot ``-1``: every site trains it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np

from fedpeft_edge.peft.layout import FlatLayout, ParamSlot
from fedpeft_edge.runtime.errors import InvalidValueError

A_SUFFIX: Final = ".lora_A"
B_SUFFIX: Final = ".lora_B"
NOT_LORA: Final = -1
# The update metric that tells the aggregator a site's rank (absent: the bundle's rank R)
RANK_METRIC: Final = "lora_rank"


def _rank_axes(a: ParamSlot, b: ParamSlot) -> tuple[int, int]:
    """The rank axis of A and of B (conv factors are 4-D), checked against each other."""
    if len(a.shape) == 4 and len(b.shape) == 4:
        axes = (0, 1)
    elif len(a.shape) == 2 and len(b.shape) == 2:
        axes = (1, 0)
    else:
        raise InvalidValueError(f"LoRA factors {a.name} {a.shape} and {b.name} {b.shape} fit no known layout")
    if a.shape[axes[0]] != b.shape[axes[1]]:
        raise InvalidValueError(f"LoRA factors {a.name} {a.shape} and {b.name} {b.shape} differ in rank")
    return axes


@dataclass(frozen=True)
class RankSlots:
    """The rank slot of every flat coordinate (``NOT_LORA`` outside LoRA factors) and the rank ``R``."""

    max_rank: int
    slot_of: np.ndarray = field(repr=False)  # int32, one per coordinate of the rank-R vector
    pairs: tuple[tuple[ParamSlot, ParamSlot, int, int], ...] = field(repr=False)  # (A, B, A axis, B axis)

    @classmethod
    def from_layout(cls, layout: FlatLayout) -> RankSlots | None:
        """The slot map of ``layout``; None when it holds no LoRA factors (nothing to cut)."""
        by_name = {s.name: s for s in layout.slots}
        slot_of = np.full(layout.total, NOT_LORA, dtype=np.int32)
        pairs, ranks = [], set()
        for a in layout.slots:
            if not a.name.endswith(A_SUFFIX):
                continue
            b = by_name.get(a.name[: -len(A_SUFFIX)] + B_SUFFIX)
            if b is None:
                raise InvalidValueError(f"LoRA factor {a.name} has no {B_SUFFIX} partner in the layout")
            a_axis, b_axis = _rank_axes(a, b)
            ranks.add(a.shape[a_axis])
            for s, axis in ((a, a_axis), (b, b_axis)):
                shape = [1] * len(s.shape)
                shape[axis] = s.shape[axis]
                idx = np.broadcast_to(np.arange(s.shape[axis], dtype=np.int32).reshape(shape), s.shape)
                slot_of[s.offset : s.offset + s.size] = idx.reshape(-1)
            pairs.append((a, b, a_axis, b_axis))
        if not pairs:
            return None
        if len(ranks) != 1:
            raise InvalidValueError(f"the adapter's LoRA factors have different ranks {sorted(ranks)}")
        return cls(max_rank=int(ranks.pop()), slot_of=slot_of, pairs=tuple(pairs))

    @property
    def n_params(self) -> int:
        return int(self.slot_of.size)

    def check(self, rank: object) -> int:
        """``rank`` as an int in ``1..R`` (a clear error otherwise)."""
        whole = not isinstance(rank, bool) and isinstance(rank, int | np.integer)
        if not whole or not 1 <= int(rank) <= self.max_rank:  # type: ignore[call-overload]
            raise InvalidValueError(f"LoRA rank must be an integer from 1 to the bundle's rank "
                                    f"{self.max_rank}, got {rank!r}")
        return int(rank)

    def keep(self, rank: int) -> np.ndarray:
        """Bool mask of the coordinates a rank-``rank`` site trains (its slots, and every non-LoRA tensor)."""
        return self.slot_of < self.check(rank)

    def indices(self, rank: int) -> np.ndarray:
        """Positions in the rank-``R`` vector of a rank-``rank`` update's values, in order."""
        return np.flatnonzero(self.keep(rank))

    def size(self, rank: int) -> int:
        return int(np.count_nonzero(self.keep(rank)))

    def segments(self, rank: int, layout: FlatLayout) -> tuple[tuple[int, int], ...]:
        """(offset, size) of every tensor inside the rank-``rank`` sub-vector (per-tensor top-k)."""
        keep = self.keep(rank)
        out, off = [], 0
        for s in layout.slots:
            n = int(np.count_nonzero(keep[s.offset : s.offset + s.size]))
            out.append((off, n))
            off += n
        return tuple(out)

    def coverage(self, cut_weights: dict[int, float], total_weight: float) -> np.ndarray:
        """Per coordinate, the weight of the sites that trained it: ``total_weight`` less the weight of
        every cut update (rank ``r``, weight ``cut_weights[r]``) whose rank does not reach the slot."""
        cov = np.full(self.n_params, float(total_weight), dtype=np.float64)
        for rank, weight in cut_weights.items():
            cov[self.slot_of >= self.check(rank)] -= float(weight)
        return cov

    def slotwise_factor(self, cut_weights: dict[int, float], total_weight: float) -> np.ndarray | None:
        """``total_weight / coverage`` per coordinate (0 where no site trained it): multiplying the plain
        weighted mean by it averages each slot over the sites that cover it. None when nothing was cut."""
        cut = {r: w for r, w in cut_weights.items() if w > 0 and r < self.max_rank}
        if not cut:
            return None
        cov = self.coverage(cut, total_weight)
        # float error can leave a tiny positive remainder where every site was cut: treat it as nobody
        covered = cov > 1e-9 * max(float(total_weight), 1e-300)
        out = np.zeros(self.n_params, dtype=np.float32)
        out[covered] = (float(total_weight) / cov[covered]).astype(np.float32)
        return out


__all__ = ["NOT_LORA", "RANK_METRIC", "RankSlots"]
