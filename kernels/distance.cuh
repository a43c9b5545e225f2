// distance.cuh: team-cooperative distances between the shared-memory query and one stored row.
//
// A team of Team lanes (4, 8, 16 or 32 consecutive lanes of a warp) computes one distance: lane r
// of the team reads 16-byte chunks r, r + Team, r + 2*Team, ... of the row (float4 for fp32, eight
// halves for fp16), accumulates in fp32 with fma, and the team sums with shuffles. Rows hold
// `stride` elements, stride * sizeof(T) a multiple of 16 and the padding zero, so padding adds 0.
//
//   row (fp32, stride = 12):  | c0: 4 floats | c1: 4 floats | c2: 4 floats |
//   team of 4 lanes:             lane 0         lane 1         lane 2        (lane 3 idle)
#ifndef GPUHNSW_DISTANCE_CUH
#define GPUHNSW_DISTANCE_CUH

#include "common.cuh"

namespace gpuhnsw {

// Storage traits: elements per 16-byte chunk, the chunk's raw load and its conversion to fp32.
template <typename T>
struct Storage;
template <>
struct Storage<float> {
  static constexpr int kPerChunk = 4;
  typedef float4 Raw;
  static __device__ __forceinline__ Raw load(const float* __restrict__ row, int c) {
    return __ldg(reinterpret_cast<const float4*>(row) + c);
  }
  static __device__ __forceinline__ void unpack(const Raw& v, float (&x)[4]) {
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
  }
};

// Eight 16-bit elements in a uint4, little endian: element 2i is the low half of word i.
template <float (*Convert)(unsigned short)>
__device__ __forceinline__ void unpack_halves(const uint4& v, float (&x)[8]) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = Convert(static_cast<unsigned short>(w[i] & 0xFFFFu));
    x[2 * i + 1] = Convert(static_cast<unsigned short>(w[i] >> 16));
  }
}

template <>
struct Storage<half_t> {
  static constexpr int kPerChunk = 8;
  typedef uint4 Raw;
  static __device__ __forceinline__ Raw load(const half_t* __restrict__ row, int c) {
    return __ldg(reinterpret_cast<const uint4*>(row) + c);
  }
  static __device__ __forceinline__ void unpack(const Raw& v, float (&x)[8]) { unpack_halves<half_bits_to_float>(v, x); }
};
template <>
struct Storage<bf16_t> {
  static constexpr int kPerChunk = 8;
  typedef uint4 Raw;
  static __device__ __forceinline__ Raw load(const bf16_t* __restrict__ row, int c) {
    return __ldg(reinterpret_cast<const uint4*>(row) + c);
  }
  static __device__ __forceinline__ void unpack(const Raw& v, float (&x)[8]) { unpack_halves<bf16_bits_to_float>(v, x); }
};

// Chunk c of a row, as fp32.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int c, float (&x)[Storage<T>::kPerChunk]) {
  Storage<T>::unpack(Storage<T>::load(row, c), x);
}

// Chunk c of the shared-memory query (fp32), as V floats read with 16-byte loads.
template <int V>
__device__ __forceinline__ void load_query_chunk(const float* __restrict__ q, int c, float (&y)[V]) {
  const float4* p = reinterpret_cast<const float4*>(q) + c * (V / 4);
#pragma unroll
  for (int j = 0; j < V / 4; ++j) {
    const float4 t = p[j];
    y[4 * j] = t.x;
    y[4 * j + 1] = t.y;
    y[4 * j + 2] = t.z;
    y[4 * j + 3] = t.w;
  }
}

