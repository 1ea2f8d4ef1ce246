/* Row-wise float32 ops of the decoder layers on AVX2 + FMA (see kernels/cpu_ops.py).
 *
 * The same exports and arithmetic as ../cpu_ops.c (the AVX-512 build), on 8-float vectors,
 * for CPUs without AVX-512; tails through masked loads and stores.
 * llmql_rms_norm: y = (x * rsqrt(mean(x^2) + eps)) * scale per row (scale = w, or 1 + w for
 * Gemma, computed by the caller), the two products rounded as torch's formula rounds them.
 * llmql_gated_act: h = act(gate) * up for rows [gate | up] of a packed gate+up output, with
 * act = silu (x / (1 + e^-x)) or GELU's tanh form (x / (1 + e^-2u), u = sqrt(2/pi) (x +
 * 0.044715 x^3), the same function as 0.5 x (1 + tanh u)); e^x by a degree-6 polynomial on a
 * range-reduced argument (Cephes' expf: ~1 ulp).
 * Rows are split across torch's OpenMP threads when there are enough of them.
 */
#include <immintrin.h>
#include <math.h>

#include "simd.h"

#define PAR_ELEMS 65536 /* fewer elements than this run on the calling thread */


static void rms_row(const float *x, const float *scale, long d, float eps, float *y) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= d; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    if (i < d) {
        __m256 v = _mm256_maskload_ps(x + i, lanes(d - i));
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float inv = 1.0f / sqrtf(hsum256(acc) / (float)d + eps);
    __m256 vi = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= d; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi),
                                              _mm256_loadu_ps(scale + i)));
    if (i < d) {
        __m256i m = lanes(d - i);
        __m256 h = _mm256_mul_ps(_mm256_maskload_ps(x + i, m), vi);
        _mm256_maskstore_ps(y + i, m, _mm256_mul_ps(h, _mm256_maskload_ps(scale + i, m)));
    }
}

/* x [rows, d] (row stride ldx), scale [d], y [rows, d] (row stride ldy). */
void llmql_rms_norm(const float *x, long rows, long d, long ldx, const float *scale, float eps,
                    float *y, long ldy, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * d >= PAR_ELEMS && rows > 1)
    for (long r = 0; r < rows; r++) rms_row(x + r * ldx, scale, d, eps, y + r * ldy);
}

static inline __m256 act256(__m256 g, int act) {
    __m256 t;
    if (act == 0) {
        t = g; /* silu: g / (1 + e^-g) */
    } else {   /* GELU, tanh form: g / (1 + e^-2u) */
        __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
        __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                 _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), g3, g));
        t = _mm256_add_ps(u, u);
    }
    __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), t));
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* gu [rows, 2 * d] (row stride ldg: gate in columns [0, d), up in [d, 2d)), h [rows, d]
 * (row stride ldh); act 0 = silu, 1 = GELU (tanh form). */
void llmql_gated_act(const float *gu, long rows, long d, long ldg, int act, float *h, long ldh,
                     int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * d >= PAR_ELEMS && rows > 1)
    for (long r = 0; r < rows; r++) {
        const float *g = gu + r * ldg, *u = g + d;
        float *o = h + r * ldh;
        long i = 0;
        for (; i + 8 <= d; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(act256(_mm256_loadu_ps(g + i), act),
                                                  _mm256_loadu_ps(u + i)));
        if (i < d) {
            __m256i m = lanes(d - i);
            __m256 a = act256(_mm256_maskload_ps(g + i, m), act);
            _mm256_maskstore_ps(o + i, m, _mm256_mul_ps(a, _mm256_maskload_ps(u + i, m)));
        }
    }
}

/* Heads of one token: t's head h at src + t * lds + h * d (d contiguous floats), written to
 * dst [T, H, d] contiguous: RMS-normalised with scale [d] when scale is not NULL, then rotated
 * by RoPE (rotate-half form) with the tables cos, sin [T, d] when cos is not NULL:
 * y[i] = x[i] cos[i] - x[i + d/2] sin[i], y[i + d/2] = x[i + d/2] cos[i + d/2] + x[i] sin[i + d/2]
 * (each product rounded, then the sum: torch's `q * cos + rotate_half(q) * sin`). */
void llmql_norm_rope(const float *src, long T, long H, long d, long lds, const float *scale, float eps,
                     const float *cos, const float *sin, float *dst, int threads) {
    long half = d / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (T * H * d >= PAR_ELEMS && T * H > 1)
    for (long th = 0; th < T * H; th++) {
        long t = th / H, h = th % H;
        const float *x = src + t * lds + h * d;
        float *y = dst + th * d;
        if (scale) {
            rms_row(x, scale, d, eps, y);
        } else {
            for (long i = 0; i < d; i++) y[i] = x[i];
        }
        if (!cos) continue;
        const float *c = cos + t * d, *s = sin + t * d;
        for (long i = 0; i < half; i += 8) {
            __m256i m = lanes(half - i);
            __m256 a = _mm256_maskload_ps(y + i, m), b = _mm256_maskload_ps(y + half + i, m);
            __m256 lo = _mm256_sub_ps(_mm256_mul_ps(a, _mm256_maskload_ps(c + i, m)),
                                      _mm256_mul_ps(b, _mm256_maskload_ps(s + i, m)));
            __m256 hi = _mm256_add_ps(_mm256_mul_ps(b, _mm256_maskload_ps(c + half + i, m)),
                                      _mm256_mul_ps(a, _mm256_maskload_ps(s + half + i, m)));
            _mm256_maskstore_ps(y + i, m, lo);
            _mm256_maskstore_ps(y + half + i, m, hi);
        }
    }
}
