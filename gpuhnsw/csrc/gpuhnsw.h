/* gpuhnsw C core: internal API.  Only module.c includes Python.h.
 *
 * Data layout (shared with the GPU device mirror, which copies rows, never gathers fields):
 *
 *   vectors  [capacity, row_bytes] uint8   one stored row per slot, by `storage` (cosine rows are
 *                                           normalised before they are stored):
 *     float32: float[dim_pad]               dim_pad = ceil(dim/4)*4, pad zero (16-byte rows)
 *     float16: IEEE half[dim_pad8]          dim_pad8 = ceil(dim/8)*8, pad zero (16-byte rows)
 *     int8:    int8 code[code_pad], float r    code_pad = ceil(dim/16)*16, pad zero; row_bytes =
 *                                           code_pad + 4 (4-byte aligned: the SIMD loads are
 *                                           unaligned); r = the row's term of the distances:
 *                                           |scale * code|^2 (l2), offset . (scale * code) (ip)
 *   exact    [capacity, dim_pad] float32   rerank only: the rows as given (normalised for cosine)
 *   quantiser offset[dim], scale[dim] float32   int8: x ~ offset + scale * code, code in [-128, 127]
 *   links0   [capacity, M0]      uint32    M0 = 2M; unused entries GHNSW_INVALID
 *   degree0  [capacity]          uint32    live entries of links0[i]
 *   labels   [capacity]          uint64    slot -> label
 *   levels   [capacity]          uint8     top level of the slot
 *   upper    [capacity] -> uint32[levels[i] * (1 + M)]   level l (1-based) at (l-1)*(1+M): [count, M ids]
 *   deleted  [ceil(capacity/32)] uint32 bitset
 *   dirty    [ceil(capacity/32)] uint32 bitset: slots whose row changed since the last drain
 *   dirty_kind [capacity]       uint8     what changed in each of them (GHNSW_DIRTY_* bits)
 *
 * Two id spaces, never mixed: a label is the user's uint64 id, a slot the internal uint32 row.
 */
#ifndef GHNSW_H
#define GHNSW_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define GHNSW_INVALID 0xFFFFFFFFu    /* no slot: unused link entries, padding */
#define GHNSW_NO_LABEL UINT64_MAX     /* no label: padding of results */
#define GHNSW_MAX_CAPACITY 0x7FFFFFFFu /* slots stay below 2^31: the top bit tags beam entries */
#define GHNSW_MAX_LEVEL 255
#define GHNSW_MAX_M 10000            /* hnswlib's init_index cap: no real file has more */
#define GHNSW_MAX_DIM (1u << 24)
#define GHNSW_MAX_EF_CONSTRUCTION (1u << 24)
#define GHNSW_MAX_GRAPH_DEGREE 1024u   /* search graph rows (ghnsw_build_search_graph) */

typedef enum { GHNSW_L2 = 0, GHNSW_IP = 1, GHNSW_COSINE = 2 } ghnsw_space_t;

/* Status codes; module.c maps them to Python exceptions, with the message in ghnsw_err. */
typedef enum {
    GHNSW_OK = 0,
    GHNSW_ENOMEM,   /* MemoryError */
    GHNSW_EFULL,    /* RuntimeError: capacity */
    GHNSW_ENOTFOUND,/* RuntimeError: label not found */
    GHNSW_EINVAL,   /* ValueError */
    GHNSW_ESTATE,   /* RuntimeError: operation not allowed in this state */
    GHNSW_ECORRUPT, /* integrity / import failure */
    GHNSW_ECALLBACK /* a Python callback raised; the exception is already set */
} ghnsw_status_t;

#define GHNSW_ERRLEN 256
typedef struct { char msg[GHNSW_ERRLEN]; } ghnsw_err_t;
ghnsw_status_t ghnsw_fail(ghnsw_err_t *err, ghnsw_status_t st, const char *fmt, ...);

/* Output buffers of the readers: called while the engine holds its locks, so the size is exact;
 * returns NULL on failure (the reader then fails with GHNSW_ENOMEM). */
typedef void *(*ghnsw_alloc_fn)(void *ctx, size_t bytes);

/* How rows are stored (`vectors` in the layout above). */
typedef enum { GHNSW_F32 = 0, GHNSW_F16 = 1, GHNSW_I8 = 2 } ghnsw_storage_t;
#define GHNSW_N_STORAGES 3

