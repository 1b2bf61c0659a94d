"""LoRA adapters of different ranks in one federation: rank conversion, HetLoRA and FlexLoRA aggregation.

A site's LoRA rank is what its CPU and memory allow, so a fleet mixes ranks. The aggregator keeps a global
adapter of the largest rank ``R`` and

* sends a rank-``r`` site the first ``r`` rank slots of it (:func:`truncate_rank`),
* reads a rank-``r`` update back into rank ``R`` by zero-padding (:func:`pad_rank`), and
* combines updates of mixed ranks with :func:`hetlora_aggregate` (slot-wise average of the factors) or
  :func:`flexlora_aggregate` (average of the products ``ΔW``, then SVD back to rank ``R``).

Layout (``peft/lora.py``): the branch beside a weight is ``x · A · scale · B`` with, for MatMul/Gemm sites,
``A`` of shape ``(d_in, r)`` and ``B`` of shape ``(r, d_out)``, so the rank axis is A's *last* axis and B's
*first*; for 1×1 Conv sites ``A`` is ``(r, c_in, 1, 1)`` and ``B`` is ``(c_out, r, 1, 1)`` (rank axis 0 of A,
1 of B). ``scale = alpha / rank`` (``PeftSpec.scaling``), so two sites with the same ``alpha`` and different
ranks scale their branch differently; every conversion here rescales ``B`` so that the product
``scale · A · B`` of the slots it keeps is unchanged.

Pure numpy: tensors arrive as ``{name: array}`` (a :class:`~fedpeft_edge.peft.layout.FlatLayout`'s
``split``); tensors that are not LoRA factors (a head, biases) must have the same shape on every site and
are averaged by weight, as FedAvg does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedpeft_edge.runtime.errors import InvalidTypeError, InvalidValueError, NonFiniteError

Tensors = dict[str, np.ndarray]
LORA_KINDS = ("matmul", "gemm", "conv")


class _HasLoraNames(Protocol):
    """What :func:`pairs_from_sites` reads of a ``peft.lora.LoraSite`` (read-only: it is frozen)."""

    @property
    def kind(self) -> str: ...
    @property
    def a(self) -> str: ...
    @property
    def b(self) -> str: ...


@dataclass(frozen=True)
class LoraPair:
    """The two factors of one LoRA-adapted weight: tensor names and the site kind (matmul | gemm | conv)."""

    a: str
    b: str
    kind: str = "matmul"

    def __post_init__(self) -> None:
        if self.kind not in LORA_KINDS:
            raise InvalidValueError(f"LoRA kind must be one of {LORA_KINDS}, got {self.kind!r}")
        if not self.a or not self.b or self.a == self.b:
            raise InvalidValueError(
                f"a LoRA pair needs two distinct tensor names, got {self.a!r}, {self.b!r}")

    @property
    def a_axis(self) -> int:
        return 0 if self.kind == "conv" else 1

    @property
    def b_axis(self) -> int:
        return 1 if self.kind == "conv" else 0

    def rank_of(self, tensors: Mapping[str, np.ndarray]) -> int:
        """The rank of this pair in ``tensors`` (checked: A and B must agree)."""
        a, b = _get(tensors, self.a), _get(tensors, self.b)
        if a.ndim != b.ndim or a.ndim < 2 or (self.kind == "conv") != (a.ndim == 4):
            raise InvalidValueError(f"LoRA pair {self.a}/{self.b} ({self.kind}): shapes {a.shape} and "
                                    f"{b.shape} do not fit the layout")
        ra, rb = a.shape[self.a_axis], b.shape[self.b_axis]
        if ra != rb:
            raise InvalidValueError(f"LoRA pair {self.a}/{self.b}: A has rank {ra}, B has rank {rb}")
        return int(ra)

    def product(self, tensors: Mapping[str, np.ndarray], scale: float) -> np.ndarray:
        """``ΔW`` of this pair as a 2-D float64 matrix: ``scale·A·B`` (MatMul) or ``scale·B·A`` (Conv)."""
        left, right = self._factors(tensors)
        return float(scale) * (left @ right)

    def product_norm(self, tensors: Mapping[str, np.ndarray], scale: float) -> float:
        """``‖ΔW‖_F`` without forming ``ΔW``: ``‖L·R‖² = Σ (LᵀL) ∘ (R·Rᵀ)``, two r × r Gram matrices."""
        left, right = self._factors(tensors)
        sq = float(np.sum((left.T @ left) * (right @ right.T)))
        return abs(float(scale)) * float(np.sqrt(max(sq, 0.0)))

    def _factors(self, tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        # (left, right) with ΔW = scale · left @ right, both 2-D; float64 so the SVD path loses nothing
        a = _get(tensors, self.a).astype(np.float64)
        b = _get(tensors, self.b).astype(np.float64)
        if self.kind == "conv":
            r = a.shape[0]
            return b.reshape(b.shape[0], r), a.reshape(r, -1)
        return a, b

    def from_factors(self, left: np.ndarray, right: np.ndarray, like_a: np.ndarray,
                     like_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) in this pair's tensor shapes from 2-D ``left`` / ``right`` (inverse of ``_factors``)."""
        r = left.shape[1]
        if self.kind == "conv":
            a = right.reshape(r, *like_a.shape[1:])
            b = left.reshape(like_b.shape[0], r, *like_b.shape[2:])
        else:
            a, b = left, right
        return a.astype(np.float32), b.astype(np.float32)


