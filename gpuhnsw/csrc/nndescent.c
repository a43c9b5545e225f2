/* NN-descent k-nearest-neighbour graph (Dong, Moses & Li 2011; the variant of pynndescent):
 * random-projection-tree initialisation, then rounds of local joins over sampled "new" and "old"
 * neighbour lists, until fewer than delta * n * k heap entries change in a round.
 *
 * Determinism.  Every random choice is a hash of (seed, round, ids), never a shared generator, and a
 * row's heap ends up holding the k smallest (distance, id) pairs it was ever offered, which does not
 * depend on the order of the offers (a bounded "k smallest" set is order-free; ties go to the smaller
 * id).  Candidate samples are likewise the mc smallest (hash priority, id) pairs offered to a row.
 * So the graph, the round count and the number of distance evaluations depend on the seed and the
 * data only: not on the thread count, nor on scheduling.
 *
 * Memory besides the caller's data (read in place, never copied; rows of `dim` floats, unpadded):
 *
 *   ids, d, flag [n, k]   uint32, float, uint8   per-row max-heap on (d, id), root = the worst entry
 *   thr          [n]      float                  root distance, read without the lock as a pre-check
 *   locks        [n]      uint8                  one spin lock per row (heap and candidate lists)
 *   cand ids/prio [2, n, mc] uint32, count [2, n] sampled new (0) and old (1) candidates per row
 *   inv_norm     [n]      float                  cosine only: 1 / (|x| + 1e-30), hnswlib's rule
 *   per worker:  [n] uint32 tree permutation, [dim] float hyperplane, a counter cache line
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"
#include "locks.h"

enum { FLAG_OLD = 0, FLAG_NEW = 1, FLAG_FRESH = 2 /* inserted during the running join */ };
enum { NEW_LIST = 0, OLD_LIST = 1 };
#define ROW_BLOCK 128 /* rows per task of the thread pool */

