// search_fixed.cu: batched HNSW search built to hide memory latency: 64-thread blocks, a fixed-degree
// padded level-0 adjacency, the beam merged in registers, deleted and filtered slots traversed.
//
// Semantics: gpuhnsw/_reference_fixed.py (the NumPy reference this kernel is held to, step for step):
//   1. greedy descent through the upper levels from the entry point, as the C search (one list of
//      distances per hop, computed by all teams at once; one block barrier per hop);
//   2. level 0: a beam of `beam` entries (the caller's max(ef, k)); each iteration expands the first
//      `search_width` (1..8) unexpanded beam entries: reads each one's row of `graph` (one row of
//      `degree` slots, no degree array), keeps the unvisited entries, computes their distances and
//      keeps the best `beam` of beam U new; stop when every beam entry is expanded;
//   3. deleted slots (deleted_bits) and slots a filter excludes (filter_bits) are traversed like any
//      other; with either bitset given a second list keeps the best k allowed slots seen (the
//      results), so one deletion changes no query's path;
//   4. answer: the results (a bitset given) or the beam's first k.
// At search_width 1, without a filter or deletions, that is the C search's beam mode.
//
// Two launch modes (SearchFixedArgs::blocks):
//   blocks == 1: one block per query; the visited set is a hash in shared memory, cleared while
//     warp 0 merges and re-filled from the beam and the results (a forgotten slot only costs a
//     repeated distance: visited.cuh); outputs slots, distances, labels, found, status;
//   blocks  > 1: `blocks` blocks per query (small batches: more of the GPU per query); every block
//     descends alike, evaluates the row of the descent's end and keeps ranks b, b + blocks, ... of
//     it as its seeds; the blocks share one visited table in global memory (the workspace, zeroed
//     by the host: GlobalVisited in visited.cuh) and never evaluate a slot twice; each writes its
//     k best to its columns of an [nq, blocks * k] tile, which select_topk_kernel (topk.cu) and
//     gather_merged_kernel (merge.cu) reduce to the answer.  A block whose next iteration could
//     take the table past half full stops and sets kStatusVisitedFull.
// A query holding NaN or an infinity is not searched: found 0, status kStatusBadQuery.
//
// Template parameters change layout only: T (float | gpuhnsw::half_t | gpuhnsw::bf16_t storage; fp32
// accumulation), Team (lanes per distance, 8 / 16 / 32: each lane issues up to kLoadBatch 16-byte
// loads before its arithmetic, distance.cuh), Capacity (32..512 >= beam: the beam and the results
// pass through one warp's registers, Capacity / 32 pairs a lane, warp_sort.cuh).  The instantiation
// list is generated in gpuhnsw/device/kernels.py (instances("search_fixed")); launch bounds
// (64, 16): at most 64 registers, so that 16 blocks (1,024 threads) share a multiprocessor.
//
// Arguments: one SearchFixedArgs, by value (below; gpuhnsw/device/launch.py's SEARCH_FIXED_ARGS is
// its NumPy twin, checked field by field by the NVRTC and emulation tests).
// Launch: block = 64 threads (two warps: warp 0 merges the beam while warp 1 merges the results
// or clears the visited hash), grid = a multiple of `blocks` (query qi's blocks are
// qi * blocks .. qi * blocks + blocks - 1, grid-stride over the queries), dynamic shared memory
// as drawn below (gpuhnsw.device.launch.fixed_shared_bytes computes the same number).
//
// Static shared memory:
//
//   beam     f32[Capacity] | u32[Capacity]   sorted; slots | kExpandedTag once expanded
//   results  f32[Capacity] | u32[Capacity]   a bitset given: the best k allowed slots, sorted
//
// Dynamic shared memory (4-byte words; the query first, so it is 16-byte aligned):
//
//   +------------------------------+ 0
//   | query    f32[stride]         |  zero padded; normalised for cosine
//   +------------------------------+
//   | cand     u32[cc]             |  cc = search_width * degree: one iteration's new slots
//   +------------------------------+
//   | keep     f32[cc] | u32[cc]   |  the new slots that beat the beam's worst (any order)
//   +------------------------------+
//   | keep_res f32[cc] | u32[cc]   |  the allowed new slots that beat the results' worst
//   +------------------------------+
//   | visited  u32[1 << hash_log2] |  blocks == 1 only: (1 << hash_log2) / 2 >=
//   +------------------------------+  beam + k + search_width * degree
//
// One level-0 iteration (3 block barriers; 4 when the hash is reset):
//   C  all threads: the parents' rows -> visited (hash or table) -> new slots appended to cand
//   D  teams: distances of cand -> keep (beats the beam's worst), keep_res (allowed and beats the
//      results' worst)
//   F  warp 0: merge keep into the beam in registers, pick the next parents (first search_width
//      untagged), store the beam; warp 1: merge keep_res into the results; when the hash could pass
//      half full in the next iteration, clear it
//   R  (after a clear) all threads: re-insert the beam's and the results' slots
//
// Device graph: graph u32 [capacity, degree] (HNSW level 0 as the mirror holds it, degree = M0, or
// any fixed-degree adjacency of degree <= 64, padded with kInvalidSlot); the upper levels as in
// search.cu (upper_start, levels, upper_links).  Entries >= n_slots and a row's own slot are skipped.
#include "beam.cuh"
#include "common.cuh"
#include "distance.cuh"
#include "visited.cuh"
#include "warp_sort.cuh"

