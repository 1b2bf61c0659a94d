"""Defences against a lying site, decided when a round closes: adaptive norm bound and weight cap.

A site may lie about its update (sign-flipped, or scaled to a huge norm) or about its sample count (10^9
samples, to outweigh everyone). Both bounds are relative to the round itself, so they need no tuning per
task or model; when neither binds the result is FedAvg's, bit for bit:

* **adaptive norm bound**: ``m_n`` = lower median of the round's update norms. An update above
  ``norm_median_multiplier × m_n`` (default 2) is clipped to it (``norm_mode="clip"``: scaled down,
  direction kept, weight kept) or left out of the mean (``"reject"``); above ``norm_reject_multiplier × m_n``
  (default 10) it is left out whatever the mode: that is no honest spread between sites that started from
  the same global, and clipping would keep the liar's direction at full bound. Applied after the fixed
  ``norm_bound`` (which still acts at offer time); all-zero updates carry no scale and are not in ``m_n``.
* **weight cap**: ``m_s`` = upper median of the round's claimed samples; a site counts at most
  ``samples_median_multiplier × m_s`` samples, besides the absolute ``max_samples_weight`` applied at
  offer time. Default 1: no site outweighs the median site. In a small fleet anything above that hands a
  liar a large share: at 3, one liar among four sites holds half the weight (in the digits federation of
  tests/central/test_lying_site.py a liar holding only digits 0-2 then costs 19 points of accuracy; at 1,
  2 points). The price: honest sites above the median claim count as the median site (FedAvg weighting
  below it, equal weights above); raise the multiplier where site sizes differ by design.

Lower median = the ``(m-1)//2``-th of the ``m`` sorted values, upper = the ``m//2``-th (0-based). The norm
bound takes the lower one so that one huge update cannot set it even in a round of two; the weight cap the
upper one so that it never cuts a round of two honest sites (with two claims no median can tell a liar).
Multipliers are 0 (off) or >= 1, so the median update itself is never touched. What remains: a liar that
stays inside the bounds weighs like a median site with twice its norm. That bounds its pull, it does not
remove it (in the same federation a site sending its delta × -2, or × -5 clipped to 2 × the median, costs
27 points after 5 rounds); against such a site, and against colluding ones, robust rules are the next step.

**Design: buffer the round, aggregate at close.** The medians are only known when the round closes, while
updates arrive one by one. So :class:`~fedpeft_edge.central.core.AggregatorCore` keeps every accepted update
of the open round in its encoded wire form (:class:`BufferedUpdate`: the payload as received, KBs for a
compressed PEFT update, plus its claimed samples, staleness factor, norm and metrics) *next to* the running
weighted sum it has always kept. At close, :func:`plan_round` turns the buffer into final weights and clip
factors; when nothing binds (the usual honest round) the running sum is already the answer, else the buffer
is aggregated again through the same C kernels (sparse top-k and int8 updates as they came: a clip is a
factor on the update's weight in ``accumulate_into``, norms come from ``update_l2_norm``).

* Exactly-once counting is unchanged: the buffer is persisted in the SAME atomic round-state file as the
  accepted ``(client, round)`` pairs and the running sum (store.py), so after kill -9 a counted pair always
  has its buffered update beside it and a redelivery is still a duplicate. The cost: each save rewrites
  the buffer too (~2.5 kB per top-1 % int8 update of 100k parameters; bench/RESULTS.md).
* Memory is bounded by ``max_round_buffer_bytes`` (payload bytes, default 64 MiB): an update that does not
  fit is refused (reason ``round_buffer_full``) and the round is ready to close at once, whatever
  ``min_clients``, since nothing more can be counted in it. With every bound off nothing is buffered and
  the core streams as before, in O(n_params) memory.
* A round resumed from a state written without a buffer (format 1, or the bounds were off when its updates
  came) closes on the running sum alone, bounds skipped for that round (metric ``adaptive: false``).
* Every update of the round at hand is also what coordinate-wise median, trimmed mean or Krum need; they
  would plug in at :func:`plan_round` and the close-time aggregation.

**FedNova** (``aggregation = "fednova"``, central/policy.py) also decides here, and always keeps the buffer.
Each update ``Δ_i`` counts as ``d_i = Δ_i/τ_i`` with τ_i its claimed local steps (the ``steps`` metric,
:func:`claimed_steps`), and the round's mean of the ``d_i`` is multiplied back by ``τ_eff = Σ p_i·τ_i /
Σ p_i`` (central/accumulator.py). The running sum uses the claim as it came (a missing or invalid claim
provisionally as τ = 1); at close a missing or invalid claim takes the round's upper median of the valid
claims (1 if there is none; metric ``steps_substituted``), and a claim above ``steps_median_multiplier ×``
that median counts as that (``steps_capped``): a site claiming 10^9 steps would otherwise multiply
τ_eff, i.e. the whole round's step, by its share of 10^9. A site claiming too few steps makes its ``d_i``
large instead; the adaptive norm bound therefore bounds the normalised norms ``norm_i·scale_i/τ_i``
(what each update weighs in FedNova's sum), so it weighs at most like a site with twice the median
normalised update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from fedpeft_edge.protocol.codec import EncodedUpdate

MAX_CLAIMED_STEPS: Final = 1_000_000  # a round of more local steps than this is no plausible claim


def claimed_steps(metrics: Mapping[str, float]) -> float | None:
    """The local steps an update claims (its ``steps`` metric) if usable for FedNova: a finite number in
    ``[1, MAX_CLAIMED_STEPS]``; else None (missing or invalid)."""
    val = metrics.get("steps")
    if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val):
        return None
    return float(val) if 1.0 <= val <= MAX_CLAIMED_STEPS else None


def lower_median(values: Sequence[float]) -> float:
    """The ``(m-1)//2``-th smallest of ``m`` values (0-based): the larger half is at or above it."""
    if not values:
        raise ValueError("median of no values")
    return float(sorted(values)[(len(values) - 1) // 2])


def upper_median(values: Sequence[float]) -> float:
    """The ``m//2``-th smallest of ``m`` values (0-based): the smaller half is at or below it."""
    if not values:
        raise ValueError("median of no values")
    return float(sorted(values)[len(values) // 2])


@dataclass(frozen=True)
class BufferedUpdate:
    """One accepted update of the open round, as received, with what the close-time plan needs.

    ``samples`` is the claimed count after the absolute ``max_samples_weight`` cap; ``weight`` the
    provisional weight it got in the running sum (``samples·stale_factor``, or ``stale_factor`` with uniform
    weighting); ``scale`` the fixed ``norm_bound`` clip factor already applied there; ``norm`` the L2 norm
    of the decoded update before any clipping; ``steps`` the τ_i the running sum divided it by (1 under
    FedAvg; the claimed steps, or 1 when missing, under FedNova). ``stale_on_update`` (FedBuff,
    ``round_mode = "fedbuff"``): the staleness factor multiplied the update in the running sum, not its
    weight (``weight`` is then ``samples``, or 1 with uniform weighting); False in states written before it.
    """

    client_id: str
    round: int
    update: EncodedUpdate
    samples: int
    stale_factor: float
    weight: float
    scale: float
    norm: float
    metrics: dict[str, float] = field(default_factory=dict)
    steps: float = 1.0
    stale_on_update: bool = False

    @property
    def nbytes(self) -> int:
        return len(self.update.payload)

    @property
    def update_factor(self) -> float:
        """What the update itself is multiplied by besides its clip factor: FedBuff's staleness discount."""
        return self.stale_factor if self.stale_on_update else 1.0

    @property
    def weight_stale_factor(self) -> float:
        """The staleness factor inside ``weight`` (1 when it went onto the update instead)."""
        return 1.0 if self.stale_on_update else self.stale_factor

    def meta(self) -> dict[str, Any]:
        """JSON-able description (the payload travels separately as bytes)."""
        u = self.update
        return {"client": self.client_id, "round": self.round, "mode": u.mode, "n": u.n, "k": u.k,
                "block": u.block, "index_coding": u.index_coding, "index_nbytes": u.index_nbytes,
                "nbytes": len(u.payload), "samples": self.samples, "stale_factor": self.stale_factor,
                "weight": self.weight, "scale": self.scale, "norm": self.norm, "metrics": self.metrics,
                "steps": self.steps, "stale_on_update": self.stale_on_update}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: bytes) -> BufferedUpdate:
        enc = EncodedUpdate(str(meta["mode"]), int(meta["n"]), int(meta["k"]), int(meta["block"]),
                            str(meta["index_coding"]), int(meta["index_nbytes"]), payload)
        return cls(str(meta["client"]), int(meta["round"]), enc, int(meta["samples"]),
                   float(meta["stale_factor"]), float(meta["weight"]), float(meta["scale"]),
                   float(meta["norm"]), {str(k): float(v) for k, v in meta["metrics"].items()},
                   float(meta.get("steps", 1.0)),  # a state before FedNova: counted as τ = 1
                   bool(meta.get("stale_on_update", False)))  # before FedBuff: the factor was in the weight


@dataclass(frozen=True)
class RoundPlan:
    """Final weight, clip factor and τ of every buffered update (``included[i]`` False: left out)."""

    weights: list[float]
    scales: list[float]
    included: list[bool]
    steps: list[float]  # τ_i FedNova normalises by (all 1 under FedAvg)
    norm_median: float | None = None  # None: bound off (or no non-zero update)
    norm_cap: float | None = None
    samples_median: float | None = None
    samples_cap: float | None = None
    clipped: int = 0  # updates the adaptive bound scaled down
    excluded: int = 0  # updates the adaptive bound left out (norm_mode="reject")
    weight_capped: int = 0  # updates whose claimed samples were cut to the cap
    fednova: bool = False
    steps_median: float | None = None  # FedNova: upper median of the valid step claims
    steps_cap: float | None = None
    steps_capped: int = 0  # claims cut to the cap
    steps_substituted: int = 0  # missing or invalid claims that took the median (or 1)

    def binds(self, entries: Sequence[BufferedUpdate]) -> bool:
        """True if any update's final factor differs from what the running sum used."""
        return any(not inc or w != e.weight or s != e.scale or t != e.steps
                   for e, w, s, inc, t in zip(entries, self.weights, self.scales, self.included, self.steps,
                                              strict=True))

    def stats(self) -> dict[str, Any]:
        """The plan's figures for the round metrics (JSON-able, finite or None)."""
        out: dict[str, Any] = {
            "norm_median": self.norm_median, "norm_cap": self.norm_cap,
            "samples_median": self.samples_median, "samples_cap": self.samples_cap,
            "adaptive_clipped": self.clipped, "excluded": self.excluded, "weight_capped": self.weight_capped}
        if self.fednova:
            out.update(steps_median=self.steps_median, steps_cap=self.steps_cap,
                       steps_capped=self.steps_capped, steps_substituted=self.steps_substituted)
        return out


def plan_steps(entries: Sequence[BufferedUpdate], multiplier: float
               ) -> tuple[list[float], float | None, float | None, int, int]:
    """FedNova's τ_i of a round's updates: ``(steps, median, cap, capped, substituted)`` (module doc)."""
    claims = [claimed_steps(e.metrics) for e in entries]
    valid = [c for c in claims if c is not None]
    t_med = upper_median(valid) if valid else None
    fallback = t_med if t_med is not None else 1.0
    steps = [c if c is not None else fallback for c in claims]
    cap = multiplier * t_med if multiplier > 0 and t_med is not None else None
    capped = 0
    if cap is not None:
        for i, t in enumerate(steps):
            if t > cap:
                steps[i] = cap
                capped += 1
    return steps, t_med, cap, capped, len(claims) - len(valid)


def plan_round(entries: Sequence[BufferedUpdate], *, norm_multiplier: float, norm_mode: str,
               samples_multiplier: float, weighting: str, norm_reject_multiplier: float = 0.0,
               aggregation: str = "fedavg", steps_multiplier: float = 0.0) -> RoundPlan:
    """Final weights, clip factors and τ of a round's updates under the adaptive bounds and the
    aggregation rule (module docstring).

    A multiplier of 0 turns that bound off; ``weighting="uniform"`` makes the weight cap moot;
    ``steps_multiplier`` applies with ``aggregation="fednova"`` only.
    """
    weights = [e.weight for e in entries]
    scales = [e.scale for e in entries]
    included = [True] * len(entries)
    fednova = aggregation == "fednova"
    t_med = t_cap = None
    t_capped = t_subst = 0
    if fednova:
        steps, t_med, t_cap, t_capped, t_subst = plan_steps(entries, steps_multiplier)
    else:
        steps = [1.0] * len(entries)
    if not entries:
        return RoundPlan(weights, scales, included, steps, fednova=fednova)
    s_med = s_cap = None
    capped = 0
    if samples_multiplier > 0 and weighting == "samples":
        s_med = upper_median([float(e.samples) for e in entries])
        s_cap = samples_multiplier * s_med
        for i, e in enumerate(entries):
            if e.samples > s_cap:
                weights[i] = s_cap * e.weight_stale_factor
                capped += 1
    n_med = n_cap = None
    clipped = excluded = 0
    if norm_multiplier > 0:
        # what each update weighs in the sum after the fixed bound (per local step under FedNova): that is
        # what the adaptive one bounds
        effective = [e.norm * e.scale / t for e, t in zip(entries, steps, strict=True)]
        nonzero = [v for v in effective if v > 0]
        if nonzero:
            n_med = lower_median(nonzero)
            n_cap = norm_multiplier * n_med
            n_reject = norm_reject_multiplier * n_med if norm_reject_multiplier > 0 else math.inf
            for i, v in enumerate(effective):
                if v <= n_cap:
                    continue
                if norm_mode == "reject" or v > n_reject:
                    included[i] = False
                    excluded += 1
                else:
                    scales[i] = scales[i] * (n_cap / v)
                    clipped += 1
    return RoundPlan(weights, scales, included, steps, n_med, n_cap, s_med, s_cap, clipped, excluded, capped,
                     fednova, t_med, t_cap, t_capped, t_subst)


def weighted_metrics(entries: Sequence[BufferedUpdate], weights: Sequence[float],
                     included: Sequence[bool]) -> dict[str, float]:
    """Weighted mean of every client metric over the included updates, with the final weights."""
    wsum: dict[str, float] = {}
    wtot: dict[str, float] = {}
    for e, w, inc in zip(entries, weights, included, strict=True):
        if not inc:
            continue
        for name, val in e.metrics.items():
            s = wsum.get(name, 0.0) + w * val
            if not math.isfinite(s):  # absurd values: ignored, as at offer time
                continue
            wsum[name] = s
            wtot[name] = wtot.get(name, 0.0) + w
    return {name: wsum[name] / wtot[name] for name in wsum if wtot[name] > 0}


__all__ = ["MAX_CLAIMED_STEPS", "BufferedUpdate", "RoundPlan", "claimed_steps", "lower_median", "plan_round",
           "plan_steps", "upper_median", "weighted_metrics"]
