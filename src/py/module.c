/*
 * module.c -- chunkkv._C, the binding of the C core (see chunkkv/ops.py for the public API).
 */
#include "binding.h"

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "chunkkv._C",
    .m_doc = "chunkkv's C core: DLPack in, kernels with the GIL released.",
    .m_size = -1,
    .m_methods = ckv_py_methods,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