static inline uint64_t mix64(uint64_t x) { /* splitmix64's finaliser */
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
static inline uint64_t hash3(uint64_t a, uint64_t b, uint64_t c) { return mix64(mix64(mix64(a) ^ b) ^ c); }

typedef struct { uint64_t evals, fresh, pad[6]; } counter_t; /* one cache line per worker */

typedef struct {
    const float *data; /* [n, dim] */
    size_t n, dim, dim4; /* dim4 = dim rounded down to 4: the SIMD kernels' part of a row */
    int space;
    ghnsw_dist_fn dist, dot1m; /* the space's kernel; the ip kernel (1 - a.b) */
    float *inv_norm;           /* [n], cosine only */
    const ghnsw_nnd_params_t *p;
    uint32_t k, mc;
    uint32_t *ids;
    float *d, *thr;
    uint8_t *flag, *locks;
    uint32_t *cand_ids, *cand_prio, *cand_n; /* [2, n, mc], [2, n, mc], [2, n] */
    uint64_t round_seed;
    uint32_t *perm; /* [workers, n] */
    float *plane;   /* [workers, dim] */
    counter_t *cnt; /* [workers] */
} nnd_t;

/* ---- distances -------------------------------------------------------------------------------- */

static inline float dot_tail(const float *x, const float *y, size_t from, size_t to) {
    float s = 0;
    for (size_t i = from; i < to; i++) s += x[i] * y[i];
    return s;
}

/* Distance of rows a and b, computed in one fixed operand order so that d(a, b) == d(b, a) bit for
 * bit (a pair reached from either side must offer the same key). */
static float pair_dist(const nnd_t *s, uint32_t a, uint32_t b) {
    if (a > b) { uint32_t t = a; a = b; b = t; }
    const float *x = s->data + (size_t)a * s->dim, *y = s->data + (size_t)b * s->dim;
    float r = s->dist(x, y, s->dim4);
    if (s->space == GHNSW_L2) {
        for (size_t i = s->dim4; i < s->dim; i++) { float t = x[i] - y[i]; r += t * t; }
        return r;
    }
    r -= dot_tail(x, y, s->dim4, s->dim); /* r = 1 - a.b */
    if (s->space == GHNSW_COSINE) r = 1.0f - ((1.0f - r) * s->inv_norm[a]) * s->inv_norm[b];
    return r;
}

static inline float dot(const nnd_t *s, const float *x, const float *y) {
    return (1.0f - s->dot1m(x, y, s->dim4)) + dot_tail(x, y, s->dim4, s->dim);
}

/* ---- bounded heaps ---------------------------------------------------------------------------- */

static inline int before(float da, uint32_t ia, float db, uint32_t ib) { return da < db || (da == db && ia < ib); }
static inline int before_u(uint32_t pa, uint32_t ia, uint32_t pb, uint32_t ib) { return pa < pb || (pa == pb && ia < ib); }

/* Offers (dv, id) to row's heap; returns 1 if it entered. */
static int heap_push(nnd_t *s, uint32_t row, float dv, uint32_t id, uint8_t flag) {
    float t;
    __atomic_load(&s->thr[row], &t, __ATOMIC_RELAXED);
    if (dv > t) return 0; /* thr only decreases, so this rejection is final */
    size_t k = s->k;
    uint32_t *ids = s->ids + row * k;
    float *d = s->d + row * k;
    uint8_t *fl = s->flag + row * k;
    int entered = 0;
    ghnsw_spin_lock(&s->locks[row]);
    if (before(dv, id, d[0], ids[0])) {
        size_t j;
        for (j = 0; j < k && ids[j] != id; j++) {}
        if (j == k) {
            size_t i = 0;
            for (;;) { /* sift the new entry down from the root */
                size_t c = 2 * i + 1;
                if (c >= k) break;
                if (c + 1 < k && before(d[c], ids[c], d[c + 1], ids[c + 1])) c++;
                if (before(d[c], ids[c], dv, id)) break;
                d[i] = d[c]; ids[i] = ids[c]; fl[i] = fl[c];
                i = c;
            }
            d[i] = dv; ids[i] = id; fl[i] = flag;
            __atomic_store(&s->thr[row], &d[0], __ATOMIC_RELAXED);
            entered = 1;
        }
    }
    ghnsw_spin_unlock(&s->locks[row]);
    return entered;
}

/* Offers candidate id with priority pr to row's list (NEW_LIST or OLD_LIST): keeps the mc smallest
 * (priority, id) pairs, as a max-heap. */
static void cand_push(nnd_t *s, int list, uint32_t row, uint32_t pr, uint32_t id) {
    size_t mc = s->mc, base = ((size_t)list * s->n + row) * mc;
    uint32_t *ids = s->cand_ids + base, *prio = s->cand_prio + base, *cnt = s->cand_n + (size_t)list * s->n + row;
    ghnsw_spin_lock(&s->locks[row]);
    size_t m = *cnt, j;
    for (j = 0; j < m && ids[j] != id; j++) {}
    if (j == m) {
        if (m < mc) { /* sift up */
            size_t i = m;
            while (i > 0) {
                size_t par = (i - 1) / 2;
                if (before_u(pr, id, prio[par], ids[par])) break; /* the parent stays above */
                prio[i] = prio[par]; ids[i] = ids[par];
                i = par;
            }
            prio[i] = pr; ids[i] = id;
            *cnt = (uint32_t)(m + 1);
        } else if (before_u(pr, id, prio[0], ids[0])) { /* replace the root, sift down */
            size_t i = 0;
            for (;;) {
                size_t c = 2 * i + 1;
                if (c >= mc) break;
                if (c + 1 < mc && before_u(prio[c], ids[c], prio[c + 1], ids[c + 1])) c++;
                if (before_u(prio[c], ids[c], pr, id)) break;
                prio[i] = prio[c]; ids[i] = ids[c];
                i = c;
            }
            prio[i] = pr; ids[i] = id;
        }
    }
    ghnsw_spin_unlock(&s->locks[row]);
}

/* ---- random-projection trees ------------------------------------------------------------------ */

static void leaf_join(nnd_t *s, const uint32_t *idx, size_t m, int worker) {
    for (size_t a = 0; a < m; a++)
        for (size_t b = a + 1; b < m; b++) {
            float dv = pair_dist(s, idx[a], idx[b]);
            heap_push(s, idx[a], dv, idx[b], FLAG_NEW);
            heap_push(s, idx[b], dv, idx[a], FLAG_NEW);
        }
    s->cnt[worker].evals += m * (m - 1) / 2;
}

/* Splits idx[0, m) by a hyperplane through two random members (l2, ip: their perpendicular
 * bisector; cosine: the plane between their directions) and recurses; leaves join all pairs. */
static void split_node(nnd_t *s, uint32_t *idx, size_t m, uint64_t key, int worker) {
    if (m <= s->p->leaf_size) { leaf_join(s, idx, m, worker); return; }
    uint64_t h = hash3(s->p->seed, key, 0x5eed);
    size_t ia = (size_t)(h % m), ib = (size_t)((h >> 32) % (m - 1));
    if (ib >= ia) ib++;
    const float *xa = s->data + (size_t)idx[ia] * s->dim, *xb = s->data + (size_t)idx[ib] * s->dim;
    float *w = s->plane + (size_t)worker * s->dim, offset = 0;
    if (s->space == GHNSW_COSINE) {
        float ua = s->inv_norm[idx[ia]], ub = s->inv_norm[idx[ib]];
        for (size_t i = 0; i < s->dim; i++) w[i] = xa[i] * ua - xb[i] * ub;
    } else {
        for (size_t i = 0; i < s->dim; i++) { w[i] = xa[i] - xb[i]; offset += w[i] * 0.5f * (xa[i] + xb[i]); }
    }
    size_t lo = 0, hi = m; /* idx[0, lo) goes left, idx[hi, m) right */
    while (lo < hi) {
        if (dot(s, w, s->data + (size_t)idx[lo] * s->dim) > offset) lo++;
        else { uint32_t t = idx[lo]; idx[lo] = idx[--hi]; idx[hi] = t; }
    }
    if (lo == 0 || lo == m) { /* degenerate plane (e.g. duplicates): split at random */
        lo = 0; hi = m;
        while (lo < hi) {
            if (hash3(key, idx[lo], 0x51de) & 1) lo++;
            else { uint32_t t = idx[lo]; idx[lo] = idx[--hi]; idx[hi] = t; }
        }
        if (lo == 0 || lo == m) lo = m / 2;
    }
    split_node(s, idx, lo, mix64(2 * key), worker);
    split_node(s, idx + lo, m - lo, mix64(2 * key + 1), worker);
}

static int tree_task(void *ctx, size_t t, int worker) {
    nnd_t *s = ctx;
    uint32_t *idx = s->perm + (size_t)worker * s->n;
    for (size_t i = 0; i < s->n; i++) idx[i] = (uint32_t)i;
    split_node(s, idx, s->n, hash3(s->p->seed, t, 0x7ee), worker);
    return 0;
}

/* Rows the trees left short of k neighbours get random ones (hashed from the seed and the row). */
static int fill_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    for (size_t i = blk * ROW_BLOCK; i < end; i++) {
        for (uint64_t t = 0; s->ids[i * s->k] == GHNSW_INVALID; t++) {
            /* hashed picks first; then consecutive rows, which end the loop since k < n */
            uint32_t j = t < 4 * (uint64_t)s->k ? (uint32_t)(hash3(s->p->seed, i, t) % s->n)
                                                 : (uint32_t)((i + 1 + t) % s->n);
            if (j == i) continue;
            heap_push(s, (uint32_t)i, pair_dist(s, (uint32_t)i, j), j, FLAG_NEW);
            s->cnt[worker].evals++;
        }
    }
    return 0;
}

