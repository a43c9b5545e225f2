"""NN-descent on the GPU (CuPy): the local join as batched matrix products, as cuVS's and GNND's.

The same rounds as the C engine (csrc/nndescent.c), shaped for a GPU::

    graph   ids [n, K] int64 (-1: empty), dist [n, K] float32 ascending, new [n, K] bool
    sample  every edge i -> j offers j to i's list and i to j's list with priority
            hash(round, min, max); per row the max_candidates smallest (priority, id) survive:
            C_new [n, m], C_old [n, m] (-1 padded), by one sort of the edge list
    join    for a block of B centre rows: V_new = X[C_new] [B, m, d], V_all = X[C_new | C_old]
            G = V_new @ V_all^T  (batched sgemm, [B, m, 2m]); D = |p|^2 + |q|^2 - 2 G (l2) or
            1 - G (ip; cosine on normalised rows). Entry (p, q) proposes q to row p (and p to q
            where q is old); proposals not better than the row's current worst are dropped
    merge   graph entries + proposals, sorted by (row, id) to drop repeats (the graph's own entry
            wins), then by (row, distance, id); the first K of each row stay. Entries that came
            from proposals are this round's updates (and are new)

It stops after a round with at most ``delta * n * K`` updates. The initial graph is random
(hash of the seed); the returned distances are recomputed directly (no |p|^2 + |q|^2 - 2pq
cancellation). Everything is done with array operations that NumPy shares, so the logic runs on
the CPU in the tests through a NumPy stand-in for CuPy.
"""
from __future__ import annotations

import numpy as np

from ._errors import DeviceError
from ._kernels import import_cupy

__all__ = ["nndescent_graph"]

# Entries of one batched block of the join (B * m * 2m floats) and of a gather (B * K * d).
_BLOCK_ENTRIES = 1 << 24
# Proposals collected before a merge.
_MERGE_ENTRIES = 1 << 24
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(xp, x):
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(xp, seed, a, b):
    s = _mix(xp, xp.asarray([seed & (2**64 - 1)], dtype=xp.uint64))     # shape [1]: arrays wrap
    return _mix(xp, _mix(xp, s ^ a.astype(xp.uint64)) ^ b.astype(xp.uint64))


