/* One decode step of a whole GPT-NeoX block, and of every block, in one call: LayerNorms,
 * the fused QKV product, rotary embedding, the key and value written into the cache,
 * attention over the cache, the output projection and the MLP with its activation fused,
 * the residuals (pc_block, pc_blocks). The products are decode.c's (pc_linear); the
 * attention of one step is here. See decode.c for the build and the vector layer.
 */
#include "kernels.h"
#include "common.h"

#if PC_ISA

/* ---- one decode step of attention ---------------------------------------------------
 *
 * For every row b and head h, at the row's position p = pos[b]: rotate q and k (GPT-NeoX's
 * "rotate half" over the first `rot` dims, cos/sin fp32 tables [*, rot]), write k and v
 * into the cache at p, attend over cache positions 0..p (softmax(q.k / sqrt(hs)) . v) and
 * write the head's output into y[b, h*hs:(h+1)*hs]. qkv [B, 3C] (fp32) is the fused
 * projection, interleaved per head (q, k, v of head 0, then head 1, ...); the cache
 * [B, H, max_len, hs] is in the model's dtype (fp32 or bf16); arithmetic is fp32. */

/* softmax(q . k_s * scale) over cache positions s < n of one (row, head), into scores[0 .. n).
 * VL positions at a time: their dot products accumulate side by side and are reduced
 * together (vreduce); the exponentials are vectorized. Positions past n in the last group
 * are read with an empty mask (no memory is touched for them). */
static inline void attend_scores(const float *q, const void *kc, int bf16, long row, long hs, long n,
                                 float scale, float *scores) {
    vf mxv = vset1(-INFINITY);
    for (long s0 = 0; s0 < n; s0 += VL) {
        const long cnt = n - s0 < VL ? n - s0 : VL;
        const vmask valid = vlanes(cnt);
        vf d[VL];
        for (int j = 0; j < VL; j++) d[j] = vzero();
        for (long i = 0; i < hs; i += VL) {
            const vmask mask = vlanes(hs - i);
            const vf qv = vloadm(q + i, mask);
            for (int j = 0; j < VL; j++)
                d[j] = vfmadd(qv, vloadx(kc, bf16, (row + s0 + j) * hs + i, j < cnt ? mask : vlanes(0)), d[j]);
        }
        const vf sc = vmul(vreduce(d), vset1(scale));
        vstorem(scores + s0, valid, sc);
        mxv = vmaxm(mxv, valid, sc);
    }
    const vf mx = vset1(vhmax(mxv));
    vf sum = vzero();
    for (long s0 = 0; s0 < n; s0 += VL) {
        const vmask valid = vlanes(n - s0);
        const vf e = vexp(vsub(vloadm(scores + s0, valid), mx));
        vstorem(scores + s0, valid, e);
        sum = vaddm(sum, valid, e);
    }
    const vf inv = vset1(1.0f / vhsum(sum));
    for (long s0 = 0; s0 < n; s0 += VL) {
        const vmask valid = vlanes(n - s0);
        vstorem(scores + s0, valid, vmul(vloadm(scores + s0, valid), inv));
    }
}

/* out[i0 .. i0 + VL NV) (within hs) = sum over s < n of scores[s] * v_s: NV accumulators of
 * VL dims in registers for the whole pass over the positions. */
static inline __attribute__((always_inline)) void attend_values(const void *vc, int bf16, long row, long hs, long i0,
                                                                long n, const float *scores, const int NV, float *out) {
    vf a[8];
    vmask mk[8];
    for (int c = 0; c < NV; c++) {
        a[c] = vzero();
        mk[c] = vlanes(hs - (i0 + VL * c));
    }
    for (long s = 0; s < n; s++) {
        const vf w = vset1(scores[s]);
        for (int c = 0; c < NV; c++)
            a[c] = vfmadd(w, vloadx(vc, bf16, (row + s) * hs + i0 + VL * c, mk[c]), a[c]);
    }
    for (int c = 0; c < NV; c++) vstorem(out + i0 + VL * c, mk[c], a[c]);
}

