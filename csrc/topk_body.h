/* Hot loops of topk.c, included once per CPU target with FPE_FN(name) and FPE_TARGET defined.
 * Keys are |s| bit patterns (sign cleared): for non-negative floats, integer order == value order. */

#define FPE_TOPK_CHUNK 2048

/* s[0..len) = u + r; returns the OR of non-finite terms (flag bit 31). */
static FPE_TARGET uint32_t FPE_FN(sum_chunk)(const float *restrict u, const float *restrict r,
                                             float *restrict s, size_t len) {
    uint32_t bad = 0;
    for (size_t i = 0; i < len; ++i) {
        float v = u[i] + r[i];
        s[i] = v;
        bad |= FPE_NONFINITE_TERM(fpe__f2u(v));
    }
    return bad;
}

/* s = u + s, for s aliasing one operand (float addition is commutative, so the bits match). */
static FPE_TARGET uint32_t FPE_FN(sum_chunk_inplace)(const float *restrict u, float *restrict s,
                                                     size_t len) {
    uint32_t bad = 0;
    for (size_t i = 0; i < len; ++i) {
        float v = u[i] + s[i];
        s[i] = v;
        bad |= FPE_NONFINITE_TERM(fpe__f2u(v));
    }
    return bad;
}

/* Non-finite flags of u + r without storing anything (the in-place pre-check); stops at the first
 * chunk holding NaN/Inf. */
static FPE_TARGET uint32_t FPE_FN(sum_bad)(const float *restrict u, const float *restrict r,
                                           size_t n) {
    uint32_t bad = 0;
    for (size_t start = 0; start < n && !(bad & FPE_NONFINITE_FLAG); start += FPE_TOPK_CHUNK) {
        size_t len = fpe__min(FPE_TOPK_CHUNK, n - start);
        const float *uc = u + start, *rc = r + start;
        for (size_t i = 0; i < len; ++i)
            bad |= FPE_NONFINITE_TERM(fpe__f2u(uc[i] + rc[i]));
    }
    return bad;
}

/* Histogram the top 11 key bits of s[0..len) into four interleaved tables (hist[4][2048]): ties
 * and crowded buckets would otherwise chain every increment on the one before. */
static FPE_TARGET void FPE_FN(hist_chunk)(const float *restrict s, size_t len,
                                          uint32_t *restrict hist) {
    size_t i = 0;
    for (; i + 4 <= len; i += 4)
        for (size_t t = 0; t < 4; ++t)
            hist[t * 2048 + ((fpe__f2u(s[i + t]) & FPE_ABS_MASK) >> 20)]++;
    for (; i < len; ++i)
        hist[(fpe__f2u(s[i]) & FPE_ABS_MASK) >> 20]++;
}

/* Refinement histogram over all of s: for keys with (key >> shift) == match, count digit
 * (key >> dshift) & dmask into hist[4][2048]. Branch-free: every element adds its match bit
 * (0 or 1) to its digit's bucket, so mixed data costs no mispredictions. */
static FPE_TARGET void FPE_FN(hist_level)(const float *restrict s, size_t n, unsigned shift,
                                          uint32_t match, unsigned dshift, uint32_t dmask,
                                          uint32_t *restrict hist) {
    /* keys with the prefix form one range [lo, hi]; runs of 16 without one are skipped after a
     * vectorised test (signed compares: keys < 2^31) */
    const int32_t lo = (int32_t)(match << shift), hi = (int32_t)(((match + 1u) << shift) - 1u);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        uint32_t any = 0;
        for (size_t j = 0; j < 16; ++j) {
            int32_t key = (int32_t)(fpe__f2u(s[i + j]) & FPE_ABS_MASK);
            any |= (uint32_t)(key >= lo) & (uint32_t)(key <= hi);
        }
        if (!any)
            continue;
        for (size_t j = 0; j < 16; j += 4)
            for (size_t t = 0; t < 4; ++t) {
                uint32_t key = fpe__f2u(s[i + j + t]) & FPE_ABS_MASK;
                hist[t * 2048 + ((key >> dshift) & dmask)] += (key >> shift) == match;
            }
    }
    for (; i < n; ++i) {
        uint32_t key = fpe__f2u(s[i]) & FPE_ABS_MASK;
        hist[(key >> dshift) & dmask] += (key >> shift) == match;
    }
}

/* Final pass of the general path: select key > T, plus the first `ties` keys == T in index order;
 * write idx/val in ascending order and zero the selected entries of s. Branch-free except for
 * stopping once all k are found (none can follow). Requires 1 <= k. */
