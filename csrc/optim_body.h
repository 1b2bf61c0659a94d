/* Hot loops of optim.c, included once per CPU target with FPE_FN(name) and FPE_TARGET defined.
 * The prox / momentum branches are hoisted into separate loops so each one vectorises. */

static FPE_TARGET void FPE_FN(sgd)(float *restrict w, const float *restrict g, float *restrict mom,
                                   const float *restrict w_ref, size_t n, float lr, float momentum,
                                   float decay, float mu) {
    if (w_ref != NULL && momentum != 0.0f) {
        for (size_t i = 0; i < n; ++i) {
            float wi = w[i];
            float ge = g[i] + mu * (wi - w_ref[i]);
            float m = momentum * mom[i] + ge;
            mom[i] = m;
            w[i] = wi * decay - lr * m;
        }
    } else if (w_ref != NULL) {
        for (size_t i = 0; i < n; ++i) {
            float wi = w[i];
            float ge = g[i] + mu * (wi - w_ref[i]);
            w[i] = wi * decay - lr * ge;
        }
    } else if (momentum != 0.0f) {
        for (size_t i = 0; i < n; ++i) {
            float m = momentum * mom[i] + g[i];
            mom[i] = m;
            w[i] = w[i] * decay - lr * m;
        }
    } else {
        for (size_t i = 0; i < n; ++i)
            w[i] = w[i] * decay - lr * g[i];
    }
}

static FPE_TARGET void FPE_FN(adamw)(float *restrict w, const float *restrict g, float *restrict m,
                                     float *restrict v, const float *restrict w_ref, size_t n,
                                     float step_size, float inv_sqrt_bc2, float b1, float b2,
                                     float eps, float decay, float mu) {
    const float c1 = 1.0f - b1, c2 = 1.0f - b2;
    if (w_ref != NULL) {
        for (size_t i = 0; i < n; ++i) {
            float wi = w[i];
            float ge = g[i] + mu * (wi - w_ref[i]);
            float mi = b1 * m[i] + c1 * ge;
            float vi = b2 * v[i] + c2 * (ge * ge);
            m[i] = mi;
            v[i] = vi;
            w[i] = wi * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
        }
    } else {
        for (size_t i = 0; i < n; ++i) {
            float ge = g[i];
            float mi = b1 * m[i] + c1 * ge;
            float vi = b2 * v[i] + c2 * (ge * ge);
            m[i] = mi;
            v[i] = vi;
            w[i] = w[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
        }
    }
}
