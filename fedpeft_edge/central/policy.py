"""The aggregator's round policy: when a round closes, what counts and how much, how the global moves.

:class:`RoundPolicy` is the one dataclass of these settings: the ``[aggregator]`` TOML table and the
``aggregate`` command's flags fill it (central/config.py), and the core reads it through
:class:`AggregatorConfig`, which adds what the running fleet fixes (name, vector length, spec hash).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from fedpeft_edge.central.strategy import NormBound, staleness_weight
from fedpeft_edge.runtime import names
from fedpeft_edge.runtime.errors import InvalidValueError


def _positive_int(name: str, val: object) -> None:
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise InvalidValueError(f"{name} must be a positive int, got {val!r}")


def _multiplier(name: str, val: object) -> None:
    # >= 1 keeps the median update itself within the bound (0 = off): at most half can ever be touched
    ok = isinstance(val, int | float) and not isinstance(val, bool) and math.isfinite(val) and (
        val == 0 or val >= 1)
    if not ok:
        raise InvalidValueError(f"{name} must be 0 (off) or a finite number >= 1, got {val!r}")


@dataclass(frozen=True)
class RoundPolicy:
    """Policy knobs of one fleet's aggregator.

    A round closes as soon as ``quorum`` updates were accepted, or once ``round_deadline_s`` passed with
    at least ``min_clients``. Late updates (trained from an older global) are dropped or, with
    ``late_policy="stale_weighted"``, counted with weight ``samples·(1+staleness)^-staleness_alpha`` up
    to ``max_staleness`` rounds behind. ``norm_bound`` clips (``norm_mode="clip"``) or rejects updates
    whose L2 norm exceeds it. ``weighting`` is ``"samples"`` (FedAvg) or ``"uniform"``; a claimed
    ``num_samples`` above ``max_samples_weight`` counts as that many. ``max_rounds`` None: no end.

    Safe by default against a lying site (central/robust.py), decided when the round closes: an update
    whose norm exceeds ``norm_median_multiplier`` × the round's median update norm is clipped to that
    (left out with ``norm_mode="reject"``, and always beyond ``norm_reject_multiplier`` × the median), and
    a site's claimed samples count at most ``samples_median_multiplier`` × the round's median claim.
    0 turns each off. For that the core buffers the round's accepted updates (persisted with the round
    state), at most ``max_round_buffer_bytes`` of payload; an update beyond it is refused
    (``round_buffer_full``) and the round is ready to close.

    ``aggregation`` is how the round's accepted updates are combined before ``server_optimizer`` moves
    the global: ``"fedavg"``, their weighted mean; ``"fednova"`` (Wang et al. 2020, "Tackling the
    Objective Inconsistency Problem in Heterogeneous Federated Optimization"), each update ``Δ_i`` divided
    by its local steps ``τ_i`` (the ``steps`` metric every agent sends), ``d_i = Δ_i/τ_i``, and the
    aggregate ``τ_eff · Σ p_i·d_i / Σ p_i`` with ``τ_eff = Σ p_i·τ_i / Σ p_i`` and ``p_i`` the weight
    above (samples, staleness). Then sites that did more steps in the round (faster CPU, longer
    ``time_budget_s``) do not pull the global toward their own optimum; with equal τ it is FedAvg. The
    result is exact FedNova for local solvers that are vanilla SGD; the sites' optimizer is usually AdamW,
    whose per-step moves are not proportional to a fixed step size, so there the normalisation is a
    heuristic that corrects the first-order effect of unequal step counts, not a derived identity.
    FedNova keeps the round buffer (central/robust.py): a missing or invalid step count takes the round's
    median claim, and a claim above ``steps_median_multiplier`` × that median counts as that (0: off).
    """

    min_clients: int = 1
    quorum: int = 2
    round_deadline_s: float = 300.0
    late_policy: str = "drop"
    staleness_alpha: float = 0.5
    max_staleness: int = 4
    norm_bound: float | None = None
    norm_mode: str = "clip"
    server_optimizer: str = "fedavg"
    server_opt_params: dict[str, float] = field(default_factory=dict)  # e.g. {lr = 1.0, momentum = 0.9}
    max_rounds: int | None = 10
    weighting: str = "samples"
    max_samples_weight: int = 1_000_000
    norm_median_multiplier: float = 2.0  # clip above this × the round's median update norm; 0 = off
    norm_reject_multiplier: float = 10.0  # leave out above this × that median, even with "clip"; 0 = never
    samples_median_multiplier: float = 1.0  # count at most this × the round's median claimed samples; 0 = off
    max_round_buffer_bytes: int = 64 * 1024 * 1024  # payload bytes of one round's buffered updates
    aggregation: str = "fedavg"  # "fednova": each update normalised by its local steps (see above)
    steps_median_multiplier: float = 2.0  # fednova: count at most this × the round's median steps; 0 = off
    global_mode: str = "fp32"  # downlink codec of the global adapter (codec.encode_global)
    # The sites this federation counts. None: any account the broker lets publish an update topic — and
    # Mosquitto ACL patterns give every account, service accounts included, its own update topic.
    sites: tuple[str, ...] | None = None
    # The gateway accounts whose partial aggregates (protocol/partial.py) this federation counts; a partial
    # from any other account is rejected (not_a_gateway). Empty: no gateway tier.
    gateways: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        gws = self.gateways
        if not isinstance(gws, list | tuple) or not all(isinstance(x, str) and x for x in gws):
            raise InvalidValueError("gateways must be a list of gateway account names")
        object.__setattr__(self, "gateways", tuple(self.gateways))
        if self.sites is not None:
            if not isinstance(self.sites, list | tuple) or not self.sites or not all(
                    isinstance(x, str) and x for x in self.sites):
                raise InvalidValueError("sites must be a non-empty list of site ids (or left out)")
            object.__setattr__(self, "sites", tuple(self.sites))  # frozen: hashable, read-only
        _positive_int("min_clients", self.min_clients)
        _positive_int("quorum", self.quorum)
        _positive_int("max_samples_weight", self.max_samples_weight)
        _positive_int("max_round_buffer_bytes", self.max_round_buffer_bytes)
        _multiplier("norm_median_multiplier", self.norm_median_multiplier)
        _multiplier("samples_median_multiplier", self.samples_median_multiplier)
        _multiplier("norm_reject_multiplier", self.norm_reject_multiplier)
        _multiplier("steps_median_multiplier", self.steps_median_multiplier)
        if self.aggregation not in names.AGGREGATIONS:
            raise InvalidValueError(f"aggregation must be one of {names.AGGREGATIONS}, "
                                    f"got {self.aggregation!r}")
        if 0 < self.norm_reject_multiplier < self.norm_median_multiplier:
            raise InvalidValueError("norm_reject_multiplier must be 0 or >= norm_median_multiplier")
        if self.quorum < self.min_clients:
            raise InvalidValueError("quorum must be >= min_clients")
        if self.max_rounds is not None:
            _positive_int("max_rounds", self.max_rounds)
        if not (isinstance(self.round_deadline_s, int | float) and math.isfinite(self.round_deadline_s)
                and self.round_deadline_s > 0):
            raise InvalidValueError("round_deadline_s must be finite and > 0")
        if self.late_policy not in names.LATE_POLICIES:
            raise InvalidValueError(f"late_policy must be one of {names.LATE_POLICIES}")
        if self.norm_mode not in names.NORM_MODES:
            raise InvalidValueError(f"norm_mode must be one of {names.NORM_MODES}")
        if self.server_optimizer not in names.SERVER_OPTIMIZERS:
            raise InvalidValueError(f"server_optimizer must be one of {list(names.SERVER_OPTIMIZERS)}")
        if self.weighting not in names.WEIGHTINGS:
            raise InvalidValueError(f"weighting must be one of {names.WEIGHTINGS}")
        ms = self.max_staleness
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise InvalidValueError("max_staleness must be an int >= 0")
        if self.global_mode not in names.GLOBAL_MODES:
            raise InvalidValueError(f"global_mode must be one of {names.GLOBAL_MODES}")
        params = self.server_opt_params
        numbers = isinstance(params, dict) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in params.values())
        if not numbers:
            raise InvalidValueError("server_opt_params must map names to numbers")
        staleness_weight(0, self.staleness_alpha)  # validates alpha
        if self.norm_bound is not None:
            NormBound(self.norm_bound, self.norm_mode)

    def as_kwargs(self) -> dict[str, Any]:
        """The policy's fields by name (to build an :class:`AggregatorConfig` from it)."""
        return {f.name: getattr(self, f.name) for f in fields(RoundPolicy)}

    @property
    def buffers_updates(self) -> bool:
        """Whether a close-time bound is on (or FedNova, which decides each update's τ at close), so the
        round's updates must be kept until it closes."""
        return self.norm_median_multiplier > 0 or self.aggregation == "fednova" or (
            self.samples_median_multiplier > 0 and self.weighting == "samples")


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig(RoundPolicy):
    """A :class:`RoundPolicy` bound to one running fleet: its name, vector length and spec hash."""

    fleet: str
    n_params: int
    spec_hash: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("n_params", self.n_params)

    @classmethod
    def for_fleet(cls, policy: RoundPolicy, *, fleet: str, n_params: int, spec_hash: str) -> AggregatorConfig:
        return cls(fleet=fleet, n_params=n_params, spec_hash=spec_hash, **policy.as_kwargs())

    def fingerprint(self) -> dict[str, Any]:
        """The fields a persisted state must agree with to be resumed under this config."""
        return {"fleet": self.fleet, "n_params": self.n_params, "spec_hash": self.spec_hash,
                "server_optimizer": self.server_optimizer}


__all__ = ["AggregatorConfig", "RoundPolicy"]
