/* Top-k selection by magnitude with error feedback: expected O(n) radix select on |s| bits.
 *
 * Fast path (large n, k well below n): a fixed, evenly spread sample of u + r gives a key threshold
 * `lo` that, with a safety margin, a little more than k elements reach. One pass then computes
 * s = u + r and collects the (index, value) candidates with key >= lo; an exact radix select among
 * the candidates finishes. If the sample misjudged (fewer than k candidates, or too many for the
 * buffer) the result is still exact: the general path below runs on the already computed s.
 *
 * General path: histogram the top 11 key bits, find the bucket holding the k-th largest key,
 * collect that bucket's members (and everything above it), refine the exact threshold with two
 * more digit passes over the members, then merge. Ties at the threshold go to lower indices. */
#include "fpe_internal.h"

#include <stdlib.h>

#ifdef FPE_PROFILE /* phase timings for development: cc -DFPE_PROFILE -D_POSIX_C_SOURCE=199309L */
#include <stdio.h>
#include <time.h>
static double prof_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static double prof_t0;
#define PROF(label) fprintf(stderr, "  %-10s %7.3f ms\n", label, 1e3 * (prof_now() - prof_t0)), prof_t0 = prof_now()
#define PROF_START prof_t0 = prof_now()
#else
#define PROF(label) ((void)0)
#define PROF_START ((void)0)
#endif

#if FPE_X86_DISPATCH && defined(__SSE2__)
#include <immintrin.h>

#include "topk_lut.h"
#define FPE_TOPK_SIMD_BASE 4 /* SSE2 is part of the x86-64 (and our i386) baseline */
#else
#define FPE_TOPK_SIMD_BASE 0
#endif

#define FPE_FN(name) name##_base
#define FPE_TARGET
#define FPE_TOPK_SIMD FPE_TOPK_SIMD_BASE
#include "topk_body.h"
#undef FPE_FN
#undef FPE_TARGET
#undef FPE_TOPK_SIMD

#if FPE_X86_DISPATCH
#define FPE_FN(name) name##_sse41
#define FPE_TARGET __attribute__((target("sse4.1")))
#define FPE_TOPK_SIMD FPE_TOPK_SIMD_BASE
#include "topk_body.h"
#undef FPE_FN
#undef FPE_TARGET
#undef FPE_TOPK_SIMD

#define FPE_FN(name) name##_avx2
#define FPE_TARGET __attribute__((target("avx2")))
#define FPE_TOPK_SIMD 8
#include "topk_body.h"
#undef FPE_FN
#undef FPE_TARGET
#undef FPE_TOPK_SIMD
#endif

/* Sampling constants: 64 runs of 512 contiguous elements (prefetch-friendly), used from n >= 2^17. */
#define SAMPLE_RUNS 64
#define SAMPLE_RUN_LEN 512
#define SAMPLE_SIZE (SAMPLE_RUNS * SAMPLE_RUN_LEN)
#define SAMPLE_MIN_N ((size_t)1 << 17)


/* Walk buckets from the top; stop at the bucket holding the need-th largest key. *above gets the
 * count strictly above that bucket (< need <= *above + hist[result]). Requires need <= sum(hist). */
static uint32_t threshold_bucket(const uint32_t *hist, uint32_t nbuckets, size_t need,
                                 size_t *above) {
    size_t cum = 0;
    uint32_t b = nbuckets;
    while (b > 0) {
        --b;
        if (cum + hist[b] >= need)
            break;
        cum += hist[b];
    }
    *above = cum;
    return b;
}

/* Exact threshold among keys[0..c): the key T of the need-th largest, and how many keys equal to
 * T are taken (the rest of the need are > T). Three digit passes: 11, 11 and 9 bits. */
