/* Optimizer updates for adapter parameters: SGD (momentum, decoupled decay, prox) and AdamW. */
#include "fpe_internal.h"

#define FPE_BODY "optim_body.h"
#include "fpe_multiversion.h"

static int nonneg_finite(float x) { return fpe__isfinite(x) && x >= 0.0f; }

int fpe_sgd_step(float *w, const float *g, float *mom, const float *w_ref, size_t n, float lr,
                 float momentum, float weight_decay, float prox_mu) {
    if (!nonneg_finite(lr) || !nonneg_finite(momentum) || !nonneg_finite(weight_decay) ||
        !nonneg_finite(prox_mu))
        return FPE_EINVAL;
    if ((prox_mu != 0.0f && w_ref == NULL) || (momentum != 0.0f && mom == NULL))
        return FPE_EINVAL;
    float decay = 1.0f - lr * weight_decay;
    /* w * (1 - lr*wd) is w-side only; w_ref matters only when prox_mu != 0. */
    FPE_DISPATCH_VOID(sgd, (w, g, mom, prox_mu != 0.0f ? w_ref : NULL, n, lr, momentum, decay,
                            prox_mu));
    return FPE_OK;
}

int fpe_adamw_step(float *w, const float *g, float *m, float *v, const float *w_ref, size_t n,
                   uint64_t step, float lr, float beta1, float beta2, float eps, float weight_decay,
                   float prox_mu) {
    if (step == 0 || !nonneg_finite(lr) || !nonneg_finite(weight_decay) || !nonneg_finite(prox_mu))
        return FPE_EINVAL;
    if (!nonneg_finite(beta1) || !(beta1 < 1.0f) || !nonneg_finite(beta2) || !(beta2 < 1.0f))
        return FPE_EINVAL;
    if (!fpe__isfinite(eps) || !(eps > 0.0f) || (prox_mu != 0.0f && w_ref == NULL))
        return FPE_EINVAL;
    /* Bias corrections in double, folded into two float factors:
     *   lr * (m / bc1) / (sqrt(v / bc2) + eps) == (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps). */
    double bc1 = 1.0 - pow((double)beta1, (double)step);
    double bc2 = 1.0 - pow((double)beta2, (double)step);
    float step_size = (float)((double)lr / bc1);
    float inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
    float decay = 1.0f - lr * weight_decay;
    FPE_DISPATCH_VOID(adamw, (w, g, m, v, prox_mu != 0.0f ? w_ref : NULL, n, step_size,
                              inv_sqrt_bc2, beta1, beta2, eps, decay, prox_mu));
    return FPE_OK;
}

int fpe_clip_by_global_norm(float *g, size_t n, float max_norm, double *norm_out) {
    if (!fpe__isfinite(max_norm) || !(max_norm > 0.0f))
        return FPE_EINVAL;
    double norm = sqrt(fpe__sumsq(g, n));
    *norm_out = norm;
    if (!(norm <= DBL_MAX))
        return FPE_ENONFINITE; /* finite floats cannot overflow a double sum of squares */
    if (norm > (double)max_norm)
        fpe__scale(g, n, (float)((double)max_norm / norm));
    return FPE_OK;
}
