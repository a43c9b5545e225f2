/* Insertion (hnswlib addPoint), updates of existing labels (updatePoint + repairConnectionsForUpdate),
 * replace_deleted, and delete marks.
 *
 * An add runs in two phases.  A serial pre-pass resolves every label (dedupe within the batch: the last
 * row of a label wins), checks capacity, assigns slots in row order and allocates upper blocks, so a
 * rejected batch changes nothing and the parallel phase never touches the label map.  Then the rows are
 * linked in parallel; the first element of an empty index is linked before the threads start. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"
#include "locks.h"

/* Counter-based level generator: level of the seq-th row ever added, independent of thread timing. */
int ghnsw_level_for(uint64_t seed, uint64_t seq, double mult) {
    uint64_t x = seed ^ (0x9E3779B97F4A7C15ULL * (seq + 1));
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    double u = ((double)(x >> 11) + 0.5) * (1.0 / 9007199254740992.0); /* (0, 1) */
    double l = floor(-log(u) * mult);
    return l > GHNSW_MAX_LEVEL ? GHNSW_MAX_LEVEL : (int)l;
}

static inline uint32_t *list_ptr(ghnsw_index_t *ix, uint32_t s, int level, uint32_t **count) {
    if (level == 0) { *count = &ix->degree0[s]; return ghnsw_links0(ix, s); }
    uint32_t *blk = ghnsw_upper(ix, s, level);
    *count = blk;
    return blk + 1;
}

/* Write a list (caller holds the slot lock); unused entries get the invalid sentinel.  Ids are stored
 * atomically: readers copy lists without the lock (ghnsw_read_links). */
static void write_list(ghnsw_index_t *ix, uint32_t s, int level, const ghnsw_cand_t *c, uint32_t n) {
    uint32_t *cnt, *ids = list_ptr(ix, s, level, &cnt);
    uint32_t cap = level ? ix->M : ix->M0;
    for (uint32_t i = 0; i < n; i++) __atomic_store_n(&ids[i], c[i].id, __ATOMIC_RELAXED);
    for (uint32_t i = n; i < cap; i++) __atomic_store_n(&ids[i], GHNSW_INVALID, __ATOMIC_RELAXED);
    __atomic_store_n(cnt, n, __ATOMIC_RELEASE);
}

/* hnswlib mutuallyConnectNewElement, split in two so that a concurrent reader never reaches a node
 * whose lower levels are still empty: set_own_links writes s's list on one level (the heuristic's M
 * picks of cand[n], sorted), and link_back, run only once s has its lists on every level, adds the
 * back-links, re-pruning full lists with the same heuristic. */
static uint32_t set_own_links(ghnsw_index_t *ix, uint32_t s, ghnsw_cand_t *cand, uint32_t n, int level) {
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++) if (cand[i].id != s) cand[m++] = cand[i];
    n = ghnsw_select_heuristic(ix, cand, m, ix->M);
    if (n == 0) return 0;
    ghnsw_spin_lock(&ix->slot_locks[s]);
    write_list(ix, s, level, cand, n);
    ghnsw_spin_unlock(&ix->slot_locks[s]);
    ghnsw_mark_dirty(ix, s, level ? GHNSW_DIRTY_UPPER : GHNSW_DIRTY_LINKS);
    return n;
}

