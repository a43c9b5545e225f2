// search.cu: batched HNSW search, one thread block per query (grid-stride over queries).
//
// Semantics: docs/architecture.md "Search semantics" (the C search is the reference):
//   1. greedy descent through the upper levels from the entry point;
//   2. level 0, beam mode (no deleted bitset, no filter): a beam of limit = `beam` entries (the
//      caller's max(ef, k), decided once in gpuhnsw/search/params.py);
//      each iteration expands the first `search_width` unexpanded beam entries (1 = the C order
//      exactly), visits their unvisited neighbours, and keeps the best `limit` of beam U new;
//      stop when every beam entry is expanded; return the beam's first k;
//   3. level 0, filtered mode (a deleted bitset or a filter given): hnswlib's search as the C core
//      runs it: pending candidates (smallest first, expanded ones leave) and the best `limit`
//      allowed slots (results); pop up to `search_width` pending entries per iteration, stopping at
//      one farther than the worst result once `limit` results are held; deleted and filtered slots
//      are traversed, never returned. Pending is capped at Capacity and the visited hash is never
//      reset in this mode; where either limit bites, out_status says so (kStatus* in common.cuh).
//
// Pass deleted_bits only when at least one slot is deleted: the C core switches to the filtered
// search on "a filter or n_deleted > 0", and the kernel on "a filter or a deleted bitset".
//
// Template parameters change layout only: T (float | gpuhnsw::half_t storage), Team (lanes per
// distance: 4, 8, 16, 32), Capacity (the static list buffers: 32, 64, 128, 256, 512 >= limit).
// The instantiation list is generated in gpuhnsw/device/kernels.py (instances("search")).
//
// Arguments: one SearchArgs, by value (below; gpuhnsw/device/launch.py's SEARCH_ARGS is its NumPy
// twin, and tests/test_kernels_nvrtc.py checks that the two agree field by field).
// Launch: grid = (up to nq), block = 64..512 threads, a multiple of 32 (warp 0 merges the beam
// while warp 1 merges the results), dynamic shared memory as drawn below
// (gpuhnsw.device.launch.search_shared_bytes computes the same number).
//
// Static shared memory (the Capacity template parameter):
//
//   beam     f32[Capacity] | u32[Capacity]   sorted; beam mode: the beam (slots | kExpandedTag once
//                                            expanded); filtered mode: the pending candidates
//   results  f32[Capacity] | u32[Capacity]   filtered mode only: the best `limit` allowed slots
//
// Dynamic shared memory (4-byte words; the query first, so it is 16-byte aligned):
//
//   +-------------------------------+ 0
//   | query     f32[stride]         |  zero padded to stride; normalised for cosine
//   +-------------------------------+
//   | cand      f32[cc] | u32[cc]   |  cc = pow2_ceil(max(search_width * m0, m)): one iteration's
//   +-------------------------------+  new candidates, compacted then padded to a power of two
//   | cand_res  f32[cc] | u32[cc]   |  filtered mode: the same, not-allowed ones as padding
//   +-------------------------------+
//   | visited   u32[1 << hash_log2] |  open-addressing hash; needs (1 << hash_log2) / 2 >=
//   +-------------------------------+  2 * Capacity + search_width * m0 (filtered mode: the
//                                      more, the later a wide filtered search hits the limit)
//
// One level-0 iteration, phase by phase (__syncthreads between phases):
//   A  warp 0 picks the parents: beam mode, the first search_width unexpanded beam entries (tagged);
//      filtered mode, up to search_width pending entries popped off the front
//   B  if the visited hash could pass half full: beam mode, clear it and re-insert the beam's slots
//      (a forgotten slot cannot re-enter, see visited.cuh); filtered mode, stop (kStatusVisitedFull)
//   C  all threads: parents' neighbours -> visited hash -> new ones appended to cand
//   D  teams: distances of cand
//   E  all threads: pad cand to a power of two; filtered mode: cand_res = the allowed ones
//   F  warp 0: sort cand, merge into the beam (limit) or pending (Capacity);
//      warp 1 (filtered mode): sort cand_res, merge into the results (limit)
//
// Device graph (see gpuhnsw/device/mirror.py):
//   links0      u32 [capacity, m0]   level-0 adjacency, unused entries kInvalidSlot
//   degree0     u32 [capacity]       live entries per row (read as at most m0, like the C core)
//   upper_start u32 [capacity]       per-slot index into upper_links (kInvalidSlot: no upper level)
//   levels      u8  [capacity]       top level of each slot (a slot has blocks for levels 1..levels[s])
//   upper_links u32 [total]          slot s, level L >= 1: block at upper_start[s] + (L-1)*(m+1)
//                                    = [count, m ids] (the C core's per-slot block, concatenated)
// As the C core reads lists: counts are capped (m0, m), ids >= n_slots and self links are skipped.
#include "beam.cuh"
#include "common.cuh"
#include "distance.cuh"
#include "visited.cuh"