/* Distance of a prepared query (ghnsw_prepare) to a stored row of `n` elements (the index's row_n:
 * dim_pad, dim_pad8 or code_pad).  A float32 row is its own prepared query, so the float32 kernels
 * also give row-to-row distances (the exact re-rank, NN-descent). */
typedef float (*ghnsw_dist_fn)(const void *q, const void *row, size_t n);

/* Distance of two stored rows of `n` elements; w: the index's pair weights (int8: scale^2 [n], then
 * |offset|^2; NULL for the other storages). */
typedef float (*ghnsw_pair_fn)(const void *a, const void *b, size_t n, const float *w);

/* An int8 prepared query: this header, then int16 u[code_pad] (zero past dim).  The distance to a row
 * of codes c and per-row term sq is c0 + sq + f * (u . c) (l2) or c0 + f * (u . c) (ip, cosine), the
 * dot product summed exactly in int32 (storage.c states the math). */
typedef struct { float c0, f, pad[2]; } ghnsw_i8q_t;

/* Pair sums of a GHNSW_TILE x GHNSW_TILE block of row pairs (pad a short block by repeating a row):
 * out[r * GHNSW_TILE + c] = |a_r - b_c|^2 (l2) or a_r . b_c (ip, cosine), over n elements of rows
 * of the tile's storage: float32 rows unpadded (n = dim, the tail read with masks), float16 rows
 * padded to 16 halves and int8 rows to 32 codes (n = the padded width; int8 sums are exact integers;
 * an int8 row is followed by GHNSW_I8_ROW_TERMS: int32 sum(c), int32 |c|^2, which the VNNI tiles read).
 * l2 is summed from the differences, not from |a|^2 + |b|^2 - 2 a.b: the latter cancels
 * catastrophically for rows far from the origin.  Every entry is computed by the same operation
 * sequence wherever it sits in the tile, so (a, b) and (b, a) give the same bits. */
#define GHNSW_TILE 4
#define GHNSW_I8_ROW_TERMS 8
typedef void (*ghnsw_tile_fn)(const void *const *a /* [GHNSW_TILE] */, const void *const *b /* [GHNSW_TILE] */,
                              size_t n, float *out /* [GHNSW_TILE, GHNSW_TILE] */);
/* One float32 row against GHNSW_TILE others (unpadded, dim floats): out[c] = x . b_c (ip) or
 * |x - b_c|^2 (l2), with independent sums (not one latency-bound chain) and one load of x per step for
 * all of them (NN-descent's tree splits and its final re-scoring). */
typedef void (*ghnsw_row_fn)(const float *x, const float *const *b /* [GHNSW_TILE] */, size_t dim,
                             float *out /* [GHNSW_TILE] */);

/* distance.c */
ghnsw_dist_fn ghnsw_pick_distance(int space, int storage);
ghnsw_pair_fn ghnsw_pick_pair(int space, int storage);
ghnsw_tile_fn ghnsw_pick_tile(int space, int storage);
ghnsw_row_fn ghnsw_pick_row(int space);
const char *ghnsw_simd_name(void);
void ghnsw_normalize(float *v, size_t dim);

/* Label -> slot map: open addressing, linear probing, tombstones (relabel on replace_deleted). */
typedef struct {
    uint64_t *keys;
    uint32_t *vals; /* GHNSW_INVALID empty, GHNSW_TOMB tombstone */
    size_t mask;    /* table size - 1 (power of two) */
    size_t used;    /* live + tombstones */
    size_t live;
} ghnsw_map_t;
#define GHNSW_TOMB 0xFFFFFFFEu

/* Visited table: a generation tag per slot, so a reset is O(1) except on wrap. */
typedef struct ghnsw_visited {
    uint16_t *tags;
    uint16_t gen;
    size_t n;
    struct ghnsw_visited *next;
} ghnsw_visited_t;

typedef struct {
    ghnsw_visited_t *free_list;
    size_t n; /* capacity the tables are sized for */
    pthread_mutex_t lock;
} ghnsw_visited_pool_t;

/* A fixed-size beam entry; the top bit of `id` tags an expanded entry. */
typedef struct { float d; uint32_t id; } ghnsw_cand_t;
/* qsort order of candidates: (distance, id) ascending */
static inline int ghnsw_cand_cmp(const void *a, const void *b) {
    const ghnsw_cand_t *x = a, *y = b;
    if (x->d < y->d) return -1;
    if (x->d > y->d) return 1;
    return (x->id > y->id) - (x->id < y->id);
}
#define GHNSW_EXPANDED 0x80000000u