static void link_back(ghnsw_index_t *ix, uint32_t s, const ghnsw_cand_t *picks, uint32_t n, int level,
                      ghnsw_cand_t *scratch /* [M0 + 1] */) {
    uint32_t mmax = level ? ix->M : ix->M0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t nb = picks[i].id;
        if (level > ix->levels[nb]) continue;
        ghnsw_spin_lock(&ix->slot_locks[nb]);
        uint32_t *cnt, *ids = list_ptr(ix, nb, level, &cnt);
        uint32_t deg = *cnt, present = 0;
        int kind = 0; /* what changed, for the dirty log */
        for (uint32_t j = 0; j < deg; j++) if (ids[j] == s) { present = 1; break; }
        if (!present) {
            if (deg < mmax) {
                __atomic_store_n(&ids[deg], s, __ATOMIC_RELAXED); /* read without the lock */
                __atomic_store_n(cnt, deg + 1, __ATOMIC_RELEASE);
                kind = level ? GHNSW_DIRTY_UPPER : GHNSW_DIRTY_APPEND;
            } else {
                scratch[0].d = ghnsw_pair(ix, s, nb);
                scratch[0].id = s;
                for (uint32_t j = 0; j < deg; j++) {
                    scratch[j + 1].id = ids[j];
                    scratch[j + 1].d = ghnsw_pair(ix, ids[j], nb);
                }
                qsort(scratch, deg + 1, sizeof(ghnsw_cand_t), ghnsw_cand_cmp);
                uint32_t kept = ghnsw_select_heuristic(ix, scratch, deg + 1, mmax);
                write_list(ix, nb, level, scratch, kept);
                kind = level ? GHNSW_DIRTY_UPPER : GHNSW_DIRTY_LINKS;
            }
        }
        ghnsw_spin_unlock(&ix->slot_locks[nb]);
        if (kind) ghnsw_mark_dirty(ix, nb, kind);
    }
}

/* One insert's scratch, one block: the beam, the back-links' candidates, the new row in float (padded,
 * normalised for cosine) and its prepared query (float32: the float row itself). */
typedef struct {
    ghnsw_cand_t *beam;    /* [ef_construction + 1] */
    ghnsw_cand_t *scratch; /* [M0 + 1] */
    float *x;              /* [dim_pad] */
    void *q;               /* [query_bytes] */
    uint32_t clipped;      /* values of the stored row clipped to the int8 ranges */
} work_t;

static ghnsw_status_t work_init(const ghnsw_index_t *ix, work_t *w) {
    size_t cands = sizeof(ghnsw_cand_t) * ((size_t)ix->ef_construction + 1 + ix->M0 + 1);
    size_t x = sizeof(float) * ix->dim_pad;
    char *p = malloc(cands + x + ix->query_bytes);
    if (!p) return GHNSW_ENOMEM;
    w->beam = (ghnsw_cand_t *)p;
    w->scratch = w->beam + ix->ef_construction + 1;
    w->x = (float *)(p + cands);
    w->q = ix->storage == GHNSW_F32 ? (void *)w->x : (void *)(p + cands + x);
    w->clipped = 0;
    return GHNSW_OK;
}
static void work_free(work_t *w) { free(w->beam); }

/* Search levels min(level, maxl)..0 from ep for s, whose prepared query is in w->q, and give s its own
 * lists on each, then add the back-links on every level (shared by insert and update). */
static ghnsw_status_t link_levels(ghnsw_index_t *ix, uint32_t s, work_t *w, uint32_t ep, int maxl, int level) {
    int top = level < maxl ? level : maxl;
    ghnsw_cand_t *picks = malloc(sizeof(ghnsw_cand_t) * ix->M * (size_t)(top + 1)); /* [top+1, M] */
    uint32_t *npicks = calloc((size_t)top + 1, sizeof(uint32_t));
    ghnsw_visited_t *vis = ghnsw_visited_get(&ix->vpool);
    ghnsw_status_t st = GHNSW_ENOMEM;
    if (!picks || !npicks || !vis) goto out;
    const void *q = w->q;
    uint32_t cur = ep;
    float d = ix->dist(q, ghnsw_vec(ix, cur), ix->row_n);
    if (level < maxl) cur = ghnsw_greedy_descent(ix, q, cur, maxl, level + 1, &d);
    for (int l = top; l >= 0; l--) {
        ghnsw_visited_next(vis);
        uint32_t n = ghnsw_search_layer(ix, vis, q, cur, d, l, ix->ef_construction, w->beam);
        n = set_own_links(ix, s, w->beam, n, l);
        memcpy(picks + (size_t)l * ix->M, w->beam, n * sizeof(ghnsw_cand_t));
        npicks[l] = n;
        if (n) { cur = w->beam[0].id; d = w->beam[0].d; }
    }
    for (int l = top; l >= 0; l--) link_back(ix, s, picks + (size_t)l * ix->M, npicks[l], l, w->scratch);
    st = GHNSW_OK;
out:
    if (vis) ghnsw_visited_put(&ix->vpool, vis);
    free(picks);
    free(npicks);
    return st;
}