using gpuhnsw::label_t;
using gpuhnsw::slot_t;

namespace gpuhnsw {

constexpr int kFixedBlock = 64;    // threads per block
constexpr int kMaxWidth = 8;       // search_width
constexpr int kMaxDegree = 64;     // columns of `graph`
constexpr int kMergeChunk = 2;     // registers per lane of a candidate chunk (beyond the first 32)
// The debug counters (out_counts), gpuhnsw._reference.COUNTS' order.
enum FixedCount : int { kIterations, kExpanded, kDistances, kHops, kUpperDistances, kCounts };

// Everything a launch needs, by value: 16 pointers, then 16 ints: no padding anywhere.  Workspace
// of query qi (blocks > 1), 2 + (1 << global_log2) words: | count | table | status | (visited.cuh's
// GlobalVisited, then the status bits of its blocks, read by merge.cu).
struct SearchFixedArgs {
  const void* vectors;            // T [capacity, stride]
  const slot_t* graph;            // [capacity, degree]
  const slot_t* upper_start;      // [capacity]
  const slot_t* upper_links;      // [total]
  const unsigned char* levels;    // [capacity]
  const label_t* labels;          // [capacity]
  const unsigned* deleted_bits;   // [ceil(capacity/32)] or null
  const float* queries;           // [nq, dim]
  const unsigned* filter_bits;    // [nq or 1, filter_stride] or null
  unsigned* workspace;            // blocks > 1: [nq, 2 + (1 << global_log2)] zeroed; else null
  slot_t* out_slots;              // blocks == 1: [nq, k] or null; blocks > 1: [nq, blocks * k]
  float* out_dists;               // blocks == 1: [nq, k]; blocks > 1: [nq, blocks * k]
  label_t* out_labels;            // blocks == 1: [nq, k] or null; blocks > 1: unused
  int* out_found;                 // [nq]; -1: bad launch configuration; blocks > 1: 0 (merge.cu sets it)
  int* out_status;                // [nq] kStatus* bits; blocks > 1: unused (workspace word 1)
  int* out_counts;                // [nq, 5] or null: level-0 iterations, lists read, distances,
                                  //   descent hops, descent distances (blocks > 1: zeroed by the
                                  //   caller; iterations and hops the most of any block, the rest summed)
  int filter_stride;              // words per query; 0: one bitset for every query
  int stride;                     // elements per row, 16-byte multiple
  int metric;                     // gpuhnsw::Metric
  int degree;                     // columns of graph, 1..64
  int m;                          // M (upper-level list size)
  int n_slots;                    // slots in use (count)
  int entry_point;                // -1: empty index
  int max_level;
  int nq, dim;
  int k;                          // 1 <= k <= beam
  int beam;                       // max(ef, k) <= Capacity
  int search_width;               // 1..8
  int hash_log2;                  // blocks == 1: the shared visited hash, log2 of its size
  int blocks;                     // blocks per query
  int global_log2;                // blocks > 1: the shared visited table, log2 of its size
};

}  // namespace gpuhnsw

