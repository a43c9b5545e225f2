/* Distance kernels, chosen once at run time from the CPU's features (no -march=native at build).
 * A kernel takes a prepared query and a stored row of n elements (gpuhnsw.h, ghnsw_dist_fn), by
 * storage: float32 rows are padded with zeros to a multiple of 4 floats, float16 rows to 8 halves,
 * int8 codes to 16 bytes, so every kernel may read whole blocks of those without masks. */
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

static float l2_portable(const void *av, const void *bv, size_t n) {
    const float *a = av, *b = bv;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < n; i += 4) {
        float d0 = a[i] - b[i], d1 = a[i + 1] - b[i + 1], d2 = a[i + 2] - b[i + 2], d3 = a[i + 3] - b[i + 3];
        s0 += d0 * d0; s1 += d1 * d1; s2 += d2 * d2; s3 += d3 * d3;
    }
    return (s0 + s1) + (s2 + s3);
}

static float ip_portable(const void *av, const void *bv, size_t n) {
    const float *a = av, *b = bv;
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

__attribute__((target("avx2,fma"))) static float l2_avx2(const void *av, const void *bv, size_t n) {
    const float *a = av, *b = bv;
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

__attribute__((target("avx2,fma"))) static float ip_avx2(const void *av, const void *bv, size_t n) {
    const float *a = av, *b = bv;
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

__attribute__((target("avx512f"))) static float l2_avx512(const void *av, const void *bv, size_t n) {
    const float *a = av, *b = bv;
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

__attribute__((target("avx512f"))) static float ip_avx512(const void *av, const void *bv, size_t n) {
    const float *a = av, *b = bv;
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

/* Register-tiled pair sums (see ghnsw_tile_fn): the rows' loads are shared by a whole row or
 * column of the tile, so each element read from cache feeds 4 (AVX-512: 4, AVX2: 2 or 4) pairs
 * instead of one.  The tail of an unpadded float row is read with masked loads (zeros beyond dim,
 * never past the row); compressed rows are padded to whole blocks.  LOADM(p, left) loads one lane
 * block of a row (widened to the accumulator's type), STEP(acc, x, y) adds one lane block of a
 * pair: x.y, or (x - y)^2 for l2; ta, tb are the typed row pointers. */
#define TILE_BODY(VEC, ZERO, LOADM, STEP, ROWS, COLS)                                               \
    for (size_t c0 = 0; c0 < GHNSW_TILE; c0 += COLS) {                                              \
        VEC acc[ROWS][COLS];                                                                        \
        for (int r = 0; r < ROWS; r++)                                                              \
            for (int c = 0; c < COLS; c++) acc[r][c] = ZERO;                                        \
        for (size_t i = 0; i < dim; i += LANES) {                                                   \
            VEC x[ROWS], y[COLS];                                                                   \
            for (int r = 0; r < ROWS; r++) x[r] = LOADM(ta[r] + i, dim - i);                        \
            for (int c = 0; c < COLS; c++) y[c] = LOADM(tb[c0 + c] + i, dim - i);                   \
            for (int r = 0; r < ROWS; r++)                                                          \
                for (int c = 0; c < COLS; c++) STEP(acc[r][c], x[r], y[c]);                         \
        }                                                                                           \
        for (int r = 0; r < ROWS; r++)                                                              \
            for (int c = 0; c < COLS; c++) out[r * GHNSW_TILE + c0 + c] = HSUM(acc[r][c]);         \
    }
#define TILE_FN(NAME, TARGET, T, VEC, ZERO, LOADM, STEP, COLS)                                       \
    TARGET static void NAME(const void *const *a, const void *const *b, size_t dim, float *out) {   \
        const T *const *ta = (const T *const *)a, *const *tb = (const T *const *)b;                 \
        TILE_BODY(VEC, ZERO, LOADM, STEP, GHNSW_TILE, COLS)                                         \
    }
#define ROW_FN(NAME, TARGET, VEC, ZERO, LOADM, STEP)                                                  \
    TARGET static void NAME(const float *x, const float *const *b, size_t dim, float *out) {        \
        const float *const ta[1] = {x}, *const *tb = b;                                             \
        TILE_BODY(VEC, ZERO, LOADM, STEP, 1, 4)                                                     \
    }

#ifdef GHNSW_X86
#define AVX512 __attribute__((target("avx512f")))
#define AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))

#define LANES 16
#define HSUM _mm512_reduce_add_ps
AVX512 static inline __m512 load16(const float *p, size_t left) {
    return left >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1u), p);
}
AVX512 static inline __m512 load16h(const uint16_t *p, size_t left) { /* rows padded to 16 halves */
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
#define DOT16(acc, x, y) ((acc) = _mm512_fmadd_ps((x), (y), (acc)))
#define L2_16(acc, x, y) do { __m512 t_ = _mm512_sub_ps((x), (y)); (acc) = _mm512_fmadd_ps(t_, t_, (acc)); } while (0)
TILE_FN(tile_ip_avx512, AVX512, float, __m512, _mm512_setzero_ps(), load16, DOT16, 4)
TILE_FN(tile_l2_avx512, AVX512, float, __m512, _mm512_setzero_ps(), load16, L2_16, 4)
TILE_FN(tile_ip_f16_avx512, AVX512, uint16_t, __m512, _mm512_setzero_ps(), load16h, DOT16, 4)
TILE_FN(tile_l2_f16_avx512, AVX512, uint16_t, __m512, _mm512_setzero_ps(), load16h, L2_16, 4)
ROW_FN(row_ip_avx512, AVX512, __m512, _mm512_setzero_ps(), load16, DOT16)
ROW_FN(row_l2_avx512, AVX512, __m512, _mm512_setzero_ps(), load16, L2_16)
#undef LANES
#undef HSUM

/* int8 codes, 32 per step (rows padded to 32 bytes), widened to int16; pairs of products summed into
 * int32 lanes exactly (NN-descent bounds the width, nndescent.c) */
#define LANES 32
#define HSUM(acc) ((float)_mm512_reduce_add_epi32(acc))
AVX512BW static inline __m512i load32c(const int8_t *p, size_t left) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}
#define DOTI512(acc, x, y) ((acc) = _mm512_add_epi32((acc), _mm512_madd_epi16((x), (y))))
#define L2I512(acc, x, y) do { __m512i t_ = _mm512_sub_epi16((x), (y)); DOTI512(acc, t_, t_); } while (0)
TILE_FN(tile_ip_i8_avx512, AVX512BW, int8_t, __m512i, _mm512_setzero_si512(), load32c, DOTI512, 4)
TILE_FN(tile_l2_i8_avx512, AVX512BW, int8_t, __m512i, _mm512_setzero_si512(), load32c, L2I512, 4)
#undef LANES
#undef HSUM

/* With VNNI, 64 codes per vpdpbusd (unsigned x signed bytes, four products per int32 lane): a row's
 * codes plus 128 are its unsigned bytes (a xor 0x80), so a . b = (a + 128) . b - 128 sum(b), and
 * |a - b|^2 = |a|^2 + |b|^2 - 2 a . b, with sum(c) and |c|^2 stored behind each row's codes
 * (GHNSW_I8_ROW_TERMS); every step exact in int32, the last in int64.  A quarter of the
 * instructions of the widening kernels above, which need no row terms. */
AVX512VNNI static inline void tile_i8_vnni(const void *const *a, const void *const *b, size_t n, float *out, int l2) {
    const int8_t *const *ta = (const int8_t *const *)a, *const *tb = (const int8_t *const *)b;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[GHNSW_TILE][GHNSW_TILE];
    for (int r = 0; r < GHNSW_TILE; r++)
        for (int c = 0; c < GHNSW_TILE; c++) acc[r][c] = _mm512_setzero_si512();
    for (size_t i = 0; i < n; i += 64) { /* n is a multiple of 32: a half step at the end */
        __mmask64 m = n - i >= 64 ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFu;
        __m512i x[GHNSW_TILE], y[GHNSW_TILE];
        for (int r = 0; r < GHNSW_TILE; r++) x[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, ta[r] + i), flip);
        for (int c = 0; c < GHNSW_TILE; c++) y[c] = _mm512_maskz_loadu_epi8(m, tb[c] + i);
        for (int r = 0; r < GHNSW_TILE; r++)
            for (int c = 0; c < GHNSW_TILE; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], x[r], y[c]);
    }
    int32_t sum[GHNSW_TILE], sq[GHNSW_TILE][2];
    for (int c = 0; c < GHNSW_TILE; c++) memcpy(sum + c, tb[c] + n, sizeof(int32_t));
    for (int r = 0; r < GHNSW_TILE; r++) memcpy(sq[r], ta[r] + n + 4, sizeof(int32_t));
    for (int c = 0; c < GHNSW_TILE; c++) memcpy(sq[c] + 1, tb[c] + n + 4, sizeof(int32_t));
    for (int r = 0; r < GHNSW_TILE; r++)
        for (int c = 0; c < GHNSW_TILE; c++) {
            int64_t ab = (int64_t)_mm512_reduce_add_epi32(acc[r][c]) - 128 * (int64_t)sum[c];
            out[r * GHNSW_TILE + c] = (float)(l2 ? (int64_t)sq[r][0] + sq[c][1] - 2 * ab : ab);
        }
}
AVX512VNNI static void tile_ip_i8_vnni(const void *const *a, const void *const *b, size_t n, float *out) {
    tile_i8_vnni(a, b, n, out, 0);
}
AVX512VNNI static void tile_l2_i8_vnni(const void *const *a, const void *const *b, size_t n, float *out) {
    tile_i8_vnni(a, b, n, out, 1);
}

#define LANES 8
#define HSUM hsum256
AVX2 static inline __m256 load8(const float *p, size_t left) {
    static const int32_t ramp[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, _mm256_loadu_si256((const __m256i *)(ramp + 8 - left)));
}
AVX2 static inline __m256 load8h(const uint16_t *p, size_t left) { /* rows padded to 16 halves */
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
/* 16 ymm registers: the columns two at a time (8 sums + 4 + 2 rows live) */
#define DOT8(acc, x, y) ((acc) = _mm256_fmadd_ps((x), (y), (acc)))
#define L2_8(acc, x, y) do { __m256 t_ = _mm256_sub_ps((x), (y)); (acc) = _mm256_fmadd_ps(t_, t_, (acc)); } while (0)
TILE_FN(tile_ip_avx2, AVX2, float, __m256, _mm256_setzero_ps(), load8, DOT8, 2)
TILE_FN(tile_l2_avx2, AVX2, float, __m256, _mm256_setzero_ps(), load8, L2_8, 2)
TILE_FN(tile_ip_f16_avx2, AVX2, uint16_t, __m256, _mm256_setzero_ps(), load8h, DOT8, 2)
TILE_FN(tile_l2_f16_avx2, AVX2, uint16_t, __m256, _mm256_setzero_ps(), load8h, L2_8, 2)
ROW_FN(row_ip_avx2, AVX2, __m256, _mm256_setzero_ps(), load8, DOT8)
ROW_FN(row_l2_avx2, AVX2, __m256, _mm256_setzero_ps(), load8, L2_8)
#undef LANES
#undef HSUM

#define LANES 16
AVX2 static inline float hsum256i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return (float)_mm_cvtsi128_si32(s);
}
#define HSUM hsum256i
AVX2 static inline __m256i load16c(const int8_t *p, size_t left) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}
#define DOTI256(acc, x, y) ((acc) = _mm256_add_epi32((acc), _mm256_madd_epi16((x), (y))))
#define L2I256(acc, x, y) do { __m256i t_ = _mm256_sub_epi16((x), (y)); DOTI256(acc, t_, t_); } while (0)
TILE_FN(tile_ip_i8_avx2, AVX2, int8_t, __m256i, _mm256_setzero_si256(), load16c, DOTI256, 2)
TILE_FN(tile_l2_i8_avx2, AVX2, int8_t, __m256i, _mm256_setzero_si256(), load16c, L2I256, 2)
#undef LANES
#undef HSUM
#endif

