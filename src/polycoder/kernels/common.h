/* Helpers shared by the decode kernels (decode.c, decode_block.c) and the training kernels (train.c):
 * bf16 <-> fp32 conversion and a small vector layer, the few operations the kernels use
 * (loads that widen bf16 or int8, FMA, masked loads and stores of a loop's tail, lane
 * sums and maxima, exp, the 16-bit integer dot product, a prefetch). Static inline, so
 * each .c file gets its own copy and nothing here is exported.
 *
 * The kernels are written once against this layer; it exists in three variants, chosen by
 * the compiler's target (-march=native, or -march=x86-64-v3 for POLYCODER_KERNELS_ISA=avx2;
 * -mcpu=native on ARM64):
 * - PC_ISA 1, AVX-512 (F and BW): vf is one __m512 (VL = 16 lanes), vmask a __mmask16;
 * - PC_ISA 2, AVX2 + FMA: vf is one __m256 (VL = 8 lanes), vmask the number of leading
 *   lanes that are valid (every mask the kernels use is a loop's tail); loads of a partial
 *   vector go through a zero-padded copy (AVX2 has no masked 8- or 16-bit loads);
 * - PC_ISA 3, ARM64 NEON (AArch64 Advanced SIMD: Apple Silicon, Graviton, Ampere): vf is
 *   two float32x4_t (VL = 8), vmask a lane count as for AVX2. NEON has 32 registers of 4
 *   lanes, so a pair of them makes the AVX2 budget of 16 registers of 8 lanes, within
 *   which decode.c's products keep their sums. Partial vectors go through a zero-padded copy
 *   (NEON has no masked loads). int8 products: `sdot` (vdotq_s32) where the target has
 *   the dot product extension (__ARM_FEATURE_DOTPROD: Armv8.2-A and later, every Apple
 *   and Graviton 2+ core), else widening multiply-accumulates (smlal); see vi_dot.
 *   Checked for correctness only, under emulation (qemu-aarch64: tests/kernels_check.c,
 *   tests/test_kernels_arm64.py); its speed is unmeasured until an ARM machine runs
 *   benchmarks/decode.py.
 * The width follows the hardware instead of a fixed 16 lanes of two __m256: the products
 * keep up to 8 accumulators and their operands in registers (decode.c), and AVX2 has 16
 * registers of 8 lanes against AVX-512's 32 of 16, so 16-lane vectors there would spill.
 * Elsewhere PC_ISA is 0 and each kernel file compiles stubs
 * that return -3. The variants run the same arithmetic in the same order up to the lane
 * count (fp32 sums of VL partial sums), and the tests hold them to PyTorch (x86) or to a
 * scalar fp64 reference (tests/kernels_check.c, every variant).
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
#define PC_ISA 1
#define VL 16
#include <immintrin.h>
typedef __m512 vf;
typedef __m512i vi;     /* 32 int16 lanes in, 16 int32 sums out (vi_dot) */
typedef __mmask16 vmask;

/* The first n lanes (none for n <= 0, all for n >= VL): the mask of a loop's tail. */
static inline vmask vlanes(long n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vloadm(const float *p, vmask m) { return _mm512_maskz_loadu_ps(m, p); }
static inline void vstore(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline void vstorem(float *p, vmask m, vf v) { _mm512_mask_storeu_ps(p, m, v); }
/* bf16 widened to fp32 by a 16-bit shift (exact); lanes outside m read as 0, unread. */
static inline vf vwiden_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vf vwiden_bf16m(const uint16_t *p, vmask m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
/* Rounded to bf16 (nearest even) and stored in the lanes of m. */
static inline void vstore_bf16m(uint16_t *p, vmask m, vf v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }    /* a b + c */
static inline vf vfnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  /* c - a b */
static inline vf vfmsub(vf a, vf b, vf c) { return _mm512_fmsub_ps(a, b, c); }    /* a b - c */
static inline vf vabs(vf a) { return _mm512_abs_ps(a); }
static inline vf vcopysign(vf a, vf s) {  /* |a| with the sign of s, for a >= 0 */
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a),
        _mm512_and_si512(_mm512_castps_si512(s), _mm512_set1_epi32((int)0x80000000u))));
}
static inline vf vmaxm(vf a, vmask m, vf b) { return _mm512_mask_max_ps(a, m, a, b); }  /* lanes of m: max(a, b); else a */
static inline vf vaddm(vf a, vmask m, vf b) { return _mm512_mask_add_ps(a, m, a, b); }  /* lanes of m: a + b; else a */
static inline float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vscale2n(vf p, vf n) { return _mm512_scalef_ps(p, n); }  /* p 2^n, n integral */
/* always_inline: GCC 12 marks a prefetch helper left out of line as free of effects and
 * deletes its calls, so without it no prefetch reached the compiled kernels. */
