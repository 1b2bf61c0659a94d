/* int8 block quantisation (absmax scale per block) and its inverse. */
#include "fpe_internal.h"

#define FPE_BODY "quant_body.h"
#include "fpe_multiversion.h"

float fpe_uniform(uint64_t seed, uint64_t i) { return fpe__uniform(seed, i); }

int fpe_quantize_int8(const float *x, size_t n, size_t block, int8_t *q, float *scales) {
    if (block == 0)
        return FPE_EINVAL;
    return FPE_DISPATCH(quantize, (x, n, block, 0, 0, q, scales));
}

int fpe_quantize_int8_stochastic(const float *x, size_t n, size_t block, uint64_t seed, int8_t *q,
                                 float *scales) {
    if (block == 0)
        return FPE_EINVAL;
    return FPE_DISPATCH(quantize, (x, n, block, 1, seed, q, scales));
}

/* Scales must be finite before any output is written. */
int fpe__check_scales(const float *scales, size_t n, size_t block) {
    size_t nblocks = n / block + (n % block != 0);
    uint32_t acc = 0;
    for (size_t b = 0; b < nblocks; ++b)
        acc |= FPE_NONFINITE_TERM(fpe__f2u(scales[b]));
    return (acc & FPE_NONFINITE_FLAG) ? FPE_ENONFINITE : FPE_OK;
}

int fpe_dequantize_int8(const int8_t *q, const float *scales, size_t n, size_t block, float *out) {
    if (block == 0)
        return FPE_EINVAL;
    int rc = fpe__check_scales(scales, n, block);
    if (rc != FPE_OK)
        return rc;
    FPE_DISPATCH_VOID(dequantize, (q, scales, n, block, out));
    return FPE_OK;
}
