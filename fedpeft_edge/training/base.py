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

from fedpeft_edge.peft.layout import FlatLayout


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
