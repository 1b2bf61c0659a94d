/* fedpeft_edge C core: numeric kernels on flat, contiguous float32 buffers.
 *
 * Contract shared by every kernel:
 *  - returns FPE_OK (0) or a negative FPE_E* code; never aborts, never prints;
 *  - no hidden global state except the CPU path chosen once by fpe_init();
 *  - lengths are size_t element counts; a zero length is valid and does nothing;
 *  - NaN/Inf in an input that must be finite gives FPE_ENONFINITE and leaves outputs unspecified
 *    (the Python layer only hands over scratch or copy-on-success buffers where that matters).
 */
#ifndef FEDPEFT_CORE_H
#define FEDPEFT_CORE_H

#include <stddef.h>
#include <stdint.h>

#define FPE_OK 0
#define FPE_EINVAL -1      /* an argument is out of range (block == 0, k > n, bad hyper-parameter) */
#define FPE_ENONFINITE -2  /* NaN or Inf where finite values are required */
#define FPE_ENOMEM -3      /* scratch allocation failed */
#define FPE_EINDEX -4      /* sparse index out of range or not strictly increasing */

/* CPU paths (values of fpe_cpu_path()). */
#define FPE_PATH_BASELINE 0 /* portable C: SSE2 on x86-64, plain on others */
#define FPE_PATH_SSE41 1
#define FPE_PATH_AVX2 2
#define FPE_PATH_NEON 3 /* aarch64: NEON is the baseline there */

/* Choose the CPU path once. force_baseline != 0 pins the portable path. Returns the chosen path. */
int fpe_init(int force_baseline);
int fpe_cpu_path(void);
const char *fpe_strerror(int code);

/* ---- int8 block quantisation (symmetric absmax scale per block) ------------------------------
 * scales[b] = absmax(x[block b]) / 127; q[i] = round_half_even(x[i] * (127 / absmax)), in [-127, 127].
 * A block of zeros has scale 0 and q 0. nblocks = ceil(n / block).
 * Stochastic variant: q = floor(x * inv + u_i), u_i = fpe_uniform(seed, i) in [0, 1). */
int fpe_quantize_int8(const float *x, size_t n, size_t block, int8_t *q, float *scales);
int fpe_quantize_int8_stochastic(const float *x, size_t n, size_t block, uint64_t seed, int8_t *q,
                                 float *scales);
int fpe_dequantize_int8(const int8_t *q, const float *scales, size_t n, size_t block, float *out);

/* Counter-based uniform in [0,1): splitmix64(seed + (i+1) * 0x9E3779B97F4A7C15) >> 40, times 2^-24. */
float fpe_uniform(uint64_t seed, uint64_t i);

/* ---- top-k with error feedback ---------------------------------------------------------------
 * s = u + r (float32). Select exactly k indices with the largest |s|; ties broken by lower index.
 * Writes idx (ascending, uint32), val = s[idx], residual_out = s with selected entries set to 0,
 * so val scattered + residual_out == u + r exactly. residual_out may alias r (in place). n < 2^32. */
int fpe_topk_ef(const float *u, const float *r, size_t n, size_t k, uint32_t *idx, float *val,
                float *residual_out);

/* ---- optimizer updates, in place on w and the state buffers -----------------------------------
 * g_eff = g + prox_mu * (w - w_ref)      (w_ref may be NULL when prox_mu == 0)
 * SGD:   w *= (1 - lr*wd);  mom = momentum*mom + g_eff;  w -= lr * mom   (mom unused if momentum == 0)
 * AdamW: w *= (1 - lr*wd);  m = b1*m + (1-b1)*g_eff;  v = b2*v + (1-b2)*g_eff^2;
 *        w -= lr * (m / (1 - b1^step)) / (sqrt(v / (1 - b2^step)) + eps)      (step >= 1) */
int fpe_sgd_step(float *w, const float *g, float *mom, const float *w_ref, size_t n, float lr,
                 float momentum, float weight_decay, float prox_mu);
int fpe_adamw_step(float *w, const float *g, float *m, float *v, const float *w_ref, size_t n,
                   uint64_t step, float lr, float beta1, float beta2, float eps, float weight_decay,
                   float prox_mu);
/* Global L2 clipping: norm = ||g||_2 (double accumulation); if norm > max_norm, g *= max_norm / norm.
 * Writes the pre-clip norm. Non-finite g gives FPE_ENONFINITE and g untouched. */
int fpe_clip_by_global_norm(float *g, size_t n, float max_norm, double *norm_out);

/* ---- aggregation -------------------------------------------------------------------------- */
int fpe_axpy(float *acc, const float *x, size_t n, float weight);                 /* acc += w*x */
/* acc[idx[j]] += w * val[j]; idx strictly increasing and < n, else FPE_EINDEX (acc untouched). */
int fpe_scatter_add(float *acc, size_t n, const uint32_t *idx, const float *val, size_t nnz,
                    float weight);
/* acc += w * dequant(q, scales) */
int fpe_dequant_accumulate(float *acc, const int8_t *q, const float *scales, size_t n, size_t block,
                           float weight);
/* acc[idx[j]] += w * dequant(q, scales)[j]   (blocks run over the nnz values) */
int fpe_sparse_dequant_accumulate(float *acc, size_t n, const uint32_t *idx, const int8_t *q,
                                  const float *scales, size_t nnz, size_t block, float weight);
int fpe_l2_norm(const float *x, size_t n, double *out);                           /* double accumulation */
int fpe_all_finite(const float *x, size_t n, int *out);                           /* 1 if all finite */

#endif
