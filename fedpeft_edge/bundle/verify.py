"""Site side: verify a bundle (:func:`verify_bundle`) and extract it (:func:`extract_bundle`).

Order of the checks, cheapest and most fundamental first: file size and zip structure (names, types,
sizes, compression: :func:`.format.open_bundle`) → manifest format version → signature over the manifest
with the trusted key → bundle id against the manifest content → the member list against the manifest →
the sha256 of every member. Extraction streams each member into a temporary folder beside the target
while hashing it and renames the folder into place only when every member matched, so a refused bundle
leaves nothing behind and a verified extraction is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft_edge.bundle.format import (
    DEFAULT_LIMITS,
    GRADIENT_PREFIX,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    BundleError,
    BundleLimits,
    OpenedBundle,
    open_bundle,
)
from fedpeft_edge.runtime.durable import fsync_dir

VERIFIED_MARKER = ".verified.json"  # written last into an extracted folder: its presence means complete


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    bundle_id: str
    manifest: dict[str, Any]
    signed: bool
    key_id: str | None  # the trusted key that verified the signature (None: unsigned, allowed)
    bytes_checked: int


@dataclass(frozen=True)
class ExtractedBundle:
    """A verified bundle's members on disk under ``directory`` (``gradient/``, ``preprocess/``...)."""

    directory: Path
    bundle_id: str
    manifest: dict[str, Any]
    signed: bool
    key_id: str | None
    reused: bool  # an earlier verified extraction of the same bundle id was found and used

    @property
    def gradient_dir(self) -> Path:
        return self.directory / GRADIENT_PREFIX.rstrip("/")

    @property
    def tokenizer(self) -> Path | None:
        return self.directory / TOKENIZER_NAME if self.manifest["model"].get("tokenizer") else None


def _check_trust(b: OpenedBundle, public_key: Any, allow_unsigned: bool) -> str | None:
    """The signature with the trusted key; unsigned or unverifiable only when ``allow_unsigned``."""
    from fedpeft_edge.bundle.signing import verify_manifest

    if b.signature_bytes is None:
        if allow_unsigned:
            return None
        raise BundleError("unsigned", "the bundle carries no signature (manifest.sig); sign it with "
                                      "`fedpeft-edge bundle sign` or set allow_unsigned for development")
    if public_key is None:
        if allow_unsigned:
            return None
        raise BundleError("no_key", "no trusted public key configured to check the bundle's signature")
    return verify_manifest(b.manifest_bytes, b.signature_bytes, public_key)


def _opened_and_trusted(path: Path, public_key: Any, allow_unsigned: bool,
                        limits: BundleLimits) -> tuple[OpenedBundle, str | None]:
    b = open_bundle(path, limits)
    try:
        key = _check_trust(b, public_key, allow_unsigned)
        b.check_id()
        b.check_listing()
    except BaseException:
        b.close()
        raise
    return b, key


def verify_bundle(path: str | os.PathLike[str], public_key: Any = None, *, allow_unsigned: bool = False,
                  limits: BundleLimits = DEFAULT_LIMITS) -> VerifiedBundle:
    """Every check, every member hashed, nothing written. Raises :class:`BundleError`."""
    b, key = _opened_and_trusted(Path(path), public_key, allow_unsigned, limits)
    with b:
        checked = b.verify_files()
        signed = b.signature_bytes is not None and key is not None
        return VerifiedBundle(Path(path), b.bundle_id, b.manifest, signed, key, checked)


def _marker_ok(folder: Path, b: OpenedBundle) -> bool:
    """A complete earlier extraction of this very manifest (its files still have their sizes)."""
    try:
        marker = json.loads((folder / VERIFIED_MARKER).read_text(encoding="utf-8"))
        if (marker.get("bundle_id") != b.bundle_id
                or (folder / MANIFEST_NAME).read_bytes() != b.manifest_bytes):
            return False
        for name, info in b.files.items():
            f = folder.joinpath(*name.split("/"))
            if f.is_symlink() or not f.is_file() or f.stat().st_size != info["bytes"]:
                return False
        return True
    except (OSError, ValueError, AttributeError):
        return False


def extract_bundle(path: str | os.PathLike[str], root: str | os.PathLike[str], public_key: Any = None, *,
                   allow_unsigned: bool = False, limits: BundleLimits = DEFAULT_LIMITS,
                   keep_others: bool = False) -> ExtractedBundle:
    """Verify ``path`` and extract it to ``<root>/<bundle_id>`` (atomically); reuse a verified extraction
    of the same bundle id. Other bundle ids' folders under ``root`` are removed unless ``keep_others``."""
    root = Path(root)
    b, key = _opened_and_trusted(Path(path), public_key, allow_unsigned, limits)
    signed = b.signature_bytes is not None and key is not None
    with b:
        target = root / b.bundle_id
        if _marker_ok(target, b):
            return ExtractedBundle(target, b.bundle_id, b.manifest, signed, key, reused=True)
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*.tmp-*"):  # what a killed extraction left (one agent per state dir)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{b.bundle_id[:16]}.tmp-", dir=root))
        try:
            (tmp / MANIFEST_NAME).write_bytes(b.manifest_bytes)
            for name in sorted(b.files, key=lambda n: b.members[n].header_offset):
                dest = tmp.joinpath(*name.split("/"))
                # names were checked (plain relative components), this is belt and braces
                if tmp.resolve() not in dest.resolve().parents:
                    raise BundleError("unsafe_path", f"member {name!r} resolves outside the folder")
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as fh:
                    b.copy_member(name, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            marker = {"bundle_id": b.bundle_id, "signed": signed, "key_id": key, "source": str(path)}
            (tmp / VERIFIED_MARKER).write_text(json.dumps(marker, sort_keys=True), encoding="utf-8")
            fsync_dir(tmp)
            if target.exists():  # an incomplete or damaged earlier attempt: replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
            fsync_dir(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not keep_others:
            for other in root.iterdir():
                if other.is_dir() and other.name != b.bundle_id and not other.name.startswith("."):
                    shutil.rmtree(other, ignore_errors=True)
        return ExtractedBundle(target, b.bundle_id, b.manifest, signed, key, reused=False)


__all__ = ["VERIFIED_MARKER", "ExtractedBundle", "VerifiedBundle", "extract_bundle", "verify_bundle"]
