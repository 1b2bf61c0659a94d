/* Private helpers shared by the fedpeft_edge C core sources (not part of the public API). */
#ifndef FPE_INTERNAL_H
#define FPE_INTERNAL_H

#include "fedpeft_core.h"

#include <float.h>
#include <math.h>
#include <string.h>

/* Run-time x86 dispatch needs GCC/Clang target attributes and SSE arithmetic (not x87 excess
 * precision), so 32-bit x86 only qualifies when it already does float maths in SSE2 registers. */
/* -DFPE_PORTABLE_ONLY builds only the plain C loops (no x86 attributes or intrinsics): the test
 * Makefile uses it to run the code other architectures get on this machine too. */
#if !defined(FPE_PORTABLE_ONLY) && defined(__GNUC__) &&                                          \
    (defined(__x86_64__) || (defined(__i386__) && defined(__SSE2_MATH__)))
#define FPE_X86_DISPATCH 1
#else
#define FPE_X86_DISPATCH 0
#endif

/* The CPU path in use: a plain int written only by fpe_init / fpe_set_cpu_path. */
extern int fpe__path;

#define FPE_ABS_MASK 0x7fffffffu
#define FPE_INF_BITS 0x7f800000u
/* For b = float bits, ((b & ABS) + 0x00800000) has bit 31 set exactly when |x| >= Inf bits,
 * i.e. when x is NaN or +-Inf. OR-ing these integers vectorises on plain SSE2. */
#define FPE_NONFINITE_TERM(b) (((b) & FPE_ABS_MASK) + 0x00800000u)
#define FPE_NONFINITE_FLAG 0x80000000u

static inline uint32_t fpe__f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float fpe__u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round half to even. With strict float32 evaluation, adding and removing 1.5 * 2^23 rounds any
 * |v| <= 2^22 to an integer in the current (nearest-even) mode and vectorises without SSE4.1.
 * Under x87 excess precision the trick is wrong, so fall back to rintf there. */
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
#define FPE_RINT_SMALL(v) (((v) + 12582912.0f) - 12582912.0f)
#else
#include <math.h>
#define FPE_RINT_SMALL(v) rintf(v)
#endif

/* splitmix64 finaliser on seed + (i + 1) * golden gamma, top 24 bits scaled into [0, 1). */
static inline float fpe__uniform(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1u) * UINT64_C(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    z ^= z >> 31;
    return (float)(uint32_t)(z >> 40) * (1.0f / 16777216.0f);
}

/* FPE_ENONFINITE if any of the ceil(n / block) scales is NaN/Inf (quant.c). */
int fpe__check_scales(const float *scales, size_t n, size_t block);

/* Sum of squares in double, fixed order on every path; g *= factor (accum.c). */
double fpe__sumsq(const float *x, size_t n);
void fpe__scale(float *g, size_t n, float factor);

static inline size_t fpe__min(size_t a, size_t b) { return a < b ? a : b; }

static inline int fpe__isfinite(float f) {
    return (fpe__f2u(f) & FPE_ABS_MASK) < FPE_INF_BITS;
}

/* Call name_<path>(args) for the active path. Each source defines name_base and, on x86,
 * name_sse41 and name_avx2 by including its *_body.h once per target. */
#if FPE_X86_DISPATCH
#define FPE_DISPATCH(name, args)                                                               \
    (fpe__path == FPE_PATH_AVX2    ? name##_avx2 args                                          \
     : fpe__path == FPE_PATH_SSE41 ? name##_sse41 args                                         \
                                   : name##_base args)
#define FPE_DISPATCH_VOID(name, args)                                                          \
    do {                                                                                       \
        if (fpe__path == FPE_PATH_AVX2)                                                        \
            name##_avx2 args;                                                                  \
        else if (fpe__path == FPE_PATH_SSE41)                                                  \
            name##_sse41 args;                                                                 \
        else                                                                                   \
            name##_base args;                                                                  \
    } while (0)
#else
#define FPE_DISPATCH(name, args) (name##_base args)
#define FPE_DISPATCH_VOID(name, args) name##_base args
#endif

#endif