/* ---- one round of NN-descent ------------------------------------------------------------------ */

static inline uint32_t edge_priority(const nnd_t *s, uint32_t a, uint32_t b) {
    return (uint32_t)hash3(s->round_seed, a < b ? a : b, a < b ? b : a);
}

/* Each heap entry (i -> j) is offered, with one priority, to the candidate lists of i and j. */
static int sample_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    for (size_t i = blk * ROW_BLOCK; i < end; i++)
        for (size_t e = 0; e < s->k; e++) {
            uint32_t j = s->ids[i * s->k + e];
            if (j == GHNSW_INVALID) continue;
            int list = s->flag[i * s->k + e] == FLAG_OLD ? OLD_LIST : NEW_LIST;
            uint32_t pr = edge_priority(s, (uint32_t)i, j);
            cand_push(s, list, (uint32_t)i, pr, j);
            cand_push(s, list, j, pr, (uint32_t)i);
        }
    return 0;
}

/* New entries sampled into row i's new list take part in this round's join: they become old. */
static int age_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    for (size_t i = blk * ROW_BLOCK; i < end; i++) {
        const uint32_t *nc = s->cand_ids + i * s->mc;
        uint32_t m = s->cand_n[i];
        for (size_t e = 0; e < s->k; e++) {
            if (s->flag[i * s->k + e] != FLAG_NEW) continue;
            uint32_t j = s->ids[i * s->k + e];
            for (uint32_t c = 0; c < m; c++)
                if (nc[c] == j) { s->flag[i * s->k + e] = FLAG_OLD; break; }
        }
    }
    return 0;
}

