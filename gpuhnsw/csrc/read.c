/* Readers and exporters: lookups, vectors, levels, neighbours, label and bitset copies, the GPU sync's
 * gathers, the state export.  Each takes its own locks: resize_lock shared (arrays, the label map
 * and slot labels do not move while it is held), the map lock around map probes, a slot lock
 * around a row copy, and mut_lock where a copy must see no writer at all. */
#include <stdlib.h>
#include <string.h>

#include "gpuhnsw.h"
#include "locks.h"

static size_t bitset_words(size_t n) { return (n + 31) / 32; }

ghnsw_status_t ghnsw_find(ghnsw_index_t *ix, uint64_t label, int64_t *slot, int *deleted) {
    int held = ghnsw_read_lock(ix);
    uint32_t s = ghnsw_lookup(ix, label);
    *slot = s == GHNSW_INVALID ? -1 : (int64_t)s;
    *deleted = s == GHNSW_INVALID ? 0 : ghnsw_bit_get(ix->deleted, s);
    ghnsw_read_unlock(ix, held);
    return GHNSW_OK;
}

ghnsw_status_t ghnsw_levels_of(ghnsw_index_t *ix, const uint64_t *labels, size_t n, uint8_t *out,
                               ghnsw_err_t *err) {
    ghnsw_status_t st = GHNSW_OK;
    int held = ghnsw_read_lock(ix);
    for (size_t i = 0; i < n; i++) {
        uint32_t s = ghnsw_lookup(ix, labels[i]);
        if (s == GHNSW_INVALID) {
            st = ghnsw_fail(err, GHNSW_ENOTFOUND, "Label not found: %llu", (unsigned long long)labels[i]);
            break;
        }
        out[i] = ix->levels[s];
    }
    ghnsw_read_unlock(ix, held);
    return st;
}

ghnsw_status_t ghnsw_neighbors(ghnsw_index_t *ix, uint64_t label, int level, uint64_t *out, uint32_t *n_out,
                               ghnsw_err_t *err) {
    ghnsw_status_t st = GHNSW_OK;
    *n_out = 0;
    uint32_t *ids = malloc(sizeof(uint32_t) * (ix->M0 + 1));
    if (!ids) return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
    int held = ghnsw_read_lock(ix);
    uint32_t s = ghnsw_lookup(ix, label);
    if (s == GHNSW_INVALID) {
        st = ghnsw_fail(err, GHNSW_ENOTFOUND, "Label not found: %llu", (unsigned long long)label);
    } else if (level < 0 || level > ix->levels[s]) {
        st = ghnsw_fail(err, GHNSW_EINVAL, "level %d out of range: element %llu has levels 0..%d", level,
                        (unsigned long long)label, ix->levels[s]);
    } else {
        uint32_t n = ghnsw_read_links(ix, s, level, ids);
        for (uint32_t i = 0; i < n; i++) out[i] = ix->labels[ids[i]];
        *n_out = n;
    }
    ghnsw_read_unlock(ix, held);
    free(ids);
    return st;
}

ghnsw_status_t ghnsw_get_vectors(ghnsw_index_t *ix, const uint64_t *labels, size_t n, float *out,
                                 ghnsw_err_t *err) {
    ghnsw_status_t st = GHNSW_OK;
    int held = ghnsw_read_lock(ix);
    for (size_t i = 0; i < n; i++) {
        uint32_t s = ghnsw_lookup(ix, labels[i]);
        if (s == GHNSW_INVALID || ghnsw_bit_get(ix->deleted, s)) {
            st = ghnsw_fail(err, GHNSW_ENOTFOUND, "Label not found: %llu%s", (unsigned long long)labels[i],
                            s == GHNSW_INVALID ? "" : " (it is marked deleted)");
            break;
        }
        ghnsw_spin_lock(&ix->slot_locks[s]);
        if (ix->exact) memcpy(out + i * ix->dim, ghnsw_exact(ix, s), ix->dim * sizeof(float));
        else ghnsw_decode(ix, ghnsw_vec(ix, s), out + i * ix->dim);
        ghnsw_spin_unlock(&ix->slot_locks[s]);
    }
    ghnsw_read_unlock(ix, held);
    return st;
}

