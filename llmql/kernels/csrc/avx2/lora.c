/* LoRA deltas of a mixed batch on AVX2 + FMA (see kernels/lora_cpu.py: `c_lora_delta`).
 *
 * The same export, tasks and semantics as ../lora.c (the AVX-512 build), on 8-float vectors,
 * for CPUs without AVX-512.
 * out[row] += (x[row] A_s^T) B_s^T for each listed row, s its adapter's pool slot, per
 * sub-projection i: A_s rows [i R, i R + r_s) of a [S, n_sub R, K], B_s rows [0, r_s) and
 * output columns [offsets[i], offsets[i+1]) of bt [S, R, N] (B rank-major: the CPU pool's
 * layout). Rows come sorted by slot.
 *
 * Two phases, each parallel over its own tasks:
 * - shrink: per run of up to 24 rows of one slot, xa = x A_s^T into a scratch [count, n_sub R]:
 *   blocks of 3 rows x 4 rank rows, 12 vector accumulators over K (each x load feeds 4 FMAs,
 *   each A load 3), summed across lanes at the end;
 * - expand: per (slot, sub-projection, output columns: 48, or more for a slot with few rows),
 *   every row of the slot in blocks of 4 rows x 24 columns: one rank step = 3 loads of bt + 4
 *   broadcasts -> 12 FMAs (a block short of 24 columns: masked loads and stores). Tasks own
 *   their output columns: no two write one element.
 * 12 accumulators leave 4 of the 16 ymm registers for a step's loads; 4 x 3 shrink blocks
 * measured the same, 6 rows x 16 columns expand blocks ~7% slower on prefill shapes.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define SHRINK_ROWS 24
#define SM 3           /* shrink: rows per register block */
#define SJ 4           /* shrink: rank rows per register block */
#define EM 4           /* expand: rows per register block */
#define EV 3           /* expand: column vectors per register block */
#define EC (8 * EV)    /* expand: output columns per register block */
#define NB (2 * EC)    /* output columns per expand task */

#include "../lora_driver.h"