@dataclass(frozen=True)
class RankedUpdate:
    """One site's trained adapter: its tensors, LoRA rank, LoRA scale (alpha/rank) and FedAvg weight."""

    tensors: Mapping[str, np.ndarray]
    rank: int
    scale: float
    weight: float


def pairs_from_sites(sites: Iterable[_HasLoraNames]) -> tuple[LoraPair, ...]:
    """LoRA pairs from a PEFT plan's ``lora_sites`` (``peft.lora.LoraSite``: ``.a``, ``.b``, ``.kind``)."""
    return tuple(LoraPair(a=s.a, b=s.b, kind=s.kind) for s in sites)


# ------------------------------------------------------------------------------ rank conversion


def truncate_rank(tensors: Mapping[str, np.ndarray], pairs: Sequence[LoraPair], rank: int, *,
                  scale_from: float, scale_to: float) -> Tensors:
    """The first ``rank`` slots of every LoRA pair (other tensors copied): what a rank-``rank`` site gets.

    ``B`` is multiplied by ``scale_from / scale_to`` so each kept slot adds the same ``scale·A·B`` as before.
    """
    _check_rank(rank, "target rank")
    ratio = _scale_ratio(scale_from, scale_to)
    out = _copy_all(tensors)
    for p in pairs:
        have = p.rank_of(tensors)
        if rank > have:
            raise InvalidValueError(f"cannot truncate {p.a}/{p.b} of rank {have} to the larger rank {rank}")
        out[p.a] = np.ascontiguousarray(np.take(out[p.a], np.arange(rank), axis=p.a_axis))
        out[p.b] = np.ascontiguousarray(np.take(out[p.b], np.arange(rank), axis=p.b_axis) * ratio,
                                        dtype=np.float32)
    return out


def pad_rank(tensors: Mapping[str, np.ndarray], pairs: Sequence[LoraPair], rank: int, *,
             scale_from: float, scale_to: float) -> Tensors:
    """Every LoRA pair zero-padded to ``rank`` slots (other tensors copied): a site's update read at rank R.

    The added slots are zero in A and B (they add nothing); ``B`` is rescaled as in :func:`truncate_rank`.
    """
    _check_rank(rank, "target rank")
    ratio = _scale_ratio(scale_from, scale_to)
    out = _copy_all(tensors)
    for p in pairs:
        have = p.rank_of(tensors)
        if have > rank:
            raise InvalidValueError(f"{p.a}/{p.b} has rank {have}, above the maximum rank {rank}")
        out[p.a] = _pad_axis(out[p.a], p.a_axis, rank)
        out[p.b] = _pad_axis(out[p.b] * ratio, p.b_axis, rank)
    return out