/* Portable tiles: one pair at a time, four partial sums (the same sequence for every pair); int8 pairs
 * summed exactly in int32. */
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
static float dot_f16_portable(const uint16_t *x, const uint16_t *y, size_t n) {
    float s[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < n; i++) s[i & 3] += ghnsw_half_to_float(x[i]) * ghnsw_half_to_float(y[i]);
    return (s[0] + s[1]) + (s[2] + s[3]);
}
static float l2_f16_pair(const uint16_t *x, const uint16_t *y, size_t n) {
    float s[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < n; i++) {
        float d = ghnsw_half_to_float(x[i]) - ghnsw_half_to_float(y[i]);
        s[i & 3] += d * d;
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
}
static float dot_i8_pair(const int8_t *x, const int8_t *y, size_t n) {
    int32_t s = 0;
    for (size_t i = 0; i < n; i++) s += (int32_t)x[i] * y[i];
    return (float)s;
}
static float l2_i8_pair(const int8_t *x, const int8_t *y, size_t n) {
    int32_t s = 0;
    for (size_t i = 0; i < n; i++) s += ((int32_t)x[i] - y[i]) * ((int32_t)x[i] - y[i]);
    return (float)s;
}
#define TILE_PORTABLE(NAME, T, PAIR)                                                                 \
    static void NAME(const void *const *a, const void *const *b, size_t dim, float *out) {          \
        for (int r = 0; r < GHNSW_TILE; r++)                                                        \
            for (int c = 0; c < GHNSW_TILE; c++) out[r * GHNSW_TILE + c] = PAIR(a[r], b[c], dim);   \
    }
TILE_PORTABLE(tile_ip_portable, float, dot_portable)
TILE_PORTABLE(tile_l2_portable, float, l2_pair_portable)
TILE_PORTABLE(tile_ip_f16_portable, uint16_t, dot_f16_portable)
TILE_PORTABLE(tile_l2_f16_portable, uint16_t, l2_f16_pair)
TILE_PORTABLE(tile_ip_i8_portable, int8_t, dot_i8_pair)
TILE_PORTABLE(tile_l2_i8_portable, int8_t, l2_i8_pair)
static void row_ip_portable(const float *x, const float *const *b, size_t dim, float *out) {
    for (int c = 0; c < GHNSW_TILE; c++) out[c] = dot_portable(x, b[c], dim);
}
static void row_l2_portable(const float *x, const float *const *b, size_t dim, float *out) {
    for (int c = 0; c < GHNSW_TILE; c++) out[c] = l2_pair_portable(x, b[c], dim);
}

/* ---- float16 rows: converted to float32 as they are read, float32 arithmetic -------------------- */

/* IEEE binary16 <-> binary32, round to nearest even (F. Giesen's branch-light conversions): the
 * portable kernels' and the encoder's; the SIMD kernels convert with F16C / AVX-512 instructions,
 * which give the same values. */
uint16_t ghnsw_float_to_half(float f) {
    const uint32_t f32_inf = 255u << 23, f16_max = (127u + 16u) << 23;
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = x & 0x80000000u;
    x ^= sign;
    uint16_t o;
    if (x >= f16_max) { /* overflow to inf, NaN stays NaN */
        o = x > f32_inf ? 0x7E00 : 0x7C00;
    } else if (x < (113u << 23)) { /* a subnormal half or zero: the float adder rounds */
        float fx, magic;
        memcpy(&fx, &x, sizeof fx);
        memcpy(&magic, &denorm_magic, sizeof magic);
        fx += magic;
        memcpy(&x, &fx, sizeof x);
        o = (uint16_t)(x - denorm_magic);
    } else {
        uint32_t odd = (x >> 13) & 1u;
        x += ((uint32_t)(15 - 127) << 23) + 0xFFFu + odd;
        o = (uint16_t)(x >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

float ghnsw_half_to_float(uint16_t h) {
    const uint32_t shifted_exp = 0x7C00u << 13;
    uint32_t o = ((uint32_t)h & 0x7FFFu) << 13, exp = shifted_exp & o;
    o += (127u - 15u) << 23;
    if (exp == shifted_exp) {
        o += (128u - 16u) << 23; /* inf, NaN */
    } else if (exp == 0) { /* zero, subnormal: renormalised by a float subtraction */
        const uint32_t magic_bits = 113u << 23;
        float f, magic;
        o += 1u << 23;
        memcpy(&f, &o, sizeof f);
        memcpy(&magic, &magic_bits, sizeof magic);
        f -= magic;
        memcpy(&o, &f, sizeof o);
    }
    o |= ((uint32_t)h & 0x8000u) << 16;
    float f;
    memcpy(&f, &o, sizeof f);
    return f;
}

#ifdef GHNSW_X86
__attribute__((target("avx2,fma,f16c"))) static void floats_to_halves_f16c(const float *x, uint16_t *h, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) h[i] = ghnsw_float_to_half(x[i]);
}
#endif

/* Levels: 0 portable, 1 AVX2 + FMA + F16C, 2 AVX-512 (F, BW, VL), 3 the same with VNNI (the int8
 * kernels' vpdpwssd; float kernels as level 2).  GHNSW_SIMD=portable|avx2|avx512|avx512vnni lowers
 * the choice (tests run every path). */
enum { SIMD_PORTABLE, SIMD_AVX2, SIMD_AVX512, SIMD_VNNI };
static int simd_level(void);

void ghnsw_floats_to_halves(const float *x, uint16_t *h, size_t n) {
#ifdef GHNSW_X86
    if (simd_level() >= SIMD_AVX2) { floats_to_halves_f16c(x, h, n); return; }
#endif
    for (size_t i = 0; i < n; i++) h[i] = ghnsw_float_to_half(x[i]);
}

/* query: float[n], row: half[n], n a multiple of 8 */
static float l2_f16_portable(const void *qv, const void *rv, size_t n) {
    const float *q = qv;
    const uint16_t *r = rv;
    float s[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < n; i++) {
        float d = q[i] - ghnsw_half_to_float(r[i]);
        s[i & 3] += d * d;
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
}

static float ip_f16_portable(const void *qv, const void *rv, size_t n) {
    const float *q = qv;
    const uint16_t *r = rv;
    float s[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < n; i++) s[i & 3] += q[i] * ghnsw_half_to_float(r[i]);
    return 1.0f - ((s[0] + s[1]) + (s[2] + s[3]));
}

#ifdef GHNSW_X86
__attribute__((target("avx2,fma,f16c"))) static float l2_f16_avx2(const void *qv, const void *rv, size_t n) {
    const float *q = qv;
    const uint16_t *r = rv;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(q + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i))));
        __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(q + i + 8), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + 8))));
        acc0 = _mm256_fmadd_ps(d0, d0, acc0);
        acc1 = _mm256_fmadd_ps(d1, d1, acc1);
    }
    if (i < n) {
        __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(q + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i))));
        acc0 = _mm256_fmadd_ps(d0, d0, acc0);
    }
    return hsum256(_mm256_add_ps(acc0, acc1));
}

