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
 * Speed.  Pair sums come GHNSW_TILE x GHNSW_TILE pairs at a time from a register-tiled kernel
 * (distance.c; l2 sums (a - b)^2: |a|^2 + |b|^2 - 2 a.b from precomputed norms, half the vector
 * work, was tried and lost most of the recall on data far from the origin, e.g. an offset of 1000
 * on 16-d unit Gaussians: 0.59), so each row loaded from cache serves several pairs: a leaf of a tree, and a row's
 * new x (new + old) candidates, are joined as small blocks.  The forest is built breadth-first over
 * all trees while its nodes are larger than the cache (one pass over the data per level, not one per
 * level and tree), then depth-first.  The joins visit rows in the first tree's leaf order, so that
 * consecutive rows share candidates whose vectors are still cached.
 *
 * Compressed joins (params storage: float16 or int8).  The joins, the leaves and the initial fill
 * read a copy of the rows instead of the data: float16 (padded to 16 halves), or int8 codes of one
 * scale s for every dimension with per-dimension offsets m_i = lo_i + 128 s (s = the widest range /
 * 255), padded to 32 codes, so that a pair's sum is an exact integer:
 *     l2: s^2 sum_i (a_i - b_i)^2          ip: 1 - (|m|^2 + s (r_a + r_b) + s^2 sum_i a_i b_i)
 * with r = m . c per row (a per-dimension scale would weight the sums and rule that out).  Cosine rows
 * are normalised before either copy is made.  Integer data whose every dimension spans at most 256
 * values (pixels, SIFT) takes s = 1 and is copied exactly.  The copies are 2x and 4x smaller than the rows, and the joins wait on
 * rows fetched from memory; the trees split on the float32 rows.  Once the rounds are done each row's
 * list is re-scored on the float32 rows (row kernels, in leaf order) and sorted again, so the
 * returned distances are float32 ones and the kept neighbours the best of the compressed heap (not
 * for l2 over an exact copy, whose distances are those already).
 *
 * Memory besides the caller's data (read in place, never copied; rows of `dim` floats, unpadded):
 *
 *   ids, d, flag [n, k]   uint32, float, uint8   per-row max-heap on (d, id), root = the worst entry
 *   thr          [n]      float                  root distance, read without the lock as a pre-check
 *   locks        [n]      uint8                  one spin lock per row's heap
 *   cand [2, n, mc] uint64, count [2, n] uint32   sampled new (0) and old (1) candidates per row
 *   norm         [n]      float                  cosine only: 1 / (|x| + 1e-30), hnswlib's rule
 *   perm, node_of [n_trees, n] uint32, bf_left [n_trees, n] uint8   the forest (see build_forest)
 *   order        [n]      uint32                 the joins' row order
 *   per worker:  [n] uint8 plane sides, [dim] float hyperplane, [2 mc] uint32 candidates, a counter
 *   copy         [n, jbytes] uint8            compressed joins: the rows' copy (int8: codes, then sum(c) and
 *                                             |c|^2 as int32); int8 ip / cosine: r [n] float
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"
#include "locks.h"

enum { FLAG_OLD = 0, FLAG_NEW = 1, FLAG_FRESH = 2 /* inserted during the running join */ };
enum { NEW_LIST = 0, OLD_LIST = 1 };
#define ROW_BLOCK 128   /* rows per task of the thread pool */
#define PREFETCH_ROWS GHNSW_TILE /* tree splits: rows fetched ahead of the ones being projected */
#define LOCAL_BYTES (1u << 20) /* tree nodes whose rows fit in this many bytes are split depth-first */

