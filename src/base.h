/*
 * base.h -- the leaf of the C core: errors, sizes, threads and counts. Every other file may
 * use it; it uses nothing of chunkkv but the public header. Not part of the public API.
 */
#ifndef CKV_BASE_H
#define CKV_BASE_H

#include <stddef.h>
#include <stdint.h>

#include "chunkkv.h"

/* Functions CUDA kernels call too. */
#ifdef __CUDACC__
#define CKV_HOST_DEVICE __host__ __device__
#else
#define CKV_HOST_DEVICE
#endif

/* Record the message for ckv_last_error() and return status. printf-style. */
ckv_status ckv_fail(ckv_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

size_t ckv_itemsize(ckv_dtype dtype);

/* The logit scale an op uses: scale, or 1/sqrt(D) when scale is 0. */
float ckv_scale_or_default(float scale, int64_t D);

/* ---- threads ---- */

/* Threads a CPU kernel may use right now. */
int ckv_threads(void);

/* Threads for a kernel of `tasks` independent tasks and about `work` elementary operations in all:
 * one below a few microseconds of work (waking a team, and its spinning barrier when the cores are
 * busy with torch's own OpenMP pool, would cost more than it saves), never more than tasks. */
int ckv_threads_for(int64_t tasks, double work);

/* fn(ctx, task, scratch) for every task in [0, tasks), on nthreads OpenMP threads (dynamic
 * schedule, one task at a time), each thread with its own `scratch_bytes` of scratch reused across
 * its tasks. When a thread's scratch cannot be allocated its tasks are skipped and the result is
 * CKV_ERR_NOMEM, naming op. */
typedef void (*ckv_task_fn)(void *ctx, int64_t task, void *scratch);
ckv_status ckv_parallel_tasks(const char *op, int64_t tasks, int nthreads, size_t scratch_bytes, ckv_task_fn fn,
                              void *ctx);

/* ---- counts (the public ckv_kept_count and ckv_select_count are here too) ---- */

/* Chunks of c tokens (the last may be shorter) that cover n tokens; c >= 1, no overflow for any c. */
static inline CKV_HOST_DEVICE int64_t ckv_chunk_count(int64_t n, int64_t c) {
    return c >= n ? (n > 0 ? 1 : 0) : (n + c - 1) / c;
}

/* The prefix P of ckv_select: keys j < P are scored, the window [P, L) is kept whole
 * (h2o: L - params->window; otherwise L - w). */
int64_t ckv_prefix_length(const ckv_select_params *params, int64_t L, int64_t w);

/* chunkkv-kvpress: how many chunks of c tokens over L tokens it keeps, max(1, floor(chunks * keep_fraction)). */
int64_t ckv_kvpress_chunks(const ckv_select_params *params, int64_t L);

#endif /* CKV_BASE_H */