__attribute__((target("avx2,fma,f16c"))) static float ip_f16_avx2(const void *qv, const void *rv, size_t n) {
    const float *q = qv;
    const uint16_t *r = rv;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i))), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + 8))), acc1);
    }
    if (i < n) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i))), acc0);
    return 1.0f - hsum256(_mm256_add_ps(acc0, acc1));
}

/* 16 halves, or the last 8 of a row (the rest of the register zero) */
__attribute__((target("avx512f"))) static inline __m512 load_half16(const uint16_t *r, size_t left) {
    __m256i h = left >= 16 ? _mm256_loadu_si256((const __m256i *)r) : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)r));
    return _mm512_cvtph_ps(h);
}

__attribute__((target("avx512f"))) static float l2_f16_avx512(const void *qv, const void *rv, size_t n) {
    const float *q = qv;
    const uint16_t *r = rv;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(q + i), load_half16(r + i, 16));
        __m512 d1 = _mm512_sub_ps(_mm512_loadu_ps(q + i + 16), load_half16(r + i + 16, 16));
        acc0 = _mm512_fmadd_ps(d0, d0, acc0);
        acc1 = _mm512_fmadd_ps(d1, d1, acc1);
    }
    for (; i < n; i += 16) { /* n is a multiple of 8 */
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
        __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, q + i), load_half16(r + i, n - i));
        acc0 = _mm512_fmadd_ps(d, d, acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

__attribute__((target("avx512f"))) static float ip_f16_avx512(const void *qv, const void *rv, size_t n) {
    const float *q = qv;
    const uint16_t *r = rv;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load_half16(r + i, 16), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), load_half16(r + i + 16, 16), acc1);
    }
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), load_half16(r + i, n - i), acc0);
    }
    return 1.0f - _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif

/* ---- int8 rows: u . c summed exactly in int32 (storage.c: the math, and why it cannot overflow) -- */

/* The distance from the prepared query's header and the integer dot product (l2 adds the row's sq,
 * stored behind its codes, and clamps the rounding below zero). */
static inline float i8_l2_finish(const ghnsw_i8q_t *h, const uint8_t *row, size_t n, int32_t dot) {
    float sq;
    memcpy(&sq, row + n, sizeof sq);
    float d = h->c0 + sq + h->f * (float)dot;
    return d > 0.0f ? d : 0.0f;
}
static inline float i8_ip_finish(const ghnsw_i8q_t *h, int32_t dot) { return h->c0 + h->f * (float)dot; }

static int32_t dot_i8_portable(const int16_t *u, const int8_t *c, size_t n) {
    int32_t s = 0;
    for (size_t i = 0; i < n; i++) s += (int32_t)u[i] * (int32_t)c[i];
    return s;
}

#ifdef GHNSW_X86
__attribute__((target("avx2,fma,f16c"))) static int32_t dot_i8_avx2(const int16_t *u, const int8_t *c, size_t n) {
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) { /* vpmovsxbw widens 16 codes, vpmaddwd sums pairs of products */
        __m256i c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + i)));
        __m256i c1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + i + 16)));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(u + i)), c0));
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(u + i + 16)), c1));
    }
    if (i < n) { /* n is a multiple of 16 */
        __m256i c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + i)));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(u + i)), c0));
    }
    __m256i v = _mm256_add_epi32(acc0, acc1);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* 32 codes widened to int16 (a 16-code tail masked), multiplied with the query's int16 and summed in
 * pairs into int32 lanes: vpmaddwd + vpaddd, or one vpdpwssd with VNNI. */
