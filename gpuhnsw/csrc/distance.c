/* Distance kernels, chosen once at run time from the CPU's features (no -march=native at build).
 * Rows are padded with zeros to a multiple of 4 floats, so every kernel may read dim_pad floats. */
#include <math.h>
#include <stdio.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GHNSW_X86 1
#include <immintrin.h>
#endif

ghnsw_status_t ghnsw_fail(ghnsw_err_t *err, ghnsw_status_t st, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, GHNSW_ERRLEN, fmt, ap);
        va_end(ap);
    }
    return st;
}

static float l2_portable(const float *a, const float *b, size_t n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < n; i += 4) {
        float d0 = a[i] - b[i], d1 = a[i + 1] - b[i + 1], d2 = a[i + 2] - b[i + 2], d3 = a[i + 3] - b[i + 3];
        s0 += d0 * d0; s1 += d1 * d1; s2 += d2 * d2; s3 += d3 * d3;
    }
    return (s0 + s1) + (s2 + s3);
}

static float ip_portable(const float *a, const float *b, size_t n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < n; i += 4) {
        s0 += a[i] * b[i]; s1 += a[i + 1] * b[i + 1]; s2 += a[i + 2] * b[i + 2]; s3 += a[i + 3] * b[i + 3];
    }
    return 1.0f - ((s0 + s1) + (s2 + s3));
}

#ifdef GHNSW_X86
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma"))) static float l2_avx2(const float *a, const float *b, size_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
        __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8));
        acc0 = _mm256_fmadd_ps(d0, d0, acc0);
        acc1 = _mm256_fmadd_ps(d1, d1, acc1);
    }
    if (i + 8 <= n) {
        __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
        acc0 = _mm256_fmadd_ps(d0, d0, acc0);
        i += 8;
    }
    float s = hsum256(_mm256_add_ps(acc0, acc1));
    if (i < n) { /* one block of 4 left (rows are padded to 4) */
        __m128 d = _mm_sub_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(b + i));
        d = _mm_mul_ps(d, d);
        d = _mm_add_ps(d, _mm_movehl_ps(d, d));
        d = _mm_add_ss(d, _mm_shuffle_ps(d, d, 1));
        s += _mm_cvtss_f32(d);
    }
    return s;
}

__attribute__((target("avx2,fma"))) static float ip_avx2(const float *a, const float *b, size_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    if (i + 8 <= n) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        i += 8;
    }
    float s = hsum256(_mm256_add_ps(acc0, acc1));
    if (i < n) {
        __m128 d = _mm_mul_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(b + i));
        d = _mm_add_ps(d, _mm_movehl_ps(d, d));
        d = _mm_add_ss(d, _mm_shuffle_ps(d, d, 1));
        s += _mm_cvtss_f32(d);
    }
    return 1.0f - s;
}

__attribute__((target("avx512f"))) static float l2_avx512(const float *a, const float *b, size_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
        __m512 d1 = _mm512_sub_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16));
        acc0 = _mm512_fmadd_ps(d0, d0, acc0);
        acc1 = _mm512_fmadd_ps(d1, d1, acc1);
    }
    for (; i < n; i += 16) { /* masked tail: n is a multiple of 4 */
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i));
        acc0 = _mm512_fmadd_ps(d, d, acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

__attribute__((target("avx512f"))) static float ip_avx512(const float *a, const float *b, size_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    for (; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc0);
    }
    return 1.0f - _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif

/* GHNSW_SIMD=portable|avx2|avx512 overrides the choice (tests run every path). */
static int simd_level(void) {
    static int level = -1;
    if (level >= 0) return level;
    int best = 0;
#ifdef GHNSW_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
    if (__builtin_cpu_supports("avx512f")) best = 2;
#endif
    const char *env = getenv("GHNSW_SIMD");
    int want = best;
    if (env && env[0]) {
        if (!strcmp(env, "portable")) want = 0;
        else if (!strcmp(env, "avx2")) want = 1;
        else if (!strcmp(env, "avx512")) want = 2;
    }
    level = want < best ? want : best;
    return level;
}

const char *ghnsw_simd_name(void) {
    static const char *names[] = {"portable", "avx2", "avx512"};
    return names[simd_level()];
}

ghnsw_dist_fn ghnsw_pick_distance(int space) {
    int lv = simd_level();
    int is_l2 = space == GHNSW_L2;
#ifdef GHNSW_X86
    if (lv == 2) return is_l2 ? l2_avx512 : ip_avx512;
    if (lv == 1) return is_l2 ? l2_avx2 : ip_avx2;
#endif
    (void)lv;
    return is_l2 ? l2_portable : ip_portable;
}

/* hnswlib's normalisation: x * 1/(|x| + 1e-30), so a zero vector stays zero. */
void ghnsw_normalize(float *v, size_t dim) {
    float s = 0;
    for (size_t i = 0; i < dim; i++) s += v[i] * v[i];
    float inv = 1.0f / (sqrtf(s) + 1e-30f);
    for (size_t i = 0; i < dim; i++) v[i] *= inv;
}
