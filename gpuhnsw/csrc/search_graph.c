/* The search graph: HNSW level 0 with its reverse edges, as a fixed-degree padded adjacency for
 * batched search (docs/architecture.md, "Search graph"; why this graph: benchmarks/results/
 * graph_replay.md).  gpuhnsw/_graph_reference.py is its NumPy reference; tests hold them equal.
 *
 * Row x of degree D, for a live slot x (a deleted slot's row is empty and no row names one):
 *   forward(x): x's level-0 list as the search reads it (count capped at M0, ids < count, not x),
 *               deleted slots dropped, in stored order
 *   reverse(x): the live slots whose level-0 list names x, not in forward(x), nearest first by
 *               (distance to x, slot)
 *   row(x)    = (forward(x), reverse(x)) cut at D entries, then GHNSW_INVALID
 *
 * Phases of a build (each a parallel loop over blocks of rows, except the prefix sum):
 *   1. forward rows into out[x]; in-edge counts rcount[y] (atomic)
 *   2. roff = prefix sums of rcount; rsrc[roff[y] ..] = the sources of y's in-edges (atomic cursors:
 *      any order, since phase 3 sorts)
 *   3. per row: the reverse candidates not already in the row, their distances, sorted by
 *      (distance, slot), appended up to D
 * Every choice depends on the data only (sorted by value, never by arrival), so the graph is the
 * same whatever the thread count.
 *
 * Memory besides the output:  fdeg [n] uint32 (forward entries), rcount/cursor [n] uint32,
 * roff [n + 1] size_t, rsrc [edges] uint32, per worker [max in-degree] ghnsw_cand_t.
 *
 * An update (ghnsw_update_search_graph) keeps a built graph in step with the slots whose level-0
 * list changed, in O(changed rows x D) plus O(n) for its offsets: each changed row gets its new
 * forward part and keeps the reverse entries it had (minus those now forward, or deleted); each
 * slot newly named by a forward part gets the row's slot as a reverse entry, appended where the
 * target row has room, else in place of the target's farthest reverse entry if nearer.  A slot
 * whose row was replaced or whose delete mark changed pushes to every slot of its forward part: a
 * target may have dropped it while it was deleted (an updated row drops deleted entries).  Three
 * parallel phases as in a build (the changed rows, each by one thread; the pushes placed by target
 * through atomic cursors; per target its pushes in ascending source order), so the result is the
 * same whatever the thread count.  So an updated row holds its forward part
 * exactly as a build would, and reverse entries that a build would hold, in arrival order, plus
 * stale ones (sources whose list dropped the row since, deleted slots that were live when pushed):
 * each a valid slot, which the search may traverse, and which the next build drops.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"
#include "locks.h"

#define ROW_BLOCK 256 /* rows per task of the thread pool */

typedef struct {
    ghnsw_index_t *ix;
    uint32_t n, degree;
    uint32_t *out;      /* [n, degree] */
    uint32_t *fdeg;     /* [n] forward entries of each row */
    uint32_t *rcount;   /* [n] in-edges of live slots from live slots; phase 2: fill cursors */
    size_t *roff;       /* [n + 1] */
    uint32_t *rsrc;     /* [roff[n]] */
    ghnsw_cand_t **scratch; /* [workers][max in-degree] */
} graph_ctx_t;

static inline int live(const ghnsw_index_t *ix, uint32_t s) { return !ghnsw_bit_get(ix->deleted, s); }

/* The end of block b of ROW_BLOCK items out of n (the thread pool's tasks). */
static inline size_t block_end(size_t b, size_t n) { return (b + 1) * ROW_BLOCK < n ? (b + 1) * ROW_BLOCK : n; }

/* x's stored level-0 list, its count capped at M0 as the search reads it. */
static inline const uint32_t *level0_list(const ghnsw_index_t *ix, uint32_t x, uint32_t *deg) {
    *deg = ix->degree0[x] < ix->M0 ? ix->degree0[x] : ix->M0;
    return ghnsw_links0(ix, x);
}

/* x's level-0 list as the search reads it, live entries only, into ids[M0]; returns the count. */
static uint32_t forward_list(const ghnsw_index_t *ix, uint32_t n, uint32_t x, uint32_t *ids) {
    uint32_t deg, k = 0;
    const uint32_t *l = level0_list(ix, x, &deg);
    for (uint32_t j = 0; j < deg; j++)
        if (l[j] < n && l[j] != x && live(ix, l[j])) ids[k++] = l[j];
    return k;
}

