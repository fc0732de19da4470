/*
 * select.c -- which positions each row keeps, from its token scores: ckv_select_cpu (score, check,
 * pool or sum heads, select) and ckv_select_from_scores_cpu (select from given scores).
 *
 * Every method marks the positions it keeps in a byte mask over [0, L) and
 * the mask is written out in ascending order, so all rows come out sorted.
 * The observation window [P, L) is always kept; the methods differ in how
 * they spend the prefix budget Bp = budget - w.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../backend.h"

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
    const int64_t nchunks = ckv_chunk_count(P, c);
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
    case CKV_METHOD_CHUNKKV_KVPRESS: /* handled by select_kvpress_rows */
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

/* Threads for selecting rows of L tokens. */
static int select_threads(int64_t rows, int64_t L) { return ckv_threads_for(rows, 16.0 * (double)rows * (double)L); }

/* One selection per row of scores [rows, P] (NULL for score-free methods) into out [rows, n]. */
typedef struct {
    const float *scores;
    int64_t P, L, n, rows_per_start;
    size_t nranked;
    const ckv_select_params *params;
    int64_t *out;
} rows_job;

static void select_one_row(void *ctx, int64_t r, void *buf) {
    const rows_job *job = ctx;
    const ckv_select_params *params = job->params;
    const int64_t P = job->P, L = job->L, n = job->n;
    int64_t *dst = job->out + r * n;
    const int64_t start = params->row_starts ? params->row_starts[r / job->rows_per_start] : 0;
    if (params->budget >= L - start) {
        /* the row has no more than n tokens: keep them all; padding fills the leading slots */
        for (int64_t t = 0; t < n; t++)
            dst[t] = L - n + t;
        return;
    }
    /* from here the row's own tokens [start, L) hold more than budget >= w: its prefix is non-empty */
    ranked *tmp = (ranked *)buf;
    float *pooled = (float *)(tmp + job->nranked);
    unsigned char *keep = (unsigned char *)(pooled + P);
    const uint64_t seed = params->seed + 0x632be59bd9b4e019ull * (uint64_t)r;
    select_row(job->scores ? job->scores + r * P + start : NULL, P - start, L - start, params, seed, tmp, pooled, keep);
    int64_t t = 0;
    for (int64_t j = 0; j < L - start && t < n; j++)
        if (keep[j])
            dst[t++] = start + j;
}

/* rows_per_start: row r starts at params->row_starts[r / rows_per_start]. */
static ckv_status select_rows(const float *scores, int64_t rows, int64_t P, int64_t L,
                              const ckv_select_params *params, int64_t rows_per_start, int64_t *out) {
    /* scratch: a mask over L, ranked entries for up to P + c + 1 candidates, pooled scores [P];
     * select_chunkkv clamps c to the row's prefix, so c <= P here too (a huge chunk_size would
     * otherwise overflow this size or ask for terabytes) */
    const int64_t c = params->chunk_size < P ? params->chunk_size : P;
    const rows_job job = {scores, P, L, ckv_kept_count(params->budget, L), rows_per_start, (size_t)(P + c + 1), params,
                          out};
    const size_t bytes = (size_t)L + job.nranked * sizeof(ranked) + (size_t)P * sizeof(float);
    return ckv_parallel_tasks("ckv_select", rows, select_threads(rows, L), bytes, select_one_row, (void *)&job);
}

/* chunkkv-kvpress: token scores [rows, L] -> the best n_keep chunks of c, out [rows, n] padded with -1. */
typedef struct {
    const float *token_scores;
    int64_t L, c, nchunks, n_keep, n;
    int64_t *out;
} kvpress_job;