#define DOT_I8_512(NAME, TARGET, MAC)                                                                       \
    __attribute__((target(TARGET))) static int32_t NAME(const int16_t *u, const int8_t *c, size_t n) {        \
        __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();                               \
        size_t i = 0;                                                                                       \
        for (; i + 64 <= n; i += 64) {                                                                      \
            MAC(acc0, _mm512_loadu_si512(u + i), _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(c + i)))); \
            MAC(acc1, _mm512_loadu_si512(u + i + 32),                                                       \
                _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(c + i + 32))));                  \
        }                                                                                                   \
        for (; i < n; i += 32) { /* n is a multiple of 16 */                                                \
            __mmask32 m = n - i >= 32 ? 0xFFFFFFFFu : 0xFFFFu;                                              \
            MAC(acc0, _mm512_maskz_loadu_epi16(m, u + i), _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, c + i))); \
        }                                                                                                   \
        return _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1));                                       \
    }
#define MADD512(acc, a, b) ((acc) = _mm512_add_epi32((acc), _mm512_madd_epi16((a), (b))))
#define DPWSSD512(acc, a, b) ((acc) = _mm512_dpwssd_epi32((acc), (a), (b)))
DOT_I8_512(dot_i8_avx512, "avx512f,avx512bw,avx512vl", MADD512)
DOT_I8_512(dot_i8_vnni, "avx512f,avx512bw,avx512vl,avx512vnni", DPWSSD512)
#endif

