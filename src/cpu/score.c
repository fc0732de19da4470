/*
 * score.c -- window-attention token scores on the CPU.  <-- a token's score is computed here
 *
 * For one (batch row b, KV head g) the G*w window queries of the heads that
 * read g form the rows of a small matrix Q [R = G*w, D]. Keys are read in
 * tiles of CKV_KEY_TILE, transposed for the register tiles of cpu/simd.c, for
 * all R rows (at long L the G heads go in passes, so the numerators stay in
 * cache). Each span of 1024 keys' logits becomes softmax numerators while in
 * cache; a last pass rescales each span and adds the probabilities of keys
 * j < P into scores[b, g, :P] (row by row, in fp32). Long query sets (H2O
 * passes all L prompt queries) are scored in blocks of CKV_QUERY_BLOCK
 * queries, each against only the keys it can see, so nothing is L x L.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../backend.h"
#include "half.h"
#include "simd.h"

/* Element pointer of a 4-D view at (i0, i1, i2, 0). */
static inline const char *row_ptr(const ckv_tensor *t, int64_t i0, int64_t i1, int64_t i2) {
    return (const char *)t->data +
           (i0 * t->strides[0] + i1 * t->strides[1] + i2 * t->strides[2]) * (int64_t)ckv_itemsize(t->dtype);
}

/* Query rows scored together: the window is one block; H2O's L queries are many. */
#define CKV_QUERY_BLOCK 64

/* Keys per span of the softmax (a multiple of CKV_KEY_TILE): R x 1024 logits stay in L2 while they
 * become numerators. */
#define CKV_SPAN_KEYS 1024

/* Numerators one thread keeps for a pass (floats): 8 MiB, so two threads' fit a 32 MiB L3. */
#define CKV_NUMER_FLOATS (2 * 1024 * 1024)

/* Floats of scratch one (b, g) task needs: numerators [R, L], queries [R, D], key tile [D, T], lane maxima
 * [R, T], per-span shifts and sums [R, spans] each, running maxima [R]. */
static size_t task_scratch(int64_t R, int64_t L, int64_t D) {
    const int64_t spans = (L + CKV_SPAN_KEYS - 1) / CKV_SPAN_KEYS;
    return (size_t)(R * L + R * D + D * CKV_KEY_TILE + R * CKV_KEY_TILE + 2 * R * spans + R);
}

/* Keys j0 .. j0+T-1 of (b, g) as fp32, transposed into kt [D, CKV_KEY_TILE]; columns T.. are zero. */
static void pack_key_tile(const ckv_tensor *k, int64_t b, int64_t g, int64_t j0, int64_t T, float *kt) {
    const int64_t D = k->shape[3], sd = k->strides[3];
    if (T < CKV_KEY_TILE)
        memset(kt, 0, (size_t)(D * CKV_KEY_TILE) * sizeof *kt);
    if (k->dtype == CKV_DTYPE_F32 && sd == 1) { /* rows of D contiguous floats: a blocked transpose */
        ckv_transpose_u32((const uint32_t *)row_ptr(k, b, g, j0), k->strides[2], T, D, (uint32_t *)kt, CKV_KEY_TILE);
        return;
    }
    for (int64_t t = 0; t < T; t++) {
        const char *src = row_ptr(k, b, g, j0 + t);
        float *col = kt + t;
        /* one loop per dtype, so the conversion is not re-decided per element */
        switch (k->dtype) {
        case CKV_DTYPE_BF16:
            for (int64_t d = 0; d < D; d++)
                col[d * CKV_KEY_TILE] = ckv_bf16_to_f32(((const uint16_t *)src)[d * sd]);
            break;
        case CKV_DTYPE_F16:
            for (int64_t d = 0; d < D; d++)
                col[d * CKV_KEY_TILE] = ckv_f16_to_f32(((const uint16_t *)src)[d * sd]);
            break;
        default:
            for (int64_t d = 0; d < D; d++)
                col[d * CKV_KEY_TILE] = ((const float *)src)[d * sd];
            break;
        }
    }
}

/* One bf16 row of D elements (element stride sd) as D2 = ceil(D/2) pairs, the even d in the low half and
 * a zero after an odd D; pair i goes to dst[i * dst_stride]. */
static void pack_bf16_pairs(const char *src, int64_t sd, int64_t D, uint32_t *dst, int64_t dst_stride) {
    const uint16_t *x = (const uint16_t *)src;
    for (int64_t d = 0; d + 1 < D; d += 2)
        dst[(d / 2) * dst_stride] = (uint32_t)x[d * sd] | (uint32_t)x[(d + 1) * sd] << 16;
    if (D % 2)
        dst[(D / 2) * dst_stride] = (uint32_t)x[(D - 1) * sd];
}

/* Keys j0 .. j0+T-1 of (b, g), bf16, as pairs of neighbouring d transposed into kt2 [D2, CKV_KEY_TILE];
 * columns T.. are zero. */
