/*
 * chunkkv.h -- the public C API of chunkkv's core.
 *
 * A short tour
 * ------------
 * Every op takes tensor *views* (ckv_tensor): a data pointer, a dtype, a device
 * and up to four dimensions with strides counted in elements (not bytes), so
 * any strided layout a framework hands over through DLPack is read in place,
 * without a copy. Element (i0, i1, i2, i3) lives at
 *     data + (i0*strides[0] + i1*strides[1] + i2*strides[2] + i3*strides[3]) * itemsize.
 *
 * Dimension letters, used in every shape comment below:
 *     B    batch rows              Hq   query heads        Hkv  key/value heads
 *     G    Hq / Hkv (GQA group)    L    tokens in the cache
 *     w    observation window      P    L - w, the prefix that can be dropped
 *     D    head dimension          c    chunk size         n    tokens kept
 * Query head h reads KV head h / G.
 *
 * Every op checks all of its arguments first (ops.c), then runs a backend
 * entry point with the op's signature (cpu/, and cuda/ when built with CUDA). Nothing here aborts, exits
 * or prints: an op returns a ckv_status and, when it is not CKV_OK, records a
 * message for ckv_last_error() naming the op, the argument, what was expected
 * and what came. Messages are per thread.
 *
 * Enum values carry their enum's name and are only ever appended.
 */
#ifndef CHUNKKV_H
#define CHUNKKV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CKV_VERSION "0.1.0"
#define CKV_MAX_DIMS 4

typedef enum ckv_status {
    CKV_OK = 0,
    CKV_ERR_SHAPE = 1,    /* ranks or sizes that do not fit together   -> ValueError  */
    CKV_ERR_VALUE = 2,    /* a bad scalar argument or data value        -> ValueError  */
    CKV_ERR_DTYPE = 3,    /* a dtype the op does not take               -> TypeError   */
    CKV_ERR_DEVICE = 4,   /* a device the build does not take, or mixed -> TypeError   */
    CKV_ERR_NOMEM = 5,    /* scratch memory could not be allocated      -> MemoryError */
    CKV_ERR_CUDA = 6,     /* a CUDA runtime call failed                 -> RuntimeError */
    CKV_ERR_LAYOUT = 7,   /* a layout the op cannot take (e.g. aliasing) -> ValueError */
} ckv_status;

typedef enum ckv_dtype {
    CKV_DTYPE_F32 = 0,
    CKV_DTYPE_F16 = 1,
    CKV_DTYPE_BF16 = 2,
    CKV_DTYPE_I64 = 3,
} ckv_dtype;

typedef enum ckv_device {
    CKV_DEVICE_CPU = 0,
    CKV_DEVICE_CUDA = 1,
} ckv_device;

/* A strided view of someone else's memory; chunkkv never frees it. */
typedef struct ckv_tensor {
    void *data;                       /* first element (byte offset already applied) */
    ckv_dtype dtype;
    ckv_device device;
    int device_id;
    int ndim;                         /* 1..CKV_MAX_DIMS */
    int64_t shape[CKV_MAX_DIMS];
    int64_t strides[CKV_MAX_DIMS];    /* in elements; may be 0 or negative for inputs */
} ckv_tensor;

/* Which selection rule ckv_select runs. */
typedef enum ckv_method {
    CKV_METHOD_CHUNKKV = 0,   /* the paper's chunk selection (see ckv_select) */
    CKV_METHOD_SNAPKV = 1,    /* per-token top-k of pooled window attention */
    CKV_METHOD_STREAMINGLLM = 2, /* first n_sink tokens + the most recent ones */
    CKV_METHOD_RANDOM = 3,    /* uniform random prefix tokens + the window (a floor) */
    CKV_METHOD_H2O = 4,       /* heavy hitters: column sums of the causal attention of the prompt
                               * queries (normally all: queries [B, Hq, L, D], at the last positions),
                               * plus `window` recent tokens */
    CKV_METHOD_CHUNKKV_KVPRESS = 5, /* kvpress's ChunkKVPress(SnapKVPress()): see ckv_select_count */
} ckv_method;