/* query: ghnsw_i8q_t then int16 u[n]; row: int8 codes[n], float sq */
#define I8_KERNELS(SUFFIX, TARGET, DOT)                                                                     \
    TARGET static float l2_i8_##SUFFIX(const void *qv, const void *rv, size_t n) {                          \
        const ghnsw_i8q_t *h = qv;                                                                          \
        return i8_l2_finish(h, rv, n, DOT((const int16_t *)(h + 1), rv, n));                                \
    }                                                                                                       \
    TARGET static float ip_i8_##SUFFIX(const void *qv, const void *rv, size_t n) {                          \
        const ghnsw_i8q_t *h = qv;                                                                          \
        return i8_ip_finish(h, DOT((const int16_t *)(h + 1), rv, n));                                       \
    }
I8_KERNELS(portable, , dot_i8_portable)
#ifdef GHNSW_X86
I8_KERNELS(avx2, __attribute__((target("avx2,fma,f16c"))), dot_i8_avx2)
I8_KERNELS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl"))), dot_i8_avx512)
I8_KERNELS(vnni, __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))), dot_i8_vnni)
#endif

/* ---- stored row against stored row (the heuristic, back-links, updates: no query to prepare) ----- */

/* float16: both rows converted as they are read */
static float l2_f16_pair_portable(const void *a, const void *b, size_t n, const float *w) {
    return l2_f16_pair(a, b, n);
}
static float ip_f16_pair_portable(const void *a, const void *b, size_t n, const float *w) {
    return 1.0f - dot_f16_portable(a, b, n);
}

/* int8: w[n] = scale^2 per dimension (zero past dim), w[n] = |offset|^2; each row's stored term is
 * r = sum offset_i scale_i c_i for ip (storage.c):
 *   l2: sum_i w_i (a_i - b_i)^2        ip: 1 - (|offset|^2 + r_a + r_b + sum_i w_i a_i b_i)
 * in float32 (the per-dimension weights rule out an exact integer form). */
static inline float i8_row_term(const void *row, size_t n) {
    float r;
    memcpy(&r, (const uint8_t *)row + n, sizeof r);
    return r;
}
static float l2_i8_pair_portable(const void *av, const void *bv, size_t n, const float *w) {
    const int8_t *a = av, *b = bv;
    float s[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < n; i++) {
        float d = (float)(a[i] - b[i]);
        s[i & 3] += w[i] * d * d;
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
}
static float ip_i8_pair_portable(const void *av, const void *bv, size_t n, const float *w) {
    const int8_t *a = av, *b = bv;
    float s[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < n; i++) s[i & 3] += w[i] * (float)a[i] * (float)b[i];
    return 1.0f - (w[n] + i8_row_term(av, n) + i8_row_term(bv, n) + ((s[0] + s[1]) + (s[2] + s[3])));
}

#ifdef GHNSW_X86
__attribute__((target("avx2,fma,f16c"))) static float l2_f16_pair_avx2(const void *av, const void *bv, size_t n,
                                                                       const float *w) {
    const uint16_t *a = av, *b = bv;
    __m256 acc = _mm256_setzero_ps();
    for (size_t i = 0; i < n; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i))),
                                 _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))));
        acc = _mm256_fmadd_ps(d, d, acc);
    }
    return hsum256(acc);
}
__attribute__((target("avx2,fma,f16c"))) static float ip_f16_pair_avx2(const void *av, const void *bv, size_t n,
                                                                       const float *w) {
    const uint16_t *a = av, *b = bv;
    __m256 acc = _mm256_setzero_ps();
    for (size_t i = 0; i < n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i))),
                              _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))), acc);
    return 1.0f - hsum256(acc);
}
__attribute__((target("avx2,fma,f16c"))) static inline __m256 i8x8_avx2(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
__attribute__((target("avx2,fma,f16c"))) static float l2_i8_pair_avx2(const void *av, const void *bv, size_t n,
                                                                      const float *w) {
    const int8_t *a = av, *b = bv;
    __m256 acc = _mm256_setzero_ps();
    for (size_t i = 0; i < n; i += 8) {
        __m256 d = _mm256_sub_ps(i8x8_avx2(a + i), i8x8_avx2(b + i));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(w + i), d), d, acc);
    }
    return hsum256(acc);
}
__attribute__((target("avx2,fma,f16c"))) static float ip_i8_pair_avx2(const void *av, const void *bv, size_t n,
                                                                      const float *w) {
    const int8_t *a = av, *b = bv;
    __m256 acc = _mm256_setzero_ps();
    for (size_t i = 0; i < n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(w + i), i8x8_avx2(a + i)), i8x8_avx2(b + i), acc);
    return 1.0f - (w[n] + i8_row_term(av, n) + i8_row_term(bv, n) + hsum256(acc));
}

