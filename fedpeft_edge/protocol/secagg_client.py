"""The site's side of one secure-aggregation round (protocol/secagg.py has the protocol)."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedpeft_edge.protocol.secagg_math import (
    _NONCE_BYTES,
    _PLAINTEXT_BYTES,
    KEY_BYTES,
    SEALED_SHARE_BYTES,
    SHARE_BYTES,
    VERSION,
    PrivacyRefusal,
    ProtocolStateError,
    Randomness,
    SecAggError,
    SecAggParams,
    TamperedShareError,
    ThresholdError,
    U32Array,
    _channel_key,
    _check_map,
    _check_msg,
    _check_site_list,
    _public,
    _random_bytes,
    _share_ad,
    _u32_vector,
    check_public_key,
    check_share,
    pair_mask_key,
    prg_uint32,
    self_mask_commitment,
    self_mask_key,
    shamir_split,
)
from fedpeft_edge.protocol.secagg_messages import (
    AdvertiseKeys,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    Phase,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedpeft_edge.runtime.errors import InvalidTypeError, InvalidValueError

# --------------------------------------------------------------------------------------------------
# The site


class SecAggClient:
    """One site's side of one round. Secrets stay in memory only: a site that restarts is a dropout for
    this round (it must never re-share or re-mask within the same session)."""

    def __init__(self, params: SecAggParams, site: str, *, randomness: Randomness = os.urandom) -> None:
        if not isinstance(params, SecAggParams):
            raise InvalidTypeError("params must be SecAggParams")
        if not params.is_site(site):
            raise ProtocolStateError(f"{site!r} is not a participant of this round")
        self.params = params
        self.site = site
        self._rand = randomness
        self.phase = Phase.ADVERTISE
        self._channel_sk: X25519PrivateKey | None = None
        self._mask_sk: X25519PrivateKey | None = None
        self._peers: dict[str, tuple[bytes, bytes]] = {}  # neighbour → (c_pk, s_pk) from the directory
        self._held: dict[str, tuple[bytes, bytes]] = {}  # neighbour → (share of its mask key, share of b)
        self._revealed: dict[str, str] = {}  # neighbour → "self_mask" | "mask_key": never both
        self._seed = b""  # b_u's seed, from phase 1 to phase 2 only

    # Phase 0 -------------------------------------------------------------------------------------
    def advertise(self) -> AdvertiseKeys:
        self._expect(Phase.ADVERTISE, "advertise")
        self._channel_sk = X25519PrivateKey.from_private_bytes(_random_bytes(self._rand, KEY_BYTES))
        self._mask_sk = X25519PrivateKey.from_private_bytes(_random_bytes(self._rand, KEY_BYTES))
        self.phase = Phase.SHARE_KEYS
        return AdvertiseKeys(self.params.session_id, self.site, _public(self._channel_sk),
                             _public(self._mask_sk))

    # Phase 1 -------------------------------------------------------------------------------------
    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        """Share the mask key and a fresh self-mask seed b_u among the neighbours in ``directory``."""
        self._expect(Phase.SHARE_KEYS, "share_keys")
        p = self.params
        _check_msg(directory, KeyDirectory, p)
        if directory.to != self.site:
            raise ProtocolStateError(f"key directory addressed to {directory.to!r}, not {self.site!r}")
        keys = _check_map(directory.keys, "key directory")
        mine = p.graph[self.site]
        for v, pair in keys.items():
            if v not in mine:
                raise ProtocolStateError(f"key directory lists {v!r}, not a neighbour of {self.site!r}")
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise SecAggError(f"key directory entry of {v!r} must be (channel_public, mask_public)")
            check_public_key(pair[0], f"channel key of {v!r}")
            check_public_key(pair[1], f"mask key of {v!r}")
        if len(keys) < p.threshold:
            raise ThresholdError(f"{len(keys)} neighbours advertised keys, threshold is {p.threshold}: "
                                 f"{self.site!r} cannot take part")
        assert self._channel_sk is not None and self._mask_sk is not None
        seed = _random_bytes(self._rand, KEY_BYTES)
        holders = sorted(keys)
        xs = [p.x_of(v) for v in holders]
        key_shares = shamir_split(self._mask_sk.private_bytes_raw(), xs, p.threshold, self._rand)
        seed_shares = shamir_split(seed, xs, p.threshold, self._rand)
        sealed: dict[str, bytes] = {}
        for v, x in zip(holders, xs, strict=True):
            ck = _channel_key(p, self._channel_sk, self.site, v, keys[v][0])
            nonce = _random_bytes(self._rand, _NONCE_BYTES)
            plain = bytes([VERSION]) + key_shares[x] + seed_shares[x]
            sealed[v] = nonce + ChaCha20Poly1305(ck).encrypt(nonce, plain, _share_ad(p, self.site, v))
        self._peers = dict(keys)
        self._seed = seed
        self.phase = Phase.MASKED_INPUT
        return ShareKeys(p.session_id, self.site, self_mask_commitment(p, self.site, seed), sealed)

    # Phase 2 -------------------------------------------------------------------------------------
    def masked_input(self, forwarded: ForwardedShares, quantised: U32Array) -> MaskedInput:
        """Open the neighbours' shares, then mask ``quantised`` (from :func:`quantize`) with b_u and one
        pairwise mask per neighbour that sent shares."""
        self._expect(Phase.MASKED_INPUT, "masked_input")
        p = self.params
        _check_msg(forwarded, ForwardedShares, p)
        if forwarded.to != self.site:
            raise ProtocolStateError(f"shares addressed to {forwarded.to!r}, not {self.site!r}")
        q = _u32_vector("quantised", quantised)
        if q.size != p.n_params:
            raise InvalidValueError(f"quantised update has {q.size} values, the round has {p.n_params}")
        sealed = _check_map(forwarded.sealed, "forwarded shares")
        unknown = sorted(set(sealed) - set(self._peers))
        if unknown:
            raise ProtocolStateError(f"shares from {unknown[:5]}: not neighbours that advertised keys")
        if len(sealed) < p.threshold:
            # With fewer masked neighbours the server could strip too much of y_u once b_u is revealed.
            raise ThresholdError(f"{len(sealed)} neighbours sent shares, threshold is {p.threshold}")
        assert self._channel_sk is not None and self._mask_sk is not None
        held: dict[str, tuple[bytes, bytes]] = {}
        for u in sorted(sealed):
            held[u] = self._open(u, sealed[u])
        y = q.copy()
        y += prg_uint32(self_mask_key(p, self.site, self._seed), p.n_params, p.prg)
        for u in sorted(held):
            key = pair_mask_key(p, self._mask_sk, self.site, u, self._peers[u][1])
            m = prg_uint32(key, p.n_params, p.prg)
            if p.precedes(self.site, u):
                y += m
            else:
                y -= m
        self._held = held
        # The private keys and seed are no longer needed: drop them (Python cannot wipe memory, but nothing
        # later can leak them through this object).
        self._channel_sk = self._mask_sk = None
        self._seed = b""
        self.phase = Phase.UNMASK
        return MaskedInput(p.session_id, self.site, y)

    def _open(self, sender: str, blob: object) -> tuple[bytes, bytes]:
        p = self.params
        if not isinstance(blob, bytes) or len(blob) != SEALED_SHARE_BYTES:
            raise TamperedShareError(f"sealed share from {sender!r} must be {SEALED_SHARE_BYTES} bytes")
        assert self._channel_sk is not None
        ck = _channel_key(p, self._channel_sk, self.site, sender, self._peers[sender][0])
        try:
            plain = ChaCha20Poly1305(ck).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:],
                                                 _share_ad(p, sender, self.site))
        except InvalidTag:
            raise TamperedShareError(f"sealed share from {sender!r} failed authentication") from None
        if len(plain) != _PLAINTEXT_BYTES or plain[0] != VERSION:
            raise TamperedShareError(f"sealed share from {sender!r}: unknown layout")
        key_share = check_share(plain[1:1 + SHARE_BYTES], f"mask-key share from {sender!r}")
        seed_share = check_share(plain[1 + SHARE_BYTES:], f"self-mask share from {sender!r}")
        return key_share, seed_share

    # Phase 3 -------------------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal, per neighbour whose shares this site holds, the share of b_u if u survived or the share of
        u's mask key if u dropped — never both for one u, across every request of the round. May be called
        again (e.g. a re-sent request); a conflicting request raises :class:`PrivacyRefusal`."""
        if self.phase not in (Phase.UNMASK, Phase.DONE):
            raise ProtocolStateError(f"unmask called in phase {self.phase.name}")
        p = self.params
        _check_msg(request, UnmaskRequest, p)
        survivors = _check_site_list(p, request.survivors, "survivors")
        dropped = _check_site_list(p, request.dropped, "dropped")
        if survivors & dropped:
            raise PrivacyRefusal(f"sites both survived and dropped: {sorted(survivors & dropped)[:5]}")
        if self.site not in survivors:
            raise ProtocolStateError(f"{self.site!r} is asked to unmask but not listed as a survivor")
        reveal_b = sorted(set(self._held) & survivors)
        reveal_key = sorted(set(self._held) & dropped)
        for u in reveal_b:
            if self._revealed.get(u) == "mask_key":
                raise PrivacyRefusal(f"already revealed the mask-key share of {u!r}; refusing its b share")
            alive = len(p.graph[u] & survivors)
            if alive < p.threshold:
                raise ThresholdError(f"{u!r} has {alive} surviving neighbours, threshold {p.threshold}: "
                                     f"revealing b_{u} would strip too many of its masks")
        for d in reveal_key:
            if self._revealed.get(d) == "self_mask":
                raise PrivacyRefusal(f"already revealed the b share of {d!r}; refusing its mask-key share")
        for u in reveal_b:
            self._revealed[u] = "self_mask"
        for d in reveal_key:
            self._revealed[d] = "mask_key"
        self.phase = Phase.DONE
        return UnmaskResponse(p.session_id, self.site, {u: self._held[u][1] for u in reveal_b},
                              {d: self._held[d][0] for d in reveal_key})

    def _expect(self, phase: Phase, call: str) -> None:
        if self.phase != phase:
            raise ProtocolStateError(f"{call} called in phase {self.phase.name} (expected {phase.name})")
