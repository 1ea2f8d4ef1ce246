/* Paged attention on AVX-512 (see kernels/attention_cpu.py: `c_paged_attention`).
 *
 * q [T, Hq, D] float32; k/v caches [S, Hkv, D] float32, float16 or bfloat16 (the pool's
 * dtype), rows picked by kv_indices; sequence b has queries qo[b]..qo[b+1] at the last
 * positions of its kv[b+1] - kv[b] keys; query head h reads KV head h / (Hq / Hkv); a key
 * is visible to a query at position p when key <= p (and p - key < window when window > 0).
 * Each task takes one KV head of one sequence for up to 16 rows (queries x the query heads
 * of that KV head) and streams the visible keys in blocks of 16: the block's K and V rows are
 * widened to float32 once, each row's 16 scores are 16 independent dot products, then an
 * online softmax (running max and sum, as FlashAttention) folds the block into the row's
 * float32 accumulator. D must be a multiple of 16, at most 256.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define KB 16     /* keys per block */
#define ROWS 16   /* rows per task */
#define MAXD 256


/* One cache row (d values of dtype 0 f32, 1 f16, 2 bf16) widened into dst. */
static inline void widen(const void *src, int dtype, long d, float *dst) {
    for (long c = 0; c < d; c += 16) {
        __m512 v;
        if (dtype == 0) {
            v = _mm512_loadu_ps((const float *)src + c);
        } else if (dtype == 1) {
            v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + c)));
        } else {
            __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + c)));
            v = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        }
        _mm512_store_ps(dst + c, v);
    }
}

typedef struct {
    long b, h, q0, nq; /* sequence, KV head, first query (absolute row), queries */
} Task;

static void run_task(const Task *task, const float *q, const char *kc, const char *vc, int dtype,
                     long hq, long hkv, long d, const int64_t *qo, const int64_t *kv,
                     const int64_t *idx, float scale, long window, float *out) {
    long g = hq / hkv, esz = dtype == 0 ? 4 : 2, nc = d / 16;
    long lq = qo[task->b + 1] - qo[task->b], lk = kv[task->b + 1] - kv[task->b];
    long first_pos = lk - lq + (task->q0 - qo[task->b]);
    long rows = task->nq * g;
    float kb[KB][MAXD] __attribute__((aligned(64)));
    float vb[KB][MAXD] __attribute__((aligned(64)));
    float acc[ROWS][MAXD] __attribute__((aligned(64)));
    float m[ROWS], l[ROWS];
    long pos[ROWS];
    const float *qr[ROWS];
    for (long r = 0; r < rows; r++) {
        long i = r / g, hh = task->h * g + r % g; /* query i of the task, query head hh */
        pos[r] = first_pos + i;
        qr[r] = q + ((task->q0 + i) * hq + hh) * d;
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (long c = 0; c < d; c++) acc[r][c] = 0.0f;
    }
    long last = first_pos + task->nq - 1;
    long start = window > 0 && first_pos - window + 1 > 0 ? first_pos - window + 1 : 0;
    const int64_t *slots = idx + kv[task->b];
    for (long j0 = start; j0 <= last; j0 += KB) {
        long nb = last - j0 + 1 < KB ? last - j0 + 1 : KB;
        for (long jj = 0; jj < nb; jj++) {
            long off = (slots[j0 + jj] * hkv + task->h) * d * esz;
            widen(kc + off, dtype, d, kb[jj]);
            widen(vc + off, dtype, d, vb[jj]);
        }
        for (long r = 0; r < rows; r++) {
            long lo = window > 0 ? pos[r] - window + 1 : 0; /* visible: lo <= j <= pos[r] */
            if (j0 > pos[r] || j0 + nb - 1 < lo) continue;
            __m512 dots[KB];
            for (long jj = 0; jj < KB; jj++) dots[jj] = _mm512_setzero_ps();
            for (long c = 0; c < nc; c++) {
                __m512 qv = _mm512_loadu_ps(qr[r] + c * 16);
                for (long jj = 0; jj < KB; jj++)
                    if (jj < nb) dots[jj] = _mm512_fmadd_ps(qv, _mm512_load_ps(kb[jj] + c * 16), dots[jj]);
            }
            float s[KB] __attribute__((aligned(64)));
            float best = -INFINITY;
            for (long jj = 0; jj < KB; jj++) {
                long j = j0 + jj;
                s[jj] = (jj < nb && j <= pos[r] && j >= lo) ? _mm512_reduce_add_ps(dots[jj]) * scale : -INFINITY;
                if (s[jj] > best) best = s[jj];
            }
            float m_new = m[r] > best ? m[r] : best;
            float alpha = m[r] == -INFINITY ? 0.0f : expf(m[r] - m_new);
            __m512 p = exp512(_mm512_sub_ps(_mm512_load_ps(s), _mm512_set1_ps(m_new)));
            p = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_load_ps(s), _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ),
                                     p, _mm512_setzero_ps());
            float pj[KB] __attribute__((aligned(64)));
            _mm512_store_ps(pj, p);
            l[r] = l[r] * alpha + _mm512_reduce_add_ps(p);
            m[r] = m_new;
            __m512 av[MAXD / 16];
            __m512 va = _mm512_set1_ps(alpha);
            for (long c = 0; c < nc; c++) av[c] = _mm512_mul_ps(_mm512_load_ps(acc[r] + c * 16), va);
            for (long jj = 0; jj < nb; jj++) {
                __m512 pb = _mm512_set1_ps(pj[jj]);
                for (long c = 0; c < nc; c++) av[c] = _mm512_fmadd_ps(pb, _mm512_load_ps(vb[jj] + c * 16), av[c]);
            }
            for (long c = 0; c < nc; c++) _mm512_store_ps(acc[r] + c * 16, av[c]);
        }
    }
    for (long r = 0; r < rows; r++) {
        long i = r / g, hh = task->h * g + r % g;
        float *o = out + ((task->q0 + i) * hq + hh) * d;
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (long c = 0; c < d; c++) o[c] = acc[r][c] * inv;
    }
}

/* Returns 0, or -1 for a shape it does not take (the caller then uses its torch path). */
int llmql_paged_attention(const float *q, const void *k_cache, const void *v_cache, int dtype,
                          long hq, long hkv, long d, const int64_t *qo, const int64_t *kv, long batch,
                          const int64_t *idx, float scale, long window, float *out, int threads) {
    if (d % 16 || d > MAXD || hq % hkv || hq / hkv > ROWS || dtype < 0 || dtype > 2) return -1;
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
