"""The arithmetic and cryptography of secure aggregation (protocol/secagg.py has the protocol): the
constants and size limits, the errors, quantisation to integers mod 2^32, a round's parameters and its
neighbour graph, the mask PRG, key agreement and derivation, Shamir secret sharing over GF(2^127 - 1),
and the input checks both sides share.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpeft_edge.runtime.errors import InvalidTypeError, InvalidValueError, NonFiniteError

Randomness = Callable[[int], bytes]
U32Array = npt.NDArray[np.uint32]


VERSION: Final = 1
_DOMAIN: Final = b"fedpeft-secagg/v1/"
MODULUS_BITS: Final = 32  # masked values live in Z/2^32 (numpy uint32 arithmetic wraps exactly there)
KEY_BYTES: Final = 32  # X25519 keys, HKDF outputs, seeds
SESSION_ID_BYTES: Final = 32
ROUND_SEED_BYTES: Final = 32
COMMIT_BYTES: Final = 32

# Shamir over the Mersenne prime 2^127 - 1: a 32-byte secret is cut into 15/15/2-byte limbs (each < 2^120 < p)
# and each limb is shared with the same polynomial degree; a share is 3 field elements of 16 bytes.
FIELD_PRIME: Final = (1 << 127) - 1
_LIMB_LENS: Final = (15, 15, 2)
_ELEM_BYTES: Final = 16
SHARE_BYTES: Final = _ELEM_BYTES * len(_LIMB_LENS)  # 48

# Sealed share bundle u → v: nonce · ChaCha20-Poly1305(version · share of u's mask key · share of b_u) · tag.
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_PLAINTEXT_BYTES: Final = 1 + 2 * SHARE_BYTES  # 97
SEALED_SHARE_BYTES: Final = _NONCE_BYTES + _PLAINTEXT_BYTES + _TAG_BYTES  # 125

PRGS: Final = ("aes256-ctr", "chacha20")
# Site ids become MQTT topic levels (same rule as protocol.wire): no '/', '+', '#', spaces or controls.
SITE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
MAX_ID_LEN: Final = 64
MAX_SITES: Final = 4096  # per round: sizes of every message stay bounded
MAX_PARAMS: Final = 1 << 28  # 1 GiB masked vector; far above any adapter this package trains
MAX_ROUND: Final = 1 << 40


# --------------------------------------------------------------------------------------------------
# Errors


class SecAggError(InvalidValueError):
    """A secure-aggregation message or call was refused; nothing changed."""


class ProtocolStateError(SecAggError):
    """A message or call out of order, for another session or site, or from a site not in the phase."""


class ConflictingMessageError(SecAggError):
    """A site sent a second, different message for a phase (an identical copy is accepted as a no-op)."""


class PrivacyRefusal(SecAggError):
    """A site was asked to reveal both its share of b_u and of u's mask key: the core privacy rule."""


class TamperedShareError(SecAggError):
    """An encrypted share failed authentication (modified, truncated, or for another pair or round)."""


class ThresholdError(SecAggError):
    """Fewer than ``threshold`` participants or shares where at least that many are needed."""


class ReconstructionError(SecAggError):
    """Shares combined to a secret that does not match its public key or commitment (a lying share holder)."""


# --------------------------------------------------------------------------------------------------
# Quantisation: float update → integers mod 2^32 with a round-public scale, and the sum back


