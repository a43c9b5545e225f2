/* Stored rows (gpuhnsw.h, "vectors"): float32, float16, or int8 codes of a per-dimension scalar
 * quantiser; encoding, decoding, and the prepared queries the distance kernels take.
 *
 * int8.  Each dimension i has an offset m_i and a scale s_i >= 0 (from a range lo_i..hi_i:
 * s_i = (hi_i - lo_i) / 255, m_i = lo_i + 128 s_i; s_i = 1 for a dimension whose training values
 * are integers spanning at most 256 values, so that they are stored exactly), and a value x_i is
 * stored as the code
 * c_i = round((x_i - m_i) / s_i) in [-128, 127] (clipped outside the range, and counted), so
 * x_i ~ m_i + s_i c_i.  A query x is prepared once per search:
 *
 *   l2:  |x - x^|^2 = |x - m|^2 + |s c|^2 - 2 sum_i (x_i - m_i) s_i c_i
 *   ip:  1 - x . x^ = 1 - x . m - sum_i x_i s_i c_i
 *
 * The weights w_i = (x_i - m_i) s_i (l2) or x_i s_i (ip) are rounded to integers u_i = round(w_i / a)
 * with a = max_i |w_i| / U, so the sum is a * (u . c), computed exactly in int32 by the kernels
 * (vpmaddwd / vpdpwssd on int16 u and sign-extended codes).  U = min(32767, (2^31 - 1) /
 * (128 * code_pad)) keeps |u . c| <= 128 * U * code_pad below 2^31, so no lane and no sum overflows
 * whatever the codes.  The per-query terms c0 = |x - m|^2 (l2) or 1 - x . m (ip) and the factor
 * f = -2a (l2) or -a (ip) go in the query's header; the per-row term sq = |s c|^2 (l2) sits behind the
 * row's codes, so a distance is c0 + sq + f * (u . c): one pass over 1-byte codes, no decoding.  (For
 * ip and cosine that slot holds r = m . (s c) instead, the row's term of a distance between two stored
 * rows: distance.c, ghnsw_pair_fn.)
 * Rounding the weights costs a relative error of about 1 / (2U) per term, far below the codes' own
 * 1 / 510 of the range.  Offsets near the data (the middle of each range) keep |x - m|^2 and sq of the
 * order of the data's spread, so data far from the origin loses nothing to cancellation.  Cosine rows
 * are normalised first, then quantised (and queries normalised), as ip. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"
#include "locks.h"

static size_t code_pad(uint32_t dim) { return ((size_t)dim + 15) & ~(size_t)15; }
static size_t dim_pad8(uint32_t dim) { return ((size_t)dim + 7) & ~(size_t)7; }

/* Elements the kernels read per row, and the row's bytes (the layout in gpuhnsw.h). */
static size_t row_elements(uint32_t dim, int storage) {
    return storage == GHNSW_I8 ? code_pad(dim) : storage == GHNSW_F16 ? dim_pad8(dim) : (((size_t)dim + 3) & ~(size_t)3);
}

size_t ghnsw_row_bytes(uint32_t dim, int storage) {
    size_t n = row_elements(dim, storage);
    return storage == GHNSW_I8 ? n + sizeof(float) : storage == GHNSW_F16 ? n * sizeof(uint16_t) : n * sizeof(float);
}

void ghnsw_storage_init(ghnsw_index_t *ix) {
    size_t floats = (size_t)ix->dim_pad * sizeof(float);
    ix->row_n = row_elements(ix->dim, ix->storage);
    ix->row_bytes = ghnsw_row_bytes(ix->dim, ix->storage);
    if (ix->storage == GHNSW_I8) /* header, u [code_pad], then room for the weights while they are rounded */
        ix->query_bytes = sizeof(ghnsw_i8q_t) + ix->row_n * sizeof(int16_t) + floats;
    else
        ix->query_bytes = ix->row_n * sizeof(float);
    ix->dist = ghnsw_pick_distance(ix->space, ix->storage);
    ix->exact_dist = ghnsw_pick_distance(ix->space, GHNSW_F32);
    ix->pair = ghnsw_pick_pair(ix->space, ix->storage);
}