static FPE_TARGET void FPE_FN(select_pass)(float *restrict s, size_t n, size_t k, uint32_t T,
                                           size_t ties, uint32_t *restrict idx,
                                           float *restrict val) {
    size_t o = 0;
    for (size_t i = 0; i < n; ++i) {
        float v = s[i];
        uint32_t key = fpe__f2u(v) & FPE_ABS_MASK;
        size_t eq = key == T;
        size_t sel = (size_t)(key > T) | (eq & (ties > 0));
        ties -= eq & sel;
        idx[o] = (uint32_t)i; /* o < k here: overwritten unless selected */
        val[o] = v;
        s[i] = fpe__u2f(fpe__f2u(v) & (uint32_t)(sel - 1)); /* +0 when selected, no branch */
        o += sel;
        if (o == k)
            break;
    }
}

/* s = u + r (r == NULL: s = u + s in place) with an optional histogram of s. Returns the
 * non-finite flags. */
static FPE_TARGET uint32_t FPE_FN(sum_hist)(const float *u, const float *r, float *s, size_t n,
                                            uint32_t *restrict hist) {
    uint32_t bad = 0;
    for (size_t start = 0; start < n; start += FPE_TOPK_CHUNK) {
        size_t len = fpe__min(FPE_TOPK_CHUNK, n - start);
        bad |= r != NULL ? FPE_FN(sum_chunk)(u + start, r + start, s + start, len)
                         : FPE_FN(sum_chunk_inplace)(u + start, s + start, len);
        if (hist != NULL)
            FPE_FN(hist_chunk)(s + start, len, hist);
    }
    return bad;
}

/* s = u + r (r == NULL: s = u + s in place) while appending every (index, bits of s) with
 * key >= lo to the candidate lists. Returns the candidate count, or cap + 1 once the lists
 * overflow (s is still completed then); *bad_out gets the non-finite flags.
 *
 * On x86 the loop is written with SSE2 / AVX2 intrinsics: one pass adds, stores, checks finiteness
 * and builds a 16-bit mask of candidates per 16 elements, so the scalar append only visits the
 * hits (movemask + count-trailing-zeros has no portable C spelling the vectoriser would find).
 * The add is the same IEEE single add on every path, so the bits match the portable loop. */
#if FPE_TOPK_SIMD == 8 || FPE_TOPK_SIMD == 4
#if FPE_TOPK_SIMD == 8
#define FPE_VF __m256
#define FPE_VI __m256i
#define FPE_V_ADD _mm256_add_ps
#define FPE_V_LOAD _mm256_loadu_ps
#define FPE_V_AND _mm256_and_si256
#define FPE_V_OR _mm256_or_si256
#define FPE_V_ADDI _mm256_add_epi32
#define FPE_V_CMPGT _mm256_cmpgt_epi32
#define FPE_V_SET1 _mm256_set1_epi32
#define FPE_V_ZERO _mm256_setzero_si256
#define FPE_V_F2I _mm256_castps_si256
#define FPE_V_I2F _mm256_castsi256_ps
#define FPE_V_MASK _mm256_movemask_ps
#define FPE_V_STOREI(p, v) _mm256_storeu_si256((__m256i *)(p), v)
#define FPE_V_STOREU _mm256_storeu_ps
#else
#define FPE_VF __m128
#define FPE_VI __m128i
#define FPE_V_ADD _mm_add_ps
#define FPE_V_LOAD _mm_loadu_ps
#define FPE_V_AND _mm_and_si128
#define FPE_V_OR _mm_or_si128
#define FPE_V_ADDI _mm_add_epi32
#define FPE_V_CMPGT _mm_cmpgt_epi32
#define FPE_V_SET1 _mm_set1_epi32
#define FPE_V_ZERO _mm_setzero_si128
#define FPE_V_F2I _mm_castps_si128
#define FPE_V_I2F _mm_castsi128_ps
#define FPE_V_MASK _mm_movemask_ps
#define FPE_V_STOREI(p, v) _mm_storeu_si128((__m128i *)(p), v)
#define FPE_V_STOREU _mm_storeu_ps
#endif

