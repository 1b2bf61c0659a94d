"""Why untrusted bytes were rejected: the reason codes every decoder raises and the aggregator counts."""

from __future__ import annotations

from fedpeft_edge.runtime.errors import WireError


class Reason:
    """Reason codes carried by :class:`WireFormatError` (and used as counter names by the aggregator)."""

    OVERSIZED = "oversized"  # message/field larger than the configured limit
    TRUNCATED = "truncated"  # bytes end before the structure does
    TRAILING = "trailing_data"  # bytes after a complete message
    MALFORMED = "malformed"  # not valid msgpack / not a map
    BAD_VERSION = "bad_version"
    BAD_KIND = "bad_kind"  # wrong "t" message type
    BAD_KEYS = "bad_keys"  # unknown or missing keys
    BAD_TYPE = "bad_type"  # a field has the wrong type (bool where int expected counts)
    OUT_OF_RANGE = "out_of_range"  # a number outside its allowed range
    BAD_STRING = "bad_string"  # charset/length of an identifier
    NON_FINITE = "non_finite"  # NaN/Inf in metrics, scales or values
    CHECKSUM = "checksum"
    BAD_MODE = "bad_mode"  # unknown codec mode / index coding, or fields inconsistent with it
    LENGTH_MISMATCH = "length_mismatch"  # declared lengths disagree with the payload size
    BAD_INDEX = "bad_index"  # index out of range, not strictly increasing, wrong count
    VARINT = "varint"  # overlong / overflowing / non-canonical varint
    CHUNK = "chunk"  # inconsistent chunk (count, total, duplicate with other data)


class WireFormatError(WireError):
    """Bytes or fields from the network were rejected; ``reason`` is one of :class:`Reason`'s codes."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def reason_of(exc: BaseException) -> str:
    """The reason code of any error raised while reading untrusted bytes ("invalid" if it has none)."""
    return getattr(exc, "reason", "invalid")