static inline uint64_t mix64(uint64_t x) { /* splitmix64's finaliser */
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
static inline uint64_t hash3(uint64_t a, uint64_t b, uint64_t c) { return mix64(mix64(mix64(a) ^ b) ^ c); }

typedef struct { uint64_t evals, fresh, pad[6]; } counter_t; /* one cache line per worker */
typedef struct { uint32_t tree, start, size; uint64_t key; } tnode_t; /* perm[tree][start, start + size) */

typedef struct {
    const float *data; /* [n, dim] */
    size_t n, dim;
    int space;
    int storage;               /* the joins' rows: the data (GHNSW_F32), or its F16 / I8 copy */
    const uint8_t *jrows;      /* [n, jbytes] the joins' rows */
    size_t jbytes, jn;         /* a join row's bytes, the elements a tile reads (dim, or the padded width) */
    uint8_t *copy;             /* owned: the compressed copy */
    float *jterm;              /* [n] int8 ip / cosine: m . c of each row */
    float i8_scale, i8_m2;     /* int8: s, |m|^2 */
    float *i8_offset;          /* [dim] int8: m */
    float *range;              /* [workers, 2, dim] int8: each worker's minima, then maxima */
    uint8_t *fraction;         /* [workers, 64] int8: a worker saw a value that is not an integer */
    size_t bad_row;            /* float16: 1 + a row beyond its range, or 0 */
    int exact_copy;            /* int8 l2 of integer data: the copy holds the rows exactly */
    ghnsw_tile_fn tile;        /* pair sums ((a - b)^2 or a.b), GHNSW_TILE x GHNSW_TILE at a time */
    ghnsw_row_fn row;          /* one row's dot products with GHNSW_TILE others: tree splits */
    ghnsw_row_fn rescore;      /* one row's distance sums with GHNSW_TILE others: the final re-scoring */
    float *norm;               /* [n] cosine: 1 / (|x| + 1e-30); else NULL */
    const ghnsw_nnd_params_t *p;
    uint32_t k, mc;
    uint8_t *heaps;     /* [n, heap_bytes] each row's heap as one record (see heap_of) */
    size_t heap_bytes;
    uint64_t *cand;   /* [2, n, mc] sampled candidates: hash priority << 32 | id */
    uint32_t *cand_n; /* [2, n] */
    uint64_t round_seed;
    uint32_t *perm;  /* [n_trees, n] each tree's rows, in leaf order once built */
    uint32_t *order; /* [n] rows in the first tree's leaf order (near rows adjacent): the join's order */
    uint32_t *cands; /* [workers, 2 * mc] one row's new then old candidates */
    float *plane;   /* [workers, dim] */
    uint8_t *side;  /* [workers, n] a tree node's rows: left of its plane? */
    /* the forest's breadth-first levels: nodes with more than local_rows rows */
    size_t local_rows;
    tnode_t *front, *kids, *local; /* this level's nodes [nf]; their children [2 nf]; depth-first ones */
    float *planes, *offsets;       /* [nf, dim], [nf] */
    uint32_t *node_of;             /* [n_trees, n] row -> its node of this level, or GHNSW_INVALID */
    uint8_t *bf_left;              /* [n_trees, n] row -> left of that node's plane? */
    counter_t *cnt; /* [workers] */
    size_t stripes; /* sampling tasks, one per worker */
} nnd_t;

/* ---- the rows' heaps ---------------------------------------------------------------------------- */

/* Row i's heap is one record of heap_bytes (a multiple of 64, 64-aligned): threshold (float), lock
 * (byte), 3 bytes of padding, then d [k] float, ids [k] uint32, flag [k] uint8.  An offer reads the
 * threshold, then takes the lock and reads d and ids: one record keeps those in the one or two cache
 * lines a miss fetches, where separate arrays cost a miss each (the joins wait on these misses). */
static inline uint8_t *heap_of(const nnd_t *s, size_t i) { return s->heaps + i * s->heap_bytes; }
static inline float *thr_of(const nnd_t *s, size_t i) { return (float *)heap_of(s, i); }
static inline uint8_t *lock_of(const nnd_t *s, size_t i) { return heap_of(s, i) + 4; }
static inline float *d_of(const nnd_t *s, size_t i) { return (float *)(heap_of(s, i) + 8); }
static inline uint32_t *ids_of(const nnd_t *s, size_t i) { return (uint32_t *)(heap_of(s, i) + 8 + 4 * (size_t)s->k); }
static inline uint8_t *flag_of(const nnd_t *s, size_t i) { return heap_of(s, i) + 8 + 8 * (size_t)s->k; }

/* ---- distances -------------------------------------------------------------------------------- */

static inline const float *row_of(const nnd_t *s, uint32_t i) { return s->data + (size_t)i * s->dim; }
static inline const void *jrow_of(const nnd_t *s, uint32_t i) { return s->jrows + (size_t)i * s->jbytes; }

/* Distance of float32 rows a and b from a kernel's raw sum, in one fixed operand order so that
 * d(a, b) == d(b, a) bit for bit (a pair reached from either side must offer the same key). */
static inline float float_dist(const nnd_t *s, uint32_t a, uint32_t b, float raw) {
    if (s->space == GHNSW_L2) return raw;
    if (s->space == GHNSW_IP) return 1.0f - raw;
    if (a > b) { uint32_t t = a; a = b; b = t; }
    return 1.0f - (raw * s->norm[a]) * s->norm[b];
}

/* The same for the joins' rows (the compressed copies' formulas in the header comment; cosine rows
 * were normalised before they were copied), symmetric in a and b as well. */
static inline float pair_dist(const nnd_t *s, uint32_t a, uint32_t b, float raw) {
    if (s->storage == GHNSW_F32) return float_dist(s, a, b, raw);
    int l2 = s->space == GHNSW_L2;
    if (s->storage == GHNSW_F16) return l2 ? raw : 1.0f - raw;
    float ss = s->i8_scale * s->i8_scale;
    if (l2) return ss * raw;
    return 1.0f - ((s->i8_m2 + s->i8_scale * (s->jterm[a] + s->jterm[b])) + ss * raw);
}

/* ---- bounded heaps ---------------------------------------------------------------------------- */

static inline int before(float da, uint32_t ia, float db, uint32_t ib) { return da < db || (da == db && ia < ib); }

/* Whether ids [m] holds id: no early exit, so that the compiler vectorises it (m is small). */
static inline int holds(const uint32_t *ids, size_t m, uint32_t id) {
    uint32_t hit = 0;
    for (size_t j = 0; j < m; j++) hit |= ids[j] == id;
    return hit != 0;
}

/* Offers (dv, id) to row's heap, under the row's lock. */
static void heap_insert(nnd_t *s, uint32_t row, float dv, uint32_t id, uint8_t flag) {
    size_t k = s->k;
    uint32_t *ids = ids_of(s, row);
    float *d = d_of(s, row);
    uint8_t *fl = flag_of(s, row);
    ghnsw_spin_lock(lock_of(s, row));
    if (before(dv, id, d[0], ids[0]) && !holds(ids, k, id)) {
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
        __atomic_store(thr_of(s, row), &d[0], __ATOMIC_RELAXED);
    }
    ghnsw_spin_unlock(lock_of(s, row));
}

/* The common case inline: most offers lose to the row's worst entry (read without the lock: thr
 * only decreases, so the rejection is final). */
static inline void heap_push(nnd_t *s, uint32_t row, float dv, uint32_t id, uint8_t flag) {
    float t;
    __atomic_load(thr_of(s, row), &t, __ATOMIC_RELAXED);
    if (dv <= t) heap_insert(s, row, dv, id, flag);
}

static inline uint32_t cand_id(uint64_t key) { return (uint32_t)key; }

/* Offers candidate key (priority << 32 | id) to row's list (NEW_LIST or OLD_LIST): keeps the mc
 * smallest keys, as a max-heap.  Only the sampling stripe that owns the row writes its lists, so
 * no lock. */
static void cand_push(nnd_t *s, int list, uint32_t row, uint64_t key) {
    size_t mc = s->mc;
    uint64_t *c = s->cand + ((size_t)list * s->n + row) * mc;
    uint32_t *cnt = s->cand_n + (size_t)list * s->n + row;
    size_t m = *cnt;
    if (m == mc && key >= c[0]) return; /* most offers, once the list is full */
    uint64_t hit = 0;                    /* the same edge offered from both ends: the same key */
    for (size_t j = 0; j < m; j++) hit |= c[j] == key;
    if (hit) return;
    size_t i;
    if (m < mc) { /* sift up */
        for (i = m; i > 0 && c[(i - 1) / 2] < key; i = (i - 1) / 2) c[i] = c[(i - 1) / 2];
        *cnt = (uint32_t)(m + 1);
    } else { /* replace the root, sift down */
        for (i = 0;;) {
            size_t ch = 2 * i + 1;
            if (ch >= mc) break;
            if (ch + 1 < mc && c[ch] < c[ch + 1]) ch++;
            if (c[ch] < key) break;
            c[i] = c[ch];
            i = ch;
        }
    }
    c[i] = key;
}

/* ---- joins ------------------------------------------------------------------------------------ */

/* Every pair (ids[a], ids[b]) with a < na and a < b < m is evaluated, a tile at a time (tiles on
 * and right of the diagonal; the padding of a short tile repeats its last row), and offered to both
 * rows' heaps; pairs of one id with itself are skipped.  Returns the pairs evaluated. */
static uint64_t join_list(nnd_t *s, const uint32_t *ids /* [m] */, uint32_t na, uint32_t m, uint8_t flag) {
    enum { T = GHNSW_TILE };
    const void *pa[T], *pb[T];
    float out[T * T];
    uint64_t evals = 0;
    for (uint32_t a0 = 0; a0 < na; a0 += T) {
        for (uint32_t r = 0; r < T; r++) pa[r] = jrow_of(s, ids[a0 + r < na ? a0 + r : na - 1]);
        for (uint32_t b0 = a0; b0 < m; b0 += T) {
            for (uint32_t c = 0; c < T; c++) pb[c] = jrow_of(s, ids[b0 + c < m ? b0 + c : m - 1]);
            /* the heaps this tile's offers read, fetched while the tile is computed */
            for (uint32_t c = 0; c < T && b0 + c < m; c++) __builtin_prefetch(heap_of(s, ids[b0 + c]));
            s->tile(pa, pb, s->jn, out);
            for (uint32_t r = 0; r < T && a0 + r < na; r++)
                for (uint32_t c = 0; c < T && b0 + c < m; c++) {
                    uint32_t p = ids[a0 + r], q = ids[b0 + c];
                    if (b0 + c <= a0 + r || p == q) continue;
                    float dv = pair_dist(s, p, q, out[r * T + c]);
                    heap_push(s, p, dv, q, flag);
                    heap_push(s, q, dv, p, flag);
                    evals++;
                }
        }
    }
    return evals;
}

/* ---- random-projection trees ------------------------------------------------------------------ */

/* The hyperplane of a tree node over idx[0, m), through two members picked by its key (l2, ip: their
 * perpendicular bisector; cosine: the plane between their directions): w [dim]; rows with
 * dot(w, x) > offset go left. */
static float node_plane(const nnd_t *s, const uint32_t *idx, size_t m, uint64_t key, float *w) {
    uint64_t h = hash3(s->p->seed, key, 0x5eed);
    size_t ia = (size_t)(h % m), ib = (size_t)((h >> 32) % (m - 1));
    if (ib >= ia) ib++;
    const float *xa = row_of(s, idx[ia]), *xb = row_of(s, idx[ib]);
    float offset = 0;
    if (s->space == GHNSW_COSINE) {
        float ua = s->norm[idx[ia]], ub = s->norm[idx[ib]];
        for (size_t i = 0; i < s->dim; i++) w[i] = xa[i] * ua - xb[i] * ub;
    } else {
        for (size_t i = 0; i < s->dim; i++) { w[i] = xa[i] - xb[i]; offset += w[i] * 0.5f * (xa[i] + xb[i]); }
    }
    return offset;
}

/* Moves the rows of idx[0, m) whose left[j] is set to the front (left [m] moves along when not
 * NULL); a degenerate plane (all on one side, e.g. duplicates) splits at random instead.  Returns
 * the size of the left part, in [1, m - 1]. */
static size_t partition(uint32_t *idx, uint8_t *left, size_t m, uint64_t key) {
    size_t lo = 0, hi = m; /* idx[0, lo) goes left, idx[hi, m) right */
    while (lo < hi) {
        if (left[lo]) lo++;
        else {
            hi--;
            uint32_t t = idx[lo]; idx[lo] = idx[hi]; idx[hi] = t;
            uint8_t u = left[lo]; left[lo] = left[hi]; left[hi] = u;
        }
    }
    if (lo == 0 || lo == m) {
        lo = 0; hi = m;
        while (lo < hi) {
            if (hash3(key, idx[lo], 0x51de) & 1) lo++;
            else { uint32_t t = idx[lo]; idx[lo] = idx[--hi]; idx[hi] = t; }
        }
        if (lo == 0 || lo == m) lo = m / 2;
    }
    return lo;
}

/* Depth-first below a node whose rows fit in cache: splits idx[0, m) and recurses; leaves join
 * all pairs. */
static void split_node(nnd_t *s, uint32_t *idx, size_t m, uint64_t key, int worker) {
    if (m <= s->p->leaf_size) { s->cnt[worker].evals += join_list(s, idx, (uint32_t)m, (uint32_t)m, FLAG_NEW); return; }
    float *w = s->plane + (size_t)worker * s->dim;
    float offset = node_plane(s, idx, m, key, w);
    uint8_t *left = s->side + (size_t)worker * s->n;
    enum { T = GHNSW_TILE };
    const float *rows[T];
    float dots[T];
    for (size_t j0 = 0; j0 < m; j0 += T) { /* rows are scattered: fetch the next tile's early */
        for (size_t j = j0 + PREFETCH_ROWS; j < j0 + PREFETCH_ROWS + T && j < m; j++) {
            const char *ahead = (const char *)row_of(s, idx[j]);
            for (size_t b = 0; b < s->dim * sizeof(float); b += 64) __builtin_prefetch(ahead + b);
        }
        for (size_t c = 0; c < T; c++) rows[c] = row_of(s, idx[j0 + c < m ? j0 + c : m - 1]);
        s->row(w, rows, s->dim, dots);
        for (size_t c = 0; c < T && j0 + c < m; c++) left[j0 + c] = dots[c] > offset;
    }
    size_t lo = partition(idx, left, m, key);
    split_node(s, idx, lo, mix64(2 * key), worker);
    split_node(s, idx + lo, m - lo, mix64(2 * key + 1), worker);
}

/* Breadth-first above that: one level of every tree's large nodes per pass, and each pass reads
 * every row once and projects it on the planes of its nodes in all trees (the data is read once a
 * level, not once a level and tree). */
static int plane_task(void *ctx, size_t f, int worker) {
    nnd_t *s = ctx;
    const tnode_t *nd = &s->front[f];
    uint32_t *idx = s->perm + (size_t)nd->tree * s->n + nd->start;
    s->offsets[f] = node_plane(s, idx, nd->size, nd->key, s->planes + f * s->dim);
    uint32_t *owner = s->node_of + (size_t)nd->tree * s->n;
    for (uint32_t j = 0; j < nd->size; j++) owner[idx[j]] = (uint32_t)f;
    return 0;
}

static int side_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    enum { T = GHNSW_TILE };
    const float *planes[T];
    float dots[T];
    size_t f_of[T], at[T]; /* the planes' nodes and bf_left positions */
    for (size_t i = blk * ROW_BLOCK; i < end; i++)
        for (size_t t = 0, m = 0; t < s->p->n_trees; t++) { /* the row against T trees' planes at once */
            uint32_t f = s->node_of[t * s->n + i];
            if (f != GHNSW_INVALID) { f_of[m] = f; at[m] = t * s->n + i; planes[m++] = s->planes + f * s->dim; }
            if (m == T || (m && t + 1 == s->p->n_trees)) {
                for (size_t c = m; c < T; c++) planes[c] = planes[m - 1];
                s->row(row_of(s, (uint32_t)i), planes, s->dim, dots);
                for (size_t c = 0; c < m; c++) s->bf_left[at[c]] = dots[c] > s->offsets[f_of[c]];
                m = 0;
            }
        }
    return 0;
}