static void pack_key_tile_bf16(const ckv_tensor *k, int64_t b, int64_t g, int64_t j0, int64_t T, uint32_t *kt2) {
    const int64_t D = k->shape[3], D2 = (D + 1) / 2;
    const char *first = row_ptr(k, b, g, j0);
    if (T < CKV_KEY_TILE)
        memset(kt2, 0, (size_t)(D2 * CKV_KEY_TILE) * sizeof *kt2);
    /* rows of contiguous, 4-byte aligned pairs: a blocked transpose of 32-bit words */
    if (k->strides[3] == 1 && D % 2 == 0 && k->strides[2] % 2 == 0 && (uintptr_t)first % 4 == 0) {
        ckv_transpose_u32((const uint32_t *)first, k->strides[2] / 2, T, D2, kt2, CKV_KEY_TILE);
        return;
    }
    for (int64_t t = 0; t < T; t++)
        pack_bf16_pairs(row_ptr(k, b, g, j0 + t), k->strides[3], D, kt2 + t, CKV_KEY_TILE);
}

/*
 * Queries i0 .. i0+nq-1 of q (of w in all, sitting at positions L-w .. L-1) of
 * the query heads h0 .. h0+nh-1 of KV head g: each sees keys [start, L-w+i]; its
 * probabilities of keys j < acc are added to out[j].
 *
 * Keys go in spans of CKV_SPAN_KEYS: the span's logits (R x 1024 floats, in L2)
 * are computed tile by tile, then each row's span becomes softmax numerators
 * shifted by the row's running maximum, while still in cache. A last pass scales
 * each span by exp(shift - final maximum) / sum and adds it to out: the softmax
 * with the numerators written and read once. Within a span every key of a row
 * shares one shift, so equal logits there give equal scores.
 */
static void score_block(const ckv_tensor *q, const ckv_tensor *k, int64_t b, int64_t g, int64_t h0, int64_t nh,
                        float scale, int64_t start, int64_t i0, int64_t nq, int64_t acc, float *out, float *scratch) {
    const int64_t G = q->shape[1] / k->shape[1], w = q->shape[2], D = q->shape[3];
    const int64_t first_pos = k->shape[2] - w + i0; /* position of query i0 */
    const int64_t Lk = first_pos + nq;              /* keys any of these queries sees */
    const int64_t R = nh * nq, nspans = (Lk + CKV_SPAN_KEYS - 1) / CKV_SPAN_KEYS;
    float *numer = scratch;             /* [R, Lk]: logits, then softmax numerators */
    float *qm = numer + R * Lk;         /* [R, D]: queries, pre-scaled fp32 or bf16 pairs */
    float *kt = qm + R * D;             /* [D, CKV_KEY_TILE]: one transposed key tile */
    float *vmax = kt + D * CKV_KEY_TILE; /* [R, CKV_KEY_TILE]: lane maxima of the keys all rows see */
    float *shift = vmax + R * CKV_KEY_TILE; /* [R, nspans]: each span's shift, then its factor */
    float *sums = shift + R * nspans;   /* [R, nspans]: each span's sum of numerators */
    float *run_max = sums + R * nspans; /* [R] */
    const int bf16 = q->dtype == CKV_DTYPE_BF16 && k->dtype == CKV_DTYPE_BF16 && ckv_cpu_has_bf16_dot();
    const int64_t D2 = (D + 1) / 2;
    uint32_t *q2 = (uint32_t *)qm, *kt2 = (uint32_t *)kt;

    for (int64_t h = 0; h < nh; h++)
        for (int64_t i = 0; i < nq; i++) {
            const char *src = row_ptr(q, b, g * G + h0 + h, i0 + i);
            if (bf16) { /* operands stay bf16; the scale is applied to the fp32 logits */
                pack_bf16_pairs(src, q->strides[3], D, q2 + (h * nq + i) * D2, 1);
                continue;
            }
            float *dst = qm + (h * nq + i) * D;
            for (int64_t d = 0; d < D; d++)
                dst[d] = ckv_load_f32(src, q->dtype, d * q->strides[3]) * scale;
        }
    for (int64_t r = 0; r < R; r++)
        run_max[r] = -INFINITY;

    for (int64_t sp = 0; sp < nspans; sp++) {
        const int64_t c0 = sp * CKV_SPAN_KEYS, c1 = c0 + CKV_SPAN_KEYS < Lk ? c0 + CKV_SPAN_KEYS : Lk;
        for (int64_t i = 0; i < R * CKV_KEY_TILE; i++)
            vmax[i] = -INFINITY;
        for (int64_t j0 = c0; j0 < c1; j0 += CKV_KEY_TILE) {
            const int64_t T = c1 - j0 < CKV_KEY_TILE ? c1 - j0 : CKV_KEY_TILE;
            /* the lane maxima cover the keys every row sees: [start, first_pos] */
            if (bf16) {
                pack_key_tile_bf16(k, b, g, j0, T, kt2);
                ckv_dot_tile_bf16(q2, R, D2, kt2, scale, numer + j0, Lk, T, vmax, start - j0, first_pos + 1 - j0);
            } else {
                pack_key_tile(k, b, g, j0, T, kt);
                ckv_dot_tile(qm, R, D, kt, numer + j0, Lk, T, vmax, start - j0, first_pos + 1 - j0);
            }
        }
        for (int64_t r = 0; r < R; r++) {
            const int64_t visible = first_pos + r % nq + 1; /* query sees keys [start, its position] */
            const int64_t lo = start > c0 ? start : c0, hi = visible < c1 ? visible : c1;
            if (hi <= lo) { /* nothing of this span is visible to the row */
                shift[r * nspans + sp] = -INFINITY;
                sums[r * nspans + sp] = 0.0f;
                continue;
            }
            /* the span's maximum: the lanes, then the row's own keys past first_pos */
            float mx = run_max[r];
            for (int64_t t = 0; t < CKV_KEY_TILE; t++)
                mx = vmax[r * CKV_KEY_TILE + t] > mx ? vmax[r * CKV_KEY_TILE + t] : mx;
            for (int64_t j = first_pos + 1 > lo ? first_pos + 1 : lo; j < hi; j++)
                mx = numer[r * Lk + j] > mx ? numer[r * Lk + j] : mx;
            const float sum = ckv_exp_shift_sum(numer + r * Lk + lo, hi - lo, mx);
            if (isnan(sum)) { /* a non-finite logit (or maximum): poison the scores, ops.c reports them */
                for (int64_t j = 0; j < acc; j++)
                    out[j] = NAN;
                return;
            }
            run_max[r] = mx;
            shift[r * nspans + sp] = mx;
            sums[r * nspans + sp] = sum;
        }
    }

    for (int64_t r = 0; r < R; r++) {
        const int64_t visible = first_pos + r % nq + 1;
        if (visible <= start)
            continue; /* a padding query: it pays no attention */
        const int64_t upto = acc < visible ? acc : visible; /* probabilities accumulated: keys [start, upto) */
        float *factor = shift + r * nspans;
        const float *sum = sums + r * nspans, mx = run_max[r];
        for (int64_t sp = 0; sp < nspans; sp++) /* spans it cannot see hold sum 0 */
            factor[sp] = factor[sp] == -INFINITY ? mx : factor[sp];
        ckv_exp_shift_sum(factor, nspans, mx); /* factor = exp(shift - max), in [0, 1] */
        float total = 0.0f;
        for (int64_t sp = 0; sp < nspans; sp++)
            total += sum[sp] * factor[sp];
        for (int64_t sp = 0; sp < nspans; sp++) {
            const int64_t c0 = sp * CKV_SPAN_KEYS, lo = start > c0 ? start : c0;
            const int64_t hi = c0 + CKV_SPAN_KEYS < upto ? c0 + CKV_SPAN_KEYS : upto;
            if (hi > lo)
                ckv_axpy(out + lo, numer + r * Lk + lo, hi - lo, factor[sp] / total);
        }
    }
}

