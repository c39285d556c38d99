/* Weight-streaming products for decoding: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]).
 *
 * A decode step multiplies a few activation rows (M = 1..8) by every weight matrix of the
 * model once: the time goes into reading the weights, so the kernel's one job is to stream
 * W from memory at full bandwidth and do the arithmetic while it arrives. W is read row by
 * row in its natural [out, in] layout, four rows at a time, by every thread on its own
 * contiguous range of output rows; the activation rows stay in L1.
 *
 * Weight kinds: fp32; bf16 (widened to fp32 by a 16-bit shift: exact); int8 with one fp32
 * scale per output row (weight-only quantization: y = scale[n] * sum_k x * q). Activations
 * arrive as fp32 or bf16 and are widened to fp32 once per call, products and sums are
 * fp32; except for int8 weights on CPUs with AVX512_VNNI, where each activation row is
 * scaled to int16 (+-32767, one scale a row: 15 significant bits, finer than bf16's 8)
 * and multiplied exactly in integers, twice as fast as widening the weights to fp32.
 * The output is written as fp32 or bf16 (round to nearest even). Weights are prefetched
 * PF_BYTES ahead: without it one core's stream of misses ran at half the bandwidth.
 *
 * Threads come from the OpenMP runtime that PyTorch itself loads (libgomp.so.1), so our
 * parallel regions reuse PyTorch's worker threads instead of competing with them.
 *
 * Built by polycoder/kernels/__init__.py with the host's compiler and -march=native; the
 * AVX-512 path is compiled only where the CPU has it (pc_available() says whether).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };

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

static inline void store(void *y, int y_bf16, long i, float v) {
    if (y_bf16) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

/* The activation fused into a product's output: 0 none, 1 GELU (erf), 2 GELU (tanh form). */
static inline float activate(float v, int act) {
    if (act == 1) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    if (act == 2) return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    return v;
}

static inline float bias_at(const void *bias, int bias_bf16, long n) {
    if (!bias) return 0.0f;
    return bias_bf16 ? bf16_to_f32(((const uint16_t *)bias)[n]) : ((const float *)bias)[n];
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

int pc_available(void) { return 1; }

/* The first n lanes of 16 (none for n <= 0, all for n >= 16): the mask of a loop's tail. */
static inline __mmask16 lanes16(long n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* Weights are prefetched about this many bytes ahead of the rows being read (measured:
 * 12-16 KB keeps a core's stream of misses full; 3 KB was half as fast for int8). */
#define PF_BYTES 16384
static inline long pf_rows(long K, long elsize) {
    long r = PF_BYTES / (K * elsize);
    return r < 4 ? 4 : r;
}

/* ---- activations, 16 at a time ------------------------------------------------------
 * exp: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts), a degree-6 polynomial for
 * e^r, and 2^n applied by scalef (relative error about 2e-7). erf: Abramowitz and
 * Stegun 7.1.26 (absolute error under 1.5e-7); tanh(u) = 1 - 2 / (e^{2u} + 1). */

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

static inline __m512 erf16(__m512 x) {
    __m512 a = _mm512_abs_ps(x);
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 e = _mm512_fnmadd_ps(p, exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a)), _mm512_set1_ps(1.0f));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(e),
        _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u))));  /* erf(-x) = -erf(x) */
}

static inline __m512 act16(__m512 v, int act) {
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    if (act == 1) return _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, erf16(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)))));
    if (act == 2) {
        __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f), _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));
        __m512 th = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(exp16(_mm512_add_ps(u, u)), one)));
        return _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, th));
    }
    return v;
}

static void activate_all(float *v, long n, int act) {
    for (long i = 0; i < n; i += 16) {
        __mmask16 mask = lanes16(n - i);
        _mm512_mask_storeu_ps(v + i, mask, act16(_mm512_maskz_loadu_ps(mask, v + i), act));
    }
}

/* ---- reductions ------------------------------------------------------------------------
 * Every output is the sum of one accumulator's 16 lanes. Where a block has exactly 16
 * accumulators, they are reduced together by a transpose-and-add tree (about 45
 * instructions for 16 sums, against 8 each for one at a time). */

static inline __m512 reduce16(const __m512 *v) {
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

/* out[r * MB + m] = the lane sum of acc[r * MB + m], for R * MB accumulators. */
static inline __attribute__((always_inline)) void reduce_out(const __m512 *acc, int n, float *out) {
    if (n == 16) _mm512_storeu_ps(out, reduce16(acc));
    else
        for (int i = 0; i < n; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
}

/* A block is R weight rows (n .. n+R-1) against MB activation rows (m0 .. m0+MB-1): R * MB
 * accumulators in registers, each weight vector loaded (and widened) once for all MB
 * rows. R = 4 up to 4 rows; R = 2 from 5 to 8 rows, so that 8 rows take one pass over
 * the weights (4 x 8 accumulators would not fit in the 32 registers). */

/* ---- fp32 weights: 16 a load, FMA against fp32 activations ---------------------------- */

static inline __attribute__((always_inline)) void block_f32(
    const float *x, const float *w, long n, long m0, const int R, const int MB, long K, long k0, long k1, float *out) {
    const long pf = pf_rows(K, 4);
    __m512 acc[16];
    for (int i = 0; i < R * MB; i++) acc[i] = _mm512_setzero_ps();
    long k = k0;
    for (; k + 16 <= k1; k += 16) {
        __m512 wv[4];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w + (n + pf + r) * K + k), _MM_HINT_T0);
            wv[r] = _mm512_loadu_ps(w + (n + r) * K + k);
        }
        for (int m = 0; m < MB; m++) {
            __m512 xv = _mm512_loadu_ps(x + (m0 + m) * K + k);
            for (int r = 0; r < R; r++) acc[r * MB + m] = _mm512_fmadd_ps(wv[r], xv, acc[r * MB + m]);
        }
    }
    if (k < k1) {
        __mmask16 mask = lanes16(k1 - k);
        __m512 wv[4];
        for (int r = 0; r < R; r++) wv[r] = _mm512_maskz_loadu_ps(mask, w + (n + r) * K + k);
        for (int m = 0; m < MB; m++) {
            __m512 xv = _mm512_maskz_loadu_ps(mask, x + (m0 + m) * K + k);
            for (int r = 0; r < R; r++) acc[r * MB + m] = _mm512_fmadd_ps(wv[r], xv, acc[r * MB + m]);
        }
    }
    reduce_out(acc, R * MB, out);
}