/* Stores the float row x in slot s (its exact row too, with rerank); returns the values clipped to the
 * int8 ranges, also counted in ix. */
static uint32_t store_vector(ghnsw_index_t *ix, uint32_t s, const float *x) {
    uint32_t clipped = ghnsw_encode(ix, x, ghnsw_vec(ix, s));
    if (ix->exact) memcpy(ghnsw_exact(ix, s), x, sizeof(float) * ix->dim_pad);
    if (clipped) {
        __atomic_fetch_add(&ix->clipped_rows, 1, __ATOMIC_RELAXED);
        __atomic_fetch_add(&ix->clipped_values, clipped, __ATOMIC_RELAXED);
    }
    return clipped;
}

/* The entry switch comes after every write (and dirty mark) of the new entry's lists, and is a
 * release: a reader that acquires the new entry point, and only then drains the dirty log, finds
 * those marks in its drain or in an earlier one (the GPU sync relies on this, device/mirror.py).
 * A sync that read the old entry and drained those marks must still come back for the switch:
 * hence the change note. */
static void publish_entry(ghnsw_index_t *ix, uint32_t s, int level) {
    __atomic_store_n(&ix->max_level, level, __ATOMIC_RELAXED);
    __atomic_store_n(&ix->entry_point, s, __ATOMIC_RELEASE);
    ghnsw_note_change(ix);
}

/* s's vector is already stored (store_new, before the count that makes s visible); src gives w->q. */
static ghnsw_status_t insert_new(ghnsw_index_t *ix, uint32_t s, const float *src, work_t *w) {
    ghnsw_float_row(ix, src, w->x);
    ghnsw_prepare(ix, w->x, w->q);
    ghnsw_mark_dirty(ix, s, GHNSW_DIRTY_ROW);
    int level = ix->levels[s];
    /* As hnswlib: a node that raises the max level holds the entry-point lock for its whole insert. */
    pthread_mutex_lock(&ix->ep_lock);
    uint32_t ep = ix->entry_point;
    int maxl = ix->max_level;
    if (ep == GHNSW_INVALID) {
        publish_entry(ix, s, level);
        pthread_mutex_unlock(&ix->ep_lock);
        return GHNSW_OK;
    }
    int raises = level > maxl;
    if (!raises) pthread_mutex_unlock(&ix->ep_lock);
    ghnsw_status_t st = link_levels(ix, s, w, ep, maxl, level);
    if (raises) {
        if (st == GHNSW_OK) publish_entry(ix, s, level);
        pthread_mutex_unlock(&ix->ep_lock);
    }
    return st;
}

/* The one data race the engine accepts: an update rewrites a slot's vector in place while queries and
 * inserts read it without a lock, so one distance may come from a half-written vector (never a bad
 * access; docs/architecture.md, "Locks").  A function of its own so that ThreadSanitizer's
 * suppressions (.ci/tsan.supp) can name exactly this write. */
__attribute__((noinline)) static uint32_t overwrite_vector(ghnsw_index_t *ix, uint32_t s, const float *x) {
    return store_vector(ix, s, x);
}

/* hnswlib updatePoint with probability 1: rewire every neighbour of s over its 2-hop neighbourhood,
 * then relink s itself from the entry point (repairConnectionsForUpdate). */
