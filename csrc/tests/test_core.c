/* Standalone tests for the fedpeft_edge C core: no Python, no framework.
 *
 * Every test runs once per CPU path this machine supports. Besides checking each result against
 * a plain scalar reference written here, each test records its output buffers; on the second and
 * later paths the recorded bytes must match the first (portable) path exactly. */
#include "fedpeft_core.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_passed, g_failed;
static int g_path;
static const char *g_test;

#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        if (cond) {                                                                            \
            ++g_passed;                                                                        \
        } else {                                                                               \
            ++g_failed;                                                                        \
            fprintf(stderr, "FAIL [%s, path %d] %s:%d: %s: ", g_test, g_path, __FILE__,        \
                    __LINE__, #cond);                                                          \
            fprintf(stderr, __VA_ARGS__);                                                      \
            fputc('\n', stderr);                                                               \
        }                                                                                      \
    } while (0)

#define CHECK_RC(call, want)                                                                   \
    do {                                                                                       \
        int rc_ = (call);                                                                      \
        CHECK(rc_ == (want), "%s returned %d (%s), want %d", #call, rc_, fpe_strerror(rc_),     \
              (want));                                                                         \
    } while (0)

/* ---- cross-path recording: first path stores, later paths compare byte for byte ------------ */
#define MAX_RECORDS 4096
static void *g_rec[MAX_RECORDS];
static size_t g_rec_len[MAX_RECORDS];
static int g_rec_n, g_recording;

static void record(const void *buf, size_t bytes) {
    if (g_rec_n >= MAX_RECORDS) {
        ++g_failed;
        fprintf(stderr, "FAIL: too many records\n");
        return;
    }
    int i = g_rec_n++;
    if (g_recording) {
        g_rec[i] = malloc(bytes ? bytes : 1);
        if (g_rec[i] == NULL) {
            ++g_failed;
            return;
        }
        if (bytes)
            memcpy(g_rec[i], buf, bytes);
        g_rec_len[i] = bytes;
    } else {
        CHECK(g_rec_len[i] == bytes && (bytes == 0 || memcmp(g_rec[i], buf, bytes) == 0),
              "output #%d differs from the portable path", i);
    }
}

/* ---- helpers --------------------------------------------------------------------------------- */
static uint64_t g_rng;
static uint64_t rng_next(void) { /* xorshift64*: deterministic test data */
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * UINT64_C(2685821657736338717);
}
static void rng_seed(uint64_t s) { g_rng = s * 2 + 0x9E3779B97F4A7C15u; }
static float rng_unit(void) { return (float)(rng_next() >> 40) / 16777216.0f; }
static float rng_normalish(void) { /* sum of uniforms: bell-shaped, cheap */
    return (rng_unit() + rng_unit() + rng_unit() + rng_unit() - 2.0f) * 1.7f;
}
static float f_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint32_t u_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float *falloc(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }
static int bits_equal(const float *a, const float *b, size_t n) {
    return n == 0 || memcmp(a, b, n * sizeof(float)) == 0;
}

static const size_t SIZES[] = {0, 1, 2, 7, 15, 16, 17, 255, 256, 257, 1000, 4097, 20011};
#define NSIZES (sizeof SIZES / sizeof SIZES[0])
static const size_t BLOCKS[] = {1, 3, 16, 64, 256, 1000};
#define NBLOCKS (sizeof BLOCKS / sizeof BLOCKS[0])

/* Mixed-scale data with zeros, signed zeros, denormals, huge values and exact halves. */
static void fill_mixed(float *x, size_t n, uint64_t seed) {
    static const float scales[] = {1e-3f, 1.0f, 1e30f, 3e-39f};
    rng_seed(seed);
    for (size_t i = 0; i < n; ++i) {
        float s = scales[rng_next() % 4];
        x[i] = rng_normalish() * s;
        switch (rng_next() % 16) {
        case 0: x[i] = 0.0f; break;
        case 1: x[i] = -0.0f; break;
        case 2: x[i] = f_of(1u + (uint32_t)(rng_next() % 1000)); break; /* denormal */
        case 3: x[i] = 3.0e38f * (rng_unit() - 0.5f); break;
        default: break;
        }
    }
}

/* ---- references --------------------------------------------------------------------------- */
static void ref_quant(const float *x, size_t n, size_t block, int stochastic, uint64_t seed,
                      int8_t *q, float *scales) {
    for (size_t b = 0, s0 = 0; s0 < n; ++b, s0 += block) {
        size_t e = s0 + block < n ? s0 + block : n;
        float a = 0.0f;
        for (size_t i = s0; i < e; ++i)
            if (fabsf(x[i]) > a)
                a = fabsf(x[i]);
        float inv = a == 0.0f ? INFINITY : 127.0f / a;
        if (isinf(inv)) {
            scales[b] = 0.0f;
            for (size_t i = s0; i < e; ++i)
                q[i] = 0;
            continue;
        }
        scales[b] = a / 127.0f;
        for (size_t i = s0; i < e; ++i) {
            float v = x[i] * inv;
            float r = stochastic ? floorf(v + fpe_uniform(seed, i)) : rintf(v);
            r = fminf(fmaxf(r, -127.0f), 127.0f);
            q[i] = (int8_t)r;
        }
    }
}