static inline __attribute__((always_inline)) void vprefetch(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T0); }

/* Lane i of the result: the lane sum of v[i], for VL vectors, by a transpose-and-add tree
 * (about 45 instructions for 16 sums, against 8 each for one at a time). */
static inline vf vreduce(const vf *v) {
    __m512 u[8], w[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: that lane's sums of vectors 4i .. 4i+3 */
        w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(u[2 * i]), _mm512_castps_pd(u[2 * i + 1]))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(u[2 * i]), _mm512_castps_pd(u[2 * i + 1]))));
    __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
    __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

/* int8 weights against int16 activations: 2 VL of each a vector, pairwise products summed
 * into VL int32 lanes (VNNI's vpdpwssd, else vpmaddwd and an add: the same integers). */
#define VI_XMAX 32767   /* the activations' int16 range, +-VI_XMAX (decode.c scales to it) */
typedef __mmask32 vimask;  /* which of the 2 VL int16 lanes are valid */
static inline vi vi_zero(void) { return _mm512_setzero_si512(); }
static inline vimask vi_lanes(long n) {  /* n >= 1; all but a loop's last vector are whole */
    return __builtin_expect(n >= 32, 1) ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1u);
}
static inline vi vi_w8(const int8_t *p, vimask m) { return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, p)); }
static inline vi vi_x16(const int16_t *p, vimask m) { return _mm512_maskz_loadu_epi16(m, p); }
#if defined(__AVX512VNNI__)
#define PC_I8_DOT "vpdpwssd"
static inline vi vi_dot(vi acc, vi a, vi b) { return _mm512_dpwssd_epi32(acc, a, b); }
#else
#define PC_I8_DOT "vpmaddwd"
static inline vi vi_dot(vi acc, vi a, vi b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
#endif
static inline vf vi_float(vi a) { return _mm512_cvtepi32_ps(a); }

#elif defined(__AVX2__) && defined(__FMA__)
#define PC_ISA 2
#define VL 8
#include <immintrin.h>
typedef __m256 vf;
typedef __m256i vi;     /* 16 int16 lanes in, 8 int32 sums out (vi_dot) */
typedef long vmask;     /* the number of leading lanes that are valid, 0 .. 8 */

static inline vmask vlanes(long n) { return n >= 8 ? 8 : n <= 0 ? 0 : n; }
/* _mm256_maskload_ps's lane mask for the first n lanes (0 <= n <= 8). */
static inline __m256i lane_bits(vmask n) {
    static const int32_t bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i *)(bits + 8 - n));
}
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vloadm(const float *p, vmask m) {
    return m >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_bits(m));  /* masked lanes are not read */
}
static inline void vstore(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline void vstorem(float *p, vmask m, vf v) {
    if (m >= 8) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, lane_bits(m), v);
}
static inline vf vwiden_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vf vwiden_bf16m(const uint16_t *p, vmask m) {
    if (m >= 8) return vwiden_bf16(p);
    uint16_t t[8] = {0};
    memcpy(t, p, (size_t)m * 2);
    return vwiden_bf16(t);
}
static inline void vstore_bf16m(uint16_t *p, vmask m, vf v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));  /* 0 .. 65535: exact */
    if (m >= 8) {
        _mm_storeu_si128((__m128i *)p, h);
    } else {
        uint16_t t[8];
        _mm_storeu_si128((__m128i *)t, h);
        memcpy(p, t, (size_t)m * 2);
    }
}
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vfnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vf vfmsub(vf a, vf b, vf c) { return _mm256_fmsub_ps(a, b, c); }
static inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline vf vcopysign(vf a, vf s) { return _mm256_or_ps(a, _mm256_and_ps(s, _mm256_set1_ps(-0.0f))); }
static inline vf vmaxm(vf a, vmask m, vf b) {
    return _mm256_blendv_ps(a, _mm256_max_ps(a, b), _mm256_castsi256_ps(lane_bits(m)));
}
static inline vf vaddm(vf a, vmask m, vf b) {
    return _mm256_add_ps(a, _mm256_and_ps(b, _mm256_castsi256_ps(lane_bits(m))));
}
static inline float vhsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float vhmax(vf a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p 2^n for integral n in [-127, 127] (vexp's range) through the exponent field; 2^-127 is
 * flushed to 0 where scalef would give a denormal (an absolute difference below 1e-38). */
static inline vf vscale2n(vf p, vf n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline __attribute__((always_inline)) void vprefetch(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T0); }
static inline vf vreduce(const vf *v) {
    __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  /* [a b c d | a b c d] halves */
    __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));  /* [e f g h | e f g h] */
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

#define VI_XMAX 32767
typedef long vimask;  /* the number of leading int16 lanes that are valid, 0 .. 16 */
static inline vi vi_zero(void) { return _mm256_setzero_si256(); }
static inline vimask vi_lanes(long n) { return n >= 16 ? 16 : n; }  /* n >= 1 */
static inline vi vi_w8(const int8_t *p, vimask n) {
    if (n >= 16) return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    int8_t t[16] = {0};
    if (n > 0) memcpy(t, p, (size_t)n);
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)t));
}
static inline vi vi_x16(const int16_t *p, vimask n) {
    if (n >= 16) return _mm256_loadu_si256((const __m256i *)p);
    int16_t t[16] = {0};
    if (n > 0) memcpy(t, p, (size_t)n * 2);
    return _mm256_loadu_si256((const __m256i *)t);
}
#if defined(__AVXVNNI__)
#define PC_I8_DOT "vpdpwssd (AVX-VNNI)"
static inline vi vi_dot(vi acc, vi a, vi b) { return _mm256_dpwssd_avx_epi32(acc, a, b); }
#else
#define PC_I8_DOT "vpmaddwd"
static inline vi vi_dot(vi acc, vi a, vi b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
#endif
static inline vf vi_float(vi a) { return _mm256_cvtepi32_ps(a); }

#elif defined(__aarch64__) && defined(__ARM_NEON)
#define PC_ISA 3
#define VL 8
#include <arm_neon.h>
typedef struct { float32x4_t lo, hi; } vf;  /* lanes 0-3, 4-7 */
typedef struct { int32x4_t a, b; } vi;      /* 16 int16 (or int8, see vi_w8) lanes in, 8 int32 sums out */
typedef long vmask;                         /* the number of leading lanes that are valid, 0 .. 8 */

static inline vmask vlanes(long n) { return n >= 8 ? 8 : n <= 0 ? 0 : n; }
static inline vf vpair(float32x4_t lo, float32x4_t hi) {
    vf r = {lo, hi};
    return r;
}
/* All ones in the lanes of the low (half 0) or high (half 1) four that are among the first n. */
static inline uint32x4_t lane_bits4(vmask n, int half) {
    const int32x4_t idx = {0, 1, 2, 3};
    return vcltq_s32(vaddq_s32(idx, vdupq_n_s32(4 * half)), vdupq_n_s32((int32_t)n));
}
static inline vf vzero(void) { return vpair(vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)); }
static inline vf vset1(float a) { return vpair(vdupq_n_f32(a), vdupq_n_f32(a)); }
static inline vf vload(const float *p) { return vpair(vld1q_f32(p), vld1q_f32(p + 4)); }
static inline vf vloadm(const float *p, vmask m) {  /* lanes past m are not read */
    if (m >= 8) return vload(p);
    float t[8] = {0};
    if (m > 0) memcpy(t, p, (size_t)m * 4);
    return vload(t);
}
static inline void vstore(float *p, vf v) {
    vst1q_f32(p, v.lo);
    vst1q_f32(p + 4, v.hi);
}
static inline void vstorem(float *p, vmask m, vf v) {
    if (m >= 8) {
        vstore(p, v);
    } else if (m > 0) {
        float t[8];
        vstore(t, v);
        memcpy(p, t, (size_t)m * 4);
    }
}
/* bf16 widened by a 16-bit shift-left-long (exact). */
static inline vf vwiden_bf16(const uint16_t *p) {
    const uint16x8_t h = vld1q_u16(p);
    return vpair(vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)), vreinterpretq_f32_u32(vshll_high_n_u16(h, 16)));
}
static inline vf vwiden_bf16m(const uint16_t *p, vmask m) {
    if (m >= 8) return vwiden_bf16(p);
    uint16_t t[8] = {0};
    if (m > 0) memcpy(t, p, (size_t)m * 2);
    return vwiden_bf16(t);
}
static inline uint16x4_t round_bf16x4(float32x4_t v) {  /* nearest even, as the x86 variants */
    uint32x4_t u = vreinterpretq_u32_f32(v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    u = vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fff)));
    return vshrn_n_u32(u, 16);
}
static inline void vstore_bf16m(uint16_t *p, vmask m, vf v) {
    const uint16x8_t h = vcombine_u16(round_bf16x4(v.lo), round_bf16x4(v.hi));
    if (m >= 8) {
        vst1q_u16(p, h);
    } else if (m > 0) {
        uint16_t t[8];
        vst1q_u16(t, h);
        memcpy(p, t, (size_t)m * 2);
    }
}
static inline vf vadd(vf a, vf b) { return vpair(vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)); }
static inline vf vsub(vf a, vf b) { return vpair(vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)); }
static inline vf vmul(vf a, vf b) { return vpair(vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)); }
static inline vf vdiv(vf a, vf b) { return vpair(vdivq_f32(a.lo, b.lo), vdivq_f32(a.hi, b.hi)); }
static inline vf vmax(vf a, vf b) { return vpair(vmaxq_f32(a.lo, b.lo), vmaxq_f32(a.hi, b.hi)); }
static inline vf vmin(vf a, vf b) { return vpair(vminq_f32(a.lo, b.lo), vminq_f32(a.hi, b.hi)); }
static inline vf vfmadd(vf a, vf b, vf c) { return vpair(vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)); }
static inline vf vfnmadd(vf a, vf b, vf c) { return vpair(vfmsq_f32(c.lo, a.lo, b.lo), vfmsq_f32(c.hi, a.hi, b.hi)); }
static inline vf vfmsub(vf a, vf b, vf c) {  /* a b - c = -(c - a b), fused, negated exactly */
    return vpair(vnegq_f32(vfmsq_f32(c.lo, a.lo, b.lo)), vnegq_f32(vfmsq_f32(c.hi, a.hi, b.hi)));
}
static inline vf vabs(vf a) { return vpair(vabsq_f32(a.lo), vabsq_f32(a.hi)); }
static inline vf vcopysign(vf a, vf s) {  /* the sign bit from s, the rest from a */
    const uint32x4_t sign = vdupq_n_u32(0x80000000u);
    return vpair(vbslq_f32(sign, s.lo, a.lo), vbslq_f32(sign, s.hi, a.hi));
}
static inline vf vmaxm(vf a, vmask m, vf b) {
    return vpair(vbslq_f32(lane_bits4(m, 0), vmaxq_f32(a.lo, b.lo), a.lo),
                 vbslq_f32(lane_bits4(m, 1), vmaxq_f32(a.hi, b.hi), a.hi));
}
static inline vf vaddm(vf a, vmask m, vf b) {
    return vpair(vaddq_f32(a.lo, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(b.lo), lane_bits4(m, 0)))),
                 vaddq_f32(a.hi, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(b.hi), lane_bits4(m, 1)))));
}
static inline float vhsum(vf a) { return vaddvq_f32(vaddq_f32(a.lo, a.hi)); }
static inline float vhmax(vf a) { return vmaxvq_f32(vmaxq_f32(a.lo, a.hi)); }
static inline vf vround(vf a) { return vpair(vrndnq_f32(a.lo), vrndnq_f32(a.hi)); }  /* nearest even */
/* p 2^n through the exponent field, as the AVX2 variant (n integral, in [-127, 127]). */
static inline vf vscale2n(vf p, vf n) {
    const int32x4_t bias = vdupq_n_s32(127);
    const int32x4_t lo = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n.lo), bias), 23);
    const int32x4_t hi = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n.hi), bias), 23);
    return vpair(vmulq_f32(p.lo, vreinterpretq_f32_s32(lo)), vmulq_f32(p.hi, vreinterpretq_f32_s32(hi)));
}
static inline __attribute__((always_inline)) void vprefetch(const void *p) { __builtin_prefetch(p, 0, 3); }  /* PRFM PLDL1KEEP */
/* Lane i: the lane sum of v[i], for 8 vectors, by pairwise adds (faddp). */
static inline vf vreduce(const vf *v) {
    float32x4_t s[8];
    for (int i = 0; i < 8; i++) s[i] = vaddq_f32(v[i].lo, v[i].hi);
    return vpair(vpaddq_f32(vpaddq_f32(s[0], s[1]), vpaddq_f32(s[2], s[3])),
                 vpaddq_f32(vpaddq_f32(s[4], s[5]), vpaddq_f32(s[6], s[7])));
}

