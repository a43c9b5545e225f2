// bitonic.cuh: warp-wide bitonic sort and merge of (distance, slot) pairs in shared memory.
//
// One warp runs the network over two shared arrays d[0, n), s[0, n) (n a power of two >= 2,
// a runtime value): each step has n / 2 disjoint compare-exchange pairs, lane l takes pairs
// l, l + 32, ..., and __syncwarp() separates the steps.
//
//   step (size, stride): pair t -> i = t with a 0 inserted at bit log2(stride), j = i + stride;
//                        block of `size` ascending where (i & size) == 0 (reversed if descending)
//
//   n = 8, size 8, stride 2:   i: 0 1 4 5      pairs (0,2) (1,3) (4,6) (5,7)
//                              j: 2 3 6 7
//
// Why shared memory and not registers: a fully unrolled register network over a 512-entry list
// compiled for minutes per instantiation (NVRTC runs at the first query) and spilled; this one
// is a few loops, compiles in seconds, and uses a handful of registers.
//
// Order: pair_less (distance, then slot without the tag bit).
#ifndef GPUHNSW_BITONIC_CUH
#define GPUHNSW_BITONIC_CUH

#include "common.cuh"

namespace gpuhnsw {
namespace bitonic {

// The smallest power of two >= n (n >= 1).
__device__ __forceinline__ int pow2_ceil(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Warp: one compare-exchange step over d/s[0, n).
__device__ __forceinline__ void step(float* d, slot_t* s, int n, int size, int stride, bool descending) {
  for (int t = threadIdx.x & 31; t < (n >> 1); t += 32) {
    const int i = ((t & ~(stride - 1)) << 1) | (t & (stride - 1));
    const int j = i | stride;
    const bool asc = ((i & size) == 0) != descending;
    const float di = d[i], dj = d[j];
    const slot_t si = s[i], sj = s[j];
    if (asc ? pair_less(dj, sj, di, si) : pair_less(di, si, dj, sj)) {
      d[i] = dj;
      s[i] = sj;
      d[j] = di;
      s[j] = si;
    }
  }
  __syncwarp();
}

// Warp: sort d/s[0, n) ascending (or descending); n a power of two.
__device__ __forceinline__ void warp_sort(float* d, slot_t* s, int n, bool descending) {
#pragma unroll 1
  for (int size = 2; size <= n; size <<= 1) {
#pragma unroll 1
    for (int stride = size >> 1; stride > 0; stride >>= 1) step(d, s, n, size, stride, descending);
  }
}

// Warp: sort a bitonic sequence d/s[0, n) ascending; n a power of two.
__device__ __forceinline__ void warp_merge(float* d, slot_t* s, int n) {
#pragma unroll 1
  for (int stride = n >> 1; stride > 0; stride >>= 1) step(d, s, n, n, stride, false);
}

// Warp: list[0, n) ascending := the n smallest pairs of list U cand[0, m), cand ascending
// (n, m powers of two). Pairing the list's largest with the candidates' smallest and keeping the
// minimum leaves a bitonic sequence holding the n smallest (the half-cleaner of a bitonic merge);
// candidates past the first n can never make it, list entries past n - m are left alone.
__device__ __forceinline__ void warp_merge_smallest(float* list_d, slot_t* list_s, int n, const float* cand_d,
                                                    const slot_t* cand_s, int m) {
  const int pairs = m < n ? m : n;
  for (int i = threadIdx.x & 31; i < pairs; i += 32) {
    const int e = n - 1 - i;
    if (pair_less(cand_d[i], cand_s[i], list_d[e], list_s[e])) {
      list_d[e] = cand_d[i];
      list_s[e] = cand_s[i];
    }
  }
  __syncwarp();
  warp_merge(list_d, list_s, n);
}

}  // namespace bitonic
}  // namespace gpuhnsw

#endif  // GPUHNSW_BITONIC_CUH
