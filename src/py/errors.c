/*
 * errors.c -- one table from a core status to a Python exception.
 */
#include "binding.h"

PyObject *ckv_raise(ckv_status status) {
    PyObject *type;
    switch (status) {
    case CKV_ERR_SHAPE:
    case CKV_ERR_VALUE:
    case CKV_ERR_LAYOUT: type = PyExc_ValueError; break;
    case CKV_ERR_DTYPE:
    case CKV_ERR_DEVICE: type = PyExc_TypeError; break;
    case CKV_ERR_NOMEM: type = PyExc_MemoryError; break;
    default: type = PyExc_RuntimeError; break;
    }
    const char *msg = ckv_last_error();
    PyErr_SetString(type, msg && msg[0] ? msg : "chunkkv: unknown error");
    return NULL;
}