static const float *g_sort_keys;
static int cmp_topk(const void *pa, const void *pb) {
    uint32_t a = *(const uint32_t *)pa, b = *(const uint32_t *)pb;
    float ka = fabsf(g_sort_keys[a]), kb = fabsf(g_sort_keys[b]);
    if (ka != kb)
        return ka > kb ? -1 : 1;
    return a < b ? -1 : (a > b);
}
static int cmp_u32(const void *pa, const void *pb) {
    uint32_t a = *(const uint32_t *)pa, b = *(const uint32_t *)pb;
    return a < b ? -1 : (a > b);
}

/* ---- tests ---------------------------------------------------------------------------------- */
static void test_quantize(void) {
    g_test = "quantize";
    for (size_t si = 0; si < NSIZES; ++si) {
        for (size_t bi = 0; bi < NBLOCKS; ++bi) {
            size_t n = SIZES[si], block = BLOCKS[bi], nb = n / block + (n % block != 0);
            float *x = falloc(n), *s = falloc(nb), *rs = falloc(nb), *y = falloc(n);
            int8_t *q = (int8_t *)calloc(n + 1, 1), *rq = (int8_t *)calloc(n + 1, 1);
            fill_mixed(x, n, n * 31 + block);
            for (int stoch = 0; stoch < 2; ++stoch) {
                uint64_t seed = 12345u + n;
                CHECK_RC(stoch ? fpe_quantize_int8_stochastic(x, n, block, seed, q, s)
                               : fpe_quantize_int8(x, n, block, q, s),
                         FPE_OK);
                ref_quant(x, n, block, stoch, seed, rq, rs);
                CHECK((n == 0 || memcmp(q, rq, n) == 0) && bits_equal(s, rs, nb),
                      "n=%zu block=%zu stochastic=%d differs from reference", n, block, stoch);
                record(q, n);
                record(s, nb * sizeof(float));
                int in_range = 1;
                for (size_t i = 0; i < n; ++i)
                    in_range &= q[i] != -128;
                CHECK(in_range, "q outside [-127, 127]");
                CHECK_RC(fpe_dequantize_int8(q, s, n, block, y), FPE_OK);
                record(y, n * sizeof(float));
                /* round trip: half a step for rint, one step for stochastic floor (+ float slop);
                 * zero-rule blocks (scale 0) lose at most their own tiny absmax. */
                int ok = 1;
                for (size_t i = 0; i < n; ++i) {
                    double sc = s[i / block], err = fabs((double)x[i] - (double)y[i]);
                    double lim = sc == 0.0 ? 3.8e-37 : (stoch ? 1.0 : 0.5) * sc * (1 + 1e-5) + 1e-45;
                    ok &= err <= lim;
                }
                CHECK(ok, "round trip error above bound (n=%zu block=%zu stoch=%d)", n, block, stoch);
            }
            free(x), free(s), free(rs), free(y), free(q), free(rq);
        }
    }
    /* exact halves round to even: absmax 127 makes inv exactly 1 */
    {
        float x[8] = {127.0f, 0.5f, 1.5f, 2.5f, -0.5f, -2.5f, -3.5f, 126.5f};
        int8_t q[8], want[8] = {127, 0, 2, 2, 0, -2, -4, 126};
        float s;
        CHECK_RC(fpe_quantize_int8(x, 8, 8, q, &s), FPE_OK);
        CHECK(memcmp(q, want, 8) == 0 && s == 1.0f, "half-even rounding");
        record(q, 8);
    }
    /* the extreme of every block maps to exactly +-127 for any absmax (no clamp in the kernel):
     * sweep absmax over the whole finite range, including denormal scales */
    {
        int ok = 1;
        rng_seed(99);
        for (int t = 0; t < 200000 && ok; ++t) {
            uint32_t bits = 0x00800000u + (uint32_t)(rng_next() % (0x7f7fffffu - 0x00800000u));
            if (t < 1000)
                bits = 0x7f7fffffu - (uint32_t)t; /* near FLT_MAX */
            float a = f_of(bits);
            float x[4] = {a, -a, f_of(bits - 1), -f_of(bits - 1)};
            int8_t q[4];
            float sc;
            if (fpe_quantize_int8(x, 4, 4, q, &sc) != FPE_OK)
                ok = 0;
            else if (sc != 0.0f)
                ok = q[0] == 127 && q[1] == -127 && q[2] >= 126 && q[3] <= -126;
            if (!ok)
                fprintf(stderr, "absmax %a gives q %d %d %d %d\n", (double)a, q[0], q[1], q[2], q[3]);
        }
        CHECK(ok, "block extreme not +-127");
    }
    /* zero block, and an absmax so tiny that 127/absmax overflows: both give scale 0, q 0 */
    {
        float x[6] = {0.0f, -0.0f, 0.0f, 1e-38f, -2e-38f, f_of(1)};
        int8_t q[6] = {1, 1, 1, 1, 1, 1};
        float s[2] = {-1, -1};
        CHECK_RC(fpe_quantize_int8(x, 6, 3, q, s), FPE_OK);
        CHECK(s[0] == 0.0f && s[1] == 0.0f, "zero-rule scales %g %g", s[0], s[1]);
        int allz = 1;
        for (int i = 0; i < 6; ++i)
            allz &= q[i] == 0;
        CHECK(allz, "zero-rule q");
    }
    /* errors */
    {
        float x[300];
        int8_t q[300];
        float s[2];
        for (int i = 0; i < 300; ++i)
            x[i] = (float)i;
        CHECK_RC(fpe_quantize_int8(x, 300, 0, q, s), FPE_EINVAL);
        CHECK_RC(fpe_quantize_int8(x, 0, 0, q, s), FPE_EINVAL);
        CHECK_RC(fpe_dequantize_int8(q, s, 300, 0, x), FPE_EINVAL);
        size_t where[3] = {0, 257, 299};
        uint32_t bad[2] = {0x7fc00000u, 0xff800000u}; /* NaN, -Inf */
        for (int w = 0; w < 3; ++w)
            for (int b = 0; b < 2; ++b) {
                float keep = x[where[w]];
                x[where[w]] = f_of(bad[b]);
                CHECK_RC(fpe_quantize_int8(x, 300, 256, q, s), FPE_ENONFINITE);
                CHECK_RC(fpe_quantize_int8_stochastic(x, 300, 256, 7, q, s), FPE_ENONFINITE);
                x[where[w]] = keep;
            }
        /* non-finite scale: dequantize refuses before writing */
        float out[300];
        for (int i = 0; i < 300; ++i)
            out[i] = 42.0f, q[i] = 1;
        s[0] = 1.0f, s[1] = f_of(0x7fc00000u);
        CHECK_RC(fpe_dequantize_int8(q, s, 300, 256, out), FPE_ENONFINITE);
        int untouched = 1;
        for (int i = 0; i < 300; ++i)
            untouched &= out[i] == 42.0f;
        CHECK(untouched, "dequantize wrote before failing");
    }
}

