/*
 * ops.c -- the public ops: check every argument once, then hand trusted views to a backend entry
 * point with the op's own signature (backend.h): ckv_<op>_cpu, or ckv_<op>_cuda for CUDA tensors.
 * Kernels check nothing; what they share with this file (errors, sizes, threads, counts) is in base.c.
 */
#include <math.h>
#include <stdint.h>

#include "backend.h"
#include "cpu/simd.h"

/* The backend entry point of an op for tensors on `device`: the one switch every op goes through. */
#ifdef CKV_WITH_CUDA
#define CKV_DISPATCH(device, op, ...) ((device) == CKV_DEVICE_CUDA ? op##_cuda(__VA_ARGS__) : op##_cpu(__VA_ARGS__))
#else
#define CKV_DISPATCH(device, op, ...) ((void)(device), op##_cpu(__VA_ARGS__))
#endif

/* ---------------------------------------------------------------- CPU facts */

const char *ckv_simd_level(void) { return ckv_cpu_row_level(); }

double ckv_fma_peak_gflops(int threads, double seconds) {
    return ckv_cpu_fma_peak(threads > 0 ? threads : ckv_threads(), seconds > 0.0 ? seconds : 0.2);
}

/* ---------------------------------------------------------------- checks every op shares */

static const char *dtype_name(ckv_dtype dtype) {
    switch (dtype) {
    case CKV_DTYPE_F32: return "float32";
    case CKV_DTYPE_F16: return "float16";
    case CKV_DTYPE_BF16: return "bfloat16";
    case CKV_DTYPE_I64: return "int64";
    }
    return "unknown";
}

/* Largest dimension the core takes: keeps every size product far from overflow. */
#define CKV_MAX_DIM ((int64_t)1 << 31)

static ckv_status check_view(const char *op, const char *name, const ckv_tensor *t, int ndim) {
    if (!t)
        return ckv_fail(CKV_ERR_VALUE, "%s: %s is missing", op, name);
    if (t->ndim != ndim)
        return ckv_fail(CKV_ERR_SHAPE, "%s: %s must have %d dimensions, got %d", op, name, ndim, t->ndim);
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] < 0 || t->shape[i] >= CKV_MAX_DIM)
            return ckv_fail(CKV_ERR_SHAPE, "%s: %s dimension %d has size %lld, expected 0 <= size < 2^31", op, name,
                            i, (long long)t->shape[i]);
    return CKV_OK;
}

static ckv_status check_float(const char *op, const char *name, const ckv_tensor *t) {
    if (t->dtype != CKV_DTYPE_F32 && t->dtype != CKV_DTYPE_F16 && t->dtype != CKV_DTYPE_BF16)
        return ckv_fail(CKV_ERR_DTYPE, "%s: %s must be float32, float16 or bfloat16, got %s", op, name,
                        dtype_name(t->dtype));
    return CKV_OK;
}

static ckv_status check_same_device(const char *op, const char *name, const ckv_tensor *t, const ckv_tensor *ref,
                                    const char *ref_name) {
    if (t->device != ref->device || t->device_id != ref->device_id)
        return ckv_fail(CKV_ERR_DEVICE, "%s: %s is on %s:%d but %s is on %s:%d; expected one device", op, name,
                        t->device == CKV_DEVICE_CUDA ? "cuda" : "cpu", t->device_id, ref_name,
                        ref->device == CKV_DEVICE_CUDA ? "cuda" : "cpu", ref->device_id);
    return CKV_OK;
}

static ckv_status check_backend(const char *op, const ckv_tensor *t) {
    if (t->device == CKV_DEVICE_CPU)
        return CKV_OK;
#ifdef CKV_WITH_CUDA
    if (t->device == CKV_DEVICE_CUDA)
        return CKV_OK;
#endif
    return ckv_fail(CKV_ERR_DEVICE, "%s: tensors on %s are not supported by this build (it has: cpu%s)", op,
                    t->device == CKV_DEVICE_CUDA ? "cuda" : "this device", ckv_has_cuda() ? ", cuda" : "");
}