typedef struct ghnsw_index {
    int space;
    uint32_t dim, dim_pad, M, M0, ef_construction;
    uint64_t seed;
    double mult;
    int allow_replace_deleted;
    int storage;           /* ghnsw_storage_t */
    int rerank;            /* keep float32 rows in `exact` and re-score the final candidates with them */
    size_t row_bytes;      /* a stored row */
    size_t row_n;          /* elements the distance kernels read per row: dim_pad, dim_pad8 or code_pad */
    size_t query_bytes;    /* a prepared query (ghnsw_prepare) */
    ghnsw_dist_fn dist;    /* prepared query -> stored row */
    ghnsw_dist_fn exact_dist; /* float32 row -> float32 row (the re-rank) */
    ghnsw_pair_fn pair;    /* stored row -> stored row */
    /* int8 quantiser, [dim] each, and the pair weights [row_n + 1] (scale^2, zero padded, then
     * |offset|^2): one block, NULL until trained (on the first add, or ghnsw_train) */
    float *q_offset, *q_scale, *pair_w;
    uint64_t clipped_rows, clipped_values; /* int8: rows stored with values outside the ranges, and those values */

    uint32_t capacity;
    uint32_t count;     /* slots in use (deleted included) */
    uint32_t n_deleted;
    uint64_t insert_seq; /* rows ever added: the level generator's counter */
    uint64_t relabels;   /* adds that moved a slot to another label (replace_deleted): label bitsets
                          * made before a change of it may name a slot by its old label */

    uint8_t *vectors;     /* [capacity, row_bytes] */
    float *exact;         /* [capacity, dim_pad] with rerank, else NULL */
    uint32_t *links0, *degree0;
    /* vectors, exact and links0 may be mapped from an index file (ghnsw_map_rows, MAP_PRIVATE): a
     * non-zero *_map_len is that mapping's length (munmap, not free), map_rows the slots it has room for. */
    size_t vectors_map_len, exact_map_len, links0_map_len;
    uint32_t map_rows;
    uint64_t *labels;
    uint8_t *levels;
    uint32_t **upper;
    uint32_t *deleted, *dirty;
    uint8_t *dirty_kind;
    /* Drains of the dirty log so far, each numbered under drain_lock: a consumer (a GPU mirror) whose
     * drain is not the one after its previous drain missed what another consumer took (gpuhnsw/device/mirror.py) */
    uint64_t drains;
    pthread_mutex_t drain_lock;
    /* Set by every ghnsw_mark_dirty, cleared by a drain before it scans: ghnsw_sync_pending's O(1)
     * answer (instead of a scan of the dirty bitset) */
    uint32_t dirty_any;
    uint8_t *slot_locks;

    ghnsw_map_t map;
    pthread_mutex_t map_lock;   /* the map's table */
    pthread_mutex_t ep_lock;    /* entry point, max level */
    pthread_mutex_t mut_lock;   /* serialises mutating calls (add, delete, resize) */
    pthread_rwlock_t resize_lock; /* shared: anything reading arrays; exclusive: resize, relabel */
    pthread_rwlock_t relabel_lock; /* shared: a pinned label-filter query (ghnsw_pin_labels), across calls;
                                    * exclusive: the label commit of a relabelling add (before resize_lock) */
    uint32_t entry_point;
    int max_level;

    ghnsw_visited_pool_t vpool;
} ghnsw_index_t;

/* index.c */
ghnsw_status_t ghnsw_create(ghnsw_index_t **out, int space, uint32_t dim, uint32_t capacity, uint32_t M,
                            uint32_t ef_construction, uint64_t seed, int allow_replace_deleted, int storage,
                            int rerank, ghnsw_err_t *err);
