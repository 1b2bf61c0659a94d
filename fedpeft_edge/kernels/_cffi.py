"""C backend: checked wrappers over ``fedpeft_edge._core`` (cffi API mode).

Every buffer is validated by ``_validate`` before its pointer is taken: ``ffi.from_buffer`` would read a
float64 array as float32 without complaint. Buffers are passed without copies; return codes become the
exceptions of ``fedpeft_edge.runtime.errors``.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator

import numpy as np

from fedpeft_edge.kernels import _validate as V
from fedpeft_edge.runtime.errors import InvalidValueError, KernelError, MissingDependencyError, NonFiniteError

try:
    from fedpeft_edge._core import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise MissingDependencyError(
        "the C core fedpeft_edge._core is not built or failed to load "
        f"({exc}); build it with `pip install -e . --no-build-isolation` from the repository root, "
        "or select the numpy reference with FEDPEFT_EDGE_BACKEND=numpy"
    ) from exc

PATH_NAMES = {lib.FPE_PATH_BASELINE: "baseline", lib.FPE_PATH_SSE41: "sse4.1", lib.FPE_PATH_AVX2: "avx2",
              lib.FPE_PATH_NEON: "neon"}
PATH_CODES = {name: code for code, name in PATH_NAMES.items()}


def _ptr(ctype: str, arr: np.ndarray | None, *, writable: bool = False) -> object:
    if arr is None:
        return ffi.NULL
    return ffi.from_buffer(ctype, arr, require_writable=writable)


def _raise_for(rc: int, kernel: str, nonfinite_what: str = "an input") -> None:
    if rc == lib.FPE_OK:
        return
    text = ffi.string(lib.fpe_strerror(rc)).decode("ascii", "replace")
    if rc == lib.FPE_ENONFINITE:
        raise NonFiniteError(f"{kernel}: {nonfinite_what} contains NaN or Inf ({text})")
    if rc == lib.FPE_EINDEX:
        raise InvalidValueError(f"{kernel}: indices must be strictly increasing and < len(acc) ({text})")
    if rc == lib.FPE_EINVAL:
        raise InvalidValueError(f"{kernel}: {text}")
    if rc == lib.FPE_ENOMEM:
        raise MemoryError(f"{kernel}: {text}")
    raise KernelError(f"{kernel}: C core returned {rc} ({text})")


class CBackend:
    """The C kernels. The CPU path is process-wide state of the C library, shared by every instance."""

    name = "c"

    def __init__(self, cpu: str = "auto") -> None:
        self.select_cpu(cpu)

    # ---- CPU path ----------------------------------------------------------------------------------

    @property
    def cpu_path(self) -> str:
        return PATH_NAMES.get(lib.fpe_cpu_path(), f"unknown({lib.fpe_cpu_path()})")

    @staticmethod
    def supported_paths() -> list[str]:
        return [name for code, name in PATH_NAMES.items() if lib.fpe_path_supported(code)]

    def select_cpu(self, cpu: str) -> str:
        """``auto`` (best supported), ``baseline`` (fpe_init(1)), or a path name to pin."""
        if cpu in ("", "auto"):
            lib.fpe_init(0)
        elif cpu == "baseline":
            lib.fpe_init(1)
        elif cpu in PATH_CODES:
            if lib.fpe_set_cpu_path(PATH_CODES[cpu]) != lib.FPE_OK:
                supported = self.supported_paths()
                raise InvalidValueError(f"CPU path {cpu!r} is not supported here; supported: {supported}")
        else:
            raise InvalidValueError(
                f"unknown CPU path {cpu!r}; use auto, baseline or one of {sorted(PATH_CODES)}")
        return self.cpu_path

    @contextlib.contextmanager
    def using_cpu(self, cpu: str) -> Iterator[str]:
        """Temporarily run on another CPU path (tests and benchmarks), then restore the previous one."""
        previous = lib.fpe_cpu_path()
        try:
            yield self.select_cpu(cpu)
        finally:
            lib.fpe_set_cpu_path(previous)

    def info(self) -> dict:
        return {"backend": self.name, "cpu_path": self.cpu_path, "supported_paths": self.supported_paths(),
                "machine": platform.machine()}

    # ---- int8 block quantisation -------------------------------------------------------------------

    def quantize_int8(self, x, block=256, *, out=None, scales=None, stochastic_seed=None):
        xa, b, q, s, seed = V.check_quantize(x, block, out, scales, stochastic_seed)
        n = xa.shape[0]
        px = _ptr("float[]", xa)
        pq, ps = _ptr("int8_t[]", q, writable=True), _ptr("float[]", s, writable=True)
        if seed is None:
            rc = lib.fpe_quantize_int8(px, n, b, pq, ps)
        else:
            rc = lib.fpe_quantize_int8_stochastic(px, n, b, seed, pq, ps)
        _raise_for(rc, "quantize_int8", "x")
        return q, s

    def dequantize_int8(self, q, scales, block=256, *, out=None):
        qa, sa, b, o = V.check_dequantize(q, scales, block, out)
        rc = lib.fpe_dequantize_int8(_ptr("int8_t[]", qa), _ptr("float[]", sa), qa.shape[0], b,
                                     _ptr("float[]", o, writable=True))
        _raise_for(rc, "dequantize_int8", "scales")
        return o

    def uniform(self, seed, i):
        """Element-by-element calls of ``fpe_uniform`` (a checking aid for the generator, not fast)."""
        s = V.seed64(seed)
        counters = V.check_counters(i)
        flat = counters.reshape(-1)
        out = np.fromiter((lib.fpe_uniform(s, int(c)) for c in flat), dtype=np.float32, count=flat.size)
        return out.reshape(counters.shape)

    # ---- top-k with error feedback -----------------------------------------------------------------

    def topk_ef(self, update, residual, k, *, out_indices=None, out_values=None, out_residual=None):
        u, r, kk, idx, val, res = V.check_topk(update, residual, k, out_indices, out_values, out_residual)
        # In place (out_residual is residual or update), the C core checks u + r in a read-only
        # pre-pass, so a rejected update leaves the error-feedback state untouched (tested).
        rc = lib.fpe_topk_ef(_ptr("float[]", u), _ptr("float[]", r), u.shape[0], kk,
                             _ptr("uint32_t[]", idx, writable=True), _ptr("float[]", val, writable=True),
                             _ptr("float[]", res, writable=True))
        _raise_for(rc, "topk_ef", "update + residual")
        return idx, val, res

    @staticmethod
    def _l2(xa: np.ndarray) -> float:
        out = ffi.new("double *")
        _raise_for(lib.fpe_l2_norm(_ptr("float[]", xa), xa.shape[0], out), "l2_norm")
        return float(out[0])

    # ---- optimizer steps ---------------------------------------------------------------------------

    def sgd_step(self, w, g, momentum_buf, *, lr, momentum=0.0, weight_decay=0.0, prox_mu=0.0, w_ref=None):
        wa, ga, ma, ref, (lr_, mom, wd, mu) = V.check_sgd(w, g, momentum_buf, lr, momentum, weight_decay,
                                                        prox_mu, w_ref)
        self._finite_or_raise(ga, "g")  # the C step does not check gradients; a NaN would poison w
        rc = lib.fpe_sgd_step(_ptr("float[]", wa, writable=True), _ptr("float[]", ga),
                              _ptr("float[]", ma if mom != 0.0 else None, writable=True),
                              _ptr("float[]", ref), wa.shape[0], lr_, mom, wd, mu)
        _raise_for(rc, "sgd_step", "g")

    def adamw_step(self, w, g, m, v, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                   prox_mu=0.0, w_ref=None):
        wa, ga, ma, va, ref, st, (lr_, b1, b2, ep, wd, mu) = V.check_adamw(
            w, g, m, v, step, lr, beta1, beta2, eps, weight_decay, prox_mu, w_ref)
        self._finite_or_raise(ga, "g")
        rc = lib.fpe_adamw_step(_ptr("float[]", wa, writable=True), _ptr("float[]", ga),
                                _ptr("float[]", ma, writable=True), _ptr("float[]", va, writable=True),
                                _ptr("float[]", ref), wa.shape[0], st, lr_, b1, b2, ep, wd, mu)
        _raise_for(rc, "adamw_step", "g")

    def clip_by_global_norm(self, g, max_norm):
        ga, mx = V.check_clip(g, max_norm)
        norm = ffi.new("double *")
        rc = lib.fpe_clip_by_global_norm(_ptr("float[]", ga, writable=True), ga.shape[0], mx, norm)
        _raise_for(rc, "clip_by_global_norm", "g")
        return float(norm[0])

    # ---- aggregation -------------------------------------------------------------------------------

    def axpy(self, acc, x, weight):
        a, xa, w = V.check_axpy(acc, x, weight)
        rc = lib.fpe_axpy(_ptr("float[]", a, writable=True), _ptr("float[]", xa), a.shape[0], w)
        _raise_for(rc, "axpy", "x")

    def scatter_add(self, acc, indices, values, weight):
        a, idx, val, w = V.check_scatter(acc, indices, values, weight)
        rc = lib.fpe_scatter_add(_ptr("float[]", a, writable=True), a.shape[0], _ptr("uint32_t[]", idx),
                                 _ptr("float[]", val), val.shape[0], w)
        _raise_for(rc, "scatter_add", "values")

    def dequant_accumulate(self, acc, q, scales, block, weight):
        a, qa, sa, b, w = V.check_dequant_acc(acc, q, scales, block, weight)
        rc = lib.fpe_dequant_accumulate(_ptr("float[]", a, writable=True), _ptr("int8_t[]", qa),
                                        _ptr("float[]", sa), a.shape[0], b, w)
        _raise_for(rc, "dequant_accumulate", "scales")

    def sparse_dequant_accumulate(self, acc, indices, q, scales, block, weight):
        a, idx, qa, sa, b, w = V.check_sparse_dequant_acc(acc, indices, q, scales, block, weight)
        rc = lib.fpe_sparse_dequant_accumulate(_ptr("float[]", a, writable=True), a.shape[0],
                                               _ptr("uint32_t[]", idx), _ptr("int8_t[]", qa),
                                               _ptr("float[]", sa), qa.shape[0], b, w)
        _raise_for(rc, "sparse_dequant_accumulate", "scales")

    # ---- reductions --------------------------------------------------------------------------------

    def l2_norm(self, x):
        return self._l2(V.buffer("x", x, V.F32))

    def all_finite(self, x):
        return self._all_finite(V.buffer("x", x, V.F32))

    @staticmethod
    def _all_finite(xa: np.ndarray) -> bool:
        out = ffi.new("int *")
        _raise_for(lib.fpe_all_finite(_ptr("float[]", xa), xa.shape[0], out), "all_finite")
        return bool(out[0])

    def _finite_or_raise(self, xa: np.ndarray, name: str) -> None:
        if not self._all_finite(xa):
            raise V.nonfinite(name)