static int part_task(void *ctx, size_t f, int worker) {
    nnd_t *s = ctx;
    const tnode_t *nd = &s->front[f];
    uint32_t *idx = s->perm + (size_t)nd->tree * s->n + nd->start;
    uint8_t *left = s->side + (size_t)worker * s->n; /* this node's flags, in idx order */
    const uint8_t *side = s->bf_left + (size_t)nd->tree * s->n;
    for (uint32_t j = 0; j < nd->size; j++) left[j] = side[idx[j]];
    uint32_t lo = (uint32_t)partition(idx, left, nd->size, nd->key);
    s->kids[2 * f] = (tnode_t){nd->tree, nd->start, lo, mix64(2 * nd->key)};
    s->kids[2 * f + 1] = (tnode_t){nd->tree, nd->start + lo, nd->size - lo, mix64(2 * nd->key + 1)};
    return 0;
}

static int local_task(void *ctx, size_t f, int worker) {
    nnd_t *s = ctx;
    const tnode_t *nd = &s->local[f];
    split_node(s, s->perm + (size_t)nd->tree * s->n + nd->start, nd->size, nd->key, worker);
    return 0;
}

static int grow(void **buf, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *b = realloc(*buf, c * elem);
    if (!b) return -1;
    *buf = b; *cap = c;
    return 0;
}

