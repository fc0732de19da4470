/*
 * select.cu -- the whole of ckv_select on the GPU (ckv_select_cuda), with no
 * copy to the host and no synchronisation: scoring (score.cu) into stream-
 * ordered scratch, the head sum, then one block per selection row.
 *
 * A row block ranks candidates without sorting them: it finds the candidate
 * of a given rank with a radix select (8 bits per pass over an order-preserving
 * integer key, 256-bin histogram in shared memory), ties going to the lower
 * position as on the CPU. Everything ranked above that candidate is kept. The
 * kept prefix positions are then written in ascending order by a block-wide
 * scan over the row, and the window [P, L) after them.
 *
 *   chunkkv: chunk sums in float64, added token by token from the chunk's first
 *     token (bit for bit the CPU's sums). All chunks but possibly the last (the
 *     short one) hold c tokens, so how many chunks the CPU's best-first walk
 *     takes whole (m) and the budget left for the chunk it cuts follow from the
 *     rank of the short chunk alone. The kept chunks are those ranked above the
 *     rank-m chunk; that chunk keeps its `left` best tokens (a second radix
 *     select inside it).
 *   snapkv: pooled scores (float32, the CPU's order of operations), the Bp best.
 *   h2o: the Bp best column sums (the snapkv path with no pooling); its scores
 *     come from all L prompt queries, over the prefix P = L - window.
 *   streamingllm: closed form. random: the CPU's splitmix64 partial
 *     Fisher-Yates shuffle, by one thread of the row's block.
 *   chunkkv-kvpress: kvpress's token scores (mean over window queries and the
 *     group, average pooling, window tokens at the global max + 1, heads summed;
 *     float32 in the CPU's order, the global max by an atomic on order keys),
 *     chunk means in float64, the best k chunks, -1 padding.
 *
 * Non-finite scores: the CPU reports them as an error; reading an error flag
 * back would need a host sync, so here they are not detected. A NaN score
 * ranks below every number (poisoned scoring makes a whole row NaN, so such a
 * row keeps its earliest prefix tokens); the output is still a valid selection
 * (sorted, distinct, in range, window included), but which prefix positions it
 * keeps is unspecified.
 */
#include "common.cuh"