/* int8 weights against int16 activations, 16 columns a vector, into 8 int32 lanes whose sum
 * is what counts (the kernels only ever add an accumulator's lanes together). */
typedef long vimask;  /* the number of leading columns that are valid, 0 .. 16 */
static inline vi vi_zero(void) {
    vi r = {vdupq_n_s32(0), vdupq_n_s32(0)};
    return r;
}
static inline vimask vi_lanes(long n) { return n >= 16 ? 16 : n; }  /* n >= 1 */
static inline int8x16_t load_i8x16(const int8_t *p, vimask n) {
    if (n >= 16) return vld1q_s8(p);
    int8_t t[16] = {0};
    if (n > 0) memcpy(t, p, (size_t)n);
    return vld1q_s8(t);
}
static inline void load_i16x16(const int16_t *p, vimask n, int16x8_t *x0, int16x8_t *x1) {
    if (n >= 16) {
        *x0 = vld1q_s16(p), *x1 = vld1q_s16(p + 8);
        return;
    }
    int16_t t[16] = {0};
    if (n > 0) memcpy(t, p, (size_t)n * 2);
    *x0 = vld1q_s16(t), *x1 = vld1q_s16(t + 8);
}
#if defined(__ARM_FEATURE_DOTPROD)
/* sdot multiplies int8 by int8, four products a lane. Each int16 activation is split into
 * two signed bytes, x = 256 hi + lo: lo = x's low byte read as signed (-128 .. 127), hi =
 * (x + 128) >> 8 (one vaddhn). hi fits a signed byte for x <= 32639 = 127 * 256 + 127, so
 * this variant scales activations to +-32639 (VI_XMAX) instead of 32767: 14.99 bits rather
 * than 15. a sums w hi, b sums w lo, and vi_float weighs a by 256. Per 256-column chunk a
 * lane adds 64 products of at most 128 * 127: exact in int32 and in fp32. */
