/* Search: greedy descent through the upper levels, then a fixed-size beam (docs/architecture.md,
 * "Search semantics").  The same beam serves construction (ef_construction) and queries (ef). */
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"
#include "locks.h"

__thread ghnsw_frame_t *ghnsw_frames;

/* Readers copy a list without its slot lock and validate every id instead: a list being rewritten may
 * read as a mix of its old and new entries, but each entry is a slot id that was valid when written,
 * and ids are checked against count (unused entries hold GHNSW_INVALID, which fails that check).  Ids
 * are atomic on both sides (relaxed: plain moves on x86), so a mixed read is not a data race.  A
 * writer stores a new slot's vector before the count that makes it valid is published (release), so
 * the acquire load of count orders every vector read of an id below it.  No lock: its locked exchange
 * would stall the query's outstanding cache misses (docs/architecture.md, "Locks"). */
uint32_t ghnsw_read_links(ghnsw_index_t *ix, uint32_t s, int level, uint32_t *out) {
    const uint32_t *cnt, *ids;
    uint32_t cap;
    if (level == 0) {
        cnt = &ix->degree0[s];
        ids = ghnsw_links0(ix, s);
        cap = ix->M0;
    } else {
        if (!ix->upper[s] || level > ix->levels[s]) return 0;
        cnt = ghnsw_upper(ix, s, level);
        ids = cnt + 1;
        cap = ix->M;
    }
    uint32_t n = __atomic_load_n(cnt, __ATOMIC_ACQUIRE);
    if (n > cap) n = cap;
    uint32_t count = __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE), m = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t id = __atomic_load_n(&ids[i], __ATOMIC_RELAXED);
        if (id < count && id != s) out[m++] = id;
    }
    return m;
}

uint32_t ghnsw_greedy_descent(ghnsw_index_t *ix, const void *q, uint32_t ep, int from_level, int to_level,
                              float *ep_dist) {
    uint32_t *buf = alloca(sizeof(uint32_t) * (ix->M + 1));
    uint32_t cur = ep;
    float d = *ep_dist;
    for (int l = from_level; l >= to_level; l--) {
        int changed = 1;
        while (changed) {
            changed = 0;
            uint32_t n = ghnsw_read_links(ix, cur, l, buf);
            for (uint32_t i = 0; i < n; i++) {
                float dn = ix->dist(q, ghnsw_vec(ix, buf[i]), ix->row_n);
                if (dn < d) { d = dn; cur = buf[i]; changed = 1; }
            }
        }
    }
    *ep_dist = d;
    return cur;
}

static inline int cand_less(float da, uint32_t ia, float db, uint32_t ib) {
    return da < db || (da == db && ia < ib);
}

/* Insert (d, id) into the sorted list b[*n] of capacity cap.  Returns the position, or cap if the
 * candidate does not make it in. */
static inline uint32_t sorted_insert(ghnsw_cand_t *b, uint32_t *n, uint32_t cap, float d, uint32_t id) {
    uint32_t lo = 0, hi = *n;
    while (lo < hi) {
        uint32_t mid = (lo + hi) >> 1;
        if (cand_less(b[mid].d, b[mid].id & ~GHNSW_EXPANDED, d, id)) lo = mid + 1; else hi = mid;
    }
    if (lo >= cap) return cap;
    uint32_t keep = *n < cap ? *n : cap - 1;
    memmove(b + lo + 1, b + lo, (keep - lo) * sizeof(ghnsw_cand_t));
    b[lo].d = d;
    b[lo].id = id;
    if (*n < cap) (*n)++;
    return lo;
}

/* The fixed-size beam (docs/architecture.md "Search semantics"): used when every visited slot may be
 * returned, i.e. no filter and no deletions.  This is the order the GPU kernel and the NumPy reference
 * reproduce. */