/* An output must be exactly [shape] and C-contiguous. An empty one has no layout to check
 * (torch gives shape [B, H, 0] the strides [H, 1, 1]). */
static ckv_status check_contiguous_out(const char *op, const char *name, const ckv_tensor *t) {
    int64_t expect = 1;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] == 0)
            return CKV_OK;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] > 1 && t->strides[i] != expect)
            return ckv_fail(CKV_ERR_LAYOUT, "%s: %s must be C-contiguous", op, name);
        expect *= t->shape[i];
    }
    return CKV_OK;
}

/* Element count; 0 when any dimension is 0, saturating at INT64_MAX (a view with zero strides can
 * describe more elements than int64 counts, and the product must not overflow on the way to a 0). */
static int64_t numel(const ckv_tensor *t) {
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] == 0)
            return 0;
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n = n > INT64_MAX / t->shape[i] ? INT64_MAX : n * t->shape[i];
    return n;
}

/* Queries and keys for scoring: [B, Hq, w, D] and [B, Hkv, L, D]. */
static ckv_status check_queries_keys(const char *op, const ckv_tensor *q, const ckv_tensor *k) {
    ckv_status st;
    if ((st = check_view(op, "queries", q, 4)) || (st = check_view(op, "keys", k, 4)))
        return st;
    if ((st = check_float(op, "queries", q)) || (st = check_float(op, "keys", k)))
        return st;
    if ((st = check_same_device(op, "keys", k, q, "queries")) || (st = check_backend(op, q)))
        return st;
    const int64_t B = k->shape[0], Hkv = k->shape[1], L = k->shape[2], D = k->shape[3];
    const int64_t Hq = q->shape[1], w = q->shape[2];
    if (q->shape[0] != B)
        return ckv_fail(CKV_ERR_SHAPE, "%s: queries batch %lld must equal keys batch %lld", op,
                        (long long)q->shape[0], (long long)B);
    if (q->shape[3] != D)
        return ckv_fail(CKV_ERR_SHAPE, "%s: queries head dim %lld must equal keys head dim %lld", op,
                        (long long)q->shape[3], (long long)D);
    if (Hkv < 1 || Hq < 1 || Hq % Hkv != 0)
        return ckv_fail(CKV_ERR_SHAPE,
                        "%s: query heads (%lld) must be a positive multiple of key heads (%lld)", op,
                        (long long)Hq, (long long)Hkv);
    if (D < 1)
        return ckv_fail(CKV_ERR_SHAPE, "%s: head dim must be >= 1, got %lld", op, (long long)D);
    if (w < 1 || w > L)
        return ckv_fail(CKV_ERR_SHAPE, "%s: window w = queries.shape[2] = %lld must be in [1, L = %lld]", op,
                        (long long)w, (long long)L);
    /* per-thread scoring scratch is (Hq/Hkv * w) x (L + D) floats */
    if ((Hq / Hkv) * w > (int64_t)1 << 24 || L > (int64_t)1 << 28)
        return ckv_fail(CKV_ERR_SHAPE, "%s: window x group (%lld) or L (%lld) too large for scoring scratch", op,
                        (long long)((Hq / Hkv) * w), (long long)L);
    return CKV_OK;
}

/* ---------------------------------------------------------------- ckv_score */

/* Row starts, when given, lie in [0, L]. */
static ckv_status check_row_starts(const char *op, const int64_t *starts, int64_t B, int64_t L) {
    for (int64_t b = 0; starts && b < B; b++)
        if (starts[b] < 0 || starts[b] > L)
            return ckv_fail(CKV_ERR_VALUE, "%s: row_starts[%lld] = %lld must be in [0, L = %lld]", op, (long long)b,
                            (long long)starts[b], (long long)L);
    return CKV_OK;
}