/* Builds the forest: every tree's rows end in leaf order in perm [n_trees, n], leaves joined. */
static ghnsw_status_t build_forest(nnd_t *s, int workers, ghnsw_err_t *err) {
    size_t T = s->p->n_trees, n = s->n, nf = 0, nl = 0, cap_f = 0, cap_k = 0, cap_l = 0, cap_p = 0;
    ghnsw_status_t st = GHNSW_OK;
    for (size_t t = 0; t < T; t++)
        for (size_t i = 0; i < n; i++) s->perm[t * n + i] = (uint32_t)i;
    if (grow((void **)&s->front, &cap_f, T, sizeof *s->front)) goto oom;
    for (size_t t = 0; t < T; t++) {
        tnode_t root = {(uint32_t)t, 0, (uint32_t)n, hash3(s->p->seed, t, 0x7ee)};
        if (n > s->local_rows) s->front[nf++] = root;
        else {
            if (grow((void **)&s->local, &cap_l, nl + 1, sizeof *s->local)) goto oom;
            s->local[nl++] = root;
        }
    }
    while (nf) {
        if (grow((void **)&s->planes, &cap_p, nf * s->dim, sizeof *s->planes) ||
            grow((void **)&s->offsets, &cap_k, nf, sizeof *s->offsets)) goto oom;
        memset(s->node_of, 0xFF, T * n * sizeof *s->node_of);
        ghnsw_parallel_for(nf, workers, plane_task, s);
        ghnsw_parallel_for((n + ROW_BLOCK - 1) / ROW_BLOCK, workers, side_task, s);
        size_t cap_kids = 0;
        tnode_t *kids = NULL;
        if (grow((void **)&kids, &cap_kids, 2 * nf, sizeof *kids)) goto oom;
        s->kids = kids;
        ghnsw_parallel_for(nf, workers, part_task, s);
        size_t next = 0;
        if (grow((void **)&s->front, &cap_f, 2 * nf, sizeof *s->front)) { free(kids); goto oom; }
        for (size_t c = 0; c < 2 * nf; c++) {
            if (kids[c].size > s->local_rows) { s->front[next++] = kids[c]; continue; }
            if (grow((void **)&s->local, &cap_l, nl + 1, sizeof *s->local)) { free(kids); goto oom; }
            s->local[nl++] = kids[c];
        }
        free(kids);
        s->kids = NULL;
        nf = next;
    }
    ghnsw_parallel_for(nl, workers, local_task, s);
    return st;
oom:
    return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory for the random-projection forest of %zu rows", n);
}

