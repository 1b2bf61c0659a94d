"""Aggregation maths, free of transport and persistence.

Convention: a site sends ``delta = local_after_training - global_it_started_from``. The aggregator
forms the weighted mean ``Δ = Σ w_i·delta_i / Σ w_i`` (:class:`RoundAccumulator`, streaming, O(n)
memory whatever the number of sites; the close-time bounds of central/robust.py may clip or re-weight
some ``delta_i`` first) and a :class:`ServerOptimizer` turns ``(global, Δ)`` into the next global.
``-Δ`` is the "pseudo-gradient" of Reddi et al. 2021 (Adaptive Federated Optimization):

* FedAvg:  ``x ← x + η·Δ``                                   (η = 1 is plain FedAvg)
* FedAvgM: ``m ← β·m + Δ;  x ← x + η·m``                      (Hsu et al. 2019)
* FedAdam: ``m ← β1·m + (1-β1)·Δ;  v ← β2·v + (1-β2)·Δ²;  x ← x + η·m / (√v + τ)``
* FedYogi: as FedAdam with ``v ← v - (1-β2)·Δ²·sign(v - Δ²)``

(Reddi et al. use no bias correction; ``bias_correction=True`` adds Adam's, off by default.)

Late updates can still count, down-weighted by staleness ``s`` (rounds behind):
``weight = num_samples · (1 + s)^-alpha`` (polynomial staleness, as in FedAsync / FedBuff).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Final, Literal

import numpy as np

from fedpeft_edge import kernels
from fedpeft_edge.runtime import names
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.runtime.names import LATE_POLICIES, NORM_MODES

LatePolicy = Literal["drop", "stale_weighted"]  # drop late updates, or count them down-weighted


def staleness_weight(staleness: int, alpha: float) -> float:
    """Polynomial staleness discount ``(1 + staleness)^-alpha`` (1 for a fresh update)."""
    if staleness < 0:
        raise InvalidValueError(f"staleness must be >= 0, got {staleness}")
    if alpha < 0 or not math.isfinite(alpha):
        raise InvalidValueError(f"staleness alpha must be finite and >= 0, got {alpha}")
    return float((1.0 + staleness) ** (-alpha))


@dataclass(frozen=True)
class NormBound:
    """Updates with L2 norm above ``bound`` are clipped to it (``mode="clip"``) or refused (``"reject"``)."""

    bound: float
    mode: str = "clip"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise InvalidValueError(f"norm bound must be finite and > 0, got {self.bound}")
        if self.mode not in NORM_MODES:
            raise InvalidValueError(f"norm bound mode must be one of {NORM_MODES}, got {self.mode!r}")

    def scale_for(self, norm: float) -> float | None:
        """Multiplier applied to the update (1.0 if within bound), or None if it must be rejected."""
        if not math.isfinite(norm):
            return None
        if norm <= self.bound:
            return 1.0
        return None if self.mode == "reject" else self.bound / norm


# --------------------------------------------------------------------------------------------------
# Streaming weighted sum




# --------------------------------------------------------------------------------------------------
# Server optimisers


class ServerOptimizer(ABC):
    """Turns the round's weighted mean update into the next global vector.

    ``step(global_vec, mean_delta)`` returns a new float32 array and advances the optimiser state.
    ``state_arrays()`` / ``load_state_arrays()`` give plain arrays (no pickle) for RoundState.
    """

    name: ClassVar[str] = "base"

    def __init__(self, n_params: int, *, lr: float = 1.0) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise InvalidValueError(f"server lr must be finite and > 0, got {lr}")
        self.n_params = n_params
        self.lr = float(lr)
        self.steps = 0

    def params(self) -> dict[str, float]:
        return {"lr": self.lr}

    def _check(self, global_vec: np.ndarray, mean_delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(global_vec, dtype=np.float32)
        d = np.ascontiguousarray(mean_delta, dtype=np.float32)
        if x.shape != (self.n_params,) or d.shape != (self.n_params,):
            raise InvalidValueError(f"vectors must have shape ({self.n_params},), got {x.shape}, {d.shape}")
        if not kernels.all_finite(d):
            raise InvalidValueError("mean update holds NaN/Inf")
        return x, d

    @abstractmethod
    def step(self, global_vec: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        """The next global vector (a new float32 array); advances ``steps`` and the optimiser state."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"steps": np.array([self.steps], dtype=np.int64)}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.steps = int(np.asarray(arrays["steps"]).reshape(-1)[0])

    def _load_vec(self, arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
        a = np.asarray(arrays[key])
        if a.dtype != np.float32 or a.shape != (self.n_params,):
            raise InvalidValueError(f"optimizer state {key!r} must be float32[{self.n_params}]")
        return a.copy()


class FedAvg(ServerOptimizer):
    name = "fedavg"

    def step(self, global_vec: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        x, d = self._check(global_vec, mean_delta)
        out = x.copy()
        kernels.axpy(out, d, self.lr)
        self.steps += 1
        return out


class FedAvgM(ServerOptimizer):
    name = "fedavgm"

    def __init__(self, n_params: int, *, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(n_params, lr=lr)
        if not 0.0 <= momentum < 1.0:
            raise InvalidValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.m = np.zeros(n_params, dtype=np.float32)

    def params(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}

    def step(self, global_vec: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        x, d = self._check(global_vec, mean_delta)
        self.m *= np.float32(self.momentum)
        self.m += d
        out = x.copy()
        kernels.axpy(out, self.m, self.lr)
        self.steps += 1
        return out

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {**super().state_arrays(), "m": self.m.copy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        m = self._load_vec(arrays, "m")
        super().load_state_arrays(arrays)
        self.m = m


class FedAdam(ServerOptimizer):
    """Server Adam on the pseudo-gradient (Reddi et al. 2021); ``tau`` bounds the adaptivity."""

    name = "fedadam"

    def __init__(self, n_params: int, *, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, bias_correction: bool = False) -> None:
        super().__init__(n_params, lr=lr)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and math.isfinite(tau) and tau > 0):
            raise InvalidValueError(f"need 0 <= beta1, beta2 < 1 and tau > 0, got {beta1}, {beta2}, {tau}")
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)
        self.bias_correction = bool(bias_correction)
        self.m = np.zeros(n_params, dtype=np.float32)
        # Reddi et al. initialise v to tau^2 (Algorithm 2), so the first steps are not huge.
        self.v = np.full(n_params, self.tau**2, dtype=np.float32)

    def params(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau,
                "bias_correction": float(self.bias_correction)}

    def _update_v(self, d2: np.ndarray) -> None:
        self.v *= np.float32(self.beta2)
        self.v += np.float32(1.0 - self.beta2) * d2

    def step(self, global_vec: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        x, d = self._check(global_vec, mean_delta)
        self.steps += 1
        self.m *= np.float32(self.beta1)
        self.m += np.float32(1.0 - self.beta1) * d
        self._update_v(d * d)
        m_hat, v_hat = self.m, self.v
        if self.bias_correction:
            m_hat = self.m / np.float32(1.0 - self.beta1**self.steps)
            v_hat = self.v / np.float32(1.0 - self.beta2**self.steps)
        upd = m_hat / (np.sqrt(v_hat) + np.float32(self.tau))
        return (x + np.float32(self.lr) * upd).astype(np.float32, copy=False)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {**super().state_arrays(), "m": self.m.copy(), "v": self.v.copy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        m, v = self._load_vec(arrays, "m"), self._load_vec(arrays, "v")
        if float(v.min(initial=0.0)) < 0:
            raise InvalidValueError("optimizer state 'v' must be >= 0")
        super().load_state_arrays(arrays)
        self.m, self.v = m, v


class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second-moment update (Reddi et al. 2021)."""

    name = "fedyogi"

    def _update_v(self, d2: np.ndarray) -> None:
        self.v -= np.float32(1.0 - self.beta2) * d2 * np.sign(self.v - d2)


SERVER_OPTIMIZERS: Final[dict[str, type[ServerOptimizer]]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi)
}
# The names users may choose live in runtime/names.py (numpy-free, for --help); keep both in step.
assert tuple(SERVER_OPTIMIZERS) == names.SERVER_OPTIMIZERS, "runtime/names.py SERVER_OPTIMIZERS is stale"


def make_server_optimizer(name: str, n_params: int, **params: float) -> ServerOptimizer:
    """``make_server_optimizer("fedadam", n, lr=0.01, tau=1e-3)``; unknown names/params → ValueError."""
    cls = SERVER_OPTIMIZERS.get(name)
    if cls is None:
        raise InvalidValueError(f"unknown server optimizer {name!r}; choose from {sorted(SERVER_OPTIMIZERS)}")
    try:
        return cls(n_params, **params)  # type: ignore[arg-type]
    except TypeError as exc:
        raise InvalidValueError(f"bad parameters for {name}: {exc}") from exc


__all__ = [
    "LATE_POLICIES",
    "NORM_MODES",
    "SERVER_OPTIMIZERS",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "LatePolicy",
    "NormBound",
    "ServerOptimizer",
    "make_server_optimizer",
    "staleness_weight",
]
