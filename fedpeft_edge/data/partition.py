"""Client partitions for federated experiments: IID, Dirichlet label skew, natural groups.

Every function returns one sorted int64 index array per client; the arrays are disjoint, cover
``range(n)`` exactly and depend only on the arguments (``seed`` included).
"""

from __future__ import annotations

import numpy as np

from fedpeft_edge.runtime.errors import InvalidValueError, ensure
from fedpeft_edge.runtime.names import PARTITIONS

PARTITION_SCHEMES = PARTITIONS
_DIRICHLET_ATTEMPTS = 200


def _check_clients(n: int, num_clients: int, min_size: int = 1) -> None:
    ensure(
        isinstance(num_clients, (int, np.integer)) and num_clients >= 1,
        f"num_clients must be >= 1, got {num_clients!r}",
    )
    ensure(
        isinstance(min_size, (int, np.integer)) and min_size >= 0, f"min_size must be >= 0, got {min_size!r}"
    )
    ensure(
        n >= num_clients * max(min_size, 1),
        f"{n} samples cannot give {num_clients} clients at least {max(min_size, 1)} each",
    )


def _as_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    ensure(arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer), f"{name} must be a 1-D integer array")
    return arr.astype(np.int64, copy=False)


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A random permutation of ``range(n)`` cut into ``num_clients`` near-equal parts."""
    ensure(isinstance(n, (int, np.integer)) and n >= 0, f"n must be a non-negative int, got {n!r}")
    _check_clients(int(n), num_clients)
    order = np.random.default_rng(seed).permutation(int(n))
    return _finish(np.array_split(order, int(num_clients)))


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed split: for each class, client shares ~ Dirichlet(alpha, ..., alpha).

    The usual FL benchmark scheme (Hsu et al. 2019): small ``alpha`` gives each client few classes, large
    ``alpha`` approaches IID. Draws are repeated (deterministically) until every client holds at least
    ``min_size`` samples; if that never happens, samples move from the largest clients to the short ones.
    """
    labels = _as_labels(labels)
    ensure(np.isfinite(alpha) and alpha > 0, f"alpha must be a positive finite number, got {alpha!r}")
    n = labels.size
    _check_clients(n, num_clients, min_size)
    num_clients = int(num_clients)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]

    parts: list[list[np.ndarray]] = []
    for _attempt in range(_DIRICHLET_ATTEMPTS):
        parts = [[] for _ in range(num_clients)]
        for idx in members:
            shuffled = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(np.int64)
            for client, piece in enumerate(np.split(shuffled, cuts)):
                parts[client].append(piece)
        sizes = [sum(len(p) for p in client_parts) for client_parts in parts]
        if min(sizes) >= min_size:
            break
    flat = [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]
    return _finish(_top_up(flat, min_size, rng))


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest clients until each holds ``min_size`` (no-op if they do)."""
    parts = [rng.permutation(p) for p in parts]
    while True:
        sizes = np.array([len(p) for p in parts])
        short = int(np.argmin(sizes))
        if sizes[short] >= min_size:
            return parts
        donor = int(np.argmax(sizes))
        need = min(min_size - int(sizes[short]), int(sizes[donor]) - min_size)
        ensure(need > 0, "cannot satisfy min_size")  # unreachable given _check_clients
        parts[short] = np.concatenate([parts[short], parts[donor][:need]])
        parts[donor] = parts[donor][need:]


def group_partition(groups: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Natural non-IID split by group id (e.g. 20NG top-level hierarchy, Fashion-MNIST super-groups).

    With at least as many groups as clients, each client receives whole groups (largest first, to the
    least loaded client). With more clients than groups, every group gets clients in proportion to its
    size (at least one) and its samples are split evenly among them, so no client mixes groups.
    """
    groups = _as_labels(groups, "groups")
    n = groups.size
    _check_clients(n, num_clients)
    num_clients = int(num_clients)
    rng = np.random.default_rng(seed)
    ids, sizes = np.unique(groups, return_counts=True)
    # Random tie-break so equal-size groups do not always land on the same client.
    order = np.lexsort((rng.permutation(len(ids)), -sizes))
    members = {int(g): rng.permutation(np.flatnonzero(groups == g)) for g in ids}

    if len(ids) >= num_clients:
        loads = np.zeros(num_clients, dtype=np.int64)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for k in order:
            client = int(np.argmin(loads))
            parts[client].append(members[int(ids[k])])
            loads[client] += sizes[k]
        return _finish([np.concatenate(p) for p in parts])

    # More clients than groups: apportion clients to groups (>= 1 each, never more than its sample count).
    per_group = np.ones(len(ids), dtype=np.int64)
    for _ in range(num_clients - len(ids)):
        room = per_group < sizes
        ensure(bool(room.any()), "not enough samples to give every client one")
        score = np.where(room, sizes / per_group, -1.0)
        per_group[int(np.argmax(score))] += 1
    result: list[np.ndarray] = []
    for k in order:
        result.extend(np.array_split(members[int(ids[k])], int(per_group[k])))
    return _finish(result)


def partition(
    name: str,
    labels: np.ndarray,
    groups: np.ndarray | None,
    num_clients: int,
    alpha: float = 0.5,
    seed: int = 0,
    *,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Dispatch by scheme: ``"iid"``, ``"dirichlet"`` (uses ``alpha``), ``"group"`` (needs ``groups``)."""
    labels = _as_labels(labels)
    if name == "iid":
        return iid_partition(labels.size, num_clients, seed)
    if name == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed, min_size=min_size)
    if name == "group":
        if groups is None:
            raise InvalidValueError("the 'group' partition needs natural group ids; this dataset has none")
        groups = _as_labels(groups, "groups")
        ensure(groups.shape == labels.shape, "groups and labels must have the same length")
        return group_partition(groups, num_clients, seed)
    raise InvalidValueError(f"unknown partition scheme {name!r}; known: {', '.join(PARTITION_SCHEMES)}")


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    0 for identical distributions; approaches 1 when clients hold disjoint rare classes. A client without
    samples is skipped.
    """
    labels = _as_labels(labels)
    ensure(labels.size == 0 or int(labels.min()) >= 0, "labels must be non-negative class ids")
    num_classes = int(labels.max()) + 1 if labels.size else 0
    global_dist = np.bincount(labels, minlength=num_classes) / max(labels.size, 1)
    distances = []
    for part in parts:
        if len(part) == 0:
            continue
        local = np.bincount(labels[part], minlength=num_classes) / len(part)
        distances.append(0.5 * float(np.abs(local - global_dist).sum()))
    return float(np.mean(distances)) if distances else 0.0


def class_histograms(
    labels: np.ndarray, parts: list[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """int64 ``[clients, classes]`` sample counts per client and class (for reports and sanity checks)."""
    labels = _as_labels(labels)
    ensure(labels.size == 0 or int(labels.min()) >= 0, "labels must be non-negative class ids")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(np.int64)


__all__ = [
    "PARTITION_SCHEMES",
    "class_histograms",
    "dirichlet_partition",
    "group_partition",
    "iid_partition",
    "label_skew",
    "partition",
]
