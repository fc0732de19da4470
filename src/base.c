/*
 * base.c -- the leaf of the C core (see base.h): the error message, thread counts, element sizes,
 * the per-thread scratch loop and the counts every layer shares. Calls nothing of chunkkv.
 */
#include "base.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---------------------------------------------------------------- errors */

static _Thread_local char last_error[512];

ckv_status ckv_fail(ckv_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

const char *ckv_last_error(void) { return last_error; }

/* ---------------------------------------------------------------- build facts */

int ckv_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int ckv_has_cuda(void) {
#ifdef CKV_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- threads */

static int requested_threads; /* 0: default */

void ckv_set_num_threads(int n) { requested_threads = n > 0 ? n : 0; }

int ckv_threads(void) {
    if (requested_threads > 0)
        return requested_threads;
    const char *env = getenv("CHUNKKV_NUM_THREADS");
    if (env) {
        long v = strtol(env, NULL, 10);
        if (v > 0 && v < 4096)
            return (int)v;
    }
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int ckv_get_num_threads(void) { return ckv_threads(); }

int ckv_threads_for(int64_t tasks, double work) {
    int n = ckv_threads();
    if (work < 1 << 20 || tasks < 2)
        return 1;
    return tasks < n ? (int)tasks : n;
}

ckv_status ckv_parallel_tasks(const char *op, int64_t tasks, int nthreads, size_t scratch_bytes, ckv_task_fn fn,
                              void *ctx) {
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* one scratch buffer per thread, reused across its tasks */
        void *scratch = malloc(scratch_bytes);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            if (!scratch)
                continue;
            fn(ctx, task, scratch);
        }
        free(scratch);
    }
    (void)nthreads;
    if (failed)
        return ckv_fail(CKV_ERR_NOMEM, "%s: could not allocate %zu bytes of scratch per thread", op, scratch_bytes);
    return CKV_OK;
}

/* ---------------------------------------------------------------- sizes and counts */

size_t ckv_itemsize(ckv_dtype dtype) {
    switch (dtype) {
    case CKV_DTYPE_F32: return 4;
    case CKV_DTYPE_F16: return 2;
    case CKV_DTYPE_BF16: return 2;
    case CKV_DTYPE_I64: return 8;
    }
    return 1;
}

float ckv_scale_or_default(float scale, int64_t D) { return scale != 0.0f ? scale : 1.0f / sqrtf((float)D); }

void ckv_select_params_init(ckv_select_params *p) {
    memset(p, 0, sizeof *p);
    p->method = CKV_METHOD_CHUNKKV;
    p->chunk_size = 10;
    p->pool_kernel = 1;
    p->n_sink = 4;
}

int64_t ckv_kept_count(int64_t budget, int64_t L) { return budget < L ? budget : L; }

int64_t ckv_prefix_length(const ckv_select_params *p, int64_t L, int64_t w) {
    return p->method == CKV_METHOD_H2O ? L - p->window : L - w;
}

int64_t ckv_kvpress_chunks(const ckv_select_params *p, int64_t L) {
    const int64_t chunks = ckv_chunk_count(L, p->chunk_size > 0 ? p->chunk_size : 1);
    /* int() of kvpress: truncation, clamped to [1, chunks] before the cast (a NaN, Inf or huge
     * keep_fraction, refused later by the argument checks, must not reach an undefined double -> int64 cast) */
    const double want = (double)chunks * p->keep_fraction;
    return want >= 1.0 ? (want < (double)chunks ? (int64_t)want : chunks) : 1;
}

int64_t ckv_select_count(const ckv_select_params *p, int64_t L) {
    if (p->method != CKV_METHOD_CHUNKKV_KVPRESS)
        return ckv_kept_count(p->budget, L);
    const int64_t c = p->chunk_size > 0 ? p->chunk_size : 1;
    const int64_t keep = ckv_kvpress_chunks(p, L);
    return keep > L / c ? L : keep * c; /* min(L, keep * c), without overflow for a huge c */
}
