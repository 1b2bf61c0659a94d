/* CPU path selection and error strings. */
#include "fpe_internal.h"

/* Written once by fpe_init (or by fpe_set_cpu_path in tests); kernels read it on every call. Before
 * any write the portable path runs, which is always safe. */
#if defined(__aarch64__)
int fpe__path = FPE_PATH_NEON;
#else
int fpe__path = FPE_PATH_BASELINE;
#endif

int fpe_path_supported(int path) {
#if defined(__aarch64__)
    return path == FPE_PATH_NEON;
#elif FPE_X86_DISPATCH
    __builtin_cpu_init();
    switch (path) {
    case FPE_PATH_BASELINE:
        return 1;
    case FPE_PATH_SSE41:
        return __builtin_cpu_supports("sse4.1") ? 1 : 0;
    case FPE_PATH_AVX2:
        /* libgcc/compiler-rt also check that the OS saves YMM state before reporting avx2. */
        return __builtin_cpu_supports("avx2") ? 1 : 0;
    default:
        return 0;
    }
#else
    return path == FPE_PATH_BASELINE;
#endif
}

int fpe_init(int force_baseline) {
#if defined(__aarch64__)
    (void)force_baseline;
    fpe__path = FPE_PATH_NEON;
#else
    int path = FPE_PATH_BASELINE;
    if (!force_baseline) {
        if (fpe_path_supported(FPE_PATH_AVX2))
            path = FPE_PATH_AVX2;
        else if (fpe_path_supported(FPE_PATH_SSE41))
            path = FPE_PATH_SSE41;
    }
    fpe__path = path;
#endif
    return fpe__path;
}

int fpe_cpu_path(void) { return fpe__path; }

int fpe_set_cpu_path(int path) {
    if (!fpe_path_supported(path))
        return FPE_EINVAL;
    fpe__path = path;
    return FPE_OK;
}

const char *fpe_strerror(int code) {
    switch (code) {
    case FPE_OK:
        return "success";
    case FPE_EINVAL:
        return "argument out of range";
    case FPE_ENONFINITE:
        return "NaN or Inf where finite values are required";
    case FPE_ENOMEM:
        return "scratch allocation failed";
    case FPE_EINDEX:
        return "sparse index out of range or not strictly increasing";
    default:
        return "unknown error code";
    }
}
