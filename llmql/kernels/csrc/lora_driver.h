/* The part of the LoRA delta kernel that is the same on every instruction set (lora.c and
 * avx2/lora.c include it after defining SHRINK_ROWS, rows per shrink task, and NB, output
 * columns per expand step): the runs of rows per slot, the shrink and expand task lists, the
 * xa scratch, and the OpenMP loops over the includer's shrink_task and expand_task. */
#ifndef LLMQL_LORA_DRIVER_H
#define LLMQL_LORA_DRIVER_H

#include <stdint.h>
#include <stdlib.h>

typedef struct {
    long start, count, slot;
} Run;

typedef struct {
    long run, sub, n0, n1; /* output columns [n0, n1) of sub-projection `sub` */
} ExpandTask;

static void shrink_task(const Run *t, const float *x, long ldx, long k, const int64_t *rows,
                        const float *a, long R, long n_sub, long r, float *xa);
static void expand_task(const Run *run, long sub, long n0, long n_end, const int64_t *rows,
                        const float *xa, long ldxa, const float *bt, long R, long n, long r,
                        float *out, long ldo);

/* rows [count] (x/out row ids) and slots [count], sorted by slot, slots > 0; ranks [S]; bt
 * [S, R, n]: B rank-major. Returns 0, or -1 when memory runs out (nothing written); the
 * caller then uses its torch path. */
int llmql_lora_delta(const float *x, long ldx, long k, const int64_t *rows, const int64_t *slots, long count,
                     const float *a, const float *bt, long R, long n, const int64_t *offsets, long n_sub,
                     const int64_t *ranks, float *out, long ldo, int threads) {
    if (count == 0 || n_sub < 1) return 0;
    long ldxa = n_sub * R, runs = 0, chunks = 0, blocks = 0;
    for (long i = 0; i < n_sub; i++) blocks += (offsets[i + 1] - offsets[i] + NB - 1) / NB;
    for (long i = 0; i < count; i++)
        if (i == 0 || slots[i] != slots[i - 1]) runs++;
    Run *run = (Run *)malloc(sizeof(Run) * (size_t)runs);
    Run *chunk = (Run *)malloc(sizeof(Run) * (size_t)(count + runs));
    ExpandTask *etask = (ExpandTask *)malloc(sizeof(ExpandTask) * (size_t)(runs * blocks));
    float *xa = (float *)malloc(sizeof(float) * (size_t)(count * ldxa));
    if (!run || !chunk || !etask || !xa) {
        free(run), free(chunk), free(etask), free(xa);
        return -1;
    }
    long nr = 0, ne = 0;
    for (long i = 0; i < count;) {
        long j = i;
        while (j < count && slots[j] == slots[i]) j++;
        if (ranks[slots[i]] > 0) {
            Run t = {i, j - i, slots[i]};
            run[nr++] = t;
            for (long c = i; c < j; c += SHRINK_ROWS) {
                Run u = {c, j - c < SHRINK_ROWS ? j - c : SHRINK_ROWS, slots[i]};
                chunk[chunks++] = u;
            }
        }
        i = j;
    }
    for (long t = 0; t < nr; t++) { /* a few rows: several column blocks per task */
        long span = NB * (run[t].count >= 16 ? 1 : 16 / run[t].count);
        for (long i = 0; i < n_sub; i++)
            for (long n0 = offsets[i]; n0 < offsets[i + 1]; n0 += span) {
                ExpandTask e = {t, i, n0, n0 + span < offsets[i + 1] ? n0 + span : offsets[i + 1]};
                etask[ne++] = e;
            }
    }
#pragma omp parallel num_threads(threads) if (count > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (long i = 0; i < chunks; i++)
            shrink_task(&chunk[i], x, ldx, k, rows, a, R, n_sub, ranks[chunk[i].slot], xa);
#pragma omp for schedule(dynamic, 1)
        for (long i = 0; i < ne; i++) {
            const ExpandTask *e = &etask[i];
            for (long n0 = e->n0; n0 < e->n1; n0 += NB)
                expand_task(&run[e->run], e->sub, n0, e->n1, rows, xa, ldxa, bt, R, n,
                            ranks[run[e->run].slot], out, ldo);
        }
    }
    free(run), free(chunk), free(etask), free(xa);
    return 0;
}

#endif