/* off[y] = the sum of count[0 .. y) for y in [0, n], and count[] zeroed (the fill cursors of the
 * pass that places the entries); returns the largest count. */
static uint32_t offsets_from_counts(uint32_t *count, size_t *off, size_t n) {
    uint32_t most = 0;
    off[0] = 0;
    for (size_t y = 0; y < n; y++) {
        off[y + 1] = off[y] + count[y];
        if (count[y] > most) most = count[y];
        count[y] = 0;
    }
    return most;
}

static int forward_rows(void *vctx, size_t b, int worker) {
    graph_ctx_t *c = vctx;
    uint32_t *ids = (uint32_t *)c->scratch[worker]; /* room for M0 ids (see ghnsw_build_search_graph) */
    uint32_t end = (uint32_t)block_end(b, c->n);
    for (uint32_t x = (uint32_t)(b * ROW_BLOCK); x < end; x++) {
        uint32_t *row = c->out + (size_t)x * c->degree, k = 0;
        if (live(c->ix, x)) {
            k = forward_list(c->ix, c->n, x, ids);
            for (uint32_t j = 0; j < k; j++) __atomic_fetch_add(&c->rcount[ids[j]], 1, __ATOMIC_RELAXED);
            if (k > c->degree) k = c->degree;
            memcpy(row, ids, (size_t)k * 4);
        }
        c->fdeg[x] = k;
        for (uint32_t j = k; j < c->degree; j++) row[j] = GHNSW_INVALID;
    }
    return 0;
}

static int fill_reverse(void *vctx, size_t b, int worker) {
    graph_ctx_t *c = vctx;
    uint32_t *ids = (uint32_t *)c->scratch[worker];
    uint32_t end = (uint32_t)block_end(b, c->n);
    for (uint32_t y = (uint32_t)(b * ROW_BLOCK); y < end; y++) {
        if (!live(c->ix, y)) continue;
        uint32_t k = forward_list(c->ix, c->n, y, ids);
        for (uint32_t j = 0; j < k; j++) {
            uint32_t at = __atomic_fetch_add(&c->rcount[ids[j]], 1, __ATOMIC_RELAXED);
            c->rsrc[c->roff[ids[j]] + at] = y;
        }
    }
    return 0;
}

/* (distance, slot) ascending; a NaN distance (a NaN row in an unverified mapped file) sorts last */
static int cand_cmp(const void *a, const void *b) {
    const ghnsw_cand_t *p = a, *q = b;
    float dp = isnan(p->d) ? INFINITY : p->d, dq = isnan(q->d) ? INFINITY : q->d;
    if (dp != dq) return dp < dq ? -1 : 1;
    return p->id < q->id ? -1 : p->id > q->id;
}

static int reverse_rows(void *vctx, size_t b, int worker) {
    graph_ctx_t *c = vctx;
    ghnsw_index_t *ix = c->ix;
    ghnsw_cand_t *cand = c->scratch[worker];
    uint32_t end = (uint32_t)block_end(b, c->n);
    for (uint32_t x = (uint32_t)(b * ROW_BLOCK); x < end; x++) {
        uint32_t *row = c->out + (size_t)x * c->degree, k = c->fdeg[x], m = 0;
        if (k == c->degree) continue; /* no room for reverse edges */
        for (size_t i = c->roff[x]; i < c->roff[x + 1]; i++) {
            uint32_t y = c->rsrc[i], j = 0;
            while (j < k && row[j] != y) j++;
            if (j < k) continue; /* already a forward neighbour */
            cand[m].d = ghnsw_pair(ix, x, y); /* stored rows, any storage */
            cand[m++].id = y;
        }
        qsort(cand, m, sizeof(*cand), cand_cmp);
        for (uint32_t j = 0; j < m && k < c->degree; j++) row[k++] = cand[j].id;
    }
    return 0;
}

static ghnsw_status_t check_degree(int64_t degree, ghnsw_err_t *err) {
    if (degree < 1 || degree > GHNSW_MAX_GRAPH_DEGREE)
        return ghnsw_fail(err, GHNSW_EINVAL, "degree must be in [1, %u], got %lld", GHNSW_MAX_GRAPH_DEGREE,
                          (long long)degree);
    return GHNSW_OK;
}

