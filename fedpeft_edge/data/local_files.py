"""A site's own data from local files (``[data] path = ...``): JSON Lines or CSV text, ``.npz`` images.

Formats (chosen by the file's extension):

* ``.jsonl``: one JSON object per line, ``{"text": "...", "label": "bearing_fault"}``; blank lines are
  skipped and other keys are ignored. A string label is a class *name*; an integer label is a class *id*
  (the index into ``classes``, i.e. the head's output order).
* ``.csv``: a header row naming the columns ``text`` and ``label`` (others are ignored), UTF-8 (a BOM is
  accepted); labels are class names.
* ``.npz``: arrays ``images`` (uint8 ``[N, H, W]`` or ``[N, H, W, C]`` with C in 1, 3) and ``labels``
  (``[N]`` integer ids or strings = names); read with ``allow_pickle=False`` (object arrays are refused).

Every site maps labels through the same explicit class list from its configuration, so the same label
gets the same id everywhere; a label outside the list is an error naming the file and line (row). Size,
row-count and text-length limits are checked while reading, so a wrong or hostile file fails fast with a
clear :class:`~fedpeft_edge.runtime.errors.InvalidValueError` instead of exhausting the device's memory.
"""

from __future__ import annotations

import builtins
import csv
import io
import json
import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft_edge.data.datasets import ImageDataset, TextDataset
from fedpeft_edge.runtime.errors import InvalidValueError, ensure

TEXT_SUFFIXES = (".jsonl", ".csv")
IMAGE_SUFFIXES = (".npz",)
SUFFIXES = TEXT_SUFFIXES + IMAGE_SUFFIXES


@dataclass(frozen=True)
class LocalDataLimits:
    """Upper bounds for a site's data file (the ``[data]`` keys of the same names)."""

    max_file_bytes: int = 512 * 1024 * 1024  # on disk; for .npz also the total of the unpacked arrays
    max_rows: int = 200_000
    max_text_chars: int = 20_000  # per text; longer texts are refused, not silently cut

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_rows", "max_text_chars"):
            value = getattr(self, name)
            ensure(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   f"{name} must be a positive integer, got {value!r}")


def check_classes(classes: Sequence[str]) -> list[str]:
    """The class list as given in configuration: non-empty, unique, non-empty strings."""
    ensure(isinstance(classes, (list, tuple)) and len(classes) > 0,
           "classes must be a non-empty list of class names (the head's output order)")
    ensure(all(isinstance(c, str) and c.strip() for c in classes), "classes must be non-empty strings")
    dupes = sorted({c for c in classes if list(classes).count(c) > 1})
    ensure(not dupes, f"classes must be unique; repeated: {dupes}")
    return list(classes)


