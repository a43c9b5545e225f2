// scatter.cu: the device mirror's sync: rows gathered on the host (one pinned staging buffer, one
// copy) scattered into the device arrays by one kernel (gpuhnsw/device/mirror.py).
//
// Template parameter: T (float | gpuhnsw::half_t | gpuhnsw::bf16_t), the device storage of the
// vectors; fp32 rows from the C core are converted (round to nearest even) and zero padded from
// dim_pad to stride.
// Launch: grid = (up to r + q), block = a multiple of 32 threads, no shared memory.
//
// Staging (device copy of the pinned buffer), each section 16-byte aligned (mirror._Staging).
// Full rows (new slots, changed vectors or labels):
//
//   slots   u32 [r]            destination slot of each row
//   degree  u32 [r]
//   labels  u64 [r]
//   links   u32 [r, m0]
//   rows    f32 [r, dim_pad]   the C core's padded rows
//
// Link rows (only the level-0 list changed; most are one appended back-link): entries before
// lstart are on the device already, so only entries lstart..ldegree-1 travel, packed:
//
//   lslots  u32 [q]            destination slot of each link row
//   ldegree u32 [q]            its degree
//   lstart  u32 [q]            first entry shipped (0: the whole list)
//   lfirst  u32 [q]            where its entries start in lpacked
//   lpacked u32 [sum(ldegree - lstart)]
//
// A link row gets links0[s][lstart:ldegree] from lpacked and the invalid slot from ldegree on.
#include "common.cuh"

using gpuhnsw::label_t;
using gpuhnsw::slot_t;

namespace gpuhnsw {

__device__ __forceinline__ void store_element(float* dst, float v) { *dst = v; }
__device__ __forceinline__ void store_element(half_t* dst, float v) { dst->bits = float_to_half_bits(v); }
__device__ __forceinline__ void store_element(bf16_t* dst, float v) { dst->bits = float_to_bf16_bits(v); }

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
                        label_t* __restrict__ labels_out,        // [capacity]
                        int q,                                   // link rows in the batch
                        const slot_t* __restrict__ lslots,       // [q]
                        const slot_t* __restrict__ ldegree,      // [q]
                        const slot_t* __restrict__ lstart,       // [q]
                        const slot_t* __restrict__ lfirst,       // [q]
                        const slot_t* __restrict__ lpacked) {    // [sum(ldegree - lstart)]
  using namespace gpuhnsw;
  for (int i = blockIdx.x; i < r + q; i += gridDim.x) {
    if (i >= r) {
      const int j = i - r;
      const long long s = lslots[j];
      const int start = lstart[j], deg = ldegree[j];
      const slot_t* src = lpacked + lfirst[j];   // entry e of the row at src[e - start]
      for (int e = start + threadIdx.x; e < m0; e += blockDim.x)
        links0_out[s * m0 + e] = e < deg ? src[e - start] : kInvalidSlot;
      if (threadIdx.x == 0) degree0_out[s] = deg;
      continue;
    }
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