#define PC_I8_DOT "sdot"
#define VI_XMAX 32639
static inline vi vi_w8(const int8_t *p, vimask n) {  /* the 16 bytes as they are, in a */
    vi r = {vreinterpretq_s32_s8(load_i8x16(p, n)), vdupq_n_s32(0)};
    return r;
}
static inline vi vi_x16(const int16_t *p, vimask n) {  /* a: the high bytes, b: the low ones */
    int16x8_t x0, x1;
    load_i16x16(p, n, &x0, &x1);
    const int16x8_t half = vdupq_n_s16(128);
    const int8x16_t hi = vaddhn_high_s16(vaddhn_s16(x0, half), x1, half);
    const int8x16_t lo = vmovn_high_s16(vmovn_s16(x0), x1);
    vi r = {vreinterpretq_s32_s8(hi), vreinterpretq_s32_s8(lo)};
    return r;
}
static inline vi vi_dot(vi acc, vi w, vi x) {
    const int8x16_t wb = vreinterpretq_s8_s32(w.a);
    vi r = {vdotq_s32(acc.a, wb, vreinterpretq_s8_s32(x.a)), vdotq_s32(acc.b, wb, vreinterpretq_s8_s32(x.b))};
    return r;
}
static inline vf vi_float(vi a) { return vpair(vmulq_n_f32(vcvtq_f32_s32(a.a), 256.0f), vcvtq_f32_s32(a.b)); }
#else
/* Without sdot: both operands as int16 (a: columns 0-7, b: 8-15), widening multiply-
 * accumulates (smlal, smlal2) into int32: two products a lane a call, as vpmaddwd. */