static void test_uniform(void) {
    g_test = "uniform";
    /* Known answers: the first two outputs of the standard splitmix64 generator seeded with 0 are
     * 0xE220A8397B1DCDAF and 0x6E789E6AA1B965F4; fpe_uniform keeps the top 24 bits. */
    CHECK(fpe_uniform(0, 0) == (float)0xE220A8u / 16777216.0f, "uniform(0,0)=%.9g",
          fpe_uniform(0, 0));
    CHECK(fpe_uniform(0, 1) == (float)0x6E789Eu / 16777216.0f, "uniform(0,1)=%.9g",
          fpe_uniform(0, 1));
    double sum = 0.0;
    int in_range = 1;
    for (uint64_t i = 0; i < 100000; ++i) {
        float v = fpe_uniform(99, i);
        in_range &= v >= 0.0f && v < 1.0f;
        sum += v;
    }
    CHECK(in_range, "uniform outside [0,1)");
    CHECK(fabs(sum / 100000 - 0.5) < 0.01, "uniform mean %g", sum / 100000);
    /* stochastic rounding is unbiased: 0.3 * 127 averages to 38.1 */
    {
        enum { N = 20000 };
        static float x[N];
        static int8_t q[N];
        float s[N / 250];
        for (int i = 0; i < N; ++i)
            x[i] = (i % 250 == 0) ? 1.0f : 0.3f;
        CHECK_RC(fpe_quantize_int8_stochastic(x, N, 250, 5, q, s), FPE_OK);
        double m = 0;
        int cnt = 0, floor_or_ceil = 1;
        for (int i = 0; i < N; ++i)
            if (i % 250) {
                m += q[i], ++cnt;
                floor_or_ceil &= q[i] == 38 || q[i] == 39;
            }
        CHECK(floor_or_ceil, "stochastic q not floor/ceil");
        CHECK(fabs(m / cnt - 0.3 * 127) < 0.05, "stochastic mean %g", m / cnt);
    }
}

static void check_topk_case(const float *u, const float *r, size_t n, size_t k, const char *what) {
    float *s = falloc(n), *res = falloc(n), *val = falloc(k), *res2 = falloc(n), *val2 = falloc(k);
    uint32_t *idx = (uint32_t *)calloc(k + 1, 4), *idx2 = (uint32_t *)calloc(k + 1, 4);
    uint32_t *order = (uint32_t *)calloc(n + 1, 4);
    for (size_t i = 0; i < n; ++i)
        s[i] = u[i] + r[i], order[i] = (uint32_t)i;
    CHECK_RC(fpe_topk_ef(u, r, n, k, idx, val, res), FPE_OK);
    /* reference: full sort by (|s| desc, index asc), take k, sort indices */
    g_sort_keys = s;
    qsort(order, n, 4, cmp_topk);
    qsort(order, k, 4, cmp_u32);
    int ok_idx = k == 0 || memcmp(order, idx, k * 4) == 0;
    CHECK(ok_idx, "%s n=%zu k=%zu: indices differ from sort reference", what, n, k);
    int ok_val = 1, ascending = 1;
    for (size_t j = 0; j < k; ++j) {
        ok_val &= u_of(val[j]) == u_of(s[idx[j]]);
        if (j)
            ascending &= idx[j] > idx[j - 1];
    }
    CHECK(ok_val && ascending, "%s n=%zu k=%zu: values/ordering", what, n, k);
    /* error feedback conserves exactly: scatter(val) + residual == u + r, bit for bit */
    int selected_zero = 1;
    for (size_t j = 0; j < k; ++j) {
        selected_zero &= u_of(res[idx[j]]) == 0u;
        res[idx[j]] = val[j];
    }
    CHECK(selected_zero && bits_equal(res, s, n), "%s n=%zu k=%zu: EF conservation", what, n, k);
    for (size_t j = 0; j < k; ++j)
        res[idx[j]] = 0.0f;
    record(idx, k * 4);
    record(val, k * 4);
    record(res, n * 4);
    /* in place on r gives the same */
    memcpy(res2, r, n * 4);
    CHECK_RC(fpe_topk_ef(u, res2, n, k, idx2, val2, res2), FPE_OK);
    CHECK((k == 0 || memcmp(idx, idx2, k * 4) == 0) && bits_equal(val, val2, k) &&
              bits_equal(res, res2, n),
          "%s n=%zu k=%zu: in-place result differs", what, n, k);
    free(s), free(res), free(val), free(res2), free(val2), free(idx), free(idx2), free(order);
}