typedef struct ckv_select_params {
    ckv_method method;
    int64_t budget;      /* tokens kept per row, window included; >= w */
    int64_t chunk_size;  /* c >= 1 (chunkkv) */
    float scale;         /* logit scale, usually 1/sqrt(D) */
    int per_head;        /* 0: one selection per batch row; 1: one per (row, KV head) */
    int64_t pool_kernel; /* snapkv: odd window of the 1-D max/avg pooling over tokens, 1 = none */
    int pool_max;        /* snapkv: 1 max pooling, 0 average pooling */
    int64_t n_sink;      /* streamingllm: leading tokens always kept */
    uint64_t seed;       /* random */
    int64_t window;      /* h2o: recent tokens always kept (the queries are all L prompt queries) */
    double keep_fraction; /* chunkkv-kvpress: fraction of chunks kept, 1 - kvpress's compression_ratio */
    const int64_t *row_starts; /* optional, host memory [B]: row b's tokens start at row_starts[b]
                                * (left padding before it is masked out of the softmax and never
                                * kept, unless the row has fewer than n tokens: then the n slots
                                * are the last n positions). NULL: every row starts at 0. */
    void *stream;        /* CUDA stream (cudaStream_t) the op runs on; NULL = default */
} ckv_select_params;

/* Fill params with the defaults: chunkkv, chunk 10, scale 0 (meaning 1/sqrt(D)). */
void ckv_select_params_init(ckv_select_params *params);

/* Number of positions ckv_select keeps per row: min(budget, L). */
int64_t ckv_kept_count(int64_t budget, int64_t L);

/* Columns of ckv_select's indices output for these params and L keys: min(budget, L), except
 * chunkkv-kvpress: kvpress keeps k = max(1, floor(chunks * keep_fraction)) chunks of c tokens
 * over all L tokens (the last chunk may be shorter), so the output has min(L, k*c) columns and
 * a row that kept the short chunk ends with -1 padding. */
int64_t ckv_select_count(const ckv_select_params *params, int64_t L);

/*
 * ckv_score: the token scores the selection ranks (useful on its own and as
 * the tested core of ckv_select).
 *   queries [B, Hq, w, D]   any float dtype, already rotated (RoPE)
 *   keys    [B, Hkv, L, D]  any float dtype
 *   scores  [B, Hkv, P]     float32 output, contiguous; P <= L (usually L - w)
 * scores[b, g, j] = sum over the G query heads h of KV head g and the w
 * queries i (at positions L - w + i) of softmax_j(scale * q[b,h,i] . k[b,g,j])
 * over keys j <= L - w + i (causal), for j < P. Accumulated in fp32. With
 * all L prompt queries this is H2O's column sums, computed in blocks of
 * queries without an L x L buffer. With row_starts (see
 * ckv_select_params) keys before the start are masked out and window queries
 * before it add nothing. On the CPU, bf16 queries with bf16 keys multiply as
 * bf16 on AVX512-BF16 (exact products, fp32 sums, scale applied to the sums;
 * that instruction flushes bf16 subnormals, below 1.2e-38, to zero); other
 * dtypes are converted to fp32 and the queries pre-scaled.
 */
ckv_status ckv_score(const ckv_tensor *queries, const ckv_tensor *keys, float scale,
                     const int64_t *row_starts, ckv_tensor *scores, void *stream);

/*
 * ckv_select: the positions to keep.
 *   queries [B, Hq, w, D], keys [B, Hkv, L, D]
 *   indices [B, n] (per_head = 0) or [B, Hkv, n] (per_head = 1), int64, n = ckv_kept_count
 * Output positions are sorted ascending in every row; the window [P, L) is
 * always among them. Chunkkv: chunk m covers [m*c, min((m+1)*c, P)); chunks
 * are taken best-first (ties: lower position) while they fit in budget - w;
 * the first that does not fit is cut to its best tokens and the walk stops.
 * Non-finite scores (from NaN/Inf inputs) are an error on the CPU. On CUDA,
 * where reading an error flag would need a host sync, they rank lowest: the
 * output is still a valid selection, but which prefix tokens it keeps is
 * unspecified.
 *
 * chunkkv-kvpress follows kvpress 0.5.x: per KV head, window attention is
 * averaged over the window queries, average-pooled over pool_kernel tokens and
 * averaged over the group; window tokens score (global max + 1); heads are
 * summed; chunks of c tokens over [0, L) score the mean of their tokens; the
 * best k chunks are kept (see ckv_select_count). per_head and row_starts are
 * not taken by this mode.
 */
