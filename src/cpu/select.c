/*
 * select.c -- which positions each row keeps, from its token scores.
 *
 * Every method marks the positions it keeps in a byte mask over [0, L) and
 * the mask is written out in ascending order, so all rows come out sorted.
 * The observation window [P, L) is always kept; the methods differ in how
 * they spend the prefix budget Bp = budget - w.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core.h"

/* A ranked candidate: higher score first, ties to the lower position. */
typedef struct {
    double score;
    int64_t pos;
} ranked;

static int by_score_then_pos(const void *pa, const void *pb) {
    const ranked *a = pa, *b = pb;
    if (a->score != b->score)
        return a->score > b->score ? -1 : 1;
    return (a->pos > b->pos) - (a->pos < b->pos);
}

/* Keep the k best of scores[first, first + n) (k <= n). */
static void keep_best_tokens(const float *scores, int64_t first, int64_t n, int64_t k, ranked *tmp,
                             unsigned char *keep) {
    for (int64_t j = 0; j < n; j++)
        tmp[j] = (ranked){scores[first + j], first + j};
    qsort(tmp, (size_t)n, sizeof *tmp, by_score_then_pos);
    for (int64_t j = 0; j < k; j++)
        keep[tmp[j].pos] = 1;
}

/* The paper's rule: whole chunks best-first while they fit, then the best
 * tokens of the first chunk that does not fit, then stop. */
static void select_chunkkv(const float *s, int64_t P, int64_t Bp, int64_t c, ranked *tmp, unsigned char *keep) {
    if (c > P) /* one chunk holds the whole prefix; also keeps P + c - 1 and lo + c from overflowing */
        c = P;
    const int64_t nchunks = (P + c - 1) / c;
    ranked *chunks = tmp;            /* [nchunks] */
    ranked *tokens = tmp + nchunks;  /* [c] */
    for (int64_t m = 0; m < nchunks; m++) {
        const int64_t lo = m * c, hi = lo + c < P ? lo + c : P;
        double sum = 0.0;
        for (int64_t j = lo; j < hi; j++)
            sum += s[j];
        chunks[m] = (ranked){sum, m};
    }
    qsort(chunks, (size_t)nchunks, sizeof *chunks, by_score_then_pos);
    int64_t left = Bp;
    for (int64_t r = 0; r < nchunks && left > 0; r++) {
        const int64_t lo = chunks[r].pos * c, hi = lo + c < P ? lo + c : P;
        if (hi - lo <= left) {
            memset(keep + lo, 1, (size_t)(hi - lo));
            left -= hi - lo;
        } else {
            keep_best_tokens(s, lo, hi - lo, left, tokens, keep);
            break;
        }
    }
}

/* SnapKV: pool the scores over neighbouring tokens, keep the best Bp. */
static void select_snapkv(const float *s, int64_t P, int64_t Bp, int64_t kernel, int use_max, float *pooled,
                          ranked *tmp, unsigned char *keep) {
    const int64_t half = kernel / 2;
    for (int64_t j = 0; j < P; j++) {
        const int64_t lo = j - half > 0 ? j - half : 0, hi = j + half + 1 < P ? j + half + 1 : P;
        float acc = use_max ? s[lo] : 0.0f;
        for (int64_t t = lo; t < hi; t++)
            acc = use_max ? (s[t] > acc ? s[t] : acc) : acc + s[t];
        /* average pooling counts the zero padding, as avg_pool1d does by default */
        pooled[j] = use_max ? acc : acc / (float)kernel;
    }
    keep_best_tokens(pooled, 0, P, Bp, tmp, keep);
}

