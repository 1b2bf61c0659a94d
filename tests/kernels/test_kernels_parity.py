"""C core against the numpy reference, on every CPU path this machine supports.

Bit-exact where the contract says so (quantise, dequantise, uniform, top-k EF, axpy, scatter_add, both
dequant-accumulates); the optimizer steps and norms within tight tolerances. Also: the environment
switches (subprocesses), no silent fallback without the C core, and the standalone C tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest_kernels import (
    BLOCKS,
    assert_bits_equal,
    equal_magnitudes,
    f32_arrays,
    finite_f32,
    moderate_f32,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedpeft_edge.runtime import errors

# Fixtures `c_path` (the C backend on each CPU path) and `ref` (numpy) live there.
pytest_plugins = ["conftest_kernels"]

hyp = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

F32 = np.float32
REPO = Path(__file__).resolve().parents[2]


def _same_outcome(c_call, ref_call):
    """Run both; either both raise the same exception type or both return. Returns (c, ref) results."""
    try:
        want = ref_call()
    except errors.FedPeftError as exc:
        with pytest.raises(type(exc)):
            c_call()
        return None
    return c_call(), want


# ---- quantisation -------------------------------------------------------------------------------------

@hyp
@given(x=f32_arrays(max_len=700), block=BLOCKS, seed=st.none() | st.integers(0, 2**64 - 1))
def test_quantize_parity(c_path, ref, x, block, seed):
    out = _same_outcome(lambda: c_path.quantize_int8(x, block, stochastic_seed=seed),
                        lambda: ref.quantize_int8(x, block, stochastic_seed=seed))
    (qc, sc), (qr, sr) = out
    assert_bits_equal(sc, sr, "scales")
    assert_bits_equal(qc, qr, "q")


@hyp
@given(x=f32_arrays(max_len=100, elements=st.sampled_from([0.0, 1.0, np.nan, np.inf, -np.inf])),
       block=BLOCKS)
def test_quantize_non_finite_parity(c_path, ref, x, block):
    _same_outcome(lambda: c_path.quantize_int8(x, block), lambda: ref.quantize_int8(x, block))


@pytest.mark.parametrize("n", [1, 31, 256, 1000, 65_536 + 17, 1 << 20])
@pytest.mark.parametrize("block", [1, 7, 64, 256, 4096])
def test_quantize_parity_large(c_path, ref, n, block):
    rng = np.random.default_rng(n + block)
    x = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e30], n)).astype(F32)
    x[rng.integers(0, n, max(1, n // 50))] = 0
    for seed in (None, 0, 2**64 - 1):
        qc, sc = c_path.quantize_int8(x, block, stochastic_seed=seed)
        qr, sr = ref.quantize_int8(x, block, stochastic_seed=seed)
        assert_bits_equal(sc, sr, "scales")
        assert_bits_equal(qc, qr, "q")
        assert_bits_equal(c_path.dequantize_int8(qc, sc, block), ref.dequantize_int8(qr, sr, block), "x_hat")


@pytest.mark.slow  # ~1 s: the full suite runs it, the fast tier leaves it out
@hyp
@given(data=st.data(), block=BLOCKS)
def test_dequantize_parity(c_path, ref, data, block):
    q = data.draw(hnp.arrays(np.int8, st.integers(0, 600)))
    nb = -(-q.size // block)
    scales = data.draw(hnp.arrays(F32, nb, elements=finite_f32().map(abs)))
    assert_bits_equal(c_path.dequantize_int8(q, scales, block), ref.dequantize_int8(q, scales, block))


@hyp
@given(seed=st.integers(0, 2**64 - 1),
       i=hnp.arrays(np.uint64, st.integers(0, 50), elements=st.integers(0, 2**64 - 1)))
def test_uniform_parity(c_path, ref, seed, i):
    assert_bits_equal(c_path.uniform(seed, i), ref.uniform(seed, i))


# ---- top-k error feedback -----------------------------------------------------------------------------

@hyp
@given(u=st.one_of(f32_arrays(max_len=600), equal_magnitudes(600),
                   f32_arrays(max_len=600, elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45]))),
       data=st.data(), alias=st.sampled_from([None, "residual", "update"]))
def test_topk_ef_parity(c_path, ref, u, data, alias):
    r = data.draw(st.one_of(st.just(np.zeros_like(u)), f32_arrays(min_len=u.size, max_len=u.size)))
    k = data.draw(st.integers(0, u.size))
    inputs = {name: (u.copy(), r.copy()) for name in ("c", "ref")}

    def call(backend, name):
        uu, rr = inputs[name]
        # out_residual may be the residual or the update itself (in place)
        out = {"residual": rr, "update": uu}.get(alias)
        return backend.topk_ef(uu, rr, k, **({"out_residual": out} if out is not None else {}))

    out = _same_outcome(lambda: call(c_path, "c"), lambda: call(ref, "ref"))
    if out is None:  # rejected: the buffers are as they were, in place or not
        assert_bits_equal(inputs["c"][0], u, "update after a rejected call")
        assert_bits_equal(inputs["c"][1], r, "residual after a rejected call")
        return
    for got, want, what in zip(out[0], out[1], ("indices", "values", "residual"), strict=True):
        assert_bits_equal(got, want, what)


@pytest.mark.parametrize("n", [2, 1000, 65_537, 1 << 20])
@pytest.mark.parametrize("dist", ["normal", "ties", "tiny", "huge", "sparse"])
def test_topk_ef_parity_large(c_path, ref, n, dist):
    rng = np.random.default_rng(n)
    if dist == "normal":
        u = rng.standard_normal(n).astype(F32)
    elif dist == "ties":
        u = rng.integers(-3, 4, n).astype(F32)
    elif dist == "tiny":  # denormals and zeros of both signs
        u = (rng.integers(-5, 6, n) * 1e-45).astype(F32)
        u[::7] = -0.0
    elif dist == "huge":
        u = (rng.standard_normal(n) * 5e37).clip(-3.3e38, 3.3e38).astype(F32)
    else:
        u = np.where(rng.random(n) < 0.01, rng.standard_normal(n), 0).astype(F32)
    r = (rng.standard_normal(n) * 1e-3).astype(F32) if dist == "normal" else np.zeros(n, F32)
    for k in sorted({0, 1, max(1, n // 100), n // 2, n - 1, n}):
        got, want = c_path.topk_ef(u, r, k), ref.topk_ef(u, r, k)
        for g, w, what in zip(got, want, ("indices", "values", "residual"), strict=True):
            assert_bits_equal(g, w, f"{what} k={k}")


# ---- optimizers ---------------------------------------------------------------------------------------

def _assert_close_f32(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Contract: within 1e-6 relative (elementwise, with a floor for values near zero)."""
    floor = 1e-6 * (float(np.max(np.abs(want), initial=0)) + 1e-30)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=floor, err_msg=what)


