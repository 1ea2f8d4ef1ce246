/* y[M, N] = x[M, K] W^T for group-wise int8 weights, on AVX2 + FMA (see kernels/cpu_gemm.py).
 *
 * The same export, packed layout and arithmetic as ../grouped_gemm.c (the AVX-512 build), for
 * CPUs without AVX-512. Blocks of NR = 32 output rows: q [N/32][K][32] int8 (bits 8), or
 * [N/32][K][16] bytes holding row j of the block in the low nibble and row j + 16 in the high
 * one (bits 4, unsigned values), scales and shifts [N/32][K/group][32] float32, so that
 * W[n, k] = q * scale + shift (shift optional), rounded twice as the torch reference rounds
 * (q * scale, then + shift).
 * With 16 ymm registers a block is multiplied in two halves of 16 outputs (two vectors; the
 * 4-bit low nibbles, then the high ones). Up to 6 rows of x dequantise each weight vector in
 * registers and use it at once (2 x rows accumulators); more rows dequantise the block into a
 * float32 buffer of the thread (K x 32, cache resident) and multiply it 6 rows x 16 outputs at
 * a time (12 accumulators). Blocks are shared by torch's OpenMP threads.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define NR 32
#define HR 16
#define MR 6

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

/* The scales (and shifts) of group g of a block, outputs [h * 16, h * 16 + 16). */
static inline __attribute__((always_inline)) void group_consts(const float *s, const float *z, long g, int h,
                                                               __m256 *s0, __m256 *s1, __m256 *z0, __m256 *z1) {
    const long at = g * NR + h * HR;
    *s0 = _mm256_loadu_ps(s + at);
    *s1 = _mm256_loadu_ps(s + at + 8);
    *z0 = z ? _mm256_loadu_ps(z + at) : _mm256_setzero_ps();
    *z1 = z ? _mm256_loadu_ps(z + at + 8) : _mm256_setzero_ps();
}

/* Half h of column k of a block dequantised: q * scale, then + shift (two roundings). */
static inline __attribute__((always_inline)) void weight_half(int bits, const uint8_t *q, long k, int h, __m256 s0,
                                                              __m256 s1, __m256 z0, __m256 z1, int shifted,
                                                              __m256 *w0, __m256 *w1) {
    __m256i v0, v1;
    if (bits == 4) {
        const uint8_t *p = q + k * HR;
        v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
        v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
        if (h) {
            v0 = _mm256_srli_epi32(v0, 4);
            v1 = _mm256_srli_epi32(v1, 4);
        } else {
            v0 = _mm256_and_si256(v0, _mm256_set1_epi32(15));
            v1 = _mm256_and_si256(v1, _mm256_set1_epi32(15));
        }
    } else {
        const uint8_t *p = q + k * NR + h * HR;
        v0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
        v1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    }
    *w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(v0), s0);
    *w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(v1), s1);
    if (shifted) {
        *w0 = _mm256_add_ps(*w0, z0);
        *w1 = _mm256_add_ps(*w1, z1);
    }
}

static inline __attribute__((always_inline)) void dequantise(int bits, const uint8_t *q, const float *s,
                                                             const float *z, long K, long group, float *w) {
    for (int h = 0; h < 2; h++) {
        for (long g = 0; g < K / group; g++) {
            __m256 s0, s1, z0, z1, w0, w1;
            group_consts(s, z, g, h, &s0, &s1, &z0, &z1);
            for (long k = g * group; k < (g + 1) * group; k++) {
                weight_half(bits, q, k, h, s0, s1, z0, z1, z != 0, &w0, &w1);
                _mm256_store_ps(w + k * NR + h * HR, w0);
                _mm256_store_ps(w + k * NR + h * HR + 8, w1);
            }
        }
    }
}

/* The register tile of R rows x 16 outputs: zeroed, one column k of W added, stored. */
static inline __attribute__((always_inline)) void zero_rows(int R, __m256 acc[][2]) {
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
}

