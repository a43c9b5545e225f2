// common.cuh: slot type, sentinels, metric ids, fp16 storage tag, pair ordering, team reductions.
//
// No system headers anywhere under kernels/: NVRTC (through cupy.RawModule or cuda-python) gets no
// include path from us, so everything the kernels need is spelled out here (fp16 is converted
// with one PTX instruction instead of <cuda_fp16.h>).
#ifndef GPUHNSW_COMMON_CUH
#define GPUHNSW_COMMON_CUH

// Kernel entry points. The loader (gpuhnsw/device/kernels.py) compiles one instantiation per
// program: it defines GPUHNSW_INSTANCE as the template parameters' values (`using T = float;
// constexpr int Team = 32; ...`), GPUHNSW_MAX_THREADS as the block size it launches and
// GPUHNSW_MIN_BLOCKS so that ptxas may use up to the module's register cap
// (kernels.max_registers: 64 for search_fixed, so that 16 of its 64-thread blocks share a
// multiprocessor; 128 for the others). The kernel then has C linkage (a plain name:
// CuPy loads it without name expressions and caches the binary on disk in every version) and
// launch bounds equal to its launch. (A bound of 512 made ptxas cap registers and spill; a bare
// 128 makes it aim for full occupancy, about 40 registers, and spill too.) Without
// GPUHNSW_INSTANCE (the CPU emulation of tests/) kernels stay templates.
#ifdef GPUHNSW_INSTANCE
#define GPUHNSW_KERNEL(...) \
  GPUHNSW_INSTANCE extern "C" __global__ void __launch_bounds__(GPUHNSW_MAX_THREADS, GPUHNSW_MIN_BLOCKS)
#else  // only the host emulation (g++ -std=c++20) compiles this: a kernel without parameters stays a function
#define GPUHNSW_KERNEL(...) __VA_OPT__(template <__VA_ARGS__>) __global__ void
#endif

namespace gpuhnsw {

typedef unsigned int slot_t;         // internal row id (never a user label)
typedef unsigned long long label_t;  // user id, uint64

constexpr slot_t kInvalidSlot = 0xFFFFFFFFu;  // unused links0 entry, padding in lists
constexpr slot_t kExpandedTag = 0x80000000u;  // beam entry already expanded (tag bit of the slot)
constexpr slot_t kSlotMask = 0x7FFFFFFFu;     // slot without the tag: slots must be < 2^31 - 1
constexpr label_t kInvalidLabel = 0xFFFFFFFFFFFFFFFFull;  // "no result" label (uint64 max)
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kWarpSize = 32;

// Per-query status bits of search_beam_kernel (out_status): where a filtered search left the C
// search's semantics because a fixed-size structure ran out; the caller may re-run those queries on
// the CPU.
constexpr int kStatusVisitedFull = 1;      // the visited hash filled up: the search stopped early
constexpr int kStatusPendingOverflow = 2;  // candidates that could still matter fell off the list
// search_fixed_kernel: the query holds NaN or an infinity (checked in the kernel, not searched; the
// GPU leg raises ValueError from this bit instead of a host sync before the launch)
constexpr int kStatusBadQuery = 4;

// Metric ids: a runtime argument (it changes no layout).
enum Metric : int {
  kL2 = 0,      // squared L2
  kIP = 1,      // 1 - a.b
  kCosine = 2,  // 1 - a.b on normalised vectors; the kernels normalise the query themselves
};

// fp16 storage: 16 bits of IEEE half, converted to fp32 right after the load.
struct half_t {
  unsigned short bits;
};

__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short float_to_half_bits(float f) {  // round to nearest even
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// bf16 storage: the top 16 bits of an IEEE float, converted with integer operations (no PTX: sm_75
// has no bf16 conversion instruction).
struct bf16_t {
  unsigned short bits;
};

__device__ __forceinline__ float bf16_bits_to_float(unsigned short h) {
  return __int_as_float(static_cast<int>(static_cast<unsigned>(h) << 16));
}

__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {  // round to nearest even
  const unsigned u = static_cast<unsigned>(__float_as_int(f));
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN stays a (quiet) NaN
  return static_cast<unsigned short>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float inf_f() { return __int_as_float(0x7f800000); }

// The one ordering of (distance, slot) pairs used everywhere: distance, then slot without its tag.
// Same as cand_less() in csrc/search.c.
__device__ __forceinline__ bool pair_less(float da, slot_t sa, float db, slot_t sb) {
  sa &= kSlotMask;
  sb &= kSlotMask;
  return da < db || (da == db && sa < sb);
}

// The warp's least (distance, slot) pair by pair_less, in every lane; every lane must call it.
__device__ __forceinline__ void warp_min_pair(float& best, slot_t& best_i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ob = __shfl_xor_sync(kFullMask, best, off);
    const slot_t oi = __shfl_xor_sync(kFullMask, best_i, off);
    if (pair_less(ob, oi, best, best_i)) {
      best = ob;
      best_i = oi;
    }
  }
}

// Sum over a team of Team consecutive lanes (Team a power of two <= 32); every lane of the warp
// must call it (full-mask shuffles), every lane of a team gets the team's sum.
template <int Team>
__device__ __forceinline__ float team_sum(float v) {
#pragma unroll
  for (int off = Team / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off, Team);
  return v;
}

// Bit s of a uint32 word bitset.
__device__ __forceinline__ bool bit_get(const unsigned* __restrict__ words, slot_t s) {
  return (words[s >> 5] >> (s & 31u)) & 1u;
}

// Block-wide sum; `scratch` is >= 32 floats of shared memory; all threads must call it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  v = team_sum<32>(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < n_warps; ++w) s += scratch[w];  // same order in every thread: same value
  return s;
}

}  // namespace gpuhnsw

#endif  // GPUHNSW_COMMON_CUH
