/* Row-wise float32 ops of the decoder layers on AVX-512 (see kernels/cpu_ops.py).
 *
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
    __m512 acc = _mm512_setzero_ps();
    long i = 0;
    for (; i + 16 <= d; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    if (i < d) {
        __mmask16 m = (__mmask16)((1u << (d - i)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)d + eps);
    __m512 vi = _mm512_set1_ps(inv);
    for (i = 0; i + 16 <= d; i += 16)
        _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vi),
                                              _mm512_loadu_ps(scale + i)));
    if (i < d) {
        __mmask16 m = (__mmask16)((1u << (d - i)) - 1);
        __m512 h = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vi);
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(h, _mm512_maskz_loadu_ps(m, scale + i)));
    }
}

/* x [rows, d] (row stride ldx), scale [d], y [rows, d] (row stride ldy). */
void llmql_rms_norm(const float *x, long rows, long d, long ldx, const float *scale, float eps,
                    float *y, long ldy, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * d >= PAR_ELEMS && rows > 1)
    for (long r = 0; r < rows; r++) rms_row(x + r * ldx, scale, d, eps, y + r * ldy);
}

static inline __m512 act512(__m512 g, int act) {
    __m512 t;
    if (act == 0) {
        t = g; /* silu: g / (1 + e^-g) */
    } else {   /* GELU, tanh form: g / (1 + e^-2u) */
        __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
        __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                 _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, g));
        t = _mm512_add_ps(u, u);
    }
    __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), t));
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
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
        for (; i + 16 <= d; i += 16)
            _mm512_storeu_ps(o + i, _mm512_mul_ps(act512(_mm512_loadu_ps(g + i), act),
                                                  _mm512_loadu_ps(u + i)));
        if (i < d) {
            __mmask16 m = (__mmask16)((1u << (d - i)) - 1);
            __m512 a = act512(_mm512_maskz_loadu_ps(m, g + i), act);
            _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, u + i)));
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
        for (long i = 0; i < half; i += 16) {
            __mmask16 m = half - i >= 16 ? 0xFFFF : (__mmask16)((1u << (half - i)) - 1);
            __m512 a = _mm512_maskz_loadu_ps(m, y + i), b = _mm512_maskz_loadu_ps(m, y + half + i);
            __m512 lo = _mm512_sub_ps(_mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, c + i)),
                                      _mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, s + i)));
            __m512 hi = _mm512_add_ps(_mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, c + half + i)),
                                      _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, s + half + i)));
            _mm512_mask_storeu_ps(y + i, m, lo);
            _mm512_mask_storeu_ps(y + half + i, m, hi);
        }
    }
}
