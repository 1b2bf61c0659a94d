"""Client-level differential privacy, DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"), with adaptive clipping (Andrew et al. 2021, "Differentially Private Learning
with Adaptive Clipping") and a maintained accountant (Google's ``dp-accounting``, RDP or PLD).

The ``[privacy]`` table of the aggregator (and, for ``distributed``, of every agent):

* ``mode = "central"`` — a trusted aggregator: it clips each site's update to ``clip_norm`` C (the
  close-time plan's clip factors), averages them with equal weights (a sample count is exactly what one
  site could inflate; DP needs each site's influence bounded by C), and adds Gaussian noise of standard
  deviation ``noise_multiplier`` · C to the sum before dividing by the m updates.
* ``mode = "distributed"`` — the aggregator is not trusted with a site's update: each site clips its own
  delta to C and adds noise of standard deviation z·C/√``expected_sites`` (site/privacy.py), so that only
  the sum of ``expected_sites`` updates carries the full z·C. Fewer sites than expected → less noise;
  the accountant uses the round's actual count (z·√(m/expected)). With secure aggregation the server
  sees only that sum; without it, each update still carries its own share of noise.
* **Adaptive clipping** (``adaptive_clip = true``): after each round C ← C·exp(−``clip_lr``·(b̄ − γ)), with
  b̄ the fraction of updates whose norm was ≤ C, noised with σ_b = ``clip_count_stddev`` (default m/20,
  the paper's choice), and γ = ``target_quantile``. The count costs privacy too: the accountant uses
  Andrew et al.'s effective multiplier z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (Theorem 1). Central mode only:
  the aggregator sees the norms; in distributed mode C stays fixed.
* **Accounting**: each round is a sampled Gaussian mechanism with sampling rate ``sampling_rate`` (q: the
  share of the population a round draws; 1.0 when every site takes part every round) and multiplier z
  (z_Δ, z·√(m/expected)); the rounds compose. ε at ``delta`` after every round goes to metrics.jsonl and
  the federation report; with ``epsilon_budget`` the aggregator stops before a round that would exceed it.

What this does not cover: the noise is from numpy's PCG64 seeded from the OS (not a cryptographically
secure sampler; floating-point attacks on Gaussian sampling are out of scope), and "client-level" means
the guarantee is about one site's whole data, not one record.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Final

import numpy as np

from fedpeft_edge.central.accumulator import RoundAccumulator
from fedpeft_edge.protocol.privacy import ACCOUNTANTS, PRIVACY_MODES, PrivacyPolicy
from fedpeft_edge.runtime.errors import InvalidValueError, MissingDependencyError

INSTALL_HINT: Final = (
    "differential privacy needs the accountant: pip install 'fedpeft-edge[privacy]' (dp-accounting)"
)


def _dp() -> Any:
    try:
        import dp_accounting
    except ImportError as exc:
        raise MissingDependencyError(INSTALL_HINT) from exc
    return dp_accounting


def epsilon_of(
    multipliers: list[float], *, sampling_rate: float, delta: float, accountant: str = "rdp"
) -> float:
    """ε at ``delta`` after rounds with the given effective noise multipliers (inf if any is 0)."""
    if not multipliers:
        return 0.0
    if any(z <= 0 for z in multipliers):
        return math.inf
    dp = _dp()
    if accountant == "pld":
        from dp_accounting.pld import pld_privacy_accountant

        acc: Any = pld_privacy_accountant.PLDAccountant()
    else:
        from dp_accounting.rdp import rdp_privacy_accountant

        acc = rdp_privacy_accountant.RdpAccountant()
    # equal multipliers compose as one self-composed event (much faster for many rounds)
    groups: dict[float, int] = {}
    for z in multipliers:
        groups[round(z, 12)] = groups.get(round(z, 12), 0) + 1
    for z, count in groups.items():
        event = dp.GaussianDpEvent(z)
        if sampling_rate < 1.0:
            event = dp.PoissonSampledDpEvent(sampling_rate, event)
        acc.compose(dp.SelfComposedDpEvent(event, count))
    return float(acc.get_epsilon(delta))


def calibrate_noise(
    epsilon: float, *, rounds: int, delta: float, sampling_rate: float = 1.0, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier z whose ``rounds`` rounds stay within ``epsilon`` at ``delta``
    (bisection on the accountant; z to 3 significant digits, rounded up)."""
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        raise InvalidValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InvalidValueError("rounds must be a positive int")
    lo, hi = 1e-3, 1.0
    while (
        epsilon_of([hi] * rounds, sampling_rate=sampling_rate, delta=delta, accountant=accountant) > epsilon
    ):
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise InvalidValueError(f"no noise multiplier reaches epsilon {epsilon} in {rounds} rounds")
    for _ in range(40):
        mid = (lo + hi) / 2
        if (
            epsilon_of([mid] * rounds, sampling_rate=sampling_rate, delta=delta, accountant=accountant)
            > epsilon
        ):
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-3 * hi:
            break
    return hi


