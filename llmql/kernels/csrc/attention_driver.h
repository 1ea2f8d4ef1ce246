/* The part of the paged attention kernel that is the same on every instruction set
 * (attention.c and avx2/attention.c include it after defining MAXD, the largest head dim,
 * MAXG, the most query heads per KV head, and ROWS, rows per task): the checks, the task list
 * (one KV head of one sequence for up to ROWS / (Hq / Hkv) queries) and the OpenMP loop over
 * the includer's run_task. */
#ifndef LLMQL_ATTENTION_DRIVER_H
#define LLMQL_ATTENTION_DRIVER_H

#include <stdint.h>
#include <stdlib.h>

typedef struct {
    long b, h, q0, nq; /* sequence, KV head, first query (absolute row), queries */
} Task;

static void run_task(const Task *task, const float *q, const char *kc, const char *vc, int dtype,
                     long hq, long hkv, long d, const int64_t *qo, const int64_t *kv,
                     const int64_t *idx, float scale, long window, float *out);

/* Returns 0, or -1 for a shape it does not take (the caller then uses its torch path). */
int llmql_paged_attention(const float *q, const void *k_cache, const void *v_cache, int dtype,
                          long hq, long hkv, long d, const int64_t *qo, const int64_t *kv, long batch,
                          const int64_t *idx, float scale, long window, float *out, int threads) {
    if (d % 16 || d > MAXD || hq % hkv || hq / hkv > MAXG || dtype < 0 || dtype > 2) return -1;
    long g = hq / hkv, per = ROWS / g, count = 0;
    for (long b = 0; b < batch; b++) count += ((qo[b + 1] - qo[b]) + per - 1) / per * hkv;
    Task *tasks = (Task *)malloc(sizeof(Task) * (count ? count : 1));
    if (!tasks) return -1;
    long n = 0;
    for (long b = 0; b < batch; b++)
        for (long q0 = qo[b]; q0 < qo[b + 1]; q0 += per)
            for (long h = 0; h < hkv; h++) {
                Task t = {b, h, q0, qo[b + 1] - q0 < per ? qo[b + 1] - q0 : per};
                tasks[n++] = t;
            }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (n > 1)
    for (long i = 0; i < n; i++)
        run_task(&tasks[i], q, (const char *)k_cache, (const char *)v_cache, dtype, hq, hkv, d, qo, kv,
                 idx, scale, window, out);
    free(tasks);
    return 0;
}

#endif
