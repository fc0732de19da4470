/*
 * gather.c -- copy the kept token rows of keys or values.
 *
 * dst[b, g, t, :] = src[b, g, idx[b, (g,) t], :]. Rows with unit stride along
 * D are moved with memmove (one call per row); others element by element.
 * In-place compaction (dst is src) is safe because ops.c has checked that
 * every row of indices increases strictly: row t is read from a position
 * >= t before anything is written there (and that no output overlaps an
 * input otherwise).
 */
#include <string.h>

#include "../backend.h"

static void gather_one(const ckv_tensor *src, const ckv_tensor *indices, ckv_tensor *dst) {
    const int64_t B = src->shape[0], H = src->shape[1], D = src->shape[3];
    const int64_t n = dst->shape[2];
    const int per_head = indices->ndim == 3;
    const int64_t isz = (int64_t)ckv_itemsize(src->dtype);
    const int rows_contiguous = src->strides[3] == 1 && dst->strides[3] == 1;
    const int64_t tasks = B * H;
    const int nthreads = ckv_threads_for(tasks, (double)tasks * (double)n * (double)(D * isz) / 4.0);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t b = task / H, g = task % H;
        const int64_t *idx = (const int64_t *)indices->data + b * indices->strides[0] +
                             (per_head ? g * indices->strides[1] : 0);
        const int64_t istride = indices->strides[indices->ndim - 1];
        const char *s0 = (const char *)src->data + (b * src->strides[0] + g * src->strides[1]) * isz;
        char *d0 = (char *)dst->data + (b * dst->strides[0] + g * dst->strides[1]) * isz;
        for (int64_t t = 0; t < n; t++) {
            const char *s = s0 + idx[t * istride] * src->strides[2] * isz;
            char *d = d0 + t * dst->strides[2] * isz;
            if (s == d)
                continue;
            if (rows_contiguous) {
                memmove(d, s, (size_t)(D * isz));
            } else {
                for (int64_t e = 0; e < D; e++)
                    memcpy(d + e * dst->strides[3] * isz, s + e * src->strides[3] * isz, (size_t)isz);
            }
        }
    }
}

ckv_status ckv_gather_cpu(const ckv_tensor *keys, const ckv_tensor *values, const ckv_tensor *indices,
                          ckv_tensor *keys_out, ckv_tensor *values_out, void *stream) {
    (void)stream;
    gather_one(keys, indices, keys_out);
    gather_one(values, indices, values_out);
    return CKV_OK;
}