void ghnsw_free(ghnsw_index_t *ix);
ghnsw_status_t ghnsw_resize(ghnsw_index_t *ix, uint32_t new_capacity, ghnsw_err_t *err);
uint32_t ghnsw_map_get(const ghnsw_map_t *m, uint64_t key);
ghnsw_status_t ghnsw_map_put(ghnsw_map_t *m, uint64_t key, uint32_t val);
void ghnsw_map_del(ghnsw_map_t *m, uint64_t key);
ghnsw_status_t ghnsw_map_reserve(ghnsw_index_t *ix, size_t extra); /* room for `extra` puts; under map_lock */
uint32_t ghnsw_lookup(ghnsw_index_t *ix, uint64_t label); /* takes map_lock */
static inline uint8_t *ghnsw_vec(const ghnsw_index_t *ix, uint32_t s) {
    return ix->vectors + (size_t)s * ix->row_bytes;
}
static inline float *ghnsw_exact(const ghnsw_index_t *ix, uint32_t s) {
    return ix->exact + (size_t)s * ix->dim_pad;
}
static inline uint32_t *ghnsw_links0(const ghnsw_index_t *ix, uint32_t s) {
    return ix->links0 + (size_t)s * ix->M0;
}
/* Level l >= 1 block of slot s: [count, M ids]. */
static inline uint32_t *ghnsw_upper(const ghnsw_index_t *ix, uint32_t s, int l) {
    return ix->upper[s] + (size_t)(l - 1) * (1 + ix->M);
}
/* What changed in a dirty slot (bits of dirty_kind), so that the GPU sync ships only that: the whole
 * row, the level-0 list, the entries appended to it, the upper blocks, or the delete mark. */
enum {
    GHNSW_DIRTY_ROW = 1,     /* vector or label */
    GHNSW_DIRTY_LINKS = 2,   /* level-0 list rewritten */
    GHNSW_DIRTY_APPEND = 4,  /* level-0 list only grown at its end */
    GHNSW_DIRTY_UPPER = 8,   /* an upper-level block */
    GHNSW_DIRTY_DELETED = 16 /* the delete mark set or cleared */
};
void ghnsw_mark_dirty(ghnsw_index_t *ix, uint32_t s, int kind);
void ghnsw_note_change(ghnsw_index_t *ix);
/* A fresh index (count 0, created with capacity 0) takes `capacity` slots whose vectors, links0 and
 * (with rerank) exact rows 0..n-1 are mapped copy-on-write from `fd` at the given offsets (multiples
 * of 16; file layout = memory layout: [n, row_bytes], [n, M0] uint32, [n, dim_pad] float32); the rows
 * past n are initialised anonymous memory.  Writes touch private pages only; a resize beyond capacity
 * copies into owned memory. */
ghnsw_status_t ghnsw_map_rows(ghnsw_index_t *ix, uint32_t capacity, int fd, uint64_t vectors_off,
                              uint64_t links0_off, uint64_t exact_off, uint32_t n, ghnsw_err_t *err);

/* storage.c: rows in and out of the stored representation.  x / out are float rows of dim_pad floats,
 * zero padded (cosine: normalised by the caller). */
void ghnsw_storage_init(ghnsw_index_t *ix); /* row_bytes, row_n, query_bytes, dist, exact_dist, pair */
size_t ghnsw_row_bytes(uint32_t dim, int storage); /* a stored row's bytes */
/* int8: the quantiser from per-dimension ranges lo[dim] <= hi[dim] (finite), before any row is stored;
 * integral[dim] (or NULL): the dimension's values are integers (a span <= 255 then takes scale 1, exact
 * codes).  Takes mut_lock. */
ghnsw_status_t ghnsw_train(ghnsw_index_t *ix, const float *lo, const float *hi, const uint8_t *integral,
                           ghnsw_err_t *err);
/* The same without the lock or the count check (an add that trains, an import), and the quantiser
 * itself (offset[dim], scale[dim]: finite, scale >= 0, every decoded value finite). */
ghnsw_status_t ghnsw_quantizer_from_ranges(ghnsw_index_t *ix, const float *lo, const float *hi, const uint8_t *integral,
                                           ghnsw_err_t *err);
/* Whether v is an integer of magnitude below 2^22 (the training's integral flags). */
int ghnsw_is_small_integer(float v);
ghnsw_status_t ghnsw_set_quantizer(ghnsw_index_t *ix, const float *offset, const float *scale, ghnsw_err_t *err);
/* Copies the quantiser (offsets, then scales) into out [2, dim]; returns 0 (nothing copied) while untrained.
 * Takes mut_lock. */
