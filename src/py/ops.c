/*
 * ops.c -- one thin wrapper per op: borrow the DLPack capsules, release the
 * GIL while the core runs, map a failed status to an exception.
 * Outputs are allocated by the Python layer (chunkkv/ops.py) in the caller's
 * framework and arrive here as writable capsules.
 */
#include "binding.h"

#include <stdint.h>

/* Borrow n capsules (names for messages, writable flags); -1 with an exception on failure.
 * The caller releases all n in every case. */
static int borrow_all(int n, PyObject **caps, const char **names, const int *writable, ckv_borrowed *out) {
    for (int i = 0; i < n; i++)
        out[i].managed = NULL;
    for (int i = 0; i < n; i++)
        if (ckv_borrow(caps[i], names[i], writable[i], &out[i]) < 0)
            return -1;
    return 0;
}

static void release_all(int n, ckv_borrowed *b) {
    for (int i = 0; i < n; i++)
        ckv_release(&b[i]);
}

/* None, or a sequence of B ints -> a malloc'd int64 array (*out stays NULL for None). */
static int parse_row_starts(PyObject *obj, int64_t batch, int64_t **out) {
    *out = NULL;
    if (obj == Py_None)
        return 0;
    PyObject *seq = PySequence_Fast(obj, "row_starts: expected None or a sequence of ints");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n != batch) {
        PyErr_Format(PyExc_ValueError, "row_starts: expected %lld entries (one per batch row), got %zd",
                     (long long)batch, n);
        Py_DECREF(seq);
        return -1;
    }
    *out = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (!*out) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        (*out)[i] = v;
    }
    Py_DECREF(seq);
    return 0;
}

/* Batch size of a borrowed 4-D keys view (0 for other ranks: the core reports those). */
static int64_t batch_of(const ckv_borrowed *keys) { return keys->view.ndim == 4 ? keys->view.shape[0] : 0; }

static PyObject *py_score(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"queries", "keys", "scores", "scale", "row_starts", "stream", NULL};
    PyObject *caps[3], *starts_obj = Py_None;
    float scale = 0.0f;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|fOK:score", kwlist, &caps[0], &caps[1], &caps[2], &scale,
                                     &starts_obj, &stream))
        return NULL;
    int64_t *starts = NULL;
    static const char *names[] = {"queries", "keys", "scores"};
    static const int writable[] = {0, 0, 1};
    ckv_borrowed b[3];
    PyObject *result = NULL;
    if (borrow_all(3, caps, names, writable, b) == 0 && parse_row_starts(starts_obj, batch_of(&b[1]), &starts) == 0) {
        ckv_status st;
        Py_BEGIN_ALLOW_THREADS
        st = ckv_score(&b[0].view, &b[1].view, scale, starts, &b[2].view, (void *)(uintptr_t)stream);
        Py_END_ALLOW_THREADS
        result = st == CKV_OK ? Py_NewRef(Py_None) : ckv_raise(st);
    }
    PyMem_Free(starts);
    release_all(3, b);
    return result;
}

static PyObject *py_select(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"queries", "keys", "indices", "method", "budget", "chunk_size", "scale", "per_head",
                             "pool_kernel", "pool_max", "n_sink", "seed", "stream", "row_starts", "window",
                             "keep_fraction", NULL};
    PyObject *caps[3], *starts_obj = Py_None;
    ckv_select_params p;
    ckv_select_params_init(&p);
    int method = 0;
    long long budget = 0, chunk = p.chunk_size, kernel = p.pool_kernel, sinks = p.n_sink;
    unsigned long long seed = 0;
    unsigned long long stream = 0;
    long long window = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|iLLfpLpLKKOLd:select", kwlist, &caps[0], &caps[1], &caps[2],
                                     &method, &budget, &chunk, &p.scale, &p.per_head, &kernel, &p.pool_max, &sinks,
                                     &seed, &stream, &starts_obj, &window, &p.keep_fraction))
        return NULL;
    p.window = window;
    int64_t *starts = NULL;
    p.method = (ckv_method)method;
    p.budget = budget;
    p.chunk_size = chunk;
    p.pool_kernel = kernel;
    p.n_sink = sinks;
    p.seed = seed;
    p.stream = (void *)(uintptr_t)stream;
    static const char *names[] = {"queries", "keys", "indices"};
    static const int writable[] = {0, 0, 1};
    ckv_borrowed b[3];
    PyObject *result = NULL;
    if (borrow_all(3, caps, names, writable, b) == 0 && parse_row_starts(starts_obj, batch_of(&b[1]), &starts) == 0) {
        ckv_status st;
        p.row_starts = starts;
        Py_BEGIN_ALLOW_THREADS
        st = ckv_select(&b[0].view, &b[1].view, &p, &b[2].view);
        Py_END_ALLOW_THREADS
        result = st == CKV_OK ? Py_NewRef(Py_None) : ckv_raise(st);
    }
    PyMem_Free(starts);
    release_all(3, b);
    return result;
}

