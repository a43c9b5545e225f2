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
    if (in_place && (in->vectors || in->links0 || !ix->vectors_map_len || ix->map_rows < n))
        return ghnsw_fail(err, GHNSW_EINVAL, "vectors and links0 must both be given or both be mapped");
    if (!in_place && in->vectors_len != (size_t)n * ix->dim * 4)
        return ghnsw_fail(err, GHNSW_ECORRUPT, "vectors: wrong length");
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
    /* mapped vectors are not read here (that is what makes a mapped load fast): a bad value can only
     * give a wrong distance, never a bad access; _io verifies them on request */
    const float *vec = (const float *)in->vectors;
    for (size_t i = 0; !in_place && i < (size_t)n * ix->dim; i++)
        if (!(vec[i] - vec[i] == 0.0f)) return ghnsw_fail(err, GHNSW_ECORRUPT, "vectors: NaN or inf");
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
    for (uint32_t s = 0; s < n; s++) {
        if (!in_place) { /* mapped rows: unused links must already be invalid (the checker below) */
            memcpy(ghnsw_vec(ix, s), vec + (size_t)s * ix->dim, ix->dim * 4);
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
    ix->count = n;
    ix->entry_point = n ? (uint32_t)in->entry_point : GHNSW_INVALID;
    ix->max_level = n ? in->max_level : -1;
    ix->insert_seq = in->insert_seq;
    ghnsw_integrity_t info;
    return ghnsw_check_integrity(ix, &info, err);
}
