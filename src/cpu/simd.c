/*
 * simd.c -- the inner loops of scoring: Q . K^T register tiles, key transposes,
 * and the exp pass. Each has a portable version (plain C that gcc vectorises;
 * with GCC on x86-64 cloned for x86-64-v4/-v3/baseline, picked by the loader)
 * and hand-written AVX-512 / AVX512-BF16 / AVX2 versions picked once at run
 * time by row_level(), which CHUNKKV_SIMD can lower (for tests).
 */
#include "simd.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define CKV_X86_INTRINSICS 1
#include <immintrin.h>
#else
#define CKV_X86_INTRINSICS 0
#endif

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
 * the ROWS x 32 accumulators stay in registers (8 zmm with AVX-512). Columns [lo, hi) also raise the
 * running per-lane maxima vmax [ROWS, CKV_KEY_TILE] (no reduction across lanes, so it vectorises). */
#define CKV_DOT_ROWS(ROWS)                                                                          \
    CKV_INLINE void dot_rows_##ROWS(const float *q, int64_t D, const float *kt, float *out, int64_t ld, \
                                    int64_t T, float *vmax, int64_t lo, int64_t hi) {               \
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
            for (int t = 0; t < CKV_KEY_TILE; t++) {                                                \
                const float a = t >= lo && t < hi ? acc[i][t] : -INFINITY;                          \
                float *m = vmax + i * CKV_KEY_TILE + t;                                             \
                *m = a > *m ? a : *m;                                                               \
            }                                                                                       \
        for (int i = 0; i < ROWS; i++)                                                              \
            for (int64_t t = 0; t < T; t++)                                                         \
                out[i * ld + t] = acc[i][t];                                                        \
    }

CKV_DOT_ROWS(4)
CKV_DOT_ROWS(1)

CKV_CLONES
static void dot_tile_portable(const float *q, int64_t R, int64_t D, const float *kt, float *out, int64_t ld,
                              int64_t T, float *vmax, int64_t lo, int64_t hi) {
    int64_t r = 0;
    for (; r + 4 <= R; r += 4)
        dot_rows_4(q + r * D, D, kt, out + r * ld, ld, T, vmax + r * CKV_KEY_TILE, lo, hi);
    for (; r < R; r++)
        dot_rows_1(q + r * D, D, kt, out + r * ld, ld, T, vmax + r * CKV_KEY_TILE, lo, hi);
}

/* exp(x) for x <= 0 (the argument is always minus a row maximum): x = n ln2 + f
 * with |f| <= ln2/2, 2^n built in the exponent bits, exp(f) by a degree-6
 * Taylor polynomial (relative error below 2e-7). Below -87 (and for NaN,
 * which the caller detects itself) the result is 0. Branch-free, so loops of
 * it vectorise. */
CKV_INLINE float exp_nonpositive(float x) {
    const float xc = x > -87.0f ? x : -87.0f; /* also maps NaN into range: no UB in the cast */
    const float t = xc * 1.44269504088896341f;
    const int32_t n = (int32_t)(t - 0.5f); /* truncation of a negative number: t - n in (-0.5, 0.5] */
    /* Cody-Waite: ln2 split in a part exact when multiplied by n and a small correction */
    const float f = (xc - (float)n * 0.693145751953125f) - (float)n * 1.428606765330187e-06f;
    float p = 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const float two_n = ckv_bits_to_f32((uint32_t)(n + 127) << 23);
    return x > -87.0f ? p * two_n : 0.0f;
}

/* ---- the exp pass of the softmax: portable loops, and AVX-512 / AVX2 versions picked once at run time ----
 * Each vector version does per element exactly what exp_nonpositive does; only the order in which the
 * partial sums are added differs (in lanes of 16, 8 or 1). GCC does not vectorise these loops by itself
 * (the clamp and the exponent-bit trick defeat it), hence the intrinsics. */