static void test_topk(void) {
    g_test = "topk_ef";
    for (size_t si = 0; si < NSIZES; ++si) {
        size_t n = SIZES[si];
        float *u = falloc(n), *r = falloc(n);
        size_t ks[6] = {0, 1, n / 100, n / 3, n > 0 ? n - 1 : 0, n};
        for (int mode = 0; mode < 5; ++mode) {
            rng_seed(n * 7 + (size_t)mode);
            for (size_t i = 0; i < n; ++i) {
                switch (mode) {
                case 0: /* smooth random */
                    u[i] = rng_normalish(), r[i] = 0.1f * rng_normalish();
                    break;
                case 1: /* heavy ties: few distinct magnitudes, both signs */
                    u[i] = (float)(int)(rng_next() % 5) * ((rng_next() & 1) ? 1.0f : -1.0f);
                    r[i] = 0.0f;
                    break;
                case 2: /* all equal magnitude */
                    u[i] = (i & 1) ? 0.75f : -0.75f, r[i] = 0.0f;
                    break;
                case 3: /* denormals and signed zeros */
                    u[i] = f_of((uint32_t)(rng_next() % 64) | ((rng_next() & 1) ? 0x80000000u : 0u));
                    r[i] = (i % 3 == 0) ? -0.0f : 0.0f;
                    break;
                default: /* mixed scales incl. huge (sum stays finite: r is small) */
                    fill_mixed(u + i, 1, rng_next());
                    u[i] *= 0.5f;
                    r[i] = 1e-3f * rng_normalish();
                    break;
                }
            }
            for (int ki = 0; ki < 6; ++ki) {
                static const char *names[] = {"random", "ties", "all-equal", "denormal", "mixed"};
                if (ks[ki] > n)
                    continue;
                check_topk_case(u, r, n, ks[ki], names[mode]);
            }
        }
        free(u), free(r);
    }
    /* Large n takes the sampled-threshold path (n >= 2^17). White-box layouts also force both of
     * its exact fallbacks: too many candidates for the buffer, and fewer candidates than k. The
     * sample is 64 runs of 512 elements starting at (n - 512) * run / 63. */
    {
        const size_t n = 300000;
        float *u = falloc(n), *r = falloc(n);
        for (int layout = 0; layout < 5; ++layout) {
            rng_seed(777 + (uint64_t)layout);
            for (size_t i = 0; i < n; ++i) {
                size_t run = i * 63 / (n - 512);
                int in_sample = 0;
                for (size_t q = run > 0 ? run - 1 : 0; q <= run + 1 && q < 64; ++q) {
                    size_t st = (n - 512) * q / 63;
                    in_sample |= i >= st && i < st + 512;
                }
                float noise = 1e-3f * rng_normalish();
                switch (layout) {
                case 0: /* smooth random: the sample guesses well */
                    u[i] = rng_normalish(), r[i] = 0.1f * rng_normalish();
                    break;
                case 1: /* big values hidden between the runs: sample too low -> overflow */
                    u[i] = in_sample ? noise : (i % 50 == 0 ? 100.0f + rng_unit() : noise), r[i] = 0;
                    break;
                case 2: /* big values only inside the runs: sample too high -> too few */
                    u[i] = in_sample ? 100.0f + rng_unit() : noise, r[i] = noise;
                    break;
                case 3: /* one magnitude everywhere: every element is a candidate */
                    u[i] = (i % 3) ? 2.0f : -2.0f, r[i] = 0.0f;
                    break;
                default: /* coarse ties */
                    u[i] = (float)(int)(rng_next() % 7) - 3.0f, r[i] = 0.0f;
                    break;
                }
            }
            static const size_t ks[] = {1, 10, 300, 3000, 30000};
            for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ++ki)
                check_topk_case(u, r, n, ks[ki], "large");
        }
        /* 2^21+ elements: streaming stores with a scalar head (misaligned output) and tail */
        {
            const size_t nh = ((size_t)1 << 21) + 13, kh = 2000;
            float *uh = falloc(nh), *rh = falloc(nh), *buf = falloc(nh + 1), *vh = falloc(kh),
                  *ref = falloc(nh), *vref = falloc(kh);
            uint32_t *ih = (uint32_t *)calloc(kh, 4), *iref = (uint32_t *)calloc(kh, 4);
            rng_seed(4242);
            for (size_t i = 0; i < nh; ++i)
                uh[i] = rng_normalish(), rh[i] = 0.01f * rng_normalish();
            check_topk_case(uh, rh, nh, kh, "huge");
            CHECK_RC(fpe_topk_ef(uh, rh, nh, kh, iref, vref, ref), FPE_OK);
            CHECK_RC(fpe_topk_ef(uh, rh, nh, kh, ih, vh, buf + 1), FPE_OK);
            CHECK(memcmp(ih, iref, kh * 4) == 0 && bits_equal(vh, vref, kh) &&
                      bits_equal(buf + 1, ref, nh),
                  "misaligned residual_out changes the result");
            free(uh), free(rh), free(buf), free(vh), free(ref), free(vref), free(ih), free(iref);
        }
        /* non-finite inside and outside the sampled runs; in place the residual survives */
        uint32_t *idx = (uint32_t *)calloc(3000, 4);
        float *val = falloc(3000), *out = falloc(n), *rcopy = falloc(n);
        size_t where[3] = {0, 5000, n - 1};
        memcpy(rcopy, r, n * 4);
        for (int w = 0; w < 3; ++w) {
            float keep = u[where[w]];
            u[where[w]] = f_of(0xff800000u);
            CHECK_RC(fpe_topk_ef(u, r, n, 3000, idx, val, out), FPE_ENONFINITE);
            CHECK_RC(fpe_topk_ef(u, r, n, 1, idx, val, out), FPE_ENONFINITE);
            static const size_t kin[4] = {0, 1, 3000, 150000};
            for (int ki = 0; ki < 4; ++ki) {
                CHECK_RC(fpe_topk_ef(u, r, n, kin[ki], idx, val, r), FPE_ENONFINITE);
                CHECK_RC(fpe_topk_ef(r, u, n, kin[ki] < 3000 ? kin[ki] : 3000, idx, val, r),
                         FPE_ENONFINITE);
            }
            CHECK(bits_equal(r, rcopy, n), "in-place top-k modified the residual before failing");
            u[where[w]] = keep;
        }
        free(u), free(r), free(idx), free(val), free(out), free(rcopy);
    }
    /* errors */
    {
        float u[40], r[40], v[40];
        uint32_t idx[40];
        for (int i = 0; i < 40; ++i)
            u[i] = (float)i, r[i] = 1.0f;
        CHECK_RC(fpe_topk_ef(u, r, 40, 41, idx, v, v), FPE_EINVAL);
        u[39] = f_of(0x7fc00000u);
        CHECK_RC(fpe_topk_ef(u, r, 40, 3, idx, v, v), FPE_ENONFINITE);
        u[39] = 3.0e38f, r[39] = 3.0e38f; /* finite inputs whose sum overflows */
        CHECK_RC(fpe_topk_ef(u, r, 40, 3, idx, v, v), FPE_ENONFINITE);
        CHECK_RC(fpe_topk_ef(u, r, 40, 3, idx, v, r), FPE_ENONFINITE); /* in place: r kept */
        CHECK(r[39] == 3.0e38f && r[0] == 1.0f, "in-place overflow modified r");
        CHECK_RC(fpe_topk_ef(u, r, 40, 0, idx, v, v), FPE_ENONFINITE);
        CHECK_RC(fpe_topk_ef(u, r, 40, 40, idx, v, v), FPE_ENONFINITE);
        /* u, r and the output all one buffer: s = 2u */
        for (int i = 0; i < 40; ++i)
            u[i] = (float)((i * 17) % 40) - 20.0f;
        CHECK_RC(fpe_topk_ef(u, u, 40, 2, idx, v, u), FPE_OK);
        /* |s| = 40 only at i = 0 (u = -20); |s| = 38 at i = 7 (u = 19) and i = 33 (u = -19) */
        CHECK(idx[0] == 0 && idx[1] == 7 && v[0] == -40.0f && v[1] == 38.0f,
              "aliased u=r=out: %u %u %g %g", idx[0], idx[1], v[0], v[1]);
    }
}

