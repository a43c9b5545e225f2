/* Integrity checker: every structural promise of the graph, checked from scratch.  Used by tests after
 * every kind of mutation and by from_state after a load. */
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"
#include "locks.h"

static ghnsw_status_t check_list(ghnsw_index_t *ix, uint32_t s, int l, const uint32_t *ids, uint32_t deg,
                                 uint32_t cap, uint8_t *seen, ghnsw_err_t *err) {
    if (deg > cap) return ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u level %d: degree %u > %u", s, l, deg, cap);
    for (uint32_t j = 0; j < deg; j++) {
        uint32_t t = ids[j];
        if (t >= ix->count)
            return ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u level %d: neighbour id %u out of range", s, l, t);
        if (t == s) return ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u level %d: self loop", s, l);
        if (ix->levels[t] < l)
            return ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u level %d: neighbour %u has level %d", s, l, t,
                              ix->levels[t]);
        if (seen[t]) return ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u level %d: duplicate neighbour %u", s, l, t);
        seen[t] = 1;
    }
    for (uint32_t j = 0; j < deg; j++) seen[ids[j]] = 0;
    return GHNSW_OK;
}

/* Under mut_lock (no writer runs). */
static ghnsw_status_t check_graph(ghnsw_index_t *ix, ghnsw_integrity_t *out, ghnsw_err_t *err) {
    uint32_t n = ix->count;
    memset(out, 0, sizeof(*out));
    out->max_level = ix->max_level;
    if (n > ix->capacity) return ghnsw_fail(err, GHNSW_ECORRUPT, "count %u > capacity %u", n, ix->capacity);
    if (n == 0) {
        if (ix->entry_point != GHNSW_INVALID || ix->max_level != -1)
            return ghnsw_fail(err, GHNSW_ECORRUPT, "empty index with an entry point");
        return GHNSW_OK;
    }
    if (ix->entry_point >= n) return ghnsw_fail(err, GHNSW_ECORRUPT, "entry point %u out of range", ix->entry_point);
    if (ix->levels[ix->entry_point] != ix->max_level)
        return ghnsw_fail(err, GHNSW_ECORRUPT, "entry point level %d != max level %d",
                          ix->levels[ix->entry_point], ix->max_level);
    uint8_t *seen = calloc(n, 1);
    uint32_t *queue = malloc(sizeof(uint32_t) * n);
    if (!seen || !queue) { free(seen); free(queue); return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory"); }
    ghnsw_status_t st = GHNSW_OK;
    size_t n_deleted = 0;
    for (uint32_t s = 0; s < n && st == GHNSW_OK; s++) {
        if (ix->levels[s] > ix->max_level) {
            st = ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u level %d > max level %d", s, ix->levels[s], ix->max_level);
            break;
        }
        if (ghnsw_map_get(&ix->map, ix->labels[s]) != s) {
            st = ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u: label map does not point back", s);
            break;
        }
        n_deleted += ghnsw_bit_get(ix->deleted, s);
        const uint32_t *l0 = ghnsw_links0(ix, s);
        uint32_t deg = ix->degree0[s];
        st = check_list(ix, s, 0, l0, deg, ix->M0, seen, err);
        for (uint32_t j = deg; st == GHNSW_OK && j < ix->M0; j++)
            if (l0[j] != GHNSW_INVALID) st = ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u: unused link not invalid", s);
        out->n_edges += deg;
        if (ix->levels[s] > 0 && !ix->upper[s]) { st = ghnsw_fail(err, GHNSW_ECORRUPT, "slot %u: no upper links", s); break; }
        for (int l = 1; st == GHNSW_OK && l <= ix->levels[s]; l++) {
            const uint32_t *blk = ghnsw_upper(ix, s, l);
            st = check_list(ix, s, l, blk + 1, blk[0], ix->M, seen, err);
            out->n_edges += blk[0];
        }
    }
    if (st == GHNSW_OK && ix->map.live != n)
        st = ghnsw_fail(err, GHNSW_ECORRUPT, "label map holds %zu labels for %u slots", ix->map.live, (unsigned)n);
    if (st == GHNSW_OK && n_deleted != ix->n_deleted)
        st = ghnsw_fail(err, GHNSW_ECORRUPT, "deleted count %u != %zu marked", ix->n_deleted, n_deleted);
    if (st == GHNSW_OK) { /* reachability: BFS from the entry point over all levels' links */
        memset(seen, 0, n);
        size_t head = 0, tail = 0;
        queue[tail++] = ix->entry_point;
        seen[ix->entry_point] = 1;
        while (head < tail) {
            uint32_t s = queue[head++];
            for (int l = 0; l <= ix->levels[s]; l++) {
                const uint32_t *ids = l ? ghnsw_upper(ix, s, l) + 1 : ghnsw_links0(ix, s);
                uint32_t deg = l ? ghnsw_upper(ix, s, l)[0] : ix->degree0[s];
                for (uint32_t j = 0; j < deg; j++)
                    if (!seen[ids[j]]) { seen[ids[j]] = 1; queue[tail++] = ids[j]; }
            }
        }
        out->n_unreachable = n - tail;
    }
    out->n_deleted = n_deleted;
    out->n_live = n - n_deleted;
    free(seen);
    free(queue);
    return st;
}

ghnsw_status_t ghnsw_check_integrity(ghnsw_index_t *ix, ghnsw_integrity_t *out, ghnsw_err_t *err) {
    ghnsw_status_t st = ghnsw_writer_lock(ix, "check_integrity", err);
    if (st) return st;
    st = check_graph(ix, out, err);
    pthread_mutex_unlock(&ix->mut_lock);
    return st;
}