@dataclass(frozen=True)
class QuantSpec:
    """Fixed-point encoding shared by every site of a round.

    Each coordinate is clipped to ``[-clip, clip]`` and mapped to an integer level in ``[-L, L]`` with
    ``L = 2^(bits-1) - 1`` and ``scale = clip / L``. The server only sees the sum of at most ``max_sites``
    levels, read as a signed 32-bit integer: the no-wrap rule is ``max_sites * L <= 2^31 - 1``
    (checked here). On the wire a masked coordinate costs 4 bytes whatever ``bits`` is, so the largest
    ``bits`` the site count allows (:meth:`largest_bits`) gives the finest grid for free.

    Precision lost (per coordinate, before the server divides by the survivor count): clipping (whatever
    lies beyond ±clip) plus rounding — at most ``scale / 2`` per site with deterministic rounding, less than
    ``scale`` (and unbiased) with stochastic rounding. :meth:`error_bound` gives the bound for a sum.
    """

    clip: float
    bits: int = 16
    max_sites: int = 1024
    stochastic: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.clip, bool) or not isinstance(self.clip, int | float):
            raise InvalidTypeError(f"QuantSpec.clip must be a number, got {type(self.clip).__name__}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise InvalidValueError(f"QuantSpec.clip must be finite and > 0, got {self.clip!r}")
        object.__setattr__(self, "clip", float(self.clip))
        _check_int("QuantSpec.bits", self.bits, 2, 31)
        _check_int("QuantSpec.max_sites", self.max_sites, 1, MAX_SITES)
        if not isinstance(self.stochastic, bool):
            raise InvalidTypeError("QuantSpec.stochastic must be a bool")
        if self.max_sites * self.levels > (1 << 31) - 1:
            raise InvalidValueError(
                f"QuantSpec: {self.max_sites} sites x {self.levels} levels can wrap a signed 32-bit sum; "
                f"use bits <= {self.largest_bits(self.max_sites)}")

    @property
    def levels(self) -> int:
        """L: the largest integer level of one site's coordinate."""
        return (1 << (self.bits - 1)) - 1

    @property
    def scale(self) -> float:
        """The float value of one integer level."""
        return self.clip / self.levels

    @staticmethod
    def largest_bits(max_sites: int) -> int:
        """The largest ``bits`` for which ``max_sites`` summed levels cannot wrap."""
        _check_int("max_sites", max_sites, 1, MAX_SITES)
        bits = 31
        while max_sites * ((1 << (bits - 1)) - 1) > (1 << 31) - 1:
            bits -= 1
        return bits

    def error_bound(self, count: int) -> float:
        """Bound on |dequantised sum - sum of clipped inputs| per coordinate, for ``count`` sites."""
        return count * self.scale * (1.0 if self.stochastic else 0.5)


def quantize(x: npt.ArrayLike, spec: QuantSpec, *, randomness: Randomness = os.urandom) -> U32Array:
    """A dense float update as levels in Z/2^32 (two's complement of the signed level).

    Stochastic rounding draws its uniforms from a generator seeded with 32 bytes of ``randomness``."""
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float64) or arr.ndim != 1:
        raise InvalidTypeError(f"quantize needs a 1-D float32/float64 vector, got {arr.dtype} with shape "
                               f"{arr.shape}")
    if arr.size == 0 or arr.size > MAX_PARAMS:
        raise InvalidValueError(f"quantize: length {arr.size} outside [1, {MAX_PARAMS}]")
    if not np.isfinite(arr).all():
        raise NonFiniteError("quantize: the update holds NaN or Inf")
    v = np.clip(arr.astype(np.float64), -spec.clip, spec.clip) / spec.scale
    if spec.stochastic:
        seed = int.from_bytes(_random_bytes(randomness, 32), "little")
        v = np.floor(v + np.random.Generator(np.random.PCG64(seed)).random(v.size))
    else:
        v = np.rint(v)
    q = np.clip(v, -spec.levels, spec.levels).astype(np.int32)  # the clip only guards float edge cases
    return q.view(np.uint32)


def clipped_count(x: npt.ArrayLike, spec: QuantSpec) -> int:
    """How many coordinates :func:`quantize` saturates (worth logging: clipping error is unbounded)."""
    arr = np.asarray(x)
    return int(np.count_nonzero(np.abs(arr) > spec.clip))


def dequantize_sum(total: U32Array, spec: QuantSpec, count: int) -> npt.NDArray[np.float64]:
    """The float sum of ``count`` sites' updates from the sum of their levels mod 2^32."""
    arr = _u32_vector("total", total)
    _check_int("count", count, 1, spec.max_sites)
    # count <= max_sites keeps |sum of levels| <= 2^31 - 1, so the signed reading is the true integer sum.
    return arr.view(np.int32).astype(np.float64) * spec.scale


