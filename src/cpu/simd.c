/*
 * simd.c -- plain C loops that gcc/clang vectorise; on x86-64 with GCC each is
 * cloned for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and the baseline, and
 * the loader picks the best clone for the CPU it runs on (ifunc).
 */
#include "simd.h"

#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(CKV_NO_CLONES)
#define CKV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CKV_CLONES
#endif

/* Helpers must be inlined into each clone, or they run at the baseline ISA. */
#if defined(__GNUC__)
#define CKV_INLINE static inline __attribute__((always_inline))
#else
#define CKV_INLINE static inline
#endif

/* Rows [r, r + ROWS) of the product: each key-tile row is loaded once for ROWS query rows, and
 * the ROWS x 32 accumulators stay in registers (8 zmm with AVX-512). */
#define CKV_DOT_ROWS(ROWS)                                                                          \
    CKV_INLINE void dot_rows_##ROWS(const float *q, int64_t D, const float *kt, float *out, int64_t ld, \
                                       int64_t T) {                                                \
        float acc[ROWS][CKV_KEY_TILE] = {{0}};                                                      \
        for (int64_t d = 0; d < D; d++) {                                                           \
            const float *krow = kt + d * CKV_KEY_TILE;                                              \
            for (int i = 0; i < ROWS; i++) {                                                        \
                const float a = q[i * D + d];                                                       \
                for (int t = 0; t < CKV_KEY_TILE; t++)                                              \
                    acc[i][t] += a * krow[t];                                                       \
            }                                                                                       \
        }                                                                                           \
        for (int i = 0; i < ROWS; i++)                                                              \
            for (int64_t t = 0; t < T; t++)                                                         \
                out[i * ld + t] = acc[i][t];                                                        \
    }

CKV_DOT_ROWS(4)
CKV_DOT_ROWS(1)

CKV_CLONES
void ckv_dot_tile(const float *q, int64_t R, int64_t D, const float *kt, float *out, int64_t ld, int64_t T) {
    int64_t r = 0;
    for (; r + 4 <= R; r += 4)
        dot_rows_4(q + r * D, D, kt, out + r * ld, ld, T);
    for (; r < R; r++)
        dot_rows_1(q + r * D, D, kt, out + r * ld, ld, T);
}

/* exp(x) for x <= 0 (the argument is always minus a row maximum): x = n ln2 + f
 * with |f| <= ln2/2, 2^n built in the exponent bits, exp(f) by a degree-6
 * Taylor polynomial (relative error below 2e-7). Below -87 (and for NaN,
 * which the caller detects itself) the result is 0. */
CKV_INLINE float exp_nonpositive(float x) {
    const float xc = x > -87.0f ? x : -87.0f; /* also maps NaN into range: no UB in the cast */
    const float t = xc * 1.44269504088896341f;
    const int n = (int)(t - 0.5f); /* truncation of a negative number: t - n in (-0.5, 0.5] */
    /* Cody-Waite: ln2 split in a part exact when multiplied by n and a small correction */
    const float f = (xc - (float)n * 0.693145751953125f) - (float)n * 1.428606765330187e-06f;
    float p = 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    union { uint32_t u; float f; } two_n = {.u = (uint32_t)(n + 127) << 23};
    const float y = p * two_n.f;
    return x > -87.0f ? y : 0.0f;
}

CKV_CLONES
float ckv_exp_shift_sum(float *row, int64_t n, float shift) {
    float sum = 0.0f;
    if (!isfinite(shift))
        return NAN; /* the caller reports non-finite scores */
    float part[8] = {0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int u = 0; u < 8; u++) {
            float e = exp_nonpositive(row[j + u] - shift);
            row[j + u] = e;
            part[u] += e;
        }
    for (; j < n; j++) {
        float e = exp_nonpositive(row[j] - shift);
        row[j] = e;
        sum += e;
    }
    for (int u = 0; u < 8; u++)
        sum += part[u];
    return sum;
}

const char *ckv_cpu_simd_level(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
#if defined(CKV_CLONES_ON) || (!defined(__clang__) && defined(__linux__) && !defined(CKV_NO_CLONES))
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return "avx512";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return "avx2";
#endif
    return "baseline";
#else
    return "baseline";
#endif
}
