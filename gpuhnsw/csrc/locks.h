/* Small locks, each with one job (see docs/architecture.md, "Locks").
 *
 * A slot lock is one byte, not a 40-byte mutex: a million slots cost 1 MB of locks.  Critical sections
 * under it are a copy or rewrite of at most M0 ids, so spinning beats sleeping. */
#ifndef GHNSW_LOCKS_H
#define GHNSW_LOCKS_H

#include <stdint.h>
#include <sched.h>

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

#endif