static ghnsw_status_t update_existing(ghnsw_index_t *ix, uint32_t s, const float *src, work_t *w) {
    ghnsw_float_row(ix, src, w->x);
    ghnsw_prepare(ix, w->x, w->q);
    ghnsw_spin_lock(&ix->slot_locks[s]);
    w->clipped = overwrite_vector(ix, s, w->x);
    ghnsw_spin_unlock(&ix->slot_locks[s]);
    ghnsw_mark_dirty(ix, s, GHNSW_DIRTY_ROW);
    pthread_mutex_lock(&ix->ep_lock);
    uint32_t ep = ix->entry_point;
    int maxl = ix->max_level;
    pthread_mutex_unlock(&ix->ep_lock);
    if (ep == s && ix->count == 1) return GHNSW_OK;
    int level = ix->levels[s];
    uint32_t M0 = ix->M0;
    uint32_t *n1 = malloc(sizeof(uint32_t) * (M0 + 1));
    uint32_t *n2 = malloc(sizeof(uint32_t) * (M0 + 1));
    uint32_t *hood = malloc(sizeof(uint32_t) * (M0 + 1) * (M0 + 1));
    ghnsw_cand_t *cand = malloc(sizeof(ghnsw_cand_t) * (M0 + 1) * (M0 + 1));
    ghnsw_visited_t *vis = ghnsw_visited_get(&ix->vpool);
    ghnsw_status_t st = GHNSW_OK;
    if (!n1 || !n2 || !hood || !cand || !vis) { st = GHNSW_ENOMEM; goto done; }
    for (int l = 0; l <= level && l <= maxl; l++) {
        uint32_t mmax = l ? ix->M : ix->M0;
        uint32_t k1 = ghnsw_read_links(ix, s, l, n1), nh = 0;
        ghnsw_visited_next(vis);
        for (uint32_t i = 0; i < k1; i++) {
            if (!ghnsw_visit(vis, n1[i])) hood[nh++] = n1[i];
            uint32_t k2 = ghnsw_read_links(ix, n1[i], l, n2);
            for (uint32_t j = 0; j < k2; j++) if (!ghnsw_visit(vis, n2[j])) hood[nh++] = n2[j];
        }
        for (uint32_t i = 0; i < k1; i++) {
            uint32_t nb = n1[i];
            if (l > ix->levels[nb]) continue;
            uint32_t nc = 0;
            for (uint32_t j = 0; j < nh; j++) {
                if (hood[j] == nb || ix->levels[hood[j]] < l) continue;
                cand[nc].id = hood[j];
                cand[nc].d = ghnsw_pair(ix, hood[j], nb);
                nc++;
            }
            qsort(cand, nc, sizeof(ghnsw_cand_t), ghnsw_cand_cmp);
            if (nc > ix->ef_construction) nc = ix->ef_construction;
            uint32_t kept = ghnsw_select_heuristic(ix, cand, nc, mmax);
            ghnsw_spin_lock(&ix->slot_locks[nb]);
            write_list(ix, nb, l, cand, kept);
            ghnsw_spin_unlock(&ix->slot_locks[nb]);
            ghnsw_mark_dirty(ix, nb, l ? GHNSW_DIRTY_UPPER : GHNSW_DIRTY_LINKS);
        }
    }
    /* From the entry point even when it is s itself, as hnswlib: the searches then start at s, which
     * set_own_links drops from its own lists.  (Any other start could sit below the levels it would
     * be linked on.) */
    st = link_levels(ix, s, w, ep, maxl, level);
done:
    if (vis) ghnsw_visited_put(&ix->vpool, vis);
    free(n1); free(n2); free(hood); free(cand);
    return st;
}

enum { TASK_SKIP = 0, TASK_NEW, TASK_UPDATE, TASK_REPLACE };

typedef struct {
    ghnsw_index_t *ix;
    const float *data;
    const uint8_t *kind;  /* [n] */
    const uint32_t *slot; /* [n] */
    const ghnsw_cands_t *cands; /* NULL: every row takes the plain path */
    ghnsw_cand_t *picks;  /* [n, M] level-0 picks of candidate rows, for the back-link phase */
    uint32_t *npicks;     /* [n] */
    size_t n;             /* rows in the batch */
    size_t skip_row;      /* a row already inserted (the first element of an empty index), or n */
    uint64_t clipped;     /* atomic: rows stored with values outside the int8 ranges */
    float *xs;            /* [workers, dim_pad] store_new's float rows, one per worker */
} add_ctx_t;

/* A new level-0 row with precomputed candidates: its vector is stored in phase A, its own list is
 * chosen from the candidates in phase B, its back-links are added in phase C. */
static inline int uses_cands(const add_ctx_t *c, size_t i) {
    return c->cands && i != c->skip_row && c->kind[i] == TASK_NEW && c->ix->levels[c->slot[i]] == 0;
}

