/* y[M, N] = x[M, K] W^T for group-wise int8 weights, on AVX-512 (see kernels/cpu_gemm.py).
 *
 * The weight is packed in blocks of NR = 32 output rows: q [N/32][K][32] int8 (bits 8), or
 * [N/32][K][16] bytes holding row j of the block in the low nibble and row j + 16 in the high
 * one (bits 4, unsigned values), scales and shifts [N/32][K/group][32] float32, so that
 * W[n, k] = q * scale + shift (shift optional).
 * Each task dequantises one block of W into a float32 buffer of its thread (K x 32, cache
 * resident) with the same two roundings as the torch reference (q * scale, then + shift),
 * then multiplies every row of x by it, 8 rows at a time, with a register-blocked FMA
 * microkernel (8 x 32 accumulators); up to 6 rows dequantise in registers instead. Blocks
 * are shared by torch's OpenMP threads (the kernel links the libgomp torch loaded).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define NR 32
#define MR 8

static __thread float *tls_buf = 0;
static __thread long tls_cap = 0;

static float *thread_buffer(long n) {
    if (n > tls_cap) {
        free(tls_buf);
        tls_buf = (float *)aligned_alloc(64, (size_t)n * sizeof(float));
        tls_cap = tls_buf ? n : 0;
    }
    return tls_buf;
}

/* The scales (and shifts) of group g of a block: 32 output rows in two vectors each. */
static inline void group_consts(const float *s, const float *z, long g, __m512 *s0, __m512 *s1,
                                __m512 *z0, __m512 *z1) {
    *s0 = _mm512_loadu_ps(s + g * NR);
    *s1 = _mm512_loadu_ps(s + g * NR + 16);
    *z0 = z ? _mm512_loadu_ps(z + g * NR) : _mm512_setzero_ps();
    *z1 = z ? _mm512_loadu_ps(z + g * NR + 16) : _mm512_setzero_ps();
}

/* Column k of a block dequantised: q * scale, then + shift (two roundings, as torch's). */
static inline __attribute__((always_inline)) void weight_column(int bits, const uint8_t *q, long k, __m512 s0,
                                                                __m512 s1, __m512 z0, __m512 z1, int shifted,
                                                                __m512 *w0, __m512 *w1) {
    __m512i v0, v1;
    if (bits == 4) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k * 16)));
        v0 = _mm512_and_si512(v, _mm512_set1_epi32(15));
        v1 = _mm512_srli_epi32(v, 4);
    } else {
        v0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k * NR)));
        v1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k * NR + 16)));
    }
    *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(v0), s0);
    *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(v1), s1);
    if (shifted) {
        *w0 = _mm512_add_ps(*w0, z0);
        *w1 = _mm512_add_ps(*w1, z1);
    }
}

static inline __attribute__((always_inline)) void dequantise(int bits, const uint8_t *q, const float *s,
                                                             const float *z, long K, long group, float *w) {
    for (long g = 0; g < K / group; g++) {
        __m512 s0, s1, z0, z1, w0, w1;
        group_consts(s, z, g, &s0, &s1, &z0, &z1);
        for (long k = g * group; k < (g + 1) * group; k++) {
            weight_column(bits, q, k, s0, s1, z0, z1, z != 0, &w0, &w1);
            _mm512_store_ps(w + k * NR, w0);
            _mm512_store_ps(w + k * NR + 16, w1);
        }
    }
}

/* The register tile of R rows x 32 outputs: zeroed, one column k of W added, stored. */
static inline __attribute__((always_inline)) void zero_rows(int R, __m512 acc[][2]) {
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
}

static inline __attribute__((always_inline)) void fma_rows(int R, const float *x, long ldx, long k, __m512 w0,
                                                           __m512 w1, __m512 acc[][2]) {
    for (int r = 0; r < R; r++) {
        __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
        acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
    }
}

static inline __attribute__((always_inline)) void store_rows(int R, __m512 acc[][2], float *y, long ldy,
                                                             __mmask16 m0, __mmask16 m1) {
    for (int r = 0; r < R; r++) {
        _mm512_mask_storeu_ps(y + r * ldy, m0, acc[r][0]);
        _mm512_mask_storeu_ps(y + r * ldy + 16, m1, acc[r][1]);
    }
}