static int attend_impl(float *qkv, void *kc, void *vc, int bf16, const float *cos_t,
                       const float *sin_t, const long *pos, const long *crow, float *y, long B, long H,
                       long hs, long rot, long max_len, int threads) {
    if (hs > 512 || rot > hs || rot % 2 || max_len > 32768) return -1;
    for (long b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= max_len || (crow && crow[b] < 0)) return -1;
    const long C = H * hs;
    const float scale = 1.0f / sqrtf((float)hs);
    if (threads < 1) threads = 1;
    if (B * H < threads) threads = (int)(B * H);
    /* Two passes: every row's rotated key and its value go into the cache before any row
     * attends, so rows that share a cache row (crow: the positions of one sequence, as
     * speculative decoding verifies them) each see the keys of the positions before them. */
#pragma omp parallel num_threads(threads)
    {
        float scores[32768];
#pragma omp for schedule(static)
        for (long bh = 0; bh < B * H; bh++) {
            long b = bh / H, h = bh % H, p = pos[b];
            float *q = qkv + b * 3 * C + h * 3 * hs, *k = q + hs;
            const float *c = cos_t + p * rot, *sn = sin_t + p * rot;
            long half = rot / 2;
            for (long i = 0; i < half; i++) {  /* rotated in place: the buffer is the block's scratch */
                float q1 = q[i], q2 = q[i + half], k1 = k[i], k2 = k[i + half];
                q[i] = q1 * c[i] - q2 * sn[i];
                q[i + half] = q2 * c[i + half] + q1 * sn[i + half];
                k[i] = k1 * c[i] - k2 * sn[i];
                k[i + half] = k2 * c[i + half] + k1 * sn[i + half];
            }
            long row = ((crow ? crow[b] : b) * H + h) * max_len;
            for (long i = 0; i < hs; i++) {
                store(kc, bf16, (row + p) * hs + i, k[i]);
                store(vc, bf16, (row + p) * hs + i, k[hs + i]);
            }
        }
        /* the implicit barrier of `omp for`: all keys and values are written */
#pragma omp for schedule(static)
        for (long bh = 0; bh < B * H; bh++) {
            long b = bh / H, h = bh % H;
            const float *q = qkv + b * 3 * C + h * 3 * hs;
            long row = ((crow ? crow[b] : b) * H + h) * max_len;
            const long n = pos[b] + 1;
            attend_scores(q, kc, bf16, row, hs, n, scale, scores);
            float *out = y + b * C + h * hs;
            for (long i0 = 0; i0 < hs; i0 += 8 * VL) {
                if (hs - i0 <= 4 * VL) attend_values(vc, bf16, row, hs, i0, n, scores, 4, out);
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
             const long *crow, long H, long hs, long rot, long max_len, int threads) {
    if (B < 1 || B > 64 || H * hs != C) return -1;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(B * (3 * C + 3 * C + inter)));
    if (!buf) return -2;
    float *xs = buf, *h = xs + B * C, *qkv = h + B * C, *att = qkv + 3 * B * C, *up = att + B * C;
    int rc = 0;
    for (long i = 0; i < B * C; i++) xs[i] = elem(x, bf16, i);
    layer_norm(xs, h, ln[0], ln[1], bf16, eps, B, C);
    if ((rc = pc_linear(h, 0, lin[0], kinds[0], lin[1], lin[2], bf16, qkv, 0, 0, B, 3 * C, C, threads))) goto done;
    if ((rc = attend_impl(qkv, kc, vc, bf16, cos_t, sin_t, pos, crow, att, B, H, hs, rot, max_len, threads))) goto done;
    /* the attention output's projection goes to qkv's buffer, free again */
    if ((rc = pc_linear(att, 0, lin[3], kinds[1], lin[4], lin[5], bf16, qkv, 0, 0, B, C, C, threads))) goto done;
    if (!parallel_residual)
        for (long i = 0; i < B * C; i++) xs[i] += qkv[i];
    layer_norm(xs, h, ln[2], ln[3], bf16, eps, B, C);
    if ((rc = pc_linear(h, 0, lin[6], kinds[2], lin[7], lin[8], bf16, up, 0, act, B, inter, C, threads))) goto done;
    if ((rc = pc_linear(up, 0, lin[9], kinds[3], lin[10], lin[11], bf16, h, 0, 0, B, C, inter, threads))) goto done;
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
              const long *crow, long H, long hs, long rot, long max_len, int threads) {
    for (long l = 0; l < L; l++) {
        int rc = pc_block(x, bf16, B, C, inter, ln + 4 * l, eps, lin + 12 * l, kinds + 4 * l, act,
                          parallel_residual, kc[l], vc[l], cos_t, sin_t, pos, crow, H, hs, rot, max_len, threads);
        if (rc) return rc;
    }
    return 0;
}

#else /* no vector variant: the Python side keeps PyTorch's products */

int pc_block(void *x, int bf16, long B, long C, long inter, const void *const *ln, float eps,
             const void *const *lin, const int *kinds, int act, int parallel_residual,
             void *kc, void *vc, const float *cos_t, const float *sin_t, const long *pos,
             const long *crow, long H, long hs, long rot, long max_len, int threads) { return -3; }

int pc_blocks(void *x, int bf16, long B, long C, long inter, long L, const void *const *ln, float eps,
              const void *const *lin, const int *kinds, int act, int parallel_residual,
              void *const *kc, void *const *vc, const float *cos_t, const float *sin_t, const long *pos,
              const long *crow, long H, long hs, long rot, long max_len, int threads) { return -3; }

#endif