@hyp
@given(n=st.integers(0, 700), seed=st.integers(0, 2**32 - 1), lr=st.floats(0, 1),
       momentum=st.sampled_from([0.0, 0.9, 1.5]), wd=st.sampled_from([0.0, 0.05]),
       mu=st.sampled_from([0.0, 0.3]), steps=st.integers(1, 3))
def test_sgd_parity(c_path, ref, n, seed, lr, momentum, wd, mu, steps):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(n).astype(F32)
    w_ref = rng.standard_normal(n).astype(F32) if mu else None
    state = {name: [w0.copy(), np.zeros(n, F32)] for name in ("c", "ref")}
    for _ in range(steps):
        g = rng.standard_normal(n).astype(F32)
        for name, backend in (("c", c_path), ("ref", ref)):
            w, mom = state[name]
            backend.sgd_step(w, g, mom if momentum else None, lr=lr, momentum=momentum, weight_decay=wd,
                             prox_mu=mu, w_ref=w_ref)
    _assert_close_f32(state["c"][0], state["ref"][0], "w")
    _assert_close_f32(state["c"][1], state["ref"][1], "momentum_buf")


@hyp
@given(n=st.integers(0, 700), seed=st.integers(0, 2**32 - 1), lr=st.floats(0, 0.1),
       betas=st.sampled_from([(0.9, 0.999), (0.0, 0.0), (0.5, 0.9)]), eps=st.sampled_from([1e-8, 1e-3]),
       wd=st.sampled_from([0.0, 0.01]), mu=st.sampled_from([0.0, 0.3]),
       first_step=st.sampled_from([1, 2, 1000, 2**40]))
def test_adamw_parity(c_path, ref, n, seed, lr, betas, eps, wd, mu, first_step):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(n).astype(F32)
    w_ref = rng.standard_normal(n).astype(F32) if mu else None
    m0 = (rng.standard_normal(n) * 0.1).astype(F32)
    v0 = (rng.random(n) * 0.01).astype(F32)
    state = {name: [w0.copy(), m0.copy(), v0.copy()] for name in ("c", "ref")}
    for step in range(first_step, first_step + 3):
        g = rng.standard_normal(n).astype(F32)
        for name, backend in (("c", c_path), ("ref", ref)):
            w, m, v = state[name]
            backend.adamw_step(w, g, m, v, step=step, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps,
                               weight_decay=wd, prox_mu=mu, w_ref=w_ref)
    for i, what in enumerate(("w", "m", "v")):
        _assert_close_f32(state["c"][i], state["ref"][i], what)


