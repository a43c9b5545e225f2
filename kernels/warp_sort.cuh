// warp_sort.cuh: bitonic sort and merge of (distance, slot) lists held in one warp's registers.
//
// A list of 32 * N pairs lives in the registers of one warp, N pairs per lane, register-major:
//
//   element i = 32 * j + lane   (d[j], s[j] of lane `lane`)
//
//   j = 0:  lane 0   lane 1  ...  lane 31        elements  0 .. 31
//   j = 1:  lane 0   lane 1  ...  lane 31        elements 32 .. 63      (N = 2: a 64-entry list)
//
// so a compare-exchange at stride >= 32 swaps two registers of one lane, and one at stride < 32
// exchanges a register with the lane `lane ^ stride` by two shuffles.  Every loop is unrolled over
// compile-time bounds, so the register indices are constants (no local memory; the CI check finds
// none: no spills, no stack frame).  Order: pair_less (distance, then slot without its tag bit).
// Every function is called by all 32 lanes of one warp.
//
// Used by search_fixed.cu: the beam and the result list stay in shared memory between iterations
// and pass through registers for the merge (bitonic.cuh does the same in shared memory, for the
// older kernel and the top-k kernel).
#ifndef GPUHNSW_WARP_SORT_CUH
#define GPUHNSW_WARP_SORT_CUH

#include "common.cuh"

namespace gpuhnsw {
namespace warp_sort {

// Element i of a list keeps the smaller pair if it is the lower index of an ascending pair.
__device__ __forceinline__ void exchange(float& d, slot_t& s, float od, slot_t os, bool keep_smaller) {
  if (keep_smaller ? pair_less(od, os, d, s) : pair_less(d, s, od, os)) {
    d = od;
    s = os;
  }
}

// One compare-exchange step of the bitonic network at (Size, Stride): elements i and i ^ Stride,
// ascending where (i & Size) == 0.
template <int N, int Size, int Stride>
__device__ __forceinline__ void step(float (&d)[N], slot_t (&s)[N]) {
  const int lane = threadIdx.x & 31;
  if (Stride >= 32) {
    constexpr int r = Stride >= 32 ? Stride / 32 : 1;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if ((j & r) != 0) continue;
      const bool ascending = ((32 * j) & Size) == 0;
      const float dl = d[j], dh = d[j | r];
      const slot_t sl = s[j], sh = s[j | r];
      if (ascending ? pair_less(dh, sh, dl, sl) : pair_less(dl, sl, dh, sh)) {
        d[j] = dh;
        s[j] = sh;
        d[j | r] = dl;
        s[j | r] = sl;
      }
    }
  } else {
    const bool lower = (lane & Stride) == 0;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const bool ascending = ((32 * j + lane) & Size) == 0;
      const float od = __shfl_xor_sync(kFullMask, d[j], Stride);
      const slot_t os = __shfl_xor_sync(kFullMask, s[j], Stride);
      exchange(d[j], s[j], od, os, lower == ascending);
    }
  }
}

// The merge steps of a bitonic block of size Size: strides Size/2 .. 1.
template <int N, int Size, int Stride>
struct Merge {
  static __device__ __forceinline__ void run(float (&d)[N], slot_t (&s)[N]) {
    step<N, Size, Stride>(d, s);
    Merge<N, Size, Stride / 2>::run(d, s);
  }
};
template <int N, int Size>
struct Merge<N, Size, 0> {
  static __device__ __forceinline__ void run(float (&)[N], slot_t (&)[N]) {}
};

// Sort: bitonic blocks of size 2, 4, ..., 32 * N.
template <int N, int Size>
struct Sort {
  static __device__ __forceinline__ void run(float (&d)[N], slot_t (&s)[N]) {
    Sort<N, Size / 2>::run(d, s);
    Merge<N, Size, Size / 2>::run(d, s);
  }
};
template <int N>
struct Sort<N, 1> {
  static __device__ __forceinline__ void run(float (&)[N], slot_t (&)[N]) {}
};

