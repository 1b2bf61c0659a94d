/* Aggregation kernels: dense/sparse weighted accumulation, norms, finiteness. */
#include "fpe_internal.h"

#define FPE_BODY "accum_body.h"
#include "fpe_multiversion.h"

int fpe_axpy(float *acc, const float *x, size_t n, float weight) {
    if (!fpe__isfinite(weight))
        return FPE_EINVAL;
    FPE_DISPATCH_VOID(axpy, (acc, x, n, weight));
    return FPE_OK;
}

/* idx strictly increasing and < n; checked in full before acc is touched. */
static int check_indices(size_t n, const uint32_t *idx, size_t nnz) {
    for (size_t j = 0; j < nnz; ++j) {
        if ((size_t)idx[j] >= n || (j > 0 && idx[j] <= idx[j - 1]))
            return FPE_EINDEX;
    }
    return FPE_OK;
}

int fpe_scatter_add(float *acc, size_t n, const uint32_t *idx, const float *val, size_t nnz,
                    float weight) {
    if (!fpe__isfinite(weight))
        return FPE_EINVAL;
    int rc = check_indices(n, idx, nnz);
    if (rc != FPE_OK)
        return rc;
    uint32_t bad = 0;
    for (size_t j = 0; j < nnz; ++j)
        bad |= FPE_NONFINITE_TERM(fpe__f2u(val[j]));
    if (bad & FPE_NONFINITE_FLAG)
        return FPE_ENONFINITE;
    for (size_t j = 0; j < nnz; ++j)
        acc[idx[j]] = acc[idx[j]] + weight * val[j];
    return FPE_OK;
}

int fpe_dequant_accumulate(float *acc, const int8_t *q, const float *scales, size_t n, size_t block,
                           float weight) {
    if (block == 0 || !fpe__isfinite(weight))
        return FPE_EINVAL;
    int rc = fpe__check_scales(scales, n, block);
    if (rc != FPE_OK)
        return rc;
    FPE_DISPATCH_VOID(dequant_acc, (acc, q, scales, n, block, weight));
    return FPE_OK;
}

int fpe_sparse_dequant_accumulate(float *acc, size_t n, const uint32_t *idx, const int8_t *q,
                                  const float *scales, size_t nnz, size_t block, float weight) {
    if (block == 0 || !fpe__isfinite(weight))
        return FPE_EINVAL;
    int rc = fpe__check_scales(scales, nnz, block);
    if (rc != FPE_OK)
        return rc;
    rc = check_indices(n, idx, nnz);
    if (rc != FPE_OK)
        return rc;
    size_t b = 0;
    for (size_t start = 0; start < nnz; start += block, ++b) {
        size_t len = fpe__min(block, nnz - start);
        const float s = scales[b];
        for (size_t j = start; j < start + len; ++j)
            acc[idx[j]] = acc[idx[j]] + weight * ((float)q[j] * s);
    }
    return FPE_OK;
}

double fpe__sumsq(const float *x, size_t n) { return FPE_DISPATCH(sumsq, (x, n)); }

void fpe__scale(float *g, size_t n, float factor) { FPE_DISPATCH_VOID(scale, (g, n, factor)); }

int fpe_l2_norm(const float *x, size_t n, double *out) {
    *out = sqrt(fpe__sumsq(x, n));
    return FPE_OK;
}

int fpe_all_finite(const float *x, size_t n, int *out) {
    *out = FPE_DISPATCH(all_finite, (x, n));
    return FPE_OK;
}