ghnsw_status_t ghnsw_build_search_graph(ghnsw_index_t *ix, int64_t degree, int num_threads, int outputs,
                                        ghnsw_alloc_fn alloc, void *ctx, ghnsw_err_t *err) {
    ghnsw_status_t st = check_degree(degree, err);
    if (st) return st;
    st = ghnsw_writer_lock(ix, "building the search graph", err); /* no writer while we read */
    if (st) return st;
    graph_ctx_t c = {ix, ix->count, (uint32_t)degree, NULL, NULL, NULL, NULL, NULL, NULL};
    if (num_threads <= 0) num_threads = ghnsw_default_threads();
    size_t blocks = ((size_t)c.n + ROW_BLOCK - 1) / ROW_BLOCK;
    c.out = alloc(ctx, (size_t)c.n * degree * 4);
    c.fdeg = malloc(sizeof(uint32_t) * (c.n + 1));
    c.rcount = calloc((size_t)c.n + 1, sizeof(uint32_t));
    c.roff = malloc(sizeof(size_t) * ((size_t)c.n + 1));
    c.scratch = calloc((size_t)num_threads, sizeof(*c.scratch));
    int ok = c.out && c.fdeg && c.rcount && c.roff && c.scratch;
    if (ok && (outputs & GHNSW_GRAPH_LABELS)) { /* the slots' labels and live flags, read under the same lock as the graph */
        uint64_t *labels = alloc(ctx, (size_t)c.n * 8);
        uint8_t *alive = alloc(ctx, (size_t)c.n);
        ok = labels && alive;
        for (uint32_t s = 0; ok && s < c.n; s++) { labels[s] = ix->labels[s]; alive[s] = (uint8_t)live(ix, s); }
    }
    for (int t = 0; ok && t < num_threads; t++) ok = (c.scratch[t] = malloc(sizeof(ghnsw_cand_t) * ix->M0)) != NULL;
    if (ok) {
        ghnsw_parallel_for(blocks, num_threads, forward_rows, &c);
        uint32_t most = offsets_from_counts(c.rcount, c.roff, c.n);
        if (most < ix->M0) most = ix->M0;   /* the scratch also holds forward lists */
        c.rsrc = malloc(sizeof(uint32_t) * (c.roff[c.n] + 1));
        ok = c.rsrc != NULL;
        for (int t = 0; ok && t < num_threads; t++) {
            ghnsw_cand_t *grown = realloc(c.scratch[t], sizeof(ghnsw_cand_t) * most);
            if (grown) c.scratch[t] = grown;
            else ok = 0;
        }
        if (ok) {
            ghnsw_parallel_for(blocks, num_threads, fill_reverse, &c);
            ghnsw_parallel_for(blocks, num_threads, reverse_rows, &c);
        }
    }
    if (ok && (outputs & GHNSW_GRAPH_FORWARD)) { /* the forward part of each row, for updates */
        uint32_t *fdeg = alloc(ctx, (size_t)c.n * 4);
        if ((ok = fdeg != NULL)) memcpy(fdeg, c.fdeg, (size_t)c.n * 4);
    }
    pthread_mutex_unlock(&ix->mut_lock);
    if (c.scratch)
        for (int t = 0; t < num_threads; t++) free(c.scratch[t]);
    free(c.scratch);
    free(c.fdeg);
    free(c.rcount);
    free(c.roff);
    free(c.rsrc);
    return ok ? GHNSW_OK : ghnsw_fail(err, GHNSW_ENOMEM, "out of memory building the search graph");
}

/* ------------------------------------------------------------------ updates */

static inline int in_list(const uint32_t *ids, uint32_t n, uint32_t y) {
    for (uint32_t j = 0; j < n; j++)
        if (ids[j] == y) return 1;
    return 0;
}

/* Whether y's level-0 list (as the search reads it) names x. */
static int names(const ghnsw_index_t *ix, uint32_t y, uint32_t x) {
    uint32_t deg;
    const uint32_t *l = level0_list(ix, y, &deg);
    return in_list(l, deg, x);
}

/* Whether row x, whose new forward part is ids[0 .. f), keeps its old entry y: a live slot of the
 * graph, not x, not now forward. */
static inline int keeps(const ghnsw_index_t *ix, uint32_t n, uint32_t x, const uint32_t *ids, uint32_t f, uint32_t y) {
    return y < n && y != x && live(ix, y) && !in_list(ids, f, y);
}

/* Give row y the reverse entry x (x's forward part names y): appended where the row has room, else
 * in place of its farthest reverse entry (deleted ones first) if x is nearer; the row's forward part
 * is never touched.  Returns whether the row changed. */
