/* Weight-streaming products for decoding: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]).
 *
 * A decode step multiplies a few activation rows (M = 1..8) by every weight matrix of the
 * model once: the time goes into reading the weights, so the kernel's one job is to stream
 * W from memory at full bandwidth and do the arithmetic while it arrives. W is read row by
 * row in its natural [out, in] layout, a few rows at a time, by every thread on its own
 * contiguous range of output rows; the activation rows stay in L1.
 *
 * Weight kinds: fp32; bf16 (widened to fp32 by a 16-bit shift: exact); int8 with one fp32
 * scale per output row (weight-only quantization: y = scale[n] * sum_k x * q). Activations
 * arrive as fp32 or bf16 and are widened to fp32 once per call, products and sums are
 * fp32; except for int8 weights, where each activation row is scaled to int16 (+-32767,
 * one scale a row: 15 significant bits, finer than bf16's 8; +-32639 for ARM's sdot:
 * common.h) and multiplied exactly in integers (VNNI's vpdpwssd where the CPU has it, else
 * vpmaddwd; sdot or smlal on ARM64), twice as fast as
 * widening the weights to fp32. The output is written as fp32 or bf16 (round to nearest
 * even). Weights are prefetched PF_BYTES ahead where that measured faster (see pf_rows).
 *
 * Threads come from the OpenMP runtime that PyTorch itself loads (libgomp.so.1), so our
 * parallel regions reuse PyTorch's worker threads instead of competing with them.
 *
 * This file holds the decode products (pc_available, pc_linear); decode_block.c a whole
 * block's decode step on them (attention over the cache, pc_block, pc_blocks); train.c the
 * training kernels; kernels.h declares every exported function, common.h the helpers they
 * share, among them the vector layer (AVX-512, AVX2 + FMA or ARM64 NEON, VL lanes) these
 * kernels are written against. Built by polycoder/kernels/__init__.py (the three files into
 * one library) with the host's compiler and -march=native (or x86-64-v3; -mcpu=native on
 * ARM64); without a vector variant pc_available() is 0 and the functions are stubs.
 */
#include "kernels.h"
#include "common.h"

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };

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

#if PC_ISA

int pc_available(void) { return PC_ISA; }

/* Weights are prefetched about this many bytes ahead of the row being read (at least the next
 * row), one prefetch every 16 weights (32 int8): a cache line of fp32, half of one otherwise,
 * whatever the vector width. From PC_PREFETCH_FROM_ROWS activation rows a block: the build
 * sets 1 on Intel CPUs, where prefetching measured 1.0-2.4x faster at 1 and 2 rows (a Xeon);
 * elsewhere 3, as an AMD EPYC (Zen 4) measured up to 15 % slower at 1 and 2 rows and 1.3-2x
 * faster at 8 (docs/benchmarks/README.md). */
#define PF_BYTES 16384
#ifndef PC_PREFETCH_FROM_ROWS
#define PC_PREFETCH_FROM_ROWS 3
#endif
static inline long pf_rows(long K, long elsize) {
    long r = PF_BYTES / (K * elsize);
    return r < 1 ? 1 : r;
}

/* ---- activations, VL at a time ------------------------------------------------------
 * exp: vexp (common.h). erf: Abramowitz and Stegun 7.1.26 (absolute error under 1.5e-7);
 * tanh(u) = 1 - 2 / (e^{2u} + 1). */

static inline vf verf(vf x) {
    vf a = vabs(x);
    vf t = vdiv(vset1(1.0f), vfmadd(a, vset1(0.3275911f), vset1(1.0f)));
    vf p = vset1(1.061405429f);
    p = vfmadd(p, t, vset1(-1.453152027f));
    p = vfmadd(p, t, vset1(1.421413741f));
    p = vfmadd(p, t, vset1(-0.284496736f));
    p = vfmadd(p, t, vset1(0.254829592f));
    p = vmul(p, t);
    vf e = vfnmadd(p, vexp(vmul(vsub(vzero(), a), a)), vset1(1.0f));
    return vcopysign(e, x);  /* erf(-x) = -erf(x) */
}

