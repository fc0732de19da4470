/*
 * core.h -- what ops.c and the backends share; not part of the public API.
 * Backends trust their arguments: ops.c has checked every one of them.
 */
#ifndef CKV_CORE_H
#define CKV_CORE_H

#include "chunkkv.h"

/* Record the message for ckv_last_error() and return status. printf-style. */
ckv_status ckv_fail(ckv_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

size_t ckv_itemsize(ckv_dtype dtype);

/* Threads a CPU kernel may use right now. */
int ckv_threads(void);

/* Threads for a kernel of `tasks` independent tasks and about `work` elementary operations in all:
 * one below a few microseconds of work (waking a team, and its spinning barrier when the cores are
 * busy with torch's own OpenMP pool, would cost more than it saves), never more than tasks. */
int ckv_threads_for(int64_t tasks, double work);

/* ---- CPU backend (cpu/) ---- */

/* scores [B, Hkv, P] contiguous fp32: attention probabilities of keys j < P, summed over the queries
 * (which sit at the last w positions) and the G heads of each KV head. */
ckv_status ckv_score_cpu(const ckv_tensor *queries, const ckv_tensor *keys, float scale, const int64_t *row_starts,
                         int64_t P, float *scores);

/* One selection per row of scores [rows, P] (NULL for score-free methods);
 * out [rows, n] contiguous int64, n = ckv_kept_count(budget, L). */
ckv_status ckv_select_rows_cpu(const float *scores, int64_t rows, int64_t P, int64_t L,
                               const ckv_select_params *params, int64_t rows_per_start, int64_t *out);

/* chunkkv-kvpress: token scores [rows, L] -> the best n_keep chunks of c, out [rows, n] padded with -1. */
ckv_status ckv_select_kvpress_rows_cpu(const float *token_scores, int64_t rows, int64_t L, int64_t c,
                                       int64_t n_keep, int64_t n, int64_t *out);

ckv_status ckv_gather_cpu(const ckv_tensor *src, const ckv_tensor *indices, ckv_tensor *dst);

ckv_status ckv_select_from_scores_cpu(const ckv_tensor *scores, int64_t L, const ckv_select_params *params,
                                      ckv_tensor *indices);

/* ---- CUDA backend (cuda/), present when CKV_WITH_CUDA is defined ---- */
#ifdef CKV_WITH_CUDA
ckv_status ckv_score_cuda(const ckv_tensor *queries, const ckv_tensor *keys, float scale,
                          const int64_t *row_starts, int64_t P, float *scores, void *stream);
/* The whole of ckv_select on the device (scores, head sum, selection), on params->stream. */
ckv_status ckv_select_cuda(const ckv_tensor *queries, const ckv_tensor *keys, const ckv_select_params *params,
                           float scale, int64_t *out);
ckv_status ckv_gather_cuda(const ckv_tensor *src, const ckv_tensor *indices, ckv_tensor *dst,
                           void *stream);
ckv_status ckv_select_from_scores_cuda(const ckv_tensor *scores, int64_t L, const ckv_select_params *params,
                                       ckv_tensor *indices);
#endif

#endif /* CKV_CORE_H */
