"""Numpy reference backend: every kernel of the contract in float32, same op order as the C core.

This is both the oracle for the parity tests and the speed baseline of the benchmarks, so it avoids
needless work: elementwise kernels run over cache-sized chunks (temporaries stay in L2 instead of
allocating full-size arrays), top-k uses an in-place introselect (``ndarray.partition``).
"""

from __future__ import annotations

import math
import platform

import numpy as np

from fedpeft_edge.kernels import _validate as V

# Elements per chunk for elementwise kernels: 256 KiB of float32 keeps temporaries cache-resident.
_CHUNK = 1 << 16

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_TWO_M24 = np.float32(2.0**-24)
_F127 = np.float32(127)


def splitmix_uniform(seed: int, counters: np.ndarray) -> np.ndarray:
    """``fpe_uniform`` vectorised: splitmix64(seed + (i + 1) * golden) >> 40, times 2**-24.

    uint64 arithmetic wraps around modulo 2**64 on purpose (numpy array ops do not warn on it).
    """
    z = (counters + np.uint64(1)) * np.uint64(_GOLDEN)
    z += np.uint64(seed)
    z ^= z >> np.uint64(30)
    z *= np.uint64(_MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_MIX2)
    z ^= z >> np.uint64(31)
    z >>= np.uint64(40)
    return z.astype(np.float32) * _TWO_M24


def _overflow_like_c() -> np.errstate:
    """Float32 overflow gives Inf (and Inf - Inf NaN) silently, exactly as in the C core."""
    return np.errstate(over="ignore", invalid="ignore")


def _chunks(n: int, size: int = _CHUNK) -> range:
    return range(0, n, size)


