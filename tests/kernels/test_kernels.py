"""Kernel properties and argument checking, run on every backend and CPU path (see conftest_kernels)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest_kernels import BLOCKS, equal_magnitudes, f32_arrays, finite_f32, moderate_f32, quantizable_f32
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedpeft_edge.kernels as K
from fedpeft_edge.runtime import errors

# Fixtures `kernels` (every backend and CPU path) and `kernels_api` (numpy and c) live there.
pytest_plugins = ["conftest_kernels"]

# The backend fixtures are function-scoped but stateless across examples.
hyp = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

F32 = np.float32


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _normal(n: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (_rng(seed).standard_normal(n) * scale).astype(F32)


# ======================================================================================================
# int8 quantisation
# ======================================================================================================

@pytest.mark.slow  # several seconds (real broker, TLS or many examples): full suite only
@hyp
@given(x=f32_arrays(elements=quantizable_f32()), block=BLOCKS)
def test_quantize_roundtrip_error_is_at_most_half_a_step(kernels, x, block):
    q, scales = kernels.quantize_int8(x, block)
    assert q.dtype == np.int8 and q.shape == x.shape
    assert scales.dtype == F32 and scales.shape == (-(-x.size // block),)
    assert np.all(q >= -127) and np.all(q <= 127)
    xhat = kernels.dequantize_int8(q, scales, block)
    step = np.repeat(scales.astype(np.float64), block)[: x.size]
    err = np.abs(xhat.astype(np.float64) - x.astype(np.float64))
    # Half a step, plus float32 rounding of x*inv and q*scale, plus the zero-block rule for blocks whose
    # absmax is below ~3.7e-37 (they quantise to 0, error <= absmax).
    bound = 0.5 * step + np.abs(x.astype(np.float64)) * 2.0**-21 + 4e-37
    assert np.all(err <= bound), (x[err > bound], xhat[err > bound])


@hyp
@given(x=f32_arrays(min_len=1), block=BLOCKS)
def test_quantize_scale_is_block_absmax_over_127(kernels, x, block):
    _, scales = kernels.quantize_int8(x, block)
    for b, s in enumerate(scales):
        absmax = F32(np.max(np.abs(x[b * block:(b + 1) * block])))
        # 127 / absmax overflowing float32 (absmax < ~3.7e-37) counts as a zero block
        if absmax == 0 or 127.0 / float(absmax) > float(np.finfo(F32).max):
            assert s == 0
        else:
            assert s == absmax / F32(127)


def test_quantize_rounds_half_to_even(kernels):
    # absmax 127 gives inv == 1 exactly, so x*inv is x: ties must go to the even integer.
    x = np.array([127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.4999998], dtype=F32)
    q, scales = kernels.quantize_int8(x, 8)
    assert scales[0] == 1.0
    np.testing.assert_array_equal(q, [127, 0, 2, 2, 0, -2, -2, 3])


def test_quantize_zero_and_tiny_blocks_give_zero_scale(kernels):
    x = np.array([0, -0.0, 1e-45, -1e-40, 2e-37, 0, 5, -5], dtype=F32)
    q, scales = kernels.quantize_int8(x, 2)
    np.testing.assert_array_equal(scales[:3], [0, 0, 0])
    np.testing.assert_array_equal(q[:6], 0)
    assert scales[3] == F32(5) / F32(127)
    np.testing.assert_array_equal(q[6:], [127, -127])


def test_quantize_empty_and_outputs_in_place(kernels):
    q, s = kernels.quantize_int8(np.empty(0, F32), 4)
    assert q.shape == (0,) and s.shape == (0,)
    x = _normal(1000)
    out, scales = np.empty(1000, np.int8), np.empty(4, F32)
    q2, s2 = kernels.quantize_int8(x, 256, out=out, scales=scales)
    assert q2 is out and s2 is scales
    q3, s3 = kernels.quantize_int8(x, 256)
    np.testing.assert_array_equal(q2, q3)
    np.testing.assert_array_equal(s2, s3)


def test_stochastic_rounding_is_deterministic_per_seed_and_brackets_x(kernels):
    x = _normal(5000, seed=3)
    q1, s1 = kernels.quantize_int8(x, 64, stochastic_seed=7)
    q2, s2 = kernels.quantize_int8(x, 64, stochastic_seed=7)
    q3, _ = kernels.quantize_int8(x, 64, stochastic_seed=8)
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(q1, q3)
    det, s_det = kernels.quantize_int8(x, 64)
    np.testing.assert_array_equal(s1, s_det)  # stochastic rounding changes q only, not the scales
    scaled = x.astype(np.float64) / np.repeat(s1.astype(np.float64), 64)[:5000]
    assert np.all(q1 >= np.floor(scaled) - 1e-3) and np.all(q1 <= np.floor(scaled) + 1 + 1e-3)
    assert 0 < np.count_nonzero(q1 != det) < 5000


def test_stochastic_rounding_is_unbiased(kernels):
    # absmax 127 per block makes the step exactly 1, and every other value sits 0.3 above an integer:
    # round-to-nearest is off by 0.3 steps every time, stochastic rounding must average it out.
    block, n, seeds = 32, 256, 400
    x = (_rng(5).integers(-100, 100, n) + 0.3).astype(F32)
    x[::block] = 127
    total = np.zeros(n)
    for seed in range(seeds):
        q, s = kernels.quantize_int8(x, block, stochastic_seed=seed)
        assert np.all(s == 1)
        total += kernels.dequantize_int8(q, s, block).astype(np.float64)
    mean_err = total / seeds - x.astype(np.float64)
    det_q, det_s = kernels.quantize_int8(x, block)
    det_err = kernels.dequantize_int8(det_q, det_s, block).astype(np.float64) - x
    assert np.abs(det_err).mean() > 0.25  # the deterministic bias is real
    # Per element the standard error is sqrt(0.21 / 400) ~ 0.023: allow ~6 of them; overall much less.
    assert np.abs(mean_err).max() < 0.14
    assert abs(mean_err.mean()) < 0.01


def test_uniform_rejects_bad_counters_and_seeds(kernels_api):
    with pytest.raises(errors.InvalidValueError):
        kernels_api.uniform(1, np.array([-1, 2]))
    with pytest.raises(errors.InvalidTypeError):
        kernels_api.uniform(1, np.array([0.5]))
    with pytest.raises(errors.InvalidValueError):
        kernels_api.uniform(-1, np.array([1], np.uint64))


@hyp
@given(seed=st.integers(0, 2**64 - 1), i=st.lists(st.integers(0, 2**64 - 1), max_size=20))
def test_uniform_in_unit_interval_and_24_bit(kernels, seed, i):
    u = kernels.uniform(seed, np.array(i, dtype=np.uint64))
    assert u.dtype == F32 and u.shape == (len(i),)
    assert np.all(u >= 0) and np.all(u < 1)
    np.testing.assert_array_equal(u * F32(2**24), np.floor(u * F32(2**24)))


def test_uniform_matches_integer_formula(kernels):
    mask = 2**64 - 1

    def expected(seed: int, i: int) -> float:
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        return (z >> 40) * 2.0**-24

    for seed in (0, 1, 2**63 + 5, mask):
        counters = [0, 1, 2, 1000, 2**32, 2**64 - 2, mask]
        got = kernels.uniform(seed, np.array(counters, dtype=np.uint64))
        np.testing.assert_array_equal(got, np.array([expected(seed, c) for c in counters], dtype=F32))


def test_uniform_is_roughly_uniform(kernels):
    u = kernels.uniform(123, np.arange(4000, dtype=np.uint64)).astype(np.float64)
    assert abs(u.mean() - 0.5) < 0.02
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert hist.min() > 300


# ======================================================================================================
# top-k with error feedback
# ======================================================================================================

def _check_topk(s: np.ndarray, k: int, idx: np.ndarray, val: np.ndarray, res: np.ndarray) -> None:
    n = s.size
    assert idx.dtype == np.uint32 and idx.shape == (k,)
    assert val.dtype == F32 and val.shape == (k,)
    assert res.dtype == F32 and res.shape == (n,)
    assert np.all(np.diff(idx.astype(np.int64)) > 0), "indices must be ascending and unique"
    assert np.all(idx < n)
    np.testing.assert_array_equal(val, s[idx])
    # Error feedback loses nothing: scatter(values) + new residual == u + r, exactly.
    rebuilt = np.zeros(n, F32)
    rebuilt[idx] = val
    assert np.array_equal(rebuilt + res, s)
    selected = np.zeros(n, bool)
    selected[idx] = True
    assert np.all(res[selected] == 0)
    np.testing.assert_array_equal(res[~selected], s[~selected])
    mags = np.abs(s)
    if 0 < k < n:
        lowest_kept = mags[selected].min()
        assert lowest_kept >= mags[~selected].max()
        # Ties at the threshold go to the lower indices.
        tied_kept = np.flatnonzero(selected & (mags == lowest_kept))
        tied_dropped = np.flatnonzero(~selected & (mags == lowest_kept))
        if tied_dropped.size:
            assert tied_kept.max() < tied_dropped.min()


@st.composite
def topk_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    u = draw(st.one_of(f32_arrays(elements=finite_f32()), equal_magnitudes(),
                       f32_arrays(elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0]))))
    r_kind = draw(st.sampled_from(["zero", "same", "random"]))
    if r_kind == "zero":
        r = np.zeros_like(u)
    elif r_kind == "same":
        r = u.copy()
    else:
        r = draw(f32_arrays(elements=finite_f32(), min_len=u.size, max_len=u.size))
    k = draw(st.sampled_from([0, u.size, u.size // 2, 1 if u.size else 0, max(0, u.size - 1),
                              u.size // 100]))
    return u, r, k


def _finite_sum(u: np.ndarray, r: np.ndarray) -> np.ndarray | None:
    with np.errstate(over="ignore", invalid="ignore"):
        s = u + r
    return s if np.all(np.isfinite(s)) else None


@hyp
@given(case=topk_case())
def test_topk_ef_properties(kernels, case):
    u, r, k = case
    s = _finite_sum(u, r)
    if s is None:
        with pytest.raises(errors.NonFiniteError):
            kernels.topk_ef(u, r, k)
        return
    idx, val, res = kernels.topk_ef(u, r, k)
    _check_topk(s, k, idx, val, res)


@hyp
@given(case=topk_case())
@pytest.mark.parametrize("alias", ["residual", "update"])
def test_topk_ef_in_place(kernels, case, alias):
    u, r, k = case
    s = _finite_sum(u, r)
    target = r if alias == "residual" else u
    before = target.copy()
    if s is None:
        with pytest.raises(errors.NonFiniteError):
            kernels.topk_ef(u, r, k, out_residual=target)
        # The error-feedback state survives a rejected update.
        np.testing.assert_array_equal(target.view(np.uint32), before.view(np.uint32))
        return
    idx, val, res = kernels.topk_ef(u, r, k, out_residual=target)
    assert res is target
    _check_topk(s, k, idx, val, res)


@pytest.mark.parametrize("n", [1000, 65_537, 300_001])
@pytest.mark.parametrize("dist", ["normal", "ints", "equal", "sparse"])
def test_topk_ef_large(kernels, n, dist):
    rng = _rng(n)
    if dist == "normal":
        u = rng.standard_normal(n).astype(F32)
    elif dist == "ints":  # many exact ties
        u = rng.integers(-20, 20, n).astype(F32)
    elif dist == "equal":
        u = np.where(rng.random(n) < 0.5, F32(0.75), F32(-0.75)).astype(F32)
    else:
        u = np.where(rng.random(n) < 0.02, rng.standard_normal(n), 0).astype(F32)
    r = (rng.standard_normal(n) * 0.01).astype(F32) if dist == "normal" else np.zeros(n, F32)
    for k in (0, 1, n // 100, n // 3, n):
        idx, val, res = kernels.topk_ef(u, r, k)
        _check_topk(u + r, k, idx, val, res)


def test_topk_ef_with_preallocated_outputs(kernels):
    u, r = _normal(5000, 1), _normal(5000, 2)
    oi, ov, orr = np.empty(50, np.uint32), np.empty(50, F32), np.empty(5000, F32)
    got = kernels.topk_ef(u, r, 50, out_indices=oi, out_values=ov, out_residual=orr)
    assert got[0] is oi and got[1] is ov and got[2] is orr
    _check_topk(u + r, 50, oi, ov, orr)


def test_error_feedback_accumulates_over_rounds(kernels):
    # Across rounds, everything sent plus the final residual equals everything produced.
    n, k = 4000, 40
    residual = np.zeros(n, F32)
    sent = np.zeros(n, np.float64)
    produced = np.zeros(n, np.float64)
    for rnd in range(5):
        u = _normal(n, seed=100 + rnd)
        produced += u
        idx, val, residual = kernels.topk_ef(u, residual, k, out_residual=residual)
        sent[idx] += val
    np.testing.assert_allclose(sent + residual, produced, rtol=0, atol=1e-5)


# ======================================================================================================
# optimizers
# ======================================================================================================

def _prox_grad32(w: np.ndarray, g: np.ndarray, mu: float, w_ref: np.ndarray | None) -> np.ndarray:
    """g + prox_mu * (w - w_ref) in float32, the header's formula. Later terms divide by sqrt(v) + eps,
    which amplifies any rounding here up to 1/eps times; starting from the same float32 value keeps
    the comparison about the kernel."""
    if w_ref is None:
        return g
    return (g + F32(mu) * (w - w_ref)).astype(F32)


def _adamw64(w, ge, m, v, step, lr, b1, b2, eps, wd):
    """One AdamW step in float64 from the effective gradient; also the tolerance scale for w."""
    ge = ge.astype(np.float64)
    m_new = b1 * m + (1 - b1) * ge
    v_new = b2 * v + (1 - b2) * ge * ge
    denom = np.sqrt(v_new / (1 - b2**step)) + eps
    update = lr * (m_new / (1 - b1**step)) / denom
    # float32 rounding of m is relative to its terms, not to m (which may cancel)
    m_terms = b1 * np.abs(m) + (1 - b1) * np.abs(ge)
    w_scale = np.abs(w) + lr * (m_terms / (1 - b1**step)) / denom
    return w * (1 - lr * wd) - update, m_new, v_new, m_terms, w_scale


def _close(got: np.ndarray, want: np.ndarray, scale: np.ndarray | float, rtol: float) -> None:
    """|got - want| <= rtol * scale, with scale the magnitude of the terms that were combined (float32
    rounding is relative to the terms, not to a result that may have cancelled)."""
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= rtol * scale + 1e-30), float(np.max(err / (scale + 1e-30)))


@hyp
@given(n=st.integers(0, 200), seed=st.integers(0, 2**32 - 1), lr=st.floats(1e-5, 0.5),
       wd=st.sampled_from([0.0, 0.01, 0.1]), mu=st.sampled_from([0.0, 0.01, 1.0]),
       betas=st.sampled_from([(0.9, 0.999), (0.0, 0.5), (0.5, 0.0), (0.95, 0.9999)]),
       eps=st.sampled_from([1e-8, 1e-3]))
def test_adamw_matches_float64_formula(kernels, n, seed, lr, wd, mu, betas, eps):
    rng = _rng(seed)
    w = rng.standard_normal(n).astype(F32)
    w_ref = (w + rng.standard_normal(n).astype(F32) * F32(0.1)).astype(F32) if mu else None
    m, v = np.zeros(n, F32), np.zeros(n, F32)
    # float32 hyper-parameters, as the kernel sees them
    lr32, b1, b2, eps32, wd32 = (float(F32(z)) for z in (lr, *betas, eps, wd))
    for step in (1, 2, 3):
        # Each step is compared from the same float32 state, so only that step's rounding counts
        # (over several steps m / sqrt(v) amplifies earlier rounding, which says nothing about the kernel).
        g = rng.standard_normal(n).astype(F32)
        w64, m64, v64 = (a.astype(np.float64) for a in (w, m, v))
        ge = _prox_grad32(w, g, mu, w_ref)
        want_w, want_m, want_v, m_terms, w_scale = _adamw64(w64, ge, m64, v64, step, lr32, b1, b2, eps32,
                                                            wd32)
        kernels.adamw_step(w, g, m, v, step=step, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps,
                           weight_decay=wd, prox_mu=mu, w_ref=w_ref)
        _close(m, want_m, m_terms, rtol=2e-6)
        _close(v, want_v, want_v, rtol=2e-6)
        _close(w, want_w, w_scale, rtol=2e-6)


@hyp
@given(n=st.integers(0, 200), seed=st.integers(0, 2**32 - 1), lr=st.floats(1e-5, 0.5),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), wd=st.sampled_from([0.0, 0.01]),
       mu=st.sampled_from([0.0, 0.1]))
def test_sgd_matches_float64_formula(kernels, n, seed, lr, momentum, wd, mu):
    rng = _rng(seed)
    w = rng.standard_normal(n).astype(F32)
    w_ref = (w * F32(0.5)).astype(F32) if mu else None
    mom = np.zeros(n, F32)
    lr32, mom32, wd32, mu32 = (float(F32(z)) for z in (lr, momentum, wd, mu))
    for _ in range(3):
        g = rng.standard_normal(n).astype(F32)
        w64, mom64 = w.astype(np.float64), mom.astype(np.float64)
        ge = g + (mu32 * (w64 - w_ref) if w_ref is not None else 0.0)
        ge_scale = np.abs(g) + (mu32 * (np.abs(w64) + np.abs(w_ref)) if w_ref is not None else 0.0)
        want_w = w64 * (1 - lr32 * wd32)
        if momentum:
            want_mom = mom32 * mom64 + ge
            mom_scale = mom32 * np.abs(mom64) + ge_scale
            want_w = want_w - lr32 * want_mom
        else:
            mom_scale = ge_scale
            want_w = want_w - lr32 * ge
        kernels.sgd_step(w, g, mom if momentum else None, lr=lr, momentum=momentum, weight_decay=wd,
                         prox_mu=mu, w_ref=w_ref)
        _close(w, want_w, np.abs(w64) + lr32 * mom_scale, rtol=2e-6)
        if momentum:
            _close(mom, want_mom, mom_scale, rtol=2e-6)


def test_sgd_plain_step_is_exact_in_simple_cases(kernels):
    w = np.array([1.0, -2.0, 0.5], F32)
    kernels.sgd_step(w, np.array([1.0, 1.0, -1.0], F32), None, lr=0.5)
    np.testing.assert_array_equal(w, [0.5, -2.5, 1.0])


def test_optimizer_zero_length_is_a_no_op(kernels):
    e = np.empty(0, F32)
    kernels.adamw_step(e, e.copy(), e.copy(), e.copy(), step=1, lr=0.1)
    kernels.sgd_step(e, e.copy(), None, lr=0.1)


@hyp
@given(g=f32_arrays(elements=moderate_f32(-1e3, 1e3)), max_norm=st.floats(1e-3, 1e4))
def test_clip_by_global_norm(kernels, g, max_norm):
    original = g.copy()
    norm64 = float(np.sqrt(np.sum(original.astype(np.float64) ** 2)))
    pre = kernels.clip_by_global_norm(g, max_norm)
    assert isinstance(pre, float)
    assert pre == pytest.approx(norm64, rel=1e-12, abs=1e-300)
    after = float(np.sqrt(np.sum(g.astype(np.float64) ** 2)))
    if pre <= float(F32(max_norm)):
        np.testing.assert_array_equal(g, original)  # untouched below the bound
    else:
        assert after <= float(F32(max_norm)) * (1 + 1e-6)
        assert after == pytest.approx(float(F32(max_norm)), rel=1e-5)
        # direction kept
        np.testing.assert_allclose(g, original * (float(F32(max_norm)) / norm64), rtol=1e-5, atol=1e-30)


def test_clip_huge_values_do_not_overflow(kernels):
    g = np.array([3e38, -3e38, 3e38], F32)
    pre = kernels.clip_by_global_norm(g, 1.0)
    assert pre == pytest.approx(math.sqrt(3) * 3e38, rel=1e-6)
    np.testing.assert_allclose(g, np.array([1, -1, 1]) / math.sqrt(3), rtol=1e-6)


def test_l2_norm_and_all_finite(kernels):
    x = _normal(100_003, seed=9)
    assert kernels.l2_norm(x) == pytest.approx(float(np.linalg.norm(x.astype(np.float64))), rel=1e-12)
    assert kernels.l2_norm(np.empty(0, F32)) == 0.0
    assert kernels.l2_norm(np.array([3e38, 3e38], F32)) == pytest.approx(3e38 * math.sqrt(2), rel=1e-7)
    assert kernels.all_finite(x) is True
    assert kernels.all_finite(np.empty(0, F32)) is True
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[77_777] = bad
        assert kernels.all_finite(y) is False
        assert not math.isfinite(kernels.l2_norm(y))


# ======================================================================================================
# aggregation
# ======================================================================================================

@hyp
@given(acc=f32_arrays(elements=moderate_f32(-1e6, 1e6)), data=st.data(),
       weight=st.floats(-4, 4, width=32))
def test_axpy_is_elementwise_float32(kernels, acc, data, weight):
    x = data.draw(f32_arrays(elements=finite_f32(), min_len=acc.size, max_len=acc.size))
    with np.errstate(over="ignore", invalid="ignore"):
        want = (acc + F32(weight) * x).astype(F32)
    kernels.axpy(acc, x, weight)
    np.testing.assert_array_equal(acc.view(np.uint32), want.view(np.uint32))


@st.composite
def sparse_case(draw: st.DrawFn) -> tuple[int, np.ndarray]:
    n = draw(st.integers(0, 400))
    mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return n, np.flatnonzero(np.array(mask, bool)).astype(np.uint32)


@pytest.mark.slow  # > 1 s of property examples: the full suite runs them
@hyp
@given(case=sparse_case(), weight=st.floats(-4, 4, width=32), seed=st.integers(0, 1000))
def test_scatter_add(kernels, case, weight, seed):
    n, idx = case
    acc = _normal(n, seed)
    vals = _normal(idx.size, seed + 1)
    want = acc.copy()
    want[idx] = want[idx] + F32(weight) * vals
    kernels.scatter_add(acc, idx, vals, weight)
    np.testing.assert_array_equal(acc.view(np.uint32), want.view(np.uint32))


@hyp
@given(x=f32_arrays(elements=moderate_f32(-1e3, 1e3)), block=BLOCKS, weight=st.floats(-4, 4, width=32))
def test_dequant_accumulate_is_fused_dequantize_plus_axpy(kernels, x, block, weight):
    q, s = kernels.quantize_int8(x, block)
    acc = _normal(x.size, 4)
    want = acc.copy()
    kernels.axpy(want, kernels.dequantize_int8(q, s, block), weight)
    kernels.dequant_accumulate(acc, q, s, block, weight)
    np.testing.assert_array_equal(acc.view(np.uint32), want.view(np.uint32))


@pytest.mark.slow  # > 1 s of property examples: the full suite runs them
@hyp
@given(case=sparse_case(), block=BLOCKS, weight=st.floats(-4, 4, width=32))
def test_sparse_dequant_accumulate_is_dequantize_plus_scatter(kernels, case, block, weight):
    n, idx = case
    vals = _normal(idx.size, 5, scale=3.0)
    q, s = kernels.quantize_int8(vals, block)
    acc = _normal(n, 6)
    want = acc.copy()
    kernels.scatter_add(want, idx, kernels.dequantize_int8(q, s, block), weight)
    kernels.sparse_dequant_accumulate(acc, idx, q, s, block, weight)
    np.testing.assert_array_equal(acc.view(np.uint32), want.view(np.uint32))


def test_aggregation_order_independent_within_tolerance(kernels):
    # Five clients' sparse quantised updates, summed in two orders: float32 sums differ only by rounding.
    n, clients = 20_000, 5
    updates = []
    for c in range(clients):
        u = _normal(n, seed=50 + c)
        idx, val, _ = kernels.topk_ef(u, np.zeros(n, F32), 500)
        q, s = kernels.quantize_int8(val, 64)
        dense = _normal(n, seed=80 + c)
        updates.append((idx, q, s, dense, 1.0 / (c + 1)))
    results = []
    for order in (range(clients), reversed(range(clients))):
        acc = np.zeros(n, F32)
        for c in order:
            idx, q, s, dense, weight = updates[c]
            kernels.sparse_dequant_accumulate(acc, idx, q, s, 64, weight)
            kernels.axpy(acc, dense, weight)
            kernels.scatter_add(acc, idx, dense[idx], -weight)
        results.append(acc)
    want = np.zeros(n)
    for idx, q, s, dense, weight in updates:
        contrib = dense.astype(np.float64) * weight
        contrib[idx] += (q.astype(np.float64) * np.repeat(s, 64)[: q.size]) * weight - dense[idx] * weight
        want += contrib
    scale = sum(np.abs(u[3].astype(np.float64)) * u[4] for u in updates) + 1e-3
    for got in results:
        _close(got, want, scale, rtol=1e-6)
    _close(results[0], results[1].astype(np.float64), scale, rtol=1e-6)


def test_aggregation_zero_length_inputs(kernels):
    e = np.empty(0, F32)
    kernels.axpy(e, e.copy(), 1.0)
    kernels.scatter_add(e, np.empty(0, np.uint32), e.copy(), 1.0)
    kernels.dequant_accumulate(e, np.empty(0, np.int8), np.empty(0, F32), 4, 1.0)
    kernels.sparse_dequant_accumulate(np.zeros(3, F32), np.empty(0, np.uint32), np.empty(0, np.int8),
                                      np.empty(0, F32), 4, 1.0)
    assert kernels.dequantize_int8(np.empty(0, np.int8), np.empty(0, F32), 8).shape == (0,)


# ======================================================================================================
# bad input: same exception on every backend
# ======================================================================================================

def _calls(n: int = 16):
    """name -> (kernel name, kwargs) for a valid call of every kernel; tests corrupt one argument."""
    x = _normal(n)
    q, s = get_ref().quantize_int8(x, 4)
    idx = np.array([1, 5, 9], np.uint32)
    return {
        "quantize": ("quantize_int8", dict(x=x, block=4)),
        "quantize_out": ("quantize_int8", dict(x=x, block=4, out=np.empty(n, np.int8),
                                               scales=np.empty(4, F32))),
        "dequantize": ("dequantize_int8", dict(q=q, scales=s, block=4, out=np.empty(n, F32))),
        "topk": ("topk_ef", dict(update=x, residual=np.zeros(n, F32), k=3, out_indices=np.empty(3, np.uint32),
                                 out_values=np.empty(3, F32), out_residual=np.empty(n, F32))),
        "sgd": ("sgd_step", dict(w=x.copy(), g=x.copy(), momentum_buf=np.zeros(n, F32), lr=0.1, momentum=0.9,
                                 prox_mu=0.1, w_ref=x.copy())),
        "adamw": ("adamw_step", dict(w=x.copy(), g=x.copy(), m=np.zeros(n, F32), v=np.zeros(n, F32), step=1,
                                     lr=0.1, prox_mu=0.1, w_ref=x.copy())),
        "clip": ("clip_by_global_norm", dict(g=x.copy(), max_norm=1.0)),
        "axpy": ("axpy", dict(acc=np.zeros(n, F32), x=x, weight=0.5)),
        "scatter": ("scatter_add", dict(acc=np.zeros(n, F32), indices=idx, values=x[:3].copy(), weight=0.5)),
        "dequant_acc": ("dequant_accumulate", dict(acc=np.zeros(n, F32), q=q, scales=s, block=4, weight=0.5)),
        "sparse_dequant_acc": ("sparse_dequant_accumulate",
                               dict(acc=np.zeros(n, F32), indices=idx, q=q[:3].copy(), scales=s[:1].copy(),
                                    block=4, weight=0.5)),
        "l2": ("l2_norm", dict(x=x)),
        "all_finite": ("all_finite", dict(x=x)),
    }


def get_ref():
    return K.get_backend("numpy")


def _invoke(backend, kernel: str, kwargs: dict):
    fn = getattr(backend, kernel)
    positional = {
        "quantize_int8": ["x", "block"], "dequantize_int8": ["q", "scales", "block"],
        "topk_ef": ["update", "residual", "k"], "sgd_step": ["w", "g", "momentum_buf"],
        "adamw_step": ["w", "g", "m", "v"], "clip_by_global_norm": ["g", "max_norm"],
        "axpy": ["acc", "x", "weight"], "scatter_add": ["acc", "indices", "values", "weight"],
        "dequant_accumulate": ["acc", "q", "scales", "block", "weight"],
        "sparse_dequant_accumulate": ["acc", "indices", "q", "scales", "block", "weight"],
        "l2_norm": ["x"], "all_finite": ["x"],
    }[kernel]
    args = [kwargs[p] for p in positional]
    rest = {k: v for k, v in kwargs.items() if k not in positional}
    return fn(*args, **rest)


BUFFER_ARGS = [(call, arg) for call, (_, kw) in _calls().items() for arg, val in kw.items()
               if isinstance(val, np.ndarray)]


def test_valid_calls_succeed(kernels_api):
    for kernel, kwargs in _calls().values():
        _invoke(kernels_api, kernel, kwargs)


@pytest.mark.parametrize(("call", "arg"), BUFFER_ARGS)
def test_wrong_dtype_is_type_error_naming_the_argument(kernels_api, call, arg):
    kernel, kwargs = _calls()[call]
    good = kwargs[arg]
    wrong = np.float64 if good.dtype != np.float64 else F32
    bad_versions = [good.astype(wrong), good.tolist()]
    if good.dtype.itemsize > 1:
        bad_versions.append(good.astype(good.dtype.newbyteorder()))
    for bad in bad_versions:
        kwargs[arg] = bad
        with pytest.raises(errors.InvalidTypeError, match=arg):
            _invoke(kernels_api, kernel, kwargs)


@pytest.mark.parametrize(("call", "arg"), BUFFER_ARGS)
def test_non_contiguous_or_2d_is_type_error(kernels_api, call, arg):
    kernel, kwargs = _calls()[call]
    good = kwargs[arg]
    strided = np.repeat(good, 2)[::2]
    assert not strided.flags.c_contiguous or good.size <= 1
    if good.size > 1:
        kwargs[arg] = strided
        with pytest.raises(errors.InvalidTypeError, match=arg):
            _invoke(kernels_api, kernel, kwargs)
    kwargs[arg] = good.reshape(1, -1).copy()
    with pytest.raises(errors.InvalidTypeError, match=arg):
        _invoke(kernels_api, kernel, kwargs)


def test_unaligned_buffer_is_type_error(kernels_api):
    raw = np.zeros(4 * 16 + 1, np.uint8)
    unaligned = np.frombuffer(raw.data, dtype=F32, count=16, offset=1)
    assert not unaligned.flags.aligned
    with pytest.raises(errors.InvalidTypeError, match="aligned"):
        kernels_api.l2_norm(unaligned)


OUTPUT_ARGS = [("quantize_out", "out"), ("quantize_out", "scales"), ("dequantize", "out"),
               ("topk", "out_indices"), ("topk", "out_values"), ("topk", "out_residual"),
               ("sgd", "w"), ("sgd", "momentum_buf"), ("adamw", "w"), ("adamw", "m"), ("adamw", "v"),
               ("clip", "g"), ("axpy", "acc"), ("scatter", "acc"), ("dequant_acc", "acc"),
               ("sparse_dequant_acc", "acc")]


@pytest.mark.parametrize(("call", "arg"), OUTPUT_ARGS)
def test_read_only_output_is_type_error(kernels_api, call, arg):
    kernel, kwargs = _calls()[call]
    kwargs[arg] = kwargs[arg].copy()
    kwargs[arg].flags.writeable = False
    before = kwargs[arg].copy()
    with pytest.raises(errors.InvalidTypeError, match="writable"):
        _invoke(kernels_api, kernel, kwargs)
    np.testing.assert_array_equal(kwargs[arg], before)


LENGTH_ARGS = [("quantize_out", "out"), ("quantize_out", "scales"), ("dequantize", "scales"),
               ("dequantize", "out"), ("topk", "residual"), ("topk", "out_indices"), ("topk", "out_values"),
               ("topk", "out_residual"), ("sgd", "g"), ("sgd", "momentum_buf"), ("sgd", "w_ref"),
               ("adamw", "g"), ("adamw", "m"), ("adamw", "v"), ("adamw", "w_ref"), ("axpy", "x"),
               ("scatter", "values"), ("dequant_acc", "q"), ("dequant_acc", "scales"),
               ("sparse_dequant_acc", "q"), ("sparse_dequant_acc", "scales")]


@pytest.mark.parametrize(("call", "arg"), LENGTH_ARGS)
def test_mismatched_length_is_value_error(kernels_api, call, arg):
    kernel, kwargs = _calls()[call]
    kwargs[arg] = np.concatenate([kwargs[arg], kwargs[arg][:1]])
    with pytest.raises(errors.InvalidValueError):
        _invoke(kernels_api, kernel, kwargs)


@pytest.mark.parametrize(("call", "arg"), [
    ("quantize", "x"), ("topk", "update"), ("topk", "residual"), ("clip", "g"), ("sgd", "g"), ("adamw", "g"),
    ("scatter", "values"), ("dequantize", "scales"), ("dequant_acc", "scales"),
    ("sparse_dequant_acc", "scales"),
])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_non_finite_error_and_state_is_kept(kernels_api, call, arg, bad):
    kernel, kwargs = _calls()[call]
    kwargs[arg] = kwargs[arg].copy()
    kwargs[arg][-1] = bad
    state = {name: val.copy() for name, val in kwargs.items()
             if isinstance(val, np.ndarray) and name in ("w", "m", "v", "momentum_buf", "acc", "g")}
    with pytest.raises(errors.NonFiniteError):
        _invoke(kernels_api, kernel, kwargs)
    for name, before in state.items():  # in-place state is untouched by a rejected call
        np.testing.assert_array_equal(kwargs[name].view(np.uint32), before.view(np.uint32), err_msg=name)


def test_topk_sum_overflow_is_non_finite(kernels_api):
    u = np.array([3e38, 1.0], F32)
    with pytest.raises(errors.NonFiniteError):
        kernels_api.topk_ef(u, u.copy(), 1)


@pytest.mark.parametrize("kernel", ["scatter_add", "sparse_dequant_accumulate"])
@pytest.mark.parametrize("indices", [[1, 5, 16], [1, 5, 2**32 - 1], [5, 1, 9], [1, 5, 5], [9, 5, 1]])
def test_bad_indices_are_value_error_and_acc_untouched(kernels_api, kernel, indices):
    call = "scatter" if kernel == "scatter_add" else "sparse_dequant_acc"
    _, kwargs = _calls()[call]
    kwargs["acc"] = _normal(16, 11)
    before = kwargs["acc"].copy()
    kwargs["indices"] = np.array(indices, np.uint32)
    with pytest.raises(errors.InvalidValueError, match="indices"):
        _invoke(kernels_api, kernel, kwargs)
    np.testing.assert_array_equal(kwargs["acc"].view(np.uint32), before.view(np.uint32))


@pytest.mark.parametrize(("call", "arg", "value", "exc"), [
    ("quantize", "block", 0, errors.InvalidValueError),
    ("quantize", "block", -3, errors.InvalidValueError),
    ("quantize", "block", 2.0, errors.InvalidTypeError),
    ("quantize", "block", True, errors.InvalidTypeError),
    ("quantize", "stochastic_seed", -1, errors.InvalidValueError),
    ("quantize", "stochastic_seed", 2**64, errors.InvalidValueError),
    ("dequantize", "block", 0, errors.InvalidValueError),
    ("topk", "k", 17, errors.InvalidValueError),
    ("topk", "k", -1, errors.InvalidValueError),
    ("topk", "k", 1.5, errors.InvalidTypeError),
    ("sgd", "lr", -0.1, errors.InvalidValueError),
    ("sgd", "lr", float("nan"), errors.InvalidValueError),
    ("sgd", "momentum", -0.5, errors.InvalidValueError),
    ("sgd", "weight_decay", float("inf"), errors.InvalidValueError),
    ("sgd", "prox_mu", -1.0, errors.InvalidValueError),
    ("sgd", "momentum_buf", None, errors.InvalidValueError),  # momentum 0.9 needs a buffer
    ("sgd", "w_ref", None, errors.InvalidValueError),  # prox_mu 0.1 needs w_ref
    ("adamw", "step", 0, errors.InvalidValueError),
    ("adamw", "step", 2**64, errors.InvalidValueError),
    ("adamw", "beta1", 1.0, errors.InvalidValueError),
    ("adamw", "beta2", -0.1, errors.InvalidValueError),
    ("adamw", "eps", 0.0, errors.InvalidValueError),
    ("adamw", "lr", 1e39, errors.InvalidValueError),  # not finite as float32
    ("adamw", "lr", "0.1", errors.InvalidTypeError),
    ("adamw", "w_ref", None, errors.InvalidValueError),
    ("clip", "max_norm", 0.0, errors.InvalidValueError),
    ("clip", "max_norm", float("nan"), errors.InvalidValueError),
    ("axpy", "weight", float("inf"), errors.InvalidValueError),
    ("scatter", "weight", float("nan"), errors.InvalidValueError),
    ("dequant_acc", "block", 0, errors.InvalidValueError),
    ("dequant_acc", "weight", 1e39, errors.InvalidValueError),
])
def test_bad_scalar_arguments(kernels_api, call, arg, value, exc):
    kernel, kwargs = _calls()[call]
    state = {name: val.copy() for name, val in kwargs.items() if isinstance(val, np.ndarray)}
    kwargs[arg] = value
    with pytest.raises(exc, match=arg):
        _invoke(kernels_api, kernel, kwargs)
    for name, before in state.items():
        if name != arg:
            np.testing.assert_array_equal(kwargs[name], before, err_msg=name)


def test_overlapping_buffers_are_rejected(kernels_api):
    buf = _normal(32)
    with pytest.raises(errors.InvalidValueError, match="overlaps"):
        kernels_api.axpy(buf[:16], buf[8:24], 1.0)
    with pytest.raises(errors.InvalidValueError, match="overlaps"):
        kernels_api.topk_ef(buf[:16], buf[16:], 2, out_residual=buf[1:17])
    w = _normal(16)
    with pytest.raises(errors.InvalidValueError, match="overlaps"):
        kernels_api.adamw_step(w, w, np.zeros(16, F32), np.zeros(16, F32), step=1, lr=0.1)


def test_errors_are_catchable_as_builtins_and_fedpeft_errors(kernels_api):
    with pytest.raises(TypeError):
        kernels_api.l2_norm(np.zeros(3))
    with pytest.raises(ValueError):
        kernels_api.quantize_int8(np.zeros(3, F32), 0)
    with pytest.raises(errors.FedPeftError):
        kernels_api.quantize_int8(np.array([np.nan], F32))


# ======================================================================================================
# public face
# ======================================================================================================

def test_module_functions_delegate_to_active_backend():
    assert K.backend in ("c", "numpy")
    active = K.get_backend(K.backend)
    info = K.backend_info()
    assert info["backend"] == K.backend and info["cpu_path"] == K.cpu_path
    assert isinstance(info["features"], list)
    x = _normal(1000, 3)
    q, s = K.quantize_int8(x, 128)
    q2, s2 = active.quantize_int8(x, 128)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(s, s2)
    assert K.l2_norm(x) == active.l2_norm(x)
    with pytest.raises(errors.InvalidValueError):
        K.get_backend("fortran")


def test_c_cpu_path_switch_is_scoped_and_checked():
    c = K.get_backend("c")
    before = c.cpu_path
    paths = c.supported_paths()
    assert before in paths
    for path in paths:
        with c.using_cpu(path) as active:
            assert active == path == c.cpu_path
        assert c.cpu_path == before  # restored
    with c.using_cpu("baseline"):
        assert c.cpu_path in ("baseline", "neon")  # NEON is the baseline on aarch64
    with pytest.raises(errors.InvalidValueError, match="unknown CPU path"):
        c.select_cpu("avx9000")
    assert c.cpu_path == before