@hyp
@given(g=f32_arrays(max_len=700, elements=moderate_f32(-1e30, 1e30)), max_norm=st.floats(1e-6, 1e31))
def test_clip_parity(c_path, ref, g, max_norm):
    gc, gr = g.copy(), g.copy()
    nc, nr = c_path.clip_by_global_norm(gc, max_norm), ref.clip_by_global_norm(gr, max_norm)
    assert nc == pytest.approx(nr, rel=1e-12, abs=1e-300)
    _assert_close_f32(gc, gr, "g")


@hyp
@given(x=f32_arrays(max_len=700))
def test_norm_and_finite_parity(c_path, ref, x):
    assert c_path.l2_norm(x) == pytest.approx(ref.l2_norm(x), rel=1e-12, abs=1e-300)
    assert c_path.all_finite(x) is ref.all_finite(x) is True
    if x.size:
        y = x.copy()
        y[x.size // 2] = np.nan
        assert c_path.all_finite(y) is ref.all_finite(y) is False


# ---- aggregation --------------------------------------------------------------------------------------

@pytest.mark.slow  # > 1 s of property examples: the full suite runs them
@hyp
@given(acc=f32_arrays(max_len=700), data=st.data(), weight=finite_f32())
def test_axpy_parity(c_path, ref, acc, data, weight):
    x = data.draw(f32_arrays(min_len=acc.size, max_len=acc.size))
    ac, ar = acc.copy(), acc.copy()
    c_path.axpy(ac, x, weight)
    ref.axpy(ar, x, weight)
    assert_bits_equal(ac, ar)


@st.composite
def sparse_update(draw: st.DrawFn, max_n: int = 700) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(0, max_n))
    mask = draw(hnp.arrays(np.bool_, n))
    return np.zeros(n, F32), np.flatnonzero(mask).astype(np.uint32)


@pytest.mark.slow  # > 1 s of property examples: the full suite runs them
@hyp
@given(case=sparse_update(), data=st.data(), weight=finite_f32())
def test_scatter_add_parity(c_path, ref, case, data, weight):
    acc, idx = case
    acc = data.draw(f32_arrays(min_len=acc.size, max_len=acc.size))
    vals = data.draw(f32_arrays(min_len=idx.size, max_len=idx.size))
    ac, ar = acc.copy(), acc.copy()
    c_path.scatter_add(ac, idx, vals, weight)
    ref.scatter_add(ar, idx, vals, weight)
    assert_bits_equal(ac, ar)