def dequantize_mean(total: U32Array, spec: QuantSpec, count: int) -> npt.NDArray[np.float32]:
    """The unweighted mean of ``count`` sites' updates (float32, like every adapter vector here)."""
    return (dequantize_sum(total, spec, count) / count).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Round parameters and the communication graph


@dataclass(frozen=True)
class SecAggParams:
    """Everything public about one secure-aggregation round; every site and the server hold the same.

    ``sites`` are the round's registered participants (stored sorted: the order gives pair signs and
    Shamir x-coordinates). ``neighbours`` (k) is the degree of the communication graph (k = n - 1 is classic
    SecAgg), ``threshold`` (t) the number of shares that rebuild a secret: k/2 < t <= k, so a server can
    never gather t shares of both kinds for one site from its k neighbours, and each neighbourhood tolerates
    k - t dropouts. ``round_seed`` (32 public bytes, fresh per round) places the sites on the graph.
    """

    fleet: str
    round: int
    sites: tuple[str, ...]
    neighbours: int
    threshold: int
    n_params: int
    quant: QuantSpec
    round_seed: bytes
    prg: str = "aes256-ctr"

    def __post_init__(self) -> None:
        _check_id("fleet", self.fleet)
        _check_int("round", self.round, 0, MAX_ROUND)
        if isinstance(self.sites, str) or not isinstance(self.sites, Sequence):
            raise InvalidTypeError("sites must be a sequence of site ids")
        for s in self.sites:
            _check_id("site", s)
        sites = tuple(sorted(self.sites))
        if len(set(sites)) != len(sites):
            raise InvalidValueError("sites holds duplicate ids")
        object.__setattr__(self, "sites", sites)
        n = len(sites)
        if not isinstance(self.quant, QuantSpec):
            raise InvalidTypeError("quant must be a QuantSpec")
        if not 2 <= n <= self.quant.max_sites:
            raise InvalidValueError(f"{n} sites outside [2, quant.max_sites={self.quant.max_sites}]")
        _check_int("neighbours", self.neighbours, 1, n - 1)
        if (n * self.neighbours) % 2:
            raise InvalidValueError(f"no {self.neighbours}-regular graph on {n} sites (n*k must be even)")
        _check_int("threshold", self.threshold, self.neighbours // 2 + 1, self.neighbours)
        _check_int("n_params", self.n_params, 1, MAX_PARAMS)
        if not isinstance(self.round_seed, bytes) or len(self.round_seed) != ROUND_SEED_BYTES:
            raise InvalidValueError(f"round_seed must be {ROUND_SEED_BYTES} bytes")
        if self.prg not in PRGS:
            raise InvalidValueError(f"prg must be one of {PRGS}, got {self.prg!r}")

    @classmethod
    def classic(cls, fleet: str, round: int, sites: Sequence[str], threshold: int, n_params: int,
                quant: QuantSpec, round_seed: bytes, prg: str = "aes256-ctr") -> SecAggParams:
        """Classic SecAgg: every site pairs with every other (k = n - 1)."""
        return cls(fleet, round, tuple(sites), len(sites) - 1, threshold, n_params, quant, round_seed, prg)

    @staticmethod
    def default_threshold(neighbours: int) -> int:
        """The smallest allowed threshold (tolerates the most dropouts): floor(k/2) + 1."""
        return neighbours // 2 + 1

    @cached_property
    def session_id(self) -> bytes:
        """SHA-256 of every public parameter: the salt of every key derivation and the tag of every message,
        so nothing of one round (or of a round with other parameters) is accepted in another."""
        h = hashlib.sha256(_DOMAIN + b"session")
        h.update(_lp(self.fleet) + struct.pack("<QQQQ", self.round, self.neighbours, self.threshold,
                                               self.n_params))
        h.update(struct.pack("<dQQ?", self.quant.clip, self.quant.bits, self.quant.max_sites,
                             self.quant.stochastic))
        h.update(self.round_seed + _lp(self.prg) + struct.pack("<Q", len(self.sites)))
        for s in self.sites:
            h.update(_lp(s))
        return h.digest()

    @cached_property
    def graph(self) -> dict[str, frozenset[str]]:
        """The k-regular communication graph (see :func:`neighbour_graph`)."""
        return neighbour_graph(self.sites, self.neighbours, self.round_seed)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.sites)}

    def x_of(self, site: str) -> int:
        """The Shamir x-coordinate of a share held by ``site`` (1-based, public, never 0)."""
        return self._index[site] + 1

    def precedes(self, a: str, b: str) -> bool:
        """Pair sign rule: of a pair, the earlier site in ``sites`` adds the mask, the other subtracts."""
        return self._index[a] < self._index[b]

    def is_site(self, site: object) -> bool:
        return isinstance(site, str) and site in self._index


