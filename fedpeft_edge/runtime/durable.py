"""Atomic file writes shared by every component that must never leave a half-written file behind:
aggregator round state, chunk spool log, agent outbox and state, trainer state, model cache, reports.

A file is written to a temp file in the same directory and renamed over the target, so a reader sees
either the whole old file or the whole new one. ``durable=True`` (the default) also fsyncs the data and
the directory entry, so the new file survives kill -9 and power loss too.

The reading side: :func:`read_npz` turns any damage into one exception type, :func:`move_aside` keeps a
damaged file for inspection (bounded), :func:`remove_temp_files` clears what a killed writer left.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from fedpeft_edge.runtime.errors import InvalidValueError


def fsync_dir(directory: Path) -> None:
    """Make renames/creations inside ``directory`` durable (best effort where a platform cannot)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", *, encoding: str | None = None, durable: bool = True,
                file_mode: int | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on a clean exit it replaces ``path``.

    ``file_mode`` sets the permissions (mkstemp creates files readable by the owner only). On an
    exception the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if file_mode is not None:
            os.chmod(tmp, file_mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_file(path) as fh:
        fh.write(data)


def npz_bytes(arrays: Mapping[str, Any]) -> bytes:
    """``arrays`` as the bytes of an ``np.savez`` file (small state files, written with one atomic write)."""
    import numpy as np  # not at module level: ``fedpeft-edge --help`` must not import numpy

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_npz(path: Path, *, max_bytes: int | None = None) -> dict[str, Any]:
    """Every array of an ``np.savez`` file, read defensively (no pickles, sizes checked before allocating).

    Whatever damage the file has (empty, truncated, garbage, a flipped bit, an absurd shape in a member
    header) ends as :class:`InvalidValueError`; ``OSError`` only when the file cannot be read at all
    (missing, permissions). ``np.load`` alone lets EOFError, BadZipFile, struct/zlib errors or a
    MemoryError for a huge declared shape escape. ``max_bytes``: a larger file counts as damaged.
    """
    path = Path(path)
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise InvalidValueError(f"{path.name}: {size} bytes, more than the {max_bytes} expected")
    out: dict[str, Any] = {}
    with open(path, "rb") as raw:  # OSError here: the file cannot be read at all
        try:
            with zipfile.ZipFile(raw) as zf:
                for info in zf.infolist():
                    out[info.filename[:-4]] = _read_member(zf, info, size)
        except InvalidValueError as exc:
            raise InvalidValueError(f"{path.name}: {exc}") from exc
        # zipfile raises NotImplementedError for a compression method it lacks: damage, like the rest.
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
                OverflowError, NotImplementedError, struct.error, zlib.error) as exc:
            raise InvalidValueError(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from exc
    return out


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive_size: int) -> Any:
    import numpy as np

    fmt = np.lib.format
    name = info.filename
    if not name.endswith(".npy"):
        raise InvalidValueError(f"member {name!r} is not an array")
    # Deflate cannot expand more than ~1032x: a larger claim is a damaged directory entry.
    limit = archive_size if info.compress_type == zipfile.ZIP_STORED else 1032 * archive_size
    if info.file_size > limit:
        raise InvalidValueError(f"member {name!r} claims {info.file_size} bytes")
    with zf.open(info) as fh:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fh)
        else:  # np.savez of plain arrays writes 1.0 (2.0 for huge headers); nothing else is ours
            raise InvalidValueError(f"member {name!r} has .npy version {version}")
        if dtype.hasobject:
            raise InvalidValueError(f"member {name!r} holds Python objects")
        count = 1
        for dim in shape:
            count *= int(dim)
        if count * dtype.itemsize > info.file_size:  # checked before numpy allocates the array
            raise InvalidValueError(f"member {name!r} declares more data than it holds")
    with zf.open(info) as fh:
        return fmt.read_array(fh, allow_pickle=False)


def move_aside(path: Path, *, keep: int = 3, tag: str = "corrupt") -> Path | None:
    """Rename a damaged ``path`` to ``<name>.<tag>-<UTC time>`` beside it, for an operator to inspect,
    keeping at most ``keep`` such copies per name (the oldest go). Returns the new path, or None when
    the file could not be renamed (it is then deleted if possible, so the next start does not trip on it).
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    target = path.with_name(f"{path.name}.{tag}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{tag}-{stamp}-{n}")
        n += 1
    try:
        os.replace(path, target)
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    fsync_dir(path.parent)
    old = sorted(path.parent.glob(f"{glob.escape(path.name)}.{tag}-*"), key=lambda p: p.name)
    for extra in old[:-keep] if keep > 0 else old:
        with contextlib.suppress(OSError):
            extra.unlink()
    return target if target.exists() else None


def remove_temp_files(directory: Path, names: Iterable[str]) -> list[Path]:
    """Delete the temp files :func:`atomic_file` leaves when a process dies mid-write (``.<name>.tmp-*``;
    ``names`` may be glob patterns). Only for a directory no other process is writing into."""
    removed = []
    for name in names:
        for tmp in Path(directory).glob(f".{name}.tmp-*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (model files are large; memory stays flat)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