ghnsw_status_t ghnsw_labels(ghnsw_index_t *ix, ghnsw_alloc_fn alloc, void *ctx, ghnsw_err_t *err) {
    ghnsw_status_t st = GHNSW_OK;
    int held = ghnsw_read_lock(ix); /* relabels take it exclusively; new slots publish count last */
    uint32_t n = __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE);
    uint64_t *out = alloc(ctx, (size_t)n * sizeof(uint64_t));
    if (out) memcpy(out, ix->labels, (size_t)n * sizeof(uint64_t));
    else st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
    ghnsw_read_unlock(ix, held);
    return st;
}

ghnsw_status_t ghnsw_allowed_bitset(ghnsw_index_t *ix, const uint64_t *labels, size_t n, ghnsw_alloc_fn alloc,
                                    void *ctx, ghnsw_err_t *err) {
    ghnsw_status_t st = GHNSW_OK;
    int held = ghnsw_read_lock(ix);
    size_t words = bitset_words(ix->capacity);
    uint32_t *bits = alloc(ctx, words * sizeof(uint32_t));
    if (bits) {
        memset(bits, 0, words * sizeof(uint32_t));
        pthread_mutex_lock(&ix->map_lock);
        /* a slot at or past the count is an add in progress (in the map, not yet present) */
        uint32_t count = __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE);
        for (size_t i = 0; i < n; i++) {
            uint32_t s = ghnsw_map_get(&ix->map, labels[i]);
            if (s < count) bits[s >> 5] |= 1u << (s & 31);
        }
        pthread_mutex_unlock(&ix->map_lock);
    } else {
        st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
    }
    ghnsw_read_unlock(ix, held);
    return st;
}

ghnsw_status_t ghnsw_deleted_bitset(ghnsw_index_t *ix, ghnsw_alloc_fn alloc, void *ctx, ghnsw_err_t *err) {
    ghnsw_status_t st = GHNSW_OK;
    int held = ghnsw_read_lock(ix);
    size_t words = bitset_words(ix->capacity);
    uint32_t *bits = alloc(ctx, words * sizeof(uint32_t));
    if (bits) {
        for (size_t w = 0; w < words; w++) bits[w] = __atomic_load_n(&ix->deleted[w], __ATOMIC_RELAXED);
    } else {
        st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
    }
    ghnsw_read_unlock(ix, held);
    return st;
}

/* Atomically takes and clears the dirty words, then the kinds of the slots taken (in this order, so
 * a kind marked in between is taken here and its bit, set again, comes with kind 0 next time), so a
 * row written during the drain is either in this batch or stays dirty for the next one.  Counted
 * first so the output is sized exactly; rows that turn dirty between the count and the drain stay
 * for the next drain.  Drains run one at a time (drain_lock), each numbered, so that a consumer can
 * tell whether another one took part of the log since its own last drain. */