static uint32_t beam_run(ghnsw_index_t *ix, ghnsw_visited_t *vis, const void *q, uint32_t ep, float ep_dist,
                         int level, uint32_t ef, ghnsw_cand_t *beam) {
    uint32_t *buf = alloca(sizeof(uint32_t) * (ix->M0 + 1));
    uint32_t n = 1, cursor = 0;
    beam[0].d = ep_dist;
    beam[0].id = ep;
    ghnsw_visit(vis, ep);
    while (cursor < n) {
        uint32_t p = beam[cursor].id;
        beam[cursor].id |= GHNSW_EXPANDED;
        uint32_t next = cursor + 1; /* first unexpanded after the one just taken, unless an insert lands before */
        uint32_t deg = ghnsw_read_links(ix, p, level, buf);
        for (uint32_t i = 0; i < deg; i++) {
            uint32_t s = buf[i];
            if (i + 1 < deg) __builtin_prefetch(ghnsw_vec(ix, buf[i + 1]));
            if (ghnsw_visit(vis, s)) continue;
            float d = ix->dist(q, ghnsw_vec(ix, s), ix->row_n);
            if (n < ef || cand_less(d, s, beam[n - 1].d, beam[n - 1].id & ~GHNSW_EXPANDED)) {
                uint32_t pos = sorted_insert(beam, &n, ef, d, s);
                if (pos < next) next = pos;
            }
        }
        while (next < n && (beam[next].id & GHNSW_EXPANDED)) next++;
        cursor = next;
    }
    for (uint32_t i = 0; i < n; i++) beam[i].id &= ~GHNSW_EXPANDED;
    return n;
}

/* Binary heaps of candidates; `sign` +1 keeps the smallest distance on top, -1 the largest. */
typedef struct { ghnsw_cand_t *a; uint32_t n, cap; } heap_t;

static inline int heap_above(const ghnsw_cand_t *x, const ghnsw_cand_t *y, int sign) {
    return sign > 0 ? cand_less(x->d, x->id, y->d, y->id) : cand_less(y->d, y->id, x->d, x->id);
}

static int heap_push(heap_t *h, float d, uint32_t id, int sign) {
    if (h->n == h->cap) {
        uint32_t cap = h->cap ? h->cap * 2 : 256;
        ghnsw_cand_t *a = realloc(h->a, sizeof(ghnsw_cand_t) * cap);
        if (!a) return -1;
        h->a = a;
        h->cap = cap;
    }
    uint32_t i = h->n++;
    ghnsw_cand_t c = {d, id};
    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (!heap_above(&c, &h->a[parent], sign)) break;
        h->a[i] = h->a[parent];
        i = parent;
    }
    h->a[i] = c;
    return 0;
}

static ghnsw_cand_t heap_pop(heap_t *h, int sign) {
    ghnsw_cand_t top = h->a[0], last = h->a[--h->n];
    uint32_t i = 0;
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && heap_above(&h->a[c + 1], &h->a[c], sign)) c++;
        if (!heap_above(&h->a[c], &last, sign)) break;
        h->a[i] = h->a[c];
        i = c;
    }
    if (h->n) h->a[i] = last;
    return top;
}

typedef struct {
    const ghnsw_filter_t *filter;
    const uint32_t *allowed_bits; /* this query's bitset over slots, or NULL */
    int error; /* a filter callback failed, or out of memory */
} allow_t;

static inline int is_allowed(ghnsw_index_t *ix, allow_t *a, uint32_t s) {
    if (ghnsw_bit_get(ix->deleted, s)) return 0;
    if (a->allowed_bits && ((s >> 5) >= a->filter->words || !ghnsw_bit_get(a->allowed_bits, s))) return 0;
    const ghnsw_filter_t *f = a->filter;
    if (f && f->callback) {
        int ok = 0;
        ghnsw_frame_t frame = {ix, ghnsw_frames};
        ghnsw_frames = &frame;
        int rc = f->callback(f->callback_ctx, ix->labels[s], &ok);
        ghnsw_frames = frame.up;
        if (rc != 0) { a->error = GHNSW_ECALLBACK; return 0; }
        return ok;
    }
    return 1;
}