/* Returns the sum, or NaN when a row[j] is NaN or +-Inf (x * 0 is then NaN). */
static float exp_shift_sum_scalar(float *row, int64_t n, float shift) {
    float sum = 0.0f, bad = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float x = row[j];
        const float e = exp_nonpositive(x - shift);
        row[j] = e;
        sum += e;
        bad += x * 0.0f;
    }
    return bad == 0.0f ? sum : NAN;
}

#if CKV_X86_INTRINSICS
#define CKV_AVX512 __attribute__((target("avx512f,avx512dq")))
#define CKV_AVX2 __attribute__((target("avx2,fma")))

/* Mask of the first `left` of 16 lanes, left clamped to [0, 16]. */
static inline __mmask16 lanes16(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* ---- bf16 dot products (AVX512-BF16): keys and queries stay bf16, in pairs of neighbouring d; each
 * vdpbf16ps does 32 exact products per vector with fp32 accumulation, twice the fp32 FMA rate. ---- */
#define CKV_BF16_ROWS 8 /* rows of the AVX-512 register tiles (fp32 and bf16) */
#define CKV_AVX512BF16 __attribute__((target("avx512f,avx512dq,avx512bf16")))

CKV_AVX512BF16 static void dot_rows_bf16(const uint32_t *q2, int rows, int64_t D2, const uint32_t *kt2, float scale,
                                         float *out, int64_t ld, __mmask16 m0, __mmask16 m1, float *vmax,
                                         __mmask16 x0, __mmask16 x1) {
    __m512 acc[CKV_BF16_ROWS][2];
    for (int i = 0; i < CKV_BF16_ROWS; i++)
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D2; d++) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt2 + d * CKV_KEY_TILE);
        const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt2 + d * CKV_KEY_TILE + 16);
        for (int i = 0; i < CKV_BF16_ROWS; i++) { /* rows >= `rows` are never stored: the compiler keeps all */
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)q2[(i < rows ? i : 0) * D2 + d]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, k0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, k1);
        }
    }
    const __m512 s = _mm512_set1_ps(scale);
    for (int i = 0; i < rows; i++) {
        const __m512 v0 = _mm512_mul_ps(acc[i][0], s), v1 = _mm512_mul_ps(acc[i][1], s);
        float *m = vmax + i * CKV_KEY_TILE;
        _mm512_storeu_ps(m, _mm512_mask_max_ps(_mm512_loadu_ps(m), x0, v0, _mm512_loadu_ps(m)));
        _mm512_storeu_ps(m + 16, _mm512_mask_max_ps(_mm512_loadu_ps(m + 16), x1, v1, _mm512_loadu_ps(m + 16)));
        _mm512_mask_storeu_ps(out + i * ld, m0, v0);
        _mm512_mask_storeu_ps(out + i * ld + 16, m1, v1);
    }
}

/* fp32 on AVX-512: the same 8 x 32 register tile; kt is the transposed fp32 key tile. */
CKV_AVX512 static void dot_rows_f32(const float *q, int rows, int64_t D, const float *kt, float *out, int64_t ld,
                                    __mmask16 m0, __mmask16 m1, float *vmax, __mmask16 x0, __mmask16 x1) {
    __m512 acc[CKV_BF16_ROWS][2];
    for (int i = 0; i < CKV_BF16_ROWS; i++)
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        const __m512 k0 = _mm512_loadu_ps(kt + d * CKV_KEY_TILE), k1 = _mm512_loadu_ps(kt + d * CKV_KEY_TILE + 16);
        for (int i = 0; i < CKV_BF16_ROWS; i++) {
            const __m512 a = _mm512_set1_ps(q[(i < rows ? i : 0) * D + d]);
            acc[i][0] = _mm512_fmadd_ps(a, k0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(a, k1, acc[i][1]);
        }
    }
    for (int i = 0; i < rows; i++) {
        float *m = vmax + i * CKV_KEY_TILE;
        _mm512_storeu_ps(m, _mm512_mask_max_ps(_mm512_loadu_ps(m), x0, acc[i][0], _mm512_loadu_ps(m)));
        _mm512_storeu_ps(m + 16, _mm512_mask_max_ps(_mm512_loadu_ps(m + 16), x1, acc[i][1], _mm512_loadu_ps(m + 16)));
        _mm512_mask_storeu_ps(out + i * ld, m0, acc[i][0]);
        _mm512_mask_storeu_ps(out + i * ld + 16, m1, acc[i][1]);
    }
}

