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

/* Register-tiled pair sums (see ghnsw_tile_fn): the rows' loads are shared by a whole row or
 * column of the tile, so each float read from cache feeds 4 (AVX-512: 4, AVX2: 2 or 4) pairs instead
 * of one.  The tail of an unpadded row is read with masked loads (zeros beyond dim, never past the
 * row).  STEP(acc, x, y) adds one lane block of a pair: x.y, or (x - y)^2 for l2. */
#define TILE_BODY(VEC, ZERO, LOADM, STEP, ROWS, COLS)                                               \
    for (size_t c0 = 0; c0 < GHNSW_TILE; c0 += COLS) {                                              \
        VEC acc[ROWS][COLS];                                                                        \
        for (int r = 0; r < ROWS; r++)                                                              \
            for (int c = 0; c < COLS; c++) acc[r][c] = ZERO;                                        \
        for (size_t i = 0; i < dim; i += LANES) {                                                   \
            VEC x[ROWS], y[COLS];                                                                   \
            for (int r = 0; r < ROWS; r++) x[r] = LOADM(a[r] + i, dim - i);                         \
            for (int c = 0; c < COLS; c++) y[c] = LOADM(b[c0 + c] + i, dim - i);                    \
            for (int r = 0; r < ROWS; r++)                                                          \
                for (int c = 0; c < COLS; c++) STEP(acc[r][c], x[r], y[c]);                         \
        }                                                                                           \
        for (int r = 0; r < ROWS; r++)                                                              \
            for (int c = 0; c < COLS; c++) out[r * GHNSW_TILE + c0 + c] = HSUM(acc[r][c]);         \
    }

#define LANES 16
#define HSUM _mm512_reduce_add_ps
__attribute__((target("avx512f"))) static inline __m512 load16(const float *p, size_t left) {
    return left >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1u), p);
}
#define DOT16(acc, x, y) ((acc) = _mm512_fmadd_ps((x), (y), (acc)))
#define L2_16(acc, x, y) do { __m512 t_ = _mm512_sub_ps((x), (y)); (acc) = _mm512_fmadd_ps(t_, t_, (acc)); } while (0)
__attribute__((target("avx512f"))) static void tile_ip_avx512(const float *const *a, const float *const *b, size_t dim,
                                                              float *out) {
    TILE_BODY(__m512, _mm512_setzero_ps(), load16, DOT16, GHNSW_TILE, 4)
}
__attribute__((target("avx512f"))) static void tile_l2_avx512(const float *const *a, const float *const *b, size_t dim,
                                                              float *out) {
    TILE_BODY(__m512, _mm512_setzero_ps(), load16, L2_16, GHNSW_TILE, 4)
}
__attribute__((target("avx512f"))) static void row_ip_avx512(const float *x, const float *const *b, size_t dim,
                                                             float *out) {
    const float *const a[1] = {x};
    TILE_BODY(__m512, _mm512_setzero_ps(), load16, DOT16, 1, 4)
}
#undef LANES
#undef HSUM

#define LANES 8
#define HSUM hsum256
__attribute__((target("avx2,fma"))) static inline __m256 load8(const float *p, size_t left) {
    static const int32_t ramp[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, _mm256_loadu_si256((const __m256i *)(ramp + 8 - left)));
}
/* 16 ymm registers: the columns two at a time (8 sums + 4 + 2 rows live) */
#define DOT8(acc, x, y) ((acc) = _mm256_fmadd_ps((x), (y), (acc)))
#define L2_8(acc, x, y) do { __m256 t_ = _mm256_sub_ps((x), (y)); (acc) = _mm256_fmadd_ps(t_, t_, (acc)); } while (0)
__attribute__((target("avx2,fma"))) static void tile_ip_avx2(const float *const *a, const float *const *b, size_t dim,
                                                             float *out) {
    TILE_BODY(__m256, _mm256_setzero_ps(), load8, DOT8, GHNSW_TILE, 2)
}
__attribute__((target("avx2,fma"))) static void tile_l2_avx2(const float *const *a, const float *const *b, size_t dim,
                                                             float *out) {
    TILE_BODY(__m256, _mm256_setzero_ps(), load8, L2_8, GHNSW_TILE, 2)
}
__attribute__((target("avx2,fma"))) static void row_ip_avx2(const float *x, const float *const *b, size_t dim,
                                                            float *out) {
    const float *const a[1] = {x};
    TILE_BODY(__m256, _mm256_setzero_ps(), load8, DOT8, 1, 4)
}
#undef LANES
#undef HSUM
#endif

/* Portable tiles: one pair at a time, four partial sums (the same sequence for every pair). */
static float dot_portable(const float *x, const float *y, size_t dim) {
    float s[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < dim; i++) s[i & 3] += x[i] * y[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}
static float l2_pair_portable(const float *x, const float *y, size_t dim) {
    float s[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < dim; i++) s[i & 3] += (x[i] - y[i]) * (x[i] - y[i]);
    return (s[0] + s[1]) + (s[2] + s[3]);
}
static void tile_ip_portable(const float *const *a, const float *const *b, size_t dim, float *out) {
    for (int r = 0; r < GHNSW_TILE; r++)
        for (int c = 0; c < GHNSW_TILE; c++) out[r * GHNSW_TILE + c] = dot_portable(a[r], b[c], dim);
}
static void tile_l2_portable(const float *const *a, const float *const *b, size_t dim, float *out) {
    for (int r = 0; r < GHNSW_TILE; r++)
        for (int c = 0; c < GHNSW_TILE; c++) out[r * GHNSW_TILE + c] = l2_pair_portable(a[r], b[c], dim);
}
static void row_ip_portable(const float *x, const float *const *b, size_t dim, float *out) {
    for (int c = 0; c < GHNSW_TILE; c++) out[c] = dot_portable(x, b[c], dim);
}

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

ghnsw_tile_fn ghnsw_pick_tile(int space) {
    int lv = simd_level();
    int is_l2 = space == GHNSW_L2;
#ifdef GHNSW_X86
    if (lv == 2) return is_l2 ? tile_l2_avx512 : tile_ip_avx512;
    if (lv == 1) return is_l2 ? tile_l2_avx2 : tile_ip_avx2;
#endif
    (void)lv;
    return is_l2 ? tile_l2_portable : tile_ip_portable;
}

ghnsw_row_fn ghnsw_pick_row(void) {
    int lv = simd_level();
#ifdef GHNSW_X86
    if (lv == 2) return row_ip_avx512;
    if (lv == 1) return row_ip_avx2;
#endif
    (void)lv;
    return row_ip_portable;
}

/* hnswlib's normalisation: x * 1/(|x| + 1e-30), so a zero vector stays zero. */
void ghnsw_normalize(float *v, size_t dim) {
    float s = 0;
    for (size_t i = 0; i < dim; i++) s += v[i] * v[i];
    float inv = 1.0f / (sqrtf(s) + 1e-30f);
    for (size_t i = 0; i < dim; i++) v[i] *= inv;
}
