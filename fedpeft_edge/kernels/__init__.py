"""Hot numerics on flat float32 buffers: the only module that touches the C core ``fedpeft_edge._core``.

Two backends implement the same contract (docs/kernels-api.md / csrc/fedpeft_core.h):

- ``"c"`` (default): the cffi C core, with a CPU path (avx2 / sse4.1 / baseline / neon) chosen at import;
- ``"numpy"``: the numpy reference, the oracle of the parity tests and the speed baseline.

Environment, read once at import:

- ``FEDPEFT_EDGE_BACKEND=c|numpy`` picks the backend. With ``c`` a missing or broken C core raises
  ImportError (``MissingDependencyError``); there is never a silent fallback to numpy.
- ``FEDPEFT_EDGE_CPU=auto|baseline|sse4.1|avx2`` (C backend only): ``baseline`` forces the portable path
  (``fpe_init(1)``), a path name pins that path.

Both backends validate every argument identically before any work (exact dtype, 1-D, C-contiguous,
aligned, writable outputs, consistent lengths) and raise ``fedpeft_edge.runtime.errors`` types: TypeError for
dtype/layout/writability, InvalidValueError for lengths and ranges (bad sparse indices: message starts with
"indices"), NonFiniteError for NaN/Inf. Nothing is copied or converted implicitly.
``get_backend("numpy")`` / ``get_backend("c")`` return backend objects with the same methods, so both can
run side by side in one process.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fedpeft_edge.kernels._reference import NumpyBackend
from fedpeft_edge.runtime.errors import InvalidValueError

__all__ = [
    "adamw_step",
    "all_finite",
    "axpy",
    "backend_info",
    "clip_by_global_norm",
    "dequant_accumulate",
    "dequantize_int8",
    "get_backend",
    "l2_norm",
    "quantize_int8",
    "scatter_add",
    "sgd_step",
    "sparse_dequant_accumulate",
    "topk_ef",
    "uniform",
]

BACKEND_ENV = "FEDPEFT_EDGE_BACKEND"
CPU_ENV = "FEDPEFT_EDGE_CPU"
BACKENDS = ("c", "numpy")

_instances: dict[str, Any] = {}


def get_backend(name: str) -> Any:
    """The backend object ``"c"`` or ``"numpy"`` (cached). ``"c"`` raises ImportError without the core."""
    if name not in BACKENDS:
        raise InvalidValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    if name not in _instances:
        if name == "numpy":
            _instances[name] = NumpyBackend()
        else:
            from fedpeft_edge.kernels._cffi import CBackend  # imports _core; raises if missing

            _instances[name] = CBackend(os.environ.get(CPU_ENV, "auto").strip().lower() or "auto")
    return _instances[name]


_selected = os.environ.get(BACKEND_ENV, "c").strip().lower() or "c"
_active = get_backend(_selected)


def __getattr__(name: str) -> Any:
    # Live values: the C CPU path can be re-pinned at run time (tests, benchmarks).
    if name == "backend":
        return _active.name
    if name == "cpu_path":
        return _active.cpu_path
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def backend_info() -> dict:
    """``{"backend", "cpu_path", "features", ...}`` of the active backend."""
    info = dict(_active.info())
    info["features"] = _cpu_features()
    return info


def _cpu_features() -> list[str]:
    """Relevant SIMD flags of this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    wanted = ("sse2", "sse4_1", "avx", "avx2", "fma", "avx512f", "asimd", "neon")
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in present]
    except OSError:
        pass
    return []


# ---- public kernels (delegate to the active backend) -------------------------------------------------

def quantize_int8(x: np.ndarray, block: int = 256, *, out: np.ndarray | None = None,
                  scales: np.ndarray | None = None, stochastic_seed: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per-block quantisation: (int8[n], float32[ceil(n/block)] scales).

    q = clamp(rint(x * (127/absmax))) per block (round half to even), or with ``stochastic_seed`` the
    unbiased floor(x * inv + uniform(seed, i)). NaN/Inf → NonFiniteError.
    """
    return _active.quantize_int8(x, block, out=out, scales=scales, stochastic_seed=stochastic_seed)


def dequantize_int8(q: np.ndarray, scales: np.ndarray, block: int = 256, *,
                    out: np.ndarray | None = None) -> np.ndarray:
    """x̂[i] = q[i] * scales[i // block] (float32)."""
    return _active.dequantize_int8(q, scales, block, out=out)


def topk_ef(update: np.ndarray, residual: np.ndarray, k: int, *, out_indices: np.ndarray | None = None,
            out_values: np.ndarray | None = None, out_residual: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k with error feedback on s = update + residual: (uint32 ascending indices, s[idx], new residual).

    Exactly k entries of largest |s| (ties → lower index). ``out_residual`` may be ``residual`` (or
    ``update``) itself, in place; on NonFiniteError that buffer is left as it was.
    """
    return _active.topk_ef(update, residual, k, out_indices=out_indices, out_values=out_values,
                           out_residual=out_residual)


def sgd_step(w: np.ndarray, g: np.ndarray, momentum_buf: np.ndarray | None, *, lr: float,
             momentum: float = 0.0, weight_decay: float = 0.0, prox_mu: float = 0.0,
             w_ref: np.ndarray | None = None) -> None:
    """In-place SGD (decoupled weight decay, optional momentum, FedProx term). NaN/Inf g → NonFiniteError."""
    _active.sgd_step(w, g, momentum_buf, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     prox_mu=prox_mu, w_ref=w_ref)


def adamw_step(w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *, step: int, lr: float,
               beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
               prox_mu: float = 0.0, w_ref: np.ndarray | None = None) -> None:
    """In-place AdamW (torch order: decay first; bias-corrected; ``step`` starts at 1)."""
    _active.adamw_step(w, g, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, prox_mu=prox_mu, w_ref=w_ref)


def clip_by_global_norm(g: np.ndarray, max_norm: float) -> float:
    """Scale g in place so that ||g|| <= max_norm; returns the pre-clip norm (g untouched on NaN/Inf)."""
    return _active.clip_by_global_norm(g, max_norm)


def axpy(acc: np.ndarray, x: np.ndarray, weight: float) -> None:
    """acc += weight * x (float32, no FMA: bit-exact across backends)."""
    _active.axpy(acc, x, weight)


def scatter_add(acc: np.ndarray, indices: np.ndarray, values: np.ndarray, weight: float) -> None:
    """acc[indices] += weight * values; indices uint32 strictly increasing and < len(acc), else
    InvalidValueError with acc untouched."""
    _active.scatter_add(acc, indices, values, weight)


def dequant_accumulate(acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int, weight: float) -> None:
    """acc += weight * dequantize_int8(q, scales, block), fused."""
    _active.dequant_accumulate(acc, q, scales, block, weight)


def sparse_dequant_accumulate(acc: np.ndarray, indices: np.ndarray, q: np.ndarray, scales: np.ndarray,
                              block: int, weight: float) -> None:
    """acc[indices] += weight * dequantize_int8(q, scales, block) (blocks run over the nnz values)."""
    _active.sparse_dequant_accumulate(acc, indices, q, scales, block, weight)


def l2_norm(x: np.ndarray) -> float:
    """||x||_2 accumulated in double (NaN/Inf when x holds them)."""
    return _active.l2_norm(x)


def all_finite(x: np.ndarray) -> bool:
    """True when x holds no NaN/Inf."""
    return _active.all_finite(x)


def uniform(seed: int, i: np.ndarray) -> np.ndarray:
    """The counter-based uniform in [0, 1) behind stochastic rounding, for element indices ``i``."""
    return _active.uniform(seed, i)