int ghnsw_get_quantizer(ghnsw_index_t *ix, float *out);
/* Stores x into `row`; returns the values clipped to the int8 ranges (0 for the other storages). */
/* The user's row src [dim] as the engine's float row x [dim_pad]: padded with zeros, normalised for
 * cosine (what encode, prepare and the exact rows take). */
void ghnsw_float_row(const ghnsw_index_t *ix, const float *src, float *x);
uint32_t ghnsw_encode(const ghnsw_index_t *ix, const float *x, uint8_t *row);
void ghnsw_decode(const ghnsw_index_t *ix, const uint8_t *row, float *out);
/* The int8 per-row term of a row's codes: |scale * c|^2 (l2) or offset . (scale * c) (ip, cosine). */
float ghnsw_row_term(const ghnsw_index_t *ix, const int8_t *codes);
/* x -> prepared query q [query_bytes] */
void ghnsw_prepare(const ghnsw_index_t *ix, const float *x, void *q);
/* The distance of stored slots a and b. */
static inline float ghnsw_pair(const ghnsw_index_t *ix, uint32_t a, uint32_t b) {
    return ix->pair(ix->vectors + (size_t)a * ix->row_bytes, ix->vectors + (size_t)b * ix->row_bytes, ix->row_n,
                    ix->pair_w);
}
/* float16 conversions (IEEE binary16, round to nearest even); values of magnitude >= GHNSW_F16_LIMIT
 * round to infinity, so rows holding one are refused. */
#define GHNSW_F16_LIMIT 65520.0f
uint16_t ghnsw_float_to_half(float f);
float ghnsw_half_to_float(uint16_t h);
void ghnsw_floats_to_halves(const float *x, uint16_t *h, size_t n); /* F16C where the CPU has it */

/* visited.c */
ghnsw_visited_t *ghnsw_visited_get(ghnsw_visited_pool_t *p);
void ghnsw_visited_put(ghnsw_visited_pool_t *p, ghnsw_visited_t *v);
void ghnsw_visited_pool_clear(ghnsw_visited_pool_t *p);
void ghnsw_visited_next(ghnsw_visited_t *v);
/* Returns 1 if s was already visited in this generation, else marks it and returns 0. */
static inline int ghnsw_visit(ghnsw_visited_t *v, uint32_t s) {
    if (v->tags[s] == v->gen) return 1;
    v->tags[s] = v->gen;
    return 0;
}

/* search.c */
typedef struct {
    const uint32_t *allowed_bits; /* optional bitsets over slots: [words], or [nq, words] with per_query */
    size_t words;                 /* one bitset's length: slots past it (made before a resize) are not allowed */
    int per_query;                /* row qi of allowed_bits is query qi's */
    int (*callback)(void *ctx, uint64_t label, int *allowed); /* optional; returns 0 ok, -1 error */
    void *callback_ctx;
} ghnsw_filter_t;

/* One query batch's parameters, decided by the caller (gpuhnsw/search/params.py). */
typedef struct {
    uint32_t k;                    /* results per query */
    uint32_t beam;                 /* beam width, max(ef, k): k <= beam (a larger k is GHNSW_EINVAL) */
    int num_threads;               /* <= 0: all cores */
    const ghnsw_filter_t *filter;  /* NULL: none */
    int want_slots;                /* output slot ids instead of labels */
} ghnsw_search_params_t;

/* Copy a neighbour list without its slot lock (ids validated instead, see search.c): returns the
 * count, ids into out[M0]. */
uint32_t ghnsw_read_links(ghnsw_index_t *ix, uint32_t s, int level, uint32_t *out);
/* q: a prepared query (ghnsw_prepare) */
uint32_t ghnsw_greedy_descent(ghnsw_index_t *ix, const void *q, uint32_t ep, int from_level, int to_level,
                              float *ep_dist);
/* Level-`level` beam search of capacity ef from ep; writes up to ef sorted candidates into beam[ef],
 * returns how many.  Used by insertion (no filter) and queries at level 0. */
uint32_t ghnsw_search_layer(ghnsw_index_t *ix, ghnsw_visited_t *vis, const void *q, uint32_t ep,
                            float ep_dist, int level, uint32_t ef, ghnsw_cand_t *beam);
/* The k nearest of each of queries [nq, dim] into out_labels [nq, k] (slots with want_slots),
 * out_dists [nq, k] and out_found [nq] (results found; the rest padded GHNSW_NO_LABEL / inf). */