static int add_one(void *vctx, size_t i, int worker) {
    add_ctx_t *c = vctx;
    ghnsw_index_t *ix = c->ix;
    const float *src = c->data + i * ix->dim;
    uint32_t s = c->slot[i];
    if (i == c->skip_row || c->kind[i] == TASK_SKIP) return 0;
    if (uses_cands(c, i)) { /* stored by store_new, linked in phases B and C */
        ghnsw_mark_dirty(ix, s, GHNSW_DIRTY_ROW);
        return 0;
    }
    work_t w;
    if (work_init(ix, &w) != GHNSW_OK) return GHNSW_ENOMEM;
    ghnsw_status_t st = GHNSW_OK;
    switch (c->kind[i]) {
    case TASK_NEW: st = insert_new(ix, s, src, &w); break;
    case TASK_UPDATE: st = update_existing(ix, s, src, &w); break;
    case TASK_REPLACE:
        st = update_existing(ix, s, src, &w);
        if (st == GHNSW_OK) { /* visible only once rewired */
            ghnsw_bit_clear(ix->deleted, s);
            __atomic_fetch_sub(&ix->n_deleted, 1, __ATOMIC_RELAXED);
            ghnsw_mark_dirty(ix, s, GHNSW_DIRTY_DELETED);
        }
        break;
    }
    if (w.clipped) __atomic_fetch_add(&c->clipped, 1, __ATOMIC_RELAXED);
    work_free(&w);
    return st;
}

/* Before the count is published: the vector of every new slot, so that any slot below the count
 * (which readers, label lookups and filters take as present) has its vector. */
static int store_new(void *vctx, size_t i, int worker) {
    add_ctx_t *c = vctx;
    if (c->kind[i] != TASK_NEW) return 0;
    float *x = c->xs + (size_t)worker * c->ix->dim_pad;
    ghnsw_float_row(c->ix, c->data + i * c->ix->dim, x);
    if (store_vector(c->ix, c->slot[i], x)) __atomic_fetch_add(&c->clipped, 1, __ATOMIC_RELAXED);
    return 0;
}

/* Phase B: distances to the candidates (graph slots and batch rows that became new slots), sorted,
 * de-duplicated, then the heuristic's picks become the row's own list. */
static int own_from_cands(void *vctx, size_t i, int worker) {
    add_ctx_t *c = vctx;
    if (!uses_cands(c, i)) return 0;
    ghnsw_index_t *ix = c->ix;
    const ghnsw_cands_t *cd = c->cands;
    uint32_t s = c->slot[i], total = cd->n_graph + cd->n_batch, n = 0;
    ghnsw_cand_t *cand = malloc(sizeof(ghnsw_cand_t) * (total ? total : 1));
    if (!cand) return GHNSW_ENOMEM;
    uint32_t count = ix->count;
    for (uint32_t j = 0; j < total; j++) {
        uint32_t t;
        if (j < cd->n_graph) {
            t = cd->graph[i * cd->n_graph + j];
        } else {
            uint32_t row = cd->batch[i * cd->n_batch + (j - cd->n_graph)];
            t = row < c->n && c->kind[row] == TASK_NEW ? c->slot[row] : GHNSW_INVALID;
        }
        if (t >= count || t == s) continue;
        cand[n].id = t;
        cand[n].d = ghnsw_pair(ix, s, t);
        n++;
    }
    qsort(cand, n, sizeof(ghnsw_cand_t), ghnsw_cand_cmp);
    uint32_t m = 0;
    for (uint32_t j = 0; j < n; j++) if (!m || cand[j].id != cand[m - 1].id || cand[j].d != cand[m - 1].d) cand[m++] = cand[j];
    n = set_own_links(ix, s, cand, m, 0);
    memcpy(c->picks + i * ix->M, cand, n * sizeof(ghnsw_cand_t));
    c->npicks[i] = n;
    free(cand);
    return 0;
}

/* Phase C: back-links, once every candidate row has its own list. */
static int back_from_cands(void *vctx, size_t i, int worker) {
    add_ctx_t *c = vctx;
    if (!uses_cands(c, i)) return 0;
    ghnsw_cand_t *scratch = malloc(sizeof(ghnsw_cand_t) * (c->ix->M0 + 1));
    if (!scratch) return GHNSW_ENOMEM;
    link_back(c->ix, c->slot[i], c->picks + i * c->ix->M, c->npicks[i], 0, scratch);
    free(scratch);
    return 0;
}

/* An untrained int8 index takes its ranges from the rows of this batch that it stores (normalised for
 * cosine), and which dimensions hold integers.  Returns non-zero (err set) if they are unusable (a
 * width beyond float's range). */
