"""The site bundle file: layout, manifest, limits, and the strict reader (structure, manifest, hashes).

One uncompressed zip (``ZIP_STORED``) holds everything a site needs::

    manifest.json                   what is inside, sha256 of every other member, the settings (below)
    manifest.sig                    Ed25519 signature over the exact bytes of manifest.json (optional)
    gradient/gradient.json          the gradient model folder (peft/lowering): manifest,
    gradient/gradient_model.onnx      gradient and eval graphs, the frozen base (external data of both
    gradient/eval_model.onnx          graphs) and the starting adapter vector
    gradient/base.data
    gradient/initial_params.npy
    preprocess/tokenizer.json       text models: the tokenizer the data layer (data/text.py) loads
    inference/model.onnx            only if an inference model was given to ``prepare``

Why a zip, stored: the central directory lists every member (name, size, type) before a byte is
extracted, so unsafe names and sizes are refused up front and the manifest is read without scanning the
base; stored members are written to disk as they are, so the extracted ``base.data`` is an ordinary file
onnxruntime maps (frozen float32 weights deflate by ~8 % at a cost of seconds on a gateway).

The manifest (JSON) carries ``format``/``format_version``, ``bundle_id`` (sha256 of the canonical JSON of
every other manifest key), ``created``, ``fleet``, ``codec`` defaults, ``runtime`` (the onnxruntime range
the lowered graphs need), ``model`` (kind, base sha256, preprocessing), ``labels``, ``peft`` (spec and
spec hash), ``inference_model`` and ``files`` (name -> sha256, bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from fedpeft_edge.runtime.errors import InvalidValueError

FORMAT: Final = "fedpeft-edge-site-bundle"
FORMAT_VERSION: Final = 1
MANIFEST_NAME: Final = "manifest.json"
SIGNATURE_NAME: Final = "manifest.sig"
GRADIENT_PREFIX: Final = "gradient/"
TOKENIZER_NAME: Final = "preprocess/tokenizer.json"
INFERENCE_NAME: Final = "inference/model.onnx"
_BLOCK = 1 << 20

# Why a bundle was refused (BundleError.reason); each comes with a one-line detail.
REASONS: Final = ("truncated", "malformed", "oversized", "unsafe_path", "unknown_format", "unsigned",
                  "bad_signature", "no_key", "tampered", "unsupported_runtime", "mismatch")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


class BundleError(InvalidValueError):
    """A bundle refused: ``reason`` is one of :data:`REASONS`; the message is one line."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = " ".join(str(detail).split())  # one line, whatever the detail held
        super().__init__(f"bundle refused ({reason}): {self.detail}")


@dataclass(frozen=True)
class BundleLimits:
    """Upper bounds checked before anything is read or written (a bundle is untrusted input)."""

    max_bundle_bytes: int = 8 << 30
    max_member_bytes: int = 4 << 30
    max_members: int = 64
    max_manifest_bytes: int = 1 << 20
    max_signature_bytes: int = 4096
    max_name_chars: int = 160


DEFAULT_LIMITS: Final = BundleLimits()


