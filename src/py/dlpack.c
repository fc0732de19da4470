/*
 * dlpack.c -- the only code that touches DLPack capsules.
 *
 * Ownership protocol (the DLPack Python spec): a consumer takes the managed
 * tensor out of a capsule named "dltensor_versioned" (1.x) or "dltensor"
 * (legacy), renames the capsule "used_dltensor_versioned" / "used_dltensor"
 * so the capsule's destructor leaves it alone, and from then on owns it: it
 * calls the managed tensor's deleter exactly once when done. chunkkv only
 * reads or writes the memory during one call, so ckv_release() calls the
 * deleter at the end of that call (with the GIL held).
 */
#include "binding.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "../dlpack_abi.h"

static const char NAME_VERSIONED[] = "dltensor_versioned";
static const char NAME_USED_VERSIONED[] = "used_dltensor_versioned";
static const char NAME_LEGACY[] = "dltensor";
static const char NAME_USED_LEGACY[] = "used_dltensor";

static int to_dtype(ckv_dl_dtype t, ckv_dtype *out) {
    if (t.lanes != 1)
        return -1;
    if (t.code == CKV_DL_FLOAT && t.bits == 32) *out = CKV_DTYPE_F32;
    else if (t.code == CKV_DL_FLOAT && t.bits == 16) *out = CKV_DTYPE_F16;
    else if (t.code == CKV_DL_BFLOAT && t.bits == 16) *out = CKV_DTYPE_BF16;
    else if (t.code == CKV_DL_INT && t.bits == 64) *out = CKV_DTYPE_I64;
    else return -1;
    return 0;
}

/* The dtype's usual name ("float64", "int32", "uint8", "bool", "complex64", ...) into buf, for error messages. */
static const char *dtype_name(ckv_dl_dtype t, char *buf, size_t size) {
    static const char *kinds[] = {"int", "uint", "float", "opaque handle", "bfloat", "complex", "bool"};
    const char *kind = t.code < sizeof kinds / sizeof kinds[0] ? kinds[t.code] : NULL;
    if (kind == NULL)
        snprintf(buf, size, "DLPack dtype code %d, %d bits", (int)t.code, (int)t.bits);
    else if (t.code == 6 && t.bits == 8)
        snprintf(buf, size, "bool");
    else
        snprintf(buf, size, "%s%d", kind, (int)t.bits);
    if (t.lanes != 1) {
        size_t n = strlen(buf);
        snprintf(buf + n, size - n, " x %d lanes", (int)t.lanes);
    }
    return buf;
}

/* Fill the view from a DLTensor; Python exception and -1 on what chunkkv cannot take. */
static int to_view(const ckv_dl_tensor *t, const char *arg, ckv_tensor *v) {
    memset(v, 0, sizeof *v);
    if (t->ndim < 1 || t->ndim > CKV_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s: expected a tensor with 1 to %d dimensions, got %d", arg, CKV_MAX_DIMS,
                     (int)t->ndim);
        return -1;
    }
    if (to_dtype(t->dtype, &v->dtype) < 0) {
        char name[64];
        PyErr_Format(PyExc_TypeError, "%s: expected float32, float16, bfloat16 or int64, got %s", arg,
                     dtype_name(t->dtype, name, sizeof name));
        return -1;
    }
    switch (t->device.device_type) {
    case CKV_DL_CPU:
    case CKV_DL_CUDA_HOST: /* pinned host memory: the CPU reads it directly */
        v->device = CKV_DEVICE_CPU;
        break;
    case CKV_DL_CUDA:
    case CKV_DL_CUDA_MANAGED:
        v->device = CKV_DEVICE_CUDA;
        break;
    default:
        PyErr_Format(PyExc_TypeError, "%s: expected a CPU or CUDA tensor, got DLPack device type %d", arg,
                     (int)t->device.device_type);
        return -1;
    }
    v->device_id = t->device.device_id;
    v->ndim = t->ndim;
    int64_t contiguous = 1; /* saturates: a shape whose product overflows is empty or rejected by the core */
    int empty = 0;
    for (int i = t->ndim - 1; i >= 0; i--) {
        v->shape[i] = t->shape[i];
        v->strides[i] = t->strides ? t->strides[i] : contiguous; /* NULL strides: row-major */
        if (t->shape[i] <= 0)
            empty = 1;
        else
            contiguous = contiguous > INT64_MAX / t->shape[i] ? INT64_MAX : contiguous * t->shape[i];
    }
    if (empty) /* nothing is read or written: no pointer arithmetic on a possibly NULL data pointer */
        v->data = t->data;
    else if (!t->data) {
        PyErr_Format(PyExc_BufferError, "%s: the DLPack tensor has no data pointer", arg);
        return -1;
    } else
        v->data = (char *)t->data + t->byte_offset;
    /* the kernels load elements through typed pointers: a misaligned one is undefined behaviour
     * (and can fault in vectorised loops), so take only elements aligned to their size */
    if (!empty && (uintptr_t)v->data % (uintptr_t)(t->dtype.bits / 8) != 0) {
        PyErr_Format(PyExc_BufferError, "%s: the tensor's data is not aligned to its %d-byte elements (address %p)",
                     arg, t->dtype.bits / 8, v->data);
        return -1;
    }
    return 0;
}

