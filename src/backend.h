/*
 * backend.h -- the entry points ops.c dispatches to; not part of the public API.
 *
 * Each public op has one entry point per backend, with the op's own signature: ckv_<op>_cpu in
 * cpu/, ckv_<op>_cuda in cuda/ (when CKV_WITH_CUDA is defined). ops.c has checked every argument
 * (and returns before an entry point when the output is empty); backends trust them, and call
 * nothing in ops.c: what they share with it lives in base.h.
 */
#ifndef CKV_BACKEND_H
#define CKV_BACKEND_H

#include "base.h"
#include "chunkkv.h"

/* The entry points of one backend, declared once for all so that their signatures cannot part:
 * ckv_score_<b>, ckv_select_<b>, ckv_select_from_scores_<b>, ckv_gather_<b>; the arguments are the
 * public op's (chunkkv.h). */
#define CKV_BACKEND_ENTRY_POINTS(b)                                                                      \
    ckv_status ckv_score_##b(const ckv_tensor *queries, const ckv_tensor *keys, float scale,             \
                             const int64_t *row_starts, ckv_tensor *scores, void *stream);               \
    ckv_status ckv_select_##b(const ckv_tensor *queries, const ckv_tensor *keys,                         \
                              const ckv_select_params *params, ckv_tensor *indices);                     \
    ckv_status ckv_select_from_scores_##b(const ckv_tensor *scores, int64_t L, const ckv_select_params *params, \
                                          ckv_tensor *indices);                                          \
    ckv_status ckv_gather_##b(const ckv_tensor *keys, const ckv_tensor *values, const ckv_tensor *indices, \
                              ckv_tensor *keys_out, ckv_tensor *values_out, void *stream)

/* CPU: ckv_score_cpu (cpu/score.c), ckv_select_cpu and ckv_select_from_scores_cpu (cpu/select.c),
 * ckv_gather_cpu (cpu/gather.c); stream is not read. */
CKV_BACKEND_ENTRY_POINTS(cpu);

/* CUDA: ckv_score_cuda (cuda/score.cu), ckv_select_cuda and ckv_select_from_scores_cuda (cuda/select.cu),
 * ckv_gather_cuda (cuda/gather.cu); everything queued on the given stream (params->stream), no host sync. */
#ifdef CKV_WITH_CUDA
CKV_BACKEND_ENTRY_POINTS(cuda);
#endif

#endif /* CKV_BACKEND_H */