/* xa[m][j] = x[m] . arow[j] for mb rows and jb rank columns (constants after inlining). */
static inline __attribute__((always_inline)) void shrink_block(
    int mb, int jb, const float *const *xr, const float *a, long k, float *xa, long ldxa) {
    __m256 acc[SM][SJ];
    for (int m = 0; m < mb; m++)
        for (int j = 0; j < jb; j++) acc[m][j] = _mm256_setzero_ps();
    long kfull = k / 8 * 8;
    for (long kk = 0; kk < kfull; kk += 8) {
        __m256 av[SJ];
        for (int j = 0; j < jb; j++) av[j] = _mm256_loadu_ps(a + j * k + kk);
        for (int m = 0; m < mb; m++) {
            __m256 xv = _mm256_loadu_ps(xr[m] + kk);
            for (int j = 0; j < jb; j++) acc[m][j] = _mm256_fmadd_ps(av[j], xv, acc[m][j]);
        }
    }
    if (k > kfull) {
        __m256i tail = lanes(k - kfull);
        __m256 av[SJ];
        for (int j = 0; j < jb; j++) av[j] = _mm256_maskload_ps(a + j * k + kfull, tail);
        for (int m = 0; m < mb; m++) {
            __m256 xv = _mm256_maskload_ps(xr[m] + kfull, tail);
            for (int j = 0; j < jb; j++) acc[m][j] = _mm256_fmadd_ps(av[j], xv, acc[m][j]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int j = 0; j < jb; j++) xa[m * ldxa + j] = hsum256(acc[m][j]);
}

#define SHRINK_ROWS_CASES(JB)                                                    \
    switch (mb) {                                                                \
    case 1: shrink_block(1, JB, xr + m, arow, k, xam, ldxa); break;              \
    case 2: shrink_block(2, JB, xr + m, arow, k, xam, ldxa); break;              \
    default: shrink_block(SM, JB, xr + m, arow, k, xam, ldxa); break;            \
    }

/* One run chunk's xa rows: [count][n_sub R] at xa (rank columns >= r left unset). */
static void shrink_task(const Run *t, const float *x, long ldx, long k, const int64_t *rows,
                        const float *a, long R, long n_sub, long r, float *xa) {
    const float *xr[SHRINK_ROWS];
    long ldxa = n_sub * R;
    for (long m = 0; m < t->count; m++) xr[m] = x + rows[t->start + m] * ldx;
    for (long m = 0; m < t->count; m += SM) {
        int mb = t->count - m < SM ? (int)(t->count - m) : SM;
        for (long i = 0; i < n_sub; i++)
            for (long j = 0; j < r; j += SJ) {
                const float *arow = a + ((t->slot * n_sub + i) * R + j) * k;
                float *xam = xa + (t->start + m) * ldxa + i * R + j;
                switch (r - j < SJ ? r - j : SJ) {
                case 1: SHRINK_ROWS_CASES(1) break;
                case 2: SHRINK_ROWS_CASES(2) break;
                case 3: SHRINK_ROWS_CASES(3) break;
                default: SHRINK_ROWS_CASES(SJ) break;
                }
            }
    }
}

/* out[m][0..24) += sum_j xam[m][j] bs[j][0..24) for mb rows (bs: rank-major B, row stride
 * ldb). full: all 24 columns exist (plain loads and stores), else the lanes of masks[q]
 * (column vector q's; none where it lies beyond the block). */
static inline __attribute__((always_inline)) void expand_block(
    int mb, int full, long r, const float *xam, long ldxa, const float *bs, long ldb, float *const *orow,
    const __m256i *masks) {
    __m256 acc[EM][EV];
    for (int m = 0; m < mb; m++)
        for (int q = 0; q < EV; q++) acc[m][q] = _mm256_setzero_ps();
    for (long j = 0; j < r; j++) {
        const float *bj = bs + j * ldb;
        __m256 bv[EV];
        for (int q = 0; q < EV; q++)
            bv[q] = full ? _mm256_loadu_ps(bj + 8 * q) : _mm256_maskload_ps(bj + 8 * q, masks[q]);
        for (int m = 0; m < mb; m++) {
            __m256 xv = _mm256_broadcast_ss(xam + m * ldxa + j);
            for (int q = 0; q < EV; q++) acc[m][q] = _mm256_fmadd_ps(xv, bv[q], acc[m][q]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int q = 0; q < EV; q++) {
            float *o = orow[m] + 8 * q;
            if (full)
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[m][q]));
            else
                _mm256_maskstore_ps(o, masks[q], _mm256_add_ps(_mm256_maskload_ps(o, masks[q]), acc[m][q]));
        }
}

#define EXPAND_CASES(FULL)                                                                  \
    switch (mb) {                                                                           \
    case 1: expand_block(1, FULL, r, xam, ldxa, bs, n, orow, masks); break;                 \
    case 2: expand_block(2, FULL, r, xam, ldxa, bs, n, orow, masks); break;                 \
    case 3: expand_block(3, FULL, r, xam, ldxa, bs, n, orow, masks); break;                 \
    default: expand_block(EM, FULL, r, xam, ldxa, bs, n, orow, masks); break;               \
    }

/* Output columns [n0, min(n0 + NB, n_end)) of sub-projection `sub` for every row of the run,
 * 24 at a time. */
static void expand_task(const Run *run, long sub, long n0, long n_end, const int64_t *rows,
                        const float *xa, long ldxa, const float *bt, long R, long n, long r,
                        float *out, long ldo) {
    long n1 = n_end - n0 < NB ? n_end : n0 + NB;
    for (long c = n0; c < n1; c += EC) {
        int full = n1 - c >= EC;
        __m256i masks[EV];
        for (int q = 0; q < EV; q++) masks[q] = lanes(n1 - c - 8 * q);
        const float *bs = bt + run->slot * R * n + c; /* row j: rank j's 24 output columns */
        for (long m = 0; m < run->count; m += EM) {
            int mb = run->count - m < EM ? (int)(run->count - m) : EM;
            float *orow[EM];
            for (int mm = 0; mm < mb; mm++) orow[mm] = out + rows[run->start + m + mm] * ldo + c;
            const float *xam = xa + (run->start + m) * ldxa + sub * R;
            if (full) {
                EXPAND_CASES(1)
            } else {
                EXPAND_CASES(0)
            }
        }
    }
}