@pytest.mark.slow  # > 1 s: the full suite runs it, the fast tier leaves it out
@hyp
@given(acc=f32_arrays(max_len=700), data=st.data(), block=BLOCKS, weight=finite_f32())
def test_dequant_accumulate_parity(c_path, ref, acc, data, block, weight):
    q = data.draw(hnp.arrays(np.int8, acc.size))
    scales = data.draw(hnp.arrays(F32, -(-acc.size // block), elements=finite_f32().map(abs)))
    ac, ar = acc.copy(), acc.copy()
    c_path.dequant_accumulate(ac, q, scales, block, weight)
    ref.dequant_accumulate(ar, q, scales, block, weight)
    assert_bits_equal(ac, ar)


@pytest.mark.slow  # > 1 s: the full suite runs it, the fast tier leaves it out
@hyp
@given(case=sparse_update(), data=st.data(), block=BLOCKS, weight=finite_f32())
def test_sparse_dequant_accumulate_parity(c_path, ref, case, data, block, weight):
    acc, idx = case
    acc = data.draw(f32_arrays(min_len=acc.size, max_len=acc.size))
    q = data.draw(hnp.arrays(np.int8, idx.size))
    scales = data.draw(hnp.arrays(F32, -(-idx.size // block), elements=finite_f32().map(abs)))
    ac, ar = acc.copy(), acc.copy()
    c_path.sparse_dequant_accumulate(ac, idx, q, scales, block, weight)
    ref.sparse_dequant_accumulate(ar, idx, q, scales, block, weight)
    assert_bits_equal(ac, ar)


@pytest.mark.parametrize("n", [1000, 1 << 20])
def test_aggregation_parity_large(c_path, ref, n):
    rng = np.random.default_rng(n)
    acc = rng.standard_normal(n).astype(F32)
    x = rng.standard_normal(n).astype(F32)
    q, s = ref.quantize_int8(x, 256)
    idx = np.flatnonzero(rng.random(n) < 0.01).astype(np.uint32)
    qs, ss = ref.quantize_int8(x[idx], 64)
    results = []
    for backend in (c_path, ref):
        a = acc.copy()
        backend.axpy(a, x, 0.3)
        backend.dequant_accumulate(a, q, s, 256, -0.7)
        backend.scatter_add(a, idx, x[idx], 1.1)
        backend.sparse_dequant_accumulate(a, idx, qs, ss, 64, 0.25)
        results.append(a)
    assert_bits_equal(results[0], results[1])


# ---- environment switches and packaging ---------------------------------------------------------------

_SPOT_CHECK = """
import json, numpy as np
import fedpeft_edge.kernels as K
ref = K.get_backend("numpy")
rng = np.random.default_rng(7)
x = rng.standard_normal(100_003).astype(np.float32)
r = rng.standard_normal(100_003).astype(np.float32)
ok = True
pairs = zip(K.quantize_int8(x, 256, stochastic_seed=3), ref.quantize_int8(x, 256, stochastic_seed=3))
for got, want in pairs:
    ok &= bool(np.array_equal(got.view(np.uint8), want.view(np.uint8)))
for got, want in zip(K.topk_ef(x, r, 1000), ref.topk_ef(x, r, 1000)):
    ok &= bool(np.array_equal(got.view(np.uint8), want.view(np.uint8)))
acc1, acc2 = x.copy(), x.copy()
K.axpy(acc1, r, 0.3); ref.axpy(acc2, r, 0.3)
ok &= bool(np.array_equal(acc1.view(np.uint32), acc2.view(np.uint32)))
print(json.dumps({"backend": K.backend, "cpu_path": K.cpu_path, "info": K.backend_info(), "parity": ok}))
"""


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    ours = ("FEDPEFT_EDGE_BACKEND", "FEDPEFT_EDGE_CPU")
    full_env = {k: v for k, v in os.environ.items() if k not in ours}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=120, cwd=REPO)


@pytest.mark.parametrize(("env", "backend", "cpu_path"), [
    ({"FEDPEFT_EDGE_BACKEND": "numpy"}, "numpy", "numpy"),
    ({"FEDPEFT_EDGE_BACKEND": "c", "FEDPEFT_EDGE_CPU": "baseline"}, "c", "baseline"),
    ({}, "c", None),  # default: C on the best path of this CPU
])
def test_environment_selects_backend_and_cpu_path(env, backend, cpu_path):
    proc = _run_python(_SPOT_CHECK, **env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["backend"] == backend
    assert report["info"]["backend"] == backend
    if cpu_path is not None:
        assert report["cpu_path"] == cpu_path
    else:
        from fedpeft_edge.kernels import get_backend

        best = get_backend("c").supported_paths()[-1]  # listed in increasing order of speed
        assert report["cpu_path"] == best
    assert report["parity"] is True


@pytest.mark.parametrize(("env", "message"), [
    ({"FEDPEFT_EDGE_BACKEND": "fortran"}, "unknown kernel backend"),
    ({"FEDPEFT_EDGE_BACKEND": "c", "FEDPEFT_EDGE_CPU": "avx9000"}, "unknown CPU path"),
])
def test_bad_environment_fails_loudly(env, message):
    proc = _run_python("import fedpeft_edge.kernels", **env)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_missing_core_is_import_error_not_silent_fallback():
    # Block the compiled module: with the default backend the import must fail, naming the fix.
    code = ("import sys; sys.modules['fedpeft_edge._core'] = None\n"
            "try:\n    import fedpeft_edge.kernels\n"
            "except ImportError as exc:\n    print('ImportError:', exc)\nelse:\n    print('imported')\n")
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ImportError:"), proc.stdout
    assert "FEDPEFT_EDGE_BACKEND=numpy" in proc.stdout
    # ... while the numpy backend does not need the C core at all.
    numpy_code = code.replace("import fedpeft_edge.kernels", "import fedpeft_edge.kernels as K; K.l2_norm")
    proc = _run_python(numpy_code, FEDPEFT_EDGE_BACKEND="numpy")
    assert proc.stdout.startswith("imported"), proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("make") is None or shutil.which(os.environ.get("CC", "cc")) is None,
                    reason="needs make and a C compiler (both present in CI)")
@pytest.mark.slow  # long end-to-end run; the fast tier leaves it to the full suite
def test_standalone_c_tests_pass(tmp_path):
    # Build in a copy so the source tree gets no artifacts and concurrent builds cannot collide.
    work = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", work, ignore=shutil.ignore_patterns("test_core", "test_core_san", "*.o"))
    proc = subprocess.run(["make", "-C", str(work), "test"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