ghnsw_status_t ghnsw_search(ghnsw_index_t *ix, const float *queries, size_t nq, const ghnsw_search_params_t *p,
                            uint64_t *out_labels, float *out_dists, int32_t *out_found, ghnsw_err_t *err);

/* heuristic.c: keeps at most m of cand[n] (sorted ascending); returns the kept count, in place. */
uint32_t ghnsw_select_heuristic(const ghnsw_index_t *ix, ghnsw_cand_t *cand, uint32_t n, uint32_t m);

/* insert.c */
int ghnsw_level_for(uint64_t seed, uint64_t seq, double mult);
/* Precomputed level-0 candidates for GPU-assisted insertion (optional argument of ghnsw_add):
 * for row i, graph[i, :n_graph] are slots of the existing graph and batch[i, :n_batch] rows of the
 * same batch; GHNSW_INVALID pads either list. */
typedef struct {
    const uint32_t *graph; /* [n, n_graph] */
    uint32_t n_graph;
    const uint32_t *batch; /* [n, n_batch] */
    uint32_t n_batch;
} ghnsw_cands_t;
/* data float32 [n, dim].  An untrained int8 index first takes its ranges from the rows this add stores.
 * *clipped: rows of this add stored with values outside the int8 ranges (may be NULL). */
ghnsw_status_t ghnsw_add(ghnsw_index_t *ix, const float *data, const uint64_t *labels, size_t n,
                         int num_threads, int replace_deleted, const ghnsw_cands_t *cands, uint64_t *clipped,
                         ghnsw_err_t *err);
ghnsw_status_t ghnsw_mark_deleted(ghnsw_index_t *ix, uint64_t label, ghnsw_err_t *err);
ghnsw_status_t ghnsw_unmark_deleted(ghnsw_index_t *ix, uint64_t label, ghnsw_err_t *err);

/* threads.c: calls fn(ctx, i, worker) for i in [0, n) on up to num_threads threads; stops handing out
 * work once fn returns non-zero, and returns the first non-zero result. */
typedef int (*ghnsw_task_fn)(void *ctx, size_t i, int worker);
int ghnsw_parallel_for(size_t n, int num_threads, ghnsw_task_fn fn, void *ctx);
int ghnsw_default_threads(void);

/* nndescent.c: the k nearest other rows of every row of data [n, dim] (row-major, unpadded, read in
 * place), approximately, by NN-descent.  Deterministic for a seed, whatever num_threads. */
typedef struct {
    uint32_t k;              /* neighbours per row, 1 <= k < n */
    uint32_t max_candidates; /* sampled new (and old) candidates per row and round */
    uint32_t n_trees;        /* random-projection trees of the initial graph (0: random init) */
    uint32_t leaf_size;      /* tree leaves hold at most this many rows (all pairs joined) */
    uint32_t n_iters;        /* at most this many rounds */
    double delta;            /* stop once a round changes <= delta * n * k heap entries */
    uint64_t seed;
    int num_threads;         /* <= 0: all cores */
    int storage;             /* the joins' rows: the data (GHNSW_F32) or a float16 / int8 copy of it */
    /* optional, after each round: non-zero stops with GHNSW_ECALLBACK */
    int (*on_round)(void *ctx, uint32_t round, uint64_t updates);
    void *on_round_ctx;
} ghnsw_nnd_params_t;
typedef struct { uint32_t rounds; uint64_t dist_evals, last_updates; } ghnsw_nnd_info_t;
ghnsw_status_t ghnsw_nndescent(const float *data, size_t n, size_t dim, int space, const ghnsw_nnd_params_t *p,
                               int64_t *out_ids /* [n, k] */, float *out_dists /* [n, k] */, ghnsw_nnd_info_t *info,
                               ghnsw_err_t *err);

/* search_graph.c: the search graph (level 0 with its reverse edges, see the file), u32[count, degree]
 * from `alloc`, unused entries GHNSW_INVALID; degree in [1, GHNSW_MAX_GRAPH_DEGREE] (else GHNSW_EINVAL).
 * `outputs` asks for more buffers from `alloc`, read under the same lock, in this order: with
 * GHNSW_GRAPH_LABELS the slots' labels u64[count] and live flags u8[count]; with GHNSW_GRAPH_FORWARD
 * each row's forward entries u32[count] (what an update needs).  Deterministic whatever num_threads
 * (<= 0: all cores). */
