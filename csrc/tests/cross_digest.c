/* Cross-architecture bit-identity check for the fedpeft_edge C core.
 *
 * Runs every public kernel on fixed pseudo-random inputs and prints one FNV-1a 64 digest of all
 * output bytes and return codes per CPU path, then "digest <hex>" when every path agrees. The
 * Makefile's test-<arch> targets compare that line with the one this machine prints: sites on
 * different CPUs must produce the same update bits from the same inputs. No libm calls here, so
 * the inputs themselves are identical everywhere. */
#include "fedpeft_core.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t g_hash;
static uint64_t g_rng;
static int g_huge; /* 0: the ~1e22 kind becomes an O(1) value (optimiser inputs) */

static void mix(const void *p, size_t len) {
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < len; ++i) {
        g_hash ^= b[i];
        g_hash *= UINT64_C(0x100000001B3);
    }
}

static int g_bad_rc; /* every call here has valid, finite inputs: any error code is a failure */

static void mix_rc(int rc) {
    if (rc != FPE_OK) {
        fprintf(stderr, "unexpected return code %d (%s)\n", rc, fpe_strerror(rc));
        ++g_bad_rc;
    }
    int32_t v = (int32_t)rc;
    mix(&v, sizeof v);
}

static uint32_t next_u32(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 32);
}

/* Finite floats over a wide range: mostly O(1) values, some tiny (down to subnormals), some huge,
 * exact zeros and repeated magnitudes (ties for top-k). */
static float next_float(void) {
    uint32_t r = next_u32();
    uint32_t kind = r % 64u;
    uint32_t bits;
    if (kind == 0)
        return 0.0f;
    if (kind == 1)
        return (r & 64u) ? 0.5f : -0.5f;
    if (kind == 2)
        bits = next_u32() & 0x807fffffu; /* subnormal */
    else if (kind == 3 && g_huge)
        bits = (next_u32() & 0x80ffffffu) | (200u << 23); /* ~1e22 */
    else
        bits = (next_u32() & 0x807fffffu) | ((120u + r % 12u) << 23); /* ~[2^-7, 2^5) */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float *fill(size_t n) {
    float *p = (float *)malloc((n ? n : 1) * sizeof *p);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    for (size_t i = 0; i < n; ++i)
        p[i] = next_float();
    return p;
}

/* Sizes: small tails, one below and one above topk's sampling threshold (2^17). */
static const size_t SIZES[] = {1, 7, 33, 1000, 4099, 140003};
#define NSIZES (sizeof SIZES / sizeof SIZES[0])

static void run_all(void) {
    for (size_t si = 0; si < NSIZES; ++si) {
        size_t n = SIZES[si];
        size_t block = n < 256 ? 4 : 256, nb = n / block + (n % block != 0);
        g_rng = UINT64_C(0x9E3779B97F4A7C15) ^ (uint64_t)n;
        g_huge = 1;
        float *x = fill(n), *y = fill(n);
        g_huge = 0;
        float *w = fill(n), *g = fill(n), *m = fill(n), *v = fill(n), *ref = fill(n);
        float *sc = fill(nb), *out = fill(n);
        int8_t *q = (int8_t *)malloc(n);
        uint32_t *idx = (uint32_t *)malloc(n * sizeof *idx);
        if (!q || !idx)
            exit(2);
        for (size_t i = 0; i < n; ++i) {
            g[i] *= 1e-3f; /* keep optimiser states finite */
            v[i] = v[i] < 0 ? -v[i] : v[i];
        }

        mix_rc(fpe_quantize_int8(x, n, block, q, sc));
        mix(q, n), mix(sc, nb * 4);
        mix_rc(fpe_dequantize_int8(q, sc, n, block, out));
        mix(out, n * 4);
        mix_rc(fpe_quantize_int8_stochastic(x, n, block, 42u + n, q, sc));
        mix(q, n), mix(sc, nb * 4);
        float u = fpe_uniform(7u, n);
        mix(&u, 4);

        size_t k = n / 10 + 1;
        memcpy(out, y, n * 4);
        mix_rc(fpe_topk_ef(x, y, n, k, idx, w, out));
        mix(idx, k * 4), mix(w, k * 4), mix(out, n * 4);
        mix_rc(fpe_topk_ef(x, out, n, k, idx, w, out)); /* in place */
        mix(idx, k * 4), mix(w, k * 4), mix(out, n * 4);

        memcpy(w, ref, n * 4);
        for (size_t i = 0; i < n; ++i)
            w[i] += 0.5f;
        mix_rc(fpe_sgd_step(w, g, m, ref, n, 0.05f, 0.9f, 0.01f, 0.1f));
        mix(w, n * 4), mix(m, n * 4);
        mix_rc(fpe_adamw_step(w, g, m, v, ref, n, 3, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 0.05f));
        mix(w, n * 4), mix(m, n * 4), mix(v, n * 4);
        double norm = 0;
        memcpy(out, g, n * 4);
        mix_rc(fpe_clip_by_global_norm(out, n, 0.5f, &norm));
        mix(&norm, 8), mix(out, n * 4);
        mix_rc(fpe_l2_norm(x, n, &norm));
        mix(&norm, 8);
        int finite = -1;
        mix_rc(fpe_all_finite(x, n, &finite));
        mix(&finite, sizeof finite);

        memcpy(out, y, n * 4);
        mix_rc(fpe_axpy(out, g, n, 0.37f));
        mix_rc(fpe_dequant_accumulate(out, q, sc, n, block, -0.25f));
        size_t nnz = 0;
        for (size_t i = 0; i < n; i += 3)
            idx[nnz++] = (uint32_t)i;
        mix_rc(fpe_sparse_dequant_accumulate(out, n, idx, q, sc, nnz, block, 2.0f));
        mix_rc(fpe_scatter_add(out, n, idx, g, nnz, 0.5f));
        mix(out, n * 4);

        free(x), free(y), free(w), free(g), free(m), free(v), free(ref), free(sc), free(out), free(q), free(idx);
    }
}

int main(void) {
    static const int paths[] = {FPE_PATH_BASELINE, FPE_PATH_NEON, FPE_PATH_SSE41, FPE_PATH_AVX2};
    uint64_t first = 0;
    int npaths = 0, agree = 1;
    for (int p = 0; p < 4; ++p) {
        if (fpe_set_cpu_path(paths[p]) != FPE_OK)
            continue;
        g_hash = UINT64_C(0xCBF29CE484222325);
        run_all();
        printf("path %d: %016llx\n", paths[p], (unsigned long long)g_hash);
        if (npaths++ == 0)
            first = g_hash;
        else if (g_hash != first)
            agree = 0;
    }
    if (g_bad_rc) {
        printf("digest FAILED: %d unexpected return codes\n", g_bad_rc);
        return 1;
    }
    if (!npaths || !agree) {
        printf("digest MISMATCH between CPU paths\n");
        return 1;
    }
    printf("digest %016llx\n", (unsigned long long)first);
    return 0;
}