ckv_status ckv_score(const ckv_tensor *q, const ckv_tensor *k, float scale, const int64_t *row_starts,
                     ckv_tensor *scores, void *stream) {
    static const char op[] = "ckv_score";
    ckv_status st;
    if ((st = check_queries_keys(op, q, k)) || (st = check_view(op, "scores", scores, 3)))
        return st;
    if (!isfinite(scale))
        return ckv_fail(CKV_ERR_VALUE, "%s: scale must be finite", op);
    if ((st = check_row_starts(op, row_starts, k->shape[0], k->shape[2])))
        return st;
    /* P = scores->shape[2], usually L - w; H2O scores a shorter prefix with more queries */
    if (scores->dtype != CKV_DTYPE_F32)
        return ckv_fail(CKV_ERR_DTYPE, "%s: scores must be float32, got %s", op, dtype_name(scores->dtype));
    if (scores->shape[0] != k->shape[0] || scores->shape[1] != k->shape[1] || scores->shape[2] > k->shape[2])
        return ckv_fail(CKV_ERR_SHAPE, "%s: scores must have shape [B, Hkv, P] = [%lld, %lld, P <= L = %lld]", op,
                        (long long)k->shape[0], (long long)k->shape[1], (long long)k->shape[2]);
    if ((st = check_same_device(op, "scores", scores, q, "queries")) || (st = check_contiguous_out(op, "scores", scores)))
        return st;
    if (numel(scores) == 0)
        return CKV_OK;
    return CKV_DISPATCH(q->device, ckv_score, q, k, scale, row_starts, scores, stream);
}

/* ---------------------------------------------------------------- ckv_select */

/* The parameters every method reads, whatever the scores come from. */
static ckv_status check_method_params(const char *op, const ckv_select_params *p) {
    if (!p)
        return ckv_fail(CKV_ERR_VALUE, "%s: params is missing", op);
    if ((int)p->method < CKV_METHOD_CHUNKKV || (int)p->method > CKV_METHOD_CHUNKKV_KVPRESS)
        return ckv_fail(CKV_ERR_VALUE, "%s: unknown method %d", op, (int)p->method);
    if (p->chunk_size < 1)
        return ckv_fail(CKV_ERR_VALUE, "%s: chunk_size must be >= 1, got %lld", op, (long long)p->chunk_size);
    if (!isfinite(p->scale))
        return ckv_fail(CKV_ERR_VALUE, "%s: scale must be finite", op);
    if ((p->method == CKV_METHOD_SNAPKV || p->method == CKV_METHOD_CHUNKKV_KVPRESS) &&
        (p->pool_kernel < 1 || p->pool_kernel % 2 == 0))
        return ckv_fail(CKV_ERR_VALUE, "%s: pool kernel must be a positive odd number, got %lld", op,
                        (long long)p->pool_kernel);
    if (p->n_sink < 0)
        return ckv_fail(CKV_ERR_VALUE, "%s: n_sink must be >= 0, got %lld", op, (long long)p->n_sink);
    return CKV_OK;
}

static ckv_status check_budget(const char *op, const ckv_select_params *p, int64_t w) {
    if (p->budget < w)
        return ckv_fail(CKV_ERR_VALUE, "%s: budget (%lld) must be >= the window w (%lld): the window is always kept",
                        op, (long long)p->budget, (long long)w);
    return CKV_OK;
}

static ckv_status check_params(const char *op, const ckv_select_params *p, int64_t w, int64_t L) {
    ckv_status st;
    if ((st = check_method_params(op, p)))
        return st;
    if (p->method == CKV_METHOD_CHUNKKV_KVPRESS) {
        if (!(p->keep_fraction > 0.0 && p->keep_fraction <= 1.0))
            return ckv_fail(CKV_ERR_VALUE, "%s: keep_fraction must be in (0, 1], got %g", op, p->keep_fraction);
        if (p->per_head || p->row_starts)
            return ckv_fail(CKV_ERR_VALUE, "%s: chunkkv-kvpress selects one set per row without padding, as kvpress "
                                           "does: per_head and row_starts are not taken", op);
        return CKV_OK;
    }
    if (p->method == CKV_METHOD_H2O) {
        if (p->window < 1 || p->window > L)
            return ckv_fail(CKV_ERR_VALUE, "%s: h2o window (recent tokens) must be in [1, L = %lld], got %lld", op,
                            (long long)L, (long long)p->window);
        w = p->window;
    }
    return check_budget(op, p, w);
}

