"""The site's update encoder and its state: the error-feedback residual that survives restarts.

The encoding itself is specified in :mod:`fedpeft_edge.protocol.codec`; this object is what only a site
holds: what it has not sent yet (residual) and its stochastic-rounding stream position.
"""

from __future__ import annotations

import secrets

import numpy as np

from fedpeft_edge import kernels
from fedpeft_edge.protocol.codec import MAX_PARAMS_HARD, CodecConfig, EncodedUpdate, encode_vector
from fedpeft_edge.runtime.errors import InvalidValueError


class UpdateEncoder:
    """Edge-side encoder with its error-feedback residual (one per site and adapter).

    ``encode(delta)`` does not modify ``delta``. The residual survives restarts through
    :meth:`state_arrays` / :meth:`load_state_arrays` (plain arrays; save them with ``np.savez``).
    """

    def __init__(self, config: CodecConfig, n_params: int, *, seed: int | None = None) -> None:
        if isinstance(n_params, bool) or not isinstance(n_params, int) or not 1 <= n_params < MAX_PARAMS_HARD:
            raise InvalidValueError(f"n_params must be an int in [1, 2**31), got {n_params!r}")
        self.config = config
        self.n_params = n_params
        self._residual = np.zeros(n_params, dtype=np.float32)
        self._seed = secrets.randbits(63) if seed is None else int(seed) & (2**63 - 1)
        self._messages = 0  # stochastic-rounding stream position; advances per encode

    @property
    def residual(self) -> np.ndarray:
        """Read-only view of the error-feedback residual (float32[n])."""
        view = self._residual.view()
        view.flags.writeable = False
        return view

    def reset_residual(self) -> None:
        self._residual.fill(0.0)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {
            "residual": self._residual.copy(),
            "rng": np.array([self._seed, self._messages], dtype=np.uint64),
        }

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        res = np.asarray(arrays["residual"])
        if res.dtype != np.float32 or res.shape != (self.n_params,):
            raise InvalidValueError(f"residual must be float32[{self.n_params}], got {res.dtype}{res.shape}")
        if not kernels.all_finite(np.ascontiguousarray(res)):
            raise InvalidValueError("residual holds NaN/Inf")
        rng = np.asarray(arrays["rng"])
        if rng.shape != (2,):
            raise InvalidValueError("rng state must hold 2 integers")
        self._residual[...] = res
        self._seed, self._messages = int(rng[0]), int(rng[1])

    def _stochastic_seed(self) -> int | None:
        if not self.config.stochastic_rounding:
            return None
        self._messages += 1
        # Distinct stream per message; the counter keeps element positions from repeating draws.
        return (self._seed + self._messages * 0x9E3779B97F4A7C15) & (2**64 - 1)

    def encode(self, delta: np.ndarray) -> EncodedUpdate:
        u = np.ascontiguousarray(delta, dtype=np.float32)
        if u.shape != (self.n_params,):
            raise InvalidValueError(f"delta must have shape ({self.n_params},), got {u.shape}")
        residual = self._residual if self.config.error_feedback and self.config.mode != "fp32" else None
        enc, new_residual = encode_vector(u, self.config, residual=residual,
                                          stochastic_seed=self._stochastic_seed())
        if new_residual is not None:
            self._residual = new_residual
        return enc
