"""Argument checks shared by both kernel backends.

The C core reads raw pointers (cffi's ``from_buffer`` ignores dtype), so every buffer is checked here
before any call, and the numpy reference runs the very same checks so that both backends raise the same
exception for the same bad input. Nothing is ever converted or copied: a wrong buffer is rejected.
"""

from __future__ import annotations

import builtins
import math
import operator

import numpy as np

# Our InvalidTypeError/InvalidValueError subclass the builtins; ``builtins.*`` catches numpy/Python's own.
from fedpeft_edge.runtime.errors import InvalidTypeError, InvalidValueError, NonFiniteError

F32 = np.dtype(np.float32)
I8 = np.dtype(np.int8)
U32 = np.dtype(np.uint32)

UINT32_LIMIT = 1 << 32
UINT64_LIMIT = 1 << 64
_F32_MAX = float(np.finfo(np.float32).max)


def buffer(name: str, arr: object, dtype: np.dtype, *, writable: bool = False) -> np.ndarray:
    """Check that ``arr`` is a 1-D, C-contiguous, aligned ndarray of exactly ``dtype``."""
    if not isinstance(arr, np.ndarray):
        raise InvalidTypeError(f"{name} must be a numpy.ndarray of {dtype.name}, got {type(arr).__name__}")
    if arr.dtype != dtype:
        # Also rejects non-native byte order ('>f4' != float32 here).
        raise InvalidTypeError(f"{name} must have dtype {dtype.name}, got {arr.dtype.str} ({arr.dtype})")
    if arr.ndim != 1:
        raise InvalidTypeError(f"{name} must be 1-D, got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise InvalidTypeError(
            f"{name} must be C-contiguous (got strides {arr.strides}); pass a contiguous copy")
    if not arr.flags.aligned:
        raise InvalidTypeError(f"{name} must be aligned to its {dtype.itemsize}-byte element size")
    if writable and not arr.flags.writeable:
        raise InvalidTypeError(f"{name} is an output and must be writable (got a read-only array)")
    return arr


def optional_output(name: str, arr: object, dtype: np.dtype, length: int) -> np.ndarray:
    """Allocate an output of ``length`` elements, or check the one the caller gave."""
    if arr is None:
        return np.empty(length, dtype=dtype)
    out = buffer(name, arr, dtype, writable=True)
    same_length(name, out, length)
    return out


def same_length(name: str, arr: np.ndarray, expected: int, what: str = "") -> None:
    if arr.shape[0] != expected:
        detail = f" ({what})" if what else ""
        raise InvalidValueError(f"{name} has {arr.shape[0]} elements, expected {expected}{detail}")


def no_overlap(written: tuple[str, np.ndarray], *others: tuple[str, np.ndarray | None],
               allow_identical: frozenset[str] = frozenset()) -> None:
    """Reject a written buffer that overlaps another argument (results would depend on the backend).

    ``allow_identical`` names arguments that may be the very same buffer as the written one.
    """
    wname, warr = written
    for oname, oarr in others:
        if oarr is None or warr.size == 0 or oarr.size == 0:
            continue
        if not np.may_share_memory(warr, oarr):
            continue
        identical = (oarr.ctypes.data == warr.ctypes.data and oarr.nbytes == warr.nbytes)
        if identical and oname in allow_identical:
            continue
        raise InvalidValueError(f"{wname} overlaps {oname} in memory; pass separate buffers")


def block_size(block: object) -> int:
    b = integer("block", block)
    if b < 1:
        raise InvalidValueError(f"block must be >= 1, got {b}")
    if b >= UINT64_LIMIT:
        raise InvalidValueError(f"block is too large: {b}")
    return b


def integer(name: str, value: object) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise InvalidTypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except builtins.TypeError:
        raise InvalidTypeError(f"{name} must be an integer, got {type(value).__name__}") from None


def top_k(k: object, n: int) -> int:
    kk = integer("k", k)
    if not 0 <= kk <= n:
        raise InvalidValueError(f"k must satisfy 0 <= k <= n = {n}, got {kk}")
    return kk


def seed64(seed: object) -> int:
    s = integer("stochastic_seed", seed)
    if not 0 <= s < UINT64_LIMIT:
        raise InvalidValueError(f"stochastic_seed must be in [0, 2**64), got {s}")
    return s


def step_count(step: object) -> int:
    s = integer("step", step)
    if not 1 <= s < UINT64_LIMIT:
        raise InvalidValueError(f"step must be an integer >= 1 (the first update is step 1), got {s}")
    return s


