/*
 * dlpack_abi.h -- the DLPack ABI, declared from the DLPack specification
 * (v1.x, with the legacy pre-1.0 managed tensor), under chunkkv's own names.
 * Only the layout matters for interchange: field order and widths follow the
 * spec exactly. Only py/dlpack.c includes this file.
 */
#ifndef CKV_DLPACK_ABI_H
#define CKV_DLPACK_ABI_H

#include <stdint.h>

/* Device kinds the spec numbers (only the ones chunkkv names). */
enum {
    CKV_DL_CPU = 1,
    CKV_DL_CUDA = 2,
    CKV_DL_CUDA_HOST = 3,
    CKV_DL_CUDA_MANAGED = 13,
};

/* Type codes. */
enum {
    CKV_DL_INT = 0,
    CKV_DL_UINT = 1,
    CKV_DL_FLOAT = 2,
    CKV_DL_BFLOAT = 4,
};

/* Flag bits of a versioned managed tensor. */
#define CKV_DL_FLAG_READ_ONLY ((uint64_t)1 << 0)

/* Newest major version this consumer understands. */
#define CKV_DL_MAJOR_VERSION 1

typedef struct {
    int32_t device_type;   /* one of CKV_DL_* device kinds */
    int32_t device_id;
} ckv_dl_device;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} ckv_dl_dtype;

typedef struct {
    void *data;
    ckv_dl_device device;
    int32_t ndim;
    ckv_dl_dtype dtype;
    int64_t *shape;
    int64_t *strides;      /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} ckv_dl_tensor;

/* Legacy (pre-1.0) managed tensor: capsule name "dltensor". */
typedef struct ckv_dl_managed {
    ckv_dl_tensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct ckv_dl_managed *self);
} ckv_dl_managed;

typedef struct {
    uint32_t major;
    uint32_t minor;
} ckv_dl_version;

/* Versioned (1.x) managed tensor: capsule name "dltensor_versioned". */
typedef struct ckv_dl_managed_versioned {
    ckv_dl_version version;
    void *manager_ctx;
    void (*deleter)(struct ckv_dl_managed_versioned *self);
    uint64_t flags;
    ckv_dl_tensor dl_tensor;
} ckv_dl_managed_versioned;

#endif /* CKV_DLPACK_ABI_H */
