"""The messages of secure aggregation's four phases (protocol/secagg.py), as plain data:
protocol/secagg_wire.py turns them into bytes and back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedpeft_edge.protocol.secagg_math import SecAggParams, U32Array, dequantize_mean, dequantize_sum

# --------------------------------------------------------------------------------------------------
# Messages (plain data; secagg_wire turns them into bytes and back)


@dataclass(frozen=True)
class AdvertiseKeys:
    """Phase 0, site → server: the site's two X25519 public keys for this round."""

    session: bytes
    site: str
    channel_public: bytes  # c_pk: agreement for the encrypted shares
    mask_public: bytes  # s_pk: agreement for the pairwise masks


@dataclass(frozen=True)
class KeyDirectory:
    """Phase 0 → 1, server → one site: its graph neighbours that advertised, with their keys."""

    session: bytes
    to: str
    keys: dict[str, tuple[bytes, bytes]]  # neighbour → (channel_public, mask_public)


@dataclass(frozen=True)
class ShareKeys:
    """Phase 1, site → server: one sealed share bundle per neighbour, and the commitment to b_u."""

    session: bytes
    site: str
    self_mask_commitment: bytes
    sealed: dict[str, bytes]  # neighbour → nonce · ciphertext · tag (SEALED_SHARE_BYTES)


@dataclass(frozen=True)
class ForwardedShares:
    """Phase 1 → 2, server → one site: the sealed bundles its neighbours addressed to it."""

    session: bytes
    to: str
    sealed: dict[str, bytes]  # sender → sealed bundle


@dataclass(frozen=True)
class MaskedInput:
    """Phase 2, site → server: y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv) mod 2^32."""

    session: bytes
    site: str
    masked: U32Array = field(compare=False)

    def __eq__(self, other: object) -> bool:  # arrays compare element-wise; a message compares whole
        return (isinstance(other, MaskedInput) and (self.session, self.site) == (other.session, other.site)
                and np.array_equal(self.masked, other.masked))


@dataclass(frozen=True)
class UnmaskRequest:
    """Phase 2 → 3, server → every survivor: who sent a masked input, and who of phase 1 did not."""

    session: bytes
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskResponse:
    """Phase 3, site → server: shares of b_u for survivors u, shares of the mask key of dropped sites."""

    session: bytes
    site: str
    self_mask_shares: dict[str, bytes]
    mask_key_shares: dict[str, bytes]


@dataclass(frozen=True)
class AggregateResult:
    """What the server learns: the sum of the survivors' levels mod 2^32, and who they were."""

    params: SecAggParams
    total: U32Array = field(compare=False)
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def sum(self) -> npt.NDArray[np.float64]:
        return dequantize_sum(self.total, self.params.quant, len(self.survivors))

    def mean(self) -> npt.NDArray[np.float32]:
        """Unweighted mean over the survivors (FedAvg weights by samples would need them in the sum)."""
        return dequantize_mean(self.total, self.params.quant, len(self.survivors))


class Phase(enum.IntEnum):
    ADVERTISE = 0  # waiting to advertise (site) / collecting AdvertiseKeys (server)
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    UNMASK = 3
    DONE = 4