/* One group of 16 elements at i: add, store with STORE, finiteness, candidate mask, append. */
#define FPE_TOPK_GROUP(STORE)                                                                  \
    do {                                                                                       \
        unsigned mask = 0;                                                                     \
        FPE_VF av[16 / FPE_TOPK_SIMD];                                                         \
        for (size_t v = 0; v < 16 / FPE_TOPK_SIMD; ++v) {                                      \
            const size_t o = i + v * FPE_TOPK_SIMD;                                            \
            FPE_VF a = FPE_V_ADD(FPE_V_LOAD(u + o), FPE_V_LOAD(rr + o));                       \
            av[v] = a;                                                                         \
            STORE(s + o, a);                                                                   \
            FPE_VI key = FPE_V_AND(FPE_V_F2I(a), absm);                                        \
            badv = FPE_V_OR(badv, FPE_V_ADDI(key, fin));                                       \
            mask |= (unsigned)FPE_V_MASK(FPE_V_I2F(FPE_V_CMPGT(key, lom1)))                    \
                    << (v * FPE_TOPK_SIMD);                                                    \
        }                                                                                      \
        if (mask == 0 || full)                                                                 \
            break;                                                                             \
        FPE_TOPK_APPEND();                                                                     \
    } while (0)

#if FPE_TOPK_SIMD == 8
/* Branch-free append of a group: permute the selected lanes to the front (table lookup on each
 * 8-bit mask) and store whole vectors; the buffers have 16 entries of slack past cap. */
#define FPE_TOPK_APPEND()                                                                      \
    do {                                                                                       \
        for (size_t v = 0; v < 2; ++v) {                                                       \
            unsigned m8 = (mask >> (8 * v)) & 0xffu;                                           \
            __m256i perm = _mm256_cvtepu8_epi32(                                               \
                _mm_loadl_epi64((const __m128i *)&fpe__compact_lut[m8]));                      \
            __m256i iv = _mm256_add_epi32(_mm256_set1_epi32((int32_t)(i + 8 * v)), iota);      \
            _mm256_storeu_si256((__m256i *)(cidx + c), _mm256_permutevar8x32_epi32(iv, perm)); \
            _mm256_storeu_ps((float *)(cbits + c), _mm256_permutevar8x32_ps(av[v], perm));    \
            c += (size_t)__builtin_popcount(m8);                                               \
        }                                                                                      \
        if (c > cap)                                                                           \
            full = 1;                                                                          \
    } while (0)
#else
#define FPE_TOPK_APPEND()                                                                      \
    do {                                                                                       \
        /* values from registers via L1: re-reading a streamed s line would stall */           \
        float grp[16];                                                                         \
        for (size_t v = 0; v < 16 / FPE_TOPK_SIMD; ++v)                                        \
            FPE_V_STOREU(grp + v * FPE_TOPK_SIMD, av[v]);                                      \
        while (mask != 0) {                                                                    \
            unsigned j = (unsigned)__builtin_ctz(mask);                                        \
            mask &= mask - 1;                                                                  \
            if (c == cap) {                                                                    \
                full = 1;                                                                      \
                break;                                                                         \
            }                                                                                  \
            cidx[c] = (uint32_t)(i + j);                                                       \
            cbits[c] = fpe__f2u(grp[j]);                                                       \
            ++c;                                                                               \
        }                                                                                      \
    } while (0)
#endif

/* One scalar element at i (head / tail of the vector loop). */
#define FPE_TOPK_SCALAR()                                                                      \
    do {                                                                                       \
        float sv = u[i] + rr[i];                                                               \
        s[i] = sv;                                                                             \
        uint32_t bits = fpe__f2u(sv);                                                          \
        bad |= FPE_NONFINITE_TERM(bits);                                                       \
        if ((bits & FPE_ABS_MASK) >= lo && !full) {                                            \
            if (c == cap) {                                                                    \
                full = 1;                                                                      \
            } else {                                                                           \
                cidx[c] = (uint32_t)i;                                                         \
                cbits[c] = bits;                                                               \
                ++c;                                                                           \
            }                                                                                  \
        }                                                                                      \
    } while (0)

#if FPE_TOPK_SIMD == 8
#define FPE_STORE_U(p, v) _mm256_storeu_ps(p, v)
#define FPE_STORE_NT(p, v) _mm256_stream_ps(p, v)
#else
#define FPE_STORE_U(p, v) _mm_storeu_ps(p, v)
#define FPE_STORE_NT(p, v) _mm_stream_ps(p, v)
#endif

