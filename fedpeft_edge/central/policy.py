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
from fedpeft_edge.protocol.privacy import PrivacyPolicy
from fedpeft_edge.runtime import names
from fedpeft_edge.runtime.errors import InvalidValueError

# rank_aggregation rules that combine the sites' own adapters at close: they read the round buffer, which
# the close-time bounds keep (on by default); with every bound off a mixed round takes the slot-wise mean
ADAPTER_RULES = ("hetlora", "flexlora")


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

    ``round_mode`` is when the server steps. ``"sync"``: rounds as above. ``"fedbuff"`` (Nguyen et al.
    2022, "Federated Learning with Buffered Asynchronous Aggregation"): the server steps as soon as
    ``buffer_k`` updates are in, whichever global each was trained from — no quorum, deadline or
    ``min_clients`` (an operator's ``close_round`` still works). An update ``τ`` steps behind counts up to
    ``max_staleness`` (``late_policy`` does not apply), with its *update* discounted by
    ``s(τ) = (1+τ)^-staleness_alpha`` (0.5, the default: the paper's ``1/sqrt(1+τ)``) and its weight in the
    mean left alone: the step is ``Σ w_i·s(τ_i)·Δ_i / Σ w_i`` (``weighting = "uniform"``: the paper's
    ``Σ s(τ_i)·Δ_i / K``), so stale updates shrink the step instead of only sharing it out; the server
    optimizer's ``lr`` is FedBuff's server learning rate. With every ``τ = 0`` a step is FedAvg of its K
    updates. A round is then one server step; ``max_rounds`` counts steps. A site counts at most once per
    global (the exactly-once key stays ``(site, round trained from)``): a site that finishes before the
    next step waits for it (site/agent.py trains again as soon as a newer global is there).
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
    # Byzantine-robust rule replacing the weighted mean at close (central/robust_rules.py): "none",
    # "median", "trimmed_mean" (drops trim_fraction of the values at each end), "multi_krum" (keeps the
    # krum_select most central updates, 0: m - krum_byzantine)
    robust_rule: str = "none"
    trim_fraction: float = 0.1
    krum_byzantine: int = 1
    krum_select: int = 0
    global_mode: str = "fp32"  # downlink codec of the global adapter (codec.encode_global)
    # The sites this federation counts. None: any account the broker lets publish an update topic — and
    # Mosquitto ACL patterns give every account, service accounts included, its own update topic.
    sites: tuple[str, ...] | None = None
    # The gateway accounts whose partial aggregates (protocol/partial.py) this federation counts; a partial
    # from any other account is rejected (not_a_gateway). Empty: no gateway tier.
    gateways: tuple[str, ...] = ()
    round_mode: str = "sync"  # "fedbuff": step every buffer_k updates, staleness-discounted (see above)
    buffer_k: int = 4  # fedbuff: updates per server step
    # How a round with sites below the bundle's LoRA rank ([agent] lora_rank, central/core_ranks.py) is
    # combined: "flexlora" re-factorises the mean product A·B by SVD (the best measured, the default:
    # docs/experiments.md), "hetlora" is HetLoRA's zero-padded mean of the sites' adapters weighted by their
    # norms, "slotwise" averages each rank slot over the sites that train it; "off" rejects such updates.
    # A round of full-rank sites only is plain FedAvg under every rule.
    rank_aggregation: str = "flexlora"

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
        _positive_int("buffer_k", self.buffer_k)
        if self.round_mode not in names.ROUND_MODES:
            raise InvalidValueError(f"round_mode must be one of {names.ROUND_MODES}, got {self.round_mode!r}")
        if self.fedbuff and self.gateways:
            raise InvalidValueError("round_mode = 'fedbuff' does not count gateways' partial aggregates "
                                    "(their members' staleness is not known here); leave gateways empty")
        _multiplier("norm_median_multiplier", self.norm_median_multiplier)
        _multiplier("samples_median_multiplier", self.samples_median_multiplier)
        _multiplier("norm_reject_multiplier", self.norm_reject_multiplier)
        _multiplier("steps_median_multiplier", self.steps_median_multiplier)
        if self.rank_aggregation not in names.RANK_AGGREGATIONS:
            raise InvalidValueError(f"rank_aggregation must be one of {names.RANK_AGGREGATIONS}, "
                                    f"got {self.rank_aggregation!r}")
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
        if self.robust_rule not in names.ROBUST_RULES:
            raise InvalidValueError(f"robust_rule must be one of {names.ROBUST_RULES}, "
                                    f"got {self.robust_rule!r}")
        tf = self.trim_fraction
        if isinstance(tf, bool) or not isinstance(tf, int | float) or not 0 <= tf < 0.5:
            raise InvalidValueError(f"trim_fraction must be in [0, 0.5), got {tf!r}")
        for name in ("krum_byzantine", "krum_select"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise InvalidValueError(f"{name} must be an int >= 0, got {val!r}")
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
    def fedbuff(self) -> bool:
        """Whether the server steps every ``buffer_k`` updates, FedBuff style (``round_mode = "fedbuff"``)."""
        return self.round_mode == "fedbuff"

    @property
    def buffers_updates(self) -> bool:
        """Whether a close-time bound is on (or FedNova, which decides each update's τ at close), so the
        round's updates must be kept until it closes."""
        weight_cap = self.samples_median_multiplier > 0 and self.weighting == "samples"
        return (self.norm_median_multiplier > 0 or self.aggregation == "fednova" or weight_cap
                or self.robust_rule != "none")


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig(RoundPolicy):
    """A :class:`RoundPolicy` bound to one running fleet: its name, vector length and spec hash."""

    fleet: str
    n_params: int
    spec_hash: str
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)  # the [privacy] table (DP-FedAvg)
    # Secure aggregation ([secagg] enabled, central/secure_round.py): rounds close on a masked sum only.
    secure: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("n_params", self.n_params)
        if self.secure:
            # The aggregator sees no individual update: nothing that reads, bounds or reweights one can run.
            clashes = [what for what, on in (
                ("aggregation = 'fednova'", self.aggregation != "fedavg"),
                ("round_mode = 'fedbuff'", self.round_mode != "sync"),
                ("gateways", bool(self.gateways)),
                ("robust_rule", self.robust_rule != "none"),
                ("norm_bound", self.norm_bound is not None),
                ("[privacy] mode = 'central' (use 'distributed': the sites add the noise)",
                 self.privacy.mode == "central")) if on]
            if clashes:
                raise InvalidValueError("[secagg] enabled cannot be combined with " + ", ".join(clashes))
        if self.privacy.enabled:
            # DP bounds each site's influence by C with equal weights; these would break that bound or
            # hide it (a gateway's partial holds many sites, a robust rule or FedNova reweights them)
            clashes = [what for what, on in (
                ("aggregation = 'fednova'", self.aggregation != "fedavg"),
                ("round_mode = 'fedbuff'", self.round_mode != "sync"),
                ("gateways", bool(self.gateways)),
                ("robust_rule", self.robust_rule != "none")) if on]
            if clashes:
                raise InvalidValueError(f"[privacy] mode = {self.privacy.mode!r} cannot be combined with "
                                        f"{', '.join(clashes)}")

    @property
    def buffers_updates(self) -> bool:
        # central DP clips every update to C at close: it needs each one's norm
        return super().buffers_updates or self.privacy.mode == "central"

    @classmethod
    def for_fleet(cls, policy: RoundPolicy, *, fleet: str, n_params: int, spec_hash: str,
                  privacy: PrivacyPolicy | None = None, secure: bool = False) -> AggregatorConfig:
        return cls(fleet=fleet, n_params=n_params, spec_hash=spec_hash, privacy=privacy or PrivacyPolicy(),
                   secure=secure, **policy.as_kwargs())

    def fingerprint(self) -> dict[str, Any]:
        """The fields a persisted state must agree with to be resumed under this config."""
        return {"fleet": self.fleet, "n_params": self.n_params, "spec_hash": self.spec_hash,
                "server_optimizer": self.server_optimizer}


__all__ = ["AggregatorConfig", "RoundPolicy"]