static uint32_t exact_threshold(uint32_t *keys, /* not const: dodges a GCC 12 false -Wmaybe-uninitialized */ size_t c, size_t need, size_t *ties) {
    /* Candidates crowd into a few buckets, so four interleaved tables break the increment chains. */
    uint32_t h[4][2048];
    size_t above1, above2, above3, j;
    memset(h, 0, sizeof h);
    for (j = 0; j + 4 <= c; j += 4)
        for (size_t t = 0; t < 4; ++t)
            h[t][(keys[j + t] & FPE_ABS_MASK) >> 20]++;
    for (; j < c; ++j)
        h[0][(keys[j] & FPE_ABS_MASK) >> 20]++;
    for (size_t b = 0; b < 2048; ++b)
        h[0][b] += h[1][b] + h[2][b] + h[3][b];
    const uint32_t b1 = threshold_bucket(h[0], 2048, need, &above1);
    memset(h, 0, sizeof h);
    for (j = 0; j < c; ++j) {
        uint32_t key = keys[j] & FPE_ABS_MASK;
        if ((key >> 20) == b1)
            h[j & 3][(key >> 9) & 0x7ffu]++;
    }
    for (size_t b = 0; b < 2048; ++b)
        h[0][b] += h[1][b] + h[2][b] + h[3][b];
    const uint32_t b2 = threshold_bucket(h[0], 2048, need - above1, &above2);
    const uint32_t prefix = (b1 << 11) | b2; /* == key >> 9 for keys in that bucket */
    memset(h, 0, sizeof h);
    for (j = 0; j < c; ++j) {
        uint32_t key = keys[j] & FPE_ABS_MASK;
        if ((key >> 9) == prefix)
            h[j & 3][key & 0x1ffu]++;
    }
    for (size_t b = 0; b < 512; ++b)
        h[0][b] += h[1][b] + h[2][b] + h[3][b];
    const uint32_t b3 = threshold_bucket(h[0], 512, need - above1 - above2, &above3);
    *ties = need - above1 - above2 - above3;
    return (prefix << 9) | b3;
}

/* Key threshold from a fixed sample of u + r such that, with margin, somewhat more than k of the n
 * elements reach it. Returns 0 (caller uses the general path) when sampling would not pay. */
static int sample_threshold(const float *u, const float *r, size_t n, size_t k, uint32_t *lo,
                            size_t *cap) {
    if (n < SAMPLE_MIN_N || k == 0)
        return 0;
    const double expect = (double)SAMPLE_SIZE * (double)k / (double)n;
    /* Sample rank with a margin of 4 binomial standard deviations (+16 for tiny k): for data
     * without structure the candidate count falls short of k with probability ~3e-5. */
    const double want = expect + 4.0 * sqrt(expect) + 16.0;
    if (want >= SAMPLE_SIZE / 2)
        return 0;
    const double c = 2.0 * (double)n * want / SAMPLE_SIZE + 1024.0;
    if (c > (double)(n / 4))
        return 0;
    const size_t rank = (size_t)want;
    uint32_t *skeys = (uint32_t *)malloc(SAMPLE_SIZE * sizeof *skeys);
    if (skeys == NULL)
        return 0; /* the general path needs no sample */
    for (size_t run = 0; run < SAMPLE_RUNS; ++run) {
        size_t start = (size_t)((uint64_t)(n - SAMPLE_RUN_LEN) * run / (SAMPLE_RUNS - 1));
        uint32_t *dst = skeys + run * SAMPLE_RUN_LEN;
        for (size_t j = 0; j < SAMPLE_RUN_LEN; ++j)
            dst[j] = fpe__f2u(u[start + j] + r[start + j]) & FPE_ABS_MASK;
    }
    size_t ties;
    *lo = exact_threshold(skeys, SAMPLE_SIZE, rank, &ties);
    free(skeys);
    *cap = (size_t)c;
    return 1;
}

/* s[idx[j]] = 0 for the k ascending indices: sparse writes, each usually a cache miss, so prefetch
 * a few ahead to overlap them. */
static void zero_selected(float *s, const uint32_t *idx, size_t k) {
    size_t j = 0;
#if defined(__GNUC__)
    for (; j + 16 < k; ++j) {
        __builtin_prefetch(s + idx[j + 16], 1, 0);
        s[idx[j]] = 0.0f;
    }
#endif
    for (; j < k; ++j)
        s[idx[j]] = 0.0f;
}

/* Sparse variant of the general path: the threshold bucket holds few elements, so collect them
 * (and everything above) in one pass and refine among them. hist is the merged level-1 table. */
