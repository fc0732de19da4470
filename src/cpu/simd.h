/*
 * simd.h -- the two inner loops of scoring, written so the compiler vectorises
 * them, and built for several x86 levels picked at run time (cpu/simd.c).
 */
#ifndef CKV_CPU_SIMD_H
#define CKV_CPU_SIMD_H

#include <stdint.h>

#define CKV_KEY_TILE 32

/* out[r * ld + t] = sum_d q[r * D + d] * kt[d * CKV_KEY_TILE + t] for r < R, t < T.
 * kt is one tile of keys, transposed and zero-padded to CKV_KEY_TILE columns. */
void ckv_dot_tile(const float *q, int64_t R, int64_t D, const float *kt, float *out, int64_t ld, int64_t T);

/* row[j] = exp(row[j] - shift) for j < n; returns their sum (fp32), or NaN when shift or any row[j]
 * is not finite (the caller reports non-finite scores). */
float ckv_exp_shift_sum(float *row, int64_t n, float shift);

/* max of row[0..n) (-inf when n == 0); NaN elements are skipped: ckv_exp_shift_sum reports them. */
float ckv_row_max(const float *row, int64_t n);

/* dst[j] += a * src[j] for j < n. */
void ckv_axpy(float *dst, const float *src, int64_t n, float a);

/* 1 when ckv_dot_tile_bf16 runs on AVX512-BF16 dot-product instructions (and CHUNKKV_SIMD allows it). */
int ckv_cpu_has_bf16_dot(void);

/* out[r * ld + t] = scale * sum_d q[r, d] k[t, d] for r < R, t < T, with bf16 operands packed in pairs of
 * neighbouring d (low half the even d): q2 [R, D2] and one key tile kt2 [D2, CKV_KEY_TILE], zero-padded.
 * Products are exact and accumulate in fp32. */
void ckv_dot_tile_bf16(const uint32_t *q2, int64_t R, int64_t D2, const uint32_t *kt2, float scale, float *out,
                       int64_t ld, int64_t T);

/* "avx512-bf16", "avx512", "avx2" or "baseline": the level of the softmax row passes (CHUNKKV_SIMD lowers it). */
const char *ckv_cpu_row_level(void);

/* "avx512", "avx2", or "baseline": the clone the dispatcher picks on this CPU. */
const char *ckv_cpu_simd_level(void);

#endif /* CKV_CPU_SIMD_H */
