/* The native kernels (src/polycoder/kernels) against a scalar reference in fp64, for any
 * variant the compiler's target selects: AVX-512, AVX2 + FMA, or ARM64 NEON (run under
 * qemu-aarch64 where the machine is not ARM). tests/test_kernels_arm64.py builds it with
 *   cc -O2 -march=... -fopenmp -I src/polycoder/kernels tests/kernels_check.c \
 *      src/polycoder/kernels/decode.c src/polycoder/kernels/decode_block.c src/polycoder/kernels/train.c -lm
 * for each target it can run, and runs it. One line a check ("ok" or "FAIL", the worst
 * error as a fraction of its tolerance); the exit status is the number of failures (0: all
 * passed; at most 125), a crash's where a load runs past a buffer (see below). tests/test_kernels.py holds the x86 variants to PyTorch; this program is what
 * checks a variant no machine here executes natively.
 *
 * Tolerances follow from the arithmetic, not from one CPU's rounding (u = 2^-24, fp32's
 * unit roundoff; 2^-8, bf16's): an fp32 sum of K products in any order is within
 * (K + 8) u sum|x w| of the exact one; int8 products add the activations' rounding to int16
 * (half a step of amax / VI_XMAX each); bf16 outputs add their final rounding; the vector
 * exp is within EXP_ERR relative, the vector GELU within GELU_ERR of max(1, |y|) (as
 * tests/test_kernels.py). Through a whole block (pc_block) the reference carries a bound
 * beside each value, propagated op by op (ref_linear, ref_norm, the attention in
 * check_block): worst-case bounds, so there the kernels' errors sit at 1e-4 .. 1e-2 of them
 * and drift of a percent would pass; what they catch is a structural error (a lane, a mask,
 * a position, a rotation), which moves values by tens of percent.
 * Inputs are seeded pseudo-random; every input buffer of pc_linear and every cache ends
 * at an inaccessible page, so a load past a loop's tail faults instead of passing.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels.h"
#include "common.h"

#ifndef PC_I8_DOT
#define PC_I8_DOT "none"
#endif
#ifndef VI_XMAX
#define VI_XMAX 32767
#endif

static const double U = 1.0 / 16777216.0, UB = 1.0 / 256.0;
static const double EXP_ERR = 4e-7;   /* vexp: about 2e-7 relative (common.h), doubled */
static const double GELU_ERR = 2e-6;  /* the vector GELU, relative to max(1, |y|) */
static int checks, failures;

/* ---- seeded inputs ------------------------------------------------------------------- */
static uint64_t seed = 0x9e3779b97f4a7c15ull;
static double urand(void) {  /* xorshift64*, in [0, 1) */
    seed ^= seed >> 12, seed ^= seed << 25, seed ^= seed >> 27;
    return (double)((seed * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}
static float frand(double lo, double hi) { return (float)(lo + (hi - lo) * urand()); }

/* A buffer whose last byte is followed by a PROT_NONE page (freed by release_all). */
static void *maps[256];
static size_t map_sizes[256];
static int nmaps;
static void *guarded(size_t bytes) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), body = (bytes + page - 1) / page * page;
    char *base = mmap(NULL, body + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || mprotect(base + body, page, PROT_NONE) || nmaps == 256) {
        fprintf(stderr, "kernels_check: out of memory\n");
        exit(100);
    }
    maps[nmaps] = base, map_sizes[nmaps++] = body + page;
    return base + body - bytes;
}
static void release_all(void) {
    while (nmaps) munmap(maps[nmaps - 1], map_sizes[nmaps - 1]), nmaps--;
}