def new_rng() -> np.random.Generator:
    """A generator seeded from the OS: noise nobody can predict from the code or the round number."""
    return np.random.default_rng(secrets.randbits(128))


def gaussian(n: int, std: float, rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal(n) * std).astype(np.float32)


def adapted_clip(
    clip: float, norms: list[float], policy: PrivacyPolicy, rng: np.random.Generator
) -> tuple[float, float]:
    """Andrew et al.'s geometric update of C after a round with these (unclipped) update norms:
    ``(new C, the noised fraction of norms ≤ C)``."""
    m = len(norms)
    if m == 0:
        return clip, math.nan
    below = sum(1 for x in norms if x <= clip)
    noised = (below + float(rng.normal(0.0, policy.count_stddev(m)))) / m
    return clip * math.exp(-policy.clip_lr * (noised - policy.target_quantile)), noised


def central_dp_sum(entries: list[Any], clip: float, n_params: int) -> tuple[np.ndarray, list[float], int]:
    """Central mode: ``Σ w_i·min(1, C/‖d_i‖)·d_i`` over a round's buffered updates (``w_i`` is 1, or the
    staleness factor), with the norms before the DP clip and how many the clip shortened. No noise yet."""
    acc = RoundAccumulator(n_params)
    norms: list[float] = []
    clipped = 0
    for e in entries:
        eff = float(e.norm) * float(e.scale) * float(e.update_factor)  # what the sum would have held
        norms.append(eff)
        factor = 1.0
        if eff > clip:
            factor = clip / eff
            clipped += 1
        acc.accumulate(e.update, float(e.weight), float(e.scale) * float(e.update_factor) * factor)
    return acc.sum, norms, clipped


def private_round(
    policy: PrivacyPolicy,
    ledger: dict[str, Any],
    *,
    entries: list[Any],
    mean: np.ndarray,
    count: int,
    quorum: int,
    n_params: int,
) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """One round's DP step at close: ``(aggregate, metrics, new ledger)``. Central mode replaces the
    mean by the clipped, noised one (and adapts C); distributed mode keeps the mean (the sites noised it).
    Both account the round. The caller stores the new ledger only once the round closed."""
    new = {
        "clip": float(ledger.get("clip", policy.clip_norm)),
        "multipliers": list(ledger.get("multipliers", [])),
        "exhausted": bool(ledger.get("exhausted", False)),
    }
    clip = new["clip"]
    out: dict[str, Any] = {"dp_mode": policy.mode, "clip_norm": clip}
    if policy.mode == "central":
        if len(entries) != count:
            raise InvalidValueError("central DP needs every update of the round buffered")
        rng = new_rng()
        total, norms, clipped = central_dp_sum(entries, clip, n_params)
        if policy.noise_multiplier > 0:
            total += gaussian(n_params, policy.noise_multiplier * clip, rng)
        mean = (total / np.float32(max(count, 1))).astype(np.float32)
        out["dp_clipped"] = clipped
        if policy.adaptive_clip:
            new["clip"], out["clip_fraction_below"] = adapted_clip(clip, norms, policy, rng)
    z = policy.round_multiplier(count)
    new["multipliers"].append(z)
    kw = {"sampling_rate": policy.sampling_rate, "delta": policy.delta, "accountant": policy.accountant}
    eps = epsilon_of(new["multipliers"], **kw)
    # None, not inf: the round state is strict JSON (no noise at all means no finite ε)
    out.update(noise_multiplier=z, epsilon=eps if math.isfinite(eps) else None, delta=policy.delta)
    if policy.epsilon_budget is not None:
        following = epsilon_of([*new["multipliers"], policy.round_multiplier(quorum)], **kw)
        if following > policy.epsilon_budget:
            new["exhausted"] = True
            out["privacy_budget_exhausted"] = True
    return mean, out, new


__all__ = [
    "ACCOUNTANTS",
    "PRIVACY_MODES",
    "PrivacyPolicy",
    "adapted_clip",
    "calibrate_noise",
    "epsilon_of",
    "gaussian",
    "new_rng",
]
