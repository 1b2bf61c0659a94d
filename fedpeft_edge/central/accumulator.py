"""The streaming weighted sum of one round's updates, read straight from their encoded form."""

from __future__ import annotations

import math

import numpy as np

from fedpeft_edge import kernels
from fedpeft_edge.protocol.codec import EncodedUpdate, ParsedUpdate, accumulate_into
from fedpeft_edge.runtime.errors import InvalidValueError


class RoundAccumulator:
    """``Σ w_i · update_i / τ_i``, ``Σ w_i`` and ``Σ w_i · τ_i`` for one round, through the fused kernels.

    ``accumulate(enc, weight, scale, steps)`` adds ``weight·scale/steps·decode(enc)`` to the sum, ``weight``
    to the total and ``weight·steps`` to the steps total (``scale`` is the norm-clipping factor, which
    shrinks the update but not its say in the mean; ``steps`` is τ_i, the local steps FedNova normalises
    by, 1 for FedAvg). :meth:`mean` is ``Σ w_i·d_i / Σ w_i`` with ``d_i = scale_i·update_i/τ_i``, and
    :meth:`normalised_mean` multiplies it by ``τ_eff = Σ w_i·τ_i / Σ w_i`` (FedNova, Wang et al. 2020);
    with every τ_i = 1 the two are the same array, FedAvg's. Invalid updates raise WireFormatError and
    leave the sums untouched.
    """

    def __init__(self, n_params: int) -> None:
        if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 1:
            raise InvalidValueError(f"n_params must be a positive int, got {n_params!r}")
        self.n_params = n_params
        self.sum = np.zeros(n_params, dtype=np.float32)
        self.total_weight = 0.0
        self.steps_weight = 0.0  # Σ w_i·τ_i (equals total_weight while every τ_i is 1)
        self.count = 0

    def accumulate(self, enc: EncodedUpdate | ParsedUpdate, weight: float, scale: float = 1.0,
                   steps: float = 1.0) -> None:
        if not (math.isfinite(weight) and weight > 0 and math.isfinite(scale) and scale >= 0):
            raise InvalidValueError(f"weight must be finite > 0 and scale finite >= 0, got {weight}, {scale}")
        _check_steps(steps)
        accumulate_into(enc, self.sum, weight * scale if steps == 1.0 else weight * scale / steps)
        self.total_weight += float(weight)
        self.steps_weight += float(weight) * float(steps)
        self.count += 1

    def accumulate_dense(self, vec: np.ndarray, weight: float, steps: float = 1.0, count: int = 1) -> None:
        """Add an already-decoded update (or a partial weighted *mean* from a lower aggregation tier, or a
        secure aggregation's mean of ``count`` sites)."""
        v = np.ascontiguousarray(vec, dtype=np.float32)
        if v.shape != (self.n_params,):
            raise InvalidValueError(f"vector must have shape ({self.n_params},), got {v.shape}")
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidValueError(f"weight must be finite and > 0, got {weight}")
        if not kernels.all_finite(v):
            raise InvalidValueError("vector holds NaN/Inf")
        _check_steps(steps)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidValueError(f"count must be a positive int, got {count!r}")
        kernels.axpy(self.sum, v, float(weight) / float(steps))
        self.total_weight += float(weight)
        self.steps_weight += float(weight) * float(steps)
        self.count += count

    def accumulate_partial(self, enc: EncodedUpdate | ParsedUpdate, weight: float, steps_weight: float,
                           count: int) -> None:
        """Add a lower tier's partial: ``enc`` is its ``Σ w_i·d_i / Σ w_i`` (already clipped and
        step-normalised), ``weight`` its ``Σ w_i``, ``steps_weight`` its ``Σ w_i·τ_i``, ``count`` its
        members; afterwards the sums are as if each member had been accumulated here."""
        if not (math.isfinite(weight) and weight > 0 and math.isfinite(steps_weight) and steps_weight > 0):
            raise InvalidValueError(f"weight and steps_weight must be finite > 0, got {weight}, "
                                    f"{steps_weight}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidValueError(f"count must be a positive int, got {count!r}")
        accumulate_into(enc, self.sum, weight)
        self.total_weight += float(weight)
        self.steps_weight += float(steps_weight)
        self.count += count

    def merge(self, other: RoundAccumulator) -> None:
        """Fold another accumulator's sum into this one (hierarchical aggregation)."""
        if other.n_params != self.n_params:
            raise InvalidValueError("accumulators differ in n_params")
        kernels.axpy(self.sum, other.sum, 1.0)
        self.total_weight += other.total_weight
        self.steps_weight += other.steps_weight
        self.count += other.count

    def mean(self) -> np.ndarray:
        """The weighted mean of the (step-normalised) updates (a new array). Needs one accumulated update."""
        if self.total_weight <= 0:
            raise InvalidValueError("no updates accumulated")
        return (self.sum / np.float32(self.total_weight)).astype(np.float32, copy=False)

    @property
    def effective_steps(self) -> float:
        """``τ_eff = Σ w_i·τ_i / Σ w_i`` (1.0 while every update came with τ_i = 1, i.e. FedAvg)."""
        if self.total_weight <= 0:
            raise InvalidValueError("no updates accumulated")
        if self.steps_weight == self.total_weight:
            return 1.0
        return self.steps_weight / self.total_weight

    def normalised_mean(self) -> np.ndarray:
        """``τ_eff · Σ w_i·d_i / Σ w_i``: FedNova's aggregate; exactly :meth:`mean` when τ_eff is 1."""
        out = self.mean()
        tau = self.effective_steps
        if tau != 1.0:
            out *= np.float32(tau)
        return out

    def reset(self) -> None:
        self.sum.fill(0.0)
        self.total_weight = 0.0
        self.steps_weight = 0.0
        self.count = 0

    def state_arrays(self) -> dict[str, np.ndarray]:
        meta = np.array([self.total_weight, float(self.count), self.steps_weight], np.float64)
        return {"sum": self.sum.copy(), "meta": meta}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Also the older 2-element meta (no steps total: every τ_i was 1)."""
        s, meta = np.asarray(arrays["sum"]), np.asarray(arrays["meta"])
        if s.dtype != np.float32 or s.shape != (self.n_params,) or meta.shape not in ((2,), (3,)):
            raise InvalidValueError("accumulator state has the wrong shape or dtype")
        self.sum[...] = s
        self.total_weight, self.count = float(meta[0]), int(meta[1])
        self.steps_weight = float(meta[2]) if meta.shape == (3,) else self.total_weight


def _check_steps(steps: float) -> None:
    if isinstance(steps, bool) or not (math.isfinite(steps) and steps > 0):
        raise InvalidValueError(f"steps must be finite and > 0, got {steps!r}")