/* Rows the trees left short of k neighbours get random ones (hashed from the seed and the row). */
static int fill_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    enum { T = GHNSW_TILE };
    const void *pa[T], *pb[T];
    float out[T * T];
    uint32_t js[T];
    for (size_t i = blk * ROW_BLOCK; i < end; i++) {
        for (int r = 0; r < T; r++) pa[r] = jrow_of(s, (uint32_t)i);
        for (uint64_t t = 0; ids_of(s, i)[0] == GHNSW_INVALID;) {
            int m = 0; /* the next T picks other than i: hashed first, then consecutive rows (which
                        * end the loop since k < n) */
            for (; m < T; t++) {
                uint32_t j = t < 4 * (uint64_t)s->k ? (uint32_t)(hash3(s->p->seed, i, t) % s->n)
                                                     : (uint32_t)((i + 1 + t) % s->n);
                if (j != i) { js[m] = j; pb[m++] = jrow_of(s, j); }
            }
            s->tile(pa, pb, s->jn, out);
            for (int c = 0; c < T; c++) heap_push(s, (uint32_t)i, pair_dist(s, (uint32_t)i, js[c], out[c]), js[c], FLAG_NEW);
            s->cnt[worker].evals += T;
        }
    }
    return 0;
}

/* ---- one round of NN-descent ------------------------------------------------------------------ */

static inline uint32_t edge_priority(const nnd_t *s, uint32_t a, uint32_t b) {
    return (uint32_t)hash3(s->round_seed, a < b ? a : b, a < b ? b : a);
}

/* Each heap entry (i -> j) is offered, with one priority, to the candidate lists of i and j: new
 * entries to the new lists, then (a second pass) old entries to the old lists of the rows that have
 * new candidates (the old list of a row without any is never joined).  Task `stripe` reads every
 * entry but writes only the lists of its own rows [lo, hi) (whole row blocks, so no two stripes
 * share a cache line of the lists): no locks, and the reads are sequential. */
static void sample_pass(nnd_t *s, size_t stripe, int list) {
    const uint32_t *has_new = s->cand_n; /* [n], complete when the old pass runs */
    size_t blocks = (s->n + ROW_BLOCK - 1) / ROW_BLOCK;
    size_t lo = blocks * stripe / s->stripes * ROW_BLOCK, hi = blocks * (stripe + 1) / s->stripes * ROW_BLOCK;
    for (size_t i = 0; i < s->n; i++) {
        int mine = i >= lo && i < hi && (list == NEW_LIST || has_new[i]);
        const uint32_t *ids = ids_of(s, i);
        const uint8_t *fl = flag_of(s, i);
        for (size_t e = 0; e < s->k; e++) {
            uint32_t j = ids[e];
            if (j == GHNSW_INVALID || (fl[e] == FLAG_OLD) != (list == OLD_LIST)) continue;
            int theirs = j >= lo && j < hi && (list == NEW_LIST || has_new[j]);
            if (!mine && !theirs) continue;
            uint64_t pr = (uint64_t)edge_priority(s, (uint32_t)i, j) << 32;
            if (mine) cand_push(s, list, (uint32_t)i, pr | j);
            if (theirs) cand_push(s, list, j, pr | i);
        }
    }
}

static int sample_new_task(void *ctx, size_t stripe, int worker) { sample_pass(ctx, stripe, NEW_LIST); return 0; }
static int sample_old_task(void *ctx, size_t stripe, int worker) { sample_pass(ctx, stripe, OLD_LIST); return 0; }

