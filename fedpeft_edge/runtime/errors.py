"""Exception hierarchy.

Every error we raise derives from :class:`FedPeftError`; where a builtin fits, the class also derives from
it (``ValueError``/``TypeError``) so callers can catch either way. No builtin name is reused: a class is
named for what went wrong.

This is the bottom floor: it imports nothing of the package.
"""

from __future__ import annotations


class FedPeftError(Exception):
    """Base of every fedpeft_edge error."""


class KernelError(FedPeftError, RuntimeError):
    """The C core returned an error code that has no more specific mapping."""


class InvalidValueError(ValueError, FedPeftError):
    """An argument has the right type but an unusable value (length, NaN, range)."""


class InvalidTypeError(TypeError, FedPeftError):
    """An argument has the wrong type, dtype, layout or writability."""


class NonFiniteError(InvalidValueError):
    """A buffer holds NaN or Inf where only finite values are allowed."""


class SpecError(InvalidValueError):
    """A PEFT spec is invalid or does not fit the model."""


class WireError(InvalidValueError):
    """Bytes from the network were rejected (malformed, oversized, wrong version...)."""


class UpdateRejected(FedPeftError):
    """A well-formed update was refused by the aggregator (wrong round, spec hash, norm bound...)."""


class MissingDependencyError(FedPeftError, ImportError):
    """An optional package is missing; the message names the command that installs it."""


def ensure(cond: object, message: str, *, raising: type[Exception] = InvalidValueError) -> None:
    """Raise ``raising(message)`` unless ``cond`` is truthy."""
    if not cond:
        raise raising(message)
