// beam.cuh: the fixed-size beam (and the result list, same shape) of one query.
//
// Two uses (see search.cu):
//   beam mode (no filter, no deletions): the beam of limit = max(ef, k) entries; expanded entries
//     stay, tagged; select_parents picks the first untagged ones;
//   filtered mode: the pending candidates (up to Capacity), expanded ones leave the list
//     (pop_parents), next to a result list of the best `limit` allowed slots.
//
// A list is two shared-memory arrays of Capacity entries, sorted by pair_less:
//
//   dist: float [Capacity]   | d0 <= d1 <= ... <= d(limit-1) | inf ... inf          |
//   slot: slot_t[Capacity]   | s0    s1   ...    s(limit-1)  | kInvalidSlot ...     |
//                              ^ kExpandedTag set once expanded (beam only)
//
// `limit` = max(ef, k) <= Capacity is a runtime argument; positions >= limit hold padding
// (inf, kInvalidSlot) before and after every call. Padding carries the tag bit (0xFFFFFFFF), so
// it is never picked as a parent. The beam never holds a slot twice: candidates come through the
// visited hash, which lets a slot through only while it is in neither list (see visited.cuh).
//
// Every function here is called by exactly one warp (all 32 lanes).
#ifndef GPUHNSW_BEAM_CUH
#define GPUHNSW_BEAM_CUH

#include "bitonic.cuh"
#include "common.cuh"

namespace gpuhnsw {
namespace beam {

// Is slot s allowed in the results (not deleted, passes the filter)? Null bitsets allow all.
__device__ __forceinline__ bool allowed(slot_t s, const unsigned* __restrict__ deleted_bits,
                                        const unsigned* __restrict__ filter_bits) {
  if (deleted_bits != nullptr && bit_get(deleted_bits, s)) return false;
  if (filter_bits != nullptr && !bit_get(filter_bits, s)) return false;
  return true;
}

// Warp: sort cand[0, m) (m a power of two; entries past the real candidates are padding), then
// list[0, limit) := the `limit` smallest of list[0, limit) U cand. Same result as inserting the
// candidates one by one into a sorted list capped at `limit` (the C order), whatever their order.
__device__ __forceinline__ void merge_candidates(float* list_d, slot_t* list_s, int limit, float* cand_d,
                                                 slot_t* cand_s, int m) {
  bitonic::warp_sort(cand_d, cand_s, m, false);
  const int n = bitonic::pow2_ceil(limit);  // <= Capacity; [limit, n) is padding
  bitonic::warp_merge_smallest(list_d, list_s, n, cand_d, cand_s, m);
  for (int e = limit + (threadIdx.x & 31); e < n; e += 32) {  // drop what fell past limit
    list_d[e] = inf_f();
    list_s[e] = kInvalidSlot;
  }
  __syncwarp();
}

// Warp: pick up to `width` (<= 32) parents, the first unexpanded entries of the beam in order,
// tag them expanded and write their slots to parents[]. Returns how many (same in every lane).
__device__ __forceinline__ int select_parents(slot_t* beam_s, int limit, int width, slot_t* parents) {
  const int lane = threadIdx.x & 31;
  int taken = 0;
  for (int base = 0; base < limit && taken < width; base += 32) {
    const int e = base + lane;
    const slot_t s = e < limit ? beam_s[e] : kInvalidSlot;
    const bool open = (s & kExpandedTag) == 0;
    const unsigned ballot = __ballot_sync(kFullMask, open);
    const int rank = taken + __popc(ballot & ((1u << lane) - 1u));
    if (open && rank < width) {
      parents[rank] = s;
      beam_s[e] = s | kExpandedTag;
    }
    taken = min(taken + __popc(ballot), width);
  }
  __syncwarp();
  return taken;
}

// Warp, filtered mode: pop up to `width` (<= 32) parents off the front of the pending list
// d/s[0, n_pending), as hnswlib pops its candidate heap: stop at the first entry farther than
// `bound` (the worst result once `limit` results are held, else +inf). The rest shifts to the front.
// Returns how many (same in every lane).
__device__ __forceinline__ int pop_parents(float* d, slot_t* s, int n_pending, int width, float bound,
                                           slot_t* parents) {
  const int lane = threadIdx.x & 31;
  const bool ok = lane < width && lane < n_pending && !(d[lane] > bound);
  const unsigned ballot = __ballot_sync(kFullMask, ok);
  const int np = ballot == kFullMask ? 32 : __ffs(~ballot) - 1;  // the leading run of ok entries
  if (lane < np) parents[lane] = s[lane];
  __syncwarp();
  if (np == 0) return 0;
  for (int base = 0; base < n_pending; base += 32) {  // reads run ahead of writes: safe in place
    const int i = base + lane;
    const bool from = i + np < n_pending;
    const float dv = from ? d[i + np] : inf_f();
    const slot_t sv = from ? s[i + np] : kInvalidSlot;
    __syncwarp();
    if (i < n_pending) {
      d[i] = dv;
      s[i] = sv;
    }
    __syncwarp();
  }
  return np;
}

}  // namespace beam
}  // namespace gpuhnsw

#endif  // GPUHNSW_BEAM_CUH