/* Values of a buffer of fp32 (bf16 0) or bf16 (1), as doubles. */
static double at(const void *p, int bf16, long i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
/* n values uniform in [lo, hi) into a new guarded buffer of fp32 or bf16 (rounded). */
static void *values(long n, int bf16, double lo, double hi) {
    void *p = guarded((size_t)n * (bf16 ? 2 : 4));
    for (long i = 0; i < n; i++) {
        float v = frand(lo, hi);
        if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
        else ((float *)p)[i] = v;
    }
    return p;
}

/* ---- bookkeeping: |got - want| <= tol for every element ------------------------------ */
struct tally { double worst; long bad, n; };
static void see(struct tally *t, double got, double want, double tol) {
    const double err = fabs(got - want);
    t->n++;
    if (!(err <= tol)) t->bad++;  /* NaN fails */
    if (tol > 0 && err / tol > t->worst) t->worst = err / tol;
    if (tol == 0 && err > 0) t->worst = INFINITY;
}
static void report(const struct tally *t, const char *what) {
    checks++;
    if (t->bad || t->n == 0) failures++;
    printf("%s %s: %ld values, worst error %.3g of tolerance%s\n", t->bad || !t->n ? "FAIL" : "ok  ", what, t->n,
           t->worst, t->bad ? " (some over it)" : "");
}
static void expect_rc(int rc, int want, const char *what) {
    checks++;
    if (rc != want) failures++;
    printf("%s %s: returned %d, expected %d\n", rc == want ? "ok  " : "FAIL", what, rc, want);
}

static double gelu(double v, int act) {
    if (act == 1) return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
    if (act == 2) return 0.5 * v * (1.0 + tanh(sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    return v;
}
/* An error e of GELU's input moves its output by at most 1.13 e (its largest slope). */
static double gelu_tol(double e, double y, int act) { return act ? 1.13 * e + GELU_ERR * fmax(1.0, fabs(y)) : e; }

/* ---- weights of a product, as the kernels take them and as the reference reads them --- */
struct lin {
    int kind;               /* 0 fp32, 1 bf16, 2 int8 */
    long N, K;
    void *w, *bias;         /* the kernel's; bias in fp32 or bf16 (bias_bf16), or NULL */
    int bias_bf16;
    float *scale;           /* int8 (or any kind, optionally); else NULL */
    double *wd, *bd;        /* the reference's: effective weight (scale applied), bias (or 0) */
};
static struct lin make_lin(int kind, long N, long K, int bias_kind, int with_scale) {
    struct lin l = {kind, N, K, NULL, NULL, bias_kind == 2, NULL, NULL, NULL};
    const double a = sqrt(3.0 / (double)K);  /* outputs of about unit size for unit inputs */
    l.wd = malloc(sizeof(double) * (size_t)(N * K));
    l.bd = calloc((size_t)N, sizeof(double));
    if (kind == 2 || with_scale) {
        l.scale = guarded(sizeof(float) * (size_t)N);
        for (long n = 0; n < N; n++) l.scale[n] = kind == 2 ? frand(0.5, 1.5) * (float)(a / 127) : frand(0.5, 2.0);
    }
    if (kind == 2) {
        int8_t *q = guarded((size_t)(N * K));
        for (long i = 0; i < N * K; i++) q[i] = (int8_t)(lround(urand() * 254.0) - 127);
        for (long i = 0; i < N * K; i++) l.wd[i] = q[i] * (double)l.scale[i / K];
        l.w = q;
    } else {
        l.w = values(N * K, kind == 1, -a, a);
        for (long i = 0; i < N * K; i++) l.wd[i] = at(l.w, kind == 1, i) * (l.scale ? (double)l.scale[i / K] : 1.0);
    }
    if (bias_kind) {
        l.bias = values(N, bias_kind == 2, -0.5, 0.5);
        for (long n = 0; n < N; n++) l.bd[n] = at(l.bias, bias_kind == 2, n);
    }
    return l;
}
static void free_lin(struct lin *l) { free(l->wd), free(l->bd); }

/* y = x W^T + b over M rows, and a bound ey on the kernel's error given ex on its input:
 * propagated (sum |w| ex), the fp32 sum's (K + 8) u sum|x w|, the scaling and bias's
 * roundings, and for int8 weights the activations' rounding to int16. */
static void ref_linear(const struct lin *l, const double *x, const double *ex, long M, double *y, double *ey) {
    for (long m = 0; m < M; m++) {
        double amax = 0;  /* the row's largest magnitude, as the kernel may see it */
        for (long k = 0; k < l->K; k++) amax = fmax(amax, fabs(x[m * l->K + k]) + (ex ? ex[m * l->K + k] : 0));
        for (long n = 0; n < l->N; n++) {
            double s = 0, mag = 0, prop = 0, wabs = 0;
            for (long k = 0; k < l->K; k++) {
                const double w = l->wd[n * l->K + k], v = x[m * l->K + k];
                s += v * w, mag += fabs(v * w), wabs += fabs(w);
                if (ex) prop += fabs(w) * ex[m * l->K + k];
            }
            double e = prop + (double)(l->K + 8) * U * mag + 3 * U * (fabs(s) + fabs(l->bd[n]));
            if (l->kind == 2) e += 0.51 / VI_XMAX * amax * wabs;
            y[m * l->N + n] = s + l->bd[n];
            ey[m * l->N + n] = e;
        }
    }
}

/* ---- pc_linear ------------------------------------------------------------------------ */
static void check_linear(int kind, long M, long N, long K, int x_bf16, int y_bf16, int bias_kind, int act,
                         int with_scale, int threads) {
    struct lin l = make_lin(kind, N, K, bias_kind, with_scale);
    void *x = values(M * K, x_bf16, -2.0, 2.0);
    void *y = guarded((size_t)(M * N) * (y_bf16 ? 2 : 4));
    double *xd = malloc(sizeof(double) * (size_t)(M * K)), *yd = malloc(sizeof(double) * (size_t)(M * N));
    double *ey = malloc(sizeof(double) * (size_t)(M * N));
    for (long i = 0; i < M * K; i++) xd[i] = at(x, x_bf16, i);
    ref_linear(&l, xd, NULL, M, yd, ey);
    char what[160];
    snprintf(what, sizeof what, "pc_linear %s M=%ld N=%ld K=%ld x %s y %s bias %s act %d%s threads %d",
             kind == 0 ? "fp32" : kind == 1 ? "bf16" : "int8", M, N, K, x_bf16 ? "bf16" : "fp32",
             y_bf16 ? "bf16" : "fp32", bias_kind == 0 ? "none" : bias_kind == 1 ? "fp32" : "bf16", act,
             with_scale && kind != 2 ? " scaled" : "", threads);
    const int rc = pc_linear(x, x_bf16, l.w, kind, l.scale, l.bias, l.bias_bf16, y, y_bf16, act, M, N, K, threads);
    struct tally t = {0};
    if (rc == 0)
        for (long i = 0; i < M * N; i++) {
            const double want = gelu(yd[i], act), e = gelu_tol(ey[i], want, act);
            see(&t, at(y, y_bf16, i), want, y_bf16 ? UB * fabs(want) + (1 + UB) * e : e);
        }
    else
        t.bad = 1;
    report(&t, what);
    free(xd), free(yd), free(ey), free_lin(&l);
    release_all();
}

/* GELU (both forms) and so exp over -18 .. 18: x [1, 1] = 1 against w [2001, 1]. */
static void check_gelu_range(int act, int y_bf16) {
    const long N = 2001;
    float *x = guarded(4), *w = guarded(sizeof(float) * N);
    void *y = guarded((size_t)N * (y_bf16 ? 2 : 4));
    x[0] = 1.0f;
    for (long n = 0; n < N; n++) w[n] = (float)(-18.0 + 36.0 * n / (N - 1));
    const int rc = pc_linear(x, 0, w, 0, NULL, NULL, 0, y, y_bf16, act, 1, N, 1, 1);
    struct tally t = {0};
    for (long n = 0; n < N && rc == 0; n++) {
        const double want = gelu(w[n], act), e = gelu_tol(2 * U * fabs(w[n]), want, act);
        see(&t, at(y, y_bf16, n), want, y_bf16 ? UB * fabs(want) + (1 + UB) * e : e);
    }
    if (rc) t.bad = 1;
    char what[96];
    snprintf(what, sizeof what, "GELU (%s) over -18 .. 18, y %s", act == 1 ? "erf" : "tanh", y_bf16 ? "bf16 (scalar)" : "fp32 (vector)");
    report(&t, what);
    release_all();
}

/* ---- pc_block: a tiny GPT-NeoX block's decode step ----------------------------------------
 * The reference runs the block in fp64 and carries an error bound e beside every value. */

/* LayerNorm of a row [C], with the bound of its output given a bound E (the largest) on
 * its input: the mean moves by E, the deviation x - mean by 2E, the variance by 4 E sigma,
 * so 1/sigma by 2 E / sigma relative; plus the fp32 sums' (C + 8) u and a few roundings. */
static void ref_norm(const double *x, const double *ex, long C, const void *w, const void *b, int bf16, double eps,
                     double *y, double *ey) {
    double mean = 0, var = 0, E = 0, xmax = 0;
    for (long i = 0; i < C; i++) mean += x[i], E = fmax(E, ex[i]), xmax = fmax(xmax, fabs(x[i]));
    mean /= (double)C;
    for (long i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
    const double r = 1.0 / sqrt(var / (double)C + eps);
    for (long i = 0; i < C; i++) {
        const double xh = (x[i] - mean) * r, wi = at(w, bf16, i), bi = at(b, bf16, i);
        y[i] = xh * wi + bi;
        ey[i] = fabs(wi) * r * (2 * E + (double)(C + 8) * U * xmax) * (1 + fabs(xh))
                + fabs(wi * xh) * (double)(C + 8) * U + 4 * U * (fabs(y[i]) + fabs(bi));
    }
}

struct block_case {
    const char *name;
    int bf16;                   /* the model's dtype */
    long B, H, hs, rot, inter, max_len;
    long pos[8];
    int kinds[4], act, parallel, threads;
    long crow[8];               /* each row's cache row, where rows share one (speculative checks) */
    int shares;                 /* crow given: else row b is cache row b */
};

/* The block's reference (fp64 with bounds), then pc_block, then both compared: the
 * residual stream and the k, v rows the step wrote into the caches. Rows that share a cache
 * row (crow: the positions of one sequence) each see the keys and values that the rows at
 * earlier positions wrote in the same call. */
static void check_block(const struct block_case *bc) {
    const int bf = bc->bf16;
    long cr[8];
    for (long b = 0; b < bc->B; b++) cr[b] = bc->shares ? bc->crow[b] : b;
    const long B = bc->B, H = bc->H, hs = bc->hs, C = H * hs, I = bc->inter, T = bc->max_len, rot = bc->rot;
    const double eps = 1e-5;
    void *x = values(B * C, bf, -2.0, 2.0);
    void *ln[4];
    for (int i = 0; i < 4; i++) ln[i] = values(C, bf, i % 2 ? -0.2 : 0.8, i % 2 ? 0.2 : 1.2);
    struct lin L[4] = {make_lin(bc->kinds[0], 3 * C, C, 1 + bf, 0), make_lin(bc->kinds[1], C, C, 1 + bf, 0),
                       make_lin(bc->kinds[2], I, C, 1 + bf, 0), make_lin(bc->kinds[3], C, I, 1 + bf, 0)};
    const void *lin[12];
    for (int i = 0; i < 4; i++) lin[3 * i] = L[i].w, lin[3 * i + 1] = L[i].scale, lin[3 * i + 2] = L[i].bias;
    void *kc = values(B * H * T * hs, bf, -1.0, 1.0), *vc = values(B * H * T * hs, bf, -1.0, 1.0);
    float *cos_t = guarded(sizeof(float) * (size_t)(T * rot)), *sin_t = guarded(sizeof(float) * (size_t)(T * rot));
    for (long p = 0; p < T; p++)
        for (long i = 0; i < rot; i++) {
            const double f = pow(10000.0, -(double)(2 * (i % (rot / 2))) / (double)rot);
            cos_t[p * rot + i] = (float)cos(p * f), sin_t[p * rot + i] = (float)sin(p * f);
        }

    /* the reference, row by row of the batch */
    double *xs = malloc(sizeof(double) * (size_t)(B * C)), *exs = calloc((size_t)(B * C), sizeof(double));
    double *h = malloc(sizeof(double) * (size_t)C), *eh = malloc(sizeof(double) * (size_t)C);
    double *qkv = malloc(sizeof(double) * (size_t)(3 * C)), *eqkv = malloc(sizeof(double) * (size_t)(3 * C));
    double *att = malloc(sizeof(double) * (size_t)C), *eatt = malloc(sizeof(double) * (size_t)C);
    double *o = malloc(sizeof(double) * (size_t)C), *eo = malloc(sizeof(double) * (size_t)C);
    double *up = malloc(sizeof(double) * (size_t)I), *eup = malloc(sizeof(double) * (size_t)I);
    double *dn = malloc(sizeof(double) * (size_t)C), *edn = malloc(sizeof(double) * (size_t)C);
    double *kw = malloc(sizeof(double) * (size_t)(B * C)), *ekw = malloc(sizeof(double) * (size_t)(B * C));
    double *vw = malloc(sizeof(double) * (size_t)(B * C)), *evw = malloc(sizeof(double) * (size_t)(B * C));
    double *out = malloc(sizeof(double) * (size_t)(B * C)), *eout = malloc(sizeof(double) * (size_t)(B * C));
    double *sc = malloc(sizeof(double) * (size_t)T);
    double *qr = malloc(sizeof(double) * (size_t)(B * C)), *eqr = malloc(sizeof(double) * (size_t)(B * C));
    for (long i = 0; i < B * C; i++) xs[i] = at(x, bf, i);
    /* first every row's rotated q and its new k, v ... */
    for (long b = 0; b < B; b++) {
        const long p = bc->pos[b];
        ref_norm(xs + b * C, exs + b * C, C, ln[0], ln[1], bf, eps, h, eh);
        ref_linear(&L[0], h, eh, 1, qkv, eqkv);
        for (long hd = 0; hd < H; hd++) {
            double q[512], eq[512], k[512], ek[512];
            const double *src = qkv + hd * 3 * hs, *esrc = eqkv + hd * 3 * hs;
            for (long i = 0; i < hs; i++) q[i] = src[i], eq[i] = esrc[i], k[i] = src[hs + i], ek[i] = esrc[hs + i];
            const float *c = cos_t + p * rot, *s = sin_t + p * rot;
            for (long i = 0; i < rot / 2; i++) {  /* rotate half: each output two products and a sum */
                const long j = i + rot / 2;
                double r[4] = {q[i] * c[i] - q[j] * s[i], q[j] * c[j] + q[i] * s[j],
                               k[i] * c[i] - k[j] * s[i], k[j] * c[j] + k[i] * s[j]};
                double e[4] = {fabs(c[i]) * eq[i] + fabs(s[i]) * eq[j] + 2 * U * (fabs(q[i] * c[i]) + fabs(q[j] * s[i])),
                               fabs(c[j]) * eq[j] + fabs(s[j]) * eq[i] + 2 * U * (fabs(q[j] * c[j]) + fabs(q[i] * s[j])),
                               fabs(c[i]) * ek[i] + fabs(s[i]) * ek[j] + 2 * U * (fabs(k[i] * c[i]) + fabs(k[j] * s[i])),
                               fabs(c[j]) * ek[j] + fabs(s[j]) * ek[i] + 2 * U * (fabs(k[j] * c[j]) + fabs(k[i] * s[j]))};
                q[i] = r[0], q[j] = r[1], k[i] = r[2], k[j] = r[3];
                eq[i] = e[0], eq[j] = e[1], ek[i] = e[2], ek[j] = e[3];
            }
            for (long i = 0; i < hs; i++) {  /* the new k, v as the cache holds them: rounded to its dtype */
                const double v = src[2 * hs + i], ev = esrc[2 * hs + i];
                kw[b * C + hd * hs + i] = k[i], ekw[b * C + hd * hs + i] = ek[i] + (bf ? UB : U) * fabs(k[i]);
                vw[b * C + hd * hs + i] = v, evw[b * C + hd * hs + i] = ev + (bf ? UB : U) * fabs(v);
                qr[b * C + hd * hs + i] = q[i], eqr[b * C + hd * hs + i] = eq[i];
            }
        }
    }
    /* ... then each row's attention and the rest of the block */
    for (long b = 0; b < B; b++) {
        const long p = bc->pos[b];
        double *xb = xs + b * C, *exb = exs + b * C;
        long writer[512];  /* the row that wrote position s of this row's cache row in this call, or -1 */
        for (long s2 = 0; s2 <= p; s2++) {
            writer[s2] = -1;
            for (long b2 = 0; b2 < B; b2++)
                if (cr[b2] == cr[b] && bc->pos[b2] == s2) writer[s2] = b2;
        }
        for (long hd = 0; hd < H; hd++) {
            const double *q = qr + b * C + hd * hs, *eq = eqr + b * C + hd * hs;
            const long row = (cr[b] * H + hd) * T;
            /* scores z_s = q.k_s / sqrt(hs), s <= p (keys written in this call: their own bound);
             * softmax moves p_s by at most 2 p_s max|dz|; exp adds EXP_ERR, the sum (p + 9) u. */
            const double scale = 1.0 / sqrt((double)hs);
            double zmax = -INFINITY, dz = 0, sum = 0;
            for (long s2 = 0; s2 <= p; s2++) {
                double z = 0, mag = 0, ez = 0;
                const long w = writer[s2];
                for (long i = 0; i < hs; i++) {
                    const double kv = w >= 0 ? kw[w * C + hd * hs + i] : at(kc, bf, (row + s2) * hs + i);
                    z += q[i] * kv, mag += fabs(q[i] * kv);
                    ez += fabs(kv) * eq[i] + (w >= 0 ? fabs(q[i]) * ekw[w * C + hd * hs + i] : 0);
                }
                sc[s2] = z * scale;
                dz = fmax(dz, scale * (ez + (double)(hs + 8) * U * mag) + 2 * U * fabs(z * scale));
                zmax = fmax(zmax, sc[s2]);
            }
            for (long s2 = 0; s2 <= p; s2++) sum += (sc[s2] = exp(sc[s2] - zmax));
            const double ep = 2 * dz + 2 * U * dz + EXP_ERR + (double)(p + 9) * U;  /* relative, of each p_s */
            for (long i = 0; i < hs; i++) {
                double a = 0, mag = 0, e = 0;
                for (long s2 = 0; s2 <= p; s2++) {
                    const double ps = sc[s2] / sum;
                    const long w = writer[s2];
                    const double vv = w >= 0 ? vw[w * C + hd * hs + i] : at(vc, bf, (row + s2) * hs + i);
                    a += ps * vv, mag += ps * fabs(vv), e += ps * (w >= 0 ? evw[w * C + hd * hs + i] : 0);
                }
                att[hd * hs + i] = a;
                eatt[hd * hs + i] = e + mag * ep + (double)(p + 9) * U * mag;
            }
        }
        ref_linear(&L[1], att, eatt, 1, o, eo);
        if (!bc->parallel)
            for (long i = 0; i < C; i++) xb[i] += o[i], exb[i] += eo[i] + U * fabs(xb[i]);
        ref_norm(xb, exb, C, ln[2], ln[3], bf, eps, h, eh);
        ref_linear(&L[2], h, eh, 1, up, eup);
        for (long i = 0; i < I; i++) {
            const double g = gelu(up[i], bc->act);
            eup[i] = gelu_tol(eup[i], g, bc->act), up[i] = g;
        }
        ref_linear(&L[3], up, eup, 1, dn, edn);
        for (long i = 0; i < C; i++) {
            out[b * C + i] = xb[i] + dn[i] + (bc->parallel ? o[i] : 0);
            eout[b * C + i] = exb[i] + edn[i] + (bc->parallel ? eo[i] : 0) + 2 * U * fabs(out[b * C + i]);
        }
    }

    /* the kernel */
    const int kinds[4] = {bc->kinds[0], bc->kinds[1], bc->kinds[2], bc->kinds[3]};
    const int rc = pc_block(x, bf, B, C, I, (const void *const *)ln, (float)eps, lin, kinds, bc->act, bc->parallel,
                            kc, vc, cos_t, sin_t, bc->pos, bc->shares ? bc->crow : NULL, H, hs, rot, T, bc->threads);
    struct tally tx = {0}, tk = {0};
    if (rc == 0) {
        for (long i = 0; i < B * C; i++)
            see(&tx, at(x, bf, i), out[i], bf ? UB * fabs(out[i]) + (1 + UB) * eout[i] : eout[i]);
        for (long b = 0; b < B; b++)
            for (long hd = 0; hd < H; hd++)
                for (long i = 0; i < hs; i++) {
                    const long c = ((cr[b] * H + hd) * T + bc->pos[b]) * hs + i, j = b * C + hd * hs + i;
                    see(&tk, at(kc, bf, c), kw[j], ekw[j]);
                    see(&tk, at(vc, bf, c), vw[j], evw[j]);
                }
    } else {
        tx.bad = tk.bad = 1;
    }
    char what[200];
    snprintf(what, sizeof what, "pc_block %s (%s, B=%ld H=%ld hs=%ld rot=%ld inter=%ld cache %ld, kinds %d%d%d%d, act %d, %s%s)",
             bc->name, bf ? "bf16" : "fp32", B, H, hs, rot, I, T, kinds[0], kinds[1], kinds[2], kinds[3], bc->act,
             bc->parallel ? "parallel" : "sequential", bc->shares ? ", rows sharing cache rows" : "");
    report(&tx, what);
    snprintf(what, sizeof what, "pc_block %s: the k, v rows written into the caches", bc->name);
    report(&tk, what);
    free(xs), free(exs), free(h), free(eh), free(qkv), free(eqkv), free(att), free(eatt), free(o), free(eo);
    free(up), free(eup), free(dn), free(edn), free(kw), free(ekw), free(vw), free(evw), free(out), free(eout), free(sc);
    free(qr), free(eqr);
    for (int i = 0; i < 4; i++) free_lin(&L[i]);
    release_all();
}

/* ---- training kernels ------------------------------------------------------------------ */

/* lse = log sum exp z (the sum of V exponentials: (V + 8) u and EXP_ERR relative, then the
 * log and the max added back); the target logit exactly; the gradient w (softmax - onehot)
 * to its inputs' errors, then bf16's rounding. */
static void check_cross_entropy(long R, long V, double spread, int threads) {
    uint16_t *z = values(R * V, 1, -spread, spread);
    double *zd = malloc(sizeof(double) * (size_t)(R * V));
    for (long i = 0; i < R * V; i++) zd[i] = at(z, 1, i);
    int64_t *tg = guarded(sizeof(int64_t) * (size_t)R);
    float *w = guarded(sizeof(float) * (size_t)R), *lse = guarded(sizeof(float) * (size_t)R);
    float *picked = guarded(sizeof(float) * (size_t)R);
    for (long r = 0; r < R; r++) tg[r] = (int64_t)(urand() * (double)V), w[r] = r == 1 ? 0.0f : frand(0.1, 1.0);
    const int rc = pc_cross_entropy_bf16(z, R, V, tg, w, lse, picked, 1, threads);
    struct tally tl = {0}, tp = {0}, tgr = {0};
    for (long r = 0; r < R && rc == 0; r++) {
        double mx = -INFINITY, sum = 0;
        for (long v = 0; v < V; v++) mx = fmax(mx, zd[r * V + v]);
        for (long v = 0; v < V; v++) sum += exp(zd[r * V + v] - mx);
        const double want = mx + log(sum), el = EXP_ERR + (double)(V + 8) * U + 2 * U * (fabs(want) + 1);
        see(&tl, lse[r], want, el);
        see(&tp, picked[r], zd[r * V + tg[r]], 0);
        for (long v = 0; v < V; v++) {
            const double p = exp(zd[r * V + v] - want), g = w[r] * (p - (v == tg[r]));
            const double e = w[r] * p * (el + 4 * U * (fabs(want) + fabs(log(w[r] > 0 ? w[r] : 1)) + fabs(zd[r * V + v]))
                                         + EXP_ERR) + 2 * U * w[r] + 1e-37;
            see(&tgr, at(z, 1, r * V + v), g, UB * fabs(g) + (1 + UB) * e);
        }
    }
    if (rc) tl.bad = 1;
    char what[96];
    snprintf(what, sizeof what, "pc_cross_entropy_bf16 R=%ld V=%ld logits +-%g: log-sum-exp", R, V, spread);
    report(&tl, what);
    report(&tp, "pc_cross_entropy_bf16: target logits");
    report(&tgr, "pc_cross_entropy_bf16: gradient");
    free(zd);
    release_all();
}

/* Forward: q, k rotated ("rotate half": a product, an FMA, one rounding each, two u) and v
 * copied; backward: the transposed rotation into x. fp32 or bf16 on either side. */
static void check_rotary(long B, long T, long H, long hs, long rot, int x_bf16, int o_bf16, int grad) {
    const long n = B * T * H * hs;
    void *x = values(3 * n, x_bf16, -2.0, 2.0), *q = values(n, o_bf16, -2.0, 2.0);
    void *k = values(n, o_bf16, -2.0, 2.0), *v = values(n, o_bf16, -2.0, 2.0);
    float *cs = guarded(sizeof(float) * (size_t)(T * rot)), *sn = guarded(sizeof(float) * (size_t)(T * rot));
    for (long i = 0; i < T * rot; i++) cs[i] = frand(-1, 1), sn[i] = frand(-1, 1);
    double *before = malloc(sizeof(double) * (size_t)(3 * n));  /* the inputs, as read */
    void *outs[3] = {q, k, v};
    for (long i = 0; i < 3 * n; i++) before[i] = grad ? at(outs[i / n], o_bf16, i % n) : at(x, x_bf16, i);
    const int rc = pc_rotary_qkv(x, x_bf16, q, k, v, o_bf16, cs, sn, B, T, H, hs, rot, grad, 2);
    struct tally t = {0};
    const long half = rot / 2;
    for (long idx = 0; idx < B * T * H && rc == 0; idx++) {
        const long b = idx / (T * H), tt = (idx / H) % T, hd = idx % H, xo = idx * 3 * hs, oo = ((b * H + hd) * T + tt) * hs;
        const float *c = cs + tt * rot, *s = sn + tt * rot;
        for (int part = 0; part < 3; part++)
            for (long i = 0; i < hs; i++) {
                double want, mag;
                /* the value read (from x forward, from q/k/v backward) at dim j of this part */
#define IN(j) (grad ? before[part * n + oo + (j)] : before[xo + part * hs + (j)])
                if (part == 2 || i >= rot) {
                    want = IN(i), mag = 0;
                } else if (!grad) {
                    want = i < half ? IN(i) * c[i] - IN(i + half) * s[i] : IN(i) * c[i] + IN(i - half) * s[i];
                    mag = i < half ? fabs(IN(i) * c[i]) + fabs(IN(i + half) * s[i]) : fabs(IN(i) * c[i]) + fabs(IN(i - half) * s[i]);
                } else {
                    want = i < half ? IN(i) * c[i] + IN(i + half) * s[i + half] : IN(i) * c[i] - IN(i - half) * s[i - half];
                    mag = i < half ? fabs(IN(i) * c[i]) + fabs(IN(i + half) * s[i + half]) : fabs(IN(i) * c[i]) + fabs(IN(i - half) * s[i - half]);
                }
#undef IN
                const int out_bf16 = grad ? x_bf16 : o_bf16;
                const double got = grad ? at(x, x_bf16, xo + part * hs + i) : at(outs[part], o_bf16, oo + i);
                see(&t, got, want, (out_bf16 ? UB * fabs(want) : 0) + (1 + UB) * 2 * U * mag);
            }
    }
    if (rc) t.bad = 1;
    char what[128];
    snprintf(what, sizeof what, "pc_rotary_qkv %s B=%ld T=%ld H=%ld hs=%ld rot=%ld x %s q/k/v %s", grad ? "backward" : "forward",
             B, T, H, hs, rot, x_bf16 ? "bf16" : "fp32", o_bf16 ? "bf16" : "fp32");
    report(&t, what);
    free(before);
    release_all();
}

static void check_transpose(long C, long V) {
    uint16_t *src = values(C * V, 1, -3.0, 3.0);
    float *dst = guarded(sizeof(float) * (size_t)(V * C));
    const int rc = pc_transpose_bf16_f32(src, dst, C, V, 2);
    struct tally t = {0};
    for (long v = 0; v < V && rc == 0; v++)
        for (long c = 0; c < C; c++) see(&t, dst[v * C + c], at(src, 1, c * V + v), 0);
    if (rc) t.bad = 1;
    char what[64];
    snprintf(what, sizeof what, "pc_transpose_bf16_f32 C=%ld V=%ld (exact)", C, V);
    report(&t, what);
    release_all();
}

int main(void) {
    printf("variant: PC_ISA %d, VL %d, int8 products %s, activations to +-%d\n", PC_ISA,
#ifdef VL
           VL,
#else
           0,
#endif
           PC_I8_DOT, VI_XMAX);
    expect_rc(pc_available(), PC_ISA, "pc_available");
    if (!PC_ISA) return failures;
#if PC_ISA == 1 && defined(__AVX512BF16__)
    const int grad_rc = 0;
#else
    const int grad_rc = -4;  /* unavailable: training keeps PyTorch's SDPA backward */
#endif
    expect_rc(pc_attention_grad_bf16(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, 0, 0, 0, 0, NULL, 1.0f, NULL,
                                     NULL, 1, 1), grad_rc, "pc_attention_grad_bf16 (empty call)");

    /* pc_linear: every weight kind, 1 .. 8 rows and 13 (two row blocks), odd sizes and
     * column tails; the options rotate through the cases. */
    static const long shapes[][2] = {{4, 1}, {5, 3}, {7, 8}, {9, 15}, {13, 17}, {6, 33}, {11, 100}, {37, 257}, {8, 300},
                                     {5, 1700}, {4, 6500}};
    static const long rows[] = {1, 2, 3, 4, 5, 6, 7, 8, 13};
    int i = 0;
    for (int kind = 0; kind < 3; kind++)
        for (unsigned r = 0; r < sizeof rows / sizeof rows[0]; r++)
            for (unsigned s = 0; s < sizeof shapes / sizeof shapes[0]; s++, i++) {
                if (shapes[s][1] > 2000 && rows[r] > 2) continue;  /* the long rows: chunking at one and two rows */
                check_linear(kind, rows[r], shapes[s][0], shapes[s][1], i % 2, (i / 2) % 2, i % 3, (i / 3) % 3,
                             i % 5 == 0, 1 + i % 2);
            }
    for (int act = 1; act <= 2; act++)
        for (int yb = 0; yb < 2; yb++) check_gelu_range(act, yb);

    static const struct block_case blocks[] = {
        {"A", 0, 3, 2, 12, 8, 64, 24, {0, 9, 23}, {0, 1, 2, 0}, 1, 0, 1},
        {"B", 0, 2, 1, 40, 16, 96, 40, {17, 39}, {1, 0, 0, 2}, 2, 1, 2},
        {"C", 1, 4, 2, 16, 16, 72, 33, {32, 0, 5, 16}, {1, 1, 1, 1}, 1, 1, 2},
        {"D", 1, 1, 3, 24, 12, 100, 20, {19}, {2, 2, 2, 2}, 2, 0, 2},
        {"E", 0, 8, 2, 8, 8, 40, 12, {11, 0, 1, 2, 3, 4, 5, 6}, {0, 0, 0, 0}, 1, 0, 2},
        /* a speculative check: positions 5..8 of one sequence (cache row 1) and 2..4 of another (row 0) */
        {"F", 0, 7, 2, 12, 8, 64, 16, {5, 6, 7, 8, 2, 3, 4}, {0, 1, 2, 0}, 1, 0, 2, {1, 1, 1, 1, 0, 0, 0}, 1},
        {"G", 1, 4, 2, 16, 16, 72, 20, {9, 10, 11, 12}, {2, 2, 1, 1}, 2, 1, 2, {0, 0, 0, 0}, 1},
    };
    for (unsigned b = 0; b < sizeof blocks / sizeof blocks[0]; b++) check_block(&blocks[b]);

    check_cross_entropy(5, 37, 6.0, 1);
    check_cross_entropy(3, 1003, 40.0, 2);
    for (int g = 0; g < 2; g++) {
        check_rotary(2, 3, 2, 12, 8, 0, 0, g);
        check_rotary(1, 2, 1, 40, 40, 1, 0, g);
        check_rotary(1, 2, 2, 20, 12, 0, 1, g);
    }
    check_transpose(19, 37);
    check_transpose(33, 130);

    printf("%d checks, %d failed\n", checks, failures);
    return failures > 125 ? 125 : failures;
}
