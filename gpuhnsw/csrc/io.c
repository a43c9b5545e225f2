/* State import: a freshly created index is filled from flat arrays (a file or a pickle) after every
 * length, count and id has been checked; the integrity checker then runs over the result. */
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"
#include "locks.h"

ghnsw_status_t ghnsw_import(ghnsw_index_t *ix, const ghnsw_state_t *in, ghnsw_err_t *err) {
    uint32_t n = in->count, M = ix->M, M0 = ix->M0;
    if (n > ix->capacity) return ghnsw_fail(err, GHNSW_ECORRUPT, "count %u exceeds max_elements %u", n, ix->capacity);
    /* rows in place (mapped): they must be the mapping's, and it must hold count rows */
    int in_place = !in->vectors || !in->links0;
    if (in_place && (in->vectors || in->links0 || in->exact || in->vectors_f32 || !ix->vectors_map_len ||
                     ix->map_rows < n || (ix->rerank && !ix->exact_map_len)))
        return ghnsw_fail(err, GHNSW_EINVAL, "vectors, links0 (and exact) must all be given or all be mapped");
    /* float32 [n, dim] rows (encoded here), or the stored rows as they are */
    int floats = in->vectors_f32 || ix->storage == GHNSW_F32;
    size_t vrow = floats ? (size_t)ix->dim * 4 : ix->row_bytes;
    if (!in_place && in->vectors_len != (size_t)n * vrow) return ghnsw_fail(err, GHNSW_ECORRUPT, "vectors: wrong length");
    int exact_from_vectors = ix->rerank && in->vectors_f32; /* the given float rows are the exact ones */
    if (ix->rerank && !in_place && !exact_from_vectors && (!in->exact || in->exact_len != (size_t)n * ix->dim * 4))
        return ghnsw_fail(err, GHNSW_ECORRUPT, "exact: wrong length (need float32 [count, dim] with rerank)");
    if (!ix->rerank && in->exact && in->exact_len)
        return ghnsw_fail(err, GHNSW_ECORRUPT, "exact rows given to an index without rerank");
    if (in->quantizer && in->quantizer_len) {
        if (ix->storage != GHNSW_I8) return ghnsw_fail(err, GHNSW_ECORRUPT, "quantizer given for a storage other than int8");
        if (in->quantizer_len != 2 * (size_t)ix->dim * 4) return ghnsw_fail(err, GHNSW_ECORRUPT, "quantizer: wrong length");
    } else if (ix->storage == GHNSW_I8 && n && !(in->vectors_f32 && !in_place)) {
        return ghnsw_fail(err, GHNSW_ECORRUPT, "int8 rows without their quantizer");
    }
    if (in->clipped_values < in->clipped_rows || in->clipped_rows > in->insert_seq)
        return ghnsw_fail(err, GHNSW_ECORRUPT, "clip counters inconsistent (rows %llu, values %llu)",
                          (unsigned long long)in->clipped_rows, (unsigned long long)in->clipped_values);
    if (!in_place && in->links0_len != (size_t)n * M0 * 4) return ghnsw_fail(err, GHNSW_ECORRUPT, "links0: wrong length");
    if (in->degree0_len != (size_t)n * 4) return ghnsw_fail(err, GHNSW_ECORRUPT, "degree0: wrong length");
    if (in->labels_len != (size_t)n * 8) return ghnsw_fail(err, GHNSW_ECORRUPT, "labels: wrong length");
    if (in->levels_len != (size_t)n) return ghnsw_fail(err, GHNSW_ECORRUPT, "levels: wrong length");
    if (in->deleted_len != (size_t)n) return ghnsw_fail(err, GHNSW_ECORRUPT, "deleted: wrong length");
    size_t upper_words = 0;
    int top = -1;
    for (uint32_t s = 0; s < n; s++) {
        upper_words += (size_t)in->levels[s] * (1 + M);
        if (in->levels[s] > top) top = in->levels[s];
    }
    if (in->upper_len != upper_words * 4) return ghnsw_fail(err, GHNSW_ECORRUPT, "upper links: wrong length");
    if (n == 0) {
        if (in->entry_point != -1 || in->max_level != -1)
            return ghnsw_fail(err, GHNSW_ECORRUPT, "empty index with an entry point");
    } else {
        if (in->entry_point < 0 || in->entry_point >= (int64_t)n)
            return ghnsw_fail(err, GHNSW_ECORRUPT, "entry point out of range");
        if (in->max_level != top || in->levels[in->entry_point] != top)
            return ghnsw_fail(err, GHNSW_ECORRUPT, "max level / entry point level inconsistent");
    }
    const uint32_t *deg = (const uint32_t *)in->degree0;
    const uint32_t *l0 = in_place ? ix->links0 : (const uint32_t *)in->links0;
    const uint32_t *up = (const uint32_t *)in->upper;
    size_t off = 0;
    for (uint32_t s = 0; s < n; s++) {
        if (deg[s] > M0) return ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u: degree %u > %u", s, deg[s], M0);
        for (uint32_t j = 0; j < deg[s]; j++)
            if (l0[(size_t)s * M0 + j] >= n) return ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u: neighbour out of range", s);
        for (int l = 1; l <= in->levels[s]; l++, off += 1 + M) {
            if (up[off] > M) return ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u level %d: count %u > M", s, l, up[off]);
            for (uint32_t j = 0; j < up[off]; j++)
                if (up[off + 1 + j] >= n) return ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u: neighbour out of range", s);
        }
        if (in->deleted[s] > 1) return ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u: bad deleted flag", s);
    }
    /* mapped rows are not read here (that is what makes a mapped load fast): a bad value can only
     * give a wrong distance, never a bad access; _io verifies them on request */
    const float *vec = (const float *)in->vectors;
    for (size_t i = 0; !in_place && floats && i < (size_t)n * ix->dim; i++)
        if (!(vec[i] - vec[i] == 0.0f)) return ghnsw_fail(err, GHNSW_ECORRUPT, "vectors: NaN or inf");
    for (size_t i = 0; ix->rerank && !in_place && !exact_from_vectors && i < (size_t)n * ix->dim; i++)
        if (!(in->exact[i] - in->exact[i] == 0.0f)) return ghnsw_fail(err, GHNSW_ECORRUPT, "exact: NaN or inf");
    const uint8_t *rows = in->vectors;
    for (uint32_t s = 0; !in_place && !floats && s < n; s++) { /* stored rows: finite, zero padding */
        const uint8_t *r = rows + (size_t)s * vrow;
        if (ix->storage == GHNSW_F16) {
            for (uint32_t j = 0; j < ix->dim; j++) {
                uint16_t h;
                memcpy(&h, r + 2 * (size_t)j, 2);
                if ((h & 0x7C00) == 0x7C00) return ghnsw_fail(err, GHNSW_ECORRUPT, "vectors: float16 NaN or inf in slot %u", s);
            }
            for (size_t j = 2 * (size_t)ix->dim; j < vrow; j++)
                if (r[j]) return ghnsw_fail(err, GHNSW_ECORRUPT, "vectors: non-zero padding in slot %u", s);
        } else {
            for (size_t j = ix->dim; j < ix->row_n; j++)
                if (r[j]) return ghnsw_fail(err, GHNSW_ECORRUPT, "vectors: non-zero padding in slot %u", s);
        }
    }
    /* the quantiser before any row is encoded; an untrained int8 index given float rows takes their ranges */
    ghnsw_status_t st = GHNSW_OK;
    if (in->quantizer && in->quantizer_len)
        st = ghnsw_set_quantizer(ix, in->quantizer, in->quantizer + ix->dim, err);
    else if (ix->storage == GHNSW_I8 && n) { /* as an add trains: ranges and integral dimensions */
        float *lo = malloc(2 * (size_t)ix->dim * sizeof(float) + ix->dim), *hi = lo + ix->dim;
        if (!lo) return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
        uint8_t *integral = (uint8_t *)(hi + ix->dim);
        for (uint32_t j = 0; j < ix->dim; j++) { lo[j] = vec[j]; hi[j] = vec[j]; integral[j] = 1; }
        for (size_t i = 0; i < (size_t)n * ix->dim; i++) {
            size_t j = i % ix->dim;
            lo[j] = vec[i] < lo[j] ? vec[i] : lo[j];
            hi[j] = vec[i] > hi[j] ? vec[i] : hi[j];
            integral[j] &= (uint8_t)ghnsw_is_small_integer(vec[i]);
        }
        st = ghnsw_quantizer_from_ranges(ix, lo, hi, integral, err);
        free(lo);
    }
    if (st) return st;
    /* labels must be unique: insert into the (empty) map, checking for a previous entry */
    const uint64_t *lab = (const uint64_t *)in->labels;
    for (uint32_t s = 0; s < n; s++) {
        if (ghnsw_map_get(&ix->map, lab[s]) != GHNSW_INVALID) {
            for (uint32_t t = 0; t < s; t++) ghnsw_map_del(&ix->map, lab[t]);
            return ghnsw_fail(err, GHNSW_ECORRUPT, "label %llu appears twice", (unsigned long long)lab[s]);
        }
        ghnsw_map_put(&ix->map, lab[s], s);
    }
    /* all checked: copy in */
    off = 0;
    float *x = !in_place && floats && ix->storage != GHNSW_F32 ? calloc(ix->dim_pad, sizeof(float)) : NULL;
    if (!in_place && floats && ix->storage != GHNSW_F32 && !x) return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
    for (uint32_t s = 0; s < n; s++) {
        if (!in_place) { /* mapped rows: unused links must already be invalid (the checker below) */
            if (ix->storage == GHNSW_F32) {
                memcpy(ghnsw_vec(ix, s), vec + (size_t)s * ix->dim, ix->dim * 4);
            } else if (floats) { /* encoded; the clip counters count these rows as an add would */
                memcpy(x, vec + (size_t)s * ix->dim, ix->dim * 4);
                uint32_t clipped = ghnsw_encode(ix, x, ghnsw_vec(ix, s));
                ix->clipped_rows += clipped != 0;
                ix->clipped_values += clipped;
            } else {
                memcpy(ghnsw_vec(ix, s), rows + (size_t)s * vrow, vrow);
                if (ix->storage == GHNSW_I8) { /* the per-row term is the engine's: recomputed */
                    float r = ghnsw_row_term(ix, (const int8_t *)ghnsw_vec(ix, s));
                    memcpy(ghnsw_vec(ix, s) + ix->row_n, &r, sizeof r);
                }
            }
            if (ix->rerank)
                memcpy(ghnsw_exact(ix, s), exact_from_vectors ? vec + (size_t)s * ix->dim : in->exact + (size_t)s * ix->dim,
                       ix->dim * 4);
            memcpy(ghnsw_links0(ix, s), l0 + (size_t)s * M0, (size_t)M0 * 4);
            for (uint32_t j = deg[s]; j < M0; j++) ghnsw_links0(ix, s)[j] = GHNSW_INVALID;
        }
        ix->degree0[s] = deg[s];
        ix->labels[s] = lab[s];
        ix->levels[s] = in->levels[s];
        if (in->levels[s]) {
            size_t w = (size_t)in->levels[s] * (1 + M);
            ix->upper[s] = malloc(w * 4);
            if (!ix->upper[s]) {
                ix->count = s; /* so ghnsw_free releases what was allocated */
                free(x);
                return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
            }
            memcpy(ix->upper[s], up + off, w * 4);
            for (int l = 1; l <= in->levels[s]; l++) {
                uint32_t *blk = ghnsw_upper(ix, s, l);
                for (uint32_t j = blk[0]; j < M; j++) blk[1 + j] = GHNSW_INVALID;
            }
            off += w;
        }
        if (in->deleted[s]) { ghnsw_bit_set(ix->deleted, s); ix->n_deleted++; }
        ghnsw_mark_dirty(ix, s, GHNSW_DIRTY_ROW | GHNSW_DIRTY_UPPER | GHNSW_DIRTY_DELETED);
    }
    free(x);
    if (!floats || ix->storage == GHNSW_F32) {
        ix->clipped_rows = in->clipped_rows;
        ix->clipped_values = in->clipped_values;
    }
    ix->count = n;
    ix->entry_point = n ? (uint32_t)in->entry_point : GHNSW_INVALID;
    ix->max_level = n ? in->max_level : -1;
    ix->insert_seq = in->insert_seq;
    ghnsw_integrity_t info;
    return ghnsw_check_integrity(ix, &info, err);
}