static inline __attribute__((always_inline)) void micro(int R, const float *x, long ldx, const float *w,
                                                        long K, float *y, long ldy, __mmask16 m0,
                                                        __mmask16 m1) {
    __m512 acc[MR][2];
    zero_rows(R, acc);
    for (long k = 0; k < K; k++) {
        __m512 w0 = _mm512_load_ps(w + k * NR), w1 = _mm512_load_ps(w + k * NR + 16);
        fma_rows(R, x, ldx, k, w0, w1, acc);
    }
    store_rows(R, acc, y, ldy, m0, m1);
}

static void rows(const float *x, long ldx, long M, const float *w, long K, float *y, long ldy,
                 long cols) {
    __mmask16 m0 = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
    __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
    long m = 0;
    for (; m + MR <= M; m += MR) micro(MR, x + m * ldx, ldx, w, K, y + m * ldy, ldy, m0, m1);
    switch (M - m) {
        case 7: micro(7, x + m * ldx, ldx, w, K, y + m * ldy, ldy, m0, m1); break;
        case 6: micro(6, x + m * ldx, ldx, w, K, y + m * ldy, ldy, m0, m1); break;
        case 5: micro(5, x + m * ldx, ldx, w, K, y + m * ldy, ldy, m0, m1); break;
        case 4: micro(4, x + m * ldx, ldx, w, K, y + m * ldy, ldy, m0, m1); break;
        case 3: micro(3, x + m * ldx, ldx, w, K, y + m * ldy, ldy, m0, m1); break;
        case 2: micro(2, x + m * ldx, ldx, w, K, y + m * ldy, ldy, m0, m1); break;
        case 1: micro(1, x + m * ldx, ldx, w, K, y + m * ldy, ldy, m0, m1); break;
        default: break;
    }
}

/* M <= 6 rows: each weight vector is dequantised in registers and used at once. */
static inline __attribute__((always_inline)) void fused(int bits, int R, const float *x, long ldx, const uint8_t *q,
                                                        const float *s, const float *z, long K,
                                                        long group, float *y, long ldy, __mmask16 m0,
                                                        __mmask16 m1) {
    __m512 acc[MR][2];
    zero_rows(R, acc);
    for (long g = 0; g < K / group; g++) {
        __m512 s0, s1, z0, z1, w0, w1;
        group_consts(s, z, g, &s0, &s1, &z0, &z1);
        for (long k = g * group; k < (g + 1) * group; k++) {
            weight_column(bits, q, k, s0, s1, z0, z1, z != 0, &w0, &w1);
            fma_rows(R, x, ldx, k, w0, w1, acc);
        }
    }
    store_rows(R, acc, y, ldy, m0, m1);
}

#define FUSED(R) fused(bits, R, x, ldx, qb, sb, zb, K, group, yb, ldy, m0, m1)

/* One block of 32 output rows: in registers for up to 6 rows of x, else dequantised into the
 * thread's buffer and multiplied 8 rows at a time. Returns -1 when the buffer is missing. */
static inline __attribute__((always_inline)) int block(int bits, const float *x, long M, long K, long ldx,
                                                       const uint8_t *qb, const float *sb, const float *zb,
                                                       long group, float *yb, long ldy, long cols) {
    __mmask16 m0 = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
    __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
    switch (M) {
        case 0: return 0;
        case 1: FUSED(1); return 0;
        case 2: FUSED(2); return 0;
        case 3: FUSED(3); return 0;
        case 4: FUSED(4); return 0;
        case 5: FUSED(5); return 0;
        case 6: FUSED(6); return 0;
        default: {
            float *w = thread_buffer(K * NR);
            if (!w) return -1;
            dequantise(bits, qb, sb, zb, K, group, w);
            rows(x, ldx, M, w, K, yb, ldy, cols);
            return 0;
        }
    }
}

#include "gemm_driver.h"
