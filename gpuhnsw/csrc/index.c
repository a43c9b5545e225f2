/* Index storage: create / free / resize, rows mapped from a file, the label -> slot map, the dirty-row
 * log. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gpuhnsw.h"
#include "locks.h"

/* Page size and the start of the page holding p (the base of a mapping made by map_region). */
static size_t page_size(void) { return (size_t)sysconf(_SC_PAGESIZE); }
static void *page_of(const void *p) { return (void *)((uintptr_t)p & ~(uintptr_t)(page_size() - 1)); }

static inline uint64_t mix64(uint64_t x) { /* splitmix64 finaliser: labels are often sequential */
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static ghnsw_status_t map_init(ghnsw_map_t *m, size_t capacity) {
    size_t size = 16;
    while (size < capacity + capacity / 3 + 1) size <<= 1; /* load factor <= 0.75 */
    uint64_t *keys = malloc(size * sizeof(uint64_t));
    uint32_t *vals = malloc(size * sizeof(uint32_t));
    if (!keys || !vals) { free(keys); free(vals); return GHNSW_ENOMEM; }
    memset(vals, 0xFF, size * sizeof(uint32_t));
    m->keys = keys; m->vals = vals; m->mask = size - 1; m->used = 0; m->live = 0;
    return GHNSW_OK;
}

uint32_t ghnsw_map_get(const ghnsw_map_t *m, uint64_t key) {
    for (size_t i = mix64(key) & m->mask;; i = (i + 1) & m->mask) {
        uint32_t v = m->vals[i];
        if (v == GHNSW_INVALID) return GHNSW_INVALID;
        if (v != GHNSW_TOMB && m->keys[i] == key) return v;
    }
}

/* Caller guarantees the key is absent and the table has room (sized for capacity at resize). */
ghnsw_status_t ghnsw_map_put(ghnsw_map_t *m, uint64_t key, uint32_t val) {
    size_t i = mix64(key) & m->mask, tomb = (size_t)-1;
    for (;; i = (i + 1) & m->mask) {
        uint32_t v = m->vals[i];
        if (v == GHNSW_INVALID) break;
        if (v == GHNSW_TOMB) { if (tomb == (size_t)-1) tomb = i; continue; }
        if (m->keys[i] == key) { m->vals[i] = val; return GHNSW_OK; }
    }
    if (tomb != (size_t)-1) i = tomb; else m->used++;
    m->keys[i] = key; m->vals[i] = val; m->live++;
    return GHNSW_OK;
}

void ghnsw_map_del(ghnsw_map_t *m, uint64_t key) {
    for (size_t i = mix64(key) & m->mask;; i = (i + 1) & m->mask) {
        uint32_t v = m->vals[i];
        if (v == GHNSW_INVALID) return;
        if (v != GHNSW_TOMB && m->keys[i] == key) { m->vals[i] = GHNSW_TOMB; m->live--; return; }
    }
}

/* A new label enters the map before the count that makes its slot present is published (ghnsw_add):
 * until then it is not found. */
uint32_t ghnsw_lookup(ghnsw_index_t *ix, uint64_t label) {
    pthread_mutex_lock(&ix->map_lock);
    uint32_t s = ghnsw_map_get(&ix->map, label);
    pthread_mutex_unlock(&ix->map_lock);
    return s < __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE) ? s : GHNSW_INVALID;
}

/* Rebuild the table for a new capacity (drops tombstones). */
static ghnsw_status_t map_rebuild(ghnsw_index_t *ix, size_t capacity) {
    ghnsw_map_t fresh;
    if (map_init(&fresh, capacity) != GHNSW_OK) return GHNSW_ENOMEM;
    for (size_t i = 0; i <= ix->map.mask; i++) {
        uint32_t v = ix->map.vals[i];
        if (v != GHNSW_INVALID && v != GHNSW_TOMB) ghnsw_map_put(&fresh, ix->map.keys[i], v);
    }
    free(ix->map.keys); free(ix->map.vals);
    ix->map = fresh;
    return GHNSW_OK;
}