/* indices [B, n] or [B, Hkv, n] (per_head): int64, C-contiguous, on the device of ref. */
static ckv_status check_select_out(const char *op, const ckv_tensor *indices, int per_head, int64_t B, int64_t H,
                                   int64_t n, const ckv_tensor *ref, const char *ref_name) {
    ckv_status st;
    if ((st = check_view(op, "indices", indices, per_head ? 3 : 2)))
        return st;
    if (indices->dtype != CKV_DTYPE_I64)
        return ckv_fail(CKV_ERR_DTYPE, "%s: indices must be int64, got %s", op, dtype_name(indices->dtype));
    if (indices->shape[0] != B || (per_head && indices->shape[1] != H) || indices->shape[indices->ndim - 1] != n) {
        if (per_head)
            return ckv_fail(CKV_ERR_SHAPE, "%s: indices must have shape [B, Hkv, n] = [%lld, %lld, %lld]", op,
                            (long long)B, (long long)H, (long long)n);
        return ckv_fail(CKV_ERR_SHAPE, "%s: indices must have shape [B, n] = [%lld, %lld]", op, (long long)B,
                        (long long)n);
    }
    if ((st = check_same_device(op, "indices", indices, ref, ref_name)))
        return st;
    return check_contiguous_out(op, "indices", indices);
}

ckv_status ckv_select(const ckv_tensor *q, const ckv_tensor *k, const ckv_select_params *params,
                      ckv_tensor *indices) {
    static const char op[] = "ckv_select";
    ckv_status st;
    if ((st = check_queries_keys(op, q, k)) || (st = check_params(op, params, q->shape[2], k->shape[2])) ||
        (st = check_row_starts(op, params->row_starts, k->shape[0], k->shape[2])))
        return st;
    const int64_t B = k->shape[0], H = k->shape[1], L = k->shape[2];
    const int64_t n = ckv_select_count(params, L);
    const int per_head = params->per_head != 0;
    if ((st = check_select_out(op, indices, per_head, B, H, n, q, "queries")))
        return st;
    if (numel(indices) == 0)
        return CKV_OK;
    return CKV_DISPATCH(q->device, ckv_select, q, k, params, indices);
}

/* ---------------------------------------------------------------- ckv_select_from_scores */

ckv_status ckv_select_from_scores(const ckv_tensor *scores, int64_t L, const ckv_select_params *params,
                                  ckv_tensor *indices) {
    static const char op[] = "ckv_select_from_scores";
    ckv_status st;
    if ((st = check_method_params(op, params)))
        return st;
    if (params->method != CKV_METHOD_CHUNKKV && params->method != CKV_METHOD_SNAPKV &&
        params->method != CKV_METHOD_H2O)
        return ckv_fail(CKV_ERR_VALUE,
                        "%s: method %d does not select from summed token scores; expected chunkkv (0), snapkv (1) "
                        "or h2o (4) (streamingllm and random read no scores, chunkkv-kvpress ranks its own)",
                        op, (int)params->method);
    const int per_head = params->per_head != 0;
    if ((st = check_view(op, "scores", scores, per_head ? 3 : 2)))
        return st;
    if (scores->dtype != CKV_DTYPE_F32)
        return ckv_fail(CKV_ERR_DTYPE, "%s: scores must be float32, got %s", op, dtype_name(scores->dtype));
    if ((st = check_backend(op, scores)) || (st = check_contiguous_out(op, "scores", scores)))
        return st;
    const int64_t B = scores->shape[0], H = per_head ? scores->shape[1] : 1, P = scores->shape[scores->ndim - 1];
    if (L < P || L >= CKV_MAX_DIM)
        return ckv_fail(CKV_ERR_VALUE, "%s: L = %lld must be in [P = %lld (scores.shape[-1]), 2^31)", op, (long long)L,
                        (long long)P);
    if ((st = check_budget(op, params, L - P)) || (st = check_row_starts(op, params->row_starts, B, L)))
        return st;
    const int64_t n = ckv_kept_count(params->budget, L);
    if ((st = check_select_out(op, indices, per_head, B, H, n, scores, "scores")))
        return st;
    if (numel(indices) == 0)
        return CKV_OK;
    return CKV_DISPATCH(scores->device, ckv_select_from_scores, scores, L, params, indices);
}