/* New entries sampled into row i's new list take part in this round's join: they become old. */
static int age_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    for (size_t i = blk * ROW_BLOCK; i < end; i++) {
        const uint64_t *nc = s->cand + i * s->mc;
        uint32_t m = s->cand_n[i];
        const uint32_t *ids = ids_of(s, i);
        uint8_t *fl = flag_of(s, i);
        for (size_t e = 0; e < s->k; e++) {
            if (fl[e] != FLAG_NEW) continue;
            uint32_t j = ids[e];
            for (uint32_t c = 0; c < m; c++)
                if (cand_id(nc[c]) == j) { fl[e] = FLAG_OLD; break; }
        }
    }
    return 0;
}

/* Local join around row i: every new-new and new-old pair of its candidates meets.  Rows go in
 * leaf order, so consecutive rows share candidates and their vectors are still in cache. */
static int join_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    uint64_t evals = 0;
    uint32_t *list = s->cands + (size_t)worker * 2 * s->mc;
    for (size_t pos = blk * ROW_BLOCK; pos < end; pos++) {
        size_t i = s->order[pos];
        uint32_t nn = s->cand_n[i], m = nn + s->cand_n[s->n + i];
        if (!nn) continue;
        const uint64_t *nc = s->cand + i * s->mc, *oc = s->cand + (s->n + i) * s->mc;
        for (uint32_t c = 0; c < m; c++) list[c] = cand_id(c < nn ? nc[c] : oc[c - nn]);
        evals += join_list(s, list, nn, m, FLAG_FRESH);
    }
    s->cnt[worker].evals += evals;
    return 0;
}

/* Entries that entered in this round's join (and stayed) are counted and become plain new. */
static int settle_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    uint64_t fresh = 0;
    for (size_t i = blk * ROW_BLOCK; i < end; i++) {
        uint8_t *fl = flag_of(s, i);
        for (size_t e = 0; e < s->k; e++)
            if (fl[e] == FLAG_FRESH) { fl[e] = FLAG_NEW; fresh++; }
    }
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
        s->norm[i] = (float)(1.0 / (sqrt(sq) + 1e-30));
    }
    return 0;
}

/* ---- the compressed copy and the final re-scoring --------------------------------------------- */

#define I8_BLOCK 32  /* int8 copies: codes padded to this (the widest tile step) */
#define F16_BLOCK 16 /* float16 copies: halves padded to this */

static inline float unit_of(const nnd_t *s, size_t i) { return s->space == GHNSW_COSINE ? s->norm[i] : 1.0f; }

/* int8: each worker's per-dimension minimum and maximum ([workers, 2, dim] in s->range), and whether
 * every value it saw is an integer (s->fraction[worker]: 0 if so) */
static int range_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    float *lo = s->range + (size_t)worker * 2 * s->dim, *hi = lo + s->dim;
    const float magic = 12582912.0f; /* 1.5 * 2^23: the adder rounds |v| < 2^22 to an integer */
    int fraction = 0;
    for (size_t i = blk * ROW_BLOCK; i < end; i++) {
        const float *x = row_of(s, (uint32_t)i);
        float u = unit_of(s, i);
        for (size_t j = 0; j < s->dim; j++) {
            float v = x[j] * u;
            lo[j] = v < lo[j] ? v : lo[j];
            hi[j] = v > hi[j] ? v : hi[j];
            fraction |= (v + magic) - magic != v;
        }
    }
    s->fraction[worker * 64] |= (uint8_t)fraction;   /* a cache line per worker */
    return 0;
}

static int copy_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    float *v = s->plane + (size_t)worker * s->dim; /* the row scaled (the hyperplane scratch: free now) */
    for (size_t i = blk * ROW_BLOCK; i < end; i++) {
        const float *x = row_of(s, (uint32_t)i);
        float u = unit_of(s, i);
        for (size_t j = 0; j < s->dim; j++) v[j] = x[j] * u;
        uint8_t *row = s->copy + i * s->jbytes;
        memset(row, 0, s->jbytes);
        if (s->storage == GHNSW_F16) {
            for (size_t j = 0; j < s->dim; j++)
                if (!(fabsf(v[j]) < GHNSW_F16_LIMIT)) __atomic_store_n(&s->bad_row, i + 1, __ATOMIC_RELAXED);
            ghnsw_floats_to_halves(v, (uint16_t *)row, s->dim);
            continue;
        }
        int8_t *c = (int8_t *)row;
        const float *m = s->i8_offset;
        float inv = s->i8_scale > 0 ? 1.0f / s->i8_scale : 0.0f, magic = 12582912.0f; /* 1.5 * 2^23 */
        for (size_t j = 0; j < s->dim; j++) { /* clamped first, then rounded to nearest even by the adder */
            float t = (v[j] - m[j]) * inv;
            t = t > 127.0f ? 127.0f : t < -128.0f ? -128.0f : t;
            c[j] = (int8_t)((t + magic) - magic);
        }
        int32_t terms[2] = {0, 0}; /* sum(c), |c|^2: GHNSW_I8_ROW_TERMS, behind the codes */
        for (size_t j = 0; j < s->dim; j++) { terms[0] += c[j]; terms[1] += (int32_t)c[j] * c[j]; }
        memcpy(row + s->jn, terms, sizeof terms);
        if (s->jterm) {
            double r = 0;
            for (size_t j = 0; j < s->dim; j++) r += (double)m[j] * c[j];
            s->jterm[i] = (float)r;
        }
    }
    return 0;
}