def real(name: str, value: object, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> float:
    """A finite Python number that stays finite as float32, within [low, high] (optionally open)."""
    # float() would also parse strings: accept only real numbers (Python or numpy scalars).
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidTypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or abs(v) > _F32_MAX:
        raise InvalidValueError(f"{name} must be finite in float32, got {v!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise InvalidValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise InvalidValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v!r}")
    return v


def nblocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def nonfinite(name: str) -> NonFiniteError:
    return NonFiniteError(f"{name} contains NaN or Inf")


# ---- per-kernel argument checks (return the normalised scalars) ------------------------------------------

def check_quantize(x: object, block: object, out: object, scales: object,
                   stochastic_seed: object) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, int | None]:
    xa = buffer("x", x, F32)
    b = block_size(block)
    n = xa.shape[0]
    q = optional_output("out", out, I8, n)
    s = optional_output("scales", scales, F32, nblocks(n, b))
    no_overlap(("out", q), ("x", xa), ("scales", s))
    no_overlap(("scales", s), ("x", xa))
    seed = None if stochastic_seed is None else seed64(stochastic_seed)
    return xa, b, q, s, seed


def check_dequantize(q: object, scales: object, block: object, out: object
                     ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    qa = buffer("q", q, I8)
    sa = buffer("scales", scales, F32)
    b = block_size(block)
    n = qa.shape[0]
    same_length("scales", sa, nblocks(n, b), f"ceil(len(q) / block) = ceil({n} / {b})")
    o = optional_output("out", out, F32, n)
    no_overlap(("out", o), ("q", qa), ("scales", sa))
    return qa, sa, b, o


def check_topk(update: object, residual: object, k: object, out_indices: object, out_values: object,
               out_residual: object
               ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
    u = buffer("update", update, F32)
    r = buffer("residual", residual, F32)
    n = u.shape[0]
    same_length("residual", r, n, "len(update)")
    if n >= UINT32_LIMIT:
        raise InvalidValueError(f"top-k needs fewer than 2**32 elements (uint32 indices), got {n}")
    kk = top_k(k, n)
    idx = optional_output("out_indices", out_indices, U32, kk)
    val = optional_output("out_values", out_values, F32, kk)
    res = optional_output("out_residual", out_residual, F32, n)
    no_overlap(("out_residual", res), ("update", u), ("residual", r), ("out_indices", idx),
               ("out_values", val), allow_identical=frozenset({"residual", "update"}))
    no_overlap(("out_indices", idx), ("update", u), ("residual", r), ("out_values", val))
    no_overlap(("out_values", val), ("update", u), ("residual", r))
    return u, r, kk, idx, val, res


def check_sgd(w: object, g: object, momentum_buf: object, lr: object, momentum: object,
              weight_decay: object, prox_mu: object, w_ref: object
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, tuple[float, ...]]:
    wa = buffer("w", w, F32, writable=True)
    n = wa.shape[0]
    ga = buffer("g", g, F32)
    same_length("g", ga, n, "len(w)")
    lr_ = real("lr", lr, low=0.0)
    mom = real("momentum", momentum, low=0.0)
    wd = real("weight_decay", weight_decay, low=0.0)
    mu = real("prox_mu", prox_mu, low=0.0)
    ma = None
    if momentum_buf is not None:
        ma = buffer("momentum_buf", momentum_buf, F32, writable=True)
        same_length("momentum_buf", ma, n, "len(w)")
    elif mom != 0.0:
        raise InvalidValueError("momentum_buf is required when momentum != 0")
    ref = _prox_reference(w_ref, mu, n)
    no_overlap(("w", wa), ("g", ga), ("momentum_buf", ma), ("w_ref", ref))
    if ma is not None:
        no_overlap(("momentum_buf", ma), ("g", ga), ("w_ref", ref))
    return wa, ga, ma, ref, (lr_, mom, wd, mu)


def check_adamw(w: object, g: object, m: object, v: object, step: object, lr: object, beta1: object,
                beta2: object, eps: object, weight_decay: object, prox_mu: object, w_ref: object
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int,
                           tuple[float, ...]]:
    wa = buffer("w", w, F32, writable=True)
    n = wa.shape[0]
    ga = buffer("g", g, F32)
    same_length("g", ga, n, "len(w)")
    ma = buffer("m", m, F32, writable=True)
    same_length("m", ma, n, "len(w)")
    va = buffer("v", v, F32, writable=True)
    same_length("v", va, n, "len(w)")
    st = step_count(step)
    lr_ = real("lr", lr, low=0.0)
    b1 = real("beta1", beta1, low=0.0, high=1.0, high_open=True)
    b2 = real("beta2", beta2, low=0.0, high=1.0, high_open=True)
    ep = real("eps", eps, low=0.0, low_open=True)
    wd = real("weight_decay", weight_decay, low=0.0)
    mu = real("prox_mu", prox_mu, low=0.0)
    ref = _prox_reference(w_ref, mu, n)
    no_overlap(("w", wa), ("g", ga), ("m", ma), ("v", va), ("w_ref", ref))
    no_overlap(("m", ma), ("g", ga), ("v", va), ("w_ref", ref))
    no_overlap(("v", va), ("g", ga), ("w_ref", ref))
    return wa, ga, ma, va, ref, st, (lr_, b1, b2, ep, wd, mu)


def _prox_reference(w_ref: object, mu: float, n: int) -> np.ndarray | None:
    if w_ref is None:
        if mu != 0.0:
            raise InvalidValueError("w_ref is required when prox_mu != 0")
        return None
    ref = buffer("w_ref", w_ref, F32)
    same_length("w_ref", ref, n, "len(w)")
    return ref


def check_clip(g: object, max_norm: object) -> tuple[np.ndarray, float]:
    ga = buffer("g", g, F32, writable=True)
    mx = real("max_norm", max_norm, low=0.0, low_open=True)
    return ga, mx


def check_axpy(acc: object, x: object, weight: object) -> tuple[np.ndarray, np.ndarray, float]:
    a = buffer("acc", acc, F32, writable=True)
    xa = buffer("x", x, F32)
    same_length("x", xa, a.shape[0], "len(acc)")
    w = real("weight", weight)
    no_overlap(("acc", a), ("x", xa))
    return a, xa, w


def check_sparse(acc: np.ndarray, indices: object, nnz_name: str, nnz: int) -> np.ndarray:
    """Dtype and length of the index array; range and order are checked by ``sorted_indices``."""
    idx = buffer("indices", indices, U32)
    if idx.shape[0] != nnz:
        raise InvalidValueError(f"indices has {idx.shape[0]} elements but {nnz_name} has {nnz}")
    return idx


def sorted_indices(indices: np.ndarray, n: int) -> None:
    """Strictly increasing and < n (what the C core calls FPE_EINDEX); the accumulator is untouched."""
    if indices.shape[0] == 0:
        return
    if int(indices[-1]) >= n or int(indices[0]) >= n:
        raise InvalidValueError(f"indices out of range: values must be < len(acc) = {n}")
    if indices.shape[0] > 1 and not bool(np.all(indices[1:] > indices[:-1])):
        raise InvalidValueError("indices must be strictly increasing (sorted, no duplicates)")


def check_scatter(acc: object, indices: object, values: object, weight: object
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    a = buffer("acc", acc, F32, writable=True)
    val = buffer("values", values, F32)
    idx = check_sparse(a, indices, "values", val.shape[0])
    w = real("weight", weight)
    no_overlap(("acc", a), ("indices", idx), ("values", val))
    return a, idx, val, w


def check_dequant_acc(acc: object, q: object, scales: object, block: object, weight: object
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    a = buffer("acc", acc, F32, writable=True)
    qa = buffer("q", q, I8)
    same_length("q", qa, a.shape[0], "len(acc)")
    sa = buffer("scales", scales, F32)
    b = block_size(block)
    same_length("scales", sa, nblocks(qa.shape[0], b), f"ceil(len(q) / block) = ceil({qa.shape[0]} / {b})")
    w = real("weight", weight)
    no_overlap(("acc", a), ("q", qa), ("scales", sa))
    return a, qa, sa, b, w


def check_sparse_dequant_acc(acc: object, indices: object, q: object, scales: object, block: object,
                             weight: object
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, float]:
    a = buffer("acc", acc, F32, writable=True)
    qa = buffer("q", q, I8)
    idx = check_sparse(a, indices, "q", qa.shape[0])
    sa = buffer("scales", scales, F32)
    b = block_size(block)
    same_length("scales", sa, nblocks(qa.shape[0], b), f"ceil(len(q) / block) = ceil({qa.shape[0]} / {b})")
    w = real("weight", weight)
    no_overlap(("acc", a), ("indices", idx), ("q", qa), ("scales", sa))
    return a, idx, qa, sa, b, w


def check_counters(i: object) -> np.ndarray:
    """Element counters for ``uniform``: any unsigned/non-negative integer array, any shape."""
    if not isinstance(i, np.ndarray):
        raise InvalidTypeError(f"i must be a numpy.ndarray of integers, got {type(i).__name__}")
    if i.dtype.kind not in "ui":
        raise InvalidTypeError(f"i must have an integer dtype, got {i.dtype}")
    if i.dtype.kind == "i" and i.size and int(i.min()) < 0:
        raise InvalidValueError("i must be non-negative")
    return i.astype(np.uint64, copy=False)