/* The (b, g) tasks of one ckv_score_cpu call. */
typedef struct {
    const ckv_tensor *q, *k;
    float scale;
    const int64_t *row_starts;
    int64_t P, H, G, w, block, nh;
    float *scores;
} score_job;

static void score_task(void *ctx, int64_t task, void *scratch) {
    const score_job *job = ctx;
    const int64_t H = job->H, G = job->G, w = job->w, block = job->block, nh = job->nh, P = job->P;
    float *out = job->scores + task * P;
    const int64_t start = job->row_starts ? job->row_starts[task / H] : 0;
    memset(out, 0, (size_t)P * sizeof *out);
    for (int64_t i0 = 0; i0 < w; i0 += block)
        for (int64_t h0 = 0; h0 < G; h0 += nh)
            score_block(job->q, job->k, task / H, task % H, h0, G - h0 < nh ? G - h0 : nh, job->scale, start, i0,
                        w - i0 < block ? w - i0 : block, P, out, scratch);
}

ckv_status ckv_score_cpu(const ckv_tensor *q, const ckv_tensor *k, float scale, const int64_t *row_starts,
                         ckv_tensor *scores, void *stream) {
    (void)stream;
    const int64_t H = k->shape[1], L = k->shape[2], D = k->shape[3];
    const int64_t w = q->shape[2], G = q->shape[1] / H;
    const int64_t block = w < CKV_QUERY_BLOCK ? w : CKV_QUERY_BLOCK;
    /* query heads per pass: the numerators [heads * block, L] of a thread stay within CKV_NUMER_FLOATS (so
     * they stay in the last-level cache) at the price of reading the keys once per pass */
    int64_t nh = CKV_NUMER_FLOATS / (block * L);
    nh = nh < 1 ? 1 : nh > G ? G : nh;
    const int64_t tasks = k->shape[0] * H;
    const score_job job = {q, k, ckv_scale_or_default(scale, D), row_starts, scores->shape[2], H, G, w, block, nh,
                           (float *)scores->data};
    const size_t per_task = task_scratch(nh * block, L, D);
    const int nthreads = ckv_threads_for(tasks, (double)tasks * (double)(G * w) * (double)L * (double)D);
    return ckv_parallel_tasks("ckv_score", tasks, nthreads, per_task * sizeof(float), score_task, (void *)&job);
}
