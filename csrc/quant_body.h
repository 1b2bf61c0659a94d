/* Hot loops of quant.c, included once per CPU target with FPE_FN(name) and FPE_TARGET defined.
 * Keep every loop free of cross-lane reassociation so all targets give identical bits. */

/* Largest |x| bit pattern of a run (sign cleared, so integer order == magnitude order). A result
 * >= FPE_INF_BITS means the run holds NaN or Inf. Signed int max vectorises on plain SSE2. */
static FPE_TARGET int32_t FPE_FN(absmax_key)(const float *restrict x, size_t len) {
    int32_t m = 0;
    for (size_t i = 0; i < len; ++i) {
        int32_t k = (int32_t)(fpe__f2u(x[i]) & FPE_ABS_MASK);
        m = k > m ? k : m;
    }
    return m;
}

static FPE_TARGET void FPE_FN(quant_run)(const float *restrict x, size_t len, float inv,
                                         int8_t *restrict q) {
    for (size_t i = 0; i < len; ++i) {
        /* No clamp needed: |x| <= a gives |x * inv| <= fl(a * fl(127 / a)) <= 127 * (1 + 2^-24)^2,
         * which rounds to 127. (A clamp here made GCC emit byte-level blends: 1.5x slower.) */
        float v = x[i] * inv;
        q[i] = (int8_t)(int32_t)FPE_RINT_SMALL(v);
    }
}

static FPE_TARGET void FPE_FN(quant_run_stochastic)(const float *restrict x, size_t len, float inv,
                                                    uint64_t seed, uint64_t first,
                                                    int8_t *restrict q) {
    float u[256];
    for (size_t start = 0; start < len; start += 256) {
        size_t m = fpe__min(256, len - start);
        for (size_t i = 0; i < m; ++i)
            u[i] = fpe__uniform(seed, first + start + i);
        /* floor by truncation (|y| < 2^22) minus one below negative non-integers, then an integer
         * clamp: all branch-free, so the loop vectorises */
        for (size_t i = 0; i < m; ++i) {
            float y = x[start + i] * inv + u[i];
            int32_t t = (int32_t)y;
            t -= y < (float)t;
            t = t > 127 ? 127 : t;
            t = t < -127 ? -127 : t;
            q[start + i] = (int8_t)t;
        }
    }
}

static FPE_TARGET int FPE_FN(quantize)(const float *restrict x, size_t n, size_t block,
                                       int stochastic, uint64_t seed, int8_t *restrict q,
                                       float *restrict scales) {
    size_t b = 0;
    for (size_t start = 0; start < n; start += block, ++b) {
        size_t len = fpe__min(block, n - start);
        int32_t mk = FPE_FN(absmax_key)(x + start, len);
        if ((uint32_t)mk >= FPE_INF_BITS)
            return FPE_ENONFINITE;
        float a = fpe__u2f((uint32_t)mk);
        float inv = mk == 0 ? 0.0f : 127.0f / a;
        if (mk == 0 || !(inv <= FLT_MAX)) {
            /* zero block, or absmax so small that 127/absmax overflows */
            scales[b] = 0.0f;
            memset(q + start, 0, len);
            continue;
        }
        scales[b] = a / 127.0f;
        if (stochastic)
            FPE_FN(quant_run_stochastic)(x + start, len, inv, seed, (uint64_t)start, q + start);
        else
            FPE_FN(quant_run)(x + start, len, inv, q + start);
    }
    return FPE_OK;
}

static FPE_TARGET void FPE_FN(dequantize)(const int8_t *restrict q, const float *restrict scales,
                                          size_t n, size_t block, float *restrict out) {
    size_t b = 0;
    for (size_t start = 0; start < n; start += block, ++b) {
        size_t len = fpe__min(block, n - start);
        const float s = scales[b];
        const int8_t *qb = q + start;
        float *ob = out + start;
        for (size_t i = 0; i < len; ++i)
            ob[i] = (float)qb[i] * s;
    }
}