/* Relabelling (replace_deleted) leaves a tombstone per old label; without a rebuild they fill the
 * table until a probe for an absent key never ends.  Rebuilt here before they can, at the same size
 * (live + extra fits: the caller checked capacity). */
ghnsw_status_t ghnsw_map_reserve(ghnsw_index_t *ix, size_t extra) {
    size_t size = ix->map.mask + 1;
    if (ix->map.used + extra <= size - size / 4) return GHNSW_OK;
    return map_rebuild(ix, ix->capacity);
}

static size_t words(size_t n) { return (n + 31) / 32; }

/* Grow the rows of `*arr` (`row` bytes each) from ix->capacity to `cap` slots.  A mapped array
 * with room for `cap` stays (its rows past count are still as mapped: initialised); one without room
 * is copied into owned memory and unmapped.  Returns non-zero, leaving `*arr` valid, on failure. */
static int grow_rows(ghnsw_index_t *ix, void **arr, size_t *map_len, size_t row, uint32_t cap) {
    if (*map_len && cap <= ix->map_rows) return 0;
    void *p;
    if (*map_len) {
        p = malloc((size_t)cap * row + 1);
        if (!p) return -1;
        memcpy(p, *arr, (size_t)ix->capacity * row);
        munmap(page_of(*arr), *map_len);
        __atomic_store_n(map_len, 0, __ATOMIC_RELAXED); /* Core.mapped reads it without a lock */
    } else {
        p = realloc(*arr, (size_t)cap * row + 1);
        if (!p) return -1;
    }
    *arr = p;
    return 0;
}

/* Grow (or allocate) every per-slot array to `cap` slots; new rows are initialised. On failure the
 * arrays that were already grown stay valid (larger), nothing is lost. */
static ghnsw_status_t grow_arrays(ghnsw_index_t *ix, uint32_t cap) {
    size_t old = ix->capacity;
    int vectors_init = ix->vectors_map_len && cap <= ix->map_rows;
    int exact_init = ix->exact_map_len && cap <= ix->map_rows;
    int links0_init = ix->links0_map_len && cap <= ix->map_rows;
    void *p;
    if (grow_rows(ix, (void **)&ix->vectors, &ix->vectors_map_len, ix->row_bytes, cap) ||
        (ix->rerank && grow_rows(ix, (void **)&ix->exact, &ix->exact_map_len, ix->dim_pad * sizeof(float), cap)) ||
        grow_rows(ix, (void **)&ix->links0, &ix->links0_map_len, ix->M0 * sizeof(uint32_t), cap))
        return GHNSW_ENOMEM;
#define GROW(field, type, per) \
    p = realloc(ix->field, (size_t)cap * (per) * sizeof(type) + 1); \
    if (!p) return GHNSW_ENOMEM; \
    ix->field = p;
    GROW(degree0, uint32_t, 1)
    GROW(labels, uint64_t, 1)
    GROW(levels, uint8_t, 1)
    GROW(upper, uint32_t *, 1)
    GROW(slot_locks, uint8_t, 1)
    GROW(dirty_kind, uint8_t, 1)
#undef GROW
    p = realloc(ix->deleted, words(cap) * sizeof(uint32_t) + 4);
    if (!p) return GHNSW_ENOMEM;
    ix->deleted = p;
    p = realloc(ix->dirty, words(cap) * sizeof(uint32_t) + 4);
    if (!p) return GHNSW_ENOMEM;
    ix->dirty = p;
    if (cap > old) {
        size_t n = cap - old;
        if (!vectors_init) memset(ix->vectors + old * ix->row_bytes, 0, n * ix->row_bytes);
        if (ix->rerank && !exact_init) memset(ix->exact + old * ix->dim_pad, 0, n * ix->dim_pad * sizeof(float));
        if (!links0_init) memset(ix->links0 + old * ix->M0, 0xFF, n * ix->M0 * sizeof(uint32_t));
        memset(ix->degree0 + old, 0, n * sizeof(uint32_t));
        memset(ix->labels + old, 0, n * sizeof(uint64_t));
        memset(ix->levels + old, 0, n);
        memset(ix->upper + old, 0, n * sizeof(uint32_t *));
        memset(ix->slot_locks + old, 0, n);
        memset(ix->dirty_kind + old, 0, n);
        size_t w0 = words(old), w1 = words(cap);
        /* the partial word at the old end already has zero bits past `old` */
        memset(ix->deleted + w0, 0, (w1 - w0) * sizeof(uint32_t));
        memset(ix->dirty + w0, 0, (w1 - w0) * sizeof(uint32_t));
    }
    __atomic_store_n(&ix->capacity, cap, __ATOMIC_RELAXED); /* Core.max_elements reads it without a lock */
    return GHNSW_OK;
}