static inline vf vact(vf v, int act) {
    const vf half = vset1(0.5f), one = vset1(1.0f);
    if (act == 1) return vmul(vmul(half, v), vadd(one, verf(vmul(v, vset1(0.70710678118654752f)))));
    if (act == 2) {
        vf u = vmul(vset1(0.79788456080286536f), vfmadd(vmul(vset1(0.044715f), v), vmul(v, v), v));
        vf th = vsub(one, vdiv(vset1(2.0f), vadd(vexp(vadd(u, u)), one)));
        return vmul(vmul(half, v), vadd(one, th));
    }
    return v;
}

/* The activation applied to n fp32 values in place, VL at a time. */
static void activate_all(float *v, long n, int act) {
    for (long i = 0; i < n; i += VL) {
        vmask mask = vlanes(n - i);
        vstorem(v + i, mask, vact(vloadm(v + i, mask), act));
    }
}

/* out[i] = the lane sum of acc[i], for n accumulators; exactly VL of them are reduced
 * together (vreduce: a transpose-and-add tree). */
static inline __attribute__((always_inline)) void reduce_out(const vf *acc, int n, float *out) {
    if (n == VL) vstore(out, vreduce(acc));
    else
        for (int i = 0; i < n; i++) out[i] = vhsum(acc[i]);
}

/* A block is one weight row n against MB activation rows (m0 .. m0+MB-1): MB accumulators
 * in registers, each weight vector loaded (and widened) once for all MB rows, so that 8 rows
 * take one pass over the weights, streamed a row at a time in address order. Blocks of 2 or 4
 * weight rows read side by side (the activation loads shared among them) measured up to 2.5x
 * slower on an AMD EPYC (Zen 4), on the AVX-512 and AVX2 variants alike, for fp32, bf16 and
 * int8, at 1 to 4 activation rows; at 8 they were even (docs/benchmarks/README.md). */

/* Sums kept a row, each over every U-th vector of columns, added at the end. One chain of
 * FMAs (or VNNI dot products) a row waits on the instruction's latency (4-5 cycles) where 1
 * or 2 activation rows leave the loop nothing else to do. */
#define BANKS(MB) ((MB) == 1 ? 4 : (MB) == 2 ? 2 : 1)

/* ---- fp32 and bf16 weights: 16 a step (one prefetch a row), FMA against fp32
 * activations, the columns past the last full step under a mask. bf16 widens by a 16-bit
 * shift (exact). (AVX512_BF16's pairwise dot product measured slower on an AMD EPYC:
 * docs/benchmarks/README.md.) ---- */

/* The FMAs of one vector of columns at k: the weight vector (the row pf rows ahead
 * prefetched if PF) against MB activation rows. */