/* The compressed copy of every row (its quantiser first, for int8). */
static ghnsw_status_t make_copy(nnd_t *s, int workers, ghnsw_err_t *err) {
    size_t blocks = (s->n + ROW_BLOCK - 1) / ROW_BLOCK, dim = s->dim;
    if (s->storage == GHNSW_F16) {
        s->jn = (dim + F16_BLOCK - 1) / F16_BLOCK * F16_BLOCK;
        s->jbytes = s->jn * sizeof(uint16_t);
    } else {
        s->jn = (dim + I8_BLOCK - 1) / I8_BLOCK * I8_BLOCK;
        s->jbytes = s->jn + GHNSW_I8_ROW_TERMS;
        /* exact int32 sums: (a - b)^2 <= 255^2 per code (and |a b| <= 128^2) */
        if (s->jn > INT32_MAX / (255 * 255))
            return ghnsw_fail(err, GHNSW_EINVAL, "int8 joins take at most %d dimensions, got %zu",
                              INT32_MAX / (255 * 255) / I8_BLOCK * I8_BLOCK, dim);
        s->range = malloc((size_t)workers * 2 * dim * sizeof(float));
        s->fraction = calloc((size_t)workers, 64);
        s->i8_offset = malloc(dim * sizeof(float));
        s->jterm = s->space == GHNSW_L2 ? NULL : malloc(s->n * sizeof(float));
        if (!s->range || !s->fraction || !s->i8_offset || (s->space != GHNSW_L2 && !s->jterm))
            return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory for the int8 joins of %zu rows", s->n);
        for (size_t w = 0; w < (size_t)workers; w++)
            for (size_t j = 0; j < dim; j++) {
                s->range[w * 2 * dim + j] = INFINITY;
                s->range[w * 2 * dim + dim + j] = -INFINITY;
            }
        ghnsw_parallel_for(blocks, workers, range_task, s);
        float width = 0;
        for (size_t j = 0; j < dim; j++) { /* every worker's into worker 0's */
            for (size_t w = 1; w < (size_t)workers; w++) {
                float lo = s->range[w * 2 * dim + j], hi = s->range[w * 2 * dim + dim + j];
                s->range[j] = lo < s->range[j] ? lo : s->range[j];
                s->range[dim + j] = hi > s->range[dim + j] ? hi : s->range[dim + j];
            }
            width = s->range[dim + j] - s->range[j] > width ? s->range[dim + j] - s->range[j] : width;
        }
        if (!isfinite(width))
            return ghnsw_fail(err, GHNSW_EINVAL, "int8 joins: the data's range is beyond float32's");
        int integers = 1;
        for (int w = 0; w < workers; w++) integers &= !s->fraction[(size_t)w * 64];
        /* integers spanning <= 256 values (pixels, SIFT) are their own codes, copied exactly */
        s->i8_scale = integers && width <= 255.0f ? 1.0f : width / 255.0f;
        /* l2 over an exact copy: the joins' distances are the float32 ones, nothing to re-score */
        s->exact_copy = integers && width <= 255.0f && s->space == GHNSW_L2;
        double m2 = 0;
        for (size_t j = 0; j < dim; j++) {
            s->i8_offset[j] = s->range[j] + 128.0f * s->i8_scale;
            m2 += (double)s->i8_offset[j] * s->i8_offset[j];
        }
        s->i8_m2 = (float)m2;
    }
    s->copy = malloc(s->n * s->jbytes);
    if (!s->copy) return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory for the compressed copy of %zu rows", s->n);
    ghnsw_parallel_for(blocks, workers, copy_task, s);
    if (s->bad_row)
        return ghnsw_fail(err, GHNSW_EINVAL, "row %zu holds a value beyond float16's range (|x| <= 65504): use "
                          "storage='float32' or 'int8'", s->bad_row - 1);
    s->jrows = s->copy;
    return GHNSW_OK;
}