/* splitmix64: a tiny, well-mixed generator; enough for a random floor. */
static uint64_t next_random(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void select_random(int64_t P, int64_t Bp, uint64_t seed, int64_t *perm, unsigned char *keep) {
    uint64_t state = seed;
    for (int64_t j = 0; j < P; j++)
        perm[j] = j;
    for (int64_t j = 0; j < Bp; j++) { /* partial Fisher-Yates */
        int64_t pick = j + (int64_t)(next_random(&state) % (uint64_t)(P - j));
        int64_t t = perm[j];
        perm[j] = perm[pick];
        perm[pick] = t;
        keep[perm[j]] = 1;
    }
}

/* One row whose tokens are [0, L) (the caller shifts rows that start later). */
static void select_row(const float *s, int64_t P, int64_t L, const ckv_select_params *params, uint64_t seed,
                       ranked *tmp, float *pooled, unsigned char *keep) {
    const int64_t w = L - P, Bp = params->budget - w;
    memset(keep, 0, (size_t)L);
    memset(keep + P, 1, (size_t)w);
    switch (params->method) {
    case CKV_METHOD_CHUNKKV:
        select_chunkkv(s, P, Bp, params->chunk_size, tmp, keep);
        break;
    case CKV_METHOD_SNAPKV:
        select_snapkv(s, P, Bp, params->pool_kernel, params->pool_max, pooled, tmp, keep);
        break;
    case CKV_METHOD_H2O: /* heavy hitters: the best Bp column sums (no pooling) */
        keep_best_tokens(s, 0, P, Bp, tmp, keep);
        break;
    case CKV_METHOD_CHUNKKV_KVPRESS: /* handled by ckv_select_kvpress_rows_cpu */
        break;
    case CKV_METHOD_STREAMINGLLM: {
        /* the first sinks, then the most recent tokens up to the budget */
        const int64_t sinks = params->n_sink < Bp ? params->n_sink : Bp;
        memset(keep, 1, (size_t)sinks);
        memset(keep + L - (params->budget - sinks), 1, (size_t)(params->budget - sinks));
        break;
    }
    case CKV_METHOD_RANDOM:
        select_random(P, Bp, seed, (int64_t *)tmp, keep);
        break;
    }
}

ckv_status ckv_select_rows_cpu(const float *scores, int64_t rows, int64_t P, int64_t L,
                               const ckv_select_params *params, int64_t rows_per_start, int64_t *out) {
    const int64_t n = ckv_kept_count(params->budget, L);
    /* scratch: a mask over L, ranked entries for up to P + c + 1 candidates, pooled scores [P];
     * select_chunkkv clamps c to the row's prefix, so c <= P here too (a huge chunk_size would
     * otherwise overflow this size or ask for terabytes) */
    const int64_t c = params->chunk_size < P ? params->chunk_size : P;
    const size_t nranked = (size_t)(P + c + 1);
    const size_t bytes = (size_t)L + nranked * sizeof(ranked) + (size_t)P * sizeof(float);
    const int nthreads = ckv_threads_for(rows, 16.0 * (double)rows * (double)L);
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        char *buf = malloc(bytes);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++) {
            int64_t *dst = out + r * n;
            const int64_t start = params->row_starts ? params->row_starts[r / rows_per_start] : 0;
            if (!buf)
                continue;
            if (params->budget >= L - start) {
                /* the row has no more than n tokens: keep them all; padding fills the leading slots */
                for (int64_t t = 0; t < n; t++)
                    dst[t] = L - n + t;
                continue;
            }
            /* from here the row's own tokens [start, L) hold more than budget >= w: its prefix is non-empty */
            ranked *tmp = (ranked *)buf;
            float *pooled = (float *)(tmp + nranked);
            unsigned char *keep = (unsigned char *)(pooled + P);
            const uint64_t seed = params->seed + 0x632be59bd9b4e019ull * (uint64_t)r;
            select_row(scores ? scores + r * P + start : NULL, P - start, L - start, params, seed, tmp, pooled, keep);
            int64_t t = 0;
            for (int64_t j = 0; j < L - start && t < n; j++)
                if (keep[j])
                    dst[t++] = start + j;
        }
        free(buf);
    }
    if (failed)
        return ckv_fail(CKV_ERR_NOMEM, "ckv_select: could not allocate %zu bytes of scratch per thread", bytes);
    return CKV_OK;
}

ckv_status ckv_select_kvpress_rows_cpu(const float *token_scores, int64_t rows, int64_t L, int64_t c,
                                       int64_t n_keep, int64_t n, int64_t *out) {
    const int64_t nchunks = (L + c - 1) / c;
    const size_t bytes = (size_t)nchunks * sizeof(ranked) + (size_t)L;
    int failed = 0;
    const int nthreads = ckv_threads_for(rows, 16.0 * (double)rows * (double)L);
#pragma omp parallel num_threads(nthreads)
    {
        char *buf = malloc(bytes);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++) {
            if (!buf)
                continue;
            ranked *chunks = (ranked *)buf;
            unsigned char *keep = (unsigned char *)(chunks + nchunks);
            const float *s = token_scores + r * L;
            for (int64_t m = 0; m < nchunks; m++) { /* the mean of each chunk, the short last one too */
                const int64_t lo = m * c, hi = lo + c < L ? lo + c : L;
                double sum = 0.0;
                for (int64_t j = lo; j < hi; j++)
                    sum += s[j];
                chunks[m] = (ranked){sum / (double)(hi - lo), m};
            }
            qsort(chunks, (size_t)nchunks, sizeof *chunks, by_score_then_pos);
            memset(keep, 0, (size_t)L);
            for (int64_t m = 0; m < n_keep && m < nchunks; m++) {
                const int64_t lo = chunks[m].pos * c, hi = lo + c < L ? lo + c : L;
                memset(keep + lo, 1, (size_t)(hi - lo));
            }
            int64_t *dst = out + r * n, t = 0;
            for (int64_t j = 0; j < L && t < n; j++)
                if (keep[j])
                    dst[t++] = j;
            for (; t < n; t++)
                dst[t] = -1;
        }
        free(buf);
    }
    if (failed)
        return ckv_fail(CKV_ERR_NOMEM, "ckv_select: could not allocate %zu bytes of scratch per thread", bytes);
    return CKV_OK;
}

ckv_status ckv_select_from_scores_cpu(const ckv_tensor *scores, int64_t L, const ckv_select_params *params,
                                      ckv_tensor *indices) {
    const int per_head = scores->ndim == 3;
    const int64_t H = per_head ? scores->shape[1] : 1, P = scores->shape[scores->ndim - 1];
    const int64_t rows = scores->shape[0] * H;
    const float *s = (const float *)scores->data;
    for (int64_t j = 0; j < rows * P; j++)
        if (!isfinite(s[j]))
            return ckv_fail(CKV_ERR_VALUE, "ckv_select_from_scores: scores[%lld] is not finite (NaN or Inf)",
                            (long long)j);
    return ckv_select_rows_cpu(s, rows, P, L, params, H, (int64_t *)indices->data);
}
