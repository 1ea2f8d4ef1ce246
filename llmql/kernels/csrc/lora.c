/* LoRA deltas of a mixed batch on AVX-512 (see kernels/lora_cpu.py: `c_lora_delta`).
 *
 * out[row] += (x[row] A_s^T) B_s^T for each listed row, s its adapter's pool slot, per
 * sub-projection i: A_s rows [i R, i R + r_s) of a [S, n_sub R, K], B_s rows [0, r_s) and
 * output columns [offsets[i], offsets[i+1]) of bt [S, R, N] (B rank-major: the CPU pool's
 * layout). Rows come sorted by slot.
 *
 * Two phases, each parallel over its own tasks:
 * - shrink: per run of up to 24 rows of one slot, xa = x A_s^T into a scratch [count, n_sub R]:
 *   blocks of 6 rows x 4 rank rows, 24 vector accumulators over K (each x and A load feeds
 *   4 or 6 FMAs);
 * - expand: per (slot, sub-projection, output columns: 64, or more for a slot with few rows),
 *   every row of the slot in blocks of 6 rows x 64 columns: one rank step = 4 loads of bt + 6
 *   broadcasts -> 24 FMAs. Tasks own their output columns: no two write one element.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define SHRINK_ROWS 24
#define MB 6  /* rows per register block */
#define NB 64 /* output columns per expand task */

#include "lora_driver.h"

