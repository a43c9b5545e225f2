"""NN-descent on the GPU (CuPy): a random-projection forest, then local joins as batched matrix
products on tensor cores, as cuVS's and GNND's.

Shaped for a GPU: fixed-shape array operations and no sort of anything larger than the edge list;
the host waits for the edge counts of the two samplings, the live proposals of each join block and
the update count of the stopping rule::

    rows     brute.ResidentBase: float32 rows, their centred fp16 screening copy, |x - mu|^2
             (l2; cosine rows normalised on the device as they arrive)
    graph    key [n, K] uint64 per row, ascending: distance (order-preserving bits) << 32 | flags
             << 30 | id, so one integer compare orders by (distance, flags, id); EMPTY = all ones
    init     a random graph (hash of the seed), then ``n_trees`` random-projection trees merged into
             it: each tree splits every node at the median of a random +-1 projection, level by
             level over all nodes at once (one argsort of (node, projection) per level), down to
             leaves of at most ``leaf_size`` rows; each leaf's rows are compared with one batched
             product and each row keeps its K nearest in the leaf
    sample   every edge i -> j offers j to i's list and i to j's list with priority
             hash(round, min, max); per row the max_candidates smallest (priority, id) survive:
             C_new [n, m], C_old [n, m] (-1 padded), by one argsort of (row, priority) integers.
             A new entry sampled into its own row's C_new turns old
    join     for a block of B centre rows: G = V_new V_all^T from the fp16 copy ([B, m, 2m],
             cublasGemmStridedBatchedEx, float32 accumulation); D = |p - mu|^2 + |q - mu|^2 - 2 G
             (l2) or 1 - G (ip; cosine on normalised rows)
    propose  per (centre, row p) the PROPOSALS nearest of its 2m candidates, and per (centre, old
             q) the PROPOSALS nearest of the m new rows, chosen by select_topk_kernel (no atomics;
             before, every pair below the target's worst went on). Those that beat their target's
             worst at the start of the round (one nonzero, a wait, per block) go into its slot
             hash(row, id) of a [n, T] table by an atomic minimum of their key
             (``minimum.at``): the same id always meets itself (no repeats), two ids that share a
             slot keep the nearer (the other is dropped this round)
    merge    per row: table entries whose id the row already holds, and the second copy of one
             kept in both its slots, are dropped; select_topk_kernel keeps the K nearest of the
             row's K and its T table entries; entries from the table are this round's updates

It stops after a round with at most ``delta * n * K`` updates. The join distances carry the fp16
inputs' rounding (a few 1e-3 of |p - mu| |q - mu|), which only reorders near ties; the returned
distances are recomputed from the float32 rows (differences, never |p|^2 + |q|^2 - 2pq) and the
rows re-sorted. Everything is done with array operations that NumPy shares (``minimum.at`` is
``cupyx.scatter_min``'s ufunc form), so the logic runs on the CPU in the tests through a NumPy
stand-in for CuPy. Seconds per phase (upload, init, sample, join, merge, final) come from CUDA events
(``device.clock``) into ``info["phases"]``; each round's, with its update count, go to the
``gpuhnsw`` logger at DEBUG level and the counts to ``info["updates"]``.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ._errors import DeviceError
from ._progress import Progress
from .device import launch
from .device.arrays import import_cupy
from .device.brute import ResidentBase
from .device.clock import PhaseClock
from .device.kernels import TOPK_CAPACITIES
from .device.ops import select_topk

__all__ = ["nndescent_graph", "MAX_ROWS", "PHASES"]

# Entries of one batched block of the join (B * m * 2m distances, and a few times that in
# temporaries) and of the forest's leaf products.
_BLOCK_ENTRIES = 1 << 25
# Proposals per (centre, target) pair of a join: the nearest this many of the target's candidates.
PROPOSALS = 8
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ROW_MULT = np.uint64(0xC2B2AE3D27D4EB4F)
# Packed graph keys: distance bits << 32 | FROM_TABLE | NEW | id (ids below 2^30).
_ID_BITS = 30
_ID_MASK = np.uint64((1 << _ID_BITS) - 1)
_NEW = np.uint64(1 << _ID_BITS)
_FROM_TABLE = np.uint64(1 << (_ID_BITS + 1))
_EMPTY = np.uint64(2**64 - 1)
MAX_ROWS = (1 << _ID_BITS) - 1   # ids stay below _ID_MASK, the id bits of EMPTY
#: Phases of ``info["phases"]``.
PHASES = ("upload", "init", "sample", "join", "merge", "final")
# The join's screening precision (tensor cores; _screen's table).
_PRECISION = "fp16"

_log = logging.getLogger("gpuhnsw")


def _mix(xp, x):
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(xp, seed, a, b):
    s = _mix(xp, xp.asarray([seed & (2**64 - 1)], dtype=xp.uint64))     # shape [1]: arrays wrap
    return _mix(xp, _mix(xp, s ^ a.astype(xp.uint64)) ^ b.astype(xp.uint64))


def _subseed(seed, *parts):
    """A 64-bit seed from ``seed`` and small integers (a round, a tree, a level)."""
    s = np.array([seed & (2**64 - 1)], dtype=np.uint64)
    for p in parts:
        s = _mix(np, s ^ np.uint64(p + 1))
    return int(s[0])


def _pack(xp, dist, ids, flags):
    """uint64 keys of float32 ``dist`` and int64 ``ids`` (>= 0) with ``flags`` (uint64 bits):
    ordered as (dist, flags, id)."""
    u = xp.ascontiguousarray(dist, dtype=xp.float32).view(xp.uint32)
    mono = xp.where(u >= np.uint32(0x80000000), ~u, u | np.uint32(0x80000000)).astype(xp.uint64)
    return (mono << np.uint64(32)) | flags | ids.astype(xp.uint64)


def _ids(xp, key):
    """int64 ids of packed keys (-1 where EMPTY)."""
    return xp.where(key == _EMPTY, -1, (key & _ID_MASK).astype(xp.int64))


def _dists(xp, key):
    """float32 distances of packed keys (inf where EMPTY)."""
    mono = (key >> np.uint64(32)).astype(xp.uint32)
    u = xp.where(mono >= np.uint32(0x80000000), mono & np.uint32(0x7FFFFFFF), ~mono)
    return xp.where(key == _EMPTY, xp.float32(np.inf), u.view(xp.float32))


def nndescent_graph(x, k, space, dev, params, delta, progress, seed, info):
    """x [n, d] float32 (host); returns (ids int64 [n, k], dists float32 [n, k]) on the host."""
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"GPU NN-descent takes at most {MAX_ROWS} rows, got {x.shape[0]}; "
                         f"use device='cpu'")
    if min(max(int(params["intermediate_degree"]), k), x.shape[0] - 1) > TOPK_CAPACITIES[-1]:
        raise ValueError(f"GPU NN-descent keeps at most {TOPK_CAPACITIES[-1]} neighbours per row; "
                         f"use device='cpu'")
    cp = import_cupy()
    try:
        with cp.cuda.Device(dev[1] or 0):
            with Progress(progress, params["n_iters"], "NN-descent rounds (GPU)") as bar:
                return _run(cp, x, k, space, params, delta, seed, info, bar)
    except cp.cuda.memory.OutOfMemoryError as exc:
        raise DeviceError(f"GPU out of memory in NN-descent ({exc}); use device='cpu'") from exc


def _run(xp, x_host, K_out, space, params, delta, seed, info, bar):
    n, d = x_host.shape
    K = min(max(int(params["intermediate_degree"]), K_out), n - 1)
    m = int(params["max_candidates"])
    T = 8 * K               # proposal slots per row and round (4 K: a round or two more to converge)
    phases = {}
    clock = PhaseClock(xp, phases, PHASES)
    clock.start("upload")
    base = ResidentBase(x_host, "l2" if space == "l2" else "ip", _PRECISION, normalize=space == "cosine")
    clock.stop()
    rows = xp.arange(n, dtype=xp.int64)

    clock.start("init")
    # random initial graph: K others per row, repeats (same id, same key: adjacent once sorted)
    # emptied
    t = xp.arange(K, dtype=xp.int64)
    off = _hash(xp, seed, rows[:, None], t[None, :]) % np.uint64(n - 1)
    ids = (rows[:, None] + 1 + off.astype(xp.int64)) % n                      # never the row
    graph = xp.sort(_pack(xp, _gather_dists(xp, base, rows, ids), ids, _NEW), axis=1)
    repeat = xp.zeros(graph.shape, dtype=bool)
    repeat[:, 1:] = graph[:, 1:] == graph[:, :-1]
    graph = xp.sort(xp.where(repeat, _EMPTY, graph), axis=1)
    evals = xp.zeros((), dtype=xp.int64) + n * K
    for tree in range(int(params["n_trees"])):
        evals += _tree(xp, base, graph, int(params["leaf_size"]), _subseed(seed, 0, tree))
    clock.stop()
    rounds, updates_seen = 0, []
    stop_below = delta * n * K
    while rounds < params["n_iters"]:
        mark = len(clock.marks)
        round_seed = _subseed(seed, rounds + 1)
        clock.start("sample")
        ids = _ids(xp, graph)
        new = (graph & _NEW) != 0
        c_new, sampled = _sample(xp, ids, new & (ids >= 0), m, round_seed)
        c_old, _ = _sample(xp, ids, ~new & (ids >= 0), m, round_seed)
        flat = graph.reshape(-1)
        flat[sampled] = flat[sampled] & ~_NEW               # sampled new entries turn old
        cand = xp.concatenate([c_new, c_old], axis=1)       # [n, 2m]
        worst = _dists(xp, graph[:, -1])                    # [n] at the start of the round
        clock.stop()
        clock.start("join")
        table = xp.full((n, T), _EMPTY, dtype=xp.uint64)
        step = max(1, _BLOCK_ENTRIES // (2 * m * m))
        for a in range(0, n, step):
            b = min(a + step, n)
            evals += _join_block(xp, base, c_new[a:b], cand[a:b], m, worst, table)
        clock.stop()
        clock.start("merge")
        updates = int(_merge(xp, graph, table))             # the round's wait
        clock.stop()
        rounds += 1
        updates_seen.append(updates)
        took = clock.seconds(mark)
        _log.debug("NN-descent (GPU) round %d: %d updates; sample %.3f s, join %.3f s, merge %.3f s",
                   rounds, updates, took.get("sample", 0.0), took.get("join", 0.0), took.get("merge", 0.0))
        bar.to(rounds)
        if updates <= stop_below:
            break
    clock.start("final")
    ids = _ids(xp, graph)
    dist = _gather_dists(xp, base, rows, ids)               # direct, not |p|^2 + |q|^2 - 2pq
    graph = xp.sort(xp.where(ids >= 0, _pack(xp, dist, xp.maximum(ids, 0), np.uint64(0)), _EMPTY),
                    axis=1)[:, :K_out]
    out = (np.ascontiguousarray(xp.asnumpy(_ids(xp, graph)), dtype=np.int64),
           np.ascontiguousarray(xp.asnumpy(_dists(xp, graph)), dtype=np.float32))
    clock.stop()
    clock.read()
    info.update(rounds=rounds, dist_evals=int(evals), phases=phases, updates=updates_seen)
    return out


def _gather_dists(xp, base, rows, ids):
    """float32 [r, K]: distance of row rows[i] to rows ids[i, j] (inf where ids < 0), from the
    float32 rows (differences for l2)."""
    X = base.rows
    r, K = ids.shape
    out = xp.empty((r, K), dtype=xp.float32)
    step = max(1, _BLOCK_ENTRIES // (K * X.shape[1]))
    for a in range(0, r, step):
        v = X[xp.maximum(ids[a:a + step], 0)]                   # [B, K, d]
        q = X[rows[a:a + step]][:, None, :]
        if base.space == "l2":
            v = v - q
            dv = (v * v).sum(axis=2)
        else:
            dv = 1 - (v * q).sum(axis=2)
        out[a:a + step] = xp.where(ids[a:a + step] >= 0, dv, xp.float32(np.inf))
    return out


def _products(xp, base, a_ids, b_ids):
    """float32 [B, p, r] join distances of rows a_ids [B, p] to rows b_ids [B, r] (-1: inf) from
    the screening copy: one batched product on cuBLAS (``launch.gemm``)."""
    va = base.screen[xp.maximum(a_ids, 0)]                         # [B, p, d] (gathered copies)
    vb = base.screen[xp.maximum(b_ids, 0)]                         # [B, r, d]
    g = xp.empty((a_ids.shape[0], a_ids.shape[1], b_ids.shape[1]), dtype=xp.float32)
    launch.gemm(va, vb, g, precision=base.precision, alpha=1.0 / (base.scale * base.scale))
    if base.sq is not None:
        D = base.sq[xp.maximum(a_ids, 0)][:, :, None] + base.sq[xp.maximum(b_ids, 0)][:, None, :] - 2 * g
    else:
        D = 1 - g
    valid = (a_ids[:, :, None] >= 0) & (b_ids[:, None, :] >= 0) & (a_ids[:, :, None] != b_ids[:, None, :])
    return xp.where(valid, D, xp.float32(np.inf)), valid


def _tree(xp, base, graph, leaf_size, seed):
    """One random-projection tree's leaves joined and merged into ``graph``; returns the distances
    made (a device scalar)."""
    n, d = base.n, base.d
    levels = max(0, math.ceil(math.log2(max(n, 1) / max(leaf_size, 2))))
    order = xp.arange(n, dtype=xp.int64)
    position = xp.arange(n, dtype=xp.int64)
    dims = xp.arange(d, dtype=xp.int64)
    for level in range(levels):
        nodes = 1 << level
        bounds = (xp.arange(nodes + 1, dtype=xp.int64) * n) >> level
        node = xp.searchsorted(bounds, position, side="right") - 1        # [n] node of each position
        bits = _hash(xp, _subseed(seed, level), xp.arange(nodes, dtype=xp.int64)[:, None], dims[None, :])
        signs = xp.where((bits >> np.uint64(63)) != 0, xp.float32(1), xp.float32(-1))   # [nodes, d]
        proj = xp.empty(n, dtype=xp.float32)
        step = max(1, _BLOCK_ENTRIES // (4 * d))
        for a in range(0, n, step):
            proj[a:a + step] = (base.rows[order[a:a + step]] * signs[node[a:a + step]]).sum(axis=1)
        u = proj.view(xp.uint32)
        mono = xp.where(u >= np.uint32(0x80000000), ~u, u | np.uint32(0x80000000)).astype(xp.uint64)
        order = order[xp.argsort((node.astype(xp.uint64) << np.uint64(32)) | mono)]
    leaves = 1 << levels
    size = -(-n // leaves)
    bounds = (xp.arange(leaves + 1, dtype=xp.int64) * n) >> levels
    pos = bounds[:-1, None] + xp.arange(size, dtype=xp.int64)[None, :]            # [leaves, size]
    members = xp.where(pos < bounds[1:, None], order[xp.minimum(pos, n - 1)], -1)
    keep = min(graph.shape[1], size - 1)
    evals = xp.zeros((), dtype=xp.int64)
    if keep < 1:
        return evals
    table = xp.full((n, keep), _EMPTY, dtype=xp.uint64)
    step = max(1, _BLOCK_ENTRIES // (size * size))
    best_d = xp.empty((step * size, keep), dtype=xp.float32)
    best_j = xp.empty((step * size, keep), dtype=xp.int64)
    for a in range(0, leaves, step):
        mem = members[a:a + step]                                               # [B, size]
        D, valid = _products(xp, base, mem, mem)
        evals += valid.sum()
        r = mem.shape[0] * size
        select_topk(D.reshape(r, size), keep, best_d[:r], best_j[:r])
        cand = xp.take_along_axis(xp.repeat(mem, size, axis=0), xp.maximum(best_j[:r], 0), axis=1)
        owner = mem.reshape(r)
        ok = (owner >= 0)[:, None] & (best_j[:r] >= 0) & xp.isfinite(best_d[:r])
        table[owner[owner >= 0]] = xp.where(ok, _pack(xp, best_d[:r], cand, _FROM_TABLE | _NEW),
                                            _EMPTY)[owner >= 0]
    _merge(xp, graph, table)
    return evals


def _sample(xp, ids, mask, m, round_seed):
    """Candidates int64 [n, m]: per row the m of smallest (priority, id) among the masked edges,
    offered in both directions (-1 pads); and the flat positions in ``ids`` of the masked entries
    that their own row sampled."""
    n, K = ids.shape
    src, col = xp.nonzero(mask)
    dst = ids[src, col]
    row, cnd = xp.concatenate([src, dst]), xp.concatenate([dst, src])
    pos = xp.concatenate([src * K + col, xp.full(src.size, -1, dtype=xp.int64)])
    pr = _hash(xp, round_seed, xp.minimum(row, cnd), xp.maximum(row, cnd)) >> np.uint64(33)
    # one integer per offer: row, then priority, then the forward offer before the reverse
    # copy of the same pair (the same priority), which the repeat test below then drops
    key = (row.astype(xp.uint64) << np.uint64(32)) | (pr << np.uint64(1)) \
        | (pos < 0).astype(xp.uint64)
    o = xp.argsort(key)
    row, cnd, pos = row[o], cnd[o], pos[o]
    keep = xp.ones(row.size, dtype=bool)
    keep[1:] = (row[1:] != row[:-1]) | (cnd[1:] != cnd[:-1])
    row, cnd, pos = row[keep], cnd[keep], pos[keep]
    rank = xp.arange(row.size) - xp.searchsorted(row, row)
    ok = rank < m
    out = xp.full((n, m), -1, dtype=xp.int64)
    out[row[ok], rank[ok]] = cnd[ok]
    return out, pos[ok & (pos >= 0)]


def _join_block(xp, base, cn, ca, m, worst, table):
    """Local joins of one block of centres: cn [B, m] new, ca [B, 2m] new | old candidates; the
    nearest PROPOSALS proposals of each target that beat its ``worst`` go into ``table`` [n, T].
    Returns the distances made (a device scalar: no wait)."""
    B = cn.shape[0]
    D, valid = _products(xp, base, cn, ca)                     # [B, m, 2m]
    s = min(PROPOSALS, 2 * m)
    # q to p: per (centre, new p) the s nearest of its 2m candidates
    fd = xp.empty((B * m, s), dtype=xp.float32)
    fj = xp.empty((B * m, s), dtype=xp.int64)
    select_topk(D.reshape(B * m, 2 * m), s, fd, fj)
    f_target = xp.broadcast_to(cn.reshape(B * m, 1), (B * m, s))
    f_cand = xp.take_along_axis(xp.repeat(ca, m, axis=0), xp.maximum(fj, 0), axis=1)
    # p to old q (new-new pairs appear both ways already): per (centre, old q) the s nearest new p
    so = min(PROPOSALS, m)
    rd = xp.empty((B * m, so), dtype=xp.float32)
    rj = xp.empty((B * m, so), dtype=xp.int64)
    select_topk(xp.ascontiguousarray(D[:, :, m:].transpose(0, 2, 1)).reshape(B * m, m), so, rd, rj)
    r_target = xp.broadcast_to(ca[:, m:].reshape(B * m, 1), (B * m, so))
    r_cand = xp.take_along_axis(xp.repeat(cn, m, axis=0), xp.maximum(rj, 0), axis=1)
    target = xp.concatenate([f_target.reshape(-1), r_target.reshape(-1)])
    cand = xp.concatenate([f_cand.reshape(-1), r_cand.reshape(-1)])
    dist = xp.concatenate([fd.reshape(-1), rd.reshape(-1)])
    live = xp.nonzero((target >= 0) & (cand >= 0) & (dist < worst[xp.maximum(target, 0)]))[0]
    _propose(xp, table, target[live], cand[live], dist[live])
    return valid.sum()


def _slots(xp, target, cand, T):
    """The two table slots (int64, same shape) of a proposal of ``cand`` to row ``target``
    (uint64 arrays of one shape)."""
    h = (cand * _GOLDEN) ^ (target * _ROW_MULT)
    return tuple(((h >> shift) % np.uint64(T)).astype(xp.int64)
                 for shift in (np.uint64(40), np.uint64(16)))


def _propose(xp, table, target, cand, dist):
    """Atomic minimum of each proposal's key (target, cand: int64 [p], dist: float32 [p]) into two
    slots of its target's row, chosen by two hashes of (target, cand): a proposal is lost only
    when nearer ones take both."""
    T = table.shape[1]
    key = _pack(xp, dist, cand, _FROM_TABLE | _NEW)
    row = target * T
    flat = table.reshape(-1)
    for slot in _slots(xp, target.astype(xp.uint64), cand.astype(xp.uint64), T):
        xp.minimum.at(flat, row + slot, key)


def _merge(xp, graph, table):
    """The K best of each row's entries and its proposals, in place, row blocks at a time: a
    proposal of an id the row holds, and the second copy of one kept in both its slots, are
    dropped, then ``select_topk_kernel`` picks the K smallest distances of the K + T entries
    (ties: the row's own entries first). Flags of kept entries stay as they were; proposals are
    new. Returns how many entries came from proposals, a device scalar (reading it is a wait)."""
    n, K = graph.shape
    T = table.shape[1]
    step = max(1, _BLOCK_ENTRIES // (K * T))
    came = xp.zeros((), dtype=xp.int64)
    col = xp.arange(T, dtype=xp.int64)[None, :]
    out_d = xp.empty((min(step, n), K), dtype=xp.float32)
    out_i = xp.empty((min(step, n), K), dtype=xp.int64)
    for a in range(0, n, step):
        g, t = graph[a:a + step], table[a:a + step]
        r = g.shape[0]
        held = ((t[:, :, None] & _ID_MASK) == (g[:, None, :] & _ID_MASK)).any(axis=2)
        rows = xp.arange(a, a + r, dtype=xp.uint64)[:, None]
        s1, s2 = _slots(xp, rows, t & _ID_MASK, T)
        second = (t != _EMPTY) & (col == s2) & (s1 != s2) & (xp.take_along_axis(t, s1, axis=1) == t)
        t[held | second] = _EMPTY
        both = xp.concatenate([g, t], axis=1)                      # [r, K + T]
        select_topk(_dists(xp, both), K, out_d[:r], out_i[:r])
        best = xp.take_along_axis(both, out_i[:r], axis=1)         # ascending by distance
        proposed = (best != _EMPTY) & ((best & _FROM_TABLE) != 0)
        came += proposed.sum()
        graph[a:a + step] = xp.where(proposed, best & ~_FROM_TABLE, best)
    return came
