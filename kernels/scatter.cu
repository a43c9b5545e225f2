// scatter.cu: the device mirror's sync: rows gathered on the host (one pinned staging buffer, one
// copy) scattered into the device arrays by one kernel (gpuhnsw/_device.py).
//
// Template parameter: T (float | gpuhnsw::half_t), the device storage of the vectors; fp32 rows
// from the C core are converted (round to nearest even) and zero padded from dim_pad to stride.
// Launch: grid = (up to r), block = a multiple of 32 threads, no shared memory.
//
// Staging (device copy of the pinned buffer), each section 16-byte aligned (_device.Staging):
//
//   slots   u32 [r]            destination slot of each row
//   degree  u32 [r]
//   labels  u64 [r]
//   links   u32 [r, m0]
//   rows    f32 [r, dim_pad]   the C core's padded rows
#include "common.cuh"

using gpuhnsw::label_t;
using gpuhnsw::slot_t;

namespace gpuhnsw {

__device__ __forceinline__ void store_element(float* dst, float v) { *dst = v; }
__device__ __forceinline__ void store_element(half_t* dst, float v) { dst->bits = float_to_half_bits(v); }

}  // namespace gpuhnsw

GPUHNSW_KERNEL(typename T)
    scatter_rows_kernel(int r,                                   // rows in the batch
                        const slot_t* __restrict__ slots,        // [r]
                        const slot_t* __restrict__ degree,       // [r]
                        const label_t* __restrict__ labels,      // [r]
                        const slot_t* __restrict__ links,        // [r, m0]
                        const float* __restrict__ rows,          // [r, dim_pad]
                        int m0, int dim_pad,                     //
                        T* __restrict__ vectors_out,             // [capacity, stride]
                        int stride,                              // >= dim_pad
                        slot_t* __restrict__ links0_out,         // [capacity, m0]
                        slot_t* __restrict__ degree0_out,        // [capacity]
                        label_t* __restrict__ labels_out) {      // [capacity]
  using namespace gpuhnsw;
  for (int i = blockIdx.x; i < r; i += gridDim.x) {
    const long long s = slots[i];
    for (int e = threadIdx.x; e < stride; e += blockDim.x)
      store_element(vectors_out + s * stride + e, e < dim_pad ? rows[static_cast<long long>(i) * dim_pad + e] : 0.f);
    for (int e = threadIdx.x; e < m0; e += blockDim.x) links0_out[s * m0 + e] = links[static_cast<long long>(i) * m0 + e];
    if (threadIdx.x == 0) {
      degree0_out[s] = degree[i];
      labels_out[s] = labels[i];
    }
  }
}