static ghnsw_status_t train_on_batch(ghnsw_index_t *ix, const float *data, const uint8_t *kind, size_t n,
                                     ghnsw_err_t *err) {
    uint32_t dim = ix->dim;
    float *lo = malloc(3 * (size_t)dim * sizeof(float) + dim), *hi = lo + dim, *x = hi + dim;
    if (!lo) return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
    uint8_t *integral = (uint8_t *)(x + dim);
    for (uint32_t j = 0; j < dim; j++) { lo[j] = __builtin_inff(); hi[j] = -__builtin_inff(); integral[j] = 1; }
    for (size_t i = 0; i < n; i++) {
        if (kind[i] == TASK_SKIP) continue;
        memcpy(x, data + i * dim, dim * sizeof(float));
        if (ix->space == GHNSW_COSINE) ghnsw_normalize(x, dim);
        for (uint32_t j = 0; j < dim; j++) {
            lo[j] = x[j] < lo[j] ? x[j] : lo[j];
            hi[j] = x[j] > hi[j] ? x[j] : hi[j];
            integral[j] &= (uint8_t)ghnsw_is_small_integer(x[j]);
        }
    }
    ghnsw_status_t st = ghnsw_quantizer_from_ranges(ix, lo, hi, integral, err);
    free(lo);
    return st;
}

static void untrain(ghnsw_index_t *ix) {
    free(ix->q_offset);
    ix->q_offset = ix->q_scale = ix->pair_w = NULL;
}