CKV_AVX512 static void dot_tile_f32_avx512(const float *q, int64_t R, int64_t D, const float *kt, float *out,
                                           int64_t ld, int64_t T, float *vmax, int64_t lo, int64_t hi) {
    const __mmask16 m0 = lanes16(T), m1 = lanes16(T - 16);
    const __mmask16 x0 = (__mmask16)(lanes16(hi) & ~lanes16(lo)), x1 = (__mmask16)(lanes16(hi - 16) & ~lanes16(lo - 16));
    for (int64_t r = 0; r < R; r += CKV_BF16_ROWS) {
        const int rows = R - r < CKV_BF16_ROWS ? (int)(R - r) : CKV_BF16_ROWS;
        dot_rows_f32(q + r * D, rows, D, kt, out + r * ld, ld, m0, m1, vmax + r * CKV_KEY_TILE, x0, x1);
    }
}

CKV_AVX512BF16 static void dot_tile_bf16_avx512(const uint32_t *q2, int64_t R, int64_t D2, const uint32_t *kt2,
                                                float scale, float *out, int64_t ld, int64_t T, float *vmax,
                                                int64_t lo, int64_t hi) {
    const __mmask16 m0 = lanes16(T), m1 = lanes16(T - 16);
    /* lanes [lo, hi) of each half */
    const __mmask16 x0 = (__mmask16)(lanes16(hi) & ~lanes16(lo)), x1 = (__mmask16)(lanes16(hi - 16) & ~lanes16(lo - 16));
    for (int64_t r = 0; r < R; r += CKV_BF16_ROWS) {
        const int rows = R - r < CKV_BF16_ROWS ? (int)(R - r) : CKV_BF16_ROWS;
        dot_rows_bf16(q2 + r * D2, rows, D2, kt2, scale, out + r * ld, ld, m0, m1, vmax + r * CKV_KEY_TILE, x0, x1);
    }
}

CKV_AVX512 static float exp_shift_sum_avx512(float *row, int64_t n, float shift) {
    const __m512 s = _mm512_set1_ps(shift), lo = _mm512_set1_ps(-87.0f), zero = _mm512_setzero_ps();
    __m512 sum = zero, probe = zero;
    for (int64_t j = 0; j < n; j += 16) { /* the tail in the same loop (masked), so every element rounds alike */
        const __mmask16 in = lanes16(n - j);
        const __m512 x = _mm512_maskz_loadu_ps(in, row + j);
        probe = _mm512_add_ps(probe, _mm512_mul_ps(x, zero));
        const __m512 z = _mm512_sub_ps(x, s);
        const __mmask16 live = _mm512_mask_cmp_ps_mask(in, z, lo, _CMP_GT_OQ);
        const __m512 zc = _mm512_max_ps(z, lo); /* NaN z gives lo */
        const __m512i ni = _mm512_cvttps_epi32(_mm512_sub_ps(_mm512_mul_ps(zc, _mm512_set1_ps(1.44269504088896341f)),
                                                             _mm512_set1_ps(0.5f)));
        const __m512 nf = _mm512_cvtepi32_ps(ni);
        __m512 f = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693145751953125f), zc);
        f = _mm512_fnmadd_ps(nf, _mm512_set1_ps(1.428606765330187e-06f), f);
        __m512 p = _mm512_set1_ps(1.0f / 720.0f);
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
        const __m512 two_n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23));
        const __m512 e = _mm512_maskz_mul_ps(live, p, two_n);
        _mm512_mask_storeu_ps(row + j, in, e);
        sum = _mm512_add_ps(sum, e);
    }
    return _mm512_reduce_add_ps(probe) == 0.0f ? _mm512_reduce_add_ps(sum) : NAN;
}

