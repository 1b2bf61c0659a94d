"""Fixtures and Hypothesis strategies shared by the kernel tests (imported by tests/kernels/test_kernels*.py).

``kernels`` runs a test on every backend and every CPU path of the C core this machine supports:
``numpy``, ``c`` (the dispatched path) and ``c-<path>`` for each other supported path (``c-baseline`` is
always among them on x86). ``c_path`` is the same without numpy, for the parity tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedpeft_edge.kernels import get_backend


def _c_params() -> list[str]:
    try:
        c = get_backend("c")
    except ImportError:
        return ["c"]  # the fixture then raises the ImportError: a missing core fails loudly, never skips
    best = c.cpu_path
    return ["c"] + [f"c-{p}" for p in c.supported_paths() if p != best]


C_PARAMS = _c_params()
ALL_PARAMS = ["numpy", *C_PARAMS]


def _backend_for(param: str) -> Iterator[object]:
    if param == "numpy":
        yield get_backend("numpy")
        return
    c = get_backend("c")
    if param == "c":
        yield c
        return
    with c.using_cpu(param.removeprefix("c-")):
        yield c


@pytest.fixture(params=ALL_PARAMS)
def kernels(request: pytest.FixtureRequest) -> Iterator[object]:
    """Every backend and CPU path (the whole suite runs on each)."""
    yield from _backend_for(request.param)


@pytest.fixture(params=["numpy", "c"])
def kernels_api(request: pytest.FixtureRequest) -> Iterator[object]:
    """The two backends on their default path: argument validation is CPU-path independent."""
    yield from _backend_for(request.param)


@pytest.fixture(params=C_PARAMS)
def c_path(request: pytest.FixtureRequest) -> Iterator[object]:
    """The C backend on each supported CPU path (compared against the numpy reference)."""
    yield from _backend_for(request.param)


@pytest.fixture
def ref() -> object:
    return get_backend("numpy")


# ---- strategies --------------------------------------------------------------------------------------

F32_MAX = float(np.finfo(np.float32).max)
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1.5, 2.5, 3e38, -3e38, F32_MAX, -F32_MAX, 1e-45, -1e-45, 1e-40,
           -3e-39, 1.17549435e-38, 1e-37, 127.0, 0.25]


def finite_f32() -> st.SearchStrategy[float]:
    """Finite float32 values, special ones (±0, denormals, ±3e38, ties at .5) drawn often."""
    return st.one_of(st.sampled_from(SPECIAL),
                     st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True),
                     st.floats(-4.0, 4.0, width=32))


def quantizable_f32() -> st.SearchStrategy[float]:
    """Finite float32 with |x| <= 3.39e38. Above that, 127 * float32(absmax / 127) can round past FLT_MAX
    and dequantise to Inf (a limit of the int8 format with float32 scales, reported to the lead)."""
    return finite_f32().filter(lambda v: abs(v) <= 3.39e38)


def f32_arrays(max_len: int = 300, elements: st.SearchStrategy[float] | None = None,
               min_len: int = 0) -> st.SearchStrategy[np.ndarray]:
    elements = elements if elements is not None else finite_f32()
    return hnp.arrays(np.float32, st.integers(min_len, max_len), elements=elements)


@st.composite
def equal_magnitudes(draw: st.DrawFn, max_len: int = 300) -> np.ndarray:
    """All |x| equal (random signs, maybe zero): the worst case for the top-k tie rule."""
    n = draw(st.integers(0, max_len))
    mag = draw(st.sampled_from([0.0, 1e-45, 1.0, 3e38]))
    signs = draw(hnp.arrays(np.bool_, n))
    return np.where(signs, np.float32(mag), np.float32(-mag)).astype(np.float32)


def moderate_f32(lo: float = -10.0, hi: float = 10.0) -> st.SearchStrategy[float]:
    return st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32, allow_subnormal=False)


BLOCKS = st.sampled_from([1, 2, 3, 7, 16, 64, 255, 256])


def bits(a: np.ndarray) -> np.ndarray:
    """Bit patterns, so that -0.0 != +0.0 and NaN payloads count."""
    return a.view({4: np.uint32, 2: np.uint16, 1: np.uint8, 8: np.uint64}[a.dtype.itemsize])


def assert_bits_equal(a: np.ndarray, b: np.ndarray, what: str = "") -> None:
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if not np.array_equal(bits(a), bits(b)):
        bad = np.flatnonzero(bits(a) != bits(b))
        raise AssertionError(f"{what}: {bad.size} elements differ, first at {bad[:5]}: "
                             f"{a[bad[:5]]} vs {b[bad[:5]]}")