static int select_sparse(float *s, size_t n, size_t k, const uint32_t *hist, uint32_t tb,
                         size_t n_above, uint32_t *idx, float *val) {
    const size_t n_cand = hist[tb];
    uint32_t *cand = (uint32_t *)malloc(n_cand * sizeof *cand);
    uint32_t *ckeys = (uint32_t *)malloc(n_cand * sizeof *ckeys);
    if (cand == NULL || ckeys == NULL) {
        free(cand);
        free(ckeys);
        return FPE_ENOMEM;
    }
    FPE_DISPATCH_VOID(collect, (s, n, tb, idx, cand));
    for (size_t j = 0; j < n_cand; ++j)
        ckeys[j] = fpe__f2u(s[cand[j]]) & FPE_ABS_MASK;
    const size_t need = k - n_above;
    size_t ties;
    const uint32_t T = exact_threshold(ckeys, n_cand, need, &ties);
    /* Keep the selected candidates (key > T, or the first `ties` keys == T), compacting in place. */
    size_t nsel = 0;
    for (size_t j = 0; j < n_cand; ++j) {
        uint32_t key = ckeys[j];
        if (key > T || (key == T && ties > 0)) {
            ties -= key == T;
            cand[nsel++] = cand[j];
        }
    }
    free(ckeys);
    /* Merge the two ascending lists idx[0..n_above) and cand[0..nsel) backwards into idx[0..k). */
    ptrdiff_t ia = (ptrdiff_t)n_above - 1, ic = (ptrdiff_t)nsel - 1, o = (ptrdiff_t)k - 1;
    while (ic >= 0) {
        if (ia >= 0 && idx[ia] > cand[ic])
            idx[o--] = idx[ia--];
        else
            idx[o--] = cand[ic--];
    }
    free(cand);
    for (size_t j = 0; j < k; ++j) {
        val[j] = s[idx[j]];
        s[idx[j]] = 0.0f;
    }
    return FPE_OK;
}

/* General path on a computed s with its level-1 histogram hist[4][2048] (0 < k < n). Usually the
 * threshold bucket is sparse (select_sparse). When it is crowded (ties, narrow value ranges), two
 * more digit passes over s pin the exact threshold key T (11 + 11 + 9 bits) and one branch-free
 * pass selects: no scratch memory, and ties cost no more than distinct values. */
static int select_general(float *s, size_t n, size_t k, uint32_t *hist, uint32_t *idx, float *val) {
    size_t above1, above2, above3;
    for (size_t b = 0; b < 2048; ++b)
        hist[b] += hist[2048 + b] + hist[4096 + b] + hist[6144 + b];
    const uint32_t b1 = threshold_bucket(hist, 2048, k, &above1);
    /* Few members in the threshold bucket (the usual case): refine among them only. Crowded
     * buckets (ties, narrow value ranges) take the scratch-free passes below instead. */
    if (hist[b1] <= n / 16)
        return select_sparse(s, n, k, hist, b1, above1, idx, val);
    memset(hist, 0, 4 * 2048 * sizeof *hist);
    FPE_DISPATCH_VOID(hist_level, (s, n, 20, b1, 9, 0x7ffu, hist));
    for (size_t b = 0; b < 2048; ++b)
        hist[b] += hist[2048 + b] + hist[4096 + b] + hist[6144 + b];
    const uint32_t b2 = threshold_bucket(hist, 2048, k - above1, &above2);
    const uint32_t prefix = (b1 << 11) | b2; /* == key >> 9 for keys in that bucket */
    memset(hist, 0, 4 * 2048 * sizeof *hist);
    FPE_DISPATCH_VOID(hist_level, (s, n, 9, prefix, 0, 0x1ffu, hist));
    for (size_t b = 0; b < 512; ++b)
        hist[b] += hist[2048 + b] + hist[4096 + b] + hist[6144 + b];
    const uint32_t b3 = threshold_bucket(hist, 512, k - above1 - above2, &above3);
    const uint32_t T = (prefix << 9) | b3;
    const size_t ties = k - above1 - above2 - above3; /* >= 1 keys equal to T, lowest index first */
    PROF("refine");
    FPE_DISPATCH_VOID(select_pass, (s, n, k, T, ties, idx, val));
    PROF("select");
    return FPE_OK;
}

static int general_path(float *s, size_t n, size_t k, uint32_t *idx, float *val) {
    uint32_t hist[4 * 2048];
    memset(hist, 0, sizeof hist);
    FPE_DISPATCH_VOID(hist_chunk, (s, n, hist));
    return select_general(s, n, k, hist, idx, val);
}