ghnsw_status_t ghnsw_drain_dirty(ghnsw_index_t *ix, ghnsw_alloc_fn alloc, void *ctx, uint64_t *drain,
                                 ghnsw_err_t *err) {
    ghnsw_status_t st = GHNSW_OK;
    int held = ghnsw_read_lock(ix);
    pthread_mutex_lock(&ix->drain_lock);
    *drain = __atomic_add_fetch(&ix->drains, 1, __ATOMIC_SEQ_CST);  /* a failed one too: its caller then
                                                                      * re-syncs in full */
    __atomic_store_n(&ix->dirty_any, 0, __ATOMIC_RELAXED);            /* before the scan (ghnsw_mark_dirty) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    size_t nw = bitset_words(ix->capacity), max_out = 0, n = 0;
    for (size_t w = 0; w < nw; w++) max_out += __builtin_popcount(__atomic_load_n(&ix->dirty[w], __ATOMIC_RELAXED));
    uint64_t *out = alloc(ctx, max_out * sizeof(uint64_t));
    if (!out) {
        st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
        goto done;
    }
    for (size_t w = 0; w < nw && n < max_out; w++) {
        uint32_t cur = __atomic_load_n(&ix->dirty[w], __ATOMIC_RELAXED);
        if (!cur) continue;
        /* take only as many bits as fit; the rest stay dirty */
        uint32_t take = 0, m = 0;
        for (uint32_t b = cur; b && n + m < max_out; b &= b - 1, m++) take |= 1u << __builtin_ctz(b);
        __atomic_fetch_and(&ix->dirty[w], ~take, __ATOMIC_ACQ_REL);
        for (uint32_t b = take; b; b &= b - 1, n++) {
            uint32_t s = (uint32_t)(w * 32 + __builtin_ctz(b));
            uint64_t kind = __atomic_exchange_n(&ix->dirty_kind[s], 0, __ATOMIC_ACQ_REL);
            out[n] = kind << 32 | s;
        }
    }
done:
    pthread_mutex_unlock(&ix->drain_lock);
    ghnsw_read_unlock(ix, held);
    return st;
}

int ghnsw_sync_pending(ghnsw_index_t *ix, uint64_t since) {
    return __atomic_load_n(&ix->dirty_any, __ATOMIC_ACQUIRE) != 0 || __atomic_load_n(&ix->drains, __ATOMIC_ACQUIRE) != since;
}

size_t ghnsw_count_dirty(ghnsw_index_t *ix) {
    int held = ghnsw_read_lock(ix);
    size_t n = 0, nw = bitset_words(ix->capacity);
    for (size_t w = 0; w < nw; w++) n += __builtin_popcount(__atomic_load_n(&ix->dirty[w], __ATOMIC_RELAXED));
    ghnsw_read_unlock(ix, held);
    return n;
}

int ghnsw_pin_labels(ghnsw_index_t *ix) {
    if (ghnsw_in_callback(ix)) return 0;
    pthread_rwlock_rdlock(&ix->relabel_lock);
    return 1;
}

void ghnsw_unpin_labels(ghnsw_index_t *ix, int taken) {
    if (taken) pthread_rwlock_unlock(&ix->relabel_lock);
}

size_t ghnsw_memory_bytes(ghnsw_index_t *ix) {
    int held = ghnsw_read_lock(ix);
    size_t cap = ix->capacity;
    size_t b = cap * (ix->row_bytes + (size_t)ix->M0 * 4 + 4 + 8 + 1 + sizeof(void *) + 1 + 1);
    if (ix->rerank) b += cap * (size_t)ix->dim_pad * 4;
    if (ix->q_scale) b += 2 * (size_t)ix->dim * 4;
    b += 2 * bitset_words(cap) * 4;
    pthread_mutex_lock(&ix->map_lock);
    b += (ix->map.mask + 1) * (8 + 4);
    pthread_mutex_unlock(&ix->map_lock);
    uint32_t n = __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n; i++) b += (size_t)ix->levels[i] * (1 + ix->M) * 4;
    ghnsw_read_unlock(ix, held);
    return b;
}

