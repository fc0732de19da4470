/*
 * score.c -- window-attention token scores on the CPU.  <-- a token's score is computed here
 *
 * For one (batch row b, KV head g) the G*w window queries of the heads that
 * read g form the rows of a small matrix Q [R = G*w, D]. Each key is loaded
 * once (as fp32, in tiles of CKV_KEY_TILE) for all R rows, the logits
 * Q . K^T land in a per-thread buffer [R, L], each row becomes a causal
 * softmax, and the probabilities of the prefix are summed into
 * scores[b, g, :P] (row by row, in fp32).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../core.h"
#include "half.h"
#include "simd.h"

/* Element pointer of a 4-D view at (i0, i1, i2, 0). */
static inline const char *row_ptr(const ckv_tensor *t, int64_t i0, int64_t i1, int64_t i2) {
    return (const char *)t->data +
           (i0 * t->strides[0] + i1 * t->strides[1] + i2 * t->strides[2]) * (int64_t)ckv_itemsize(t->dtype);
}

/* Floats of scratch one (b, g) task needs: logits [R, L], queries [R, D], key tile [D, T]. */
static size_t task_scratch(int64_t R, int64_t L, int64_t D) {
    return (size_t)(R * L + R * D + D * CKV_KEY_TILE);
}

static void score_one(const ckv_tensor *q, const ckv_tensor *k, int64_t b, int64_t g, float scale, int64_t start,
                      float *out /* [P] */, float *scratch) {
    const int64_t G = q->shape[1] / k->shape[1], w = q->shape[2], D = q->shape[3];
    const int64_t L = k->shape[2], P = L - w, R = G * w;
    float *logits = scratch;    /* [R, L] */
    float *qm = logits + R * L; /* [R, D], pre-scaled */
    float *kt = qm + R * D;     /* [D, CKV_KEY_TILE] */

    for (int64_t h = 0; h < G; h++)
        for (int64_t i = 0; i < w; i++) {
            const char *src = row_ptr(q, b, g * G + h, i);
            float *dst = qm + (h * w + i) * D;
            for (int64_t d = 0; d < D; d++)
                dst[d] = ckv_load_f32(src, q->dtype, d * q->strides[3]) * scale;
        }

    for (int64_t j0 = 0; j0 < L; j0 += CKV_KEY_TILE) {
        const int64_t T = L - j0 < CKV_KEY_TILE ? L - j0 : CKV_KEY_TILE;
        for (int64_t t = 0; t < CKV_KEY_TILE; t++) {
            const char *src = t < T ? row_ptr(k, b, g, j0 + t) : NULL;
            for (int64_t d = 0; d < D; d++)
                kt[d * CKV_KEY_TILE + t] = src ? ckv_load_f32(src, k->dtype, d * k->strides[3]) : 0.0f;
        }
        ckv_dot_tile(qm, R, D, kt, logits + j0, L, T);
    }

    memset(out, 0, (size_t)P * sizeof *out);
    for (int64_t r = 0; r < R; r++) {
        const int64_t visible = P + r % w + 1; /* window query i sees keys [start, P + i] */
        if (visible <= start)
            continue; /* a padding query: it pays no attention */
        float *row = logits + r * L + start;
        float *dst = out + start;
        const int64_t span = visible - start, prefix = P > start ? P - start : 0;
        float mx = -INFINITY, probe = 0.0f; /* probe turns NaN if any logit is NaN or Inf */
        for (int64_t j = 0; j < span; j++) {
            mx = row[j] > mx ? row[j] : mx;
            probe += row[j] * 0.0f;
        }
        if (probe != 0.0f) { /* poison the scores: ops.c reports non-finite scores */
            for (int64_t j = 0; j < P; j++)
                out[j] = NAN;
            return;
        }
        const float inv = 1.0f / ckv_exp_shift_sum(row, span, mx);
        for (int64_t j = 0; j < prefix; j++)
            dst[j] += row[j] * inv;
    }
}

ckv_status ckv_score_cpu(const ckv_tensor *q, const ckv_tensor *k, float scale, const int64_t *row_starts,
                         float *scores) {
    const int64_t H = k->shape[1], L = k->shape[2], D = k->shape[3];
    const int64_t w = q->shape[2], P = L - w, R = q->shape[1] / H * w;
    const int64_t tasks = k->shape[0] * H;
    const size_t per_task = task_scratch(R, L, D);
    int nthreads = ckv_threads();
    if (nthreads > tasks)
        nthreads = tasks > 0 ? (int)tasks : 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* one scratch buffer per thread, reused across its tasks */
        float *scratch = malloc(per_task * sizeof(float));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++)
            if (scratch)
                score_one(q, k, task / H, task % H, scale, row_starts ? row_starts[task / H] : 0, scores + task * P,
                          scratch);
        free(scratch);
    }
    if (failed)
        return ckv_fail(CKV_ERR_NOMEM, "ckv_score: could not allocate %zu bytes of scratch per thread",
                        per_task * sizeof(float));
    return CKV_OK;
}