GPUHNSW_KERNEL(typename T, int Team, int Capacity)
    search_fixed_kernel(const gpuhnsw::SearchFixedArgs args) {
  using namespace gpuhnsw;
  static_assert(Team == 8 || Team == 16 || Team == 32, "team of 8..32 lanes");
  static_assert(Capacity >= 32 && Capacity <= 256 && (Capacity & (Capacity - 1)) == 0, "capacity: 32..256");
  constexpr int N = Capacity / 32;                        // beam pairs per lane of warp 0
  constexpr int C = N < kMergeChunk ? N : kMergeChunk;    // candidate pairs per lane in a merge chunk
  const T* __restrict__ vectors = static_cast<const T*>(args.vectors);
  const slot_t* __restrict__ graph = args.graph;
  // the sizes as references: read from the parameter bank where used, not held in registers
  const int &stride = args.stride, &metric = args.metric, &degree = args.degree, &m = args.m;
  const int &n_slots = args.n_slots, &entry_point = args.entry_point, &max_level = args.max_level;
  const int &nq = args.nq, &dim = args.dim, &k = args.k, &limit = args.beam, &width = args.search_width;
  const int &hash_log2 = args.hash_log2, &blocks = args.blocks, &global_log2 = args.global_log2;

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float beam_d[Capacity], res_d[Capacity];
  __shared__ slot_t beam_s[Capacity], res_s[Capacity];
  __shared__ float s_scratch[32];
  __shared__ slot_t s_parents[kMaxWidth];
  __shared__ float s_best_d[2][2];        // descent: per hop parity and warp, the best (d, position)
  __shared__ slot_t s_best_i[2][2];
  __shared__ int s_np, s_n_cand, s_n_keep, s_n_keep_res, s_reseeded, s_stop, s_found;
  __shared__ int s_counts[kCounts];       // the debug counters (gpuhnsw._reference.COUNTS' order)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int team = tid / Team;
  constexpr int kTeams = kFixedBlock / Team;
  const int n_chunks = stride / Storage<T>::kPerChunk;
  const bool filtered = args.deleted_bits != nullptr || args.filter_bits != nullptr;
  const bool counting = args.out_counts != nullptr;
  const int cc = width * degree;

  // A launch configuration that would break an invariant gives found = -1 instead of a hang.
  const bool bad = blockDim.x != kFixedBlock || width < 1 || width > kMaxWidth || degree < 1 ||
                   degree > kMaxDegree || m < 0 || limit < 1 || limit > Capacity || k < 1 || k > limit ||
                   stride % Storage<T>::kPerChunk != 0 || blocks < 1 || gridDim.x % blocks != 0 ||
                   (blocks == 1 && (hash_log2 < 5 || hash_log2 > 30 ||
                                    (1 << (hash_log2 - 1)) < limit + k + cc)) ||
                   (blocks > 1 && (args.workspace == nullptr || global_log2 < 5 || global_log2 > 30 ||
                                   (1ll << (global_log2 - 1)) < static_cast<long long>(blocks) * cc + degree + 1));
  if (bad) {
    for (int qi = blockIdx.x * blockDim.x + tid; qi < nq; qi += gridDim.x * blockDim.x) args.out_found[qi] = -1;
    return;
  }

  float* q_s = reinterpret_cast<float*>(smem);
  slot_t* cand_s = reinterpret_cast<slot_t*>(q_s + stride);
  float* keep_d = reinterpret_cast<float*>(cand_s + cc);
  slot_t* keep_s = reinterpret_cast<slot_t*>(keep_d + cc);
  float* kres_d = reinterpret_cast<float*>(keep_s + cc);
  slot_t* kres_s = reinterpret_cast<slot_t*>(kres_d + cc);
  const VisitedHash hash{reinterpret_cast<slot_t*>(kres_s + cc), hash_log2};

  const int b = blockIdx.x % blocks;                       // this block's rank among its query's
  for (int qi = blockIdx.x / blocks; qi < nq; qi += gridDim.x / blocks) {
    // (pointers derived from qi where they are used: fewer registers live through the search)
    auto filter_q = [&]() -> const unsigned* {
      return args.filter_bits == nullptr ? nullptr : args.filter_bits + static_cast<long long>(args.filter_stride) * qi;
    };
    auto table = [&]() -> GlobalVisited {
      return GlobalVisited{args.workspace + static_cast<long long>(qi) * ((1ll << global_log2) + 2), global_log2};
    };
    int status = 0;                                        // kStatus* bits, kept by thread 0
    if (tid < kCounts) s_counts[tid] = 0;                  // read after the output's barrier
    if (blocks > 1 && b == 0 && tid == 0) args.out_found[qi] = 0;

    const bool ok_query = load_query_checked(q_s, args.queries + static_cast<long long>(qi) * dim, dim, stride,
                                             metric, s_scratch);
    if (!ok_query) status = kStatusBadQuery;
    // ---- descent: per level, move to the best neighbour while it improves (one barrier a hop) ----
    slot_t cur = kInvalidSlot;
    float cur_d = inf_f();
    if (ok_query && entry_point >= 0 && entry_point < n_slots) {
      cur = static_cast<slot_t>(entry_point);
      cur_d = team_distance_batched<T, Team>(q_s, vectors + static_cast<long long>(cur) * stride, n_chunks, metric);
      // every team computed it: each lane holds the same value
      if (counting && tid == 0) atomicAdd(&s_counts[kUpperDistances], 1);
      int parity = 0;
      for (int level = max_level; level >= 1; --level) {
        while (true) {
          const slot_t start = args.upper_start[cur];
          // a slot below `level` has no block there (reading one would run into another slot's)
          const bool has = start != kInvalidSlot && args.levels[cur] >= level;
          const slot_t* blk =
              args.upper_links + (has ? static_cast<long long>(start) + static_cast<long long>(level - 1) * (m + 1) : 0);
          const int cnt = has ? min(static_cast<int>(blk[0]), m) : 0;
          float best = inf_f();
          slot_t best_i = kInvalidSlot;
          for (int i0 = 0; i0 < cnt; i0 += kTeams) {  // uniform trip count: the team shuffles need it
            const int i = i0 + team;
            const slot_t s = i < cnt ? blk[1 + i] : kInvalidSlot;
            const bool ok = s < static_cast<slot_t>(n_slots) && s != cur;
            const float d = team_distance_batched<T, Team>(q_s, vectors + (ok ? static_cast<long long>(s) * stride : 0),
                                                           ok ? n_chunks : 0, metric);
            if (ok && pair_less(d, static_cast<slot_t>(i), best, best_i)) {
              best = d;
              best_i = static_cast<slot_t>(i);
            }
            if (counting && ok && (tid & (Team - 1)) == 0) atomicAdd(&s_counts[kUpperDistances], 1);
          }
          warp_min_pair(best, best_i);  // the warp's first best in stored order
          if (lane == 0) {
            s_best_d[parity][warp] = best;
            s_best_i[parity][warp] = best_i;
          }
          if (counting && tid == 0) ++s_counts[kHops];
          __syncthreads();  // a hop's pair is rewritten two hops later, after the next barrier
          if (pair_less(s_best_d[parity][1], s_best_i[parity][1], best, best_i)) {
            best = s_best_d[parity][1];
            best_i = s_best_i[parity][1];
          }
          if (pair_less(s_best_d[parity][0], s_best_i[parity][0], best, best_i)) {
            best = s_best_d[parity][0];
            best_i = s_best_i[parity][0];
          }
          parity ^= 1;
          if (best_i == kInvalidSlot || !(best < cur_d)) break;
          cur = blk[1 + best_i];
          cur_d = best;
        }
      }
    }

    // ---- level 0: beam, results, visited; the first parents (or the seeds) -----------------
    for (int i = tid; i < Capacity; i += kFixedBlock) {
      beam_d[i] = inf_f();
      beam_s[i] = kInvalidSlot;
      res_d[i] = inf_f();
      res_s[i] = kInvalidSlot;
    }
    if (blocks == 1) hash.clear();
    if (tid == 0) {
      s_np = 0;
      s_n_cand = s_n_keep = s_n_keep_res = 0;
      s_stop = 0;
    }
    __syncthreads();
    int hash_count = 0;  // slots in the visited hash (blocks == 1); the same value in every thread
    if (cur != kInvalidSlot && tid == 0) {
      const bool first = blocks == 1 || b == 0;   // the block that holds cur itself
      if (first) {
        beam_d[0] = cur_d;
        beam_s[0] = cur | kExpandedTag;
        if (filtered && beam::allowed(cur, args.deleted_bits, filter_q())) {
          res_d[0] = cur_d;
          res_s[0] = cur;
        }
      }
      if (blocks == 1) {
        hash.insert(cur);
        s_parents[0] = cur;
        s_np = 1;
      }
    }
    __syncthreads();
    if (blocks == 1) hash_count = 1;
    if (cur != kInvalidSlot && blocks > 1) {
      // the seed round: cur's row, evaluated alike by every block; block b keeps ranks b, b + blocks, ...
      if (tid == 0) table().insert(cur);
      if (tid < degree) {
        const slot_t s = graph[static_cast<long long>(cur) * degree + tid];
        const bool ok = s < static_cast<slot_t>(n_slots) && s != cur;
        cand_s[tid] = ok ? s : kInvalidSlot;
        if (ok) table().insert(s);
      }
      __syncthreads();
      for (int i0 = 0; i0 < degree; i0 += kTeams) {
        const int i = i0 + team;
        const slot_t s = i < degree ? cand_s[i] : kInvalidSlot;
        const bool ok = s != kInvalidSlot;
        const float d = team_distance_batched<T, Team>(q_s, vectors + (ok ? static_cast<long long>(s) * stride : 0),
                                                       ok ? n_chunks : 0, metric);
        if (i < degree && (tid & (Team - 1)) == 0) {
          keep_d[i] = ok ? d : inf_f();
          keep_s[i] = s;
        }
      }
      __syncthreads();
      if (warp == 0) {
        float d[2];
        slot_t s[2];
        warp_sort::load<2>(d, s, keep_d, keep_s, degree);
        warp_sort::sort<2>(d, s);
        __syncwarp();
        int rank = 0, kept = 0, kept_res = 0;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          // a repeated slot (a row being rewritten may hold one twice) sorts next to its twin
          const slot_t up = __shfl_up_sync(kFullMask, s[j], 1);
          const slot_t last = __shfl_sync(kFullMask, s[j > 0 ? j - 1 : 0], 31);
          const slot_t prev = lane > 0 ? up : (j > 0 ? last : kInvalidSlot);
          const bool fresh = s[j] != kInvalidSlot && s[j] != prev;
          const unsigned ballot = __ballot_sync(kFullMask, fresh);
          const int r = rank + __popc(ballot & ((1u << lane) - 1u));
          rank += __popc(ballot);
          const bool mine = fresh && r % blocks == b;
          if (mine) {
            keep_d[r / blocks] = d[j];
            keep_s[r / blocks] = s[j];
          }
          const bool res = mine && filtered && beam::allowed(s[j], args.deleted_bits, filter_q());
          const unsigned res_ballot = __ballot_sync(kFullMask, res);
          if (res) {
            const int at = kept_res + __popc(res_ballot & ((1u << lane) - 1u));
            kres_d[at] = d[j];
            kres_s[at] = s[j];
          }
          kept_res += __popc(res_ballot);
          kept += __popc(__ballot_sync(kFullMask, mine));
        }
        if (lane == 0) {
          s_n_keep = kept;
          s_n_keep_res = kept_res;
        }
        if (counting && lane == 0) {
          s_counts[kIterations] = s_counts[kExpanded] = 1;
          for (int i = 0; i < degree; ++i) s_counts[kDistances] += cand_s[i] != kInvalidSlot;
        }
      }
      __syncthreads();
    }

    // ---- level 0 iterations; the seed round (blocks > 1) enters at the merge ----------------
    bool merge_first = blocks > 1 && cur != kInvalidSlot;
    while (cur != kInvalidSlot) {
      if (!merge_first) {
        const int np = s_np;
        if (np == 0 || s_stop) {
          if (s_stop && tid == 0) status |= kStatusVisitedFull;
          break;
        }
        // C. the parents' rows -> visited -> new slots (compacted; order does not matter: sorted later)
        for (int pos = tid; pos < np * degree; pos += kFixedBlock) {
          const int pi = pos / degree;
          const slot_t p = s_parents[pi];
          const slot_t s = graph[static_cast<long long>(p) * degree + (pos - pi * degree)];
          if (s < static_cast<slot_t>(n_slots) && s != p && (blocks == 1 ? hash.insert(s) : table().insert(s)))
            cand_s[atomicAdd(&s_n_cand, 1)] = s;
        }
        __syncthreads();
        const int n_cand = s_n_cand;
        hash_count += n_cand;
        if (counting && tid == 0) {
          ++s_counts[kIterations];
          s_counts[kExpanded] += np;
          s_counts[kDistances] += n_cand;
        }
        // D. distances, one team per candidate; keep what can enter the beam or the results
        for (int i0 = 0; i0 < n_cand; i0 += kTeams) {
          const int i = i0 + team;
          const bool ok = i < n_cand;
          const slot_t s = ok ? cand_s[i] : 0;
          const float d = team_distance_batched<T, Team>(q_s, vectors + static_cast<long long>(s) * stride,
                                                         ok ? n_chunks : 0, metric);
          if (ok && (tid & (Team - 1)) == 0) {
            if (pair_less(d, s, beam_d[limit - 1], beam_s[limit - 1])) {  // (the worst entries, in shared memory)
              const int at = atomicAdd(&s_n_keep, 1);
              keep_d[at] = d;
              keep_s[at] = s;
            }
            if (filtered && pair_less(d, s, res_d[k - 1], res_s[k - 1]) &&
                beam::allowed(s, args.deleted_bits, filter_q())) {
              const int at = atomicAdd(&s_n_keep_res, 1);
              kres_d[at] = d;
              kres_s[at] = s;
            }
          }
        }
        __syncthreads();
      }
      merge_first = false;
      // F. warp 0 merges the beam and picks the next parents; warp 1 (a bitset given) merges the
      //    results, then clears the hash when the next iteration could take it past half full
      const bool reset = blocks == 1 && hash.needs_reset(hash_count, cc);
      if (warp == 0 || filtered) {  // one copy of the merge code for both lists
        float* list_d = warp == 0 ? beam_d : res_d;
        slot_t* list_s = warp == 0 ? beam_s : res_s;
        float d[N];
        slot_t s[N];
        warp_sort::load<N>(d, s, list_d, list_s, Capacity);
        warp_sort::merge_unsorted<N, C>(d, s, warp == 0 ? limit : k, warp == 0 ? keep_d : kres_d,
                                        warp == 0 ? keep_s : kres_s, warp == 0 ? s_n_keep : s_n_keep_res);
        warp_sort::store<N>(list_d, list_s, d, s, Capacity);
      }
      __syncwarp();
      if (warp == 0) {
        int taken = 0;
        for (int i0 = 0; i0 < limit && taken < width; i0 += 32) {  // the first `width` untagged entries
          const int i = i0 + lane;
          const slot_t s = i < limit ? beam_s[i] : kInvalidSlot;
          const bool open = (s & kExpandedTag) == 0;   // padding (kInvalidSlot) carries the tag
          const unsigned ballot = __ballot_sync(kFullMask, open);
          const int rank = taken + __popc(ballot & ((1u << lane) - 1u));
          if (open && rank < width) {
            s_parents[rank] = s;
            beam_s[i] = s | kExpandedTag;
          }
          taken += __popc(ballot);
        }
        if (lane == 0) {
          const int np = min(taken, width);
          s_np = np;
          s_n_cand = 0;
          s_n_keep = 0;
          // blocks > 1: stop before an iteration that could take the shared table past half full
          s_stop = blocks > 1 && np > 0 && table().would_fill(np * degree);
        }
      } else {
        if (reset) hash.clear_warp();
        if (lane == 0) {
          s_n_keep_res = 0;
          s_reseeded = 0;
        }
      }
      __syncthreads();
      // R. after a clear: the beam's and the results' slots back into the hash
      if (reset) {
        for (int i = tid; i < limit + (filtered ? k : 0); i += kFixedBlock) {
          const slot_t s = (i < limit ? beam_s[i] : res_s[i - limit]) & kSlotMask;
          if (s != kSlotMask && hash.insert(s)) atomicAdd(&s_reseeded, 1);
        }
        __syncthreads();
        hash_count = s_reseeded;
      }
    }

    // ---- output: the first k of the results (a bitset given) or of the beam -----------------
    const float* list_d = filtered ? res_d : beam_d;
    const slot_t* list_s = filtered ? res_s : beam_s;
    if (tid == 0) s_found = 0;
    __syncthreads();
    const long long out_at = static_cast<long long>(blocks) * k * qi + b * k;   // blocks > 1: the tile
    for (int j = tid; j < k; j += kFixedBlock) {  // valid entries form a prefix of the sorted list
      const bool ok = list_s[j] != kInvalidSlot;
      if (ok && (j == k - 1 || list_s[j + 1] == kInvalidSlot)) s_found = j + 1;
      const slot_t s = list_s[j] & kSlotMask;
      if (args.out_slots != nullptr) args.out_slots[out_at + j] = ok ? s : kInvalidSlot;
      args.out_dists[out_at + j] = ok ? list_d[j] : inf_f();
      if (blocks == 1 && args.out_labels != nullptr) {
        args.out_labels[static_cast<long long>(qi) * k + j] = ok ? args.labels[s] : kInvalidLabel;
      }
    }
    __syncthreads();
    if (tid == 0) {
      if (blocks == 1) {
        args.out_found[qi] = s_found;
        args.out_status[qi] = status;
      } else if (status != 0) {
        atomicOr(table().count + 1 + (1 << global_log2), static_cast<unsigned>(status));
      }
      if (counting) {
        int* c = args.out_counts + static_cast<long long>(kCounts) * qi;
        for (int i = 0; i < kCounts; ++i) {
          if (blocks == 1) c[i] = s_counts[i];
          else if (i == kIterations || i == kHops) atomicMax(c + i, s_counts[i]);
          else atomicAdd(c + i, s_counts[i]);
        }
      }
    }
    __syncthreads();  // shared memory is reused by the next query
  }
}
