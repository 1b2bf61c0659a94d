"""Personalisation in the running agent, FedPer style: some trainable tensors stay on the site.

FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated Learning") is
the same split trained in two phases per round (``[agent] fedrep_head_steps``, :func:`train_fedrep`): the
private head first, alone, on the frozen shared body; then the shared body alone under the site's new
head. The body's update then never carries the head's adjustment to the site's label mix.

``[agent] private_tensors = ["head.*"]`` (shell-style patterns over the adapter's tensor names, e.g.
``head.weight``, ``head.bias`` or a LoRA layer's ``A``/``B``) marks the tensors a site keeps for itself:
each round it trains from the global adapter with its own values of those tensors put back, sends a delta
that is zero there (so they never leave the site and cost no bytes under top-k), and keeps what it
trained for the next round. The shared part is averaged across the fleet; the private part fits the
site's own data (its label mix, its machines). The site's exported inference model uses its private values.

The private values live in ``<state_dir>/private.npz`` (written atomically after every round; a damaged or
mismatched file is set aside and the site starts again from the global's values, with a warning).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import numpy as np

from fedpeft_edge.peft.layout import FlatLayout
from fedpeft_edge.runtime.durable import atomic_write_bytes, move_aside, npz_bytes, read_npz
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.training.base import LocalTrainer, TrainMetrics

log = logging.getLogger(__name__)

PRIVATE_FILE: Final = "private.npz"
Batch = Mapping[str, np.ndarray]


class PrivateParts:
    def __init__(self, layout: FlatLayout, patterns: list[str], state_dir: str | Path) -> None:
        self.patterns = list(patterns)
        names = [s.name for s in layout.slots]
        self.names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.patterns)]
        unmatched = [p for p in self.patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise InvalidValueError(
                f"[agent] private_tensors {unmatched} match no tensor of the adapter; "
                f"its tensors: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
            )
        if self.names and len(self.names) == len(names):
            raise InvalidValueError(
                "[agent] private_tensors keeps every tensor private: nothing would be shared"
            )
        self.mask = np.zeros(layout.total, dtype=bool)
        for s in layout.slots:
            if s.name in self.names:
                self.mask[s.offset : s.offset + s.size] = True
        self.path = Path(state_dir) / PRIVATE_FILE
        self.values: np.ndarray | None = None  # None: not trained yet, the global's values serve
        if self.active:
            self._load()

    @property
    def active(self) -> bool:
        return bool(self.names)

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            vals = read_npz(self.path, max_bytes=4 * int(self.mask.sum()) + (1 << 16))["values"]
            if (
                vals.dtype != np.float32
                or vals.shape != (int(self.mask.sum()),)
                or not np.isfinite(vals).all()
            ):
                raise ValueError(f"values are {vals.dtype}{vals.shape}")
            self.values = vals
        except (OSError, KeyError, ValueError) as exc:
            moved = move_aside(self.path, tag="corrupt")
            log.warning(
                "%s unusable (%s), set aside as %s: the private tensors start from the global's values",
                self.path,
                exc,
                moved,
            )

    def start_from(self, global_vec: np.ndarray) -> np.ndarray:
        """The vector this site trains from: the global, with its own private values put back."""
        if not self.active or self.values is None:
            return global_vec
        out = np.array(global_vec, dtype=np.float32, copy=True)
        out[self.mask] = self.values
        return out

    def shared_delta(self, delta: np.ndarray) -> np.ndarray:
        """The delta with the private tensors zeroed: what leaves the site."""
        if not self.active:
            return delta
        out = np.array(delta, dtype=np.float32, copy=True)
        out[self.mask] = 0.0
        return out

    def keep(self, trained: np.ndarray) -> None:
        """Remember (durably) the private values this round trained."""
        if not self.active:
            return
        self.values = np.ascontiguousarray(trained[self.mask], dtype=np.float32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, npz_bytes({"values": self.values}))

    def forget(self) -> None:
        """A new federation (another adapter run): the old private values mean nothing to it."""
        self.values = None
        self.path.unlink(missing_ok=True)


def train_fedrep(trainer: LocalTrainer, private: PrivateParts, head_batches: Iterable[Batch],
                 body_batches: Iterable[Batch], *, head_steps: int, body_steps: int | None
                 ) -> tuple[TrainMetrics, TrainMetrics]:
    """FedRep's local round: ``head_steps`` steps on the private tensors with the shared ones frozen, then
    up to ``body_steps`` on the shared ones with the private ones frozen. Returns both phases' metrics."""
    set_frozen = getattr(trainer, "set_frozen", None)
    if set_frozen is None:
        raise InvalidValueError("FedRep (fedrep_head_steps) needs a trainer that can freeze parameters "
                                "(the gradient or ort trainer)")
    if not private.active:
        raise InvalidValueError("FedRep (fedrep_head_steps) needs private_tensors: the head it trains first")
    try:
        set_frozen(~private.mask)
        head = trainer.train(head_batches, max_steps=head_steps)
        set_frozen(private.mask)
        body = trainer.train(body_batches, max_steps=body_steps)
    finally:
        set_frozen(None)
    return head, body


__all__ = ["PRIVATE_FILE", "PrivateParts", "train_fedrep"]
