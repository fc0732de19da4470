/*
 * common.cuh -- what the CUDA kernels share: the C core's declarations, fp16/bf16
 * loads, the error macro, a device guard and stream-ordered scratch memory.
 *
 * Nothing in the CUDA backend synchronises with the host: every kernel, copy,
 * allocation (cudaMallocAsync) and free (cudaFreeAsync) is queued on the
 * caller's stream, so an op returns as soon as its work is queued. Errors a
 * CUDA call reports at queueing time (bad launch, no memory, wrong device)
 * become CKV_ERR_CUDA / CKV_ERR_NOMEM; faults inside a kernel surface at the
 * caller's next synchronising CUDA call, as with any asynchronous CUDA library.
 */
#ifndef CKV_CUDA_COMMON_CUH
#define CKV_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "../backend.h" /* the C headers' prototypes carry no extern "C" of their own */
}

/* Return ckv_fail(CKV_ERR_CUDA, "<op>: <call>: <message>") when a CUDA runtime call fails.
 * `op` must be a const char * in scope (the op's name). An allocation failure is CKV_ERR_NOMEM. */
#define CKV_CUDA_TRY(call)                                                                               \
    do {                                                                                                 \
        cudaError_t ckv_err_ = (call);                                                                   \
        if (ckv_err_ != cudaSuccess) {                                                                   \
            (void)cudaGetLastError(); /* clear a non-sticky error so later calls do not see it */       \
            return ckv_fail(ckv_err_ == cudaErrorMemoryAllocation ? CKV_ERR_NOMEM : CKV_ERR_CUDA,         \
                            "%s: %s: %s", op, #call, cudaGetErrorString(ckv_err_));                      \
        }                                                                                                \
    } while (0)

/* Right after a kernel launch: its launch error, if any (does not wait for the kernel). */
#define CKV_CUDA_LAUNCH_CHECK(kernel_name)                                                               \
    do {                                                                                                 \
        cudaError_t ckv_err_ = cudaGetLastError();                                                       \
        if (ckv_err_ != cudaSuccess)                                                                     \
            return ckv_fail(CKV_ERR_CUDA, "%s: launch of %s: %s", op, kernel_name,                       \
                            cudaGetErrorString(ckv_err_));                                               \
    } while (0)

namespace ckv {

/* Makes device `id` current for its lifetime and restores the caller's device after. */
struct DeviceGuard {
    int prev = -1;
    bool changed = false;
    cudaError_t set(int id) {
        cudaError_t e = cudaGetDevice(&prev);
        if (e != cudaSuccess)
            return e;
        if (prev != id) {
            e = cudaSetDevice(id);
            if (e != cudaSuccess)
                return e;
            changed = true;
        }
        return cudaSuccess;
    }
    ~DeviceGuard() {
        if (changed)
            cudaSetDevice(prev);
    }
};

/* Make the tensors' device current (restored when guard goes away); CKV_ERR_CUDA on failure. */
inline ckv_status enter_device(const char *op, DeviceGuard &guard, int device_id) {
    const cudaError_t e = guard.set(device_id);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return ckv_fail(CKV_ERR_CUDA, "%s: cudaSetDevice(%d): %s", op, device_id, cudaGetErrorString(e));
    }
    return CKV_OK;
}

/* The opening of every CUDA entry point: `op` names the op in messages, and the device of the
 * tensors is made current until the entry point returns (CKV_ERR_CUDA when it cannot be). */
#define CKV_CUDA_ENTER(op_name, device_id)                                                               \
    static const char op[] = op_name;                                                                    \
    ckv::DeviceGuard ckv_guard_;                                                                         \
    if (ckv_status ckv_st_ = ckv::enter_device(op, ckv_guard_, (device_id)))                             \
    return ckv_st_

/* Device memory from cudaMallocAsync on a stream, returned with cudaFreeAsync on the same
 * stream when the holder goes away (after the work queued before it, in stream order). */
struct AsyncBuffer {
    void *ptr = nullptr;
    cudaStream_t stream = nullptr;
    bool pooled = true;
    cudaError_t alloc(size_t bytes, cudaStream_t s) {
        stream = s;
        cudaError_t e = cudaMallocAsync(&ptr, bytes > 0 ? bytes : 16, s);
        if (e == cudaErrorNotSupported) { /* no stream-ordered allocator (some virtual GPUs): plain memory */
            (void)cudaGetLastError();
            ptr = nullptr;
            pooled = false;
            e = cudaMalloc(&ptr, bytes > 0 ? bytes : 16);
        }
        if (e != cudaSuccess)
            ptr = nullptr;
        return e;
    }
    ~AsyncBuffer() {
        if (!ptr)
            return;
        if (pooled)
            cudaFreeAsync(ptr, stream);
        else
            cudaFree(ptr); /* waits for the device: only on the fallback path */
    }
};

/* Carve aligned pieces out of one scratch allocation: call with base = nullptr to size it. */
struct Carver {
    char *base;
    size_t used = 0;
    explicit Carver(void *b) : base(static_cast<char *>(b)) {}
    template <class T> T *take(size_t count) {
        used = (used + 255) & ~(size_t)255;
        T *p = base ? reinterpret_cast<T *>(base + used) : nullptr;
        used += count * sizeof(T);
        return p;
    }
};

/* A float dtype element as fp32 (fp16 and bf16 widen exactly, as in cpu/half.h). */
__device__ __forceinline__ float load_f32(const void *base, int dtype, int64_t off) {
    if (dtype == CKV_DTYPE_F16)
        return __half2float(static_cast<const __half *>(base)[off]);
    if (dtype == CKV_DTYPE_BF16)
        return __bfloat162float(static_cast<const __nv_bfloat16 *>(base)[off]);
    return static_cast<const float *>(base)[off];
}

/* Row starts travel to the device inside kernel arguments (copied at launch), so the host
 * array may be freed as soon as the op returns and no host-to-device copy or sync is needed. */
constexpr int STARTS_PER_LAUNCH = 256;
struct StartsChunk {
    int64_t v[STARTS_PER_LAUNCH];
};

/* Upload host row_starts[0, B) into device memory dst, in stream order. */
ckv_status upload_starts(const char *op, const int64_t *host, int64_t B, int64_t *dst, cudaStream_t stream);

/* Kernel launch grid for `blocks` blocks, or 0 when it does not fit one 1-D grid. */
inline unsigned grid_1d(int64_t blocks) {
    return blocks > 0 && blocks <= 0x7fffffffLL ? (unsigned)blocks : 0u;
}

/* The score kernels (score.cu), used by ckv_score_cuda and ckv_select_cuda: the attention of the
 * queries (at the last w positions) on keys j < P <= L, summed per KV head.
 * starts: device [B] or nullptr. scores: device [B, Hkv, P] contiguous fp32. */
ckv_status score_device(const char *op, const ckv_tensor *q, const ckv_tensor *k, float scale, const int64_t *starts,
                        int64_t P, float *scores, cudaStream_t stream);

} // namespace ckv

#endif /* CKV_CUDA_COMMON_CUH */