ckv_status ckv_select(const ckv_tensor *queries, const ckv_tensor *keys,
                      const ckv_select_params *params, ckv_tensor *indices);

/*
 * ckv_select_from_scores: ckv_select's selection from token scores given by
 * the caller, e.g. ckv_score's output summed over tensor-parallel ranks (each
 * rank scores its own KV heads, the ranks all-reduce the sums, every rank then
 * picks the same positions).
 *   scores  [B, P] (per_head = 0) or [B, Hkv, P] (per_head = 1), float32, C-contiguous
 *   L       tokens in the cache, L >= P: the window [P, L) is always kept
 *   indices [B, n] or [B, Hkv, n], int64, n = ckv_kept_count(budget, L)
 * Methods: chunkkv (chunk sums from each row's start, best-first, the cut
 * chunk's best tokens), snapkv (pooling of the given scores, then the best
 * tokens; pyramidkv is snapkv with its own budget) and h2o (the best raw
 * scores; its window is L - P, params->window is not read). Given the head
 * sums (in head order, fp32) of ckv_score's output this is bit for bit what
 * ckv_select returns. Streamingllm and random do not rank scores and
 * chunkkv-kvpress ranks scores that are not a sum over heads (window tokens
 * at a global maximum): those are CKV_ERR_VALUE. row_starts as in
 * ckv_select; scale is not read. Non-finite scores are an error on the CPU;
 * on CUDA they rank lowest, as in ckv_select.
 */
ckv_status ckv_select_from_scores(const ckv_tensor *scores, int64_t L, const ckv_select_params *params,
                                  ckv_tensor *indices);

/*
 * ckv_gather: keys_out[b, g, t] = keys[b, g, indices[b, (g,) t]], the same for values.
 *   keys, values         [B, Hkv, L, D]  same dtype
 *   indices              [B, n] or [B, Hkv, n] int64, each in [0, L)
 *   keys_out, values_out [B, Hkv, n, D]  same dtype as keys
 * An output may be the very same view as its input (same data and strides)
 * restricted to n <= L tokens: the kept rows are then compacted to the front in
 * place, which needs each row of indices strictly increasing. Any other
 * overlap (of the byte ranges) of an output with keys, values, indices or the
 * other output is refused with CKV_ERR_LAYOUT, on every backend. The check is
 * exact for views side by side or interleaved in one buffer (e.g. keys and
 * values as [..., 0, :] and [..., 1, :] of one tensor) when their byte ranges
 * part within about 2^16 halvings; past that it refuses. On the CPU indices are
 * checked first (ValueError); on CUDA, where that would need a host sync, an
 * out-of-range index writes a row of zeros and nothing outside the buffers
 * is read or written.
 */
ckv_status ckv_gather(const ckv_tensor *keys, const ckv_tensor *values, const ckv_tensor *indices,
                      ckv_tensor *keys_out, ckv_tensor *values_out, void *stream);

/* The message of this thread's last failed op ("" if none). */
const char *ckv_last_error(void);

/* CPU threads used by kernels; n <= 0 restores the default (all cores, or
 * the CHUNKKV_NUM_THREADS environment variable). */
void ckv_set_num_threads(int n);
int ckv_get_num_threads(void);

/* What this build has. */
int ckv_has_cuda(void);
int ckv_has_openmp(void);
/* The CPU kernels' vector level: "avx512-bf16", "avx512", "avx2" or "baseline"; the environment variable
 * CHUNKKV_SIMD=avx512|avx2|baseline lowers it (read once, at the first kernel call). */
const char *ckv_simd_level(void);

/* The CPU's fp32 FMA rate in GFLOP/s on `threads` threads (0: the current count), measured by a register-only
 * loop at the best vector width for about `seconds`: the peak that the scoring speed is compared to. */
double ckv_fma_peak_gflops(int threads, double seconds);

#ifdef __cplusplus
}
#endif
#endif /* CHUNKKV_H */