def neighbour_graph(sites: Sequence[str], k: int, round_seed: bytes) -> dict[str, frozenset[str]]:
    """A k-regular graph over ``sites``: the Harary graph H(k, n) on a ring whose order is a public
    pseudo-random permutation of the sites derived from ``round_seed``.

    On the ring each site links to its k//2 nearest on each side, and for odd k (n is then even) also to
    the opposite site. Symmetric, degree exactly k, and the same everywhere: the permutation sorts by
    SHA-256(round_seed, site), which needs no shared random-number library (numpy streams may change)."""
    n = len(sites)
    if len(set(sites)) != n:
        raise InvalidValueError("neighbour_graph: duplicate site ids")
    _check_int("k", k, 1, max(n - 1, 1))
    if n < 2 or (n * k) % 2:
        raise InvalidValueError(f"no {k}-regular graph on {n} sites")
    def place(s: str) -> tuple[bytes, str]:
        return hashlib.sha256(_DOMAIN + b"graph" + round_seed + _lp(s)).digest(), s

    order = sorted(sites, key=place)
    adj: dict[str, set[str]] = {s: set() for s in order}
    for i, s in enumerate(order):
        offsets = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
        for d in offsets:
            t = order[(i + d) % n]
            adj[s].add(t)
            adj[t].add(s)
    return {s: frozenset(adj[s]) for s in sorted(adj)}


# --------------------------------------------------------------------------------------------------
# Primitives: PRG, key derivation, authenticated channel, Shamir


def prg_uint32(key: bytes, n: int, algorithm: str = "aes256-ctr") -> U32Array:
    """``n`` pseudo-random uint32 values from a 32-byte key (the key stream of AES-256-CTR or ChaCha20 with a
    zero nonce: every key here is derived for one round, one use). AES is ~4x faster with AES-NI (x86,
    ARMv8 crypto extensions); ChaCha20 is the constant-time choice for cores without AES instructions."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise InvalidValueError(f"PRG key must be {KEY_BYTES} bytes")
    _check_int("n", n, 1, MAX_PARAMS)
    if algorithm == "aes256-ctr":
        enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    elif algorithm == "chacha20":
        enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    else:
        raise InvalidValueError(f"unknown PRG {algorithm!r}")
    zeros = np.zeros(4 * n, dtype=np.uint8)
    out = np.empty(4 * n + 16, dtype=np.uint8)  # update_into wants room for one extra block
    written = enc.update_into(zeros, out)
    if written != 4 * n:  # pragma: no cover - stream ciphers return all input at once
        raise SecAggError(f"PRG returned {written} bytes, expected {4 * n}")
    return out[: 4 * n].view("<u4").astype(np.uint32, copy=False)


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(ikm)


def _lp(s: str) -> bytes:
    """Length-prefixed UTF-8: concatenations of several ids stay unambiguous."""
    b = s.encode()
    return struct.pack("<H", len(b)) + b


def _pair(a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return _lp(lo) + _lp(hi)


def _agree(private: X25519PrivateKey, public: bytes, what: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # a small-order point gives the all-zero secret, which OpenSSL refuses
        raise SecAggError(f"{what}: unusable X25519 public key") from exc


_PROBE_KEY: Final = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def check_public_key(key: object, what: str) -> bytes:
    """A 32-byte X25519 public key that is not a small-order point (those give an all-zero secret)."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise SecAggError(f"{what}: an X25519 public key is {KEY_BYTES} bytes")
    _agree(_PROBE_KEY, key, what)  # clamped scalars kill every small-order point, so one probe suffices
    return key


