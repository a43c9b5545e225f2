/* Small locks, each with one job (see docs/architecture.md, "Locks").
 *
 * A slot lock is one byte, not a 40-byte mutex: a million slots cost 1 MB of locks.  Critical sections
 * under it are a copy or rewrite of at most M0 ids, so spinning beats sleeping. */
#ifndef GHNSW_LOCKS_H
#define GHNSW_LOCKS_H

#include <stdint.h>
#include <sched.h>

#include "gpuhnsw.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GHNSW_PAUSE() _mm_pause()
#else
#define GHNSW_PAUSE() ((void)0)
#endif

static inline void ghnsw_spin_lock(uint8_t *l) {
    unsigned spins = 0;
    for (;;) {
        if (!__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) return;
        while (__atomic_load_n(l, __ATOMIC_RELAXED)) {
            if (++spins < 64) GHNSW_PAUSE();
            else { sched_yield(); spins = 0; }
        }
    }
}

static inline void ghnsw_spin_unlock(uint8_t *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

/* Atomic bit set in a uint32 bitset (dirty log, deleted set). */
static inline void ghnsw_bit_set(uint32_t *bits, uint32_t i) {
    __atomic_fetch_or(&bits[i >> 5], 1u << (i & 31), __ATOMIC_RELAXED);
}
static inline void ghnsw_bit_clear(uint32_t *bits, uint32_t i) {
    __atomic_fetch_and(&bits[i >> 5], ~(1u << (i & 31)), __ATOMIC_RELAXED);
}
static inline int ghnsw_bit_get(const uint32_t *bits, uint32_t i) {
    return (int)((__atomic_load_n(&bits[i >> 5], __ATOMIC_RELAXED) >> (i & 31)) & 1u);
}

/* Filter callbacks run user code in the middle of a query, which holds its index's resize_lock shared.
 * Each thread keeps a stack of the indexes whose callback it is running (frames on the C stack), so
 * that a call from such a callback on the same index neither takes resize_lock again (the query
 * holds it on the callback's behalf; a second shared lock would wait behind a queued writer) nor
 * waits for a writer's lock (the writer may be waiting for this very query): readers work, writers
 * refuse with GHNSW_ESTATE. */
typedef struct ghnsw_frame { const ghnsw_index_t *ix; struct ghnsw_frame *up; } ghnsw_frame_t;
extern __thread ghnsw_frame_t *ghnsw_frames;

static inline int ghnsw_in_callback(const ghnsw_index_t *ix) {
    for (const ghnsw_frame_t *f = ghnsw_frames; f; f = f->up)
        if (f->ix == ix) return 1;
    return 0;
}

/* Shared hold of resize_lock for a reader: arrays and labels do not move while it is held.  Returns
 * whether the lock was taken, for ghnsw_read_unlock. */
static inline int ghnsw_read_lock(ghnsw_index_t *ix) {
    if (ghnsw_in_callback(ix)) return 0;
    pthread_rwlock_rdlock(&ix->resize_lock);
    return 1;
}
static inline void ghnsw_read_unlock(ghnsw_index_t *ix, int taken) {
    if (taken) pthread_rwlock_unlock(&ix->resize_lock);
}

/* mut_lock for a writer (or a reader that needs no writer running); refused inside a callback. */
static inline ghnsw_status_t ghnsw_writer_lock(ghnsw_index_t *ix, const char *what, ghnsw_err_t *err) {
    if (ghnsw_in_callback(ix))
        return ghnsw_fail(err, GHNSW_ESTATE, "%s is not allowed inside a filter callback of a query on the same "
                          "index", what);
    pthread_mutex_lock(&ix->mut_lock);
    return GHNSW_OK;
}

#endif
