"""NN-descent on the GPU (CuPy): the local join as batched matrix products, as cuVS's and GNND's.

Shaped for a GPU: fixed-shape array operations, one wait on the device per round (the update
count of the stopping rule) and no sort of anything larger than the edge list::

    graph    key [n, K] uint64 per row, ascending: distance (order-preserving bits) << 32 | flags
             << 30 | id, so one integer compare orders by (distance, flags, id); EMPTY = all ones
    sample   every edge i -> j offers j to i's list and i to j's list with priority
             hash(round, min, max); per row the max_candidates smallest (priority, id) survive:
             C_new [n, m], C_old [n, m] (-1 padded), by one argsort of (row, priority) integers.
             A new entry sampled into its own row's C_new turns old
    join     for a block of B centre rows: V_new = X[C_new] [B, m, d], V_all = X[C_new | C_old]
             G = V_new @ V_all^T  (batched sgemm, [B, m, 2m]); D = |p|^2 + |q|^2 - 2 G (l2, the
             rows centred on their mean first: uncentred, the float32 sum cancels once the norms
             dwarf the distances) or 1 - G (ip; cosine on normalised rows). Entry (p, q)
             proposes q to row p (and p to q where q is old) when it beats the row's worst at the
             start of the round
    propose  a proposal goes into its row's slot hash(row, id) of a [n, T] table by an atomic
             minimum of its key (``minimum.at``): the same id always meets itself (no repeats),
             two ids that share a slot keep the nearer (the other is dropped this round)
    merge    per row: table entries whose id the row already holds, and the second copy of one
             kept in both its slots, are dropped; select_topk_kernel (kernels/topk.cu) keeps the
             K nearest of the row's K and its T table entries; entries from the table are this
             round's updates (and are new)

It stops after a round with at most ``delta * n * K`` updates. The initial graph is random
(hash of the seed); the returned distances are recomputed directly (no |p|^2 + |q|^2 - 2pq
cancellation). Everything is done with array operations that NumPy shares (``minimum.at`` is
``cupyx.scatter_min``'s ufunc form), so the logic runs on the CPU in the tests through a NumPy
stand-in for CuPy. Seconds per phase (device-synchronised at phase ends, a few waits per round)
go to ``info["phases"]`` and each round's to the ``gpuhnsw`` logger at DEBUG level.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ._errors import DeviceError
from ._progress import Progress
from ._rows import l2_centre, normalize_rows
from .device.arrays import import_cupy
from .device.kernels import TOPK_CAPACITIES
from .device.ops import select_topk

__all__ = ["nndescent_graph"]

# Entries of one batched block of the join (B * m * 2m distances, and a few times that in
# temporaries).
_BLOCK_ENTRIES = 1 << 25
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ROW_MULT = np.uint64(0xC2B2AE3D27D4EB4F)
# Packed graph keys: distance bits << 32 | FROM_TABLE | NEW | id (ids below 2^30).
_ID_BITS = 30
_ID_MASK = np.uint64((1 << _ID_BITS) - 1)
_NEW = np.uint64(1 << _ID_BITS)
_FROM_TABLE = np.uint64(1 << (_ID_BITS + 1))
_EMPTY = np.uint64(2**64 - 1)
MAX_ROWS = (1 << _ID_BITS) - 1   # ids stay below _ID_MASK, the id bits of EMPTY

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


class _Clock:
    """Seconds per phase, each ended by a device synchronisation (so the GPU work is counted)."""

    def __init__(self, xp):
        self.sync = getattr(xp.cuda.Device(), "synchronize", lambda: None)
        self.phases = {}
        self.t = time.perf_counter()

    def lap(self, phase):
        """Seconds since the last lap, added to ``phase``."""
        self.sync()
        now = time.perf_counter()
        seconds, self.t = now - self.t, now
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds
        return seconds


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
    clock = _Clock(xp)
    X = xp.asarray(x_host)
    if space == "cosine":
        X = normalize_rows(X, xp)
    mu = sq = None
    if space == "l2":
        mu, sq = l2_centre(x_host)                      # the joins' centre and |x - mu|^2
        mu, sq = xp.asarray(mu), xp.asarray(sq)
    rows = xp.arange(n, dtype=xp.int64)

    # random initial graph: K others per row, repeats (same id, same key: adjacent once sorted)
    # emptied
    t = xp.arange(K, dtype=xp.int64)
    off = _hash(xp, seed, rows[:, None], t[None, :]) % np.uint64(n - 1)
    ids = (rows[:, None] + 1 + off.astype(xp.int64)) % n                      # never the row
    graph = xp.sort(_pack(xp, _gather_dists(xp, X, rows, ids, space), ids, _NEW), axis=1)
    repeat = xp.zeros(graph.shape, dtype=bool)
    repeat[:, 1:] = graph[:, 1:] == graph[:, :-1]
    graph = xp.sort(xp.where(repeat, _EMPTY, graph), axis=1)
    evals = xp.zeros((), dtype=xp.int64) + n * K
    clock.lap("init")
    rounds = 0
    stop_below = delta * n * K
    while rounds < params["n_iters"]:
        round_seed = int(_mix(np, np.array([seed & (2**64 - 1)], dtype=np.uint64)
                              ^ np.uint64(rounds + 1))[0])
        ids = _ids(xp, graph)
        new = (graph & _NEW) != 0
        c_new, sampled = _sample(xp, ids, new & (ids >= 0), m, round_seed)
        c_old, _ = _sample(xp, ids, ~new & (ids >= 0), m, round_seed)
        flat = graph.reshape(-1)
        flat[sampled] = flat[sampled] & ~_NEW               # sampled new entries turn old
        cand = xp.concatenate([c_new, c_old], axis=1)       # [n, 2m]
        worst = _dists(xp, graph[:, -1])                    # [n] at the start of the round
        s_sample = clock.lap("sample")
        table = xp.full((n, T), _EMPTY, dtype=xp.uint64)
        step = max(1, _BLOCK_ENTRIES // (2 * m * m))
        for a in range(0, n, step):
            b = min(a + step, n)
            evals += _join_block(xp, X, mu, sq, c_new[a:b], cand[a:b], space, m, worst, table)
        s_join = clock.lap("join")
        updates = _merge(xp, graph, table)
        rounds += 1
        s_merge = clock.lap("merge")
        _log.debug("NN-descent (GPU) round %d: %d updates; sample %.3f s, join %.3f s, merge "
                   "%.3f s", rounds, updates, s_sample, s_join, s_merge)
        bar.to(rounds)
        if updates <= stop_below:
            break
    ids = _ids(xp, graph)
    dist = _gather_dists(xp, X, rows, ids, space)           # direct, not |p|^2 + |q|^2 - 2pq
    graph = xp.sort(xp.where(ids >= 0, _pack(xp, dist, xp.maximum(ids, 0), np.uint64(0)), _EMPTY),
                    axis=1)[:, :K_out]
    out = (np.ascontiguousarray(xp.asnumpy(_ids(xp, graph)), dtype=np.int64),
           np.ascontiguousarray(xp.asnumpy(_dists(xp, graph)), dtype=np.float32))
    clock.lap("final")
    info.update(rounds=rounds, dist_evals=int(evals), phases=clock.phases)
    return out


def _gather_dists(xp, X, rows, ids, space):
    """float32 [r, K]: distance of row rows[i] to rows ids[i, j] (inf where ids < 0)."""
    r, K = ids.shape
    out = xp.empty((r, K), dtype=xp.float32)
    step = max(1, _BLOCK_ENTRIES // (K * X.shape[1]))
    for a in range(0, r, step):
        v = X[xp.maximum(ids[a:a + step], 0)]                   # [B, K, d]
        q = X[rows[a:a + step]][:, None, :]
        if space == "l2":
            v = v - q
            dv = (v * v).sum(axis=2)
        else:
            dv = 1 - (v * q).sum(axis=2)
        out[a:a + step] = xp.where(ids[a:a + step] >= 0, dv, xp.float32(np.inf))
    return out


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


def _join_block(xp, X, mu, sq, cn, ca, space, m, worst, table):
    """Local joins of one block of centres: cn [B, m] new, ca [B, 2m] new | old candidates; their
    proposals below the rows' ``worst`` go into ``table`` [n, T]. l2: ``mu`` [d] the centre and
    ``sq`` [n] the rows' ``|x - mu|^2`` (else None). Returns the distances made (a device scalar:
    no wait)."""
    vn = X[xp.maximum(cn, 0)]                                   # [B, m, d] (gathered copies)
    va = X[xp.maximum(ca, 0)]                                   # [B, 2m, d]
    if mu is not None:
        vn -= mu
        va -= mu
    g = xp.matmul(vn, va.transpose(0, 2, 1))                    # [B, m, 2m] batched sgemm
    if space == "l2":
        D = sq[xp.maximum(cn, 0)][:, :, None] + sq[xp.maximum(ca, 0)][:, None, :] - 2 * g
    else:
        D = 1 - g
    valid = (cn[:, :, None] >= 0) & (ca[:, None, :] >= 0) & (cn[:, :, None] != ca[:, None, :])
    # only the proposals that pass go on (few after the first rounds): q to p, and p to old q
    # (new-new pairs appear both ways already)
    b, i, j = xp.nonzero(valid & (D < worst[xp.maximum(cn, 0)][:, :, None]))
    bo, io, jo = xp.nonzero(valid[:, :, m:] & (D[:, :, m:] < worst[xp.maximum(ca[:, m:], 0)][:, None, :]))
    _propose(xp, table, xp.concatenate([cn[b, i], ca[bo, m + jo]]),
             xp.concatenate([ca[b, j], cn[bo, io]]), xp.concatenate([D[b, i, j], D[bo, io, m + jo]]))
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
    new. Returns how many entries came from proposals."""
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
    return int(came)
