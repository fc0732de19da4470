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

static PyObject *py_score(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"queries", "keys", "scores", "scale", NULL};
    PyObject *caps[3];
    float scale = 0.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|f:score", kwlist, &caps[0], &caps[1], &caps[2], &scale))
        return NULL;
    static const char *names[] = {"queries", "keys", "scores"};
    static const int writable[] = {0, 0, 1};
    ckv_borrowed b[3];
    PyObject *result = NULL;
    if (borrow_all(3, caps, names, writable, b) == 0) {
        ckv_status st;
        Py_BEGIN_ALLOW_THREADS
        st = ckv_score(&b[0].view, &b[1].view, scale, &b[2].view);
        Py_END_ALLOW_THREADS
        result = st == CKV_OK ? Py_NewRef(Py_None) : ckv_raise(st);
    }
    release_all(3, b);
    return result;
}

static PyObject *py_select(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"queries", "keys", "indices", "method", "budget", "chunk_size", "scale", "per_head",
                             "pool_kernel", "pool_max", "n_sink", "seed", "stream", NULL};
    PyObject *caps[3];
    ckv_select_params p;
    ckv_select_params_init(&p);
    int method = 0;
    long long budget = 0, chunk = p.chunk_size, kernel = p.pool_kernel, sinks = p.n_sink;
    unsigned long long seed = 0;
    uintptr_t stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|iLLfpLpLKK:select", kwlist, &caps[0], &caps[1], &caps[2], &method,
                                     &budget, &chunk, &p.scale, &p.per_head, &kernel, &p.pool_max, &sinks, &seed,
                                     &stream))
        return NULL;
    p.method = (ckv_method)method;
    p.budget = budget;
    p.chunk_size = chunk;
    p.pool_kernel = kernel;
    p.n_sink = sinks;
    p.seed = seed;
    p.stream = (void *)stream;
    static const char *names[] = {"queries", "keys", "indices"};
    static const int writable[] = {0, 0, 1};
    ckv_borrowed b[3];
    PyObject *result = NULL;
    if (borrow_all(3, caps, names, writable, b) == 0) {
        ckv_status st;
        Py_BEGIN_ALLOW_THREADS
        st = ckv_select(&b[0].view, &b[1].view, &p, &b[2].view);
        Py_END_ALLOW_THREADS
        result = st == CKV_OK ? Py_NewRef(Py_None) : ckv_raise(st);
    }
    release_all(3, b);
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

static PyObject *py_kept_count(PyObject *self, PyObject *args) {
    (void)self;
    long long budget, L;
    if (!PyArg_ParseTuple(args, "LL:kept_count", &budget, &L))
        return NULL;
    return PyLong_FromLongLong(ckv_kept_count(budget, L));
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    ckv_set_num_threads((int)(n > 4096 ? 4096 : n));
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyLong_FromLong(ckv_get_num_threads());
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
    {"gather", (PyCFunction)(void (*)(void))py_gather, METH_VARARGS | METH_KEYWORDS,
     "gather(keys, values, indices, keys_out, values_out, stream=0): copy kept rows (capsules)."},
    {"kept_count", py_kept_count, METH_VARARGS, "kept_count(budget, L) -> min(budget, L)."},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): CPU threads; n <= 0 restores the default."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int."},
    {"build_info", py_build_info, METH_NOARGS, "build_info() -> dict of what this build has."},
    {NULL, NULL, 0, NULL},
};
