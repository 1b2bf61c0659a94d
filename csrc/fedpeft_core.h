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

/* Choose the CPU path once. force_baseline != 0 pins the portable path. Returns the chosen path.
 * Before any fpe_init() call the kernels run the portable path. On aarch64 the path is always NEON
 * (NEON is the baseline there, so force_baseline changes nothing). */
int fpe_init(int force_baseline);
int fpe_cpu_path(void);
/* 1 if this build and this CPU can run `path`, else 0 (tests use it to compare every path). */
int fpe_path_supported(int path);
/* Pin a specific path (for tests/benchmarks). FPE_EINVAL if unsupported; the path stays unchanged. */
int fpe_set_cpu_path(int path);
/* Static English text for a return code; never NULL. */
const char *fpe_strerror(int code);

/* ---- int8 block quantisation (symmetric absmax scale per block) ------------------------------
 * scales[b] = absmax(x[block b]) / 127; q[i] = round_half_even(x[i] * (127 / absmax)), in [-127, 127].
 * A block of zeros has scale 0 and q 0. nblocks = ceil(n / block).
 * Exact float32 op order: a = max|x|; scale = a / 127.0f; inv = 127.0f / a; q = clamp(rint(x * inv)).
 * Zero block rule: if a == 0 OR inv overflows to +Inf (a < ~3.7e-37, i.e. 127/a > FLT_MAX), the block
 * gets scale 0 and q 0 (without this, 0 * Inf would give NaN).
 * Stochastic variant: q = clamp(floor(x * inv + u_i)), u_i = fpe_uniform(seed, i) in [0, 1), i is the
 * global element index; the sum x * inv + u_i is one float32 multiply then one float32 add.
 * NaN/Inf anywhere in x -> FPE_ENONFINITE. block == 0 -> FPE_EINVAL (also when n == 0). */
int fpe_quantize_int8(const float *x, size_t n, size_t block, int8_t *q, float *scales);
int fpe_quantize_int8_stochastic(const float *x, size_t n, size_t block, uint64_t seed, int8_t *q,
                                 float *scales);
/* out[i] = (float)q[i] * scales[i / block]; non-finite scales -> FPE_ENONFINITE (out untouched). */
int fpe_dequantize_int8(const int8_t *q, const float *scales, size_t n, size_t block, float *out);

/* Counter-based uniform in [0,1): splitmix64(seed + (i+1) * 0x9E3779B97F4A7C15) >> 40, times 2^-24.
 * All arithmetic mod 2^64; splitmix64(z) is the standard finaliser:
 *   z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB; z ^= z >> 31;
 * result = (float)(z >> 40) * 2^-24 (exact in float32: a 24-bit integer times a power of two). */
float fpe_uniform(uint64_t seed, uint64_t i);

/* ---- top-k with error feedback ---------------------------------------------------------------
 * s = u + r (float32). Select exactly k indices with the largest |s|; ties broken by lower index.
 * |s| compares as IEEE magnitude (-0 ties with +0; denormals order normally). Non-finite s (NaN/Inf in
 * u or r, or u + r overflowing) -> FPE_ENONFINITE. k > n -> FPE_EINVAL. Expected O(n) radix select.
 * residual_out may be r or u itself (same pointer); partially overlapping buffers are not allowed,
 * and idx/val must not overlap anything else. In place, FPE_EINVAL and FPE_ENONFINITE leave the
 * aliased buffer untouched (a read-only pre-pass checks u + r); after FPE_ENOMEM it may hold u + r.
 * Scratch (malloc, freed before returning; FPE_ENOMEM if refused): about 20 bytes per selected
 * element for large n with k well below n, never more than about 2 bytes per element of n.
 * Reentrant: no state is kept between calls.
 * Writes idx (ascending, uint32), val = s[idx], residual_out = s with selected entries set to 0,
 * so val scattered + residual_out == u + r exactly. residual_out may alias r (in place). n < 2^32. */
int fpe_topk_ef(const float *u, const float *r, size_t n, size_t k, uint32_t *idx, float *val,
                float *residual_out);

/* ---- optimizer updates, in place on w and the state buffers -----------------------------------
 * g_eff = g + prox_mu * (w - w_ref)      (w_ref may be NULL when prox_mu == 0)
 * SGD:   w *= (1 - lr*wd);  mom = momentum*mom + g_eff;  w -= lr * mom   (mom unused if momentum == 0)
 * AdamW: w *= (1 - lr*wd);  m = b1*m + (1-b1)*g_eff;  v = b2*v + (1-b2)*g_eff^2;
 *        w -= lr * (m / (1 - b1^step)) / (sqrt(v / (1 - b2^step)) + eps)      (step >= 1) */
/* Hyper-parameters must be finite with lr, weight_decay, prox_mu >= 0, 0 <= momentum, 0 <= beta < 1,
 * eps > 0, step >= 1; w_ref must be non-NULL when prox_mu != 0; mom may be NULL when momentum == 0.
 * Otherwise FPE_EINVAL with nothing written. Gradients are not checked for finiteness here (the
 * Python layer checks with fpe_all_finite / clip). Not bit-exact with numpy: within 1e-6 relative. */
int fpe_sgd_step(float *w, const float *g, float *mom, const float *w_ref, size_t n, float lr,
                 float momentum, float weight_decay, float prox_mu);
int fpe_adamw_step(float *w, const float *g, float *m, float *v, const float *w_ref, size_t n,
                   uint64_t step, float lr, float beta1, float beta2, float eps, float weight_decay,
                   float prox_mu);
/* Global L2 clipping: norm = ||g||_2 (double accumulation); if norm > max_norm, g *= max_norm / norm.
 * Writes the pre-clip norm. Non-finite g gives FPE_ENONFINITE and g untouched. */
int fpe_clip_by_global_norm(float *g, size_t n, float max_norm, double *norm_out);

/* ---- aggregation --------------------------------------------------------------------------
 * Exact float32 op order (bit-exact with the numpy reference; no FMA):
 *   axpy:                       acc[i] = acc[i] + weight * x[i]
 *   scatter_add:                acc[idx[j]] = acc[idx[j]] + weight * val[j]
 *   dequant_accumulate:         acc[i] = acc[i] + weight * ((float)q[i] * scales[i / block])
 *   sparse_dequant_accumulate:  acc[idx[j]] = acc[idx[j]] + weight * ((float)q[j] * scales[j / block])
 * weight must be finite (else FPE_EINVAL). Dequantising kernels reject non-finite scales with
 * FPE_ENONFINITE before touching their output; scatter_add rejects non-finite val the same way.
 * x in axpy is not checked (callers validate incoming updates first). */
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
/* ||x||_2 with double accumulation (fixed summation order, same on every CPU path). Returns FPE_OK;
 * the norm is NaN/Inf when x holds NaN/Inf. */
int fpe_l2_norm(const float *x, size_t n, double *out);
int fpe_all_finite(const float *x, size_t n, int *out);                           /* 1 if all finite */

#endif