using gpuhnsw::label_t;
using gpuhnsw::slot_t;

namespace gpuhnsw {

// Everything a search launch needs, passed by value: the device graph (the mirror's arrays), the
// queries, the outputs, then the sizes and parameters.  Pointers first, then the one 64-bit integer,
// then the ints: no padding anywhere.
struct SearchArgs {
  const void* vectors;                // T [capacity, stride]
  const slot_t* links0;               // [capacity, m0]
  const slot_t* degree0;              // [capacity]
  const slot_t* upper_start;          // [capacity]
  const slot_t* upper_links;          // [total]
  const unsigned char* levels;        // [capacity] top level of each slot
  const label_t* labels;              // [capacity]
  const unsigned* deleted_bits;       // [ceil(capacity/32)] or null
  const float* queries;               // [nq, dim]
  const unsigned* filter_bits;        // [nq or 1, filter_stride] or null
  long long filter_stride;            // words per query; 0: one bitset for every query
  slot_t* out_slots;                  // [nq, k], kInvalidSlot pad
  float* out_dists;                   // [nq, k], inf pad
  label_t* out_labels;                // [nq, k] or null, uint64 max pad
  int* out_found;                     // [nq]; -1: bad launch config
  int* out_status;                    // [nq] or null: kStatus* bits
  int stride;                         // elements per row, 16-byte multiple
  int metric;                         // gpuhnsw::Metric
  int m0;                             // 2 * M
  int m;                              // M
  int n_slots;                        // slots in use (count)
  int entry_point;                    // -1: empty index
  int max_level;                      //
  int nq, dim;                        //
  int k;                              //
  int beam;                           // beam width max(ef, k): k <= beam <= Capacity
  int search_width;                   // parents per iteration, 1..32
  int hash_log2;                      // visited hash size, log2
  int max_iters;                      // 0: no limit
};

}  // namespace gpuhnsw

