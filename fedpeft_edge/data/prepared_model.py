"""The record of a prepared base model (``prepared.json`` beside its ONNX file): what a site needs to feed
the model its inputs (tokenizer and length, or image size and normalisation).

``fedpeft_edge.models`` (central only) writes these folders; sites and the aggregator only read them.
"""

from __future__ import annotations

import builtins
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft_edge.runtime.errors import FedPeftError, ensure


@dataclass(frozen=True)
class PreparedModel:
    """An exported ONNX backbone and what a client needs to feed it."""

    onnx_path: Path
    kind: str  # "text" | "image"
    input_names: tuple[str, ...]
    feature_dim: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def output_name(self) -> str:
        return "features"


def load_prepared(entry_dir: str | os.PathLike[str], *, max_len: int | None = None) -> PreparedModel:
    """Reopen a prepared-model directory (e.g. one copied out of the cache) without the source packages.

    ``max_len`` sets the text tokenisation length (default 64, as in :func:`prepare_text_model`).
    """
    prepared = load_prepared_entry(Path(entry_dir))
    if prepared is None:
        raise FedPeftError(f"{entry_dir} is not a complete prepared-model directory (prepared.json + model)")
    if prepared.kind == "text":
        length = 64 if max_len is None else max_len
        ensure(
            isinstance(length, int) and 2 <= length <= 512,
            f"max_len must be an int in [2, 512], got {length!r}",
        )
        return PreparedModel(
            onnx_path=prepared.onnx_path,
            kind=prepared.kind,
            input_names=prepared.input_names,
            feature_dim=prepared.feature_dim,
            meta={**prepared.meta, "max_len": length},
        )
    return prepared


def load_prepared_entry(entry_dir: Path) -> PreparedModel | None:
    """Read a finished cache entry, or None if absent/incomplete (a half-written entry is never visible)."""
    meta_path = entry_dir / "prepared.json"
    try:
        record = json.loads(meta_path.read_text())
        onnx_path = entry_dir / record["onnx_file"]
        if not onnx_path.is_file() or onnx_path.stat().st_size != record["onnx_size"]:
            return None
        meta = dict(record["meta"])
        for key in record.get("path_meta_keys", []):
            meta[key] = str(entry_dir / meta[key])
            if not Path(meta[key]).is_file():
                return None
        if record["kind"] not in ("text", "image"):
            return None
        return PreparedModel(
            onnx_path=onnx_path,
            kind=record["kind"],
            input_names=tuple(record["input_names"]),
            feature_dim=int(record["feature_dim"]),
            meta=meta,
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, builtins.ValueError):
        return None