/* ---------------------------------------------------------------- ckv_gather */

static int same_view(const ckv_tensor *a, const ckv_tensor *b) {
    if (a->data != b->data)
        return 0;
    for (int i = 0; i < 4; i++)
        if (a->strides[i] != b->strides[i])
            return 0;
    return 1;
}

/* a + b and a * b (a >= 0), saturating at the int64 limits: views from a producer may claim strides
 * whose byte spans do not fit in int64. */
static int64_t sat_add(int64_t a, int64_t b) {
    if (b > 0 && a > INT64_MAX - b)
        return INT64_MAX;
    if (b < 0 && a < INT64_MIN - b)
        return INT64_MIN;
    return a + b;
}

static int64_t sat_mul(int64_t a, int64_t b) {
    if (a == 0 || b == 0)
        return 0;
    if (b == INT64_MIN || a > INT64_MAX / (b < 0 ? -b : b))
        return b > 0 ? INT64_MAX : INT64_MIN;
    return a * b;
}

/* A view's bytes: element i at off + sum(i[d] * stride[d]) (bytes, relative to some base), isz bytes long. */
typedef struct {
    int64_t off, isz;
    int ndim;
    int64_t shape[CKV_MAX_DIMS], stride[CKV_MAX_DIMS];
} byte_view;

static byte_view bytes_of(const ckv_tensor *t, const void *base) {
    byte_view v;
    v.off = (int64_t)((uintptr_t)t->data - (uintptr_t)base);
    v.isz = (int64_t)ckv_itemsize(t->dtype);
    v.ndim = t->ndim;
    for (int i = 0; i < t->ndim; i++) {
        v.shape[i] = t->shape[i];
        v.stride[i] = sat_mul(v.isz, t->strides[i]);
    }
    return v;
}

/* [lo, hi]: the lowest and highest byte the (non-empty) view touches, saturating. */
static void byte_range(const byte_view *v, int64_t *lo, int64_t *hi) {
    int64_t neg = 0, pos = 0;
    for (int i = 0; i < v->ndim; i++) {
        const int64_t span = sat_mul(v->shape[i] - 1, v->stride[i]);
        if (span < 0)
            neg = sat_add(neg, span);
        else
            pos = sat_add(pos, span);
    }
    *lo = sat_add(v->off, neg);
    *hi = sat_add(sat_add(v->off, pos), v->isz - 1);
}

/* Whether two non-empty views share a byte: their byte ranges meet, and halving the view with the
 * wider range along its widest dimension finds two pieces that still meet, down to single elements.
 * Pieces whose ranges are apart are dropped at once, so views side by side or interleaved in one
 * buffer are told apart in about (pieces) steps; past *budget steps the answer is yes (refusing a
 * safe layout beats corrupting data). */
static int bytes_meet(const byte_view *a, const byte_view *b, int64_t *budget) {
    int64_t alo, ahi, blo, bhi;
    byte_range(a, &alo, &ahi);
    byte_range(b, &blo, &bhi);
    if (alo > bhi || blo > ahi)
        return 0;
    if (--*budget < 0)
        return 1;
    const byte_view *wide = (ahi - alo) >= (bhi - blo) ? a : b, *other = wide == a ? b : a;
    for (int pass = 0; pass < 2; pass++) {
        int dim = -1;
        int64_t best = 0;
        for (int i = 0; i < wide->ndim; i++) {
            const int64_t span = sat_mul(wide->shape[i] - 1, wide->stride[i] < 0 ? -wide->stride[i] : wide->stride[i]);
            if (span > best) /* a dimension of stride 0 repeats one address: nothing to split */
                dim = i, best = span;
        }
        if (dim >= 0) {
            byte_view lo = *wide, hi = *wide;
            lo.shape[dim] = wide->shape[dim] / 2;
            hi.shape[dim] = wide->shape[dim] - lo.shape[dim];
            hi.off = sat_add(wide->off, sat_mul(lo.shape[dim], wide->stride[dim]));
            return bytes_meet(&lo, other, budget) || bytes_meet(&hi, other, budget);
        }
        const byte_view *t = wide; /* one address: split the other view */
        wide = other;
        other = t;
    }
    return 1; /* two addresses whose bytes meet */
}

