"""Ed25519 keys and the bundle signature (``cryptography``; imported on first use, never by ``--help``).

The signature member ``manifest.sig`` is a small JSON object::

    {"alg": "ed25519", "key_id": "<16 hex>", "signature": "<base64 of 64 bytes>"}

The signature covers the exact bytes of ``manifest.json``; the manifest holds the sha256 of every other
member, so one signature vouches for the whole bundle. ``key_id`` (first 16 hex of the sha256 of the raw
public key) only names the key in messages: trust comes from the public key the site is configured with.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fedpeft_edge.bundle.format import BundleError, parse_json
from fedpeft_edge.runtime.errors import ConfigFileError, InvalidValueError, MissingDependencyError

ALG = "ed25519"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise MissingDependencyError("bundle signatures need the cryptography package: "
                                     "pip install 'cryptography>=41'") from exc
    return ed25519


def _serialization() -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization


def _raw_public(public_key: Any) -> bytes:
    s = _serialization()
    return public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def generate_keypair(out_dir: str | os.PathLike[str], name: str = "bundle-signing") -> tuple[Path, Path]:
    """``<out_dir>/<name>.key`` (PKCS#8 PEM, mode 0600, created exclusively) and ``<name>.pub`` (PEM).

    Refuses to overwrite either file: losing a signing key silently would strand every site."""
    ed = _ed25519()
    s = _serialization()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}{PRIVATE_SUFFIX}", out / f"{name}{PUBLIC_SUFFIX}"
    for p in (priv_path, pub_path):
        if p.exists():
            raise InvalidValueError(f"{p} exists; choose another --out folder or --name")
    key = ed.Ed25519PrivateKey.generate()
    pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    # Created 0600 from the start (no window where the key is readable by others), then fchmod'ed in
    # case the umask would have left it narrower than intended.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    pub_path.write_bytes(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def _read_key_file(path: str | os.PathLike[str], role: str) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigFileError(f"{role} {p}: not found") from None
    except OSError as exc:
        raise ConfigFileError(f"{role} {p}: {exc.strerror or exc}") from None
    if len(data) > 16384:
        raise InvalidValueError(f"{role} {p}: {len(data)} bytes is not an Ed25519 PEM key")
    return data


def load_private_key(path: str | os.PathLike[str]) -> Any:
    ed = _ed25519()
    data = _read_key_file(path, "bundle signing key")
    try:
        key = _serialization().load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidValueError(f"bundle signing key {path}: not an unencrypted PEM private key "
                                f"({exc})") from exc
    if not isinstance(key, ed.Ed25519PrivateKey):
        raise InvalidValueError(f"bundle signing key {path}: not an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Any:
    ed = _ed25519()
    data = _read_key_file(path, "bundle public key")
    try:
        key = _serialization().load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise InvalidValueError(f"bundle public key {path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, ed.Ed25519PublicKey):
        raise InvalidValueError(f"bundle public key {path}: not an Ed25519 key")
    return key


def sign_manifest(manifest_bytes: bytes, private_key: Any) -> bytes:
    """The ``manifest.sig`` member for ``manifest_bytes``."""
    record = {"alg": ALG, "key_id": key_id(private_key.public_key()),
              "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii")}
    return json.dumps(record, sort_keys=True, indent=1).encode("ascii")


def signature_key_id(signature_bytes: bytes) -> str:
    """The key id a signature member names (informational; unverified)."""
    rec = parse_json(signature_bytes, "manifest.sig")
    return str(rec.get("key_id", "?"))[:16]


def verify_manifest(manifest_bytes: bytes, signature_bytes: bytes | None, public_key: Any) -> str:
    """Check the signature with the trusted key; returns its key id. Raises :class:`BundleError`."""
    ed = _ed25519()
    from cryptography.exceptions import InvalidSignature

    if signature_bytes is None:
        raise BundleError("unsigned", "the bundle carries no signature (manifest.sig)")
    rec = parse_json(signature_bytes, "manifest.sig")
    if (set(rec) != {"alg", "key_id", "signature"} or rec["alg"] != ALG
            or not isinstance(rec["signature"], str)):
        raise BundleError("malformed", f"manifest.sig must be {{alg: {ALG}, key_id, signature}}")
    try:
        raw = base64.b64decode(rec["signature"], validate=True)
    except ValueError as exc:
        raise BundleError("malformed", "manifest.sig: signature is not base64") from exc
    if len(raw) != 64:
        raise BundleError("malformed", f"manifest.sig: an Ed25519 signature has 64 bytes, not {len(raw)}")
    trusted = key_id(public_key)
    if not isinstance(public_key, ed.Ed25519PublicKey):  # pragma: no cover - load_public_key checks
        raise BundleError("no_key", "the trusted key is not an Ed25519 public key")
    try:
        public_key.verify(raw, manifest_bytes)
    except InvalidSignature:
        named = str(rec.get("key_id"))[:16]
        why = (f"signed by key {named}, the trusted key is {trusted}" if named != trusted
               else "the manifest was changed after signing")
        raise BundleError("bad_signature",
                          f"signature does not verify with the trusted key ({why})") from None
    return trusted


__all__ = ["ALG", "generate_keypair", "key_id", "load_private_key", "load_public_key", "sign_manifest",
           "signature_key_id", "verify_manifest"]
