/* The part of the grouped GEMM that is the same on every instruction set (grouped_gemm.c and
 * avx2/grouped_gemm.c include it at their end, after NR and their `block`): the blocks of NR
 * output rows shared by torch's OpenMP threads. */
#ifndef LLMQL_GEMM_DRIVER_H
#define LLMQL_GEMM_DRIVER_H

/* x [M, K] (row stride ldx) float32; q (bits 8 or 4), s, z packed as above for N output rows
 * (z may be NULL); y [M, N] (row stride ldy). Returns 0, or -1 when a buffer could not be
 * allocated or bits is neither 4 nor 8. */
int llmql_grouped_gemm(const float *x, long M, long K, long ldx, const void *q, int bits, const float *s,
                       const float *z, long N, long group, float *y, long ldy, int threads) {
    if (bits != 4 && bits != 8) return -1;
    long blocks = (N + NR - 1) / NR, groups = K / group, qstride = K * NR * bits / 8;
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : failed)
    for (long b = 0; b < blocks; b++) {
        const uint8_t *qb = (const uint8_t *)q + b * qstride;
        const float *sb = s + b * groups * NR, *zb = z ? z + b * groups * NR : 0;
        long cols = N - b * NR < NR ? N - b * NR : NR;
        int rc = bits == 4 ? block(4, x, M, K, ldx, qb, sb, zb, group, y + b * NR, ldy, cols)
                           : block(8, x, M, K, ldx, qb, sb, zb, group, y + b * NR, ldy, cols);
        if (rc) failed = 1;
    }
    return failed ? -1 : 0;
}

#endif