static void test_optim(void) {
    g_test = "optim";
    const size_t n = 1037;
    float *w = falloc(n), *g = falloc(n), *m = falloc(n), *v = falloc(n), *ref = falloc(n);
    double *dw = (double *)calloc(n, 8), *dm = (double *)calloc(n, 8), *dv = (double *)calloc(n, 8);
    for (int variant = 0; variant < 4; ++variant) {
        int prox = variant & 1, mom = variant & 2;
        float lr = 0.05f, mu = prox ? 0.3f : 0.0f, wd = 0.01f, beta = mom ? 0.9f : 0.0f;
        /* SGD: three steps against a double reference */
        rng_seed(100 + (uint64_t)variant);
        for (size_t i = 0; i < n; ++i)
            w[i] = rng_normalish(), ref[i] = 0.5f * rng_normalish(), m[i] = 0, dw[i] = w[i], dm[i] = 0;
        double worst = 0;
        for (int step = 0; step < 3; ++step) {
            for (size_t i = 0; i < n; ++i)
                g[i] = rng_normalish();
            CHECK_RC(fpe_sgd_step(w, g, m, prox ? ref : NULL, n, lr, beta, wd, mu), FPE_OK);
            for (size_t i = 0; i < n; ++i) {
                double ge = g[i] + (double)mu * (dw[i] - ref[i]);
                dw[i] *= 1.0 - (double)lr * wd;
                if (mom) {
                    dm[i] = beta * dm[i] + ge;
                    dw[i] -= (double)lr * dm[i];
                } else {
                    dw[i] -= (double)lr * ge;
                }
                double e = fabs(dw[i] - w[i]) / (fabs(dw[i]) + 1e-3);
                worst = e > worst ? e : worst;
            }
        }
        CHECK(worst < 1e-5, "sgd variant %d relative error %g", variant, worst);
        record(w, n * 4);
        record(m, n * 4);
        /* AdamW: three steps */
        for (size_t i = 0; i < n; ++i)
            w[i] = rng_normalish(), m[i] = v[i] = 0, dw[i] = w[i], dm[i] = dv[i] = 0;
        worst = 0;
        for (uint64_t step = 1; step <= 3; ++step) {
            for (size_t i = 0; i < n; ++i)
                g[i] = rng_normalish() * (i % 5 == 0 ? 1e-4f : 1.0f);
            CHECK_RC(fpe_adamw_step(w, g, m, v, prox ? ref : NULL, n, step, 1e-2f, 0.9f, 0.999f,
                                    1e-8f, wd, mu),
                     FPE_OK);
            double bc1 = 1 - pow(0.9f, (double)step), bc2 = 1 - pow(0.999f, (double)step);
            for (size_t i = 0; i < n; ++i) {
                double ge = g[i] + (double)mu * (dw[i] - ref[i]);
                dw[i] *= 1.0 - 1e-2f * (double)wd;
                dm[i] = 0.9f * dm[i] + (1 - (double)0.9f) * ge;
                dv[i] = 0.999f * dv[i] + (1 - (double)0.999f) * ge * ge;
                dw[i] -= 1e-2f * (dm[i] / bc1) / (sqrt(dv[i] / bc2) + 1e-8f);
                double e = fabs(dw[i] - w[i]) / (fabs(dw[i]) + 1e-3);
                worst = e > worst ? e : worst;
            }
        }
        CHECK(worst < 1e-5, "adamw variant %d relative error %g", variant, worst);
        record(w, n * 4);
        record(m, n * 4);
        record(v, n * 4);
    }
    /* hyper-parameter errors leave w untouched */
    memcpy(ref, w, n * 4);
    float nan = f_of(0x7fc00000u);
    CHECK_RC(fpe_sgd_step(w, g, m, NULL, n, -1.0f, 0, 0, 0), FPE_EINVAL);
    CHECK_RC(fpe_sgd_step(w, g, m, NULL, n, nan, 0, 0, 0), FPE_EINVAL);
    CHECK_RC(fpe_sgd_step(w, g, m, NULL, n, 0.1f, 0, 0, 0.5f), FPE_EINVAL); /* prox w/o w_ref */
    CHECK_RC(fpe_sgd_step(w, g, NULL, NULL, n, 0.1f, 0.9f, 0, 0), FPE_EINVAL); /* momentum w/o buf */
    CHECK_RC(fpe_adamw_step(w, g, m, v, NULL, n, 0, 0.1f, 0.9f, 0.999f, 1e-8f, 0, 0), FPE_EINVAL);
    CHECK_RC(fpe_adamw_step(w, g, m, v, NULL, n, 1, 0.1f, 1.0f, 0.999f, 1e-8f, 0, 0), FPE_EINVAL);
    CHECK_RC(fpe_adamw_step(w, g, m, v, NULL, n, 1, 0.1f, 0.9f, 0.999f, 0.0f, 0, 0), FPE_EINVAL);
    CHECK_RC(fpe_adamw_step(w, g, m, v, NULL, n, 1, 0.1f, 0.9f, 0.999f, 1e-8f, 0, 1.0f), FPE_EINVAL);
    CHECK(bits_equal(w, ref, n), "failed step modified w");
    /* momentum 0 accepts a NULL buffer; n = 0 is a no-op */
    CHECK_RC(fpe_sgd_step(w, g, NULL, NULL, n, 0.1f, 0.0f, 0, 0), FPE_OK);
    CHECK_RC(fpe_sgd_step(w, g, NULL, NULL, 0, 0.1f, 0.0f, 0, 0), FPE_OK);
    CHECK_RC(fpe_adamw_step(w, g, m, v, NULL, 0, 1, 0.1f, 0.9f, 0.999f, 1e-8f, 0, 0), FPE_OK);

    /* clipping */
    g_test = "clip";
    for (size_t si = 0; si < NSIZES; ++si) {
        size_t k = SIZES[si];
        double want = 0;
        for (size_t i = 0; i < k; ++i) {
            g[i % n] = 0.5f * rng_normalish();
            want += (double)g[i % n] * g[i % n];
        }
        size_t len = k < n ? k : n;
        want = 0;
        for (size_t i = 0; i < len; ++i)
            want += (double)g[i] * g[i];
        want = sqrt(want);
        memcpy(ref, g, len * 4);
        double norm = -1;
        CHECK_RC(fpe_clip_by_global_norm(g, len, 1.0f, &norm), FPE_OK);
        CHECK(fabs(norm - want) <= 1e-12 * (want + 1), "norm %g want %g", norm, want);
        int ok = 1;
        for (size_t i = 0; i < len; ++i)
            ok &= want > 1.0 ? g[i] == ref[i] * (float)(1.0 / norm) : g[i] == ref[i];
        CHECK(ok, "clip scaling (len %zu)", len);
        record(&norm, sizeof norm);
        record(g, len * 4);
    }
    {
        float gg[5] = {3, 4, 0, 0, 0};
        double norm;
        CHECK_RC(fpe_clip_by_global_norm(gg, 5, 0.0f, &norm), FPE_EINVAL);
        CHECK_RC(fpe_clip_by_global_norm(gg, 5, 1.0f, &norm), FPE_OK);
        CHECK(norm == 5.0 && gg[0] == 0.6f && gg[1] == 0.8f, "clip 3-4-5: %g %g %g", norm, gg[0], gg[1]);
        gg[4] = f_of(0x7f800000u);
        CHECK_RC(fpe_clip_by_global_norm(gg, 5, 1.0f, &norm), FPE_ENONFINITE);
        CHECK(gg[0] == 0.6f && gg[1] == 0.8f, "non-finite clip touched g");
    }
    free(w), free(g), free(m), free(v), free(ref), free(dw), free(dm), free(dv);
}

