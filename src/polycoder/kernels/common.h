/* Helpers shared by the decode kernels (decode.c) and the training kernels (train.c):
 * bf16 <-> fp32 conversion, the tail mask of a 16-lane loop, the vector exponential and
 * the widening loads of bf16 (or fp32) values into 16 fp32 lanes. Static inline, so each
 * .c file gets its own copy and nothing here is exported.
 *
 * The vector helpers exist only where the compiler targets AVX-512 (F and BW): PC_AVX512
 * is 1 there and 0 elsewhere, and each kernel file compiles its AVX-512 path under
 * `#if PC_AVX512`, else stubs that return the function's error code.
 */
#ifndef POLYCODER_KERNELS_COMMON_H
#define POLYCODER_KERNELS_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PC_AVX512 1
#include <immintrin.h>

/* The first n lanes of 16 (none for n <= 0, all for n >= 16): the mask of a loop's tail. */
static inline __mmask16 lanes16(long n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* ---- exp, 16 at a time --------------------------------------------------------------
 * x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts), a degree-6 polynomial for e^r, and
 * 2^n applied by scalef (relative error about 2e-7). */

static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.3981999507e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* 16 bf16 values widened to fp32 by a 16-bit shift (exact); lanes outside mask read as 0. */
static inline __m512 widen_bf16(const uint16_t *p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

/* 16 values from element i of p (bf16 if bf16 is set, else fp32) as fp32; lanes outside mask 0. */
static inline __m512 load16(const void *p, int bf16, long i, __mmask16 mask) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(mask, (const float *)p + i);
}

#else
#define PC_AVX512 0
#endif

#endif /* POLYCODER_KERNELS_COMMON_H */