// Warp: sort the 32 * N pairs ascending.
template <int N>
__device__ __forceinline__ void sort(float (&d)[N], slot_t (&s)[N]) {
  Sort<N, 32 * N>::run(d, s);
}

// Warp: the first half of merging a sorted chunk (32 * C pairs, ascending; C <= N) into a sorted
// list (32 * N pairs): the list's largest 32 * C entries are paired with the chunk's smallest,
// reversed (element 32N - 1 - c with chunk element c: lane l's register N - 1 - jc with lane
// 31 - l's register jc), and the smaller of each pair kept.  That leaves a bitonic sequence holding
// the 32 * N smallest of list U chunk, which merge_bitonic sorts.
template <int N, int C>
__device__ __forceinline__ void keep_smaller(float (&d)[N], slot_t (&s)[N], const float (&cd)[C],
                                             const slot_t (&cs)[C]) {
  static_assert(C <= N, "the chunk is at most as long as the list");
#pragma unroll
  for (int jc = 0; jc < C; ++jc) {
    const float od = __shfl_xor_sync(kFullMask, cd[jc], 31);
    const slot_t os = __shfl_xor_sync(kFullMask, cs[jc], 31);
    exchange(d[N - 1 - jc], s[N - 1 - jc], od, os, true);
  }
}

// Warp: sort a bitonic sequence of 32 * N pairs ascending.
template <int N>
__device__ __forceinline__ void merge_bitonic(float (&d)[N], slot_t (&s)[N]) {
  Merge<N, 32 * N, 16 * N>::run(d, s);
}

// Warp: load elements [0, 32 * N) of a shared-memory list (padding past `n`: +inf, kInvalidSlot).
template <int N>
__device__ __forceinline__ void load(float (&d)[N], slot_t (&s)[N], const float* src_d, const slot_t* src_s,
                                     int n) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const int i = 32 * j + lane;
    d[j] = i < n ? src_d[i] : inf_f();
    s[j] = i < n ? src_s[i] : kInvalidSlot;
  }
}

// Warp: store elements [0, 32 * N), those from `limit` on as padding.
template <int N>
__device__ __forceinline__ void store(float* dst_d, slot_t* dst_s, const float (&d)[N], const slot_t (&s)[N],
                                      int limit) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const int i = 32 * j + lane;
    dst_d[i] = i < limit ? d[j] : inf_f();
    dst_s[i] = i < limit ? s[j] : kInvalidSlot;
  }
}

// Warp: list (registers, 32 * N pairs sorted, entries from `limit` on padding) := the `limit`
// smallest of list U the m pairs of kd/ks (shared memory, any order), chunk by chunk: one register
// per lane while at most 32 remain (the usual case once the beam has settled), else C; each chunk
// sorted, kept where smaller, then the one bitonic merge of the list.
template <int N, int C>
__device__ __forceinline__ void merge_unsorted(float (&d)[N], slot_t (&s)[N], int limit, const float* kd,
                                               const slot_t* ks, int m) {
  for (int c0 = 0; c0 < m;) {
    if (m - c0 <= 32 || C == 1) {
      float cd[1];
      slot_t cs[1];
      load<1>(cd, cs, kd + c0, ks + c0, m - c0);
      sort<1>(cd, cs);
      keep_smaller<N, 1>(d, s, cd, cs);
      c0 += 32;
    } else {
      float cd[C];
      slot_t cs[C];
      load<C>(cd, cs, kd + c0, ks + c0, m - c0);
      sort<C>(cd, cs);
      keep_smaller<N, C>(d, s, cd, cs);
      c0 += 32 * C;
    }
    merge_bitonic<N>(d, s);
  }
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (32 * j + lane >= limit) {
      d[j] = inf_f();
      s[j] = kInvalidSlot;
    }
  }
}

}  // namespace warp_sort
}  // namespace gpuhnsw

#endif  // GPUHNSW_WARP_SORT_CUH