CKV_AVX2 static float hsum256(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

/* All-ones in the first min(left, 8) lanes. */
CKV_AVX2 static inline __m256i lanes8(int64_t left) {
    const int k = left >= 8 ? 8 : (int)left;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

CKV_AVX2 static float exp_shift_sum_avx2(float *row, int64_t n, float shift) {
    const __m256 s = _mm256_set1_ps(shift), lo = _mm256_set1_ps(-87.0f), zero = _mm256_setzero_ps();
    __m256 sum = zero, probe = zero;
    for (int64_t j = 0; j < n; j += 8) {
        const __m256i in = lanes8(n - j);
        const __m256 x = _mm256_maskload_ps(row + j, in); /* masked lanes read as 0 */
        probe = _mm256_add_ps(probe, _mm256_mul_ps(x, zero));
        const __m256 z = _mm256_sub_ps(x, s);
        const __m256 live = _mm256_and_ps(_mm256_cmp_ps(z, lo, _CMP_GT_OQ), _mm256_castsi256_ps(in));
        const __m256 zc = _mm256_max_ps(z, lo);
        const __m256i ni = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_mul_ps(zc, _mm256_set1_ps(1.44269504088896341f)),
                                                             _mm256_set1_ps(0.5f)));
        const __m256 nf = _mm256_cvtepi32_ps(ni);
        __m256 f = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693145751953125f), zc);
        f = _mm256_fnmadd_ps(nf, _mm256_set1_ps(1.428606765330187e-06f), f);
        __m256 p = _mm256_set1_ps(1.0f / 720.0f);
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120.0f));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24.0f));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6.0f));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
        const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
        const __m256 e = _mm256_and_ps(_mm256_mul_ps(p, two_n), live);
        _mm256_maskstore_ps(row + j, in, e);
        sum = _mm256_add_ps(sum, e);
    }
    return hsum256(probe) == 0.0f ? hsum256(sum) : NAN;
}
#endif /* CKV_X86_INTRINSICS */

/* The level the row passes and the bf16 dot use (0 baseline, 1 AVX2, 2 AVX-512, 3 AVX-512 with BF16 dot
 * products): the best the CPU has, lowered by CHUNKKV_SIMD=avx512|avx2|baseline (for tests). */
static int row_level(void) {
    static int level = -1; /* racy but idempotent: every thread computes the same value */
    if (level < 0) {
        int best = 0;
#if CKV_X86_INTRINSICS
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
            best = __builtin_cpu_supports("avx512bf16") ? 3 : 2;
        else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            best = 1;
#endif
        const char *env = getenv("CHUNKKV_SIMD");
        if (env && strcmp(env, "baseline") == 0)
            best = 0;
        else if (env && strcmp(env, "avx2") == 0 && best > 1)
            best = 1;
        else if (env && strcmp(env, "avx512") == 0 && best > 2)
            best = 2;
        level = best;
    }
    return level;
}

float ckv_exp_shift_sum(float *row, int64_t n, float shift) {
    if (!isfinite(shift))
        return NAN; /* the caller reports non-finite scores */
#if CKV_X86_INTRINSICS
    switch (row_level()) {
    case 3:
    case 2: return exp_shift_sum_avx512(row, n, shift);
    case 1: return exp_shift_sum_avx2(row, n, shift);
    default: break;
    }
#endif
    return exp_shift_sum_scalar(row, n, shift);
}

