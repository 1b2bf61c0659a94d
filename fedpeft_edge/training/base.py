"""The one small interface between federation code and a training backend.

The federation layer (agent, experiment runner) only ever sees a :class:`LocalTrainer`: trainable
parameters as one flat float32 vector, local training over the site's own data, evaluation, and a small
state file for resume. ORT Training is one implementation; another backend can replace it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

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

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views (no copies) of ``flat`` per tensor."""
        if flat.shape != (self.total,):
            raise ValueError(f"flat vector has shape {flat.shape}, layout needs ({self.total},)")
        return {s.name: flat[s.offset : s.offset + s.size].reshape(s.shape) for s in self.slots}


@dataclass
class TrainMetrics:
    loss: float
    samples: int
    steps: int
    seconds: float
    accuracy: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalMetrics:
    loss: float
    accuracy: float
    samples: int


@runtime_checkable
class LocalTrainer(Protocol):
    """What a site's training backend offers the federation layer."""

    @property
    def layout(self) -> FlatLayout: ...

    def get_flat(self) -> np.ndarray:
        """A fresh float32 copy of the trainable parameters."""
        ...

    def set_flat(self, flat: np.ndarray) -> None:
        """Load trainable parameters from a float32 vector of ``layout.total`` elements."""
        ...

    def train(self, batches: Iterable[Mapping[str, np.ndarray]], *, max_steps: int | None = None
              ) -> TrainMetrics: ...

    def evaluate(self, batches: Iterable[Mapping[str, np.ndarray]]) -> EvalMetrics: ...

    def save_state(self, path: Path) -> None:
        """Adapter + optimizer state, small, for resume after a restart."""
        ...

    def load_state(self, path: Path) -> None: ...