#define FMA_STEP(LOAD, XLOAD, k, PF, B, ...)                                                       \
    do {                                                                                           \
        if (PF && MB >= PC_PREFETCH_FROM_ROWS) vprefetch(w + (n + pf) * K + (k));                  \
        const vf wv = LOAD(w + n * K + (k), ##__VA_ARGS__);                                        \
        for (int m = 0; m < MB; m++)                                                               \
            acc[(B) * MB + m] = vfmadd(wv, XLOAD(x + (m0 + m) * K + (k), ##__VA_ARGS__), acc[(B) * MB + m]); \
    } while (0)

#define DEFINE_FLOAT_BLOCK(NAME, WT, LOAD, LOADM)                                                  \
    static inline __attribute__((always_inline)) void NAME(                                        \
        const float *x, const WT *w, long n, long m0, const int MB, long K, long k0, long k1, float *out) { \
        const long pf = pf_rows(K, sizeof(WT));                                                    \
        const int U = BANKS(MB);                                                                   \
        vf acc[8];                                                                                 \
        for (int i = 0; i < U * MB; i++) acc[i] = vzero();                                         \
        long k = k0;                                                                               \
        for (; k + 16 * U <= k1; k += 16 * U)                                                      \
            for (int j = 0; j < 16 * U / VL; j++) FMA_STEP(LOAD, vload, k + j * VL, j * VL % 16 == 0, j % U); \
        for (; k + 16 <= k1; k += 16)                                                              \
            for (int j = 0; j < 16 / VL; j++) FMA_STEP(LOAD, vload, k + j * VL, j == 0, 0);       \
        /* the last < 16 columns: a whole vector where VL is 8 and one is left, then masked   \
         * (a branch, not a loop: with a loop here GCC stopped keeping the sums in registers) */ \
        if (VL == 8 && k + 8 <= k1) {                                                              \
            FMA_STEP(LOAD, vload, k, 0, 0);                                                        \
            k += 8;                                                                                \
        }                                                                                          \
        if (k < k1) {                                                                              \
            const vmask mask = vlanes(k1 - k);                                                     \
            FMA_STEP(LOADM, vloadm, k, 0, 0, mask);                                                \
        }                                                                                          \
        for (int u = 1; u < U; u++)                                                                \
            for (int m = 0; m < MB; m++) acc[m] = vadd(acc[m], acc[u * MB + m]);                   \
        reduce_out(acc, MB, out);                                                                  \
    }

DEFINE_FLOAT_BLOCK(block_f32, float, vload, vloadm)
DEFINE_FLOAT_BLOCK(block_bf16, uint16_t, vwiden_bf16, vwiden_bf16m)

/* ---- int8 weights: 32 a step, widened to int16 and multiplied with int16 activations
 * (each row scaled to +-32767 once a call) pairwise into int32 (vi_dot, common.h); every
 * 256 columns the int32 sums move into fp32 so they can never overflow (a lane adds 32
 * products of at most 32767 * 127 a chunk, under 2^31). ---- */

#define I8_CHUNK 256
/* The integer products of one vector pair of columns at k (2 VL of them, lanes of mask). */
#define DOT_STEP(k, mask, PF, B)                                                                   \
    do {                                                                                           \
        if (PF && MB >= PC_PREFETCH_FROM_ROWS) vprefetch(w + (n + pf) * K + (k));                  \
        const vi wv = vi_w8(w + n * K + (k), mask);                                                \
        for (int m = 0; m < MB; m++)                                                               \
            acc[(B) * MB + m] = vi_dot(acc[(B) * MB + m], wv, vi_x16(x + (m0 + m) * K + (k), mask)); \
    } while (0)

static inline __attribute__((always_inline)) void block_i8(
    const int16_t *x, const int8_t *w, long n, long m0, const int MB, long K, long k0, long k1, float *out) {
    const long pf = pf_rows(K, 1);
    const int U = BANKS(MB);
    vf facc[8];
    for (int i = 0; i < MB; i++) facc[i] = vzero();
    for (long c = k0; c < k1; c += I8_CHUNK) {
        const long end = c + I8_CHUNK < k1 ? c + I8_CHUNK : k1;
        vi acc[8];
        for (int i = 0; i < U * MB; i++) acc[i] = vi_zero();
        long k = c;
        for (; k + 32 * U <= end; k += 32 * U)  /* vi_lanes(2 VL): all */
            for (int j = 0; j < 16 * U / VL; j++) DOT_STEP(k + j * 2 * VL, vi_lanes(2 * VL), j * VL % 16 == 0, j % U);
#if VL == 16
        /* the rest as one masked loop (masked loads are free here; a separate tail measured slower) */
        for (; k < end; k += 32) DOT_STEP(k, vi_lanes(end - k), 1, 0);
#else
        /* whole vectors, then the tail through vi_w8's zero-padded copy */
        for (; k + 32 <= end; k += 32) {
            DOT_STEP(k, 16, 1, 0);
            DOT_STEP(k + 16, 16, 0, 0);
        }
        if (k + 16 <= end) {  /* branches, not a loop: as for FMA_STEP's tail */
            DOT_STEP(k, 16, 0, 0);
            k += 16;
        }
        if (k < end) DOT_STEP(k, vi_lanes(end - k), 0, 0);
#endif
        for (int i = 0; i < U * MB; i++) facc[i % MB] = vadd(facc[i % MB], vi_float(acc[i]));
    }
    reduce_out(facc, MB, out);
}

/* Rows [lo, hi) of the output for every activation row, a weight row at a time (MB
 * activation rows a block, at most 8). The columns are taken in chunks that keep the MB
 * activation rows in L1 (24 KB): with 8 fp32 rows of 3072 columns (96 KB) every weight load
 * would otherwise wait on L2 for the activations; partial sums of a chunk collect in `part`.
 * A fused activation runs vectorized over a thread's finished fp32 outputs (scalar into
 * bf16 outputs). */
#define BLOCK_CASE(BLOCK, MB) BLOCK(x, w, n, m0, MB, K, k0, k1, out); break
#define DEFINE_RANGE(NAME, BLOCK, XT, WT, KALIGN)                                                  \
    static int NAME(const XT *x, const WT *w, const float *scale, const float *xscale,            \
                    const void *bias, int bias_bf16, void *y, int y_bf16, int act,                \
                    long M, long N, long K, long lo, long hi) {                                   \
        float out[8], *part = NULL;                                                                \
        const int act_now = y_bf16 ? act : 0;                                                      \
        for (long m0 = 0; m0 < M; m0 += 8) {                                                       \
            const int MB = (int)(M - m0 < 8 ? M - m0 : 8);                                         \
            long KC = (24576 / ((long)sizeof(XT) * MB)) / KALIGN * KALIGN;                         \
            if (KC < KALIGN) KC = KALIGN;                                                          \
            if (KC < K && !part && !(part = (float *)malloc(sizeof(float) * 8 * (size_t)(hi - lo)))) \
                return -2;                                                                         \
            for (long k0 = 0; k0 < K; k0 += KC) {                                                  \
                const long k1 = k0 + KC < K ? k0 + KC : K;                                         \
                const int first = k0 == 0, last = k1 == K;                                         \
                for (long n = lo; n < hi; n++) {                                                   \
                    switch (MB) {                                                                  \
                    case 1: BLOCK_CASE(BLOCK, 1);                                                  \
                    case 2: BLOCK_CASE(BLOCK, 2);                                                  \
                    case 3: BLOCK_CASE(BLOCK, 3);                                                  \
                    case 4: BLOCK_CASE(BLOCK, 4);                                                  \
                    case 5: BLOCK_CASE(BLOCK, 5);                                                  \
                    case 6: BLOCK_CASE(BLOCK, 6);                                                  \
                    case 7: BLOCK_CASE(BLOCK, 7);                                                  \
                    default: BLOCK_CASE(BLOCK, 8);                                                 \
                    }                                                                              \
                    for (int m = 0; m < MB; m++) {                                                 \
                        float v = out[m];                                                          \
                        if (!(first && last)) {                                                    \
                            float *p = part + (n - lo) * 8 + m;                                    \
                            if (!first) v += *p;                                                   \
                            if (!last) { *p = v; continue; }                                       \
                        }                                                                          \
                        const float s = scale ? scale[n] : 1.0f, b = bias_at(bias, bias_bf16, n);  \
                        store(y, y_bf16, (m0 + m) * N + n,                                         \
                              activate(v * s * (xscale ? xscale[m0 + m] : 1.0f) + b, act_now));    \
                    }                                                                              \
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
DEFINE_RANGE(range_i8, block_i8, int16_t, int8_t, I8_CHUNK)

/* y = act(x W^T * scale + bias). x: [M, K] fp32 or bf16; W: [N, K] of `kind`; scale:
 * [N] fp32 or NULL; bias: [N] fp32/bf16 or NULL; y: [M, N] fp32 or bf16; all contiguous.
 * Returns 0, or -1 for a bad argument, -2 when out of memory. */
static int linear_impl(const void *x, int x_bf16, const void *w, int kind, const float *scale,
                       const void *bias, int bias_bf16, void *y, int y_bf16, int act,
                       long M, long N, long K, int threads) {
    if (act < 0 || act > 2) return -1;
    if (kind < W_F32 || kind > W_I8 || N < 1 || M < 1 || K < 1) return -1;
    /* The activations in the form the weight kind's inner loop wants, converted once. */
    void *buf = NULL;
    const void *xa = x;
    float xscale[64];
    const float *xs = NULL;
    if (M > 64) return -1;
    if (kind == W_I8) {
        int16_t *q = (int16_t *)malloc(sizeof(int16_t) * (size_t)(M * K));
        if (!q) return -2;
        for (long m = 0; m < M; m++) {
            float amax = 0.0f;
            for (long k = 0; k < K; k++) {
                float v = elem(x, x_bf16, m * K + k);
                amax = v > amax ? v : (-v > amax ? -v : amax);
            }
            float s = amax > 0.0f ? amax / (float)VI_XMAX : 1.0f, inv = 1.0f / s;
            for (long k = 0; k < K; k++) {
                float v = elem(x, x_bf16, m * K + k) * inv;
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

#else /* no vector variant: the Python side keeps PyTorch's products */

int pc_available(void) { return 0; }

int pc_linear(const void *x, int x_bf16, const void *w, int kind, const float *scale,
              const void *bias, int bias_bf16, void *y, int y_bf16, int act,
              long M, long N, long K, int threads) { return -3; }

#endif