def nndescent_graph(x, k, space, dev, params, delta, progress, seed, info):
    """x [n, d] float32 (host); returns (ids int64 [n, k], dists float32 [n, k]) on the host."""
    from ._progress import Progress
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
    X = xp.asarray(x_host)
    if space == "cosine":
        X = X / (xp.sqrt((X * X).sum(axis=1, keepdims=True)) + np.float32(1e-30))
    sq = (X * X).sum(axis=1) if space == "l2" else None
    m = int(params["max_candidates"])
    rows = xp.arange(n, dtype=xp.int64)

    # random initial graph: K distinct-or-repeated others per row; repeats are emptied by merge
    t = xp.arange(K, dtype=xp.int64)
    off = _hash(xp, seed, rows[:, None], t[None, :]) % np.uint64(n - 1)
    ids = (rows[:, None] + 1 + off.astype(xp.int64)) % n                      # never the row
    dist = _gather_dists(xp, X, rows, ids, space)
    ids, dist, new, _ = _merge(xp, n, K, ids, dist, xp.ones((n, K), dtype=bool),
                               xp.empty(0, dtype=xp.int64), xp.empty(0, dtype=xp.int64),
                               xp.empty(0, dtype=xp.float32))
    evals = n * K
    rounds = 0
    stop_below = delta * n * K
    while rounds < params["n_iters"]:
        round_seed = int(_mix(np, np.array([seed & (2**64 - 1)], dtype=np.uint64)
                              ^ np.uint64(rounds + 1))[0])
        c_new = _sample(xp, n, ids, new, m, round_seed)
        c_old = _sample(xp, n, ids, ~new & (ids >= 0), m, round_seed)
        new &= ~_member(xp, ids, c_new)                     # sampled new entries turn old
        cand = xp.concatenate([c_new, c_old], axis=1)       # [n, 2m]
        props, n_props, updates = [], 0, 0
        step = max(1, _BLOCK_ENTRIES // (m * 2 * m + m * d + 2 * m * d))
        for a in range(0, n, step):
            b = min(a + step, n)
            p, q, dv, e = _join_block(xp, X, sq, c_new[a:b], cand[a:b], space, m, dist[:, -1])
            evals += e
            props.append((p, q, dv))
            n_props += p.size
            if n_props >= _MERGE_ENTRIES:
                ids, dist, new, u = _merge_props(xp, n, K, ids, dist, new, props)
                updates += u
                props, n_props = [], 0
        ids, dist, new, u = _merge_props(xp, n, K, ids, dist, new, props)
        updates += u
        rounds += 1
        bar.to(rounds)
        if updates <= stop_below:
            break
    dist = _gather_dists(xp, X, rows, ids, space)           # direct, not |p|^2 + |q|^2 - 2pq
    # sort each row by (distance, id): rows are the primary key, so each stays a block of K
    o = xp.lexsort(xp.stack([ids.ravel(), dist.ravel(), xp.repeat(rows, K)]).astype(xp.float64))
    ids, dist = ids.ravel()[o].reshape(n, K), dist.ravel()[o].reshape(n, K)
    info.update(rounds=rounds, dist_evals=int(evals))
    return (np.ascontiguousarray(xp.asnumpy(ids[:, :K_out]), dtype=np.int64),
            np.ascontiguousarray(xp.asnumpy(dist[:, :K_out]), dtype=np.float32))


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


def _sample(xp, n, ids, mask, m, round_seed):
    """int64 [n, m]: per row the m candidates of smallest (priority, id) among the masked edges,
    offered in both directions; -1 pads."""
    src = xp.broadcast_to(xp.arange(n, dtype=xp.int64)[:, None], ids.shape)[mask]
    dst = ids[mask]
    row, cnd = xp.concatenate([src, dst]), xp.concatenate([dst, src])
    pr = _hash(xp, round_seed, xp.minimum(row, cnd), xp.maximum(row, cnd))
    o = xp.lexsort(xp.stack([cnd.astype(xp.uint64), pr, row.astype(xp.uint64)]))
    row, cnd = row[o], cnd[o]
    keep = xp.ones(row.size, dtype=bool)      # a pair offered twice has one priority: adjacent
    keep[1:] = (row[1:] != row[:-1]) | (cnd[1:] != cnd[:-1])
    row, cnd = row[keep], cnd[keep]
    rank = xp.arange(row.size) - xp.searchsorted(row, row)
    ok = rank < m
    out = xp.full((n, m), -1, dtype=xp.int64)
    out[row[ok], rank[ok]] = cnd[ok]
    return out


def _member(xp, ids, cand):
    """bool [n, K]: ids[i, j] is among cand[i] (ids >= 0)."""
    n, K = ids.shape
    out = xp.empty((n, K), dtype=bool)
    step = max(1, _BLOCK_ENTRIES // (K * cand.shape[1]))
    for a in range(0, n, step):
        out[a:a + step] = (ids[a:a + step, :, None] == cand[a:a + step, None, :]).any(axis=2)
    return out & (ids >= 0)


def _join_block(xp, X, sq, cn, ca, space, m, worst):
    """Local joins of one block of centres: cn [B, m] new, ca [B, 2m] new | old candidates.
    Returns proposals (rows, ids, dists) below the rows' current worst, and the distances made."""
    vn = X[xp.maximum(cn, 0)]                                   # [B, m, d]
    va = X[xp.maximum(ca, 0)]                                   # [B, 2m, d]
    g = xp.matmul(vn, va.transpose(0, 2, 1))                    # [B, m, 2m] batched sgemm
    if space == "l2":
        D = sq[xp.maximum(cn, 0)][:, :, None] + sq[xp.maximum(ca, 0)][:, None, :] - 2 * g
    else:
        D = 1 - g
    P = xp.broadcast_to(cn[:, :, None], D.shape)
    Q = xp.broadcast_to(ca[:, None, :], D.shape)
    valid = (P >= 0) & (Q >= 0) & (P != Q)
    to_p = valid & (D < worst[xp.maximum(P, 0)])              # q proposed to p
    old = (xp.arange(ca.shape[1]) >= m)[None, None, :]         # new-new pairs appear both ways
    to_q = valid & old & (D < worst[xp.maximum(Q, 0)])        # p proposed to old q
    return (xp.concatenate([P[to_p], Q[to_q]]), xp.concatenate([Q[to_p], P[to_q]]),
            xp.concatenate([D[to_p], D[to_q]]).astype(xp.float32), int(valid.sum()))


def _merge_props(xp, n, K, ids, dist, new, props):
    if not props:
        return ids, dist, new, 0
    return _merge(xp, n, K, ids, dist, new, *(xp.concatenate(c) for c in zip(*props)))


def _merge(xp, n, K, ids, dist, new, prow, pcand, pdist):
    """The K best distinct (distance, id) per row of graph entries and proposals. Returns the new
    (ids, dist, new) and how many entries came from proposals (they are new)."""
    nk, npr = n * K, prow.size
    row = xp.concatenate([xp.repeat(xp.arange(n, dtype=xp.int64), K), prow])
    cnd = xp.concatenate([ids.ravel(), pcand])
    dd = xp.concatenate([dist.ravel(), pdist])
    prop = xp.concatenate([xp.zeros(nk, dtype=bool), xp.ones(npr, dtype=bool)])
    fresh = xp.concatenate([new.ravel(), xp.ones(npr, dtype=bool)])
    # repeats of (row, id): the graph's own entry sorts first and stays (it keeps its flag)
    o = xp.lexsort(xp.stack([prop.astype(xp.int64), cnd, row]))
    row, cnd, dd, prop, fresh = row[o], cnd[o], dd[o], prop[o], fresh[o]
    keep = xp.ones(row.size, dtype=bool)
    keep[1:] = (row[1:] != row[:-1]) | (cnd[1:] != cnd[:-1]) | (cnd[1:] < 0)
    row, cnd, dd, prop, fresh = row[keep], cnd[keep], dd[keep], prop[keep], fresh[keep]
    dd = xp.where(cnd >= 0, dd, xp.float32(np.inf))
    o = xp.lexsort(xp.stack([cnd.astype(xp.float64), dd.astype(xp.float64),
                             row.astype(xp.float64)]))
    row, cnd, dd, prop, fresh = row[o], cnd[o], dd[o], prop[o], fresh[o]
    rank = xp.arange(row.size) - xp.searchsorted(row, row)
    ok = rank < K
    r, c = row[ok], rank[ok]
    out_ids = xp.full((n, K), -1, dtype=xp.int64)
    out_d = xp.full((n, K), np.inf, dtype=xp.float32)
    out_new = xp.zeros((n, K), dtype=bool)
    out_ids[r, c], out_d[r, c], out_new[r, c] = cnd[ok], dd[ok], fresh[ok] & (cnd[ok] >= 0)
    return out_ids, out_d, out_new, int((prop[ok] & (cnd[ok] >= 0)).sum())