ghnsw_status_t ghnsw_create(ghnsw_index_t **out, int space, uint32_t dim, uint32_t capacity, uint32_t M,
                            uint32_t ef_construction, uint64_t seed, int allow_replace_deleted, int storage,
                            int rerank, ghnsw_err_t *err) {
    if (dim == 0) return ghnsw_fail(err, GHNSW_EINVAL, "dim must be positive");
    if (M < 2) return ghnsw_fail(err, GHNSW_EINVAL, "M must be at least 2 (got %u)", M);
    if (M > GHNSW_MAX_M) return ghnsw_fail(err, GHNSW_EINVAL, "M must be at most %u (got %u)", GHNSW_MAX_M, M);
    if (dim > GHNSW_MAX_DIM) return ghnsw_fail(err, GHNSW_EINVAL, "dim must be at most %u (got %u)", GHNSW_MAX_DIM, dim);
    if (ef_construction > GHNSW_MAX_EF_CONSTRUCTION)
        return ghnsw_fail(err, GHNSW_EINVAL, "ef_construction must be at most %u", GHNSW_MAX_EF_CONSTRUCTION);
    if (capacity > GHNSW_MAX_CAPACITY)
        return ghnsw_fail(err, GHNSW_EINVAL, "max_elements must be below 2**31");
    if (storage < 0 || storage >= GHNSW_N_STORAGES) return ghnsw_fail(err, GHNSW_EINVAL, "unknown storage %d", storage);
    ghnsw_index_t *ix = calloc(1, sizeof(*ix));
    if (!ix) return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
    ix->space = space;
    ix->dim = dim;
    ix->dim_pad = (dim + 3) & ~3u;
    ix->M = M;
    ix->M0 = 2 * M;
    ix->ef_construction = ef_construction > M ? ef_construction : M;
    ix->seed = seed;
    ix->mult = 1.0 / log((double)M);
    ix->allow_replace_deleted = allow_replace_deleted;
    ix->storage = storage;
    ix->rerank = rerank != 0;
    ghnsw_storage_init(ix);
    ix->entry_point = GHNSW_INVALID;
    ix->max_level = -1;
    pthread_mutex_init(&ix->map_lock, NULL);
    pthread_mutex_init(&ix->ep_lock, NULL);
    pthread_mutex_init(&ix->mut_lock, NULL);
    pthread_mutex_init(&ix->drain_lock, NULL);
    /* writers first, so a stream of queries cannot starve a resize or a relabel; no reader takes
     * either twice (ghnsw_read_lock, ghnsw_pin_labels) */
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&ix->resize_lock, &attr);
    pthread_rwlock_init(&ix->relabel_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    pthread_mutex_init(&ix->vpool.lock, NULL);
    if (grow_arrays(ix, capacity) != GHNSW_OK || map_init(&ix->map, capacity) != GHNSW_OK) {
        ghnsw_free(ix);
        return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory allocating an index of %u elements", capacity);
    }
    ix->vpool.n = capacity;
    *out = ix;
    return GHNSW_OK;
}

