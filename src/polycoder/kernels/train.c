/* Native kernels for training on the CPU (bf16 and fp32), one pass each:
 * - pc_cross_entropy_bf16: the fused output head's log-sum-exp, target logit and
 *   gradient over bf16 logits, in place;
 * - pc_attention_grad_bf16: a causal attention's probabilities and score gradients for
 *   the backward pass (AMX tiles where the CPU has them, else AVX512-BF16's vdpbf16ps);
 * - pc_rotary_qkv: the split of the fused query_key_value projection with the rotary
 *   rotation, and its backward;
 * - pc_transpose_bf16_f32: a bf16 matrix transposed and widened to fp32 (the output
 *   head's weight gradient).
 * The decode kernels are in decode.c and decode_block.c; kernels.h declares every exported function,
 * common.h the helpers both files use, the vector layer among them: cross-entropy, rotary
 * and transpose are written against it and run on every variant (AVX-512, AVX2 + FMA,
 * ARM64 NEON; the transpose's gather is one load a lane on NEON); the attention backward
 * needs AVX512-BF16 and returns -4 without it (on AVX2 and NEON too: a NEON version would
 * be a new kernel, bf16 products by widening or BFMMLA, not a port), so that training
 * keeps PyTorch's SDPA backward there. Threads come from PyTorch's OpenMP
 * runtime, as for decode.c. Without a vector variant every function here returns -3.
 */
#include "kernels.h"
#include "common.h"

#if PC_ISA

/* ---- cross-entropy over bf16 logits, in place (training's fused output head) ----------
 * For each row r of logits [R, V] (bf16), with target t[r] and row weight w[r] (1/n for
 * a counted row, 0 for an ignored one): lse[r] = log sum_v exp(z[r, v]) and picked[r] =
 * z[r, t[r]], in fp32; and when grad is set, z is overwritten with the gradient of the
 * weighted loss sum, w[r] * (softmax(z)[v] - [v == t[r]]), rounded to bf16 (nearest
 * even). Three passes over a row (max, sum of exponentials, gradient), the row in L2
 * after the first; rows split across threads. Replaces the fp32 round trip of torch's
 * chunked softmax (upcast, exp, write-back); benchmarks/train_kernels.py times the two, and
 * tests/test_kernels.py checks the kernel against fp32 softmax. */
int pc_cross_entropy_bf16(uint16_t *z, long R, long V, const int64_t *target, const float *w,
                          float *lse_out, float *picked_out, int grad, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < R; r++) {
        uint16_t *row = z + r * V;
        vf mx = vset1(-INFINITY);
        for (long v = 0; v < V; v += VL) {
            vmask m = vlanes(V - v);
            mx = vmaxm(mx, m, vwiden_bf16m(row + v, m));
        }
        float zmax = vhmax(mx);
        vf zmaxv = vset1(zmax), sum = vzero();
        for (long v = 0; v < V; v += VL) {
            vmask m = vlanes(V - v);
            sum = vaddm(sum, m, vexp(vsub(vwiden_bf16m(row + v, m), zmaxv)));
        }
        float lse = zmax + logf(vhsum(sum));
        long t = target[r];
        lse_out[r] = lse;
        picked_out[r] = bf16_to_f32(row[t]);
        if (!grad) continue;
        /* w * exp(z - lse), with w folded into the exponent where it is positive. */
        float wr = w[r];
        if (wr > 0.0f) {
            vf shift = vset1(lse - logf(wr));
            for (long v = 0; v < V; v += VL) {
                vmask m = vlanes(V - v);
                vstore_bf16m(row + v, m, vexp(vsub(vwiden_bf16m(row + v, m), shift)));
            }
            /* the target's entry: w * softmax - w, from the unrounded softmax */
            row[t] = f32_to_bf16(wr * expf(picked_out[r] - lse) - wr);
        } else {
            memset(row, 0, (size_t)V * sizeof(uint16_t));
        }
    }
    return 0;
}

#if PC_ISA == 1 && defined(__AVX512BF16__)
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
static inline __m256i round_bf16x16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

