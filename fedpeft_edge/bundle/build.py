"""Central side: write a site bundle from a gradient model folder (:func:`write_site_bundle`) and sign an
existing one (:func:`sign_bundle`). Both write beside the target and rename, so a bundle file is whole
or absent."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft_edge import __version__
from fedpeft_edge.bundle.format import (
    DEFAULT_LIMITS,
    FORMAT,
    FORMAT_VERSION,
    GRADIENT_PREFIX,
    INFERENCE_NAME,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    TOKENIZER_NAME,
    BundleError,
    canonical_json,
    compute_bundle_id,
    file_sha256,
    open_bundle,
)
from fedpeft_edge.runtime.durable import fsync_dir
from fedpeft_edge.runtime.errors import InvalidValueError

_BLOCK = 1 << 20
_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member times: the manifest's "created" is the one timestamp

# onnxruntime release -> (highest ai.onnx opset, highest IR version) it implements (ORT's Versioning.md).
_ORT_SUPPORT: tuple[tuple[tuple[int, int], int, int], ...] = (
    ((1, 14), 18, 8), ((1, 15), 19, 9), ((1, 17), 20, 9), ((1, 18), 21, 10), ((1, 21), 22, 10),
)
# The oldest onnxruntime the lowered graphs are trained on by the test suite (the training build 1.19.2
# of the central venv; sites install >= 1.20). Older releases might load the graphs but are untested.
TESTED_FLOOR = (1, 19)

NO_INFERENCE_NOTE = ("no merged inference model at prepare time (no trained adapter yet): eval_model.onnx "
                     "fed the current global adapter is the inference graph; export a merged model after "
                     "training (peft/merge)")


@dataclass(frozen=True)
class BundleSummary:
    path: Path
    bundle_id: str
    signed: bool
    files: int
    bytes: int
    manifest: dict[str, Any]


def runtime_requirement(models: Sequence[Path]) -> dict[str, Any]:
    """The onnxruntime range the graphs need, from their IR version and ai.onnx opset (onnx, central)."""
    import onnx

    ir, opsets = 0, {}
    for path in models:
        m = onnx.load(str(path), load_external_data=False)
        ir = max(ir, int(m.ir_version))
        for imp in m.opset_import:
            domain = imp.domain or "ai.onnx"
            opsets[domain] = max(opsets.get(domain, 0), int(imp.version))
    opset = opsets.get("ai.onnx", 0)
    fitting = [rel for rel, max_opset, max_ir in _ORT_SUPPORT if opset <= max_opset and ir <= max_ir]
    if not fitting:
        raise InvalidValueError(f"the lowered graphs use ai.onnx opset {opset} / IR {ir}, newer than any "
                                "onnxruntime release bundle/build.py knows: extend _ORT_SUPPORT")
    low = max(fitting[0], TESTED_FLOOR)
    text = ".".join(map(str, low))
    return {"onnxruntime": f">={text}", "min_onnxruntime": text,
            "graphs": {"ir_version": ir, "opsets": dict(sorted(opsets.items()))}}


def _member_info(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = (0o100644 & 0xFFFF) << 16  # a regular file, rw-r--r--
    info.create_system = 3  # unix: the mode bits above are meaningful
    info.file_size = size
    return info


def _write_member(zf: zipfile.ZipFile, name: str, src: Path | bytes | Any, size: int) -> None:
    with zf.open(_member_info(name, size), "w", force_zip64=size >= zipfile.ZIP64_LIMIT) as out:
        if isinstance(src, bytes):
            out.write(src)
        elif isinstance(src, Path):
            with open(src, "rb") as fh:
                while block := fh.read(_BLOCK):
                    out.write(block)
        else:  # a readable stream (another bundle's member)
            while block := src.read(_BLOCK):
                out.write(block)


def _atomic_zip(out: Path, fill: Any) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as fh:
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                fill(zf)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_site_bundle(out: str | os.PathLike[str], *, gradient_dir: str | os.PathLike[str], kind: str,
                      preprocessing: Mapping[str, Any], labels: Sequence[str] | None = None,
                      fleet: str = "default", codec: Mapping[str, Any] | None = None,
                      tokenizer: str | os.PathLike[str] | None = None,
                      inference_model: str | os.PathLike[str] | None = None,
                      private_key: Any = None, created: dt.datetime | None = None,
                      overwrite: bool = False) -> BundleSummary:
    """Write the bundle file ``out`` (see :mod:`.format` for its layout); signed when ``private_key`` (an
    Ed25519 private key object, :func:`..signing.load_private_key`) is given."""
    from fedpeft_edge.peft.lowering.model import (
        BASE_DATA,
        EVAL_MODEL,
        GRADIENT_MODEL,
        INITIAL_PARAMS,
        MANIFEST,
        GradientModel,
    )

    out = Path(out)
    if out.exists() and not overwrite:
        raise InvalidValueError(f"{out} exists; choose a new bundle file name")
    if kind not in ("text", "image"):
        raise InvalidValueError(f"model kind must be text or image, not {kind!r}")
    gdir = Path(gradient_dir)
    model = GradientModel.load(gdir)
    head = model.spec.head_classes
    if labels is not None:
        labels = [str(x) for x in labels]
        if head is not None and len(labels) != head:
            raise InvalidValueError(f"{len(labels)} label names for a head of {head} classes")
    if kind == "text" and tokenizer is None:
        raise InvalidValueError("a text bundle needs the tokenizer.json its inputs are made with")

    sources: dict[str, Path] = {GRADIENT_PREFIX + n: gdir / n
                                for n in (MANIFEST, GRADIENT_MODEL, EVAL_MODEL, BASE_DATA, INITIAL_PARAMS)}
    if tokenizer is not None:
        sources[TOKENIZER_NAME] = Path(tokenizer)
    if inference_model is not None:
        sources[INFERENCE_NAME] = Path(inference_model)
    files: dict[str, dict[str, Any]] = {}
    for name, path in sources.items():
        if not path.is_file():
            raise InvalidValueError(f"{path} (bundle member {name}) is not a file")
        size = path.stat().st_size
        if size > DEFAULT_LIMITS.max_member_bytes:
            raise InvalidValueError(f"{path} has {size} bytes, more than a site accepts per member")
        files[name] = {"sha256": file_sha256(path), "bytes": size}

    when = (created or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "created_by": f"fedpeft-edge {__version__}",
        "fleet": fleet,
        "codec": dict(codec or {}),
        "runtime": runtime_requirement([gdir / GRADIENT_MODEL, gdir / EVAL_MODEL]),
        "model": {"kind": kind, "base_sha256": model.model_sha256, "input_names": list(model.input_names),
                  "preprocessing": dict(preprocessing),
                  "tokenizer": TOKENIZER_NAME if tokenizer is not None else None},
        "labels": labels,
        "head_classes": head,
        "peft": {"method": model.spec.method, "spec": model.spec.to_dict(), "spec_hash": model.spec_hash,
                 "num_trainable": int(model.num_trainable)},
        "gradient_model": GRADIENT_PREFIX,
        "inference_model": ({"file": INFERENCE_NAME} if inference_model is not None
                            else {"file": None, "note": NO_INFERENCE_NOTE}),
        "files": files,
    }
    canonical_json(manifest)  # refuses NaN and non-JSON values before anything is written
    manifest["bundle_id"] = compute_bundle_id(manifest)
    manifest_bytes = _manifest_bytes(manifest)
    signature = None
    if private_key is not None:
        from fedpeft_edge.bundle.signing import sign_manifest

        signature = sign_manifest(manifest_bytes, private_key)

    def fill(zf: zipfile.ZipFile) -> None:
        _write_member(zf, MANIFEST_NAME, manifest_bytes, len(manifest_bytes))
        if signature is not None:
            _write_member(zf, SIGNATURE_NAME, signature, len(signature))
        # small members first, the base last: a reader finds the manifest without seeking far
        for name in sorted(sources, key=lambda n: (files[n]["bytes"], n)):
            _write_member(zf, name, sources[name], files[name]["bytes"])

    _atomic_zip(out, fill)
    return BundleSummary(out, manifest["bundle_id"], signature is not None, len(files),
                         sum(f["bytes"] for f in files.values()), manifest)


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    import json

    text = json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False)
    return (text + "\n").encode("ascii")


def sign_bundle(path: str | os.PathLike[str], private_key: Any, out: str | os.PathLike[str] | None = None
                ) -> BundleSummary:
    """Sign ``path`` (replacing any signature it has); the bundle's content is checked against its
    manifest first, since signing vouches for it. Written to ``out`` (default: in place, atomically)."""
    from fedpeft_edge.bundle.signing import sign_manifest

    src = Path(path)
    dest = Path(out) if out is not None else src
    with open_bundle(src) as b:
        b.check_id()
        b.verify_files()
        signature = sign_manifest(b.manifest_bytes, private_key)
        order = sorted((n for n in b.members if n not in (MANIFEST_NAME, SIGNATURE_NAME)),
                       key=lambda n: b.members[n].header_offset)

        def fill(zf: zipfile.ZipFile) -> None:
            _write_member(zf, MANIFEST_NAME, b.manifest_bytes, len(b.manifest_bytes))
            _write_member(zf, SIGNATURE_NAME, signature, len(signature))
            for name in order:
                with b.zf.open(b.members[name]) as fh:
                    _write_member(zf, name, fh, b.members[name].file_size)

        if dest.resolve() != src.resolve() and dest.exists():
            raise InvalidValueError(f"{dest} exists; choose a new file name")
        _atomic_zip(dest, fill)
        total = sum(b.members[n].file_size for n in order)
        return BundleSummary(dest, b.bundle_id, True, len(order), total, b.manifest)


__all__ = ["NO_INFERENCE_NOTE", "TESTED_FLOOR", "BundleError", "BundleSummary", "runtime_requirement",
           "sign_bundle", "write_site_bundle"]