/* ---- bf16 (and int8 without VNNI) weights: widened to fp32 16 at a time, FMA against
 * fp32 activations. bf16 widens by a 16-bit shift (exact). (AVX512_BF16's pairwise dot
 * product measured 1.5x slower here: AMD EPYC.) */

static inline __m512 widen_bf16(const uint16_t *p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

static inline __m512 widen_i8(const int8_t *p, __mmask16 mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

#define DEFINE_WIDENING_BLOCK(NAME, WT, WIDEN)                                                     \
    static inline __attribute__((always_inline)) void NAME(                                        \
        const float *x, const WT *w, long n, long m0, const int R, const int MB, long K, long k0, long k1, float *out) { \
        __m512 acc[16];                                                                            \
        for (int i = 0; i < R * MB; i++) acc[i] = _mm512_setzero_ps();                             \
        const long pf = pf_rows(K, sizeof(WT));                                                    \
        for (long k = k0; k < k1; k += 16) {                                                       \
            __mmask16 mask = lanes16(k1 - k);                                                       \
            __m512 wv[4];                                                                          \
            for (int r = 0; r < R; r++) {                                                          \
                _mm_prefetch((const char *)(w + (n + pf + r) * K + k), _MM_HINT_T0);               \
                wv[r] = WIDEN(w + (n + r) * K + k, mask);                                          \
            }                                                                                      \
            for (int m = 0; m < MB; m++) {                                                         \
                __m512 xv = _mm512_maskz_loadu_ps(mask, x + (m0 + m) * K + k);                     \
                for (int r = 0; r < R; r++) acc[r * MB + m] = _mm512_fmadd_ps(wv[r], xv, acc[r * MB + m]); \
            }                                                                                      \
        }                                                                                          \
        reduce_out(acc, R * MB, out);                                                              \
    }

DEFINE_WIDENING_BLOCK(block_bf16, uint16_t, widen_bf16)

/* ---- int8 weights: 32 a load, widened to int16, multiplied with int16 activations
 * (each row scaled to +-32767 once a call) by VNNI's pairwise dot product into int32;
 * every 256 columns the int32 sums move into fp32 so they can never overflow
 * (256 * 32767 * 127 < 2^31). Without VNNI: widened to fp32 and FMA, as bf16. ---- */

#if defined(__AVX512VNNI__)
#define I8_VNNI 1
#define I8_CHUNK 256
static inline __attribute__((always_inline)) void block_i8(
    const int16_t *x, const int8_t *w, long n, long m0, const int R, const int MB, long K, long k0, long k1, float *out) {
    const long pf = pf_rows(K, 1);
    __m512 facc[16];
    for (int i = 0; i < R * MB; i++) facc[i] = _mm512_setzero_ps();
    for (long c = k0; c < k1; c += I8_CHUNK) {
        long end = c + I8_CHUNK < k1 ? c + I8_CHUNK : k1;
        __m512i acc[16];
        for (int i = 0; i < R * MB; i++) acc[i] = _mm512_setzero_si512();
        for (long k = c; k < end; k += 32) {
            __mmask32 mask = end - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (end - k)) - 1u);
            __m512i wv[4];
            for (int r = 0; r < R; r++) {
                _mm_prefetch((const char *)(w + (n + pf + r) * K + k), _MM_HINT_T0);
                wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w + (n + r) * K + k));
            }
            for (int m = 0; m < MB; m++) {
                __m512i xv = _mm512_maskz_loadu_epi16(mask, x + (m0 + m) * K + k);
                for (int r = 0; r < R; r++) acc[r * MB + m] = _mm512_dpwssd_epi32(acc[r * MB + m], wv[r], xv);
            }
        }
        for (int i = 0; i < R * MB; i++) facc[i] = _mm512_add_ps(facc[i], _mm512_cvtepi32_ps(acc[i]));
    }
    reduce_out(facc, R * MB, out);
}
#else
#define I8_VNNI 0
DEFINE_WIDENING_BLOCK(block_i8, int8_t, widen_i8)
#endif

/* The activation applied to n fp32 values in place, 16 at a time (see act_vec). */
static void activate_all(float *v, long n, int act);

/* Rows [lo, hi) of the output for every activation row, R weight rows at a time (R = 4
 * for up to 4 activation rows, else 2, see above; MB activation rows a block, at most 8).
 * Where R does not divide the range, the last block starts earlier and overlaps the
 * previous one (those rows are computed twice, to the same values): no scalar tail.
 * The columns are taken in chunks that keep the MB activation rows in L1 (24 KB): with
 * 8 fp32 rows of 3072 columns (96 KB) every weight load would otherwise wait on L2 for
 * the activations; partial sums of a chunk collect in `part`. A fused activation runs
 * vectorized over a thread's finished fp32 outputs (scalar into bf16 outputs). */