def pair_mask_key(params: SecAggParams, private: X25519PrivateKey, own: str, peer: str, peer_public: bytes
                  ) -> bytes:
    """The PRG key of the pairwise mask between ``own`` and ``peer`` (the same from either side)."""
    secret = _agree(private, peer_public, f"mask key of {own}-{peer}")
    return _hkdf(secret, params.session_id, _DOMAIN + b"pair-mask" + _pair(own, peer))


def self_mask_key(params: SecAggParams, site: str, seed: bytes) -> bytes:
    return _hkdf(seed, params.session_id, _DOMAIN + b"self-mask" + _lp(site))


def self_mask_commitment(params: SecAggParams, site: str, seed: bytes) -> bytes:
    """Published in phase 1 so the server can tell a correctly rebuilt b_u from one corrupted by a bad share
    (hiding: the seed is 32 uniform bytes)."""
    return hashlib.sha256(_DOMAIN + b"self-commit" + params.session_id + _lp(site) + seed).digest()


def _channel_key(params: SecAggParams, private: X25519PrivateKey, own: str, peer: str, peer_public: bytes
                 ) -> bytes:
    secret = _agree(private, peer_public, f"share channel {own}-{peer}")
    return _hkdf(secret, params.session_id, _DOMAIN + b"share-enc" + _pair(own, peer))


def _share_ad(params: SecAggParams, sender: str, receiver: str) -> bytes:
    # Binds round (via the session id), direction and both ends: a ciphertext replayed to another pair,
    # the other direction or another round fails authentication.
    return _DOMAIN + b"share" + params.session_id + _lp(sender) + _lp(receiver)


def _random_bytes(randomness: Randomness, n: int) -> bytes:
    b = randomness(n)
    if not isinstance(b, bytes) or len(b) != n:
        raise InvalidValueError(f"randomness({n}) must return exactly {n} bytes")
    return b


def _field_element(randomness: Randomness) -> int:
    while True:  # rejection sampling: uniform on [0, p); a retry has probability 2^-127
        r = int.from_bytes(_random_bytes(randomness, 16), "little") & ((1 << 127) - 1)
        if r < FIELD_PRIME:
            return r


def shamir_split(secret: bytes, xs: Sequence[int], threshold: int, randomness: Randomness = os.urandom
                 ) -> dict[int, bytes]:
    """Shares of a 32-byte ``secret`` at x-coordinates ``xs``; any ``threshold`` of them rebuild it, fewer
    reveal nothing. One random polynomial of degree threshold - 1 per limb."""
    if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
        raise InvalidValueError(f"shamir_split: the secret must be {KEY_BYTES} bytes")
    _check_xs(xs)
    _check_int("threshold", threshold, 1, max(len(xs), 1))
    shares = {x: bytearray() for x in xs}
    pos = 0
    for size in _LIMB_LENS:
        coeffs = [int.from_bytes(secret[pos:pos + size], "little")]
        coeffs += [_field_element(randomness) for _ in range(threshold - 1)]
        pos += size
        for x in xs:
            y = 0
            for c in reversed(coeffs):  # Horner
                y = (y * x + c) % FIELD_PRIME
            shares[x] += y.to_bytes(_ELEM_BYTES, "little")
    return {x: bytes(b) for x, b in shares.items()}