/* hnswlib's search with deletions or a filter (searchBaseLayerST, non-bare-bone): excluded slots stay
 * waypoints, and the search goes on until it holds ef allowed results (or runs out of graph), so a
 * selective filter still finds what it allows.  Writes up to ef sorted results into out[ef]. */
static uint32_t filtered_run(ghnsw_index_t *ix, ghnsw_visited_t *vis, const void *q, uint32_t ep, float ep_dist,
                             int level, uint32_t ef, allow_t *allow, ghnsw_cand_t *out) {
    uint32_t *buf = alloca(sizeof(uint32_t) * (ix->M0 + 1));
    heap_t cand = {NULL, 0, 0}, res = {out, 0, ef}; /* res never grows past ef: it pops first */
    float bound = __builtin_inff();
    ghnsw_visit(vis, ep);
    if (heap_push(&cand, ep_dist, ep, 1)) { allow->error = GHNSW_ENOMEM; return 0; }
    if (is_allowed(ix, allow, ep)) { heap_push(&res, ep_dist, ep, -1); bound = ep_dist; }
    while (cand.n && !allow->error) {
        ghnsw_cand_t c = heap_pop(&cand, 1);
        if (c.d > bound && res.n == ef) break;
        uint32_t deg = ghnsw_read_links(ix, c.id, level, buf);
        for (uint32_t i = 0; i < deg; i++) {
            uint32_t s = buf[i];
            if (i + 1 < deg) __builtin_prefetch(ghnsw_vec(ix, buf[i + 1]));
            if (ghnsw_visit(vis, s)) continue;
            float d = ix->dist(q, ghnsw_vec(ix, s), ix->row_n);
            if (res.n < ef || d < bound) {
                if (heap_push(&cand, d, s, 1)) { allow->error = GHNSW_ENOMEM; break; }
                if (is_allowed(ix, allow, s)) {
                    if (res.n == ef) heap_pop(&res, -1);
                    heap_push(&res, d, s, -1);
                    bound = res.a[0].d;
                }
            }
        }
    }
    free(cand.a);
    uint32_t n = res.n; /* heap order -> ascending, in place */
    for (uint32_t i = n; i > 0; i--) {
        ghnsw_cand_t worst = heap_pop(&res, -1);
        out[i - 1] = worst;
    }
    return n;
}

/* Construction search: new nodes do not link to deleted slots (as hnswlib), so with deletions present
 * the filtered search runs with "not deleted" as its filter. */
uint32_t ghnsw_search_layer(ghnsw_index_t *ix, ghnsw_visited_t *vis, const void *q, uint32_t ep,
                            float ep_dist, int level, uint32_t ef, ghnsw_cand_t *beam) {
    if (__atomic_load_n(&ix->n_deleted, __ATOMIC_RELAXED) == 0)
        return beam_run(ix, vis, q, ep, ep_dist, level, ef, beam);
    allow_t allow = {NULL, NULL, 0};
    uint32_t n = filtered_run(ix, vis, q, ep, ep_dist, level, ef, &allow, beam);
    if (n == 0 && !allow.error) { /* everything reachable is deleted: link to waypoints anyway */
        ghnsw_visited_next(vis);
        n = beam_run(ix, vis, q, ep, ep_dist, level, ef, beam);
    }
    return n;
}

typedef struct {
    ghnsw_index_t *ix;
    const float *queries;
    const ghnsw_search_params_t *p;
    uint64_t *out_labels;
    float *out_dists;
    int32_t *out_found;
    uint32_t ep;
    int max_level;
    int use_filtered;
} query_ctx_t;

/* The exact re-rank: the final candidates re-scored on the float32 rows, re-sorted. */
static void rerank(const ghnsw_index_t *ix, const float *x, ghnsw_cand_t *beam, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) beam[i].d = ix->exact_dist(x, ghnsw_exact(ix, beam[i].id), ix->dim_pad);
    qsort(beam, n, sizeof(ghnsw_cand_t), ghnsw_cand_cmp);
}