/* General path from scratch: s = u2 + r2 (r2 == NULL: in place) with the level-1 histogram. */
static int hist_path(const float *u2, const float *r2, float *s, size_t n, size_t k, uint32_t *idx,
                     float *val) {
    uint32_t hist[4 * 2048];
    const int need_hist = k > 0 && k < n;
    if (need_hist)
        memset(hist, 0, sizeof hist);
    uint32_t bad = FPE_DISPATCH(sum_hist, (u2, r2, s, n, need_hist ? hist : NULL));
    if (bad & FPE_NONFINITE_FLAG)
        return FPE_ENONFINITE;
    if (k == 0)
        return FPE_OK;
    if (k == n) {
        for (size_t i = 0; i < n; ++i) {
            idx[i] = (uint32_t)i;
            val[i] = s[i];
            s[i] = 0.0f;
        }
        return FPE_OK;
    }
    PROF("sum+hist");
    return select_general(s, n, k, hist, idx, val);
}

int fpe_topk_ef(const float *u, const float *r, size_t n, size_t k, uint32_t *idx, float *val,
                float *residual_out) {
    if (k > n)
        return FPE_EINVAL;
#if SIZE_MAX > 0xFFFFFFFFu /* indices are uint32; on 32-bit targets size_t cannot exceed that */
    if ((uint64_t)n > UINT64_C(0xFFFFFFFF))
        return FPE_EINVAL;
#endif
    float *s = residual_out;
    /* In place, a rejected update must not cost the caller its residual: one read-only pass checks
     * u + r first (cheaper than any copy), so FPE_ENONFINITE leaves the buffer untouched. */
    if ((s == r || s == u) && (FPE_DISPATCH(sum_bad, (u, r, n)) & FPE_NONFINITE_FLAG))
        return FPE_ENONFINITE;
    /* Operand layout for the sum kernels: r2 == NULL means s aliases the other operand. */
    const float *u2 = u, *r2 = r;
    if (s == r && s == u) {
        /* One buffer for all three: s = s + s, then the general path. */
        uint32_t bad = 0;
        for (size_t i = 0; i < n; ++i) {
            s[i] = s[i] + s[i];
            bad |= FPE_NONFINITE_TERM(fpe__f2u(s[i]));
        }
        if (bad & FPE_NONFINITE_FLAG)
            return FPE_ENONFINITE;
        if (k == 0)
            return FPE_OK;
        return general_path(s, n, k, idx, val);
    }
    if (s == r)
        r2 = NULL;
    else if (s == u)
        u2 = r, r2 = NULL;

    uint32_t lo;
    size_t cap;
    PROF_START;
    if (k > 0 && k < n && sample_threshold(u, r, n, k, &lo, &cap)) {
        PROF("sample");
        /* 16 entries of slack: the AVX2 collector stores whole vectors before testing cap */
        uint32_t *cidx = (uint32_t *)malloc((cap + 16) * sizeof *cidx);
        uint32_t *cbits = (uint32_t *)malloc((cap + 16) * sizeof *cbits);
        if (cidx == NULL || cbits == NULL) {
            free(cidx);
            free(cbits);
            return FPE_ENOMEM;
        }
        uint32_t bad;
        size_t c = FPE_DISPATCH(sum_collect, (u2, r2, s, n, lo, cidx, cbits, cap, &bad));
        if (bad & FPE_NONFINITE_FLAG) {
            free(cidx);
            free(cbits);
            return FPE_ENONFINITE;
        }
        PROF("collect");
        if (c < k || c > cap) { /* the sample misjudged: exact general path */
            free(cidx);
            free(cbits);
            return general_path(s, n, k, idx, val);
        }
        size_t ties;
        const uint32_t T = exact_threshold(cbits, c, k, &ties);
        PROF("threshold");
        size_t o = 0;
        for (size_t j = 0; j < c; ++j) {
            uint32_t key = cbits[j] & FPE_ABS_MASK;
            if (key > T || (key == T && ties > 0)) {
                ties -= key == T;
                idx[o] = cidx[j];
                val[o] = fpe__u2f(cbits[j]);
                ++o;
            }
        }
        PROF("select");
        free(cidx);
        free(cbits);
        zero_selected(s, idx, k);
        PROF("zero");
        return FPE_OK;
    }
    return hist_path(u2, r2, s, n, k, idx, val);
}