static inline void grad_strip(const float *s, const float *dp, long r, long c0, long T, float l, float d,
                              float scale, uint16_t *p_row, uint16_t *ds_row) {
    if (c0 >= T) return;
    const long vis = r + 1 - c0, cols = T - c0;
    const __mmask16 m = vlanes(vis);
    const __mmask16 st = vlanes(cols);
    const __m512 vs = _mm512_set1_ps(scale);
    const __m512 pv = _mm512_maskz_mov_ps(m, vexp(_mm512_fmsub_ps(_mm512_loadu_ps(s), vs, _mm512_set1_ps(l))));
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
        __mmask16 m = vlanes(D - e);
        acc = _mm512_fmadd_ps(vwiden_bf16m(a + e, m), vwiden_bf16m(b + e, m), acc);
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
int pc_attention_grad_bf16(const uint16_t *q, const uint16_t *dout, const uint16_t *o, const uint16_t *k,
                           const uint16_t *v, uint32_t *kp, uint32_t *vp, float *dsum, long n, long T, long Tp,
                           long D, long Dp, const float *lse, float scale, uint16_t *p, uint16_t *ds, int use_amx,
                           int threads) { return -4; }
#endif

/* ---- training's q, k, v: split of the fused projection and rotary, one pass -----------
 * Forward: x [B, T, H, 3, hs] (the interleaved query_key_value output) -> q, k, v, each
 * [B, H, T, hs], q and k rotated over their first `rot` dims in GPT-NeoX's "rotate half"
 * layout with cos/sin [T, rot] (fp32; the arithmetic is fp32, one rounding at the end, as
 * transformers' fp32 rotation followed by SDPA's cast). Backward (grad set): dq, dk, dv
 * -> dx, the transposed rotation. x and the outputs are fp32 or bf16 independently.
 * Replaces split + rotate + cat + transposed copies and their backward (timed against them
 * by benchmarks/train_kernels.py). */
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
                for (long i = 0; i < half; i += VL) {
                    const vmask m = vlanes(half - i);
                    const vf c1 = vloadm(c + i, m), c2 = vloadm(c + half + i, m);
                    const vf s1 = vloadm(sn + i, m), s2 = vloadm(sn + half + i, m);
                    if (!grad) {  /* out1 = x1 cos1 - x2 sin1, out2 = x2 cos2 + x1 sin2 */
                        const vf a = vloadx(x, x_bf16, xp + i, m), d = vloadx(x, x_bf16, xp + half + i, m);
                        vstorex(o, o_bf16, oo + i, vfmsub(a, c1, vmul(d, s1)), m);
                        vstorex(o, o_bf16, oo + half + i, vfmadd(d, c2, vmul(a, s2)), m);
                    } else {      /* dx1 = d1 cos1 + d2 sin2, dx2 = d2 cos2 - d1 sin1 */
                        const vf a = vloadx(o, o_bf16, oo + i, m), d = vloadx(o, o_bf16, oo + half + i, m);
                        vstorex(x, x_bf16, xp + i, vfmadd(a, c1, vmul(d, s2)), m);
                        vstorex(x, x_bf16, xp + half + i, vfmsub(d, c2, vmul(a, s1)), m);
                    }
                }
                i0 = rot;
            }
            for (long i = i0; i < hs; i += VL) {
                const vmask m = vlanes(hs - i);
                if (!grad) vstorex(o, o_bf16, oo + i, vloadx(x, x_bf16, xp + i, m), m);
                else vstorex(x, x_bf16, xp + i, vloadx(o, o_bf16, oo + i, m), m);
            }
        }
    }
    return 0;
}

/* ---- dst[V, C] (fp32) = src[C, V] (bf16) transposed ------------------------------------
 * The output head's weight gradient is fastest as h^T g ([C, V], a plain product) and is
 * needed as the fp32 [V, C] gradient of the fp32 master weight. Per strip of 64 columns v
 * (src rows of the strip: C x 128 bytes, in L2): one 32-bit gather over VL rows c picks
 * src[c, v] and src[c, v + 1] together; widened, they are VL floats of dst rows v and v + 1. */