void ghnsw_free(ghnsw_index_t *ix) {
    if (!ix) return;
    if (ix->upper)
        for (uint32_t i = 0; i < ix->count; i++) free(ix->upper[i]);
    if (ix->vectors_map_len) munmap(page_of(ix->vectors), ix->vectors_map_len); else free(ix->vectors);
    if (ix->exact_map_len) munmap(page_of(ix->exact), ix->exact_map_len); else free(ix->exact);
    free(ix->q_offset); /* q_scale shares its block */
    if (ix->links0_map_len) munmap(page_of(ix->links0), ix->links0_map_len); else free(ix->links0);
    free(ix->degree0); free(ix->labels); free(ix->levels);
    free(ix->upper); free(ix->slot_locks); free(ix->deleted); free(ix->dirty);
    free(ix->dirty_kind);
    free(ix->map.keys); free(ix->map.vals);
    ghnsw_visited_pool_clear(&ix->vpool);
    pthread_mutex_destroy(&ix->map_lock);
    pthread_mutex_destroy(&ix->ep_lock);
    pthread_mutex_destroy(&ix->mut_lock);
    pthread_mutex_destroy(&ix->drain_lock);
    pthread_rwlock_destroy(&ix->resize_lock);
    pthread_rwlock_destroy(&ix->relabel_lock);
    pthread_mutex_destroy(&ix->vpool.lock);
    free(ix);
}

/* Takes mut_lock (no add runs) and resize_lock exclusively (no reader sees arrays move). */
ghnsw_status_t ghnsw_resize(ghnsw_index_t *ix, uint32_t new_capacity, ghnsw_err_t *err) {
    if (new_capacity > GHNSW_MAX_CAPACITY)
        return ghnsw_fail(err, GHNSW_EINVAL, "max_elements must be below 2**31");
    if (ghnsw_writer_lock(ix, "resize_index", err)) return GHNSW_ESTATE;
    if (new_capacity < ix->count) {
        pthread_mutex_unlock(&ix->mut_lock);
        return ghnsw_fail(err, GHNSW_ESTATE,
                          "Cannot resize, max element is less than the current number of elements");
    }
    pthread_rwlock_wrlock(&ix->resize_lock);
    ghnsw_status_t st = GHNSW_OK;
    if (new_capacity > ix->capacity) {
        st = grow_arrays(ix, new_capacity);
        if (st == GHNSW_OK) st = map_rebuild(ix, new_capacity);
    } else if (new_capacity < ix->capacity) {
        /* shrinking keeps the larger allocation (cheap, and never loses rows); only capacity drops */
        __atomic_store_n(&ix->capacity, new_capacity, __ATOMIC_RELAXED); /* read without a lock, as above */
    }
    if (st == GHNSW_OK) {
        ghnsw_visited_pool_clear(&ix->vpool);
        ix->vpool.n = ix->capacity;
    }
    pthread_rwlock_unlock(&ix->resize_lock);
    pthread_mutex_unlock(&ix->mut_lock);
    if (st != GHNSW_OK) return ghnsw_fail(err, st, "out of memory resizing to %u elements", new_capacity);
    return GHNSW_OK;
}

/* The kind first, then the bit, both releases: a drain that takes the bit (acquire) finds the kind
 * and sees the writes made before the mark.  A kind that a drain takes before its bit is set leaves
 * a bit with kind 0 for the next drain, which skips it (the earlier drain shipped those writes).
 * Then ghnsw_note_change. */
void ghnsw_mark_dirty(ghnsw_index_t *ix, uint32_t s, int kind) {
    __atomic_fetch_or(&ix->dirty_kind[s], (uint8_t)kind, __ATOMIC_RELEASE);
    __atomic_fetch_or(&ix->dirty[s >> 5], 1u << (s & 31), __ATOMIC_RELEASE);
    ghnsw_note_change(ix);
}

/* Raise the flag of ghnsw_sync_pending after a write a mirror must see (a dirty mark, an entry-point
 * switch).  Written only when it reads clear (one write per drain, not one per mark): with a fence
 * here and one in the drain between its clear and its scan (and its entry-point read before both),
 * either the drain sees the write or the flag is up again for the next sync. */
void ghnsw_note_change(ghnsw_index_t *ix) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&ix->dirty_any, __ATOMIC_RELAXED)) __atomic_store_n(&ix->dirty_any, 1, __ATOMIC_RELAXED);
}

/* `cap_bytes` of memory whose first `file_bytes` are mapped copy-on-write from fd at `off` (any
 * offset: the mapping starts at its page, the array inside it), the rest anonymous; every byte past
 * `file_bytes` is `fill`.  Returns the mapping's length (0 on failure); munmap(page_of(*out), len). */
