"""How gpuhnsw's kernels are launched: the launch arithmetic the kernels' shared-memory drawings
describe, and the launchers, the only Python that knows a kernel's arguments and their order.

* :func:`search`: ``search_beam_kernel`` takes one ``gpuhnsw::SearchArgs`` (kernels/search.cu) by
  value, built from :data:`SEARCH_ARGS`, the NumPy dtype of that struct (its offsets and size are
  checked against the CUDA struct by the NVRTC and emulation tests);
* :func:`search_fixed`: ``search_fixed_kernel`` (kernels/search_fixed.cu) the same way, from
  :data:`SEARCH_FIXED_ARGS`; :func:`gather_merged` the last step of its multi-block mode;
* :func:`distances`, :func:`topk`, :func:`scatter`: the other kernels' argument lists;
* :func:`gemm`: the screening products of exact search and GPU NN-descent's joins on cuBLAS
  (``cublasGemmEx`` / ``cublasGemmStridedBatchedEx``: reduced-precision inputs, float32
  accumulation), the one call into cuBLAS that is not CuPy's own;
* :func:`plan_search` picks the search instantiation, visited hash and shared memory for a batch
  (:func:`search_launch`), and opts the kernel into more than 48 KiB of shared memory where needed;
  :func:`fixed_launch` does the same for ``search_fixed_kernel``, with the blocks per query;
* :func:`search_kernel`: which of the two search kernels a GPU index uses (the one switch,
  ``GHNSW_SEARCH_KERNEL``).

Shapes and dtypes of every array: kernels/README.md ("Shape conventions").
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import kernels
from .arrays import import_cupy
from .kernels import SEARCH_CAPACITIES, TOPK_CAPACITIES

__all__ = ["SEARCH_ARGS", "SEARCH_FIXED_ARGS", "SearchLaunch", "FixedLaunch", "search_launch", "plan_search",
           "fixed_launch", "plan_fixed", "search", "search_fixed", "gather_merged", "distances", "topk", "scatter", "gemm",
           "row_stride", "team_size", "fixed_team_size", "beam_capacity", "fixed_capacity", "topk_capacity",
           "search_hash_log2", "fixed_hash_log2", "fixed_global_log2", "fixed_blocks", "fixed_block_beam",
           "search_shared_bytes", "fixed_shared_bytes", "workspace_words", "distance_shared_bytes",
           "topk_shared_bytes", "DEFAULT_SHARED_LIMIT", "SEARCH_KERNELS", "search_kernel", "LOAD_BATCH",
           "MAX_FIXED_WIDTH", "MAX_FIXED_DEGREE", "FIXED_COUNTERS", "STATUS_VISITED_FULL", "STATUS_BAD_QUERY"]

#: Bytes of one storage element.
_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

#: The search kernels a GPU index can use: ``"beam"`` (``search_beam_kernel``, the default until a
#: device run shows the other faster everywhere) and ``"fixed"`` (``search_fixed_kernel``).
SEARCH_KERNELS = ("beam", "fixed")
#: 16-byte loads a lane of search_fixed_kernel's distance team issues before its arithmetic
#: (kLoadBatch in kernels/distance.cuh; the NVRTC test checks the two agree).
LOAD_BATCH = 2
#: search_fixed_kernel's limits (kMaxWidth, kMaxDegree in kernels/search_fixed.cu).
MAX_FIXED_WIDTH = 8
MAX_FIXED_DEGREE = 64
#: Its debug counters per query (kCounts: gpuhnsw._reference.COUNTS, in that order).
FIXED_COUNTERS = 5
#: Its status bits (kernels/common.cuh): the shared visited table would have passed half full (a
#: block stopped early); the query holds NaN or an infinity (not searched).
STATUS_VISITED_FULL = 1
STATUS_BAD_QUERY = 4


def search_kernel(storage, search_graph="hnsw"):
    """The search kernel a GPU index with rows of ``storage`` uses: the environment's
    ``GHNSW_SEARCH_KERNEL`` (``"beam"`` by default, or ``"fixed"``), except that bfloat16 rows and
    the ``"optimized"`` search graph only ``search_fixed_kernel`` reads.  ValueError for another
    name."""
    choice = os.environ.get("GHNSW_SEARCH_KERNEL", "beam")
    if choice not in SEARCH_KERNELS:
        raise ValueError(f"GHNSW_SEARCH_KERNEL must be one of {', '.join(SEARCH_KERNELS)}, got {choice!r}")
    return "fixed" if storage not in kernels.BEAM_STORAGES or search_graph != "hnsw" else choice


# ---------------------------------------------------------------------------------------------
# launch arithmetic (mirrors the shared-memory drawings in kernels/*.cu)


def row_stride(dim, dtype="float32"):
    """Elements per stored row: `dim` rounded up to a whole number of 16-byte chunks."""
    per_chunk = 16 // _ELEMENT_BYTES[dtype]
    return -(-int(dim) // per_chunk) * per_chunk


def team_size(dim, dtype="float32"):
    """Lanes per distance for rows of `dim` elements: the smallest power of two >= the number of
    16-byte chunks, clamped to [4, 32] (128 fp32 dims -> 32 chunks -> a full warp)."""
    chunks = row_stride(dim, dtype) * _ELEMENT_BYTES[dtype] // 16
    team = 4
    while team < chunks and team < 32:
        team *= 2
    return team


def _bucket(n, buckets, what):
    for cap in buckets:
        if n <= cap:
            return cap
    raise ValueError(f"{what} = {n} exceeds the largest kernel capacity {buckets[-1]}")


def beam_capacity(beam, filtered=False):
    """The search capacity bucket for a beam width ``beam`` (``SearchParams.beam``: ``max(ef, k)``);
    ValueError when no bucket holds it.

    Beam mode: the smallest bucket holding ``beam``. Filtered mode (a filter or deletions): the
    buffer is the pending-candidate list, which hnswlib's search lets grow past the beam, so ask for
    4 * beam, as far as the largest bucket allows.
    """
    beam = int(beam)
    cap = _bucket(beam, SEARCH_CAPACITIES, "the beam width max(ef, k)")
    if filtered:
        cap = max(cap, min(_pow2_ceil(4 * beam), SEARCH_CAPACITIES[-1]))
    return cap


def topk_capacity(k):
    """The smallest top-k capacity bucket holding k (ValueError when none does)."""
    return _bucket(int(k), TOPK_CAPACITIES, "k")


def search_hash_log2(capacity, search_width, m0, min_log2=10):
    """log2 of the visited-hash size: half of it must hold 2 * capacity + search_width * m0
    (the beam and results after a reset, plus one iteration's insertions)."""
    need = 2 * (2 * int(capacity) + int(search_width) * int(m0))
    log2 = max(int(min_log2), 5)
    while (1 << log2) < need:
        log2 += 1
    return log2


def _pow2_ceil(n):
    p = 1
    while p < n:
        p *= 2
    return p


def search_shared_bytes(stride, search_width, m0, m, hash_log2):
    """Dynamic shared memory of ``search_beam_kernel`` in bytes (see kernels/search.cu): the query,
    two candidate buffers of pow2_ceil(max(search_width * m0, m)) pairs, the visited hash. The beam
    and result lists are static shared memory (16 * Capacity bytes)."""
    cand = _pow2_ceil(max(int(search_width) * int(m0), int(m), 1))
    return 4 * (int(stride) + 4 * cand + (1 << int(hash_log2)))


#: Shared memory a block may use without the opt-in (static plus dynamic), every architecture.
DEFAULT_SHARED_LIMIT = 48 * 1024


@dataclass(frozen=True)
class SearchLaunch:
    """One launch of ``search_beam_kernel``: the instantiation (storage, team, capacity), the
    visited hash (log2 of its size) and the dynamic shared memory in bytes."""
    instance: tuple
    hash_log2: int
    shared_bytes: int


def search_launch(dim, storage, m, m0, beam, search_width, filtered, static_bytes, limit):
    """The launch of ``search_beam_kernel`` for a batch, or None when none fits the device (the
    caller answers on the CPU).

    Parameters
    ----------
    dim, storage, m, m0 : the mirror's row width, storage dtype name, M and M0
    beam, search_width : the query's beam width (``max(ef, k)`` <= 512) and parents per iteration
    filtered : bool, a filter or deleted elements (the pending-list mode, a larger capacity)
    static_bytes : callable, instance -> the instantiation's static shared memory in bytes (what
        CUDA reports for the loaded kernel at run time; ptxas -v in the CI check)
    limit : int, shared memory per block with the opt-in (``kernels.shared_limit(device)``)

    The preferred visited hash first (2**10 slots, 2**13 filtered: fewer resets and fewer
    hash-full rows); where static plus dynamic memory would not fit, the smallest hash that holds
    one iteration (more resets in beam mode, more rows answered on the CPU in filtered mode).
    """
    instance = (storage, team_size(dim, storage), beam_capacity(beam, filtered))
    static = int(static_bytes(instance))
    stride = row_stride(dim, storage)
    for min_log2 in (13 if filtered else 10, 5):
        log2 = search_hash_log2(instance[2], search_width, m0, min_log2)
        dynamic = search_shared_bytes(stride, search_width, m0, m, log2)
        if static + dynamic <= limit:
            return SearchLaunch(instance, log2, dynamic)
    return None


def distance_shared_bytes(stride):
    """Dynamic shared memory of ``compute_distances_kernel`` in bytes: the fp32 query row."""
    return 4 * int(stride)


def topk_shared_bytes(capacity, n_warps):
    """Dynamic shared memory of ``select_topk_kernel`` in bytes (see kernels/topk.cu): the running
    result (12 bytes per entry) and, per warp, a list and a buffer of `capacity` pairs."""
    return 12 * int(capacity) + 16 * int(n_warps) * int(capacity)


# ---------------------------------------------------------------------------------------------
# search_fixed_kernel's launch arithmetic (kernels/search_fixed.cu)

def fixed_team_size(dim, dtype="float16"):
    """Lanes per distance of ``search_fixed_kernel``: enough that each lane issues at most
    :data:`LOAD_BATCH` 16-byte loads per row (one round of loads, then the arithmetic), a power of
    two in [8, 32] (128 fp16 dims: 16 chunks -> 8 lanes of 2; rows past 64 chunks take several
    rounds)."""
    chunks = row_stride(dim, dtype) * _ELEMENT_BYTES[dtype] // 16
    team = 8
    while team * LOAD_BATCH < chunks and team < 32:
        team *= 2
    return team


def fixed_capacity(beam):
    """The smallest ``search_fixed_kernel`` capacity holding the beam width ``beam``, or None (the
    beam kernel answers: its buffers go to 512)."""
    for cap in kernels.FIXED_CAPACITIES:
        if int(beam) <= cap:
            return cap
    return None


def fixed_hash_log2(beam, k, search_width, degree, min_log2=10):
    """log2 of the shared visited hash of a one-block-per-query launch: half of it must hold the
    beam and the results after a reset plus one iteration's insertions."""
    need = 2 * (int(beam) + int(k) + int(search_width) * int(degree))
    log2 = max(int(min_log2), 5)
    while (1 << log2) < need:
        log2 += 1
    return log2


def fixed_global_log2(blocks, search_width, degree, min_log2=15):
    """log2 of the visited table the blocks of one query share: 2**15 slots by default (128 KiB a
    query); half of it must hold every block's insertions past the check plus the seed round."""
    need = 2 * (int(blocks) * int(search_width) * int(degree) + int(degree) + 1)
    log2 = max(int(min_log2), 5)
    while (1 << log2) < need:
        log2 += 1
    return log2


def workspace_words(global_log2):
    """Words of one query's workspace in the multi-block mode: count, table, status."""
    return 2 + (1 << int(global_log2))


def fixed_blocks(nq, multiprocessors):
    """Blocks per query: one while the batch fills about twice the multiprocessors, else up to 8
    (a power of two) so that a small batch still spreads over the GPU.  A first rule, to be tuned
    by the device run (benchmarks/device_check.sh)."""
    nq, target = max(1, int(nq)), 2 * int(multiprocessors)
    blocks = 1
    while blocks < 8 and nq * blocks * 2 <= target:
        blocks *= 2
    return blocks


def fixed_block_beam(beam, k, blocks):
    """The beam of each block when ``blocks`` search one query: the blocks share the work, so each
    keeps ``max(k, ceil(2 * beam / blocks))`` (all of it with one block).  A first rule from the
    replay of benchmarks/search_replay.py, to be tuned by the device run."""
    if blocks <= 1:
        return int(beam)
    return max(int(k), -(-2 * int(beam) // int(blocks)))


def fixed_shared_bytes(stride, search_width, degree, hash_log2, blocks):
    """Dynamic shared memory of ``search_fixed_kernel`` in bytes (see kernels/search_fixed.cu): the
    query, one iteration's new slots and the two kept lists of pairs, and with one block per query
    the visited hash. The beam and the results are static shared memory (16 * Capacity bytes)."""
    cc = int(search_width) * int(degree)
    return 4 * (int(stride) + 5 * cc + ((1 << int(hash_log2)) if int(blocks) == 1 else 0))


@dataclass(frozen=True)
class FixedLaunch:
    """One launch of ``search_fixed_kernel``: the instantiation (storage, team, capacity), blocks per
    query and each block's beam, the visited hash (blocks == 1) or shared table (blocks > 1), log2 of
    its size, and the dynamic shared memory in bytes."""
    instance: tuple
    blocks: int
    beam: int
    hash_log2: int
    global_log2: int
    shared_bytes: int


def fixed_launch(dim, storage, degree, k, beam, search_width, blocks, static_bytes, limit):
    """The launch of ``search_fixed_kernel`` for a batch, or None where it cannot take it (a beam
    past 256, a degree past 64, a width past 8, or no hash that fits the shared memory): the beam
    kernel answers then.

    Parameters
    ----------
    dim, storage : the mirror's row width and storage dtype name
    degree : columns of the level-0 adjacency (M0 for HNSW level 0)
    k, beam, search_width : the query's; blocks : blocks per query (:func:`fixed_blocks`)
    static_bytes : callable, instance -> its static shared memory in bytes
    limit : int, shared memory per block with the opt-in
    """
    block_beam = fixed_block_beam(beam, k, blocks)
    cap = fixed_capacity(block_beam)
    if cap is None or int(degree) > MAX_FIXED_DEGREE or int(search_width) > MAX_FIXED_WIDTH:
        return None
    instance = (storage, fixed_team_size(dim, storage), cap)
    static = int(static_bytes(instance))
    stride = row_stride(dim, storage)
    global_log2 = fixed_global_log2(blocks, search_width, degree) if blocks > 1 else 0
    for min_log2 in (10, 5):
        log2 = fixed_hash_log2(block_beam, k, search_width, degree, min_log2) if blocks == 1 else 0
        dynamic = fixed_shared_bytes(stride, search_width, degree, log2, blocks)
        if static + dynamic <= limit:
            return FixedLaunch(instance, int(blocks), block_beam, log2, global_log2, dynamic)
    return None


# ---------------------------------------------------------------------------------------------
# the launchers

#: ``gpuhnsw::SearchArgs`` (kernels/search.cu), field by field: pointers as device addresses
#: (0: null), then the 64-bit stride, then the ints; no padding anywhere (184 bytes).
SEARCH_ARGS = np.dtype([
    ("vectors", np.uint64), ("links0", np.uint64), ("degree0", np.uint64), ("upper_start", np.uint64),
    ("upper_links", np.uint64), ("levels", np.uint64), ("labels", np.uint64), ("deleted_bits", np.uint64),
    ("queries", np.uint64), ("filter_bits", np.uint64), ("filter_stride", np.int64),
    ("out_slots", np.uint64), ("out_dists", np.uint64), ("out_labels", np.uint64), ("out_found", np.uint64),
    ("out_status", np.uint64),
    ("stride", np.int32), ("metric", np.int32), ("m0", np.int32), ("m", np.int32), ("n_slots", np.int32),
    ("entry_point", np.int32), ("max_level", np.int32), ("nq", np.int32), ("dim", np.int32), ("k", np.int32),
    ("beam", np.int32), ("search_width", np.int32), ("hash_log2", np.int32), ("max_iters", np.int32),
])
#: ``gpuhnsw::SearchFixedArgs`` (kernels/search_fixed.cu): 16 pointers (0: null), then 16 ints
#: (192 bytes, no padding).
SEARCH_FIXED_ARGS = np.dtype(
    [(name, np.uint64) for name in ("vectors", "graph", "upper_start", "upper_links", "levels", "labels",
                                     "deleted_bits", "queries", "filter_bits", "workspace", "out_slots", "out_dists",
                                     "out_labels", "out_found", "out_status", "out_counts")]
    + [(name, np.int32) for name in ("filter_stride", "stride", "metric", "degree", "m", "n_slots", "entry_point",
                                      "max_level", "nq", "dim", "k", "beam", "search_width", "hash_log2", "blocks",
                                      "global_log2")])
_POINTERS = frozenset(name for args in (SEARCH_ARGS, SEARCH_FIXED_ARGS)
                      for name, (dtype, _) in args.fields.items() if dtype == np.uint64)


def _address(array):
    """The device address of a CuPy array, 0 for None (a null pointer)."""
    return 0 if array is None else int(array.data.ptr)


def plan_search(device, dim, storage, m, m0, beam, search_width, filtered):
    """(SearchLaunch, kernel) of a search on ``device`` (:func:`search_launch`), or (None, None)
    where no launch fits its shared memory."""
    launch = search_launch(dim, storage, m, m0, beam, search_width, filtered,
                           lambda inst: kernels.get_kernel("search", inst, device).shared_size_bytes,
                           kernels.shared_limit(device))
    return (None, None) if launch is None else (launch, _opted_in("search", launch, device))


def plan_fixed(device, dim, storage, degree, k, beam, search_width, blocks):
    """(FixedLaunch, kernel) of a ``search_fixed_kernel`` launch on ``device`` (:func:`fixed_launch`),
    or (None, None) where it cannot take the batch."""
    launch = fixed_launch(dim, storage, degree, k, beam, search_width, blocks,
                          lambda inst: kernels.get_kernel("search_fixed", inst, device).shared_size_bytes,
                          kernels.shared_limit(device))
    return (None, None) if launch is None else (launch, _opted_in("search_fixed", launch, device))


def _opted_in(module, launch, device):
    """The kernel of ``launch``, opted into more than 48 KiB of dynamic shared memory where the
    launch needs it: to all the device allows, a permission, not a reservation, so every launch of
    the kernel (other parameters, other indexes) stays covered."""
    kernel = kernels.get_kernel(module, launch.instance, device)
    if kernel.shared_size_bytes + launch.shared_bytes > DEFAULT_SHARED_LIMIT:
        kernel.max_dynamic_shared_size_bytes = kernels.shared_limit(device) - kernel.shared_size_bytes
    return kernel


def _struct(dtype, fields, what):
    """One struct of ``dtype`` from ``fields`` (arrays as CuPy arrays or None, the rest ints)."""
    try:
        return np.array([tuple(_address(fields[name]) if name in _POINTERS else int(fields[name])
                               for name in dtype.names)], dtype=dtype)
    except KeyError as exc:
        raise TypeError(f"{what} argument {exc} missing") from None


def search_fixed(launch, kernel, **fields):
    """Launch ``search_fixed_kernel`` (``launch.blocks`` blocks per query) on the current stream
    with the ``gpuhnsw::SearchFixedArgs`` fields given by name (:data:`SEARCH_FIXED_ARGS`) but
    ``beam``, ``hash_log2``, ``blocks`` and ``global_log2``, which come from ``launch``
    (:func:`plan_fixed`)."""
    fields.update(beam=launch.beam, hash_log2=launch.hash_log2, blocks=launch.blocks,
                  global_log2=launch.global_log2)
    args = _struct(SEARCH_FIXED_ARGS, fields, "search_fixed_kernel")
    kernel((int(fields["nq"]) * launch.blocks,), (kernels.FIXED_BLOCK,), (args,), shared_mem=launch.shared_bytes)


def gather_merged(kernel, *, columns, tile_slots, tile_ld, labels, workspace, ws_ld, nq, k, dists, out_slots,
                  out_labels, out_found, out_status):
    """Launch ``gather_merged_kernel`` (kernels/merge.cu): select_topk's columns of the multi-block
    tile -> slots, labels, found, status."""
    null = np.uint64(0)
    kernel((min(nq, 65535),), (kernels.MERGE_BLOCK,),
           (columns, tile_slots, np.int32(tile_ld), labels, workspace, np.int64(ws_ld), np.int32(nq), np.int32(k),
            dists, null if out_slots is None else out_slots, null if out_labels is None else out_labels, out_found,
            out_status))


def search(launch, kernel, **fields):
    """Launch ``search_beam_kernel``, one block per query, with the ``gpuhnsw::SearchArgs`` fields
    given by name (:data:`SEARCH_ARGS`; arrays as CuPy arrays or None, the rest as ints) but
    ``hash_log2``, which comes from ``launch`` (:func:`plan_search`)."""
    fields["hash_log2"] = launch.hash_log2
    args = _struct(SEARCH_ARGS, fields, "search_beam_kernel")
    kernel((int(fields["nq"]),), (kernels.SEARCH_BLOCK,), (args,), shared_mem=launch.shared_bytes)


def distances(kernel, *, vectors, stride, metric, n_slots, queries, nq, dim, slots, slots_ld, c, out,
              out_ld):
    """Launch ``compute_distances_kernel``: ``out[i, j]`` = distance of query ``i`` to slot
    ``slots[i * slots_ld + j]``."""
    kernel((min(nq, 65535),), (kernels.DISTANCE_BLOCK,),
           (vectors, np.int32(stride), np.int32(metric), np.int32(n_slots), queries, np.int32(nq),
            np.int32(dim), slots, np.int64(slots_ld), np.int32(c), out, np.int64(out_ld)),
           shared_mem=distance_shared_bytes(stride))


def topk(*, tile, row_stride, col_stride, n, index_offset, key_scale, key_bias, exclude, exclude_key, prev_dists,
         prev_index, nq, k, out_dists, out_index):
    """Launch ``select_topk_kernel`` (kernels/topk.cu) over ``nq`` rows of ``tile`` (entry ``(i, c)``
    at ``tile[i * row_stride + c * col_stride]``: a transposed read takes a tile's columns as its
    rows); None for an optional array is a null pointer."""
    cap = topk_capacity(k)
    warps = kernels.topk_warps(cap)
    null = np.uint64(0)
    kernel = kernels.get_kernel("topk", (cap,))
    kernel((min(nq, 65535),), (32 * warps,),
           (tile, np.int64(row_stride), np.int64(col_stride), np.int32(n), np.int64(index_offset), np.float32(key_scale),
            null if key_bias is None else key_bias, null if exclude is None else exclude,
            np.float32(exclude_key), null if prev_dists is None else prev_dists,
            null if prev_index is None else prev_index, np.int32(nq), np.int32(k), out_dists, out_index),
           shared_mem=topk_shared_bytes(cap, warps))


def scatter(kernel, *, r, slots, degree, labels, links, rows, m0, dim_pad, vectors, stride, links0, degree0,
            labels_out, q, lslots, ldegree, lstart, lfirst, lpacked):
    """Launch ``scatter_rows_kernel`` (kernels/scatter.cu): ``r`` staged full rows and ``q`` link
    rows into the mirror's arrays."""
    kernel((min(r + q, 65535),), (kernels.SCATTER_BLOCK,),
           (np.int32(r), slots, degree, labels, links, rows, np.int32(m0), np.int32(dim_pad), vectors,
            np.int32(stride), links0, degree0, labels_out, np.int32(q), lslots, ldegree, lstart, lfirst,
            lpacked))


# cuBLAS's enum values (library_types.h, cublas_api.h): data types, compute types, operations.
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_COMPUTE_32F, _COMPUTE_32F_PEDANTIC, _COMPUTE_32F_FAST_TF32 = 68, 69, 77
_OP_N, _OP_T, _GEMM_DEFAULT = 0, 1, -1
#: Screening precision -> (cuBLAS input type, compute type): float32 accumulation in every case;
#: ``fp32`` is pedantic (no TF32 whatever the handle's math mode).
GEMM_TYPES = {"fp16": (_CUDA_R_16F, _COMPUTE_32F), "bf16": (_CUDA_R_16BF, _COMPUTE_32F),
              "tf32": (_CUDA_R_32F, _COMPUTE_32F_FAST_TF32), "fp32": (_CUDA_R_32F, _COMPUTE_32F_PEDANTIC)}


def gemm(a, b, out, *, precision, alpha):
    """``out[..., i, j] = alpha * sum_t a[..., i, t] * b[..., j, t]`` on cuBLAS, on the current CuPy
    stream: ``cublasGemmEx`` for 2-D operands, ``cublasGemmStridedBatchedEx`` for 3-D ones.

    a : [m, d] or [batch, m, d]; b : [n, d] or [batch, n, d]: the storage of ``precision``
        (``_screen.to_storage``), unit stride along ``d``; a 2-D operand's rows may be further
        apart than ``d`` (a slice of a wider array), a 3-D one is C-contiguous
    out : cupy float32 [m, ldo >= n] (its first ``n`` columns written) or [batch, m, n], C-contiguous
    alpha : float, a power of two in the callers (the inverse of the inputs' scales)
    """
    cp = import_cupy()
    cublas = cp.cuda.cublas
    dtype, compute = GEMM_TYPES[precision]
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
    one = np.array(alpha, dtype=np.float32)
    zero = np.zeros((), dtype=np.float32)
    # row-major out = a b^T is column-major out^T = op_T(b) op_N(a)
    if a.ndim == 2:
        m, d = a.shape
        n = b.shape[0]
        cublas.gemmEx(handle, _OP_T, _OP_N, n, m, d, one.ctypes.data, b.data.ptr, dtype, b.strides[0] // b.itemsize,
                      a.data.ptr, dtype, a.strides[0] // a.itemsize, zero.ctypes.data, out.data.ptr, _CUDA_R_32F,
                      out.strides[0] // out.itemsize, compute, _GEMM_DEFAULT)
        return
    batch, m, d = a.shape
    n = b.shape[1]
    cublas.gemmStridedBatchedEx(handle, _OP_T, _OP_N, n, m, d, one.ctypes.data, b.data.ptr, dtype, d, n * d,
                                a.data.ptr, dtype, d, m * d, zero.ctypes.data, out.data.ptr, _CUDA_R_32F, n, m * n,
                                batch, compute, _GEMM_DEFAULT)
