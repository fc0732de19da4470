/*
 * half.h -- fp16 and bf16 <-> fp32 conversion, bit-exact with IEEE 754
 * round-to-nearest-even, written with integer ops so any C11 compiler takes it.
 */
#ifndef CKV_CPU_HALF_H
#define CKV_CPU_HALF_H

#include <stdint.h>
#include <string.h>

#include "../chunkkv.h"

static inline float ckv_bits_to_f32(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint32_t ckv_f32_to_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

/* bf16 is the top half of an fp32. */
static inline float ckv_bf16_to_f32(uint16_t h) { return ckv_bits_to_f32((uint32_t)h << 16); }

static inline float ckv_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1fu) /* Inf or NaN */
        return ckv_bits_to_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0)
            return ckv_bits_to_f32(sign);
        /* subnormal: value = man * 2^-24, exact in fp32 */
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return ckv_bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

/* Element off (in elements) past base, of a float dtype, as fp32. */
static inline float ckv_load_f32(const void *base, ckv_dtype dtype, int64_t off) {
    switch (dtype) {
    case CKV_DTYPE_F16: return ckv_f16_to_f32(((const uint16_t *)base)[off]);
    case CKV_DTYPE_BF16: return ckv_bf16_to_f32(((const uint16_t *)base)[off]);
    default: return ((const float *)base)[off];
    }
}

#endif /* CKV_CPU_HALF_H */