ghnsw_status_t ghnsw_set_quantizer(ghnsw_index_t *ix, const float *offset, const float *scale, ghnsw_err_t *err) {
    if (ix->storage != GHNSW_I8) return ghnsw_fail(err, GHNSW_EINVAL, "a quantiser applies to int8 storage only");
    for (uint32_t i = 0; i < ix->dim; i++) {
        /* every decoded value m + s c, c in [-128, 127], must be finite */
        float lo = offset[i] - 128.0f * scale[i], hi = offset[i] + 127.0f * scale[i];
        if (!isfinite(offset[i]) || !isfinite(scale[i]) || !(scale[i] >= 0) || !isfinite(lo) || !isfinite(hi))
            return ghnsw_fail(err, GHNSW_ECORRUPT, "int8 quantiser of dimension %u: offset %g, scale %g "
                              "(need finite values, scale >= 0)", i, (double)offset[i], (double)scale[i]);
    }
    if (!ix->q_offset) {
        float *m = calloc(2 * (size_t)ix->dim + ix->row_n + 1, sizeof(float));
        if (!m) return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
        ix->q_offset = m;
        ix->q_scale = m + ix->dim;
        ix->pair_w = m + 2 * (size_t)ix->dim;
    }
    memcpy(ix->q_offset, offset, ix->dim * sizeof(float));
    memcpy(ix->q_scale, scale, ix->dim * sizeof(float));
    double m2 = 0;
    for (uint32_t i = 0; i < ix->dim; i++) {
        ix->pair_w[i] = scale[i] * scale[i];
        m2 += (double)offset[i] * offset[i];
    }
    ix->pair_w[ix->row_n] = (float)m2;
    return GHNSW_OK;
}

ghnsw_status_t ghnsw_quantizer_from_ranges(ghnsw_index_t *ix, const float *lo, const float *hi, const uint8_t *integral,
                                           ghnsw_err_t *err) {
    float *m = malloc(2 * (size_t)ix->dim * sizeof(float));
    if (!m) return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
    float *s = m + ix->dim;
    ghnsw_status_t st = GHNSW_OK;
    for (uint32_t i = 0; i < ix->dim && !st; i++) {
        float width = hi[i] - lo[i];
        if (!isfinite(lo[i]) || !isfinite(hi[i]) || !(lo[i] <= hi[i]) || !isfinite(width))
            st = ghnsw_fail(err, GHNSW_EINVAL, "int8 range of dimension %u is [%g, %g]: need finite low <= high", i,
                            (double)lo[i], (double)hi[i]);
        /* integers spanning <= 256 values (pixels, SIFT) are their own codes: stored exactly */
        s[i] = integral && integral[i] && width <= 255.0f ? 1.0f : width / 255.0f;
        m[i] = lo[i] + 128.0f * s[i];
    }
    if (!st) st = ghnsw_set_quantizer(ix, m, s, err);
    if (st == GHNSW_ECORRUPT) st = GHNSW_EINVAL; /* the ranges were the caller's */
    free(m);
    return st;
}

ghnsw_status_t ghnsw_train(ghnsw_index_t *ix, const float *lo, const float *hi, const uint8_t *integral,
                           ghnsw_err_t *err) {
    if (ix->storage != GHNSW_I8) return ghnsw_fail(err, GHNSW_EINVAL, "ranges apply to storage='int8' only");
    ghnsw_status_t st = ghnsw_writer_lock(ix, "train", err);
    if (st) return st;
    if (ix->count) st = ghnsw_fail(err, GHNSW_ESTATE, "the int8 ranges are set before the first row is stored "
                                   "(the index holds %u)", ix->count);
    else st = ghnsw_quantizer_from_ranges(ix, lo, hi, integral, err);
    pthread_mutex_unlock(&ix->mut_lock);
    return st;
}

int ghnsw_get_quantizer(ghnsw_index_t *ix, float *out) {
    pthread_mutex_lock(&ix->mut_lock); /* set by an add or a train, under it */
    int trained = ix->q_scale != NULL;
    if (trained) {
        memcpy(out, ix->q_offset, ix->dim * sizeof(float));
        memcpy(out + ix->dim, ix->q_scale, ix->dim * sizeof(float));
    }
    pthread_mutex_unlock(&ix->mut_lock);
    return trained;
}

float ghnsw_row_term(const ghnsw_index_t *ix, const int8_t *codes) {
    double r = 0;
    int l2 = ix->space == GHNSW_L2;
    for (uint32_t i = 0; i < ix->dim; i++) {
        double v = (double)(ix->q_scale[i] * (float)codes[i]);
        r += l2 ? v * v : v * ix->q_offset[i];
    }
    return (float)r;
}

/* Round to nearest even for |v| < 2^22 (every use here is within +-2^15): float addition does it, and
 * the loops that use it vectorise (lrintf is a library call). */
static inline float round_even(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return (v + magic) - magic;
}

int ghnsw_is_small_integer(float v) { return fabsf(v) < 4194304.0f && round_even(v) == v; }

void ghnsw_float_row(const ghnsw_index_t *ix, const float *src, float *x) {
    memcpy(x, src, sizeof(float) * ix->dim);
    memset(x + ix->dim, 0, sizeof(float) * (ix->dim_pad - ix->dim));
    if (ix->space == GHNSW_COSINE) ghnsw_normalize(x, ix->dim);
}