#define PC_I8_DOT "smlal"
#define VI_XMAX 32767
static inline vi vi_w8(const int8_t *p, vimask n) {
    const int8x16_t b = load_i8x16(p, n);
    vi r = {vreinterpretq_s32_s16(vmovl_s8(vget_low_s8(b))), vreinterpretq_s32_s16(vmovl_high_s8(b))};
    return r;
}
static inline vi vi_x16(const int16_t *p, vimask n) {
    int16x8_t x0, x1;
    load_i16x16(p, n, &x0, &x1);
    vi r = {vreinterpretq_s32_s16(x0), vreinterpretq_s32_s16(x1)};
    return r;
}
static inline vi vi_dot(vi acc, vi w, vi x) {
    const int16x8_t w0 = vreinterpretq_s16_s32(w.a), w1 = vreinterpretq_s16_s32(w.b);
    const int16x8_t x0 = vreinterpretq_s16_s32(x.a), x1 = vreinterpretq_s16_s32(x.b);
    vi r = {vmlal_high_s16(vmlal_s16(acc.a, vget_low_s16(w0), vget_low_s16(x0)), w0, x0),
            vmlal_high_s16(vmlal_s16(acc.b, vget_low_s16(w1), vget_low_s16(x1)), w1, x1)};
    return r;
}
static inline vf vi_float(vi a) { return vpair(vcvtq_f32_s32(a.a), vcvtq_f32_s32(a.b)); }
#endif

