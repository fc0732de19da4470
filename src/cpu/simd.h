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

/* row[j] = exp(row[j] - shift) for j < n; returns their sum (fp32). */
float ckv_exp_shift_sum(float *row, int64_t n, float shift);

/* "avx512", "avx2", or "baseline": the clone the dispatcher picks on this CPU. */
const char *ckv_cpu_simd_level(void);

#endif /* CKV_CPU_SIMD_H */