/* Whether two views share memory (exactly, within a bounded search; see bytes_meet). */
static int views_overlap(const ckv_tensor *a, const ckv_tensor *b) {
    if (numel(a) == 0 || numel(b) == 0)
        return 0;
    const byte_view va = bytes_of(a, a->data), vb = bytes_of(b, a->data);
    int64_t budget = (int64_t)1 << 16;
    return bytes_meet(&va, &vb, &budget);
}

static ckv_status refuse_overlap(const char *op, const char *out_name, const ckv_tensor *out, const char *name,
                                 const ckv_tensor *t) {
    if (!views_overlap(out, t))
        return CKV_OK;
    return ckv_fail(CKV_ERR_LAYOUT,
                    "%s: %s overlaps %s in memory; an output may share memory with an input only as the very same "
                    "view (same data and strides, cut to n <= L tokens: in-place compaction)", op, out_name, name);
}

/* An output and the inputs: its own input only as the very same view cut to n <= L tokens (in-place
 * compaction, which reads each row before writing over it); no overlap with the other input (the
 * first gather would overwrite what the second reads) or the indices. Checked here, once, for every
 * backend. */
static ckv_status check_out_overlap(const char *op, const char *out_name, const ckv_tensor *out, const char *own_name,
                                    const ckv_tensor *own, const char *other_name, const ckv_tensor *other,
                                    const ckv_tensor *indices) {
    ckv_status st;
    if (!(same_view(out, own) && out->shape[2] <= own->shape[2]) && (st = refuse_overlap(op, out_name, out, own_name, own)))
        return st;
    if ((st = refuse_overlap(op, out_name, out, other_name, other)))
        return st;
    return refuse_overlap(op, out_name, out, "indices", indices);
}

static ckv_status check_gather_out(const char *op, const char *name, const ckv_tensor *out, const ckv_tensor *src,
                                   int64_t n) {
    ckv_status st;
    if ((st = check_view(op, name, out, 4)))
        return st;
    if (out->dtype != src->dtype)
        return ckv_fail(CKV_ERR_DTYPE, "%s: %s must have the dtype of its input (%s), got %s", op, name,
                        dtype_name(src->dtype), dtype_name(out->dtype));
    if (out->shape[0] != src->shape[0] || out->shape[1] != src->shape[1] || out->shape[2] != n ||
        out->shape[3] != src->shape[3])
        return ckv_fail(CKV_ERR_SHAPE, "%s: %s must have shape [B, Hkv, n, D] = [%lld, %lld, %lld, %lld]", op, name,
                        (long long)src->shape[0], (long long)src->shape[1], (long long)n, (long long)src->shape[3]);
    for (int i = 0; i < 4 && numel(out) > 0; i++) /* an empty output (NumPy: all strides 0) writes nothing */
        if (out->shape[i] > 1 && out->strides[i] == 0)
            return ckv_fail(CKV_ERR_LAYOUT, "%s: %s has a zero stride in dimension %d: rows would overwrite each other",
                            op, name, i);
    return check_same_device(op, name, out, src, "keys");
}

