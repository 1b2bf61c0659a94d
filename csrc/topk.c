/* Top-k selection by magnitude with error feedback: expected O(n) radix select on |s| bits. */
#include "fpe_internal.h"

#include <stdlib.h>

#define FPE_FN(name) name##_base
#define FPE_TARGET
#include "topk_body.h"
#undef FPE_FN
#undef FPE_TARGET

#if FPE_X86_DISPATCH
#define FPE_FN(name) name##_sse41
#define FPE_TARGET __attribute__((target("sse4.1")))
#include "topk_body.h"
#undef FPE_FN
#undef FPE_TARGET

#define FPE_FN(name) name##_avx2
#define FPE_TARGET __attribute__((target("avx2")))
#include "topk_body.h"
#undef FPE_FN
#undef FPE_TARGET
#endif

static inline uint32_t key_of(const float *s, uint32_t i) { return fpe__f2u(s[i]) & FPE_ABS_MASK; }

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

int fpe_topk_ef(const float *u, const float *r, size_t n, size_t k, uint32_t *idx, float *val,
                float *residual_out) {
    if (k > n || (uint64_t)n > UINT64_C(0xFFFFFFFF))
        return FPE_EINVAL;
    float *s = residual_out;
    uint32_t *hist = NULL;
    /* Two interleaved 2048-bucket tables of the top 11 key bits (exponent + 3 mantissa bits). */
    uint32_t hist2[2 * 2048];
    const int need_hist = k > 0 && k < n;
    if (need_hist) {
        memset(hist2, 0, sizeof hist2);
        hist = hist2;
    }
    uint32_t bad;
    if (s == r && s == u) {
        /* Degenerate call with one buffer for all three: s = s + s, then histogram. */
        bad = 0;
        for (size_t i = 0; i < n; ++i) {
            s[i] = s[i] + s[i];
            bad |= FPE_NONFINITE_TERM(fpe__f2u(s[i]));
        }
        if (hist != NULL)
            FPE_DISPATCH_VOID(hist_chunk, (s, n, hist));
    } else if (s == r)
        bad = FPE_DISPATCH(sum_hist_inplace, (u, s, n, hist));
    else if (s == u)
        bad = FPE_DISPATCH(sum_hist_inplace, (r, s, n, hist));
    else
        bad = FPE_DISPATCH(sum_hist, (u, r, s, n, hist));
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

    /* Level 1: bucket tb of the top 11 bits. */
    for (size_t b = 0; b < 2048; ++b)
        hist2[b] += hist2[2048 + b];
    size_t n_above;
    const uint32_t tb = threshold_bucket(hist2, 2048, k, &n_above);
    const size_t n_cand = hist2[tb];
    uint32_t *cand = (uint32_t *)malloc(n_cand * sizeof *cand);
    if (cand == NULL)
        return FPE_ENOMEM;
    FPE_DISPATCH_VOID(collect, (s, n, tb, idx, cand));

    /* Levels 2 and 3 refine the exact threshold key T among the candidates: next 11 bits, then
     * the last 9. need = how many candidates are selected in total. */
    const size_t need = k - n_above;
    uint32_t h[2048];
    memset(h, 0, sizeof h);
    for (size_t j = 0; j < n_cand; ++j)
        h[(key_of(s, cand[j]) >> 9) & 0x7ffu]++;
    size_t above2;
    const uint32_t tb2 = threshold_bucket(h, 2048, need, &above2);
    const uint32_t prefix2 = (tb << 11) | tb2; /* == key >> 9 for keys in that bucket */
    memset(h, 0, sizeof h);
    for (size_t j = 0; j < n_cand; ++j) {
        uint32_t key = key_of(s, cand[j]);
        if ((key >> 9) == prefix2)
            h[key & 0x1ffu]++;
    }
    size_t above3;
    const uint32_t tb3 = threshold_bucket(h, 512, need - above2, &above3);
    const uint32_t T = (prefix2 << 9) | tb3;
    size_t ties = need - above2 - above3; /* >= 1 keys equal to T, lowest indices first */

    /* Keep the selected candidates (key > T, or the first `ties` keys == T), compacting in place. */
    size_t nsel = 0;
    for (size_t j = 0; j < n_cand; ++j) {
        uint32_t key = key_of(s, cand[j]);
        if (key > T || (key == T && ties > 0)) {
            if (key == T)
                --ties;
            cand[nsel++] = cand[j];
        }
    }
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
