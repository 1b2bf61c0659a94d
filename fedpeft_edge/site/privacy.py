"""A site's part of distributed differential privacy (``[privacy] mode = "distributed"``): clip the
round's delta to C with the C core, then add Gaussian noise of standard deviation z·C/√expected_sites, so
that the sum over the expected sites carries z·C (fedpeft_edge/central/privacy.py has the whole scheme).

Applied to the delta *before* the codec: compression, error feedback and the wire then only ever see the
noised vector (post-processing keeps the guarantee). The residual the codec keeps back is a function of
noised vectors too. In ``central`` mode the site does nothing here: the aggregator clips and adds noise.
"""

from __future__ import annotations

import numpy as np

from fedpeft_edge import kernels
from fedpeft_edge.protocol.privacy import PrivacyPolicy
from fedpeft_edge.runtime.errors import InvalidValueError


class SiteNoise:
    """Clip + noise for one site; ``rng`` defaults to a generator seeded from the OS."""

    def __init__(self, policy: PrivacyPolicy, rng: np.random.Generator | None = None) -> None:
        if policy.mode != "distributed":
            raise InvalidValueError("a site adds noise only with [privacy] mode = 'distributed'")
        self.policy = policy
        self.rng = rng if rng is not None else np.random.default_rng()
        self.last_norm = float("nan")  # the delta's norm before clipping (a site-local diagnostic)

    def apply(self, delta: np.ndarray) -> np.ndarray:
        """A new array: ``delta`` clipped to C, plus the site's share of the noise."""
        out = np.array(delta, dtype=np.float32, copy=True)
        self.last_norm = kernels.clip_by_global_norm(out, float(self.policy.clip_norm))
        std = self.policy.site_noise_std()
        if std > 0:
            out += (self.rng.standard_normal(out.size) * std).astype(np.float32)
        return out


__all__ = ["SiteNoise"]
