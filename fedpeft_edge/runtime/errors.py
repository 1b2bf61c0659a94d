"""Exception hierarchy.

Every error we raise derives from :class:`FedPeftError`; where a builtin fits, the class also derives from
it (``ValueError``/``TypeError``) so callers can catch either way. No builtin name is reused: a class is
named for what went wrong.

This is the bottom floor: it imports nothing of the package.
"""

from __future__ import annotations

import os
from pathlib import Path


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


class ConfigFileError(FedPeftError, OSError):
    """A file named by the configuration is missing or unreadable; the message names the file and its role."""


def readable_file(path: str | Path, role: str) -> Path:
    """``path`` as a Path when it is a readable regular file, else a one-line :class:`ConfigFileError`
    ("TLS CA file /etc/x/ca.crt: not found"); ssl and paho would otherwise fail without the file name."""
    p = Path(path)
    try:
        with open(p, "rb"):
            pass
    except FileNotFoundError:
        raise ConfigFileError(f"{role} {p}: not found") from None
    except IsADirectoryError:
        raise ConfigFileError(f"{role} {p}: is a directory, not a file") from None
    except PermissionError:
        raise ConfigFileError(f"{role} {p}: not readable by this user (uid {os.getuid()})") from None
    except OSError as exc:
        raise ConfigFileError(f"{role} {p}: {exc.strerror or exc}") from None
    return p


def ensure(cond: object, message: str, *, raising: type[Exception] = InvalidValueError) -> None:
    """Raise ``raising(message)`` unless ``cond`` is truthy."""
    if not cond:
        raise raising(message)