int ckv_borrow(PyObject *capsule, const char *arg, int writable, ckv_borrowed *out) {
    memset(out, 0, sizeof *out);
    if (PyCapsule_IsValid(capsule, NAME_VERSIONED)) {
        ckv_dl_managed_versioned *m = PyCapsule_GetPointer(capsule, NAME_VERSIONED);
        if (!m || PyCapsule_SetName(capsule, NAME_USED_VERSIONED) < 0)
            return -1;
        out->managed = m;
        out->versioned = 1;
        if (m->version.major != CKV_DL_MAJOR_VERSION) {
            PyErr_Format(PyExc_BufferError, "%s: DLPack major version %u is not supported (expected %d)", arg,
                         m->version.major, CKV_DL_MAJOR_VERSION);
            return -1;
        }
        if (writable && (m->flags & CKV_DL_FLAG_READ_ONLY)) {
            PyErr_Format(PyExc_BufferError, "%s: expected a writable tensor, got a read-only one", arg);
            return -1;
        }
        return to_view(&m->dl_tensor, arg, &out->view);
    }
    if (PyCapsule_IsValid(capsule, NAME_LEGACY)) {
        ckv_dl_managed *m = PyCapsule_GetPointer(capsule, NAME_LEGACY);
        if (!m || PyCapsule_SetName(capsule, NAME_USED_LEGACY) < 0)
            return -1;
        out->managed = m;
        out->versioned = 0;
        return to_view(&m->dl_tensor, arg, &out->view);
    }
    if (PyCapsule_CheckExact(capsule))
        PyErr_Format(PyExc_BufferError, "%s: the DLPack capsule was already consumed or is not a DLPack capsule", arg);
    else
        PyErr_Format(PyExc_TypeError, "%s: expected a DLPack capsule, got %.200s", arg, Py_TYPE(capsule)->tp_name);
    return -1;
}

void ckv_release(ckv_borrowed *b) {
    if (!b->managed)
        return;
    /* A failed call releases with its exception already set; a deleter may run Python code (a
     * ctypes or Cython producer, or a DECREF that frees an object), which must not start with a
     * pending exception. Park it for the deleter and put it back after. */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *pending = PyErr_GetRaisedException();
#else
    PyObject *pending_type, *pending_value, *pending_tb;
    PyErr_Fetch(&pending_type, &pending_value, &pending_tb);
#endif
    if (b->versioned) {
        ckv_dl_managed_versioned *m = b->managed;
        if (m->deleter)
            m->deleter(m);
    } else {
        ckv_dl_managed *m = b->managed;
        if (m->deleter)
            m->deleter(m);
    }
    b->managed = NULL;
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(pending);
#else
    PyErr_Restore(pending_type, pending_value, pending_tb);
#endif
}
