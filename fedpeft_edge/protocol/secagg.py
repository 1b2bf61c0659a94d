"""Secure aggregation, SecAgg+ style: the cryptographic core, with no transport.

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning") with the
sparse communication graph of Bell et al. 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead"). The aggregator learns the sum of the surviving sites' quantised updates and nothing else about
any single update, as long as it follows the protocol (honest but curious) and fewer than ``threshold`` of a
site's neighbours collude with it. ``docs/secagg.md`` has the threat model, parameters and costs.

Four phases, each a message exchange the integrator carries (MQTT later; plain calls in the tests)::

    site u                                   server
    0  advertise()            ─AdvertiseKeys─▶  receive_advertise()       ─▶ key_directories()
    1  share_keys(dir)        ◀─KeyDirectory─┘
                              ─ShareKeys────▶  receive_shares()          ─▶ forward_shares()
    2  masked_input(fwd, q)   ◀─ForwardedShares┘
                              ─MaskedInput──▶  receive_masked_input()    ─▶ unmask_request()
    3  unmask(req)            ◀─UnmaskRequest─┘
                              ─UnmaskResponse▶ receive_unmask_response() ─▶ finish() → AggregateResult

Primitives (all from ``cryptography``): X25519 key agreement, HKDF-SHA256 key derivation bound to the
round's session id and the pair, AES-256-CTR or ChaCha20 as the mask PRG, ChaCha20-Poly1305 for the
encrypted shares, Shamir secret sharing over GF(2^127 - 1). Randomness comes from one injectable callable
(``randomness(nbytes) -> bytes``, default ``os.urandom``), so a run is deterministic given its randomness.

Every message is checked (session, sender, phase, membership, sizes); a refused message raises a
:class:`SecAggError` (an :class:`~fedpeft_edge.runtime.errors.InvalidValueError`) naming what is wrong and
never changes state. Byte encodings with strict decoding live in :mod:`fedpeft_edge.protocol.secagg_wire`.

This module is the protocol's front door: the names below come from ``secagg_math`` (constants, errors,
quantisation, parameters and neighbour graph, PRG, keys, Shamir), ``secagg_messages`` (the phases'
messages), ``secagg_client`` (a site's side) and ``secagg_server`` (the aggregator's side).
"""

from __future__ import annotations

from fedpeft_edge.protocol.secagg_client import (
    SecAggClient,
)
from fedpeft_edge.protocol.secagg_math import (
    COMMIT_BYTES,
    FIELD_PRIME,
    KEY_BYTES,
    PRGS,
    SEALED_SHARE_BYTES,
    SESSION_ID_BYTES,
    SHARE_BYTES,
    ConflictingMessageError,
    PrivacyRefusal,
    ProtocolStateError,
    QuantSpec,
    Randomness,
    ReconstructionError,
    SecAggError,
    SecAggParams,
    TamperedShareError,
    ThresholdError,
    check_public_key,
    check_share,
    clipped_count,
    dequantize_mean,
    dequantize_sum,
    neighbour_graph,
    prg_uint32,
    quantize,
    shamir_combine,
    shamir_split,
)
from fedpeft_edge.protocol.secagg_messages import (
    AdvertiseKeys,
    AggregateResult,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    Phase,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedpeft_edge.protocol.secagg_server import (
    SecAggServer,
)

__all__ = [
    "COMMIT_BYTES",
    "FIELD_PRIME",
    "KEY_BYTES",
    "PRGS",
    "SEALED_SHARE_BYTES",
    "SESSION_ID_BYTES",
    "SHARE_BYTES",
    "AdvertiseKeys",
    "AggregateResult",
    "ConflictingMessageError",
    "ForwardedShares",
    "KeyDirectory",
    "MaskedInput",
    "Phase",
    "PrivacyRefusal",
    "ProtocolStateError",
    "QuantSpec",
    "Randomness",
    "ReconstructionError",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "ShareKeys",
    "TamperedShareError",
    "ThresholdError",
    "UnmaskRequest",
    "UnmaskResponse",
    "check_public_key",
    "check_share",
    "clipped_count",
    "dequantize_mean",
    "dequantize_sum",
    "neighbour_graph",
    "prg_uint32",
    "quantize",
    "shamir_combine",
    "shamir_split",
]