enum { GHNSW_GRAPH_LABELS = 1, GHNSW_GRAPH_FORWARD = 2 };
ghnsw_status_t ghnsw_build_search_graph(ghnsw_index_t *ix, int64_t degree, int num_threads, int outputs,
                                        ghnsw_alloc_fn alloc, void *ctx, ghnsw_err_t *err);
/* Bring a built graph (rows u32[n_rows, degree], fdeg u32[n_rows], both updated in place) in step with
 * the ascending `slots` (each below the count and n_rows) whose level-0 lists changed; renew[i]: slots[i]
 * holds a replaced row or its delete mark changed (a slot whose row was replaced keeps its reverse
 * entries: the lists naming the slot name the new row).  Rows of slots
 * new to the graph must hold GHNSW_INVALID and fdeg 0.  The rows it wrote: ascending u32[] from `alloc` (see the file's top).
 * Deterministic whatever num_threads (<= 0: all cores). */
ghnsw_status_t ghnsw_update_search_graph(ghnsw_index_t *ix, uint32_t *rows, uint32_t *fdeg, int64_t degree,
                                         size_t n_rows, const uint32_t *slots, const uint8_t *renew, size_t n_slots,
                                         int num_threads, ghnsw_alloc_fn alloc, void *ctx, ghnsw_err_t *err);

/* integrity.c */
typedef struct {
    size_t n_live, n_deleted, n_edges, n_unreachable;
    int max_level;
} ghnsw_integrity_t;
ghnsw_status_t ghnsw_check_integrity(ghnsw_index_t *ix, ghnsw_integrity_t *out, ghnsw_err_t *err);

/* io.c: fill a freshly created index from flat arrays (state dict layout, docs/architecture.md);
 * vectors and links0 NULL (and exact, with rerank): those rows are already in place (ghnsw_map_rows),
 * links0 is checked there.  vectors are float32 [n, dim] for float32 storage, else the stored rows
 * [n, row_bytes]; with vectors_f32 they are float32 [n, dim] for any storage and are encoded here (an
 * untrained int8 index takes its ranges from them), and with rerank they are the exact rows too. */
typedef struct {
    uint32_t count;
    int64_t entry_point;
    int max_level;
    uint64_t insert_seq;
    const void *vectors, *links0, *degree0, *labels, *upper;
    const uint8_t *levels, *deleted;
    size_t vectors_len, links0_len, degree0_len, labels_len, levels_len, upper_len, deleted_len;
    int vectors_f32;
    const float *exact;      /* rerank: float32 [n, dim], or NULL (mapped, or vectors_f32) */
    const float *quantizer;  /* int8: float32 [2, dim] offsets then scales, or NULL (untrained) */
    size_t exact_len, quantizer_len;
    uint64_t clipped_rows, clipped_values;
} ghnsw_state_t;
ghnsw_status_t ghnsw_import(ghnsw_index_t *ix, const ghnsw_state_t *in, ghnsw_err_t *err);

/* read.c: readers and exporters.  Each takes its own locks (resize_lock shared at least), so a
 * resize, relabel or add running beside it never moves memory under it.  Outputs of a size known
 * only under the lock come from `alloc`. */
ghnsw_status_t ghnsw_find(ghnsw_index_t *ix, uint64_t label, int64_t *slot, int *deleted); /* slot -1: absent */
ghnsw_status_t ghnsw_levels_of(ghnsw_index_t *ix, const uint64_t *labels, size_t n, uint8_t *out /* [n] */,
                               ghnsw_err_t *err);
ghnsw_status_t ghnsw_neighbors(ghnsw_index_t *ix, uint64_t label, int level, uint64_t *out /* [M0] */,
                               uint32_t *n_out, ghnsw_err_t *err);
/* float32 rows of live labels: the exact rows with rerank, else the stored rows decoded */
ghnsw_status_t ghnsw_get_vectors(ghnsw_index_t *ix, const uint64_t *labels, size_t n, float *out /* [n, dim] */,
                                 ghnsw_err_t *err);
/* u64[count] labels in slot order, deleted included */
ghnsw_status_t ghnsw_labels(ghnsw_index_t *ix, ghnsw_alloc_fn alloc, void *ctx, ghnsw_err_t *err);
/* u32[ceil(capacity/32)] bitset of the slots of `labels` (unknown labels ignored) */
ghnsw_status_t ghnsw_allowed_bitset(ghnsw_index_t *ix, const uint64_t *labels, size_t n, ghnsw_alloc_fn alloc,
                                    void *ctx, ghnsw_err_t *err);