#define BLOCK_CASE(BLOCK, R, MB) BLOCK(x, w, nb, m0, R, MB, K, k0, k1, out); break
#define DEFINE_RANGE(NAME, BLOCK, XT, WT, KALIGN)                                                  \
    static int NAME(const XT *x, const WT *w, const float *scale, const float *xscale,            \
                    const void *bias, int bias_bf16, void *y, int y_bf16, int act,                \
                    long M, long N, long K, long lo, long hi) {                                   \
        float out[16], *part = NULL;                                                               \
        const int act_now = y_bf16 ? act : 0;                                                      \
        /* part's rows start at base: a range under 4 rows is the clamped last one (hi == N) */    \
        const long base = hi - lo >= 4 ? lo : (lo < N - 4 ? lo : N - 4);                           \
        for (long m0 = 0; m0 < M; m0 += 8) {                                                       \
            const int MB = (int)(M - m0 < 8 ? M - m0 : 8), R = MB <= 4 ? 4 : 2;                    \
            long KC = (24576 / ((long)sizeof(XT) * MB)) / KALIGN * KALIGN;                         \
            if (KC < KALIGN) KC = KALIGN;                                                          \
            if (KC < K && !part && !(part = (float *)malloc(sizeof(float) * 8 * (size_t)(hi - lo + 4)))) \
                return -2;                                                                         \
            for (long k0 = 0; k0 < K; k0 += KC) {                                                  \
                const long k1 = k0 + KC < K ? k0 + KC : K;                                         \
                const int first = k0 == 0, last = k1 == K;                                         \
                for (long n = lo; n < hi; n += R) {                                                \
                    long nb = n + R <= hi ? n : (hi - R >= lo ? hi - R : N - R);                   \
                    switch (MB) {                                                                  \
                    case 1: BLOCK_CASE(BLOCK, 4, 1);                                               \
                    case 2: BLOCK_CASE(BLOCK, 4, 2);                                               \
                    case 3: BLOCK_CASE(BLOCK, 4, 3);                                               \
                    case 4: BLOCK_CASE(BLOCK, 4, 4);                                               \
                    case 5: BLOCK_CASE(BLOCK, 2, 5);                                               \
                    case 6: BLOCK_CASE(BLOCK, 2, 6);                                               \
                    case 7: BLOCK_CASE(BLOCK, 2, 7);                                               \
                    default: BLOCK_CASE(BLOCK, 2, 8);                                              \
                    }                                                                              \
                    for (int r = 0; r < R; r++)                                                    \
                        for (int m = 0; m < MB; m++) {                                             \
                            float v = out[r * MB + m];                                             \
                            if (!(first && last)) {                                                \
                                float *p = part + (nb - base + r) * 8 + m;                         \
                                if (!first) v += *p;                                               \
                                if (!last) { *p = v; continue; }                                   \
                            }                                                                      \
                            float s = scale ? scale[nb + r] : 1.0f, b = bias_at(bias, bias_bf16, nb + r); \
                            store(y, y_bf16, (m0 + m) * N + nb + r,                                \
                                  activate(v * s * (xscale ? xscale[m0 + m] : 1.0f) + b, act_now)); \
                        }                                                                          \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        free(part);                                                                                \
        if (act && !y_bf16)                                                                        \
            for (long m = 0; m < M; m++) activate_all((float *)y + m * N + lo, hi - lo, act);      \
        return 0;                                                                                  \
    }

DEFINE_RANGE(range_f32, block_f32, float, float, 16)
DEFINE_RANGE(range_bf16, block_bf16, float, uint16_t, 16)
#if I8_VNNI
DEFINE_RANGE(range_i8, block_i8, int16_t, int8_t, I8_CHUNK)
#else
DEFINE_RANGE(range_i8, block_i8, float, int8_t, 16)
#endif

static inline float x_at(const void *x, int x_bf16, long i) {
    return x_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* y = act(x W^T * scale + bias). x: [M, K] fp32 or bf16; W: [N, K] of `kind` (N >= 4); scale:
 * [N] fp32 or NULL; bias: [N] fp32/bf16 or NULL; y: [M, N] fp32 or bf16; all contiguous.
 * Returns 0, or -1 for a bad argument, -2 when out of memory. */
static int linear_impl(const void *x, int x_bf16, const void *w, int kind, const float *scale,
                       const void *bias, int bias_bf16, void *y, int y_bf16, int act,
                       long M, long N, long K, int threads) {
    if (act < 0 || act > 2) return -1;
    if (kind < W_F32 || kind > W_I8 || N < 4 || M < 1 || K < 1) return -1;
    /* The activations in the form the weight kind's inner loop wants, converted once. */
    void *buf = NULL;
    const void *xa = x;
    float xscale[64];
    const float *xs = NULL;
    if (M > 64) return -1;
    if (kind == W_I8 && I8_VNNI) {
        int16_t *q = (int16_t *)malloc(sizeof(int16_t) * (size_t)(M * K));
        if (!q) return -2;
        for (long m = 0; m < M; m++) {
            float amax = 0.0f;
            for (long k = 0; k < K; k++) {
                float v = x_at(x, x_bf16, m * K + k);
                amax = v > amax ? v : (-v > amax ? -v : amax);
            }
            float s = amax > 0.0f ? amax / 32767.0f : 1.0f, inv = 1.0f / s;
            for (long k = 0; k < K; k++) {
                float v = x_at(x, x_bf16, m * K + k) * inv;
                q[m * K + k] = (int16_t)(v >= 0.0f ? v + 0.5f : v - 0.5f);
            }
            xscale[m] = s;
        }
        buf = q, xa = q, xs = xscale;
    } else if (x_bf16) {
        float *f = (float *)malloc(sizeof(float) * (size_t)(M * K));
        if (!f) return -2;
        for (long i = 0; i < M * K; i++) f[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        buf = f, xa = f;
    }
    if (threads < 1) threads = 1;
    long blocks = (N + 3) / 4; /* threads split whole 4-row blocks */
    if (blocks < threads) threads = (int)blocks;
    int rc = 0;
#pragma omp parallel num_threads(threads) reduction(min : rc)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long lo = 4 * (blocks * t / nt), hi = 4 * (blocks * (t + 1) / nt);
        if (hi > N) hi = N;
        if (kind == W_F32) rc = range_f32(xa, w, scale, xs, bias, bias_bf16, y, y_bf16, act, M, N, K, lo, hi);
        else if (kind == W_BF16) rc = range_bf16(xa, w, scale, xs, bias, bias_bf16, y, y_bf16, act, M, N, K, lo, hi);
        else rc = range_i8(xa, w, scale, xs, bias, bias_bf16, y, y_bf16, act, M, N, K, lo, hi);
    }
    free(buf);
    return rc;
}

/* ---- one decode step of attention ---------------------------------------------------
 *
 * For every row b and head h, at the row's position p = pos[b]: rotate q and k (GPT-NeoX's
 * "rotate half" over the first `rot` dims, cos/sin fp32 tables [*, rot]), write k and v
 * into the cache at p, attend over cache positions 0..p (softmax(q.k / sqrt(hs)) . v) and
 * write the head's output into y[b, h*hs:(h+1)*hs]. qkv [B, 3C] (fp32) is the fused
 * projection, interleaved per head (q, k, v of head 0, then head 1, ...); the cache
 * [B, H, max_len, hs] is in the model's dtype (fp32 or bf16); arithmetic is fp32. */

static inline __m512 load16(const void *p, int bf16, long i, __mmask16 mask) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(mask, (const float *)p + i);
}

static inline float elem(const void *p, int bf16, long i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* softmax(q . k_s * scale) over cache positions s < n of one (row, head), into scores[0 .. n).
 * 16 positions at a time: their dot products accumulate side by side and are reduced
 * together (reduce16); the exponentials are vectorized. Positions past n in the last group
 * are read with an all-zero mask (no memory is touched for them). */
static inline void attend_scores(const float *q, const void *kc, int bf16, long row, long hs, long n,
                                 float scale, float *scores) {
    __m512 mxv = _mm512_set1_ps(-INFINITY);
    for (long s0 = 0; s0 < n; s0 += 16) {
        const long cnt = n - s0 < 16 ? n - s0 : 16;
        const __mmask16 valid = lanes16(cnt);
        __m512 d[16];
        for (int j = 0; j < 16; j++) d[j] = _mm512_setzero_ps();
        for (long i = 0; i < hs; i += 16) {
            const __mmask16 mask = lanes16(hs - i);
            const __m512 qv = _mm512_maskz_loadu_ps(mask, q + i);
            for (int j = 0; j < 16; j++)
                d[j] = _mm512_fmadd_ps(qv, load16(kc, bf16, (row + s0 + j) * hs + i, j < cnt ? mask : 0), d[j]);
        }
        const __m512 sc = _mm512_mul_ps(reduce16(d), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(scores + s0, valid, sc);
        mxv = _mm512_mask_max_ps(mxv, valid, mxv, sc);
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mxv));
    __m512 sum = _mm512_setzero_ps();
    for (long s0 = 0; s0 < n; s0 += 16) {
        const __mmask16 valid = lanes16(n - s0);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, scores + s0), mx));
        _mm512_mask_storeu_ps(scores + s0, valid, e);
        sum = _mm512_mask_add_ps(sum, valid, sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (long s0 = 0; s0 < n; s0 += 16) {
        const __mmask16 valid = lanes16(n - s0);
        _mm512_mask_storeu_ps(scores + s0, valid, _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, scores + s0), inv));
    }
}

/* out[i0 .. i0 + 16 NV) (within hs) = sum over s < n of scores[s] * v_s: NV accumulators of
 * 16 dims in registers for the whole pass over the positions. */
static inline __attribute__((always_inline)) void attend_values(const void *vc, int bf16, long row, long hs, long i0,
                                                                long n, const float *scores, const int NV, float *out) {
    __m512 a[8];
    __mmask16 mk[8];
    for (int c = 0; c < NV; c++) {
        const long i = i0 + 16 * c;
        a[c] = _mm512_setzero_ps();
        mk[c] = lanes16(hs - i);
    }
    for (long s = 0; s < n; s++) {
        const __m512 w = _mm512_set1_ps(scores[s]);
        for (int c = 0; c < NV; c++)
            a[c] = _mm512_fmadd_ps(w, load16(vc, bf16, (row + s) * hs + i0 + 16 * c, mk[c]), a[c]);
    }
    for (int c = 0; c < NV; c++) _mm512_mask_storeu_ps(out + i0 + 16 * c, mk[c], a[c]);
}

static int attend_impl(const float *qkv, void *kc, void *vc, int bf16, const float *cos_t,
                       const float *sin_t, const long *pos, float *y, long B, long H, long hs,
                       long rot, long max_len, int threads) {
    if (hs > 512 || rot > hs || rot % 2 || max_len > 32768) return -1;
    for (long b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= max_len) return -1;
    const long C = H * hs;
    const float scale = 1.0f / sqrtf((float)hs);
    if (threads < 1) threads = 1;
    if (B * H < threads) threads = (int)(B * H);
#pragma omp parallel num_threads(threads)
    {
        float q[512], k[512], scores[32768];
#pragma omp for schedule(static)
        for (long bh = 0; bh < B * H; bh++) {
            long b = bh / H, h = bh % H, p = pos[b];
            const float *src = qkv + b * 3 * C + h * 3 * hs;
            for (long i = 0; i < hs; i++) q[i] = src[i], k[i] = src[hs + i];
            const float *c = cos_t + p * rot, *sn = sin_t + p * rot;
            long half = rot / 2;
            for (long i = 0; i < half; i++) {
                float q1 = q[i], q2 = q[i + half], k1 = k[i], k2 = k[i + half];
                q[i] = q1 * c[i] - q2 * sn[i];
                q[i + half] = q2 * c[i + half] + q1 * sn[i + half];
                k[i] = k1 * c[i] - k2 * sn[i];
                k[i + half] = k2 * c[i + half] + k1 * sn[i + half];
            }
            long row = (b * H + h) * max_len;
            for (long i = 0; i < hs; i++) {
                store(kc, bf16, (row + p) * hs + i, k[i]);
                store(vc, bf16, (row + p) * hs + i, src[2 * hs + i]);
            }
            const long n = p + 1;
            attend_scores(q, kc, bf16, row, hs, n, scale, scores);
            float *out = y + b * C + h * hs;
            for (long i0 = 0; i0 < hs; i0 += 128) {
                if (hs - i0 <= 64) attend_values(vc, bf16, row, hs, i0, n, scores, 4, out);
                else attend_values(vc, bf16, row, hs, i0, n, scores, 8, out);
            }
        }
    }
    return 0;
}

/* LayerNorm of rows x [M, C] (fp32) into y (fp32), weight and bias in the model's dtype. */
static void layer_norm(const float *x, float *y, const void *w, const void *b, int bf16, float eps, long M, long C) {
    for (long m = 0; m < M; m++) {
        const float *r = x + m * C;
        float mean = 0.0f, var = 0.0f;
        for (long i = 0; i < C; i++) mean += r[i];
        mean /= (float)C;
        for (long i = 0; i < C; i++) var += (r[i] - mean) * (r[i] - mean);
        float rstd = 1.0f / sqrtf(var / (float)C + eps);
        for (long i = 0; i < C; i++) y[m * C + i] = (r[i] - mean) * rstd * elem(w, bf16, i) + elem(b, bf16, i);
    }
}

/* ---- one GPT-NeoX block for a decode step, in one call ----------------------------------
 *
 * x [B, C] (the residual stream, model dtype) is updated in place:
 *   sequential (PolyCoder): x += attn(ln1(x)); x += mlp(ln2(x))
 *   parallel (GPT-J, Pythia): x += attn(ln1(x)) + mlp(ln2(x))
 * with the cache write and attention of `attend_impl` and the MLP's activation fused into
 * its first product. Intermediates are fp32; the stream is rounded to the model's dtype
 * once, at the end. `lin` holds, for qkv, dense, h_to_4h, 4h_to_h in that order:
 * weight, scale (int8; else NULL), bias (model dtype, or NULL) pointers; `kinds` their
 * weight kinds; `ln` the two LayerNorms' weight and bias pointers. */
int pc_block(void *x, int bf16, long B, long C, long inter, const void *const *ln, float eps,
             const void *const *lin, const int *kinds, int act, int parallel_residual,
             void *kc, void *vc, const float *cos_t, const float *sin_t, const long *pos,
             long H, long hs, long rot, long max_len, int threads) {
    if (B < 1 || B > 64 || H * hs != C) return -1;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(B * (3 * C + 3 * C + inter)));
    if (!buf) return -2;
    float *xs = buf, *h = xs + B * C, *qkv = h + B * C, *att = qkv + 3 * B * C, *up = att + B * C;
    int rc = 0;
    for (long i = 0; i < B * C; i++) xs[i] = elem(x, bf16, i);
    layer_norm(xs, h, ln[0], ln[1], bf16, eps, B, C);
    if ((rc = linear_impl(h, 0, lin[0], kinds[0], lin[1], lin[2], bf16, qkv, 0, 0, B, 3 * C, C, threads))) goto done;
    if ((rc = attend_impl(qkv, kc, vc, bf16, cos_t, sin_t, pos, att, B, H, hs, rot, max_len, threads))) goto done;
    /* the attention output's projection goes to qkv's buffer, free again */
    if ((rc = linear_impl(att, 0, lin[3], kinds[1], lin[4], lin[5], bf16, qkv, 0, 0, B, C, C, threads))) goto done;
    if (!parallel_residual)
        for (long i = 0; i < B * C; i++) xs[i] += qkv[i];
    layer_norm(xs, h, ln[2], ln[3], bf16, eps, B, C);
    if ((rc = linear_impl(h, 0, lin[6], kinds[2], lin[7], lin[8], bf16, up, 0, act, B, inter, C, threads))) goto done;
    if ((rc = linear_impl(up, 0, lin[9], kinds[3], lin[10], lin[11], bf16, h, 0, 0, B, C, inter, threads))) goto done;
    for (long i = 0; i < B * C; i++) store(x, bf16, i, xs[i] + h[i] + (parallel_residual ? qkv[i] : 0.0f));
done:
    free(buf);
    return rc;
}

