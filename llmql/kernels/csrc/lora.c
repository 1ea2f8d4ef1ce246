/* LoRA deltas of a mixed batch on AVX-512 (see kernels/lora_cpu.py: `c_lora_delta`).
 *
 * out[row] += (x[row] A_s^T) B_s^T for each listed row, s its adapter's pool slot, per
 * sub-projection i: A_s rows [i R, i R + r_s) of a [S, n_sub R, K], B_s columns [0, r_s) and
 * output columns [offsets[i], offsets[i+1]) of b [S, N, R]. Rows come sorted by slot; each
 * task takes up to 16 rows of one slot: the shrink reads each A row once for all of them
 * (16 independent dot products), the expand transposes a 16-column block of B once (in
 * registers) and accumulates every row's 16 outputs in a vector. Tasks own their rows: no two write one row.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define CH 16
#define MAXR 64
#define MAXSUB 4

typedef struct {
    long start, count, slot;
} LoraTask;

/* 16 vectors of 16 floats transposed in registers (r[i][j] <- r[j][i]). */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 2]);
        __m512d c = _mm512_castps_pd(t[i + 1]), d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

static void lora_task(const LoraTask *t, const float *x, long ldx, long k, const int64_t *rows,
                      const float *a, const float *b, long R, long n, const int64_t *offsets, long n_sub,
                      long r, float *out, long ldo) {
    float xa[CH][MAXSUB * MAXR];
    const float *xr[CH];
    long c = t->count;
    for (long m = 0; m < c; m++) xr[m] = x + rows[t->start + m] * ldx;
    long kfull = k / 16 * 16;
    __mmask16 tail = (__mmask16)((1u << (k - kfull)) - 1);
    for (long i = 0; i < n_sub; i++) {
        for (long j = 0; j < r; j++) {
            const float *arow = a + ((t->slot * n_sub + i) * R + j) * k;
            __m512 acc[CH];
            for (long m = 0; m < CH; m++) acc[m] = _mm512_setzero_ps();
            for (long kk = 0; kk < kfull; kk += 16) {
                __m512 av = _mm512_loadu_ps(arow + kk);
                for (long m = 0; m < CH; m++)
                    if (m < c) acc[m] = _mm512_fmadd_ps(av, _mm512_loadu_ps(xr[m] + kk), acc[m]);
            }
            if (tail) {
                __m512 av = _mm512_maskz_loadu_ps(tail, arow + kfull);
                for (long m = 0; m < c; m++)
                    acc[m] = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(tail, xr[m] + kfull), acc[m]);
            }
            for (long m = 0; m < c; m++) xa[m][i * r + j] = _mm512_reduce_add_ps(acc[m]);
        }
    }
    float bt[MAXR][16] __attribute__((aligned(64)));
    for (long i = 0; i < n_sub; i++) {
        for (long n0 = offsets[i]; n0 < offsets[i + 1]; n0 += 16) {
            long nb = offsets[i + 1] - n0 < 16 ? offsets[i + 1] - n0 : 16;
            __mmask16 mask = (__mmask16)((1u << nb) - 1);
            const float *bs = b + (t->slot * n + n0) * R;
            for (long jc = 0; jc < r; jc += 16) { /* B's block transposed 16 x 16 in registers */
                long w = r - jc < 16 ? r - jc : 16;
                __mmask16 jm = w == 16 ? 0xFFFF : (__mmask16)((1u << w) - 1);
                __m512 v[16];
                for (long q = 0; q < 16; q++)
                    v[q] = q < nb ? _mm512_maskz_loadu_ps(jm, bs + q * R + jc) : _mm512_setzero_ps();
                transpose16(v);
                for (long jj = 0; jj < w; jj++) _mm512_store_ps(bt[jc + jj], v[jj]);
            }
            for (long m = 0; m < c; m++) {
                float *o = out + rows[t->start + m] * ldo + n0;
                __m512 acc = _mm512_maskz_loadu_ps(mask, o);
                for (long j = 0; j < r; j++)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(xa[m][i * r + j]), _mm512_load_ps(bt[j]), acc);
                _mm512_mask_storeu_ps(o, mask, acc);
            }
        }
    }
}

/* rows [count] (x/out row ids) and slots [count], sorted by slot, slots > 0; ranks [S].
 * Returns 0, or -1 for shapes it does not take (rank stride over 64, more than 4
 * sub-projections) or when memory runs out; the caller then uses its torch path. */
int llmql_lora_delta(const float *x, long ldx, long k, const int64_t *rows, const int64_t *slots, long count,
                     const float *a, const float *b, long R, long n, const int64_t *offsets, long n_sub,
                     const int64_t *ranks, float *out, long ldo, int threads) {
    if (R > MAXR || n_sub > MAXSUB || n_sub < 1) return -1;
    LoraTask *tasks = (LoraTask *)malloc(sizeof(LoraTask) * (count ? count : 1));
    if (!tasks) return -1;
    long nt = 0;
    for (long i = 0; i < count;) {
        long j = i;
        while (j < count && slots[j] == slots[i] && j - i < CH) j++;
        if (ranks[slots[i]] > 0) {
            LoraTask t = {i, j - i, slots[i]};
            tasks[nt++] = t;
        }
        i = j;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (nt > 1)
    for (long i = 0; i < nt; i++)
        lora_task(&tasks[i], x, ldx, k, rows, a, b, R, n, offsets, n_sub, ranks[tasks[i].slot], out, ldo);
    free(tasks);
    return 0;
}
