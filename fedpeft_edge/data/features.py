"""Turn a dataset into the input arrays of a prepared ONNX backbone (tokenise text / preprocess images)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fedpeft_edge.data.batches import iterate_batches
from fedpeft_edge.data.datasets import ImageDataset, TextDataset
from fedpeft_edge.data.images import preprocess_images
from fedpeft_edge.data.text import TextEncoder
from fedpeft_edge.runtime.errors import InvalidTypeError, ensure


@functools.lru_cache(maxsize=8)
def _encoder(tokenizer_json: str) -> TextEncoder:
    return TextEncoder(tokenizer_json)


def encode_for_model(
    ds: TextDataset | ImageDataset, prepared_meta: Mapping[str, Any], kind: str
) -> dict[str, np.ndarray]:
    """Model inputs for every sample of ``ds`` (labels not included: they are ``ds.labels``).

    ``prepared_meta``/``kind`` are ``PreparedModel.meta``/``.kind``: text needs ``tokenizer_json`` and
    ``max_len``; images need ``image_size``, ``mean``, ``std`` (and optionally ``channels``).
    """
    if kind == "text":
        ensure(
            isinstance(ds, TextDataset),
            f"a text model needs a TextDataset, got {type(ds).__name__}",
            raising=InvalidTypeError,
        )
        for key in ("tokenizer_json", "max_len"):
            ensure(key in prepared_meta, f"text model meta lacks {key!r}")
        return _encoder(str(prepared_meta["tokenizer_json"])).encode(ds.texts, int(prepared_meta["max_len"]))
    if kind == "image":
        ensure(
            isinstance(ds, ImageDataset),
            f"an image model needs an ImageDataset, got {type(ds).__name__}",
            raising=InvalidTypeError,
        )
        for key in ("image_size", "mean", "std"):
            ensure(key in prepared_meta, f"image model meta lacks {key!r}")
        pixels = preprocess_images(
            ds.images,
            int(prepared_meta["image_size"]),
            prepared_meta["mean"],
            prepared_meta["std"],
            channels=int(prepared_meta.get("channels", 3)),
        )
        return {"pixel_values": pixels}
    raise InvalidTypeError(f"unknown model kind {kind!r} (expected 'text' or 'image')")


def iterate_encoded_batches(
    ds: TextDataset | ImageDataset,
    prepared_meta: Mapping[str, Any],
    kind: str,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Like ``iterate_batches(encode_for_model(ds, ...), ds.labels, ...)`` but encodes one batch at a time.

    Preprocessed images are large (60,000 Fashion-MNIST images at 3x32x32 float32 take 737 MB), so a
    device encodes only the rows of the current batch. Same order and contents as the eager path.
    """
    n = len(ds)
    order_batches = iterate_batches({"row": np.arange(n, dtype=np.int64)}, ds.labels, batch_size,
                                    shuffle=shuffle, seed=seed, drop_last=drop_last)  # fmt: skip
    for batch in order_batches:
        inputs = encode_for_model(ds.take(batch["row"]), prepared_meta, kind)
        inputs["labels"] = batch["labels"]
        yield inputs


__all__ = ["encode_for_model", "iterate_encoded_batches"]
