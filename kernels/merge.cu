// merge.cu: the last step of search_fixed_kernel's multi-block mode (search_fixed.cu): the blocks of
// a query wrote their k best (distance, slot) pairs to the query's columns of an [nq, blocks * k]
// tile, and select_topk_kernel (topk.cu) ranked the tile's distances into the k best columns; this
// turns those columns into slots and labels, counts what was found and passes on the blocks' status.
//
// Launch: grid = (up to nq), block = a multiple of 32 threads, no shared memory beyond a counter.
// Missing results: slot kInvalidSlot, label uint64 max, distance +inf (the tile's padding, or a
// column select_topk could not fill: index -1). Valid results form a prefix of each row (the
// padding's distance is +inf). found[qi] < 0 (search_fixed_kernel rejected its launch) stays.
#include "common.cuh"

using gpuhnsw::label_t;
using gpuhnsw::slot_t;

GPUHNSW_KERNEL()
    gather_merged_kernel(const long long* __restrict__ columns,   // [nq, k] select_topk's, -1 missing
                         const slot_t* __restrict__ tile_slots,   // [nq, tile_ld] the blocks' slots
                         int tile_ld,                             // blocks * k
                         const label_t* __restrict__ labels,      // [capacity]
                         const unsigned* __restrict__ workspace,  // [nq, ws_ld]: status at ws_ld - 1
                         long long ws_ld,                         // 2 + (1 << global_log2)
                         int nq, int k,                           //
                         float* __restrict__ dists,               // [nq, k] select_topk's; inf where missing
                         slot_t* __restrict__ out_slots,          // [nq, k] or null
                         label_t* __restrict__ out_labels,        // [nq, k] or null
                         int* __restrict__ out_found,             // [nq]
                         int* __restrict__ out_status) {          // [nq]
  using namespace gpuhnsw;
  __shared__ int s_found;
  for (int qi = blockIdx.x; qi < nq; qi += gridDim.x) {
    if (threadIdx.x == 0) s_found = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
      const long long at = static_cast<long long>(qi) * k + j;
      const long long col = columns[at];
      const slot_t s = col < 0 ? kInvalidSlot : tile_slots[static_cast<long long>(qi) * tile_ld + col];
      const bool ok = s != kInvalidSlot;
      if (ok) atomicAdd(&s_found, 1);
      if (!ok) dists[at] = inf_f();
      if (out_slots != nullptr) out_slots[at] = s;
      if (out_labels != nullptr) out_labels[at] = ok ? labels[s] : kInvalidLabel;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      if (out_found[qi] >= 0) out_found[qi] = s_found;
      out_status[qi] = static_cast<int>(workspace[(qi + 1) * ws_ld - 1]);
    }
    __syncthreads();  // s_found is reset for the next row
  }
}