static size_t map_region(void **out, size_t cap_bytes, int fd, uint64_t off, size_t file_bytes, int fill) {
    size_t page = page_size(), delta = (size_t)(off % page);
    size_t len = (delta + cap_bytes + page) / page * page; /* at least one page, even when empty */
    /* reserve the whole range anonymously, then place the file over its start */
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return 0;
    size_t flen = file_bytes ? (delta + file_bytes + page - 1) / page * page : 0;
    if (flen && mmap(p, flen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, (off_t)(off - delta)) == MAP_FAILED) {
        munmap(p, len);
        return 0;
    }
    char *arr = p + delta, *end = arr + cap_bytes;
    /* the last file page goes on with the file's next bytes: this copies that one page */
    if (flen) memset(arr + file_bytes, fill, (size_t)((p + flen < end ? p + flen : end) - (arr + file_bytes)));
    if (fill && end > p + flen) memset(p + flen, fill, (size_t)(end - (p + flen))); /* anonymous pages are zero */
    *out = arr;
    return len;
}

ghnsw_status_t ghnsw_map_rows(ghnsw_index_t *ix, uint32_t capacity, int fd, uint64_t vectors_off,
                              uint64_t links0_off, uint64_t exact_off, uint32_t n, ghnsw_err_t *err) {
    if (ix->count || ix->capacity || ix->vectors_map_len)
        return ghnsw_fail(err, GHNSW_ESTATE, "rows can only be mapped into a fresh index of capacity 0");
    if (capacity > GHNSW_MAX_CAPACITY) return ghnsw_fail(err, GHNSW_EINVAL, "max_elements must be below 2**31");
    if (n > capacity) return ghnsw_fail(err, GHNSW_ECORRUPT, "count %u exceeds max_elements %u", n, capacity);
    if (vectors_off % 16 || links0_off % 16 || exact_off % 16) /* whole elements, as aligned as owned memory */
        return ghnsw_fail(err, GHNSW_EINVAL, "mapped sections must start at multiples of 16 bytes");
    size_t vrow = ix->row_bytes, lrow = (size_t)ix->M0 * sizeof(uint32_t), xrow = (size_t)ix->dim_pad * sizeof(float);
    struct stat st;
    if (fstat(fd, &st)) return ghnsw_fail(err, GHNSW_EINVAL, "cannot stat the index file");
    /* checked here too: a page mapped past the end of the file faults on first touch */
    if (vectors_off + (uint64_t)n * vrow > (uint64_t)st.st_size || links0_off + (uint64_t)n * lrow > (uint64_t)st.st_size ||
        (ix->rerank && exact_off + (uint64_t)n * xrow > (uint64_t)st.st_size))
        return ghnsw_fail(err, GHNSW_ECORRUPT, "mapped sections run past the end of the file");
    void *vec = NULL, *links = NULL, *exact = NULL;
    size_t vlen = map_region(&vec, (size_t)capacity * vrow, fd, vectors_off, (size_t)n * vrow, 0);
    size_t llen = vlen ? map_region(&links, (size_t)capacity * lrow, fd, links0_off, (size_t)n * lrow, 0xFF) : 0;
    size_t xlen = llen && ix->rerank ? map_region(&exact, (size_t)capacity * xrow, fd, exact_off, (size_t)n * xrow, 0) : 0;
    if (!llen || (ix->rerank && !xlen)) {
        if (vlen) munmap(page_of(vec), vlen);
        if (llen) munmap(page_of(links), llen);
        return ghnsw_fail(err, GHNSW_ENOMEM, "cannot map the index file's rows");
    }
    free(ix->vectors); free(ix->links0); free(ix->exact);
    ix->vectors = vec; ix->vectors_map_len = vlen;
    ix->links0 = links; ix->links0_map_len = llen;
    ix->exact = exact; ix->exact_map_len = xlen;
    ix->map_rows = capacity;
    if (grow_arrays(ix, capacity) != GHNSW_OK || map_rebuild(ix, capacity) != GHNSW_OK)
        return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory allocating an index of %u elements", capacity);
    ghnsw_visited_pool_clear(&ix->vpool);
    ix->vpool.n = capacity;
    return GHNSW_OK;
}
