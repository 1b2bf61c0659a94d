"""Byzantine-robust aggregation rules over a round's buffered updates: coordinate-wise median, trimmed
mean and multi-Krum (``[aggregator] robust_rule``).

They replace the weighted mean when a round closes; everything before them still applies: the fixed and
adaptive norm bounds (clip factors), the weight cap and FedNova's step normalisation (central/robust.py
plans them, each row here is ``d_i = scale_i · update_i / τ_i`` of an update the plan kept).

* ``median`` — per coordinate, the median of the m rows (Yin et al. 2018). Unweighted: a weight is
  exactly what a liar can claim.
* ``trimmed_mean`` — per coordinate, drop the ``floor(trim_fraction · m)`` smallest and largest values
  and average the rest (Yin et al. 2018). Unweighted, for the same reason.
* ``multi_krum`` — score each row by the summed squared distance to its ``m − f − 2`` nearest rows
  (``f = krum_byzantine``), keep the ``krum_select`` lowest (default ``m − f``) and take their weighted
  mean (Blanchard et al. 2017). Needs ``m > 2f + 2`` to carry its guarantee; below that it still keeps the
  ``krum_select`` most central rows and the round's metrics say ``krum_guarantee: false``.

**Sparse updates.** A top-k update is decoded to its dense vector: a coordinate a site did not send is 0
in its row — what that site's update *is* this round (its error feedback keeps the rest for later) — not
a missing value. So a coordinate only a few sites sent has a median of 0: a lone site, honest or not,
cannot set it. The price is a smaller step where sites' top-k sets differ (measured in docs/experiments.md
when run). Rows are built through the same decoder as the running sum, so the sparse and the dense form
of one update give the same row bit for bit (tests/central/test_robust_rules.py).

Memory: the rules need every row at once, ``m × n`` float32; above :data:`MAX_ROBUST_ELEMENTS` the round
falls back to the bounded weighted mean and says so (``robust_rule_skipped``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from fedpeft_edge.central.robust import BufferedUpdate
from fedpeft_edge.protocol.codec import decode_dense
from fedpeft_edge.runtime.errors import InvalidValueError

MAX_ROBUST_ELEMENTS: Final = 64 * 1024 * 1024  # m × n float32 values decoded at once (256 MiB)


def _rows(
    entries: Sequence[BufferedUpdate], scales: Sequence[float], steps: Sequence[float], n: int
) -> np.ndarray:
    out = np.empty((len(entries), n), np.float32)
    for i, (e, s, t) in enumerate(zip(entries, scales, steps, strict=True)):
        out[i] = decode_dense(e.update, n)
        factor = s / t
        if factor != 1.0:
            out[i] *= np.float32(factor)
    return out


def median(rows: np.ndarray) -> np.ndarray:
    return np.median(rows, axis=0).astype(np.float32)


def trimmed_mean(rows: np.ndarray, trim_fraction: float) -> np.ndarray:
    m = rows.shape[0]
    cut = math.floor(trim_fraction * m)
    if m - 2 * cut < 1:
        raise InvalidValueError(f"trim_fraction {trim_fraction} leaves nothing of {m} updates")
    if cut == 0:
        return rows.mean(axis=0, dtype=np.float64).astype(np.float32)
    ordered = np.sort(rows, axis=0)  # m is a round's update count (tens): a full sort per coordinate is cheap
    return ordered[cut : m - cut].mean(axis=0, dtype=np.float64).astype(np.float32)


def krum_scores(rows: np.ndarray, byzantine: int) -> np.ndarray:
    """Each row's summed squared distance to its ``m − f − 2`` nearest other rows (at least 1)."""
    m = rows.shape[0]
    x = rows.astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    neighbours = max(1, min(m - 1, m - byzantine - 2))
    np.fill_diagonal(d2, np.inf)
    return np.sort(d2, axis=1)[:, :neighbours].sum(axis=1)


def multi_krum(
    rows: np.ndarray, weights: Sequence[float], byzantine: int, select: int
) -> tuple[np.ndarray, list[int]]:
    m = rows.shape[0]
    if m == 1:
        return rows[0].copy(), [0]
    keep = select if select > 0 else max(1, m - byzantine)
    keep = min(keep, m)
    chosen = sorted(np.argsort(krum_scores(rows, byzantine), kind="stable")[:keep].tolist())
    w = np.asarray([weights[i] for i in chosen], np.float64)
    mean = (w[:, None] * rows[chosen].astype(np.float64)).sum(axis=0) / w.sum()
    return mean.astype(np.float32), chosen


def robust_aggregate(
    entries: Sequence[BufferedUpdate],
    *,
    weights: Sequence[float],
    scales: Sequence[float],
    steps: Sequence[float],
    included: Sequence[bool],
    n_params: int,
    rule: str,
    trim_fraction: float,
    krum_byzantine: int,
    krum_select: int,
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The round's aggregate of the ``d_i`` under ``rule`` and its figures, or None when the rows would
    exceed :data:`MAX_ROBUST_ELEMENTS` (the caller falls back to the weighted mean)."""
    idx = [i for i, inc in enumerate(included) if inc]
    if not idx:
        raise InvalidValueError("no update left to aggregate")
    if len(idx) * n_params > MAX_ROBUST_ELEMENTS:
        return None
    rows = _rows([entries[i] for i in idx], [scales[i] for i in idx], [steps[i] for i in idx], n_params)
    info: dict[str, Any] = {"robust_rule": rule, "robust_rows": len(idx)}
    if rule == "median":
        return median(rows), info
    if rule == "trimmed_mean":
        info["trimmed_each_side"] = math.floor(trim_fraction * len(idx))
        return trimmed_mean(rows, trim_fraction), info
    if rule == "multi_krum":
        mean, chosen = multi_krum(rows, [weights[i] for i in idx], krum_byzantine, krum_select)
        info.update(
            krum_selected=[entries[idx[c]].client_id for c in chosen],
            krum_guarantee=len(idx) > 2 * krum_byzantine + 2,
        )
        return mean, info
    raise InvalidValueError(f"unknown robust rule {rule!r}")


__all__ = ["MAX_ROBUST_ELEMENTS", "krum_scores", "median", "multi_krum", "robust_aggregate", "trimmed_mean"]