class NumpyBackend:
    """Pure-numpy implementation of the kernel contract (see docs/kernels-api.md)."""

    name = "numpy"

    @property
    def cpu_path(self) -> str:
        return "numpy"

    def info(self) -> dict:
        return {"backend": self.name, "cpu_path": self.cpu_path, "numpy": np.__version__,
                "machine": platform.machine()}

    # ---- int8 block quantisation -------------------------------------------------------------------

    def quantize_int8(self, x, block=256, *, out=None, scales=None, stochastic_seed=None):
        xa, b, q, s, seed = V.check_quantize(x, block, out, scales, stochastic_seed)
        n = xa.shape[0]
        nfull = n // b
        # Whole blocks, a cache-sized group at a time; then the short tail block.
        group = max(1, _CHUNK // b)
        for first in range(0, nfull, group):
            last = min(nfull, first + group)
            lo, hi = first * b, last * b
            self._quantize_blocks(xa[lo:hi].reshape(-1, b), q[lo:hi].reshape(-1, b), s[first:last],
                                  seed, lo)
        if nfull * b < n:
            lo = nfull * b
            self._quantize_blocks(xa[lo:].reshape(1, -1), q[lo:].reshape(1, -1), s[nfull:], seed, lo)
        return q, s

    @staticmethod
    def _quantize_blocks(xb: np.ndarray, qb: np.ndarray, sb: np.ndarray, seed: int | None,
                         first_index: int) -> None:
        t = np.abs(xb)
        absmax = t.max(axis=1)
        if not np.isfinite(absmax).all():
            raise V.nonfinite("x")
        with np.errstate(divide="ignore", over="ignore"):
            inv = np.divide(_F127, absmax)  # float32 / float32, like the C core
        # Zero-block rule: absmax == 0, or so tiny (< ~3.7e-37) that 127/absmax overflows to Inf
        # (0 * Inf would be NaN), gives scale 0 and q 0.
        zero_blocks = ~np.isfinite(inv)
        inv[zero_blocks] = 0
        np.multiply(xb, inv[:, None], out=t)
        if seed is None:
            np.rint(t, out=t)  # round half to even
        else:
            counters = np.arange(first_index, first_index + t.size, dtype=np.uint64)
            t += splitmix_uniform(seed, counters).reshape(t.shape)
            np.floor(t, out=t)
        np.clip(t, -127, 127, out=t)
        np.copyto(qb, t, casting="unsafe")
        np.divide(absmax, _F127, out=sb)
        sb[zero_blocks] = 0

    def dequantize_int8(self, q, scales, block=256, *, out=None):
        qa, sa, b, o = V.check_dequantize(q, scales, block, out)
        _finite_or_raise(sa, "scales")
        n = qa.shape[0]
        nfull = n // b
        group = max(1, _CHUNK // b)
        with np.errstate(over="ignore"):  # q * scale may round past FLT_MAX, as in C: Inf, no warning
            for first in range(0, nfull, group):
                last = min(nfull, first + group)
                lo, hi = first * b, last * b
                np.multiply(qa[lo:hi].reshape(-1, b), sa[first:last, None], out=o[lo:hi].reshape(-1, b))
            if nfull * b < n:
                np.multiply(qa[nfull * b:], sa[nfull], out=o[nfull * b:])
        return o

    def uniform(self, seed, i):
        s = V.seed64(seed)
        return splitmix_uniform(s, V.check_counters(i))

    # ---- top-k with error feedback -----------------------------------------------------------------

    def topk_ef(self, update, residual, k, *, out_indices=None, out_values=None, out_residual=None):
        u, r, kk, idx, val, res = V.check_topk(update, residual, k, out_indices, out_values, out_residual)
        n = u.shape[0]
        # out_residual may be residual or update itself (validated: identical or disjoint)
        in_place = n > 0 and res.ctypes.data in (r.ctypes.data, u.ctypes.data)
        # s goes straight into the output unless that would overwrite the residual before the NaN check.
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported as NonFiniteError below
            s = np.add(u, r) if in_place else np.add(u, r, out=res)
        a = np.abs(s)
        if n and not math.isfinite(float(a.max())):
            raise V.nonfinite("update + residual")
        if kk == n:
            idx[:] = np.arange(n, dtype=np.uint32)
            val[:] = s
            res[:] = 0
            return idx, val, res
        if kk > 0:
            # Threshold = k-th largest magnitude; partition works in place on our scratch copy.
            a.partition(n - kk)
            threshold = a[n - kk]
            np.abs(s, out=a)
            candidates = np.flatnonzero(a >= threshold)  # ascending
            above = a[candidates] > threshold
            ties_needed = kk - int(np.count_nonzero(above))
            # Keep every magnitude above the threshold and the first (lowest-index) ties.
            keep = above | (np.cumsum(~above) <= ties_needed)
            selected = candidates[keep]
            np.copyto(idx, selected, casting="unsafe")
            np.take(s, selected, out=val)
        if in_place:
            np.copyto(res, s)
        if kk > 0:
            res[selected] = 0
        return idx, val, res

    # ---- optimizer steps ---------------------------------------------------------------------------

    def sgd_step(self, w, g, momentum_buf, *, lr, momentum=0.0, weight_decay=0.0, prox_mu=0.0, w_ref=None):
        wa, ga, ma, ref, (lr_, mom, wd, mu) = V.check_sgd(w, g, momentum_buf, lr, momentum, weight_decay,
                                                        prox_mu, w_ref)
        _finite_or_raise(ga, "g")
        lr32, mom32, mu32 = np.float32(lr_), np.float32(mom), np.float32(mu)
        decay = np.float32(1) - lr32 * np.float32(wd)
        for lo in _chunks(wa.shape[0]):
            hi = lo + _CHUNK
            wc = wa[lo:hi]
            geff = _effective_grad(wc, ga[lo:hi], ref, lo, hi, mu32)
            if wd != 0.0:
                wc *= decay
            if mom != 0.0:
                mc = ma[lo:hi]
                mc *= mom32
                mc += geff
                geff = mc * lr32
            else:
                geff = geff * lr32
            wc -= geff

    def adamw_step(self, w, g, m, v, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                   prox_mu=0.0, w_ref=None):
        wa, ga, ma, va, ref, st, (lr_, b1, b2, ep, wd, mu) = V.check_adamw(
            w, g, m, v, step, lr, beta1, beta2, eps, weight_decay, prox_mu, w_ref)
        _finite_or_raise(ga, "g")
        f32 = np.float32
        b1_32, b2_32 = f32(b1), f32(b2)
        # Bias corrections in double from the float32 betas the C core receives, folded into two float
        # factors as the C core does: lr*(m/bc1)/(sqrt(v/bc2)+eps) == (lr/bc1)*m/(sqrt(v)/sqrt(bc2)+eps).
        bc1 = 1.0 - math.pow(float(b1_32), float(st))
        bc2 = 1.0 - math.pow(float(b2_32), float(st))
        step_size = f32(float(f32(lr_)) / bc1)
        inv_sqrt_bc2 = f32(1.0 / math.sqrt(bc2))
        eps32, mu32 = f32(ep), f32(mu)
        one_m_b1, one_m_b2 = f32(1) - b1_32, f32(1) - b2_32
        decay = f32(1) - f32(lr_) * f32(wd)
        for lo in _chunks(wa.shape[0]):
            hi = lo + _CHUNK
            wc, mc, vc = wa[lo:hi], ma[lo:hi], va[lo:hi]
            geff = _effective_grad(wc, ga[lo:hi], ref, lo, hi, mu32)
            mc *= b1_32
            mc += one_m_b1 * geff
            vc *= b2_32
            vc += one_m_b2 * (geff * geff)
            denom = np.sqrt(vc)
            denom *= inv_sqrt_bc2
            denom += eps32
            upd = step_size * mc
            upd /= denom
            wc *= decay
            wc -= upd

    def clip_by_global_norm(self, g, max_norm):
        ga, mx = V.check_clip(g, max_norm)
        mx = float(np.float32(mx))  # the C core receives max_norm as float
        norm = self._l2(ga)
        if not math.isfinite(norm):
            raise V.nonfinite("g")
        if norm > mx:
            ga *= np.float32(mx / norm)
        return norm

    # ---- aggregation -------------------------------------------------------------------------------

    def axpy(self, acc, x, weight):
        a, xa, w = V.check_axpy(acc, x, weight)
        w32 = np.float32(w)
        with _overflow_like_c():  # x is unchecked by contract
            for lo in _chunks(a.shape[0]):
                hi = lo + _CHUNK
                a[lo:hi] += xa[lo:hi] * w32

    def scatter_add(self, acc, indices, values, weight):
        a, idx, val, w = V.check_scatter(acc, indices, values, weight)
        V.sorted_indices(idx, a.shape[0])
        _finite_or_raise(val, "values")
        if idx.shape[0]:
            with _overflow_like_c():
                a[idx] += val * np.float32(w)

    def dequant_accumulate(self, acc, q, scales, block, weight):
        a, qa, sa, b, w = V.check_dequant_acc(acc, q, scales, block, weight)
        _finite_or_raise(sa, "scales")
        w32 = np.float32(w)
        n = qa.shape[0]
        nfull = n // b
        group = max(1, _CHUNK // b)
        with _overflow_like_c():
            for first in range(0, nfull, group):
                last = min(nfull, first + group)
                lo, hi = first * b, last * b
                t = qa[lo:hi].reshape(-1, b) * sa[first:last, None]
                t *= w32
                a[lo:hi] += t.reshape(-1)
            if nfull * b < n:
                t = qa[nfull * b:] * sa[nfull]
                t *= w32
                a[nfull * b:] += t

    def sparse_dequant_accumulate(self, acc, indices, q, scales, block, weight):
        a, idx, qa, sa, b, w = V.check_sparse_dequant_acc(acc, indices, q, scales, block, weight)
        V.sorted_indices(idx, a.shape[0])
        _finite_or_raise(sa, "scales")
        nnz = qa.shape[0]
        if nnz == 0:
            return
        with _overflow_like_c():
            t = qa * np.repeat(sa, b)[:nnz]
            t *= np.float32(w)
            a[idx] += t

    # ---- reductions --------------------------------------------------------------------------------

    def l2_norm(self, x):
        return self._l2(V.buffer("x", x, V.F32))

    @staticmethod
    def _l2(xa: np.ndarray) -> float:
        total = 0.0
        for lo in _chunks(xa.shape[0]):
            c = xa[lo:lo + _CHUNK].astype(np.float64)
            total += float(np.dot(c, c))
        return math.sqrt(total)

    def all_finite(self, x):
        return _all_finite(V.buffer("x", x, V.F32))


def _all_finite(xa: np.ndarray) -> bool:
    return all(bool(np.isfinite(xa[lo:lo + _CHUNK]).all()) for lo in _chunks(xa.shape[0]))


def _finite_or_raise(xa: np.ndarray, name: str) -> None:
    if not _all_finite(xa):
        raise V.nonfinite(name)


def _effective_grad(wc: np.ndarray, gc: np.ndarray, ref: np.ndarray | None, lo: int, hi: int,
                    mu32: np.float32) -> np.ndarray:
    """g + prox_mu * (w - w_ref), evaluated before weight decay touches w."""
    if ref is None or mu32 == 0:
        return gc
    d = wc - ref[lo:hi]
    d *= mu32
    d += gc
    return d
