// topk.cu: the k smallest entries of each row of a distance tile, ties by the smaller index; exact
// search (tiled screening products, then this), the exact k-NN graph and GPU NN-descent's merges.
//
// A tile holds columns [index_offset, index_offset + n) of the full distance matrix; entry (qi, c) is
// read at dists[qi * row_stride + c * col_stride], so a tile's columns can be taken as rows
// (row_stride 1, col_stride = the tile's row length: the symmetric k-NN graph feeds both row blocks
// of a tile pair from one product). An optional running result (prev_*) is merged in, so a caller
// walks the tiles in order and keeps one [nq, k] result; out_* may be the same arrays as prev_*
// (prev is read into shared memory first). A column only enters a warp's buffer when it is no
// larger than prev's k-th entry, so after the first tiles almost nothing does.
//
// The ranking key of column c is key_scale * tile[c] + key_bias[c] (bias may be null), computed as
// it is read: exact search passes the raw product with (-2, |x - mu|^2) for l2 and (-1, null) for
// ip, which spares the separate passes over the tile that scaling it would cost. With exclude_index,
// row qi's column of global index exclude_index[qi] gets the key exclude_key (its own row).
//
// Template parameter: Capacity (32, 64, ..., 1024) >= k, the size of each warp's list and buffer.
// Launch: grid = (up to nq), block = 32 * n_warps threads, dynamic shared memory =
// gpuhnsw.device.launch.topk_shared_bytes(Capacity, n_warps):
//
//   +-------------------------------------+ 0
//   | prev index  i64[Cap]                |  the running result (when prev_dists != null)
//   | prev dist   f32[Cap]                |
//   +-------------------------------------+
//   | warp 0: list f32[Cap] | u32[Cap]    |  sorted; the k best columns this warp has seen
//   |         buf  f32[Cap] | u32[Cap]    |  unsorted; columns that beat the list's k-th
//   +-------------------------------------+
//   | warp 1: ...                         |
//   +-------------------------------------+
//
// Each warp reads groups of 32 columns (warp w: groups w, w + n_warps, ...; coalesced when
// col_stride is 1), appends the columns that beat its current k-th best to its buffer, and when the
// buffer could overflow, sorts it and merges it into its list (bitonic.cuh). Then warp 0 merges the
// other lists into its own, and every thread places one entry of that list or of prev by its rank
// (merge path). NaN distances count as +inf. Missing results: index -1, distance +inf. A launch with
// k > Capacity or a block size that is not a multiple of 32 writes index -2 everywhere.
#include "bitonic.cuh"
#include "common.cuh"

using gpuhnsw::slot_t;

namespace gpuhnsw {
namespace topk {

constexpr long long kNoIndex = 0x7FFFFFFFFFFFFFFFll;  // comparison key of a missing entry

__device__ __forceinline__ bool index_less(float da, long long ia, float db, long long ib) {
  return da < db || (da == db && ia < ib);
}

// Number of entries of the sorted list (d[0..n), idx(0..n)) less than (x, ix): lower bound.
template <typename IndexOf>
__device__ __forceinline__ int count_less(const float* d, IndexOf idx, int n, float x, long long ix) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (index_less(d[mid], idx(mid), x, ix)) lo = mid + 1; else hi = mid;
  }
  return lo;
}

}  // namespace topk
}  // namespace gpuhnsw