static void test_accumulate(void) {
    g_test = "accumulate";
    for (size_t si = 0; si < NSIZES; ++si) {
        size_t n = SIZES[si];
        float *acc = falloc(n), *want = falloc(n), *x = falloc(n);
        int8_t *q = (int8_t *)calloc(n + 1, 1);
        fill_mixed(x, n, 3 + n);
        rng_seed(n);
        for (size_t i = 0; i < n; ++i) {
            x[i] = x[i] > 1e20f || x[i] < -1e20f ? 1.0f : x[i]; /* keep sums finite */
            acc[i] = want[i] = rng_normalish();
            q[i] = (int8_t)(rng_next() % 255 - 127);
        }
        /* axpy */
        CHECK_RC(fpe_axpy(acc, x, n, 0.37f), FPE_OK);
        for (size_t i = 0; i < n; ++i)
            want[i] = want[i] + 0.37f * x[i];
        CHECK(bits_equal(acc, want, n), "axpy n=%zu", n);
        record(acc, n * 4);
        /* dequant_accumulate */
        for (size_t bi = 0; bi < NBLOCKS; ++bi) {
            size_t block = BLOCKS[bi], nb = n / block + (n % block != 0);
            float *sc = falloc(nb);
            for (size_t b = 0; b < nb; ++b)
                sc[b] = (b % 7 == 0) ? 0.0f : 1e-3f * (float)(b + 1);
            CHECK_RC(fpe_dequant_accumulate(acc, q, sc, n, block, -0.25f), FPE_OK);
            for (size_t i = 0; i < n; ++i)
                want[i] = want[i] + -0.25f * ((float)q[i] * sc[i / block]);
            CHECK(bits_equal(acc, want, n), "dequant_accumulate n=%zu block=%zu", n, block);
            record(acc, n * 4);
            /* sparse variant over every third index */
            size_t nnz = 0;
            uint32_t *idx = (uint32_t *)calloc(n + 1, 4);
            for (size_t i = 0; i < n; i += 3)
                idx[nnz++] = (uint32_t)i;
            size_t nbs = nnz / block + (nnz % block != 0);
            CHECK_RC(fpe_sparse_dequant_accumulate(acc, n, idx, q, sc, nnz, block, 2.0f), FPE_OK);
            (void)nbs;
            for (size_t j = 0; j < nnz; ++j)
                want[idx[j]] = want[idx[j]] + 2.0f * ((float)q[j] * sc[j / block]);
            CHECK(bits_equal(acc, want, n), "sparse_dequant_accumulate n=%zu block=%zu", n, block);
            /* scatter_add */
            CHECK_RC(fpe_scatter_add(acc, n, idx, x, nnz, 0.5f), FPE_OK);
            for (size_t j = 0; j < nnz; ++j)
                want[idx[j]] = want[idx[j]] + 0.5f * x[j];
            CHECK(bits_equal(acc, want, n), "scatter_add n=%zu", n);
            record(acc, n * 4);
            free(sc), free(idx);
        }
        /* l2 norm and all_finite */
        double norm = -1, dn = 0;
        for (size_t i = 0; i < n; ++i)
            dn += (double)acc[i] * acc[i];
        CHECK_RC(fpe_l2_norm(acc, n, &norm), FPE_OK);
        CHECK(fabs(norm - sqrt(dn)) <= 1e-12 * sqrt(dn) + 1e-300, "l2 n=%zu %g vs %g", n, norm, sqrt(dn));
        record(&norm, sizeof norm);
        int fin = -1;
        CHECK_RC(fpe_all_finite(acc, n, &fin), FPE_OK);
        CHECK(fin == 1, "all_finite on finite data");
        if (n > 0) {
            uint32_t bad[4] = {0x7fc00000u, 0xffc00001u, 0x7f800000u, 0xff800000u};
            size_t where[3] = {0, n / 2, n - 1};
            for (int b = 0; b < 4; ++b)
                for (int w = 0; w < 3; ++w) {
                    float keep = acc[where[w]];
                    acc[where[w]] = f_of(bad[b]);
                    CHECK_RC(fpe_all_finite(acc, n, &fin), FPE_OK);
                    CHECK(fin == 0, "all_finite missed %08x at %zu of %zu", bad[b], where[w], n);
                    CHECK_RC(fpe_l2_norm(acc, n, &norm), FPE_OK);
                    CHECK(!isfinite(norm), "l2 of non-finite data should be non-finite");
                    acc[where[w]] = keep;
                }
            float big = f_of(0x7f7fffffu), den = f_of(1u); /* FLT_MAX and a denormal are finite */
            float keep = acc[0];
            acc[0] = big, acc[n - 1] = den;
            CHECK_RC(fpe_all_finite(acc, n, &fin), FPE_OK);
            CHECK(fin == 1, "FLT_MAX / denormal reported non-finite");
            acc[0] = keep;
        }
        free(acc), free(want), free(x), free(q);
    }
    /* validation failures leave acc untouched */
    {
        float acc[10], copy[10], val[4] = {1, 2, 3, 4}, sc[1] = {1.0f};
        int8_t q[4] = {1, 2, 3, 4};
        for (int i = 0; i < 10; ++i)
            acc[i] = copy[i] = (float)i;
        uint32_t bad_sets[4][4] = {{0, 3, 5, 10}, {0, 3, 3, 4}, {0, 5, 4, 6}, {9, 1, 2, 3}};
        for (int b = 0; b < 4; ++b) {
            CHECK_RC(fpe_scatter_add(acc, 10, bad_sets[b], val, 4, 1.0f), FPE_EINDEX);
            CHECK_RC(fpe_sparse_dequant_accumulate(acc, 10, bad_sets[b], q, sc, 4, 4, 1.0f), FPE_EINDEX);
        }
        uint32_t good[4] = {0, 2, 4, 9};
        float nanv = f_of(0x7fc00000u);
        val[3] = nanv;
        CHECK_RC(fpe_scatter_add(acc, 10, good, val, 4, 1.0f), FPE_ENONFINITE);
        CHECK_RC(fpe_scatter_add(acc, 10, good, val, 0, nanv), FPE_EINVAL);
        CHECK_RC(fpe_axpy(acc, copy, 10, nanv), FPE_EINVAL);
        sc[0] = nanv;
        CHECK_RC(fpe_sparse_dequant_accumulate(acc, 10, good, q, sc, 4, 4, 1.0f), FPE_ENONFINITE);
        CHECK_RC(fpe_dequant_accumulate(acc, q, sc, 4, 4, 1.0f), FPE_ENONFINITE);
        CHECK_RC(fpe_dequant_accumulate(acc, q, sc, 4, 0, 1.0f), FPE_EINVAL);
        CHECK(bits_equal(acc, copy, 10), "failed accumulate touched acc");
        /* nnz = 0 and n = 0 are no-ops */
        CHECK_RC(fpe_scatter_add(acc, 10, good, val, 0, 1.0f), FPE_OK);
        CHECK_RC(fpe_axpy(acc, copy, 0, 1.0f), FPE_OK);
        CHECK(bits_equal(acc, copy, 10), "no-op accumulate touched acc");
    }
}