def load_local_dataset(path: str | Path, classes: Sequence[str], *,
                       limits: LocalDataLimits | None = None) -> TextDataset | ImageDataset:
    """Read a site's data file; labels become ids into ``classes`` (see the module docstring)."""
    path = Path(path)
    classes = check_classes(classes)
    limits = limits or LocalDataLimits()
    suffix = path.suffix.lower()
    ensure(suffix in SUFFIXES, f"{path}: unsupported data file type {suffix!r}; use one of {SUFFIXES}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidValueError(f"cannot read data file {path}: {exc}") from exc
    ensure(path.is_file(), f"data file {path} is not a regular file")
    ensure(size <= limits.max_file_bytes,
           f"{path}: {size:,} bytes exceeds the limit of {limits.max_file_bytes:,} (data.max_file_bytes)")
    if suffix == ".npz":
        return _load_npz(path, classes, limits)
    rows = _jsonl_rows(path, limits) if suffix == ".jsonl" else _csv_rows(path, limits)
    lookup = {c: i for i, c in enumerate(classes)}
    texts: list[str] = []
    labels: list[int] = []
    for where, text, label in rows:
        ensure(len(texts) < limits.max_rows, f"{path}: more than {limits.max_rows:,} rows (data.max_rows)")
        ensure(isinstance(text, str), f"{where}: 'text' must be a string, got {type(text).__name__}")
        ensure(text.strip() != "", f"{where}: empty text")
        ensure(len(text) <= limits.max_text_chars,
               f"{where}: text of {len(text):,} characters exceeds {limits.max_text_chars:,} "
               "(data.max_text_chars)")
        texts.append(text)
        labels.append(_label_id(label, lookup, len(classes), where))
    ensure(texts, f"{path}: no samples")
    return TextDataset(texts=texts, labels=np.array(labels, dtype=np.int64), classes=classes,
                       name=f"local:{path.name}")


def _label_id(label: object, lookup: dict[str, int], n_classes: int, where: str) -> int:
    if isinstance(label, str):
        if label not in lookup:
            shown = label if len(label) <= 60 else label[:57] + "..."
            raise InvalidValueError(
                f"{where}: unknown label {shown!r}; not in data.classes {list(lookup)[:20]}")
        return lookup[label]
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        ensure(0 <= int(label) < n_classes,
               f"{where}: label id {int(label)} outside 0..{n_classes - 1} (ids index data.classes)")
        return int(label)
    raise InvalidValueError(f"{where}: label must be a class name (string) or a class id (integer), "
                     f"got {type(label).__name__}")


def _text_lines(path: Path, encoding: str) -> io.TextIOWrapper:
    # strict decoding: a non-UTF-8 file is an error, not mojibake in the training data
    return open(path, encoding=encoding, errors="strict", newline="")


def _jsonl_rows(path: Path, limits: LocalDataLimits) -> Iterator[tuple[str, object, object]]:
    # JSON spells one char in at most 6 (a \u escape with 4 hex digits); 4096 covers keys and the label
    line_cap = limits.max_text_chars * 6 + 4096
    with _text_lines(path, "utf-8") as fh:
        line_no = 0
        try:
            for line_no, line in enumerate(fh, start=1):
                where = f"{path}:{line_no}"
                if not line.strip():
                    continue
                ensure(len(line) <= line_cap, f"{where}: line of {len(line):,} characters is too long")
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidValueError(
                        f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                ensure(isinstance(obj, dict), f"{where}: expected a JSON object, got {type(obj).__name__}")
                missing = [k for k in ("text", "label") if k not in obj]
                ensure(not missing, f"{where}: missing key(s) {missing}")
                yield where, obj["text"], obj["label"]
        except UnicodeDecodeError as exc:
            raise InvalidValueError(f"{path}:{line_no + 1}: not UTF-8 ({exc.reason})") from None


def _csv_rows(path: Path, limits: LocalDataLimits) -> Iterator[tuple[str, object, object]]:
    with _text_lines(path, "utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            ensure(header is not None, f"{path}: empty CSV file (expected a header with text,label)")
            names = [h.strip() for h in header]
            missing = [k for k in ("text", "label") if k not in names]
            ensure(not missing, f"{path}:1: CSV header lacks column(s) {missing} (header: {names[:10]})")
            ensure(len(set(names)) == len(names), f"{path}:1: CSV header repeats a column name")
            text_col, label_col = names.index("text"), names.index("label")
            # csv's own field cap is 128 KiB by default; ours is max_text_chars (checked per row)
            old_limit = csv.field_size_limit(max(limits.max_text_chars * 4, 1024))
            try:
                for row in reader:
                    where = f"{path}:{reader.line_num}"
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    ensure(len(row) == len(names), f"{where}: expected {len(names)} columns, got {len(row)}")
                    yield where, row[text_col], row[label_col].strip()
            finally:
                csv.field_size_limit(old_limit)
        except csv.Error as exc:
            raise InvalidValueError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise InvalidValueError(f"{path}:{reader.line_num + 1}: not UTF-8 ({exc.reason})") from None


def _load_npz(path: Path, classes: list[str], limits: LocalDataLimits) -> ImageDataset:
    # The arrays are compressed members of a zip: bound what unpacking them would take before doing it.
    try:
        with zipfile.ZipFile(path) as zf:
            members = {info.filename: info.file_size for info in zf.infolist()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidValueError(f"{path}: not a valid .npz archive ({exc})") from None
    for key in ("images", "labels"):
        ensure(f"{key}.npy" in members, f"{path}: missing array {key!r} (has {sorted(members)[:10]})")
    unpacked = members["images.npy"] + members["labels.npy"]
    ensure(unpacked <= limits.max_file_bytes,
           f"{path}: arrays unpack to {unpacked:,} bytes, over the limit of {limits.max_file_bytes:,} "
           "(data.max_file_bytes)")
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except builtins.ValueError as exc:  # object arrays need pickle: refused
        raise InvalidValueError(f"{path}: cannot read arrays without pickle ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidValueError(f"{path}: unreadable .npz ({exc})") from None
    ensure(images.dtype == np.uint8, f"{path}: images must be uint8, got {images.dtype}")
    ensure(images.ndim in (3, 4), f"{path}: images must be [N, H, W] or [N, H, W, C], got {images.shape}")
    if images.ndim == 4:
        ensure(images.shape[3] in (1, 3), f"{path}: images must have 1 or 3 channels, got {images.shape[3]}")
    n = int(images.shape[0])
    ensure(n > 0 and images.shape[1] > 0 and images.shape[2] > 0, f"{path}: no images ({images.shape})")
    ensure(n <= limits.max_rows, f"{path}: {n:,} images exceed {limits.max_rows:,} (data.max_rows)")
    ensure(labels.shape == (n,), f"{path}: labels must have shape ({n},), got {labels.shape}")
    if labels.dtype.kind in "iu":
        bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
        if bad.size:
            raise InvalidValueError(f"{path}: row {int(bad[0])}: label id {int(labels[bad[0]])} outside "
                             f"0..{len(classes) - 1} (ids index data.classes)")
        ids = labels.astype(np.int64)
    elif labels.dtype.kind == "U":
        lookup = {c: i for i, c in enumerate(classes)}
        ids = np.empty(n, dtype=np.int64)
        for row, name in enumerate(labels.tolist()):
            ids[row] = _label_id(name, lookup, len(classes), f"{path}: row {row}")
    else:
        raise InvalidValueError(f"{path}: labels must be integer ids or strings, got dtype {labels.dtype}")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    return ImageDataset(images=np.ascontiguousarray(images), labels=ids, classes=classes,
                        name=f"local:{path.name}")


def split_eval(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(eval indices, train indices): a fixed random ``eval_fraction`` of ``n`` held out (same seed, same
    split). At least one sample is held out when the fraction is positive and there are 5 or more."""
    ensure(isinstance(eval_fraction, (int, float)) and 0.0 <= eval_fraction < 1.0,
           f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    order = np.random.default_rng(seed).permutation(n)
    n_eval = math.floor(n * eval_fraction + 1e-9)
    if eval_fraction > 0 and n >= 5:
        n_eval = max(1, n_eval)
    elif n < 5:
        n_eval = 0
    return order[:n_eval], order[n_eval:]

__all__ = ["IMAGE_SUFFIXES", "SUFFIXES", "TEXT_SUFFIXES", "LocalDataLimits", "check_classes",
           "load_local_dataset", "split_eval"]