/* u32[ceil(capacity/32)] deleted bitset */
ghnsw_status_t ghnsw_deleted_bitset(ghnsw_index_t *ix, ghnsw_alloc_fn alloc, void *ctx, ghnsw_err_t *err);
/* u64[r]: (kind << 32) | slot of the slots changed since the last drain, ascending; clears them.
 * *drain: this drain's number (1, 2, ...; drains are serialised) */
ghnsw_status_t ghnsw_drain_dirty(ghnsw_index_t *ix, ghnsw_alloc_fn alloc, void *ctx, uint64_t *drain,
                                 ghnsw_err_t *err);
size_t ghnsw_count_dirty(ghnsw_index_t *ix);
/* 1 when a drain would find something, or another drain ran since the consumer's own number
 * `since` (it then re-syncs in full); 0 when the consumer's copy is up to date.  O(1), no lock. */
int ghnsw_sync_pending(ghnsw_index_t *ix, uint64_t since);
/* Hold relabels off (replace_deleted's label commits wait) until ghnsw_unpin_labels, so that label
 * bitsets made after the pin name the same slots through every search and gather that follows, over
 * several calls.  Takes no other lock.  Returns whether relabel_lock was taken: not from a filter
 * callback of a query on ix, which holds resize_lock shared and so already keeps relabels off. */
int ghnsw_pin_labels(ghnsw_index_t *ix);
void ghnsw_unpin_labels(ghnsw_index_t *ix, int taken);
size_t ghnsw_memory_bytes(ghnsw_index_t *ix);
/* rows of slots[n] into vectors [n, dim_pad], links [n, M0], degree [n], labels [n], levels [n]
 * (vectors, labels, levels may be NULL: not gathered).  vectors are float32: the stored rows decoded
 * (what a GPU mirror holds), or with `exact` the exact rows where the index keeps them. */
ghnsw_status_t ghnsw_gather_rows(ghnsw_index_t *ix, const uint32_t *slots, size_t n, float *vectors, uint32_t *links,
                                 uint32_t *degree, uint64_t *labels, uint8_t *levels, int exact, ghnsw_err_t *err);
/* out[i, j] = distance of queries[i] (float32 [nq, dim], normalised here for cosine) to slot
 * slots[i, j] ([nq, c]) as a search scores it, from the stored rows */
ghnsw_status_t ghnsw_distances(ghnsw_index_t *ix, const float *queries, size_t nq, const uint32_t *slots, size_t c,
                               float *out, ghnsw_err_t *err);
/* out[i] = distance of stored slots a[i] and b[i] as insertion scores it (ghnsw_pair) */
ghnsw_status_t ghnsw_pair_distances(ghnsw_index_t *ix, const uint32_t *a, const uint32_t *b, size_t n, float *out,
                                    ghnsw_err_t *err);
/* each slot's levels[s] * (1 + M) uint32 upper block, concatenated in the given order */
ghnsw_status_t ghnsw_gather_upper(ghnsw_index_t *ix, const uint32_t *slots, size_t n, ghnsw_alloc_fn alloc,
                                  void *ctx, ghnsw_err_t *err);
/* The state layout (docs/architecture.md): scalars here, then nine buffers from `alloc`, in this
 * order: vectors, links0, degree0, labels, levels, upper, deleted, exact (rerank: float32 [n, dim],
 * else empty), quantizer (trained int8: float32 [2, dim], else empty).  With `decoded`, vectors are
 * float32 [n, dim] whatever the storage (the exact rows with rerank, else decoded), and exact and
 * quantizer are empty (a float32 index's state).  Taken with no
 * writer running. */
typedef struct {
    uint32_t capacity, count;
    int64_t entry_point;
    int max_level;
    uint64_t insert_seq, clipped_rows, clipped_values;
} ghnsw_export_t;
#define GHNSW_EXPORT_BUFFERS 9
ghnsw_status_t ghnsw_export(ghnsw_index_t *ix, int decoded, ghnsw_export_t *out, ghnsw_alloc_fn alloc, void *ctx,
                            ghnsw_err_t *err);

#endif
