/* Compiles the kernel body named by FPE_BODY once per CPU path that csrc/dispatch.c can pick:
 * FPE_FN(name) becomes name##_base (always) and, on x86, name##_sse41 and name##_avx2, each compiled
 * with the matching target attribute in FPE_TARGET. avx2 only, never fma: a fused multiply-add would
 * change results against the other paths.
 *
 * Use: #define FPE_BODY "quant_body.h" then #include "fpe_multiversion.h" (once per kernel file; no
 * include guard on purpose). topk.c spells its instances out because it also varies FPE_TOPK_SIMD. */
#ifndef FPE_BODY
#error "define FPE_BODY before including fpe_multiversion.h"
#endif

#define FPE_FN(name) name##_base
#define FPE_TARGET
#include FPE_BODY
#undef FPE_FN
#undef FPE_TARGET

#if FPE_X86_DISPATCH
#define FPE_FN(name) name##_sse41
#define FPE_TARGET __attribute__((target("sse4.1")))
#include FPE_BODY
#undef FPE_FN
#undef FPE_TARGET

#define FPE_FN(name) name##_avx2
#define FPE_TARGET __attribute__((target("avx2")))
#include FPE_BODY
#undef FPE_FN
#undef FPE_TARGET
#endif

#undef FPE_BODY