ghnsw_status_t ghnsw_gather_rows(ghnsw_index_t *ix, const uint32_t *slots, size_t n, float *vectors, uint32_t *links,
                                 uint32_t *degree, uint64_t *labels, uint8_t *levels, int exact, ghnsw_err_t *err) {
    ghnsw_status_t st = GHNSW_OK;
    int held = ghnsw_read_lock(ix);
    uint32_t count = __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE);
    for (size_t i = 0; i < n; i++) {
        uint32_t s = slots[i];
        if (s >= count) { st = ghnsw_fail(err, GHNSW_EINVAL, "slot %u out of range (count %u)", s, count); break; }
        ghnsw_spin_lock(&ix->slot_locks[s]);
        if (vectors && (ix->storage == GHNSW_F32 || (exact && ix->exact)))
            memcpy(vectors + i * ix->dim_pad, ix->storage == GHNSW_F32 ? (const void *)ghnsw_vec(ix, s)
                                                                       : (const void *)ghnsw_exact(ix, s),
                   ix->dim_pad * sizeof(float));
        else if (vectors) {
            ghnsw_decode(ix, ghnsw_vec(ix, s), vectors + i * ix->dim_pad);
            memset(vectors + i * ix->dim_pad + ix->dim, 0, (ix->dim_pad - ix->dim) * sizeof(float));
        }
        memcpy(links + i * ix->M0, ghnsw_links0(ix, s), ix->M0 * sizeof(uint32_t));
        degree[i] = ix->degree0[s];
        ghnsw_spin_unlock(&ix->slot_locks[s]);
        if (labels) labels[i] = ix->labels[s];
        if (levels) levels[i] = ix->levels[s];
    }
    ghnsw_read_unlock(ix, held);
    return st;
}

ghnsw_status_t ghnsw_distances(ghnsw_index_t *ix, const float *queries, size_t nq, const uint32_t *slots, size_t c,
                               float *out, ghnsw_err_t *err) {
    ghnsw_status_t st = GHNSW_OK;
    size_t xbytes = sizeof(float) * ix->dim_pad;
    float *x = malloc(xbytes + ix->query_bytes);
    if (!x) return ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
    void *q = ix->storage == GHNSW_F32 ? (void *)x : (void *)((char *)x + xbytes);
    int held = ghnsw_read_lock(ix);
    uint32_t count = __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE);
    for (size_t i = 0; i < nq * c && st == GHNSW_OK; i++)
        if (slots[i] >= count) st = ghnsw_fail(err, GHNSW_EINVAL, "slot %u out of range (count %u)", slots[i], count);
    for (size_t i = 0; i < nq && st == GHNSW_OK; i++) {
        ghnsw_float_row(ix, queries + i * ix->dim, x);
        ghnsw_prepare(ix, x, q);
        for (size_t j = 0; j < c; j++) out[i * c + j] = ix->dist(q, ghnsw_vec(ix, slots[i * c + j]), ix->row_n);
    }
    ghnsw_read_unlock(ix, held);
    free(x);
    return st;
}

ghnsw_status_t ghnsw_pair_distances(ghnsw_index_t *ix, const uint32_t *a, const uint32_t *b, size_t n, float *out,
                                    ghnsw_err_t *err) {
    ghnsw_status_t st = GHNSW_OK;
    int held = ghnsw_read_lock(ix);
    uint32_t count = __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE);
    for (size_t i = 0; i < n && st == GHNSW_OK; i++) {
        if (a[i] >= count || b[i] >= count) st = ghnsw_fail(err, GHNSW_EINVAL, "slot out of range (count %u)", count);
        else out[i] = ghnsw_pair(ix, a[i], b[i]);
    }
    ghnsw_read_unlock(ix, held);
    return st;
}

ghnsw_status_t ghnsw_gather_upper(ghnsw_index_t *ix, const uint32_t *slots, size_t n, ghnsw_alloc_fn alloc,
                                  void *ctx, ghnsw_err_t *err) {
    ghnsw_status_t st = GHNSW_OK;
    size_t words = 0;
    int held = ghnsw_read_lock(ix);
    uint32_t count = __atomic_load_n(&ix->count, __ATOMIC_ACQUIRE);
    for (size_t i = 0; i < n && st == GHNSW_OK; i++) {
        if (slots[i] >= count) st = ghnsw_fail(err, GHNSW_EINVAL, "slot %u out of range (count %u)", slots[i], count);
        else words += (size_t)ix->levels[slots[i]] * (1 + ix->M);
    }
    uint32_t *dst = st == GHNSW_OK ? alloc(ctx, words * sizeof(uint32_t)) : NULL;
    if (st == GHNSW_OK && !dst) st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
    for (size_t i = 0; st == GHNSW_OK && i < n; i++) {
        uint32_t s = slots[i];
        size_t w = (size_t)ix->levels[s] * (1 + ix->M);
        if (!w) continue;
        ghnsw_spin_lock(&ix->slot_locks[s]);
        memcpy(dst, ix->upper[s], w * sizeof(uint32_t));
        ghnsw_spin_unlock(&ix->slot_locks[s]);
        dst += w;
    }
    ghnsw_read_unlock(ix, held);
    return st;
}