static void test_dispatch(void) {
    g_test = "dispatch";
    CHECK(fpe_path_supported(fpe_cpu_path()), "current path unsupported");
    CHECK(fpe_set_cpu_path(99) == FPE_EINVAL, "bogus path accepted");
    CHECK(fpe_set_cpu_path(-1) == FPE_EINVAL, "bogus path accepted");
    CHECK(strcmp(fpe_strerror(FPE_EINDEX), fpe_strerror(12345)) != 0, "strerror");
    CHECK(fpe_strerror(-999) != NULL, "strerror NULL");
}

int main(void) {
    static const int paths[] = {FPE_PATH_BASELINE, FPE_PATH_NEON, FPE_PATH_SSE41, FPE_PATH_AVX2};
    static const char *names[] = {"baseline", "neon", "sse4.1", "avx2"};
    int first = 1, npaths = 0;
    int best = fpe_init(0);
    int forced = fpe_init(1);
    printf("fpe_init: best path %d, forced baseline -> %d\n", best, forced);
    for (int p = 0; p < 4; ++p) {
        if (!fpe_path_supported(paths[p]))
            continue;
        fpe_set_cpu_path(paths[p]);
        g_path = paths[p];
        g_recording = first;
        g_rec_n = 0;
        int before = g_failed;
        test_dispatch();
        test_uniform();
        test_quantize();
        test_topk();
        test_optim();
        test_accumulate();
        printf("path %-8s: %d records %s, %d failures\n", names[p], g_rec_n,
               first ? "recorded" : "compared with the first path", g_failed - before);
        first = 0;
        ++npaths;
    }
    for (int i = 0; i < MAX_RECORDS; ++i)
        free(g_rec[i]);
    printf("C core: %d passed, %d failed (%d CPU paths)\n", g_passed, g_failed, npaths);
    return g_failed == 0 && npaths > 0 ? 0 : 1;
}
