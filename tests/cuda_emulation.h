// cuda_emulation.h: the CUDA subset gpuhnsw's kernels use, emulated on the host for
// tests/test_kernels_emulated.py (no GPU in CI).
//
// One std::thread per CUDA thread; blocks run one after another; real barriers for __syncthreads,
// __syncwarp and every warp collective (shuffle, ballot), and real atomics, so a missing
// synchronisation or a wrong index shows up as a wrong answer (races are caught only when they
// happen to bite: this is a functional check, not a race detector). Shared memory: `__shared__`
// becomes a function-local static (one block runs at a time); the dynamic `extern __shared__`
// array and the two PTX fp16 conversions are replaced by the test before compiling.
// Needs C++20 (<barrier>, std::atomic_ref) and _Float16 (GCC >= 12 or Clang >= 15 on x86-64).
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3_t { unsigned x = 1, y = 1, z = 1; };
thread_local dim3_t threadIdx, blockIdx;
dim3_t blockDim, gridDim;

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

using std::max;
using std::min;

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(x); }
template <typename T> inline T __ldg(const T* p) { return *p; }

inline float emu_half_to_float(unsigned short h) {
  const unsigned sign = (h >> 15) & 1, exp = (h >> 10) & 31, man = h & 1023;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(man | 1024), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}
inline unsigned short emu_float_to_half(float f) {  // round to nearest even, via _Float16
  _Float16 h = static_cast<_Float16>(f);
  unsigned short b;
  std::memcpy(&b, &h, 2);
  return b;
}

// ---- block state ---------------------------------------------------------------------------
struct EmuBlock {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<unsigned long long> xch;  // [threads] exchange slots for warp collectives
};
EmuBlock* g_block = nullptr;
alignas(16) unsigned char g_dynamic_smem[1 << 20];

inline void __syncthreads() { g_block->block->arrive_and_wait(); }
inline int emu_warp() { return threadIdx.x / 32; }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { g_block->warps[emu_warp()]->arrive_and_wait(); }

template <typename T>
inline T emu_shfl(T v, int src_lane) {
  const int base = emu_warp() * 32;
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_block->xch[threadIdx.x] = bits;
  __syncwarp();
  bits = g_block->xch[base + src_lane];
  __syncwarp();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  const int lane = threadIdx.x & 31;
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return emu_shfl(v, src);
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane) { return emu_shfl(v, src_lane & 31); }
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta) {
  const int lane = threadIdx.x & 31;
  return emu_shfl(v, lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane);
}
inline unsigned __ballot_sync(unsigned, bool p) {
  const int base = emu_warp() * 32;
  g_block->xch[threadIdx.x] = p ? 1 : 0;
  __syncwarp();
  unsigned b = 0;
  for (int i = 0; i < 32; ++i) b |= static_cast<unsigned>(g_block->xch[base + i]) << i;
  __syncwarp();
  return b;
}
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned val) {
  std::atomic_ref<unsigned> a(*p);
  a.compare_exchange_strong(cmp, val);
  return cmp;
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
inline int atomicMax(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int cur = a.load();
  while (cur < v && !a.compare_exchange_weak(cur, v)) {
  }
  return cur;
}
// __syncthreads that also returns whether `p` was non-zero in any thread of the block.
std::atomic<int> g_sync_or{0};
inline int __syncthreads_or(int p) {
  __syncthreads();                       // everyone past the previous use of g_sync_or
  if (threadIdx.x == 0) g_sync_or = 0;
  __syncthreads();
  if (p) g_sync_or = 1;
  __syncthreads();
  return g_sync_or.load();
}

// Run fn() as a grid of (grid, block) threads, block after block.
inline void emu_launch(unsigned grid, unsigned block, const std::function<void()>& fn) {
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    EmuBlock eb;
    eb.block = std::make_unique<std::barrier<>>(block);
    for (unsigned w = 0; w < (block + 31) / 32; ++w) eb.warps.push_back(std::make_unique<std::barrier<>>(32));
    eb.xch.assign(block, 0);
    g_block = &eb;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block; ++t)
      ts.emplace_back([&, t, b] {
        threadIdx.x = t;
        blockIdx.x = b;
        fn();
      });
    for (auto& th : ts) th.join();
    g_block = nullptr;
  }
}
