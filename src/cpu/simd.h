/*
 * simd.h -- the inner loops of scoring (cpu/simd.c): portable C plus AVX-512,
 * AVX512-BF16 and AVX2 versions, picked once at run time.
 */
#ifndef CKV_CPU_SIMD_H
#define CKV_CPU_SIMD_H

#include <stdint.h>

#define CKV_KEY_TILE 32

/* out[r * ld + t] = sum_d q[r * D + d] * kt[d * CKV_KEY_TILE + t] for r < R, t < T.
 * kt is one tile of keys, transposed and zero-padded to CKV_KEY_TILE columns. The logits of columns
 * lo <= t < hi also raise vmax[r * CKV_KEY_TILE + t] (per-lane running row maxima, fused here so the
 * softmax needs no separate pass for them). */
void ckv_dot_tile(const float *q, int64_t R, int64_t D, const float *kt, float *out, int64_t ld, int64_t T,
                  float *vmax, int64_t lo, int64_t hi);

/* row[j] = exp(row[j] - shift) for j < n; returns their sum (fp32), or NaN when shift or any row[j]
 * is not finite (the caller reports non-finite scores). */
float ckv_exp_shift_sum(float *row, int64_t n, float shift);

/* dst[j] += a * src[j] for j < n. */
void ckv_axpy(float *dst, const float *src, int64_t n, float a);

/* dst[w * ldd + t] = src[t * lds + w] for t < rows, w < W: 32-bit words (fp32, or bf16 pairs), in blocks
 * of 16 x 16 in registers when the CPU has AVX-512. */
void ckv_transpose_u32(const uint32_t *src, int64_t lds, int64_t rows, int64_t W, uint32_t *dst, int64_t ldd);

/* 1 when ckv_dot_tile_bf16 runs on AVX512-BF16 dot-product instructions (and CHUNKKV_SIMD allows it). */
int ckv_cpu_has_bf16_dot(void);

/* out[r * ld + t] = scale * sum_d q[r, d] k[t, d] for r < R, t < T, with bf16 operands packed in pairs of
 * neighbouring d (low half the even d): q2 [R, D2] and one key tile kt2 [D2, CKV_KEY_TILE], zero-padded.
 * Products are exact and accumulate in fp32. vmax, lo, hi: as for ckv_dot_tile. */
void ckv_dot_tile_bf16(const uint32_t *q2, int64_t R, int64_t D2, const uint32_t *kt2, float scale, float *out,
                       int64_t ld, int64_t T, float *vmax, int64_t lo, int64_t hi);

/* "avx512-bf16", "avx512", "avx2" or "baseline": the level of the softmax row passes (CHUNKKV_SIMD lowers it). */
const char *ckv_cpu_row_level(void);

/* fp32 GFLOP/s of independent FMAs held in registers, on `threads` OpenMP threads for about `seconds`. */
double ckv_cpu_fma_peak(int threads, double seconds);

#endif /* CKV_CPU_SIMD_H */
