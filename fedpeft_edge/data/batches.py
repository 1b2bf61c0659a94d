"""Mini-batches over dicts of aligned numpy arrays (what an ORT training step consumes)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from fedpeft_edge.runtime.errors import ensure


def iterate_batches(
    inputs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{**inputs[i], "labels": labels[i]}`` batches (C-contiguous copies; labels int64).

    The same ``seed`` gives the same order; pass e.g. ``seed=base_seed + epoch`` for a new order per epoch.
    """
    ensure(
        isinstance(batch_size, (int, np.integer)) and batch_size >= 1,
        f"batch_size must be >= 1, got {batch_size!r}",
    )
    ensure("labels" not in inputs, "inputs must not contain a 'labels' entry")
    labels = np.asarray(labels)
    ensure(labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer), "labels must be a 1-D integer array")
    n = labels.shape[0]
    for name, array in inputs.items():
        ensure(isinstance(array, np.ndarray), f"input {name!r} must be a numpy array")
        ensure(
            array.ndim >= 1 and array.shape[0] == n,
            f"input {name!r} has {array.shape[:1]} rows, labels have {n}",
        )
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    labels64 = labels.astype(np.int64, copy=False)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, int(batch_size)):
        idx = order[start : start + batch_size]
        if shuffle:
            batch = {name: np.ascontiguousarray(array[idx]) for name, array in inputs.items()}
            batch["labels"] = np.ascontiguousarray(labels64[idx])
        else:
            # Unshuffled: slices of contiguous arrays are contiguous; copy only if the source is not.
            batch = {
                name: np.ascontiguousarray(array[start : start + batch_size])
                for name, array in inputs.items()
            }
            batch["labels"] = np.ascontiguousarray(labels64[start : start + batch_size])
        yield batch


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


__all__ = ["iterate_batches", "num_batches"]