static int query_one(void *vctx, size_t qi, int worker) {
    query_ctx_t *c = vctx;
    ghnsw_index_t *ix = c->ix;
    const ghnsw_filter_t *filter = c->p->filter;
    uint32_t k = c->p->k;
    uint64_t *lab = c->out_labels + qi * k;
    float *dst = c->out_dists + qi * k;
    uint32_t found = 0;
    if (c->ep != GHNSW_INVALID && k > 0) {
        /* a beam wider than the index holds nothing more: bound what a request can allocate */
        uint32_t ef = c->p->beam, count = __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE);
        if (ef > count) ef = count;
        /* one heap block (dims can be too large for a worker thread's stack): the beam [ef], the
         * padded float query x [dim_pad], its prepared form [query_bytes] (float32: x itself) */
        size_t xbytes = sizeof(float) * ix->dim_pad;
        ghnsw_cand_t *beam = malloc(sizeof(ghnsw_cand_t) * ef + xbytes + ix->query_bytes);
        ghnsw_visited_t *vis = ghnsw_visited_get(&ix->vpool);
        if (!beam || !vis) { free(beam); if (vis) ghnsw_visited_put(&ix->vpool, vis); return GHNSW_ENOMEM; }
        float *x = (float *)(beam + ef);
        void *q = ix->storage == GHNSW_F32 ? (void *)x : (void *)((char *)x + xbytes);
        ghnsw_float_row(ix, c->queries + qi * ix->dim, x);
        ghnsw_prepare(ix, x, q);
        float d = ix->dist(q, ghnsw_vec(ix, c->ep), ix->row_n);
        uint32_t cur = ghnsw_greedy_descent(ix, q, c->ep, c->max_level, 1, &d);
        uint32_t nres;
        const uint32_t *bits = filter ? filter->allowed_bits : NULL;
        if (bits && filter->per_query) bits += qi * filter->words;
        allow_t allow = {filter, bits, 0};
        if (c->use_filtered) nres = filtered_run(ix, vis, q, cur, d, 0, ef, &allow, beam);
        else nres = beam_run(ix, vis, q, cur, d, 0, ef, beam);
        ghnsw_visited_put(&ix->vpool, vis);
        if (allow.error) { free(beam); return allow.error; }
        if (ix->exact) rerank(ix, x, beam, nres);
        for (; found < k && found < nres; found++) {
            lab[found] = c->p->want_slots ? beam[found].id : ix->labels[beam[found].id];
            dst[found] = beam[found].d;
        }
        free(beam);
    }
    for (uint32_t j = found; j < k; j++) { lab[j] = GHNSW_NO_LABEL; dst[j] = __builtin_inff(); }
    c->out_found[qi] = (int32_t)found;
    return 0;
}

ghnsw_status_t ghnsw_search(ghnsw_index_t *ix, const float *queries, size_t nq, const ghnsw_search_params_t *p,
                            uint64_t *out_labels, float *out_dists, int32_t *out_found, ghnsw_err_t *err) {
    if (p->beam < p->k)
        return ghnsw_fail(err, GHNSW_EINVAL, "the beam width (%u) must be at least k (%u)", p->beam, p->k);
    /* Held for the whole query: slots keep their labels (a relabel takes it exclusively), so the
     * labels a callback sees are the labels returned.  Label bitsets are made before the query
     * (the planner compares Core.relabels before and after). */
    int held = ghnsw_read_lock(ix);
    query_ctx_t c = {ix, queries, p, out_labels, out_dists, out_found, GHNSW_INVALID, -1, 0};
    pthread_mutex_lock(&ix->ep_lock);
    c.ep = ix->entry_point;
    c.max_level = ix->max_level;
    pthread_mutex_unlock(&ix->ep_lock);
    c.use_filtered = p->filter != NULL || __atomic_load_n(&ix->n_deleted, __ATOMIC_RELAXED) > 0;
    int rc = ghnsw_parallel_for(nq, p->num_threads, query_one, &c);
    ghnsw_read_unlock(ix, held);
    if (rc == GHNSW_ECALLBACK) return GHNSW_ECALLBACK;
    if (rc) return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory during search");
    return GHNSW_OK;
}