GPUHNSW_KERNEL(int Capacity)
    select_topk_kernel(const float* __restrict__ dists,      // entry (qi, c) at qi * row_stride + c * col_stride
                       long long row_stride,                  // floats between rows
                       long long col_stride,                  // floats between columns
                       int n,                                 // columns in this tile (< 2^31 - 1)
                       long long index_offset,                // global index of column 0
                       float key_scale,                       // key = key_scale * tile + key_bias
                       const float* key_bias,                 // [n] or null (0)
                       const long long* exclude_index,        // [nq] global index, or null
                       float exclude_key,                     // its key
                       const float* prev_dists,               // [nq, k] sorted, or null (may alias out_dists)
                       const long long* prev_index,           // [nq, k], -1 = missing (may alias out_index)
                       int nq, int k,                         // k <= Capacity
                       float* out_dists,                      // [nq, k]
                       long long* out_index) {                // [nq, k]
  using namespace gpuhnsw;
  using topk::kNoIndex;
  static_assert(Capacity % 32 == 0 && (Capacity & (Capacity - 1)) == 0, "capacity: power of two >= 32");
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;
  if (k > Capacity || k < 0 || (blockDim.x & 31) != 0) {
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + tid; i < static_cast<long long>(nq) * k;
         i += static_cast<long long>(gridDim.x) * blockDim.x)
      out_index[i] = -2;
    return;
  }
  if (k == 0) return;
  long long* prev_i = reinterpret_cast<long long*>(smem);
  float* prev_d = reinterpret_cast<float*>(prev_i + Capacity);
  float* my_list_d = prev_d + Capacity + warp * 4 * Capacity;
  slot_t* my_list_s = reinterpret_cast<slot_t*>(my_list_d + Capacity);
  float* my_buf_d = my_list_d + 2 * Capacity;
  slot_t* my_buf_s = reinterpret_cast<slot_t*>(my_list_d + 3 * Capacity);
  float* list_d = prev_d + Capacity;  // warp 0's list: the block's result
  slot_t* list_s = reinterpret_cast<slot_t*>(list_d + Capacity);
  const bool has_prev = prev_dists != nullptr;
  const int n_list = bitonic::pow2_ceil(max(k, 1));

  for (int qi = blockIdx.x; qi < nq; qi += gridDim.x) {
    const float* row = dists + row_stride * qi;
    float* o_d = out_dists + static_cast<long long>(qi) * k;
    long long* o_i = out_index + static_cast<long long>(qi) * k;

    // 1. each warp: the k smallest of its columns
    for (int e = lane; e < Capacity; e += 32) {
      my_list_d[e] = inf_f();
      my_list_s[e] = kInvalidSlot;
    }
    __syncwarp();
    float thr_d = inf_f();  // the list's k-th entry (same in every lane)
    slot_t thr_s = kInvalidSlot;
    int count = 0;          // entries in the buffer (same in every lane)
    // prev's k-th distance bounds what can still enter (inf while prev has missing entries)
    const float prev_thr = has_prev ? prev_dists[static_cast<long long>(qi) * k + k - 1] : inf_f();
    const long long excluded = exclude_index != nullptr ? exclude_index[qi] - index_offset : -1;
    for (int base = warp * 32; base < n; base += n_warps * 32) {
      const int col = base + lane;
      float x = inf_f();
      if (col < n) {
        const float g = row[col_stride * col];
        x = key_bias != nullptr ? fmaf(key_scale, g, key_bias[col]) : key_scale * g;
        if (col == excluded) x = exclude_key;
      }
      if (x != x) x = inf_f();
      const bool pass = col < n && x <= prev_thr && pair_less(x, static_cast<slot_t>(col), thr_d, thr_s);
      const unsigned ballot = __ballot_sync(kFullMask, pass);
      if (pass) {
        const int pos = count + __popc(ballot & ((1u << lane) - 1u));
        my_buf_d[pos] = x;
        my_buf_s[pos] = static_cast<slot_t>(col);
      }
      count += __popc(ballot);
      const bool last = base + n_warps * 32 >= n;
      if (count > Capacity - 32 || (last && count > 0)) {  // flush the buffer into the list
        __syncwarp();
        const int m = bitonic::pow2_ceil(count);
        for (int e = count + lane; e < m; e += 32) {
          my_buf_d[e] = inf_f();
          my_buf_s[e] = kInvalidSlot;
        }
        __syncwarp();
        bitonic::warp_sort(my_buf_d, my_buf_s, m, false);
        bitonic::warp_merge_smallest(my_list_d, my_list_s, n_list, my_buf_d, my_buf_s, m);
        thr_d = my_list_d[k - 1];
        thr_s = my_list_s[k - 1];
        count = 0;
        __syncwarp();
      }
    }
    if (has_prev) {
      for (int j = tid; j < k; j += blockDim.x) {
        prev_d[j] = prev_dists[static_cast<long long>(qi) * k + j];
        prev_i[j] = prev_index[static_cast<long long>(qi) * k + j];
      }
    }
    __syncthreads();

    // 2. warp 0 merges the other warps' lists into its own, then drops what is past k
    if (warp == 0) {
      for (int w = 1; w < n_warps; ++w) {
        const float* other_d = list_d + w * 4 * Capacity;
        const slot_t* other_s = reinterpret_cast<const slot_t*>(other_d + Capacity);
        bitonic::warp_merge_smallest(list_d, list_s, n_list, other_d, other_s, n_list);
      }
      for (int e = k + lane; e < Capacity; e += 32) {
        list_d[e] = inf_f();
        list_s[e] = kInvalidSlot;
      }
    }
    __syncthreads();

    // 3. output: the tile list alone, or merged with prev by rank
    auto tile_index = [&](int j) -> long long {
      return list_s[j] == kInvalidSlot ? kNoIndex : index_offset + static_cast<long long>(list_s[j]);
    };
    auto prev_index_of = [&](int j) -> long long { return prev_i[j] < 0 ? kNoIndex : prev_i[j]; };
    for (int j = tid; j < k; j += blockDim.x) {  // padding first; ranks below overwrite
      o_d[j] = inf_f();
      o_i[j] = -1;
    }
    __syncthreads();
    for (int j = tid; j < k; j += blockDim.x) {
      const long long ia = tile_index(j);
      if (ia != kNoIndex) {
        const int rank = j + (has_prev ? topk::count_less(prev_d, prev_index_of, k, list_d[j], ia) : 0);
        if (rank < k) {
          o_d[rank] = list_d[j];
          o_i[rank] = ia;
        }
      }
      if (has_prev) {
        const long long ib = prev_index_of(j);
        if (ib != kNoIndex) {
          const int rank = j + topk::count_less(list_d, tile_index, k, prev_d[j], ib);
          if (rank < k) {
            o_d[rank] = prev_d[j];
            o_i[rank] = ib;
          }
        }
      }
    }
    __syncthreads();  // shared memory is reused by the next row
  }
}