namespace ckv {
namespace {

constexpr int NT = 512; /* threads of a row block */
constexpr int NW = NT / 32;

struct SelArgs {
    const float *scores; /* [rows, P] or nullptr */
    int64_t P, L, n;
    int64_t budget, chunk, pool_kernel, n_sink;
    int method, pool_max;
    uint64_t seed;
    const int64_t *starts; /* device [B] or nullptr */
    int64_t rows_per_start;
    char *scratch;
    int64_t scratch_row_bytes;
    int64_t *out; /* [rows, n] */
};

struct SelSmem {
    unsigned hist[256];
    int warp_sum[32];
    int sel_bin;
    long long sel_rank;
    long long found;
    long long value;
};

/* The float an order key (of a float) came from. */
__device__ __forceinline__ float float_of_key(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

/* Order-preserving unsigned keys: a larger number gets a larger key; -0 equals +0; NaN is 0,
 * below every number (-inf included). */
__device__ __forceinline__ uint64_t key_of(float f) {
    if (f != f)
        return 0;
    if (f == 0.0f)
        f = 0.0f;
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? (uint64_t)(~u) : (uint64_t)(u | 0x80000000u);
}

__device__ __forceinline__ uint64_t key_of(double f) {
    if (f != f)
        return 0;
    if (f == 0.0)
        f = 0.0;
    const uint64_t u = (uint64_t)__double_as_longlong(f);
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

/* Exclusive prefix sum of x over the block; *total gets the block's sum. All threads must call. */
__device__ int block_exclusive_scan(int x, int *total, SelSmem &sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int v = x;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o)
            v += y;
    }
    if (lane == 31)
        sm.warp_sum[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int t = lane < NW ? sm.warp_sum[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o)
                t += y;
        }
        sm.warp_sum[lane] = t;
    }
    __syncthreads();
    const int before = warp > 0 ? sm.warp_sum[warp - 1] : 0;
    *total = sm.warp_sum[NW - 1];
    __syncthreads();
    return before + v - x;
}

struct Rank {
    uint64_t key;
    int64_t pos;
};

/* The candidate of rank k (0-based) among key(0..N-1), ranked by key descending, ties to the
 * lower index. k < N. nbits: how many low bits the keys use (a multiple of 8). */
template <class KeyFn>
__device__ Rank select_rank(const KeyFn &key, int64_t N, int64_t k, int nbits, SelSmem &sm) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    uint64_t prefix = 0, mask = 0;
    int64_t kk = k; /* rank among the candidates that match prefix on mask */
    for (int shift = nbits - 8; shift >= 0; shift -= 8) {
        if (tid < 256)
            sm.hist[tid] = 0;
        __syncthreads();
        for (int64_t i = tid; i < N; i += NT) {
            const uint64_t v = key(i);
            if ((v & mask) == prefix)
                atomicAdd(&sm.hist[(v >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (warp == 0) { /* lane l holds bins 255 - 8l down to 248 - 8l */
            unsigned cnt[8], local = 0;
#pragma unroll
            for (int t = 0; t < 8; t++) {
                cnt[t] = sm.hist[255 - 8 * lane - t];
                local += cnt[t];
            }
            unsigned incl = local;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned y = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o)
                    incl += y;
            }
            const unsigned ballot = __ballot_sync(0xffffffffu, (int64_t)incl > kk);
            if (lane == __ffs(ballot) - 1) {
                int64_t c = incl - local;
                for (int t = 0; t < 8; t++) {
                    if (c + cnt[t] > kk) {
                        sm.sel_bin = 255 - 8 * lane - t;
                        sm.sel_rank = kk - c;
                        break;
                    }
                    c += cnt[t];
                }
            }
        }
        __syncthreads();
        prefix |= (uint64_t)sm.sel_bin << shift;
        mask |= (uint64_t)255u << shift;
        kk = sm.sel_rank;
    }
    /* prefix is now the key itself; kk counts the equal keys before it in index order */
    int64_t found = -1;
    for (int64_t base = 0; base < N; base += NT) {
        const int64_t i = base + tid;
        const int f = i < N && key(i) == prefix;
        int total;
        const int ex = block_exclusive_scan(f, &total, sm);
        if (f && ex == kk)
            sm.found = i;
        __syncthreads();
        if (kk < total) {
            found = sm.found;
            break;
        }
        kk -= total;
    }
    __syncthreads();
    return Rank{prefix, found};
}

/* Candidate (key, pos) ranks above (key r.key, pos r.pos). */
__device__ __forceinline__ bool ranks_above(uint64_t key, int64_t pos, const Rank &r) {
    return key > r.key || (key == r.key && pos < r.pos);
}

/* Write start + j for the j in [0, Pp) where kept(j), ascending, then the window
 * start + [Pp, Lp), into dst[0, n). */
template <class Pred>
__device__ void write_kept(const Pred &kept, int64_t Pp, int64_t Lp, int64_t start, int64_t n, int64_t *dst,
                           SelSmem &sm) {
    int64_t written = 0;
    for (int64_t base = 0; base < Pp; base += NT) {
        const int64_t j = base + threadIdx.x;
        const int f = j < Pp && kept(j);
        int total;
        const int ex = block_exclusive_scan(f, &total, sm);
        if (f && written + ex < n)
            dst[written + ex] = start + j;
        written += total;
    }
    for (int64_t t = threadIdx.x; t < Lp - Pp; t += NT)
        if (written + t < n)
            dst[written + t] = start + Pp + t;
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__global__ void __launch_bounds__(NT) select_rows_kernel(SelArgs a) {
    __shared__ SelSmem sm;
    const int64_t r = blockIdx.x;
    const int tid = threadIdx.x;
    int64_t *dst = a.out + r * a.n;
    const int64_t start = a.starts ? a.starts[r / a.rows_per_start] : 0;
    if (a.budget >= a.L - start) { /* no more than n tokens: the last n positions */
        for (int64_t t = tid; t < a.n; t += NT)
            dst[t] = a.L - a.n + t;
        return;
    }
    /* the row's own tokens [start, L) hold more than budget >= w: its prefix is non-empty */
    const int64_t Pp = a.P - start, Lp = a.L - start, w = a.L - a.P, Bp = a.budget - w;
    const float *s = a.scores ? a.scores + r * a.P + start : nullptr;
    char *scratch = a.scratch + r * a.scratch_row_bytes;

    switch (a.method) {
    case CKV_METHOD_CHUNKKV: {
        const int64_t c = a.chunk < Pp ? a.chunk : Pp;
        const int64_t nch = ckv_chunk_count(Pp, c);
        uint64_t *ckey = reinterpret_cast<uint64_t *>(scratch);
        for (int64_t m = tid; m < nch; m += NT) {
            const int64_t lo = m * c, hi = lo + c < Pp ? lo + c : Pp;
            double sum = 0.0;
            for (int64_t j = lo; j < hi; j++)
                sum += (double)s[j];
            ckey[m] = key_of(sum);
        }
        __syncthreads();
        /* how many chunks the walk takes whole (mfull), and what is left for the next one */
        const int64_t cl = Pp - (nch - 1) * c; /* size of the last chunk */
        int64_t mfull, left;
        if (cl == c) {
            mfull = Bp / c;
            left = Bp - mfull * c;
        } else {
            const uint64_t ks = ckey[nch - 1];
            int cnt = 0; /* chunks ranked above the short one: larger sum, or equal and earlier */
            for (int64_t m = tid; m < nch - 1; m += NT)
                cnt += ckey[m] >= ks;
            int q;
            block_exclusive_scan(cnt, &q, sm);
            if (Bp / c < q) { /* the walk stops before reaching the short chunk */
                mfull = Bp / c;
                left = Bp - mfull * c;
            } else if ((int64_t)q * c + cl > Bp) { /* the short chunk is the one cut */
                mfull = q;
                left = Bp - (int64_t)q * c;
            } else { /* the short chunk is taken whole, then full chunks */
                mfull = (Bp - cl) / c + 1;
                left = Bp - (mfull * c - (c - cl));
            }
        }
        /* mfull < nch since the prefix holds more than Bp tokens */
        const Rank cut = select_rank([&](int64_t i) { return ckey[i]; }, nch, mfull, 64, sm);
        const int64_t lo = cut.pos * c, len = (lo + c < Pp ? lo + c : Pp) - lo;
        Rank tok = {0, -1};
        if (left > 0) /* the cut chunk keeps its `left` best tokens (left < len) */
            tok = select_rank([&](int64_t i) { return key_of(s[lo + i]); }, len, left - 1, 32, sm);
        write_kept(
            [&](int64_t j) {
                const int64_t m = j / c;
                if (m == cut.pos)
                    return left > 0 && !ranks_above(tok.key, tok.pos, Rank{key_of(s[j]), j - lo});
                return ranks_above(ckey[m], m, cut);
            },
            Pp, Lp, start, a.n, dst, sm);
        break;
    }
    case CKV_METHOD_SNAPKV: {
        uint32_t *pkey = reinterpret_cast<uint32_t *>(scratch);
        const int64_t half = a.pool_kernel / 2;
        for (int64_t j = tid; j < Pp; j += NT) {
            const int64_t lo = j - half > 0 ? j - half : 0, hi = j + half + 1 < Pp ? j + half + 1 : Pp;
            float acc = a.pool_max ? s[lo] : 0.0f;
            for (int64_t t = lo; t < hi; t++)
                acc = a.pool_max ? (s[t] > acc ? s[t] : acc) : acc + s[t];
            /* average pooling counts the zero padding, as avg_pool1d does by default */
            pkey[j] = (uint32_t)key_of(a.pool_max ? acc : acc / (float)a.pool_kernel);
        }
        __syncthreads();
        Rank last = {0, -1};
        if (Bp > 0)
            last = select_rank([&](int64_t i) { return (uint64_t)pkey[i]; }, Pp, Bp - 1, 32, sm);
        write_kept([&](int64_t j) { return Bp > 0 && !ranks_above(last.key, last.pos, Rank{pkey[j], j}); }, Pp, Lp,
                   start, a.n, dst, sm);
        break;
    }
    case CKV_METHOD_STREAMINGLLM: {
        /* the first sinks, then the most recent tokens up to the budget */
        const int64_t sinks = a.n_sink < Bp ? a.n_sink : Bp;
        const int64_t recent = Lp - (a.budget - sinks);
        for (int64_t t = tid; t < a.n; t += NT)
            dst[t] = start + (t < sinks ? t : recent + (t - sinks));
        break;
    }
    case CKV_METHOD_RANDOM: {
        int32_t *perm = reinterpret_cast<int32_t *>(scratch);
        unsigned char *keep = reinterpret_cast<unsigned char *>(perm + Pp);
        for (int64_t j = tid; j < Pp; j += NT) {
            perm[j] = (int32_t)j;
            keep[j] = 0;
        }
        __syncthreads();
        if (tid == 0) { /* partial Fisher-Yates, as the CPU draws it */
            uint64_t state = a.seed + 0x632be59bd9b4e019ull * (uint64_t)r;
            for (int64_t j = 0; j < Bp; j++) {
                const int64_t pick = j + (int64_t)(splitmix64(&state) % (uint64_t)(Pp - j));
                const int32_t t = perm[j];
                perm[j] = perm[pick];
                perm[pick] = t;
                keep[perm[j]] = 1;
            }
        }
        __syncthreads();
        write_kept([&](int64_t j) { return keep[j] != 0; }, Pp, Lp, start, a.n, dst, sm);
        break;
    }
    default:
        break;
    }
}

/* kvpress pooling of per-head scores [rows, P] into pooled (same shape): the mean over the window
 * queries and the group (scaled by norm), average-pooled with zero padding; *max_key gets the order
 * key of the largest pooled value. Multiplications and additions are rounded one by one (no
 * fused multiply-add), as the CPU's C code does them. */
__global__ void kvpress_pool_kernel(const float *__restrict__ scores, int64_t rows, int64_t P, int64_t kernel,
                                    float norm, float *__restrict__ pooled, unsigned *__restrict__ max_key) {
    __shared__ unsigned warp_max[32];
    const int64_t half = kernel / 2;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    unsigned mk = 0;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < rows * P; e += stride) {
        const int64_t r = e / P, j = e - r * P;
        const float *s = scores + r * P;
        const int64_t lo = j - half > 0 ? j - half : 0, hi = j + half < P - 1 ? j + half : P - 1;
        float acc = 0.0f;
        for (int64_t t = lo; t <= hi; t++)
            acc = __fadd_rn(acc, __fmul_rn(s[t], norm));
        const float v = acc / (float)kernel;
        pooled[e] = v;
        mk = max(mk, (unsigned)key_of(v));
    }
    for (int o = 16; o > 0; o >>= 1)
        mk = max(mk, __shfl_xor_sync(0xffffffffu, mk, o));
    if ((threadIdx.x & 31) == 0)
        warp_max[threadIdx.x >> 5] = mk;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            mk = max(mk, warp_max[w]);
        atomicMax(max_key, mk);
    }
}

/* kvpress selection, one block per batch row: token scores over [0, L) (heads summed in head order;
 * window tokens (max + 1) * H), chunk means, the best n_keep chunks, positions ascending, -1 after. */
__global__ void __launch_bounds__(NT)
kvpress_rows_kernel(const float *__restrict__ pooled, int64_t H, int64_t P, int64_t L, int64_t c, int64_t n_keep,
                    int64_t n, const unsigned *__restrict__ max_key, char *scratch, int64_t scratch_row_bytes,
                    int64_t *out) {
    __shared__ SelSmem sm;
    const int64_t b = blockIdx.x;
    const int tid = threadIdx.x;
    int64_t *dst = out + b * n;
    uint64_t *ckey = reinterpret_cast<uint64_t *>(scratch + b * scratch_row_bytes);
    const float window_score = __fmul_rn(__fadd_rn(P > 0 ? float_of_key(*max_key) : 0.0f, 1.0f), (float)H);
    const float *rows = pooled + b * H * P;
    auto token = [&](int64_t j) {
        if (j >= P)
            return window_score;
        float acc = 0.0f;
        for (int64_t g = 0; g < H; g++)
            acc = __fadd_rn(acc, rows[g * P + j]);
        return acc;
    };
    const int64_t cc = c < L ? c : L;
    const int64_t nch = ckv_chunk_count(L, cc);
    for (int64_t m = tid; m < nch; m += NT) { /* the mean of each chunk, the short last one too */
        const int64_t lo = m * cc, hi = lo + cc < L ? lo + cc : L;
        double sum = 0.0;
        for (int64_t j = lo; j < hi; j++)
            sum += (double)token(j);
        ckey[m] = key_of(sum / (double)(hi - lo));
    }
    __syncthreads();
    const Rank last = select_rank([&](int64_t i) { return ckey[i]; }, nch, n_keep - 1, 64, sm);
    int64_t written = 0;
    for (int64_t base = 0; base < L; base += NT) {
        const int64_t j = base + tid;
        const int f = j < L && !ranks_above(last.key, last.pos, Rank{ckey[j / cc], j / cc});
        int total;
        const int ex = block_exclusive_scan(f, &total, sm);
        if (f && written + ex < n)
            dst[written + ex] = j;
        written += total;
    }
    for (int64_t t = written + tid; t < n; t += NT)
        dst[t] = -1;
}

/* sums[b, j] = scores[b, 0, j] + scores[b, 1, j] + ... in head order (the CPU's float32 sums). */
__global__ void sum_heads_kernel(const float *__restrict__ scores, int64_t B, int64_t H, int64_t P,
                                 float *__restrict__ sums) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < B * P; e += stride) {
        const int64_t b = e / P, j = e - b * P;
        const float *src = scores + b * H * P + j;
        float acc = src[0];
        for (int64_t g = 1; g < H; g++)
            acc += src[g * P];
        sums[e] = acc;
    }
}