static FPE_TARGET size_t FPE_FN(sum_collect)(const float *u, const float *r, float *s, size_t n,
                                             uint32_t lo, uint32_t *restrict cidx,
                                             uint32_t *restrict cbits, size_t cap,
                                             uint32_t *bad_out) {
    const float *rr = r != NULL ? r : s; /* loads precede the store at the same index */
    const FPE_VI absm = FPE_V_SET1(0x7fffffff), fin = FPE_V_SET1(0x00800000);
    const FPE_VI lom1 = FPE_V_SET1((int32_t)lo - 1); /* keys and lo are < 2^31: signed compare */
#if FPE_TOPK_SIMD == 8
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#endif
    FPE_VI badv = FPE_V_ZERO();
    uint32_t bad = 0;
    size_t c = 0, i = 0;
    int full = 0;
    /* Big outputs (beyond the caches anyway) are written with streaming stores: no read-for-
     * ownership of s, a quarter less memory traffic. They need aligned addresses: scalar head.
     * Not in place: streaming over lines just loaded into the cache measured 2x slower. */
    if (r != NULL && n >= ((size_t)1 << 21) && ((uintptr_t)s % sizeof(float)) == 0) {
        while (i < n && ((uintptr_t)(s + i) % (FPE_TOPK_SIMD * sizeof(float))) != 0) {
            FPE_TOPK_SCALAR();
            ++i;
        }
        for (; i + 16 <= n; i += 16)
            FPE_TOPK_GROUP(FPE_STORE_NT);
        _mm_sfence(); /* order the streaming stores before anything that follows */
    } else {
        for (; i + 16 <= n; i += 16)
            FPE_TOPK_GROUP(FPE_STORE_U);
    }
    for (; i < n; ++i)
        FPE_TOPK_SCALAR();
    uint32_t lanes[FPE_TOPK_SIMD];
    FPE_V_STOREI(lanes, badv);
    for (size_t j = 0; j < FPE_TOPK_SIMD; ++j)
        bad |= lanes[j];
    *bad_out = bad;
    return full ? cap + 1 : c;
}
#undef FPE_VF
#undef FPE_VI
#undef FPE_V_ADD
#undef FPE_V_LOAD
#undef FPE_V_AND
#undef FPE_V_OR
#undef FPE_V_ADDI
#undef FPE_V_CMPGT
#undef FPE_V_SET1
#undef FPE_V_ZERO
#undef FPE_V_F2I
#undef FPE_V_I2F
#undef FPE_V_MASK
#undef FPE_V_STOREI
#undef FPE_V_STOREU
#undef FPE_TOPK_GROUP
#undef FPE_TOPK_SCALAR
#undef FPE_TOPK_APPEND
#undef FPE_STORE_U
#undef FPE_STORE_NT
#else
/* Portable version: vectorised sum per chunk, then a scan of the chunk (still in L1) that skips
 * runs of 16 without a candidate and appends branch-free inside the others. */
static FPE_TARGET size_t FPE_FN(sum_collect)(const float *u, const float *r, float *s, size_t n,
                                             uint32_t lo, uint32_t *restrict cidx,
                                             uint32_t *restrict cbits, size_t cap,
                                             uint32_t *bad_out) {
    uint32_t bad = 0;
    size_t c = 0;
    int full = 0;
    for (size_t start = 0; start < n; start += FPE_TOPK_CHUNK) {
        size_t len = fpe__min(FPE_TOPK_CHUNK, n - start);
        const float *sc = s + start;
        bad |= r != NULL ? FPE_FN(sum_chunk)(u + start, r + start, s + start, len)
                         : FPE_FN(sum_chunk_inplace)(u + start, s + start, len);
        if (full)
            continue;
        for (size_t i = 0; i < len; i += 16) {
            size_t m = fpe__min(16, len - i);
            uint32_t any = 0;
            for (size_t j = 0; j < m; ++j)
                any |= (fpe__f2u(sc[i + j]) & FPE_ABS_MASK) >= lo;
            if (!any)
                continue;
            if (c + m > cap) { /* no room for a branch-free group: stop collecting */
                full = 1;
                break;
            }
            for (size_t j = i; j < i + m; ++j) {
                uint32_t bits = fpe__f2u(sc[j]);
                cidx[c] = (uint32_t)(start + j);
                cbits[c] = bits;
                c += (bits & FPE_ABS_MASK) >= lo;
            }
        }
    }
    *bad_out = bad;
    return full ? cap + 1 : c;
}
#endif

/* One pass over s: indices with key >= (tb + 1) << 20 go to above[] (all of them are selected),
 * indices with key in bucket tb go to cand[]. */
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
