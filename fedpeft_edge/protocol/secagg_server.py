"""The aggregator's side of one secure-aggregation round (protocol/secagg.py has the protocol)."""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedpeft_edge.protocol.secagg_math import (
    COMMIT_BYTES,
    SEALED_SHARE_BYTES,
    ConflictingMessageError,
    ProtocolStateError,
    ReconstructionError,
    SecAggError,
    SecAggParams,
    ThresholdError,
    _check_map,
    _check_msg,
    _combine,
    _public,
    check_public_key,
    check_share,
    pair_mask_key,
    prg_uint32,
    self_mask_commitment,
    self_mask_key,
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
from fedpeft_edge.runtime.errors import InvalidTypeError

# --------------------------------------------------------------------------------------------------
# The server


class SecAggServer:
    """The aggregator's side of one round. It holds the masked inputs' running sum (never an individual
    input in the clear) and, at the end, exactly the sum of the survivors' levels.

    ``receive_*`` return True for a new message and False for an identical copy (MQTT redelivery: never
    counted twice); a different second message from a site raises :class:`ConflictingMessageError`.
    Each phase is closed by the call that builds the next outgoing messages."""

    def __init__(self, params: SecAggParams) -> None:
        if not isinstance(params, SecAggParams):
            raise InvalidTypeError("params must be SecAggParams")
        self.params = params
        self.phase = Phase.ADVERTISE
        self._keys: dict[str, AdvertiseKeys] = {}  # U1
        self._shares: dict[str, ShareKeys] = {}  # U2
        self._to: dict[str, dict[str, bytes]] = {}  # receiver → sender → sealed (what was forwarded)
        self._masked_digest: dict[str, bytes] = {}  # U3 (digest only: dedup without keeping the vectors)
        self._acc = np.zeros(params.n_params, dtype=np.uint32)
        self._request: UnmaskRequest | None = None
        self._responses: dict[str, UnmaskResponse] = {}

    # Phase 0 -------------------------------------------------------------------------------------
    def receive_advertise(self, msg: AdvertiseKeys) -> bool:
        self._expect(Phase.ADVERTISE, "AdvertiseKeys")
        _check_msg(msg, AdvertiseKeys, self.params)
        self._from_participant(msg.site)
        check_public_key(msg.channel_public, f"channel key of {msg.site!r}")
        check_public_key(msg.mask_public, f"mask key of {msg.site!r}")
        if msg.channel_public == msg.mask_public:
            raise SecAggError(f"{msg.site!r} advertised the same key twice")
        return self._store(self._keys, msg.site, msg)

    def key_directories(self) -> dict[str, KeyDirectory]:
        """Close phase 0 (U1 = who advertised) and address each site its neighbours' keys."""
        self._expect(Phase.ADVERTISE, "key_directories")
        p = self.params
        self._need(len(self._keys), p.threshold + 1, "sites advertised keys")
        out = {}
        for u in sorted(self._keys):
            keys = {v: (self._keys[v].channel_public, self._keys[v].mask_public)
                    for v in sorted(p.graph[u]) if v in self._keys}
            out[u] = KeyDirectory(p.session_id, u, keys)
        self.phase = Phase.SHARE_KEYS
        return out

    # Phase 1 -------------------------------------------------------------------------------------
    def receive_shares(self, msg: ShareKeys) -> bool:
        self._expect(Phase.SHARE_KEYS, "ShareKeys")
        p = self.params
        _check_msg(msg, ShareKeys, p)
        if msg.site not in self._keys:
            raise ProtocolStateError(f"{msg.site!r} sent shares but did not advertise keys")
        if not isinstance(msg.self_mask_commitment, bytes) or len(msg.self_mask_commitment) != COMMIT_BYTES:
            raise SecAggError(f"{msg.site!r}: the self-mask commitment is {COMMIT_BYTES} bytes")
        sealed = _check_map(msg.sealed, "sealed shares")
        want = {v for v in p.graph[msg.site] if v in self._keys}
        if set(sealed) != want:
            raise SecAggError(f"{msg.site!r} must seal one share bundle for each of its {len(want)} "
                              f"neighbours in U1, got {len(sealed)} (extra {sorted(set(sealed) - want)[:5]})")
        for v, blob in sealed.items():
            if not isinstance(blob, bytes) or len(blob) != SEALED_SHARE_BYTES:
                raise SecAggError(f"{msg.site!r}: sealed bundle for {v!r} must be {SEALED_SHARE_BYTES} bytes")
        return self._store(self._shares, msg.site, msg)

    def forward_shares(self) -> dict[str, ForwardedShares]:
        """Close phase 1 (U2 = who sent shares) and route each bundle to its receiver in U2."""
        self._expect(Phase.SHARE_KEYS, "forward_shares")
        p = self.params
        self._need(len(self._shares), p.threshold + 1, "sites sent shares")
        out = {}
        for v in sorted(self._shares):
            got = {u: self._shares[u].sealed[v] for u in sorted(p.graph[v]) if u in self._shares}
            self._to[v] = got
            out[v] = ForwardedShares(p.session_id, v, got)
        self.phase = Phase.MASKED_INPUT
        return out

    # Phase 2 -------------------------------------------------------------------------------------
    def receive_masked_input(self, msg: MaskedInput) -> bool:
        self._expect(Phase.MASKED_INPUT, "MaskedInput")
        p = self.params
        _check_msg(msg, MaskedInput, p)
        if msg.site not in self._to:
            raise ProtocolStateError(f"{msg.site!r} sent a masked input but is not in U2")
        y = msg.masked
        if not isinstance(y, np.ndarray) or y.dtype != np.uint32 or y.ndim != 1:
            raise SecAggError(f"{msg.site!r}: a masked input is a 1-D uint32 array")
        if y.size != p.n_params:
            raise SecAggError(f"{msg.site!r}: masked input has {y.size} values, the round has {p.n_params}")
        digest = hashlib.sha256(y.astype("<u4", copy=False).tobytes()).digest()
        if msg.site in self._masked_digest:
            if self._masked_digest[msg.site] == digest:
                return False
            raise ConflictingMessageError(f"{msg.site!r} sent a second, different masked input")
        self._acc += y  # wraps mod 2^32
        self._masked_digest[msg.site] = digest
        return True

    def unmask_request(self) -> UnmaskRequest:
        """Close phase 2: U3 = who sent a masked input; dropped = U2 \\ U3. Send it to every survivor."""
        self._expect(Phase.MASKED_INPUT, "unmask_request")
        p = self.params
        self._need(len(self._masked_digest), p.threshold + 1, "sites sent masked inputs")
        survivors = tuple(sorted(self._masked_digest))
        dropped = tuple(sorted(set(self._to) - set(survivors)))
        self._request = UnmaskRequest(p.session_id, survivors, dropped)
        self.phase = Phase.UNMASK
        return self._request

    # Phase 3 -------------------------------------------------------------------------------------
    def receive_unmask_response(self, msg: UnmaskResponse) -> bool:
        self._expect(Phase.UNMASK, "UnmaskResponse")
        p = self.params
        _check_msg(msg, UnmaskResponse, p)
        assert self._request is not None
        if msg.site not in self._request.survivors:
            raise ProtocolStateError(f"{msg.site!r} answered the unmask request but is not a survivor")
        b = _check_map(msg.self_mask_shares, "self-mask shares")
        k = _check_map(msg.mask_key_shares, "mask-key shares")
        held = set(self._to[msg.site])
        want_b = held & set(self._request.survivors)
        want_k = held & set(self._request.dropped)
        if set(b) != want_b or set(k) != want_k:
            raise SecAggError(f"{msg.site!r} must reveal b shares of {len(want_b)} survivors and mask-key "
                              f"shares of {len(want_k)} dropped neighbours, got {len(b)} and {len(k)}")
        for u, s in {**b, **k}.items():
            check_share(s, f"{msg.site!r}'s share of {u!r}")
        return self._store(self._responses, msg.site, msg)

    def missing_shares(self) -> dict[str, int]:
        """Secrets still short of the threshold: site → shares still needed (empty when finish() can run)."""
        self._expect(Phase.UNMASK, "missing_shares")
        assert self._request is not None
        have: dict[str, int] = {u: 0 for u in (*self._request.survivors, *self._request.dropped)}
        for r in self._responses.values():
            for u in (*r.self_mask_shares, *r.mask_key_shares):
                have[u] += 1
        return {u: self.params.threshold - c for u, c in have.items() if c < self.params.threshold}

    def finish(self) -> AggregateResult:
        """Rebuild every survivor's b_u and every dropped site's mask key, strip them from the running sum,
        and return the exact sum of the survivors' levels. Raises :class:`ThresholdError` naming the sites
        whose secrets have fewer than t shares (the round can then only be restarted)."""
        self._expect(Phase.UNMASK, "finish")
        p = self.params
        req = self._request
        assert req is not None
        short = self.missing_shares()
        if short:
            names = ", ".join(f"{u} (needs {c} more)" for u, c in sorted(short.items())[:8])
            raise ThresholdError(f"{len(short)} secrets cannot be rebuilt: {names}")
        total = self._acc.copy()
        for u in req.survivors:
            shares = {p.x_of(w): r.self_mask_shares[u] for w, r in self._responses.items()
                      if u in r.self_mask_shares}
            seed = _combine(shares, p.threshold, f"b_{u}")
            if self_mask_commitment(p, u, seed) != self._shares[u].self_mask_commitment:
                raise ReconstructionError(f"b_{u} rebuilt from shares does not match {u!r}'s commitment")
            total -= prg_uint32(self_mask_key(p, u, seed), p.n_params, p.prg)
        for d in req.dropped:
            shares = {p.x_of(w): r.mask_key_shares[d] for w, r in self._responses.items()
                      if d in r.mask_key_shares}
            raw = _combine(shares, p.threshold, f"mask key of {d!r}")
            sk = X25519PrivateKey.from_private_bytes(raw)
            if _public(sk) != self._keys[d].mask_public:
                raise ReconstructionError(f"mask key of {d!r} rebuilt from shares does not match its "
                                          f"public key")
            for u in req.survivors:
                if d not in self._to[u]:  # u masked with exactly the senders the server forwarded to it
                    continue
                m = prg_uint32(pair_mask_key(p, sk, d, u, self._keys[u].mask_public), p.n_params, p.prg)
                if p.precedes(u, d):
                    total -= m  # u added it
                else:
                    total += m  # u subtracted it
        self.phase = Phase.DONE
        return AggregateResult(p, total, req.survivors, req.dropped)

    # Progress (a driver's deadlines) -------------------------------------------------------------
    def progress(self) -> tuple[int, int]:
        """(messages received, messages expected) in the open phase: all participants advertise, U1
        shares, U2 masks, the survivors answer the unmask request; (0, 0) when done."""
        if self.phase == Phase.ADVERTISE:
            return len(self._keys), len(self.params.sites)
        if self.phase == Phase.SHARE_KEYS:
            return len(self._shares), len(self._keys)
        if self.phase == Phase.MASKED_INPUT:
            return len(self._masked_digest), len(self._shares)
        if self.phase == Phase.UNMASK:
            assert self._request is not None
            return len(self._responses), len(self._request.survivors)
        return 0, 0

    @property
    def masked(self) -> frozenset[str]:
        """The sites whose masked input arrived (U3 so far)."""
        return frozenset(self._masked_digest)

    @property
    def responded(self) -> frozenset[str]:
        """The sites whose unmasking shares arrived (they revealed secrets of this round)."""
        return frozenset(self._responses)

    # Helpers -------------------------------------------------------------------------------------
    def _expect(self, phase: Phase, what: str) -> None:
        if self.phase != phase:
            raise ProtocolStateError(f"{what} in phase {self.phase.name} (expected {phase.name})")

    def _from_participant(self, site: str) -> None:
        if not self.params.is_site(site):
            raise ProtocolStateError(f"{site!r} is not a participant of this round")

    def _need(self, have: int, need: int, what: str) -> None:
        if have < need:
            raise ThresholdError(f"only {have} {what}; at least {need} (threshold + 1) are needed")

    @staticmethod
    def _store(table: dict, site: str, msg: object) -> bool:
        if site in table:
            if table[site] == msg:
                return False
            raise ConflictingMessageError(f"{site!r} sent a second, different {type(msg).__name__}")
        table[site] = msg
        return True