/* Local join around row i: every new-new and new-old pair of its candidates meets. */
static int join_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    uint64_t evals = 0;
    for (size_t i = blk * ROW_BLOCK; i < end; i++) {
        const uint32_t *nc = s->cand_ids + i * s->mc, *oc = s->cand_ids + (s->n + i) * s->mc;
        uint32_t nn = s->cand_n[i], no = s->cand_n[s->n + i];
        for (uint32_t a = 0; a < nn; a++) {
            uint32_t p = nc[a];
            for (uint32_t b = a + 1; b < nn + no; b++) {
                uint32_t q = b < nn ? nc[b] : oc[b - nn];
                if (q == p) continue;
                float dv = pair_dist(s, p, q);
                evals++;
                heap_push(s, p, dv, q, FLAG_FRESH);
                heap_push(s, q, dv, p, FLAG_FRESH);
            }
        }
    }
    s->cnt[worker].evals += evals;
    return 0;
}

/* Entries that entered in this round's join (and stayed) are counted and become plain new. */
static int settle_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    uint64_t fresh = 0;
    for (size_t e = blk * ROW_BLOCK * s->k; e < end * s->k; e++)
        if (s->flag[e] == FLAG_FRESH) { s->flag[e] = FLAG_NEW; fresh++; }
    s->cnt[worker].fresh += fresh;
    return 0;
}

static int norm_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    for (size_t i = blk * ROW_BLOCK; i < end; i++) {
        const float *x = s->data + i * s->dim;
        double sq = 0;
        for (size_t c = 0; c < s->dim; c++) sq += (double)x[c] * x[c];
        s->inv_norm[i] = (float)(1.0 / (sqrt(sq) + 1e-30));
    }
    return 0;
}

/* ---- driver ----------------------------------------------------------------------------------- */

static uint64_t sum_field(const nnd_t *s, int workers, int fresh) {
    uint64_t t = 0;
    for (int w = 0; w < workers; w++) t += fresh ? s->cnt[w].fresh : s->cnt[w].evals;
    return t;
}

