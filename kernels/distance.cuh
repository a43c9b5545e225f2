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

// Storage traits: elements per 16-byte chunk.
template <typename T>
struct Storage;
template <>
struct Storage<float> {
  static constexpr int kPerChunk = 4;
};
template <>
struct Storage<half_t> {
  static constexpr int kPerChunk = 8;
};

// Chunk c of a row, as fp32.
__device__ __forceinline__ void load_chunk(const float* __restrict__ row, int c, float (&x)[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(row) + c);
  x[0] = v.x;
  x[1] = v.y;
  x[2] = v.z;
  x[3] = v.w;
}

__device__ __forceinline__ void load_chunk(const half_t* __restrict__ row, int c, float (&x)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(row) + c);
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // little endian: element 2i is the low half of word i
    x[2 * i] = half_bits_to_float(static_cast<unsigned short>(w[i] & 0xFFFFu));
    x[2 * i + 1] = half_bits_to_float(static_cast<unsigned short>(w[i] >> 16));
  }
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

}  // namespace gpuhnsw

#endif  // GPUHNSW_DISTANCE_CUH