/* Every block of a decode step, one after another: pc_block for layer l with ln + 4 l,
 * lin + 12 l, kinds + 4 l, kc[l], vc[l] (the same layout as pc_block's arguments). */
int pc_blocks(void *x, int bf16, long B, long C, long inter, long L, const void *const *ln, float eps,
              const void *const *lin, const int *kinds, int act, int parallel_residual,
              void *const *kc, void *const *vc, const float *cos_t, const float *sin_t, const long *pos,
              long H, long hs, long rot, long max_len, int threads) {
    for (long l = 0; l < L; l++) {
        int rc = pc_block(x, bf16, B, C, inter, ln + 4 * l, eps, lin + 12 * l, kinds + 4 * l, act,
                          parallel_residual, kc[l], vc[l], cos_t, sin_t, pos, H, hs, rot, max_len, threads);
        if (rc) return rc;
    }
    return 0;
}

/* ---- cross-entropy over bf16 logits, in place (training's fused output head) ----------
 * For each row r of logits [R, V] (bf16), with target t[r] and row weight w[r] (1/n for
 * a counted row, 0 for an ignored one): lse[r] = log sum_v exp(z[r, v]) and picked[r] =
 * z[r, t[r]], in fp32; and when grad is set, z is overwritten with the gradient of the
 * weighted loss sum, w[r] * (softmax(z)[v] - [v == t[r]]), rounded to bf16 (nearest
 * even). Three passes over a row (max, sum of exponentials, gradient), the row in L2
 * after the first; rows split across threads. Replaces the fp32 round trip of torch's
 * chunked softmax (upcast, exp, write-back): 50 ms against 144-209 ms for 2048 x 50304
 * logits on 2 cores (a timing script of the session that wrote it, not kept; the kernel is
 * checked against fp32 softmax in tests/test_kernels.py). */
