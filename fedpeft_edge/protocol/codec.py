"""Update codec: what a site's adapter delta becomes on the wire, and how the aggregator reads it back.

Encoder (edge side), per round::

    s = delta + residual                     # error feedback: what was not sent before is sent later
    idx, vals, residual = top-k(s)           # kernels.topk_ef, exact: scatter(vals) + residual == s
    q, scales = int8 block quantisation(vals)
    residual[idx] += vals - dequant(q)       # the quantisation error is fed back too

so ``scatter(dequant(sent)) + new_residual == delta + old_residual`` up to float rounding.

Payload layouts (little endian; float sections first so zero-copy numpy views stay 4-byte aligned):

==============  ============================================================  =====================
mode            payload                                                       declared fields
==============  ============================================================  =====================
``fp32``        float32[n]                                                    n
``int8``        float32 scales[ceil(n/block)] · int8 q[n]                     n, block
``topk_fp32``   float32 values[k] · index section                             n, k, index coding
``topk_int8``   float32 scales[ceil(k/block)] · index section · int8 q[k]     n, k, block, coding
==============  ============================================================  =====================

Index section, chosen per message, whichever is smaller:

* ``varint``: k unsigned LEB128 varints; the first is ``idx[0]``, each next one is the gap
  ``idx[j] - idx[j-1] - 1`` (strictly increasing indices make every gap >= 0). Canonical encoding only
  (no trailing 0x00 continuation bytes), at most 5 bytes per varint, values < 2**32.
* ``bitmap``: ceil(n/8) bytes, bit ``i % 8`` (LSB first) of byte ``i // 8`` set iff index i is sent;
  padding bits after n must be zero.

Decoding treats every field as hostile: :func:`parse` checks modes, sizes, exact payload length, index
validity and finite scales/values before any accumulator is touched, and raises
:class:`WireFormatError` (a :class:`fedpeft_edge.runtime.errors.WireError`) with a ``reason`` code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from fedpeft_edge import kernels
from fedpeft_edge.protocol.indices import (
    MAX_VARINT_BYTES,
    decode_bitmap_indices,
    decode_varint_indices,
    encode_indices,
)
from fedpeft_edge.protocol.reasons import Reason, WireFormatError
from fedpeft_edge.runtime.errors import InvalidValueError, NonFiniteError
from fedpeft_edge.runtime.names import CODEC_MODES, DENSE_CODEC_MODES, SPARSE_CODEC_MODES

MODES: Final = CODEC_MODES
TOPK_SCOPES: Final = ("vector", "tensor")
DENSE_MODES: Final = DENSE_CODEC_MODES
SPARSE_MODES: Final = SPARSE_CODEC_MODES
INDEX_CODINGS: Final = ("none", "varint", "bitmap")
# Hard ceiling on vector length: indices travel as uint32 and the C core needs n < 2**32.
MAX_PARAMS_HARD: Final = 2**31

_F32 = np.dtype("<f4")








def _fail(reason: str, message: str) -> WireFormatError:
    return WireFormatError(reason, message)


# --------------------------------------------------------------------------------------------------
# Configuration and the encoded form


@dataclass(frozen=True)
class CodecConfig:
    """How a site compresses its updates.

    ``error_feedback`` keeps what was not sent (top-k remainder, int8 rounding) for the next round; it
    applies to every lossy mode (``fp32`` is lossless and never has a residual).

    Top-k tools (docs/experiments.md measures each; all change only what a site selects, never the wire
    format, so the aggregator needs nothing):

    - ``topk_scope = "tensor"`` selects ``topk_ratio`` of every trainable tensor rather than of the whole
      vector: a tensor whose values are small (LoRA's A and B next to the classifier head) still moves.
    - ``warmup_rounds`` starts at ``warmup_start_ratio`` and shrinks the ratio exponentially to
      ``topk_ratio`` over that many messages (DGC's sparsity warm-up): the first rounds, where the model
      moves most, lose least.
    - ``momentum`` (DGC's momentum correction, 0 = off): the site accumulates a velocity
      ``v = momentum·v + delta`` and feeds ``v`` to error feedback instead of ``delta``; the velocity of
      the values sent is cleared (momentum factor masking).
    """

    mode: str = "topk_int8"
    topk_ratio: float = 0.01
    block: int = 256
    stochastic_rounding: bool = False
    error_feedback: bool = True
    topk_scope: str = "vector"  # vector | tensor
    warmup_rounds: int = 0
    warmup_start_ratio: float = 0.25
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidValueError(f"codec mode must be one of {MODES}, got {self.mode!r}")
        if not (isinstance(self.topk_ratio, float | int) and 0.0 < float(self.topk_ratio) <= 1.0):
            raise InvalidValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or not 1 <= self.block <= 65536:
            raise InvalidValueError(f"block must be an int in [1, 65536], got {self.block!r}")
        if self.topk_scope not in TOPK_SCOPES:
            raise InvalidValueError(f"topk_scope must be one of {TOPK_SCOPES}, got {self.topk_scope!r}")
        if isinstance(self.warmup_rounds, bool) or not isinstance(self.warmup_rounds, int) or \
                not 0 <= self.warmup_rounds <= 1000:
            raise InvalidValueError(f"warmup_rounds must be an int in [0, 1000], got {self.warmup_rounds!r}")
        low = float(self.topk_ratio) if self.warmup_rounds else 0.0  # a warm-up starts above its target
        if not (isinstance(self.warmup_start_ratio, float | int)
                and low <= float(self.warmup_start_ratio) <= 1.0):
            raise InvalidValueError("warmup_start_ratio must be in [topk_ratio, 1], got "
                                    f"{self.warmup_start_ratio!r}")
        if not (isinstance(self.momentum, float | int) and 0.0 <= float(self.momentum) < 1.0):
            raise InvalidValueError(f"momentum must be in [0, 1), got {self.momentum!r}")

    def ratio_at(self, message: int) -> float:
        """The top-k ratio of the ``message``-th update a site encodes (0-based): the warm-up schedule."""
        w = self.warmup_rounds
        if w <= 0 or message >= w:
            return float(self.topk_ratio)
        start, end = float(self.warmup_start_ratio), float(self.topk_ratio)
        return float(start * (end / start) ** (message / w))

    def k_for(self, n: int) -> int:
        """Values sent per message for a vector of ``n`` parameters (``n`` for dense modes)."""
        if self.mode in DENSE_MODES:
            return n
        return min(n, max(1, round(self.topk_ratio * n)))


@dataclass(frozen=True)
class EncodedUpdate:
    """One encoded vector: codec fields plus the payload bytes (exactly what travels in the envelope).

    ``block`` is 0 for the fp32 modes; ``index_coding`` is "none" for dense modes; ``index_nbytes`` is the
    length of the index section inside the payload (0 for dense modes).
    """

    mode: str
    n: int
    k: int
    block: int
    index_coding: str
    index_nbytes: int
    payload: bytes

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire (the envelope adds a fixed ~150 bytes, see wire.py)."""
        return len(self.payload)

    @property
    def density(self) -> float:
        return self.k / self.n if self.n else 0.0


def _nblocks(count: int, block: int) -> int:
    return -(-count // block)


def expected_payload_len(mode: str, n: int, k: int, block: int, index_nbytes: int) -> int:
    """Exact payload length implied by the declared codec fields (no allocation, safe on any ints)."""
    if mode == "fp32":
        return 4 * n
    if mode == "int8":
        return 4 * _nblocks(n, block) + n
    if mode == "topk_fp32":
        return 4 * k + index_nbytes
    return 4 * _nblocks(k, block) + index_nbytes + k


# --------------------------------------------------------------------------------------------------
# Index coding
















# --------------------------------------------------------------------------------------------------
# Encoder




def encode_vector(u: np.ndarray, cfg: CodecConfig, *, residual: np.ndarray | None = None,
                  stochastic_seed: int | None = None, ratio: float | None = None,
                  segments: Sequence[tuple[int, int]] | None = None
                  ) -> tuple[EncodedUpdate, np.ndarray | None]:
    """Encode float32 ``u`` with ``cfg``; returns the message and the new error-feedback residual.

    ``residual`` (float32[n], or None for no error feedback) is what earlier messages did not send; it is
    added before selection and never modified in place on failure (a NonFiniteError leaves it intact). The
    returned residual is None when there is none to keep (fp32, or error feedback off).
    ``ratio`` overrides ``cfg.topk_ratio`` (the warm-up schedule); ``segments`` ((offset, length) of each
    tensor, in order, covering the vector) makes top-k select per tensor (``topk_scope = "tensor"``).
    """
    n = int(u.size)
    if cfg.mode == "fp32":
        if not kernels.all_finite(u):
            raise NonFiniteError("delta holds NaN/Inf")
        return EncodedUpdate("fp32", n, n, 0, "none", 0, u.astype(_F32, copy=False).tobytes()), None
    ef = residual is not None
    if cfg.mode == "int8":
        s = u + residual if ef else u
        q, scales = kernels.quantize_int8(s, cfg.block, stochastic_seed=stochastic_seed)
        new_res = None
        if ef:
            # new residual = s - dequant(q)
            new_res = kernels.dequantize_int8(q, scales, cfg.block)
            np.subtract(s, new_res, out=new_res)
        payload = scales.astype(_F32, copy=False).tobytes() + q.tobytes()
        return EncodedUpdate("int8", n, n, cfg.block, "none", 0, payload), new_res

    base = residual if ef else np.zeros(n, dtype=np.float32)
    # topk_ef validates finiteness before writing; a NonFiniteError leaves the residual intact.
    new_res = np.empty(n, dtype=np.float32)
    r = float(cfg.topk_ratio if ratio is None else ratio)
    if segments is None:
        k = min(n, max(1, round(r * n)))
        idx, vals, new_res = kernels.topk_ef(u, base, k, out_residual=new_res)
    else:
        idx, vals = _topk_per_segment(u, base, r, segments, new_res)
        k = int(idx.size)
    coding, index_bytes = encode_indices(idx, n)
    if cfg.mode == "topk_fp32":
        payload = vals.astype(_F32, copy=False).tobytes() + index_bytes
        block = 0
    else:
        q, scales = kernels.quantize_int8(vals, cfg.block, stochastic_seed=stochastic_seed)
        sent = kernels.dequantize_int8(q, scales, cfg.block)
        # true error feedback: the rounding error of the sent values is sent later too
        new_res[idx] = vals - sent
        payload = scales.astype(_F32, copy=False).tobytes() + index_bytes + q.tobytes()
        block = cfg.block
    return EncodedUpdate(cfg.mode, n, k, block, coding, len(index_bytes), payload), (new_res if ef else None)


def _topk_per_segment(u: np.ndarray, base: np.ndarray, ratio: float, segments: Sequence[tuple[int, int]],
                      out_residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k with error feedback inside each segment (tensor); indices stay global and increasing."""
    n = int(u.size)
    if not kernels.all_finite(u):  # before writing anything: the caller's residual stays intact
        raise NonFiniteError("delta holds NaN/Inf")
    idx_parts, val_parts, end = [], [], 0
    for off, length in segments:
        if off != end or length <= 0:
            raise InvalidValueError("segments must be contiguous, in order, and non-empty")
        end = off + length
        k = min(length, max(1, round(ratio * length)))
        seg = slice(off, end)
        i, v, _ = kernels.topk_ef(u[seg], base[seg], k, out_residual=out_residual[seg])
        idx_parts.append(i.astype(np.uint32) + np.uint32(off))
        val_parts.append(v)
    if end != n:
        raise InvalidValueError(f"segments cover {end} of {n} values")
    return np.concatenate(idx_parts), np.concatenate(val_parts)


# --------------------------------------------------------------------------------------------------
# Decoder side


@dataclass(frozen=True)
class ParsedUpdate:
    """Validated views into an :class:`EncodedUpdate` payload (no copies where alignment allows)."""

    mode: str
    n: int
    indices: np.ndarray | None  # uint32[k], strictly increasing, < n (sparse modes)
    values: np.ndarray | None  # float32 (fp32 modes)
    q: np.ndarray | None  # int8 (int8 modes)
    scales: np.ndarray | None  # float32 (int8 modes)
    block: int


def _f32_view(buf: memoryview, offset: int, count: int) -> np.ndarray:
    arr = np.frombuffer(buf, dtype=_F32, count=count, offset=offset)
    if not arr.flags.aligned or arr.dtype != np.float32:
        arr = arr.astype(np.float32)  # copy to native, aligned memory before handing it to C
    return arr


def check_fields(mode: object, n: object, k: object, block: object, index_coding: object,
                 index_nbytes: object, payload_len: int, *, max_params: int = MAX_PARAMS_HARD) -> None:
    """Validate declared codec fields against each other and the payload length, before any allocation."""
    for name, val in (("n", n), ("k", k), ("block", block), ("index_nbytes", index_nbytes)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise _fail(Reason.BAD_TYPE, f"codec field {name} must be int, got {type(val).__name__}")
    assert isinstance(n, int) and isinstance(k, int) and isinstance(block, int)  # for type checkers
    assert isinstance(index_nbytes, int)
    if mode not in MODES:
        raise _fail(Reason.BAD_MODE, f"unknown codec mode {mode!r}")
    if index_coding not in INDEX_CODINGS:
        raise _fail(Reason.BAD_MODE, f"unknown index coding {index_coding!r}")
    if not 1 <= n <= min(max_params, MAX_PARAMS_HARD):
        raise _fail(Reason.OUT_OF_RANGE, f"n={n} outside [1, {min(max_params, MAX_PARAMS_HARD)}]")
    if mode in DENSE_MODES:
        if k != n or index_coding != "none" or index_nbytes != 0:
            raise _fail(Reason.BAD_MODE, f"dense mode {mode} needs k == n, no index section")
    else:
        if not 1 <= k <= n:
            raise _fail(Reason.OUT_OF_RANGE, f"k={k} outside [1, n={n}]")
        if index_coding == "none":
            raise _fail(Reason.BAD_MODE, f"sparse mode {mode} needs an index coding")
        if index_coding == "bitmap" and index_nbytes != _nblocks(n, 8):
            raise _fail(Reason.LENGTH_MISMATCH,
                        f"bitmap of n={n} is {_nblocks(n, 8)} bytes, not {index_nbytes}")
        if index_coding == "varint" and not k <= index_nbytes <= MAX_VARINT_BYTES * k:
            raise _fail(Reason.LENGTH_MISMATCH, f"{index_nbytes} bytes cannot hold {k} varints")
    if mode.endswith("int8"):
        if not 1 <= block <= 65536:
            raise _fail(Reason.OUT_OF_RANGE, f"block={block} outside [1, 65536]")
    elif block != 0:
        raise _fail(Reason.BAD_MODE, f"mode {mode} carries no quantisation block, got block={block}")
    want = expected_payload_len(mode, n, k, block, index_nbytes)
    if payload_len != want:
        raise _fail(Reason.LENGTH_MISMATCH, f"payload has {payload_len} bytes, fields imply {want}")


def parse(enc: EncodedUpdate, *, n_params: int | None = None, max_params: int = MAX_PARAMS_HARD
          ) -> ParsedUpdate:
    """Validate ``enc`` completely and return typed views of its sections.

    Raises :class:`WireFormatError` on any inconsistency: unknown mode, ``n != n_params``, payload length
    not exactly what the fields imply, bad indices (count, order, range, varint form), non-finite
    scales or values.
    """
    payload = enc.payload
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise _fail(Reason.BAD_TYPE, "payload must be bytes")
    buf = memoryview(payload).cast("B")
    check_fields(enc.mode, enc.n, enc.k, enc.block, enc.index_coding, enc.index_nbytes, buf.nbytes,
                 max_params=max_params)
    n, k, block = enc.n, enc.k, enc.block
    if n_params is not None and n != n_params:
        raise _fail(Reason.OUT_OF_RANGE, f"update has n={n}, expected {n_params}")

    if enc.mode == "fp32":
        vals = _f32_view(buf, 0, n)
        if not kernels.all_finite(vals):
            raise _fail(Reason.NON_FINITE, "fp32 payload holds NaN/Inf")
        return ParsedUpdate("fp32", n, None, vals, None, None, 0)
    if enc.mode == "int8":
        nb = _nblocks(n, block)
        scales = _f32_view(buf, 0, nb)
        _check_scales(scales)
        q = np.frombuffer(buf, dtype=np.int8, count=n, offset=4 * nb)
        _check_q(q)
        return ParsedUpdate("int8", n, None, None, q, scales, block)

    if enc.mode == "topk_fp32":
        vals = _f32_view(buf, 0, k)
        if not kernels.all_finite(vals):
            raise _fail(Reason.NON_FINITE, "top-k values hold NaN/Inf")
        idx = _decode_indices(enc.index_coding, buf[4 * k :], k, n)
        return ParsedUpdate("topk_fp32", n, idx, vals, None, None, 0)
    nb = _nblocks(k, block)
    scales = _f32_view(buf, 0, nb)
    _check_scales(scales)
    ix_end = 4 * nb + enc.index_nbytes
    q = np.frombuffer(buf, dtype=np.int8, count=k, offset=ix_end)
    _check_q(q)
    idx = _decode_indices(enc.index_coding, buf[4 * nb : ix_end], k, n)
    return ParsedUpdate("topk_int8", n, idx, None, q, scales, block)


def _check_scales(scales: np.ndarray) -> None:
    if not kernels.all_finite(scales):
        raise _fail(Reason.NON_FINITE, "quantisation scales hold NaN/Inf")
    if scales.size and float(scales.min()) < 0.0:
        raise _fail(Reason.OUT_OF_RANGE, "negative quantisation scale")


def _check_q(q: np.ndarray) -> None:
    # The quantiser never emits -128; rejecting it keeps |q| <= 127 an invariant norm bounds can use.
    if q.size and int(q.min()) < -127:
        raise _fail(Reason.OUT_OF_RANGE, "int8 value -128 is never produced by the quantiser")


def _decode_indices(coding: str, data: memoryview, k: int, n: int) -> np.ndarray:
    if coding == "varint":
        return decode_varint_indices(data, k, n)
    return decode_bitmap_indices(data, k, n)


def _as_parsed(enc: EncodedUpdate | ParsedUpdate, n_params: int | None) -> ParsedUpdate:
    if isinstance(enc, ParsedUpdate):
        if n_params is not None and enc.n != n_params:
            raise _fail(Reason.OUT_OF_RANGE, f"update has n={enc.n}, expected {n_params}")
        return enc
    return parse(enc, n_params=n_params)


def decode_dense(enc: EncodedUpdate | ParsedUpdate, n_params: int | None = None) -> np.ndarray:
    """The update as a dense float32[n] vector (what the aggregator adds, before weighting)."""
    p = _as_parsed(enc, n_params)
    out = np.zeros(p.n, dtype=np.float32)
    _accumulate_parsed(p, out, 1.0)
    return out


def accumulate_into(enc: EncodedUpdate | ParsedUpdate, acc: np.ndarray, weight: float) -> None:
    """``acc += weight * decode(enc)`` through the fused kernels; validates everything first.

    On any :class:`WireFormatError` ``acc`` is untouched. ``acc`` must be a writable, contiguous
    float32 vector of length ``enc.n``.
    """
    if not isinstance(acc, np.ndarray) or acc.dtype != np.float32 or acc.ndim != 1:
        raise InvalidValueError("acc must be a 1-D float32 numpy array")
    w = float(weight)
    if not np.isfinite(w):
        raise InvalidValueError(f"weight must be finite, got {weight!r}")
    p = _as_parsed(enc, acc.shape[0])
    _accumulate_parsed(p, acc, w)


def _accumulate_parsed(p: ParsedUpdate, acc: np.ndarray, w: float) -> None:
    if p.mode == "fp32":
        kernels.axpy(acc, p.values, w)
    elif p.mode == "int8":
        kernels.dequant_accumulate(acc, p.q, p.scales, p.block, w)
    elif p.mode == "topk_fp32":
        kernels.scatter_add(acc, p.indices, p.values, w)
    else:
        kernels.sparse_dequant_accumulate(acc, p.indices, p.q, p.scales, p.block, w)


def update_l2_norm(enc: EncodedUpdate | ParsedUpdate) -> float:
    """L2 norm of the decoded update without building the dense vector.

    int8 modes use ``sum_b scale_b**2 * sum_{i in b} q_i**2`` in float64 (exact for the dequantised
    values up to float32 rounding of ``q * scale``).
    """
    p = _as_parsed(enc, None)
    if p.values is not None:
        return float(kernels.l2_norm(p.values))
    assert p.q is not None and p.scales is not None
    q32 = p.q.astype(np.int32)
    sq = q32 * q32
    per_block = np.add.reduceat(sq, np.arange(0, sq.size, p.block)) if sq.size else np.zeros(0)
    total = float(np.dot(per_block.astype(np.float64), p.scales.astype(np.float64) ** 2))
    return float(np.sqrt(total))


# --------------------------------------------------------------------------------------------------
# Downlink (global model)


def encode_global(vec: np.ndarray, mode: str = "fp32", *, block: int = 256) -> EncodedUpdate:
    """Encode a global adapter vector for the downlink: ``fp32`` (default, exact) or ``int8`` (dense)."""
    if mode not in DENSE_MODES:
        raise InvalidValueError(f"global mode must be one of {DENSE_MODES}, got {mode!r}")
    v = np.ascontiguousarray(vec, dtype=np.float32)
    if v.ndim != 1 or not 1 <= v.size < MAX_PARAMS_HARD:
        raise InvalidValueError(f"global vector must be 1-D with 1..2**31-1 elements, got shape {v.shape}")
    enc, _ = encode_vector(v, CodecConfig(mode=mode, block=block, error_feedback=False))
    return enc


def decode_global(enc: EncodedUpdate, n_params: int | None = None) -> np.ndarray:
    """Decode a downlink vector; only dense modes are valid for a global model."""
    if enc.mode not in DENSE_MODES:
        raise _fail(Reason.BAD_MODE, f"a global vector must be dense, got mode {enc.mode!r}")
    return decode_dense(enc, n_params)


__all__ = [
    "DENSE_MODES",
    "MODES",
    "SPARSE_MODES",
    "CodecConfig",
    "EncodedUpdate",
    "ParsedUpdate",
    "accumulate_into",
    "check_fields",
    "decode_dense",
    "decode_global",
    "encode_global",
    "encode_vector",
    "parse",
    "update_l2_norm",
]
