"""The ``[privacy]`` table both sides read: client-level differential privacy, DP-FedAvg
(fedpeft_edge/central/privacy.py explains the modes, the adaptive clipping and the accounting; the site's
clipping and noise are in fedpeft_edge/site/privacy.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from fedpeft_edge.runtime.errors import InvalidValueError

PRIVACY_MODES: Final = ("off", "central", "distributed")
ACCOUNTANTS: Final = ("rdp", "pld")


def _positive(name: str, val: object, *, allow_zero: bool = False) -> None:
    ok = (
        isinstance(val, int | float)
        and not isinstance(val, bool)
        and math.isfinite(val)
        and (val >= 0 if allow_zero else val > 0)
    )
    if not ok:
        raise InvalidValueError(
            f"[privacy] {name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {val!r}"
        )


@dataclass(frozen=True)
class PrivacyPolicy:
    """The ``[privacy]`` table (module docstring)."""

    mode: str = "off"
    noise_multiplier: float = 1.0
    clip_norm: float = 0.1
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clip_count_stddev: float | None = None
    delta: float = 1e-5
    epsilon_budget: float | None = None
    sampling_rate: float = 1.0
    expected_sites: int = 1
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if self.mode not in PRIVACY_MODES:
            raise InvalidValueError(f"[privacy] mode must be one of {PRIVACY_MODES}, got {self.mode!r}")
        if self.accountant not in ACCOUNTANTS:
            raise InvalidValueError(f"[privacy] accountant must be one of {ACCOUNTANTS}")
        _positive("noise_multiplier", self.noise_multiplier, allow_zero=True)
        _positive("clip_norm", self.clip_norm)
        _positive("clip_lr", self.clip_lr, allow_zero=True)
        if not 0.0 < self.target_quantile < 1.0:
            raise InvalidValueError("[privacy] target_quantile must be in (0, 1)")
        if not 0.0 < self.delta < 1.0:
            raise InvalidValueError("[privacy] delta must be in (0, 1)")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise InvalidValueError("[privacy] sampling_rate must be in (0, 1]")
        if self.epsilon_budget is not None:
            _positive("epsilon_budget", self.epsilon_budget)
        if self.clip_count_stddev is not None:
            _positive("clip_count_stddev", self.clip_count_stddev)
        if (
            isinstance(self.expected_sites, bool)
            or not isinstance(self.expected_sites, int)
            or self.expected_sites < 1
        ):
            raise InvalidValueError("[privacy] expected_sites must be a positive int")
        if self.adaptive_clip and self.mode == "distributed":
            raise InvalidValueError(
                "[privacy] adaptive_clip needs mode = 'central' (the aggregator must see the norms)"
            )
        if self.mode != "off" and self.noise_multiplier == 0 and self.epsilon_budget is not None:
            raise InvalidValueError(
                "[privacy] noise_multiplier 0 gives no privacy: epsilon_budget cannot hold"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def site_noise_std(self, clip_norm: float | None = None) -> float:
        """Distributed mode: each site's noise, so that ``expected_sites`` of them sum to z·C."""
        c = self.clip_norm if clip_norm is None else clip_norm
        return self.noise_multiplier * c / math.sqrt(self.expected_sites)

    def count_stddev(self, m: int) -> float:
        return self.clip_count_stddev if self.clip_count_stddev is not None else max(m, 1) / 20.0

    def round_multiplier(self, m: int) -> float:
        """The effective noise multiplier of a round that counted ``m`` updates (module docstring)."""
        z = self.noise_multiplier
        if z == 0:
            return 0.0
        if self.mode == "distributed":
            return z * math.sqrt(max(m, 1) / self.expected_sites)
        if self.adaptive_clip:
            sb = self.count_stddev(m)
            inv = z**-2 - (2.0 * sb) ** -2
            if inv <= 0:
                raise InvalidValueError(
                    f"[privacy] clip_count_stddev {sb:g} is too small for noise_multiplier "
                    f"{z:g}: the count would use the whole budget (need 2σ_b > z)"
                )
            return inv**-0.5
        return z


__all__ = ["ACCOUNTANTS", "PRIVACY_MODES", "PrivacyPolicy"]