static int push_reverse(ghnsw_index_t *ix, uint32_t *rows, const uint32_t *fdeg, uint32_t degree, uint32_t x,
                        uint32_t y) {
    uint32_t *row = rows + (size_t)y * degree, k = 0;
    while (k < degree && row[k] != GHNSW_INVALID) {
        if (row[k] == x) return 0;
        k++;
    }
    if (k < degree) {
        row[k] = x;
        return 1;
    }
    float far = ghnsw_pair(ix, y, x);
    uint32_t at = degree;
    for (uint32_t j = fdeg[y]; j < degree; j++) {
        float d = live(ix, row[j]) ? ghnsw_pair(ix, y, row[j]) : INFINITY;
        if (!(d <= far)) { /* NaN (an unverified mapped row) counts as farthest too */
            far = isnan(d) ? INFINITY : d;
            at = j;
        }
    }
    if (at == degree) return 0;
    row[at] = x;
    return 1;
}

typedef struct {
    ghnsw_index_t *ix;
    uint32_t *rows, *fdeg, n, d, m0;
    const uint32_t *slots;
    const uint8_t *renew; /* [n_slots] push to every forward entry, not only new ones */
    size_t n_slots, n_rows;
    uint32_t *pbuf;     /* [n_slots, M0] the targets each slot pushes to, pcnt[i] of them */
    uint32_t *pcnt;     /* [n_slots] */
    uint32_t *tcount;   /* [n_rows] pushes per target (phase 1, atomic); phase 2: fill cursors */
    size_t *toff;       /* [n_rows + 1] */
    uint32_t *tsrc;     /* [toff[n_rows]] the sources pushed to each target, sorted in phase 3 */
    uint8_t *touched;   /* [n_rows] rows written (each byte written by one thread of a phase) */
    uint32_t **scratch; /* per worker: ids [M0], row [D] */
} update_ctx_t;

/* Phase 1, per changed slot x (each thread its own rows): the new row (forward part, then the reverse
 * entries it had and the old forward entries whose own lists name x, each still live and not now
 * forward) in place; the slots the new forward part newly names, for phase 2. */
static int update_rows(void *vctx, size_t b, int worker) {
    update_ctx_t *c = vctx;
    ghnsw_index_t *ix = c->ix;
    uint32_t *ids = c->scratch[worker], *row = ids + c->m0, n = c->n, d = c->d;
    size_t end = block_end(b, c->n_slots);
    for (size_t i = b * ROW_BLOCK; i < end; i++) {
        uint32_t x = c->slots[i], *cur = c->rows + (size_t)x * d, *push = c->pbuf + i * c->m0;
        uint32_t old_f = c->fdeg[x] < d ? c->fdeg[x] : d;
        uint32_t f = forward_list(ix, n, x, ids), k = f < d ? f : d, np = 0;
        memcpy(row, ids, (size_t)k * 4);
        for (uint32_t j = old_f; j < d && k < d && cur[j] != GHNSW_INVALID; j++)
            if (keeps(ix, n, x, ids, f, cur[j])) row[k++] = cur[j];
        for (uint32_t j = 0; j < old_f && k < d; j++)
            if (keeps(ix, n, x, ids, f, cur[j]) && names(ix, cur[j], x)) row[k++] = cur[j];
        for (uint32_t j = k; j < d; j++) row[j] = GHNSW_INVALID;
        for (uint32_t j = 0; j < f; j++)   /* read cur's forward part before it is overwritten */
            if (c->renew[i] || !in_list(cur, old_f, ids[j])) {
                push[np++] = ids[j];
                __atomic_fetch_add(&c->tcount[ids[j]], 1, __ATOMIC_RELAXED);
            }
        c->pcnt[i] = np;
        memcpy(cur, row, (size_t)d * 4);
        c->fdeg[x] = f < d ? f : d;
        c->touched[x] = 1;
    }
    return 0;
}

/* Phase 2: each push placed in its target's list (atomic cursors: any order, phase 3 sorts). */
static int place_pushes(void *vctx, size_t b, int worker) {
    update_ctx_t *c = vctx;
    (void)worker;
    size_t end = block_end(b, c->n_slots);
    for (size_t i = b * ROW_BLOCK; i < end; i++)
        for (uint32_t j = 0; j < c->pcnt[i]; j++) {
            uint32_t y = c->pbuf[i * c->m0 + j];
            c->tsrc[c->toff[y] + __atomic_fetch_add(&c->tcount[y], 1, __ATOMIC_RELAXED)] = c->slots[i];
        }
    return 0;
}

