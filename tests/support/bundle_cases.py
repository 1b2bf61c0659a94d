"""Site bundles for the bundle and site tests: a synthetic LoRA gradient model written as a bundle, keys,
and the byte-level surgery the tamper tests apply (flip a byte, rewrite members, add a member)."""

from __future__ import annotations

import shutil
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowering_cases import make_cache

from fedpeft_edge.bundle.build import write_site_bundle
from fedpeft_edge.bundle.signing import generate_keypair, load_private_key, load_public_key

LABELS = ["normal", "bearing_fault", "misalignment"]  # the synthetic "lora" case has a 3-class head
TOKENIZER = '{"note": "a stand-in tokenizer.json: the synthetic model is fed ids directly"}\n'


def synthetic_gradient_dir(root: Path) -> Path:
    """The synthetic transformer's LoRA case, lowered (ORT Training, once per call site)."""
    _, lower = make_cache(root / "cache")
    return lower("lora").directory


def keys(root: Path, name: str = "signing") -> tuple[Any, Any, Path, Path]:
    """(private key, public key, private path, public path)."""
    priv, pub = generate_keypair(root, name)
    return load_private_key(priv), load_public_key(pub), priv, pub


def make_bundle(out: Path, gradient_dir: Path, private_key: Any = None, **kw: Any) -> Any:
    tok = out.parent / f"{out.stem}-tokenizer.json"
    tok.write_text(TOKENIZER)
    args: dict[str, Any] = {"kind": "text", "preprocessing": {"max_len": 10}, "labels": LABELS,
                            "fleet": "bundle-test", "codec": {"mode": "int8", "topk_ratio": 0.01,
                                                              "block": 16, "stochastic_rounding": False,
                                                              "error_feedback": True},
                            "tokenizer": tok}
    args.update(kw)
    return write_site_bundle(out, gradient_dir=gradient_dir, private_key=private_key, **args)


def data_offset(path: Path, name: str) -> int:
    """Where member ``name``'s bytes start in the file (after its local header)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def flip_byte(src: Path, dst: Path, name: str, at: int = 0) -> Path:
    shutil.copyfile(src, dst)
    pos = data_offset(dst, name) + at
    with open(dst, "r+b") as fh:
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0x01]))
    return dst


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def rewrite(src: Path, dst: Path, replace: Mapping[str, bytes | None] | None = None,
            extra: list[tuple[zipfile.ZipInfo | str, bytes]] | None = None) -> Path:
    """A valid zip (fresh CRCs) with members replaced (None: dropped) and extra members appended."""
    replace = dict(replace or {})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename in replace:
                data = replace.pop(info.filename)
                if data is None:
                    continue
            else:
                data = zin.read(info)
            zout.writestr(info, data)
        for name, data in replace.items():  # replacements for members the source lacks
            if data is not None:
                zout.writestr(name, data)
        for info, data in extra or []:
            zout.writestr(info, data)
    return dst