def shamir_combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (the ``threshold`` with the smallest x are used)."""
    _check_int("threshold", threshold, 1, MAX_SITES)
    if len(shares) < threshold:
        raise ThresholdError(f"{len(shares)} shares, {threshold} needed")
    xs = sorted(shares)[:threshold]
    _check_xs(xs)
    for x in xs:
        check_share(shares[x], f"share at x={x}")
    # Lagrange coefficients at 0: lambda_j = prod_{m != j} x_m / (x_m - x_j)
    lams = []
    for j in xs:
        num, den = 1, 1
        for m in xs:
            if m != j:
                num = num * m % FIELD_PRIME
                den = den * (m - j) % FIELD_PRIME
        lams.append(num * pow(den, -1, FIELD_PRIME) % FIELD_PRIME)
    out = bytearray()
    for li, size in enumerate(_LIMB_LENS):
        off = li * _ELEM_BYTES
        val = sum(lam * int.from_bytes(shares[x][off:off + _ELEM_BYTES], "little")
                  for lam, x in zip(lams, xs, strict=True)) % FIELD_PRIME
        if val >= 1 << (8 * size):
            raise ReconstructionError("shares are inconsistent (a limb is out of range)")
        out += val.to_bytes(size, "little")
    return bytes(out)


def check_share(share: object, what: str) -> bytes:
    """A well-formed share: 48 bytes, each 16-byte field element below p."""
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        raise SecAggError(f"{what}: a share is {SHARE_BYTES} bytes")
    for off in range(0, SHARE_BYTES, _ELEM_BYTES):
        if int.from_bytes(share[off:off + _ELEM_BYTES], "little") >= FIELD_PRIME:
            raise SecAggError(f"{what}: field element out of range")
    return share


def _check_xs(xs: Iterable[int]) -> None:
    seen = set()
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < FIELD_PRIME or x in seen:
            raise InvalidValueError("Shamir x-coordinates must be distinct ints in [1, p)")
        seen.add(x)


# --------------------------------------------------------------------------------------------------
# Checks shared by both sides


def _combine(shares: Mapping[int, bytes], threshold: int, what: str) -> bytes:
    try:
        return shamir_combine(shares, threshold)
    except ReconstructionError as exc:
        raise ReconstructionError(f"{what}: {exc}") from None


def _public(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes_raw()


def _check_int(name: str, val: object, lo: int, hi: int) -> int:
    if isinstance(val, bool) or not isinstance(val, int):
        raise InvalidTypeError(f"{name} must be an int, got {type(val).__name__}")
    if not lo <= val <= hi:
        raise InvalidValueError(f"{name}={val} outside [{lo}, {hi}]")
    return val


def _check_id(what: str, val: object) -> str:
    if not isinstance(val, str) or not 1 <= len(val) <= MAX_ID_LEN or not SITE_ID_RE.fullmatch(val):
        raise InvalidValueError(f"{what} {val!r} must match [A-Za-z0-9][A-Za-z0-9_.-]* with 1..{MAX_ID_LEN} "
                                f"chars")
    return val


def _check_msg(msg: object, cls: type, params: SecAggParams) -> None:
    if not isinstance(msg, cls):
        raise ProtocolStateError(f"expected {cls.__name__}, got {type(msg).__name__}")
    if msg.session != params.session_id:  # type: ignore[attr-defined]
        raise ProtocolStateError(f"{cls.__name__} belongs to another round or parameter set (session id)")
    for attr in ("site", "to"):
        if hasattr(msg, attr) and not params.is_site(getattr(msg, attr)):
            raise ProtocolStateError(f"{cls.__name__} names {getattr(msg, attr)!r}, not a participant of "
                                     f"this round")


def _check_map(val: object, what: str) -> dict:
    if not isinstance(val, Mapping):
        raise SecAggError(f"{what} must be a mapping")
    for key in val:
        if not isinstance(key, str):
            raise SecAggError(f"{what}: keys must be site ids")
    return dict(val)


def _check_site_list(params: SecAggParams, val: object, what: str) -> frozenset[str]:
    if not isinstance(val, tuple | list) or not all(isinstance(s, str) for s in val):
        raise SecAggError(f"{what} must be a sequence of site ids")
    out = frozenset(val)
    if len(out) != len(val):
        raise SecAggError(f"{what} holds duplicates")
    for s in out:
        if not params.is_site(s):
            raise SecAggError(f"{what}: {s!r} is not a participant of this round")
    return out


def _u32_vector(what: str, arr: object) -> U32Array:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint32 or arr.ndim != 1:
        raise InvalidTypeError(f"{what} must be a 1-D uint32 numpy array")
    return arr