__attribute__((target("avx512f"))) static float l2_f16_pair_avx512(const void *av, const void *bv, size_t n,
                                                                   const float *w) {
    const uint16_t *a = av, *b = bv;
    __m512 acc = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 16) {
        __m512 d = _mm512_sub_ps(load_half16(a + i, n - i), load_half16(b + i, n - i));
        acc = _mm512_fmadd_ps(d, d, acc);
    }
    return _mm512_reduce_add_ps(acc);
}
__attribute__((target("avx512f"))) static float ip_f16_pair_avx512(const void *av, const void *bv, size_t n,
                                                                   const float *w) {
    const uint16_t *a = av, *b = bv;
    __m512 acc = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(load_half16(a + i, n - i), load_half16(b + i, n - i), acc);
    return 1.0f - _mm512_reduce_add_ps(acc);
}
__attribute__((target("avx512f"))) static inline __m512 i8x16_avx512(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
__attribute__((target("avx512f"))) static float l2_i8_pair_avx512(const void *av, const void *bv, size_t n,
                                                                  const float *w) {
    const int8_t *a = av, *b = bv;
    __m512 acc = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 16) { /* n is a multiple of 16 */
        __m512 d = _mm512_sub_ps(i8x16_avx512(a + i), i8x16_avx512(b + i));
        acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(w + i), d), d, acc);
    }
    return _mm512_reduce_add_ps(acc);
}
__attribute__((target("avx512f"))) static float ip_i8_pair_avx512(const void *av, const void *bv, size_t n,
                                                                  const float *w) {
    const int8_t *a = av, *b = bv;
    __m512 acc = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 16)
        acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(w + i), i8x16_avx512(a + i)), i8x16_avx512(b + i), acc);
    return 1.0f - (w[n] + i8_row_term(av, n) + i8_row_term(bv, n) + _mm512_reduce_add_ps(acc));
}
#endif