// Distance between the query q (shared memory, 16-byte aligned, fp32 [stride], zero padded) and `row`.
// `n_chunks` = stride / Storage<T>::kPerChunk; a lane may pass n_chunks = 0 to take part in the
// team reduction without reading (invalid candidate). Every lane of the warp must call this.
// Returns the distance in every lane of the team.
template <typename T, int Team>
__device__ __forceinline__ float team_distance(const float* __restrict__ q, const T* __restrict__ row,
                                               int n_chunks, int metric) {
  constexpr int V = Storage<T>::kPerChunk;
  const int rank = threadIdx.x & (Team - 1);
  float acc = 0.f;
  if (metric == kL2) {
    for (int c = rank; c < n_chunks; c += Team) {
      float x[V], y[V];
      load_chunk(row, c, x);
      load_query_chunk(q, c, y);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float d = y[i] - x[i];
        acc = fmaf(d, d, acc);
      }
    }
  } else {
    for (int c = rank; c < n_chunks; c += Team) {
      float x[V], y[V];
      load_chunk(row, c, x);
      load_query_chunk(q, c, y);
#pragma unroll
      for (int i = 0; i < V; ++i) acc = fmaf(y[i], x[i], acc);
    }
  }
  acc = team_sum<Team>(acc);
  return metric == kL2 ? acc : 1.0f - acc;
}

// team_distance with every load of a lane issued before its arithmetic: lane r of the team loads
// chunks r, r + Team, ..., up to kLoadBatch of them, into registers, then converts and accumulates
// them, so a lane keeps kLoadBatch 16-byte loads in flight instead of one (rows longer than
// Team * kLoadBatch chunks take several such rounds).  The same chunks in the same order as
// team_distance: the same sum, bit for bit.  Every lane of the warp must call it.
constexpr int kLoadBatch = 2;

template <typename T, int Team>
__device__ __forceinline__ float team_distance_batched(const float* __restrict__ q, const T* __restrict__ row,
                                                       int n_chunks, int metric) {
  constexpr int V = Storage<T>::kPerChunk;
  const int rank = threadIdx.x & (Team - 1);
  float acc = 0.f;
#pragma unroll 1  // one batch of loads in flight at a time: the register budget (search_fixed.cu)
  for (int c0 = rank; c0 < n_chunks; c0 += Team * kLoadBatch) {
    typename Storage<T>::Raw raw[kLoadBatch];
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      if (c0 + b * Team < n_chunks) raw[b] = Storage<T>::load(row, c0 + b * Team);
    }
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int c = c0 + b * Team;
      if (c >= n_chunks) break;
      float x[V], y[V];
      Storage<T>::unpack(raw[b], x);
      load_query_chunk(q, c, y);
      if (metric == kL2) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float d = y[i] - x[i];
          acc = fmaf(d, d, acc);
        }
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) acc = fmaf(y[i], x[i], acc);
      }
    }
  }
  acc = team_sum<Team>(acc);
  return metric == kL2 ? acc : 1.0f - acc;
}

// Copy query row `src` (fp32 [dim]) into shared `q` ([stride], zero padded) and, for cosine,
// scale it by 1 / (|q| + 1e-30) as the C core does. Block-wide: all threads call it.
// `scratch`: >= 32 floats of shared memory.
__device__ __forceinline__ void load_query(float* __restrict__ q, const float* __restrict__ src, int dim,
                                           int stride, int metric, float* scratch) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < stride; i += blockDim.x) {
    const float v = i < dim ? src[i] : 0.f;
    q[i] = v;
    ss = fmaf(v, v, ss);
  }
  if (metric == kCosine) {
    const float inv = 1.0f / (sqrtf(block_sum(ss, scratch)) + 1e-30f);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) q[i] *= inv;
  }
  __syncthreads();
}

// load_query, after checking the row: false (and nothing loaded) where it holds NaN or an infinity.
// Block-wide: all threads call it and get the same answer.
__device__ __forceinline__ bool load_query_checked(float* __restrict__ q, const float* __restrict__ src, int dim,
                                                   int stride, int metric, float* scratch) {
  int bad = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) bad |= !(fabsf(src[i]) <= 3.402823466e38f);
  if (__syncthreads_or(bad)) return false;
  load_query(q, src, dim, stride, metric, scratch);
  return true;
}

}  // namespace gpuhnsw

#endif  // GPUHNSW_DISTANCE_CUH
