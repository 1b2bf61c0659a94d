"""The site's update encoder and its state: the error-feedback residual that survives restarts.

The encoding itself is specified in :mod:`fedpeft_edge.protocol.codec`; this object is what only a site
holds: what it has not sent yet (residual), its stochastic-rounding stream position, how many updates it
encoded (the top-k warm-up schedule counts them) and, with momentum correction, its velocity.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

from fedpeft_edge import kernels
from fedpeft_edge.protocol.codec import (
    DENSE_MODES,
    MAX_PARAMS_HARD,
    CodecConfig,
    EncodedUpdate,
    encode_vector,
    parse,
)
from fedpeft_edge.runtime.errors import InvalidValueError


class UpdateEncoder:
    """Edge-side encoder with its error-feedback residual (one per site and adapter).

    ``encode(delta)`` does not modify ``delta``. The residual survives restarts through
    :meth:`state_arrays` / :meth:`load_state_arrays` (plain arrays; save them with ``np.savez``).
    """

    def __init__(self, config: CodecConfig, n_params: int, *, seed: int | None = None,
                 segments: Sequence[tuple[int, int]] | None = None) -> None:
        if isinstance(n_params, bool) or not isinstance(n_params, int) or not 1 <= n_params < MAX_PARAMS_HARD:
            raise InvalidValueError(f"n_params must be an int in [1, 2**31), got {n_params!r}")
        self.config = config
        self.n_params = n_params
        # (offset, length) of every trainable tensor: needed by topk_scope = "tensor" (else one segment)
        self.segments = tuple((int(o), int(n)) for o, n in segments) if segments else ((0, n_params),)
        if sum(n for _, n in self.segments) != n_params:
            raise InvalidValueError(f"segments cover {sum(n for _, n in self.segments)} of {n_params} values")
        self._residual = np.zeros(n_params, dtype=np.float32)
        self._velocity = np.zeros(n_params, dtype=np.float32) if config.momentum else None
        self._seed = secrets.randbits(63) if seed is None else int(seed) & (2**63 - 1)
        self._messages = 0  # stochastic-rounding stream position; advances per encode
        self._encoded = 0  # updates encoded so far: the warm-up schedule's position

    @property
    def residual(self) -> np.ndarray:
        """Read-only view of the error-feedback residual (float32[n])."""
        view = self._residual.view()
        view.flags.writeable = False
        return view

    def reset_residual(self) -> None:
        """Forget what was not sent (a new federation): residual, velocity and the warm-up position."""
        self._residual.fill(0.0)
        if self._velocity is not None:
            self._velocity.fill(0.0)
        self._encoded = 0

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {
            "residual": self._residual.copy(),
            "rng": np.array([self._seed, self._messages], dtype=np.uint64),
            "encoded": np.array(self._encoded, dtype=np.int64),
        }
        if self._velocity is not None:
            out["velocity"] = self._velocity.copy()
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        res = np.asarray(arrays["residual"])
        if res.dtype != np.float32 or res.shape != (self.n_params,):
            raise InvalidValueError(f"residual must be float32[{self.n_params}], got {res.dtype}{res.shape}")
        if not kernels.all_finite(np.ascontiguousarray(res)):
            raise InvalidValueError("residual holds NaN/Inf")
        rng = np.asarray(arrays["rng"])
        if rng.shape != (2,):
            raise InvalidValueError("rng state must hold 2 integers")
        encoded = 0
        if "encoded" in arrays:  # absent in files written before the warm-up schedule: start it over
            e = np.asarray(arrays["encoded"])
            if e.shape != () or e.dtype.kind not in "iu" or int(e) < 0:
                raise InvalidValueError(f"encoded count is {e.dtype}{e.shape}")
            encoded = int(e)
        vel = None
        if self._velocity is not None and "velocity" in arrays:
            vel = np.asarray(arrays["velocity"])
            if vel.dtype != np.float32 or vel.shape != (self.n_params,) or not kernels.all_finite(
                    np.ascontiguousarray(vel)):
                raise InvalidValueError(f"velocity must be finite float32[{self.n_params}]")
        self._residual[...] = res
        self._seed, self._messages = int(rng[0]), int(rng[1])
        self._encoded = encoded
        if self._velocity is not None:
            self._velocity[...] = 0.0 if vel is None else vel

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
        cfg = self.config
        sparse = cfg.mode not in DENSE_MODES
        velocity = None
        if self._velocity is not None and sparse:
            # DGC momentum correction: error feedback accumulates the velocity, not the raw delta.
            velocity = self._velocity * np.float32(cfg.momentum) + u
            u = velocity
        residual = self._residual if cfg.error_feedback and cfg.mode != "fp32" else None
        segments = self.segments if sparse and cfg.topk_scope == "tensor" else None
        enc, new_residual = encode_vector(u, cfg, residual=residual, stochastic_seed=self._stochastic_seed(),
                                          ratio=cfg.ratio_at(self._encoded) if sparse else None,
                                          segments=segments)
        if new_residual is not None:
            self._residual = new_residual
        if velocity is not None:
            # momentum factor masking: what was sent leaves the velocity too
            velocity[parse(enc, n_params=self.n_params).indices] = 0.0
            self._velocity = velocity
        self._encoded += 1
        return enc