#if CKV_X86_INTRINSICS
/* 16 rows of 16 words -> 16 columns: dst[w * ldd + t] = src[t * lds + w] for t, w < 16. Three rounds of
 * interleaves (32-bit, 64-bit, then 128-bit lanes twice). */
CKV_AVX512 static void transpose16_avx512(const uint32_t *src, int64_t lds, uint32_t *dst, int64_t ldd) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_loadu_si512(src + i * lds);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + 4 + i], 0x88);
            t[h + 4 + i] = _mm512_shuffle_i32x4(r[h + i], r[h + 4 + i], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    }
    for (int i = 0; i < 16; i++)
        _mm512_storeu_si512(dst + i * ldd, r[i]);
}
#endif

void ckv_transpose_u32(const uint32_t *src, int64_t lds, int64_t rows, int64_t W, uint32_t *dst, int64_t ldd) {
    int64_t t0 = 0;
#if CKV_X86_INTRINSICS
    if (row_level() >= 2)
        for (; t0 + 16 <= rows; t0 += 16) {
            int64_t w0 = 0;
            for (; w0 + 16 <= W; w0 += 16)
                transpose16_avx512(src + t0 * lds + w0, lds, dst + w0 * ldd + t0, ldd);
            for (int64_t t = t0; t < t0 + 16; t++) /* the last W % 16 words */
                for (int64_t w = w0; w < W; w++)
                    dst[w * ldd + t] = src[t * lds + w];
        }
#endif
    for (int64_t t = t0; t < rows; t++)
        for (int64_t w = 0; w < W; w++)
            dst[w * ldd + t] = src[t * lds + w];
}

void ckv_dot_tile(const float *q, int64_t R, int64_t D, const float *kt, float *out, int64_t ld, int64_t T,
                  float *vmax, int64_t lo, int64_t hi) {
#if CKV_X86_INTRINSICS
    if (row_level() >= 2) {
        dot_tile_f32_avx512(q, R, D, kt, out, ld, T, vmax, lo, hi);
        return;
    }
#endif
    dot_tile_portable(q, R, D, kt, out, ld, T, vmax, lo, hi);
}

int ckv_cpu_has_bf16_dot(void) { return row_level() >= 3; }

void ckv_dot_tile_bf16(const uint32_t *q2, int64_t R, int64_t D2, const uint32_t *kt2, float scale, float *out,
                       int64_t ld, int64_t T, float *vmax, int64_t lo, int64_t hi) {
#if CKV_X86_INTRINSICS
    if (row_level() >= 3) {
        dot_tile_bf16_avx512(q2, R, D2, kt2, scale, out, ld, T, vmax, lo, hi);
        return;
    }
#endif
    /* portable fallback (callers check ckv_cpu_has_bf16_dot first; this keeps the function total) */
    for (int64_t r = 0; r < R; r++)
        for (int64_t t = 0; t < T; t++) {
            float a = 0.0f;
            for (int64_t d = 0; d < D2; d++) {
                const uint32_t x = q2[r * D2 + d], y = kt2[d * CKV_KEY_TILE + t];
                a += ckv_bits_to_f32(x << 16) * ckv_bits_to_f32(y << 16);
                a += ckv_bits_to_f32(x & 0xffff0000u) * ckv_bits_to_f32(y & 0xffff0000u);
            }
            out[r * ld + t] = a * scale;
            if (t >= lo && t < hi && out[r * ld + t] > vmax[r * CKV_KEY_TILE + t])
                vmax[r * CKV_KEY_TILE + t] = out[r * ld + t];
        }
}

const char *ckv_cpu_row_level(void) {
    static const char *names[] = {"baseline", "avx2", "avx512", "avx512-bf16"};
    return names[row_level()];
}

CKV_CLONES
void ckv_axpy(float *dst, const float *src, int64_t n, float a) {
    for (int64_t j = 0; j < n; j++)
        dst[j] += src[j] * a;
}
