// distance.cu: distances between each query and a list of slots ([nq, c] ids -> [nq, c] distances),
// for re-ranking, GPU-assisted construction and tests.
//
// Template parameters: T (float | gpuhnsw::half_t storage), Team (lanes per distance: 4..32).
// Launch: grid = (up to nq), block = a multiple of 32 threads, dynamic shared memory = stride * 4
// bytes (the query; gpuhnsw._kernels.distance_shared_bytes).
//
//   +----------------------+ 0
//   | query    f32[stride] |  zero padded; normalised for cosine
//   +----------------------+
//
// Slots equal to kInvalidSlot (0xFFFFFFFF) or >= n_slots give +inf.
#include "common.cuh"
#include "distance.cuh"

using gpuhnsw::slot_t;

GPUHNSW_KERNEL(typename T, int Team)
    compute_distances_kernel(const T* __restrict__ vectors,       // [capacity, stride]
                             int stride,                          // elements per row, 16-byte multiple
                             int metric,                          // gpuhnsw::Metric
                             int n_slots,                         // rows that may be read
                             const float* __restrict__ queries,   // [nq, dim]
                             int nq, int dim,                     //
                             const slot_t* __restrict__ slots,    // [nq, slots_ld] (or [c] when slots_ld == 0)
                             long long slots_ld,                  // ids between query rows; 0: one shared list
                             int c,                               // ids per query
                             float* __restrict__ out,             // [nq, c]
                             long long out_ld) {                  // floats between output rows (>= c)
  using namespace gpuhnsw;
  static_assert(Team == 4 || Team == 8 || Team == 16 || Team == 32, "team of 4..32 lanes");
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_scratch[32];
  float* q_s = reinterpret_cast<float*>(smem);

  const int team = threadIdx.x / Team, n_teams = blockDim.x / Team;
  const int n_chunks = stride / Storage<T>::kPerChunk;

  for (int qi = blockIdx.x; qi < nq; qi += gridDim.x) {
    load_query(q_s, queries + static_cast<long long>(qi) * dim, dim, stride, metric, s_scratch);
    const slot_t* ids = slots + slots_ld * qi;
    for (int i0 = 0; i0 < c; i0 += n_teams) {  // uniform trip count: the team shuffles need it
      const int i = i0 + team;
      const slot_t s = i < c ? ids[i] : kInvalidSlot;
      const bool ok = s < static_cast<slot_t>(n_slots);
      const float d = team_distance<T, Team>(q_s, vectors + (ok ? static_cast<long long>(s) * stride : 0),
                                             ok ? n_chunks : 0, metric);
      if (i < c && (threadIdx.x & (Team - 1)) == 0) out[out_ld * qi + i] = ok ? d : inf_f();
    }
    __syncthreads();  // q_s is rewritten for the next query
  }
}
