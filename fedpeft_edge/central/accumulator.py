"""The streaming weighted sum of one round's updates, read straight from their encoded form."""

from __future__ import annotations

import math

import numpy as np

from fedpeft_edge import kernels
from fedpeft_edge.protocol.codec import EncodedUpdate, ParsedUpdate, accumulate_into
from fedpeft_edge.runtime.errors import InvalidValueError


class RoundAccumulator:
    """``Σ w_i · update_i`` and ``Σ w_i`` for one round, through the fused kernels.

    ``accumulate(enc, weight, scale)`` adds ``weight·scale·decode(enc)`` to the sum and ``weight`` to the
    total (``scale`` is the norm-clipping factor, which shrinks the update but not its say in the mean).
    Invalid updates raise WireFormatError and leave the sum untouched.
    """

    def __init__(self, n_params: int) -> None:
        if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 1:
            raise InvalidValueError(f"n_params must be a positive int, got {n_params!r}")
        self.n_params = n_params
        self.sum = np.zeros(n_params, dtype=np.float32)
        self.total_weight = 0.0
        self.count = 0

    def accumulate(self, enc: EncodedUpdate | ParsedUpdate, weight: float, scale: float = 1.0) -> None:
        if not (math.isfinite(weight) and weight > 0 and math.isfinite(scale) and scale >= 0):
            raise InvalidValueError(f"weight must be finite > 0 and scale finite >= 0, got {weight}, {scale}")
        accumulate_into(enc, self.sum, weight * scale)
        self.total_weight += float(weight)
        self.count += 1

    def accumulate_dense(self, vec: np.ndarray, weight: float) -> None:
        """Add an already-decoded update (or a partial weighted *mean* from a lower aggregation tier)."""
        v = np.ascontiguousarray(vec, dtype=np.float32)
        if v.shape != (self.n_params,):
            raise InvalidValueError(f"vector must have shape ({self.n_params},), got {v.shape}")
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidValueError(f"weight must be finite and > 0, got {weight}")
        if not kernels.all_finite(v):
            raise InvalidValueError("vector holds NaN/Inf")
        kernels.axpy(self.sum, v, float(weight))
        self.total_weight += float(weight)
        self.count += 1

    def merge(self, other: RoundAccumulator) -> None:
        """Fold another accumulator's sum into this one (hierarchical aggregation)."""
        if other.n_params != self.n_params:
            raise InvalidValueError("accumulators differ in n_params")
        kernels.axpy(self.sum, other.sum, 1.0)
        self.total_weight += other.total_weight
        self.count += other.count

    def mean(self) -> np.ndarray:
        """The weighted mean update (a new array). Needs at least one accumulated update."""
        if self.total_weight <= 0:
            raise InvalidValueError("no updates accumulated")
        return (self.sum / np.float32(self.total_weight)).astype(np.float32, copy=False)

    def reset(self) -> None:
        self.sum.fill(0.0)
        self.total_weight = 0.0
        self.count = 0

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"sum": self.sum.copy(), "meta": np.array([self.total_weight, float(self.count)], np.float64)}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        s, meta = np.asarray(arrays["sum"]), np.asarray(arrays["meta"])
        if s.dtype != np.float32 or s.shape != (self.n_params,) or meta.shape != (2,):
            raise InvalidValueError("accumulator state has the wrong shape or dtype")
        self.sum[...] = s
        self.total_weight, self.count = float(meta[0]), int(meta[1])