static void kvpress_one_row(void *ctx, int64_t r, void *buf) {
    const kvpress_job *job = ctx;
    const int64_t L = job->L, c = job->c, nchunks = job->nchunks, n = job->n;
    ranked *chunks = (ranked *)buf;
    unsigned char *keep = (unsigned char *)(chunks + nchunks);
    const float *s = job->token_scores + r * L;
    for (int64_t m = 0; m < nchunks; m++) { /* the mean of each chunk, the short last one too */
        const int64_t lo = m * c, hi = lo + c < L ? lo + c : L;
        double sum = 0.0;
        for (int64_t j = lo; j < hi; j++)
            sum += s[j];
        chunks[m] = (ranked){sum / (double)(hi - lo), m};
    }
    qsort(chunks, (size_t)nchunks, sizeof *chunks, by_score_then_pos);
    memset(keep, 0, (size_t)L);
    for (int64_t m = 0; m < job->n_keep && m < nchunks; m++) {
        const int64_t lo = chunks[m].pos * c, hi = lo + c < L ? lo + c : L;
        memset(keep + lo, 1, (size_t)(hi - lo));
    }
    int64_t *dst = job->out + r * n, t = 0;
    for (int64_t j = 0; j < L && t < n; j++)
        if (keep[j])
            dst[t++] = j;
    for (; t < n; t++)
        dst[t] = -1;
}

static ckv_status select_kvpress_rows(const float *token_scores, int64_t rows, int64_t L, int64_t c, int64_t n_keep,
                                      int64_t n, int64_t *out) {
    const kvpress_job job = {token_scores, L, c, ckv_chunk_count(L, c), n_keep, n, out};
    const size_t bytes = (size_t)job.nchunks * sizeof(ranked) + (size_t)L;
    return ckv_parallel_tasks("ckv_select", rows, select_threads(rows, L), bytes, kvpress_one_row, (void *)&job);
}

/* kvpress's token scores out [B, L] from per-head window-attention sums buf [B, H, P] (pooled
 * in place): mean over the w window queries and the G heads of a group, average pooling (zero
 * padded, divided by the kernel), window = global max + 1, summed over heads. */
static void kvpress_token_scores(float *buf, int64_t B, int64_t H, int64_t P, int64_t L, int64_t G, int64_t w,
                                 int64_t kernel, float *tmp /* [P] */, float *out) {
    const int64_t half = kernel / 2;
    const float norm = 1.0f / ((float)w * (float)G);
    float mx = -INFINITY;
    for (int64_t r = 0; r < B * H; r++) {
        float *s = buf + r * P;
        for (int64_t j = 0; j < P; j++) {
            float acc = 0.0f;
            /* only the neighbours inside [0, P): a huge kernel must not mean a huge loop */
            const int64_t lo = j - half > 0 ? j - half : 0, hi = j + half < P - 1 ? j + half : P - 1;
            for (int64_t t = lo; t <= hi; t++)
                acc += s[t] * norm;
            tmp[j] = acc / (float)kernel;
        }
        for (int64_t j = 0; j < P; j++) {
            s[j] = tmp[j];
            mx = s[j] > mx ? s[j] : mx;
        }
    }
    const float window_score = (P > 0 ? mx : 0.0f) + 1.0f;
    for (int64_t b = 0; b < B; b++) {
        float *dst = out + b * L;
        for (int64_t j = 0; j < P; j++) {
            float acc = 0.0f;
            for (int64_t g = 0; g < H; g++)
                acc += buf[(b * H + g) * P + j];
            dst[j] = acc;
        }
        for (int64_t j = P; j < L; j++)
            dst[j] = window_score * (float)H;
    }
}

/* Sum the KV-head rows of scores [B, H, P] into [B, P] (the first B*P floats), in head order. */
static void sum_heads(float *scores, int64_t B, int64_t H, int64_t P) {
    for (int64_t b = 0; b < B; b++) {
        float *acc = scores + b * H * P;
        for (int64_t g = 1; g < H; g++)
            for (int64_t j = 0; j < P; j++)
                acc[j] += acc[g * P + j];
        memmove(scores + b * P, acc, (size_t)P * sizeof(float));
    }
}