/* Each row's list re-scored on the float32 rows (rows in leaf order: neighbours' rows are shared). */
static int rescore_task(void *ctx, size_t blk, int worker) {
    nnd_t *s = ctx;
    size_t end = (blk + 1) * ROW_BLOCK < s->n ? (blk + 1) * ROW_BLOCK : s->n;
    enum { T = GHNSW_TILE };
    const float *rows[T];
    float out[T];
    for (size_t pos = blk * ROW_BLOCK; pos < end; pos++) {
        uint32_t i = s->order[pos];
        uint32_t *ids = ids_of(s, i);
        float *d = d_of(s, i);
        for (uint32_t e0 = 0; e0 < s->k; e0 += T) {
            for (uint32_t c = 0; c < T; c++) {
                uint32_t j = ids[e0 + c < s->k ? e0 + c : s->k - 1];
                rows[c] = row_of(s, j == GHNSW_INVALID ? i : j);
            }
            s->rescore(row_of(s, i), rows, s->dim, out);
            for (uint32_t c = 0; c < T && e0 + c < s->k; c++)
                if (ids[e0 + c] != GHNSW_INVALID) d[e0 + c] = float_dist(s, i, ids[e0 + c], out[c]);
        }
    }
    s->cnt[worker].evals += (uint64_t)(end - blk * ROW_BLOCK) * s->k;
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
    if (p->storage < 0 || p->storage >= GHNSW_N_STORAGES) return ghnsw_fail(err, GHNSW_EINVAL, "unknown storage %d", p->storage);
    int workers = p->num_threads > 0 ? p->num_threads : ghnsw_default_threads();
    size_t blocks = (n + ROW_BLOCK - 1) / ROW_BLOCK;
    nnd_t s = {0};
    s.data = data; s.n = n; s.dim = dim; s.space = space; s.p = p;
    s.storage = p->storage;
    s.jrows = (const uint8_t *)data; s.jbytes = dim * sizeof(float); s.jn = dim; /* a copy replaces them */
    s.tile = ghnsw_pick_tile(space, s.storage);
    s.row = ghnsw_pick_row(GHNSW_IP);
    s.rescore = ghnsw_pick_row(space == GHNSW_L2 ? GHNSW_L2 : GHNSW_IP);
    s.k = p->k; s.mc = p->max_candidates; s.stripes = (size_t)workers;
    size_t nk = n * s.k, nmc = 2 * n * s.mc;
    s.heap_bytes = (8 + 9 * (size_t)s.k + 63) / 64 * 64;
    s.heaps = aligned_alloc(64, n * s.heap_bytes);
    s.cand = malloc(nmc * sizeof *s.cand);
    s.cand_n = malloc(2 * n * sizeof *s.cand_n);
    size_t tn = (size_t)p->n_trees * n;
    s.perm = malloc(tn * sizeof *s.perm);
    s.node_of = malloc(tn * sizeof *s.node_of);
    s.bf_left = malloc(tn);
    s.side = malloc((size_t)workers * n);
    s.local_rows = LOCAL_BYTES / (dim * sizeof(float));
    if (s.local_rows < p->leaf_size) s.local_rows = p->leaf_size;
    s.order = malloc(n * sizeof *s.order);
    s.cands = malloc((size_t)workers * 2 * s.mc * sizeof *s.cands);
    s.plane = malloc((size_t)workers * dim * sizeof *s.plane);
    s.cnt = calloc((size_t)workers, sizeof *s.cnt);
    s.norm = space == GHNSW_COSINE ? malloc(n * sizeof *s.norm) : NULL;
    ghnsw_status_t st = GHNSW_OK;
    if (!s.heaps || !s.cand || !s.cand_n ||
        (tn && (!s.perm || !s.node_of || !s.bf_left)) || !s.side || !s.order || !s.cands || !s.plane || !s.cnt || (space == GHNSW_COSINE && !s.norm)) {
        st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory for the NN-descent state of %zu rows", n);
        goto out;
    }
    memset(s.heaps, 0, n * s.heap_bytes); /* unlocked, flags 0 */
    for (size_t i = 0; i < n; i++) {
        *thr_of(&s, i) = INFINITY;
        for (size_t e = 0; e < s.k; e++) { ids_of(&s, i)[e] = GHNSW_INVALID; d_of(&s, i)[e] = INFINITY; }
        s.order[i] = (uint32_t)i;
    }
    if (s.norm) ghnsw_parallel_for(blocks, workers, norm_task, &s);
    if (s.storage != GHNSW_F32 && (st = make_copy(&s, workers, err)) != GHNSW_OK) goto out;

    if (tn) {
        if ((st = build_forest(&s, workers, err)) != GHNSW_OK) goto out;
        memcpy(s.order, s.perm, n * sizeof *s.order); /* the first tree's leaf order */
    }
    ghnsw_parallel_for(blocks, workers, fill_task, &s);

    uint64_t stop_below = (uint64_t)(p->delta * (double)nk), fresh = 0;
    uint32_t round = 0;
    while (round < p->n_iters) {
        s.round_seed = hash3(p->seed, round, 0xd05);
        memset(s.cand_n, 0, 2 * n * sizeof *s.cand_n);
        ghnsw_parallel_for(s.stripes, workers, sample_new_task, &s);
        ghnsw_parallel_for(s.stripes, workers, sample_old_task, &s);
        ghnsw_parallel_for(blocks, workers, age_task, &s);
        ghnsw_parallel_for(blocks, workers, join_task, &s);
        uint64_t before_fresh = sum_field(&s, workers, 1);
        ghnsw_parallel_for(blocks, workers, settle_task, &s);
        fresh = sum_field(&s, workers, 1) - before_fresh;
        round++;
        if (p->on_round && p->on_round(p->on_round_ctx, round, fresh)) { st = GHNSW_ECALLBACK; goto out; }
        if (fresh <= stop_below) break;
    }
    if (s.storage != GHNSW_F32 && !s.exact_copy) ghnsw_parallel_for(blocks, workers, rescore_task, &s);

    for (size_t i = 0; i < n; i++) { /* rows sorted by (distance, id): insertion sort of k entries */
        int64_t *oi = out_ids + i * s.k;
        float *od = out_dists + i * s.k;
        for (size_t e = 0; e < s.k; e++) {
            float dv = d_of(&s, i)[e];
            uint32_t id = ids_of(&s, i)[e];
            size_t j = e;
            while (j > 0 && before(dv, id, od[j - 1], (uint32_t)oi[j - 1])) { od[j] = od[j - 1]; oi[j] = oi[j - 1]; j--; }
            od[j] = dv; oi[j] = id;
        }
    }
    if (info) { info->rounds = round; info->dist_evals = sum_field(&s, workers, 0); info->last_updates = fresh; }
out:
    free(s.heaps);
    free(s.cand); free(s.cand_n); free(s.perm); free(s.order); free(s.cands); free(s.plane); free(s.side); free(s.node_of); free(s.bf_left); free(s.front); free(s.local); free(s.planes); free(s.offsets); free(s.cnt); free(s.norm);
    free(s.copy); free(s.jterm); free(s.i8_offset); free(s.range); free(s.fraction);
    return st;
}
