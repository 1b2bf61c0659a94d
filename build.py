"""cffi builder for ``fedpeft_edge._core`` (API / out-of-line mode) from the C sources in csrc/.

setup.py hands ``build.py:ffibuilder`` to cffi; ``python build.py`` also builds in place for quick work.
A compile error fails the build loudly: there is no silent pure-Python fallback at this level (the
numpy backend exists, but only when chosen explicitly with FEDPEFT_EDGE_BACKEND=numpy).
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _rel(path: str) -> str:
    # setuptools wants source paths relative to the directory it runs in (the project root).
    return os.path.relpath(path)


# Constants are declared with `...` so cffi takes their values from the C header at build time:
# Python never hard-codes a C number.
CDEF = """
#define FPE_OK ...
#define FPE_EINVAL ...
#define FPE_ENONFINITE ...
#define FPE_ENOMEM ...
#define FPE_EINDEX ...
#define FPE_PATH_BASELINE ...
#define FPE_PATH_SSE41 ...
#define FPE_PATH_AVX2 ...
#define FPE_PATH_NEON ...

int fpe_init(int force_baseline);
int fpe_cpu_path(void);
int fpe_path_supported(int path);
int fpe_set_cpu_path(int path);
const char *fpe_strerror(int code);

int fpe_quantize_int8(const float *x, size_t n, size_t block, int8_t *q, float *scales);
int fpe_quantize_int8_stochastic(const float *x, size_t n, size_t block, uint64_t seed, int8_t *q,
                                 float *scales);
int fpe_dequantize_int8(const int8_t *q, const float *scales, size_t n, size_t block, float *out);
float fpe_uniform(uint64_t seed, uint64_t i);

int fpe_topk_ef(const float *u, const float *r, size_t n, size_t k, uint32_t *idx, float *val,
                float *residual_out);

int fpe_sgd_step(float *w, const float *g, float *mom, const float *w_ref, size_t n, float lr,
                 float momentum, float weight_decay, float prox_mu);
int fpe_adamw_step(float *w, const float *g, float *m, float *v, const float *w_ref, size_t n,
                   uint64_t step, float lr, float beta1, float beta2, float eps, float weight_decay,
                   float prox_mu);
int fpe_clip_by_global_norm(float *g, size_t n, float max_norm, double *norm_out);

int fpe_axpy(float *acc, const float *x, size_t n, float weight);
int fpe_scatter_add(float *acc, size_t n, const uint32_t *idx, const float *val, size_t nnz,
                    float weight);
int fpe_dequant_accumulate(float *acc, const int8_t *q, const float *scales, size_t n, size_t block,
                           float weight);
int fpe_sparse_dequant_accumulate(float *acc, size_t n, const uint32_t *idx, const int8_t *q,
                                  const float *scales, size_t nnz, size_t block, float weight);
int fpe_l2_norm(const float *x, size_t n, double *out);
int fpe_all_finite(const float *x, size_t n, int *out);
"""

SOURCES = sorted(glob.glob(os.path.join(CSRC, "*.c")))
DEPENDS = sorted(glob.glob(os.path.join(CSRC, "*.h")))
if not SOURCES:
    raise RuntimeError(f"fedpeft_edge._core: no C sources found under {CSRC}")

if sys.platform == "win32":
    # MSVC: portable path only (the x86 target attributes need GCC/Clang); strict IEEE float model.
    EXTRA_COMPILE_ARGS = ["/fp:strict", "/W4"]
    LIBRARIES: list[str] = []
else:
    # Appended after Python's own flags (-O3 last wins; we repeat it so a -O2 Python still gets -O3).
    # -ffp-contract=off: no fused multiply-add, so every CPU path and numpy give the same bits.
    # -fno-math-errno: lets sqrtf vectorise; never -ffast-math, never -march=native (run-time
    # dispatch in csrc/dispatch.c picks SSE4.1/AVX2 on the running CPU instead).
    # -Werror: the generated cffi wrapper and our sources are warning-free with GCC 12; a new
    # compiler's new warning fails the build loudly rather than shipping unreviewed code.
    EXTRA_COMPILE_ARGS = [
        "-std=c99",
        "-O3",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-ffp-contract=off",
        "-fno-math-errno",
        # Only PyInit__core needs exporting; keeps fpe_* symbols from clashing with other modules.
        "-fvisibility=hidden",
    ]
    LIBRARIES = ["m"]
    if platform.machine().lower() in ("i386", "i486", "i586", "i686", "x86"):
        # 32-bit x86 defaults to x87 maths, whose 80-bit intermediates act like a fused multiply-add and
        # break bit-parity (see `make -C csrc test-i686-x87`); SSE2 scalar maths keeps it. Needs a
        # Pentium 4 or newer, which every supported gateway is.
        EXTRA_COMPILE_ARGS += ["-msse2", "-mfpmath=sse"]

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "fedpeft_edge._core",
    '#include "fedpeft_core.h"\n',
    sources=[_rel(p) for p in SOURCES],
    depends=[_rel(p) for p in DEPENDS],
    include_dirs=[_rel(CSRC)],
    extra_compile_args=EXTRA_COMPILE_ARGS,
    libraries=LIBRARIES,
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=HERE, verbose=True)
