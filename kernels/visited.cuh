// visited.cuh: the visited set of one query, an open-addressing hash of slots in shared memory.
//
//   table: slot_t[1 << log2_size], kInvalidSlot = empty; multiplicative hash, linear probing,
//   insertion by atomicCAS (so threads of a block may insert concurrently: exactly one of them
//   sees "new" for a given slot).
//
// The table is never allowed past half full: before a batch of at most `upcoming` insertions the
// caller asks needs_reset(count, upcoming); when it says so, the caller clears the table and
// re-inserts every slot of its beam and result list. A slot forgotten this way can only cost a
// repeated distance: it is in neither list, so it was rejected or dropped by a full list whose
// worst entry has only improved since, and it is rejected again (same distance, same slot).
#ifndef GPUHNSW_VISITED_CUH
#define GPUHNSW_VISITED_CUH

#include "common.cuh"

namespace gpuhnsw {

struct VisitedHash {
  slot_t* table;  // shared memory [1 << log2_size]
  int log2_size;  // 5 .. 31

  __device__ __forceinline__ int size() const { return 1 << log2_size; }

  // Block-wide: empty the table. The caller synchronises afterwards.
  __device__ __forceinline__ void clear() const {
    for (int i = threadIdx.x; i < size(); i += blockDim.x) table[i] = kInvalidSlot;
  }

  // Warp-wide: empty the table (one warp clears it while the other merges). The caller synchronises.
  __device__ __forceinline__ void clear_warp() const {
    for (int i = threadIdx.x & 31; i < size(); i += 32) table[i] = kInvalidSlot;
  }

  // True when inserting `upcoming` more slots could take the table past half full.
  __device__ __forceinline__ bool needs_reset(int count, int upcoming) const {
    return count + upcoming > (size() >> 1);
  }

  // Insert s (< 2^31); true if it was not there. Terminates because the table is never full.
  __device__ __forceinline__ bool insert(slot_t s) const {
    const unsigned mask = static_cast<unsigned>(size() - 1);
    unsigned h = (s * 0x9E3779B1u) >> (32 - log2_size);
    while (true) {
      const slot_t prev = atomicCAS(&table[h], kInvalidSlot, s);
      if (prev == kInvalidSlot) return true;
      if (prev == s) return false;
      h = (h + 1u) & mask;
    }
  }
};

// The visited set that the blocks of one query share (search_fixed.cu's multi-block mode): a table
// in global memory, zeroed by the host before the launch, that no block can reset (another may be
// reading it).  Word 0 counts the slots inserted; the table follows it, a slot s stored as s + 1 so
// that zero means empty:
//
//   | count u32 | table u32[1 << log2_size] |
//
// The caller stops before an insertion batch that could take the count past half the table
// (would_fill); several blocks may pass that check together, so the launch sizes the table with
// room for each block's batch beyond the half (search_fixed.cu), and it never fills up.
struct GlobalVisited {
  unsigned* count;  // global memory, then the table
  int log2_size;

  __device__ __forceinline__ unsigned* table() const { return count + 1; }

  __device__ __forceinline__ bool would_fill(int upcoming) const {
    return static_cast<long long>(atomicAdd(count, 0u)) + upcoming > (1ll << (log2_size - 1));
  }

  // Insert s (< 2^31 - 1); true if it was not there (then counted).
  __device__ __forceinline__ bool insert(slot_t s) const {
    const unsigned mask = (1u << log2_size) - 1u;
    unsigned h = (s * 0x9E3779B1u) >> (32 - log2_size);
    while (true) {
      const unsigned prev = atomicCAS(&table()[h], 0u, s + 1u);
      if (prev == 0u) {
        atomicAdd(count, 1u);
        return true;
      }
      if (prev == s + 1u) return false;
      h = (h + 1u) & mask;
    }
  }
};

}  // namespace gpuhnsw

#endif  // GPUHNSW_VISITED_CUH