static inline __m256i round_bf16x16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

int pc_cross_entropy_bf16(uint16_t *z, long R, long V, const int64_t *target, const float *w,
                          float *lse_out, float *picked_out, int grad, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < R; r++) {
        uint16_t *row = z + r * V;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (long v = 0; v < V; v += 16) {
            __mmask16 m = lanes16(V - v);
            mx = _mm512_mask_max_ps(mx, m, mx, widen_bf16(row + v, m));
        }
        float zmax = _mm512_reduce_max_ps(mx);
        __m512 vmax = _mm512_set1_ps(zmax), sum = _mm512_setzero_ps();
        for (long v = 0; v < V; v += 16) {
            __mmask16 m = lanes16(V - v);
            sum = _mm512_mask_add_ps(sum, m, sum, exp16(_mm512_sub_ps(widen_bf16(row + v, m), vmax)));
        }
        float lse = zmax + logf(_mm512_reduce_add_ps(sum));
        long t = target[r];
        lse_out[r] = lse;
        picked_out[r] = bf16_to_f32(row[t]);
        if (!grad) continue;
        /* w * exp(z - lse), with w folded into the exponent where it is positive. */
        float wr = w[r];
        if (wr > 0.0f) {
            __m512 shift = _mm512_set1_ps(lse - logf(wr));
            for (long v = 0; v < V; v += 16) {
                __mmask16 m = lanes16(V - v);
                __m512 g = exp16(_mm512_sub_ps(widen_bf16(row + v, m), shift));
                _mm256_mask_storeu_epi16(row + v, m, round_bf16x16(g));
            }
            /* the target's entry: w * softmax - w, from the unrounded softmax */
            row[t] = f32_to_bf16(wr * expf(picked_out[r] - lse) - wr);
        } else {
            memset(row, 0, (size_t)V * sizeof(uint16_t));
        }
    }
    return 0;
}