/* xa[m][j] = x[m] . arow[j] for mb rows and jb rank columns (constants after inlining). */
static inline __attribute__((always_inline)) void shrink_block(
    int mb, int jb, const float *const *xr, const float *a, long k, float *xa, long ldxa) {
    __m512 acc[MB][4];
    for (int m = 0; m < mb; m++)
        for (int j = 0; j < jb; j++) acc[m][j] = _mm512_setzero_ps();
    long kfull = k / 16 * 16;
    for (long kk = 0; kk < kfull; kk += 16) {
        __m512 av[4];
        for (int j = 0; j < jb; j++) av[j] = _mm512_loadu_ps(a + j * k + kk);
        for (int m = 0; m < mb; m++) {
            __m512 xv = _mm512_loadu_ps(xr[m] + kk);
            for (int j = 0; j < jb; j++) acc[m][j] = _mm512_fmadd_ps(av[j], xv, acc[m][j]);
        }
    }
    if (k > kfull) {
        __mmask16 tail = (__mmask16)((1u << (k - kfull)) - 1);
        __m512 av[4];
        for (int j = 0; j < jb; j++) av[j] = _mm512_maskz_loadu_ps(tail, a + j * k + kfull);
        for (int m = 0; m < mb; m++) {
            __m512 xv = _mm512_maskz_loadu_ps(tail, xr[m] + kfull);
            for (int j = 0; j < jb; j++) acc[m][j] = _mm512_fmadd_ps(av[j], xv, acc[m][j]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int j = 0; j < jb; j++) xa[m * ldxa + j] = _mm512_reduce_add_ps(acc[m][j]);
}

#define SHRINK_CASES(JB)                                                         \
    switch (mb) {                                                                \
    case 1: shrink_block(1, JB, xr + m, arow, k, xam, ldxa); break;              \
    case 2: shrink_block(2, JB, xr + m, arow, k, xam, ldxa); break;              \
    case 3: shrink_block(3, JB, xr + m, arow, k, xam, ldxa); break;              \
    case 4: shrink_block(4, JB, xr + m, arow, k, xam, ldxa); break;              \
    case 5: shrink_block(5, JB, xr + m, arow, k, xam, ldxa); break;              \
    default: shrink_block(MB, JB, xr + m, arow, k, xam, ldxa); break;            \
    }

/* One run chunk's xa rows: [count][n_sub R] at xa (rank columns >= r left unset). */
static void shrink_task(const Run *t, const float *x, long ldx, long k, const int64_t *rows,
                        const float *a, long R, long n_sub, long r, float *xa) {
    const float *xr[SHRINK_ROWS];
    long ldxa = n_sub * R;
    for (long m = 0; m < t->count; m++) xr[m] = x + rows[t->start + m] * ldx;
    for (long m = 0; m < t->count; m += MB) {
        int mb = t->count - m < MB ? (int)(t->count - m) : MB;
        for (long i = 0; i < n_sub; i++) {
            long j = 0;
            for (; j + 4 <= r; j += 4) {
                const float *arow = a + ((t->slot * n_sub + i) * R + j) * k;
                float *xam = xa + (t->start + m) * ldxa + i * R + j;
                SHRINK_CASES(4)
            }
            for (; j < r; j++) {
                const float *arow = a + ((t->slot * n_sub + i) * R + j) * k;
                float *xam = xa + (t->start + m) * ldxa + i * R + j;
                SHRINK_CASES(1)
            }
        }
    }
}

/* out[m][0..64) += sum_j xam[m][j] bs[j][0..64) for mb rows (bs: rank-major B, row stride
 * ldb; masks: which of the 4 column vectors exist, and their tails). */
static inline __attribute__((always_inline)) void expand_block(
    int mb, long r, const float *xam, long ldxa, const float *bs, long ldb, float *const *orow,
    const __mmask16 *masks) {
    __m512 acc[MB][4];
    for (int m = 0; m < mb; m++)
        for (int q = 0; q < 4; q++) acc[m][q] = _mm512_setzero_ps();
    for (long j = 0; j < r; j++) {
        const float *bj = bs + j * ldb;
        __m512 b0 = _mm512_maskz_loadu_ps(masks[0], bj), b1 = _mm512_maskz_loadu_ps(masks[1], bj + 16);
        __m512 b2 = _mm512_maskz_loadu_ps(masks[2], bj + 32), b3 = _mm512_maskz_loadu_ps(masks[3], bj + 48);
        for (int m = 0; m < mb; m++) {
            __m512 xv = _mm512_set1_ps(xam[m * ldxa + j]);
            acc[m][0] = _mm512_fmadd_ps(xv, b0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(xv, b1, acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(xv, b2, acc[m][2]);
            acc[m][3] = _mm512_fmadd_ps(xv, b3, acc[m][3]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int q = 0; q < 4; q++)
            if (masks[q]) {
                float *o = orow[m] + 16 * q;
                _mm512_mask_storeu_ps(o, masks[q], _mm512_add_ps(_mm512_maskz_loadu_ps(masks[q], o), acc[m][q]));
            }
}

static void expand_task(const Run *run, long sub, long n0, long n_end, const int64_t *rows,
                        const float *xa, long ldxa, const float *bt, long R, long n, long r,
                        float *out, long ldo) {
    long nb = n_end - n0 < NB ? n_end - n0 : NB;
    __mmask16 masks[4];
    for (int q = 0; q < 4; q++) {
        long w = nb - 16 * q;
        masks[q] = w >= 16 ? 0xFFFF : w > 0 ? (__mmask16)((1u << w) - 1) : 0;
    }
    const float *bs = bt + run->slot * R * n + n0; /* row j: rank j's 64 output columns */
    for (long m = 0; m < run->count; m += MB) {
        int mb = run->count - m < MB ? (int)(run->count - m) : MB;
        float *orow[MB];
        for (int mm = 0; mm < mb; mm++) orow[mm] = out + rows[run->start + m + mm] * ldo + n0;
        const float *xam = xa + (run->start + m) * ldxa + sub * R;
        switch (mb) {
        case 1: expand_block(1, r, xam, ldxa, bs, n, orow, masks); break;
        case 2: expand_block(2, r, xam, ldxa, bs, n, orow, masks); break;
        case 3: expand_block(3, r, xam, ldxa, bs, n, orow, masks); break;
        case 4: expand_block(4, r, xam, ldxa, bs, n, orow, masks); break;
        case 5: expand_block(5, r, xam, ldxa, bs, n, orow, masks); break;
        default: expand_block(MB, r, xam, ldxa, bs, n, orow, masks); break;
        }
    }
}
