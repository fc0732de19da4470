/*
 * score.cu -- window-attention token scores on the GPU (ckv_score_cuda).
 *
 * For one (batch row b, KV head g) the R = G*w queries of the heads that read
 * g are the rows of Q [R, D]; query i sits at position Q0 + i, Q0 = L - w.
 * scores[b, g, j] = sum over rows r of softmax_r(Q K^T)[r, j] for keys j < P
 * (P <= L; usually P = Q0, the prefix before the window), each row's softmax
 * taken over the keys it sees: [start, Q0 + i] (causal), start being the
 * row's start (left padding). Everything is computed in fp32.
 *
 * Two passes over the logits, which are never stored:
 *   1. stats_kernel: one block per (64-row tile, split of the keys, b*g); each
 *      block computes 64x64 logit tiles over its keys and keeps an online
 *      softmax state (running max m, sum of exp(l - m)) per row, then writes
 *      that partial state. A visible logit that is NaN or Inf marks (b, g) bad.
 *   2. accum_kernel: one block per (64-key tile of [0, P), b*g); it merges
 *      the partial states of each row (exact max, rescaled sums), recomputes
 *      the logits of its keys against every row that sees them and adds
 *      exp(l - m) / sum.
 *      A bad (b, g) gets NaN scores over all of [0, P), as on the CPU; keys
 *      before the row's start get 0.
 * Tiles no query of a row tile can see (keys after its last query, or before
 * the start) are skipped, so scoring all L prompt queries (H2O) costs about
 * half of the full L x L product and never stores it.
 * Logit tiles are a plain shared-memory SGEMM: 256 threads, each 4 rows x 4
 * keys, the head dimension in steps of 16. Any strides and any float dtype
 * (queries and keys may differ) are read in place.
 */
#include <math.h>

#include "common.cuh"