# --- manifest -------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> bytes:
    """The one byte form a manifest's content is hashed in (sorted keys, no spaces, ASCII)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def compute_bundle_id(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its ``bundle_id`` key."""
    return hashlib.sha256(canonical_json({k: v for k, v in manifest.items() if k != "bundle_id"})).hexdigest()


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BundleError("malformed", f"{MANIFEST_NAME}: duplicate key {key[:40]!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise BundleError("malformed", f"{MANIFEST_NAME}: {name} is not allowed")


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """Strict JSON object: UTF-8, no duplicate keys, no NaN/Infinity."""
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_no_constant)
    except BundleError:
        raise
    except (ValueError, RecursionError) as exc:
        raise BundleError("malformed", f"{what} is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(obj, dict):
        raise BundleError("malformed", f"{what} must be a JSON object")
    return obj


def check_manifest(m: dict[str, Any]) -> None:
    """Format and version first (an unknown version is never interpreted), then the keys a site uses."""
    if m.get("format") != FORMAT:
        shown = str(m.get("format"))[:40]
        raise BundleError("unknown_format", f"not a site bundle manifest (format {shown!r})")
    version = m.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BundleError("unknown_format", f"format version {str(version)[:20]} is not supported "
                                            f"(this runtime reads {FORMAT_VERSION})")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise BundleError("malformed", f"{MANIFEST_NAME}: {what}")

    need(isinstance(m.get("bundle_id"), str) and bool(_HEX64.fullmatch(m["bundle_id"])),
         "bundle_id must be 64 lowercase hex characters")
    need(isinstance(m.get("created"), str), "created must be a string")
    need(isinstance(m.get("fleet"), str), "fleet must be a string")
    need(isinstance(m.get("codec"), dict), "codec must be an object")
    rt = m.get("runtime")
    need(isinstance(rt, dict) and isinstance(rt.get("onnxruntime"), str), "runtime.onnxruntime missing")
    model = m.get("model")
    need(isinstance(model, dict) and model.get("kind") in ("text", "image"), "model.kind must be text|image")
    need(isinstance(model.get("base_sha256"), str), "model.base_sha256 missing")  # type: ignore[union-attr]
    need(isinstance(model.get("preprocessing"), dict), "model.preprocessing missing")  # type: ignore[union-attr]
    labels = m.get("labels")
    need(labels is None or (isinstance(labels, list) and all(isinstance(x, str) for x in labels)),
         "labels must be null or a list of strings")
    peft = m.get("peft")
    need(isinstance(peft, dict) and isinstance(peft.get("spec"), dict)
         and isinstance(peft.get("spec_hash"), str), "peft.spec and peft.spec_hash missing")
    files = m.get("files")
    need(isinstance(files, dict) and bool(files), "files must be a non-empty object")
    for name, info in files.items():  # type: ignore[union-attr]
        ok = (isinstance(info, dict) and isinstance(info.get("sha256"), str)
              and bool(_HEX64.fullmatch(info["sha256"])) and isinstance(info.get("bytes"), int)
              and not isinstance(info["bytes"], bool) and info["bytes"] >= 0)
        need(ok, f"files[{name[:60]!r}] needs sha256 (64 hex) and bytes (int >= 0)")
    need(GRADIENT_PREFIX + "gradient.json" in files, "the gradient model is missing")  # type: ignore[operator]


# --- member names ----------------------------------------------------------------------------------------
def check_member_name(name: str, limits: BundleLimits = DEFAULT_LIMITS) -> None:
    """Relative, '/'-separated, plain components only: no absolute path, drive, '..', '.', backslash,
    control character or hidden component (so an extracted name can never leave its folder)."""
    shown = name[:80]
    if not name or len(name) > limits.max_name_chars:
        raise BundleError("unsafe_path", f"member name of {len(name)} characters")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise BundleError("unsafe_path", f"member {shown!r} has an absolute path")
    if "\\" in name:
        raise BundleError("unsafe_path", f"member {shown!r} contains a backslash")
    parts = name.split("/")
    if any(p in ("..", ".") for p in parts):
        raise BundleError("unsafe_path", f"member {shown!r} climbs out of its folder ('..')")
    if not all(_COMPONENT.fullmatch(p) for p in parts):
        raise BundleError("unsafe_path", f"member {shown!r} is not a plain relative file name")


def _check_member_type(info: zipfile.ZipInfo) -> None:
    mode = (info.external_attr >> 16) & 0xFFFF
    if info.is_dir():
        raise BundleError("unsafe_path", f"member {info.filename[:80]!r} is a directory entry")
    if mode and stat.S_ISLNK(mode):
        raise BundleError("unsafe_path", f"member {info.filename[:80]!r} is a symbolic link")
    if mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        raise BundleError("unsafe_path", f"member {info.filename[:80]!r} is not a regular file")


# --- reading --------------------------------------------------------------------------------------------
@dataclass
class OpenedBundle:
    """A bundle whose structure and manifest passed the checks; member contents are not read yet.

    Use as a context manager (it keeps the zip open)."""

    path: Path
    zf: zipfile.ZipFile
    manifest: dict[str, Any]
    manifest_bytes: bytes
    signature_bytes: bytes | None
    members: dict[str, zipfile.ZipInfo]
    limits: BundleLimits

    @property
    def bundle_id(self) -> str:
        return str(self.manifest["bundle_id"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    def __enter__(self) -> OpenedBundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.zf.close()

    def close(self) -> None:
        self.zf.close()

    def check_id(self) -> None:
        actual = compute_bundle_id(self.manifest)
        if actual != self.bundle_id:
            raise BundleError("tampered", f"bundle_id {self.bundle_id[:16]} does not match the manifest "
                                          f"content ({actual[:16]})")

    def check_listing(self) -> None:
        """Every member is listed in the manifest with its size, and every listed file is there."""
        present = {n for n in self.members if n not in (MANIFEST_NAME, SIGNATURE_NAME)}
        listed = set(self.files)
        for name in sorted(listed):
            check_member_name(name, self.limits)
        if extra := sorted(present - listed):
            raise BundleError("tampered", f"member {extra[0][:80]!r} is not listed in the manifest")
        if missing := sorted(listed - present):
            raise BundleError("tampered", f"member {missing[0][:80]!r} listed in the manifest is missing")
        for name in sorted(listed):
            if self.members[name].file_size != self.files[name]["bytes"]:
                raise BundleError("tampered", f"member {name!r} has {self.members[name].file_size} bytes, "
                                              f"the manifest says {self.files[name]['bytes']}")

    def copy_member(self, name: str, out: BinaryIO | None) -> None:
        """Stream one member (to ``out``, or nowhere), checking its sha256 against the manifest."""
        info = self.members[name]
        digest = hashlib.sha256()
        size = 0
        try:
            with self.zf.open(info) as src:
                while block := src.read(_BLOCK):
                    size += len(block)
                    if size > info.file_size:
                        raise BundleError("tampered", f"member {name!r} is longer than its header says")
                    digest.update(block)
                    if out is not None:
                        out.write(block)
        except zipfile.BadZipFile as exc:  # CRC mismatch or a damaged local header
            raise BundleError("tampered", f"member {name!r} is corrupt ({exc})") from exc
        except EOFError as exc:
            raise BundleError("truncated", f"member {name!r} ends early") from exc
        expected = self.files[name]["sha256"] if name in self.files else None
        if expected is not None and digest.hexdigest() != expected:
            raise BundleError("tampered", f"member {name!r}: sha256 does not match the manifest")

    def verify_files(self) -> int:
        """Hash every listed member (no extraction); returns how many bytes were checked."""
        self.check_listing()
        total = 0
        for name in sorted(self.files, key=lambda n: self.members[n].header_offset):
            self.copy_member(name, None)
            total += self.members[name].file_size
        return total


def _read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    if info.file_size > cap:
        raise BundleError("oversized", f"{info.filename} has {info.file_size} bytes (limit {cap})")
    try:
        with zf.open(info) as fh:
            data = fh.read(cap + 1)
    except zipfile.BadZipFile as exc:
        raise BundleError("tampered", f"member {info.filename!r} is corrupt ({exc})") from exc
    except EOFError as exc:
        raise BundleError("truncated", f"member {info.filename!r} ends early") from exc
    if len(data) != info.file_size:
        raise BundleError("tampered", f"member {info.filename!r} is not as long as its header says")
    return data


def open_bundle(path: str | os.PathLike[str], limits: BundleLimits = DEFAULT_LIMITS) -> OpenedBundle:
    """Open ``path`` and check everything that needs no member content: file size, zip structure, member
    names/types/sizes/compression, then the manifest's format version and keys. No signature, no hashes."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError("malformed", f"{path}: {exc.strerror or exc}") from exc
    if not path.is_file():
        raise BundleError("malformed", f"{path} is not a regular file")
    if size > limits.max_bundle_bytes:
        raise BundleError("oversized", f"{path.name} has {size} bytes (limit {limits.max_bundle_bytes})")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise BundleError("truncated", f"{path.name} is not a complete bundle (no zip directory at its end: "
                                       "truncated or not a bundle)") from exc
    try:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise BundleError("oversized", f"{len(infos)} members (limit {limits.max_members})")
        members: dict[str, zipfile.ZipInfo] = {}
        declared = 0
        for info in infos:
            check_member_name(info.filename.rstrip("/") or info.filename, limits)
            _check_member_type(info)
            if info.filename in members or info.filename.lower() in {n.lower() for n in members}:
                raise BundleError("malformed", f"member {info.filename[:80]!r} appears twice")
            if info.compress_type != zipfile.ZIP_STORED:
                raise BundleError("malformed", f"member {info.filename[:80]!r} is compressed (bundles are "
                                               "stored)")
            if info.compress_size != info.file_size:
                raise BundleError("malformed", f"member {info.filename[:80]!r}: its stored and its "
                                               "declared size differ")
            if info.flag_bits & 0x1:
                raise BundleError("malformed", f"member {info.filename[:80]!r} is encrypted")
            if info.file_size > limits.max_member_bytes:
                raise BundleError("oversized", f"member {info.filename[:80]!r} has {info.file_size} bytes "
                                               f"(limit {limits.max_member_bytes})")
            declared += info.file_size
            members[info.filename] = info
        if declared > size:
            raise BundleError("truncated", f"members declare {declared} bytes, the file has {size}")
        if MANIFEST_NAME not in members:
            raise BundleError("malformed", f"no {MANIFEST_NAME}")
        manifest_bytes = _read_small(zf, members[MANIFEST_NAME], limits.max_manifest_bytes)
        manifest = parse_json(manifest_bytes, MANIFEST_NAME)
        check_manifest(manifest)
        signature = None
        if SIGNATURE_NAME in members:
            signature = _read_small(zf, members[SIGNATURE_NAME], limits.max_signature_bytes)
        return OpenedBundle(path, zf, manifest, manifest_bytes, signature, members, limits)
    except BaseException:
        zf.close()
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# --- runtime range -------------------------------------------------------------------------------------
def parse_version(text: str) -> tuple[int, ...]:
    """``"1.19.2"`` -> (1, 19, 2); local/pre-release suffixes ignored (``1.20.0rc1``, ``1.20.1+cpu``)."""
    nums = []
    for part in str(text).split("+")[0].split("."):
        m = re.match(r"\d+", part)
        if m is None:
            break
        nums.append(int(m.group()))
        if m.end() != len(part):
            break
    if not nums:
        raise InvalidValueError(f"not a version: {text!r}")
    return tuple(nums)


def version_in_range(version: str, spec: str) -> bool:
    """``spec``: comma-separated ``>=X.Y``, ``>X.Y``, ``<X.Y``, ``<=X.Y``, ``==X.Y`` clauses."""
    have = parse_version(version)
    for clause in (c.strip() for c in spec.split(",") if c.strip()):
        m = re.fullmatch(r"(>=|<=|==|>|<)\s*([0-9][0-9A-Za-z.+]*)", clause)
        if m is None:
            raise InvalidValueError(f"runtime range clause {clause!r} is not understood")
        op, want = m.group(1), parse_version(m.group(2))
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, ">": a > b, "<": a < b}[op]
        if not ok:
            return False
    return True


def check_runtime(manifest: dict[str, Any], version: str) -> None:
    """Refuse when the installed onnxruntime ``version`` is outside the bundle's range."""
    spec = str(manifest["runtime"]["onnxruntime"])
    try:
        ok = version_in_range(version, spec)
    except InvalidValueError as exc:
        raise BundleError("unsupported_runtime", str(exc)) from exc
    if not ok:
        raise BundleError("unsupported_runtime", f"the lowered graphs need onnxruntime {spec}, this device "
                                                 f"has {version}")


__all__ = ["DEFAULT_LIMITS", "FORMAT", "FORMAT_VERSION", "GRADIENT_PREFIX", "INFERENCE_NAME", "MANIFEST_NAME",
           "REASONS", "SIGNATURE_NAME", "TOKENIZER_NAME", "BundleError", "BundleLimits", "OpenedBundle",
           "canonical_json", "check_manifest", "check_member_name", "check_runtime", "compute_bundle_id",
           "file_sha256", "open_bundle", "parse_json", "parse_version", "version_in_range"]