/* Every index in [0, L); rows strictly increasing when compacting in place. */
static ckv_status check_indices_cpu(const char *op, const ckv_tensor *idx, int64_t L, int need_increasing) {
    const int64_t n = idx->shape[idx->ndim - 1];
    const int64_t outer = idx->ndim == 3 ? idx->shape[0] * idx->shape[1] : idx->shape[0];
    const int64_t H = idx->ndim == 3 ? idx->shape[1] : 1;
    const int64_t *base = (const int64_t *)idx->data;
    for (int64_t o = 0; o < outer; o++) {
        const int64_t *row = base + (o / H) * idx->strides[0] + (idx->ndim == 3 ? (o % H) * idx->strides[1] : 0);
        const int64_t s = idx->strides[idx->ndim - 1];
        for (int64_t t = 0; t < n; t++) {
            const int64_t v = row[t * s];
            if (v < 0 || v >= L)
                return ckv_fail(CKV_ERR_VALUE, "%s: indices must be in [0, L = %lld), found %lld", op, (long long)L,
                                (long long)v);
            if (need_increasing && t > 0 && v <= row[(t - 1) * s])
                return ckv_fail(CKV_ERR_VALUE,
                                "%s: in-place compaction needs strictly increasing indices in every row", op);
        }
    }
    return CKV_OK;
}

ckv_status ckv_gather(const ckv_tensor *keys, const ckv_tensor *values, const ckv_tensor *indices,
                      ckv_tensor *keys_out, ckv_tensor *values_out, void *stream) {
    static const char op[] = "ckv_gather";
    ckv_status st;
    if ((st = check_view(op, "keys", keys, 4)) || (st = check_view(op, "values", values, 4)))
        return st;
    if ((st = check_float(op, "keys", keys)) || (st = check_float(op, "values", values)))
        return st;
    if (values->dtype != keys->dtype)
        return ckv_fail(CKV_ERR_DTYPE, "%s: values must have the dtype of keys (%s), got %s", op, dtype_name(keys->dtype),
                        dtype_name(values->dtype));
    for (int i = 0; i < 4; i++)
        if (keys->shape[i] != values->shape[i])
            return ckv_fail(CKV_ERR_SHAPE, "%s: values must have the shape of keys; dimension %d is %lld, not %lld", op,
                            i, (long long)values->shape[i], (long long)keys->shape[i]);
    if ((st = check_same_device(op, "values", values, keys, "keys")) || (st = check_backend(op, keys)))
        return st;
    if (!indices || (indices->ndim != 2 && indices->ndim != 3))
        return ckv_fail(CKV_ERR_SHAPE, "%s: indices must have 2 dimensions [B, n] or 3 [B, Hkv, n], got %d", op,
                        indices ? indices->ndim : -1);
    if ((st = check_view(op, "indices", indices, indices->ndim)))
        return st;
    if (indices->dtype != CKV_DTYPE_I64)
        return ckv_fail(CKV_ERR_DTYPE, "%s: indices must be int64, got %s", op, dtype_name(indices->dtype));
    if ((st = check_same_device(op, "indices", indices, keys, "keys")))
        return st;
    const int64_t B = keys->shape[0], H = keys->shape[1], L = keys->shape[2];
    const int64_t n = indices->shape[indices->ndim - 1];
    if (indices->shape[0] != B || (indices->ndim == 3 && indices->shape[1] != H))
        return ckv_fail(CKV_ERR_SHAPE, "%s: indices must have shape [B = %lld, n] or [B, Hkv = %lld, n]", op,
                        (long long)B, (long long)H);
    if ((st = check_gather_out(op, "keys_out", keys_out, keys, n)) ||
        (st = check_gather_out(op, "values_out", values_out, values, n)))
        return st;
    if (views_overlap(keys_out, values_out))
        return ckv_fail(CKV_ERR_LAYOUT, "%s: keys_out and values_out must not share memory (their bytes overlap)", op);
    if ((st = check_out_overlap(op, "keys_out", keys_out, "keys", keys, "values", values, indices)) ||
        (st = check_out_overlap(op, "values_out", values_out, "values", values, "keys", keys, indices)))
        return st;
    /* indices are checked even when nothing is copied (D = 0): a bad index is an error whatever D is */
    const int in_place = numel(keys_out) > 0 && (same_view(keys, keys_out) || same_view(values, values_out));
    if (keys->device == CKV_DEVICE_CPU && numel(indices) > 0 && (st = check_indices_cpu(op, indices, L, in_place)))
        return st;
    if (numel(keys_out) == 0)
        return CKV_OK;
    return CKV_DISPATCH(keys->device, ckv_gather, keys, values, indices, keys_out, values_out, stream);
}