# ------------------------------------------------------------------------------------ aggregation


def hetlora_aggregate(updates: Sequence[RankedUpdate], pairs: Sequence[LoraPair], max_rank: int, *,
                      scale: float, norm_weighted: bool = False, slotwise: bool = True) -> Tensors:
    """Zero-padding aggregation of mixed-rank LoRA factors with rank-aware (slot-wise) weighting.

    What is implemented, exactly: every update is zero-padded to ``max_rank`` (its ``B`` rescaled from its
    own ``scale`` to the global ``scale``); then for each LoRA pair and each rank slot ``i`` (row/column
    ``i`` of A and of B), the slot is the weighted mean over the sites whose rank covers ``i`` only
    (``rank_k > i``), weights ``weight_k`` (sample counts). A plain zero-padded mean would count a rank-4
    site's padding zeros in slots 5-8 and shrink them toward zero each round; dividing each slot by the
    weight of the sites that trained it is the "rank-aware" weighting (as in RBLA, arXiv:2408.08699). Slots
    no site covers come out zero. With equal ranks this is exactly FedAvg of the factors.

    ``norm_weighted=True`` additionally multiplies each site's weight, per LoRA pair, by the Frobenius norm
    of its ``ΔW_k = scale_k·A_k·B_k`` — HetLoRA's "sparsity-weighted aggregation" (Cho et al., 2024), which
    lets sites whose update says more count more (the paper weights by the norms alone; here they multiply
    the sample weights). ``slotwise=False`` divides every slot by the weight of
    all sites, padding zeros included: the plain zero-padded average of HetLoRA's paper, which shrinks the
    slots only high-rank sites train. ``norm_weighted=True, slotwise=False`` is HetLoRA's aggregation as
    published; its local rank self-pruning is not implemented.
    Non-LoRA tensors are the weighted mean over all sites (FedAvg).
    """
    _check_rank(max_rank, "max_rank")
    _check_updates(updates, pairs, max_rank)
    padded = [pad_rank(u.tensors, pairs, max_rank, scale_from=u.scale, scale_to=scale) for u in updates]
    weights = np.array([u.weight for u in updates], dtype=np.float64)
    out = _average_others(padded, weights, pairs)
    ranks = np.array([u.rank for u in updates])
    for p in pairs:
        w = weights.copy()
        if norm_weighted:
            norms = np.array([p.product_norm(u.tensors, u.scale) for u in updates])
            # all-zero products (the first round's B = 0) carry no norm signal: fall back to plain weights
            if norms.sum() > 0:
                w = w * norms
        # covered[k, i]: site k trained slot i; den[i]: weight of the sites that did
        covered = (np.arange(max_rank)[None, :] < ranks[:, None]).astype(np.float64) * w[:, None]
        den = covered.sum(axis=0) if slotwise else np.full(max_rank, w.sum())
        coef = np.divide(covered, den[None, :], out=np.zeros_like(covered), where=den[None, :] > 0)
        for name, axis in ((p.a, p.a_axis), (p.b, p.b_axis)):
            acc = np.zeros(padded[0][name].shape, dtype=np.float64)
            shape = [1] * acc.ndim
            shape[axis] = max_rank
            for k, t in enumerate(padded):
                acc += t[name].astype(np.float64) * coef[k].reshape(shape)
            out[name] = acc.astype(np.float32)
    return {name: out[name] for name in updates[0].tensors}  # the updates' tensor order