/* The position of the first non-finite of s[0, count), or -1. */
static int64_t first_non_finite(const float *s, int64_t count) {
    for (int64_t j = 0; j < count; j++)
        if (!isfinite(s[j]))
            return j;
    return -1;
}

ckv_status ckv_select_cpu(const ckv_tensor *q, const ckv_tensor *k, const ckv_select_params *params,
                          ckv_tensor *indices) {
    static const char op[] = "ckv_select";
    const int64_t B = k->shape[0], H = k->shape[1], L = k->shape[2];
    const int64_t P = ckv_prefix_length(params, L, q->shape[2]);
    const int64_t n = ckv_select_count(params, L);
    const int per_head = params->per_head != 0;
    const int kvpress = params->method == CKV_METHOD_CHUNKKV_KVPRESS;
    const int64_t rows = per_head ? B * H : B;
    const int ranks = params->method != CKV_METHOD_STREAMINGLLM && params->method != CKV_METHOD_RANDOM;
    ckv_status st = CKV_OK;
    float *scores = NULL, *tmp = NULL;
    if (ranks && (kvpress || (params->budget < L && P > 0))) {
        /* B and H come from views that may repeat memory (zero strides): B * H * P can overflow */
        const int64_t per_row = P;
        if (per_row > 0 && B > (int64_t)(SIZE_MAX / sizeof(float)) / H / per_row)
            return ckv_fail(CKV_ERR_NOMEM, "%s: %lld x %lld x %lld token scores do not fit in memory", op,
                            (long long)B, (long long)H, (long long)per_row);
        scores = malloc((size_t)(B * H * (per_row > 0 ? per_row : 1)) * sizeof(float));
        tmp = kvpress ? malloc((size_t)(P + B * L + 1) * sizeof(float)) : NULL; /* pooling row + [B, L] */
        if (!scores || (kvpress && !tmp)) {
            free(scores);
            free(tmp);
            return ckv_fail(CKV_ERR_NOMEM, "%s: could not allocate %lld token scores", op, (long long)(B * H * per_row));
        }
        ckv_tensor view = {scores, CKV_DTYPE_F32, CKV_DEVICE_CPU, 0, 3, {B, H, P, 1}, {H * P, P, 1, 1}};
        st = ckv_score_cpu(q, k, params->scale, params->row_starts, &view, NULL);
        if (st == CKV_OK && first_non_finite(scores, B * H * P) >= 0)
            st = ckv_fail(CKV_ERR_VALUE, "%s: token scores are not finite (NaN or Inf in queries or keys)", op);
        if (st == CKV_OK && kvpress)
            kvpress_token_scores(scores, B, H, P, L, q->shape[1] / H, q->shape[2], params->pool_kernel, tmp, tmp + P);
        else if (st == CKV_OK && !per_head)
            sum_heads(scores, B, H, P);
    }
    if (st == CKV_OK && kvpress)
        st = select_kvpress_rows(tmp + P, B, L, params->chunk_size, ckv_kvpress_chunks(params, L), n,
                                 (int64_t *)indices->data);
    else if (st == CKV_OK)
        st = select_rows(scores, rows, P, L, params, per_head ? H : 1, (int64_t *)indices->data);
    free(scores);
    free(tmp);
    return st;
}

ckv_status ckv_select_from_scores_cpu(const ckv_tensor *scores, int64_t L, const ckv_select_params *params,
                                      ckv_tensor *indices) {
    const int per_head = scores->ndim == 3;
    const int64_t H = per_head ? scores->shape[1] : 1, P = scores->shape[scores->ndim - 1];
    const int64_t rows = scores->shape[0] * H;
    const float *s = (const float *)scores->data;
    const int64_t bad = first_non_finite(s, rows * P);
    if (bad >= 0)
        return ckv_fail(CKV_ERR_VALUE, "ckv_select_from_scores: scores[%lld] is not finite (NaN or Inf)", (long long)bad);
    return select_rows(s, rows, P, L, params, H, (int64_t *)indices->data);
}
