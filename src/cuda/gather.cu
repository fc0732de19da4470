/*
 * gather.cu -- copy the kept token rows of keys or values on the GPU (ckv_gather_cuda).
 *
 * dst[b, g, t, :] = src[b, g, idx[b, (g,) t], :], raw element bits (no conversion).
 * Rows move in the widest unit the layout allows (16, 8, 4 bytes, else one
 * element): both views unit-stride along D and every base and stride a multiple
 * of the unit.
 *
 * Out of place, one grid-stride kernel copies every unit independently.
 * When dst is src cut to n tokens (in-place compaction; ops.c refuses any other
 * overlap of an output with an input or with the other output), one
 * block per (b, g) walks the (t, unit) pairs in ascending order, a tile at a
 * time: it loads the whole tile, synchronises, then stores it. With strictly
 * increasing indices (so idx[t] >= t), the element written at position t was
 * last read by a row t' <= t, in this tile or an earlier one, so every read
 * sees the original data.
 *
 * The host cannot check device-resident indices without a synchronisation, so
 * here they are not checked: a row whose index lies outside [0, L) is written
 * as zeros (memory is never read out of bounds), and in-place compaction with
 * rows that do not increase strictly gives unspecified (but in-bounds) results.
 */
#include "common.cuh"

namespace ckv {
namespace {

constexpr int THREADS = 256;
constexpr int PER_THREAD = 4; /* units a thread holds per tile in the in-place kernel */

struct GatherArgs {
    const char *src;
    char *dst;
    const int64_t *idx;
    int64_t H, L, n, U;          /* U: units per row */
    int64_t sb0, sb1, sb2, sbu;  /* src strides in bytes (sbu: one unit along D) */
    int64_t db0, db1, db2, dbu;  /* dst strides in bytes */
    int64_t is0, is1, isn;       /* indices strides in elements (is1 = 0 when shared by heads) */
};

template <class T>
__device__ __forceinline__ T load_unit(const GatherArgs &a, int64_t b, int64_t g, int64_t t, int64_t u) {
    const int64_t p = a.idx[b * a.is0 + g * a.is1 + t * a.isn];
    if (p < 0 || p >= a.L)
        return T{};
    return *reinterpret_cast<const T *>(a.src + b * a.sb0 + g * a.sb1 + p * a.sb2 + u * a.sbu);
}

template <class T>
__device__ __forceinline__ T *unit_ptr(const GatherArgs &a, int64_t b, int64_t g, int64_t t, int64_t u) {
    return reinterpret_cast<T *>(a.dst + b * a.db0 + g * a.db1 + t * a.db2 + u * a.dbu);
}

template <class T> __global__ void __launch_bounds__(THREADS) gather_kernel(GatherArgs a, int64_t total) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t row = e / a.U, u = e - row * a.U;
        const int64_t bh = row / a.n, t = row - bh * a.n;
        const int64_t b = bh / a.H, g = bh - b * a.H;
        *unit_ptr<T>(a, b, g, t, u) = load_unit<T>(a, b, g, t, u);
    }
}

template <class T> __global__ void __launch_bounds__(THREADS) compact_kernel(GatherArgs a) {
    const int64_t bh = blockIdx.x, b = bh / a.H, g = bh - b * a.H;
    const int64_t total = a.n * a.U;
    for (int64_t base = 0; base < total; base += (int64_t)THREADS * PER_THREAD) {
        T v[PER_THREAD];
#pragma unroll
        for (int x = 0; x < PER_THREAD; x++) {
            const int64_t e = base + (int64_t)x * THREADS + threadIdx.x;
            if (e < total) {
                const int64_t t = e / a.U, u = e - t * a.U;
                v[x] = load_unit<T>(a, b, g, t, u);
            }
        }
        __syncthreads(); /* the whole tile is read before any of it is written */
#pragma unroll
        for (int x = 0; x < PER_THREAD; x++) {
            const int64_t e = base + (int64_t)x * THREADS + threadIdx.x;
            if (e < total) {
                const int64_t t = e / a.U, u = e - t * a.U;
                *unit_ptr<T>(a, b, g, t, u) = v[x];
            }
        }
        __syncthreads(); /* and written before the next tile reads */
    }
}