uint32_t ghnsw_encode(const ghnsw_index_t *ix, const float *x, uint8_t *row) {
    uint32_t clipped = 0, dim = ix->dim;
    if (ix->storage == GHNSW_F32) {
        memcpy(row, x, (size_t)ix->dim_pad * sizeof(float));
    } else if (ix->storage == GHNSW_F16) {
        uint16_t *h = (uint16_t *)row;
        ghnsw_floats_to_halves(x, h, dim);
        memset(h + dim, 0, (ix->row_n - dim) * sizeof(uint16_t));
    } else {
        int8_t *c = (int8_t *)row;
        for (uint32_t i = 0; i < dim; i++) {
            float s = ix->q_scale[i], t = s > 0 ? (x[i] - ix->q_offset[i]) / s : 0.0f;
            int code;
            if (t >= 127.5f) code = 127;
            else if (t < -128.5f) code = -128;
            else code = (int)round_even(t); /* -128.5 rounds to even: -128 */
            /* outside the range by more than half a step (or off a zero-width range) */
            clipped += t >= 127.5f || t < -128.5f || (s == 0 && x[i] != ix->q_offset[i]);
            c[i] = (int8_t)code;
        }
        memset(c + dim, 0, ix->row_n - dim);
        float r = ghnsw_row_term(ix, c);
        memcpy(row + ix->row_n, &r, sizeof r);
    }
    return clipped;
}

void ghnsw_decode(const ghnsw_index_t *ix, const uint8_t *row, float *out) {
    if (ix->storage == GHNSW_F32) {
        memcpy(out, row, (size_t)ix->dim * sizeof(float));
    } else if (ix->storage == GHNSW_F16) {
        const uint16_t *h = (const uint16_t *)row;
        for (uint32_t i = 0; i < ix->dim; i++) out[i] = ghnsw_half_to_float(h[i]);
    } else {
        const int8_t *c = (const int8_t *)row;
        for (uint32_t i = 0; i < ix->dim; i++) out[i] = ix->q_offset[i] + ix->q_scale[i] * (float)c[i];
    }
}

void ghnsw_prepare(const ghnsw_index_t *ix, const float *x, void *qv) {
    uint32_t dim = ix->dim;
    if (ix->storage == GHNSW_F32) {
        if (qv != x) memcpy(qv, x, (size_t)ix->dim_pad * sizeof(float));
        return;
    }
    if (ix->storage == GHNSW_F16) { /* a float query over dim_pad8 */
        float *q = qv;
        memcpy(q, x, (size_t)dim * sizeof(float));
        memset(q + dim, 0, (ix->row_n - dim) * sizeof(float));
        return;
    }
    ghnsw_i8q_t *h = qv;
    int16_t *u = (int16_t *)(h + 1);
    float *w = (float *)(u + ix->row_n); /* the weights, in the room behind u */
    const float *m = ix->q_offset, *s = ix->q_scale;
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint32_t amax_bits = 0; /* |w| compared as integers: the same order for non-negative floats */
    if (ix->space == GHNSW_L2) {
        for (uint32_t i = 0; i < dim; i++) {
            float t = x[i] - m[i];
            w[i] = t * s[i];
            part[i & 7] += t * t;
        }
    } else {
        for (uint32_t i = 0; i < dim; i++) {
            w[i] = x[i] * s[i];
            part[i & 7] += x[i] * m[i];
        }
    }
    for (uint32_t i = 0; i < dim; i++) {
        uint32_t b;
        memcpy(&b, &w[i], sizeof b);
        b &= 0x7FFFFFFFu;
        amax_bits = b > amax_bits ? b : amax_bits;
    }
    float amax, c0 = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    memcpy(&amax, &amax_bits, sizeof amax);
    double top = 2147483647.0 / (128.0 * (double)ix->row_n);
    float U = (float)(top < 32767.0 ? floor(top) : 32767.0);
    float inv = amax > 0 ? U / amax : 0.0f;
    for (uint32_t i = 0; i < dim; i++) {
        float v = w[i] * inv; /* |v| <= U up to rounding: clamped, so that the bound holds exactly */
        v = v > U ? U : v < -U ? -U : v;
        u[i] = (int16_t)round_even(v);
    }
    memset(u + dim, 0, (ix->row_n - dim) * sizeof(int16_t));
    float a = amax > 0 ? amax / U : 0.0f;
    h->c0 = ix->space == GHNSW_L2 ? c0 : 1.0f - c0;
    h->f = ix->space == GHNSW_L2 ? -2.0f * a : -a;
    h->pad[0] = h->pad[1] = 0;
}
