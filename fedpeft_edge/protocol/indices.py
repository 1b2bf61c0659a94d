"""Index coding of sparse updates: strictly increasing uint32 indices as gap varints or as a bitmap.

See the module docstring of :mod:`fedpeft_edge.protocol.codec` for the byte layouts. Decoders treat every
byte as hostile and raise :class:`~fedpeft_edge.protocol.reasons.WireFormatError`.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from fedpeft_edge.protocol.reasons import Reason, WireFormatError

MAX_VARINT_BYTES: Final = 5  # 5 x 7 bits covers uint32


def _fail(reason: str, message: str) -> WireFormatError:
    return WireFormatError(reason, message)


def _nblocks(count: int, block: int) -> int:
    return -(-count // block)


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes per LEB128 varint for uint32 values (vectorised)."""
    v = values.astype(np.uint32, copy=False)
    return (1 + (v >= 1 << 7).astype(np.int64) + (v >= 1 << 14) + (v >= 1 << 21) + (v >= 1 << 28))


def _gaps(indices: np.ndarray) -> np.ndarray:
    gaps = np.empty(indices.size, dtype=np.uint32)
    if indices.size:
        gaps[0] = indices[0]
        np.subtract(indices[1:], indices[:-1], out=gaps[1:])
        gaps[1:] -= 1
    return gaps


def encode_varint_indices(indices: np.ndarray) -> bytes:
    """Delta-coded LEB128 varints of strictly increasing uint32 indices."""
    gaps = _gaps(indices)
    lens = _varint_lengths(gaps)
    starts = np.cumsum(lens) - lens
    out = np.zeros(int(lens.sum()), dtype=np.uint8)
    g = gaps.astype(np.uint64)
    for j in range(MAX_VARINT_BYTES):
        sel = lens > j
        if not sel.any():
            break
        byte = (g[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lens[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (byte | more).astype(np.uint8)
    return out.tobytes()


def decode_varint_indices(data: bytes | memoryview | np.ndarray, k: int, n: int) -> np.ndarray:
    """Inverse of :func:`encode_varint_indices`, safe on hostile bytes.

    Checks: exactly ``k`` varints filling ``data`` exactly, each at most 5 bytes, canonical, value
    < 2**32, and the resulting indices < ``n`` (strictly increasing by construction). Fully vectorised:
    no data-dependent Python loop, so hostile input cannot make it slow.
    """
    b = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if b.size < k or b.size > MAX_VARINT_BYTES * k:
        raise _fail(Reason.LENGTH_MISMATCH, f"{b.size} index bytes cannot hold {k} varints")
    if k == 0:
        return np.empty(0, dtype=np.uint32)
    ends = np.flatnonzero(b < 0x80)  # last byte of every varint
    if ends.size != k:
        reason = Reason.TRUNCATED if ends.size < k else Reason.BAD_INDEX
        raise _fail(reason, f"index section holds {ends.size} varints, header says {k}")
    if ends[-1] != b.size - 1:
        raise _fail(Reason.TRUNCATED, "index section ends inside a varint")
    starts = np.empty(k, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts + 1
    if int(lens.max()) > MAX_VARINT_BYTES:
        raise _fail(Reason.VARINT, "varint longer than 5 bytes")
    if np.any((lens > 1) & (b[ends] == 0)):
        raise _fail(Reason.VARINT, "non-canonical varint (trailing zero byte)")
    five = lens == MAX_VARINT_BYTES
    if five.any() and np.any(b[ends[five]] > 0x0F):
        raise _fail(Reason.VARINT, "varint value exceeds 32 bits")
    # Position of every byte inside its varint, then sum the 7-bit groups per varint.
    pos = np.arange(b.size, dtype=np.int64) - np.repeat(starts, lens)
    parts = (b & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    gaps = np.add.reduceat(parts, starts)
    # idx[j] = sum(gaps[:j+1]) + j; < k * (2**32 + 1) so uint64 cannot overflow for k < 2**31.
    idx = np.cumsum(gaps)
    idx += np.arange(k, dtype=np.uint64)
    if int(idx[-1]) >= n:
        raise _fail(Reason.BAD_INDEX, f"index {int(idx[-1])} out of range for n={n}")
    return idx.astype(np.uint32)


def encode_bitmap_indices(indices: np.ndarray, n: int) -> bytes:
    bits = np.zeros(n, dtype=np.uint8)
    bits[indices] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def decode_bitmap_indices(data: bytes | memoryview | np.ndarray, k: int, n: int) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if b.size != _nblocks(n, 8):
        raise _fail(Reason.LENGTH_MISMATCH, f"bitmap has {b.size} bytes, n={n} needs {_nblocks(n, 8)}")
    bits = np.unpackbits(b, bitorder="little")
    if bits[n:].any():
        raise _fail(Reason.BAD_INDEX, "bitmap has bits set past n")
    idx = np.flatnonzero(bits[:n])
    if idx.size != k:
        raise _fail(Reason.BAD_INDEX, f"bitmap marks {idx.size} indices, header says {k}")
    return idx.astype(np.uint32)


def encode_indices(indices: np.ndarray, n: int) -> tuple[str, bytes]:
    """The smaller of varint and bitmap coding for these indices (ties go to varint)."""
    varint_len = int(_varint_lengths(_gaps(indices)).sum())
    if varint_len <= _nblocks(n, 8):
        return "varint", encode_varint_indices(indices)
    return "bitmap", encode_bitmap_indices(indices, n)