/* Scratch bytes one selection row needs (0 for streamingllm), rounded up to 256. Rows that are all
 * kept never touch their scratch: 0 unless some row ranks (budget < L). */
int64_t row_scratch_bytes(const ckv_select_params *p, int64_t P, int64_t L) {
    int64_t bytes = 0;
    if (p->method == CKV_METHOD_CHUNKKV_KVPRESS) {
        bytes = ckv_chunk_count(L, p->chunk_size) * (int64_t)sizeof(uint64_t);
    } else if (p->budget < L) {
        switch (p->method) {
        case CKV_METHOD_CHUNKKV: bytes = ckv_chunk_count(P, p->chunk_size) * (int64_t)sizeof(uint64_t); break;
        case CKV_METHOD_SNAPKV:
        case CKV_METHOD_H2O: bytes = P * (int64_t)sizeof(uint32_t); break;
        case CKV_METHOD_RANDOM: bytes = P * (int64_t)sizeof(int32_t) + L; break;
        default: break;
        }
    }
    return (bytes + 255) / 256 * 256;
}

/* One block per selection row: row_scores [rows, P] (nullptr for the methods that read none), starts
 * device [B] or nullptr (row r starts at starts[r / rows_per_start]), scratch rows * row_bytes. */
ckv_status launch_select_rows(const char *op, const float *row_scores, int64_t rows, int64_t rows_per_start,
                              int64_t P, int64_t L, int64_t n, const ckv_select_params *params,
                              const int64_t *starts, char *scratch, int64_t row_bytes, int64_t *out,
                              cudaStream_t stream) {
    const bool h2o = params->method == CKV_METHOD_H2O;
    SelArgs a;
    a.scores = row_scores;
    a.P = P;
    a.L = L;
    a.n = n;
    a.budget = params->budget;
    a.chunk = params->chunk_size;
    a.pool_kernel = h2o ? 1 : params->pool_kernel;    /* h2o ranks its raw column sums: */
    a.method = h2o ? CKV_METHOD_SNAPKV : params->method; /* max pooling over one token copies them */
    a.pool_max = h2o ? 1 : params->pool_max != 0;
    a.n_sink = params->n_sink;
    a.seed = params->seed;
    a.starts = starts;
    a.rows_per_start = rows_per_start;
    a.scratch = scratch;
    a.scratch_row_bytes = row_bytes;
    a.out = out;
    select_rows_kernel<<<grid_1d(rows), NT, 0, stream>>>(a);
    CKV_CUDA_LAUNCH_CHECK("select_rows_kernel");
    return CKV_OK;
}

} // namespace
} // namespace ckv

