/* Paged attention on AVX-512 (see kernels/attention_cpu.py: `c_paged_attention`).
 *
 * q [T, Hq, D] float32; k/v caches [S, Hkv, D] float32, float16 or bfloat16 (the pool's
 * dtype), rows picked by kv_indices; sequence b has queries qo[b]..qo[b+1] at the last
 * positions of its kv[b+1] - kv[b] keys; query head h reads KV head h / (Hq / Hkv); a key
 * is visible to a query at position p when key <= p (and p - key < window when window > 0).
 * Each task takes one KV head of one sequence for up to 64 rows (queries x the query heads
 * of that KV head) and streams the visible keys in blocks of 16: the block's K and V rows are
 * widened to float32 once for all the rows; scores two rows x 8 keys at a time (16
 * accumulators over D, summed by one reduction tree), then per row an online softmax
 * (running max and sum, as FlashAttention) of its visible keys, then acc = acc * alpha + p V
 * in register blocks of 4 rows x 64 columns. D must be a multiple of 16, at most 256.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define KB 16     /* keys per block */
#define ROWS 64   /* rows per task */
#define MAXD 256
#define RB 4     /* rows per register block of p V */
#define MAXG 16   /* query heads per KV head taken (as the AVX2 build) */


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

/* v[i] summed across its 16 lanes into lane i of the result (a reduction tree: 45 ops for
 * 16 sums where 16 separate reductions take ~130). */
static inline __m512 hsum16x16(const __m512 v[16]) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xdd));
}

/* Dot products of two query rows with 8 widened keys: s0[j] = q0 . k[j], s1[j] = q1 . k[j]
 * (s1 may be 0: q1 is then a copy of q0 and its sums are dropped). Each K load feeds 2 FMAs,
 * each q load 8. */
static inline void scores(const float *q0, const float *q1, float (*k)[MAXD], long nc, float *s0, float *s1) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
    for (long c = 0; c < nc; c++) {
        __m512 a = _mm512_loadu_ps(q0 + c * 16), b = _mm512_loadu_ps(q1 + c * 16);
        for (int j = 0; j < 8; j++) {
            __m512 kv = _mm512_load_ps(k[j] + c * 16);
            acc[j] = _mm512_fmadd_ps(a, kv, acc[j]);
            acc[8 + j] = _mm512_fmadd_ps(b, kv, acc[8 + j]);
        }
    }
    __m512 sums = hsum16x16(acc);
    _mm256_storeu_ps(s0, _mm512_castps512_ps256(sums));
    if (s1) _mm256_storeu_ps(s1, _mm512_extractf32x8_ps(sums, 1));
}

/* acc[r][cols] = acc[r][cols] * alpha[r] + sum_j p[r][j] vb[j][cols] for rb rows and cb x 16
 * columns from column chunk c (constants after inlining: rb x cb accumulators). */
static inline __attribute__((always_inline)) void pv_block(int rb, int cb, float (*acc)[MAXD], const float *alpha,
                                                           float (*p)[KB], float (*vb)[MAXD], long nb, long c) {
    __m512 av[RB][4];
    for (int i = 0; i < rb; i++)
        for (int q = 0; q < cb; q++)
            av[i][q] = _mm512_mul_ps(_mm512_load_ps(acc[i] + (c + q) * 16), _mm512_set1_ps(alpha[i]));
    for (long jj = 0; jj < nb; jj++) {
        __m512 v[4];
        for (int q = 0; q < cb; q++) v[q] = _mm512_load_ps(vb[jj] + (c + q) * 16);
        for (int i = 0; i < rb; i++) {
            __m512 pb = _mm512_set1_ps(p[i][jj]);
            for (int q = 0; q < cb; q++) av[i][q] = _mm512_fmadd_ps(pb, v[q], av[i][q]);
        }
    }
    for (int i = 0; i < rb; i++)
        for (int q = 0; q < cb; q++) _mm512_store_ps(acc[i] + (c + q) * 16, av[i][q]);
}

#define PV_CASES(CB, C)                                                          \
    switch (rb) {                                                                \
    case 1: pv_block(1, CB, acc + r, alpha + r, p + r, vb, nb, C); break;       \
    case 2: pv_block(2, CB, acc + r, alpha + r, p + r, vb, nb, C); break;       \
    case 3: pv_block(3, CB, acc + r, alpha + r, p + r, vb, nb, C); break;       \
    default: pv_block(RB, CB, acc + r, alpha + r, p + r, vb, nb, C); break;     \
    }

#include "attention_driver.h"

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
        /* NOTE: keys past nb are zeroed so that their (discarded) dot products stay finite */
        for (long jj = nb; jj < KB; jj++) memset(kb[jj], 0, sizeof(float) * d);
        float s[ROWS][KB] __attribute__((aligned(64)));
        for (long r = 0; r < rows; r += 2) /* scores, two rows x 8 keys at a time */
            for (long h8 = 0; h8 < KB; h8 += 8)
                if (h8 < nb) scores(qr[r], qr[r + 1 < rows ? r + 1 : r], kb + h8, nc, s[r] + h8,
                                    r + 1 < rows ? s[r + 1] + h8 : 0);
        float p[ROWS][KB] __attribute__((aligned(64)));
        float alpha[ROWS];
        /* NOTE: key offsets from j0 as int32 (a block's keys differ by < 16) */
        const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __mmask16 present = (__mmask16)((1u << nb) - 1);
        for (long r = 0; r < rows; r++) { /* online softmax of each row's block */
            long lo = window > 0 ? pos[r] - window + 1 : 0; /* visible: lo <= j <= pos[r] */
            long hi_off = pos[r] - j0, lo_off = lo - j0;        /* ... as offsets from j0 */
            if (hi_off < 0 || lo_off > 15) hi_off = -1;         /* none of the block visible */
            __mmask16 vis = present & _mm512_cmple_epi32_mask(iota, _mm512_set1_epi32((int)(hi_off > 15 ? 15 : hi_off)))
                            & _mm512_cmpge_epi32_mask(iota, _mm512_set1_epi32((int)(lo_off < 0 ? 0 : lo_off)));
            if (!vis) { /* nothing visible: the row is left as it is */
                alpha[r] = 1.0f;
                _mm512_store_ps(p[r], _mm512_setzero_ps());
                continue;
            }
            __m512 sv = _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY),
                                             _mm512_mul_ps(_mm512_load_ps(s[r]), _mm512_set1_ps(scale)));
            float best = _mm512_reduce_max_ps(sv);
            float m_new = m[r] > best ? m[r] : best;
            alpha[r] = m[r] == -INFINITY ? 0.0f : expf(m[r] - m_new);
            __m512 pv = _mm512_maskz_mov_ps(vis, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
            _mm512_store_ps(p[r], pv);
            l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(pv);
            m[r] = m_new;
        }
        for (long r = 0; r < rows; r += RB) { /* acc = acc * alpha + p V, 4 rows x 64 columns at a time */
            int rb = rows - r < RB ? (int)(rows - r) : RB;
            for (long c = 0; c < nc; c += 4) {
                int cb = nc - c < 4 ? 1 : 4;
                if (cb == 1) {
                    for (long cc = c; cc < nc; cc++) PV_CASES(1, cc)
                    break;
                }
                PV_CASES(4, c)
            }
        }
    }
    for (long r = 0; r < rows; r++) {
        long i = r / g, hh = task->h * g + r % g;
        float *o = out + ((task->q0 + i) * hq + hh) * d;
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (long c = 0; c < d; c++) o[c] = acc[r][c] * inv;
    }
}