def flexlora_aggregate(updates: Sequence[RankedUpdate], pairs: Sequence[LoraPair], max_rank: int, *,
                       scale: float) -> Tensors:
    """FlexLoRA (Bai et al., 2024): average the full products, then re-factorise by SVD at rank ``max_rank``.

    For each LoRA pair: ``ΔW_k = scale_k · A_k·B_k`` per site (its own ``alpha/rank``), ``ΔW`` = their
    weighted mean (sample counts), ``ΔW = U·S·Vᵀ``, kept to the ``max_rank`` largest singular values and
    split evenly: ``left = U·√S / √scale``, ``right = √S·Vᵀ / √scale``, so that ``scale·A·B`` is the best
    rank-``max_rank`` approximation of ``ΔW`` (Eckart-Young). Slots are ordered by singular value, so
    :func:`truncate_rank` of the result to ``r`` is the best rank-``r`` approximation too: that is what a
    rank-``r`` site is sent. Non-LoRA tensors are the weighted mean over all sites (FedAvg).
    """
    _check_rank(max_rank, "max_rank")
    _check_updates(updates, pairs, max_rank)
    _scale_ratio(scale, scale)  # validates the global scale
    weights = np.array([u.weight for u in updates], dtype=np.float64)
    weights = weights / weights.sum()
    out = _average_others([u.tensors for u in updates], weights, pairs)
    like = updates[int(np.argmax([u.rank for u in updates]))].tensors
    for p in pairs:
        u_, s_, vt = _svd_of_sum(p, updates, weights)
        k = min(max_rank, s_.size)
        root = np.sqrt(s_[:k] / float(scale))
        left = np.zeros((u_.shape[0], max_rank))
        right = np.zeros((max_rank, vt.shape[1]))
        left[:, :k] = u_[:, :k] * root[None, :]
        right[:k] = root[:, None] * vt[:k]
        a_like = _pad_axis(np.asarray(like[p.a]), p.a_axis, max_rank)
        b_like = _pad_axis(np.asarray(like[p.b]), p.b_axis, max_rank)
        out[p.a], out[p.b] = p.from_factors(left, right, a_like, b_like)
    return {name: out[name] for name in updates[0].tensors}  # the updates' tensor order