bool unit_fits(const ckv_tensor *t, int64_t unit, int64_t isz) {
    if (t->shape[3] > 1 && t->strides[3] != 1)
        return false;
    if ((uintptr_t)t->data % (uintptr_t)unit)
        return false;
    for (int i = 0; i < 3; i++)
        if ((t->strides[i] * isz) % unit)
            return false;
    return (t->shape[3] * isz) % unit == 0;
}

template <class T>
ckv_status launch(const char *op, const GatherArgs &a, int64_t BH, bool in_place, int sms, cudaStream_t stream) {
    if (in_place) {
        const unsigned grid = grid_1d(BH);
        if (!grid)
            return ckv_fail(CKV_ERR_SHAPE, "%s: B x Hkv (%lld) is too large for one CUDA grid", op, (long long)BH);
        compact_kernel<T><<<grid, THREADS, 0, stream>>>(a);
        CKV_CUDA_LAUNCH_CHECK("compact_kernel");
    } else {
        const int64_t total = BH * a.n * a.U;
        int64_t blocks = (total + THREADS - 1) / THREADS;
        const int64_t cap = (int64_t)(sms > 0 ? sms : 1) * 32;
        if (blocks > cap)
            blocks = cap;
        gather_kernel<T><<<(unsigned)blocks, THREADS, 0, stream>>>(a, total);
        CKV_CUDA_LAUNCH_CHECK("gather_kernel");
    }
    return CKV_OK;
}

/* dst = src gathered by indices, on the current device. */
ckv_status gather_one(const char *op, const ckv_tensor *src, const ckv_tensor *indices, ckv_tensor *dst,
                      cudaStream_t stream) {
    const int64_t B = src->shape[0], H = src->shape[1], D = src->shape[3], n = dst->shape[2];
    const int64_t isz = (int64_t)ckv_itemsize(src->dtype);
    if (B * H * n * D == 0)
        return CKV_OK;

    int64_t unit = isz;
    for (int64_t u : {16, 8, 4})
        if (u > isz && unit_fits(src, u, isz) && unit_fits(dst, u, isz)) {
            unit = u;
            break;
        }
    GatherArgs a;
    a.src = static_cast<const char *>(src->data);
    a.dst = static_cast<char *>(dst->data);
    a.idx = static_cast<const int64_t *>(indices->data);
    a.H = H;
    a.L = src->shape[2];
    a.n = n;
    a.U = unit == isz ? D : D * isz / unit;
    a.sb0 = src->strides[0] * isz, a.sb1 = src->strides[1] * isz, a.sb2 = src->strides[2] * isz;
    a.db0 = dst->strides[0] * isz, a.db1 = dst->strides[1] * isz, a.db2 = dst->strides[2] * isz;
    a.sbu = unit == isz ? src->strides[3] * isz : unit;
    a.dbu = unit == isz ? dst->strides[3] * isz : unit;
    const int per_head = indices->ndim == 3;
    a.is0 = indices->strides[0];
    a.is1 = per_head ? indices->strides[1] : 0;
    a.isn = indices->strides[indices->ndim - 1];

    /* ops.c refuses every overlap but the very same view cut to n <= L tokens: sharing the first
     * element is sharing the view */
    const bool in_place = src->data == dst->data;

    int dev = 0, sms = 0;
    CKV_CUDA_TRY(cudaGetDevice(&dev));
    CKV_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    switch (unit) {
    case 16: return launch<uint4>(op, a, B * H, in_place, sms, stream);
    case 8: return launch<uint2>(op, a, B * H, in_place, sms, stream);
    case 4: return launch<uint32_t>(op, a, B * H, in_place, sms, stream);
    default: return launch<uint16_t>(op, a, B * H, in_place, sms, stream);
    }
}

} // namespace
} // namespace ckv

extern "C" ckv_status ckv_gather_cuda(const ckv_tensor *keys, const ckv_tensor *values, const ckv_tensor *indices,
                                      ckv_tensor *keys_out, ckv_tensor *values_out, void *stream_ptr) {
    CKV_CUDA_ENTER("ckv_gather", keys->device_id);
    const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    if (ckv_status st = ckv::gather_one(op, keys, indices, keys_out, stream))
        return st;
    return ckv::gather_one(op, values, indices, values_out, stream);
}