namespace ckv {
namespace {

constexpr int TILE = 64;     /* rows and keys per tile */
constexpr int DSTEP = 16;    /* head-dimension step of a tile product */
constexpr int THREADS = 256; /* 16 x 16 threads, 4 x 4 logits each */

struct QK {
    const char *q, *k;
    int qdt, kdt;
    int64_t qs0, qs1, qs2, qs3; /* in elements */
    int64_t ks0, ks1, ks2, ks3;
    int64_t H, G, w, L, D, P, R;
    int64_t Q0; /* position of query 0: L - w */
    float scale;
};

struct TileSmem {
    float qs[DSTEP][TILE + 1]; /* [d][row], pre-scaled */
    float ks[DSTEP][TILE + 1]; /* [d][key] */
    int64_t rowoff[TILE];      /* element offset of query row r0 + t (b, head, i) */
};

/* Largest query index i = r % w among the rows [r0, r0 + 64) of a row tile (rows are h*w + i). */
__device__ __forceinline__ int64_t tile_last_query(const QK &a, int64_t r0) {
    const int64_t r1 = min(a.R, r0 + TILE) - 1;
    return r0 / a.w == r1 / a.w ? r1 % a.w : a.w - 1;
}

/* Element offset of window row r of KV head g in batch row b: query head g*G + r/w, position r%w. */
__device__ __forceinline__ int64_t query_offset(const QK &a, int64_t b, int64_t g, int64_t r) {
    const int64_t h = r / a.w, i = r - h * a.w;
    return b * a.qs0 + (g * a.G + h) * a.qs1 + i * a.qs2;
}

/* acc[x][y] = logit of row r0 + ty + 16x against key j0 + tx + 16y (0 outside [0,R) x [0,L)).
 * Needs sm.rowoff filled for the rows r0.. and a __syncthreads() after that. Ends synchronised. */
__device__ __forceinline__ void logit_tile(const QK &a, int64_t b, int64_t g, int64_t r0, int64_t j0,
                                           float (&acc)[4][4], TileSmem &sm) {
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int dd = tid & (DSTEP - 1), lr = tid / DSTEP; /* loader: one d, rows lr + 16x */
    const int64_t kbase = b * a.ks0 + g * a.ks1;
#pragma unroll
    for (int x = 0; x < 4; x++)
#pragma unroll
        for (int y = 0; y < 4; y++)
            acc[x][y] = 0.0f;
    for (int64_t d0 = 0; d0 < a.D; d0 += DSTEP) {
        const int64_t d = d0 + dd;
#pragma unroll
        for (int x = 0; x < 4; x++) {
            const int t = lr + 16 * x;
            float qv = 0.0f, kv = 0.0f;
            if (d < a.D && r0 + t < a.R)
                qv = load_f32(a.q, a.qdt, sm.rowoff[t] + d * a.qs3) * a.scale;
            if (d < a.D && j0 + t < a.L)
                kv = load_f32(a.k, a.kdt, kbase + (j0 + t) * a.ks2 + d * a.ks3);
            sm.qs[dd][t] = qv;
            sm.ks[dd][t] = kv;
        }
        __syncthreads();
#pragma unroll
        for (int e = 0; e < DSTEP; e++) {
            float qv[4], kv[4];
#pragma unroll
            for (int x = 0; x < 4; x++) {
                qv[x] = sm.qs[e][ty + 16 * x];
                kv[x] = sm.ks[e][tx + 16 * x];
            }
#pragma unroll
            for (int x = 0; x < 4; x++)
#pragma unroll
                for (int y = 0; y < 4; y++)
                    acc[x][y] = fmaf(qv[x], kv[y], acc[x][y]);
        }
        __syncthreads();
    }
}

/* Merge two online-softmax states (max, sum of exp(l - max)). */
__device__ __forceinline__ void merge_state(float &m, float &s, float om, float os) {
    const float mn = fmaxf(m, om);
    if (mn == -INFINITY)
        return; /* both empty */
    s = (s > 0.0f ? s * expf(m - mn) : 0.0f) + (os > 0.0f ? os * expf(om - mn) : 0.0f);
    m = mn;
}

__global__ void __launch_bounds__(THREADS, 2)
stats_kernel(QK a, const int64_t *__restrict__ starts, int64_t RT, int64_t S, int64_t tiles_per_split,
             float2 *__restrict__ part, int *__restrict__ bad) {
    __shared__ TileSmem sm;
    const int64_t blk = blockIdx.x;
    const int64_t rt = blk % RT, split = (blk / RT) % S, bh = blk / RT / S;
    const int64_t b = bh / a.H, g = bh % a.H;
    const int64_t start = starts ? starts[b] : 0;
    const int64_t r0 = rt * TILE;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;

    if (tid < TILE && r0 + tid < a.R)
        sm.rowoff[tid] = query_offset(a, b, g, r0 + tid);
    __syncthreads();

    int64_t last[4]; /* last key each of this thread's rows sees (-1: none) */
#pragma unroll
    for (int x = 0; x < 4; x++) {
        const int64_t r = r0 + ty + 16 * x;
        last[x] = r < a.R ? a.Q0 + r % a.w : -1;
    }
    float m[4], s[4];
#pragma unroll
    for (int x = 0; x < 4; x++) {
        m[x] = -INFINITY;
        s[x] = 0.0f;
    }
    bool nonfinite = false;

    const int64_t KT = (a.L + TILE - 1) / TILE;
    const int64_t kt_end = min(KT, (split + 1) * tiles_per_split);
    const int64_t tile_last_key = a.Q0 + tile_last_query(a, r0); /* no row of the tile sees past it */
    for (int64_t kt = split * tiles_per_split; kt < kt_end; kt++) {
        const int64_t j0 = kt * TILE;
        if (j0 + TILE <= start || j0 > tile_last_key)
            continue; /* no row of the tile sees these keys */
        float acc[4][4];
        logit_tile(a, b, g, r0, j0, acc, sm);
#pragma unroll
        for (int x = 0; x < 4; x++) {
            float tm = -INFINITY;
#pragma unroll
            for (int y = 0; y < 4; y++) {
                const int64_t j = j0 + tx + 16 * y;
                if (j >= start && j <= last[x]) {
                    const float l = acc[x][y];
                    nonfinite |= !isfinite(l);
                    tm = fmaxf(tm, l);
                }
            }
            if (tm == -INFINITY)
                continue;
            const float mn = fmaxf(m[x], tm);
            float sum = s[x] > 0.0f ? s[x] * expf(m[x] - mn) : 0.0f;
#pragma unroll
            for (int y = 0; y < 4; y++) {
                const int64_t j = j0 + tx + 16 * y;
                if (j >= start && j <= last[x])
                    sum += expf(acc[x][y] - mn);
            }
            m[x] = mn;
            s[x] = sum;
        }
    }
    /* the 16 threads of a row are 16 consecutive lanes: combine their states */
#pragma unroll
    for (int off = 8; off > 0; off >>= 1)
#pragma unroll
        for (int x = 0; x < 4; x++) {
            const float om = __shfl_xor_sync(0xffffffffu, m[x], off, 16);
            const float os = __shfl_xor_sync(0xffffffffu, s[x], off, 16);
            merge_state(m[x], s[x], om, os);
        }
    if (tx == 0)
#pragma unroll
        for (int x = 0; x < 4; x++) {
            const int64_t r = r0 + ty + 16 * x;
            if (r < a.R)
                part[(bh * S + split) * a.R + r] = make_float2(m[x], s[x]);
        }
    if (__syncthreads_or(nonfinite) && tid == 0)
        bad[bh] = 1;
}

__global__ void __launch_bounds__(THREADS, 2)
accum_kernel(QK a, const int64_t *__restrict__ starts, int64_t PT, int64_t RT, int64_t S,
             const float2 *__restrict__ part, const int *__restrict__ bad, float *__restrict__ scores) {
    __shared__ TileSmem sm;
    __shared__ float row_max[TILE], row_inv[TILE];
    __shared__ int64_t row_last[TILE]; /* last key each row sees */
    __shared__ float red[16][TILE];
    const int64_t blk = blockIdx.x;
    const int64_t pt = blk % PT, bh = blk / PT;
    const int64_t b = bh / a.H, g = bh % a.H;
    const int64_t start = starts ? starts[b] : 0;
    const int64_t j0 = pt * TILE;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    float *out = scores + bh * a.P;

    if (bad[bh] || j0 + TILE <= start) { /* poisoned, or all padding */
        const float v = bad[bh] ? NAN : 0.0f;
        if (tid < TILE && j0 + tid < a.P)
            out[j0 + tid] = v;
        return;
    }
    float contrib[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t rt = 0; rt * TILE < a.R; rt++) {
        const int64_t r0 = rt * TILE;
        if (j0 > a.Q0 + tile_last_query(a, r0))
            continue; /* every query of this row tile comes before these keys */
        if (tid < TILE) {
            const int64_t r = r0 + tid;
            float mx = 0.0f, inv = 0.0f;
            if (r < a.R) {
                sm.rowoff[tid] = query_offset(a, b, g, r);
                if (a.Q0 + r % a.w + 1 > start) { /* the row sees at least one key */
                    const float2 *pr = part + bh * S * a.R + r;
                    float m = -INFINITY, s = 0.0f;
                    for (int64_t k = 0; k < S; k++) {
                        const float2 v = pr[k * a.R];
                        merge_state(m, s, v.x, v.y);
                    }
                    mx = m;
                    inv = 1.0f / s;
                }
            }
            row_max[tid] = mx;
            row_inv[tid] = inv;
            row_last[tid] = r < a.R ? a.Q0 + r % a.w : -1;
        }
        __syncthreads();
        float acc[4][4];
        logit_tile(a, b, g, r0, j0, acc, sm);
#pragma unroll
        for (int x = 0; x < 4; x++) {
            const float inv = row_inv[ty + 16 * x], mx = row_max[ty + 16 * x];
            const int64_t last = row_last[ty + 16 * x];
            if (inv != 0.0f)
#pragma unroll
                for (int y = 0; y < 4; y++)
                    if (j0 + tx + 16 * y <= last)
                        contrib[y] += expf(acc[x][y] - mx) * inv;
        }
        __syncthreads(); /* row_max / row_inv / rowoff are rewritten next round */
    }
#pragma unroll
    for (int y = 0; y < 4; y++)
        red[ty][tx + 16 * y] = contrib[y];
    __syncthreads();
    if (tid < TILE) {
        const int64_t j = j0 + tid;
        float sum = 0.0f;
        for (int t = 0; t < 16; t++)
            sum += red[t][tid];
        if (j < a.P)
            out[j] = j < start ? 0.0f : sum;
    }
}

__global__ void copy_starts_kernel(StartsChunk chunk, int count, int64_t *__restrict__ dst) {
    const int t = threadIdx.x;
    if (t < count)
        dst[t] = chunk.v[t];
}

} // namespace

ckv_status upload_starts(const char *op, const int64_t *host, int64_t B, int64_t *dst, cudaStream_t stream) {
    for (int64_t b0 = 0; b0 < B; b0 += STARTS_PER_LAUNCH) {
        StartsChunk chunk;
        const int count = (int)(B - b0 < STARTS_PER_LAUNCH ? B - b0 : STARTS_PER_LAUNCH);
        for (int t = 0; t < count; t++)
            chunk.v[t] = host[b0 + t];
        copy_starts_kernel<<<1, STARTS_PER_LAUNCH, 0, stream>>>(chunk, count, dst + b0);
        CKV_CUDA_LAUNCH_CHECK("copy_starts_kernel");
    }
    return CKV_OK;
}

ckv_status score_device(const char *op, const ckv_tensor *q, const ckv_tensor *k, float scale, const int64_t *starts,
                        int64_t P, float *scores, cudaStream_t stream) {
    QK a;
    a.q = static_cast<const char *>(q->data);
    a.k = static_cast<const char *>(k->data);
    a.qdt = q->dtype;
    a.kdt = k->dtype;
    a.qs0 = q->strides[0], a.qs1 = q->strides[1], a.qs2 = q->strides[2], a.qs3 = q->strides[3];
    a.ks0 = k->strides[0], a.ks1 = k->strides[1], a.ks2 = k->strides[2], a.ks3 = k->strides[3];
    a.H = k->shape[1];
    a.G = q->shape[1] / k->shape[1];
    a.w = q->shape[2];
    a.L = k->shape[2];
    a.D = k->shape[3];
    a.P = P;
    a.Q0 = a.L - a.w;
    a.R = a.G * a.w;
    a.scale = scale;
    const int64_t BH = k->shape[0] * a.H;
    if (BH == 0 || a.P == 0)
        return CKV_OK;

    int dev = 0, sms = 0;
    CKV_CUDA_TRY(cudaGetDevice(&dev));
    CKV_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    const int64_t RT = (a.R + TILE - 1) / TILE, KT = (a.L + TILE - 1) / TILE, PT = (a.P + TILE - 1) / TILE;
    /* split the keys so that the stats pass has a few blocks per multiprocessor */
    const int64_t target = 4 * (int64_t)(sms > 0 ? sms : 1);
    int64_t S = (target + RT * BH - 1) / (RT * BH);
    S = S < 1 ? 1 : S > KT ? KT : S;
    const int64_t tiles_per_split = (KT + S - 1) / S;
    S = (KT + tiles_per_split - 1) / tiles_per_split;

    const unsigned stats_grid = grid_1d(RT * S * BH), accum_grid = grid_1d(PT * BH);
    if (!stats_grid || !accum_grid)
        return ckv_fail(CKV_ERR_SHAPE, "%s: B x Hkv x tiles (%lld) is too large for one CUDA grid", op,
                        (long long)(RT * S * BH > PT * BH ? RT * S * BH : PT * BH));

    Carver size(nullptr);
    size.take<float2>((size_t)(BH * S * a.R));
    size.take<int>((size_t)BH);
    AsyncBuffer buf;
    CKV_CUDA_TRY(buf.alloc(size.used, stream));
    Carver carve(buf.ptr);
    float2 *part = carve.take<float2>((size_t)(BH * S * a.R));
    int *bad = carve.take<int>((size_t)BH);
    CKV_CUDA_TRY(cudaMemsetAsync(bad, 0, (size_t)BH * sizeof(int), stream));

    stats_kernel<<<stats_grid, THREADS, 0, stream>>>(a, starts, RT, S, tiles_per_split, part, bad);
    CKV_CUDA_LAUNCH_CHECK("stats_kernel");
    accum_kernel<<<accum_grid, THREADS, 0, stream>>>(a, starts, PT, RT, S, part, bad, scores);
    CKV_CUDA_LAUNCH_CHECK("accum_kernel");
    return CKV_OK;
}

} // namespace ckv

extern "C" ckv_status ckv_score_cuda(const ckv_tensor *queries, const ckv_tensor *keys, float scale,
                                     const int64_t *row_starts, ckv_tensor *scores, void *stream_ptr) {
    CKV_CUDA_ENTER("ckv_score", keys->device_id);
    const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    ckv::AsyncBuffer starts_buf;
    int64_t *starts = nullptr;
    if (row_starts) {
        const int64_t B = keys->shape[0];
        CKV_CUDA_TRY(starts_buf.alloc((size_t)B * sizeof(int64_t), stream));
        starts = static_cast<int64_t *>(starts_buf.ptr);
        ckv_status st = ckv::upload_starts(op, row_starts, B, starts, stream);
        if (st != CKV_OK)
            return st;
    }
    return ckv::score_device(op, queries, keys, ckv_scale_or_default(scale, keys->shape[3]), starts, scores->shape[2],
                             static_cast<float *>(scores->data), stream);
}
