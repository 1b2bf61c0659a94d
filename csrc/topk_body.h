/* Hot loops of topk.c, included once per CPU target with FPE_FN(name) and FPE_TARGET defined.
 * Keys are |s| bit patterns (sign cleared): for non-negative floats, integer order == value order. */

#define FPE_TOPK_CHUNK 2048

/* Histogram the top 11 key bits of s[0..len) into two interleaved tables (halves the store-to-load
 * chains when neighbours share a bucket). */
static FPE_TARGET void FPE_FN(hist_chunk)(const float *restrict s, size_t len,
                                          uint32_t *restrict hist) {
    size_t i = 0;
    for (; i + 2 <= len; i += 2) {
        hist[(fpe__f2u(s[i]) & FPE_ABS_MASK) >> 20]++;
        hist[2048 + ((fpe__f2u(s[i + 1]) & FPE_ABS_MASK) >> 20)]++;
    }
    if (i < len)
        hist[(fpe__f2u(s[i]) & FPE_ABS_MASK) >> 20]++;
}

/* s = u + r, histogram of |s| top bits; returns the OR of non-finite terms (flag bit 31). */
static FPE_TARGET uint32_t FPE_FN(sum_hist)(const float *restrict u, const float *restrict r,
                                            float *restrict s, size_t n, uint32_t *restrict hist) {
    uint32_t bad = 0;
    for (size_t start = 0; start < n; start += FPE_TOPK_CHUNK) {
        size_t len = fpe__min(FPE_TOPK_CHUNK, n - start);
        const float *uc = u + start, *rc = r + start;
        float *sc = s + start;
        for (size_t i = 0; i < len; ++i) {
            float v = uc[i] + rc[i];
            sc[i] = v;
            bad |= FPE_NONFINITE_TERM(fpe__f2u(v));
        }
        if (hist != NULL)
            FPE_FN(hist_chunk)(sc, len, hist);
    }
    return bad;
}

/* Same with s aliasing one operand: s = u + s (float addition is commutative, so the bits match). */
static FPE_TARGET uint32_t FPE_FN(sum_hist_inplace)(const float *restrict u, float *restrict s,
                                                    size_t n, uint32_t *restrict hist) {
    uint32_t bad = 0;
    for (size_t start = 0; start < n; start += FPE_TOPK_CHUNK) {
        size_t len = fpe__min(FPE_TOPK_CHUNK, n - start);
        const float *uc = u + start;
        float *sc = s + start;
        for (size_t i = 0; i < len; ++i) {
            float v = uc[i] + sc[i];
            sc[i] = v;
            bad |= FPE_NONFINITE_TERM(fpe__f2u(v));
        }
        if (hist != NULL)
            FPE_FN(hist_chunk)(sc, len, hist);
    }
    return bad;
}

/* One pass over s: indices with key >= (tb + 1) << 20 go to above[] (all of them are selected),
 * indices with key in bucket tb go to cand[]. Runs of 16 with no key >= tb << 20 are skipped after a
 * vectorised test, so the branchy part only sees the few interesting runs. Returns the count
 * written to cand (the caller knows both counts from the histogram). */
static FPE_TARGET void FPE_FN(collect)(const float *restrict s, size_t n, uint32_t tb,
                                       uint32_t *restrict above, uint32_t *restrict cand) {
    const uint32_t lo = tb << 20;
    size_t na = 0, nc = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        uint32_t any = 0;
        for (size_t j = 0; j < 16; ++j)
            any |= (fpe__f2u(s[i + j]) & FPE_ABS_MASK) >= lo;
        if (!any)
            continue;
        for (size_t j = i; j < i + 16; ++j) {
            uint32_t b = (fpe__f2u(s[j]) & FPE_ABS_MASK) >> 20;
            if (b > tb)
                above[na++] = (uint32_t)j;
            else if (b == tb)
                cand[nc++] = (uint32_t)j;
        }
    }
    for (; i < n; ++i) {
        uint32_t b = (fpe__f2u(s[i]) & FPE_ABS_MASK) >> 20;
        if (b > tb)
            above[na++] = (uint32_t)i;
        else if (b == tb)
            cand[nc++] = (uint32_t)i;
    }
}