extern "C" ckv_status ckv_select_cuda(const ckv_tensor *q, const ckv_tensor *k, const ckv_select_params *params,
                                      ckv_tensor *indices) {
    CKV_CUDA_ENTER("ckv_select", k->device_id);
    using namespace ckv;
    const cudaStream_t stream = static_cast<cudaStream_t>(params->stream);

    const ckv_method method = params->method;
    const bool kvpress = method == CKV_METHOD_CHUNKKV_KVPRESS, h2o = method == CKV_METHOD_H2O;
    const int64_t B = k->shape[0], H = k->shape[1], L = k->shape[2], w = q->shape[2];
    const int64_t P = ckv_prefix_length(params, L, w);
    const float scale = ckv_scale_or_default(params->scale, k->shape[3]);
    int64_t *out = static_cast<int64_t *>(indices->data);
    const int per_head = params->per_head != 0 && !kvpress;
    const int64_t rows = per_head ? B * H : B;
    const int64_t n = ckv_select_count(params, L);
    const bool ranks = method == CKV_METHOD_CHUNKKV || method == CKV_METHOD_SNAPKV || h2o;
    const bool needs_scores = kvpress || (ranks && params->budget < L && P > 0);
    const int64_t row_bytes = row_scratch_bytes(params, P, L);
    const unsigned grid = grid_1d(rows);
    if (!grid)
        return ckv_fail(CKV_ERR_SHAPE, "%s: %lld selection rows are too many for one CUDA grid", op, (long long)rows);

    /* one stream-ordered scratch allocation: starts, per-head scores, head sums (kvpress: pooled
     * per-head scores), the kvpress maximum, row scratch */
    const size_t n_scores = needs_scores ? (size_t)(B * H * P) : 0;
    const size_t n_sums = kvpress ? n_scores : needs_scores && !per_head && H > 1 ? (size_t)(B * P) : 0;
    const bool starts_given = params->row_starts && !kvpress;
    Carver size(nullptr);
    size.take<int64_t>(starts_given ? (size_t)B : 0);
    size.take<float>(n_scores);
    size.take<float>(n_sums);
    size.take<unsigned>(1);
    size.take<char>((size_t)(rows * row_bytes));
    AsyncBuffer buf;
    CKV_CUDA_TRY(buf.alloc(size.used, stream));
    Carver carve(buf.ptr);
    int64_t *starts = carve.take<int64_t>(starts_given ? (size_t)B : 0);
    float *scores = carve.take<float>(n_scores);
    float *sums = carve.take<float>(n_sums);
    unsigned *max_key = carve.take<unsigned>(1);
    char *scratch = carve.take<char>((size_t)(rows * row_bytes));

    ckv_status st;
    if (starts_given && (st = upload_starts(op, params->row_starts, B, starts, stream)) != CKV_OK)
        return st;
    const float *row_scores = nullptr;
    if (needs_scores) {
        if ((st = score_device(op, q, k, scale, starts_given ? starts : nullptr, P, scores, stream)) != CKV_OK)
            return st;
        row_scores = scores;
        if (kvpress) {
            CKV_CUDA_TRY(cudaMemsetAsync(max_key, 0, sizeof(unsigned), stream));
            const int64_t total = B * H * P;
            if (total > 0) {
                const int64_t blocks = (total + 255) / 256;
                const float norm = 1.0f / ((float)w * (float)(q->shape[1] / H));
                kvpress_pool_kernel<<<(unsigned)(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(
                    scores, B * H, P, params->pool_kernel, norm, sums, max_key);
                CKV_CUDA_LAUNCH_CHECK("kvpress_pool_kernel");
            }
            kvpress_rows_kernel<<<grid, NT, 0, stream>>>(sums, H, P, L, params->chunk_size,
                                                          ckv_kvpress_chunks(params, L), n, max_key, scratch,
                                                          row_bytes, out);
            CKV_CUDA_LAUNCH_CHECK("kvpress_rows_kernel");
            return CKV_OK;
        }
        if (n_sums) {
            const int64_t blocks = (B * P + 255) / 256;
            sum_heads_kernel<<<(unsigned)(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(scores, B, H, P, sums);
            CKV_CUDA_LAUNCH_CHECK("sum_heads_kernel");
            row_scores = sums;
        }
    }
    return launch_select_rows(op, row_scores, rows, per_head ? H : 1, P, L, n, params,
                              starts_given ? starts : nullptr, scratch, row_bytes, out, stream);
}

extern "C" ckv_status ckv_select_from_scores_cuda(const ckv_tensor *scores, int64_t L,
                                                  const ckv_select_params *params, ckv_tensor *indices) {
    CKV_CUDA_ENTER("ckv_select_from_scores", scores->device_id);
    using namespace ckv;
    const cudaStream_t stream = static_cast<cudaStream_t>(params->stream);
    const int per_head = scores->ndim == 3;
    const int64_t B = scores->shape[0], H = per_head ? scores->shape[1] : 1, P = scores->shape[scores->ndim - 1];
    const int64_t rows = B * H;
    const int64_t row_bytes = row_scratch_bytes(params, P, L);
    if (!grid_1d(rows))
        return ckv_fail(CKV_ERR_SHAPE, "%s: %lld selection rows are too many for one CUDA grid", op, (long long)rows);
    Carver size(nullptr);
    size.take<int64_t>(params->row_starts ? (size_t)B : 0);
    size.take<char>((size_t)(rows * row_bytes));
    AsyncBuffer buf;
    CKV_CUDA_TRY(buf.alloc(size.used, stream));
    Carver carve(buf.ptr);
    int64_t *starts = carve.take<int64_t>(params->row_starts ? (size_t)B : 0);
    char *scratch = carve.take<char>((size_t)(rows * row_bytes));
    ckv_status st;
    if (params->row_starts && (st = upload_starts(op, params->row_starts, B, starts, stream)) != CKV_OK)
        return st;
    return launch_select_rows(op, static_cast<const float *>(scores->data), rows, H, P, L,
                              ckv_kept_count(params->budget, L), params, params->row_starts ? starts : nullptr,
                              scratch, row_bytes, static_cast<int64_t *>(indices->data), stream);
}