ghnsw_status_t ghnsw_export(ghnsw_index_t *ix, int decoded, ghnsw_export_t *out, ghnsw_alloc_fn alloc, void *ctx,
                            ghnsw_err_t *err) {
    ghnsw_status_t st = ghnsw_writer_lock(ix, "saving or pickling", err); /* no writer while we copy */
    if (st) return st;
    uint32_t n = ix->count, dim = ix->dim;
    size_t upper_words = 0;
    for (uint32_t s = 0; s < n; s++) upper_words += (size_t)ix->levels[s] * (1 + ix->M);
    out->capacity = ix->capacity;
    out->count = n;
    out->entry_point = n ? (int64_t)ix->entry_point : -1;
    out->max_level = ix->max_level;
    out->insert_seq = ix->insert_seq;
    out->clipped_rows = ix->clipped_rows;
    out->clipped_values = ix->clipped_values;
    /* float32 storage (or decoded): [n, dim] float32; else the stored rows as they are */
    int floats = decoded || ix->storage == GHNSW_F32;
    size_t vrow = floats ? (size_t)dim * 4 : ix->row_bytes;
    char *vec = alloc(ctx, (size_t)n * vrow);
    char *links = vec ? alloc(ctx, (size_t)n * ix->M0 * 4) : NULL;
    char *deg = links ? alloc(ctx, (size_t)n * 4) : NULL;
    char *lab = deg ? alloc(ctx, (size_t)n * 8) : NULL;
    char *lev = lab ? alloc(ctx, (size_t)n) : NULL;
    char *up = lev ? alloc(ctx, upper_words * 4) : NULL;
    char *del = up ? alloc(ctx, (size_t)n) : NULL;
    /* decoded: a float32 index's state, without exact rows or quantiser (empty) */
    int exact_rows = ix->exact && !decoded, quantizer = ix->q_scale && !decoded;
    char *exact = del ? alloc(ctx, exact_rows ? (size_t)n * dim * 4 : 0) : NULL;
    char *quant = exact ? alloc(ctx, quantizer ? 2 * (size_t)dim * 4 : 0) : NULL;
    if (!quant) {
        st = ghnsw_fail(err, GHNSW_ENOMEM, "out of memory");
    } else {
        memcpy(links, ix->links0, (size_t)n * ix->M0 * 4);
        memcpy(deg, ix->degree0, (size_t)n * 4);
        memcpy(lab, ix->labels, (size_t)n * 8);
        memcpy(lev, ix->levels, n);
        if (quantizer) {
            memcpy(quant, ix->q_offset, (size_t)dim * 4);
            memcpy(quant + (size_t)dim * 4, ix->q_scale, (size_t)dim * 4);
        }
        for (uint32_t s = 0; s < n; s++) {
            if (!floats) memcpy(vec + (size_t)s * vrow, ghnsw_vec(ix, s), vrow);
            else if (ix->exact) memcpy(vec + (size_t)s * vrow, ghnsw_exact(ix, s), vrow);
            else ghnsw_decode(ix, ghnsw_vec(ix, s), (float *)(vec + (size_t)s * vrow));
            if (exact_rows) memcpy(exact + (size_t)s * dim * 4, ghnsw_exact(ix, s), (size_t)dim * 4);
            size_t w = (size_t)ix->levels[s] * (1 + ix->M) * 4;
            if (w) { memcpy(up, ix->upper[s], w); up += w; }
            del[s] = (char)ghnsw_bit_get(ix->deleted, s);
        }
    }
    pthread_mutex_unlock(&ix->mut_lock);
    return st;
}
