/*
 * peak.c -- the CPU's fp32 FMA peak, measured: 16 independent accumulator vectors kept in registers
 * (enough to cover FMA latency on two pipes), at the widest vector level the CPU has. speed.py compares
 * the scoring rate with it (a BLAS matmul can run below it, e.g. on a narrower code path).
 */
#define _POSIX_C_SOURCE 199309L
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* 16 chains of n dependent FMAs each; returns a value that depends on all of them (so none is dropped). */
#define CKV_FMA_CHAINS(VEC, SET1, FMA, ADD, TOFLOAT)                                                  \
    VEC x = SET1(0.999999f), y = SET1(1e-7f);                                                       \
    VEC a0 = SET1(0.0f), a1 = SET1(0.1f), a2 = SET1(0.2f), a3 = SET1(0.3f), a4 = SET1(0.4f);        \
    VEC a5 = SET1(0.5f), a6 = SET1(0.6f), a7 = SET1(0.7f), a8 = SET1(0.8f), a9 = SET1(0.9f);        \
    VEC a10 = SET1(1.0f), a11 = SET1(1.1f), a12 = SET1(1.2f), a13 = SET1(1.3f), a14 = SET1(1.4f);   \
    VEC a15 = SET1(1.5f);                                                                           \
    for (long i = 0; i < n; i++) {                                                                  \
        a0 = FMA(a0, x, y), a1 = FMA(a1, x, y), a2 = FMA(a2, x, y), a3 = FMA(a3, x, y);             \
        a4 = FMA(a4, x, y), a5 = FMA(a5, x, y), a6 = FMA(a6, x, y), a7 = FMA(a7, x, y);             \
        a8 = FMA(a8, x, y), a9 = FMA(a9, x, y), a10 = FMA(a10, x, y), a11 = FMA(a11, x, y);         \
        a12 = FMA(a12, x, y), a13 = FMA(a13, x, y), a14 = FMA(a14, x, y), a15 = FMA(a15, x, y);     \
    }                                                                                               \
    a0 = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7)));                         \
    a8 = ADD(ADD(ADD(a8, a9), ADD(a10, a11)), ADD(ADD(a12, a13), ADD(a14, a15)));                   \
    return TOFLOAT(ADD(a0, a8));

__attribute__((target("avx512f"))) static float chains_avx512(long n) {
    CKV_FMA_CHAINS(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_reduce_add_ps)
}

__attribute__((target("avx2,fma"))) static float first_lane256(__m256 v) { return _mm256_cvtss_f32(v); }

__attribute__((target("avx2,fma"))) static float chains_avx2(long n) {
    CKV_FMA_CHAINS(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, first_lane256)
}
#endif

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* FLOPs per chain step (16 FMAs of `lanes` lanes, 2 FLOPs each) and the chains at the CPU's best width. */
static float run_chains(long n, int *lanes) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        *lanes = 16;
        return chains_avx512(n);
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        *lanes = 8;
        return chains_avx2(n);
    }
#endif
    /* portable: 16 scalar chains (the compiler may or may not vectorise; this is a floor) */
    float a[16];
    for (int c = 0; c < 16; c++)
        a[c] = 0.1f * (float)c;
    for (long i = 0; i < n; i++)
        for (int c = 0; c < 16; c++)
            a[c] = a[c] * 0.999999f + 1e-7f;
    float s = 0.0f;
    for (int c = 0; c < 16; c++)
        s += a[c];
    *lanes = 1;
    return s;
}

double ckv_cpu_fma_peak(int threads, double seconds) {
    int lanes = 1;
    volatile float sink = run_chains(1000, &lanes); /* warm up, learn the width */
    /* size n so that one run takes about `seconds` */
    long n = 1 << 16;
    for (;;) {
        const double t0 = now_s();
        sink = run_chains(n, &lanes);
        const double dt = now_s() - t0;
        if (dt > 0.02 || n > (1L << 40))
            break;
        n *= 4;
    }
    {
        const double t0 = now_s();
        sink = run_chains(n, &lanes);
        const double dt = now_s() - t0;
        const double want = n * (seconds / (dt > 1e-9 ? dt : 1e-9));
        n = want < 1e3 ? 1000 : want > 1e12 ? (long)1e12 : (long)want;
    }
    double elapsed = 0.0;
    int team = 1;
#pragma omp parallel num_threads(threads)
    {
        int my_lanes = 1;
#ifdef _OPENMP
#pragma omp single
        team = omp_get_num_threads();
#endif
#pragma omp barrier
#pragma omp single
        elapsed = -now_s();
        sink = run_chains(n, &my_lanes);
#pragma omp barrier
#pragma omp single
        elapsed += now_s();
    }
    (void)sink;
    return (double)n * 16.0 * 2.0 * (double)lanes * (double)team / (elapsed > 1e-9 ? elapsed : 1e-9) / 1e9;
}