#if defined(__AVX512BF16__)
/* ---- causal attention backward, bf16: products and probabilities in one pass ---------
 * For n heads of bf16 q, dO [n, Tp, Dp] (rows and dimensions zero-padded to multiples of
 * 32 where T or D are not), O, k, v [n, T, D], and the forward's fp32 log-sum-exp lse
 * [n, T] (of scale * q.k): writes p = exp(scale * q.k - lse) and
 * ds = scale * p * (dO.v - rowsum(dO * O)) as bf16 [n, T, T], zero above the diagonal.
 * The products q.k and dO.v accumulate in fp32 and never leave the core, as in flash
 * attention's backward. First k and v are packed with their dimensions in pairs,
 * [n, Dp/2, Tp] pairs (kp, vp: the caller's buffers), the layout both product paths read:
 * - AMX (Sapphire Rapids and later): tiles of 16 query rows x 16 keys, 32 dimensions a
 *   tile product (the tile unit does 512 products a cycle);
 * - otherwise vdpbf16ps (pairs of bf16 products into fp32 lanes, 32 a cycle): 4 rows x
 *   32 keys for both products in 16 registers.
 * Either way the 16-key strips of s and dp go through `grad_strip` (exp, ds) to the outputs. */
static inline void grad_strip(const float *s, const float *dp, long r, long c0, long T, float l, float d,
                              float scale, uint16_t *p_row, uint16_t *ds_row) {
    if (c0 >= T) return;
    const long vis = r + 1 - c0, cols = T - c0;
    const __mmask16 m = lanes16(vis);
    const __mmask16 st = lanes16(cols);
    const __m512 vs = _mm512_set1_ps(scale);
    const __m512 pv = _mm512_maskz_mov_ps(m, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s), vs, _mm512_set1_ps(l))));
    const __m512 g = _mm512_mul_ps(_mm512_mul_ps(pv, vs), _mm512_sub_ps(_mm512_loadu_ps(dp), _mm512_set1_ps(d)));
    _mm256_mask_storeu_epi16(p_row + c0, st, round_bf16x16(pv));
    _mm256_mask_storeu_epi16(ds_row + c0, st, round_bf16x16(g));
}

/* Columns cend..T-1 of `rows` rows of p and ds from element `at`: keys past every row's diagonal. */
static void zero_beyond(uint16_t *p, uint16_t *ds, long at, long rows, long cend, long T) {
    for (long j = 0; j < rows && cend < T; j++) {
        memset(p + at + j * T + cend, 0, (size_t)(T - cend) * 2);
        memset(ds + at + j * T + cend, 0, (size_t)(T - cend) * 2);
    }
}