static PyObject *py_select_from_scores(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"scores", "indices", "length", "method", "budget", "chunk_size", "per_head",
                             "pool_kernel", "pool_max", "stream", "row_starts", NULL};
    PyObject *caps[2], *starts_obj = Py_None;
    ckv_select_params p;
    ckv_select_params_init(&p);
    int method = 0;
    long long length = 0, budget = 0, chunk = p.chunk_size, kernel = p.pool_kernel;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOL|iLLpLpKO:select_from_scores", kwlist, &caps[0], &caps[1], &length,
                                     &method, &budget, &chunk, &p.per_head, &kernel, &p.pool_max, &stream, &starts_obj))
        return NULL;
    p.method = (ckv_method)method;
    p.budget = budget;
    p.chunk_size = chunk;
    p.pool_kernel = kernel;
    p.stream = (void *)(uintptr_t)stream;
    static const char *names[] = {"scores", "indices"};
    static const int writable[] = {0, 1};
    ckv_borrowed b[2];
    int64_t *starts = NULL;
    PyObject *result = NULL;
    if (borrow_all(2, caps, names, writable, b) == 0 &&
        parse_row_starts(starts_obj, b[0].view.ndim >= 2 ? b[0].view.shape[0] : 0, &starts) == 0) {
        ckv_status st;
        p.row_starts = starts;
        Py_BEGIN_ALLOW_THREADS
        st = ckv_select_from_scores(&b[0].view, length, &p, &b[1].view);
        Py_END_ALLOW_THREADS
        result = st == CKV_OK ? Py_NewRef(Py_None) : ckv_raise(st);
    }
    PyMem_Free(starts);
    release_all(2, b);
    return result;
}

static PyObject *py_gather(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"keys", "values", "indices", "keys_out", "values_out", "stream", NULL};
    PyObject *caps[5];
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|K:gather", kwlist, &caps[0], &caps[1], &caps[2], &caps[3],
                                     &caps[4], &stream))
        return NULL;
    static const char *names[] = {"keys", "values", "indices", "keys_out", "values_out"};
    static const int writable[] = {0, 0, 0, 1, 1};
    ckv_borrowed b[5];
    PyObject *result = NULL;
    if (borrow_all(5, caps, names, writable, b) == 0) {
        ckv_status st;
        Py_BEGIN_ALLOW_THREADS
        st = ckv_gather(&b[0].view, &b[1].view, &b[2].view, &b[3].view, &b[4].view, (void *)(uintptr_t)stream);
        Py_END_ALLOW_THREADS
        result = st == CKV_OK ? Py_NewRef(Py_None) : ckv_raise(st);
    }
    release_all(5, b);
    return result;
}

static PyObject *py_select_count(PyObject *self, PyObject *args) {
    (void)self;
    ckv_select_params p;
    ckv_select_params_init(&p);
    int method;
    long long budget, chunk, L;
    if (!PyArg_ParseTuple(args, "iLLdL:select_count", &method, &budget, &chunk, &p.keep_fraction, &L))
        return NULL;
    p.method = (ckv_method)method;
    p.budget = budget;
    p.chunk_size = chunk;
    return PyLong_FromLongLong(ckv_select_count(&p, L));
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    ckv_set_num_threads((int)(n > 4096 ? 4096 : n < 0 ? 0 : n)); /* no wrap-around of a huge negative n */
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyLong_FromLong(ckv_get_num_threads());
}

static PyObject *py_fma_peak(PyObject *self, PyObject *args) {
    (void)self;
    int threads = 0;
    double seconds = 0.2;
    if (!PyArg_ParseTuple(args, "|id:fma_peak_gflops", &threads, &seconds))
        return NULL;
    if (!(seconds > 0.0 && seconds <= 60.0)) {
        PyErr_SetString(PyExc_ValueError, "fma_peak_gflops: seconds must be in (0, 60]");
        return NULL;
    }
    double gflops;
    Py_BEGIN_ALLOW_THREADS
    gflops = ckv_fma_peak_gflops(threads, seconds);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(gflops);
}

static PyObject *py_build_info(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return Py_BuildValue("{s:s,s:O,s:O,s:s}", "version", CKV_VERSION, "cuda", ckv_has_cuda() ? Py_True : Py_False,
                         "openmp", ckv_has_openmp() ? Py_True : Py_False, "simd", ckv_simd_level());
}

PyMethodDef ckv_py_methods[] = {
    {"score", (PyCFunction)(void (*)(void))py_score, METH_VARARGS | METH_KEYWORDS,
     "score(queries, keys, scores, scale=0.0): token scores into scores [B, Hkv, P] (capsules)."},
    {"select", (PyCFunction)(void (*)(void))py_select, METH_VARARGS | METH_KEYWORDS,
     "select(queries, keys, indices, method, budget, ...): kept positions into indices (capsules)."},
    {"select_from_scores", (PyCFunction)(void (*)(void))py_select_from_scores, METH_VARARGS | METH_KEYWORDS,
     "select_from_scores(scores, indices, length, method, budget, ...): kept positions from given scores."},
    {"gather", (PyCFunction)(void (*)(void))py_gather, METH_VARARGS | METH_KEYWORDS,
     "gather(keys, values, indices, keys_out, values_out, stream=0): copy kept rows (capsules)."},
    {"select_count", py_select_count, METH_VARARGS,
     "select_count(method, budget, chunk_size, keep_fraction, L) -> columns of select's output."},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): CPU threads; n <= 0 restores the default."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int."},
    {"fma_peak_gflops", py_fma_peak, METH_VARARGS,
     "fma_peak_gflops(threads=0, seconds=0.2) -> float: measured fp32 FMA peak of the CPU."},
    {"build_info", py_build_info, METH_NOARGS, "build_info() -> dict of what this build has."},
    {NULL, NULL, 0, NULL},
};