/* Phase 3, per target row y (each thread its own rows): its pushes in ascending source order. */
static int apply_pushes(void *vctx, size_t b, int worker) {
    update_ctx_t *c = vctx;
    (void)worker;
    size_t end = block_end(b, c->n_rows);
    for (size_t y = b * ROW_BLOCK; y < end; y++) {
        uint32_t *src = c->tsrc + c->toff[y];
        size_t m = c->toff[y + 1] - c->toff[y];
        for (size_t a = 1; a < m; a++)   /* insertion sort: a few entries */
            for (size_t j = a; j > 0 && src[j - 1] > src[j]; j--) {
                uint32_t t = src[j];
                src[j] = src[j - 1];
                src[j - 1] = t;
            }
        for (size_t j = 0; j < m; j++)
            if (push_reverse(c->ix, c->rows, c->fdeg, c->d, src[j], (uint32_t)y)) c->touched[y] = 1;
    }
    return 0;
}

ghnsw_status_t ghnsw_update_search_graph(ghnsw_index_t *ix, uint32_t *rows, uint32_t *fdeg, int64_t degree,
                                         size_t n_rows, const uint32_t *slots, const uint8_t *renew, size_t n_slots,
                                         int num_threads, ghnsw_alloc_fn alloc, void *ctx, ghnsw_err_t *err) {
    ghnsw_status_t st = check_degree(degree, err);
    if (st) return st;
    st = ghnsw_writer_lock(ix, "updating the search graph", err); /* no writer while we read */
    if (st) return st;
    /* slots past the graph's rows (inserted since its caller read the count) are left out: the lists
     * that name them changed after the drain that gave `slots`, so the next update takes them in */
    update_ctx_t c = {ix, rows, fdeg, ix->count < n_rows ? ix->count : (uint32_t)n_rows, (uint32_t)degree, ix->M0,
                      slots, renew, n_slots, n_rows, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    for (size_t i = 0; i < n_slots; i++)
        if (slots[i] >= c.n || (i && slots[i] <= slots[i - 1])) {
            pthread_mutex_unlock(&ix->mut_lock);
            return ghnsw_fail(err, GHNSW_EINVAL, "slots must ascend, each below the count (%u) and the graph's "
                              "rows (%zu); slot %u at %zu", ix->count, n_rows, slots[i], i);
        }
    if (num_threads <= 0) num_threads = ghnsw_default_threads();
    c.pbuf = malloc(sizeof(uint32_t) * (n_slots * c.m0 + 1));
    c.pcnt = malloc(sizeof(uint32_t) * (n_slots + 1));
    c.tcount = calloc(n_rows + 1, sizeof(uint32_t));
    c.toff = malloc(sizeof(size_t) * (n_rows + 1));
    c.touched = calloc(n_rows + 1, 1);
    c.scratch = calloc((size_t)num_threads, sizeof(*c.scratch));
    int ok = c.pbuf && c.pcnt && c.tcount && c.toff && c.touched && c.scratch;
    for (int t = 0; ok && t < num_threads; t++) ok = (c.scratch[t] = malloc(sizeof(uint32_t) * (c.m0 + c.d))) != NULL;
    if (ok) {
        ghnsw_parallel_for((n_slots + ROW_BLOCK - 1) / ROW_BLOCK, num_threads, update_rows, &c);
        offsets_from_counts(c.tcount, c.toff, n_rows);
        ok = (c.tsrc = malloc(sizeof(uint32_t) * (c.toff[n_rows] + 1))) != NULL;
    }
    if (ok) {
        ghnsw_parallel_for((n_slots + ROW_BLOCK - 1) / ROW_BLOCK, num_threads, place_pushes, &c);
        ghnsw_parallel_for((n_rows + ROW_BLOCK - 1) / ROW_BLOCK, num_threads, apply_pushes, &c);
    }
    pthread_mutex_unlock(&ix->mut_lock);
    size_t n_touched = 0;
    for (size_t y = 0; ok && y < n_rows; y++) n_touched += c.touched[y];
    uint32_t *out = ok ? alloc(ctx, n_touched * 4) : NULL;
    if (out)
        for (size_t y = 0, m = 0; y < n_rows; y++)
            if (c.touched[y]) out[m++] = (uint32_t)y;
    if (c.scratch)
        for (int t = 0; t < num_threads; t++) free(c.scratch[t]);
    free(c.scratch);
    free(c.pbuf);
    free(c.pcnt);
    free(c.tcount);
    free(c.toff);
    free(c.tsrc);
    free(c.touched);
    return out ? GHNSW_OK : ghnsw_fail(err, GHNSW_ENOMEM, "out of memory updating the search graph");
}