static float row_dot_bf16(const uint16_t *a, const uint16_t *b, long D) {
    __m512 acc = _mm512_setzero_ps();
    for (long e = 0; e < D; e += 16) {
        __mmask16 m = lanes16(D - e);
        acc = _mm512_fmadd_ps(widen_bf16(a + e, m), widen_bf16(b + e, m), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_PATH 1
struct tile_config { uint8_t palette; uint8_t start_row; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };

/* Linux hands out the tile registers to a process that asks (ARCH_REQ_XCOMP_PERM). */
static int amx_allowed(void) {
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return state;
}

static void attention_tiles_amx(const uint16_t *q, const uint16_t *dout, const uint32_t *kp, const uint32_t *vp,
                                long n, long T, long Tp, long Dp, const float *lse, const float *dsum,
                                float scale, uint16_t *p, uint16_t *ds, int threads) {
    const long tiles = (T + 15) / 16;
#pragma omp parallel num_threads(threads)
    {
        struct tile_config cfg = {0};
        cfg.palette = 1;
        for (int t = 0; t < 6; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
        _tile_loadconfig(&cfg);
        float sb[16 * 16] __attribute__((aligned(64))), db[16 * 16] __attribute__((aligned(64)));
#pragma omp for schedule(dynamic, 4)
        for (long idx = 0; idx < n * tiles; idx++) {
            const long h = idx / tiles, r0 = (idx % tiles) * 16, rows = T - r0 < 16 ? T - r0 : 16;
            const long cend = (r0 + rows + 15) / 16 * 16;
            for (long c0 = 0; c0 < cend; c0 += 16) {
                _tile_zero(0);
                _tile_zero(1);
                for (long e = 0; e < Dp; e += 32) {
                    _tile_loadd(2, q + (h * Tp + r0) * Dp + e, Dp * 2);
                    _tile_loadd(3, dout + (h * Tp + r0) * Dp + e, Dp * 2);
                    _tile_loadd(4, kp + (h * Dp / 2 + e / 2) * Tp + c0, Tp * 4);
                    _tile_loadd(5, vp + (h * Dp / 2 + e / 2) * Tp + c0, Tp * 4);
                    _tile_dpbf16ps(0, 2, 4);
                    _tile_dpbf16ps(1, 3, 5);
                }
                _tile_stored(0, sb, 64);
                _tile_stored(1, db, 64);
                for (long j = 0; j < rows; j++) {
                    const long r = r0 + j, out = (h * T + r) * T;
                    grad_strip(sb + 16 * j, db + 16 * j, r, c0, T, lse[h * T + r], dsum[h * T + r], scale, p + out, ds + out);
                }
            }
            zero_beyond(p, ds, (h * T + r0) * T, rows, cend, T);
        }
        _tile_release();
    }
}
#else
#define AMX_PATH 0
static int amx_allowed(void) { return 0; }
static void attention_tiles_amx(const uint16_t *q, const uint16_t *dout, const uint32_t *kp, const uint32_t *vp,
                                long n, long T, long Tp, long Dp, const float *lse, const float *dsum,
                                float scale, uint16_t *p, uint16_t *ds, int threads) {}
#endif

static void attention_tiles_dp(const uint16_t *q, const uint16_t *dout, const uint32_t *kp, const uint32_t *vp,
                               long n, long T, long Tp, long Dp, const float *lse, const float *dsum,
                               float scale, uint16_t *p, uint16_t *ds, int threads) {
    const long tiles = (T + 3) / 4, half = Dp / 2;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
    for (long idx = 0; idx < n * tiles; idx++) {
        const long h = idx / tiles, r0 = (idx % tiles) * 4;
        const long rows = T - r0 < 4 ? T - r0 : 4, cend = (r0 + rows + 31) / 32 * 32;
        const uint32_t *kh = kp + h * half * Tp, *vh = vp + h * half * Tp;
        const uint32_t *qr[4], *dr[4];
        for (int j = 0; j < 4; j++) {
            qr[j] = (const uint32_t *)(q + (h * Tp + r0 + j) * Dp);  /* rows padded to Tp */
            dr[j] = (const uint32_t *)(dout + (h * Tp + r0 + j) * Dp);
        }
        float sb[4][32], db[4][32];
        for (long c = 0; c < cend; c += 32) {
            __m512 as[4][2], ad[4][2];
            for (int j = 0; j < 4; j++) as[j][0] = as[j][1] = ad[j][0] = ad[j][1] = _mm512_setzero_ps();
            for (long i = 0; i < half; i++) {
                const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kh + i * Tp + c);
                const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kh + i * Tp + c + 16);
                const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vh + i * Tp + c);
                const __m512bh v1 = (__m512bh)_mm512_loadu_si512(vh + i * Tp + c + 16);
                for (int j = 0; j < 4; j++) {
                    const __m512bh a = (__m512bh)_mm512_set1_epi32((int)qr[j][i]);
                    const __m512bh b = (__m512bh)_mm512_set1_epi32((int)dr[j][i]);
                    as[j][0] = _mm512_dpbf16_ps(as[j][0], a, k0);
                    as[j][1] = _mm512_dpbf16_ps(as[j][1], a, k1);
                    ad[j][0] = _mm512_dpbf16_ps(ad[j][0], b, v0);
                    ad[j][1] = _mm512_dpbf16_ps(ad[j][1], b, v1);
                }
            }
            for (int j = 0; j < rows; j++) {
                const long r = r0 + j, out = (h * T + r) * T;
                for (int u = 0; u < 2; u++) {
                    _mm512_storeu_ps(sb[j] + 16 * u, as[j][u]);
                    _mm512_storeu_ps(db[j] + 16 * u, ad[j][u]);
                    grad_strip(sb[j] + 16 * u, db[j] + 16 * u, r, c + 16 * u, T, lse[h * T + r], dsum[h * T + r],
                               scale, p + out, ds + out);
                }
            }
        }
        zero_beyond(p, ds, (h * T + r0) * T, rows, cend, T);
    }
}

int pc_attention_grad_bf16(const uint16_t *q, const uint16_t *dout, const uint16_t *o, const uint16_t *k,
                           const uint16_t *v, uint32_t *kp, uint32_t *vp, float *dsum, long n, long T, long Tp,
                           long D, long Dp, const float *lse, float scale, uint16_t *p, uint16_t *ds, int use_amx,
                           int threads) {
    if (n == 0) return 0;
    const long half = Dp / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long h = 0; h < n; h++) {
        for (long i = 0; i < half; i++) {
            uint32_t *kr = kp + (h * half + i) * Tp, *vr = vp + (h * half + i) * Tp;
            for (long c = 0; c < Tp; c++) {
                const int in = c < T && 2 * i < D;
                kr[c] = in ? ((const uint32_t *)(k + (h * T + c) * D))[i] : 0;
                vr[c] = in ? ((const uint32_t *)(v + (h * T + c) * D))[i] : 0;
            }
        }
        for (long r = 0; r < T; r++)
            dsum[h * T + r] = row_dot_bf16(dout + (h * Tp + r) * Dp, o + (h * T + r) * D, D);
    }
    if (AMX_PATH && use_amx && amx_allowed())
        attention_tiles_amx(q, dout, kp, vp, n, T, Tp, Dp, lse, dsum, scale, p, ds, threads);
    else
        attention_tiles_dp(q, dout, kp, vp, n, T, Tp, Dp, lse, dsum, scale, p, ds, threads);
    return 0;
}
#else
int pc_attention_grad_bf16(void) { return -4; }
#endif

