/* Hot loops of accum.c, included once per CPU target with FPE_FN(name) and FPE_TARGET defined. */

static FPE_TARGET void FPE_FN(axpy)(float *restrict acc, const float *restrict x, size_t n, float w) {
    for (size_t i = 0; i < n; ++i)
        acc[i] = acc[i] + w * x[i];
}

static FPE_TARGET void FPE_FN(dequant_acc)(float *restrict acc, const int8_t *restrict q,
                                           const float *restrict scales, size_t n, size_t block,
                                           float w) {
    size_t b = 0;
    for (size_t start = 0; start < n; start += block, ++b) {
        size_t len = fpe__min(block, n - start);
        const float s = scales[b];
        const int8_t *qb = q + start;
        float *ab = acc + start;
        for (size_t i = 0; i < len; ++i)
            ab[i] = ab[i] + w * ((float)qb[i] * s);
    }
}

/* Sum of squares in double with 8 fixed partial sums: lane j always takes elements i with
 * i % 8 == j, and the lanes are combined in one fixed tree, so every target gives the same bits. */
static FPE_TARGET double FPE_FN(sumsq)(const float *restrict x, size_t n) {
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (size_t j = 0; j < 8; ++j)
            s[j] += (double)x[i + j] * (double)x[i + j];
    for (size_t j = 0; i + j < n; ++j)
        s[j] += (double)x[i + j] * (double)x[i + j];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* 1 if every element is finite; stops at the first chunk holding NaN/Inf. */
static FPE_TARGET int FPE_FN(all_finite)(const float *restrict x, size_t n) {
    for (size_t start = 0; start < n; start += 4096) {
        size_t len = fpe__min(4096, n - start);
        uint32_t acc = 0;
        for (size_t i = 0; i < len; ++i)
            acc |= FPE_NONFINITE_TERM(fpe__f2u(x[start + i]));
        if (acc & FPE_NONFINITE_FLAG)
            return 0;
    }
    return 1;
}

static FPE_TARGET void FPE_FN(scale)(float *restrict g, size_t n, float factor) {
    for (size_t i = 0; i < n; ++i)
        g[i] = g[i] * factor;
}
