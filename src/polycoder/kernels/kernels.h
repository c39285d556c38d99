/* Every function the polycoder kernel library exports: the decode kernels (decode.c,
 * decode_block.c) and the training kernels (train.c), compiled together into one shared library by
 * polycoder/kernels/__init__.py, whose ctypes table (SIGNATURES) must match these
 * prototypes (tests/test_kernels_header.py parses this file to check it).
 *
 * Conventions: tensors are contiguous, row-major; "bf16" flags say whether a buffer holds
 * bf16 (1) or fp32 (0) values; `threads` is the OpenMP thread count (PyTorch's pool).
 * Every function returns 0 on success; -1 for a bad argument, -2 when out of memory,
 * -3 where the library was built without a vector variant (the stubs; pc_available gives 0),
 * -4 for pc_attention_grad_bf16 on a CPU without AVX512-BF16 (the AVX2 and NEON variants
 * included).
 *
 * Format (for the parser): one prototype a statement, `int pc_name(type name, ...);`,
 * with no macros in it.
 */
#ifndef POLYCODER_KERNELS_H
#define POLYCODER_KERNELS_H

#include <stdint.h>

/* The vector variant the library was built with (common.h's PC_ISA): 1 AVX-512 (F and BW),
 * 2 AVX2 + FMA, 3 ARM64 NEON; 0 for none (the stubs): the Python side then keeps PyTorch's
 * operations. */
int pc_available(void);

/* y = act(x W^T * scale + bias) for a few rows (a decode step). x [M, K] fp32 or bf16
 * (x_bf16); w [N, K] of `kind` (0 fp32, 1 bf16, 2 int8); scale [N] fp32 or NULL
 * (int8 weights need it); bias [N] fp32 or bf16 (bias_bf16) or NULL; y [M, N] fp32 or
 * bf16 (y_bf16); act 0 none, 1 GELU (erf), 2 GELU (tanh form), applied before the
 * rounding to y's dtype. 1 <= M <= 64. Returns 0, -1 (bad argument), -2 (out of memory). */
int pc_linear(const void *x, int x_bf16, const void *w, int kind, const float *scale,
              const void *bias, int bias_bf16, void *y, int y_bf16, int act,
              long M, long N, long K, int threads);

/* One GPT-NeoX block of a decode step, in place on the residual stream x [B, C] (fp32 or
 * bf16, bf16 flag; the model's dtype): LayerNorms, the four products, rotary, the cache
 * write at pos [B] (int64) of cache row crow[b] (int64 [B]; NULL: row b), attention over
 * positions 0..pos[b] of that cache row, MLP and residuals
 * (parallel_residual: GPT-J/Pythia form). ln: ln1 weight, ln1 bias, ln2 weight, ln2 bias;
 * lin: (weight, fp32 scale or NULL, bias or NULL) for qkv, dense, h_to_4h, 4h_to_h, 12
 * pointers; kinds: their 4 weight kinds (as pc_linear's); act: the MLP's activation;
 * kc, vc: caches [B, H, max_len, hs] in the model's dtype; cos_t, sin_t: fp32 [*, rot].
 * 1 <= B <= 64, H * hs == C, hs <= 512, rot even and <= hs, max_len <= 32768. Every
 * row's key and value is written before any row attends, so rows sharing a cache row (the
 * positions of one sequence: a speculative draft being verified) see each other causally.
 * The caller guarantees that crow[b] names a row of the caches (only crow[b] >= 0 is
 * checked here: the caches' row count is not passed) and that rows sharing a cache row
 * have distinct positions (two would write one slot at once).
 * Returns 0, -1 (bad argument or a position outside the cache), -2 (out of memory). */
int pc_block(void *x, int bf16, long B, long C, long inter, const void *const *ln, float eps,
             const void *const *lin, const int *kinds, int act, int parallel_residual,
             void *kc, void *vc, const float *cos_t, const float *sin_t, const long *pos,
             const long *crow, long H, long hs, long rot, long max_len, int threads);

/* L consecutive blocks of a decode step: pc_block for layer l with ln + 4 l, lin + 12 l,
 * kinds + 4 l, kc[l], vc[l] (kc, vc: L cache pointers); the first nonzero return code of
 * a block stops it and is returned. */
int pc_blocks(void *x, int bf16, long B, long C, long inter, long L, const void *const *ln, float eps,
              const void *const *lin, const int *kinds, int act, int parallel_residual,
              void *const *kc, void *const *vc, const float *cos_t, const float *sin_t, const long *pos,
              const long *crow, long H, long hs, long rot, long max_len, int threads);

/* Cross-entropy over bf16 logits z [R, V], in place: lse_out[r] = log sum_v exp(z[r, v])
 * and picked_out[r] = z[r, target[r]] (fp32 [R]); with grad set, z is overwritten by
 * w[r] * (softmax(z[r]) - onehot(target[r])) in bf16. target [R] int64 in [0, V); w [R]
 * fp32 row weights (0 for an ignored row). Returns 0. */
int pc_cross_entropy_bf16(uint16_t *z, long R, long V, const int64_t *target, const float *w,
                          float *lse_out, float *picked_out, int grad, int threads);

/* A causal attention's backward pieces, bf16: p = exp(scale q.k - lse) and
 * ds = scale p (dO.v - rowsum(dO O)), bf16 [n, T, T], zero above the diagonal. q, dout
 * [n, Tp, Dp] bf16 (T, D rounded up to 32, zero padded); o, k, v [n, T, D] bf16, D even;
 * kp, vp: work buffers of n * Dp / 2 * Tp 32-bit pairs; dsum: fp32 work [n, T]; lse
 * [n, T] fp32 (the forward's, of scale q.k); use_amx: AMX tiles where the CPU has them
 * (0: vdpbf16ps). Returns 0; -4 where the CPU lacks AVX512-BF16 (an empty call, n = 0,
 * asks). */
int pc_attention_grad_bf16(const uint16_t *q, const uint16_t *dout, const uint16_t *o, const uint16_t *k,
                           const uint16_t *v, uint32_t *kp, uint32_t *vp, float *dsum, long n, long T, long Tp,
                           long D, long Dp, const float *lse, float scale, uint16_t *p, uint16_t *ds, int use_amx,
                           int threads);

/* Training's split of the fused qkv projection with rotary: x [B, T, H, 3, hs] <-> q, k, v
 * [B, H, T, hs]. grad 0: writes q, k, v, q and k rotated over their first rot dims
 * ("rotate half") by cos_t/sin_t [T, rot] fp32; grad 1: writes x from the gradients in
 * q, k, v (the transposed rotation). x fp32 or bf16 (x_bf16), q/k/v fp32 or bf16 (o_bf16);
 * rot even and <= hs. Returns 0. */
int pc_rotary_qkv(void *x, int x_bf16, void *q, void *k, void *v, int o_bf16, const float *cos_t, const float *sin_t,
                  long B, long T, long H, long hs, long rot, int grad, int threads);

/* dst [V, C] fp32 = src [C, V] bf16 transposed and widened (the output head's weight
 * gradient). Returns 0. */
int pc_transpose_bf16_f32(const uint16_t *src, float *dst, long C, long V, int threads);

#endif /* POLYCODER_KERNELS_H */
