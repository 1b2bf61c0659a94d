"""The ``[secagg]`` table both sides read: secure aggregation (SecAgg+) of the sites' updates over MQTT.

With ``enabled = true`` the aggregator never sees a site's update: each round's updates are summed under
pairwise masks (protocol/secagg.py, the cryptographic core; central/secure_round.py, the aggregator's
four phases over MQTT; site/secure_sum.py, a site's). The aggregator's table names the round's
participants (``sites``: a plant federation knows its sites, and an open list would let the server add
accounts of its own around a target) and the protocol's parameters. A site's table needs only
``enabled``: everything else is public and comes in each session's announcement on
``fedpeft/<fleet>/secagg/params``, which the site checks against itself (its id listed, its parameter
count, the fleet).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from fedpeft_edge.protocol.secagg import PRGS, QuantSpec, SecAggParams
from fedpeft_edge.protocol.topics import check_name
from fedpeft_edge.runtime.errors import InvalidValueError


@dataclass(frozen=True)
class Publish:
    """One MQTT publish a secure-aggregation state machine asks its caller to make (the state machines,
    central/secure_round.py and site/secure_sum.py, hold no connection)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


# The codecs a SecAgg fleet may be configured with: only a dense vector can be masked (docs/secagg.md,
# "Which codecs SecAgg allows"); the site lifts it to the round's fixed-point grid itself.
SECAGG_CODECS = ("fp32", "int8")


def _finite_positive(name: str, val: object) -> float:
    if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val) or val <= 0:
        raise InvalidValueError(f"[secagg] {name} must be a finite number > 0, got {val!r}")
    return float(val)


def _count(name: str, val: object, lo: int) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < lo:
        raise InvalidValueError(f"[secagg] {name} must be an int >= {lo}, got {val!r}")
    return val


@dataclass
class SecAggPolicy:
    """The ``[secagg]`` table (module docstring). Defaults: classic SecAgg (every pair of sites masks,
    ``neighbours = n - 1``), the smallest threshold the k/2 rule allows, the finest grid that cannot wrap."""

    enabled: bool = False
    sites: list[str] = field(default_factory=list)  # the aggregator's list of participants
    neighbours: int | None = None  # k: None = n - 1 (classic); a sparse graph (SecAgg+) for large fleets
    threshold: int | None = None  # t: None = floor(k/2) + 1 (tolerates the most dropouts)
    clip: float = 0.05  # every coordinate of an update is clipped to +-clip before it is quantised
    bits: int | None = None  # None: the largest that len(sites) summed levels cannot wrap
    prg: str = "aes256-ctr"  # or chacha20 (constant time on CPUs without AES instructions)
    phase_timeout_s: float = 30.0  # phases 1-3 close when every expected site answered, or after this
    # Sessions tried per round: a session fails when too many sites drop out; the next one starts
    # under a fresh seed with the sites that can still take part. After this many the round is skipped.
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise InvalidValueError("[secagg] enabled must be true or false")
        if isinstance(self.sites, str) or not isinstance(self.sites, list | tuple):
            raise InvalidValueError("[secagg] sites must be a list of site ids")
        for s in self.sites:
            check_name("[secagg] site", s)
        if len(set(self.sites)) != len(self.sites):
            raise InvalidValueError("[secagg] sites holds a site twice")
        if self.neighbours is not None:
            _count("neighbours", self.neighbours, 1)
        if self.threshold is not None:
            _count("threshold", self.threshold, 1)
        if self.bits is not None:
            _count("bits", self.bits, 2)
        self.clip = _finite_positive("clip", self.clip)
        self.phase_timeout_s = _finite_positive("phase_timeout_s", self.phase_timeout_s)
        _count("max_attempts", self.max_attempts, 1)
        if self.prg not in PRGS:
            raise InvalidValueError(f"[secagg] prg must be one of {PRGS}, got {self.prg!r}")

    def check_aggregator(self) -> None:
        """What the aggregator additionally needs: a participant list that makes a valid round."""
        if not self.enabled:
            return
        if len(self.sites) < 2:
            raise InvalidValueError("[secagg] sites must list the federation's sites (at least 2): only "
                                    "listed sites can take part in a secure round")
        n = len(self.sites)
        if self.neighbours is not None and self.neighbours > n - 1:
            raise InvalidValueError(f"[secagg] neighbours = {self.neighbours} exceeds the other sites "
                                    f"({n - 1})")
        if self.threshold is not None:
            k = self.neighbours if self.neighbours is not None else n - 1
            if not k // 2 < self.threshold <= k:
                raise InvalidValueError(f"[secagg] threshold must be in ({k // 2}, {k}] for {k} neighbours "
                                        "(t > k/2 keeps a server from collecting both kinds of share)")
        # Build one round's parameters now: a bad k, t or bits fails at start, not at the first round.
        self.params_for("check", 0, 1, bytes(32))

    def quant(self) -> QuantSpec:
        n = max(2, len(self.sites))
        bits = self.bits if self.bits is not None else QuantSpec.largest_bits(n)
        return QuantSpec(clip=self.clip, bits=bits, max_sites=n)

    def params_for(self, fleet: str, rnd: int, n_params: int, round_seed: bytes | None = None,
                   sites: list[str] | None = None) -> SecAggParams:
        """One session's public parameters; ``round_seed`` None draws a fresh one (every session needs
        its own: it is the salt of every key and the id of every message). ``sites`` narrows the
        participants (a retry without the sites that already revealed shares of this round)."""
        members = list(self.sites if sites is None else sites)
        n = len(members)
        k = self.neighbours if self.neighbours is not None else n - 1
        k = min(k, n - 1)
        if (n * k) % 2:  # a k-regular graph needs n*k even: one neighbour fewer (never below 1)
            k = k - 1 if k > 1 else k
        t = self.threshold if self.threshold is not None else SecAggParams.default_threshold(k)
        t = min(max(t, k // 2 + 1), k)
        try:
            return SecAggParams(fleet=fleet, round=rnd, sites=tuple(members), neighbours=k, threshold=t,
                                n_params=n_params, quant=self.quant(),
                                round_seed=os.urandom(32) if round_seed is None else round_seed,
                                prg=self.prg)
        except InvalidValueError as exc:
            raise InvalidValueError(f"[secagg] {exc}") from exc


__all__ = ["SECAGG_CODECS", "Publish", "SecAggPolicy"]
