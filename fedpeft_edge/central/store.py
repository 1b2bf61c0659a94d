"""The aggregator's round store: everything it must not lose, in one atomically replaced file.

:class:`RoundState` holds the round number, the global vector, the running weighted sum of the open
round, the accepted ``(client_id, round)`` pairs, the open round's buffered updates (central/robust.py:
their payloads concatenated in one uint8 array, their fields in the JSON), the server optimiser state and
counters. It lives in ONE file, ``<dir>/round_state.npz`` (``np.savez``, loaded with
``allow_pickle=False``; non-array fields as JSON stored in a uint8 array), replaced atomically
(:func:`fedpeft_edge.runtime.durable.atomic_file`). A reader sees the old file or the new one, never a
mix; stray temp files are ignored. Format 1 (before the buffer) still loads, with an empty buffer; format
2 (before FedNova's steps total ``acc_steps_weight`` = Σ w_i·τ_i) with that total equal to the weight
total, i.e. every update already counted stands for τ_i = 1 — which is what FedAvg counted it as.

The per-site ledger (``sites``: what the federation report shows of each site) is saved with the rest,
so it has the core's exactly-once guarantee; a state file written before it existed loads with ``{}``.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from fedpeft_edge import kernels
from fedpeft_edge.central.robust import BufferedUpdate
from fedpeft_edge.peft.rank_slots import RANK_METRIC
from fedpeft_edge.protocol.codec import parse
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.runtime.durable import atomic_file
from fedpeft_edge.runtime.errors import InvalidValueError

if TYPE_CHECKING:  # only for the type of RoundState.fresh (core imports this module)
    from fedpeft_edge.central.policy import AggregatorConfig

STATE_FILE: Final = "round_state.npz"
STATE_FORMAT: Final = 4  # 2 added the round buffer, 3 the steps total (FedNova), 4 the privacy ledger
READABLE_FORMATS: Final = (1, 2, 3, 4)
HISTORY_KEEP: Final = 20  # closed-round metrics kept in the state file (it is rewritten on every save)


class StateError(InvalidValueError):
    """The persisted round state is unreadable, inconsistent, or belongs to another configuration."""


def new_round_stats() -> dict[str, Any]:
    return {"participants": [], "bytes_in": 0, "late_accepted": 0, "clipped": 0, "weighted_norm_sum": 0.0,
            "metric_wsum": {}, "metric_w": {}}


@dataclass
class RoundState:
    """Everything the aggregator needs after a restart (see module docstring for the file format)."""

    fingerprint: dict[str, Any]
    round: int
    global_vec: np.ndarray
    acc_sum: np.ndarray
    acc_total_weight: float = 0.0
    acc_count: int = 0
    acc_steps_weight: float = 0.0  # Σ w_i·τ_i of the open round (= acc_total_weight under FedAvg)
    # (client_id, round the update was trained from) -> round in which it was counted
    accepted: dict[tuple[str, int], int] = field(default_factory=dict)
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    round_started_at: float = 0.0
    stats: dict[str, Any] = field(default_factory=new_round_stats)
    history: list[dict[str, Any]] = field(default_factory=list)
    # the open round's accepted updates, in acceptance order, when the policy buffers them
    buffer: list[BufferedUpdate] = field(default_factory=list)
    # per-site ledger: site -> {"samples", "rounds", "last_round", "last_at", "rejected": {reason: n}}
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    # differential privacy (central/privacy.py): "clip" (the current C), "multipliers" (each closed round's
    # effective noise multiplier, for the accountant), "exhausted" (the ε budget stopped the federation)
    privacy: dict[str, Any] = field(default_factory=dict)

    @property
    def buffer_nbytes(self) -> int:
        return sum(e.nbytes for e in self.buffer)

    @classmethod
    def fresh(cls, config: AggregatorConfig, initial_global: np.ndarray | None, now: float) -> RoundState:
        n = config.n_params
        if initial_global is None:
            g = np.zeros(n, dtype=np.float32)
        else:
            g = np.array(initial_global, dtype=np.float32, copy=True)
            if g.shape != (n,) or not kernels.all_finite(g):
                raise InvalidValueError(f"initial global must be finite float32[{n}]")
        return cls(config.fingerprint(), 0, g, np.zeros(n, dtype=np.float32), round_started_at=now)

    # ---- persistence -------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "fingerprint": self.fingerprint, "round": self.round,
            "acc_total_weight": self.acc_total_weight, "acc_count": self.acc_count,
            "acc_steps_weight": self.acc_steps_weight,
            "accepted": [[c, r, at] for (c, r), at in sorted(self.accepted.items())],
            "optimizer_keys": sorted(self.optimizer_state), "counters": self.counters,
            "round_started_at": self.round_started_at, "stats": self.stats, "history": self.history,
            "buffer": [e.meta() for e in self.buffer], "sites": self.sites, "privacy": self.privacy,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Atomically replace ``<directory>/round_state.npz``; returns its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(self._meta(), separators=(",", ":"), allow_nan=False).encode("utf-8")
        payloads = b"".join(e.update.payload for e in self.buffer)
        arrays = {"global": self.global_vec, "acc_sum": self.acc_sum,
                  "meta_json": np.frombuffer(meta, dtype=np.uint8),
                  "buffer_payload": np.frombuffer(payloads, dtype=np.uint8)}
        for key, val in self.optimizer_state.items():
            arrays[f"opt__{key}"] = val
        final = d / STATE_FILE
        with atomic_file(final) as f:
            np.savez(f, **arrays)
        return final

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> RoundState | None:
        """The persisted state, or ``None`` if the directory holds none. Corrupt state → StateError."""
        path = Path(directory) / STATE_FILE
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                files = {name: z[name] for name in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise StateError(f"cannot read {path}: {exc}") from exc
        try:
            meta = json.loads(bytes(files.pop("meta_json")).decode("utf-8"))
            if meta.get("format") not in READABLE_FORMATS:
                raise StateError(f"unsupported state format {meta.get('format')!r}")
            g, acc = files.pop("global"), files.pop("acc_sum")
            payload = files.pop("buffer_payload", np.zeros(0, np.uint8))
            opt = {k[len("opt__"):]: v for k, v in files.items() if k.startswith("opt__")}
            if sorted(opt) != meta["optimizer_keys"]:
                raise StateError("optimizer arrays do not match the recorded keys")
            n = int(meta["fingerprint"]["n_params"])
            for name, arr in (("global", g), ("acc_sum", acc)):
                if arr.dtype != np.float32 or arr.shape != (n,) or not kernels.all_finite(arr):
                    raise StateError(f"{name} must be finite float32[{n}]")
            accepted = {(str(c), int(r)): int(at) for c, r, at in meta["accepted"]}
            buffer = _load_buffer(meta.get("buffer", []), payload, n)
            if len(buffer) > int(meta["acc_count"]):
                raise StateError("more buffered updates than counted ones")
            total = float(meta["acc_total_weight"])
            steps_total = float(meta.get("acc_steps_weight", total))
            if not (math.isfinite(steps_total) and steps_total >= 0):
                raise StateError(f"acc_steps_weight must be finite and >= 0, got {steps_total!r}")
            return cls(
                fingerprint=meta["fingerprint"], round=int(meta["round"]), global_vec=g, acc_sum=acc,
                acc_total_weight=total, acc_count=int(meta["acc_count"]), acc_steps_weight=steps_total,
                accepted=accepted, optimizer_state=opt,
                counters={str(k): int(v) for k, v in meta["counters"].items()},
                round_started_at=float(meta["round_started_at"]), stats=meta["stats"],
                history=list(meta["history"]), buffer=buffer, sites=_load_sites(meta.get("sites", {})),
                privacy=_load_privacy(meta.get("privacy", {})),
            )
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise StateError(f"inconsistent state in {path}: {exc!r}") from exc


def _load_privacy(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise StateError("privacy ledger must be a map")
    out: dict[str, Any] = {}
    if "clip" in raw:
        clip = float(raw["clip"])
        if not (math.isfinite(clip) and clip > 0):
            raise StateError(f"privacy clip must be finite > 0, got {clip!r}")
        out["clip"] = clip
    zs = [float(z) for z in raw.get("multipliers", [])]
    if not all(math.isfinite(z) and z >= 0 for z in zs):
        raise StateError("privacy multipliers must be finite and >= 0")
    out["multipliers"] = zs
    out["exhausted"] = bool(raw.get("exhausted", False))
    return out


def _load_sites(raw: Any) -> dict[str, dict[str, Any]]:
    """The per-site ledger from the JSON meta, normalised (missing keys take their defaults)."""
    if not isinstance(raw, dict):
        raise StateError("sites must be an object")
    out: dict[str, dict[str, Any]] = {}
    for name, e in raw.items():
        if not isinstance(e, dict) or not isinstance(e.get("rejected", {}), dict):
            raise StateError(f"ledger entry of site {name!r} must be an object")
        last_round, last_at = e.get("last_round"), e.get("last_at")
        out[str(name)] = {
            "samples": int(e.get("samples", 0)), "rounds": int(e.get("rounds", 0)),
            "last_round": None if last_round is None else int(last_round),
            "last_at": None if last_at is None else float(last_at),
            "rejected": {str(k): int(v) for k, v in e.get("rejected", {}).items()},
        }
        acc = e.get("accuracy")  # the held-out accuracy the site last reported (absent before it existed)
        if acc is not None:
            out[str(name)]["accuracy"] = float(acc)
    return out


def _load_buffer(metas: list[dict[str, Any]], payload: np.ndarray, n: int) -> list[BufferedUpdate]:
    """The buffered updates from their JSON fields and the concatenated payloads, each validated again."""
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise StateError("buffer_payload must be a uint8 vector")
    raw = payload.tobytes()
    out: list[BufferedUpdate] = []
    offset = 0
    for m in metas:
        size = int(m["nbytes"])
        if size < 0 or offset + size > len(raw):
            raise StateError("buffered update lengths exceed the stored payload")
        entry = BufferedUpdate.from_meta(m, raw[offset : offset + size])
        offset += size
        if not (math.isfinite(entry.steps) and entry.steps > 0):
            raise StateError(f"buffered update of {entry.client_id} has steps {entry.steps!r}")
        try:
            # a site below the LoRA rank sent fewer values (central/core_ranks.py checks how many)
            ranked = RANK_METRIC in entry.metrics
            parse(entry.update, n_params=None if ranked else n, max_params=n)
        except WireFormatError as exc:
            raise StateError(f"buffered update of {entry.client_id} unreadable: {exc}") from exc
        out.append(entry)
    if offset != len(raw):
        raise StateError("stored buffer payload longer than its updates")
    return out