/* ---- training's q, k, v: split of the fused projection and rotary, one pass -----------
 * Forward: x [B, T, H, 3, hs] (the interleaved query_key_value output) -> q, k, v, each
 * [B, H, T, hs], q and k rotated over their first `rot` dims in GPT-NeoX's "rotate half"
 * layout with cos/sin [T, rot] (fp32; the arithmetic is fp32, one rounding at the end, as
 * transformers' fp32 rotation followed by SDPA's cast). Backward (grad set): dq, dk, dv
 * -> dx, the transposed rotation. x and the outputs are fp32 or bf16 independently.
 * Replaces split + rotate + cat + transposed copies and their backward (forward + backward
 * 3.7 ms against 20.3 ms at 160M shapes in bf16: benchmarks/train_kernels.py). */
static inline void store16(void *p, int bf16, long i, __m512 v, __mmask16 m) {
    if (bf16) _mm256_mask_storeu_epi16((uint16_t *)p + i, m, round_bf16x16(v));
    else _mm512_mask_storeu_ps((float *)p + i, m, v);
}

int pc_rotary_qkv(void *x, int x_bf16, void *q, void *k, void *v, int o_bf16, const float *cos_t, const float *sin_t,
                  long B, long T, long H, long hs, long rot, int grad, int threads) {
    const long half = rot / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long idx = 0; idx < B * T * H; idx++) {
        const long b = idx / (T * H), t = (idx / H) % T, h = idx % H;
        const long xo = idx * 3 * hs, oo = ((b * H + h) * T + t) * hs;
        const float *c = cos_t + t * rot, *sn = sin_t + t * rot;
        void *outs[3] = {q, k, v};
        for (int part = 0; part < 3; part++) {
            const long xp = xo + part * hs;
            void *o = outs[part];
            long i0 = 0;
            if (part < 2) {
                for (long i = 0; i < half; i += 16) {
                    const __mmask16 m = lanes16(half - i);
                    const __m512 c1 = _mm512_maskz_loadu_ps(m, c + i), c2 = _mm512_maskz_loadu_ps(m, c + half + i);
                    const __m512 s1 = _mm512_maskz_loadu_ps(m, sn + i), s2 = _mm512_maskz_loadu_ps(m, sn + half + i);
                    if (!grad) {  /* out1 = x1 cos1 - x2 sin1, out2 = x2 cos2 + x1 sin2 */
                        const __m512 a = load16(x, x_bf16, xp + i, m), d = load16(x, x_bf16, xp + half + i, m);
                        store16(o, o_bf16, oo + i, _mm512_fmsub_ps(a, c1, _mm512_mul_ps(d, s1)), m);
                        store16(o, o_bf16, oo + half + i, _mm512_fmadd_ps(d, c2, _mm512_mul_ps(a, s2)), m);
                    } else {      /* dx1 = d1 cos1 + d2 sin2, dx2 = d2 cos2 - d1 sin1 */
                        const __m512 a = load16(o, o_bf16, oo + i, m), d = load16(o, o_bf16, oo + half + i, m);
                        store16(x, x_bf16, xp + i, _mm512_fmadd_ps(a, c1, _mm512_mul_ps(d, s2)), m);
                        store16(x, x_bf16, xp + half + i, _mm512_fmsub_ps(d, c2, _mm512_mul_ps(a, s1)), m);
                    }
                }
                i0 = rot;
            }
            for (long i = i0; i < hs; i += 16) {
                const __mmask16 m = lanes16(hs - i);
                if (!grad) store16(o, o_bf16, oo + i, load16(x, x_bf16, xp + i, m), m);
                else store16(x, x_bf16, xp + i, load16(o, o_bf16, oo + i, m), m);
            }
        }
    }
    return 0;
}

/* ---- dst[V, C] (fp32) = src[C, V] (bf16) transposed ------------------------------------
 * The output head's weight gradient is fastest as h^T g ([C, V], a plain product) and is
 * needed as the fp32 [V, C] gradient of the fp32 master weight. Per strip of 64 columns v
 * (src rows of the strip: C x 128 bytes, in L2): one 32-bit gather over 16 rows c picks
 * src[c, v] and src[c, v + 1] together; widened, they are 16 floats of dst rows v and v + 1. */
int pc_transpose_bf16_f32(const uint16_t *src, float *dst, long C, long V, int threads) {
    const long strips = (V + 63) / 64;
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32((int)(V * 2)));
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long st = 0; st < strips; st++) {
        const long v0 = st * 64, v1 = v0 + 64 < V ? v0 + 64 : V;
        for (long c0 = 0; c0 < C; c0 += 16) {
            const __mmask16 m = lanes16(C - c0);
            long v = v0;
            for (; v + 1 < v1; v += 2) {
                const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, src + c0 * V + v, 1);
                _mm512_mask_storeu_ps(dst + v * C + c0, m, _mm512_castsi512_ps(_mm512_slli_epi32(g, 16)));
                _mm512_mask_storeu_ps(dst + (v + 1) * C + c0, m, _mm512_castsi512_ps(_mm512_and_si512(g, hi)));
            }
            for (; v < v1; v++)  /* an odd last column: its pair would read past the row */
                for (long c = c0; c < c0 + 16 && c < C; c++) dst[v * C + c] = bf16_to_f32(src[c * V + v]);
        }
    }
    return 0;
}

/* y = act(x W^T * scale + bias): see linear_impl. */
int pc_linear(const void *x, int x_bf16, const void *w, int kind, const float *scale,
              const void *bias, int bias_bf16, void *y, int y_bf16, int act,
              long M, long N, long K, int threads) {
    return linear_impl(x, x_bf16, w, kind, scale, bias, bias_bf16, y, y_bf16, act, M, N, K, threads);
}

#else /* no AVX-512: the Python side keeps PyTorch's products */

int pc_available(void) { return 0; }

int pc_linear(void) { return -3; }

int pc_block(void) { return -3; }

int pc_blocks(void) { return -3; }

int pc_cross_entropy_bf16(void) { return -3; }

int pc_attention_grad_bf16(void) { return -3; }

int pc_rotary_qkv(void) { return -3; }

int pc_transpose_bf16_f32(void) { return -3; }

#endif