#else
#define PC_ISA 0
#endif

/* An element of an fp32 or bf16 array, as fp32; and v stored into one (bf16: rounded to
 * nearest even). */
static inline float elem(const void *p, int bf16, long i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void store(void *y, int y_bf16, long i, float v) {
    if (y_bf16) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

#if PC_ISA
/* VL values from element i of p (bf16 if bf16 is set, else fp32) as fp32; lanes outside m 0. */
static inline vf vloadx(const void *p, int bf16, long i, vmask m) {
    return bf16 ? vwiden_bf16m((const uint16_t *)p + i, m) : vloadm((const float *)p + i, m);
}

/* VL values into element i of p (bf16, rounded to nearest even, or fp32), lanes of m only. */
static inline void vstorex(void *p, int bf16, long i, vf v, vmask m) {
    if (bf16) vstore_bf16m((uint16_t *)p + i, m, v);
    else vstorem((float *)p + i, m, v);
}

/* ---- exp, VL at a time --------------------------------------------------------------
 * x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts), a degree-6 polynomial for e^r, and
 * 2^n applied by vscale2n (relative error about 2e-7). */
static inline vf vexp(vf x) {
    x = vmax(vmin(x, vset1(88.0f)), vset1(-88.0f));
    vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfnmadd(n, vset1(0.693359375f), x);
    r = vfnmadd(n, vset1(-2.12194440e-4f), r);
    vf p = vset1(1.3981999507e-3f);
    p = vfmadd(p, r, vset1(8.3334519073e-3f));
    p = vfmadd(p, r, vset1(4.1665795894e-2f));
    p = vfmadd(p, r, vset1(1.6666665459e-1f));
    p = vfmadd(p, r, vset1(5.0000001201e-1f));
    p = vfmadd(p, vmul(r, r), vadd(r, vset1(1.0f)));
    return vscale2n(p, n);
}
#endif

#endif /* POLYCODER_KERNELS_COMMON_H */