ghnsw_status_t ghnsw_nndescent(const float *data, size_t n, size_t dim, int space, const ghnsw_nnd_params_t *p,
                               int64_t *out_ids, float *out_dists, ghnsw_nnd_info_t *info, ghnsw_err_t *err) {
    if (space < GHNSW_L2 || space > GHNSW_COSINE) return ghnsw_fail(err, GHNSW_EINVAL, "unknown space %d", space);
    if (n < 2 || n > GHNSW_MAX_CAPACITY || dim == 0)
        return ghnsw_fail(err, GHNSW_EINVAL, "NN-descent needs 2 <= n <= %u rows and dim >= 1", GHNSW_MAX_CAPACITY);
    if (p->k < 1 || p->k >= n) return ghnsw_fail(err, GHNSW_EINVAL, "k must be in [1, n - 1], got %u", p->k);
    if (p->max_candidates < 1 || p->leaf_size < 2)
        return ghnsw_fail(err, GHNSW_EINVAL, "max_candidates must be >= 1 and leaf_size >= 2");
    int workers = p->num_threads > 0 ? p->num_threads : ghnsw_default_threads();
    size_t blocks = (n + ROW_BLOCK - 1) / ROW_BLOCK;
    nnd_t s = {0};
    s.data = data; s.n = n; s.dim = dim; s.dim4 = dim & ~(size_t)3; s.space = space; s.p = p;
    s.dist = ghnsw_pick_distance(space);
    s.dot1m = ghnsw_pick_distance(GHNSW_IP);
    s.k = p->k; s.mc = p->max_candidates;
    size_t nk = n * s.k, nmc = 2 * n * s.mc;
    s.ids = malloc(nk * sizeof *s.ids);
    s.d = malloc(nk * sizeof *s.d);
    s.flag = calloc(nk, 1);
    s.thr = malloc(n * sizeof *s.thr);
    s.locks = calloc(n, 1);
    s.cand_ids = malloc(nmc * sizeof *s.cand_ids);
    s.cand_prio = malloc(nmc * sizeof *s.cand_prio);
    s.cand_n = malloc(2 * n * sizeof *s.cand_n);
    s.perm = p->n_trees ? malloc((size_t)workers * n * sizeof *s.perm) : NULL;
    s.plane = malloc((size_t)workers * dim * sizeof *s.plane);
    s.cnt = calloc((size_t)workers, sizeof *s.cnt);
    s.inv_norm = space == GHNSW_COSINE ? malloc(n * sizeof *s.inv_norm) : NULL;
    ghnsw_status_t st = GHNSW_OK;
    if (!s.ids || !s.d || !s.flag || !s.thr || !s.locks || !s.cand_ids || !s.cand_prio || !s.cand_n ||
        (p->n_trees && !s.perm) || !s.plane || !s.cnt || (space == GHNSW_COSINE && !s.inv_norm)) {
        st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory for the NN-descent state of %zu rows", n);
        goto out;
    }
    for (size_t e = 0; e < nk; e++) { s.ids[e] = GHNSW_INVALID; s.d[e] = INFINITY; }
    for (size_t i = 0; i < n; i++) s.thr[i] = INFINITY;
    if (s.inv_norm) ghnsw_parallel_for(blocks, workers, norm_task, &s);

    if (p->n_trees) ghnsw_parallel_for(p->n_trees, workers, tree_task, &s);
    ghnsw_parallel_for(blocks, workers, fill_task, &s);

    uint64_t stop_below = (uint64_t)(p->delta * (double)nk), fresh = 0;
    uint32_t round = 0;
    while (round < p->n_iters) {
        s.round_seed = hash3(p->seed, round, 0xd05);
        memset(s.cand_n, 0, 2 * n * sizeof *s.cand_n);
        ghnsw_parallel_for(blocks, workers, sample_task, &s);
        ghnsw_parallel_for(blocks, workers, age_task, &s);
        ghnsw_parallel_for(blocks, workers, join_task, &s);
        uint64_t before_fresh = sum_field(&s, workers, 1);
        ghnsw_parallel_for(blocks, workers, settle_task, &s);
        fresh = sum_field(&s, workers, 1) - before_fresh;
        round++;
        if (p->on_round && p->on_round(p->on_round_ctx, round, fresh)) { st = GHNSW_ECALLBACK; goto out; }
        if (fresh <= stop_below) break;
    }

    for (size_t i = 0; i < n; i++) { /* rows sorted by (distance, id): insertion sort of k entries */
        int64_t *oi = out_ids + i * s.k;
        float *od = out_dists + i * s.k;
        for (size_t e = 0; e < s.k; e++) {
            float dv = s.d[i * s.k + e];
            uint32_t id = s.ids[i * s.k + e];
            size_t j = e;
            while (j > 0 && before(dv, id, od[j - 1], (uint32_t)oi[j - 1])) { od[j] = od[j - 1]; oi[j] = oi[j - 1]; j--; }
            od[j] = dv; oi[j] = id;
        }
    }
    if (info) { info->rounds = round; info->dist_evals = sum_field(&s, workers, 0); info->last_updates = fresh; }
out:
    free(s.ids); free(s.d); free(s.flag); free(s.thr); free(s.locks);
    free(s.cand_ids); free(s.cand_prio); free(s.cand_n); free(s.perm); free(s.plane); free(s.cnt); free(s.inv_norm);
    return st;
}