ghnsw_status_t ghnsw_add(ghnsw_index_t *ix, const float *data, const uint64_t *labels, size_t n,
                         int num_threads, int replace_deleted, const ghnsw_cands_t *cands, uint64_t *clipped,
                         ghnsw_err_t *err) {
    if (clipped) *clipped = 0;
    if (replace_deleted && !ix->allow_replace_deleted)
        return ghnsw_fail(err, GHNSW_ESTATE, "Replacement of deleted elements is disabled in constructor");
    if (n == 0) return GHNSW_OK;
    if (ix->storage == GHNSW_F16 && ix->space != GHNSW_COSINE) /* cosine rows are normalised: |x_i| <= 1 */
        for (size_t i = 0; i < n * ix->dim; i++)
            if (!(fabsf(data[i]) < GHNSW_F16_LIMIT))
                return ghnsw_fail(err, GHNSW_EINVAL, "row %zu holds %g, beyond float16's range (|x| <= 65504): "
                                  "use storage='float32' or 'int8'", i / ix->dim, (double)data[i]);
    uint8_t *kind = calloc(n, 1);
    uint32_t *slot = malloc(n * sizeof(uint32_t));
    uint32_t *vacant = NULL;
    int workers = num_threads > 0 ? num_threads : ghnsw_default_threads();
    float *xs = malloc(sizeof(float) * ix->dim_pad * (size_t)workers); /* taken now: store_new cannot fail */
    ghnsw_map_t rows = {0}; /* label -> last row in this batch */
    ghnsw_status_t st = GHNSW_OK;
    if (!kind || !slot || !xs) { st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory"); goto out; }
    {
        size_t sz = 16;
        while (sz < n + n / 3 + 1) sz <<= 1;
        rows.keys = malloc(sz * sizeof(uint64_t));
        rows.vals = malloc(sz * sizeof(uint32_t));
        if (!rows.keys || !rows.vals) { st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory"); goto out; }
        memset(rows.vals, 0xFF, sz * sizeof(uint32_t));
        rows.mask = sz - 1;
    }
    if ((st = ghnsw_writer_lock(ix, "add_items", err))) goto out;
    /* pre-pass 1: classify rows (nothing is modified yet) */
    size_t n_new = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t prev = ghnsw_map_get(&rows, labels[i]);
        if (prev != GHNSW_INVALID) kind[prev] = TASK_SKIP; /* the last row of a label wins */
        ghnsw_map_put(&rows, labels[i], (uint32_t)i);
        uint32_t s = ghnsw_map_get(&ix->map, labels[i]);
        if (s == GHNSW_INVALID) {
            if (prev == GHNSW_INVALID) n_new++;
            kind[i] = TASK_NEW;
            continue;
        }
        if (ix->allow_replace_deleted && ghnsw_bit_get(ix->deleted, s)) {
            st = ghnsw_fail(err, GHNSW_ESTATE, "Can't use addPoint to update deleted elements if replacement "
                            "of deleted elements is enabled.");
            goto unlock;
        }
        kind[i] = TASK_UPDATE;
        slot[i] = s;
    }
    size_t n_vacant = 0;
    if (replace_deleted && ix->n_deleted > 0 && n_new > 0) {
        size_t want = n_new < ix->n_deleted ? n_new : ix->n_deleted;
        vacant = malloc(want * sizeof(uint32_t));
        if (!vacant) { st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory"); goto unlock; }
        for (uint32_t s = 0; s < ix->count && n_vacant < want; s++)
            if (ghnsw_bit_get(ix->deleted, s)) vacant[n_vacant++] = s;
    }
    if ((size_t)ix->count + (n_new - n_vacant) > ix->capacity) {
        st = ghnsw_fail(err, GHNSW_EFULL, "The number of elements exceeds the specified limit");
        goto unlock;
    }
    int trained_here = ix->storage == GHNSW_I8 && !ix->q_scale; /* undone if the batch fails before its commit */
    if (trained_here && (st = train_on_batch(ix, data, kind, n, err))) goto unlock;
    /* pre-pass 2: allocate upper blocks for the new slots before anything becomes visible */
    uint32_t next = ix->count;
    size_t used_vacant = 0;
    for (size_t i = 0; i < n; i++) {
        if (kind[i] != TASK_NEW) continue;
        if (used_vacant < n_vacant) { slot[i] = vacant[used_vacant++]; kind[i] = TASK_REPLACE; continue; }
        uint32_t s = next++;
        int level = ghnsw_level_for(ix->seed, ix->insert_seq + i, ix->mult);
        slot[i] = s;
        ix->levels[s] = (uint8_t)level;
        ix->upper[s] = NULL;
        if (level > 0) {
            size_t words = (size_t)level * (1 + ix->M);
            ix->upper[s] = malloc(words * sizeof(uint32_t));
            if (ix->upper[s]) /* each level block: count 0, then invalid ids */
                for (size_t w = 0; w < words; w++) ix->upper[s][w] = w % (1 + ix->M) ? GHNSW_INVALID : 0;
            if (!ix->upper[s]) {
                for (uint32_t t = ix->count; t <= s; t++) { free(ix->upper[t]); ix->upper[t] = NULL; ix->levels[t] = 0; }
                if (trained_here) untrain(ix);
                st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
                goto unlock;
            }
        }
    }
    /* commit labels: from here on the batch is accepted.  A relabel (replace_deleted) takes
     * resize_lock exclusively, so no query sees a slot change label halfway (ghnsw_search), and
     * relabel_lock first, so it waits for pinned queries (ghnsw_pin_labels). */
    int relabel = n_vacant > 0;
    if (relabel) {
        pthread_rwlock_wrlock(&ix->relabel_lock);
        pthread_rwlock_wrlock(&ix->resize_lock);
        __atomic_fetch_add(&ix->relabels, 1, __ATOMIC_ACQ_REL);
    }
    pthread_mutex_lock(&ix->map_lock);
    if (ghnsw_map_reserve(ix, n_new) != GHNSW_OK) {
        pthread_mutex_unlock(&ix->map_lock);
        if (relabel) { pthread_rwlock_unlock(&ix->resize_lock); pthread_rwlock_unlock(&ix->relabel_lock); }
        for (uint32_t t = ix->count; t < next; t++) { free(ix->upper[t]); ix->upper[t] = NULL; ix->levels[t] = 0; }
        if (trained_here) untrain(ix);
        st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
        goto unlock;
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t s = slot[i];
        if (kind[i] == TASK_NEW) {
            ghnsw_map_put(&ix->map, labels[i], s);
            ix->labels[s] = labels[i];
        } else if (kind[i] == TASK_REPLACE) {
            ghnsw_map_del(&ix->map, ix->labels[s]);
            ghnsw_map_put(&ix->map, labels[i], s);
            ix->labels[s] = labels[i];
            ghnsw_mark_dirty(ix, s, GHNSW_DIRTY_ROW);
        } else if (kind[i] == TASK_UPDATE && !ix->allow_replace_deleted && ghnsw_bit_get(ix->deleted, s)) {
            ghnsw_bit_clear(ix->deleted, s); /* hnswlib: re-adding a deleted label undeletes it */
            __atomic_fetch_sub(&ix->n_deleted, 1, __ATOMIC_RELAXED); /* queries read it without a lock */
            ghnsw_mark_dirty(ix, s, GHNSW_DIRTY_DELETED);
        }
    }
    pthread_mutex_unlock(&ix->map_lock);
    if (relabel) { pthread_rwlock_unlock(&ix->resize_lock); pthread_rwlock_unlock(&ix->relabel_lock); }
    add_ctx_t ctx = {ix, data, kind, slot, NULL, NULL, NULL, n, n, 0, xs};
    ghnsw_parallel_for(n, workers, store_new, &ctx);
    __atomic_store_n(&ix->count, next, __ATOMIC_RELEASE);
    __atomic_store_n(&ix->insert_seq, ix->insert_seq + n, __ATOMIC_RELAXED); /* Core.insert_seq: no lock */

    if (ix->entry_point == GHNSW_INVALID) { /* the first element goes in alone, the plain way */
        size_t first = 0;
        while (first < n && kind[first] == TASK_SKIP) first++;
        if (first < n && add_one(&ctx, first, 0)) { st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory"); goto unlock; }
        ctx.skip_row = first;
    }
    if (cands) {
        ctx.picks = malloc(sizeof(ghnsw_cand_t) * n * ix->M);
        ctx.npicks = calloc(n, sizeof(uint32_t));
        if (ctx.picks && ctx.npicks) ctx.cands = cands; /* else every row takes the plain path */
    }
    int rc = ghnsw_parallel_for(n, num_threads, add_one, &ctx);
    if (!rc && ctx.cands) rc = ghnsw_parallel_for(n, num_threads, own_from_cands, &ctx);
    if (!rc && ctx.cands) rc = ghnsw_parallel_for(n, num_threads, back_from_cands, &ctx);
    free(ctx.picks);
    free(ctx.npicks);
    if (clipped) *clipped = ctx.clipped;
    if (rc) st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory during insertion");
unlock:
    pthread_mutex_unlock(&ix->mut_lock);
out:
    free(kind); free(slot); free(vacant); free(rows.keys); free(rows.vals); free(xs);
    return st;
}

/* Set or clear a label's delete mark, with hnswlib's errors for a missing label or no change. */
static ghnsw_status_t set_deleted(ghnsw_index_t *ix, uint64_t label, int deleted, ghnsw_err_t *err) {
    ghnsw_status_t st = ghnsw_writer_lock(ix, deleted ? "mark_deleted" : "unmark_deleted", err);
    if (st) return st;
    uint32_t s = ghnsw_lookup(ix, label);
    if (s == GHNSW_INVALID) st = ghnsw_fail(err, GHNSW_ENOTFOUND, "Label not found: %llu", (unsigned long long)label);
    else if (ghnsw_bit_get(ix->deleted, s) == deleted)
        st = ghnsw_fail(err, GHNSW_ESTATE, deleted ? "The requested to delete element is already deleted"
                                                   : "The requested to undelete element is not deleted");
    else {
        if (deleted) { ghnsw_bit_set(ix->deleted, s); __atomic_fetch_add(&ix->n_deleted, 1, __ATOMIC_RELAXED); }
        else { ghnsw_bit_clear(ix->deleted, s); __atomic_fetch_sub(&ix->n_deleted, 1, __ATOMIC_RELAXED); }
        ghnsw_mark_dirty(ix, s, GHNSW_DIRTY_DELETED);
    }
    pthread_mutex_unlock(&ix->mut_lock);
    return st;
}

ghnsw_status_t ghnsw_mark_deleted(ghnsw_index_t *ix, uint64_t label, ghnsw_err_t *err) {
    return set_deleted(ix, label, 1, err);
}

ghnsw_status_t ghnsw_unmark_deleted(ghnsw_index_t *ix, uint64_t label, ghnsw_err_t *err) {
    return set_deleted(ix, label, 0, err);
}
