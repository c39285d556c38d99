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
 * This file holds the decode kernels (pc_available, pc_linear, pc_block, pc_blocks);
 * train.c the training kernels; kernels.h declares every exported function, common.h the
 * helpers both use. Built by polycoder/kernels/__init__.py (decode.c and train.c into one
 * library) with the host's compiler and -march=native; the AVX-512 path is compiled only
 * where the CPU has it (pc_available() says whether).
 */
#include "kernels.h"
#include "common.h"

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };

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

#if PC_AVX512

int pc_available(void) { return 1; }

/* Weights are prefetched about this many bytes ahead of the rows being read (enough to keep
 * a core's stream of misses full; a quarter of it measured half as fast for int8:
 * docs/benchmarks/README.md). */
#define PF_BYTES 16384
static inline long pf_rows(long K, long elsize) {
    long r = PF_BYTES / (K * elsize);
    return r < 4 ? 4 : r;
}

/* ---- activations, 16 at a time ------------------------------------------------------
 * exp: exp16 (common.h). erf: Abramowitz and Stegun 7.1.26 (absolute error under 1.5e-7);
 * tanh(u) = 1 - 2 / (e^{2u} + 1). */

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
 * product measured slower on an AMD EPYC: docs/benchmarks/README.md.) */

/* widen_bf16 is in common.h: the training kernels use it too. */
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

/* y = act(x W^T * scale + bias): see linear_impl. */
int pc_linear(const void *x, int x_bf16, const void *w, int kind, const float *scale,
              const void *bias, int bias_bf16, void *y, int y_bf16, int act,
              long M, long N, long K, int threads) {
    return linear_impl(x, x_bf16, w, kind, scale, bias, bias_bf16, y, y_bf16, act, M, N, K, threads);
}

/* ---- one decode step of attention ---------------------------------------------------
 *
 * For every row b and head h, at the row's position p = pos[b]: rotate q and k (GPT-NeoX's
 * "rotate half" over the first `rot` dims, cos/sin fp32 tables [*, rot]), write k and v
 * into the cache at p, attend over cache positions 0..p (softmax(q.k / sqrt(hs)) . v) and
 * write the head's output into y[b, h*hs:(h+1)*hs]. qkv [B, 3C] (fp32) is the fused
 * projection, interleaved per head (q, k, v of head 0, then head 1, ...); the cache
 * [B, H, max_len, hs] is in the model's dtype (fp32 or bf16); arithmetic is fp32. */
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

#else /* no AVX-512: the Python side keeps PyTorch's products */

int pc_available(void) { return 0; }

int pc_linear(const void *x, int x_bf16, const void *w, int kind, const float *scale,
              const void *bias, int bias_bf16, void *y, int y_bf16, int act,
              long M, long N, long K, int threads) { return -3; }

int pc_block(void *x, int bf16, long B, long C, long inter, const void *const *ln, float eps,
             const void *const *lin, const int *kinds, int act, int parallel_residual,
             void *kc, void *vc, const float *cos_t, const float *sin_t, const long *pos,
             long H, long hs, long rot, long max_len, int threads) { return -3; }

int pc_blocks(void *x, int bf16, long B, long C, long inter, long L, const void *const *ln, float eps,
              const void *const *lin, const int *kinds, int act, int parallel_residual,
              void *const *kc, void *const *vc, const float *cos_t, const float *sin_t, const long *pos,
              long H, long hs, long rot, long max_len, int threads) { return -3; }

#endif
