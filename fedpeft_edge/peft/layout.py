"""The flat-vector layout of a PEFT model's trainable tensors: how named tensors map onto one float32 vector.

Both sides share it: a site's trainer reads and writes its adapter through it, and the aggregator only ever
sees the flat vector it describes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParamSlot:
    """Where one trainable tensor lives inside the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class FlatLayout:
    """Names, shapes and offsets of the trainable tensors, in flat-vector order."""

    slots: tuple[ParamSlot, ...]

    @property
    def total(self) -> int:
        return sum(s.size for s in self.slots)

    @classmethod
    def from_shapes(cls, named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> FlatLayout:
        slots, off = [], 0
        for name, shape in named_shapes:
            slot = ParamSlot(name, tuple(int(d) for d in shape), off)
            slots.append(slot)
            off += slot.size
        return cls(tuple(slots))

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """(offset, size) of every tensor, in order: the codec's per-tensor top-k works on these."""
        return tuple((s.offset, s.size) for s in self.slots)

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views (no copies) of ``flat`` per tensor."""
        if flat.shape != (self.total,):
            raise ValueError(f"flat vector has shape {flat.shape}, layout needs ({self.total},)")
        return {s.name: flat[s.offset : s.offset + s.size].reshape(s.shape) for s in self.slots}
