"""C kernels next to their numpy reference, single thread, 1M and 16M float32 elements.

Run (under a minute here; longer on a busy machine):

    pytest bench/bench_kernels.py --benchmark-only -p no:cacheprovider \\
        --benchmark-json=bench/kernels.json
    python bench/summarize.py bench/kernels.json

Each group ``<kernel>-<size>`` holds three implementations: ``c`` (the CPU path dispatched on this
machine), ``c-baseline`` (the portable path, forced with fpe_init(1) and restored afterwards, same
process) and ``numpy`` (the reference backend, e.g. partition-based top-k). ``copyto-<size>`` times
``np.copyto`` of one float32 buffer of that size: the memory-bandwidth yardstick. Before timing, every C
result is compared with the numpy reference (bit-exact where the contract says so, else 1e-6 relative);
``extra_info`` records that check, elements/s, the CPU path and the thread setting.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from fedpeft_edge.kernels import get_backend

SIZES = {"1M": 1 << 20, "16M": 1 << 24}
ROUNDS = {"1M": 20, "16M": 5}
IMPLS = ["c", "c-baseline", "numpy"]
BLOCK = 256
TOPK_FRACTION = 0.01
SPARSE_FRACTION = 0.01

F32 = np.float32


@functools.cache
def _inputs(size: str) -> dict[str, np.ndarray]:
    """Read-only inputs shared by all benchmarks of one size (built once)."""
    n = SIZES[size]
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n, dtype=F32)
    data = {
        "x": x,
        "r": (rng.standard_normal(n, dtype=F32) * F32(0.01)).astype(F32),
        "w": rng.standard_normal(n, dtype=F32),
        "g": (rng.standard_normal(n, dtype=F32) * F32(0.1)).astype(F32),
        "idx": np.flatnonzero(rng.random(n) < SPARSE_FRACTION).astype(np.uint32),
    }
    data["vals"] = rng.standard_normal(data["idx"].size, dtype=F32)
    data["q"], data["scales"] = get_backend("numpy").quantize_int8(x, BLOCK)
    for arr in data.values():
        arr.flags.writeable = False
    return data


@contextlib.contextmanager
def _impl(name: str) -> Iterator[object]:
    if name == "numpy":
        yield get_backend("numpy")
        return
    c = get_backend("c")
    if name == "c":
        yield c
    else:
        with c.using_cpu("baseline"):  # fpe_init(1), then the previous path is restored
            yield c


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({1: np.uint8, 4: np.uint32}[a.dtype.itemsize])


def _check(got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...], exact: bool) -> bool:
    for g, w in zip(got, want, strict=True):
        if exact:
            if g.shape != w.shape or not np.array_equal(_bits(g), _bits(w)):
                return False
        elif not np.allclose(g, w, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(w), initial=0))):
            return False
    return True


# Reference outputs per (kernel, size), computed once and shared by the c and c-baseline runs.
_REFERENCE: dict[tuple[str, str], tuple[np.ndarray, ...]] = {}


def _run(benchmark, kernel: str, size: str, impl: str, make_state: Callable[[], dict],
         call: Callable[[object, dict], None], outputs: Callable[[dict], tuple[np.ndarray, ...]],
         exact: bool, elements: int | None = None) -> None:
    """Check ``impl`` against numpy once on fresh state, then time ``call`` on a state of its own.

    ``elements`` is what elements/s counts (default: the dense size; sparse kernels pass their nnz).
    """
    n = SIZES[size] if elements is None else elements
    benchmark.group = f"{kernel}-{size}"
    key = (kernel, size)
    if key not in _REFERENCE:
        state = make_state()
        call(get_backend("numpy"), state)
        _REFERENCE[key] = tuple(a.copy() for a in outputs(state))
    with _impl(impl) as backend:
        state = make_state()
        call(backend, state)
        correct = _check(outputs(state), _REFERENCE[key], exact)
        timed_state = make_state()
        benchmark.pedantic(call, args=(backend, timed_state), rounds=ROUNDS[size], iterations=1,
                           warmup_rounds=1)
        cpu_path = backend.cpu_path
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "kernel": kernel, "size": size, "elements": n, "impl": impl, "cpu_path": cpu_path,
        "correct": correct, "check": "bit-exact" if exact else "rtol 1e-6",
        "elements_per_s": n / median, "threads": os.environ.get("OMP_NUM_THREADS"),
    })
    assert correct, f"{impl} {kernel} {size}: result differs from the numpy reference"


SIZE_PARAMS = list(SIZES)


@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_copyto(benchmark, size):
    src = _inputs(size)["x"]
    dst = np.empty_like(src)
    benchmark.group = f"copyto-{size}"
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=ROUNDS[size], iterations=1, warmup_rounds=1)
    assert np.array_equal(dst, src)
    benchmark.extra_info.update({"kernel": "copyto", "size": size, "elements": src.size, "impl": "numpy",
                                 "correct": True, "elements_per_s": src.size / benchmark.stats.stats.median,
                                 "threads": os.environ.get("OMP_NUM_THREADS")})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_quantize(benchmark, size, impl):
    d = _inputs(size)
    nb = -(-d["x"].size // BLOCK)
    _run(benchmark, "quantize_int8", size, impl,
         lambda: {"q": np.empty(d["x"].size, np.int8), "s": np.empty(nb, F32)},
         lambda b, st: b.quantize_int8(d["x"], BLOCK, out=st["q"], scales=st["s"]),
         lambda st: (st["q"], st["s"]), exact=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_quantize_stochastic(benchmark, size, impl):
    d = _inputs(size)
    nb = -(-d["x"].size // BLOCK)
    _run(benchmark, "quantize_int8_stochastic", size, impl,
         lambda: {"q": np.empty(d["x"].size, np.int8), "s": np.empty(nb, F32)},
         lambda b, st: b.quantize_int8(d["x"], BLOCK, out=st["q"], scales=st["s"], stochastic_seed=12345),
         lambda st: (st["q"], st["s"]), exact=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_dequant_accumulate(benchmark, size, impl):
    d = _inputs(size)
    _run(benchmark, "dequant_accumulate", size, impl,
         lambda: {"acc": d["w"].copy()},
         lambda b, st: b.dequant_accumulate(st["acc"], d["q"], d["scales"], BLOCK, 0.25),
         lambda st: (st["acc"],), exact=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_topk_ef(benchmark, size, impl):
    d = _inputs(size)
    n = d["x"].size
    k = int(n * TOPK_FRACTION)
    _run(benchmark, "topk_ef_1pct", size, impl,
         lambda: {"i": np.empty(k, np.uint32), "v": np.empty(k, F32), "res": np.empty(n, F32)},
         lambda b, st: b.topk_ef(d["x"], d["r"], k, out_indices=st["i"], out_values=st["v"],
                                 out_residual=st["res"]),
         lambda st: (st["i"], st["v"], st["res"]), exact=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_adamw(benchmark, size, impl):
    d = _inputs(size)
    n = d["w"].size
    _run(benchmark, "adamw_step", size, impl,
         lambda: {"w": d["w"].copy(), "m": np.zeros(n, F32), "v": np.zeros(n, F32)},
         lambda b, st: b.adamw_step(st["w"], d["g"], st["m"], st["v"], step=1, lr=1e-3, weight_decay=0.01),
         lambda st: (st["w"], st["m"], st["v"]), exact=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_sgd(benchmark, size, impl):
    d = _inputs(size)
    n = d["w"].size
    _run(benchmark, "sgd_step_momentum", size, impl,
         lambda: {"w": d["w"].copy(), "mom": np.zeros(n, F32)},
         lambda b, st: b.sgd_step(st["w"], d["g"], st["mom"], lr=1e-2, momentum=0.9, weight_decay=0.01),
         lambda st: (st["w"], st["mom"]), exact=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_axpy(benchmark, size, impl):
    d = _inputs(size)
    _run(benchmark, "axpy", size, impl,
         lambda: {"acc": d["w"].copy()},
         lambda b, st: b.axpy(st["acc"], d["x"], 0.25),
         lambda st: (st["acc"],), exact=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_scatter_add(benchmark, size, impl):
    d = _inputs(size)
    _run(benchmark, "scatter_add_1pct", size, impl,
         lambda: {"acc": d["w"].copy()},
         lambda b, st: b.scatter_add(st["acc"], d["idx"], d["vals"], 0.25),
         lambda st: (st["acc"],), exact=True, elements=d["idx"].size)