def _svd_of_sum(p: LoraPair, updates: Sequence[RankedUpdate], weights: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of ``Σ w_k·scale_k·L_k·R_k`` without forming the d_in × d_out matrix when it need not.

    The sum is ``L·R`` with ``L = [w_k·scale_k·L_k]`` (d1 × Σr) and ``R`` the stacked ``R_k`` (Σr × d2), so
    with ``L = Q_l·R_l`` and ``Rᵀ = Q_r·R_r`` its SVD is ``Q_l·svd(R_l·R_rᵀ)·Q_rᵀ``: exact, and the SVD is
    of a Σr × Σr core (24 × 24 for ranks 8/8/4/4) instead of 384 × 384 (measured: 1.8 s → tens of ms per
    round for MiniLM's 12 LoRA pairs on one core).
    """
    lefts, rights = [], []
    for w, u in zip(weights, updates, strict=True):
        left, right = p._factors(u.tensors)
        lefts.append(float(w) * float(u.scale) * left)
        rights.append(right)
    big_l, big_r = np.concatenate(lefts, axis=1), np.concatenate(rights, axis=0)
    if big_l.shape[1] >= min(big_l.shape[0], big_r.shape[1]):  # no saving: the plain SVD
        return np.linalg.svd(big_l @ big_r, full_matrices=False)
    q_l, r_l = np.linalg.qr(big_l)
    q_r, r_r = np.linalg.qr(big_r.T)
    u_c, s_, vt_c = np.linalg.svd(r_l @ r_r.T)
    return q_l @ u_c, s_, vt_c @ q_r.T


def lora_products(tensors: Mapping[str, np.ndarray], pairs: Sequence[LoraPair], scale: float
                  ) -> dict[str, np.ndarray]:
    """``ΔW`` of every pair (keyed by A's name): what a rank conversion or aggregation must preserve."""
    return {p.a: p.product(tensors, scale) for p in pairs}


# ------------------------------------------------------------------------------------- checks


def _get(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in tensors:
        raise InvalidValueError(f"LoRA tensor {name!r} is missing")
    value = tensors[name]
    if not isinstance(value, np.ndarray):
        raise InvalidTypeError(f"tensor {name!r} must be a numpy array, got {type(value).__name__}")
    return value


def _check_rank(rank: object, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or int(rank) <= 0:
        raise InvalidValueError(f"{what} must be a positive integer, got {rank!r}")


def _scale_ratio(scale_from: float, scale_to: float) -> float:
    for s in (scale_from, scale_to):
        if not (isinstance(s, int | float | np.floating) and np.isfinite(s) and s > 0):
            raise InvalidValueError(f"a LoRA scale must be a finite number > 0, got {s!r}")
    return float(scale_from) / float(scale_to)


def _copy_all(tensors: Mapping[str, np.ndarray]) -> Tensors:
    out = {}
    for name, value in tensors.items():
        arr = _get(tensors, name)
        if arr.dtype.kind != "f":
            raise InvalidTypeError(f"tensor {name!r} must hold floats, got {value.dtype}")
        if not np.all(np.isfinite(arr)):
            raise NonFiniteError(f"tensor {name!r} holds NaN or Inf")
        out[name] = np.array(arr, dtype=np.float32, copy=True)
    return out


def _pad_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(np.asarray(x, dtype=np.float32), widths)


def _check_updates(updates: Sequence[RankedUpdate], pairs: Sequence[LoraPair], max_rank: int) -> None:
    if not updates:
        raise InvalidValueError("no updates to aggregate")
    if not pairs:
        raise InvalidValueError("no LoRA pairs given: use plain FedAvg for adapters without LoRA factors")
    names = set(updates[0].tensors)
    lora = {n for p in pairs for n in (p.a, p.b)}
    if not lora <= names:
        raise InvalidValueError(f"LoRA tensors missing from the updates: {sorted(lora - names)}")
    for k, u in enumerate(updates):
        if not isinstance(u, RankedUpdate):
            raise InvalidTypeError(f"update {k} must be a RankedUpdate, got {type(u).__name__}")
        _check_rank(u.rank, f"update {k}'s rank")
        if u.rank > max_rank:
            raise InvalidValueError(f"update {k} has rank {u.rank}, above the maximum rank {max_rank}")
        if not (isinstance(u.weight, int | float | np.number) and np.isfinite(u.weight) and u.weight > 0):
            raise InvalidValueError(f"update {k}'s weight must be a finite number > 0, got {u.weight!r}")
        _scale_ratio(u.scale, u.scale)
        if set(u.tensors) != names:
            raise InvalidValueError(f"update {k} has tensors {sorted(set(u.tensors) ^ names)} "
                                    "that the first update does not (or the reverse)")
        for name in names:
            arr = _get(u.tensors, name)
            if not np.all(np.isfinite(arr)):
                raise NonFiniteError(f"update {k}: tensor {name!r} holds NaN or Inf")
        for p in pairs:
            if p.rank_of(u.tensors) != u.rank:
                raise InvalidValueError(f"update {k} declares rank {u.rank} but {p.a}/{p.b} has rank "
                                        f"{p.rank_of(u.tensors)}")
            for name, axis in ((p.a, p.a_axis), (p.b, p.b_axis)):
                mine, first = list(u.tensors[name].shape), list(updates[0].tensors[name].shape)
                mine[axis] = first[axis] = 0
                if mine != first:
                    raise InvalidValueError(f"update {k}: {name!r} has shape {u.tensors[name].shape}, "
                                            f"not compatible with {updates[0].tensors[name].shape}")
        for name in names - lora:
            if u.tensors[name].shape != updates[0].tensors[name].shape:
                raise InvalidValueError(f"update {k}: {name!r} has shape {u.tensors[name].shape}, "
                                        f"others {updates[0].tensors[name].shape}")


def _average_others(tensors: Sequence[Mapping[str, np.ndarray]], weights: np.ndarray,
                    pairs: Sequence[LoraPair]) -> Tensors:
    """Weighted mean of every non-LoRA tensor (FedAvg); LoRA entries are filled in by the caller."""
    lora = {n for p in pairs for n in (p.a, p.b)}
    w = weights / weights.sum()
    out: Tensors = {}
    for name in tensors[0]:
        if name in lora:
            continue
        acc = sum(float(wk) * np.asarray(t[name], dtype=np.float64) for wk, t in zip(w, tensors, strict=True))
        out[name] = np.asarray(acc, dtype=np.float32)
    return out
