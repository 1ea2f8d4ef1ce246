/* Paged attention on AVX2 + FMA (see kernels/attention_cpu.py: `c_paged_attention`).
 *
 * The same export, tasks and arithmetic as ../attention.c (the AVX-512 build), on 8-float
 * vectors, for CPUs without AVX-512.
 * q [T, Hq, D] float32; k/v caches [S, Hkv, D] float32, float16 or bfloat16 (the pool's
 * dtype), rows picked by kv_indices; sequence b has queries qo[b]..qo[b+1] at the last
 * positions of its kv[b+1] - kv[b] keys; query head h reads KV head h / (Hq / Hkv); a key
 * is visible to a query at position p when key <= p (and p - key < window when window > 0).
 * Each task takes one KV head of one sequence for up to 16 rows (queries x the query heads
 * of that KV head) and streams the visible keys in blocks of 16: the block's K and V rows are
 * widened to float32 once (float16 by F16C, bfloat16 shifted into the high half of a 32-bit
 * lane), each row's scores are 8 independent dot products at a time (8 accumulators, summed
 * across lanes together), then an online softmax (running max and sum, as FlashAttention)
 * folds the block into the row's float32 accumulator, 64 columns at a time in registers.
 * D must be a multiple of 16, at most 256.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define KB 16     /* keys per block */
#define ROWS 16   /* rows per task */
#define MAXG 16   /* query heads per KV head taken */
#define MAXD 256
#define PV 8      /* vectors of a row's accumulator held in registers */


/* One cache row (d values of dtype 0 f32, 1 f16, 2 bf16) widened into dst. */
static inline void widen(const void *src, int dtype, long d, float *dst) {
    for (long c = 0; c < d; c += 8) {
        __m256 v;
        if (dtype == 0) {
            v = _mm256_loadu_ps((const float *)src + c);
        } else if (dtype == 1) {
            v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + c)));
        } else {
            __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + c)));
            v = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        }
        _mm256_store_ps(dst + c, v);
    }
}

/* q . k for the 8 keys kb[0..8) (dots in lane order; nc vectors of 8 per row). */
static inline __m256 dots8(const float *q, float (*kb)[MAXD], long nc) {
    __m256 acc[8];
    for (int jj = 0; jj < 8; jj++) acc[jj] = _mm256_setzero_ps();
    for (long c = 0; c < nc; c++) {
        __m256 qv = _mm256_loadu_ps(q + c * 8);
        for (int jj = 0; jj < 8; jj++) acc[jj] = _mm256_fmadd_ps(qv, _mm256_load_ps(kb[jj] + c * 8), acc[jj]);
    }
    return hsum8x8(acc);
}

/* acc[0, C * 8) = acc * alpha + sum_jj p[jj] v[jj] (C vectors kept in registers). */
static inline __attribute__((always_inline)) void fold(int C, float *acc, float (*vb)[MAXD], long off,
                                                       long nb, const float *p, __m256 alpha) {
    __m256 av[PV];
    for (int i = 0; i < C; i++) av[i] = _mm256_mul_ps(_mm256_load_ps(acc + i * 8), alpha);
    for (long jj = 0; jj < nb; jj++) {
        __m256 pb = _mm256_broadcast_ss(p + jj);
        for (int i = 0; i < C; i++) av[i] = _mm256_fmadd_ps(pb, _mm256_load_ps(vb[jj] + off + i * 8), av[i]);
    }
    for (int i = 0; i < C; i++) _mm256_store_ps(acc + i * 8, av[i]);
}

#include "../attention_driver.h"

static void run_task(const Task *task, const float *q, const char *kc, const char *vc, int dtype,
                     long hq, long hkv, long d, const int64_t *qo, const int64_t *kv,
                     const int64_t *idx, float scale, long window, float *out) {
    long g = hq / hkv, esz = dtype == 0 ? 4 : 2, nc = d / 8;
    long lq = qo[task->b + 1] - qo[task->b], lk = kv[task->b + 1] - kv[task->b];
    long first_pos = lk - lq + (task->q0 - qo[task->b]);
    long rows = task->nq * g;
    float kb[KB][MAXD] __attribute__((aligned(32)));
    float vb[KB][MAXD] __attribute__((aligned(32)));
    float acc[ROWS][MAXD] __attribute__((aligned(32)));
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
        /* NOTE: keys past nb are zeroed so that their (discarded) dot products stay finite */
        for (long jj = nb; jj < (nb <= 8 ? 8 : KB); jj++) memset(kb[jj], 0, sizeof(float) * d);
        for (long r = 0; r < rows; r++) {
            long lo = window > 0 ? pos[r] - window + 1 : 0; /* visible: lo <= j <= pos[r] */
            if (j0 > pos[r] || j0 + nb - 1 < lo) continue;
            float s[KB] __attribute__((aligned(32)));
            _mm256_store_ps(s, dots8(qr[r], kb, nc));
            _mm256_store_ps(s + 8, nb > 8 ? dots8(qr[r], kb + 8, nc) : _mm256_setzero_ps());
            float best = -INFINITY;
            for (long jj = 0; jj < KB; jj++) {
                long j = j0 + jj;
                s[jj] = (jj < nb && j <= pos[r] && j >= lo) ? s[jj] * scale : -INFINITY;
                if (s[jj] > best) best = s[jj];
            }
            float m_new = m[r] > best ? m[r] : best;
            float alpha = m[r] == -INFINITY ? 0.0f : expf(m[r] - m_new);
            float pj[KB] __attribute__((aligned(32)));
            __m256 sum = _mm256_setzero_ps();
            for (int k = 0; k < KB; k += 8) {
                __m256 sv = _mm256_load_ps(s + k);
                __m256 p = exp256(_mm256_sub_ps(sv, _mm256_set1_ps(m_new)));
                p = _mm256_andnot_ps(_mm256_cmp_ps(sv, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ), p);
                _mm256_store_ps(pj + k, p);
                sum = _mm256_add_ps(sum, p);
            }
            l[r] = l[r] * alpha + hsum256(sum);
            m[r] = m_new;
            __m256 va = _mm256_set1_ps(alpha);
            long c = 0;
            for (; c + PV <= nc; c += PV) fold(PV, acc[r] + c * 8, vb, c * 8, nb, pj, va);
            for (; c < nc; c += 2) fold(2, acc[r] + c * 8, vb, c * 8, nb, pj, va); /* NOTE: nc is even */
        }
    }
    for (long r = 0; r < rows; r++) {
        long i = r / g, hh = task->h * g + r % g;
        float *o = out + ((task->q0 + i) * hq + hh) * d;
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (long c = 0; c < d; c++) o[c] = acc[r][c] * inv;
    }
}