GPUHNSW_KERNEL(typename T, int Team, int Capacity)
    search_beam_kernel(const gpuhnsw::SearchArgs args) {
  using namespace gpuhnsw;
  static_assert(Team == 4 || Team == 8 || Team == 16 || Team == 32, "team of 4..32 lanes");
  static_assert(Capacity % 32 == 0 && (Capacity & (Capacity - 1)) == 0, "capacity: power of two >= 32");
  const T* __restrict__ vectors = static_cast<const T*>(args.vectors);
  const slot_t* __restrict__ links0 = args.links0;
  const slot_t* __restrict__ degree0 = args.degree0;
  const slot_t* __restrict__ upper_start = args.upper_start;
  const slot_t* __restrict__ upper_links = args.upper_links;
  const unsigned char* __restrict__ levels = args.levels;
  const label_t* __restrict__ labels = args.labels;
  const unsigned* __restrict__ deleted_bits = args.deleted_bits;
  const float* __restrict__ queries = args.queries;
  const unsigned* __restrict__ filter_bits = args.filter_bits;
  slot_t* __restrict__ out_slots = args.out_slots;
  float* __restrict__ out_dists = args.out_dists;
  label_t* __restrict__ out_labels = args.out_labels;
  int* __restrict__ out_found = args.out_found;
  int* __restrict__ out_status = args.out_status;
  // the sizes as references: read from the parameter bank where used, not held in registers (the
  // search runs at its register limit; copies made ptxas spill)
  const long long& filter_stride = args.filter_stride;
  const int &stride = args.stride, &metric = args.metric, &m0 = args.m0, &m = args.m, &n_slots = args.n_slots;
  const int &entry_point = args.entry_point, &max_level = args.max_level, &nq = args.nq, &dim = args.dim;
  const int &k = args.k, &limit = args.beam, &search_width = args.search_width, &hash_log2 = args.hash_log2;
  const int& max_iters = args.max_iters;

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float beam_d[Capacity], res_d[Capacity];
  __shared__ slot_t beam_s[Capacity], res_s[Capacity];
  __shared__ float s_scratch[32];
  __shared__ slot_t s_parents[32];
  __shared__ int s_n_parents, s_n_cand, s_reseeded, s_changed, s_found;
  __shared__ slot_t s_cur;
  __shared__ float s_cur_dist;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int team = tid / Team, n_teams = blockDim.x / Team;
  const int n_chunks = stride / Storage<T>::kPerChunk;
  const int cand_cap = bitonic::pow2_ceil(max(search_width * m0, max(m, 1)));
  const bool filtered = deleted_bits != nullptr || filter_bits != nullptr;

  // A launch configuration that would break an invariant gives found = -1 instead of a hang.
  const bool bad = (blockDim.x & 31) != 0 || blockDim.x < 64 || search_width < 1 || search_width > 32 ||
                   m0 < 1 || m < 0 || limit < 1 || limit > Capacity || k < 0 || k > limit || hash_log2 < 5 ||
                   hash_log2 > 30 ||
                   (1 << (hash_log2 - 1)) < 2 * Capacity + search_width * m0 ||
                   stride % Storage<T>::kPerChunk != 0;
  if (bad) {
    for (int qi = blockIdx.x * blockDim.x + tid; qi < nq; qi += gridDim.x * blockDim.x) out_found[qi] = -1;
    return;
  }

  float* q_s = reinterpret_cast<float*>(smem);
  float* cand_d = q_s + stride;
  slot_t* cand_s = reinterpret_cast<slot_t*>(cand_d + cand_cap);
  float* cres_d = reinterpret_cast<float*>(cand_s + cand_cap);
  slot_t* cres_s = reinterpret_cast<slot_t*>(cres_d + cand_cap);
  const VisitedHash visited{cres_s + cand_cap, hash_log2};

  for (int qi = blockIdx.x; qi < nq; qi += gridDim.x) {
    const unsigned* filter_q = filter_bits == nullptr ? nullptr : filter_bits + filter_stride * qi;
    slot_t* o_slots = out_slots + static_cast<long long>(qi) * k;
    float* o_dists = out_dists + static_cast<long long>(qi) * k;
    label_t* o_labels = out_labels == nullptr ? nullptr : out_labels + static_cast<long long>(qi) * k;

    if (entry_point < 0 || entry_point >= n_slots) {  // empty index: nothing found
      for (int j = tid; j < k; j += blockDim.x) {
        o_slots[j] = kInvalidSlot;
        o_dists[j] = inf_f();
        if (o_labels != nullptr) o_labels[j] = kInvalidLabel;
      }
      if (tid == 0) {
        out_found[qi] = 0;
        if (out_status != nullptr) out_status[qi] = 0;
      }
      continue;
    }

    // ---- query -> shared memory; distance to the entry point --------------------------------
    load_query(q_s, queries + static_cast<long long>(qi) * dim, dim, stride, metric, s_scratch);
    if (warp == 0) {
      const float d = team_distance<T, Team>(q_s, vectors + static_cast<long long>(entry_point) * stride,
                                             n_chunks, metric);
      if (lane == 0) {
        s_cur = static_cast<slot_t>(entry_point);
        s_cur_dist = d;
      }
    }
    __syncthreads();

    // ---- greedy descent: per level, move to the best neighbour while it improves ------------
    for (int level = max_level; level >= 1; --level) {
      while (true) {
        const slot_t cur = s_cur;
        const slot_t start = upper_start[cur];
        // a slot below `level` has no block there: reading one would run into another slot's blocks
        // (or past the array), so it is a dead end on this level, as in the C core
        const bool has = start != kInvalidSlot && levels[cur] >= level;
        const slot_t* blk = upper_links + (has ? static_cast<long long>(start) + static_cast<long long>(level - 1) * (m + 1) : 0);
        const int cnt = has ? min(static_cast<int>(blk[0]), m) : 0;
        for (int i0 = 0; i0 < cnt; i0 += n_teams) {  // uniform trip count: the team shuffles need it
          const int i = i0 + team;
          const slot_t s = i < cnt ? blk[1 + i] : kInvalidSlot;
          const bool ok = s < static_cast<slot_t>(n_slots) && s != cur;
          const float d = team_distance<T, Team>(q_s, vectors + (ok ? static_cast<long long>(s) * stride : 0),
                                                 ok ? n_chunks : 0, metric);
          if (i < cnt && (tid & (Team - 1)) == 0) cand_d[i] = ok ? d : inf_f();
        }
        __syncthreads();
        if (warp == 0) {  // argmin by (distance, position): the first best in stored order, as in C
          float best = inf_f();
          slot_t best_i = kInvalidSlot;
          for (int i = lane; i < cnt; i += 32) {
            if (pair_less(cand_d[i], static_cast<slot_t>(i), best, best_i)) {
              best = cand_d[i];
              best_i = static_cast<slot_t>(i);
            }
          }
          warp_min_pair(best, best_i);
          if (lane == 0) {
            s_changed = best_i != kInvalidSlot && best < s_cur_dist;
            if (s_changed) {
              s_cur = blk[1 + best_i];
              s_cur_dist = best;
            }
          }
        }
        __syncthreads();
        if (!s_changed) break;
      }
    }

    // ---- level 0: initialise beam (or pending), results, visited ---------------------------
    for (int i = tid; i < Capacity; i += blockDim.x) {
      beam_d[i] = inf_f();
      beam_s[i] = kInvalidSlot;
      res_d[i] = inf_f();
      res_s[i] = kInvalidSlot;
    }
    visited.clear();
    __syncthreads();
    if (tid == 0) {
      const slot_t cur = s_cur;
      beam_d[0] = s_cur_dist;
      beam_s[0] = cur;
      visited.insert(cur);
      if (filtered && beam::allowed(cur, deleted_bits, filter_q)) {
        res_d[0] = s_cur_dist;
        res_s[0] = cur;
      }
    }
    int hash_count = 1;  // slots in the visited hash    } the same value in every thread
    int n_pending = 1;   // filtered mode: pending entries }
    int status = 0;      // kStatus* bits, kept by thread 0
    __syncthreads();

    for (int iter = 0; max_iters <= 0 || iter < max_iters; ++iter) {
      // A. parents
      if (warp == 0) {
        int np;
        if (!filtered) {
          np = beam::select_parents(beam_s, limit, search_width, s_parents);
        } else {
          const bool full = res_s[limit - 1] != kInvalidSlot;  // valid entries form a prefix
          np = beam::pop_parents(beam_d, beam_s, n_pending, search_width, full ? res_d[limit - 1] : inf_f(),
                                 s_parents);
        }
        if (lane == 0) {
          s_n_parents = np;
          s_n_cand = 0;
          s_reseeded = 0;
        }
      }
      __syncthreads();
      const int np = s_n_parents;
      if (np == 0) break;
      if (filtered) n_pending -= np;

      // B. keep the visited hash at most half full
      if (visited.needs_reset(hash_count, np * m0)) {
        if (filtered) {  // forgetting expanded slots could expand them again: stop instead
          status |= kStatusVisitedFull;
          break;
        }
        visited.clear();
        __syncthreads();
        for (int i = tid; i < limit; i += blockDim.x) {
          const slot_t s = beam_s[i];
          if (s != kInvalidSlot && visited.insert(s & kSlotMask)) atomicAdd(&s_reseeded, 1);
        }
        __syncthreads();
        hash_count = s_reseeded;
      }

      // C. gather the parents' unvisited neighbours (compacted; order does not matter: sorted later)
      for (int pos = tid; pos < np * m0; pos += blockDim.x) {
        const int pi = pos / m0, j = pos - pi * m0;
        const slot_t p = s_parents[pi] & kSlotMask;
        if (j < min(static_cast<int>(degree0[p]), m0)) {
          const slot_t s = links0[static_cast<long long>(p) * m0 + j];
          if (s < static_cast<slot_t>(n_slots) && s != p && visited.insert(s)) cand_s[atomicAdd(&s_n_cand, 1)] = s;
        }
      }
      __syncthreads();
      const int n_cand = s_n_cand;
      hash_count += n_cand;

      // D. distances, one team per candidate
      for (int i0 = 0; i0 < n_cand; i0 += n_teams) {
        const int i = i0 + team;
        const bool ok = i < n_cand;
        const slot_t s = ok ? cand_s[i] : 0;
        const float d = team_distance<T, Team>(q_s, vectors + static_cast<long long>(s) * stride, ok ? n_chunks : 0,
                                               metric);
        if (ok && (tid & (Team - 1)) == 0) cand_d[i] = d;
      }
      __syncthreads();
      if (n_cand == 0) continue;  // uniform: nothing to merge

      // E. pad the candidates to a power of two; filtered mode: the allowed ones for the results
      const int m_pad = bitonic::pow2_ceil(n_cand);
      for (int i = tid; i < m_pad; i += blockDim.x) {
        const bool ok = i < n_cand;
        const slot_t s = ok ? cand_s[i] : kInvalidSlot;
        const float d = ok ? cand_d[i] : inf_f();
        if (!ok) {
          cand_d[i] = d;
          cand_s[i] = s;
        }
        if (filtered) {
          const bool keep = ok && beam::allowed(s, deleted_bits, filter_q);
          cres_d[i] = keep ? d : inf_f();
          cres_s[i] = keep ? s : kInvalidSlot;
        }
      }
      __syncthreads();

      // F. merge: warp 0 into the beam (limit) or pending (Capacity), warp 1 into the results
      if (warp == 0) {
        beam::merge_candidates(beam_d, beam_s, filtered ? Capacity : limit, cand_d, cand_s, m_pad);
      } else if (warp == 1 && filtered) {
        beam::merge_candidates(res_d, res_s, limit, cres_d, cres_s, m_pad);
      }
      __syncthreads();
      if (filtered) {
        if (tid == 0 && n_pending + n_cand > Capacity) {
          // something fell off pending; harmless only if all of it is farther than the worst result
          // of a full result list (never to be expanded then)
          const bool full = res_s[limit - 1] != kInvalidSlot;
          if (!(full && beam_d[Capacity - 1] > res_d[limit - 1])) status |= kStatusPendingOverflow;
        }
        n_pending = min(n_pending + n_cand, Capacity);
      }
    }

    // ---- output: the first k of the results (filtered mode) or of the beam ------------------
    const float* list_d = filtered ? res_d : beam_d;
    const slot_t* list_s = filtered ? res_s : beam_s;
    if (tid == 0) s_found = k;
    __syncthreads();
    for (int j = tid; j < k; j += blockDim.x) {  // valid entries form a prefix of the sorted list
      const bool ok = list_s[j] != kInvalidSlot;
      if (!ok && (j == 0 || list_s[j - 1] != kInvalidSlot)) s_found = j;
      const slot_t s = list_s[j] & kSlotMask;
      o_slots[j] = ok ? s : kInvalidSlot;
      o_dists[j] = ok ? list_d[j] : inf_f();
      if (o_labels != nullptr) o_labels[j] = ok ? labels[s] : kInvalidLabel;
    }
    __syncthreads();
    if (tid == 0) {
      out_found[qi] = s_found;
      if (out_status != nullptr) out_status[qi] = status;
    }
    __syncthreads();  // shared memory is reused by the next query
  }
}
