"""Central-site model preparation: export pretrained backbones to ONNX feature extractors, cached.

This runs on the central site only. torch/transformers are imported lazily inside the export functions
(:mod:`fedpeft_edge.models.export_text`, :mod:`fedpeft_edge.models.export_image`), so importing this module
(and every cache hit) works without them; a device never needs torch.

Exports keep every parameter as its own *named* initializer (legacy exporter with
``training=TrainingMode.PRESERVE`` and ``do_constant_folding=False``), because the PEFT layer selects
LoRA targets and BitFit biases by initializer name:

* text (all-MiniLM-L6-v2): ``MatMul(x, W) -> Add(b)`` per ``Linear`` with ``W`` stored ``[in, out]`` under
  ``bert.encoder.layer.{i}.attention.self.{query,value}.weight``; ``features`` ``[batch, 384]``.
* image (EfficientNet-Lite0): convolutions keep ``backbone._blocks.{i}._project_conv.weight`` etc.;
  ``features`` ``[batch, 1280]``.

Exported models are cached under :func:`default_cache_dir` keyed by the sha256 of the source weights, the
export settings and :data:`~fedpeft_edge.models.toolchain.EXPORT_CODE_VERSION`; a cache hit reads small
JSON files and never imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpeft_edge.data.prepared_model import PreparedModel, load_prepared_entry
from fedpeft_edge.models.export_image import _export_image
from fedpeft_edge.models.export_text import _export_text
from fedpeft_edge.models.toolchain import (
    EXPORT_CODE_VERSION,
    IMAGE_CODE_PACKAGE,
    OPSET,
    _image_sources,
    _package_version,
    _sha256_file,
    _text_sources,
)
from fedpeft_edge.runtime.durable import atomic_file
from fedpeft_edge.runtime.errors import FedPeftError, ensure


def default_cache_dir() -> Path:
    """``$FEDPEFT_EDGE_CACHE`` if set, else ``~/.cache/fedpeft_edge``."""
    env = os.environ.get("FEDPEFT_EDGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedpeft_edge"


def _cached_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a (large, read-only) source file, memoised by (path, size, mtime) so cache hits stay fast."""
    stat = path.stat()
    memo_path = cache_dir / "source_hashes.json"
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo: dict[str, str] = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        loaded = json.loads(memo_path.read_text())
        if isinstance(loaded, dict):
            memo = {str(k): str(v) for k, v in loaded.items()}
    if memo_key in memo:
        return memo[memo_key]
    digest = _sha256_file(path)
    memo[memo_key] = digest
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(memo_path, json.dumps(memo, indent=1, sort_keys=True))
    return digest


def _atomic_write_text(path: Path, text: str) -> None:
    # 0o644: mkstemp makes files private; the cache may be shared. A lost cache entry is rebuilt: no fsync.
    with atomic_file(path, "w", durable=False, file_mode=0o644) as fh:
        fh.write(text)


def _cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _build_entry(
    cache_dir: Path,
    entry_name: str,
    build: Callable[[Path], dict[str, Any]],
) -> PreparedModel:
    """Run ``build(tmp_dir)`` (writes model.onnx etc., returns the record), then publish it atomically."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    final_dir = cache_dir / entry_name
    tmp_dir = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-{entry_name}-"))
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; a shared cache must stay readable by others
    try:
        record = build(tmp_dir)
        onnx_path = tmp_dir / record["onnx_file"]
        record["onnx_size"] = onnx_path.stat().st_size
        record["meta"]["onnx_sha256"] = _sha256_file(onnx_path)
        # prepared.json is written last inside the tmp dir; the rename publishes everything at once.
        (tmp_dir / "prepared.json").write_text(json.dumps(record, indent=1, sort_keys=True))
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            # Another process published the same entry first (same key => same content); keep theirs.
            if load_prepared_entry(final_dir) is None:
                shutil.rmtree(final_dir, ignore_errors=True)
                os.rename(tmp_dir, final_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    prepared = load_prepared_entry(final_dir)
    if prepared is None:
        raise FedPeftError(f"cache entry {final_dir} is unreadable right after writing it")
    return prepared


def prepare_text_model(*, cache_dir: Path | None = None, max_len: int = 64) -> PreparedModel:
    """all-MiniLM-L6-v2 as ONNX: ``(input_ids, attention_mask) -> features [batch, 384]`` (masked mean)."""
    ensure(
        isinstance(max_len, int) and 2 <= max_len <= 512,
        f"max_len must be an int in [2, 512], got {max_len!r}",
    )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights, tokenizer = _text_sources()
    key = _cache_key(
        {
            "model": "all-MiniLM-L6-v2",
            "weights_sha256": _cached_sha256(weights, cache_dir),
            "tokenizer_sha256": _cached_sha256(tokenizer, cache_dir),
            "opset": OPSET,
            "pooling": "masked_mean",
            "code_version": EXPORT_CODE_VERSION,
        }
    )
    entry_name = f"text-minilm-l6-{key}"
    prepared = load_prepared_entry(cache_dir / entry_name)
    if prepared is None:
        prepared = _build_entry(cache_dir, entry_name, lambda tmp: _export_text(tmp, weights, tokenizer))
    # max_len only affects tokenisation (sequence axis is dynamic), so it is not part of the cache key.
    return PreparedModel(
        onnx_path=prepared.onnx_path,
        kind=prepared.kind,
        input_names=prepared.input_names,
        feature_dim=prepared.feature_dim,
        meta={**prepared.meta, "max_len": max_len},
    )


def prepare_image_model(
    *, cache_dir: Path | None = None, image_size: int = 32, fold_batchnorm: bool = True
) -> PreparedModel:
    """EfficientNet-Lite0 as ONNX: ``pixel_values [batch, 3, S, S] -> features [batch, 1280]``.

    The image size is fixed at export (the "same" padding of the convolutions is computed for it).

    ``fold_batchnorm`` (default) merges every eval-mode BatchNorm into the convolution before it, so each
    convolution gets a bias (``<conv>.bias``, the natural BitFit target) and no BatchNormalization node
    remains. Reason: ONNX Runtime Training runs BatchNormalization nodes with *batch* statistics inside
    the training graph (measured here: the training loss differs from the eval-mode torch loss), which
    is wrong for fine-tuning a frozen pretrained backbone on small client batches.
    """
    ensure(
        isinstance(image_size, int) and 16 <= image_size <= 1024,
        f"image_size must be an int in [16, 1024], got {image_size!r}",
    )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights = _image_sources()
    key = _cache_key(
        {
            "model": "efficientnet-lite0",
            "weights_sha256": _cached_sha256(weights, cache_dir),
            "code_package_version": _package_version(IMAGE_CODE_PACKAGE),
            "image_size": image_size,
            "fold_batchnorm": bool(fold_batchnorm),
            "opset": OPSET,
            "code_version": EXPORT_CODE_VERSION,
        }
    )
    entry_name = f"image-effnet-lite0-{image_size}-{key}"
    prepared = load_prepared_entry(cache_dir / entry_name)
    if prepared is None:
        prepared = _build_entry(
            cache_dir, entry_name, lambda tmp: _export_image(tmp, weights, image_size, bool(fold_batchnorm))
        )
    return prepared


__all__ = [
    "default_cache_dir",
    "prepare_image_model",
    "prepare_text_model",
]
