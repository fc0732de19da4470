/*
 * binding.h -- what the files of the Python binding share.
 */
#ifndef CKV_PY_BINDING_H
#define CKV_PY_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../chunkkv.h"

/* A tensor borrowed from a DLPack capsule for the length of one call. */
typedef struct ckv_borrowed {
    ckv_tensor view;
    void *managed;  /* the managed tensor this call consumed, or NULL */
    int versioned;  /* which deleter signature managed has */
} ckv_borrowed;

/* dlpack.c: consume `capsule` (renaming it "used_..."), fill `out`.
 * On failure sets a Python exception naming `arg` and returns -1; either way
 * ckv_release(out) must be called exactly once afterwards. */
int ckv_borrow(PyObject *capsule, const char *arg, int writable, ckv_borrowed *out);
void ckv_release(ckv_borrowed *b);

/* errors.c: raise the exception for a failed status, with ckv_last_error(). */
PyObject *ckv_raise(ckv_status status);

/* ops.c: the method table of chunkkv._C. */
extern PyMethodDef ckv_py_methods[];

#endif /* CKV_PY_BINDING_H */