static inline __attribute__((always_inline)) void fma_rows(int R, const float *x, long ldx, long k, __m256 w0,
                                                           __m256 w1, __m256 acc[][2]) {
    for (int r = 0; r < R; r++) {
        __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
        acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
}

/* NOTE: m0, m1 are all-ones in the lanes of outputs that exist; full: all 16 exist. */
static inline __attribute__((always_inline)) void store_rows(int R, __m256 acc[][2], float *y, long ldy,
                                                             __m256i m0, __m256i m1, int full) {
    for (int r = 0; r < R; r++) {
        if (full) {
            _mm256_storeu_ps(y + r * ldy, acc[r][0]);
            _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
        } else {
            _mm256_maskstore_ps(y + r * ldy, m0, acc[r][0]);
            _mm256_maskstore_ps(y + r * ldy + 8, m1, acc[r][1]);
        }
    }
}

static inline __attribute__((always_inline)) void micro(int R, const float *x, long ldx, const float *w, long K,
                                                        float *y, long ldy, __m256i m0, __m256i m1, int full) {
    __m256 acc[MR][2];
    zero_rows(R, acc);
    for (long k = 0; k < K; k++) {
        __m256 w0 = _mm256_load_ps(w + k * NR), w1 = _mm256_load_ps(w + k * NR + 8);
        fma_rows(R, x, ldx, k, w0, w1, acc);
    }
    store_rows(R, acc, y, ldy, m0, m1, full);
}

#define MICRO(R) micro(R, xm, ldx, w + h * HR, K, y + m * ldy + h * HR, ldy, m0, m1, full)

/* Every row of x times a dequantised block w [K][32]: 6 rows x 16 outputs per tile. */
static void rows(const float *x, long ldx, long M, const float *w, long K, float *y, long ldy, long cols) {
    for (long m = 0; m < M; m += MR) {
        const float *xm = x + m * ldx;
        for (int h = 0; h < 2 && cols > h * HR; h++) {
            __m256i m0 = lanes(cols - h * HR), m1 = lanes(cols - h * HR - 8);
            int full = cols >= (h + 1) * HR;
            switch (M - m < MR ? M - m : MR) {
                case 6: MICRO(6); break;
                case 5: MICRO(5); break;
                case 4: MICRO(4); break;
                case 3: MICRO(3); break;
                case 2: MICRO(2); break;
                case 1: MICRO(1); break;
                default: break;
            }
        }
    }
}

/* Few rows, half h: each weight vector is dequantised in registers and used at once. */
static inline __attribute__((always_inline)) void fused(int bits, int R, int h, const float *x, long ldx,
                                                        const uint8_t *q, const float *s, const float *z, long K,
                                                        long group, float *y, long ldy, long cols) {
    __m256 acc[MR][2];
    zero_rows(R, acc);
    for (long g = 0; g < K / group; g++) {
        __m256 s0, s1, z0, z1, w0, w1;
        group_consts(s, z, g, h, &s0, &s1, &z0, &z1);
        for (long k = g * group; k < (g + 1) * group; k++) {
            weight_half(bits, q, k, h, s0, s1, z0, z1, z != 0, &w0, &w1);
            fma_rows(R, x, ldx, k, w0, w1, acc);
        }
    }
    store_rows(R, acc, y + h * HR, ldy, lanes(cols - h * HR), lanes(cols - h * HR - 8), cols >= (h + 1) * HR);
}

#define FUSED(R)                                                            \
    for (int h = 0; h < 2 && cols > h * HR; h++)                            \
        fused(bits, R, h, x, ldx, qb, sb, zb, K, group, yb, ldy, cols)

/* One block of 32 output rows: in registers for up to 6 rows of x, else dequantised into the
 * thread's buffer and multiplied 6 rows at a time. Returns -1 when the buffer is missing. */
static inline __attribute__((always_inline)) int block(int bits, const float *x, long M, long K, long ldx,
                                                       const uint8_t *qb, const float *sb, const float *zb,
                                                       long group, float *yb, long ldy, long cols) {
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

#include "../gemm_driver.h"