static int simd_level(void) {
    static int level = -1;
    if (level >= 0) return level;
    int best = SIMD_PORTABLE;
#ifdef GHNSW_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        best = SIMD_AVX2;
    if (best == SIMD_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        best = SIMD_AVX512;
    if (best == SIMD_AVX512 && __builtin_cpu_supports("avx512vnni")) best = SIMD_VNNI;
#endif
    const char *env = getenv("GHNSW_SIMD");
    int want = best;
    if (env && env[0]) {
        if (!strcmp(env, "portable")) want = SIMD_PORTABLE;
        else if (!strcmp(env, "avx2")) want = SIMD_AVX2;
        else if (!strcmp(env, "avx512")) want = SIMD_AVX512;
        else if (!strcmp(env, "avx512vnni")) want = SIMD_VNNI;
    }
    level = want < best ? want : best;
    return level;
}

const char *ghnsw_simd_name(void) {
    static const char *names[] = {"portable", "avx2", "avx512", "avx512vnni"};
    return names[simd_level()];
}

ghnsw_dist_fn ghnsw_pick_distance(int space, int storage) {
    int lv = simd_level();
    int is_l2 = space == GHNSW_L2;
#ifdef GHNSW_X86
    if (storage == GHNSW_I8) {
        if (lv == SIMD_VNNI) return is_l2 ? l2_i8_vnni : ip_i8_vnni;
        if (lv == SIMD_AVX512) return is_l2 ? l2_i8_avx512 : ip_i8_avx512;
        if (lv == SIMD_AVX2) return is_l2 ? l2_i8_avx2 : ip_i8_avx2;
    } else if (storage == GHNSW_F16) {
        if (lv >= SIMD_AVX512) return is_l2 ? l2_f16_avx512 : ip_f16_avx512;
        if (lv == SIMD_AVX2) return is_l2 ? l2_f16_avx2 : ip_f16_avx2;
    } else {
        if (lv >= SIMD_AVX512) return is_l2 ? l2_avx512 : ip_avx512;
        if (lv == SIMD_AVX2) return is_l2 ? l2_avx2 : ip_avx2;
    }
#endif
    (void)lv;
    if (storage == GHNSW_I8) return is_l2 ? l2_i8_portable : ip_i8_portable;
    if (storage == GHNSW_F16) return is_l2 ? l2_f16_portable : ip_f16_portable;
    return is_l2 ? l2_portable : ip_portable;
}

/* float32 rows are their own prepared queries: the query kernel, without weights */
#define F32_PAIR(NAME, KERNEL) \
    static float NAME(const void *a, const void *b, size_t n, const float *w) { return KERNEL(a, b, n); }
F32_PAIR(l2_pair_portable32, l2_portable)
F32_PAIR(ip_pair_portable32, ip_portable)
#ifdef GHNSW_X86
F32_PAIR(l2_pair_avx2_32, l2_avx2)
F32_PAIR(ip_pair_avx2_32, ip_avx2)
F32_PAIR(l2_pair_avx512_32, l2_avx512)
F32_PAIR(ip_pair_avx512_32, ip_avx512)
#endif

ghnsw_pair_fn ghnsw_pick_pair(int space, int storage) {
    int lv = simd_level();
    int is_l2 = space == GHNSW_L2;
#ifdef GHNSW_X86
    if (lv >= SIMD_AVX512) {
        if (storage == GHNSW_I8) return is_l2 ? l2_i8_pair_avx512 : ip_i8_pair_avx512;
        if (storage == GHNSW_F16) return is_l2 ? l2_f16_pair_avx512 : ip_f16_pair_avx512;
        return is_l2 ? l2_pair_avx512_32 : ip_pair_avx512_32;
    }
    if (lv == SIMD_AVX2) {
        if (storage == GHNSW_I8) return is_l2 ? l2_i8_pair_avx2 : ip_i8_pair_avx2;
        if (storage == GHNSW_F16) return is_l2 ? l2_f16_pair_avx2 : ip_f16_pair_avx2;
        return is_l2 ? l2_pair_avx2_32 : ip_pair_avx2_32;
    }
#endif
    (void)lv;
    if (storage == GHNSW_I8) return is_l2 ? l2_i8_pair_portable : ip_i8_pair_portable;
    if (storage == GHNSW_F16) return is_l2 ? l2_f16_pair_portable : ip_f16_pair_portable;
    return is_l2 ? l2_pair_portable32 : ip_pair_portable32;
}

ghnsw_tile_fn ghnsw_pick_tile(int space, int storage) {
    int lv = simd_level();
    int is_l2 = space == GHNSW_L2;
#ifdef GHNSW_X86
    if (storage == GHNSW_I8) {
        if (lv == SIMD_VNNI) return is_l2 ? tile_l2_i8_vnni : tile_ip_i8_vnni;
        if (lv == SIMD_AVX512) return is_l2 ? tile_l2_i8_avx512 : tile_ip_i8_avx512;
        if (lv == SIMD_AVX2) return is_l2 ? tile_l2_i8_avx2 : tile_ip_i8_avx2;
    } else if (storage == GHNSW_F16) {
        if (lv >= SIMD_AVX512) return is_l2 ? tile_l2_f16_avx512 : tile_ip_f16_avx512;
        if (lv == SIMD_AVX2) return is_l2 ? tile_l2_f16_avx2 : tile_ip_f16_avx2;
    } else {
        if (lv >= SIMD_AVX512) return is_l2 ? tile_l2_avx512 : tile_ip_avx512;
        if (lv == SIMD_AVX2) return is_l2 ? tile_l2_avx2 : tile_ip_avx2;
    }
#endif
    (void)lv;
    if (storage == GHNSW_I8) return is_l2 ? tile_l2_i8_portable : tile_ip_i8_portable;
    if (storage == GHNSW_F16) return is_l2 ? tile_l2_f16_portable : tile_ip_f16_portable;
    return is_l2 ? tile_l2_portable : tile_ip_portable;
}

ghnsw_row_fn ghnsw_pick_row(int space) {
    int lv = simd_level();
    int is_l2 = space == GHNSW_L2;
#ifdef GHNSW_X86
    if (lv >= SIMD_AVX512) return is_l2 ? row_l2_avx512 : row_ip_avx512;
    if (lv == SIMD_AVX2) return is_l2 ? row_l2_avx2 : row_ip_avx2;
#endif
    (void)lv;
    return is_l2 ? row_l2_portable : row_ip_portable;
}

/* hnswlib's normalisation: x * 1/(|x| + 1e-30), so a zero vector stays zero. */
void ghnsw_normalize(float *v, size_t dim) {
    float s = 0;
    for (size_t i = 0; i < dim; i++) s += v[i] * v[i];
    float inv = 1.0f / (sqrtf(s) + 1e-30f);
    for (size_t i = 0; i < dim; i++) v[i] *= inv;
}