#if PC_ISA == 1
static inline vi gather_pairs(const uint16_t *p, vi rows, vmask m) {
    return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, p, 1);
}
static inline vf low_half(vi g) { return _mm512_castsi512_ps(_mm512_slli_epi32(g, 16)); }
static inline vf high_half(vi g) { return _mm512_castsi512_ps(_mm512_and_si512(g, _mm512_set1_epi32((int)0xFFFF0000u))); }
static inline vi row_offsets(long V) {
    return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int)(V * 2)));
}
#elif PC_ISA == 2
static inline vi gather_pairs(const uint16_t *p, vi rows, vmask m) {
    return _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)p, rows, lane_bits(m), 1);
}
static inline vf low_half(vi g) { return _mm256_castsi256_ps(_mm256_slli_epi32(g, 16)); }
static inline vf high_half(vi g) { return _mm256_castsi256_ps(_mm256_and_si256(g, _mm256_set1_epi32((int)0xFFFF0000u))); }
static inline vi row_offsets(long V) {
    return _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32((int)(V * 2)));
}
#else /* NEON has no gather: the pairs are read one by one (memcpy: a pair need not be 4-byte aligned) */
static inline vi gather_pairs(const uint16_t *p, vi rows, vmask m) {
    int32_t off[8];
    uint32_t g[8] = {0};
    vst1q_s32(off, rows.a);
    vst1q_s32(off + 4, rows.b);
    for (long i = 0; i < m; i++) memcpy(g + i, (const char *)p + off[i], 4);
    vi r = {vreinterpretq_s32_u32(vld1q_u32(g)), vreinterpretq_s32_u32(vld1q_u32(g + 4))};
    return r;
}
static inline vf low_half(vi g) {
    return vpair(vreinterpretq_f32_s32(vshlq_n_s32(g.a, 16)), vreinterpretq_f32_s32(vshlq_n_s32(g.b, 16)));
}
static inline vf high_half(vi g) {
    const int32x4_t top = vdupq_n_s32((int32_t)0xFFFF0000u);
    return vpair(vreinterpretq_f32_s32(vandq_s32(g.a, top)), vreinterpretq_f32_s32(vandq_s32(g.b, top)));
}
static inline vi row_offsets(long V) {
    const int32x4_t idx = {0, 1, 2, 3}, step = vdupq_n_s32((int32_t)(V * 2));
    vi r = {vmulq_s32(idx, step), vmulq_s32(vaddq_s32(idx, vdupq_n_s32(4)), step)};
    return r;
}
#endif

int pc_transpose_bf16_f32(const uint16_t *src, float *dst, long C, long V, int threads) {
    const long strips = (V + 63) / 64;
    const vi rows = row_offsets(V);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long st = 0; st < strips; st++) {
        const long v0 = st * 64, v1 = v0 + 64 < V ? v0 + 64 : V;
        for (long c0 = 0; c0 < C; c0 += VL) {
            const vmask m = vlanes(C - c0);
            long v = v0;
            for (; v + 1 < v1; v += 2) {
                const vi g = gather_pairs(src + c0 * V + v, rows, m);
                vstorem(dst + v * C + c0, m, low_half(g));
                vstorem(dst + (v + 1) * C + c0, m, high_half(g));
            }
            for (; v < v1; v++)  /* an odd last column: its pair would read past the row */
                for (long c = c0; c < c0 + VL && c < C; c++) dst[v * C + c] = bf16_to_f32(src[c * V + v]);
        }
    }
    return 0;
}

#else /* no vector variant: the Python side keeps PyTorch's operations */

int pc_cross_entropy_bf16(uint16_t *z, long R, long V, const int64_t *target, const float *w,
                          float *lse_out, float *picked_out, int grad, int threads) { return -3; }

int pc_attention_grad_bf16(const uint16_t *q, const uint16_t *dout, const uint16_t *o, const uint16_t *k,
                           const uint16_t *v, uint32_t *kp, uint32_t *vp, float *dsum, long n, long T, long Tp,
                           long D, long Dp, const float *lse, float scale, uint16_t *p, uint16_t *ds, int use_amx,
                           int threads) { return -3; }

int pc_rotary_qkv(void *x, int x_bf16, void *q, void *k, void *v, int o_bf16, const float *cos_t, const float *sin_t,
                  long B, long T, long H, long hs, long rot, int grad, int threads) { return -3; }

int pc_transpose_bf16_f32(const uint16_t *src, float *dst, long C, long V, int threads) { return -3; }

#endif
